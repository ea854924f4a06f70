"""Values shared by every layer: ids, shard descriptors, the cluster map.

Pure data and pure functions only; imports nothing of ours.  Safe to use from
any thread (all values are frozen).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Sequence

import xxhash

NodeId = str
ShardId = int

HASH_SPACE = 1 << 64
META_GROUP_ID = 0xFFFF_FFFF
"""Group id of the cluster-metadata Raft group (shard ids are 0..2**32-2)."""

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""The largest gRPC message a node or a cachenode client sends or accepts,
both ways (gRPC's default is 4 MiB to receive): an mget of a few 1 MiB
values must reach its caller."""

STREAM_ACCEPTED = "cachenode-stream"
"""The header (value "1") a node sends when it accepts a BatchStream, before
it reads any request; a refused stream ends without it."""


def group_label(group_id: int) -> str:
    """How messages name a Raft group: ``shard 3`` or ``the metadata group``."""
    return "the metadata group" if group_id == META_GROUP_ID else f"shard {group_id}"


def key_hash(key: bytes) -> int:
    """The xxh3_64 hash that places ``key`` in the hash space."""
    return xxhash.xxh3_64_intdigest(key)


SERVING = "serving"
DRAINING = "draining"
REMOVING = "removing"
NODE_STATES = (SERVING, DRAINING, REMOVING)
"""Administrative node states, kept in the map (liveness is not: the
placement driver judges it from heartbeats).  ``draining``: move every
replica and leader away, then the node is removable.  ``removing``: like
draining, and the node leaves the map once it holds nothing."""


@dataclasses.dataclass(frozen=True, slots=True)
class NodeInfo:
    id: NodeId
    address: str  # client gRPC host:port
    raft_address: str  # Raft peer host:port
    state: str = SERVING


@dataclasses.dataclass(frozen=True, slots=True)
class ShardDescriptor:
    """A shard owns the inclusive hash range [range_start, range_end]."""

    id: ShardId
    range_start: int
    range_end: int
    epoch: int
    replicas: tuple[NodeId, ...]

    def owns(self, h: int) -> bool:
        return self.range_start <= h <= self.range_end


def split_ranges(shards: int) -> list[tuple[int, int]]:
    """Split the 64-bit hash space into ``shards`` contiguous, equal ranges."""
    if shards < 1:
        raise ValueError("shards must be >= 1")
    bounds = [i * HASH_SPACE // shards for i in range(shards + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(shards)]


def initial_placement(
    node_ids: Sequence[NodeId], shards: int, replication: int
) -> list[ShardDescriptor]:
    """Deterministic round-robin placement used once, at bootstrap.

    Shard i gets nodes i, i+1, ... (mod N), so replicas and first replicas
    (the preferred leaders) are spread evenly.
    """
    nodes = sorted(node_ids)
    if not nodes:
        raise ValueError("no nodes")
    rf = min(replication, len(nodes))
    out = []
    for i, (lo, hi) in enumerate(split_ranges(shards)):
        replicas = tuple(nodes[(i + j) % len(nodes)] for j in range(rf))
        out.append(ShardDescriptor(i, lo, hi, 1, replicas))
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterMap:
    """The agreed cluster layout.  ``version`` grows with every change."""

    version: int
    nodes: tuple[NodeInfo, ...]
    shards: tuple[ShardDescriptor, ...]
    meta: tuple[NodeId, ...] = ()
    """Members of the metadata Raft group (where the placement driver runs)."""
    _starts: tuple[int, ...] = dataclasses.field(default=(), init=False, repr=False, compare=False)
    """Each shard's range_start, for bisect (computed once: every key's lookup uses it)."""

    def __post_init__(self) -> None:
        starts = tuple(s.range_start for s in self.shards)
        if list(starts) != sorted(starts):
            raise ValueError("shards must be sorted by range_start")
        object.__setattr__(self, "_starts", starts)

    def node(self, node_id: NodeId) -> NodeInfo | None:
        for n in self.nodes:
            if n.id == node_id:
                return n
        return None

    def shard(self, shard_id: ShardId) -> ShardDescriptor | None:
        for s in self.shards:
            if s.id == shard_id:
                return s
        return None

    def group(self, group_id: int) -> ShardDescriptor | None:
        """A shard's descriptor, or for :data:`META_GROUP_ID` a descriptor of
        the metadata group (no key range; ``replicas`` = ``meta``), so the
        placement driver can move metadata replicas with the same operators
        as shard replicas.  None when unknown (or a map without ``meta``)."""
        if group_id == META_GROUP_ID:
            return ShardDescriptor(META_GROUP_ID, 0, -1, 1, self.meta) if self.meta else None
        return self.shard(group_id)

    def groups(self) -> list[ShardDescriptor]:
        """The metadata group (when the map names it), then every shard:
        repairs start with the control plane."""
        meta = self.group(META_GROUP_ID)
        return [meta, *self.shards] if meta is not None else list(self.shards)

    def shard_for_hash(self, h: int) -> ShardDescriptor:
        i = bisect.bisect_right(self._starts, h) - 1
        s = self.shards[i]
        if not s.owns(h):  # pragma: no cover - a gap would be a bug in the map
            raise LookupError(f"no shard owns hash {h}")
        return s

    def shard_for_key(self, key: bytes) -> ShardDescriptor:
        return self.shard_for_hash(key_hash(key))

    def shards_on(self, node_id: NodeId) -> list[ShardDescriptor]:
        return [s for s in self.shards if node_id in s.replicas]

    # ---- edits: each returns the next map (version + 1) -------------------

    def with_node(self, node: NodeInfo) -> ClusterMap:
        """Add ``node``, or replace the node with the same id."""
        nodes = tuple(sorted([n for n in self.nodes if n.id != node.id] + [node], key=lambda n: n.id))
        return dataclasses.replace(self, version=self.version + 1, nodes=nodes)

    def without_node(self, node_id: NodeId) -> ClusterMap:
        if self.shards_on(node_id) or node_id in self.meta:
            raise ValueError(f"node {node_id} still holds replicas")
        nodes = tuple(n for n in self.nodes if n.id != node_id)
        return dataclasses.replace(self, version=self.version + 1, nodes=nodes)

    def with_replicas(self, shard_id: ShardId, replicas: Sequence[NodeId]) -> ClusterMap:
        """Set a shard's replica list (first = preferred leader); epoch + 1.
        For :data:`META_GROUP_ID`, set the metadata group's members."""
        if len(set(replicas)) != len(replicas):
            raise ValueError(f"{group_label(shard_id)}: two replicas on one node: {list(replicas)}")
        if shard_id == META_GROUP_ID:
            if not replicas:
                raise ValueError("the metadata group needs at least one member")
            return dataclasses.replace(self, version=self.version + 1, meta=tuple(replicas))
        shards = tuple(
            dataclasses.replace(s, epoch=s.epoch + 1, replicas=tuple(replicas)) if s.id == shard_id else s
            for s in self.shards
        )
        return dataclasses.replace(self, version=self.version + 1, shards=shards)

    def node_state(self, node_id: NodeId) -> str | None:
        n = self.node(node_id)
        return n.state if n else None

    @staticmethod
    def bootstrap(
        nodes: Iterable[NodeInfo], shards: int, replication: int
    ) -> ClusterMap:
        ns = tuple(sorted(nodes, key=lambda n: n.id))
        return ClusterMap(
            1, ns, tuple(initial_placement([n.id for n in ns], shards, replication)),
            meta=tuple(n.id for n in ns),
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "nodes": [dataclasses.asdict(n) for n in self.nodes],
            "shards": [
                {**dataclasses.asdict(s), "replicas": list(s.replicas)} for s in self.shards
            ],
            "meta": list(self.meta),
        }

    @staticmethod
    def from_dict(d: dict[str, object]) -> ClusterMap:
        nodes = tuple(NodeInfo(**n) for n in d["nodes"])  # type: ignore[attr-defined]
        shards = tuple(
            ShardDescriptor(
                s["id"], s["range_start"], s["range_end"], s["epoch"], tuple(s["replicas"])
            )
            for s in d["shards"]  # type: ignore[attr-defined]
        )
        meta: tuple[NodeId, ...] = tuple(d.get("meta") or ())  # type: ignore[arg-type]
        return ClusterMap(int(d["version"]), nodes, shards, meta)  # type: ignore[call-overload]
