"""The one table from our errors to gRPC status codes, and how they travel.

A status carries the precise kind in the trailing metadata ``cachenode-error``
and, for ``not_leader``, the leader as ``cachenode-leader: <id>@<host:port>``.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from .._errors import (
    CacheError,
    DiskFull,
    EpochMismatch,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    NotLeader,
    OutcomeUnknown,
    Overloaded,
    Unavailable,
)

GRPC_STATUS: dict[type[CacheError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    NotFound: grpc.StatusCode.NOT_FOUND,
    NotLeader: grpc.StatusCode.UNAVAILABLE,
    EpochMismatch: grpc.StatusCode.ABORTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DiskFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    OutcomeUnknown: grpc.StatusCode.DEADLINE_EXCEEDED,
    Internal: grpc.StatusCode.INTERNAL,
}

ERROR_KEY = "cachenode-error"
LEADER_KEY = "cachenode-leader"


def status_code(err: CacheError) -> grpc.StatusCode:
    return GRPC_STATUS.get(type(err), grpc.StatusCode.INTERNAL)


def error_metadata(err: CacheError) -> tuple[tuple[str, str], ...]:
    md: list[tuple[str, str]] = [(ERROR_KEY, err.kind)]
    if isinstance(err, NotLeader) and err.leader_id:
        md.append((LEADER_KEY, f"{err.leader_id}@{err.leader_address or ''}"))
    return tuple(md)


def abort(context: grpc.ServicerContext, err: CacheError) -> NoReturn:
    context.set_trailing_metadata(error_metadata(err))
    context.abort(status_code(err), err.message)
    raise AssertionError("unreachable")  # context.abort raises
