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
    coalescer before any reply can be read (asyncio runs ready tasks before
    polling): each node sends its first two calls alone, the rest together."""

    async def run() -> tuple[list[Any], list[Any]]:
        async with AsyncCacheClient(cluster.endpoints, timeout=5) as c:
            await c.set("warm-up", "x")  # loads the cluster map
            await asyncio.gather(*(c.set(f"k{i}", f"v{i}") for i in range(200)))
            got = await asyncio.gather(*(c.get(f"k{i}") for i in range(200)))
            return got, list(c._coalescers.values())

    got, coalescers = asyncio.run(run())
    assert [g.value for g in got] == [f"v{i}".encode() for i in range(200)]
    assert sum(co.ops for co in coalescers) == 401
    assert max(co.largest for co in coalescers) >= 10


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
