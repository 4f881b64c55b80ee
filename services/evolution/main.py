"""Entry point of the evolution service: `forgerl serve evolution` or `python -m forgerl.services.evolution.main`.

One process, one event loop: the gRPC API (EvolutionService, with the runtime's health, reflection and
metrics), the controller's iteration loop, and the operator console's HTTP server (uvicorn, started in
`on_start`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forgerl.evolution.evaluation import Evaluator
from forgerl.evolution.proposers import Proposer
from forgerl.runtime import ServiceSpec, load_config, run_service
from forgerl.services.evolution.config import EvolutionConfig
from forgerl.services.evolution.servicer import EvolutionService
from forgerl.v1 import evolution_pb2, evolution_pb2_grpc

SERVICE = evolution_pb2.DESCRIPTOR.services_by_name["EvolutionService"]


def build(
    config: EvolutionConfig, evaluator: Evaluator | None = None, proposer: Proposer | None = None
) -> tuple[ServiceSpec, EvolutionService]:
    """The spec, and the service object (tests reach its controller and console URL through it)."""
    service = EvolutionService(config, evaluator, proposer)
    spec = ServiceSpec(
        name="evolution",
        services=[SERVICE],
        register=lambda server: evolution_pb2_grpc.add_EvolutionServiceServicer_to_server(service.servicer, server),
        on_start=service.start,
        on_stop=service.stop,
    )
    return spec, service


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(EvolutionConfig, "evolution", sys.argv[1:] if argv is None else argv)
    run_service(lambda: build(config)[0], config)  # its rollout channel belongs to the server's loop


if __name__ == "__main__":
    main()
