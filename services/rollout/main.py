"""Entry point of the rollout service: `forgerl serve rollout` or `python -m forgerl.services.rollout.main`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forgerl.runtime import ServiceSpec, load_config, run_service
from forgerl.services.rollout.config import RolloutConfig
from forgerl.services.rollout.servicer import RolloutServicer, build_servicer
from forgerl.v1 import rollout_pb2, rollout_pb2_grpc

SERVICE = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"]


def spec_for(servicer: RolloutServicer) -> ServiceSpec:
    return ServiceSpec(
        name="rollout",
        services=[SERVICE],
        register=lambda server: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, server),
        on_start=servicer.start,
        on_stop=servicer.stop,
    )


def build(config: RolloutConfig) -> ServiceSpec:
    return spec_for(build_servicer(config))


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(RolloutConfig, "rollout", sys.argv[1:] if argv is None else argv)
    run_service(lambda: build(config), config)  # its peer channels belong to the server's loop


if __name__ == "__main__":
    main()
