"""One mini-swe-agent episode against an OpenAI-compatible endpoint (the gateway), non-interactively.

Run with the Python of mini-swe-agent's own environment (it is not a dependency of forgerl):

    python mini_swe_agent_episode.py BASE_URL API_KEY WORKDIR STEP_LIMIT MAX_TOKENS TASK OUTPUT_JSON

It uses mini-swe-agent's tool-calling setup (`config/mini.yaml`: DefaultAgent, LitellmModel with its bash
tool, LocalEnvironment) with the model pointed at BASE_URL through litellm's OpenAI provider. Nothing
leaves 127.0.0.1: litellm reads its bundled model cost map, mini-swe-agent's global config goes to WORKDIR.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    base_url, api_key, workdir, step_limit, max_tokens, task, output = sys.argv[1:8]
    os.environ["MSWEA_SILENT_STARTUP"] = "1"
    os.environ["MSWEA_GLOBAL_CONFIG_DIR"] = str(Path(workdir) / ".mini-swe-agent")
    os.environ["MSWEA_COST_TRACKING"] = "ignore_errors"
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ["LITELLM_TELEMETRY"] = "False"
    os.environ.setdefault("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "2")  # a broken setup fails fast
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        os.environ.pop(proxy, None)

    import yaml
    from minisweagent import package_dir
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models.litellm_model import LitellmModel

    config = yaml.safe_load((Path(package_dir) / "config" / "mini.yaml").read_text())
    agent_config = {**config["agent"], "step_limit": int(step_limit), "cost_limit": 0.0}
    model_config = dict(config.get("model") or {})
    model_kwargs = dict(model_config.pop("model_kwargs", None) or {})
    model_kwargs.update(api_base=base_url, api_key=api_key, temperature=0.0, max_tokens=int(max_tokens), timeout=120)
    model = LitellmModel(
        model_name="openai/forgerl", model_kwargs=model_kwargs, cost_tracking="ignore_errors", **model_config
    )
    env = LocalEnvironment(cwd=workdir, timeout=20, **(config.get("environment") or {}))
    agent = DefaultAgent(model, env, **agent_config)
    try:
        result = agent.run(task)
    finally:
        Path(output).write_text(json.dumps(agent.serialize(), default=str))
    print(
        json.dumps(
            {"exit_status": result.get("exit_status"), "submission": result.get("submission"), "n_calls": agent.n_calls}
        )
    )


if __name__ == "__main__":
    main()
