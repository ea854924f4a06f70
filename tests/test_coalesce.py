"""The clients coalesce concurrent calls to one node into Batch RPCs: the
async client the calls of one event loop, the blocking client those of its
threads."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from typing import Any

import grpc
import pytest
from _cluster import FakeCluster, Fault, key_hash
from _nodes import wait_for

from cachenode._errors import CacheError, Overloaded, Unavailable
from cachenode.client import AsyncCacheClient, CacheClient
from cachenode.client._coalesce import Coalescer, OpRpcError
from cachenode.client._status import classify
from cachenode.client._sync_coalesce import SyncCoalescer
from cachenode.client.async_client import _all_done
from cachenode.v1 import cache_pb2 as pb


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


def test_async_multi_key_parts_that_fail_first_go_on_alone_and_apply_once(cluster: FakeCluster) -> None:
    """An mset's and an mget's per-shard parts leave together; a part whose
    first attempt fails (here: not the leader, then an answer lost after the
    write applied) is retried on its own with its request id, and every part
    applies exactly once."""
    cluster.inject(Fault("MSet", grpc.StatusCode.UNAVAILABLE, kind="not_leader", count=1))
    cluster.inject(Fault("MSet", grpc.StatusCode.UNAVAILABLE, kind="unavailable", count=1, apply_first=True))
    cluster.inject(Fault("MGet", grpc.StatusCode.UNAVAILABLE, kind="not_leader", count=2))
    data = {f"k{i}": f"v{i}" for i in range(100)}

    async def run() -> tuple[int, dict[str, Any]]:
        async with AsyncCacheClient(cluster.endpoints, timeout=5) as c:
            n = await c.mset(data)
            return n, await c.mget([*data, "absent"])

    n, got = asyncio.run(run())
    assert n == 100
    assert got["absent"] is None
    assert {k: v.value.decode() for k, v in got.items() if v is not None} == data
    msets = cluster.calls("MSet")
    assert len(msets) >= 4 + 2  # one per shard, and the two failed first attempts again (a not_leader
    # without a hint may first try another replica, which points at the leader)
    assert len({c.request.header.request_id.seq for c in msets}) == 4
    assert sorted(cluster.state.applies.values()) == [1, 1, 1, 1]
    assert len(cluster.calls("MGet")) >= 4 + 2


def _slow_sibling_and_moved_leader(cluster: FakeCluster) -> tuple[list[str], list[str], int, str]:
    """Keys of two shards led by different nodes: shard X's leader will
    answer slowly once; shard Y's leadership moves (the client's map goes
    stale) to the third node, which answers in 0.7 s.  Returns (X's keys,
    Y's keys, Y's id, the third node)."""
    groups: dict[int, list[str]] = {}
    for i in range(400):
        groups.setdefault(cluster.state.map.shard_for_hash(key_hash(f"k{i}".encode())).id, []).append(f"k{i}")
    leaders = cluster.state.leaders
    x, y = next((a, b) for a in groups for b in groups if a != b and leaders[a] != leaders[b])
    third = next(n for n in cluster.nodes if n not in (leaders[x], leaders[y]))
    cluster.inject(Fault("MGet", grpc.StatusCode.OK, node=leaders[x], delay_s=0.9, count=1))
    cluster.inject(Fault("MGet", grpc.StatusCode.OK, node=third, delay_s=0.7, count=3))
    return groups[x][:5], groups[y][:5], y, third


@pytest.mark.parametrize("client", ["async", "blocking"])
def test_a_part_that_fails_first_goes_on_without_waiting_for_its_siblings(cluster: FakeCluster, client: str) -> None:
    """A part redirected to a new leader is retried at once, not after its
    slow sibling answers, so the call fits its 2 s budget."""
    kx, ky, y, third = _slow_sibling_and_moved_leader(cluster)

    async def run_async() -> float:
        async with AsyncCacheClient(cluster.endpoints, timeout=2.0) as c:
            await c.set(kx[0], "v")
            cluster.move_leader(y, third)
            t0 = time.monotonic()
            got = await c.mget(kx + ky)
            assert got[kx[0]] is not None and got[kx[0]].value == b"v"
            return time.monotonic() - t0

    def run_blocking() -> float:
        with CacheClient(cluster.endpoints, timeout=2.0) as c:
            c.set(kx[0], "v")
            cluster.move_leader(y, third)
            t0 = time.monotonic()
            got = c.mget(kx + ky)
            assert got[kx[0]] is not None and got[kx[0]].value == b"v"
            return time.monotonic() - t0

    # The old code failed this call: the redirected part went on only after
    # its sibling's 0.9 s, with an attempt timeout under the 0.7 s answer.
    took = asyncio.run(run_async()) if client == "async" else run_blocking()
    assert took < 2.0


def test_async_multi_key_call_on_a_hung_node_ends_at_its_deadline(cluster: FakeCluster) -> None:
    """The parts' first attempts share one timer: a node that never answers
    fails its part at the call's deadline with a readable error, while the
    other parts succeed; the call never hangs."""
    hung = cluster.leader_of_key(b"k0")
    cluster.inject(Fault("MGet", grpc.StatusCode.OK, node=hung, delay_s=2.5, count=100))

    async def run() -> tuple[BaseException | None, float]:
        async with AsyncCacheClient(cluster.endpoints, timeout=0.8) as c:
            await c.set("k0", "v")
            t0 = time.monotonic()
            try:
                await c.mget([f"k{i}" for i in range(40)])
            except Exception as e:  # noqa: BLE001 - the assertion below names it
                return e, time.monotonic() - t0
            return None, time.monotonic() - t0

    err, took = asyncio.run(run())
    assert isinstance(err, CacheError), err
    assert "mget" in str(err) and "shard" in str(err)
    assert took < 2.0


def test_cancelling_an_async_multi_key_call_ends_it_at_once(cluster: FakeCluster) -> None:
    hung = cluster.leader_of_key(b"k0")
    cluster.inject(Fault("MGet", grpc.StatusCode.OK, node=hung, delay_s=2.0, count=100))

    async def run() -> tuple[bool, float]:
        async with AsyncCacheClient(cluster.endpoints, timeout=10) as c:
            await c.set("k0", "v")
            task = asyncio.ensure_future(c.mget([f"k{i}" for i in range(40)]))
            await wait_for_async(lambda: any(co._inflight for co in c._coalescers.values()))
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return task.cancelled(), time.monotonic() - t0

    cancelled, took = asyncio.run(run())
    assert cancelled and took < 0.5


def test_a_part_failing_as_its_call_is_cancelled_starts_no_attempt(cluster: FakeCluster) -> None:
    """The call is cancelled and, in the same loop turn, a part's first
    attempt fails: no retry may start after the cancel (it would run, and
    for an mset perhaps write, with no one waiting for it)."""
    keys = [f"k{i}" for i in range(40)]
    parts = len({cluster.state.map.shard_for_hash(key_hash(k.encode())).id for k in keys})

    async def run() -> int:
        async with AsyncCacheClient(cluster.endpoints, timeout=5) as c:
            await c.mget(keys)  # the map and the streams
            cluster.clear_calls()
            task = asyncio.ensure_future(c.mget(keys))
            await asyncio.sleep(0)  # the call has queued its parts; none has left yet
            queued = [item for co in c._coalescers.values() for item in co._queue]
            assert len(queued) == parts
            task.cancel()
            queued[0][2].set_exception(OpRpcError(pb.OpError(
                code=grpc.StatusCode.UNAVAILABLE.value[0], kind="not_leader", message="moved")))
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.5)  # a retry would have been sent by now
            return len(cluster.calls("MGet"))

    # the queued parts still leave (they were queued before the cancel), no more
    assert asyncio.run(run()) == parts


def test_waiting_for_the_parts_expires_or_cancels_them_together() -> None:
    """``_all_done``: the parts still waiting at the timeout fail with
    DEADLINE_EXCEEDED; cancelling the wait cancels every part."""

    async def run() -> tuple[list[Any], list[bool]]:
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(3)]
        futs[0].set_result("early")
        await _all_done(futs, 0.05)
        outcomes = [f.result() if f.exception() is None else f.exception().code() for f in futs]
        waiting = [loop.create_future() for _ in range(3)]
        task = asyncio.ensure_future(_all_done(waiting, 10.0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return outcomes, [f.cancelled() for f in waiting]

    outcomes, cancelled = asyncio.run(run())
    assert outcomes == ["early", grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DEADLINE_EXCEEDED]
    assert cancelled == [True, True, True]


async def wait_for_async(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


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
    ``answer`` is None or returns None (a node that hangs).  ``writers``
    records the task that wrote each request."""

    _CANCEL = object()

    def __init__(self, answer: Any) -> None:
        self._answer = answer
        self._q: asyncio.Queue[Any] = asyncio.Queue()
        self.requests: list[Any] = []
        self.writers: list[Any] = []
        self.cancelled = False

    async def initial_metadata(self) -> Any:
        return (("cachenode-stream", "1"),)  # accepted

    async def write(self, req: Any) -> None:
        self.requests.append(req)
        self.writers.append(asyncio.current_task())
        answer = self._answer(req) if self._answer is not None else None
        if answer is not None:
            self._q.put_nowait(answer)

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

    return pb.BatchResponse(results=[pb.BatchResult(get=pb.GetResponse(found=True, value=op.get.key)) for op in req.ops])


def test_batches_ride_one_stream_which_is_closed_when_idle() -> None:

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


def _answer_first(n: int) -> Any:
    """Answers the first ``n`` requests of a stream, then hangs."""
    seen = [0]

    def answer(req: Any) -> Any:
        seen[0] += 1
        return _answer_gets(req) if seen[0] <= n else None

    return answer


def _no_unary(req: Any, timeout: float) -> Any:
    raise AssertionError("unexpected unary Batch")


def test_a_lone_call_is_sent_by_its_own_task_and_calls_of_the_same_turn_join_it() -> None:
    """On an open stream, a call that finds its node idle sends its one-op
    batch from the caller's task (no task of the coalescer's); calls made in
    the same loop turn still leave together, in one batch."""

    streams: list[_FakeStream] = []

    def stream_call() -> _FakeStream:
        streams.append(_FakeStream(_answer_gets))
        return streams[-1]

    async def run() -> tuple[Any, Any, list[Any]]:
        co = Coalescer(_no_unary, stream_call=stream_call)
        await co.call("Get", pb.GetRequest(key=b"opens"), 2.0)  # the first call opens the stream
        lone = await co.call("Get", pb.GetRequest(key=b"lone"), 2.0)
        me = asyncio.current_task()
        callers = [asyncio.ensure_future(co.call("Get", pb.GetRequest(key=b"g%d" % i), 2.0)) for i in range(3)]
        together = await asyncio.gather(*callers)
        return lone, [me, *callers], together

    lone, callers, together = asyncio.run(run())
    assert len(streams) == 1
    s = streams[0]
    assert [len(r.ops) for r in s.requests] == [1, 1, 3]
    assert s.writers[1] is callers[0]  # carried by the caller
    # batches go from the coalescer's own task, not from any caller's
    assert s.writers[0] not in callers and s.writers[2] not in callers
    assert lone.value == b"lone" and [g.value for g in together] == [b"g0", b"g1", b"g2"]


def test_a_carried_call_ends_at_its_own_deadline_and_its_stream_is_replaced() -> None:

    streams: list[_FakeStream] = []

    def stream_call() -> _FakeStream:
        streams.append(_FakeStream(_answer_first(1) if not streams else _answer_gets))
        return streams[-1]

    async def run() -> tuple[grpc.StatusCode, float, Any]:
        # a long grace: the carried call must not wait for it
        co = Coalescer(_no_unary, stream_call=stream_call, stream_grace_s=5.0)
        loop = asyncio.get_running_loop()
        await co.call("Get", pb.GetRequest(key=b"opens"), 2.0)
        t0 = loop.time()
        try:
            await co.call("Get", pb.GetRequest(key=b"hangs"), 0.2)
            raise AssertionError("the call did not fail")
        except grpc.RpcError as e:
            code, took = e.code(), loop.time() - t0
        got = await co.call("Get", pb.GetRequest(key=b"next"), 1.0)
        return code, took, got

    code, took, got = asyncio.run(run())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and 0.15 <= took < 1.0
    assert streams[0].cancelled and len(streams) == 2 and got.value == b"next"


def test_cancelling_a_carried_call_leaves_the_calls_queued_behind_it_their_batch() -> None:

    streams: list[_FakeStream] = []

    def stream_call() -> _FakeStream:
        streams.append(_FakeStream(_answer_first(1) if not streams else _answer_gets))
        return streams[-1]

    async def run() -> tuple[bool, Any]:
        co = Coalescer(_no_unary, stream_call=stream_call)
        await co.call("Get", pb.GetRequest(key=b"opens"), 2.0)
        carried = asyncio.ensure_future(co.call("Get", pb.GetRequest(key=b"hangs"), 5.0))
        while len(streams[0].requests) < 2:  # the carried call is on the wire
            await asyncio.sleep(0.001)
        behind = asyncio.ensure_future(co.call("Get", pb.GetRequest(key=b"behind"), 5.0))
        await asyncio.sleep(0.01)
        assert not behind.done()  # it waits for the node's one batch in flight
        carried.cancel()
        got = await asyncio.wait_for(behind, 2.0)
        return carried.cancelled(), got

    was_cancelled, got = asyncio.run(run())
    assert was_cancelled and got.value == b"behind"
    assert streams[0].cancelled and len(streams) == 2


def test_a_carried_call_stays_cancellable_when_its_deadline_lands_in_the_same_turn() -> None:
    """The stream's expiry and the caller's own timeout come due in one loop
    iteration (the loop stalled past both): the caller's cancellation wins,
    it is not turned into a deadline error that the client would retry.
    (Found by review: the carried call runs the stream in the caller's task.)"""

    streams: list[_FakeStream] = []

    def stream_call() -> _FakeStream:
        streams.append(_FakeStream(_answer_first(1) if not streams else _answer_gets))
        return streams[-1]

    async def run() -> str:
        co = Coalescer(_no_unary, stream_call=stream_call)
        await co.call("Get", pb.GetRequest(key=b"opens"), 2.0)

        loop = asyncio.get_running_loop()
        sent = loop.time()

        async def user_call() -> Any:  # as AsyncCacheClient._attempts: an RpcError -> another attempt
            try:
                return await co.call("Get", pb.GetRequest(key=b"hangs"), 0.5)
            except grpc.RpcError:
                return await co.call("Get", pb.GetRequest(key=b"retry"), 1.0)

        async def guarded() -> Any:
            async with asyncio.timeout(0.51):  # the user's own timeout, just after the call's
                return await user_call()

        t = asyncio.ensure_future(guarded())
        while len(streams[0].requests) < 2:  # the carried call is on the wire
            await asyncio.sleep(0.001)
        # A loop stall from before the call's deadline to after both: the
        # two timers then run in one iteration.
        assert loop.time() - sent < 0.45, "the machine was too slow to set the scene"
        time.sleep(0.7)
        try:
            r = await t
            return f"returned {r.value!r}"
        except TimeoutError:
            return "timeout"

    assert asyncio.run(run()) == "timeout"


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


# ---------------------------------------------------------------------------
# the blocking client: threads
# ---------------------------------------------------------------------------


class _Method:
    """A stub method whose calls the test answers by hand."""

    def __init__(self, name: str, log: list[tuple[str, Any, Future[Any]]], refuse: list[Exception]) -> None:
        self._name, self._log, self._refuse = name, log, refuse

    def future(self, request: Any, timeout: float) -> Future[Any]:
        if self._refuse:
            raise self._refuse.pop(0)
        f: Future[Any] = Future()
        self._log.append((self._name, request, f))
        return f

    def __call__(self, request: Any, timeout: float) -> Any:  # the blocking call
        return self.future(request, timeout).result(timeout)


class _HandStub:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, Future[Any]]] = []
        self.refuse: list[Exception] = []
        for name in ("Get", "Set", "Batch"):
            setattr(self, name, _Method(name, self.sent, self.refuse))


def _set(key: bytes) -> Any:
    return pb.SetRequest(key=key, value=b"v")


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as e:  # handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _first_in_flight(co: Any, stub: _HandStub, method: str = "Set") -> tuple[threading.Thread, list[Any]]:
    """Start a call of key ``a`` in a thread; return once it has left."""
    started = _in_thread(lambda: co.call(method, _set(b"a"), 5))
    wait_for(lambda: len(stub.sent) == 1, 5, "the first call to leave")
    return started


def test_a_lone_blocking_call_is_the_plain_unary_rpc_and_the_queued_ones_leave_as_one_batch() -> None:
    stub = _HandStub()
    co = SyncCoalescer(stub, max_inflight=1)
    first, first_out = _first_in_flight(co, stub, "Set")
    assert stub.sent[0][0] == "Set"  # alone: the unary call
    others = [_in_thread(lambda k=k: co.call("Set", _set(k), 5)) for k in (b"b", b"c", b"d")]
    wait_for(lambda: len(co._queue) == 3, 5, "three calls queued behind the one in flight")
    assert len(stub.sent) == 1  # nothing else leaves while one RPC is in flight
    stub.sent[0][2].set_result(pb.SetResponse(applied=True))
    first.join(5)
    assert first_out == [pb.SetResponse(applied=True)]
    wait_for(lambda: len(stub.sent) == 2, 5, "the queued calls to leave")
    name, batch, fut = stub.sent[1]
    assert name == "Batch" and [op.set.key for op in batch.ops] == [b"b", b"c", b"d"]
    # each op keeps its own outcome; a failed op fails like its unary call would
    fut.set_result(pb.BatchResponse(results=[
        pb.BatchResult(set=pb.SetResponse(applied=True)),
        pb.BatchResult(error=pb.OpError(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="not the leader",
                                        kind="not_leader", leader="n2")),
    ]))  # short: the third op fails as internal
    for t, _ in others:
        t.join(5)
    outs = [o[0] for _, o in others]
    assert outs[0] == pb.SetResponse(applied=True)
    assert isinstance(outs[1], grpc.RpcError) and outs[1].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("cachenode-leader", "n2") in outs[1].trailing_metadata()
    assert isinstance(outs[2], grpc.RpcError) and outs[2].code() == grpc.StatusCode.INTERNAL
    assert co.rpcs == 2 and co.batches == 1 and co.largest == 3
    assert co._inflight == 0


def test_a_second_blocking_call_leaves_at_once_by_default() -> None:
    """Two RPCs may be in flight per node: two threads are never serialised
    (measured: with one, 2-4 writing threads lost 7-12 % of their ops/s)."""
    stub = _HandStub()
    co = SyncCoalescer(stub)
    threads = [_in_thread(lambda k=k: co.call("Set", _set(k), 5)) for k in (b"a", b"b")]
    wait_for(lambda: len(stub.sent) == 2, 5, "both calls to leave")
    assert [name for name, _, _ in stub.sent] == ["Set", "Set"]
    third, third_out = _in_thread(lambda: co.call("Set", _set(b"c"), 5))
    wait_for(lambda: len(co._queue) == 1, 5, "the third call queued")
    stub.sent[1][2].set_result(pb.SetResponse(applied=True))
    wait_for(lambda: len(stub.sent) == 3, 5, "the third call to leave in the freed place")
    for _, _, f in stub.sent[::2]:
        f.set_result(pb.SetResponse(applied=True))
    for t, _ in [*threads, (third, third_out)]:
        t.join(5)
    assert third_out == [pb.SetResponse(applied=True)] and co._inflight == 0


def test_a_blocking_call_past_its_deadline_in_the_queue_is_never_sent() -> None:
    stub = _HandStub()
    co = SyncCoalescer(stub, max_inflight=1)
    first, _ = _first_in_flight(co, stub, "Set")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        co.call("Set", _set(b"late"), 0.2)
    # never sent, so definitely not applied: the client retries it after a backoff
    failure = classify(info.value, what="set", target="n1")
    assert isinstance(failure.error, Overloaded) and not failure.maybe_sent
    assert "never sent" in info.value.details()
    assert 0.15 < time.monotonic() - t0 < 2.0
    assert co._queue == []
    stub.sent[0][2].set_result(pb.SetResponse(applied=True))
    first.join(5)
    assert len(stub.sent) == 1 and co._inflight == 0  # "late" never left


def test_a_queued_call_already_past_its_deadline_is_never_sent() -> None:
    """Its RPC slot frees after its deadline but before its thread noticed:
    the next batch leaves without it."""
    now = [1000.0]
    stub = _HandStub()
    co = SyncCoalescer(stub, max_inflight=1, clock=lambda: now[0])
    first, _ = _first_in_flight(co, stub, "Set")
    late, late_out = _in_thread(lambda: co.call("Set", _set(b"late"), 1))  # waits ~1 s of real time
    on_time, on_time_out = _in_thread(lambda: co.call("Set", _set(b"on-time"), 30))
    wait_for(lambda: len(co._queue) == 2, 5, "two calls queued")
    now[0] += 2  # "late" is past its deadline, "on-time" is not
    stub.sent[0][2].set_result(pb.SetResponse(applied=True))
    wait_for(lambda: len(stub.sent) == 2, 5, "the next call to leave")
    assert stub.sent[1][0] == "Set" and stub.sent[1][1].key == b"on-time"  # alone: "late" stayed behind
    late.join(5)
    assert isinstance(late_out[0], grpc.RpcError) and not classify(late_out[0], what="set", target="n1").maybe_sent
    stub.sent[1][2].set_result(pb.SetResponse(applied=True))
    on_time.join(5)
    first.join(5)
    assert on_time_out == [pb.SetResponse(applied=True)] and co._inflight == 0


def test_a_failed_rpc_fails_every_op_in_it_and_a_refused_launch_strands_no_caller() -> None:
    stub = _HandStub()
    co = SyncCoalescer(stub, max_inflight=1)
    first, first_out = _first_in_flight(co, stub, "Get")
    others = [_in_thread(lambda k=k: co.call("Set", _set(k), 5)) for k in (b"b", b"c")]
    wait_for(lambda: len(co._queue) == 2, 5, "two calls queued")
    stub.refuse.append(ValueError("Cannot invoke RPC: Channel closed!"))
    err = grpc.RpcError("unavailable")
    stub.sent[0][2].set_exception(err)
    first.join(5)
    assert first_out == [err]
    for t, out in others:
        t.join(5)
        # the Batch could not start: its callers hear why, as a call never sent
        assert isinstance(out[0], grpc.RpcError) and out[0].code() == grpc.StatusCode.UNAVAILABLE
        assert "Channel closed" in out[0].details() and not classify(out[0], what="set", target="n1").maybe_sent
    assert co._inflight == 0
    # and the coalescer still works
    t, out = _in_thread(lambda: co.call("Set", _set(b"d"), 5))
    wait_for(lambda: len(stub.sent) == 2, 5, "a new call to leave")
    stub.sent[1][2].set_exception(err)
    t.join(5)
    assert out == [err]


def test_a_blocking_mset_and_mget_send_one_rpc_per_node_and_retry_failed_parts_alone(cluster: FakeCluster) -> None:
    """The blocking client queues an mget's or mset's per-shard parts on the
    nodes' coalescers in one go: one RPC per node that leads a part.  A part
    whose first attempt fails goes on alone with its request id; every part
    applies exactly once."""
    data = {f"k{i}": f"v{i}" for i in range(100)}
    with CacheClient(cluster.endpoints, timeout=5) as c:
        c.set("warm-up", "x")
        leaders = {cluster.leader_of_key(k.encode()) for k in data}
        rpcs = sum(co.rpcs for co in c._coalescers.values())
        assert c.mset(data) == 100
        assert sum(co.rpcs for co in c._coalescers.values()) - rpcs == len(leaders)
        got = c.mget([*data, "absent"])
        assert sum(co.rpcs for co in c._coalescers.values()) - rpcs == 2 * len(leaders)
        assert got["absent"] is None
        assert {k: v.value.decode() for k, v in got.items() if v is not None} == data

        cluster.clear_calls()
        applies_before = dict(cluster.state.applies)
        cluster.inject(Fault("MSet", grpc.StatusCode.UNAVAILABLE, kind="not_leader", count=1))
        cluster.inject(Fault("MSet", grpc.StatusCode.UNAVAILABLE, kind="unavailable", count=1, apply_first=True))
        cluster.inject(Fault("MGet", grpc.StatusCode.UNAVAILABLE, kind="not_leader", count=2))
        again = {k: v + "!" for k, v in data.items()}
        assert c.mset(again) == 100
        got = c.mget(list(again))
    assert {k: v.value.decode() for k, v in got.items() if v is not None} == again
    msets = cluster.calls("MSet")
    assert len(msets) >= 4 + 2
    new = {rid: n for rid, n in cluster.state.applies.items() if rid not in applies_before}
    assert sorted(new.values()) == [1, 1, 1, 1]


def test_a_blocking_multi_key_call_on_a_hung_node_ends_at_its_deadline(cluster: FakeCluster) -> None:
    hung = cluster.leader_of_key(b"k0")
    cluster.inject(Fault("MGet", grpc.StatusCode.OK, node=hung, delay_s=2.5, count=100))
    with CacheClient(cluster.endpoints, timeout=0.8) as c:
        c.set("k0", "v")
        t0 = time.monotonic()
        with pytest.raises(CacheError, match="mget.*shard"):
            c.mget([f"k{i}" for i in range(40)])
        assert time.monotonic() - t0 < 2.0


def test_threads_sharing_a_blocking_client_share_batches(cluster: FakeCluster) -> None:
    """Real gRPC: while two slow calls to a node are in flight (the most per
    node), the calls other threads make to that node queue, then leave as
    one Batch."""

    with CacheClient(cluster.endpoints, timeout=10) as c:
        c.set("warm-up", "x")  # loads the map
        node = cluster.leader_of_key(b"warm-up")
        keys = [k for k in (f"k{i}" for i in range(200)) if cluster.leader_of_key(k.encode()) == node][:10]
        cluster.inject(Fault("Set", grpc.StatusCode.OK, node=node, delay_s=1.0, count=2))
        slow = [_in_thread(lambda: c.set("warm-up", "y")) for _ in range(2)]
        co = c._coalescers[cluster.nodes[node].address]
        wait_for(lambda: co._inflight == 2, 5, "two slow calls in flight (the most per node)")
        workers = [_in_thread(lambda k=k: c.set(k, k + "!")) for k in keys]
        wait_for(lambda: len(co._queue) == len(keys), 5, "the other calls queued behind them")
        for t, out in slow:
            t.join(10)
            assert out == [True]
        for t, out in workers:
            t.join(10)
            assert out == [True]
        assert co.largest == len(keys)
        assert {k: c.get(k).value for k in keys} == {k: (k + "!").encode() for k in keys}  # type: ignore[union-attr]


def test_closing_a_blocking_client_under_its_threads_fails_each_call_cleanly(cluster: FakeCluster) -> None:
    """Two calls in flight and four queued when the client closes: all six
    raise Unavailable saying so (no ValueError from the closed channel, no hang)."""

    c = CacheClient(cluster.endpoints, timeout=10)
    c.set("warm-up", "x")
    node = cluster.leader_of_key(b"warm-up")
    keys = [k for k in (f"k{i}" for i in range(200)) if cluster.leader_of_key(k.encode()) == node][:6]
    cluster.inject(Fault("Set", grpc.StatusCode.OK, node=node, delay_s=2.0, count=2))
    workers = [_in_thread(lambda k=k: c.set(k, "v")) for k in keys]
    co = c._coalescers[cluster.nodes[node].address]
    wait_for(lambda: co._inflight == 2 and len(co._queue) == 4, 5, "two calls in flight and four queued")
    t0 = time.monotonic()
    c.close()
    for t, out in workers:
        t.join(10)
        assert isinstance(out[0], Unavailable) and "closed" in str(out[0]), out
    assert time.monotonic() - t0 < 2.0
