"""Values the clients return.  All frozen: safe to share between threads."""

from __future__ import annotations

import dataclasses

from cachenode._types import NodeId, NodeInfo, ShardId

__all__ = ["CasResult", "GetResult", "NodeStatus", "ReplicaStatus"]


@dataclasses.dataclass(frozen=True, slots=True)
class GetResult:
    """A value read from the cache.

    ``version`` is the Raft index that wrote the value (it grows with every
    write of the key, so it also serves ``cas(expected_version=...)``).
    ``ttl_ms`` is the remaining time to live, ``None`` when the key never
    expires.  ``shard_id``, ``applied_index`` and ``served_by`` tell which
    replica answered and how far its log was applied (useful for stale reads).
    """

    value: bytes
    version: int
    ttl_ms: int | None
    shard_id: ShardId = 0
    applied_index: int = 0
    served_by: NodeId = ""

    def text(self, encoding: str = "utf-8") -> str:
        """The value decoded as text (``errors="replace"``)."""
        return self.value.decode(encoding, errors="replace")


@dataclasses.dataclass(frozen=True, slots=True)
class CasResult:
    """Outcome of a compare-and-set.

    On success ``version`` is the new version.  On failure ``current_value`` /
    ``current_version`` describe what the key holds now (``None`` / ``0`` when
    it is absent).  Truthy exactly when the swap happened.
    """

    succeeded: bool
    version: int = 0
    current_value: bytes | None = None
    current_version: int = 0

    def __bool__(self) -> bool:
        return self.succeeded


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One shard replica as its node reports it (``role``: leader|follower|candidate)."""

    shard_id: ShardId
    role: str
    leader: NodeId | None
    term: int
    commit_index: int
    applied_index: int
    size_bytes: int
    keys: int


@dataclasses.dataclass(frozen=True, slots=True)
class NodeStatus:
    """What ``Admin.GetNodeStatus`` reports about one node."""

    node: NodeInfo
    replicas: tuple[ReplicaStatus, ...]
    uptime_s: float
    version: str
    fsync: str
    leader_balancing: str = ""  # "on", "paused" or "off" ("" from an older node)
    metadata_role: str = ""  # its metadata replica: "leader", "follower", "candidate"; "" = none
    disk_free_bytes: int = 0  # its data directory's filesystem (0 from an older node)
    disk_capacity_bytes: int = 0
    disk_reserve_bytes: int = 0  # --disk-reserve in bytes; 0: none
    disk_full: bool = False  # below the reserve: the shards with a replica on it refuse writes that add data
