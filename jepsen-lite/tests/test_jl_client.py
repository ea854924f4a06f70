"""Error classification (docs/errors.md) and the workers' recording rules.

A fake Cache service in this process answers with scripted statuses, so the
real gRPC path (status code + trailing metadata) is exercised without a cluster.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from jepsen_lite.client import CacheClient, Outcome, classify
from jepsen_lite.generator import Generator, OpSpec, WorkloadShape
from jepsen_lite.history import HistoryWriter, pair_operations, read_history
from jepsen_lite.workers import ShardTracker, Worker, perform

from cachenode.v1 import cache_pb2 as pb
from cachenode.v1 import cache_pb2_grpc as rpc

C = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "kind", "expected"),
    [
        (C.INVALID_ARGUMENT, "invalid_argument", "fail"),
        (C.FAILED_PRECONDITION, "failed_precondition", "fail"),
        (C.NOT_FOUND, "not_found", "fail"),
        (C.ABORTED, "epoch_mismatch", "fail"),
        (C.RESOURCE_EXHAUSTED, "overloaded", "fail"),
        (C.RESOURCE_EXHAUSTED, "disk_full", "fail"),
        (C.UNAVAILABLE, "not_leader", "fail"),
        (C.UNAVAILABLE, "unavailable", "fail"),
        (C.UNAVAILABLE, None, "info"),  # transport failure: maybe delivered
        (C.DEADLINE_EXCEEDED, "outcome_unknown", "info"),
        (C.DEADLINE_EXCEEDED, None, "info"),
        (C.INTERNAL, "internal", "info"),
        (C.UNKNOWN, None, "info"),
        (C.CANCELLED, None, "info"),
        (None, None, "info"),
    ],
)
def test_classify(code: grpc.StatusCode | None, kind: str | None, expected: str) -> None:
    assert classify(code, kind) == expected


class _Script(rpc.CacheServicer):
    """Answers Get/Set/Incr from a queue of (code, kind) or values."""

    def __init__(self) -> None:
        self.replies: list[Any] = []
        self.incr_seen: list[tuple[bytes, int]] = []
        self.mset_seen: list[list[tuple[bytes, bytes]]] = []
        self.lock = threading.Lock()

    def _next(self, ctx: grpc.ServicerContext) -> Any:
        with self.lock:
            r = self.replies.pop(0)
        if isinstance(r, tuple):
            code, kind = r
            if kind:
                ctx.set_trailing_metadata((("cachenode-error", kind),))
            ctx.abort(code, f"scripted {code.name}")
        return r

    def Get(self, req: pb.GetRequest, ctx: grpc.ServicerContext) -> pb.GetResponse:
        v = self._next(ctx)
        if v is None:
            return pb.GetResponse(found=False, meta=pb.ReadMeta(shard_id=3))
        return pb.GetResponse(found=True, value=str(v).encode(), meta=pb.ReadMeta(shard_id=3))

    def Set(self, req: pb.SetRequest, ctx: grpc.ServicerContext) -> pb.SetResponse:
        self._next(ctx)
        return pb.SetResponse(applied=True, version=1)

    def MSet(self, req: pb.MSetRequest, ctx: grpc.ServicerContext) -> pb.MSetResponse:
        self.mset_seen.append([(it.key, it.value) for it in req.items])
        self._next(ctx)
        return pb.MSetResponse(count=len(req.items), versions=[1])

    def Incr(self, req: pb.IncrRequest, ctx: grpc.ServicerContext) -> pb.IncrResponse:
        self.incr_seen.append((req.header.request_id.client_id, req.header.request_id.seq))
        return pb.IncrResponse(value=int(self._next(ctx)))


@pytest.fixture
def fake() -> Iterator[tuple[_Script, CacheClient]]:
    script = _Script()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rpc.add_CacheServicer_to_server(script, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = CacheClient("n1", f"127.0.0.1:{port}", timeout=2.0)
    try:
        yield script, client
    finally:
        client.close()
        server.stop(0)


def test_client_classifies_real_statuses(fake: tuple[_Script, CacheClient]) -> None:
    script, client = fake
    script.replies = [
        (C.UNAVAILABLE, "not_leader"),
        (C.UNAVAILABLE, None),
        (C.DEADLINE_EXCEEDED, "outcome_unknown"),
        (C.FAILED_PRECONDITION, "failed_precondition"),
        4,
    ]
    assert client.set("k", 1).type == "fail"
    assert client.set("k", 1).type == "info"
    o = client.set("k", 1)
    assert (
        o.type == "info"
        and o.error is not None
        and o.error.startswith("DEADLINE_EXCEEDED/outcome_unknown")
    )
    assert client.set("k", 1).type == "fail"
    assert client.get("k") == Outcome("ok", 4, shard=3)


def _perform(client: CacheClient, spec: OpSpec) -> tuple[Outcome, Any]:
    seq = iter(range(1, 100))
    return perform(
        client, spec, workload="counter", client_id=b"w0", next_seq=lambda: next(seq),
        elements=lambda k: [], tracker=ShardTracker(),
    )  # fmt: skip


def test_incr_resent_once_with_same_request_id_after_info(
    fake: tuple[_Script, CacheClient],
) -> None:
    script, client = fake
    script.replies = [(C.DEADLINE_EXCEEDED, "outcome_unknown"), 7]
    o, value = _perform(client, OpSpec("incr", "c/0", 2))
    assert (o.type, value) == ("ok", 7)
    assert script.incr_seen == [(b"w0", 1), (b"w0", 1)]


def test_incr_resend_failure_stays_info(fake: tuple[_Script, CacheClient]) -> None:
    script, client = fake
    script.replies = [(C.UNAVAILABLE, None), (C.UNAVAILABLE, "unavailable")]
    o, value = _perform(client, OpSpec("incr", "c/0", 2))
    assert o.type == "info" and value == 2  # the first attempt may have applied


def test_dup_incr_records_the_last_answer(fake: tuple[_Script, CacheClient]) -> None:
    script, client = fake
    script.replies = [5, 10]  # a node that applied the resend again answers 10
    o, value = _perform(client, OpSpec("incr", "c/0", 5, dup=True))
    assert (o.type, value) == ("ok", 10)
    assert script.incr_seen == [(b"w0", 1), (b"w0", 1)]
    script.replies = [3, (C.UNAVAILABLE, None)]
    o, value = _perform(client, OpSpec("incr", "c/0", 3, dup=True))
    assert (o.type, value) == ("ok", 3)  # the resend failing changes nothing known


def test_a_register_write_marked_mset_goes_as_a_one_item_mset(fake: tuple[_Script, CacheClient]) -> None:
    script, client = fake
    script.replies = [None, (C.DEADLINE_EXCEEDED, "outcome_unknown"), (C.UNAVAILABLE, "not_leader")]
    assert _perform(client, OpSpec("write", "r/3", 4, mset=True)) == (Outcome("ok", None), 4)
    assert script.mset_seen == [[(b"r/3", b"4")]]
    assert _perform(client, OpSpec("write", "r/3", 2, mset=True))[0].type == "info"
    assert _perform(client, OpSpec("write", "r/3", 2, mset=True))[0].type == "fail"
    script.replies = [None]
    _perform(client, OpSpec("write", "r/3", 1))  # unmarked: a Set
    assert len(script.mset_seen) == 3


def test_worker_records_reads_as_fail_and_takes_new_process_after_info(
    fake: tuple[_Script, CacheClient], tmp_path: Path
) -> None:
    script, client = fake
    gen = Generator("register", 1, WorkloadShape(1, 1, 100))
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path, workload="register") as h:
        w = Worker(0, 3, client, gen, h, threading.Event(), 0.01, 1, ShardTracker())
        script.replies = [(C.DEADLINE_EXCEEDED, None)]
        assert w.step(OpSpec("read", "r/0")) == "fail"
        assert w.process == 0
        script.replies = [(C.DEADLINE_EXCEEDED, None)]
        assert w.step(OpSpec("write", "r/0", 1)) == "info"
        assert w.process == 3
        script.replies = [None]
        assert w.step(OpSpec("read", "r/0")) == "ok"
    events = read_history(path).ops
    assert [(e.process, e.type) for e in events] == [
        (0, "invoke"), (0, "fail"), (0, "invoke"), (0, "info"), (3, "invoke"), (3, "ok"),
    ]  # fmt: skip
    assert all(e.node == "n1" for e in events)
    ops = pair_operations(events)
    assert [o.f for o in ops] == ["write", "read"] and ops[0].crashed
