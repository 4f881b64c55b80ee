"""Entry point of the rollout service: `forgerl serve rollout` or `python -m forgerl.services.rollout.main`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forgerl.runtime import ServiceSpec, load_config, placeholder_spec, run_service
from forgerl.services.rollout.config import RolloutConfig
from forgerl.v1 import rollout_pb2

SERVICE = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"]


def build(config: RolloutConfig) -> ServiceSpec:
    return placeholder_spec("rollout", SERVICE, owner="issue 8: rollout")


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(RolloutConfig, "rollout", sys.argv[1:] if argv is None else argv)
    run_service(build(config), config)


if __name__ == "__main__":
    main()
