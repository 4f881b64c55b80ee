"""Entry point of the evolution service: `forgerl serve evolution` or `python -m forgerl.services.evolution.main`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forgerl.runtime import ServiceSpec, load_config, placeholder_spec, run_service
from forgerl.services.evolution.config import EvolutionConfig
from forgerl.v1 import evolution_pb2

SERVICE = evolution_pb2.DESCRIPTOR.services_by_name["EvolutionService"]


def build(config: EvolutionConfig) -> ServiceSpec:
    return placeholder_spec("evolution", SERVICE, owner="self-evolution, not yet scheduled")


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(EvolutionConfig, "evolution", sys.argv[1:] if argv is None else argv)
    run_service(build(config), config)


if __name__ == "__main__":
    main()
