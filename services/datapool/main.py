"""Entry point of the datapool service: `forgerl serve datapool` or `python -m forgerl.services.datapool.main`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forgerl.runtime import ServiceSpec, load_config, placeholder_spec, run_service
from forgerl.services.datapool.config import DatapoolConfig
from forgerl.v1 import datapool_pb2

SERVICE = datapool_pb2.DESCRIPTOR.services_by_name["DatapoolService"]


def build(config: DatapoolConfig) -> ServiceSpec:
    return placeholder_spec("datapool", SERVICE, owner="issue 7: data pool")


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(DatapoolConfig, "datapool", sys.argv[1:] if argv is None else argv)
    run_service(build(config), config)


if __name__ == "__main__":
    main()
