"""Entry point of the inference service: `forgerl serve inference` or `python -m forgerl.services.inference.main`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forgerl.runtime import ServiceSpec, load_config, placeholder_spec, run_service
from forgerl.services.inference.config import InferenceConfig
from forgerl.v1 import inference_pb2

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]


def build(config: InferenceConfig) -> ServiceSpec:
    return placeholder_spec("inference", SERVICE, owner="issue 5: inference")


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(InferenceConfig, "inference", sys.argv[1:] if argv is None else argv)
    run_service(build(config), config)


if __name__ == "__main__":
    main()
