"""mini-swe-agent as a rollout agent: run by the Python of an environment that has mini-swe-agent (its
litellm pins clash with the rest of forgerl's environment), never importing forgerl itself.

    python mini_swe_bridge.py SPEC_JSON

SPEC: {"base_url", "api_key", "model", "task", "step_limit", "wall_time_limit_s", "temperature", "max_tokens",
       "request_fd", "reply_fd"}

mini-swe-agent's own DefaultAgent and LitellmModel (tool calling, `config/mini.yaml`) talk to the gateway
at base_url with the episode key, like any OpenAI client. Its environment is `BridgeEnvironment`: every
shell command goes as a JSON line to rollout on `request_fd` ({"exec": command, "timeout": s}) and the
result comes back on `reply_fd` ({"output": ..., "returncode": n}): rollout runs it in the episode's
sandbox. Each model call that reached the model is announced before its commands ({"model_call": true},
with "format_error": true when its output had no usable tool call), so rollout groups the commands by
turn. The end: {"done": {"exit_status", "submission", "n_calls"}}. Logs go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
    os.environ.setdefault("MSWEA_COST_TRACKING", "ignore_errors")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")

    import yaml
    from minisweagent import package_dir
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.exceptions import FormatError
    from minisweagent.models.litellm_model import LitellmModel

    requests = os.fdopen(spec["request_fd"], "w", buffering=1)
    replies = os.fdopen(spec["reply_fd"], "r")

    def send(payload: dict[str, Any]) -> None:
        requests.write(json.dumps(payload) + "\n")
        requests.flush()

    class BridgeEnvironment(LocalEnvironment):
        """Commands run in rollout's sandbox; the rest (templates, submission check) is LocalEnvironment's."""

        def execute(self, action: dict | str, cwd: str = "", *, timeout: int | None = None) -> dict[str, Any]:
            command = action if isinstance(action, str) else str(action.get("command", ""))
            send({"exec": command, "timeout": timeout or self.config.timeout})
            reply = json.loads(replies.readline())
            output = {
                "output": reply.get("output", ""),
                "returncode": int(reply.get("returncode", 1)),
                "exception_info": reply.get("exception_info", ""),
            }
            self._check_finished(output)
            return output

    config = yaml.safe_load((Path(package_dir) / "config" / "mini.yaml").read_text())
    agent_config = {
        **config["agent"],
        "step_limit": int(spec["step_limit"]),
        "cost_limit": 0.0,
        "wall_time_limit_seconds": int(spec["wall_time_limit_s"]),
    }
    agent_config.pop("mode", None)
    model_config = dict(config.get("model") or {})
    model_kwargs = dict(model_config.pop("model_kwargs", None) or {})
    model_kwargs.update(
        api_base=spec["base_url"],
        api_key=spec["api_key"],
        temperature=spec["temperature"],
        max_tokens=spec["max_tokens"],
    )
    model = LitellmModel(
        model_name=f"openai/{spec['model']}", model_kwargs=model_kwargs, cost_tracking="ignore_errors", **model_config
    )
    model_query = model.query

    def counted_query(*args: Any, **kwargs: Any) -> Any:
        """Announce every model call that reached the model (one gateway turn), before its commands run."""
        try:
            message = model_query(*args, **kwargs)
        except FormatError:
            send({"model_call": True, "format_error": True})
            raise
        send({"model_call": True})
        return message

    model.query = counted_query
    env = BridgeEnvironment(timeout=int(spec.get("command_timeout_s", 60)), **(config.get("environment") or {}))
    agent = DefaultAgent(model, env, **agent_config)
    try:
        result = agent.run(spec["task"])
    except Exception as exc:  # the agent's model calls failed: report it, rollout decides
        send(
            {"done": {"exit_status": type(exc).__name__, "submission": "", "n_calls": agent.n_calls, "error": str(exc)}}
        )
        return
    send({"done": {"exit_status": result.get("exit_status", ""), "submission": result.get("submission", ""),
                   "n_calls": agent.n_calls}})  # fmt: skip


if __name__ == "__main__":
    main()
