"""Where a key lives: key -> shard (by xxh3_64 hash range) -> leader node -> address.

:class:`RouteTable` is pure (no I/O, no clock) and thread-safe: every method may
be called from any thread at any time.  The cluster map it holds is immutable;
the leader knowledge (which changes with every election) is guarded by a lock.
Values returned to callers are immutable snapshots owned by the caller.

Leader knowledge comes from three places, newest wins:

* the ``leaders`` field of a ``GetClusterMap`` answer (:meth:`RouteTable.update`),
* a ``not_leader`` answer's hint (:meth:`RouteTable.set_leader`),
* a failure that proves the known leader wrong (:meth:`RouteTable.invalidate_leader`).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, TypeVar

from cachenode._types import ClusterMap, NodeId, NodeInfo, ShardDescriptor, ShardId, key_hash
from cachenode._value import Value

__all__ = ["Route", "RouteTable"]

T = TypeVar("T")


class Route(Value):
    """Where one key goes right now.

    ``leader_id``/``leader_address`` are ``None`` while the leader is unknown
    (an election runs, or the last known leader was invalidated).  A
    compiled value class (:mod:`cachenode._value`): one per call.
    """

    __slots__ = ("shard", "leader_id", "leader_address")
    FIELDS = ("shard", "leader_id", "leader_address")

    def __init__(self, shard: ShardDescriptor, leader_id: NodeId | None, leader_address: str | None) -> None:
        self.shard: Final[ShardDescriptor] = shard
        self.leader_id: Final[NodeId | None] = leader_id
        self.leader_address: Final[str | None] = leader_address


class RouteTable:
    """Key -> shard -> leader -> address, built from a :class:`ClusterMap`.

    Thread-safe.  Pure: it never talks to the network; the client feeds it
    what it learns.
    """

    def __init__(
        self, cluster_map: ClusterMap, leaders: Mapping[ShardId, NodeId] | None = None
    ) -> None:
        if not cluster_map.shards:
            raise ValueError("a cluster map without shards cannot route anything")
        self._lock = threading.Lock()
        self._map = cluster_map
        self._starts = [s.range_start for s in cluster_map.shards]
        # shard id -> (node id, address or None when the map's address applies)
        self._leaders: dict[ShardId, tuple[NodeId, str | None]] = {}
        for shard_id, node_id in (leaders or {}).items():
            if node_id and cluster_map.shard(shard_id) is not None:
                self._leaders[shard_id] = (node_id, None)

    # ---- the map ---------------------------------------------------------

    @property
    def cluster_map(self) -> ClusterMap:
        """The (immutable) cluster map this table routes by."""
        with self._lock:
            return self._map

    @property
    def version(self) -> int:
        with self._lock:
            return self._map.version

    def update(
        self, cluster_map: ClusterMap, leaders: Mapping[ShardId, NodeId] | None = None
    ) -> bool:
        """Adopt a newer map (same or higher version) and the leaders its sender knows.

        Returns ``False`` (and changes nothing) when ``cluster_map`` is older
        than the one held.  A leader we learned earlier is kept for a shard the
        sender names no leader for, as long as the shard's epoch is unchanged
        and the node is still one of its replicas.
        """
        if not cluster_map.shards:
            raise ValueError("a cluster map without shards cannot route anything")
        with self._lock:
            if cluster_map.version < self._map.version:
                return False
            old_map, old_leaders = self._map, self._leaders
            new_leaders: dict[ShardId, tuple[NodeId, str | None]] = {}
            for shard in cluster_map.shards:
                named = (leaders or {}).get(shard.id)
                if named:
                    new_leaders[shard.id] = (named, None)
                    continue
                kept = old_leaders.get(shard.id)
                old_shard = old_map.shard(shard.id)
                if (
                    kept is not None
                    and old_shard is not None
                    and old_shard.epoch == shard.epoch
                    and kept[0] in shard.replicas
                ):
                    new_leaders[shard.id] = kept
            self._map = cluster_map
            self._starts = [s.range_start for s in cluster_map.shards]
            self._leaders = new_leaders
            return True

    # ---- lookups ---------------------------------------------------------

    def shard_for_hash(self, h: int) -> ShardDescriptor:
        """The shard whose inclusive range owns hash ``h``."""
        with self._lock:
            return _find_shard(self._map, self._starts, h)

    def shard_for_key(self, key: bytes) -> ShardDescriptor:
        """The shard that owns ``key`` (by its xxh3_64 hash)."""
        return self.shard_for_hash(key_hash(key))

    def route(self, key: bytes) -> Route:
        """The shard of ``key`` and its leader as known right now."""
        route = self.route_all((key,))
        assert route is not None  # one key always lies on its own shard
        return route

    def route_all(self, keys: Sequence[bytes]) -> Route | None:
        """The route of ``keys[0]`` when every key lives on its shard, else
        ``None`` (the keys were grouped by an older map: regroup them).  One
        look at the map for all keys: a multi-key call's parts are checked on
        every attempt."""
        with self._lock:
            shard = _find_shard(self._map, self._starts, key_hash(keys[0]))
            for i in range(1, len(keys)):
                if not shard.owns(key_hash(keys[i])):
                    return None
            leader_id, address = self._leader_locked(shard.id)
            return Route(shard, leader_id, address)

    def shard(self, shard_id: ShardId) -> ShardDescriptor | None:
        with self._lock:
            return self._map.shard(shard_id)

    def leader(self, shard_id: ShardId) -> NodeId | None:
        """The node believed to lead ``shard_id``, or ``None``."""
        with self._lock:
            return self._leader_locked(shard_id)[0]

    def leader_address(self, shard_id: ShardId) -> str | None:
        """The client address of the believed leader of ``shard_id``, or ``None``."""
        with self._lock:
            return self._leader_locked(shard_id)[1]

    def leaders(self) -> dict[ShardId, NodeId]:
        """A snapshot of every known leader: shard id -> node id."""
        with self._lock:
            return {shard_id: node for shard_id, (node, _) in self._leaders.items()}

    def node(self, node_id: NodeId) -> NodeInfo | None:
        with self._lock:
            return self._map.node(node_id)

    def address_of(self, node_id: NodeId) -> str | None:
        """The client address of ``node_id`` according to the map."""
        with self._lock:
            info = self._map.node(node_id)
            return info.address if info is not None else None

    def replicas(self, shard_id: ShardId) -> list[tuple[NodeId, str]]:
        """``(node id, address)`` of every replica of ``shard_id`` the map can place."""
        with self._lock:
            shard = self._map.shard(shard_id)
            if shard is None:
                return []
            out = []
            for node_id in shard.replicas:
                info = self._map.node(node_id)
                if info is not None:
                    out.append((node_id, info.address))
            return out

    def addresses(self) -> list[str]:
        """Client addresses of every node in the map, in map order."""
        with self._lock:
            return [n.address for n in self._map.nodes]

    # ---- leader knowledge ------------------------------------------------

    def set_leader(self, shard_id: ShardId, node_id: NodeId, address: str | None = None) -> None:
        """Record that ``node_id`` leads ``shard_id``.

        ``address`` overrides the map's address for that node (a hint may name
        a node this map does not know yet).  Unknown shards are ignored.
        """
        if not node_id:
            raise ValueError("node_id must not be empty")
        with self._lock:
            if self._map.shard(shard_id) is None:
                return
            self._leaders[shard_id] = (node_id, address or None)

    def invalidate_leader(self, shard_id: ShardId, node_id: NodeId | None = None) -> None:
        """Forget the leader of ``shard_id``.

        With ``node_id``, forget it only if that node is still the one believed
        to lead (so a late failure report cannot erase newer knowledge).
        """
        with self._lock:
            current = self._leaders.get(shard_id)
            if current is None:
                return
            if node_id is None or current[0] == node_id:
                del self._leaders[shard_id]

    # ---- fan-out ---------------------------------------------------------

    def group_keys(self, keys: Iterable[bytes]) -> dict[ShardId, list[bytes]]:
        """Split ``keys`` by owning shard.

        Shards appear in order of their first key; keys keep their order within
        a shard; a repeated key is kept once.
        """
        out: dict[ShardId, list[bytes]] = {}
        seen: set[bytes] = set()
        with self._lock:
            for key in keys:
                if key in seen:
                    continue
                seen.add(key)
                shard = _find_shard(self._map, self._starts, key_hash(key))
                out.setdefault(shard.id, []).append(key)
        return out

    def group_items(self, items: Iterable[tuple[bytes, T]]) -> dict[ShardId, list[tuple[bytes, T]]]:
        """Split ``(key, value)`` pairs by the shard that owns the key.

        Shards appear in order of their first key; pairs keep their order.
        Duplicates are kept (callers dedup if they need to).
        """
        out: dict[ShardId, list[tuple[bytes, T]]] = {}
        with self._lock:
            for key, value in items:
                shard = _find_shard(self._map, self._starts, key_hash(key))
                out.setdefault(shard.id, []).append((key, value))
        return out

    # ---- internals -------------------------------------------------------

    def _leader_locked(self, shard_id: ShardId) -> tuple[NodeId | None, str | None]:
        known = self._leaders.get(shard_id)
        if known is None:
            return None, None
        node_id, address = known
        if address is None:
            info = self._map.node(node_id)
            address = info.address if info is not None else None
        return node_id, address

    def __repr__(self) -> str:
        with self._lock:
            return (
                f"RouteTable(version={self._map.version}, shards={len(self._map.shards)}, "
                f"leaders={ {k: v[0] for k, v in self._leaders.items()} })"
            )


def _find_shard(cluster_map: ClusterMap, starts: list[int], h: int) -> ShardDescriptor:
    i = bisect.bisect_right(starts, h) - 1
    if i < 0:
        raise LookupError(f"no shard owns hash {h:#x}: the map does not start at 0")
    shard = cluster_map.shards[i]
    if not shard.owns(h):
        raise LookupError(f"no shard owns hash {h:#x}: the map has a gap after shard {shard.id}")
    return shard
