"""Rollout: episodes (task -> sandbox -> agent through the gateway -> tests -> rewards), many at once.

- `tasks`: the common task format (instructions, files, test command, time budget, FAIL_TO_PASS /
  PASS_TO_PASS), grading, the suite registry; `suites.tooluse` (learnable, generated from a seed, gold
  trajectories for SFT, tokenizer corpus) and `suites.swe` (small buggy repositories);
- `scaffold_config`: versioned scaffold configs (prompts, tool descriptions, turn budget, parallelism,
  context policy, sampling); `scaffold`: the interleaved-thinking agent and the scripted test agents;
  `third_party`: mini-swe-agent behind the same episode API;
- `sandbox`: one interface, a local implementation (namespaces, rlimits, a uid per sandbox) and a
  Kubernetes one (a Pod per episode); `tools`: what agents call, run inside the sandbox;
- `rewards`: performance / process / speed per step through `forgerl.rl.rewards`;
- `episode`: one episode end to end; `manager`: submissions, N in flight, infrastructure retries, events.
"""
