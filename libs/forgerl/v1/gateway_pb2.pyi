from forgerl.v1 import trajectory_pb2 as _trajectory_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpenEpisodeRequest(_message.Message):
    __slots__ = ("run_id", "task_id", "group_id", "scaffold_version", "strip_reasoning", "suite", "split", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SCAFFOLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    STRIP_REASONING_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_id: str
    group_id: str
    scaffold_version: str
    strip_reasoning: bool
    suite: str
    split: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., group_id: _Optional[str] = ..., scaffold_version: _Optional[str] = ..., strip_reasoning: _Optional[bool] = ..., suite: _Optional[str] = ..., split: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class OpenEpisodeResponse(_message.Message):
    __slots__ = ("episode_id", "episode_key", "base_url")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_KEY_FIELD_NUMBER: _ClassVar[int]
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    episode_key: str
    base_url: str
    def __init__(self, episode_id: _Optional[str] = ..., episode_key: _Optional[str] = ..., base_url: _Optional[str] = ...) -> None: ...

class CloseEpisodeRequest(_message.Message):
    __slots__ = ("episode_key", "step_rewards", "reward", "success", "wall_clock_s", "baseline_s", "publish")
    EPISODE_KEY_FIELD_NUMBER: _ClassVar[int]
    STEP_REWARDS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    WALL_CLOCK_S_FIELD_NUMBER: _ClassVar[int]
    BASELINE_S_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    episode_key: str
    step_rewards: _containers.RepeatedCompositeFieldContainer[_trajectory_pb2.StepReward]
    reward: _trajectory_pb2.RewardComponents
    success: bool
    wall_clock_s: float
    baseline_s: float
    publish: bool
    def __init__(self, episode_key: _Optional[str] = ..., step_rewards: _Optional[_Iterable[_Union[_trajectory_pb2.StepReward, _Mapping]]] = ..., reward: _Optional[_Union[_trajectory_pb2.RewardComponents, _Mapping]] = ..., success: _Optional[bool] = ..., wall_clock_s: _Optional[float] = ..., baseline_s: _Optional[float] = ..., publish: _Optional[bool] = ...) -> None: ...

class CloseEpisodeResponse(_message.Message):
    __slots__ = ("trajectory",)
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    trajectory: _trajectory_pb2.Trajectory
    def __init__(self, trajectory: _Optional[_Union[_trajectory_pb2.Trajectory, _Mapping]] = ...) -> None: ...

class GetEpisodeRequest(_message.Message):
    __slots__ = ("episode_key",)
    EPISODE_KEY_FIELD_NUMBER: _ClassVar[int]
    episode_key: str
    def __init__(self, episode_key: _Optional[str] = ...) -> None: ...

class GetEpisodeResponse(_message.Message):
    __slots__ = ("episode_id", "turns", "generated_tokens", "replica", "closed")
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    episode_id: str
    turns: int
    generated_tokens: int
    replica: str
    closed: bool
    def __init__(self, episode_id: _Optional[str] = ..., turns: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., replica: _Optional[str] = ..., closed: _Optional[bool] = ...) -> None: ...
