"""A real local cluster for tests, through the public `cachectl local` CLI.

Nodes are real processes with real sockets and real LMDB files.  Every
process is stopped by PID (`cachectl local down`, then SIGKILL of any pid
still alive), also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from cachenode.v1 import cache_pb2 as pb
from cachenode.v1 import cache_pb2_grpc as rpc

T = TypeVar("T")
CACHECTL = [sys.executable, "-m", "cachectl.main"]


def wait_for(cond: Callable[[], T], timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> T:
    """Poll ``cond`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except (grpc.RpcError, OSError, KeyError) as e:
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


def cachectl(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CACHECTL, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _no_leader_balancing(node_args: list[str]) -> bool:
    """``--leader-balance-s=0`` or ``--leader-balance-s 0`` among the node args."""
    for i, a in enumerate(node_args):
        if a.startswith("--leader-balance-s="):
            value = a.split("=", 1)[1]
        elif a == "--leader-balance-s" and i + 1 < len(node_args):
            value = node_args[i + 1]
        else:
            continue
        return float(value) == 0
    return False


class LocalCluster:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._channels: dict[str, grpc.Channel] = {}
        self._all_pids: set[int] = set()
        self._map: pb.ClusterMap | None = None

    # ---- lifecycle ----------------------------------------------------------

    def up(self, nodes: int = 3, shards: int = 4, extra: list[str] | None = None) -> None:
        args = ["local", "up", "--nodes", str(nodes), "--shards", str(shards), "--dir", str(self.dir)]
        for e in extra or []:
            args.append(f"--node-arg={e}")
        r = cachectl(*args)
        self._remember_pids()
        assert r.returncode == 0, f"local up failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        if _no_leader_balancing(extra or []):
            self.wait_all_leaders()  # no balancing: whoever was elected stays
        else:
            self.wait_settled()

    def wait_settled(self, timeout: float = 30.0) -> None:
        """Wait until every shard is led by its preferred replica (the first
        in the map), where the nodes' leader balancing moves it: a test that
        picks "the leader" right after start-up must not race that handover."""

        def settled() -> bool:
            m = self.admin(self.node_ids[0]).GetClusterMap(pb.ClusterMapRequest(), timeout=2)
            return all(s.replicas and self.leader_of(s.id) == s.replicas[0] for s in m.shards)

        wait_for(settled, timeout, "every shard led by its preferred replica", interval=0.2)

    def _remember_pids(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for n in self.info()["nodes"]:
                if n.get("pid"):
                    self._all_pids.add(int(n["pid"]))

    def down(self) -> None:
        cachectl("local", "down", "--dir", str(self.dir), timeout=60)
        self._remember_pids()
        for pid in self._all_pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def info(self) -> dict[str, Any]:
        return json.loads((self.dir / "cluster.json").read_text())  # type: ignore[no-any-return]

    def node(self, node_id: str) -> dict[str, Any]:
        for n in self.info()["nodes"]:
            if n["id"] == node_id:
                return n  # type: ignore[no-any-return]
        raise KeyError(node_id)

    @property
    def node_ids(self) -> list[str]:
        return [n["id"] for n in self.info()["nodes"]]

    def kill9(self, node_id: str) -> None:
        pid = int(self.node(node_id)["pid"])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 10, f"{node_id} (pid {pid}) to die")
        self._channels.pop(node_id, None)

    def start_node(self, node_id: str) -> None:
        r = cachectl("local", "start-node", "--dir", str(self.dir), node_id)
        self._remember_pids()
        assert r.returncode == 0, f"start-node failed:\n{r.stdout}\n{r.stderr}"

    def add_node(self, extra: list[str] | None = None) -> str:
        """Start a new node that joins (``cachectl local add-node``); its id."""
        args = ["local", "add-node", "--dir", str(self.dir), "--json"]
        for e in extra or []:
            args.append(f"--node-arg={e}")
        r = cachectl(*args)
        self._remember_pids()
        assert r.returncode == 0, f"add-node failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        return str(json.loads(r.stdout)["node"])

    def pd_status(self) -> pb.PdStatus:
        """The placement driver's status, asked of whichever node leads the
        metadata group (raises grpc.RpcError if none answers)."""
        last: grpc.RpcError | None = None
        for nid in self.node_ids:
            try:
                return self.admin(nid).GetPdStatus(pb.PdStatusRequest(), timeout=2)
            except grpc.RpcError as e:
                last = e
        assert last is not None
        raise last

    def stop_node(self, node_id: str) -> None:
        r = cachectl("local", "stop-node", "--dir", str(self.dir), node_id)
        assert r.returncode == 0, f"stop-node failed:\n{r.stdout}\n{r.stderr}"

    # ---- access ----------------------------------------------------------------

    def address(self, node_id: str) -> str:
        return str(self.node(node_id)["address"])

    @property
    def endpoints(self) -> str:
        return ",".join(n["address"] for n in self.info()["nodes"])

    def channel(self, node_id: str) -> grpc.Channel:
        ch = self._channels.get(node_id)
        if ch is None:
            ch = grpc.insecure_channel(self.address(node_id), options=[("grpc.enable_retries", 0)])
            self._channels[node_id] = ch
        return ch

    def cache(self, node_id: str) -> rpc.CacheStub:
        return rpc.CacheStub(self.channel(node_id))

    def admin(self, node_id: str) -> rpc.AdminStub:
        return rpc.AdminStub(self.channel(node_id))

    def replica_status(self, node_id: str) -> dict[int, pb.ReplicaStatus]:
        st = self.admin(node_id).GetNodeStatus(pb.NodeStatusRequest(), timeout=2)
        return {r.shard_id: r for r in st.replicas}

    def leader_of(self, shard_id: int, exclude: set[str] | None = None) -> str | None:
        """The node that reports itself leader of ``shard_id`` (with the highest term)."""
        best: tuple[int, str] | None = None
        for nid in self.node_ids:
            if exclude and nid in exclude:
                continue
            try:
                r = self.replica_status(nid).get(shard_id)
            except grpc.RpcError:
                continue
            if r is not None and r.role == "leader" and (best is None or r.term > best[0]):
                best = (r.term, nid)
        return best[1] if best else None

    def cluster_map(self) -> pb.ClusterMap:
        """The map as any reachable node reports it (cached: tests do not reshard)."""
        if self._map is None:
            for nid in self.node_ids:
                try:
                    self._map = self.admin(nid).GetClusterMap(pb.ClusterMapRequest(), timeout=2)
                    break
                except grpc.RpcError:
                    continue
        assert self._map is not None, "no node answered GetClusterMap"
        return self._map

    def shard_of(self, key: bytes) -> int:
        m = self.cluster_map()
        from cachenode._types import key_hash

        h = key_hash(key)
        for s in m.shards:
            if s.range_start <= h <= s.range_end:
                return int(s.id)
        raise AssertionError("no shard owns the key")

    def wait_all_leaders(self, timeout: float = 30.0, exclude: set[str] | None = None) -> None:
        m = wait_for(self.cluster_map, timeout, "cluster map")
        for s in m.shards:
            wait_for(lambda s=s: self.leader_of(s.id, exclude), timeout, f"a leader for shard {s.id}")


@contextlib.contextmanager
def local_cluster(directory: Path, nodes: int = 3, shards: int = 4, extra: list[str] | None = None) -> Iterator[LocalCluster]:
    c = LocalCluster(directory)
    try:
        c.up(nodes, shards, extra)
        yield c
    finally:
        c.down()
