"""The black-box client: one gRPC connection per node, no hidden retries.

Only the public API is used (the generated ``cachenode.v1`` stubs).  Channels are
created with retries disabled and short reconnect back-offs, every call carries
a deadline, and nothing is ever retried here: a retry is a decision of the
workload (the counter's same-request-id retry) and is visible in its code.

:func:`classify` maps a gRPC error to Jepsen's outcome, following
``docs/errors.md``:

* ``fail`` (definitely not applied): INVALID_ARGUMENT, FAILED_PRECONDITION,
  NOT_FOUND, ABORTED, RESOURCE_EXHAUSTED, and UNAVAILABLE carrying the
  ``cachenode-error`` metadata ``not_leader`` or ``unavailable``;
* ``info`` (outcome unknown): DEADLINE_EXCEEDED, UNAVAILABLE without that
  metadata (a transport failure: the request may have been delivered), and
  anything else (INTERNAL, UNKNOWN, CANCELLED...).

Reads change nothing, so callers record a read that is not ``ok`` as ``fail``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import grpc

from cachenode.v1 import cache_pb2 as pb
from cachenode.v1 import cache_pb2_grpc as rpc

__all__ = [
    "CHANNEL_OPTIONS",
    "AdminClient",
    "CacheClient",
    "Outcome",
    "classify",
    "error_text",
]

CHANNEL_OPTIONS: Final = [
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.keepalive_time_ms", 10_000),
]

ERROR_KEY: Final = "cachenode-error"
DEFINITE_CODES: Final = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
DEFINITE_UNAVAILABLE_KINDS: Final = frozenset({"not_leader", "unavailable"})

OutcomeType = Literal["ok", "fail", "info"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one call did: ``ok`` with ``value``, or ``fail``/``info`` with ``error``."""

    type: OutcomeType
    value: Any = None
    error: str | None = None
    shard: int | None = None


def _metadata_kind(err: grpc.RpcError) -> str | None:
    md: Any = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for item in md or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else tuple(item)
        if key == ERROR_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def classify(code: grpc.StatusCode | None, kind: str | None) -> OutcomeType:
    """``fail`` or ``info`` for a call that ended with status ``code`` and the
    ``cachenode-error`` metadata ``kind`` (None when absent).  Never ``ok``."""
    if code in DEFINITE_CODES:
        return "fail"
    if code == grpc.StatusCode.UNAVAILABLE and kind in DEFINITE_UNAVAILABLE_KINDS:
        return "fail"
    return "info"


def error_text(code: grpc.StatusCode | None, kind: str | None, details: str | None) -> str:
    """A short one-line error for the history: ``CODE[/kind]: details``."""
    name = code.name if code is not None else "UNKNOWN"
    head = f"{name}/{kind}" if kind else name
    d = (details or "").replace("\n", " ").strip()
    return f"{head}: {d[:160]}" if d else head


def outcome_of(err: grpc.RpcError) -> Outcome:
    """The classified :class:`Outcome` of a failed call."""
    code = err.code() if hasattr(err, "code") else None
    kind = _metadata_kind(err)
    details = err.details() if hasattr(err, "details") else str(err)
    return Outcome(classify(code, kind), None, error_text(code, kind, details))


class _Channel:
    """A channel plus its last known connectivity (tracked by a subscription)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._state = grpc.ChannelConnectivity.IDLE
        self._cond = threading.Condition()
        self.channel.subscribe(self._on_state, try_to_connect=True)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        with self._cond:
            self._state = state
            self._cond.notify_all()

    def wait_usable(self, timeout: float) -> bool:
        """True once the channel is READY (or about to try: IDLE/CONNECTING) within
        ``timeout``; False while it is in TRANSIENT_FAILURE (the node is down)."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._state == grpc.ChannelConnectivity.READY, timeout=timeout
            )
            return self._state != grpc.ChannelConnectivity.TRANSIENT_FAILURE and (
                self._state != grpc.ChannelConnectivity.SHUTDOWN
            )

    def close(self) -> None:
        self.channel.unsubscribe(self._on_state)
        self.channel.close()


def _rid(client_id: bytes, seq: int) -> pb.RequestHeader:
    return pb.RequestHeader(request_id=pb.RequestId(client_id=client_id, seq=seq))


class CacheClient:
    """Calls to ONE node (no redirection, no retries).  Thread-safe.

    Every method returns an :class:`Outcome`; it never raises for a gRPC error.
    Values are stored as decimal strings (register/counter/ttl) or the byte ``1``
    (set elements).  ``timeout`` is the per-call deadline in seconds.
    """

    def __init__(self, node: str, address: str, timeout: float = 2.0) -> None:
        self.node = node
        self.address = address
        self.timeout = timeout
        self._ch = _Channel(address)
        self._stub = rpc.CacheStub(self._ch.channel)

    def usable(self, timeout: float) -> bool:
        """Is the connection up (or coming up) -- worth invoking an op on?"""
        return self._ch.wait_usable(timeout)

    def close(self) -> None:
        self._ch.close()

    def _call(self, fn: Any, req: Any) -> tuple[Any, Outcome | None]:
        try:
            return fn(req, timeout=self.timeout), None
        except grpc.RpcError as e:
            return None, outcome_of(e)

    # -- single keys

    def get(self, key: str) -> Outcome:
        """Linearizable read: value as an int, or None when absent."""
        resp, err = self._call(self._stub.Get, pb.GetRequest(key=key.encode()))
        if err is not None:
            return err
        value = int(resp.value) if resp.found else None
        return Outcome("ok", value, shard=int(resp.meta.shard_id))

    def set(self, key: str, value: int, ttl_ms: int = 0) -> Outcome:
        resp, err = self._call(
            self._stub.Set,
            pb.SetRequest(key=key.encode(), value=str(value).encode(), ttl_ms=ttl_ms),
        )
        if err is not None:
            return err
        return Outcome("ok", None)

    def mset_one(self, key: str, value: int) -> Outcome:
        """The write of ``set``, sent as an MSet of one item (its own command and apply)."""
        req = pb.MSetRequest(items=[pb.KeyValue(key=key.encode(), value=str(value).encode())])
        _, err = self._call(self._stub.MSet, req)
        if err is not None:
            return err
        return Outcome("ok", None)

    def cas(self, key: str, expected: int, new: int) -> Outcome:
        """Compare-and-set by value; a cas whose comparison failed is a definite ``fail``."""
        req = pb.CompareAndSetRequest(
            key=key.encode(), expected_value=str(expected).encode(), new_value=str(new).encode()
        )
        resp, err = self._call(self._stub.CompareAndSet, req)
        if err is not None:
            return err
        if not resp.succeeded:
            cur = resp.current_value.decode() if resp.current_found else "nil"
            return Outcome("fail", None, f"cas mismatch: current {cur}")
        return Outcome("ok", None)

    def incr(self, key: str, delta: int, client_id: bytes, seq: int) -> Outcome:
        """Incr with request id ``(client_id, seq)``; ok value = the new value."""
        req = pb.IncrRequest(header=_rid(client_id, seq), key=key.encode(), delta=delta)
        resp, err = self._call(self._stub.Incr, req)
        if err is not None:
            return err
        return Outcome("ok", int(resp.value))

    # -- many keys (the set workload)

    def present(self, keys: Sequence[str], chunk: int = 500) -> Outcome:
        """Which of ``keys`` exist (MGet, in chunks); ok value = the present keys."""
        found: list[str] = []
        for i in range(0, len(keys), chunk):
            part = keys[i : i + chunk]
            resp, err = self._call(self._stub.MGet, pb.MGetRequest(keys=[k.encode() for k in part]))
            if err is not None:
                return err
            found.extend(it.key.decode() for it in resp.items if it.found)
        return Outcome("ok", found)


class AdminClient:
    """The Admin service of one node (status, cluster map, fault injection)."""

    def __init__(self, address: str, timeout: float = 2.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = rpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def node_status(self, timeout: float | None = None) -> pb.NodeStatus:
        """Raises grpc.RpcError when the node does not answer."""
        return self._stub.GetNodeStatus(pb.NodeStatusRequest(), timeout=timeout or self.timeout)

    def cluster_map(self, timeout: float | None = None) -> pb.ClusterMap:
        return self._stub.GetClusterMap(pb.ClusterMapRequest(), timeout=timeout or self.timeout)

    def set_clock_offset(self, offset_ms: int) -> int:
        resp = self._stub.SetClockOffset(
            pb.ClockOffsetRequest(offset_ms=offset_ms), timeout=self.timeout
        )
        return int(resp.offset_ms)

    def set_disk_fault(self, below_reserve: bool) -> bool:
        """Make the node count its disk as below its reserve (True), or as
        measured (False); returns what it counts now."""
        resp = self._stub.SetDiskFault(pb.DiskFaultRequest(below_reserve=below_reserve), timeout=self.timeout)
        return bool(resp.below_reserve)

    def add_operator(self, kind: str, shard: int, source: str, target: str) -> pb.OperatorInfo:
        """Ask the placement driver for a move or a leader transfer (raises
        grpc.RpcError; UNAVAILABLE with a leader hint when this node is not
        the PD)."""
        return self._stub.AddOperator(
            pb.AddOperatorRequest(kind=kind, shard_id=shard, from_node=source, to_node=target),
            timeout=self.timeout,
        )

    def pd_node(self) -> str:
        """The node the placement driver runs on, per this node (raises
        grpc.RpcError; UNAVAILABLE with a leader hint when it is not the PD)."""
        return str(self._stub.GetPdStatus(pb.PdStatusRequest(), timeout=self.timeout).pd_node)

    def set_node_state(self, node_id: str, action: str) -> str:
        """``drain`` | ``resume`` a node through the placement driver."""
        resp = self._stub.SetNodeState(pb.NodeStateRequest(node_id=node_id, action=action), timeout=self.timeout)
        return str(resp.message)

    def set_fault_filter(self, blocked: Sequence[str]) -> list[str]:
        resp = self._stub.SetFaultFilter(
            pb.FaultFilterRequest(blocked_nodes=list(blocked)), timeout=self.timeout
        )
        return list(resp.blocked_nodes)
