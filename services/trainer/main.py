"""Entry point of the trainer service: `forgerl serve trainer` or `python -m forgerl.services.trainer.main`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forgerl.runtime import ServiceSpec, load_config, run_service
from forgerl.services.trainer.config import TrainerConfig
from forgerl.services.trainer.servicer import TrainerServicer
from forgerl.v1 import trainer_pb2, trainer_pb2_grpc

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]


def build(config: TrainerConfig) -> ServiceSpec:
    servicer = TrainerServicer(config)
    return ServiceSpec(
        name="trainer",
        services=[SERVICE],
        register=lambda server: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server),
        on_start=servicer.start,
        on_stop=servicer.stop,
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(TrainerConfig, "trainer", sys.argv[1:] if argv is None else argv)
    run_service(build(config), config)


if __name__ == "__main__":
    main()
