"""The placement driver with real processes: nodes join, drain, die.

Each test runs a local cluster through ``cachectl local``; conditions are
waited for with deadlines.  The add-two-nodes test prints the figures the
issue asks for (balancing time, operators run, longest write blip); run it
with ``-s`` to see them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from _nodes import LocalCluster, cachectl, local_cluster, wait_for

from cachenode.client import CacheClient
from cachenode.v1 import cache_pb2 as pb

pytestmark = pytest.mark.cluster

FAST_PD = ["--heartbeat-interval=0.3s", "--down-after=1.5s"]


class Writer:
    """Writes unique keys one after another through the smart client and
    remembers every acknowledged one and the longest gap between two acks."""

    def __init__(self, endpoints: str) -> None:
        self.client = CacheClient(endpoints, timeout=5.0, max_attempts=10)
        self.acked: dict[str, str] = {}
        self.errors: list[str] = []
        self.longest_gap = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()

    def _run(self) -> None:
        i = 0
        last_ack = time.monotonic()
        while not self._stop.is_set():
            key, value = f"w:{i}", f"v{i}"
            try:
                self.client.set(key, value)
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - last_ack)
                last_ack = now
                self.acked[key] = value
            except Exception as e:  # an unacknowledged write may or may not exist: not checked
                self.errors.append(f"{key}: {e}")
            i += 1
            time.sleep(0.005)

    def verify(self, endpoints: str) -> None:
        with CacheClient(endpoints, timeout=5.0, max_attempts=10) as c:
            missing = []
            for k, v in self.acked.items():
                got = c.get(k)
                if got is None or got.value != v.encode():
                    missing.append(k)
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


def balanced(st: pb.PdStatus, nodes: int) -> bool:
    live = [n for n in st.nodes if n.state == "serving" and n.liveness == "up"]
    if len(live) != nodes:
        return False
    reps = [n.replicas for n in live]
    leads = [n.leaders for n in live]
    running = [o for o in st.operators if o.status == "running"]
    return max(reps) - min(reps) <= 1 and max(leads) - min(leads) <= 1 and not running


def every_shard_led(c: LocalCluster) -> bool:
    st = c.pd_status()
    return sum(n.leaders for n in st.nodes) == 16 if len(st.nodes) else False


def test_two_new_nodes_get_balanced_without_losing_writes(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "c", nodes=3, shards=16, extra=FAST_PD) as c:
        c.wait_all_leaders()
        with Writer(c.endpoints) as w:
            wait_for(lambda: len(w.acked) > 50, 30, "the writer to get going")
            started = time.monotonic()
            n4 = c.add_node()
            n5 = c.add_node()
            def balanced_status() -> pb.PdStatus | None:
                s = c.pd_status()
                return s if balanced(s, 5) else None

            st = wait_for(balanced_status, 120, "replicas and leaders balanced to +/-1")
            took = time.monotonic() - started
            # keep writing a moment after the last move
            n = len(w.acked)
            wait_for(lambda: len(w.acked) > n + 50, 30, "writes after balancing")
        w.verify(c.endpoints)
        ops = [o for o in st.operators if o.status == "success"]
        failed = [o for o in st.operators if o.status in ("timeout", "failed")]
        counts = {x.id: (x.replicas, x.leaders) for x in st.nodes}
        assert counts[n4][0] > 0 and counts[n5][0] > 0
        # every shard still has exactly 3 replicas on distinct nodes
        m = c.admin(n5).GetClusterMap(pb.ClusterMapRequest(), timeout=2)
        for s in m.shards:
            assert len(set(s.replicas)) == len(s.replicas) == 3, s
        print(json.dumps({
            "balanced_after_s": round(took, 1), "operators_succeeded": len(ops),
            "operators_failed": len(failed), "writes_acked": len(w.acked),
            "longest_write_gap_s": round(w.longest_gap, 3), "counts": counts,
        }))


def test_drain_moves_everything_off_a_node(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "c", nodes=3, shards=8, extra=FAST_PD) as c:
        c.wait_all_leaders()
        n4 = c.add_node()
        wait_for(lambda: balanced(c.pd_status(), 4), 90, "the new node to be balanced in")
        with Writer(c.endpoints) as w:
            r = cachectl("node", "drain", n4, "--endpoints", c.endpoints)
            assert r.returncode == 0, r.stderr
            assert "draining" in r.stdout

            def drained() -> bool:
                st = c.pd_status()
                node = next(x for x in st.nodes if x.id == n4)
                hosted = c.replica_status(n4)
                return node.removable and node.replicas == 0 and node.leaders == 0 and not hosted

            wait_for(drained, 90, f"{n4} to hold no replica and no leader")
        w.verify(c.endpoints)
        # the cluster still serves every shard
        with CacheClient(c.endpoints, timeout=5.0) as cl:
            for i in range(64):
                cl.set(f"after:{i}", "x")
            assert all(cl.get(f"after:{i}") is not None for i in range(64))
        r = cachectl("node", "remove", n4, "--endpoints", c.endpoints)
        assert r.returncode == 0, r.stderr
        assert n4 not in {x.id for x in c.pd_status().nodes}
        # the removed node, still running, says so and what to do
        log_file = Path(c.node(n4)["log"])
        wait_for(lambda: "restart it with --join" in log_file.read_text(), 15, f"{n4} to log that it was removed")
        # a live, serving node is not removed: precise error, non-zero exit
        r = cachectl("node", "remove", "n1", "--endpoints", c.endpoints)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "a metadata replica; drain it first: cachectl node drain n1" in r.stderr


def node_doc(node: str, endpoints: str) -> dict[str, object]:
    """``cachectl status --json``'s entry for ``node`` ({} if it failed)."""
    r = cachectl("status", "--json", "--endpoints", endpoints)
    if r.returncode != 0:
        return {}
    return next((n for n in json.loads(r.stdout)["nodes"] if n["id"] == node), {})


META_GROUP = str(0xFFFF_FFFF)


def registry(c: LocalCluster, node: str) -> dict[str, dict[str, object]]:
    """The node's ``replicas.json``: the replicas it hosts, by group id."""
    return json.loads((Path(c.node(node)["data_dir"]) / "replicas.json").read_text())  # type: ignore[no-any-return]


def meta_members(st: pb.PdStatus) -> set[str]:
    return {n.id for n in st.nodes if n.meta}


def test_dead_metadata_member_is_replaced_so_a_second_loss_is_survived(tmp_path: Path) -> None:
    """The metadata group (the PD's own Raft group) is repaired like a
    shard: a first node that dies for good and is removed has its metadata
    replica re-created on a live node.  Before, the control plane then ran on
    2 of 3 for good, and losing a second first node stopped the PD.  Now the
    PD still answers after that second loss and every shard takes writes."""
    with local_cluster(tmp_path / "c", nodes=3, shards=4, extra=FAST_PD) as c:
        c.wait_all_leaders()
        n4 = c.add_node()
        wait_for(lambda: balanced(c.pd_status(), 4), 90, f"{n4} to be balanced in")
        assert node_doc(n4, c.endpoints)["metadata"] is None
        assert META_GROUP not in registry(c, n4)
        with CacheClient(c.endpoints, timeout=5.0, max_attempts=10) as cl:
            for i in range(40):
                cl.set(f"k:{i}", f"v{i}")
        first = c.pd_status().pd_node  # kill the PD itself: it must move first
        c.kill9(first)

        def seen_down() -> bool:
            st = c.pd_status()
            return next(x for x in st.nodes if x.id == first).liveness != "up"

        wait_for(seen_down, 30, f"the PD to see {first} down")
        r = cachectl("node", "remove", first, "--endpoints", c.endpoints)
        assert r.returncode == 0, r.stderr
        assert "and a metadata replica are re-created elsewhere first" in r.stdout

        def repaired() -> bool:
            st = c.pd_status()
            running = [o for o in st.operators if o.status == "running"]
            return first not in {x.id for x in st.nodes} and meta_members(st) == set(c.node_ids) - {first} and not running

        wait_for(repaired, 90, f"{first} removed and its metadata replica re-created")
        assert n4 in meta_members(c.pd_status())
        wait_for(lambda: node_doc(n4, c.endpoints).get("metadata") in ("leader", "follower"), 30, f"{n4} to host a metadata replica")
        # its record survives a restart: it joined with --join, so only the record says it is a member
        assert n4 in registry(c, n4)[META_GROUP]["members"]  # type: ignore[operator]
        c.stop_node(n4)
        c.start_node(n4)
        wait_for(lambda: node_doc(n4, c.endpoints).get("metadata") in ("leader", "follower"), 30, f"{n4} to host its metadata replica again")

        second = next(n for n in c.node_ids if n not in (first, n4))
        c.kill9(second)
        # the PD still runs (2 of 3 metadata replicas live) and sees the loss
        def pd_sees_second_down() -> bool:
            try:
                st = c.pd_status()
            except grpc.RpcError:
                return False
            return next(x for x in st.nodes if x.id == second).liveness != "up"

        wait_for(pd_sees_second_down, 30, f"a placement driver that sees {second} down")
        with CacheClient(c.endpoints, timeout=5.0, max_attempts=10) as cl:
            for i in range(40):
                got = cl.get(f"k:{i}")
                assert got is not None and got.value == f"v{i}".encode(), i
                cl.set(f"after:{i}", "x")


def test_dead_node_replicas_recreated_and_cleaned_up_on_return(tmp_path: Path) -> None:
    extra = FAST_PD + ["--max-down-time=4s"]
    with local_cluster(tmp_path / "c", nodes=4, shards=8, extra=extra) as c:
        c.wait_all_leaders()
        with CacheClient(c.endpoints, timeout=5.0) as cl:
            for i in range(100):
                cl.set(f"k:{i}", f"v{i}")
        victim = "n4"
        had = set(c.replica_status(victim))
        assert had, "the victim should hold replicas"
        c.kill9(victim)

        def repaired() -> bool:
            st = c.pd_status()
            m = c.admin("n1").GetClusterMap(pb.ClusterMapRequest(), timeout=2)
            if any(victim in s.replicas or len(s.replicas) != 3 for s in m.shards):
                return False
            led = sum(x.leaders for x in st.nodes if x.id != victim)
            return led == len(m.shards) and not [o for o in st.operators if o.status == "running"]

        wait_for(repaired, 90, "every shard back at 3 replicas on live nodes")
        with CacheClient(c.endpoints, timeout=5.0) as cl:
            for i in range(100):
                got = cl.get(f"k:{i}")
                assert got is not None and got.value == f"v{i}".encode(), i
        # the node returns: its stale replicas are deleted (balancing paused,
        # or the PD would at once move replicas back onto the empty node)
        for name in ("balance-replica", "balance-leader"):
            assert cachectl("scheduler", "pause", name, "--endpoints", c.endpoints).returncode == 0
        c.start_node(victim)
        def back_and_clean() -> bool:
            # up per the PD (its heartbeats arrive), and hosting nothing: the
            # stale replicas it restarted with were deleted
            st = c.pd_status()
            up = next(x for x in st.nodes if x.id == victim).liveness == "up"
            return up and not c.replica_status(victim)

        wait_for(back_and_clean, 60, f"{victim} to report in and delete its stale replicas")


def test_manual_operator_and_scheduler_pause(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "c", nodes=4, shards=4, extra=FAST_PD) as c:
        c.wait_all_leaders()
        wait_for(lambda: balanced(c.pd_status(), 4), 60, "a balanced start")
        eps = ["--endpoints", c.endpoints]
        for name in ("balance-replica", "balance-leader"):
            assert cachectl("scheduler", "pause", name, *eps).returncode == 0
        m = c.admin("n1").GetClusterMap(pb.ClusterMapRequest(), timeout=2)
        s = m.shards[0]
        target = next(n.id for n in m.nodes if n.id not in s.replicas)
        source = s.replicas[-1]
        r = cachectl("operator", "add", "move-replica", "--shard", str(s.id), "--from", source, "--to", target, "--json", *eps)
        assert r.returncode == 0, r.stderr
        op_id = json.loads(r.stdout)["id"]

        def moved() -> bool:
            mm = c.admin("n1").GetClusterMap(pb.ClusterMapRequest(), timeout=2)
            sh = next(x for x in mm.shards if x.id == s.id)
            return target in sh.replicas and source not in sh.replicas

        wait_for(moved, 60, "the manual move")

        def op_status() -> str:
            ops = json.loads(cachectl("operator", "list", "--json", *eps).stdout)["operators"]
            return str(next(o for o in ops if o["id"] == op_id)["status"])

        wait_for(lambda: op_status() != "running", 30, "the operator to end")
        assert op_status() == "success"
        assert s.id not in c.replica_status(source), "the source still hosts the moved replica"
        # paused: the PD does not move it back although counts are now uneven
        r = cachectl("rebalance", "--dry-run", "--json", *eps)
        plan = json.loads(r.stdout)
        assert "balance-replica is paused" in plan["notes"]
        # a second operator on a busy shard, or to a node holding it, is refused precisely
        r = cachectl("operator", "add", "transfer-leader", "--shard", str(s.id), "--to", source, *eps)
        assert r.returncode != 0 and "holds no replica" in r.stderr
        r = cachectl("operator", "cancel", "424242", *eps)
        assert r.returncode != 0 and "no operator 424242" in r.stderr
        # unknown scheduler: usage error from argparse, no traceback
        r = cachectl("scheduler", "pause", "nope", *eps)
        assert r.returncode == 2 and "Traceback" not in r.stderr


def test_join_refuses_an_address_in_use(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "c", nodes=3, shards=4, extra=FAST_PD) as c:
        c.wait_all_leaders()
        r = cachectl("node", "join", "nX", "--address", c.address("n2"), "--raft-address", "127.0.0.1:1", "--endpoints", c.endpoints)
        assert r.returncode != 0 and "already used by node n2" in r.stderr
        with pytest.raises(grpc.RpcError) as e:
            c.admin("n1").Heartbeat(pb.HeartbeatRequest(node=pb.NodeInfo(id="ghost")), timeout=2)
        assert e.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)


def test_pausing_balance_leader_also_stops_the_nodes_moving_leaders(tmp_path: Path) -> None:
    """Nodes hand leadership back to each shard's preferred replica on their
    own; with ``balance-leader`` paused they must not, or a user (or the
    replica-move benchmark) who paused leader balancing still sees leaders
    move.  Resumed, the preferred replica takes over again."""
    with local_cluster(tmp_path / "c", nodes=3, shards=4, extra=[*FAST_PD, "--leader-balance-s=0.3"]) as c:
        eps = ["--endpoints", c.endpoints]
        s = c.cluster_map().shards[0]
        preferred, other = s.replicas[0], s.replicas[1]

        def status(node: str) -> pb.NodeStatus:
            return c.admin(node).GetNodeStatus(pb.NodeStatusRequest(), timeout=2)

        assert {status(n).leader_balancing for n in c.node_ids} == {"on"}
        assert cachectl("scheduler", "pause", "balance-leader", *eps).returncode == 0
        wait_for(lambda: all(status(n).leader_balancing == "paused" for n in c.node_ids), 10, "every node to see the pause")
        c.admin(preferred).TransferLeader(pb.TransferLeaderRequest(shard_id=s.id, to_node=other), timeout=5)
        wait_for(lambda: c.leader_of(s.id) == other, 10, f"{other} to lead shard {s.id}")
        rounds = status(other).leader_balance_rounds
        wait_for(lambda: status(other).leader_balance_rounds >= rounds + 3, 10, f"three balance rounds on {other}")
        assert c.leader_of(s.id) == other, "a node moved the leader while balance-leader was paused"
        doc = json.loads(cachectl("status", "--json", *eps).stdout)
        assert {n["leader_balancing"] for n in doc["nodes"]} == {"paused"}

        assert cachectl("scheduler", "resume", "balance-leader", *eps).returncode == 0
        wait_for(lambda: c.leader_of(s.id) == preferred, 15, f"{preferred} (preferred) to lead shard {s.id} again")


def test_draining_the_placement_drivers_node_moves_its_metadata_replica(tmp_path: Path) -> None:
    """Draining a node that leads the metadata group moves its metadata
    replica like a shard replica (add the new one, hand the leadership over,
    remove, wait until the node deleted it); the node is then removable."""
    with local_cluster(tmp_path / "c", nodes=3, shards=4, extra=FAST_PD) as c:
        c.wait_all_leaders()
        n4 = c.add_node()
        wait_for(lambda: balanced(c.pd_status(), 4), 90, f"{n4} to be balanced in")
        pd = c.pd_status().pd_node
        assert node_doc(pd, c.endpoints)["metadata"] == "leader"
        assert registry(c, pd)[META_GROUP]["version"] == 0  # a first node: hosted from the start
        with Writer(c.endpoints) as w:
            assert cachectl("node", "drain", pd, "--endpoints", c.endpoints).returncode == 0

            def drained() -> bool:
                st = c.pd_status()
                node = next(x for x in st.nodes if x.id == pd)
                return node.removable and st.pd_node != pd and meta_members(st) == set(c.node_ids) - {pd}

            wait_for(drained, 90, f"{pd} to hold no replica, not even of the metadata group")
            wait_for(lambda: node_doc(pd, c.endpoints).get("metadata", "?") is None, 30, f"{pd} to delete its metadata replica")
        # a tombstone, so a restart (no --join) does not host it again
        assert registry(c, pd)[META_GROUP].get("removed") is True
        c.stop_node(pd)
        c.start_node(pd)
        wait_for(lambda: node_doc(pd, c.endpoints).get("uptime_s") is not None, 30, f"{pd} to answer after its restart")
        assert node_doc(pd, c.endpoints)["metadata"] is None, "a first node hosts a metadata replica again after a restart"
        w.verify(c.endpoints)
        r = cachectl("node", "remove", pd, "--endpoints", c.endpoints)
        assert r.returncode == 0, r.stderr
        assert pd not in {x.id for x in c.pd_status().nodes}


def test_a_user_moves_a_metadata_replica_by_hand(tmp_path: Path) -> None:
    """``cachectl operator add move-replica --shard meta``: the metadata
    replica moves off a node that stays in the cluster; ``transfer-leader
    --shard meta`` moves the placement driver."""
    with local_cluster(tmp_path / "c", nodes=3, shards=4, extra=FAST_PD) as c:
        c.wait_all_leaders()
        n4 = c.add_node()
        wait_for(lambda: balanced(c.pd_status(), 4), 90, f"{n4} to be balanced in")
        source = next(n for n in ("n1", "n2", "n3") if n != c.pd_status().pd_node)
        r = cachectl("operator", "add", "move-replica", "--shard", "meta", "--from", source, "--to", n4,
                     "--endpoints", c.endpoints)
        assert r.returncode == 0, r.stderr
        assert "on the metadata group admitted" in r.stdout
        wait_for(lambda: meta_members(c.pd_status()) == {"n1", "n2", "n3", n4} - {source}, 60, "the metadata move")
        wait_for(lambda: node_doc(source, c.endpoints).get("metadata", "?") is None, 30, f"{source} to delete its metadata replica")
        assert node_doc(n4, c.endpoints)["metadata"] in ("leader", "follower")
        st = c.pd_status()
        assert next(x for x in st.nodes if x.id == source).replicas > 0  # its shard replicas stay
        # and the placement driver itself moves where it is asked to
        r = cachectl("operator", "add", "transfer-leader", "--shard", "meta", "--to", n4, "--endpoints", c.endpoints)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: c.pd_status().pd_node == n4, 30, f"the placement driver to run on {n4}")
        assert node_doc(n4, c.endpoints)["metadata"] == "leader"
