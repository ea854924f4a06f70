"""The disk reserve: parsing it, watching a filesystem against it (a fake
``statvfs``), and the Cache service refusing writes that add data while
this node's disk is below it (fake replicas and forwarder).  The same on a
real cluster whose disk fills up: tests/test_disk_full.py."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pytest
from _nodes import wait_for

from cachenode._clock import SystemClock
from cachenode._errors import DiskFull, NotLeader
from cachenode._sizes import show_size
from cachenode._types import ClusterMap, NodeInfo, ShardDescriptor
from cachenode.server.cache_service import CacheService
from cachenode.server.config import NodeConfig
from cachenode.server.disk_space import DiskReserve, DiskSpace, parse_reserve, resume_at
from cachenode.server.main import ConfigError, build_parser, load_config
from cachenode.server.status import status_code
from cachenode.v1 import cache_pb2 as pb

MiB = 1 << 20
GiB = 1 << 30


# ---- the reserve ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("5%", DiskReserve(percent=5.0, size=0)),
    ("0.5 %", DiskReserve(percent=0.5, size=0)),
    ("0", DiskReserve(percent=0.0, size=0)),
    ("1073741824", DiskReserve(percent=0.0, size=GiB)),
    ("512MiB", DiskReserve(percent=0.0, size=512 * MiB)),
    ("512m", DiskReserve(percent=0.0, size=512 * MiB)),
    ("2GiB", DiskReserve(percent=0.0, size=2 * GiB)),
    ("1.5G", DiskReserve(percent=0.0, size=3 * GiB // 2)),
    ("64KiB", DiskReserve(percent=0.0, size=64 << 10)),
    ("1T", DiskReserve(percent=0.0, size=1 << 40)),
])
def test_a_reserve_is_a_share_of_the_disk_or_a_binary_size(text: str, expected: DiskReserve) -> None:
    assert parse_reserve(text) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("", "neither a share"), ("lots", "neither a share"), ("-5%", "neither a share"),
    ("5 PB", "neither a share"), ("5%%", "neither a share"), ("60%", "more than half"),
    ("0.5", "less than a byte"), ("0.4b", "less than a byte"),
])
def test_a_reserve_that_is_not_one_is_refused_saying_what_is(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_reserve(text)


def test_the_reserve_in_bytes_follows_the_filesystem_only_when_a_share() -> None:
    assert DiskReserve(percent=5.0).of(100 * GiB) == 5 * GiB
    assert DiskReserve(percent=0.0, size=MiB).of(100 * GiB) == MiB
    assert DiskReserve(percent=0.0, size=0).of(100 * GiB) == 0
    assert str(DiskReserve()) == "5%" and str(parse_reserve("1.5GiB")) == "1.5 GiB"
    assert show_size(0) == "0 B" and show_size(1536) == "1.5 KiB" and show_size(3 << 40) == "3.0 TiB"
    assert show_size(5000 << 40) == "5000.0 TiB"


def _node_args(*extra: str) -> Any:
    return build_parser().parse_args(["serve", "--node-id", "n1", "--data-dir", "node-data",
                                      "--initial-cluster", "n1=127.0.0.1:1/127.0.0.1:2", *extra])


def test_the_node_flag_sets_the_reserve_and_defaults_to_five_percent() -> None:
    cfg, *_ = load_config(_node_args(), {"CACHENODE_SECRET": "s"})
    assert cfg.disk_reserve == DiskReserve(percent=5.0, size=0)
    cfg, *_ = load_config(_node_args("--disk-reserve", "256MiB"), {"CACHENODE_SECRET": "s"})
    assert cfg.disk_reserve == DiskReserve(percent=0.0, size=256 * MiB)
    with pytest.raises(ConfigError, match=r"--disk-reserve: 'half' is neither"):
        load_config(_node_args("--disk-reserve", "half"), {"CACHENODE_SECRET": "s"})


def test_in_a_config_file_the_reserve_is_a_string_or_zero(tmp_path: Any) -> None:
    """A TOML number could mean a share or bytes: only 0 (off) is taken."""
    conf = tmp_path / "node.toml"
    for value, expected in (('"10%"', DiskReserve(percent=10.0)), ("0", DiskReserve(percent=0.0, size=0))):
        conf.write_text(f"disk-reserve = {value}\n")
        cfg, *_ = load_config(_node_args("--config", str(conf)), {"CACHENODE_SECRET": "s"})
        assert cfg.disk_reserve == expected
    conf.write_text("disk-reserve = 5\n")
    with pytest.raises(ConfigError, match=r'write 5 as a string, "5%" or "5MiB"'):
        load_config(_node_args("--config", str(conf)), {"CACHENODE_SECRET": "s"})


# ---- watching a filesystem -------------------------------------------------------


class Fs:
    """A filesystem of 1,000 blocks of 1 MiB whose free blocks a test sets."""

    def __init__(self, free_mib: int = 900) -> None:
        self.free = free_mib
        self.fail: OSError | None = None
        self.paths: list[str] = []

    def statvfs(self, path: str) -> os.statvfs_result:
        self.paths.append(path)
        if self.fail is not None:
            raise self.fail
        # (bsize, frsize, blocks, bfree, bavail, files, ffree, favail, flag, namemax)
        return os.statvfs_result((MiB, MiB, 1000, self.free + 10, self.free, 0, 0, 0, 0, 255))


def test_below_the_reserve_the_disk_is_full_until_the_reserve_and_a_twentieth_is_free(
        caplog: pytest.LogCaptureFixture) -> None:
    fs = Fs(free_mib=900)
    disk = DiskSpace("/data", DiskReserve(percent=10.0), "n1", statvfs=fs.statvfs)
    caplog.set_level(logging.INFO, logger="cachenode.server.disk_space")
    assert disk.check() is False and fs.paths == ["/data"]
    fs.free = 100  # the reserve (10 % of 1,000 MiB): not below it
    assert disk.check() is False
    fs.free = 99
    assert disk.check() is True and disk.full
    assert "node n1 has 99.0 MiB free of 1000.0 MiB on /data, below its reserve of 100.0 MiB (--disk-reserve 10%)" \
        in caplog.text and "until 105.0 MiB is free" in caplog.text
    assert resume_at(100 * MiB) == 105 * MiB
    fs.free = 104  # above the reserve, not yet a twentieth above it
    assert disk.check() is True
    fs.free = 105
    assert disk.check() is False
    assert "node n1 has 105.0 MiB free on /data again (reserve 100.0 MiB): its shards take writes again" \
        in caplog.text


def test_it_looks_ten_times_as_often_once_less_than_twice_the_reserve_is_free() -> None:
    fs = Fs(free_mib=201)
    disk = DiskSpace("/data", DiskReserve(percent=10.0), "n1", statvfs=fs.statvfs, interval=0.5)
    assert disk.next_look() == 0.5  # not looked yet
    disk.check()
    assert disk.next_look() == 0.5
    fs.free = 199
    disk.check()
    assert disk.next_look() == pytest.approx(0.05) and not disk.full


def test_the_refusal_says_how_much_is_free_and_what_to_do() -> None:
    fs = Fs(free_mib=20)
    disk = DiskSpace("/srv/n1", DiskReserve(percent=0.0, size=64 * MiB), "n1", statvfs=fs.statvfs)
    disk.check()
    err = disk.refusal()
    assert isinstance(err, DiskFull) and err.kind == "disk_full"
    assert status_code(err).name == "RESOURCE_EXHAUSTED"
    assert err.message == (
        "node n1 has 20.0 MiB free of 1000.0 MiB on /srv/n1, below its reserve of 64.0 MiB "
        "(--disk-reserve 64.0 MiB), so it takes no writes that add data; nothing was applied. "
        "Delete keys (deletes are taken, and the node compacts its logs to give their space back), free disk "
        "space on n1 (writes resume "
        "once 67.2 MiB is free), give it a larger disk, or lower --disk-reserve; reads still work")


def test_a_filesystem_that_cannot_be_read_counts_as_having_room(caplog: pytest.LogCaptureFixture) -> None:
    fs = Fs(free_mib=1)
    disk = DiskSpace("/data", DiskReserve(), "n1", statvfs=fs.statvfs)
    assert disk.check() is True
    fs.fail = OSError(5, "Input/output error")
    assert disk.check() is False
    assert "cannot read the free space of /data" in caplog.text


def test_a_filesystem_that_says_it_has_no_size_counts_as_having_room() -> None:
    fs = Fs(free_mib=0)
    sizeless = os.statvfs_result((4096, 0, 0, 0, 0, 0, 0, 0, 0, 255))
    disk = DiskSpace("/fuse", DiskReserve(percent=0.0, size=MiB), "n1", statvfs=lambda path: sizeless)
    assert disk.check() is False
    disk = DiskSpace("/data", DiskReserve(percent=0.0, size=MiB), "n1", statvfs=fs.statvfs)
    assert disk.check() is True


def test_no_reserve_means_no_watching() -> None:
    fs = Fs(free_mib=0)
    disk = DiskSpace("/data", DiskReserve(percent=0.0, size=0), "n1", statvfs=fs.statvfs)
    disk.start()
    disk.stop()
    assert fs.paths == [] and not disk.full


def test_start_looks_at_once_and_the_thread_keeps_looking() -> None:
    fs = Fs(free_mib=1)
    disk = DiskSpace("/data", DiskReserve(), "n1", statvfs=fs.statvfs, interval=0.01)
    disk.start()
    try:
        assert disk.full  # before start returned: a node that starts full refuses at once
        fs.free = 900
        wait_for(lambda: not disk.full, timeout=10, what="the disk-space thread to see the room")
    finally:
        disk.stop()


# ---- what peers say --------------------------------------------------------------------


def test_the_peers_are_told_at_the_first_look_and_whenever_the_disk_fills_or_has_room_again() -> None:
    fs = Fs(free_mib=900)
    told: list[dict[str, Any]] = []
    disk = DiskSpace("/data", DiskReserve(percent=10.0), "n1", statvfs=fs.statvfs, tell=told.append)
    disk.check()
    assert told == [{"disk": {"full": False, "reading": (900 * MiB, 1000 * MiB, 100 * MiB)}}]
    fs.free = 500
    disk.check()
    assert len(told) == 1  # nothing changed: said again only by the host, every second
    fs.free = 99
    disk.check()
    assert told[-1] == {"disk": {"full": True, "reading": (99 * MiB, 1000 * MiB, 100 * MiB)}} and disk.blocked
    fs.free = 98
    disk.check()
    assert len(told) == 2
    fs.free = 105
    disk.check()
    assert told[-1]["disk"]["full"] is False and not disk.blocked and len(told) == 3
    fs.fail = OSError(5, "Input/output error")  # unreadable: counts as room, and that was said
    disk.check()
    assert len(told) == 3


def test_the_node_hears_every_judgement_with_the_free_space_so_its_groups_compact_while_short() -> None:
    """``on_judged`` (the node passes GroupHost.set_short_of_disk) gets
    ``full`` and the free bytes after every look and every fault injected
    or lifted; an unreadable disk has room, free space unknown (0)."""
    fs = Fs(free_mib=900)
    judged: list[tuple[bool, int]] = []
    disk = DiskSpace("/data", DiskReserve(percent=10.0), "n1", statvfs=fs.statvfs, tell=lambda news: None,
                     on_judged=lambda full, free: judged.append((full, free)))
    disk.check()
    disk.check()
    assert judged == [(False, 900 * MiB)] * 2
    fs.free = 99
    disk.check()
    fs.free = 98
    disk.check()
    assert judged[-2:] == [(True, 99 * MiB), (True, 98 * MiB)]
    fs.free = 105
    disk.check()
    assert judged[-1] == (False, 105 * MiB)
    disk.force(True)
    assert judged[-1] == (True, 105 * MiB)
    disk.force(False)
    assert judged[-1] == (False, 105 * MiB)
    fs.fail = OSError(5, "Input/output error")
    disk.check()
    assert judged[-1] == (False, 0)


FULL_N3 = {"disk": {"full": True, "reading": (95 * MiB, 1000 * MiB, 100 * MiB)}}


def test_a_peer_below_its_reserve_refuses_the_writes_of_the_shards_with_a_replica_on_it(
        caplog: pytest.LogCaptureFixture) -> None:
    disk = DiskSpace("/data", DiskReserve(percent=10.0), "n1", statvfs=Fs(900).statvfs)
    caplog.set_level(logging.INFO, logger="cachenode.server.disk_space")
    disk.check()
    assert not disk.blocked and disk.refusal_for(4, ("n1", "n2", "n3")) is None
    disk.heard("n3", FULL_N3)
    assert disk.blocked and not disk.full and set(disk.full_peers) == {"n3"}
    assert "node n3 is below its disk reserve (95.0 MiB free of 1000.0 MiB, reserve 100.0 MiB)" in caplog.text
    assert disk.refusal_for(4, ("n1", "n2", "n4")) is None  # no replica on n3
    err = disk.refusal_for(4, ("n1", "n2", "n3"))
    assert isinstance(err, DiskFull) and err.message == (
        "shard 4 has a replica on node n3, which is below its disk reserve (95.0 MiB free of 1000.0 MiB, "
        "reserve 100.0 MiB), so the shard takes no writes that add data; nothing was applied. Delete keys "
        "(deletes are taken, and the node compacts its logs to give their space back), free disk space on n3 "
        "(writes resume once 105.0 MiB "
        "is free there), give it a larger disk, lower its --disk-reserve, or move the replica to a node with "
        "room (cachectl operator add move-replica --shard 4 --from n3 --to NODE); reads still work")
    disk.heard("n3", {"disk": {"full": False, "reading": (200 * MiB, 1000 * MiB, 100 * MiB)}})
    assert not disk.blocked and disk.refusal_for(4, ("n3",)) is None
    assert "node n3 is no longer below its disk reserve (it has room again)" in caplog.text


def test_a_peer_whose_link_is_down_counts_as_having_room_until_it_says_otherwise() -> None:
    disk = DiskSpace("/data", DiskReserve(percent=10.0), "n1", statvfs=Fs(900).statvfs)
    disk.heard("n3", FULL_N3)
    disk.heard("n2", FULL_N3)
    disk.heard("n3", None)
    assert set(disk.full_peers) == {"n2"} and disk.blocked
    disk.heard("n2", None)
    assert not disk.blocked
    disk.heard("n2", None)  # nothing to forget
    assert not disk.blocked


def test_this_nodes_own_disk_is_named_before_a_peers() -> None:
    fs = Fs(free_mib=50)
    disk = DiskSpace("/data", DiskReserve(percent=10.0), "n1", statvfs=fs.statvfs)
    disk.check()
    disk.heard("n3", FULL_N3)
    err = disk.refusal_for(4, ("n2", "n3"))
    assert err is not None and err.message.startswith("node n1 has 50.0 MiB free")
    fs.free = 900
    disk.check()
    assert disk.blocked and not disk.full  # n3 still is
    err = disk.refusal_for(4, ("n2", "n3"))
    assert err is not None and err.message.startswith("shard 4 has a replica on node n3")


@pytest.mark.parametrize("news", [
    {}, {"disk": None}, {"disk": "full"}, {"disk": {"full": 1}}, {"disk": {"full": "yes"}}, {"disk": []},
])
def test_news_that_does_not_say_full_plainly_counts_as_room(news: dict[str, Any]) -> None:
    disk = DiskSpace("/data", DiskReserve(percent=10.0), "n1", statvfs=Fs(900).statvfs)
    disk.heard("n3", news)
    assert not disk.blocked and disk.refusal_for(1, ("n3",)) is None


@pytest.mark.parametrize("reading", [None, (1, 2), ("95", 1000, 100), (1.5, 2, 3)])
def test_a_full_peer_whose_figures_are_malformed_still_refuses_without_them(reading: Any) -> None:
    disk = DiskSpace("/data", DiskReserve(percent=10.0), "n1", statvfs=Fs(900).statvfs)
    disk.heard("n3", {"disk": {"full": True, "reading": reading}})
    err = disk.refusal_for(7, ("n3",))
    assert err is not None and err.message.startswith(
        "shard 7 has a replica on node n3, which is below its disk reserve, so the shard takes no writes")
    assert "free disk space on n3, give it" in err.message and "--shard 7 --from n3 --to NODE" in err.message


def test_fault_injection_counts_the_disk_as_full_until_lifted_and_tells_the_peers() -> None:
    fs = Fs(free_mib=900)
    told: list[dict[str, Any]] = []
    disk = DiskSpace("/data", DiskReserve(percent=10.0), "n1", statvfs=fs.statvfs, tell=told.append)
    disk.check()
    disk.force(True)
    assert disk.full and disk.blocked and disk.check() is True  # a look does not undo it
    assert told[-1] == {"disk": {"full": True, "reading": None}}  # no figures: they would contradict it
    err = disk.refusal_for(3, ("n1", "n2"))
    assert err is not None and err.message == (
        "node n1 counts its disk as below its reserve (fault injection: Admin.SetDiskFault), so it takes no "
        "writes that add data; nothing was applied. Writes resume once the fault is lifted "
        "(Admin.SetDiskFault below_reserve=false); deletes and reads still work")
    disk.force(False)
    assert not disk.full and not disk.blocked and told[-1]["disk"]["full"] is False
    disk.force(False)  # lifting twice changes nothing
    assert len(told) == 3
    fs.free = 50  # lifted onto a disk that is below the reserve: judged as measured
    disk.force(True)
    disk.force(False)
    assert disk.full and told[-1]["disk"]["full"] is True and disk.refusal().message.startswith("node n1 has 50.0 MiB")


# ---- the Cache service --------------------------------------------------------------

HALF = 2**63
SHARDS = (ShardDescriptor(id=1, range_start=0, range_end=HALF - 1, epoch=1, replicas=("n1", "n2", "n3")),
          ShardDescriptor(id=2, range_start=HALF, range_end=2**64 - 1, epoch=1, replicas=("n1", "n2", "n3")))
MAP = ClusterMap(version=1, nodes=tuple(NodeInfo(n, f"{n}:1", f"{n}:2") for n in ("n1", "n2", "n3")), shards=SHARDS)


def _key_in(shard: int, tag: str) -> bytes:
    for i in range(1000):
        k = f"{tag}-{i}".encode()
        if MAP.shard_for_key(k).id == shard:
            return k
    raise AssertionError("unreachable")


class Replicas:
    """n1's view: a follower of every shard, their leader on n2.  (A leader's
    refusals need a real RaftGroup, which the compiled service insists on:
    tests/test_disk_full.py has them, on a real cluster.)"""

    def shard_for_key(self, key: bytes) -> ShardDescriptor:
        return MAP.shard_for_key(key)

    def cluster_map(self) -> ClusterMap:
        return MAP

    def local_group(self, shard_id: int) -> None:
        return None

    def leader_group(self, shard_id: int) -> Any:
        raise NotLeader(f"n1 does not lead shard {shard_id}", "n2", "n2:1")


class Forwarder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def forward(self, method: str, req: Any, targets: list[str], deadline: float, write: bool) -> Any:
        self.calls.append(method)
        return pb.MSetResponse(count=len(req.items), versions=[1]) if method == "MSet" else \
            pb.SetResponse(applied=True, version=1)


def _service(free_mib: int) -> tuple[CacheService, Forwarder]:
    cfg = NodeConfig(node_id="n1", data_dir="/data", listen="127.0.0.1:0", raft_listen="127.0.0.1:0",
                     initial_cluster=(NodeInfo("n1", "127.0.0.1:0", "127.0.0.1:0"),), secret=b"s")
    disk = DiskSpace("/data", DiskReserve(percent=10.0), "n1", statvfs=Fs(free_mib).statvfs)
    disk.check()
    fwd = Forwarder()
    return CacheService(cfg, Replicas(), fwd, SystemClock(), disk), fwd  # type: ignore[arg-type]


K1 = _key_in(1, "k")
K2 = _key_in(2, "k")


def test_a_write_for_a_shard_led_elsewhere_is_judged_by_its_leader() -> None:
    """This node's disk is below its reserve; the shard's leader decides."""
    svc, fwd = _service(free_mib=50)
    assert svc._start_set(pb.SetRequest(key=K1, value=b"v"), time.monotonic() + 10)().applied
    assert fwd.calls == ["Set"]


def test_an_mset_over_shards_all_led_elsewhere_goes_to_their_leaders() -> None:
    svc, fwd = _service(free_mib=50)
    req = pb.MSetRequest(items=[pb.KeyValue(key=K1, value=b"a"), pb.KeyValue(key=K2, value=b"b")])
    assert svc._start_mset(req, time.monotonic() + 10)().count == 2
    assert sorted(fwd.calls) == ["MSet", "MSet"]
