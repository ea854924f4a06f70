"""The decisions both clients share: routing, retries, deadlines, request ids.

No I/O here.  :class:`ClientCore` holds the routing state of one client and
is thread-safe.  :class:`CallState` follows one single-shard call through its
attempts; it is used by one thread (or one task) at a time.  The sync and
async clients only add the transport: they ask the state where to send, send,
and hand failures back to :meth:`CallState.failed`, which either returns how
long to back off or raises the error the user sees.

Retry rules (see ``_status.Retry``):

* never retried: invalid_argument, failed_precondition, not_found, internal;
* retried at once: not_leader whose hint names another node we can reach;
  epoch_mismatch (after a map refresh, the first time); an attempt whose
  deadline passed (after a map refresh);
* retried after an exponential backoff with jitter: overloaded, a node that
  cannot be reached (the map is refreshed from the other nodes first);
* retried after at least an even share of the remaining budget ("an
  election is running"): unavailable (no leader / no quorum), not_leader
  without a hint, or with a hint naming a node we just failed to reach.

A write carries one request id for all of its attempts (also when they go to
a new leader), so the server applies it at most once even when an earlier
attempt did reach it.  If any attempt of a write may have reached a node and
the call still fails, the error is ``OutcomeUnknown``, never ``Unavailable``.

Deadlines: a user call gets ``timeout`` seconds in total.  Each attempt may
use at most half of what is left (the last allowed attempt all of it), so a
slow node cannot eat the whole budget before a retry gets a chance.  A
write that surely was not applied yet is not retried in an attempt shorter
than ``min(SAFE_ATTEMPT_S, timeout / 10)``: such an attempt would likely time
out and leave its outcome unknown.  Failing to fetch the cluster map from
every known address counts as one attempt.
"""

from __future__ import annotations

import enum
import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import grpc

from cachenode._errors import (
    CacheError,
    DiskFull,
    EpochMismatch,
    InvalidArgument,
    OutcomeUnknown,
    Overloaded,
    Unavailable,
)
from cachenode._types import MAX_MESSAGE_BYTES, NodeId, ShardDescriptor
from cachenode.client._call import Op, Target
from cachenode.client._convert import (
    check_int64,
    check_ttl,
    cluster_map_from_wire,
)
from cachenode.client._status import Failure, Retry, classify
from cachenode.client.route_table import RouteTable
from cachenode.v1 import cache_pb2 as pb

Routing = Literal["smart", "proxy"]
Consistency = Literal["linearizable", "stale"]

BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0
ELECTION_BACKOFF_CAP_S = 0.3
"""Longest wait between attempts while a shard has no leader: an election
ends within about the election timeout (0.8-1.6 s), and a call should see
the new leader within a fraction of that, not a whole backoff step later."""
SUSPECT_S = 2.0
"""How long an unreachable address is tried last."""
MIN_ATTEMPT_S = 0.005
"""Below this much budget left, another attempt is pointless."""
SAFE_ATTEMPT_S = 0.05
"""The least time a retry of a write that was surely not applied yet gets
(a tenth of the call's timeout when that is less, so that a call with a
100 ms timeout still follows a redirect).  An attempt that times out may
have reached the leader, so it turns that write's definite "not applied"
into "outcome unknown"; a few-millisecond attempt at the end of the budget
times out on any busy machine and is worth less than the definite answer
it would spend."""

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # The transport must never resend a write behind our back: only this
    # module decides what is retried, and with which request id.
    ("grpc.enable_retries", 0),
    # As large as a node sends: gRPC's default of 4 MiB refused an mget of five 1 MiB values.
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Reconnect quickly to a restarted node instead of failing fast for up to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class _Wait(enum.Enum):
    NONE = "none"  # retry at once
    BACKOFF = "backoff"  # exponential backoff with jitter
    ELECTION = "election"  # backoff; not counted against max_attempts (see CallState.failed)


class Regroup(Exception):
    """A multi-key call's keys no longer share one shard: split them again."""


def parse_endpoints(endpoints: Sequence[str] | str) -> tuple[str, ...]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> validated, de-duplicated tuple."""
    raw = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[str] = []
    for item in raw:
        if not isinstance(item, str):
            raise InvalidArgument(f"endpoint must be a 'host:port' string, not {item!r}")
        ep = item.strip()
        if not ep:
            continue
        host, sep, port = ep.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(
                f"endpoint {ep!r} is not 'host:port' (for example 127.0.0.1:7001)"
            )
        if ep not in out:
            out.append(ep)
    if not out:
        raise InvalidArgument("no endpoints given: pass at least one 'host:port'")
    return tuple(out)


def parse_client_id(client_id: str | bytes | None) -> bytes:
    if client_id is None:
        return os.urandom(16)
    data = client_id.encode("utf-8") if isinstance(client_id, str) else bytes(client_id)
    if not 1 <= len(data) <= 64:
        raise InvalidArgument(f"client_id must be 1..64 bytes, got {len(data)}")
    return data


def parse_consistency(consistency: object) -> bool:
    """True for a stale read."""
    if consistency == "linearizable":
        return False
    if consistency == "stale":
        return True
    raise InvalidArgument(f"consistency must be 'linearizable' or 'stale', not {consistency!r}")


class ClientCore:
    """Routing state and policy of one client.  Thread-safe; no I/O."""

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        timeout: float,
        max_attempts: int,
        client_id: str | bytes | None,
        routing: Routing,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be an int >= 1, not {max_attempts!r}")
        if routing not in ("smart", "proxy"):
            raise InvalidArgument(f"routing must be 'smart' or 'proxy', not {routing!r}")
        self.timeout = float(timeout)
        self.max_attempts = max_attempts
        self.client_id = parse_client_id(client_id)
        self.routing: Routing = routing
        self.clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._table: RouteTable | None = None
        self._suspects: dict[str, float] = {}
        self._proxy_index = 0

    # ---- state -----------------------------------------------------------

    @property
    def table(self) -> RouteTable | None:
        return self._table  # one reference read: atomic, no lock needed

    def apply_map(self, msg: pb.ClusterMap) -> RouteTable:
        """Adopt a ``GetClusterMap`` answer; returns the table now in use."""
        cluster_map, leaders = cluster_map_from_wire(msg)
        with self._lock:
            if self._table is None:
                self._table = RouteTable(cluster_map, leaders)
            else:
                self._table.update(cluster_map, leaders)
            return self._table

    def next_request_seq(self) -> int:
        """The next write's request sequence number (with :attr:`client_id`,
        its request id).  ``next`` of an ``itertools.count`` is one C call,
        atomic under the GIL: no lock."""
        return next(self._seq)

    def deadline(self) -> float:
        return self.clock() + self.timeout

    def backoff(self, n: int) -> float:
        """Exponential backoff with jitter for the ``n``-th wait (0-based)."""
        ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2**n))
        with self._lock:
            return self._rng.uniform(ceiling / 2, ceiling)

    def mark_down(self, address: str) -> None:
        with self._lock:
            self._suspects[address] = self.clock() + SUSPECT_S
            if (
                self.routing == "proxy"
                and self.endpoints[self._proxy_index % len(self.endpoints)] == address
            ):
                self._proxy_index += 1

    def mark_up(self, address: str) -> None:
        with self._lock:
            self._suspects.pop(address, None)

    def is_suspect(self, address: str) -> bool:
        if not self._suspects:  # the common case, without the lock: a dict's size is read atomically
            return False
        with self._lock:
            until = self._suspects.get(address)
            if until is None:
                return False
            if until <= self.clock():
                del self._suspects[address]
                return False
            return True

    def map_candidates(self) -> list[str]:
        """Addresses to ask for the cluster map: endpoints, then map nodes; reachable first."""
        table = self.table
        seen = list(self.endpoints)
        if table is not None:
            seen += [a for a in table.addresses() if a not in seen]
        good = [a for a in seen if not self.is_suspect(a)]
        return good + [a for a in seen if a not in good]

    def proxy_target(self) -> Target:
        with self._lock:
            address = self.endpoints[self._proxy_index % len(self.endpoints)]
        return Target(address, None, no_forward=False)

    def begin(self, op: Op, deadline: float | None = None) -> CallState:
        return CallState(self, op, deadline if deadline is not None else self.deadline())

    # ---- operations ------------------------------------------------------

    def get_op(self, key: bytes, stale: bool) -> Op:
        return Op(
            "Get",
            (key,),
            lambda: pb.GetRequest(key=key),
            write=False,
            stale=stale,
        )

    def ttl_op(self, key: bytes) -> Op:
        return Op(
            "Ttl", (key,), lambda: pb.TtlRequest(key=key), False
        )

    def set_op(
        self, key: bytes, value: bytes, ttl_ms: int | None, if_absent: bool, if_present: bool
    ) -> Op:
        if if_absent and if_present:
            raise InvalidArgument(
                "set: if_absent and if_present exclude each other; pass at most one"
            )
        ttl = check_ttl(ttl_ms)
        condition = pb.IF_ABSENT if if_absent else pb.IF_PRESENT if if_present else pb.ALWAYS
        return Op(
            "Set",
            (key,),
            lambda: pb.SetRequest(key=key, value=value, ttl_ms=ttl, condition=condition),
            write=True,
        )

    def delete_op(self, key: bytes) -> Op:
        return Op(
            "Delete",
            (key,),
            lambda: pb.DeleteRequest(key=key),
            True,
        )

    def cas_op(
        self,
        key: bytes,
        new: bytes,
        expected: bytes | None,
        expected_version: int | None,
        absent: bool,
        ttl_ms: int | None,
    ) -> Op:
        given = sum((expected is not None, expected_version is not None, bool(absent)))
        if given != 1:
            raise InvalidArgument(
                "cas needs exactly one of expected=<value>, expected_version=<int> or absent=True"
            )
        ttl = check_ttl(ttl_ms)
        if expected_version is not None:
            if (
                isinstance(expected_version, bool)
                or not isinstance(expected_version, int)
                or expected_version < 0
            ):
                raise InvalidArgument(
                    f"expected_version must be an int >= 0, not {expected_version!r}"
                )

        def build() -> pb.CompareAndSetRequest:
            req = pb.CompareAndSetRequest(key=key, new_value=new, ttl_ms=ttl)
            if expected is not None:
                req.expected_value = expected
            elif expected_version is not None:
                req.expected_version = expected_version
            else:
                req.expect_absent = True
            return req

        return Op("CompareAndSet", (key,), build, write=True)

    def incr_op(self, key: bytes, delta: int) -> Op:
        d = check_int64(delta, "delta")
        return Op(
            "Incr",
            (key,),
            lambda: pb.IncrRequest(key=key, delta=d),
            True,
        )

    def mget_op(self, keys: Sequence[bytes]) -> Op:
        ks = tuple(keys)
        return Op(
            "MGet",
            ks,
            lambda: pb.MGetRequest(keys=ks),
            write=False,
        )

    def mset_op(self, items: Sequence[tuple[bytes, bytes]], ttl: int) -> Op:
        kvs = tuple(items)
        return Op(
            "MSet",
            tuple(k for k, _ in kvs),
            lambda: _mset_request(kvs, ttl),
            write=True,
        )


def closed_during(op: Op) -> Unavailable:
    """The error of a call whose client was closed under it."""
    return Unavailable(f"{op.display}: the client was closed during the call")


def _mset_request(kvs: Sequence[tuple[bytes, bytes]], ttl: int) -> pb.MSetRequest:
    """Items added in place: half the CPU of building ``KeyValue`` messages
    and copying them into the request (3.1 vs 6.0 us per 7 items)."""
    req = pb.MSetRequest()
    add = req.items.add
    for k, v in kvs:
        add(key=k, value=v, ttl_ms=ttl)
    return req


class CallState:
    """One user-visible single-shard call across its attempts.  Not thread-safe."""

    __slots__ = (
        "core", "op", "deadline", "started", "request_seq", "attempts", "counted", "backoffs",
        "maybe_applied", "last", "_refresh", "_saw_stale_route", "_no_map", "_shard",
    )

    def __init__(self, core: ClientCore, op: Op, deadline: float) -> None:
        self.core = core
        self.op = op
        self.deadline = deadline
        self.started = core.clock()
        # A write's request id is (core.client_id, request_seq), the same on every attempt.
        self.request_seq = core.next_request_seq() if op.write else 0
        self.attempts = 0
        self.counted = 0  # attempts that count against max_attempts
        self.backoffs = 0
        self.maybe_applied = False
        self.last: Failure | None = None
        self._refresh = False
        self._saw_stale_route = False
        self._no_map = False  # the last failure was: no node handed out a map
        self._shard: ShardDescriptor | None = None

    # ---- budget ----------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline - self.core.clock()

    def attempt_timeout(self) -> float:
        """At most half the remaining budget; the last allowed attempt gets all
        of it.  Called right before each attempt is sent: a retry of a write
        that surely was not applied yet is not sent with less than half its
        floor (see :meth:`_floor`: :meth:`_next_delay` left it the whole
        floor, but a map refresh may have spent the budget since, and a sleep
        overshoots by a little); the call's final error is raised instead."""
        timeout = self._share(max(self.remaining(), MIN_ATTEMPT_S))
        if self.attempts and timeout < self._floor() / 2 and self._guards_its_answer():
            raise self.final_error()
        return timeout

    def _guards_its_answer(self) -> bool:
        """A write whose failures so far all said "not applied"."""
        return self.op.write and not self.maybe_applied

    def _floor(self) -> float:
        """The least timeout worth giving the next attempt: ``SAFE_ATTEMPT_S``
        (a tenth of the call's timeout when that is less) for a write that is
        still surely not applied, ``MIN_ATTEMPT_S`` otherwise."""
        if self._guards_its_answer():
            return max(MIN_ATTEMPT_S, min(SAFE_ATTEMPT_S, self.core.timeout / 10))
        return MIN_ATTEMPT_S

    def _last_allowed(self) -> bool:
        """Is the next attempt the last that max_attempts allows?"""
        return self.core.max_attempts - self.counted <= 1

    def _share(self, budget: float) -> float:
        return budget if self._last_allowed() else budget / 2

    # ---- routing ---------------------------------------------------------

    def need_map(self) -> bool:
        """Must the caller fetch the cluster map before the next attempt?"""
        if self.core.routing == "proxy" and len(self.op.keys) == 1 and not self._refresh:
            return False
        return self.core.table is None or self._refresh

    def map_refreshed(self) -> None:
        self._refresh = False

    def map_failed(self, error: CacheError) -> float:
        """No endpoint handed out a map.  Returns a backoff or raises the final error."""
        self._refresh = False
        if self.core.table is not None:
            return 0.0  # keep routing by the map we have
        if self.core.routing == "proxy" and len(self.op.keys) == 1:
            return 0.0
        self.attempts += 1
        self.counted += 1
        self.last = Failure(error, Retry.NODE_DOWN, maybe_sent=False)
        self._no_map = True
        return self._next_delay(_Wait.BACKOFF)

    def target(self) -> Target:
        """Where the next attempt goes.  Raises :class:`Regroup` for a split multi-key op."""
        core = self.core
        table = core.table
        if table is None:
            return core.proxy_target()
        route = table.route_all(self.op.keys)
        if route is None:
            raise Regroup(self.op.display)
        self._shard = route.shard
        if core.routing == "proxy":
            return core.proxy_target()
        leader = route.leader_address
        if leader is not None and not core.is_suspect(leader):
            return Target(leader, route.leader_id, True)  # the common case, without the lists below

        candidates: list[tuple[NodeId | None, str]] = []
        if route.leader_address is not None:
            candidates.append((route.leader_id, route.leader_address))
        for replica_id, replica_address in table.replicas(route.shard.id):
            if replica_address != route.leader_address:
                candidates.append((replica_id, replica_address))
        if not candidates:  # the map cannot place this shard: let any endpoint forward
            return self.core.proxy_target()
        usable = [c for c in candidates if not self.core.is_suspect(c[1])] or candidates
        if route.leader_address is not None and usable[0][1] == route.leader_address:
            chosen = usable[0]
        else:
            # Leader unknown or unreachable: ask the replicas in turn; a replica
            # that knows the leader answers not_leader with a hint.
            chosen = usable[self.attempts % len(usable)]
        return Target(chosen[1], chosen[0], no_forward=True)

    def request(self, target: Target) -> Any:
        """This attempt's request message: the op's, its header filled in place
        (a header built apart and passed in would be copied)."""
        op = self.op
        req = op.build()
        h = req.header
        if target.no_forward:
            h.no_forward = True
        if not op.write:
            h.consistency = pb.STALE if op.stale else pb.LINEARIZABLE
        if self.request_seq:
            rid = h.request_id
            rid.client_id = self.core.client_id
            rid.seq = self.request_seq
        if self._shard is not None:
            h.shard_epoch = self._shard.epoch
        return req

    # ---- failures --------------------------------------------------------

    def failed(self, err: grpc.RpcError, target: Target) -> float:
        """Record a failed attempt.  Returns the backoff before the next one, or raises.

        An attempt that found no leader (an election in progress, or a hint
        naming a node we cannot reach) does not count against
        ``max_attempts``: the next one waits a jittered backoff (50 ms,
        doubling up to 0.3 s) and the call's deadline bounds them all.  A
        leadership transfer takes milliseconds and a failover about the
        election timeout, so waiting a share of the whole budget instead
        (as before) made one write wait 7.5 s of a 30 s timeout for a
        transfer that took 2 ms."""
        f = classify(err, what=self.op.display, target=target.describe())
        self.attempts += 1
        self.last = f
        self._no_map = False
        if self.op.write and f.maybe_sent:
            self.maybe_applied = True
        if f.retry is Retry.NEVER:
            if self.op.write and f.maybe_sent:
                # The node answered and the answer was lost: too large, with
                # the answers of the reads coalesced into the same Batch.
                raise OutcomeUnknown(
                    f"{f.error.message}. This write may or may not have been applied (at most once); "
                    "read the key to find out"
                ) from None
            if self.op.write and self.maybe_applied and isinstance(f.error, DiskFull):
                # The leader refuses before proposing; it answers a retry
                # whose id it has applied, but an earlier attempt may still
                # be in flight, or applied where it has not caught up yet.
                raise OutcomeUnknown(
                    f"{f.error.message}. An earlier attempt of this write may have been applied "
                    "(at most once, with the same request id); read the key to find out"
                ) from None
            raise f.error from None

        table = self.core.table
        shard_id = self._shard.id if self._shard is not None else None
        wait = _Wait.BACKOFF
        if f.retry is Retry.REDIRECT:
            wait = _Wait.ELECTION
            if f.leader_id and table is not None and shard_id is not None:
                table.set_leader(shard_id, f.leader_id, f.leader_address)
                new_address = f.leader_address or table.address_of(f.leader_id)
                if new_address is None:
                    self._refresh = True  # a leader our map does not know: a newer map does
                elif new_address != target.address and not self.core.is_suspect(new_address):
                    wait = _Wait.NONE  # a fresh hint: follow it at once
                # else: the hint names a node we just failed to reach (a stale
                # belief of the follower): wait for the election to finish.
            elif table is not None and shard_id is not None:
                table.invalidate_leader(shard_id, target.node_id)
        elif f.retry is Retry.STALE_ROUTE:
            self._refresh = True
            if not self._saw_stale_route:  # one refresh usually fixes it
                wait = _Wait.NONE
            self._saw_stale_route = True
        elif f.retry is Retry.NO_LEADER:
            wait = _Wait.ELECTION
            if table is not None and shard_id is not None and target.node_id is not None:
                table.invalidate_leader(shard_id, target.node_id)
        elif f.retry is Retry.NODE_DOWN:
            self.core.mark_down(target.address)
            if table is not None and shard_id is not None and target.node_id is not None:
                table.invalidate_leader(shard_id, target.node_id)
            self._refresh = self.core.routing == "smart"
        elif f.retry is Retry.TIMEOUT:
            # The budget is already spent waiting; ask the others who leads now.
            if self.core.routing == "proxy":
                self.core.mark_down(target.address)
            self._refresh = self.core.routing == "smart"
            wait = _Wait.NONE
        if wait is not _Wait.ELECTION:
            self.counted += 1
        return self._next_delay(wait)

    def _next_delay(self, wait: _Wait) -> float:
        """The wait before the next attempt, or raises when none is worth making:
        the attempts ran out, or the budget left could not give the next
        attempt its floor (:meth:`_floor`).  The wait is shortened to leave
        the attempt that much."""
        remaining = self.remaining()
        if self.counted >= self.core.max_attempts or remaining <= MIN_ATTEMPT_S:
            raise self.final_error()
        floor = self._floor()
        room = remaining - (floor if self._last_allowed() else 2 * floor)
        if room < 0:
            raise self.final_error()
        if wait is _Wait.NONE:
            return 0.0
        delay = self.core.backoff(self.backoffs)
        self.backoffs += 1
        if wait is _Wait.ELECTION:
            delay = min(delay, ELECTION_BACKOFF_CAP_S)
        return min(delay, remaining / 2, room)

    def final_error(self) -> CacheError:
        """The error a user sees when the attempts or the budget ran out."""
        op = self.op
        last = self.last
        elapsed = self.core.clock() - self.started
        if last is None:
            return OutcomeUnknown(
                f"{op.display}: the deadline passed before it could be sent "
                f"(timeout {self.core.timeout:g}s); retry with a larger timeout"
            )
        attempts = f"after {self.attempts} attempt{'s' if self.attempts != 1 else ''}"
        tail = f"{attempts} in {elapsed:.1f}s; last error: {last.error.message}"
        if op.write and self.maybe_applied:
            return OutcomeUnknown(
                f"{op.display} did not complete {tail}. It may or may not have been applied "
                "(every retry reused its request id, so it applied at most once); "
                "read the key to find out, or retry with a larger timeout"
            )
        not_applied = " It was not applied." if op.write else ""
        shard = f"shard {self._shard.id}" if self._shard is not None else "the shard"
        if last.retry is Retry.TIMEOUT:
            return OutcomeUnknown(
                f"{op.display} got no answer {tail}. Nothing was changed; "
                "retry with a larger timeout or check `cachectl status`"
            )
        if last.retry in (Retry.REDIRECT, Retry.NO_LEADER):
            return Unavailable(
                f"{op.display} failed: {shard} has no reachable leader {tail}.{not_applied} "
                "The shard may be electing a leader: retry shortly, or check `cachectl status`"
            )
        if last.retry is Retry.BUSY:
            return Overloaded(
                f"{op.display} failed: the cluster is overloaded {tail}.{not_applied} "
                "Retry later or send less"
            )
        if last.retry is Retry.STALE_ROUTE:
            return EpochMismatch(
                f"{op.display} failed: the shard layout kept changing {tail}.{not_applied} Retry"
            )
        if self._no_map:
            return Unavailable(
                f"{op.display} failed {attempts} in {elapsed:.1f}s: {last.error.message}"
            )
        return Unavailable(
            f"{op.display} failed {tail}.{not_applied} "
            "Check that the nodes are running (`cachectl status`) and the endpoints are right"
        )
