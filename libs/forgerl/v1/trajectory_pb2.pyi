import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ToolCall(_message.Message):
    __slots__ = ("id", "name", "arguments_json", "malformed")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    arguments_json: str
    malformed: bool
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., arguments_json: _Optional[str] = ..., malformed: _Optional[bool] = ...) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("tool_call_id", "content", "is_error", "duration_s")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    IS_ERROR_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    content: str
    is_error: bool
    duration_s: float
    def __init__(self, tool_call_id: _Optional[str] = ..., content: _Optional[str] = ..., is_error: _Optional[bool] = ..., duration_s: _Optional[float] = ...) -> None: ...

class RoutedExperts(_message.Message):
    __slots__ = ("num_layers", "top_k", "expert_ids")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    top_k: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, num_layers: _Optional[int] = ..., top_k: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TurnTimings(_message.Message):
    __slots__ = ("time_to_first_token_s", "generation_s", "tool_s")
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    GENERATION_S_FIELD_NUMBER: _ClassVar[int]
    TOOL_S_FIELD_NUMBER: _ClassVar[int]
    time_to_first_token_s: float
    generation_s: float
    tool_s: float
    def __init__(self, time_to_first_token_s: _Optional[float] = ..., generation_s: _Optional[float] = ..., tool_s: _Optional[float] = ...) -> None: ...

class Turn(_message.Message):
    __slots__ = ("prompt_token_ids", "generated_token_ids", "behaviour_logprobs", "loss_mask", "policy_version", "timings", "reasoning", "content", "tool_calls", "tool_results", "routed_experts", "cached_prompt_tokens", "finish_reason")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOSS_MASK_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULTS_FIELD_NUMBER: _ClassVar[int]
    ROUTED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    behaviour_logprobs: _containers.RepeatedScalarFieldContainer[float]
    loss_mask: _containers.RepeatedScalarFieldContainer[int]
    policy_version: int
    timings: TurnTimings
    reasoning: str
    content: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    tool_results: _containers.RepeatedCompositeFieldContainer[ToolResult]
    routed_experts: RoutedExperts
    cached_prompt_tokens: int
    finish_reason: str
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., generated_token_ids: _Optional[_Iterable[int]] = ..., behaviour_logprobs: _Optional[_Iterable[float]] = ..., loss_mask: _Optional[_Iterable[int]] = ..., policy_version: _Optional[int] = ..., timings: _Optional[_Union[TurnTimings, _Mapping]] = ..., reasoning: _Optional[str] = ..., content: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ..., tool_results: _Optional[_Iterable[_Union[ToolResult, _Mapping]]] = ..., routed_experts: _Optional[_Union[RoutedExperts, _Mapping]] = ..., cached_prompt_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class RewardComponents(_message.Message):
    __slots__ = ("process", "speed", "performance", "total")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    PERFORMANCE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    process: float
    speed: float
    performance: float
    total: float
    def __init__(self, process: _Optional[float] = ..., speed: _Optional[float] = ..., performance: _Optional[float] = ..., total: _Optional[float] = ...) -> None: ...

class StepReward(_message.Message):
    __slots__ = ("turn_index", "components")
    TURN_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    turn_index: int
    components: RewardComponents
    def __init__(self, turn_index: _Optional[int] = ..., components: _Optional[_Union[RewardComponents, _Mapping]] = ...) -> None: ...

class Trajectory(_message.Message):
    __slots__ = ("schema_version", "trajectory_id", "run_id", "task_id", "group_id", "episode_id", "scaffold_version", "turns", "step_rewards", "reward", "success", "wall_clock_s", "baseline_s", "started_at", "finished_at", "suite", "split", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SCAFFOLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    STEP_REWARDS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    WALL_CLOCK_S_FIELD_NUMBER: _ClassVar[int]
    BASELINE_S_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    trajectory_id: str
    run_id: str
    task_id: str
    group_id: str
    episode_id: str
    scaffold_version: str
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    step_rewards: _containers.RepeatedCompositeFieldContainer[StepReward]
    reward: RewardComponents
    success: bool
    wall_clock_s: float
    baseline_s: float
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    suite: str
    split: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, schema_version: _Optional[int] = ..., trajectory_id: _Optional[str] = ..., run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., group_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., scaffold_version: _Optional[str] = ..., turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., step_rewards: _Optional[_Iterable[_Union[StepReward, _Mapping]]] = ..., reward: _Optional[_Union[RewardComponents, _Mapping]] = ..., success: _Optional[bool] = ..., wall_clock_s: _Optional[float] = ..., baseline_s: _Optional[float] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., suite: _Optional[str] = ..., split: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...
