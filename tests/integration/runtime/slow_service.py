"""A service whose GetStatus takes a while, for the graceful-shutdown test (run as a script)."""

import asyncio
import sys

from forgerl.runtime import ServiceConfig, ServiceSpec, load_config, run_service
from forgerl.v1 import inference_pb2, inference_pb2_grpc

WORK_S = 1.5  # the in-flight call's own duration; the grace period is longer


class SlowInference(inference_pb2_grpc.InferenceServiceServicer):
    async def GetStatus(self, request, context):  # type: ignore[no-untyped-def]
        print("in-flight", flush=True)  # the test waits for this line before sending SIGTERM
        await asyncio.sleep(WORK_S)
        return inference_pb2.GetStatusResponse(policy_version=42)


def main() -> None:
    config = load_config(ServiceConfig, "slow", sys.argv[1:])
    servicer = SlowInference()
    spec = ServiceSpec(
        name="slow",
        services=[inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]],
        register=lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server),
    )
    run_service(spec, config)


if __name__ == "__main__":
    main()
