"""What the placement driver knows: the map plus heartbeat reports, as one
immutable :class:`ClusterView` that checkers and schedulers read.

Pure data.  The view is built by :mod:`cachenode.pd.driver` from live
heartbeats, and by :mod:`cachenode.pd.scenario` from text in golden tests,
so planning is the same code in both.
"""

from __future__ import annotations

import dataclasses
import enum

from .._types import (
    DRAINING,
    META_GROUP_ID,
    REMOVING,
    SERVING,
    ClusterMap,
    NodeId,
    ShardDescriptor,
    ShardId,
)


class Liveness(enum.Enum):
    UP = "up"  # heartbeat within the last down-after seconds
    DOWN = "down"  # silent, for less than max-down-time: wait, it may come back
    DEAD = "dead"  # silent for longer than max-down-time: replace its replicas


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaReport:
    """One replica, as its node reported it in a heartbeat."""

    shard: ShardId
    role: str  # leader | follower | candidate
    leader: NodeId | None
    term: int
    commit_index: int
    applied_index: int
    members: tuple[NodeId, ...]  # Raft membership as this replica sees it
    match: dict[NodeId, int]  # leaders only: followers' match indexes
    size_bytes: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class StoreStats:
    capacity_bytes: int = 0
    available_bytes: int = 0
    used_bytes: int = 0
    read_rate: float = 0.0  # ops/s
    write_rate: float = 0.0  # ops/s
    reserve_bytes: int = 0  # the node's --disk-reserve in bytes (0: none or unknown)
    below_reserve: bool = False  # the node's own judgement: its shards refuse writes that add data


@dataclasses.dataclass(frozen=True, slots=True)
class NodeView:
    id: NodeId
    state: str  # serving | draining | removing (from the map)
    liveness: Liveness
    stats: StoreStats = StoreStats()
    replicas: tuple[ReplicaReport, ...] = ()
    down_for_s: float = 0.0

    @property
    def accepts_replicas(self) -> bool:
        return self.state == SERVING and self.liveness is Liveness.UP

    @property
    def leaving(self) -> bool:
        return self.state in (DRAINING, REMOVING)

    @property
    def below_reserve(self) -> bool:
        """Below its own disk reserve: its shards refuse writes that add data."""
        return self.stats.below_reserve

    def full(self, min_free_ratio: float) -> bool:
        """Below its own disk reserve, or with less than ``min_free_ratio``
        of its disk free (whatever its reserve: a new replica's snapshot
        should not take a node to its reserve)."""
        s = self.stats
        return s.below_reserve or (s.capacity_bytes > 0 and s.available_bytes < s.capacity_bytes * min_free_ratio)


@dataclasses.dataclass(frozen=True, slots=True)
class ShardView:
    """A shard as the PD sees it: its descriptor plus its leader's report."""

    desc: ShardDescriptor
    leader: NodeId | None  # observed leader (from its own heartbeat), if any
    report: ReplicaReport | None  # the leader's report

    @property
    def members(self) -> tuple[NodeId, ...] | None:
        """Raft membership per the leader, or None when no leader reported."""
        return self.report.members if self.report else None

    def lag(self, node: NodeId) -> int | None:
        """How many entries ``node`` is behind the leader's commit, per the
        leader (None: unknown)."""
        if self.report is None:
            return None
        if node == self.leader:
            return 0
        m = self.report.match.get(node)
        return None if m is None else max(0, self.report.commit_index - m)


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterView:
    map: ClusterMap
    nodes: dict[NodeId, NodeView]
    shards: dict[ShardId, ShardView]

    @staticmethod
    def build(m: ClusterMap, nodes: dict[NodeId, NodeView]) -> ClusterView:
        """Join the map with node reports: a shard's leader is a node that
        reports leading it (highest term wins).  The metadata group is in
        ``shards`` too, under :data:`META_GROUP_ID`."""
        best: dict[ShardId, tuple[int, NodeId, ReplicaReport]] = {}
        for n in nodes.values():
            if n.liveness is not Liveness.UP:
                continue
            for r in n.replicas:
                if r.role == "leader" and (r.shard not in best or r.term > best[r.shard][0]):
                    best[r.shard] = (r.term, n.id, r)
        shards = {}
        for s in m.groups():
            b = best.get(s.id)
            shards[s.id] = ShardView(s, b[1] if b else None, b[2] if b else None)
        return ClusterView(m, nodes, shards)

    def replica_count(self, node: NodeId) -> int:
        return sum(1 for s in self.map.shards if node in s.replicas)

    def preferred_leader_count(self, node: NodeId) -> int:
        return sum(1 for s in self.map.shards if s.replicas and s.replicas[0] == node)

    def leader_count(self, node: NodeId) -> int:
        """Shards (not the metadata group) that ``node`` leads."""
        return sum(1 for gid, s in self.shards.items() if s.leader == node and gid != META_GROUP_ID)

    def others_down(self, group: ShardId, node: NodeId) -> list[NodeId]:
        """Members of ``group`` other than ``node`` that are not up.  A live
        member's metadata replica moves only when this is empty: the move
        adds a member first, which raises the quorum."""
        desc = self.map.group(group)
        return [n for n in (desc.replicas if desc else ()) if n != node and not self.is_up(n)]

    def is_up(self, node: NodeId) -> bool:
        n = self.nodes.get(node)
        return n is not None and n.liveness is Liveness.UP
