from forgerl.v1 import trajectory_pb2 as _trajectory_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutTrajectoriesRequest(_message.Message):
    __slots__ = ("trajectories",)
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    trajectories: _containers.RepeatedCompositeFieldContainer[_trajectory_pb2.Trajectory]
    def __init__(self, trajectories: _Optional[_Iterable[_Union[_trajectory_pb2.Trajectory, _Mapping]]] = ...) -> None: ...

class PutTrajectoriesResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class FetchBatchRequest(_message.Message):
    __slots__ = ("run_id", "size", "policy_version", "timeout_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    size: int
    policy_version: int
    timeout_s: float
    def __init__(self, run_id: _Optional[str] = ..., size: _Optional[int] = ..., policy_version: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class FetchBatchResponse(_message.Message):
    __slots__ = ("batch_id", "trajectories", "dropped_stale")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_STALE_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    trajectories: _containers.RepeatedCompositeFieldContainer[_trajectory_pb2.Trajectory]
    dropped_stale: int
    def __init__(self, batch_id: _Optional[str] = ..., trajectories: _Optional[_Iterable[_Union[_trajectory_pb2.Trajectory, _Mapping]]] = ..., dropped_stale: _Optional[int] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("run_id", "batch_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    batch_id: str
    def __init__(self, run_id: _Optional[str] = ..., batch_id: _Optional[str] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("committed",)
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    committed: int
    def __init__(self, committed: _Optional[int] = ...) -> None: ...

class GetPoolStatsRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetPoolStatsResponse(_message.Message):
    __slots__ = ("lag", "buffered", "dropped_stale", "dead_lettered", "duplicates", "served", "acknowledged", "in_flight", "redelivered", "skipped", "next_submit_seq")
    LAG_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_STALE_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REDELIVERED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    NEXT_SUBMIT_SEQ_FIELD_NUMBER: _ClassVar[int]
    lag: int
    buffered: int
    dropped_stale: int
    dead_lettered: int
    duplicates: int
    served: int
    acknowledged: int
    in_flight: int
    redelivered: int
    skipped: int
    next_submit_seq: int
    def __init__(self, lag: _Optional[int] = ..., buffered: _Optional[int] = ..., dropped_stale: _Optional[int] = ..., dead_lettered: _Optional[int] = ..., duplicates: _Optional[int] = ..., served: _Optional[int] = ..., acknowledged: _Optional[int] = ..., in_flight: _Optional[int] = ..., redelivered: _Optional[int] = ..., skipped: _Optional[int] = ..., next_submit_seq: _Optional[int] = ...) -> None: ...
