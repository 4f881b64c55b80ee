from forgerl.v1 import trajectory_pb2 as _trajectory_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EpisodeEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EPISODE_EVENT_KIND_UNSPECIFIED: _ClassVar[EpisodeEventKind]
    EPISODE_EVENT_KIND_STARTED: _ClassVar[EpisodeEventKind]
    EPISODE_EVENT_KIND_FINISHED: _ClassVar[EpisodeEventKind]
    EPISODE_EVENT_KIND_RETRIED: _ClassVar[EpisodeEventKind]
    EPISODE_EVENT_KIND_FAILED: _ClassVar[EpisodeEventKind]
EPISODE_EVENT_KIND_UNSPECIFIED: EpisodeEventKind
EPISODE_EVENT_KIND_STARTED: EpisodeEventKind
EPISODE_EVENT_KIND_FINISHED: EpisodeEventKind
EPISODE_EVENT_KIND_RETRIED: EpisodeEventKind
EPISODE_EVENT_KIND_FAILED: EpisodeEventKind

class SubmitRequest(_message.Message):
    __slots__ = ("run_id", "suite", "split", "task_ids", "group_size", "scaffold_version", "max_in_flight", "publish", "reward_weights")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCAFFOLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    REWARD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    suite: str
    split: str
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    group_size: int
    scaffold_version: str
    max_in_flight: int
    publish: bool
    reward_weights: RewardWeights
    def __init__(self, run_id: _Optional[str] = ..., suite: _Optional[str] = ..., split: _Optional[str] = ..., task_ids: _Optional[_Iterable[str]] = ..., group_size: _Optional[int] = ..., scaffold_version: _Optional[str] = ..., max_in_flight: _Optional[int] = ..., publish: _Optional[bool] = ..., reward_weights: _Optional[_Union[RewardWeights, _Mapping]] = ...) -> None: ...

class RewardWeights(_message.Message):
    __slots__ = ("alpha", "beta")
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    alpha: float
    beta: float
    def __init__(self, alpha: _Optional[float] = ..., beta: _Optional[float] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("submission_id", "episodes")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    episodes: int
    def __init__(self, submission_id: _Optional[str] = ..., episodes: _Optional[int] = ...) -> None: ...

class EpisodeEvent(_message.Message):
    __slots__ = ("submission_id", "episode_id", "task_id", "kind", "reward", "success", "wall_clock_s", "trajectory_id", "message")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    WALL_CLOCK_S_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    episode_id: str
    task_id: str
    kind: EpisodeEventKind
    reward: _trajectory_pb2.RewardComponents
    success: bool
    wall_clock_s: float
    trajectory_id: str
    message: str
    def __init__(self, submission_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., task_id: _Optional[str] = ..., kind: _Optional[_Union[EpisodeEventKind, str]] = ..., reward: _Optional[_Union[_trajectory_pb2.RewardComponents, _Mapping]] = ..., success: _Optional[bool] = ..., wall_clock_s: _Optional[float] = ..., trajectory_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StreamEpisodeEventsRequest(_message.Message):
    __slots__ = ("run_id", "submission_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    submission_id: str
    def __init__(self, run_id: _Optional[str] = ..., submission_id: _Optional[str] = ...) -> None: ...

class StreamEpisodeEventsResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: EpisodeEvent
    def __init__(self, event: _Optional[_Union[EpisodeEvent, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("submission_id",)
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    def __init__(self, submission_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: int
    def __init__(self, cancelled: _Optional[int] = ...) -> None: ...

class GetRolloutStatsRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRolloutStatsResponse(_message.Message):
    __slots__ = ("in_flight", "queued", "finished", "retried", "failed")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RETRIED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    queued: int
    finished: int
    retried: int
    failed: int
    def __init__(self, in_flight: _Optional[int] = ..., queued: _Optional[int] = ..., finished: _Optional[int] = ..., retried: _Optional[int] = ..., failed: _Optional[int] = ...) -> None: ...
