"""RouteTable: pure key -> shard -> leader -> address routing."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachenode._types import HASH_SPACE, ClusterMap, NodeInfo, ShardDescriptor, key_hash
from cachenode.client import Route, RouteTable

NODES = tuple(
    NodeInfo(f"n{i}", f"127.0.0.1:{7000 + i}", f"127.0.0.1:{8000 + i}") for i in (1, 2, 3)
)


def make_map(shards: int = 4, version: int = 1, nodes: tuple[NodeInfo, ...] = NODES) -> ClusterMap:
    m = ClusterMap.bootstrap(nodes, shards, 3)
    return ClusterMap(version, m.nodes, m.shards)


@st.composite
def cluster_maps(draw: st.DrawFn) -> ClusterMap:
    """Maps with random contiguous ranges covering the whole hash space."""
    n = draw(st.integers(min_value=1, max_value=12))
    cuts = sorted(
        draw(
            st.sets(
                st.integers(min_value=1, max_value=HASH_SPACE - 1), min_size=n - 1, max_size=n - 1
            )
        )
    )
    bounds = [0, *cuts, HASH_SPACE]
    ids = draw(st.permutations(list(range(n))))
    shards = tuple(
        ShardDescriptor(
            ids[i], bounds[i], bounds[i + 1] - 1, draw(st.integers(1, 5)), ("n1", "n2", "n3")
        )
        for i in range(n)
    )
    return ClusterMap(1, NODES, shards)


keys = st.binary(min_size=1, max_size=64)


@settings(max_examples=200, deadline=None)
@given(cluster_maps(), st.lists(keys, min_size=1, max_size=20))
def test_every_key_maps_to_exactly_the_shard_owning_its_hash(
    m: ClusterMap, ks: list[bytes]
) -> None:
    table = RouteTable(m)
    for k in ks:
        h = key_hash(k)
        owners = [s for s in m.shards if s.range_start <= h <= s.range_end]
        assert len(owners) == 1
        assert table.shard_for_key(k) == owners[0]
        assert table.route(k).shard == owners[0]


@settings(max_examples=200, deadline=None)
@given(cluster_maps(), st.integers(min_value=0, max_value=HASH_SPACE - 1))
def test_every_hash_has_one_owner(m: ClusterMap, h: int) -> None:
    shard = RouteTable(m).shard_for_hash(h)
    assert shard.owns(h)
    assert sum(s.owns(h) for s in m.shards) == 1


@settings(max_examples=100, deadline=None)
@given(cluster_maps(), st.lists(keys, max_size=40))
def test_group_keys_partitions_keys_by_owner(m: ClusterMap, ks: list[bytes]) -> None:
    table = RouteTable(m)
    groups = table.group_keys(ks)
    flat = [k for g in groups.values() for k in g]
    assert sorted(flat) == sorted(set(ks))  # every key once
    for shard_id, group in groups.items():
        assert all(table.shard_for_key(k).id == shard_id for k in group)
        # order within a shard follows first appearance
        assert group == sorted(group, key=ks.index)


@settings(max_examples=50, deadline=None)
@given(cluster_maps(), st.lists(st.tuples(keys, st.integers()), max_size=30))
def test_group_items_keeps_pairs_and_order(m: ClusterMap, items: list[tuple[bytes, int]]) -> None:
    table = RouteTable(m)
    groups = table.group_items(items)
    assert sum(len(g) for g in groups.values()) == len(items)
    for shard_id, group in groups.items():
        assert group == [it for it in items if table.shard_for_key(it[0]).id == shard_id]


@settings(max_examples=100, deadline=None)
@given(cluster_maps(), st.lists(keys, min_size=1, max_size=12), st.data())
def test_route_all_routes_a_group_only_while_every_key_is_on_its_shard(
    m: ClusterMap, ks: list[bytes], data: st.DataObject
) -> None:
    table = RouteTable(m)
    # A group as a multi-key call builds it (one shard's keys), then perhaps
    # with one key of whatever shard: the same map, or one that moved a range.
    group = table.group_keys(ks)[table.shard_for_key(ks[0]).id]
    extra = data.draw(st.lists(keys, max_size=1))
    ids = {table.shard_for_key(k).id for k in group + extra}
    route = table.route_all(group + extra)
    if len(ids) == 1:
        assert route is not None
        assert route == table.route(ks[0])
    else:
        assert route is None


def test_boundaries_of_bootstrap_ranges() -> None:
    m = make_map(4)
    table = RouteTable(m)
    for s in m.shards:
        assert table.shard_for_hash(s.range_start) == s
        assert table.shard_for_hash(s.range_end) == s
    assert table.shard_for_hash(0).id == 0
    assert table.shard_for_hash(HASH_SPACE - 1).id == 3


def test_leaders_from_map_and_addresses() -> None:
    m = make_map(2)
    table = RouteTable(m, {0: "n2"})
    assert table.leader(0) == "n2"
    assert table.leader_address(0) == "127.0.0.1:7002"
    assert table.leader(1) is None and table.leader_address(1) is None
    key = next(k for k in (f"k{i}".encode() for i in range(1000)) if table.shard_for_key(k).id == 0)
    assert table.route(key) == Route(m.shards[0], "n2", "127.0.0.1:7002")


def test_set_and_invalidate_leader() -> None:
    table = RouteTable(make_map(2))
    table.set_leader(1, "n3")
    assert table.leader_address(1) == "127.0.0.1:7003"
    table.set_leader(1, "n9", "10.0.0.9:7009")  # a node this map does not know yet
    assert (table.leader(1), table.leader_address(1)) == ("n9", "10.0.0.9:7009")
    table.invalidate_leader(1, "n3")  # stale report about a former leader: ignored
    assert table.leader(1) == "n9"
    table.invalidate_leader(1, "n9")
    assert table.leader(1) is None
    table.set_leader(1, "n1")
    table.invalidate_leader(1)
    assert table.leaders() == {}
    table.set_leader(42, "n1")  # unknown shard: ignored
    assert 42 not in table.leaders()
    with pytest.raises(ValueError):
        table.set_leader(0, "")


def test_leader_address_follows_map_updates() -> None:
    table = RouteTable(make_map(2), {0: "n1"})
    moved = tuple(NodeInfo(n.id, n.address.replace("70", "90"), n.raft_address) for n in NODES)
    assert table.update(make_map(2, version=2, nodes=moved))
    assert table.leader_address(0) == "127.0.0.1:9001"


def test_update_ignores_older_maps_and_keeps_known_leaders() -> None:
    table = RouteTable(make_map(2, version=5), {0: "n1"})
    table.set_leader(1, "n2")
    assert not table.update(make_map(2, version=4), {0: "n3"})
    assert table.version == 5 and table.leader(0) == "n1"
    # newer map naming a leader for shard 0 only: shard 1 keeps what we learned
    assert table.update(make_map(2, version=6), {0: "n3"})
    assert table.leaders() == {0: "n3", 1: "n2"}


def test_update_drops_leader_when_epoch_changes() -> None:
    m = make_map(2, version=1)
    table = RouteTable(m, {1: "n2"})
    bumped = tuple(
        ShardDescriptor(s.id, s.range_start, s.range_end, s.epoch + (s.id == 1), s.replicas)
        for s in m.shards
    )
    table.update(ClusterMap(2, m.nodes, bumped))
    assert table.leader(1) is None


def test_update_drops_leader_that_is_no_longer_a_replica() -> None:
    m = make_map(2, version=1)
    table = RouteTable(m, {1: "n2"})
    shrunk = tuple(
        ShardDescriptor(s.id, s.range_start, s.range_end, s.epoch, ("n1", "n3")) for s in m.shards
    )
    table.update(ClusterMap(2, m.nodes, shrunk))
    assert table.leader(1) is None


def test_replicas_and_addresses() -> None:
    table = RouteTable(make_map(3))
    assert table.replicas(0) == [
        ("n1", "127.0.0.1:7001"),
        ("n2", "127.0.0.1:7002"),
        ("n3", "127.0.0.1:7003"),
    ]
    assert table.replicas(99) == []
    assert table.addresses() == ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
    assert table.address_of("n2") == "127.0.0.1:7002" and table.address_of("zz") is None


def test_gap_in_map_is_reported() -> None:
    shards = (ShardDescriptor(0, 10, HASH_SPACE - 1, 1, ("n1",)),)
    table = RouteTable(ClusterMap(1, NODES, shards))
    with pytest.raises(LookupError, match="does not start at 0"):
        table.shard_for_hash(3)


def test_empty_map_rejected() -> None:
    with pytest.raises(ValueError):
        RouteTable(ClusterMap(1, NODES, ()))


def test_concurrent_updates_and_lookups_are_consistent() -> None:
    table = RouteTable(make_map(4), {i: "n1" for i in range(4)})
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        v = 2
        while not stop.is_set():
            table.update(make_map(4, version=v), {i: f"n{1 + v % 3}" for i in range(4)})
            table.invalidate_leader(v % 4)
            table.set_leader(v % 4, "n2")
            v += 1

    def reader() -> None:
        try:
            for i in range(3000):
                r = table.route(f"key-{i}".encode())
                assert r.shard.owns(key_hash(f"key-{i}".encode()))
                assert (r.leader_id is None) == (r.leader_address is None)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    w = threading.Thread(target=writer)
    readers = [threading.Thread(target=reader) for _ in range(3)]
    w.start()
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    stop.set()
    w.join()
    assert not errors
