"""A real cluster whose disk fills up: its nodes refuse the writes that add
data once less than the reserve is free, keep every write they acknowledged,
go on deleting and reading, and take writes again once the disk has room.

The three nodes keep their data on one small tmpfs that this test mounts
(and grows, as an operator would add space) and unmounts; the test needs
root and ``mount``, like the network-namespace tests.  The reserve's
arithmetic, with a fake filesystem: tests/test_disk_space.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from _nodes import cachectl, local_cluster, pid_alive, wait_for

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


def test_a_full_disk_refuses_writes_keeps_acknowledged_ones_and_takes_writes_again_with_room(small_disk: Path) -> None:
    with local_cluster(small_disk / "c", nodes=3, shards=4, extra=[f"--disk-reserve={RESERVE}"]) as c, \
            CacheClient(c.endpoints.split(","), timeout=10) as client:
        pids = [int(n["pid"]) for n in c.info()["nodes"]]
        # Fill the disk through the smart client until a leader refuses.
        acked: dict[bytes, bytes] = {}
        refusal: DiskFull | None = None
        for i in range(2 * DISK_MIB * MiB // VALUE_BYTES):
            key = f"fill-{i}".encode()
            try:
                client.set(key, _value(i))
            except DiskFull as e:
                refusal = e
                break
            acked[key] = _value(i)
        assert refusal is not None, f"{len(acked)} sets of 256 KiB and the disk never filled ({_free(small_disk)} B free)"
        assert acked, "the first write was refused: the disk had no room to begin with"
        assert "below its reserve of 96.0 MiB (--disk-reserve 96.0 MiB)" in refusal.message
        assert "nothing was applied" in refusal.message
        assert _free(small_disk) > 16 * MiB, "the reserve left no room: the test's sizes are wrong"

        # Every node sees the same filesystem: each leader refuses, raw
        # calls get RESOURCE_EXHAUSTED with the disk_full kind.
        for node in c.node_ids:
            stub = c.cache(node)

            def refused(stub=stub) -> bool:  # type: ignore[no-untyped-def]
                try:
                    stub.Set(pb.SetRequest(key=b"probe", value=b"x"), timeout=10)
                except grpc.RpcError as e:
                    return e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and \
                        ("cachenode-error", "disk_full") in tuple(e.trailing_metadata() or ())
                return False

            wait_for(refused, timeout=10, what=f"{node} to refuse a set with disk_full")

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
        # A raw MSet over every shard, to a node that leads some of them, is
        # refused whole: none of its keys appears on any shard.
        keys = [f"multi-{i}".encode() for i in range(32)]
        assert len({c.shard_of(k) for k in keys}) == 4
        err = _refused_raw(c.cache(c.node_ids[0]), "MSet",
                           pb.MSetRequest(items=[pb.KeyValue(key=k, value=b"v") for k in keys]))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert all(v is None for v in client.mget(keys).values())

        # cachectl: one line and a non-zero exit.
        r = cachectl("--endpoints", c.endpoints, "set", "cli-key", "v")
        assert r.returncode == 1 and r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and "below its reserve" in r.stderr, r.stderr

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

        probes = {k: b"x" for k in keys}  # over every shard, so every leader's judgement

        def takes_writes() -> bool:
            with contextlib.suppress(DiskFull):
                return client.mset(probes) == len(probes)
            return False

        wait_for(takes_writes, timeout=10, what="every leader to take writes again")
        assert client.set(first, b"after")
        assert client.mset({b"other": b"x", b"more": b"y"}) == 2
        assert client.incr(b"counter") == 1
        assert client.get(first).value == b"after"
        assert all(pid_alive(p) for p in pids)
