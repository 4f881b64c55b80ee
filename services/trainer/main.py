"""Entry point of the trainer service: `forgerl serve trainer` or `python -m forgerl.services.trainer.main`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forgerl.runtime import ServiceSpec, load_config, placeholder_spec, run_service
from forgerl.services.trainer.config import TrainerConfig
from forgerl.v1 import trainer_pb2

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]


def build(config: TrainerConfig) -> ServiceSpec:
    return placeholder_spec("trainer", SERVICE, owner="issue 9: trainer")


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(TrainerConfig, "trainer", sys.argv[1:] if argv is None else argv)
    run_service(build(config), config)


if __name__ == "__main__":
    main()
