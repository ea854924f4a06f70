"""The blocking smart client.

:class:`CacheClient` routes every key straight to its shard leader, keeps one
gRPC channel per node address, and retries only what is safe (see
:mod:`cachenode.client._core` for the rules).

Thread-safety: every public method may be called from any number of threads
at once; the channels, the route table and the request-id counter are shared
and guarded.  :meth:`CacheClient.close` may be called from any thread; calls
started after it raise :class:`~cachenode._errors.Unavailable`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

from cachenode._errors import CacheError, NotLeader, Unavailable
from cachenode._types import ClusterMap, NodeId, ShardId
from cachenode.client._call import Op, Target
from cachenode.client._coalesce import BATCH_FIELD
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
from cachenode.client._status import Retry, classify, reason
from cachenode.client._sync_coalesce import SyncCoalescer
from cachenode.client.route_table import RouteTable
from cachenode.v1 import cache_pb2 as pb
from cachenode.v1 import cache_pb2_grpc as pb_grpc

__all__ = ["CacheClient"]

K = TypeVar("K", bound=str | bytes)
X = TypeVar("X")

MAX_REGROUPS = 3
MAX_FANOUT_THREADS = 8


class _Group(Generic[X]):
    """One per-shard slice of a fan-out and, once done, its response."""

    def __init__(self, items: list[X]) -> None:
        self.items = items
        self.response: Any = None


class CacheClient:
    """A blocking client for a cachenode cluster.

    ``endpoints``: one or more ``host:port`` client addresses (a list, or a
    comma-separated string); any one that answers is enough to learn the
    cluster map, which happens lazily on the first call.

    ``timeout`` (seconds) bounds each user call as a whole, across all its
    attempts; ``max_attempts`` bounds the attempts of one call (per shard for
    ``mget``/``mset``), not counting those that found no leader (an election
    in progress): those retry with a backoff of 50 ms doubling to 0.3 s
    until the timeout.  ``client_id`` (1..64 bytes) names this client in
    request ids; a random one is chosen when omitted.  Two clients must never
    share a client id, and that includes this client's next run: its seqs
    start at 1 again, and within the nodes' dedup window (5 minutes) a write
    whose request id the last run used is not applied (refused when it
    differs from the write that used it, answered with that write's result
    when it does not).

    ``routing="smart"`` (the default) sends each request to the shard leader
    and asks nodes not to forward it.  ``routing="proxy"`` sends everything to
    the first reachable endpoint and lets that node forward (what ``cachectl
    --forward`` uses; handy to read one node's replica with ``stale``).

    Keys and values are ``str`` (encoded as UTF-8) or ``bytes``.  Errors are
    the classes of :mod:`cachenode._errors`; an argument the client can judge
    itself raises :class:`~cachenode._errors.InvalidArgument` before anything
    is sent.  A write that timed out raises
    :class:`~cachenode._errors.OutcomeUnknown`: it may or may not have been
    applied, never twice.

    Thread-safe (see the module docstring); share one client between
    threads: with ``coalesce=True`` (the default) their concurrent calls to
    one node travel together in Batch RPCs.  Use it as a context manager or
    call :meth:`close`.
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
        """``coalesce``: calls that threads make to one node while two RPCs
        to it are in flight leave together as one Batch RPC when one answers
        (see ``_sync_coalesce``); other calls are the plain unary RPC.
        Results and errors stay per call."""
        self._coalesce = coalesce
        self._coalescers: dict[str, SyncCoalescer] = {}
        self._core = ClientCore(
            endpoints,
            timeout=timeout,
            max_attempts=max_attempts,
            client_id=client_id,
            routing=routing,
        )
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    # ---- properties ------------------------------------------------------

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
        """The live (thread-safe) route table, or ``None`` before the first map."""
        return self._core.table

    # ---- single-key operations --------------------------------------------

    def get(self, key: KeyLike, *, consistency: Consistency = "linearizable") -> GetResult | None:
        """The value of ``key``, or ``None`` when absent.

        ``consistency="linearizable"`` (default) reflects every write
        acknowledged before the call; ``"stale"`` may lag and says how far in
        the result's ``applied_index``.
        """
        op = self._core.get_op(to_key(key), parse_consistency(consistency))
        resp: pb.GetResponse = self._run(op)
        return get_result(resp)

    def set(
        self,
        key: KeyLike,
        value: KeyLike,
        *,
        ttl_ms: int | None = None,
        if_absent: bool = False,
        if_present: bool = False,
    ) -> bool:
        """Write ``value``; True when applied (False when the condition did not hold).

        ``ttl_ms``: expire after this many milliseconds (``None``: never).
        ``if_absent`` (NX) / ``if_present`` (XX): write only if the key is absent / present.
        """
        op = self._core.set_op(to_key(key), to_bytes(value, "value"), ttl_ms, if_absent, if_present)
        resp: pb.SetResponse = self._run(op)
        return resp.applied

    def delete(self, key: KeyLike) -> bool:
        """Delete ``key``; True when it existed."""
        resp: pb.DeleteResponse = self._run(self._core.delete_op(to_key(key)))
        return resp.deleted

    def cas(
        self,
        key: KeyLike,
        new: KeyLike,
        *,
        expected: KeyLike | None = None,
        expected_version: int | None = None,
        absent: bool = False,
        ttl_ms: int | None = None,
    ) -> CasResult:
        """Set ``key`` to ``new`` only if it holds ``expected`` (value), or is at
        ``expected_version``, or (``absent=True`` or ``expected_version=0``) does
        not exist.  Give exactly one of the three.  A retried cas applies once.
        """
        op = self._core.cas_op(
            to_key(key),
            to_bytes(new, "new value"),
            None if expected is None else to_bytes(expected, "expected value"),
            expected_version,
            absent,
            ttl_ms,
        )
        resp: pb.CompareAndSetResponse = self._run(op)
        return CasResult(
            succeeded=resp.succeeded,
            version=resp.version,
            current_value=resp.current_value if resp.current_found else None,
            current_version=resp.current_version,
        )

    def incr(self, key: KeyLike, delta: int = 1) -> int:
        """Add ``delta`` to the integer at ``key`` (absent counts as 0); returns the new value.

        A retried incr applies once.  Raises
        :class:`~cachenode._errors.FailedPrecondition` when the value is not an integer.
        """
        resp: pb.IncrResponse = self._run(self._core.incr_op(to_key(key), delta))
        return resp.value

    def ttl(self, key: KeyLike) -> int | None:
        """Remaining time to live in ms; ``-1`` when the key never expires; ``None`` when absent."""
        resp: pb.TtlResponse = self._run(self._core.ttl_op(to_key(key)))
        if not resp.found:
            return None
        return resp.ttl_ms if resp.ttl_ms >= 0 else -1

    # ---- multi-key operations --------------------------------------------

    def mget(self, keys: Iterable[K]) -> dict[K, GetResult | None]:
        """Read many keys at once: one linearizable ``MGet`` per shard, in parallel.

        Returns a dict keyed by the keys as given, ``None`` for absent ones.
        Each shard's slice is read atomically; different shards are read
        independently (not one snapshot of the whole cluster).
        """
        pairs = [(k, to_key(k)) for k in keys]
        if not pairs:
            return {}
        deadline = self._core.deadline()
        table = self._ensure_table(deadline)
        groups = [_Group(ks) for ks in table.group_keys([b for _, b in pairs]).values()]
        done = self._fan_out(
            groups, self._core.mget_op, table.group_keys, deadline, "mget", write=False
        )
        found: dict[bytes, GetResult | None] = {}
        for group in done:
            shard_id = table.shard_for_key(group.items[0]).id
            resp: pb.MGetResponse = group.response
            for key, item in zip(group.items, resp.items, strict=False):
                found[key] = mget_item(item, shard_id)
        return {k: found.get(b) for k, b in pairs}

    def mset(
        self,
        mapping_or_items: Mapping[Any, KeyLike] | Iterable[tuple[KeyLike, KeyLike]],
        ttl_ms: int | None = None,
    ) -> int:
        """Write many keys; returns how many were written.

        Atomic per shard only: the keys of one shard are written by one Raft
        entry (all or none), keys on different shards are independent writes
        sent in parallel.  If one shard fails, the others may still have been
        written; the error says how many shards failed.  A repeated key keeps
        its last value.
        """
        items = mset_items(mapping_or_items)
        if not items:
            return 0
        ttl = check_ttl(ttl_ms)
        deadline = self._core.deadline()
        table = self._ensure_table(deadline)
        groups = [_Group(kvs) for kvs in table.group_items(items).values()]
        done = self._fan_out(
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

    def cluster_map(self, *, refresh: bool = True) -> ClusterMap:
        """The cluster map; fetched from any reachable node when ``refresh`` (or not known yet)."""
        deadline = self._core.deadline()
        if refresh or self._core.table is None:
            self._refresh_map(deadline)
        return self._ensure_table(deadline).cluster_map

    def leaders(self) -> dict[ShardId, NodeId]:
        """Shard id -> leader node id as currently known (see :meth:`cluster_map`)."""
        table = self._core.table
        return table.leaders() if table is not None else {}

    def node_status(self, node: str) -> NodeStatus:
        """``Admin.GetNodeStatus`` of one node, given its id (from the map) or address.

        One attempt with the client's timeout; an unreachable node raises
        :class:`~cachenode._errors.Unavailable`.
        """
        address = node
        table = self._core.table
        if table is not None and table.address_of(node) is not None:
            address = table.address_of(node) or node
        try:
            resp = self._admin_stub(address).GetNodeStatus(
                pb.NodeStatusRequest(), timeout=self._core.timeout
            )
        except grpc.RpcError as err:
            raise classify(err, what="node status", target=f"node at {address}").error from None
        return node_status_from_wire(resp)

    def placement_driver(self, method: str, request: Any, what: str) -> Any:
        """Call ``Admin.<method>`` on the placement driver (the metadata
        group's leader), following leader hints from any node.  Returns the
        response message; raises a CacheError naming ``what`` on failure."""
        deadline = self._core.clock() + self._core.timeout
        queue = list(self._core.map_candidates())
        table = self._core.table
        if table is not None:
            queue += [n.address for n in table.cluster_map.nodes]
        tried: set[str] = set()
        last: CacheError | None = None
        while queue and self._core.clock() < deadline:
            address = queue.pop(0)
            if address in tried:
                continue
            tried.add(address)
            try:
                return getattr(self._admin_stub(address), method)(
                    request, timeout=max(0.05, deadline - self._core.clock())
                )
            except grpc.RpcError as err:
                failure = classify(err, what=what, target=f"node at {address}")
                last = failure.error
                if failure.leader_address:
                    queue.insert(0, failure.leader_address)
                elif failure.retry is not Retry.NODE_DOWN and not isinstance(last, NotLeader):
                    raise last from None
        raise last or Unavailable(f"{what}: no node answered; check the endpoints")

    # ---- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Close every channel and the fan-out threads.  Idempotent; thread-safe."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
            self._coalescers.clear()
            pool, self._pool = self._pool, None
        for channel in channels:
            channel.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CacheClient(endpoints={list(self._core.endpoints)!r}, routing={self._core.routing!r})"
        )

    # ---- internals -------------------------------------------------------

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise Unavailable("the client is closed; create a new CacheClient")
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS))
                self._channels[address] = channel
            return channel

    def _coalescer(self, address: str) -> SyncCoalescer:
        co = self._coalescers.get(address)  # the common case, without the lock
        if co is not None and not self._closed:
            return co
        channel = self._channel(address)
        with self._lock:
            if self._closed:
                raise Unavailable("the client is closed; create a new CacheClient")
            co = self._coalescers.get(address)
            if co is None:
                co = self._coalescers[address] = SyncCoalescer(pb_grpc.CacheStub(channel))
            return co

    def _cache_stub(self, address: str) -> pb_grpc.CacheStub:
        return pb_grpc.CacheStub(self._channel(address))

    def _admin_stub(self, address: str) -> pb_grpc.AdminStub:
        return pb_grpc.AdminStub(self._channel(address))

    def _refresh_map(self, deadline: float) -> RouteTable:
        """Fetch the map from the first node that answers; raises Unavailable if none does."""
        candidates = self._core.map_candidates()
        errors: list[str] = []
        for i, address in enumerate(candidates):
            remaining = deadline - self._core.clock()
            if remaining <= 0:
                errors.append(f"{address}: not tried, out of time")
                continue
            try:
                resp = self._admin_stub(address).GetClusterMap(
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

    def _ensure_table(self, deadline: float) -> RouteTable:
        table = self._core.table
        if table is not None:
            return table
        last: CacheError | None = None
        for attempt in range(self._core.max_attempts):
            try:
                return self._refresh_map(deadline)
            except Unavailable as err:
                last = err
            if deadline - self._core.clock() <= 0:
                break
            time.sleep(
                min(self._core.backoff(attempt), max(0.0, deadline - self._core.clock()) / 2)
            )
        assert last is not None
        raise last

    def _run(self, op: Op, deadline: float | None = None) -> Any:
        """Run one single-shard op with routing and retries; returns the response message."""
        return self._attempts(self._core.begin(op, deadline))

    def _attempts(self, state: CallState, delay: float = 0.0) -> Any:
        """The call's attempts until one answers, from after ``delay``; raises its final error."""
        op = state.op
        while True:
            if delay > 0:
                time.sleep(delay)
            delay = 0.0
            if state.need_map():
                try:
                    self._refresh_map(state.deadline)
                    state.map_refreshed()
                except Unavailable as err:
                    delay = state.map_failed(err)
                continue
            target = state.target()
            try:
                if self._coalesce and op.method in BATCH_FIELD:
                    return self._coalescer(target.address).call(
                        op.method, state.request(target), state.attempt_timeout()
                    )
                call = getattr(self._cache_stub(target.address), op.method)
                return call(state.request(target), timeout=state.attempt_timeout())
            except grpc.RpcError as rpc_err:
                delay = self._failed(state, rpc_err, target)

    def _failed(self, state: CallState, err: grpc.RpcError, target: Target) -> float:
        """An attempt failed: the backoff before the next, or raises the call's error."""
        if self._closed:
            raise closed_during(state.op) from None
        return state.failed(err, target)

    def _run_all(self, ops: list[Op], deadline: float) -> list[Any]:
        """Each op's response, or the ``CacheError``/``Regroup`` it ended
        with: the per-shard parts of one mget or mset.

        Their first attempts are queued on the nodes' coalescers in one go
        from this thread, so each node gets one Batch for all its parts; only
        a part whose first attempt fails goes on in :meth:`_attempts`, on the
        client's threads, as soon as that answer arrives.  Running every part
        on a thread of its own instead cost 5.5 ms of client CPU and 10.6 ms
        per 100-key mget over 16 shards (``docs/benchmarks-history.md``, *Session 15*)."""
        if len(ops) == 1:  # one part: the plain call, in this thread
            try:
                return [self._run(ops[0], deadline)]
            except (CacheError, Regroup) as err:
                return [err]
        results: list[Any] = [None] * len(ops)
        going_on: list[tuple[int, Future[Any]]] = []  # parts in _attempts on the pool

        def go_on(i: int, state: CallState, delay: float) -> None:
            try:
                going_on.append((i, self._executor().submit(self._attempts, state, delay)))
            except CacheError as err:  # the client was closed meanwhile
                results[i] = err
            except RuntimeError:  # ... while this submitted (its pool is shut down)
                results[i] = closed_during(state.op)

        queued: dict[SyncCoalescer, list[tuple[int, CallState, Target, str, Any, float]]] = {}
        for i, op in enumerate(ops):
            state = self._core.begin(op, deadline)
            if not self._coalesce or state.need_map() or op.method not in BATCH_FIELD:
                go_on(i, state, 0.0)
                continue
            try:
                target = state.target()
                co = self._coalescer(target.address)
                part = (i, state, target, op.method, state.request(target), state.attempt_timeout())
            except (CacheError, Regroup) as err:
                results[i] = err
                continue
            queued.setdefault(co, []).append(part)

        def settle(co: SyncCoalescer, i: int, state: CallState, target: Target, slot: Any) -> None:
            try:
                results[i] = co.result(slot)
            except grpc.RpcError as err:
                try:
                    go_on(i, state, self._failed(state, err, target))
                except (CacheError, Regroup) as e:
                    results[i] = e

        # Each part is settled as its answer arrives, so a failed one goes on
        # at once instead of waiting for its slower siblings.
        answered: queue.SimpleQueue[Any] = queue.SimpleQueue()
        waiting: dict[Any, tuple[SyncCoalescer, int, CallState, Target]] = {}
        for co, parts in queued.items():
            slots = co.start([(method, req, timeout) for _, _, _, method, req, timeout in parts], answered)
            for (i, state, target, _, _, _), slot in zip(parts, slots, strict=True):
                waiting[slot] = (co, i, state, target)
        until = max((slot.deadline for slot in waiting), default=0.0)
        while waiting:
            try:
                # The coalescers' clock is time.monotonic (their slots' deadlines).
                slot = answered.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                break
            entry = waiting.pop(slot, None)
            if entry is not None:
                settle(*entry, slot)
        for slot, (co, i, state, target) in waiting.items():  # past the deadline: result() expires them
            settle(co, i, state, target, slot)
        for i, fut in going_on:
            try:
                results[i] = fut.result()
            except (CacheError, Regroup) as err:
                results[i] = err
            except CancelledError:  # close() cancelled it before it ran
                results[i] = closed_during(ops[i])
        return results

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise Unavailable("the client is closed; create a new CacheClient")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=MAX_FANOUT_THREADS, thread_name_prefix="cachenode-client"
                )
            return self._pool

    def _fan_out(
        self,
        groups: list[_Group[X]],
        make_op: Callable[[list[X]], Op],
        regroup: Callable[[list[X]], dict[ShardId, list[X]]],
        deadline: float,
        what: str,
        *,
        write: bool,
    ) -> list[_Group[X]]:
        """Run one op per group in parallel; re-split groups whose keys moved shards."""
        total = len(groups)
        done: list[_Group[X]] = []
        pending = groups
        for _ in range(MAX_REGROUPS + 1):
            if not pending:
                break
            results = self._run_all([make_op(g.items) for g in pending], deadline)
            outcomes = list(zip(pending, results, strict=True))
            pending = []
            errors: list[CacheError] = []
            for group, result in outcomes:
                if isinstance(result, Regroup):
                    pending += [_Group(items) for items in regroup(group.items).values()]
                elif isinstance(result, CacheError):
                    errors.append(result)
                else:
                    group.response = result
                    done.append(group)
            if errors:
                raise partial_failure(errors[0], what, len(errors), total, write) from None
        if pending:
            raise Unavailable(f"{what}: the shard layout kept changing; retry")
        return done
