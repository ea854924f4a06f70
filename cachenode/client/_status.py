"""Turn a gRPC failure into a :mod:`cachenode._errors` exception plus a retry class.

The server puts the precise error kind into the trailing metadata key
``cachenode-error`` (and, for ``not_leader``, ``cachenode-leader`` =
``"<node_id>@<host:port>"``).  A status without that metadata came from the
gRPC transport itself: ``UNAVAILABLE`` then means "could not reach the node",
``DEADLINE_EXCEEDED`` means "our own deadline passed".  Pure; thread-safe.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

import grpc

from cachenode._errors import (
    ALL_KINDS,
    CacheError,
    Internal,
    InvalidArgument,
    NotLeader,
    OutcomeUnknown,
    Unavailable,
)

ERROR_KEY = "cachenode-error"
LEADER_KEY = "cachenode-leader"


class Retry(enum.Enum):
    """What a failed attempt says about trying again."""

    NEVER = "never"  # the request or the data is wrong; a retry gives the same answer
    REDIRECT = "redirect"  # not_leader: go where the hint points
    STALE_ROUTE = "stale_route"  # epoch_mismatch: refresh the map, then retry
    BUSY = "busy"  # overloaded: back off, retry
    NO_LEADER = "no_leader"  # unavailable (no leader / no quorum): not applied; back off
    NODE_DOWN = "node_down"  # transport could not reach the node
    TIMEOUT = "timeout"  # deadline passed / outcome unknown / cancelled


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt, classified.

    ``maybe_sent`` is true when the request may have reached the node and been
    applied (only meaningful for writes).
    """

    error: CacheError
    retry: Retry
    maybe_sent: bool
    leader_id: str | None = None
    leader_address: str | None = None


_CODE_KIND: dict[object, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.FAILED_PRECONDITION: "failed_precondition",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.ABORTED: "epoch_mismatch",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.INTERNAL: "internal",
    grpc.StatusCode.UNKNOWN: "internal",
    grpc.StatusCode.UNIMPLEMENTED: "internal",
    grpc.StatusCode.DATA_LOSS: "internal",
    grpc.StatusCode.OUT_OF_RANGE: "invalid_argument",
    grpc.StatusCode.ALREADY_EXISTS: "failed_precondition",
    grpc.StatusCode.PERMISSION_DENIED: "failed_precondition",
    grpc.StatusCode.UNAUTHENTICATED: "failed_precondition",
}

_RETRY_BY_KIND: dict[str, Retry] = {
    "invalid_argument": Retry.NEVER,
    "failed_precondition": Retry.NEVER,
    "not_found": Retry.NEVER,
    "internal": Retry.NEVER,
    "not_leader": Retry.REDIRECT,
    "epoch_mismatch": Retry.STALE_ROUTE,
    "overloaded": Retry.BUSY,
    "disk_full": Retry.NEVER,
    "unavailable": Retry.NO_LEADER,
    "outcome_unknown": Retry.TIMEOUT,
}

_ADVICE: dict[str, str] = {
    "invalid_argument": "fix the request and try again",
    "failed_precondition": "the stored data does not allow this operation",
    "not_found": "check the shard or node id (`cachectl status` lists them)",
    "internal": "this is a bug in cachenode; the node's log has details",
    "not_leader": "retry against the leader",
    "epoch_mismatch": "the shard layout changed; refresh the cluster map and retry",
    "overloaded": "the node is overloaded; retry later or slow down",
    "unavailable": "the shard has no leader or no quorum; it was not applied; retry shortly",
    "outcome_unknown": "it may or may not have been applied",
}


def metadata_dict(md: Iterable[tuple[str, object]] | None) -> dict[str, str]:
    """Trailing metadata as a dict of str (last value wins)."""
    out: dict[str, str] = {}
    for item in md or ():
        try:
            k, v = item
        except (TypeError, ValueError):
            continue
        out[str(k).lower()] = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return out


def parse_leader_hint(hint: str | None) -> tuple[str | None, str | None]:
    """``"n2@127.0.0.1:7002"`` -> ``("n2", "127.0.0.1:7002")``; tolerant of a bare id."""
    if not hint:
        return None, None
    node_id, sep, address = hint.partition("@")
    return (node_id or None), (address if sep and address else None)


def _connect_failed(details: str) -> bool:
    """True when the transport says it never connected (so nothing was sent)."""
    d = details.lower()
    return any(
        s in d
        for s in (
            "failed to connect",
            "connection refused",
            "name resolution",
            "dns resolution",
            "no address",
            "failed to resolve",
            "was never sent",
        )
    )


def _short(details: str, limit: int = 600) -> str:
    """One line, cut at ``limit`` characters: a node's own messages (the
    disk reserve's, a reused request id's) run to 300-400 with their advice."""
    one = " ".join(details.split())
    return one if len(one) <= limit else one[:limit] + "..."


def classify(err: grpc.RpcError, *, what: str, target: str) -> Failure:
    """Classify one failed RPC.

    ``what`` names the operation (``"set 'k'"``), ``target`` the node it went
    to (``"n2 at 127.0.0.1:7002"``); both end up in the message.
    """
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    details_fn = getattr(err, "details", None)
    details = _short(str(details_fn() if callable(details_fn) else err) or "")
    md_fn = getattr(err, "trailing_metadata", None)
    try:
        md = metadata_dict(md_fn() if callable(md_fn) else None)
    except Exception:  # a broken call object must not hide the real failure
        md = {}
    kind = md.get(ERROR_KEY)

    if kind == "not_leader":
        leader_id, leader_address = parse_leader_hint(md.get(LEADER_KEY))
        where = f"; leader is {leader_id}" if leader_id else "; leader unknown"
        return Failure(
            NotLeader(
                f"{what}: {target} is not the leader ({details}){where}", leader_id, leader_address
            ),
            Retry.REDIRECT,
            maybe_sent=False,
            leader_id=leader_id,
            leader_address=leader_address,
        )
    if kind is not None and kind in ALL_KINDS:
        cls = ALL_KINDS[kind]
        retry = _RETRY_BY_KIND.get(kind, Retry.NEVER)
        message = f"{what} failed on {target}: {details}"
        if kind not in ("invalid_argument", "failed_precondition", "disk_full"):  # those say it themselves
            message += f" ({_ADVICE[kind]})"
        return Failure(cls(message), retry, maybe_sent=(retry is Retry.TIMEOUT))

    # No cachenode metadata: the transport (or a foreign server) answered.
    if code == grpc.StatusCode.UNAVAILABLE:
        never_sent = _connect_failed(details)
        return Failure(
            Unavailable(f"{what}: cannot reach {target} ({details}); is the node running?"),
            Retry.NODE_DOWN,
            maybe_sent=not never_sent,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Failure(
            OutcomeUnknown(f"{what}: no answer from {target} before the deadline"),
            Retry.TIMEOUT,
            maybe_sent=True,
        )
    if code == grpc.StatusCode.CANCELLED:
        return Failure(
            OutcomeUnknown(f"{what}: the call to {target} was cancelled ({details})"),
            Retry.TIMEOUT,
            maybe_sent=True,
        )
    low = details.lower()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in low:
        # The answer when received here or sent by the node; else the
        # request (refused before it was sent, or by the node that read it).
        answer = "client: received" in low or "server: sent" in low
        return Failure(
            InvalidArgument(
                f"{what}: the answer is larger than one gRPC message may be ({details}); "
                f"ask for fewer keys per call" if answer else
                f"{what}: the request is larger than one gRPC message may be ({details}); "
                f"send less data per call"
            ),
            Retry.NEVER,
            maybe_sent=answer,
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return Failure(
            Internal(
                f"{what}: {target} does not implement this call ({details}); "
                "is it a cachenode node of a compatible version?"
            ),
            Retry.NEVER,
            maybe_sent=False,
        )
    kind = _CODE_KIND.get(code, "internal")
    cls = ALL_KINDS[kind]
    retry = _RETRY_BY_KIND[kind]
    code_name = getattr(code, "name", str(code))
    return Failure(
        cls(f"{what} failed on {target}: {code_name}: {details} ({_ADVICE[kind]})"),
        retry,
        maybe_sent=False,
    )


def reason(err: grpc.RpcError) -> str:
    """A one-line ``CODE: details`` summary of a failed RPC."""
    code = getattr(err, "code", None)
    details = getattr(err, "details", None)
    name = getattr(code(), "name", "?") if callable(code) else "?"
    text = details() if callable(details) else str(err)
    return f"{name}: {_short(str(text), 160)}"


__all__ = [
    "reason",
    "ERROR_KEY",
    "LEADER_KEY",
    "Failure",
    "Retry",
    "classify",
    "metadata_dict",
    "parse_leader_hint",
]
