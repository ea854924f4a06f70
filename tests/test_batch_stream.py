"""BatchStream: Batch over one long-lived stream, against real node processes."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from _nodes import LocalCluster, local_cluster

from cachenode.client import AsyncCacheClient
from cachenode.v1 import cache_pb2 as pb

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # 4 workers: at most 2 streams per node, so the limit is reachable here.
    with local_cluster(tmp_path_factory.mktemp("bstream") / "c", nodes=3, shards=4, extra=["--grpc-workers=4"]) as c:
        yield c


class _Stream:
    """A BatchStream driven one request at a time from the test thread."""

    def __init__(self, channel: grpc.Channel, raw: bool = False) -> None:
        self._q: queue.Queue[object] = queue.Queue()
        def ident(b: bytes) -> bytes:
            return b

        call = channel.stream_stream(
            "/cachenode.v1.Cache/BatchStream",
            request_serializer=ident if raw else pb.BatchRequest.SerializeToString,
            response_deserializer=ident if raw else pb.BatchResponse.FromString,
        )
        self.responses = call(iter(self._q.get, None), timeout=30)

    def ask(self, req: object) -> object:
        self._q.put(req)
        return next(self.responses)

    def close(self) -> None:
        self._q.put(None)
        self.responses.cancel()


def _get(key: bytes) -> pb.BatchOp:
    return pb.BatchOp(get=pb.GetRequest(key=key))


def test_one_stream_answers_every_batch_in_order_and_outlives_a_failed_batch(cluster: LocalCluster) -> None:
    nid = cluster.node_ids[0]
    with grpc.insecure_channel(cluster.address(nid)) as ch:
        s = _Stream(ch)
        try:
            # (ops of one batch are concurrent: the read goes in the next one)
            r1 = s.ask(pb.BatchRequest(ops=[pb.BatchOp(set=pb.SetRequest(key=b"st1", value=b"one"))], timeout_ms=5000))
            assert isinstance(r1, pb.BatchResponse) and not r1.HasField("error") and r1.results[0].set.applied
            r1 = s.ask(pb.BatchRequest(ops=[_get(b"st1")], timeout_ms=5000))
            assert isinstance(r1, pb.BatchResponse) and r1.results[0].get.value == b"one"
            # An empty batch fails as a whole: its error in the response, the stream goes on.
            r2 = s.ask(pb.BatchRequest(timeout_ms=5000))
            assert isinstance(r2, pb.BatchResponse) and not r2.results
            assert r2.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and r2.error.kind == "invalid_argument"
            for i in range(20):
                r = s.ask(pb.BatchRequest(ops=[pb.BatchOp(incr=pb.IncrRequest(key=b"st-ctr", delta=1))]))  # timeout 0: node default
                assert isinstance(r, pb.BatchResponse) and r.results[0].incr.value == i + 1
        finally:
            s.close()


def test_a_malformed_message_ends_the_stream_with_invalid_argument(cluster: LocalCluster) -> None:
    with grpc.insecure_channel(cluster.address(cluster.node_ids[1])) as ch:
        s = _Stream(ch, raw=True)
        try:
            ok = s.ask(pb.BatchRequest(ops=[_get(b"nothing-here")]).SerializeToString())
            assert isinstance(ok, bytes) and pb.BatchResponse.FromString(ok).results[0].get.found is False
            with pytest.raises(grpc.RpcError) as e:
                s.ask(b"\xff\xff\xff")
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed BatchStream message" in (e.value.details() or "")
        finally:
            s.close()


def test_streams_per_node_are_bounded_and_their_slots_come_back(cluster: LocalCluster) -> None:
    """With --grpc-workers=4 a node serves 2 streams; a 3rd is refused with
    RESOURCE_EXHAUSTED before anything is read, and a closed stream's slot
    is free again."""
    nid = cluster.node_ids[2]
    with grpc.insecure_channel(cluster.address(nid)) as ch:
        held = [_Stream(ch), _Stream(ch)]
        try:
            for s in held:
                assert isinstance(s.ask(pb.BatchRequest(ops=[_get(b"x")])), pb.BatchResponse)
            third = _Stream(ch)
            with pytest.raises(grpc.RpcError) as e:
                third.ask(pb.BatchRequest(ops=[pb.BatchOp(set=pb.SetRequest(key=b"refused", value=b"v"))]))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "use unary Batch calls" in (e.value.details() or "")
            third.close()
            # Unary calls still find a worker while both streams are open.
            r = cluster.cache(nid).Batch(pb.BatchRequest(ops=[_get(b"refused")]), timeout=5)
            assert r.results[0].get.found is False  # the refused stream's write never ran
            held.pop().close()
            again = _wait_for_stream(ch)
            again.close()
        finally:
            for s in held:
                s.close()


def _wait_for_stream(ch: grpc.Channel, timeout: float = 10.0) -> _Stream:
    """A stream once a slot is free (the server frees it when it sees the
    cancellation, a moment after the client's)."""
    done = threading.Event()
    timer = threading.Timer(timeout, done.set)
    timer.start()
    try:
        while True:
            s = _Stream(ch)
            try:
                s.ask(pb.BatchRequest(ops=[_get(b"x")]))
                return s
            except grpc.RpcError as e:
                s.close()
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or done.is_set():
                    raise
                done.wait(0.05)
    finally:
        timer.cancel()


def test_the_smart_client_uses_one_stream_per_node(cluster: LocalCluster) -> None:
    import asyncio

    async def run() -> tuple[list[int], int, int, int]:
        async with AsyncCacheClient(cluster.endpoints, timeout=10) as c:
            for round_ in range(5):
                await asyncio.gather(*(c.set(f"sc{i}", f"{round_}") for i in range(50)))
            got = await asyncio.gather(*(c.get(f"sc{i}") for i in range(50)))
            cos = list(c._coalescers.values())
            return [int(g.value) for g in got], sum(co.streams_opened for co in cos), len(cos), sum(co.batches for co in cos)

    values, streams, nodes, batches = asyncio.run(run())
    assert values == [4] * 50
    assert streams == nodes < batches  # one stream per node carried all its batches


def test_a_client_refused_a_stream_sends_unary_batches(cluster: LocalCluster) -> None:
    """Both stream slots of a node taken: the smart client's stream is
    refused before it wrote anything, and its batches go as unary calls."""
    import asyncio

    from cachenode.client._coalesce import Coalescer
    from cachenode.v1 import cache_pb2_grpc as pb_grpc

    nid = cluster.node_ids[2]
    with grpc.insecure_channel(cluster.address(nid)) as ch:
        held = [_wait_for_stream(ch), _wait_for_stream(ch)]
        try:
            async def run() -> tuple[list[Any], int, bool]:
                async with grpc.aio.insecure_channel(cluster.address(nid)) as ach:
                    stub = pb_grpc.CacheStub(ach)
                    co = Coalescer(stub.Batch, stream_call=stub.BatchStream)
                    got = []
                    for i in range(3):
                        got.append(await co.call("Set", pb.SetRequest(key=b"rf%d" % i, value=b"v"), 5.0))
                    return got, co.streams_opened, co._stream is None

            got, opened, no_stream = asyncio.run(run())
            assert [g.applied for g in got] == [True] * 3
            assert opened == 1 and no_stream  # asked once, then unary for STREAM_RETRY_S
        finally:
            for s in held:
                s.close()
