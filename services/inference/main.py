"""Entry point of the inference service: `forgerl serve inference` or `python -m forgerl.services.inference.main`.

The engine starts (and warms up) in `on_start`, before the health service reports SERVING. A model path
that holds no checkpoint, or an engine that cannot start, ends the process with a message and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from forgerl.inference.checkpoint import CheckpointError, inspect_checkpoint
from forgerl.runtime import ConfigError, ServiceSpec, load_config, run_service
from forgerl.services.inference.config import InferenceConfig
from forgerl.services.inference.servicer import InferenceServicer
from forgerl.v1 import inference_pb2, inference_pb2_grpc

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]


def build(config: InferenceConfig, servicer: InferenceServicer | None = None) -> ServiceSpec:
    servicer = servicer or InferenceServicer(config)
    return ServiceSpec(
        name="inference",
        services=[SERVICE],
        register=lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server),
        on_start=servicer.start,
        on_stop=servicer.stop,
        health_check=servicer.engine.failure,
    )


def check_model_path(config: InferenceConfig) -> None:
    """ConfigError naming the flag when model_path is unset or holds no checkpoint."""
    if not config.model_path:
        raise ConfigError("inference needs a checkpoint to serve: set --model-path or FORGERL_INFERENCE_MODEL_PATH")
    try:
        inspect_checkpoint(config.model_path)
    except CheckpointError as err:
        raise ConfigError(f"inference cannot serve --model-path {config.model_path!r}: {err}") from None


def with_latest_policy(config: InferenceConfig) -> InferenceConfig:
    """`config` serving the policy the running run published last (`resume_latest_policy`), when there is one."""
    if not config.resume_latest_policy:
        return config
    from sqlalchemy.exc import SQLAlchemyError

    from forgerl.store import Store, StoreError, default_url

    try:
        with Store.open(config.database_url or default_url(config.state_dir), migrate=False) as store:
            latest = store.latest_policy()
    except (SQLAlchemyError, StoreError) as err:  # no store yet (nothing was ever published): the initial one
        logging.getLogger("forgerl.inference").info("no published policy to resume (%s)", err)
        return config
    if latest is None or not Path(latest.path, "config.json").exists():
        return config
    print(f"forgerl inference: serving run {latest.run_id}'s latest policy, version {latest.policy_version}: "
          f"{latest.path}", file=sys.stderr)  # fmt: skip
    return config.model_copy(update={"model_path": latest.path, "policy_version": latest.policy_version})


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = load_config(InferenceConfig, "inference", sys.argv[1:] if argv is None else argv)
        config = with_latest_policy(config)
        check_model_path(config)
    except ConfigError as err:
        print(f"forgerl inference: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        run_service(build(config), config)
    except Exception as err:  # the engine did not start: say so plainly instead of a vLLM traceback only
        print(
            f"forgerl inference: the vLLM engine could not start on {config.model_path!r}: {type(err).__name__}: {err}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
