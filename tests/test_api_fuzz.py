"""Every unary Cache method and the read-only Admin methods, fed well-framed requests
with arbitrary field values, against a REAL 3-node cluster.

Requests are built from the proto descriptors (so a new field is fuzzed
without touching this file): keys and values from empty to over the limits,
integers at their edges, unknown enum values, request ids, shard epochs,
``no_forward``, nested batches.  Whatever arrives, a node answers before the
deadline with a result or with one of the statuses a caller can act on,
named in ``cachenode-error``: never INTERNAL, UNKNOWN or a silent timeout.
That is the brief's "precise gRPC status, never a traceback, never a hung
call".  (``BatchStream`` carries the same Batch messages; its malformed
messages are tested in ``test_batch_stream.py``.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from _nodes import LocalCluster, local_cluster
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachenode._types import MAX_MESSAGE_BYTES
from cachenode.v1 import cache_pb2 as pb

pytestmark = pytest.mark.cluster

DEADLINE_S = 5.0
ACTIONABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,  # fix the request
    grpc.StatusCode.FAILED_PRECONDITION,  # the data forbids it
    grpc.StatusCode.NOT_FOUND,  # unknown shard
    grpc.StatusCode.ABORTED,  # a shard_epoch that is not the shard's
    grpc.StatusCode.UNAVAILABLE,  # no_forward at a replica that does not lead the shard
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # overloaded (16 MiB batches on 2 cores)
    grpc.StatusCode.DEADLINE_EXCEEDED,  # outcome_unknown: the node answered before the deadline
}
METHODS = [
    ("Cache", "Get"), ("Cache", "Set"), ("Cache", "Delete"), ("Cache", "CompareAndSet"),
    ("Cache", "Incr"), ("Cache", "Ttl"), ("Cache", "MGet"), ("Cache", "MSet"), ("Cache", "Batch"),
    ("Admin", "GetClusterMap"), ("Admin", "GetNodeStatus"), ("Admin", "GetShardStatus"),
]
KEY_LIMIT, VALUE_LIMIT = 1024, 1024 * 1024

_INT_RANGES = {
    d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
}
# Each strategy mixes mostly valid values (so requests get past validation
# and reach the Raft groups, the dedup table and the data) with edge cases.
_blobs = st.integers(0, 9).flatmap(lambda i: st.one_of(
    st.sampled_from([b"", b"0", b"-9", b"k" * KEY_LIMIT, b"k" * (KEY_LIMIT + 1)]),
    st.sampled_from([b"v" * VALUE_LIMIT, b"v" * (VALUE_LIMIT + 1)]),
) if i == 9 else st.binary(min_size=1, max_size=4))  # small: keys collide, so conditions and request ids meet state


def _integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [x for x in (0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, -1, -(2**63)) if lo <= x <= hi]
    return st.one_of(*[st.integers(max(lo, 1), min(hi, 3))] * 4, st.sampled_from(edges), st.integers(lo, hi))


def _scalar(f: d.FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.type == d.FieldDescriptor.TYPE_BYTES:
        return _blobs
    if f.type == d.FieldDescriptor.TYPE_STRING:
        return st.text(max_size=8)
    if f.type == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == d.FieldDescriptor.TYPE_ENUM:
        known = st.sampled_from([v.number for v in f.enum_type.values])
        return st.one_of(known, known, known, st.integers(-1, len(f.enum_type.values) + 1))  # proto3 enums are open
    lo, hi = _INT_RANGES[f.type]
    return _integers(lo, hi)


def messages(desc: d.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of type ``desc``: each field set (mostly) or left unset, and
    one member of each oneof (or none), each member as likely."""
    cls = message_factory.GetMessageClass(desc)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.type == d.FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            one = st.deferred(lambda f=f: messages(f.message_type, depth + 1))
        else:
            one = _scalar(f)
        one = st.one_of(st.lists(one, min_size=1, max_size=4), st.just([])) if f.is_repeated else one
        if f.containing_oneof is None:
            fields[f.name] = st.one_of(one, one, one, st.none())  # None: left unset
        else:
            member = st.tuples(st.just(f.name), one)
            group = f"oneof {f.containing_oneof.name}"
            fields[group] = st.one_of(fields[group], member) if group in fields else st.one_of(st.none(), member)
    return st.fixed_dictionaries(fields).map(lambda kw: _build(cls, kw))


def _build(cls: Any, kw: dict[str, Any]) -> Any:
    msg = cls()
    for name, value in kw.items():
        if value is None:
            continue
        if name.startswith("oneof "):
            name, value = value
        field = getattr(msg, name)
        if isinstance(value, list):
            for v in value:
                if hasattr(field, "add") and not isinstance(v, int | bytes | str | bool):
                    field.add().CopyFrom(v)
                else:
                    field.append(v)
        elif hasattr(value, "DESCRIPTOR"):
            field.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path_factory.mktemp("fuzz") / "c", nodes=3, shards=2) as c:
        try:
            yield c
        finally:
            for ch in _CHANNELS.values():
                ch.close()
            _CHANNELS.clear()


def _check_status(where: str, code: grpc.StatusCode, details: str, kind: str | None) -> None:
    assert code in ACTIONABLE, f"{where}: {code.name}: {details}"
    assert details and "\n" not in details and "Traceback" not in details, f"{where}: {details!r}"
    assert kind, f"{where}: {code.name} without cachenode-error (not the node's answer): {details}"


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[m for _, m in METHODS])
def test_any_request_gets_an_answer_or_an_actionable_status(cluster: LocalCluster, service: str, method: str) -> None:
    desc = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    req_cls = message_factory.GetMessageClass(desc.input_type)
    resp_cls = message_factory.GetMessageClass(desc.output_type)
    nodes = cluster.node_ids

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(messages(desc.input_type), st.sampled_from(nodes))
    def one(req: Any, node: str) -> None:
        call = _channel(cluster, node).unary_unary(
            f"/cachenode.v1.{service}/{method}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        where = f"{method} at {node} with {req!r:.300}"
        try:
            resp = call(req, timeout=DEADLINE_S)
        except grpc.RpcError as e:
            md = dict(e.trailing_metadata() or ())
            _check_status(where, e.code(), e.details() or "", md.get("cachenode-error"))
            return
        if method == "Batch":
            assert not resp.HasField("error") or resp.error.kind, where
            assert len(resp.results) == len(req.ops), where
            for i, r in enumerate(resp.results):
                if r.WhichOneof("result") == "error":
                    _check_status(f"{where}, op {i}", _status(r.error.code), r.error.message, r.error.kind)

    one()
    for node in nodes:  # and every node still serves
        assert not cluster.cache(node).Get(pb.GetRequest(key=b"fuzz:after"), timeout=DEADLINE_S).found


_CHANNELS: dict[str, grpc.Channel] = {}


def _channel(cluster: LocalCluster, node: str) -> grpc.Channel:
    """A channel that takes answers as large as a node sends (as the client's do)."""
    address = cluster.address(node)
    if address not in _CHANNELS:
        _CHANNELS[address] = grpc.insecure_channel(address, options=[
            ("grpc.enable_retries", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
    return _CHANNELS[address]


def _status(value: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == value)


def test_the_request_strategy_reaches_every_field() -> None:
    """Every field of every fuzzed request type, nested ones included, is set
    by the generator in some method's examples (a field it never set would
    never be fuzzed).  Deep fields of a Batch are reached through the unary
    method of the same request type."""
    seen: set[str] = set()
    wanted: set[str] = set()
    for service, method in METHODS:
        desc = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method].input_type
        wanted.update(f.full_name for f in _fields_of(desc, 0))

        @settings(max_examples=60, deadline=None, database=None, derandomize=True,  # a fixed draw: no flake
                  suppress_health_check=list(HealthCheck))
        @given(messages(desc))
        def collect(msg: Any) -> None:
            seen.update(f.full_name for f, _ in _walk(msg))

        collect()
    assert wanted <= seen, f"never set: {sorted(wanted - seen)}"


def _walk(msg: Any) -> Iterator[tuple[d.FieldDescriptor, Any]]:
    for f, v in msg.ListFields():
        yield f, v
        if f.type == d.FieldDescriptor.TYPE_MESSAGE:
            for sub in v if f.is_repeated else [v]:
                yield from _walk(sub)


def _fields_of(desc: d.Descriptor, depth: int) -> Iterator[d.FieldDescriptor]:
    for f in desc.fields:
        if f.type == d.FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            yield f
            yield from _fields_of(f.message_type, depth + 1)
        else:
            yield f
