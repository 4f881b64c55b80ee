"""Entry point of the gateway service: `forgerl serve gateway` or `python -m forgerl.services.gateway.main`.

One process, one event loop: the gRPC admin API (GatewayService, with the runtime's health, reflection
and metrics) and the agents' OpenAI-compatible HTTP API (uvicorn, started in `on_start`). Health reports
SERVING once the tokenizer is loaded and the HTTP port is listening.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forgerl.runtime import ServiceSpec, load_config, run_service
from forgerl.services.gateway.config import GatewayConfig
from forgerl.services.gateway.servicer import GatewayServicer
from forgerl.v1 import gateway_pb2, gateway_pb2_grpc

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]


def build(config: GatewayConfig, servicer: GatewayServicer | None = None) -> ServiceSpec:
    servicer = servicer or GatewayServicer(config)
    return ServiceSpec(
        name="gateway",
        services=[SERVICE],
        register=lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server),
        on_start=servicer.start,
        on_stop=servicer.stop,
        health_check=servicer.failure,
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(GatewayConfig, "gateway", sys.argv[1:] if argv is None else argv)
    run_service(build(config), config)


if __name__ == "__main__":
    main()
