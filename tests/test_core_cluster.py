"""The replicated core under real failures: real processes, sockets, LMDB files."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from _nodes import LocalCluster, local_cluster, wait_for

from cachenode.v1 import cache_pb2 as pb

pytestmark = pytest.mark.cluster


def rid(client: bytes, seq: int) -> pb.RequestHeader:
    return pb.RequestHeader(request_id=pb.RequestId(client_id=client, seq=seq))


def on_real_disk(path: Path) -> None:
    out = subprocess.run(["df", "--output=fstype", str(path)], capture_output=True, text=True).stdout
    assert "tmpfs" not in out, f"{path} is on tmpfs; durability tests need a real disk"


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    on_real_disk(tmp_path)
    return tmp_path


class Writers:
    """N client threads writing unique keys through every node; records acks."""

    def __init__(self, cluster: LocalCluster, n: int, prefix: str) -> None:
        self.cluster = cluster
        self.acked: dict[bytes, bytes] = {}
        self.ack_times: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i, prefix), daemon=True) for i in range(n)]

    def _run(self, i: int, prefix: str) -> None:
        nodes = self.cluster.node_ids
        seq = 0
        while not self._stop.is_set():
            seq += 1
            key = f"{prefix}/{i}/{seq}".encode()
            val = f"v{seq}".encode()
            node = nodes[seq % len(nodes)]
            try:
                self.cluster.cache(node).Set(pb.SetRequest(key=key, value=val), timeout=2)
            except grpc.RpcError:
                with self._lock:
                    self.errors += 1
                time.sleep(0.05)
                continue
            with self._lock:
                self.acked[key] = val
                self.ack_times.append(time.monotonic())

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def read_all(cluster: LocalCluster, expected: dict[bytes, bytes], via: str) -> list[bytes]:
    """Linearizable reads of every key through ``via``; returns the keys that are wrong."""
    bad = []
    stub = cluster.cache(via)
    for k, v in expected.items():
        r = stub.Get(pb.GetRequest(key=k), timeout=5)
        if not r.found or r.value != v:
            bad.append(k)
    return bad


def test_leader_kill_loses_no_acknowledged_write(data_root: Path) -> None:
    with local_cluster(data_root / "c", nodes=3, shards=2) as c:
        writers = Writers(c, 4, "lk")
        writers.start()
        wait_for(lambda: len(writers.acked) > 200, 30, "200 acknowledged writes")
        victim = c.leader_of(0)
        assert victim is not None
        killed_at = time.monotonic()
        c.kill9(victim)
        # writes resume: an ack for a key of shard 0 after the kill, within 5 s
        def shard0_write_after_kill() -> bool:
            k = f"probe/{time.monotonic_ns()}".encode()
            if c.shard_of(k) != 0:
                return False
            survivor = next(n for n in c.node_ids if n != victim)
            try:
                c.cache(survivor).Set(pb.SetRequest(key=k, value=b"x"), timeout=1)
            except grpc.RpcError:
                return False
            return True
        wait_for(shard0_write_after_kill, 5.0, "a write on the killed leader's shard", interval=0.02)
        resumed = time.monotonic() - killed_at
        wait_for(lambda: len(writers.acked) > 400, 30, "more writes after failover")
        writers.stop()
        survivor = next(n for n in c.node_ids if n != victim)
        bad = read_all(c, dict(writers.acked), survivor)
        assert bad == [], f"{len(bad)} acknowledged writes lost, e.g. {bad[:3]}"
        print(f"\nleader kill: shard 0 accepted writes again after {resumed:.2f}s; {len(writers.acked)} acked writes all readable")
        # the killed node comes back and serves everything too
        c.start_node(victim)
        c.wait_all_leaders()
        wait_for(lambda: read_all(c, dict(list(writers.acked.items())[:200]), victim) == [], 30, "restarted node to serve")


def test_a_call_to_any_node_during_a_failover_waits_for_the_new_leader(data_root: Path) -> None:
    """A plain gRPC client (no smart routing, e.g. behind a load balancer)
    writes and reads through a node that does not lead the shard, right
    after the leader died: the node waits for the election and passes the
    call on, instead of answering UNAVAILABLE while it runs."""
    with local_cluster(data_root / "c", nodes=3, shards=1) as c:
        victim = c.leader_of(0)
        assert victim is not None
        via, other = [n for n in c.node_ids if n != victim]
        c.kill9(victim)
        t0 = time.monotonic()
        c.cache(via).Set(pb.SetRequest(key=b"fo", value=b"after"), timeout=8)
        took = time.monotonic() - t0
        new = c.leader_of(0, exclude={victim})
        assert new in (via, other)
        assert c.cache(other).Get(pb.GetRequest(key=b"fo"), timeout=8).value == b"after"
        print(f"\nfailover: a write sent through {via} right after the kill waited {took:.2f} s for {new}")


def test_a_write_waiting_on_the_node_that_wins_the_election_is_proposed_there(data_root: Path) -> None:
    """The node a plain client wrote through becomes the shard's leader
    while the write waits: the write is proposed there (never sent to the
    node's own port).  Made deterministic by holding the third replica's
    log back (cut off while the leader takes writes), so only the chosen
    node's vote requests can win once the leader dies."""
    with local_cluster(data_root / "c", nodes=3, shards=1, extra=["--enable-fault-injection"]) as c:
        leader = c.leader_of(0)
        assert leader is not None
        via, behind = [n for n in c.node_ids if n != leader]

        def block(node: str, nodes: list[str]) -> None:
            c.admin(node).SetFaultFilter(pb.FaultFilterRequest(blocked_nodes=nodes), timeout=5)

        block(behind, [leader, via])
        block(leader, [behind])
        block(via, [behind])
        for i in range(20):
            c.cache(leader).Set(pb.SetRequest(key=b"before/%d" % i, value=b"x"), timeout=5)
        block(via, [])
        block(behind, [])
        c.kill9(leader)
        c.cache(via).Set(pb.SetRequest(key=b"during", value=b"y"), timeout=10)
        assert c.leader_of(0, exclude={leader}) == via
        assert c.cache(behind).Get(pb.GetRequest(key=b"during"), timeout=10).value == b"y"


def test_a_call_to_a_shard_without_a_quorum_fails_once_the_leader_wait_is_over(data_root: Path) -> None:
    """Waiting for a leader is bounded (not the call's whole deadline):
    with two of three replicas dead no leader can come, and the call ends
    UNAVAILABLE, not applied, with a message that says what to do."""
    with local_cluster(data_root / "c", nodes=3, shards=1) as c:
        victim = c.leader_of(0)
        assert victim is not None
        via, other = [n for n in c.node_ids if n != victim]
        c.kill9(victim)
        c.kill9(other)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            c.cache(via).Set(pb.SetRequest(key=b"nq", value=b"x"), timeout=20)
        took = time.monotonic() - t0
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        assert "retry" in (e.value.details() or ""), e.value.details()
        assert 2.5 <= took < 6, f"gave up after {took:.2f} s"


def test_kill_every_node_and_restart_keeps_acknowledged_writes(data_root: Path) -> None:
    with local_cluster(data_root / "c", nodes=3, shards=4) as c:
        writers = Writers(c, 4, "ka")
        writers.start()
        wait_for(lambda: len(writers.acked) > 500, 60, "500 acknowledged writes")
        # kill -9 every node while writes are in flight
        for nid in c.node_ids:
            c.kill9(nid)
        writers.stop()
        acked = dict(writers.acked)
        for nid in c.node_ids:
            c.start_node(nid)
        c.wait_all_leaders(timeout=60)
        bad = wait_for(lambda: read_all(c, acked, c.node_ids[0]) == [] or None, 60, "every acked write readable")
        assert bad
        print(f"\nkill-all: {len(acked)} acknowledged writes survived kill -9 of every node")


def test_follower_catches_up_by_snapshot(data_root: Path) -> None:
    extra = ["--log-compaction-entries=2000"]
    with local_cluster(data_root / "c", nodes=3, shards=1, extra=extra) as c:
        leader = c.leader_of(0)
        follower = next(n for n in c.node_ids if n != leader)
        c.stop_node(follower)
        stub = c.cache(leader)  # type: ignore[arg-type]
        values = {f"snap/{i}".encode(): os.urandom(16).hex().encode() for i in range(20000)}
        keys = list(values)

        def write(part: int) -> None:
            for k in keys[part::8]:
                stub.Set(pb.SetRequest(key=k, value=values[k]), timeout=10)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        c.start_node(follower)
        applied = lambda n: c.replica_status(n)[0].applied_index  # noqa: E731
        wait_for(lambda: applied(follower) >= applied(leader) - 1 and applied(follower) > 5000, 90, "follower to catch up")
        log = Path(c.node(follower)["log"]).read_text()
        assert "installed snapshot" in log, "the follower caught up without a snapshot (log not compacted?)"
        # stop everything and compare the real LMDB files
        c.down()
        from cachenode.storage.lmdb_store import LmdbStorage

        def content(nid: str) -> list[tuple[bytes, Any]]:
            s = LmdbStorage(os.path.join(c.node(nid)["data_dir"], "db"))
            try:
                return [(k, (r.value, r.version, r.expires_at_ms)) for k, r in s.reader(0).items()]
            finally:
                s.close()

        lead, fol = content(leader), content(follower)  # type: ignore[arg-type]
        assert len(lead) == 20000
        assert fol == lead


def test_retried_incr_applies_once_across_leader_change(data_root: Path) -> None:
    with local_cluster(data_root / "c", nodes=3, shards=1, extra=["--enable-fault-injection"]) as c:
        leader = c.leader_of(0)
        assert leader
        stub = c.cache(leader)
        r1 = stub.Incr(pb.IncrRequest(header=rid(b"cli-1", 1), key=b"ctr", delta=5), timeout=5)
        # same request id again at the same leader: cached answer
        r2 = stub.Incr(pb.IncrRequest(header=rid(b"cli-1", 1), key=b"ctr", delta=5), timeout=5)
        assert (r1.value, r1.version) == (5, r2.version) and r2.value == 5
        # move leadership, retry the same id at the new leader
        c.admin(leader).TransferLeader(pb.TransferLeaderRequest(shard_id=0), timeout=5)
        new = wait_for(lambda: (lambda x: x if x and x != leader else None)(c.leader_of(0)), 15, "new leader")
        r3 = c.cache(new).Incr(pb.IncrRequest(header=rid(b"cli-1", 1), key=b"ctr", delta=5), timeout=5)
        assert r3.value == 5 and r3.version == r1.version
        # a new id applies
        r4 = c.cache(new).Incr(pb.IncrRequest(header=rid(b"cli-1", 2), key=b"ctr", delta=5), timeout=5)
        assert r4.value == 10
        for nid in c.node_ids:
            g = c.cache(nid).Get(pb.GetRequest(key=b"ctr"), timeout=5)
            assert g.value == b"10"


def test_ttl_key_gone_on_every_replica_also_across_leader_change(data_root: Path) -> None:
    with local_cluster(data_root / "c", nodes=3, shards=1) as c:
        leader = c.leader_of(0)
        assert leader
        stub = c.cache(leader)
        stub.Set(pb.SetRequest(key=b"t1", value=b"v", ttl_ms=1500), timeout=5)
        stub.Set(pb.SetRequest(key=b"t2", value=b"v", ttl_ms=3000), timeout=5)
        stub.Set(pb.SetRequest(key=b"keep", value=b"v"), timeout=5)
        g = stub.Get(pb.GetRequest(key=b"t2"), timeout=5)
        assert g.found and 0 < g.ttl_ms <= 3000
        # never early: right after the set the key is there on the leader
        assert stub.Get(pb.GetRequest(key=b"t1"), timeout=5).found
        c.admin(leader).TransferLeader(pb.TransferLeaderRequest(shard_id=0), timeout=5)
        wait_for(lambda: (lambda x: x if x and x != leader else None)(c.leader_of(0)), 15, "new leader")

        def gone_everywhere() -> bool:
            for nid in c.node_ids:
                st = c.cache(nid)
                stale = pb.RequestHeader(consistency=pb.STALE)
                for k in (b"t1", b"t2"):
                    if st.Get(pb.GetRequest(key=k, header=stale), timeout=2).found:
                        return False
                    if st.Get(pb.GetRequest(key=k), timeout=2).found:
                        return False
            return True

        wait_for(gone_everywhere, 15, "expired keys to vanish from every replica")
        # active expiry deleted them physically: the key count dropped to 1 on every replica
        wait_for(lambda: all(c.replica_status(n)[0].keys == 1 for n in c.node_ids), 15, "physical deletion")
        assert c.cache(c.node_ids[0]).Get(pb.GetRequest(key=b"keep"), timeout=5).found


def test_raft_port_rejects_unauthenticated_pickle(data_root: Path) -> None:
    with local_cluster(data_root / "c", nodes=3, shards=1) as c:
        marker = data_root / "pwned"

        class Pwn:
            def __reduce__(self) -> tuple[Any, ...]:
                return (open, (str(marker), "w"))

        payload = pickle.dumps(Pwn())
        n = c.node_ids[0]
        host, port = c.node(n)["raft_address"].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=5)
        s.settimeout(10)
        s.sendall(len(payload).to_bytes(4, "big") + payload)
        closed = False
        try:
            closed = s.recv(1024) == b""
        except ConnectionResetError:
            closed = True
        s.close()
        assert closed
        assert not marker.exists()
        log = Path(c.node(n)["log"]).read_text()
        assert "closing connection" in log
        # and the cluster is unharmed
        c.cache(n).Set(pb.SetRequest(key=b"after", value=b"ok"), timeout=5)


def test_large_values_replicate_to_every_replica(data_root: Path) -> None:
    """Entries from 10 KiB to 20 MiB reach every follower intact (pysyncobj's
    own chunked transfer of entries >= 64 KiB is never used: it truncates)."""
    with local_cluster(data_root / "c", nodes=3, shards=1) as c:
        leader = c.leader_of(0)
        assert leader
        stub = c.cache(leader)
        values = {b"v10k": os.urandom(10 * 1024), b"v1m": os.urandom(1024 * 1024)}
        for k, v in values.items():
            stub.Set(pb.SetRequest(key=k, value=v), timeout=20)
        items = [pb.KeyValue(key=b"m%d" % i, value=os.urandom(1024 * 1024)) for i in range(20)]
        stub.MSet(pb.MSetRequest(items=items), timeout=60)
        values.update({it.key: it.value for it in items})
        stale = pb.RequestHeader(consistency=pb.STALE)

        def replica_has_everything(nid: str) -> bool:
            for k, v in values.items():
                r = c.cache(nid).Get(pb.GetRequest(key=k, header=stale), timeout=20)
                if not (r.found and r.value == v):
                    return False
            return True

        for nid in c.node_ids:  # stale reads may lag: wait for each replica to apply
            wait_for(lambda nid=nid: replica_has_everything(nid), 60, f"{nid} to hold every large value")
        for nid in c.node_ids:
            log = Path(c.node(nid)["log"]).read_text()
            assert "failed:" not in log and "CRITICAL" not in log, f"{nid} logged a failure"


def test_ttl_is_not_late_by_an_outage(data_root: Path) -> None:
    """Found by jepsen-lite: a restarted replica's cluster clock resumed from
    the last applied entry, so after an outage every TTL was late by the
    outage's length.  Now lateness stays within an election timeout."""
    with local_cluster(data_root / "c", nodes=3, shards=1) as c:
        leader = c.leader_of(0)
        assert leader
        def clock_recorded(n: str) -> bool:
            # The file is rewritten every second; it may exist from before
            # the shard's replica did, and only an entry for shard 0 is a floor.
            return "0" in json.loads((Path(c.node(n)["data_dir"]) / "cluster-clock.json").read_text())

        wait_for(lambda: all(clock_recorded(n) for n in c.node_ids), 10, "each node to record shard 0's cluster clock")
        # TTL longer than set -> kill -> restart -> read, shorter than the outage
        c.cache(leader).Set(pb.SetRequest(key=b"short", value=b"v", ttl_ms=5000), timeout=5)
        set_at = time.monotonic()
        for n in c.node_ids:
            c.kill9(n)
        wait_for(lambda: time.monotonic() > set_at + 9.0, 15, "the outage to pass", interval=0.2)
        for n in c.node_ids:
            c.start_node(n)
        c.wait_all_leaders(60)
        restarted = time.monotonic()

        def expired() -> bool:
            return not c.cache(c.node_ids[0]).Get(pb.GetRequest(key=b"short"), timeout=5).found

        wait_for(expired, 3.0, "the TTL'd key to be expired right after the restart")
        print(f"\nkey expired {time.monotonic() - restarted:.2f}s after leaders were back ({time.monotonic() - set_at:.1f}s after the set)")


def test_ttl_keeps_real_time_under_continuous_writes(data_root: Path) -> None:
    """Found in session 28: every apply set the leader's cluster clock back
    to the entry's own stamp, by the entry's commit latency, so under
    back-to-back writes cluster time nearly stood still (four writers: it
    ran at 37 % of real time, and a 5 s TTL had 2 s left after 8 s).  A key
    set with a 3 s TTL while four writers keep its shard busy must be there
    until 3 s have passed and gone within 1 s after."""
    ttl_s = 3.0
    with local_cluster(data_root / "c", nodes=3, shards=1) as c:
        leader = c.leader_of(0)
        assert leader
        stub = c.cache(leader)
        stop = threading.Event()
        written = [0] * 4

        def writer(i: int) -> None:
            while not stop.is_set():
                stub.Set(pb.SetRequest(key=b"busy/%d/%d" % (i, written[i] % 50), value=b"x"), timeout=5)
                written[i] += 1

        threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: min(written) >= 20, 30, "every writer to be writing")
            before = sum(written)
            stub.Set(pb.SetRequest(key=b"ttl", value=b"v", ttl_ms=int(ttl_s * 1000)), timeout=5)
            set_at = time.monotonic()

            def found() -> bool:
                return stub.Get(pb.GetRequest(key=b"ttl"), timeout=5).found

            # Not early: every read that starts before the TTL is over finds it.
            while True:
                started = time.monotonic()
                if started >= set_at + ttl_s - 0.1:
                    break
                assert found(), f"expired early: {started - set_at:.2f}s after the set, TTL {ttl_s}s"
            wait_for(lambda: not found(), set_at + ttl_s + 1.0 - time.monotonic(),
                     f"the key to expire within 1 s after its {ttl_s}s TTL while writes go on", interval=0.02)
            gone_after = time.monotonic() - set_at
            during = sum(written) - before
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert during >= 100, f"only {during} writes while the TTL ran: the shard was not busy"
        print(f"\nexpired {gone_after:.2f}s after the set, {during} writes meanwhile")


def test_ttl_is_not_late_on_a_replica_that_caught_up_on_an_idle_shard(data_root: Path) -> None:
    """Found in session 29: a replica that applies a shard's last entries
    late (it was paused, partitioned or slow) takes their stamps as the
    time of the apply when they come from a term it did not see, so on a
    shard with no writes since, its cluster clock is late by the time the
    entries waited.  Elected, it judged TTLs that late: a value was served
    well after its TTL.  Now a leader stamps an entry into an idle shard's
    log every second while it holds a key with a TTL (``--clock-tick``),
    so the newest stamp a replica can catch up on is about a second old.
    Without a TTL key the shard gets no tick (an idle cluster without TTLs
    stays quiet): checked before the TTL'd write and after its expiry."""
    ttl_s, paused_s, late_s = 7.0, 4.0, 2.0
    extra = ["--leader-balance-s=0"]
    with local_cluster(data_root / "c", nodes=3, shards=1, extra=extra) as c:
        first = c.leader_of(0)
        assert first
        lagging = next(n for n in c.node_ids if n != first)
        second = next(n for n in c.node_ids if n not in (first, lagging))
        c.cache(first).Set(pb.SetRequest(key=b"warm", value=b"v"), timeout=5)
        applied = lambda n: c.replica_status(n)[0].applied_index  # noqa: E731
        wait_for(lambda: applied(lagging) >= applied(first), 10, "the lagging replica to apply the first write")

        def quiet_for(node: str, seconds: float) -> bool:
            """No entry committed on ``node``'s shard for ``seconds``."""
            start, until = c.replica_status(node)[0].commit_index, time.monotonic() + seconds
            while time.monotonic() < until:
                if c.replica_status(node)[0].commit_index != start:
                    return False
                time.sleep(0.1)
            return True

        assert quiet_for(first, 2.0), "a clock tick into an idle shard that holds no key with a TTL"
        pid = int(c.node(lagging)["pid"])
        os.kill(pid, signal.SIGSTOP)
        try:
            # A new term the paused replica does not see; its TTL'd write.
            c.admin(first).TransferLeader(pb.TransferLeaderRequest(shard_id=0, to_node=second), timeout=5)
            wait_for(lambda: c.leader_of(0, exclude={lagging}) == second, 15, f"{second} to lead")
            c.cache(second).Set(pb.SetRequest(key=b"ttl", value=b"v", ttl_ms=int(ttl_s * 1000)), timeout=5)
            set_at = time.monotonic()
            wait_for(lambda: time.monotonic() > set_at + paused_s, paused_s + 5, "the shard to stay idle", interval=0.1)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: applied(lagging) >= applied(second), 15, "the paused replica to catch up")

        def handed_over() -> bool:
            # Refused while the leader sees it behind (a clock tick may have
            # committed since the check above): ask again.
            c.admin(second).TransferLeader(pb.TransferLeaderRequest(shard_id=0, to_node=lagging), timeout=5)
            until = time.monotonic() + 3
            while time.monotonic() < until:
                if c.leader_of(0) == lagging:
                    return True
                time.sleep(0.05)
            return False

        wait_for(handed_over, 20, f"{lagging} to take over", interval=0.2)
        stub = c.cache(lagging)
        if time.monotonic() < set_at + ttl_s - 0.5:
            assert stub.Get(pb.GetRequest(key=b"ttl"), timeout=5).found, "expired early"
        wait_for(lambda: not stub.Get(pb.GetRequest(key=b"ttl"), timeout=5).found,
                 max(0.1, set_at + ttl_s + late_s - time.monotonic()),
                 f"the key to expire within {late_s}s after its {ttl_s}s TTL on the replica that caught up",
                 interval=0.05)
        print(f"\nexpired {time.monotonic() - set_at:.2f}s after the set (TTL {ttl_s}s)")
        # Active expiry deletes it; with no TTL key left the ticks stop.
        wait_for(lambda: quiet_for(lagging, 1.5), 10, "the ticks to stop once no key has a TTL", interval=0.0)


@pytest.mark.parametrize("writemap", ["on", "off"])
def test_a_machine_crash_rebuilds_the_state_and_loses_no_acknowledged_write(data_root: Path, writemap: str) -> None:
    """The state (LMDB) is committed without syncs; the journal is synced.
    Play a machine crash on one node: kill -9 it, scribble over its LMDB
    file (what torn unsynced writes can leave) and give it a new boot id.
    It must rebuild every shard's state from its snapshot files and journal
    (not from its peers: its stale reads must see every acknowledged write
    while the leaders it needs for catching up have nothing new to send).
    Rebuilding loads each snapshot into LMDB: with writemap in two passes,
    without it in a nested transaction (``--lmdb-writemap``)."""
    boot = data_root / "boot_id"
    boot.write_text("boot-1\n")
    extra = ["--log-compaction-entries=300", f"--boot-id-file={boot}", f"--lmdb-writemap={writemap}"]
    with local_cluster(data_root / "c", nodes=3, shards=2, extra=extra) as c:
        stub = c.cache(c.node_ids[0])
        acked = {}
        for i in range(1500):  # about 750 entries per shard: snapshots, then a journal after them
            k, v = f"mc/{i}".encode(), os.urandom(8).hex().encode()
            stub.Set(pb.SetRequest(key=k, value=v), timeout=5)
            acked[k] = v
        victim = c.node_ids[1]
        applied_before = {s: r.applied_index for s, r in c.replica_status(victim).items()}
        wait_for(lambda: "snapshot at index" in Path(c.node(victim)["log"]).read_text(), 30, "a snapshot on the victim")
        c.kill9(victim)
        data = Path(c.node(victim)["data_dir"]) / "db" / "data.mdb"
        with open(data, "r+b") as f:
            # With writemap the file is as large as the map (64 GiB, sparse):
            # scribble over the pages in use, which LMDB allocates from the start.
            size = min(f.seek(0, os.SEEK_END), os.fstat(f.fileno()).st_blocks * 512)
            assert (f.seek(0, os.SEEK_END) == 64 << 30) == (writemap == "on")
            for off in range(8192, size, max(size // 8, 4096)):
                f.seek(off)
                f.write(os.urandom(4096))
        boot.write_text("boot-2\n")  # the machine restarted
        c.start_node(victim)
        # Every shard back to where it was, from the node's own files: no
        # write happened meanwhile, so the leaders had nothing to send.
        wait_for(lambda: all(c.replica_status(victim).get(s) is not None
                             and c.replica_status(victim)[s].applied_index >= a
                             for s, a in applied_before.items()), 60, "the victim to rebuild its replicas")
        log = Path(c.node(victim)["log"]).read_text()
        assert "rebuilt from the snapshots and the journal" in log
        stale = pb.RequestHeader(consistency=pb.STALE)
        vs = c.cache(victim)
        wrong = [k for k, v in acked.items() if vs.Get(pb.GetRequest(key=k, header=stale), timeout=5).value != v]
        assert wrong == [], f"{len(wrong)} acknowledged writes missing on the rebuilt node, e.g. {wrong[:3]}"
        # and it keeps serving: a new write reaches it
        stub.Set(pb.SetRequest(key=b"mc/after", value=b"yes"), timeout=5)
        wait_for(lambda: vs.Get(pb.GetRequest(key=b"mc/after", header=stale), timeout=5).value == b"yes", 15,
                 "a new write on the rebuilt node")
