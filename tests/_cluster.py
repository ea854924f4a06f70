"""Clusters for tests.

* :class:`FakeCluster` -- a TEST DOUBLE: N in-process gRPC servers that speak
  the cachenode wire API over real loopback sockets, backed by one dict.  No
  Raft.  It follows the server conventions the client relies on (not_leader
  with a hint when ``no_forward`` is set, request-id dedup, error metadata),
  records every call, and can be told to fail the next calls of a method.
* :func:`local_cluster` -- a REAL cluster: ``cachectl local up`` in a temp
  dir, yields its endpoints, and always tears it down by PID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from cachenode._types import ClusterMap, NodeInfo, ShardDescriptor, key_hash
from cachenode.v1 import cache_pb2 as pb
from cachenode.v1 import cache_pb2_grpc as pb_grpc

# ---------------------------------------------------------------------------
# FakeCluster (test double)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Fault:
    """Fail the next ``count`` calls of ``method`` (on ``node`` or any node)."""

    method: str
    code: grpc.StatusCode
    kind: str | None = None
    leader: str | None = None
    count: int = 1
    node: str | None = None
    apply_first: bool = False  # writes: apply, then fail (outcome unknown for the client)
    delay_s: float = 0.0  # sleep before failing (or before answering when code is OK)


@dataclasses.dataclass
class Call:
    node: str
    method: str
    request: Any


@dataclasses.dataclass
class Entry:
    value: bytes
    version: int
    expires_at: float | None  # time.monotonic() seconds


class FakeState:
    """Shared by every FakeNode: the map, who leads what, the data, the faults."""

    def __init__(self, cluster_map: ClusterMap) -> None:
        self.lock = threading.RLock()
        self.map = cluster_map
        self.leaders: dict[int, str] = {s.id: s.replicas[0] for s in cluster_map.shards}
        self.data: dict[bytes, Entry] = {}
        self.index = 0
        self.dedup: dict[tuple[bytes, int], Any] = {}
        self.applies: dict[tuple[bytes, int], int] = {}
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.published_leaders: dict[int, str] | None = None  # what GetClusterMap reports

    def fault_for(self, node: str, method: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.method == method and (f.node is None or f.node == node) and f.count > 0:
                    f.count -= 1
                    return f
            return None

    def next_index(self) -> int:
        self.index += 1
        return self.index

    def live(self, key: bytes) -> Entry | None:
        e = self.data.get(key)
        if e is not None and e.expires_at is not None and e.expires_at <= time.monotonic():
            del self.data[key]
            return None
        return e


def _ttl_left(e: Entry) -> int:
    if e.expires_at is None:
        return -1
    return max(0, int((e.expires_at - time.monotonic()) * 1000))


class _Abort(Exception):
    def __init__(
        self, code: grpc.StatusCode, details: str, md: tuple[tuple[str, str], ...]
    ) -> None:
        super().__init__(details)
        self.code, self.details, self.md = code, details, md


class _OpAbort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, md: tuple[tuple[str, str], ...]) -> None:
        super().__init__(details)
        self.code, self.details, self.md = code, details, md


class _OpContext:
    """A ServicerContext for one op of a fake Batch: ``abort`` raises."""

    def __init__(self, outer: Any) -> None:
        self._outer = outer
        self.md: tuple[tuple[str, str], ...] = ()

    def set_trailing_metadata(self, md: Any) -> None:
        self.md = tuple(md)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _OpAbort(code, details, self.md)

    def time_remaining(self) -> Any:
        return self._outer.time_remaining()

    def is_active(self) -> bool:
        return True


_BATCH_METHODS = {
    "get": "Get", "set": "Set", "delete": "Delete", "cas": "CompareAndSet", "incr": "Incr", "ttl": "Ttl",
    "mget": "MGet", "mset": "MSet",
}


def batch_via_unary(servicer: Any, request: pb.BatchRequest, context: Any) -> pb.BatchResponse:
    """The Batch RPC of a test double: each op through the double's own unary
    handler, its abort turned into that op's OpError, as the real node does."""
    results = []
    for op in request.ops:
        which = op.WhichOneof("op")
        if which is None:
            results.append(pb.BatchResult(error=pb.OpError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="empty op", kind="invalid_argument")))
            continue
        ctx = _OpContext(context)
        try:
            resp = getattr(servicer, _BATCH_METHODS[which])(getattr(op, which), ctx)
            results.append(pb.BatchResult(**{which: resp}))
        except _OpAbort as a:
            md = dict(a.md)
            results.append(pb.BatchResult(error=pb.OpError(
                code=a.code.value[0], message=a.details,
                kind=md.get("cachenode-error", ""), leader=md.get("cachenode-leader", ""))))
    return pb.BatchResponse(results=results)


class FakeNode(pb_grpc.CacheServicer, pb_grpc.AdminServicer):
    """One fake node: a real gRPC server on a loopback port."""

    def __init__(self, node_id: str, state: FakeState, listen: str = "127.0.0.1:0") -> None:
        self.node_id = node_id
        self.state = state
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_CacheServicer_to_server(self, self.server)
        pb_grpc.add_AdminServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        self.address = f"{listen.rpartition(':')[0]}:{self.port}"
        self.up = False

    def start(self) -> None:
        self.server.start()
        self.up = True

    def stop(self) -> None:
        self.server.stop(grace=None).wait()
        self.up = False

    def Batch(self, request: pb.BatchRequest, context: Any) -> pb.BatchResponse:
        if not self.up:
            context.abort(grpc.StatusCode.UNAVAILABLE, "node down")
        return batch_via_unary(self, request, context)

    # ---- plumbing --------------------------------------------------------

    def _handle(
        self, method: str, request: Any, context: Any, body: Callable[[], Any], write: bool
    ) -> Any:
        st = self.state
        with st.lock:
            st.calls.append(Call(self.node_id, method, request))
        fault = st.fault_for(self.node_id, method)
        try:
            if fault is not None:
                if fault.delay_s:
                    time.sleep(fault.delay_s)
                if fault.code == grpc.StatusCode.OK:
                    fault = None
                else:
                    if fault.apply_first:
                        self._dedup(request, body, write)
                    md: list[tuple[str, str]] = []
                    if fault.kind:
                        md.append(("cachenode-error", fault.kind))
                    if fault.leader:
                        md.append(("cachenode-leader", fault.leader))
                    raise _Abort(fault.code, f"injected {fault.code.name}", tuple(md))
            return self._dedup(request, body, write)
        except _Abort as a:
            if a.md:
                context.set_trailing_metadata(a.md)
            context.abort(a.code, a.details)

    def _dedup(self, request: Any, body: Callable[[], Any], write: bool) -> Any:
        st = self.state
        header = getattr(request, "header", None)
        rid = None
        if write and header is not None and header.HasField("request_id"):
            rid = (header.request_id.client_id, header.request_id.seq)
        with st.lock:
            if rid is not None and rid in st.dedup:
                return st.dedup[rid]
            resp = body()
            if rid is not None:
                st.dedup[rid] = resp
                st.applies[rid] = st.applies.get(rid, 0) + 1
            return resp

    def _route(self, key: bytes, header: pb.RequestHeader) -> int:
        st = self.state
        shard = st.map.shard_for_hash(key_hash(key))
        if header.shard_epoch and header.shard_epoch != shard.epoch:
            raise _Abort(
                grpc.StatusCode.ABORTED,
                f"shard {shard.id} is at epoch {shard.epoch}",
                (("cachenode-error", "epoch_mismatch"),),
            )
        leader = st.leaders.get(shard.id)
        if header.no_forward and leader != self.node_id:
            md = [("cachenode-error", "not_leader")]
            if leader:
                info = st.map.node(leader)
                md.append(("cachenode-leader", f"{leader}@{info.address if info else ''}"))
            raise _Abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{self.node_id} does not lead shard {shard.id}",
                tuple(md),
            )
        return shard.id

    def _run(
        self,
        method: str,
        request: Any,
        context: Any,
        keys: list[bytes],
        fn: Callable[[], Any],
        write: bool,
    ) -> Any:
        def body() -> Any:
            for k in keys:
                if not k:
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "empty key",
                        (("cachenode-error", "invalid_argument"),),
                    )
            shard_ids = {self._route(k, request.header) for k in keys}
            if len(shard_ids) > 1:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "keys span shards",
                    (("cachenode-error", "invalid_argument"),),
                )
            return fn()

        return self._handle(method, request, context, body, write)

    def _meta(self, key: bytes) -> pb.ReadMeta:
        shard = self.state.map.shard_for_hash(key_hash(key))
        return pb.ReadMeta(
            shard_id=shard.id, applied_index=self.state.index, served_by=self.node_id
        )

    # ---- Cache -----------------------------------------------------------

    def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        def fn() -> pb.GetResponse:
            e = self.state.live(request.key)
            if e is None:
                return pb.GetResponse(found=False, meta=self._meta(request.key))
            return pb.GetResponse(
                found=True,
                value=e.value,
                version=e.version,
                ttl_ms=_ttl_left(e),
                meta=self._meta(request.key),
            )

        return self._run("Get", request, context, [request.key], fn, False)

    def Set(self, request: pb.SetRequest, context: Any) -> pb.SetResponse:
        def fn() -> pb.SetResponse:
            st = self.state
            e = st.live(request.key)
            if (request.condition == pb.IF_ABSENT and e is not None) or (
                request.condition == pb.IF_PRESENT and e is None
            ):
                return pb.SetResponse(applied=False, version=e.version if e else 0)
            v = st.next_index()
            st.data[request.key] = Entry(
                request.value,
                v,
                time.monotonic() + request.ttl_ms / 1000 if request.ttl_ms else None,
            )
            return pb.SetResponse(applied=True, version=v)

        return self._run("Set", request, context, [request.key], fn, True)

    def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        def fn() -> pb.DeleteResponse:
            st = self.state
            existed = st.live(request.key) is not None
            st.data.pop(request.key, None)
            return pb.DeleteResponse(deleted=existed, version=st.next_index())

        return self._run("Delete", request, context, [request.key], fn, True)

    def CompareAndSet(
        self, request: pb.CompareAndSetRequest, context: Any
    ) -> pb.CompareAndSetResponse:
        def fn() -> pb.CompareAndSetResponse:
            st = self.state
            e = st.live(request.key)
            which = request.WhichOneof("expected")
            if which == "expected_value":
                ok = e is not None and e.value == request.expected_value
            elif which == "expected_version":
                ok = (
                    (e is None)
                    if request.expected_version == 0
                    else (e is not None and e.version == request.expected_version)
                )
            else:
                ok = e is None
            if not ok:
                return pb.CompareAndSetResponse(
                    succeeded=False,
                    current_found=e is not None,
                    current_value=e.value if e else b"",
                    current_version=e.version if e else 0,
                )
            v = st.next_index()
            st.data[request.key] = Entry(
                request.new_value,
                v,
                time.monotonic() + request.ttl_ms / 1000 if request.ttl_ms else None,
            )
            return pb.CompareAndSetResponse(succeeded=True, version=v)

        return self._run("CompareAndSet", request, context, [request.key], fn, True)

    def Incr(self, request: pb.IncrRequest, context: Any) -> pb.IncrResponse:
        def fn() -> pb.IncrResponse:
            st = self.state
            e = st.live(request.key)
            try:
                cur = int(e.value) if e is not None else 0
            except ValueError:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "value is not an integer",
                    (("cachenode-error", "failed_precondition"),),
                ) from None
            new = cur + request.delta
            v = st.next_index()
            st.data[request.key] = Entry(str(new).encode(), v, e.expires_at if e else None)
            return pb.IncrResponse(value=new, version=v)

        return self._run("Incr", request, context, [request.key], fn, True)

    def Ttl(self, request: pb.TtlRequest, context: Any) -> pb.TtlResponse:
        def fn() -> pb.TtlResponse:
            e = self.state.live(request.key)
            if e is None:
                return pb.TtlResponse(found=False, meta=self._meta(request.key))
            return pb.TtlResponse(found=True, ttl_ms=_ttl_left(e), meta=self._meta(request.key))

        return self._run("Ttl", request, context, [request.key], fn, False)

    def MGet(self, request: pb.MGetRequest, context: Any) -> pb.MGetResponse:
        def fn() -> pb.MGetResponse:
            items = []
            for k in request.keys:
                e = self.state.live(k)
                if e is None:
                    items.append(pb.MGetItem(key=k, found=False))
                else:
                    items.append(
                        pb.MGetItem(
                            key=k, found=True, value=e.value, version=e.version, ttl_ms=_ttl_left(e)
                        )
                    )
            return pb.MGetResponse(items=items)

        return self._run("MGet", request, context, list(request.keys), fn, False)

    def MSet(self, request: pb.MSetRequest, context: Any) -> pb.MSetResponse:
        def fn() -> pb.MSetResponse:
            st = self.state
            v = st.next_index()
            for kv in request.items:
                st.data[kv.key] = Entry(
                    kv.value, v, time.monotonic() + kv.ttl_ms / 1000 if kv.ttl_ms else None
                )
            return pb.MSetResponse(count=len(request.items), versions=[v])

        return self._run("MSet", request, context, [kv.key for kv in request.items], fn, True)

    # ---- Admin -----------------------------------------------------------

    def GetClusterMap(self, request: pb.ClusterMapRequest, context: Any) -> pb.ClusterMap:
        def body() -> pb.ClusterMap:
            st = self.state
            leaders = st.leaders if st.published_leaders is None else st.published_leaders
            return pb.ClusterMap(
                version=st.map.version,
                nodes=[
                    pb.NodeInfo(id=n.id, address=n.address, raft_address=n.raft_address)
                    for n in st.map.nodes
                ],
                shards=[
                    pb.ShardDescriptor(
                        id=s.id,
                        range_start=s.range_start,
                        range_end=s.range_end,
                        epoch=s.epoch,
                        replicas=list(s.replicas),
                    )
                    for s in st.map.shards
                ],
                leaders=dict(leaders),
            )

        return self._handle("GetClusterMap", request, context, body, False)

    def GetNodeStatus(self, request: pb.NodeStatusRequest, context: Any) -> pb.NodeStatus:
        def body() -> pb.NodeStatus:
            st = self.state
            info = st.map.node(self.node_id)
            assert info is not None
            replicas = []
            for s in st.map.shards_on(self.node_id):
                leader = st.leaders.get(s.id, "")
                replicas.append(
                    pb.ReplicaStatus(
                        shard_id=s.id,
                        role="leader" if leader == self.node_id else "follower",
                        leader=leader,
                        term=3,
                        commit_index=st.index,
                        applied_index=st.index,
                        size_bytes=4096,
                        keys=len(st.data),
                    )
                )
            return pb.NodeStatus(
                node=pb.NodeInfo(id=info.id, address=info.address, raft_address=info.raft_address),
                replicas=replicas,
                uptime_s=12.5,
                version="0.1.0",
                fsync="never",
            )

        return self._handle("GetNodeStatus", request, context, body, False)

    def GetShardStatus(self, request: pb.ShardStatusRequest, context: Any) -> pb.ShardStatus:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")


class FakeCluster:
    """N fake nodes sharing one :class:`FakeState`.  Use as a context manager."""

    def __init__(self, nodes: int = 3, shards: int = 4, replication: int = 3) -> None:
        ids = [f"n{i + 1}" for i in range(nodes)]
        self.state = FakeState(
            ClusterMap.bootstrap([NodeInfo(i, "", "") for i in ids], shards, replication)
        )
        self.nodes = {i: FakeNode(i, self.state) for i in ids}
        infos = tuple(
            NodeInfo(i, n.address, f"127.0.0.1:{20000 + k}")  # raft addresses are never dialled
            for k, (i, n) in enumerate(self.nodes.items())
        )
        self.state.map = dataclasses.replace(self.state.map, nodes=infos)

    @property
    def endpoints(self) -> list[str]:
        return [n.address for n in self.nodes.values()]

    def __enter__(self) -> FakeCluster:
        for n in self.nodes.values():
            n.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for n in self.nodes.values():
            if n.up:
                n.stop()

    def inject(self, fault: Fault) -> Fault:
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def calls(self, method: str | None = None) -> list[Call]:
        with self.state.lock:
            return [c for c in self.state.calls if method is None or c.method == method]

    def clear_calls(self) -> None:
        with self.state.lock:
            self.state.calls.clear()

    def leader_of_key(self, key: bytes) -> str:
        return self.state.leaders[self.state.map.shard_for_hash(key_hash(key)).id]

    def leader_and_follower(self, key: bytes) -> tuple[ShardDescriptor, str, str]:
        """(the key's shard, its leader now, another of its replicas): what a
        test that moves the leader starts from."""
        shard = self.state.map.shard_for_hash(key_hash(key))
        old = self.state.leaders[shard.id]
        return shard, old, next(n for n in shard.replicas if n != old)

    def move_leader(self, shard_id: int, node_id: str) -> None:
        with self.state.lock:
            self.state.leaders[shard_id] = node_id


# ---------------------------------------------------------------------------
# local_cluster (real node processes through `cachectl local up`)
# ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def kill_by_pid(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM, wait, SIGKILL.  Only the given pids; never by name."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 5
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.05)


def recorded_pids(directory: Path) -> list[int]:
    try:
        doc = json.loads((directory / "cluster.json").read_text())
    except (OSError, ValueError):
        return []
    return [int(n["pid"]) for n in doc.get("nodes", []) if n.get("pid")]


@contextlib.contextmanager
def local_cluster(
    directory: Path, *, nodes: int = 3, shards: int = 4, wait_s: float = 90.0
) -> Iterator[list[str]]:
    """Start a real cluster with ``cachectl local up``; yield its endpoints; always tear it down."""
    from cachectl.main import main

    seen: set[int] = set()
    try:
        code = main(
            [
                "local",
                "up",
                "--nodes",
                str(nodes),
                "--shards",
                str(shards),
                "--dir",
                str(directory),
                "--wait",
                str(wait_s),
                "--json",
            ],
            dict(os.environ),
        )
        seen.update(recorded_pids(directory))
        if code != 0:
            logs = "\n".join(
                f"--- {p}:\n{p.read_text()[-2000:]}" for p in sorted(directory.glob("*/node.log"))
            )
            raise RuntimeError(f"cachectl local up failed with exit code {code}\n{logs}")
        doc = json.loads((directory / "cluster.json").read_text())
        yield [n["address"] for n in doc["nodes"]]
    finally:
        seen.update(recorded_pids(directory))
        with contextlib.suppress(Exception):
            main(["local", "down", "--dir", str(directory)], dict(os.environ))
        kill_by_pid(sorted(seen))


# ---------------------------------------------------------------------------
# A fake node PROCESS (test double for `cachenode.server.main serve`), so the
# `cachectl local` lifecycle can be tested without the real server:
#   python -m _cluster serve --node-id n1 --listen H:P --initial-cluster ... --shards S ...
# Every fake node derives the same map and leaders (first replica leads), but
# keeps its own data.  FAKE_NODE_FAIL=<id> makes that node exit 1 at startup.
# ---------------------------------------------------------------------------


def fake_node_main(argv: list[str]) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="fake-node")
    p.add_argument("command", choices=["serve"])
    p.add_argument("--node-id", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--raft-listen", required=True)
    p.add_argument("--initial-cluster", required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--replication", type=int, required=True)
    p.add_argument("--secret-file", required=True)
    p.add_argument("--fsync")
    p.add_argument("--log-format")
    a = p.parse_args(argv)
    if os.environ.get("FAKE_NODE_FAIL") == a.node_id:
        print(f"fake node {a.node_id}: failing on purpose (FAKE_NODE_FAIL)", file=sys.stderr)
        return 1
    if not Path(a.secret_file).read_text().strip():
        print("empty secret", file=sys.stderr)
        return 1
    infos = []
    for part in a.initial_cluster.split(","):
        node_id, _, addrs = part.partition("=")
        client, _, raft = addrs.partition("/")
        infos.append(NodeInfo(node_id, client, raft))
    state = FakeState(ClusterMap.bootstrap(infos, a.shards, a.replication))
    node = FakeNode(a.node_id, state, a.listen)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    node.start()
    print(f"fake node {a.node_id} serving on {node.address}", file=sys.stderr, flush=True)
    while not stop.wait(0.2):
        pass
    node.stop()
    print(f"fake node {a.node_id} stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(fake_node_main(sys.argv[1:]))
