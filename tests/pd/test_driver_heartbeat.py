"""The placement driver's heartbeat reply and manual operators, with a
metadata store in memory.

The PD asks nodes for reports every ``busy_heartbeat_s`` while an operator
runs (so each step is seen done quickly) and at their own pace otherwise; it
names the paused schedulers, which nodes obey for their own leader moves."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from cachenode._errors import FailedPrecondition
from cachenode._types import META_GROUP_ID, ClusterMap, NodeInfo
from cachenode.pd.driver import PdConfig, PlacementDriver
from cachenode.pd.model import ReplicaReport, StoreStats


class MemoryMeta:
    """The MetaStore protocol over two fields; every proposal succeeds."""

    def __init__(self, m: ClusterMap) -> None:
        self.map = m
        self.record: dict[str, Any] = {"version": 0}

    def is_leader(self) -> bool:
        return True

    def leader_hint(self) -> tuple[str | None, str | None]:
        return "n1", None

    def read(self) -> tuple[ClusterMap | None, dict[str, Any]]:
        return self.map, self.record

    def barrier(self, timeout: float) -> None:
        pass

    def propose(self, payload: bytes, timeout: float) -> dict[str, Any]:
        cmd = msgpack.unpackb(payload)
        if cmd["op"] == "set_map":
            self.map = ClusterMap.from_dict(cmd["map"])
        elif cmd["op"] == "set_pd":
            self.record = cmd["pd"]
        return {"ok": True}


def _beat(pd: PlacementDriver, m: ClusterMap, node: str) -> Any:
    reps = tuple(
        ReplicaReport(s.id, "leader" if s.replicas[0] == node else "follower", s.replicas[0], 1, 5, 5,
                      tuple(s.replicas), {})
        for s in m.shards if node in s.replicas
    )
    return pd.heartbeat(NodeInfo(node, f"{node}:1", f"{node}:2"), m.version, StoreStats(), reps)


def test_nodes_report_sooner_only_while_an_operator_involving_them_runs() -> None:
    nodes = [NodeInfo(f"n{i}", f"n{i}:1", f"n{i}:2") for i in (1, 2, 3, 4, 5)]
    m = ClusterMap.bootstrap(nodes[:3], 2, 3).with_node(nodes[3]).with_node(nodes[4])
    meta = MemoryMeta(m)
    clock = [100.0]
    pd = PlacementDriver("n1", meta, PdConfig(heartbeat_s=0.5, busy_heartbeat_s=0.1), monotonic=lambda: clock[0])
    pd._tick()  # take over
    for n in ("n1", "n2", "n3", "n4", "n5"):
        assert _beat(pd, meta.map, n).next_heartbeat_s == 0.0  # idle: the node's own pace
    assert pd.set_scheduler("balance-replica", True) == ["balance-replica"]
    reply = _beat(pd, meta.map, "n2")
    assert reply.paused == ["balance-replica"] and reply.next_heartbeat_s == 0.0

    s = meta.map.shards[0]
    op = pd.add_operator("move-replica", s.id, s.replicas[-1], "n4")
    assert _beat(pd, meta.map, "n5").next_heartbeat_s == 0.0  # not involved: its own pace,
    assert not pd._wake.is_set()  # and its report wakes nothing
    for n in (*s.replicas, "n4"):  # the shard's replicas and the node it moves to
        pd._wake.clear()
        reply = _beat(pd, meta.map, n)
        assert reply.next_heartbeat_s == 0.1  # report sooner ...
        assert pd._wake.is_set()  # ... and each report wakes the PD's loop

    pd.cancel_operator(op.id)
    assert _beat(pd, meta.map, "n4").next_heartbeat_s == 0.0


def test_no_faster_reports_when_the_nodes_pace_is_already_faster() -> None:
    nodes = [NodeInfo(f"n{i}", f"n{i}:1", f"n{i}:2") for i in (1, 2, 3, 4)]
    m = ClusterMap.bootstrap(nodes[:3], 2, 3).with_node(nodes[3])
    meta = MemoryMeta(m)
    pd = PlacementDriver("n1", meta, PdConfig(heartbeat_s=0.05, busy_heartbeat_s=0.1), monotonic=lambda: 100.0)
    pd._tick()
    s = meta.map.shards[0]
    pd.add_operator("move-replica", s.id, s.replicas[-1], "n4")
    assert _beat(pd, meta.map, "n4").next_heartbeat_s == 0.0


def test_a_user_moves_the_metadata_replica_like_a_shard_replica() -> None:
    """``cachectl operator add move-replica --shard meta``: the same steps as
    a shard's, applied to the map's metadata members; refused while another
    member is down (adding first would raise the quorum then)."""
    nodes = [NodeInfo(f"n{i}", f"n{i}:1", f"n{i}:2") for i in (1, 2, 3, 4)]
    m = ClusterMap.bootstrap(nodes[:3], 2, 3).with_node(nodes[3])
    meta = MemoryMeta(m)
    clock = [100.0]
    pd = PlacementDriver("n1", meta, PdConfig(heartbeat_s=0.5, down_after_s=3.0), monotonic=lambda: clock[0])
    pd._tick()
    clock[0] += 5.0  # n2 is silent: down
    for n in ("n1", "n3", "n4"):
        _beat(pd, meta.map, n)
    with pytest.raises(FailedPrecondition, match="metadata member n2 is down"):
        pd.add_operator("move-replica", META_GROUP_ID, "n3", "n4")

    _beat(pd, meta.map, "n2")  # back
    op = pd.add_operator("move-replica", META_GROUP_ID, "n3", "n4")
    assert [s.kind.value for s in op.steps][:2] == ["add_to_map", "add_member"]
    assert op.summary().startswith("move-replica the metadata group:")
    pd._tick(plan=False)  # the first step edits the map's metadata members
    assert meta.map.meta == ("n1", "n2", "n3", "n4")
