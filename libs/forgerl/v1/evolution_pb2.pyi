from forgerl.v1 import run_pb2 as _run_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvolutionAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVOLUTION_ACTION_UNSPECIFIED: _ClassVar[EvolutionAction]
    EVOLUTION_ACTION_PAUSE: _ClassVar[EvolutionAction]
    EVOLUTION_ACTION_RESUME: _ClassVar[EvolutionAction]
    EVOLUTION_ACTION_HALT: _ClassVar[EvolutionAction]
EVOLUTION_ACTION_UNSPECIFIED: EvolutionAction
EVOLUTION_ACTION_PAUSE: EvolutionAction
EVOLUTION_ACTION_RESUME: EvolutionAction
EVOLUTION_ACTION_HALT: EvolutionAction

class StartIterationRequest(_message.Message):
    __slots__ = ("base_scaffold", "suite", "candidates", "episodes_per_candidate")
    BASE_SCAFFOLD_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    EPISODES_PER_CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    base_scaffold: str
    suite: str
    candidates: int
    episodes_per_candidate: int
    def __init__(self, base_scaffold: _Optional[str] = ..., suite: _Optional[str] = ..., candidates: _Optional[int] = ..., episodes_per_candidate: _Optional[int] = ...) -> None: ...

class StartIterationResponse(_message.Message):
    __slots__ = ("iteration", "status")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    iteration: _run_pb2.EvolutionIteration
    status: EvolutionStatus
    def __init__(self, iteration: _Optional[_Union[_run_pb2.EvolutionIteration, _Mapping]] = ..., status: _Optional[_Union[EvolutionStatus, _Mapping]] = ...) -> None: ...

class EvolutionStatus(_message.Message):
    __slots__ = ("state", "halt_reason", "incumbent", "suite", "rounds_spent", "rounds_limit", "episodes_spent", "episodes_limit", "wall_time_spent_s", "wall_time_limit_s", "awaiting_approval", "open_anomalies", "console_url")
    STATE_FIELD_NUMBER: _ClassVar[int]
    HALT_REASON_FIELD_NUMBER: _ClassVar[int]
    INCUMBENT_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_SPENT_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    EPISODES_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPISODES_LIMIT_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_SPENT_S_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    AWAITING_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    OPEN_ANOMALIES_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_URL_FIELD_NUMBER: _ClassVar[int]
    state: str
    halt_reason: str
    incumbent: str
    suite: str
    rounds_spent: int
    rounds_limit: int
    episodes_spent: int
    episodes_limit: int
    wall_time_spent_s: float
    wall_time_limit_s: float
    awaiting_approval: _containers.RepeatedScalarFieldContainer[str]
    open_anomalies: int
    console_url: str
    def __init__(self, state: _Optional[str] = ..., halt_reason: _Optional[str] = ..., incumbent: _Optional[str] = ..., suite: _Optional[str] = ..., rounds_spent: _Optional[int] = ..., rounds_limit: _Optional[int] = ..., episodes_spent: _Optional[int] = ..., episodes_limit: _Optional[int] = ..., wall_time_spent_s: _Optional[float] = ..., wall_time_limit_s: _Optional[float] = ..., awaiting_approval: _Optional[_Iterable[str]] = ..., open_anomalies: _Optional[int] = ..., console_url: _Optional[str] = ...) -> None: ...

class GetEvolutionStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetEvolutionStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: EvolutionStatus
    def __init__(self, status: _Optional[_Union[EvolutionStatus, _Mapping]] = ...) -> None: ...

class ControlEvolutionRequest(_message.Message):
    __slots__ = ("action", "operator", "reason")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    action: EvolutionAction
    operator: str
    reason: str
    def __init__(self, action: _Optional[_Union[EvolutionAction, str]] = ..., operator: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ControlEvolutionResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: EvolutionStatus
    def __init__(self, status: _Optional[_Union[EvolutionStatus, _Mapping]] = ...) -> None: ...

class GetIterationRequest(_message.Message):
    __slots__ = ("iteration_id",)
    ITERATION_ID_FIELD_NUMBER: _ClassVar[int]
    iteration_id: str
    def __init__(self, iteration_id: _Optional[str] = ...) -> None: ...

class GetIterationResponse(_message.Message):
    __slots__ = ("iteration", "evaluations")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    iteration: _run_pb2.EvolutionIteration
    evaluations: _containers.RepeatedCompositeFieldContainer[_run_pb2.Evaluation]
    def __init__(self, iteration: _Optional[_Union[_run_pb2.EvolutionIteration, _Mapping]] = ..., evaluations: _Optional[_Iterable[_Union[_run_pb2.Evaluation, _Mapping]]] = ...) -> None: ...

class ListIterationsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListIterationsResponse(_message.Message):
    __slots__ = ("iterations",)
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    iterations: _containers.RepeatedCompositeFieldContainer[_run_pb2.EvolutionIteration]
    def __init__(self, iterations: _Optional[_Iterable[_Union[_run_pb2.EvolutionIteration, _Mapping]]] = ...) -> None: ...

class ApproveCandidateRequest(_message.Message):
    __slots__ = ("iteration_id", "scaffold_version", "approve", "operator", "note")
    ITERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SCAFFOLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPROVE_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    iteration_id: str
    scaffold_version: str
    approve: bool
    operator: str
    note: str
    def __init__(self, iteration_id: _Optional[str] = ..., scaffold_version: _Optional[str] = ..., approve: _Optional[bool] = ..., operator: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class ApproveCandidateResponse(_message.Message):
    __slots__ = ("iteration",)
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    iteration: _run_pb2.EvolutionIteration
    def __init__(self, iteration: _Optional[_Union[_run_pb2.EvolutionIteration, _Mapping]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("scaffold_id", "to_version", "operator")
    SCAFFOLD_ID_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    scaffold_id: str
    to_version: int
    operator: str
    def __init__(self, scaffold_id: _Optional[str] = ..., to_version: _Optional[int] = ..., operator: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("scaffold",)
    SCAFFOLD_FIELD_NUMBER: _ClassVar[int]
    scaffold: _run_pb2.ScaffoldVersion
    def __init__(self, scaffold: _Optional[_Union[_run_pb2.ScaffoldVersion, _Mapping]] = ...) -> None: ...

class ListScaffoldVersionsRequest(_message.Message):
    __slots__ = ("scaffold_id",)
    SCAFFOLD_ID_FIELD_NUMBER: _ClassVar[int]
    scaffold_id: str
    def __init__(self, scaffold_id: _Optional[str] = ...) -> None: ...

class ListScaffoldVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[_run_pb2.ScaffoldVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[_run_pb2.ScaffoldVersion, _Mapping]]] = ...) -> None: ...
