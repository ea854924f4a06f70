"""The asyncio smart client (grpc.aio): the same API and rules as :class:`CacheClient`.

Concurrency: use one :class:`AsyncCacheClient` from one event loop (its gRPC
channels belong to the loop that first used them).  Within that loop any
number of tasks may call it concurrently.  Constructing it does no I/O; the
cluster map is fetched on the first call.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio

from cachenode._errors import CacheError, Unavailable
from cachenode._types import ClusterMap, NodeId, ShardId
from cachenode.client._call import Op, Target
from cachenode.client._coalesce import BATCH_FIELD, Coalescer, expire_all
from cachenode.client._convert import (
    KeyLike,
    check_ttl,
    get_result,
    mget_item,
    mset_items,
    node_status_from_wire,
    partial_failure,
    to_bytes,
    to_key,
)
from cachenode.client._core import (
    CHANNEL_OPTIONS,
    CallState,
    ClientCore,
    Consistency,
    Regroup,
    Routing,
    closed_during,
    parse_consistency,
)
from cachenode.client._results import CasResult, GetResult, NodeStatus
from cachenode.client._status import classify, reason
from cachenode.client.route_table import RouteTable
from cachenode.v1 import cache_pb2 as pb
from cachenode.v1 import cache_pb2_grpc as pb_grpc

__all__ = ["AsyncCacheClient"]

K = TypeVar("K", bound=str | bytes)
X = TypeVar("X")

MAX_REGROUPS = 3


class _Group(Generic[X]):
    def __init__(self, items: list[X]) -> None:
        self.items = items
        self.response: Any = None


class AsyncCacheClient:
    """An asyncio client for a cachenode cluster; see :class:`CacheClient` for the contract.

    Every method of :class:`CacheClient` exists here as a coroutine, with the
    same arguments, results and errors.  ``mget``/``mset`` fan out per shard
    with :func:`asyncio.gather`.  Use ``async with`` or ``await close()``.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        timeout: float = 2.0,
        max_attempts: int = 4,
        client_id: str | bytes | None = None,
        routing: Routing = "smart",
        coalesce: bool = True,
    ) -> None:
        """``coalesce``: send concurrent single-key calls to one node as one
        Batch RPC (see ``_coalesce``); results and errors stay per call."""
        self._coalesce = coalesce
        self._coalescers: dict[str, Coalescer] = {}
        self._core = ClientCore(
            endpoints,
            timeout=timeout,
            max_attempts=max_attempts,
            client_id=client_id,
            routing=routing,
        )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closed = False

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._core.endpoints

    @property
    def timeout(self) -> float:
        return self._core.timeout

    @property
    def client_id(self) -> bytes:
        return self._core.client_id

    @property
    def route_table(self) -> RouteTable | None:
        return self._core.table

    # ---- single-key operations --------------------------------------------

    async def get(
        self, key: KeyLike, *, consistency: Consistency = "linearizable"
    ) -> GetResult | None:
        """The value of ``key``, or ``None`` when absent (see :meth:`CacheClient.get`)."""
        op = self._core.get_op(to_key(key), parse_consistency(consistency))
        resp: pb.GetResponse = await self._run(op)
        return get_result(resp)

    async def set(
        self,
        key: KeyLike,
        value: KeyLike,
        *,
        ttl_ms: int | None = None,
        if_absent: bool = False,
        if_present: bool = False,
    ) -> bool:
        """Write ``value``; True when applied (see :meth:`CacheClient.set`)."""
        op = self._core.set_op(to_key(key), to_bytes(value, "value"), ttl_ms, if_absent, if_present)
        resp: pb.SetResponse = await self._run(op)
        return resp.applied

    async def delete(self, key: KeyLike) -> bool:
        """Delete ``key``; True when it existed."""
        resp: pb.DeleteResponse = await self._run(self._core.delete_op(to_key(key)))
        return resp.deleted

    async def cas(
        self,
        key: KeyLike,
        new: KeyLike,
        *,
        expected: KeyLike | None = None,
        expected_version: int | None = None,
        absent: bool = False,
        ttl_ms: int | None = None,
    ) -> CasResult:
        """Compare-and-set (see :meth:`CacheClient.cas`)."""
        op = self._core.cas_op(
            to_key(key),
            to_bytes(new, "new value"),
            None if expected is None else to_bytes(expected, "expected value"),
            expected_version,
            absent,
            ttl_ms,
        )
        resp: pb.CompareAndSetResponse = await self._run(op)
        return CasResult(
            succeeded=resp.succeeded,
            version=resp.version,
            current_value=resp.current_value if resp.current_found else None,
            current_version=resp.current_version,
        )

    async def incr(self, key: KeyLike, delta: int = 1) -> int:
        """Add ``delta``; returns the new value (see :meth:`CacheClient.incr`)."""
        resp: pb.IncrResponse = await self._run(self._core.incr_op(to_key(key), delta))
        return resp.value

    async def ttl(self, key: KeyLike) -> int | None:
        """Remaining ms; ``-1`` when the key never expires; ``None`` when absent."""
        resp: pb.TtlResponse = await self._run(self._core.ttl_op(to_key(key)))
        if not resp.found:
            return None
        return resp.ttl_ms if resp.ttl_ms >= 0 else -1

    # ---- multi-key operations --------------------------------------------

    async def mget(self, keys: Iterable[K]) -> dict[K, GetResult | None]:
        """Read many keys, one ``MGet`` per shard concurrently (see :meth:`CacheClient.mget`)."""
        pairs = [(k, to_key(k)) for k in keys]
        if not pairs:
            return {}
        deadline = self._core.deadline()
        table = await self._ensure_table(deadline)
        groups = [_Group(ks) for ks in table.group_keys([b for _, b in pairs]).values()]
        done = await self._fan_out(
            groups, self._core.mget_op, table.group_keys, deadline, "mget", write=False
        )
        found: dict[bytes, GetResult | None] = {}
        for group in done:
            shard_id = table.shard_for_key(group.items[0]).id
            resp: pb.MGetResponse = group.response
            for key, item in zip(group.items, resp.items, strict=False):
                found[key] = mget_item(item, shard_id)
        return {k: found.get(b) for k, b in pairs}

    async def mset(
        self,
        mapping_or_items: Mapping[Any, KeyLike] | Iterable[tuple[KeyLike, KeyLike]],
        ttl_ms: int | None = None,
    ) -> int:
        """Write many keys; atomic per shard only (see :meth:`CacheClient.mset`)."""
        items = mset_items(mapping_or_items)
        if not items:
            return 0
        ttl = check_ttl(ttl_ms)
        deadline = self._core.deadline()
        table = await self._ensure_table(deadline)
        groups = [_Group(kvs) for kvs in table.group_items(items).values()]
        done = await self._fan_out(
            groups,
            lambda kvs: self._core.mset_op(kvs, ttl),
            table.group_items,
            deadline,
            "mset",
            write=True,
        )
        total = 0
        for group in done:
            resp: pb.MSetResponse = group.response
            total += resp.count
        return total

    # ---- cluster information ----------------------------------------------

    async def cluster_map(self, *, refresh: bool = True) -> ClusterMap:
        """The cluster map; fetched from any reachable node when ``refresh``."""
        deadline = self._core.deadline()
        if refresh or self._core.table is None:
            await self._refresh_map(deadline)
        return (await self._ensure_table(deadline)).cluster_map

    def leaders(self) -> dict[ShardId, NodeId]:
        """Shard id -> leader node id as currently known."""
        table = self._core.table
        return table.leaders() if table is not None else {}

    async def node_status(self, node: str) -> NodeStatus:
        """``Admin.GetNodeStatus`` of one node (id or address); one attempt."""
        address = node
        table = self._core.table
        if table is not None and table.address_of(node) is not None:
            address = table.address_of(node) or node
        try:
            resp = await self._admin_stub(address).GetNodeStatus(
                pb.NodeStatusRequest(), timeout=self._core.timeout
            )
        except grpc.RpcError as err:
            raise classify(err, what="node status", target=f"node at {address}").error from None
        return node_status_from_wire(resp)

    # ---- lifecycle ---------------------------------------------------------

    async def close(self) -> None:
        """Close every channel.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        for co in self._coalescers.values():
            co.close()
        self._coalescers.clear()
        channels = list(self._channels.values())
        self._channels.clear()
        for channel in channels:
            await channel.close(None)

    async def __aenter__(self) -> AsyncCacheClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncCacheClient(endpoints={list(self._core.endpoints)!r}, routing={self._core.routing!r})"

    # ---- internals -------------------------------------------------------

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._closed:
            raise Unavailable("the client is closed; create a new AsyncCacheClient")
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS))
            self._channels[address] = channel
        return channel

    def _cache_stub(self, address: str) -> pb_grpc.CacheAsyncStub:
        return pb_grpc.CacheStub(self._channel(address))

    def _admin_stub(self, address: str) -> pb_grpc.AdminAsyncStub:
        return pb_grpc.AdminStub(self._channel(address))

    async def _refresh_map(self, deadline: float) -> RouteTable:
        candidates = self._core.map_candidates()
        errors: list[str] = []
        for i, address in enumerate(candidates):
            remaining = deadline - self._core.clock()
            if remaining <= 0:
                errors.append(f"{address}: not tried, out of time")
                continue
            try:
                resp = await self._admin_stub(address).GetClusterMap(
                    pb.ClusterMapRequest(), timeout=remaining / (len(candidates) - i)
                )
            except grpc.RpcError as err:
                self._core.mark_down(address)
                errors.append(f"{address}: {reason(err)}")
                continue
            self._core.mark_up(address)
            return self._core.apply_map(resp)
        raise Unavailable(
            f"could not fetch the cluster map from any of {', '.join(candidates)} "
            f"({'; '.join(errors)}); check that the nodes are running and that the "
            "endpoints are right"
        )

    async def _ensure_table(self, deadline: float) -> RouteTable:
        table = self._core.table
        if table is not None:
            return table
        last: CacheError | None = None
        for attempt in range(self._core.max_attempts):
            try:
                return await self._refresh_map(deadline)
            except Unavailable as err:
                last = err
            if deadline - self._core.clock() <= 0:
                break
            await asyncio.sleep(
                min(self._core.backoff(attempt), max(0.0, deadline - self._core.clock()) / 2)
            )
        assert last is not None
        raise last

    def _run(self, op: Op, deadline: float | None = None) -> Coroutine[Any, Any, Any]:
        """The call's coroutine (no frame of its own around :meth:`_attempts`)."""
        return self._attempts(self._core.begin(op, deadline))

    async def _attempts(self, state: CallState, delay: float = 0.0) -> Any:
        """The call's attempts until one answers, from after ``delay``;
        raises its final error."""
        op = state.op
        while True:
            if delay > 0:
                await asyncio.sleep(delay)
            delay = 0.0
            if state.need_map():
                try:
                    await self._refresh_map(state.deadline)
                    state.map_refreshed()
                except Unavailable as err:
                    delay = state.map_failed(err)
                continue
            target = state.target()
            try:
                if self._coalesce and op.method in BATCH_FIELD:
                    return await self._coalescer(target.address).call(
                        op.method, state.request(target), state.attempt_timeout())
                call = getattr(self._cache_stub(target.address), op.method)
                return await call(state.request(target), timeout=state.attempt_timeout())
            except grpc.RpcError as rpc_err:
                delay = self._failed(state, rpc_err, target)

    def _failed(self, state: CallState, err: grpc.RpcError, target: Target) -> float:
        """An attempt failed: the backoff before the next, or raises the call's error."""
        if self._closed:
            raise closed_during(state.op) from None
        return state.failed(err, target)

    def _coalescer(self, address: str) -> Coalescer:
        co = self._coalescers.get(address)
        if co is None:
            stub = self._cache_stub(address)
            co = self._coalescers[address] = Coalescer(stub.Batch, stream_call=stub.BatchStream)
        return co

    async def _run_all(self, ops: list[Op], deadline: float) -> list[Any]:
        """What ``gather(*(self._run(op, deadline) for op in ops),
        return_exceptions=True)`` returns: each op's response or error.

        For an mget's or mset's per-shard parts.  Their first attempts are
        queued on the coalescers in one go, with one timer for all of them
        and no task per part.  A part whose first attempt fails goes on in
        :meth:`_attempts` at once, in a task of its own, like any call: it
        never waits for its siblings.  A task, its coroutine and a timer per
        part cost the client about as much CPU as the part's share of the
        batch it rides in (100-key mget, 16 shards: ``docs/benchmarks-history.md``,
        *Session 15*)."""
        if not self._coalesce:
            return await asyncio.gather(*(self._run(op, deadline) for op in ops), return_exceptions=True)
        loop = asyncio.get_running_loop()
        results: list[Any] = [None] * len(ops)
        tasks: list[tuple[int, asyncio.Future[Any]]] = []  # parts going on in _attempts
        cancelled = False  # the call was: start no more attempts

        def first_done(i: int, state: CallState, target: Target, fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                return
            err = fut.exception()  # read, so that it is never reported as unretrieved
            if cancelled:
                return
            if err is None:
                results[i] = fut.result()
            elif not isinstance(err, grpc.RpcError):
                results[i] = err
            else:
                try:
                    delay = self._failed(state, err, target)
                except Exception as e:  # noqa: BLE001 - the part's outcome
                    results[i] = e
                    return
                tasks.append((i, loop.create_task(self._attempts(state, delay))))

        futs: list[asyncio.Future[Any]] = []
        timeout = 0.0
        for i, op in enumerate(ops):
            state = self._core.begin(op, deadline)
            if state.need_map() or op.method not in BATCH_FIELD:
                tasks.append((i, loop.create_task(self._attempts(state))))
                continue
            try:
                target = state.target()
                timeout = state.attempt_timeout()
                fut = self._coalescer(target.address).submit(op.method, state.request(target), timeout)
            except Exception as e:  # Regroup, or the client was closed
                results[i] = e
                continue
            fut.add_done_callback(functools.partial(first_done, i, state, target))
            futs.append(fut)
        try:
            if futs:
                # Every first_done has run once this returns: each future's
                # callbacks run in the order they were added.
                await _all_done(futs, timeout)
            if tasks:
                await asyncio.wait([t for _, t in tasks])
        except asyncio.CancelledError:
            cancelled = True
            for _, t in tasks:
                t.cancel()
            raise
        for i, t in tasks:
            results[i] = asyncio.CancelledError() if t.cancelled() else t.exception() or t.result()
        return results

    async def _fan_out(
        self,
        groups: list[_Group[X]],
        make_op: Callable[[list[X]], Op],
        regroup: Callable[[list[X]], dict[ShardId, list[X]]],
        deadline: float,
        what: str,
        *,
        write: bool,
    ) -> list[_Group[X]]:
        total = len(groups)
        done: list[_Group[X]] = []
        pending = groups
        for _ in range(MAX_REGROUPS + 1):
            if not pending:
                break
            results = await self._run_all([make_op(g.items) for g in pending], deadline)
            next_pending: list[_Group[X]] = []
            errors: list[BaseException] = []
            for group, result in zip(pending, results, strict=True):
                if isinstance(result, Regroup):
                    next_pending += [_Group(items) for items in regroup(group.items).values()]
                elif isinstance(result, BaseException):
                    errors.append(result)
                else:
                    group.response = result
                    done.append(group)
            pending = next_pending
            if errors:
                first = next((e for e in errors if not isinstance(e, CacheError)), errors[0])
                if not isinstance(first, Exception):
                    raise first  # CancelledError, KeyboardInterrupt
                raise partial_failure(first, what, len(errors), total, write) from None
        if pending:
            raise Unavailable(f"{what}: the shard layout kept changing; retry")
        return done


async def _all_done(futs: list[asyncio.Future[Any]], timeout: float) -> None:
    """Wait until every future is done; those still waiting after
    ``timeout`` fail with DEADLINE_EXCEEDED.  Cancelled: cancels them all."""
    timer = asyncio.get_running_loop().call_later(timeout, expire_all, futs)
    try:
        await asyncio.wait(futs)
    except asyncio.CancelledError:
        for fut in futs:
            fut.cancel()
        raise
    finally:
        timer.cancel()
