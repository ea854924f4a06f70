"""The node's side of the placement driver: join, heartbeats, instructions.

Every ``heartbeat_s`` the agent reports this node's store and every replica
(role, term, commit and applied index, Raft membership, the followers'
match indexes where it leads) to the PD, adopts a newer cluster map from
the reply, and carries out the reply's instructions on the replicas this
node leads.  While an operator involving this node runs, the PD asks for
reports sooner (``next_heartbeat_s``, 0.1 s), so its steps are seen done
quickly.
Instructions are idempotent (each checks the replica's current state
first), because the PD repeats them until it *observes* the result.

The PD is found by asking: the last PD, then the metadata members, then the
``--join`` endpoint; an UNAVAILABLE answer carrying a leader hint points to
the right node.

Threads: one agent thread; instructions run on the driver thread
(``host.call``).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from .._types import ClusterMap, group_label
from ..v1 import cache_pb2 as pb
from ..v1 import cache_pb2_grpc
from .config import NodeConfig
from .disk_space import DiskSpace
from .replicas import ReplicaManager
from .status import LEADER_KEY

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 2.0
MIN_HEARTBEAT_S = 0.02
"""The shortest interval a PD may ask for."""


class PdAgent:
    def __init__(self, cfg: NodeConfig, replicas: ReplicaManager, disk: DiskSpace,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """``disk``: whether this node is below its disk reserve, reported
        with every heartbeat (the PD then moves replicas off it)."""
        self.cfg = cfg
        self.r = replicas
        self.disk = disk
        self.host = replicas.host
        self.now = monotonic
        self._channels: dict[str, grpc.Channel] = {}
        self._pd_address: str | None = None
        self._joined = not cfg.join
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pd-agent", daemon=True)
        self._last: tuple[float, int, int] | None = None
        self.failures = 0
        self.instructions_done = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for ch in self._channels.values():
            ch.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            interval = self.cfg.heartbeat_s
            try:
                if not self._joined:
                    self._join()
                else:
                    asked = self.beat()
                    if 0 < asked < interval:  # operators run: report sooner
                        interval = max(MIN_HEARTBEAT_S, asked)
                self.failures = 0
            except grpc.RpcError as e:
                self.failures += 1
                if _code(e) == grpc.StatusCode.NOT_FOUND and self._joined:
                    # The PD answered: this node was removed from the map.
                    if self.failures % 100 == 1:
                        log.error(
                            "this node is not in the cluster map (removed with `cachectl node remove`?): it gets no "
                            "replicas and its old ones are out of their groups. To add it back, restart it with "
                            "--join HOST:PORT of any member (its stale replicas are deleted then). The PD said: %s",
                            _brief(e))
                    self._stop.wait(interval)
                    continue
                (log.warning if self.failures % 20 == 5 else log.debug)(
                    "placement driver unreachable (%d failed attempts): %s", self.failures, _brief(e))
            except Exception:  # keep heartbeating whatever happened
                log.exception("heartbeat failed")
            self._stop.wait(interval)

    # ---- join -----------------------------------------------------------------

    def _join(self) -> None:
        me = self.cfg.me()
        req = pb.JoinRequest(node=pb.NodeInfo(id=me.id, address=me.address, raft_address=me.raft_address))
        resp = self._call("JoinCluster", req)
        m = ClusterMap.from_dict(json.loads(resp.cluster_map_json))
        self.r.adopt_map(m)
        self._joined = True
        log.info("joined the cluster (map version %d, %d nodes)", m.version, len(m.nodes))

    # ---- heartbeat -----------------------------------------------------------

    def beat(self) -> float:
        """One heartbeat; returns the interval the PD asked for (0: ours)."""
        replicas = self.host.call(self._collect).result(RPC_TIMEOUT_S)
        me = self.cfg.me()
        m = self.r._map
        req = pb.HeartbeatRequest(
            node=pb.NodeInfo(id=me.id, address=me.address, raft_address=me.raft_address),
            map_version=m.version if m else 0, stats=self._stats(replicas), replicas=replicas,
        )
        resp = self._call("Heartbeat", req)
        self.r.set_paused_schedulers(frozenset(resp.paused_schedulers))
        if resp.cluster_map_json:
            self.r.adopt_map(ClusterMap.from_dict(json.loads(resp.cluster_map_json)))
        for ins in resp.instructions:
            self.host.call(functools.partial(self._execute, ins))
        return float(resp.next_heartbeat_s)

    def _collect(self) -> list[pb.ReplicaReport]:
        """Driver thread: one report per hosted replica, the metadata
        replica included (the PD moves it like a shard's)."""
        out = []
        for gid, g in sorted(self.host.groups().items()):
            st = g.status
            out.append(pb.ReplicaReport(
                shard_id=gid, role=st.role, leader=st.leader or "", term=st.term,
                commit_index=st.commit_index, applied_index=st.applied_index,
                members=list(st.members), match=g.match_index(),
                size_bytes=self.r.reader(gid).size_bytes(),
            ))
        return out

    def _stats(self, replicas: list[pb.ReplicaReport]) -> pb.StoreStats:
        try:
            seen = self.disk.look()  # the same look the reserve is judged by
            capacity, available, reserve = seen.capacity, seen.free, seen.reserve
        except OSError:
            capacity = available = reserve = 0
        now, w, rd = self.now(), self.r.writes_applied, self.r.reads_served
        wr = rr = 0.0
        if self._last is not None:
            dt = max(1e-3, now - self._last[0])
            wr, rr = (w - self._last[1]) / dt, (rd - self._last[2]) / dt
        self._last = (now, w, rd)
        return pb.StoreStats(
            capacity_bytes=capacity, available_bytes=available,
            used_bytes=sum(r.size_bytes for r in replicas), read_rate=rr, write_rate=wr,
            reserve_bytes=reserve, below_reserve=self.disk.full,
        )

    def _execute(self, ins: pb.Instruction) -> None:
        """Driver thread: act on one instruction if it still applies."""
        g = self.host.group(ins.shard_id)
        if g is None or not g.is_leader:
            return
        members = g.status.members

        def done(err: Any) -> None:
            if err is not None:
                log.debug("%s: %s %s: %s", group_label(ins.shard_id), ins.action, ins.target, err)

        if ins.action == "add_member" and ins.target not in members:
            log.info("%s: adding %s to the Raft group (operator %d)", group_label(ins.shard_id), ins.target, ins.operator_id)
            g.add_member(ins.target, done)
        elif ins.action == "remove_member" and ins.target in members and ins.target != self.cfg.node_id:
            log.info("%s: removing %s from the Raft group (operator %d)", group_label(ins.shard_id), ins.target, ins.operator_id)
            g.remove_member(ins.target, done)
        elif ins.action == "transfer_leader" and ins.target in members and ins.target != self.cfg.node_id:
            g.transfer_leadership(ins.target, done)
        else:
            return
        self.instructions_done += 1

    # ---- finding the PD --------------------------------------------------------

    def _candidates(self) -> list[str]:
        out: list[str] = []
        if self._pd_address:
            out.append(self._pd_address)
        m = self.r._map
        if m is not None:
            for nid in m.meta:
                n = m.node(nid)
                if n is not None:
                    out.append(n.address)
        if self.cfg.join:
            out += [a.strip() for a in self.cfg.join.split(",") if a.strip()]
        if not out and not self.cfg.join:
            out.append(self.cfg.me().address)
        seen: list[str] = []
        for a in out:
            if a not in seen:
                seen.append(a)
        return seen

    def _call(self, method: str, req: Any) -> Any:
        last: grpc.RpcError | None = None
        queue = self._candidates()
        tried: set[str] = set()
        while queue:
            addr = queue.pop(0)
            if addr in tried:
                continue
            tried.add(addr)
            stub = cache_pb2_grpc.AdminStub(self._channel(addr))
            try:
                resp = getattr(stub, method)(req, timeout=RPC_TIMEOUT_S)
                self._pd_address = addr
                return resp
            except grpc.RpcError as e:
                if _code(e) not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise  # the PD answered (e.g. NOT_FOUND: this node is not in the map)
                last = e
                hint = _leader_hint(e)
                if hint:
                    queue.insert(0, hint)
        if self._pd_address in tried:
            self._pd_address = None
        assert last is not None
        raise last

    def _channel(self, addr: str) -> grpc.Channel:
        ch = self._channels.get(addr)
        if ch is None:
            ch = self._channels[addr] = grpc.insecure_channel(addr)
        return ch


def _leader_hint(e: grpc.RpcError) -> str | None:
    md: Any = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    for k, v in md or ():
        if k == LEADER_KEY and "@" in v:
            addr = v.split("@", 1)[1]
            return addr or None
    return None


def _brief(e: grpc.RpcError) -> str:
    try:
        return f"{e.code().name}: {e.details()}"
    except Exception:  # pragma: no cover
        return str(e)


def _code(e: grpc.RpcError) -> grpc.StatusCode | None:
    try:
        return e.code()
    except Exception:  # pragma: no cover
        return None
