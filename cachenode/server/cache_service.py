"""The Cache gRPC service: thin handlers over ReplicaManager.

Every single-key operation is split in two phases:

* ``start``: validate, find the shard, and either begin the work here (this
  node leads the shard: propose the command, or join the read barrier) or
  hand the request to the forwarder;
* ``finish`` (the returned thunk): wait for the outcome and build the reply
  (for a call passed on to a shard with no leader yet: wait for one, see
  :meth:`CacheService._forwarded`).

A unary call runs both phases back to back.  ``Batch`` starts every op
first and only then waits, so one Raft round trip (and one fsync) serves
the whole batch.  All errors leave through :func:`status.abort` (unary) or
an ``OpError`` (batch).  Runs on gRPC worker threads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, ClassVar, TypeVar, cast

import grpc

from .._clock import Clock
from .._errors import (
    CacheError,
    EpochMismatch,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotLeader,
    OutcomeUnknown,
    Overloaded,
    Unavailable,
)
from .._types import STREAM_ACCEPTED, ShardDescriptor
from ..fsm import commands as C
from ..fsm.codec import decode_result, encode_command, encode_multi, split_multi_result
from ..fsm.machine import REUSED_REQUEST_ID_HINT, read_get, ttl_remaining_ms
from ..raft.group import RaftGroup
from ..storage.base import Record, StateReader
from ..v1 import cache_pb2 as pb
from ..v1 import cache_pb2_grpc
from . import validation as V
from .config import NodeConfig
from .disk_space import DiskSpace
from .forwarding import ForwardedError, Forwarder, error_from_kind
from .replicas import ReplicaManager, wait_future
from .status import ERROR_KEY, abort, error_metadata, status_code

log = logging.getLogger(__name__)
R = TypeVar("R")

FORWARD_FLOOR_S = 0.5
"""The time the waiting for a leader leaves before the call's deadline, so
that a last try normally finishes: one that ran out in flight would turn a
clean "not applied" into "outcome unknown" (the leader itself gives a
forwarded call 95 % of what is left, less 20 ms)."""
Finish = Callable[[], Any]


def _no_leader(e: Exception) -> bool:
    """A forward's failure that means "no leader took it, not applied"."""
    if isinstance(e, ForwardedError):
        return dict(e.metadata).get(ERROR_KEY) == Unavailable.kind
    return isinstance(e, Unavailable)


def _raise_error_result(res: C.Result) -> None:
    if isinstance(res, C.ErrorResult):
        raise error_from_kind(res.kind, res.message)


class _EntryCollector:
    """Gathers the writes of one Batch per leader group, so each group gets
    ONE Raft entry (a multi-command entry) instead of one per op.

    Used by one gRPC thread: ``add`` while starting ops, ``propose_all``
    once, then each op's finish thunk calls the waiter ``add`` returned."""

    def __init__(self, replicas: ReplicaManager) -> None:
        self._r = replicas
        self._groups: dict[int, _GroupEntry] = {}

    def add(self, g: RaftGroup, payload: bytes) -> Callable[[float], bytes]:
        entry = self._groups.get(g.group_id)
        if entry is None:
            entry = self._groups[g.group_id] = _GroupEntry(g)
        pos = len(entry.payloads)
        entry.payloads.append(payload)
        return lambda deadline: entry.result(pos, deadline)

    def propose_all(self) -> None:
        for entry in self._groups.values():
            p = entry.payloads
            try:
                entry.fut = self._r.start_proposal(entry.group, p[0] if len(p) == 1 else encode_multi(p))
            except CacheError as e:
                entry.error = e


class _GroupEntry:
    __slots__ = ("group", "payloads", "fut", "error", "_split")

    def __init__(self, group: RaftGroup) -> None:
        self.group = group
        self.payloads: list[bytes] = []
        self.fut: Future[bytes] | None = None
        self.error: CacheError | None = None
        self._split: list[bytes] | None = None

    def result(self, pos: int, deadline: float) -> bytes:
        if self.error is not None:
            raise self.error
        assert self.fut is not None, "propose_all() was not called"
        if self._split is None:
            self._split = split_multi_result(wait_future(self.fut, deadline, writes=True), len(self.payloads))
        return self._split[pos]


class _ClockProbe:
    """A StateReader view for one ReadIndex read: ``clock`` is the applied
    state's replicated clock; ``ambiguous`` turns true when a record read
    has a TTL that clock has not passed (gRPC thread, one read)."""

    __slots__ = ("_reader", "clock", "ambiguous")

    def __init__(self, reader: StateReader) -> None:
        self._reader = reader
        self.clock = reader.clock_ms()
        self.ambiguous = False

    def get(self, key: bytes) -> Record | None:
        rec = self._reader.get(key)
        if rec is not None and rec.expires_at_ms > self.clock:
            self.ambiguous = True
        return rec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


class CacheService(cache_pb2_grpc.CacheServicer):
    def __init__(self, cfg: NodeConfig, replicas: ReplicaManager, forwarder: Forwarder, clock: Clock,
                 disk: DiskSpace) -> None:
        self.cfg = cfg
        self.r = replicas
        self.fwd = forwarder
        self.clock = clock
        self.disk = disk
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fanout")
        # Each open BatchStream holds a gRPC worker thread for its lifetime:
        # at most half of them, so unary calls always find a thread.
        self.max_streams = max(1, cfg.grpc_workers // 2)
        self._stream_slots = threading.BoundedSemaphore(self.max_streams)
        # Calls that wait for a shard's leader (_forwarded): a quarter of the
        # worker threads, so the rest serve the calls that end the wait.
        self.max_waiters = max(1, cfg.grpc_workers // 4)
        self._waiters = threading.BoundedSemaphore(self.max_waiters)

    # ---- plumbing -------------------------------------------------------------

    def _deadline(self, ctx: grpc.ServicerContext) -> float:
        return self._deadline_in(ctx.time_remaining())

    def _deadline_in(self, remaining: float | None) -> float:
        if remaining is None or remaining > self.cfg.default_deadline_s * 4:
            remaining = self.cfg.default_deadline_s
        # Finish a little before the caller's deadline so the caller gets our
        # precise answer (e.g. "outcome unknown") rather than its own timeout.
        return time.monotonic() + max(0.0, remaining * 0.95 - 0.02)

    def _serve(self, ctx: grpc.ServicerContext, fn: Callable[[float], R]) -> R:
        try:
            return fn(self._deadline(ctx))
        except CacheError as e:
            abort(ctx, e)
        except ForwardedError as fwd:
            ctx.set_trailing_metadata(fwd.metadata)
            ctx.abort(fwd.code, fwd.details)
        except Exception as bug:  # a bug: report it precisely, never a hung call
            log.exception("internal error")
            abort(ctx, Internal(f"internal error: {type(bug).__name__}: {bug}"))
        raise AssertionError("unreachable")

    def _unary(self, ctx: grpc.ServicerContext, start: Callable[[Any, float], Finish], req: Any) -> Any:
        return self._serve(ctx, lambda deadline: start(req, deadline)())

    def _shard(self, key: bytes, header: pb.RequestHeader) -> ShardDescriptor:
        s = self.r.shard_for_key(key)
        _check_epoch(s, header.shard_epoch)
        return s

    def _by_shard(self, keys: list[bytes], header: pb.RequestHeader) -> dict[int, tuple[ShardDescriptor, list[int]]]:
        """The positions of ``keys`` per shard, in order of first appearance.
        One look at the map and at the header for all keys; the epoch is
        checked once per shard, as :meth:`_shard` would for each key (routing
        key by key was a tenth of a leader's CPU in 100-key msets)."""
        m = self.r.cluster_map()
        by_shard: dict[int, tuple[ShardDescriptor, list[int]]] = {}
        for i, k in enumerate(keys):
            s = m.shard_for_key(k)
            part = by_shard.get(s.id)
            if part is None:
                part = by_shard[s.id] = (s, [])
            part[1].append(i)
        epoch = header.shard_epoch
        if epoch:
            for s, _ in by_shard.values():
                _check_epoch(s, epoch)
        return by_shard

    def _now(self, gid: int) -> int:
        return self.clock.wall_ms() if self.cfg.unsafe.local_ttl else self.r.cluster_now(gid)

    def _forward(self, method: str, req: Any, shard: ShardDescriptor, hint: NotLeader, deadline: float, write: bool,
                 restart: Callable[[float], Finish], give_up: float | None) -> Finish:
        """``req``: the request to forward, or a function building it (the
        per-shard parts of MGet/MSet are built only when forwarded).
        ``restart(give_up)``: the operation's start again, for when this
        node has become the shard's leader while the call waited for one.
        ``give_up``: when waiting for a leader ends (None: from now; a
        restarted operation keeps the one it had)."""
        if callable(req):
            req = req()
        if req.header.no_forward:
            raise hint
        fut = self._try_forward(method, req, shard, hint.leader_address, deadline, write)
        if give_up is None:
            give_up = min(time.monotonic() + self.cfg.leader_wait_s, deadline - FORWARD_FLOOR_S)
        # A partial, not a nested function (see _start_write).
        return functools.partial(self._forwarded, method, req, shard, deadline, write, fut, give_up, restart)

    def _try_forward(self, method: str, req: Any, shard: ShardDescriptor, first: str | None, deadline: float,
                     write: bool) -> Future[Any]:
        """One try on the fanout pool: ``first`` (the leader this node
        knows), then the shard's replicas."""
        m = self.r.cluster_map()
        targets = [first] if first else []
        for nid in shard.replicas:
            n = m.node(nid)
            if n is not None:
                targets.append(n.address)
        return self._pool.submit(self.fwd.forward, method, req, targets, deadline, write)

    def _forwarded(self, method: str, req: Any, shard: ShardDescriptor, deadline: float, write: bool,
                   fut: Future[Any], give_up: float, restart: Callable[[float], Finish]) -> Any:
        """The forwarded call's answer (the caller's thread: a gRPC worker).

        While the shard has no leader to take the call (an election after
        the leader died, a leadership transfer, a leader that lost its
        quorum), ask again: each such answer means not applied (nobody
        reachable, NOT_LEADER, or the ``unavailable`` kind, which the leader
        gives only for a command it never appended), so asking again cannot
        apply a write twice.  Anything else, "outcome unknown" above all,
        goes to the caller at once.

        The pauses double from 20 ms to 200 ms; each try goes first to the
        leader this node knows by then, or, once this node leads the shard,
        runs the operation here (``restart``; never a call to its own port,
        which would need a second worker thread).  The waiting ends at
        ``give_up``: ``cfg.leader_wait_s`` after the operation started (the
        ops of a Batch and the parts of an MSet or MGet start together, so
        they wait together; a restart keeps it too), and
        ``FORWARD_FLOOR_S`` before the deadline so that a last try normally
        has time to finish.  At most ``max_waiters`` calls wait at once; a
        call past that gets the UNAVAILABLE at once, so waiting calls never
        take every worker thread from the calls that would end the wait."""
        pause = 0.02
        waiting = False
        try:
            while True:
                try:
                    return self._answer(fut, deadline, write)
                except (Unavailable, ForwardedError) as e:
                    if not _no_leader(e) or time.monotonic() + pause > give_up:
                        raise
                    if not waiting:
                        waiting = self._waiters.acquire(blocking=False)
                        if not waiting:
                            raise
                time.sleep(pause)
                pause = min(2 * pause, 0.2)
                with contextlib.suppress(CacheError):
                    shard = self.r.descriptor(shard.id)  # its replicas may have moved meanwhile
                try:
                    self.r.leader_group(shard.id)
                except NotLeader as hint:
                    first = hint.leader_address
                else:
                    _check_epoch(shard, req.header.shard_epoch)
                    self._waiters.release()  # a restart that has to wait again takes a slot of its own
                    waiting = False
                    return restart(give_up)()
                fut = self._try_forward(method, req, shard, first, deadline, write)
        finally:
            if waiting:
                self._waiters.release()

    def _answer(self, fut: Future[Any], deadline: float, write: bool) -> Any:
        """A forward's result, or, at the deadline, what is known about it."""
        try:
            return fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            if fut.cancel():
                raise Unavailable("the node had no thread free to pass the call on before its deadline; retry") from None
            if write:
                raise OutcomeUnknown("the deadline passed while the forwarded write was in flight; "
                                     "outcome unknown; retry with the same request id") from None
            raise Unavailable("the deadline passed while waiting for the shard leader; retry") from None

    # ---- phase 1 of reads -----------------------------------------------------------

    def _start_read(self, method: str, req: Any, key: bytes, deadline: float,
                    build: Callable[[ShardDescriptor, int, StateReader], Any],
                    header: pb.RequestHeader | None = None, give_up: float | None = None) -> Finish:
        """Begin a read of ``key``; ``build(shard, clock, reader)`` makes the reply.
        ``req`` is what a forward sends (a request, or a function building
        it: then ``header`` is its header); ``give_up``: see :meth:`_forward`.

        A linearizable read on the leader joins a ReadIndex round (no log
        entry) and is judged at the replicated clock of the applied state.
        If it meets a record whose TTL that clock has not yet passed, it is
        redone after a barrier entry, whose stamped time every later leader
        keeps: a key seen expired never comes back."""
        key = V.check_key(key, self.cfg.max_key_bytes)
        if header is None:
            header = req.header
        shard = self._shard(key, header)
        consistency = V.consistency(header)
        has_local = self.r.has_replica(shard.id)
        if consistency == V.LINEARIZABLE and self.cfg.unsafe.local_reads and has_local:
            consistency = V.STALE  # UNSAFE: no barrier, no forwarding
        if consistency == V.STALE and has_local:
            def stale() -> Any:
                with self.r.view(shard.id) as reader:  # one consistent state
                    if not reader.installing():
                        clock = self.clock.wall_ms() if self.cfg.unsafe.local_ttl else reader.clock_ms()
                        return build(shard, clock, reader)
                # This replica is loading a snapshot from its leader: its
                # state is part old, part new.  The leader answers instead.
                try:
                    self.r.leader_group(shard.id)
                except NotLeader as e:
                    restart = functools.partial(self._start_read, method, req, key, deadline, build, header)
                    return self._forward(method, req, shard, e, deadline, False, restart, give_up)()
                raise Unavailable(f"shard {shard.id}'s replica here is loading a snapshot; retry")

            return stale
        try:
            g = self.r.leader_group(shard.id)
        except NotLeader as e:
            restart = functools.partial(self._start_read, method, req, key, deadline, build, header)
            return self._forward(method, req, shard, e, deadline, False, restart, give_up)
        fut = g.read_index()

        def finish() -> Any:
            self.r.await_read_index(fut, deadline)
            reader = self.r.reader(shard.id)
            if self.cfg.unsafe.local_ttl:
                return build(shard, self.clock.wall_ms(), reader)
            probe = _ClockProbe(reader)
            reply = build(shard, probe.clock, cast(StateReader, probe))
            if not probe.ambiguous:
                return reply
            # A record with a TTL not yet past at the replicated clock: its
            # liveness and remaining TTL depend on the cluster time, which
            # only a barrier entry fixes for every later leader too.
            clock = self.r.barrier_clock(g, g.read_barrier(), deadline)
            return build(shard, clock, reader)

        return finish

    def _meta(self, shard: ShardDescriptor, reader: StateReader) -> pb.ReadMeta:
        return pb.ReadMeta(shard_id=shard.id, applied_index=reader.applied_index(), served_by=self.cfg.node_id)

    def _start_get(self, req: pb.GetRequest, deadline: float) -> Finish:
        def build(shard: ShardDescriptor, clock: int, reader: StateReader) -> pb.GetResponse:
            meta = self._meta(shard, reader)
            rec = read_get(reader, req.key, clock)
            if rec is None:
                return pb.GetResponse(found=False, ttl_ms=-1, meta=meta)
            return pb.GetResponse(found=True, value=rec.value, version=rec.version,
                                  ttl_ms=ttl_remaining_ms(rec, clock), meta=meta)

        return self._start_read("Get", req, req.key, deadline, build)

    def _start_ttl(self, req: pb.TtlRequest, deadline: float) -> Finish:
        def build(shard: ShardDescriptor, clock: int, reader: StateReader) -> pb.TtlResponse:
            meta = self._meta(shard, reader)
            rec = read_get(reader, req.key, clock)
            if rec is None:
                return pb.TtlResponse(found=False, ttl_ms=-1, meta=meta)
            return pb.TtlResponse(found=True, ttl_ms=ttl_remaining_ms(rec, clock), meta=meta)

        return self._start_read("Ttl", req, req.key, deadline, build)

    # ---- phase 1 of writes ------------------------------------------------------------

    def _start_write(self, method: str, req: Any, shard: ShardDescriptor, deadline: float,
                     make: Callable[[int], C.Command], reply: Callable[[C.Result], Any],
                     collector: _EntryCollector | None = None, give_up: float | None = None,
                     disk_judged: bool = False) -> Finish:
        """Begin a write on ``shard``: propose ``make(now)`` here (joining the
        Batch's entry through ``collector``) or forward ``req`` (a request,
        or a function building it) to the leader; ``give_up``: see
        :meth:`_forward`.  A leader whose disk is below its reserve refuses
        the writes that add data here, before proposing them, and so does
        one with a replica on a node that said it is (the leader decides: a
        forwarded write is judged where it is proposed),
        unless its request id was answered before (a retry gets the first
        answer); ``disk_judged``: the caller did that for the whole request."""
        try:
            g = self.r.leader_group(shard.id)
        except NotLeader as e:
            # Restarted here once this node leads, outside any Batch's entry
            # (its collector has proposed by then): collector None.
            restart = functools.partial(self._start_write, method, req, shard, deadline, make, reply, None,
                                        disk_judged=disk_judged)
            return self._forward(method, req, shard, e, deadline, True, restart, give_up)
        cmd = make(self._now(shard.id))
        if self.disk.blocked and method in _ADDS_DATA and not disk_judged:
            self._judge_disks(g, shard.id, _rid_of(cmd))
        payload = encode_command(cmd)
        wait: Callable[[float], bytes]
        if collector is not None:
            wait = collector.add(g, payload)
        else:
            # A partial, not a nested function: ``finish`` below refers to
            # ``wait``, and a compiled nested function that another one refers
            # to is kept in the scope it closes over (a reference cycle).
            wait = functools.partial(wait_future, self.r.start_proposal(g, payload), writes=True)

        def finish() -> Any:
            res = decode_result(wait(deadline))
            _raise_error_result(res)
            return reply(res)

        return finish

    def _judge_disks(self, g: RaftGroup, gid: int, rid: C.RequestId | None) -> None:
        """Raise DiskFull for a write that adds data to shard ``gid``, led
        here by ``g``, while this node or a node with one of its replicas is
        below its disk reserve, unless request id ``rid`` was answered
        before (a retry gets its first answer)."""
        refused = self.disk.refusal_for(gid, g.status.members)
        if refused is not None and not self._answered(gid, rid):
            raise refused

    def _answered(self, gid: int, rid: C.RequestId | None) -> bool:
        """Has this shard's replica here applied a write with request id
        ``rid``?  (Its dedup record answers the retry.)"""
        return rid is not None and self.r.reader(gid).answered(rid.client_id, rid.seq)

    def _start_set(self, req: pb.SetRequest, deadline: float, collector: _EntryCollector | None = None) -> Finish:
        key = V.check_key(req.key, self.cfg.max_key_bytes)
        value = V.check_value(req.value, self.cfg.max_value_bytes)
        ttl = V.check_ttl(req.ttl_ms)
        if req.condition not in (pb.ALWAYS, pb.IF_ABSENT, pb.IF_PRESENT):
            raise InvalidArgument(f"unknown set condition {req.condition}")
        rid = V.request_id(req.header)
        shard = self._shard(key, req.header)

        def reply(res: C.Result) -> pb.SetResponse:
            if not isinstance(res, C.SetResult):
                raise _answered_another(res, "set")
            return pb.SetResponse(applied=res.applied, version=res.version)

        return self._start_write("Set", req, shard, deadline, lambda now: C.Set(
            key=key, value=value, expires_at_ms=now + ttl if ttl else 0,
            condition=int(req.condition), now_ms=now, rid=rid), reply, collector)

    def _start_delete(self, req: pb.DeleteRequest, deadline: float, collector: _EntryCollector | None = None) -> Finish:
        key = V.check_key(req.key, self.cfg.max_key_bytes)
        rid = V.request_id(req.header)
        shard = self._shard(key, req.header)

        def reply(res: C.Result) -> pb.DeleteResponse:
            if not isinstance(res, C.DeleteResult):
                raise _answered_another(res, "delete")
            return pb.DeleteResponse(deleted=res.deleted, version=res.version)

        return self._start_write("Delete", req, shard, deadline, lambda now: C.Delete(key=key, now_ms=now, rid=rid), reply, collector)

    def _start_cas(self, req: pb.CompareAndSetRequest, deadline: float, collector: _EntryCollector | None = None) -> Finish:
        key = V.check_key(req.key, self.cfg.max_key_bytes)
        new = V.check_value(req.new_value, self.cfg.max_value_bytes)
        ttl = V.check_ttl(req.ttl_ms)
        which = req.WhichOneof("expected")
        ev: bytes | None = None
        ever: int | None = None
        absent = False
        if which == "expected_value":
            ev = V.check_value(req.expected_value, self.cfg.max_value_bytes)
        elif which == "expected_version":
            ever = int(req.expected_version)
        elif req.expect_absent:
            absent = True
        else:
            raise InvalidArgument("compare-and-set needs expected_value, expected_version or expect_absent")
        rid = V.request_id(req.header)
        shard = self._shard(key, req.header)

        def reply(res: C.Result) -> pb.CompareAndSetResponse:
            if not isinstance(res, C.CasResult):
                raise _answered_another(res, "compare-and-set")
            return pb.CompareAndSetResponse(
                succeeded=res.succeeded, version=res.version, current_found=res.current_found,
                current_value=res.current_value or b"", current_version=res.current_version,
            )

        return self._start_write("CompareAndSet", req, shard, deadline, lambda now: C.CompareAndSet(
            key=key, expected_value=ev, expected_version=ever, expect_absent=absent,
            new_value=new, expires_at_ms=now + ttl if ttl else 0, now_ms=now, rid=rid), reply, collector)

    def _start_incr(self, req: pb.IncrRequest, deadline: float, collector: _EntryCollector | None = None) -> Finish:
        key = V.check_key(req.key, self.cfg.max_key_bytes)
        rid = V.request_id(req.header)
        shard = self._shard(key, req.header)

        def reply(res: C.Result) -> pb.IncrResponse:
            if not isinstance(res, C.IncrResult):
                raise _answered_another(res, "incr")
            return pb.IncrResponse(value=res.value, version=res.version)

        return self._start_write("Incr", req, shard, deadline,
                                 lambda now: C.Incr(key=key, delta=int(req.delta), now_ms=now, rid=rid), reply, collector)

    # ---- unary RPCs ---------------------------------------------------------------------

    def Get(self, req: pb.GetRequest, ctx: grpc.ServicerContext) -> pb.GetResponse:
        return self._unary(ctx, self._start_get, req)  # type: ignore[no-any-return]

    def Ttl(self, req: pb.TtlRequest, ctx: grpc.ServicerContext) -> pb.TtlResponse:
        return self._unary(ctx, self._start_ttl, req)  # type: ignore[no-any-return]

    def Set(self, req: pb.SetRequest, ctx: grpc.ServicerContext) -> pb.SetResponse:
        return self._unary(ctx, self._start_set, req)  # type: ignore[no-any-return]

    def Delete(self, req: pb.DeleteRequest, ctx: grpc.ServicerContext) -> pb.DeleteResponse:
        return self._unary(ctx, self._start_delete, req)  # type: ignore[no-any-return]

    def CompareAndSet(self, req: pb.CompareAndSetRequest, ctx: grpc.ServicerContext) -> pb.CompareAndSetResponse:
        return self._unary(ctx, self._start_cas, req)  # type: ignore[no-any-return]

    def Incr(self, req: pb.IncrRequest, ctx: grpc.ServicerContext) -> pb.IncrResponse:
        return self._unary(ctx, self._start_incr, req)  # type: ignore[no-any-return]

    # ---- Batch ------------------------------------------------------------------------------

    _BATCH_WRITES: ClassVar[frozenset[str]] = frozenset({"set", "delete", "cas", "incr", "mset"})
    _BATCH_START: ClassVar[dict[str, str]] = {
        "get": "_start_get", "set": "_start_set", "delete": "_start_delete",
        "cas": "_start_cas", "incr": "_start_incr", "ttl": "_start_ttl",
        "mget": "_start_mget", "mset": "_start_mset",
    }

    def Batch(self, req: pb.BatchRequest, ctx: grpc.ServicerContext) -> pb.BatchResponse:
        return self._serve(ctx, lambda deadline: self._run_batch(req, deadline))

    def BatchStream(self, requests: Iterator[pb.BatchRequest], ctx: grpc.ServicerContext) -> Iterator[pb.BatchResponse]:
        """One response per request, in order, on this worker thread for the
        stream's lifetime.  Refused (RESOURCE_EXHAUSTED, before any request is
        read) when ``max_streams`` are open; accepted streams get their
        headers at once, which is what the client waits for before writing.
        A batch-level failure is the response's ``error``; the stream goes on."""
        if not self._stream_slots.acquire(blocking=False):
            abort(ctx, Overloaded(
                f"this node already serves {self.max_streams} Batch streams; use unary Batch calls"))
        # The slot is given back when the RPC ends, however it ends (also
        # when it is cancelled before its generator ever runs).
        if not ctx.add_callback(self._stream_slots.release):
            self._stream_slots.release()  # it had already ended
        ctx.send_initial_metadata(((STREAM_ACCEPTED, "1"),))  # the client may now write
        return self._batch_stream(requests)

    def _batch_stream(self, requests: Iterator[pb.BatchRequest]) -> Iterator[pb.BatchResponse]:
        for req in requests:
            deadline = self._deadline_in(req.timeout_ms / 1000 if req.timeout_ms else None)
            try:
                yield self._run_batch(req, deadline)
            except (CacheError, ForwardedError) as e:
                yield pb.BatchResponse(error=_op_error(e))
            except Exception as bug:  # a bug: report it precisely, keep the stream
                log.exception("internal error")
                yield pb.BatchResponse(error=_op_error(Internal(f"internal error: {type(bug).__name__}: {bug}")))

    def _run_batch(self, req: pb.BatchRequest, deadline: float) -> pb.BatchResponse:
        V.check_batch(sum(len(op.mset.items) if op.HasField("mset") else len(op.mget.keys)
                          if op.HasField("mget") else 1 for op in req.ops), self.cfg.max_batch_keys)
        started: list[tuple[str, Finish | CacheError | ForwardedError]] = []
        collector = _EntryCollector(self.r)
        for op in req.ops:
            which: str | None = op.WhichOneof("op")
            if which is None:
                started.append(("", InvalidArgument("batch op names no operation")))
                continue
            start = getattr(self, self._BATCH_START[which])
            try:
                if which in self._BATCH_WRITES:
                    started.append((which, start(getattr(op, which), deadline, collector)))
                else:
                    started.append((which, start(getattr(op, which), deadline)))
            except (CacheError, ForwardedError) as e:
                started.append((which, e))
        collector.propose_all()
        # Built in place: BatchResult(**{which: msg}) and then the response
        # from those results copied each answer twice (protobuf's copy is a
        # serialize and a parse): a third of the node's protobuf time in mget.
        resp = pb.BatchResponse()
        add = resp.results.add
        for which, item in started:
            result = add()
            if not callable(item):
                result.error.CopyFrom(_op_error(item))
                continue
            try:
                msg = item()
            except (CacheError, ForwardedError) as e:
                result.error.CopyFrom(_op_error(e))
                continue
            getattr(result, which).CopyFrom(msg)
        return resp

    # ---- multi-key ---------------------------------------------------------------------------

    def _start_mget(self, req: pb.MGetRequest, deadline: float) -> Finish:
        """Start a linearizable (or stale) read of every shard the keys touch
        at once; the finish thunk waits for all and answers in key order."""
        V.check_batch(len(req.keys), self.cfg.max_batch_keys)
        max_key = self.cfg.max_key_bytes
        keys = [V.check_key(k, max_key) for k in req.keys]
        V.consistency(req.header)
        parts = [self._start_mget_part(req, [keys[i] for i in pos], deadline)
                 for _, pos in self._by_shard(keys, req.header).values()]
        # One shard (the smart client's parts): already in key order.
        return parts[0] if len(parts) == 1 else _MGetMerge(parts, keys)

    def _start_mget_part(self, req: pb.MGetRequest, ks: list[bytes], deadline: float) -> Finish:
        """One shard's part of an MGet (its keys in request order)."""

        def build(shard: ShardDescriptor, clock: int, reader: StateReader) -> pb.MGetResponse:
            # Items added in place: building MGetItem messages and then
            # the response from them copies each item once more.
            resp = pb.MGetResponse()
            add = resp.items.add
            for k in ks:
                rec = read_get(reader, k, clock)
                if rec is None:
                    add(key=k, found=False, ttl_ms=-1)
                else:
                    add(key=k, found=True, value=rec.value, version=rec.version,
                        ttl_ms=ttl_remaining_ms(rec, clock))
            return resp

        return self._start_read("MGet", lambda: pb.MGetRequest(header=req.header, keys=ks), ks[0], deadline, build, req.header)

    def _start_mset(self, req: pb.MSetRequest, deadline: float, collector: _EntryCollector | None = None) -> Finish:
        """Start one write per shard the items touch (atomic per shard); with
        a ``collector`` each joins its shard's one entry of the Batch."""
        V.check_batch(len(req.items), self.cfg.max_batch_keys)
        max_key, max_value = self.cfg.max_key_bytes, self.cfg.max_value_bytes
        items = []
        keys = []
        for it in req.items:
            k = V.check_key(it.key, max_key)
            items.append((k, V.check_value(it.value, max_value), V.check_ttl(it.ttl_ms)))
            keys.append(k)
        rid = V.request_id(req.header)
        by_shard = self._by_shard(keys, req.header)
        judged = len(by_shard) > 1
        if judged and self.disk.blocked:
            # Judged once for every part, and refused whole before any part
            # is proposed: part by part, a disk could be found full after
            # the parts before had begun.  A retry (its id answered on a
            # shard led here) is let through, as in _start_write.
            for s, _ in by_shard.values():
                g = self.r.local_group(s.id)
                if g is not None and g.is_leader:
                    self._judge_disks(g, s.id, rid)
        parts = [self._start_mset_part(req, s, [items[i] for i in pos], rid, deadline, collector, judged)
                 for s, pos in by_shard.values()]
        return _MSetSum(parts, [s.id for s, _ in by_shard.values()])

    def _start_mset_part(self, req: pb.MSetRequest, shard: ShardDescriptor, its: list[tuple[bytes, bytes, int]],
                         rid: C.RequestId | None, deadline: float, collector: _EntryCollector | None,
                         disk_judged: bool) -> Finish:
        """One shard's part of an MSet: its own entry (or a share of the Batch's)."""

        def sub() -> pb.MSetRequest:
            return pb.MSetRequest(header=req.header, items=[pb.KeyValue(key=k, value=v, ttl_ms=t) for k, v, t in its])

        return self._start_write("MSet", sub, shard, deadline, lambda now: C.MSet(
            items=tuple((k, v, now + t if t else 0) for k, v, t in its), now_ms=now, rid=rid), _mset_reply, collector,
            disk_judged=disk_judged)

    def MGet(self, req: pb.MGetRequest, ctx: grpc.ServicerContext) -> pb.MGetResponse:
        return self._unary(ctx, self._start_mget, req)  # type: ignore[no-any-return]

    def MSet(self, req: pb.MSetRequest, ctx: grpc.ServicerContext) -> pb.MSetResponse:
        return self._unary(ctx, self._start_mset, req)  # type: ignore[no-any-return]


# The finish thunks of multi-shard requests are small classes, not closures,
# and no closure here refers to another nested function.  A compiled (mypyc)
# closure holds its enclosing function's whole environment, which keeps the
# variables nested functions use and the nested functions other nested
# functions refer to; so a closure over the parts (whose thunks reach that
# environment again), or one calling a sibling, made a reference cycle per
# request.  Only the cyclic collector frees those: 7-8 % of a node's CPU in
# 100-key msets, in pauses of 10-50 ms that hold the GIL.
# tests/test_cache_service_garbage.py keeps it so.


def _rid_of(cmd: C.Command) -> C.RequestId | None:
    return cmd.rid if isinstance(cmd, (C.Set, C.Delete, C.CompareAndSet, C.Incr, C.MSet)) else None


_ADDS_DATA = frozenset(("Set", "CompareAndSet", "Incr", "MSet"))
"""The writes a leader refuses while a disk of the shard's replicas is below its reserve (all but Delete)."""


def _answered_another(res: C.Result, what: str) -> FailedPrecondition:
    """A write answered with another kind of result: its request id has a
    dedup record from before fingerprints (``fsm/machine.py``), written by
    a different request that reused the id.  Newer records refuse such a
    reuse in the state machine itself."""
    return FailedPrecondition(
        f"this {what}'s request id was already used on its shard for a different request, which "
        f"it answered ({type(res).__name__}); nothing was applied on that shard. {REUSED_REQUEST_ID_HINT}"
    )


def _mset_reply(res: C.Result) -> pb.MSetResponse:
    if not isinstance(res, C.MSetResult):
        raise _answered_another(res, "mset")
    return pb.MSetResponse(count=res.count, versions=[res.version])


class _MSetSum:
    """Finish of an MSet: waits for every shard's part; counts and versions
    summed.  When a part failed after others were applied, the error (the
    first failing part's kind and code) says which shards applied theirs:
    an MSet is atomic per shard, not across shards."""

    __slots__ = ("parts", "shards")

    def __init__(self, parts: list[Finish], shards: list[int]) -> None:
        self.parts = parts
        self.shards = shards

    def __call__(self) -> pb.MSetResponse:
        count, versions = 0, []
        applied: list[int] = []
        failed: tuple[int, CacheError | ForwardedError] | None = None
        for shard, part in zip(self.shards, self.parts, strict=True):
            try:
                r = part()  # ours or forwarded: an MSetResponse either way
            except (CacheError, ForwardedError) as e:
                failed = failed or (shard, e)
                continue
            applied.append(shard)
            count += int(r.count)
            versions.extend(r.versions[:1])
        if failed is None:
            return pb.MSetResponse(count=count, versions=versions)
        shard, err = failed
        if not applied:
            raise err
        said = (f"this mset was applied in part: shard{'s' if len(applied) > 1 else ''} "
                f"{', '.join(map(str, applied))} wrote {count} of its keys (an mset is atomic per shard, "
                f"not across shards); the part on shard {shard} failed: ")
        if isinstance(err, ForwardedError):
            raise ForwardedError(err.code, said + err.details, err.metadata)
        partly = type(err)(said + err.message)
        if isinstance(err, NotLeader) and isinstance(partly, NotLeader):
            partly.leader_id, partly.leader_address = err.leader_id, err.leader_address
        raise partly


class _MGetMerge:
    """Finish of an MGet over several shards: every part's items, in the request's key order."""

    __slots__ = ("parts", "keys")

    def __init__(self, parts: list[Finish], keys: list[bytes]) -> None:
        self.parts = parts
        self.keys = keys

    def __call__(self) -> pb.MGetResponse:
        merged: dict[bytes, pb.MGetItem] = {}
        for part in self.parts:
            merged.update((it.key, it) for it in part().items)
        return pb.MGetResponse(items=[merged[k] for k in self.keys])


def _check_epoch(s: ShardDescriptor, epoch: int) -> None:
    """EPOCH_MISMATCH unless the request named no epoch (0) or ``s``'s."""
    if epoch and epoch != s.epoch:
        raise EpochMismatch(f"shard {s.id} is at epoch {s.epoch}, the request named {epoch}; refresh the cluster map")


def _op_error(e: CacheError | ForwardedError) -> pb.OpError:
    if isinstance(e, ForwardedError):
        md = dict(e.metadata)
        return pb.OpError(code=e.code.value[0], message=e.details, kind=md.get("cachenode-error", ""),
                          leader=md.get("cachenode-leader", ""))
    md = dict(error_metadata(e))
    return pb.OpError(code=status_code(e).value[0], message=e.message, kind=e.kind,
                      leader=md.get("cachenode-leader", ""))


# Future is re-exported for type checkers of callers building thunks.
__all__ = ["CacheService", "Future"]
