"""Conversions between user arguments, wire messages and client values.  Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cachenode._errors import CacheError, InvalidArgument, NotLeader
from cachenode._types import ClusterMap, NodeId, NodeInfo, ShardDescriptor, ShardId
from cachenode.client._results import GetResult, NodeStatus, ReplicaStatus
from cachenode.v1 import cache_pb2 as pb

KeyLike = str | bytes | bytearray | memoryview
"""A key or value as users pass it: ``str`` is encoded as UTF-8."""

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1


def to_bytes(value: object, what: str) -> bytes:
    """``value`` as bytes (``str`` -> UTF-8), or :class:`InvalidArgument`."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidArgument(
        f"{what} must be str or bytes, not {type(value).__name__}; encode it first"
    )


def to_key(key: object) -> bytes:
    """A non-empty key as bytes, or :class:`InvalidArgument`."""
    data = to_bytes(key, "key")
    if not data:
        raise InvalidArgument("key must not be empty")
    return data


def check_ttl(ttl_ms: object) -> int:
    """Wire ttl (0 = no expiry) for a user ``ttl_ms`` (``None`` = no expiry)."""
    if ttl_ms is None:
        return 0
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int):
        raise InvalidArgument(f"ttl_ms must be an int number of milliseconds, not {ttl_ms!r}")
    if ttl_ms <= 0 or ttl_ms > UINT64_MAX:
        raise InvalidArgument(
            f"ttl_ms must be a positive number of milliseconds, got {ttl_ms}; "
            "leave it out (None) for a key that never expires"
        )
    return ttl_ms


def check_int64(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be an int, not {value!r}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidArgument(f"{what} must fit in a signed 64-bit integer, got {value}")
    return value


def show_key(key: bytes, limit: int = 40) -> str:
    """A short, printable rendering of a key for error messages."""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        text = key.hex()
        return f"0x{text[:limit]}{'...' if len(text) > limit else ''}"
    text = text if len(text) <= limit else text[:limit] + "..."
    return repr(text)


def ttl_from_wire(ttl_ms: int) -> int | None:
    return None if ttl_ms < 0 else ttl_ms


def get_result(resp: pb.GetResponse) -> GetResult | None:
    if not resp.found:
        return None
    return GetResult(
        value=resp.value,
        version=resp.version,
        ttl_ms=ttl_from_wire(resp.ttl_ms),
        shard_id=resp.meta.shard_id,
        applied_index=resp.meta.applied_index,
        served_by=resp.meta.served_by,
    )


def mget_item(item: pb.MGetItem, shard_id: ShardId) -> GetResult | None:
    if not item.found:
        return None
    return GetResult(
        value=item.value,
        version=item.version,
        ttl_ms=ttl_from_wire(item.ttl_ms),
        shard_id=shard_id,
    )


def cluster_map_from_wire(msg: pb.ClusterMap) -> tuple[ClusterMap, dict[ShardId, NodeId]]:
    """The map and the leaders its sender knows (empty leader names dropped)."""
    nodes = tuple(NodeInfo(n.id, n.address, n.raft_address) for n in msg.nodes)
    shards = tuple(
        sorted(
            (
                ShardDescriptor(s.id, s.range_start, s.range_end, s.epoch, tuple(s.replicas))
                for s in msg.shards
            ),
            key=lambda s: s.range_start,
        )
    )
    leaders = {int(k): v for k, v in msg.leaders.items() if v}
    return ClusterMap(msg.version, nodes, shards), leaders


def node_status_from_wire(msg: pb.NodeStatus) -> NodeStatus:
    return NodeStatus(
        node=NodeInfo(msg.node.id, msg.node.address, msg.node.raft_address),
        replicas=tuple(
            ReplicaStatus(
                shard_id=r.shard_id,
                role=r.role,
                leader=r.leader or None,
                term=r.term,
                commit_index=r.commit_index,
                applied_index=r.applied_index,
                size_bytes=r.size_bytes,
                keys=r.keys,
            )
            for r in msg.replicas
        ),
        uptime_s=msg.uptime_s,
        version=msg.version,
        fsync=msg.fsync,
        leader_balancing=msg.leader_balancing,
        metadata_role=msg.metadata_role,
        disk_free_bytes=msg.disk.free_bytes,
        disk_capacity_bytes=msg.disk.capacity_bytes,
        disk_reserve_bytes=msg.disk.reserve_bytes,
        disk_full=msg.disk.full,
    )


def mset_items(mapping_or_items: object) -> list[tuple[bytes, bytes]]:
    """Normalize ``mset`` input: a mapping or ``(key, value)`` pairs; the last value of a key wins."""
    if isinstance(mapping_or_items, Mapping):
        pairs: Iterable[object] = mapping_or_items.items()
    elif isinstance(mapping_or_items, Iterable) and not isinstance(mapping_or_items, str | bytes):
        pairs = mapping_or_items
    else:
        raise InvalidArgument("mset takes a mapping or an iterable of (key, value) pairs")
    out: dict[bytes, bytes] = {}
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise InvalidArgument(f"mset: expected a (key, value) pair, got {pair!r}")
        key = to_key(pair[0])
        out.pop(key, None)  # a repeated key moves to its last position
        out[key] = to_bytes(pair[1], "value")
    return list(out.items())


def partial_failure(
    error: Exception, what: str, failed_groups: int, total_groups: int, write: bool
) -> Exception:
    """Re-word the first per-shard error of a fan-out so it tells what happened to the rest."""
    if not isinstance(error, CacheError) or total_groups <= 1:
        return error
    if write:
        rest = (
            f"{failed_groups} of {total_groups} shard writes failed; the keys of the other "
            "shards were written (mset is atomic per shard only)"
        )
    else:
        rest = f"{failed_groups} of {total_groups} shard reads failed"
    message = f"{what}: {rest}. First failure: {error.message}"
    if isinstance(error, NotLeader):
        return NotLeader(message, error.leader_id, error.leader_address)
    return type(error)(message)
