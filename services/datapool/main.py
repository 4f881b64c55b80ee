"""Entry point of the datapool service: `forgerl serve datapool` or `python -m forgerl.services.datapool.main`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forgerl.datapool.manager import DataPool
from forgerl.runtime import ServiceSpec, load_config, run_service
from forgerl.services.datapool.config import DatapoolConfig
from forgerl.services.datapool.servicer import (
    DatapoolServicer,
    add_to_server,
    settings_from_config,
    store_policy_lookup,
)
from forgerl.v1 import datapool_pb2

SERVICE = datapool_pb2.DESCRIPTOR.services_by_name["DatapoolService"]


def build(config: DatapoolConfig) -> ServiceSpec:
    policy_for = store_policy_lookup(config) if config.run_policy_from_store else None
    settings = settings_from_config(config)
    settings.kafka.security.client_kwargs()  # a missing CA file or password fails here, before the server binds
    pool = DataPool(settings, policy_for=policy_for)
    servicer = DatapoolServicer(pool)
    return ServiceSpec(
        name="datapool",
        services=[SERVICE],
        register=lambda server: add_to_server(servicer, server),
        on_start=servicer.start,
        on_stop=servicer.stop,
        health_check=pool.failure,
        metrics=pool.registry,  # the pool's counters (dead letters, drops, lag) on the service's /metrics
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(DatapoolConfig, "datapool", sys.argv[1:] if argv is None else argv)
    run_service(build(config), config)


if __name__ == "__main__":
    main()
