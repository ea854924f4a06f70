"""The public client of cachenode.

    from cachenode.client import CacheClient

    with CacheClient(["127.0.0.1:7001", "127.0.0.1:7002"]) as c:
        c.set("greeting", "hello", ttl_ms=60_000)
        c.get("greeting").value          # b"hello"
        c.incr("visits")                 # 1, applied exactly once even if retried

* :class:`CacheClient` (blocking, thread-safe) and :class:`AsyncCacheClient`
  (asyncio) route each key straight to its shard leader, retry only what is
  safe, and bound every call by a deadline.
* :class:`RouteTable` is the pure key -> shard -> leader lookup they share.
* Results are frozen dataclasses (:class:`GetResult`, :class:`CasResult`,
  :class:`NodeStatus`, :class:`ReplicaStatus`).
* Errors are the :mod:`cachenode._errors` classes, re-exported here; catch
  :class:`CacheError` for all of them.

Everything not named in ``__all__`` is private.
"""

from cachenode._errors import (
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
from cachenode.client._results import CasResult, GetResult, NodeStatus, ReplicaStatus
from cachenode.client.async_client import AsyncCacheClient
from cachenode.client.route_table import Route, RouteTable
from cachenode.client.sync_client import CacheClient

__all__ = [
    "AsyncCacheClient",
    "CacheClient",
    "CacheError",
    "CasResult",
    "DiskFull",
    "EpochMismatch",
    "FailedPrecondition",
    "GetResult",
    "Internal",
    "InvalidArgument",
    "NodeStatus",
    "NotFound",
    "NotLeader",
    "OutcomeUnknown",
    "Overloaded",
    "ReplicaStatus",
    "Route",
    "RouteTable",
    "Unavailable",
]
