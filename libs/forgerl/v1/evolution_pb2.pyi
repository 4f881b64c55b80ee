from forgerl.v1 import run_pb2 as _run_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("iteration",)
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    iteration: _run_pb2.EvolutionIteration
    def __init__(self, iteration: _Optional[_Union[_run_pb2.EvolutionIteration, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("scaffold_id", "to_version")
    SCAFFOLD_ID_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    scaffold_id: str
    to_version: int
    def __init__(self, scaffold_id: _Optional[str] = ..., to_version: _Optional[int] = ...) -> None: ...

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
