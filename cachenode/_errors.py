"""The one error hierarchy of cachenode.

    CacheError                      base; never raised itself
    ├── InvalidArgument             malformed request: empty/oversized key, huge value, bad id
    ├── FailedPrecondition          the request is valid but the data forbids it (incr on text)
    ├── NotFound                    unknown shard or node
    ├── NotLeader                   this replica does not lead the shard (carries a leader hint)
    ├── EpochMismatch               the request named an outdated shard epoch
    ├── Overloaded                  command queue full; retry later
    ├── DiskFull                    the leader's disk is below its reserve; the write was NOT applied
    ├── Unavailable                 no leader / no quorum; the write was NOT applied
    ├── OutcomeUnknown              proposed, but the deadline passed before the outcome was known
    └── Internal                    a bug; the message says where

Every error has a ``kind`` (a stable snake_case name sent to clients in the
``cachenode-error`` trailing metadata) and maps to one gRPC status code in
:data:`GRPC_STATUS` (see ``cachenode.server.status``).  Messages say what was
wrong and what to do next.
"""

from __future__ import annotations

from typing import ClassVar


class CacheError(Exception):
    kind: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CacheError):
    kind: ClassVar[str] = "invalid_argument"


class FailedPrecondition(CacheError):
    kind: ClassVar[str] = "failed_precondition"


class NotFound(CacheError):
    kind: ClassVar[str] = "not_found"


class NotLeader(CacheError):
    kind: ClassVar[str] = "not_leader"

    def __init__(self, message: str, leader_id: str | None = None, leader_address: str | None = None) -> None:
        super().__init__(message)
        self.leader_id = leader_id
        self.leader_address = leader_address


class EpochMismatch(CacheError):
    kind: ClassVar[str] = "epoch_mismatch"


class Overloaded(CacheError):
    kind: ClassVar[str] = "overloaded"


class DiskFull(CacheError):
    """A write that adds data, refused by a shard leader whose node has less
    free disk than its reserve (``--disk-reserve``), before it was proposed."""

    kind: ClassVar[str] = "disk_full"


class Unavailable(CacheError):
    kind: ClassVar[str] = "unavailable"


class OutcomeUnknown(CacheError):
    kind: ClassVar[str] = "outcome_unknown"


class Internal(CacheError):
    kind: ClassVar[str] = "internal"


ALL_KINDS: dict[str, type[CacheError]] = {
    c.kind: c
    for c in (
        InvalidArgument,
        FailedPrecondition,
        NotFound,
        NotLeader,
        EpochMismatch,
        Overloaded,
        DiskFull,
        Unavailable,
        OutcomeUnknown,
        Internal,
    )
}
