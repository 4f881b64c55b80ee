"""Entry point of the gateway service: `forgerl serve gateway` or `python -m forgerl.services.gateway.main`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forgerl.runtime import ServiceSpec, load_config, placeholder_spec, run_service
from forgerl.services.gateway.config import GatewayConfig
from forgerl.v1 import gateway_pb2

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]


def build(config: GatewayConfig) -> ServiceSpec:
    return placeholder_spec("gateway", SERVICE, owner="issue 6: gateway")


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(GatewayConfig, "gateway", sys.argv[1:] if argv is None else argv)
    run_service(build(config), config)


if __name__ == "__main__":
    main()
