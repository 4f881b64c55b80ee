import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_PENDING: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_SUCCEEDED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
    RUN_STATE_STOPPED: _ClassVar[RunState]
    RUN_STATE_INTERRUPTED: _ClassVar[RunState]

class IterationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITERATION_STATE_UNSPECIFIED: _ClassVar[IterationState]
    ITERATION_STATE_PROPOSING: _ClassVar[IterationState]
    ITERATION_STATE_EVALUATING: _ClassVar[IterationState]
    ITERATION_STATE_AWAITING_APPROVAL: _ClassVar[IterationState]
    ITERATION_STATE_PROMOTED: _ClassVar[IterationState]
    ITERATION_STATE_REJECTED: _ClassVar[IterationState]
    ITERATION_STATE_ROLLED_BACK: _ClassVar[IterationState]
    ITERATION_STATE_INCONCLUSIVE: _ClassVar[IterationState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_PENDING: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_SUCCEEDED: RunState
RUN_STATE_FAILED: RunState
RUN_STATE_STOPPED: RunState
RUN_STATE_INTERRUPTED: RunState
ITERATION_STATE_UNSPECIFIED: IterationState
ITERATION_STATE_PROPOSING: IterationState
ITERATION_STATE_EVALUATING: IterationState
ITERATION_STATE_AWAITING_APPROVAL: IterationState
ITERATION_STATE_PROMOTED: IterationState
ITERATION_STATE_REJECTED: IterationState
ITERATION_STATE_ROLLED_BACK: IterationState
ITERATION_STATE_INCONCLUSIVE: IterationState

class SftStage(_message.Message):
    __slots__ = ("steps", "batch_size", "learning_rate", "lr_schedule", "warmup_steps", "min_lr_ratio", "teacher_error_rate", "examples", "expert_bias_update_rate")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    TEACHER_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BIAS_UPDATE_RATE_FIELD_NUMBER: _ClassVar[int]
    steps: int
    batch_size: int
    learning_rate: float
    lr_schedule: str
    warmup_steps: int
    min_lr_ratio: float
    teacher_error_rate: float
    examples: int
    expert_bias_update_rate: float
    def __init__(self, steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., lr_schedule: _Optional[str] = ..., warmup_steps: _Optional[int] = ..., min_lr_ratio: _Optional[float] = ..., teacher_error_rate: _Optional[float] = ..., examples: _Optional[int] = ..., expert_bias_update_rate: _Optional[float] = ...) -> None: ...

class RlStage(_message.Message):
    __slots__ = ("steps", "batch_size", "group_size", "learning_rate", "loss", "eps_high", "eps_low", "gamma", "alpha_process", "beta_speed", "fifo_window", "max_staleness", "episodes_in_flight", "scaffold_version", "prefix_merge", "mtp_loss_weight", "routing_replay", "lr_schedule", "warmup_steps", "min_lr_ratio", "scale_advantages_by_std", "grow_mtp_to", "mtp_trains_trunk")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    EPS_HIGH_FIELD_NUMBER: _ClassVar[int]
    EPS_LOW_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_PROCESS_FIELD_NUMBER: _ClassVar[int]
    BETA_SPEED_FIELD_NUMBER: _ClassVar[int]
    FIFO_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    EPISODES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SCAFFOLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_MERGE_FIELD_NUMBER: _ClassVar[int]
    MTP_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROUTING_REPLAY_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    SCALE_ADVANTAGES_BY_STD_FIELD_NUMBER: _ClassVar[int]
    GROW_MTP_TO_FIELD_NUMBER: _ClassVar[int]
    MTP_TRAINS_TRUNK_FIELD_NUMBER: _ClassVar[int]
    steps: int
    batch_size: int
    group_size: int
    learning_rate: float
    loss: str
    eps_high: float
    eps_low: float
    gamma: float
    alpha_process: float
    beta_speed: float
    fifo_window: float
    max_staleness: int
    episodes_in_flight: int
    scaffold_version: str
    prefix_merge: bool
    mtp_loss_weight: float
    routing_replay: bool
    lr_schedule: str
    warmup_steps: int
    min_lr_ratio: float
    scale_advantages_by_std: bool
    grow_mtp_to: int
    mtp_trains_trunk: bool
    def __init__(self, steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., group_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., loss: _Optional[str] = ..., eps_high: _Optional[float] = ..., eps_low: _Optional[float] = ..., gamma: _Optional[float] = ..., alpha_process: _Optional[float] = ..., beta_speed: _Optional[float] = ..., fifo_window: _Optional[float] = ..., max_staleness: _Optional[int] = ..., episodes_in_flight: _Optional[int] = ..., scaffold_version: _Optional[str] = ..., prefix_merge: _Optional[bool] = ..., mtp_loss_weight: _Optional[float] = ..., routing_replay: _Optional[bool] = ..., lr_schedule: _Optional[str] = ..., warmup_steps: _Optional[int] = ..., min_lr_ratio: _Optional[float] = ..., scale_advantages_by_std: _Optional[bool] = ..., grow_mtp_to: _Optional[int] = ..., mtp_trains_trunk: _Optional[bool] = ...) -> None: ...

class ParallelLayout(_message.Message):
    __slots__ = ("dp_replicate", "dp_shard", "ep", "activation_checkpoint_every")
    DP_REPLICATE_FIELD_NUMBER: _ClassVar[int]
    DP_SHARD_FIELD_NUMBER: _ClassVar[int]
    EP_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    dp_replicate: int
    dp_shard: int
    ep: int
    activation_checkpoint_every: int
    def __init__(self, dp_replicate: _Optional[int] = ..., dp_shard: _Optional[int] = ..., ep: _Optional[int] = ..., activation_checkpoint_every: _Optional[int] = ...) -> None: ...

class TrainerOptions(_message.Message):
    __slots__ = ("parallel", "moe_backend", "attn_backend", "publish")
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    MOE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    ATTN_BACKEND_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    parallel: ParallelLayout
    moe_backend: str
    attn_backend: str
    publish: str
    def __init__(self, parallel: _Optional[_Union[ParallelLayout, _Mapping]] = ..., moe_backend: _Optional[str] = ..., attn_backend: _Optional[str] = ..., publish: _Optional[str] = ...) -> None: ...

class RunConfig(_message.Message):
    __slots__ = ("name", "model_preset", "init_checkpoint", "suite", "sft", "rl", "seed", "checkpoint_every", "trainer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_PRESET_FIELD_NUMBER: _ClassVar[int]
    INIT_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    SFT_FIELD_NUMBER: _ClassVar[int]
    RL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_preset: str
    init_checkpoint: str
    suite: str
    sft: SftStage
    rl: RlStage
    seed: int
    checkpoint_every: int
    trainer: TrainerOptions
    def __init__(self, name: _Optional[str] = ..., model_preset: _Optional[str] = ..., init_checkpoint: _Optional[str] = ..., suite: _Optional[str] = ..., sft: _Optional[_Union[SftStage, _Mapping]] = ..., rl: _Optional[_Union[RlStage, _Mapping]] = ..., seed: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., trainer: _Optional[_Union[TrainerOptions, _Mapping]] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "config", "state", "stage", "step", "policy_version", "created_at", "updated_at", "error")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config: RunConfig
    state: RunState
    stage: str
    step: int
    policy_version: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    error: str
    def __init__(self, run_id: _Optional[str] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ..., state: _Optional[_Union[RunState, str]] = ..., stage: _Optional[str] = ..., step: _Optional[int] = ..., policy_version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class StepMetrics(_message.Message):
    __slots__ = ("run_id", "stage", "step", "values", "time")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    stage: str
    step: int
    values: _containers.ScalarMap[str, float]
    time: _timestamp_pb2.Timestamp
    def __init__(self, run_id: _Optional[str] = ..., stage: _Optional[str] = ..., step: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("checkpoint_id", "run_id", "step", "policy_version", "path", "stage", "created_at")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    run_id: str
    step: int
    policy_version: int
    path: str
    stage: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, checkpoint_id: _Optional[str] = ..., run_id: _Optional[str] = ..., step: _Optional[int] = ..., policy_version: _Optional[int] = ..., path: _Optional[str] = ..., stage: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PolicyVersion(_message.Message):
    __slots__ = ("run_id", "version", "checkpoint_id", "published_at")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    version: int
    checkpoint_id: str
    published_at: _timestamp_pb2.Timestamp
    def __init__(self, run_id: _Optional[str] = ..., version: _Optional[int] = ..., checkpoint_id: _Optional[str] = ..., published_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ScaffoldVersion(_message.Message):
    __slots__ = ("scaffold_id", "version", "parent", "config_yaml", "created_by", "created_at")
    SCAFFOLD_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    scaffold_id: str
    version: int
    parent: str
    config_yaml: str
    created_by: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, scaffold_id: _Optional[str] = ..., version: _Optional[int] = ..., parent: _Optional[str] = ..., config_yaml: _Optional[str] = ..., created_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EvolutionIteration(_message.Message):
    __slots__ = ("iteration_id", "index", "base_scaffold", "candidate_scaffolds", "state", "diagnosis", "selected_scaffold", "approved_by", "created_at", "updated_at", "rationale", "mean_difference", "ci_low", "ci_high")
    ITERATION_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BASE_SCAFFOLD_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SCAFFOLDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSIS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_SCAFFOLD_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    MEAN_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    iteration_id: str
    index: int
    base_scaffold: str
    candidate_scaffolds: _containers.RepeatedScalarFieldContainer[str]
    state: IterationState
    diagnosis: str
    selected_scaffold: str
    approved_by: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    rationale: str
    mean_difference: float
    ci_low: float
    ci_high: float
    def __init__(self, iteration_id: _Optional[str] = ..., index: _Optional[int] = ..., base_scaffold: _Optional[str] = ..., candidate_scaffolds: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[IterationState, str]] = ..., diagnosis: _Optional[str] = ..., selected_scaffold: _Optional[str] = ..., approved_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rationale: _Optional[str] = ..., mean_difference: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("evaluation_id", "iteration_id", "scaffold_version", "suite", "split", "episodes", "success_rate", "mean_reward", "mean_wall_clock_s")
    EVALUATION_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SCAFFOLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_REWARD_FIELD_NUMBER: _ClassVar[int]
    MEAN_WALL_CLOCK_S_FIELD_NUMBER: _ClassVar[int]
    evaluation_id: str
    iteration_id: str
    scaffold_version: str
    suite: str
    split: str
    episodes: int
    success_rate: float
    mean_reward: float
    mean_wall_clock_s: float
    def __init__(self, evaluation_id: _Optional[str] = ..., iteration_id: _Optional[str] = ..., scaffold_version: _Optional[str] = ..., suite: _Optional[str] = ..., split: _Optional[str] = ..., episodes: _Optional[int] = ..., success_rate: _Optional[float] = ..., mean_reward: _Optional[float] = ..., mean_wall_clock_s: _Optional[float] = ...) -> None: ...
