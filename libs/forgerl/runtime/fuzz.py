"""Hostile requests for property-based tests (hypothesis): random bytes, random messages of a method's
request type with extreme field values, and valid messages mutated on the wire; and the check that a
service answers each with a clean status and keeps serving.

A clean status is anything a caller can act on; UNKNOWN, INTERNAL and DATA_LOSS are not (they say the
service failed, not the request), and neither is a call that outlives its deadline.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

UNCLEAN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS)

_INT32 = st.one_of(st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
_INT64 = st.one_of(st.sampled_from([0, -1, 2**63 - 1, -(2**63), 10**12]), st.integers(-(2**63), 2**63 - 1))
_UINT64 = st.one_of(st.sampled_from([0, 2**64 - 1]), st.integers(0, 2**64 - 1))
_FLOAT = st.one_of(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e308]), st.floats())
# Text a client can send (protobuf refuses lone surrogates): odd code points, control characters, long runs.
_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", "\x00", "é" * 300, "../../etc/passwd", "run-1"]))

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_DOUBLE: _FLOAT,
    FieldDescriptor.TYPE_FLOAT: _FLOAT.map(lambda x: x if abs(x) < 3e38 or x != x else float("inf")),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: _TEXT,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
}


def _field_value(field: Any, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1).map(lambda raw: (field.message_type, raw))
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 1000))  # open enums take unknown numbers
    return _SCALARS[field.type]


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[bytes]:
    """Serialized messages of `descriptor` with random fields set (nesting stops after 3 levels)."""
    settable = [] if depth > 3 else list(descriptor.fields)
    if not settable:
        return st.just(b"")

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        message = message_factory.GetMessageClass(descriptor)()
        for field in draw(st.lists(st.sampled_from(settable), max_size=len(settable), unique_by=lambda f: f.name)):
            value = _field_value(field, depth)
            if _is_repeated(field):
                values = draw(st.lists(value, max_size=4))
                for item in values:
                    _set(message, field, item, append=True)
            else:
                _set(message, field, draw(value))
        return bytes(message.SerializeToString())

    return build()


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def _set(message: Any, field: Any, value: Any, append: bool = False) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        descriptor, raw = value
        child: Any = message_factory.GetMessageClass(descriptor).FromString(raw)
        if field.message_type.GetOptions().map_entry:
            entries = getattr(message, field.name)
            if _is_message_map(field):
                entries[child.key].CopyFrom(child.value)
            else:
                entries[child.key] = child.value
        elif append:
            getattr(message, field.name).add().CopyFrom(child)
        else:
            getattr(message, field.name).CopyFrom(child)
    elif append:
        getattr(message, field.name).append(value)
    else:
        setattr(message, field.name, value)


def _is_message_map(field: Any) -> bool:
    return field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid messages truncated, with a byte flipped, or with garbage appended."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(valid))
        how = draw(st.sampled_from(["truncate", "flip", "append"]))
        if how == "truncate" and data:
            return bytes(data[: draw(st.integers(0, len(data) - 1))])
        if how == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
            return bytes(data)
        return bytes(data + draw(st.binary(min_size=1, max_size=16)))

    return mutate()


def requests(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Random bytes, random messages, and mutated messages of `descriptor`."""
    valid = messages(descriptor)
    return st.one_of(st.binary(max_size=64), valid, mutated(valid))


def fuzz_service(
    channel: grpc.Channel,
    service: ServiceDescriptor,
    *,
    max_examples: int,
    timeout_s: float = 10.0,
    skip: Iterable[str] = (),
    overrides: dict[str, st.SearchStrategy[bytes]] | None = None,
    subscriptions: Iterable[str] = (),
) -> collections.Counter[str]:
    """Send `max_examples` hostile requests to the methods of `service` (all but `skip`; `overrides` gives a
    method its own request strategy) over blocking `channel`; AssertionError on an unclean status or a call
    past `timeout_s`, or if health is not SERVING afterwards. Streams in `subscriptions` wait for events by
    design: they may run until the deadline. Returns the codes seen, by method."""
    waits = set(subscriptions)
    methods = [m for m in service.methods if m.name not in set(skip)]
    seen: collections.Counter[str] = collections.Counter()

    def payloads(method: MethodDescriptor) -> st.SearchStrategy[tuple[MethodDescriptor, bytes]]:
        strategy = (overrides or {}).get(method.name) or requests(method.input_type)
        return strategy.map(lambda raw: (method, raw))

    @settings(
        max_examples=max_examples,
        deadline=None,  # each call has its own timeout; a hypothesis deadline would flake under CPU load
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.one_of([payloads(m) for m in methods]))
    def one(call: tuple[MethodDescriptor, bytes]) -> None:
        method, raw = call
        code = _call(channel, method, raw, timeout_s)
        seen[f"{method.name} {code.name}"] += 1
        assert code not in UNCLEAN, f"{method.full_name} answered {code.name} to {raw!r}"
        hung = code == grpc.StatusCode.DEADLINE_EXCEEDED and method.name not in waits
        assert not hung, f"{method.full_name} hung past {timeout_s} s on {raw!r}"

    one()
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
    assert status == health_pb2.HealthCheckResponse.SERVING, f"{service.full_name} is not SERVING after the fuzzing"
    return seen


def _call(channel: grpc.Channel, method: MethodDescriptor, raw: bytes, timeout_s: float) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731 - raw bytes both ways
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)
            call = stream(raw, timeout=timeout_s)
            for i, _ in enumerate(call):
                if i >= 50:  # a long generation: enough of it was read
                    call.cancel()
                    break
        else:
            unary = channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)
            unary(raw, timeout=timeout_s)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK
