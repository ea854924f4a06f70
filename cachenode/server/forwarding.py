"""Forwarding: a node that does not lead a shard passes the request on.

So any node serves any key (e.g. behind a load balancer).  The forwarded
copy carries ``no_forward=true``; a NOT_LEADER answer with a hint is followed
once more.  One call of :meth:`Forwarder.forward` tries each target once;
waiting for a shard that has no leader yet is the caller's
(``CacheService._forwarded``).  Threads: any; channels are shared.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc

from .._errors import ALL_KINDS, CacheError, NotLeader, OutcomeUnknown, Unavailable
from .._types import MAX_MESSAGE_BYTES
from ..v1 import cache_pb2_grpc
from .status import ERROR_KEY, LEADER_KEY

CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 0),  # never resend a write behind the caller's back
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A restarted leader must be reachable again at once, not after gRPC's
    # default reconnect backoff (up to 2 minutes of fast failures).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ForwardedError(Exception):
    """The leader answered with an error status: pass it through unchanged."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata: tuple[tuple[str, str], ...]) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.metadata = metadata


class Forwarder:
    def __init__(self, self_address: str) -> None:
        self._self = self_address
        self._stubs: dict[str, cache_pb2_grpc.CacheStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str) -> cache_pb2_grpc.CacheStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                ch = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._channels[address] = ch
                stub = self._stubs[address] = cache_pb2_grpc.CacheStub(ch)
            return stub

    def forward(self, method: str, req: Any, targets: list[str], deadline: float, write: bool) -> Any:
        """Send ``req`` to the first target that accepts it.

        ``targets`` is the leader's address first when known, else the shard's
        replicas.  Raises ForwardedError (pass through), Unavailable (nobody
        reachable, not applied) or OutcomeUnknown (a write whose link broke)."""
        fwd = type(req)()
        fwd.CopyFrom(req)
        fwd.header.no_forward = True
        tried: set[str] = set()
        queue = [t for t in targets if t and t != self._self]
        last: CacheError = Unavailable("no replica of the shard is reachable; retry later")
        while queue and len(tried) < 4:
            addr = queue.pop(0)
            if addr in tried:
                continue
            tried.add(addr)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return getattr(self._stub(addr), method)(fwd, timeout=remaining)
            except grpc.RpcError as e:
                code = e.code()
                md: tuple[tuple[str, str], ...] = tuple(
                    (str(m.key), str(m.value)) for m in (e.trailing_metadata() or ()) if isinstance(m.value, str)  # type: ignore[unreachable]  # grpc-stubs say bytes; text keys carry str
                )
                kinds = dict(md)
                kind = kinds.get(ERROR_KEY)
                if kind == NotLeader.kind:
                    hint = kinds.get(LEADER_KEY, "")
                    hint_addr = hint.split("@", 1)[1] if "@" in hint else ""
                    if hint_addr and hint_addr != self._self and hint_addr not in tried:  # this node: its caller runs it here
                        queue.insert(0, hint_addr)
                    last = NotLeader(e.details() or "not leader")
                    continue
                if kind is not None:
                    raise ForwardedError(code, e.details() or "", md) from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    # transport failure: was the request delivered? unknowable for writes
                    if write and "failed to connect" not in (e.details() or "").lower():
                        raise OutcomeUnknown(
                            f"the link to the shard leader {addr} broke while forwarding; the write's outcome is unknown; retry with the same request id"
                        ) from None
                    last = Unavailable(f"shard leader {addr} is unreachable; retry")
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    if write:
                        raise OutcomeUnknown("the deadline passed while the forwarded write was in flight; outcome unknown") from None
                    raise Unavailable("the deadline passed while waiting for the shard leader") from None
                raise ForwardedError(code, e.details() or "", md) from None
        if isinstance(last, NotLeader):
            raise Unavailable("the shard has no reachable leader right now (election in progress?); retry")
        raise last

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._stubs.clear()


def error_from_kind(kind: str, message: str) -> CacheError:
    return ALL_KINDS.get(kind, ALL_KINDS["internal"])(message)
