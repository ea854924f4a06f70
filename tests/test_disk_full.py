"""Real clusters below their disk reserve.

* A cluster whose disk fills up: its nodes refuse the writes that add data
  once less than the reserve is free, keep every write they acknowledged, go
  on deleting and reading, and take writes again once the disk has room.
  The three nodes keep their data on one small tmpfs that the test mounts
  (and grows, as an operator would add space) and unmounts: it needs root
  and ``mount``, like the network-namespace tests.
* The same disk filled, and then emptied by deleting keys: the nodes
  compact their logs while short of disk, so the deletes give the disk
  back and writes are taken again with no operator step.
* A cluster of four nodes where one has a reserve larger than any disk:
  the shards with a replica on it refuse, those it leads and those it
  follows, wherever a write is sent, and the shard without one takes
  writes (no mount needed).

The reserve's arithmetic, with a fake filesystem: tests/test_disk_space.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from _nodes import LocalCluster, cachectl, local_cluster, pid_alive, wait_for

from cachenode.client import CacheClient, DiskFull
from cachenode.v1 import cache_pb2 as pb

pytestmark = pytest.mark.cluster

MiB = 1 << 20
DISK_MIB = 256
RESERVE = "96MiB"
VALUE_BYTES = 256 << 10


def _mount_error(path: Path) -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m,mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=30)
    return None if r.returncode == 0 else f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    why = _mount_error(disk)
    if why is not None:
        pytest.skip(why)
    try:
        yield disk
    finally:
        # The cluster (inside the test) is down by now; a lazy unmount in
        # case something still holds a file there.
        if subprocess.run(["umount", str(disk)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _value(i: int) -> bytes:
    return i.to_bytes(4, "big") * (VALUE_BYTES // 4)


def _refused_raw(stub: object, call: str, req: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, call)(req, timeout=10)
    return info.value


def _fill_until_refused(client: CacheClient, prefix: str, disk: Path) -> tuple[dict[bytes, bytes], DiskFull]:
    """Set 256 KiB values until a leader refuses one: (what was acknowledged, the refusal)."""
    acked: dict[bytes, bytes] = {}
    for i in range(2 * DISK_MIB * MiB // VALUE_BYTES):
        key = f"{prefix}-{i}".encode()
        try:
            client.set(key, _value(i))
        except DiskFull as e:
            return acked, e
        acked[key] = _value(i)
    raise AssertionError(f"{len(acked)} sets of 256 KiB and the disk never filled ({_free(disk)} B free)")


def _takes_writes(client: CacheClient, probes: dict[bytes, bytes]) -> bool:
    with contextlib.suppress(DiskFull):
        return client.mset(probes) == len(probes)
    return False


def test_a_full_disk_refuses_writes_keeps_acknowledged_ones_and_takes_writes_again_with_room(small_disk: Path) -> None:
    with local_cluster(small_disk / "c", nodes=3, shards=4, extra=[f"--disk-reserve={RESERVE}"]) as c, \
            CacheClient(c.endpoints.split(","), timeout=10) as client:
        pids = [int(n["pid"]) for n in c.info()["nodes"]]
        # A raw write with a request id, applied while there is room.
        first_ask = pb.SetRequest(key=b"with-id", value=b"first", header=pb.RequestHeader(
            request_id=pb.RequestId(client_id=b"test-client", seq=1)))
        first_answer = c.cache(c.node_ids[0]).Set(first_ask, timeout=10)
        assert first_answer.applied
        # Fill the disk through the smart client until a leader refuses.
        acked, refusal = _fill_until_refused(client, "fill", small_disk)
        assert acked, "the first write was refused: the disk had no room to begin with"
        # The leader's own disk, or a follower's that told the leader first.
        assert re.search(r"below its reserve of 96\.0 MiB \(--disk-reserve 96\.0 MiB\)"
                         r"|has a replica on node n\d, which is below its disk reserve \(.*, reserve 96\.0 MiB\)",
                         refusal.message), refusal.message
        assert "nothing was applied" in refusal.message
        assert _free(small_disk) > 16 * MiB, "the reserve left no room: the test's sizes are wrong"

        # Every node sees the same filesystem: each shard's leader refuses
        # (one key per shard), a raw call with RESOURCE_EXHAUSTED + disk_full.
        per_shard = {}
        for i in range(400):
            per_shard.setdefault(c.shard_of(f"probe-{i}".encode()), f"probe-{i}".encode())
        assert len(per_shard) == 4

        def every_leader_refuses() -> bool:
            for key in per_shard.values():
                try:
                    client.set(key, b"x")
                    return False
                except DiskFull:
                    pass
            return True

        wait_for(every_leader_refuses, timeout=10, what="every shard's leader to refuse a set")
        err = _refused_raw(c.cache(c.node_ids[1]), "Set", pb.SetRequest(key=b"probe", value=b"x"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("cachenode-error", "disk_full") in tuple(err.trailing_metadata() or ())

        # Each kind of write that adds data is refused, fast (never retried
        # until the deadline), and changes nothing.
        first = next(iter(acked))
        started = time.monotonic()
        for attempt in (lambda: client.set(first, b"new"), lambda: client.incr(b"counter"),
                        lambda: client.cas(first, b"new", expected=acked[first]),
                        lambda: client.mset({first: b"new", b"other": b"x"})):
            with pytest.raises(DiskFull):
                attempt()
        assert time.monotonic() - started < 5
        # Its retry gets its first answer, not a refusal (the dedup record
        # answers it); the next seq is refused.
        assert c.cache(c.node_ids[2]).Set(first_ask, timeout=10) == first_answer
        next_ask = pb.SetRequest(key=b"with-id", value=b"second", header=pb.RequestHeader(
            request_id=pb.RequestId(client_id=b"test-client", seq=2)))
        assert _refused_raw(c.cache(c.node_ids[2]), "Set", next_ask).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.get(b"with-id").value == b"first"

        # cachectl: one line and a non-zero exit.
        r = cachectl("--endpoints", c.endpoints, "set", "cli-key", "v")
        assert r.returncode == 1 and r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and re.search("below its (disk )?reserve", r.stderr), r.stderr

        # Deletes and reads go on; every acknowledged write is there.
        last = next(reversed(acked))
        assert client.delete(last)
        del acked[last]
        assert client.get(last) is None
        got = client.mget(list(acked))
        assert {k: r.value if r else None for k, r in got.items()} == acked
        assert client.get(first).value == acked[first] and client.get(b"counter") is None
        assert all(pid_alive(p) for p in pids), "a node stopped on the full disk"

        # The operator adds space: writes are taken again.
        subprocess.run(["mount", "-o", f"remount,size={2 * DISK_MIB}m", str(small_disk)], check=True, timeout=30)

        probes = {k: b"x" for k in per_shard.values()}  # every shard: every leader's judgement

        wait_for(lambda: _takes_writes(client, probes), timeout=10, what="every leader to take writes again")
        assert client.set(first, b"after")
        assert client.mset({b"other": b"x", b"more": b"y"}) == 2
        assert client.incr(b"counter") == 1
        assert client.get(first).value == b"after"
        assert all(pid_alive(p) for p in pids)


def test_deleting_keys_gives_the_disk_back_and_writes_are_taken_again(small_disk: Path) -> None:
    """LMDB keeps the pages a delete frees for its own reuse, and the
    journal and the snapshots keep what was written until a log compaction,
    which comes only after 16 MiB of log per shard: before session 36,
    deleting every key left the disk as full as before and writes refused
    for good.  Short of disk, a node now compacts each log that outweighs
    its state, and deletes its journal segments as soon as they hold
    little."""
    with local_cluster(small_disk / "c", nodes=3, shards=4, extra=[f"--disk-reserve={RESERVE}"]) as c, \
            CacheClient(c.endpoints.split(","), timeout=10) as client:
        pids = [int(n["pid"]) for n in c.info()["nodes"]]
        acked, _ = _fill_until_refused(client, "fill", small_disk)
        assert len(acked) > 4, "the disk had no room to begin with: the test's sizes are wrong"
        kept = dict(list(acked.items())[:4])
        for key in list(acked)[4:]:
            assert client.delete(key)
        probes = {f"probe-{i}".encode(): b"x" for i in range(40)}  # every shard

        wait_for(lambda: _takes_writes(client, probes), timeout=30, what="writes to be taken again after the deletes")
        got = client.mget(list(kept))
        assert {k: r.value if r else None for k, r in got.items()} == kept
        assert all(pid_alive(p) for p in pids), "a node stopped on the full disk"
        logs = "".join(Path(n["log"]).read_text() for n in c.info()["nodes"])
        assert "compacting its log to give disk back" in logs
        # Filling again, the reserve still holds: the nodes take more writes
        # and refuse once the disk is short again, and none stops.  How many
        # depends on where the journal's 16 MiB segments start (the three
        # nodes share this one small disk), so only that some are taken.
        again, _ = _fill_until_refused(client, "again", small_disk)
        assert again, "no write was taken after the deletes gave the disk back"
        assert all(pid_alive(p) for p in pids)


def _restart_with(c: LocalCluster, node_id: str, *args: str) -> None:
    """Restart ``node_id`` with ``args`` after its own (the last flag wins):
    ``cluster.json`` keeps each node's exact argv for ``start-node``."""
    c.stop_node(node_id)
    path = c.dir / "cluster.json"
    doc = json.loads(path.read_text())
    for n in doc["nodes"]:
        if n["id"] == node_id:
            n["argv"] += list(args)
    path.write_text(json.dumps(doc))
    c.start_node(node_id)


def _key_of(c: LocalCluster, shard: int, tag: str) -> bytes:
    for i in range(1000):
        if c.shard_of(k := f"{tag}-{i}".encode()) == shard:
            return k
    raise AssertionError(f"no key of shard {shard}")


def test_every_shard_with_a_replica_on_a_full_node_refuses_and_an_mset_says_which_parts_it_wrote(
        tmp_path: Path) -> None:
    """No mount needed: n1 alone runs with a reserve larger than any disk,
    in a cluster of four nodes, so one shard has no replica on n1.  The
    shard n1 leads refuses, and so do the shards it follows (their leaders
    heard from n1), wherever the write is sent; the shard without n1 takes
    writes.  An MSet that a node would lead a refused part of is refused
    whole there; one whose refused part is led elsewhere writes the other
    parts and says so.  The replica checker (paused until then) moves the
    replicas off n1, and once n1 has room again it gets replicas back."""
    with local_cluster(tmp_path / "c", nodes=4, shards=4) as c:
        r = cachectl("scheduler", "pause", "replica-checker", "--endpoints", c.endpoints)
        assert r.returncode == 0, r.stderr
        _restart_with(c, "n1", "--disk-reserve=1024T")
        c.wait_settled()  # each shard led by its first replica again
        shards = c.cluster_map().shards
        led = next((s.id for s in shards if s.replicas[0] == "n1"), None)
        followed = next((s for s in shards if "n1" in s.replicas[1:]), None)
        room = next((s for s in shards if "n1" not in s.replicas and followed and s.replicas[0] != followed.replicas[0]),
                    None)
        assert led is not None and followed is not None and room is not None, \
            f"the map lacks a shard n1 leads, one it follows, or one without it: {shards}"
        with CacheClient(c.endpoints.split(","), timeout=10) as client:
            assert client.set(_key_of(c, room.id, "room"), b"v")
            with pytest.raises(DiskFull, match=r"node n1 has .* free .* below its reserve of 1024\.0 TiB"):
                client.set(_key_of(c, led, "led"), b"v")
            # The leader of a shard n1 follows heard n1 say so (at start, over the Raft port).
            with pytest.raises(DiskFull, match=rf"on node {followed.replicas[0]} at .*: shard {followed.id} has a replica "
                               r"on node n1, which is below its disk reserve \(.* free of .*, reserve 1024\.0 TiB\), "
                               r"so the shard takes no writes"):
                client.set(_key_of(c, followed.id, "followed"), b"v")
            with pytest.raises(DiskFull):
                client.incr(_key_of(c, followed.id, "n"))
            with pytest.raises(DiskFull):
                client.cas(_key_of(c, followed.id, "cas"), b"v", expected_version=0)
            assert client.delete(_key_of(c, led, "led")) is False  # deletes are taken
            assert client.delete(_key_of(c, followed.id, "followed")) is False

            # Sent to a node with room, a write for n1's shard is judged by n1.
            err = _refused_raw(c.cache(room.replicas[0]), "Set", pb.SetRequest(key=_key_of(c, led, "fwd"), value=b"v"))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Sent to n1, a write for the shard without a replica there is taken.
            assert c.cache("n1").Set(pb.SetRequest(key=_key_of(c, room.id, "via-n1"), value=b"v"), timeout=10).applied

            # An MSet over n1's shard and the one with room, sent to n1: refused whole.
            for at, shard in (("n1", led), (followed.replicas[0], followed.id)):
                whole = [_key_of(c, shard, f"whole-{at}"), _key_of(c, room.id, f"whole-{at}")]
                err = _refused_raw(c.cache(at), "MSet", pb.MSetRequest(items=[pb.KeyValue(key=k, value=b"v") for k in whole]))
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "applied in part" not in err.details()
                assert client.mget(whole) == {k: None for k in whole}

            # Sent to the leader with room: its part is written, and the error says so.
            part = [_key_of(c, followed.id, "part"), _key_of(c, room.id, "part")]
            err = _refused_raw(c.cache(room.replicas[0]), "MSet",
                               pb.MSetRequest(items=[pb.KeyValue(key=k, value=b"v") for k in part]))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("cachenode-error", "disk_full") in tuple(err.trailing_metadata() or ())
            assert err.details().startswith(
                f"this mset was applied in part: shard {room.id} wrote 1 of its keys (an mset is atomic per shard, "
                f"not across shards); the part on shard {followed.id} failed: shard {followed.id} has a replica on "
                f"node n1, which is below its disk reserve"), err.details()
            got = client.mget(part)
            assert got[part[0]] is None and got[part[1]] is not None and got[part[1]].value == b"v"

        # cachectl status names the node that refuses.
        r = cachectl("--endpoints", c.endpoints, "status", "--json")
        assert r.returncode == 0, r.stderr
        disks = {n["id"]: n["disk"] for n in json.loads(r.stdout)["nodes"]}
        assert disks["n1"]["full"] and disks["n1"]["reserve_bytes"] == 1 << 50
        assert not disks["n2"]["full"] and 0 < disks["n2"]["reserve_bytes"] < disks["n2"]["capacity_bytes"]
        r = cachectl("--endpoints", c.endpoints, "status", env={"COLUMNS": "80"})
        said = " ".join(r.stdout.split())  # 80 columns: the lines wrap
        assert r.returncode == 0 and "FULL" in said, r.stdout
        assert "n1 has" in said and "below its disk reserve of 1024.0 TiB: the shards with a replica on it refuse writes" in said
        assert "n2 has" not in said

        # What the refusal advises: the replica moved off n1, its shard takes writes.
        spare = next(n for n in ("n1", "n2", "n3", "n4") if n not in followed.replicas)
        r = cachectl("--endpoints", c.endpoints, "operator", "add", "move-replica", "--shard", str(followed.id),
                     "--from", "n1", "--to", spare)
        assert r.returncode == 0, r.stderr
        with CacheClient(c.endpoints.split(","), timeout=10) as client:
            wait_for(lambda: _takes(client, _key_of(c, followed.id, "moved")), timeout=60,
                     what=f"shard {followed.id} to take writes once its replica left n1")
            with pytest.raises(DiskFull):
                client.set(_key_of(c, led, "still"), b"v")

            # The placement driver does the same for the rest, its leadership first.
            r = cachectl("scheduler", "resume", "replica-checker", "--endpoints", c.endpoints)
            assert r.returncode == 0, r.stderr
            wait_for(lambda: not _replicas_on(c, "n1"), timeout=90, what="the placement driver to move every replica off n1")
            r = cachectl("cluster", "status", "--json", "--endpoints", c.endpoints)
            assert r.returncode == 0, r.stderr
            doc = json.loads(r.stdout)
            assert {n["id"]: n["below_reserve"] for n in doc["nodes"]} == {"n1": True, "n2": False, "n3": False, "n4": False}
            assert doc["balanced"]["replicas"], doc  # n1, with none, does not count
            r = cachectl("cluster", "status", "--endpoints", c.endpoints, env={"COLUMNS": "200"})
            assert r.returncode == 0 and "below its disk reserve: its replicas move away" in r.stdout, r.stdout
            for shard in c.cluster_map().shards:
                wait_for(lambda shard=shard: _takes(client, _key_of(c, shard.id, "evicted")), timeout=30,
                         what=f"shard {shard.id} to take writes with no replica on n1")

        # n1 with room again (the last flag wins): the balancer gives it replicas.
        _restart_with(c, "n1", "--disk-reserve=5%")
        wait_for(lambda: _replicas_on(c, "n1"), timeout=90, what="the balancer to move a replica back to n1")


def _replicas_on(c: LocalCluster, node: str) -> list[int]:
    """The shards with a replica on ``node``, in n2's map now (LocalCluster.cluster_map is cached)."""
    return [s.id for s in c.admin("n2").GetClusterMap(pb.ClusterMapRequest(), timeout=5).shards if node in s.replicas]


def _takes(client: CacheClient, key: bytes) -> bool:
    try:
        return client.set(key, b"v") is True
    except DiskFull:
        return False
