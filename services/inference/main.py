"""Entry point of the inference service: `forgerl serve inference` or `python -m forgerl.services.inference.main`.

The engine starts (and warms up) in `on_start`, before the health service reports SERVING. A model path
that holds no checkpoint, or an engine that cannot start, ends the process with a message and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = load_config(InferenceConfig, "inference", sys.argv[1:] if argv is None else argv)
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
