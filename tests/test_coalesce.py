"""The async client coalesces concurrent calls to one node into Batch RPCs."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from _cluster import FakeCluster, Fault

from cachenode.client import AsyncCacheClient


@pytest.fixture
def cluster() -> Any:
    with FakeCluster(nodes=3, shards=4) as fc:
        yield fc


def test_concurrent_calls_share_batches_and_keep_their_own_results(cluster: FakeCluster) -> None:
    """With the map loaded, every call of one ``gather`` reaches its node's
    coalescer before the batch leaves (at the end of that loop iteration):
    each node gets them in one Batch."""

    async def run() -> tuple[list[Any], list[Any]]:
        async with AsyncCacheClient(cluster.endpoints, timeout=5) as c:
            await c.set("warm-up", "x")  # loads the cluster map
            await asyncio.gather(*(c.set(f"k{i}", f"v{i}") for i in range(200)))
            got = await asyncio.gather(*(c.get(f"k{i}") for i in range(200)))
            return got, list(c._coalescers.values())

    got, coalescers = asyncio.run(run())
    assert [g.value for g in got] == [f"v{i}".encode() for i in range(200)]
    assert sum(co.ops for co in coalescers) == 401
    assert max(co.largest for co in coalescers) >= 50  # one gather: one Batch per node


def test_mset_and_mget_parts_travel_in_one_batch_per_node(cluster: FakeCluster) -> None:
    """The per-shard parts of one mset/mget go to their leaders as Batch ops,
    so a 100-key call costs one RPC per node, not one per shard."""

    async def run() -> tuple[int, dict[str, Any], int, int, int]:
        async with AsyncCacheClient(cluster.endpoints, timeout=5) as c:
            await c.set("warm-up", "x")
            cluster.clear_calls()
            before = sum(co.batches for co in c._coalescers.values())
            n = await c.mset({f"k{i}": f"v{i}" for i in range(100)})
            got = await c.mget([f"k{i}" for i in range(100)])
            after = sum(co.batches for co in c._coalescers.values())
            ops = sum(co.ops for co in c._coalescers.values())
            return n, got, after - before, ops, len(c._coalescers)

    n, got, batches, ops, nodes = asyncio.run(run())
    assert n == 100
    assert {k: v.value for k, v in got.items()} == {f"k{i}": f"v{i}".encode() for i in range(100)}
    assert ops == 1 + 4 + 4  # warm-up, then one part per shard for each call
    assert batches <= 2 * nodes < 2 * 4
    assert [c.method for c in cluster.calls("MSet")].count("MSet") == 4  # served as Batch ops


def test_batches_are_cut_by_key_count() -> None:
    from cachenode.client._coalesce import Coalescer
    from cachenode.v1 import cache_pb2 as pb

    sent: list[int] = []

    async def batch_call(req: pb.BatchRequest, timeout: float) -> pb.BatchResponse:
        sent.append(sum(len(op.mset.items) or 1 for op in req.ops))
        await asyncio.sleep(0)
        return pb.BatchResponse(results=[pb.BatchResult(mset=pb.MSetResponse(count=len(op.mset.items))) for op in req.ops])

    async def run() -> list[Any]:
        co = Coalescer(batch_call, max_keys=250)
        reqs = [pb.MSetRequest(items=[pb.KeyValue(key=b"k%d" % j, value=b"v") for j in range(100)]) for _ in range(5)]
        return await asyncio.gather(*(co.call("MSet", r, 5) for r in reqs))

    res = asyncio.run(run())
    assert [r.count for r in res] == [100] * 5
    assert sent == [200, 200, 100]  # at most 250 keys per Batch


def test_one_failing_op_does_not_fail_its_batch_mates(cluster: FakeCluster) -> None:
    async def run() -> list[Any]:
        async with AsyncCacheClient(cluster.endpoints, timeout=5) as c:
            await c.set("text", "hello")
            return await asyncio.gather(
                *(c.incr("text") if i == 5 else c.set(f"m{i}", "x") for i in range(20)),
                return_exceptions=True,
            )

    res = asyncio.run(run())
    errors = [r for r in res if isinstance(r, Exception)]
    assert len(errors) == 1 and type(errors[0]).__name__ == "FailedPrecondition"
    assert all(r is True for i, r in enumerate(res) if i != 5)


def test_uncoalesced_mode_still_works(cluster: FakeCluster) -> None:
    async def run() -> Any:
        async with AsyncCacheClient(cluster.endpoints, timeout=5, coalesce=False) as c:
            await c.set("a", "1")
            return await c.get("a"), c._coalescers

    got, coalescers = asyncio.run(run())
    assert got.value == b"1" and coalescers == {}


def test_not_leader_inside_a_batch_is_followed(cluster: FakeCluster) -> None:
    # the first Set on any node answers not_leader without a usable hint, then works
    cluster.inject(Fault(method="Set", code=grpc.StatusCode.UNAVAILABLE, kind="not_leader", count=1))

    async def run() -> bool:
        async with AsyncCacheClient(cluster.endpoints, timeout=5) as c:
            return await c.set("nl", "v")

    assert asyncio.run(run()) is True


def test_a_call_ends_at_its_own_deadline_even_if_the_batch_hangs() -> None:
    from cachenode.client._coalesce import Coalescer
    from cachenode.v1 import cache_pb2 as pb

    release = asyncio.Event()

    async def batch_call(req: pb.BatchRequest, timeout: float) -> pb.BatchResponse:
        await release.wait()  # a node that never answers
        return pb.BatchResponse()

    async def run() -> tuple[grpc.StatusCode, float]:
        co = Coalescer(batch_call)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            await co.call("Get", pb.GetRequest(key=b"k"), 0.2)
        except grpc.RpcError as e:
            took = loop.time() - t0
            release.set()
            return e.code(), took
        raise AssertionError("the call did not fail")

    code, took = asyncio.run(run())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.15 <= took < 2.0


class _FakeStream:
    """A BatchStream call as grpc.aio hands it out: ``write``, ``read``,
    ``cancel``; answers each request with ``answer(req)``, or never when
    ``answer`` is None (a node that hangs)."""

    _CANCEL = object()

    def __init__(self, answer: Any) -> None:
        self._answer = answer
        self._q: asyncio.Queue[Any] = asyncio.Queue()
        self.requests: list[Any] = []
        self.cancelled = False

    async def initial_metadata(self) -> Any:
        return (("cachenode-stream", "1"),)  # accepted

    async def write(self, req: Any) -> None:
        self.requests.append(req)
        if self._answer is not None:
            self._q.put_nowait(self._answer(req))

    async def read(self) -> Any:
        item = await self._q.get()
        if item is self._CANCEL:
            raise asyncio.CancelledError()
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        self._q.put_nowait(self._CANCEL)
        return True


def _answer_gets(req: Any) -> Any:
    from cachenode.v1 import cache_pb2 as pb

    return pb.BatchResponse(results=[pb.BatchResult(get=pb.GetResponse(found=True, value=op.get.key)) for op in req.ops])


def test_batches_ride_one_stream_which_is_closed_when_idle() -> None:
    from cachenode.client._coalesce import Coalescer
    from cachenode.v1 import cache_pb2 as pb

    streams: list[_FakeStream] = []

    def stream_call() -> _FakeStream:
        streams.append(_FakeStream(_answer_gets))
        return streams[-1]

    async def unary(req: Any, timeout: float) -> Any:
        raise AssertionError("a unary Batch was sent while the stream works")

    async def run() -> list[Any]:
        co = Coalescer(unary, stream_call=stream_call, stream_idle_s=0.05)
        got = []
        for i in range(5):
            got += await asyncio.gather(*(co.call("Get", pb.GetRequest(key=b"k%d" % j), 2.0) for j in range(i + 1)))
        assert len(streams) == 1 and len(streams[0].requests) == 5 and not streams[0].cancelled
        assert all(0 < r.timeout_ms <= 2000 for r in streams[0].requests)  # each message carries its timeout
        await asyncio.sleep(0.2)
        assert streams[0].cancelled  # idle: closed
        got.append(await co.call("Get", pb.GetRequest(key=b"again"), 2.0))
        assert len(streams) == 2  # the next batch opened a new one
        return got

    got = asyncio.run(run())
    assert [g.value for g in got][-1] == b"again" and len(got) == 16


def test_a_hung_stream_fails_its_batch_at_the_deadline_and_is_replaced() -> None:
    from cachenode.client._coalesce import Coalescer
    from cachenode.v1 import cache_pb2 as pb

    streams: list[_FakeStream] = []

    def stream_call() -> _FakeStream:
        streams.append(_FakeStream(None if not streams else _answer_gets))  # the first one hangs
        return streams[-1]

    async def unary(req: Any, timeout: float) -> Any:
        raise AssertionError("unexpected unary Batch")

    async def run() -> tuple[grpc.StatusCode, bool, Any]:
        co = Coalescer(unary, stream_call=stream_call, stream_grace_s=0.05)
        try:
            await co.call("Get", pb.GetRequest(key=b"k"), 0.2)
            raise AssertionError("the call did not fail")
        except grpc.RpcError as e:
            code = e.code()
        while not streams[0].cancelled:  # cancelled at timeout + grace
            await asyncio.sleep(0.01)
        got = await co.call("Get", pb.GetRequest(key=b"k2"), 1.0)
        return code, streams[0].cancelled, got

    code, cancelled, got = asyncio.run(run())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and cancelled
    assert got.value == b"k2" and len(streams) == 2


def test_a_node_without_streams_gets_unary_batches(cluster: FakeCluster) -> None:
    """The fake nodes do not implement BatchStream (UNIMPLEMENTED, like a node
    older than the client): every batch goes unary, and the client asks for
    a stream only once per node."""

    async def run() -> list[Any]:
        async with AsyncCacheClient(cluster.endpoints, timeout=5) as c:
            for i in range(5):
                await asyncio.gather(*(c.set(f"u{i}-{j}", "v") for j in range(20)))
            return [(co.streams_opened, co.batches) for co in c._coalescers.values()]

    per_node = asyncio.run(run())
    assert per_node and all(opened == 1 and batches >= 5 for opened, batches in per_node)
    assert len(cluster.calls("Set")) == 100
