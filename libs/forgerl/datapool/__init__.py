"""The data pool: trajectories on Kafka between agents and the trainer, served as windowed-FIFO batches.

- `topics`: topic names per run and the protobuf wire format (schema version, key = group_id);
- `producer`: `TrajectoryProducer` for the gateway/rollout (idempotent, acks=all, backpressure);
- `pool`: the I/O-free bookkeeping of one run (windowed FIFO, staleness, duplicates, batches, offsets);
- `feed`: the Kafka side of one run (consumer thread, dead letters, state log, commits);
- `manager`: `DataPool`, the asyncio front the gRPC servicer (services/datapool) wraps;
- `broker`: launchers for a local Tansu broker and a local S3 server.
"""

from forgerl.datapool.topics import SCHEMA_VERSION, SUBMIT_SEQ_LABEL, RunTopics

__all__ = ["SCHEMA_VERSION", "SUBMIT_SEQ_LABEL", "RunTopics"]
