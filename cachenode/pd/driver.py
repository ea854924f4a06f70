"""The placement driver at run time.

Every node runs one :class:`PlacementDriver`; it is *active* only while the
node's replica of the metadata Raft group leads, so the PD role moves with
that leadership and losing a node never stops scheduling.  On becoming
active it reads the replicated record (after a barrier, so it sees every
committed change), takes over the running operators, and treats every node
as just heard from (a fresh PD must not declare nodes dead from its own
ignorance; down-time counts from the takeover).

State it keeps only in memory (soft state, rebuilt from heartbeats): the
last report of every node.  State it replicates (through ``MetaStore``):
the cluster map and the operator record.

Threads: one PD thread runs :meth:`_loop` (step operators, plan, propose);
gRPC threads call :meth:`heartbeat`, :meth:`join` and the admin methods.
All of them take ``self._lock``; proposals are made while holding it, which
serialises every map change (joins, drains, operator steps) through one
compare-and-set chain.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .._errors import (
    CacheError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotLeader,
    Unavailable,
)
from .._types import (
    DRAINING,
    META_GROUP_ID,
    REMOVING,
    SERVING,
    ClusterMap,
    NodeId,
    NodeInfo,
    group_label,
)
from ..fsm.meta_machine import set_map_command, set_pd_command
from .controller import AdmitError, OperatorController
from .model import ClusterView, Liveness, NodeView, ReplicaReport, StoreStats
from .operator import Instruction, Operator, move_replica, transfer_leader
from .planner import Plan, PlanConfig, plan

log = logging.getLogger(__name__)


class MetaStore(Protocol):
    """The metadata Raft group, as the PD needs it (implemented by the node)."""

    def is_leader(self) -> bool: ...
    def leader_hint(self) -> tuple[NodeId | None, str | None]: ...
    def read(self) -> tuple[ClusterMap | None, dict[str, Any]]: ...
    def propose(self, payload: bytes, timeout: float) -> dict[str, Any]: ...
    def barrier(self, timeout: float) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class PdConfig:
    tick_s: float = 0.2
    heartbeat_s: float = 0.5  # the nodes' interval; sets the warm-up and down-after defaults
    # While operators run, the nodes they involve are asked to report this
    # often, and each of their reports wakes the PD to step the operators
    # (at most every MIN_TICK_S): an operator step then takes about this
    # long instead of up to a tick and two heartbeats.
    busy_heartbeat_s: float = 0.1
    down_after_s: float = 3.0  # silent this long: down (no new replicas, no balancing onto it)
    max_down_time_s: float = 1800.0  # down this long: dead, its replicas are re-created elsewhere
    plan: PlanConfig = PlanConfig()


MIN_TICK_S = 0.05
"""Rounds woken by heartbeats are at least this far apart."""


@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatReply:
    """What the PD answers a node's heartbeat with."""

    map: ClusterMap | None  # newer than the node's, else None
    instructions: list[Instruction]  # addressed to the node
    paused: list[str]  # paused schedulers: nodes stop preferred-leader moves under balance-leader
    next_heartbeat_s: float  # report again after this long; 0: at the node's own interval


@dataclasses.dataclass(slots=True)
class _Report:
    at: float
    node: NodeInfo
    stats: StoreStats
    replicas: tuple[ReplicaReport, ...]


class PlacementDriver:
    def __init__(self, node_id: NodeId, meta: MetaStore, cfg: PdConfig, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.node_id = node_id
        self.meta = meta
        self.cfg = cfg
        self.now = monotonic
        self.controller = OperatorController(cfg.plan)
        self._lock = threading.RLock()
        self._active_since: float | None = None
        self._reports: dict[NodeId, _Report] = {}
        self._instructions: dict[NodeId, list[Instruction]] = {}
        self._map: ClusterMap | None = None
        self._pd_version = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # a report arrived while operators run
        self._thread = threading.Thread(target=self._loop, name="pd", daemon=True)
        self.proposals_failed = 0

    # ---- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)

    @property
    def active(self) -> bool:
        return self._active_since is not None

    def _loop(self) -> None:
        last = last_plan = float("-inf")
        while not self._stop.is_set():
            self._wake.wait(self.cfg.tick_s)
            self._wake.clear()
            early = MIN_TICK_S - (time.monotonic() - last)
            if early > 0 and self._stop.wait(early):
                break
            if self._stop.is_set():
                break
            last = time.monotonic()
            # Woken rounds only step the running operators; planning new ones
            # keeps the regular pace (it reads every shard).
            plan = last - last_plan >= self.cfg.tick_s
            if plan:
                last_plan = last
            try:
                self._tick(plan)
            except CacheError as e:
                log.info("pd: %s", e.message)
            except Exception:  # the PD must outlive any bug in one round
                log.exception("pd: round failed")

    # ---- one round --------------------------------------------------------------

    def _tick(self, plan: bool = True) -> None:
        if not self.meta.is_leader():
            if self._active_since is not None:
                log.info("pd: no longer the metadata leader; placement driver idle")
            with self._lock:
                self._active_since = None
                self._instructions = {}
            return
        with self._lock:
            if self._active_since is None:
                self._take_over()
            view = self._view()
            out = self.controller.step(view, self.now())
            self._instructions = out.instructions
            if out.map is not None:
                self._set_map(out.map)
            if out.changed:
                self._save()
            self._forget_removed(view)
            if not plan or self.now() - (self._active_since or 0) < self._warmup_s():
                return
            p = self._plan(self._view())
            admitted = 0
            for op in p.operators:
                try:
                    op.id = self.controller.next_id  # planned ids are provisional
                    self.controller.admit(op, view, self.now())
                    admitted += 1
                    log.info("pd: operator %d %s (because %s)", op.id, op.summary(), op.reason)
                except AdmitError as e:
                    log.debug("pd: not admitted: %s: %s", op.summary(), e)
            if admitted:
                self._save()

    def _warmup_s(self) -> float:
        """Wait this long after a takeover: every live node has reported."""
        return max(1.0, 3 * self.cfg.heartbeat_s)

    def _take_over(self) -> None:
        self.meta.barrier(5.0)
        m, rec = self.meta.read()
        if m is None:
            raise Unavailable("the cluster map is not bootstrapped yet")
        now = self.now()
        self._map = m
        self._pd_version = int(rec.get("version", 0))
        self.controller.load(rec, now)
        self._reports = {}
        self._active_since = now
        log.info("pd: active on %s (map version %d, %d running operators)", self.node_id, m.version, len(self.controller.running()))

    def _plan(self, view: ClusterView) -> Plan:
        ids = itertools.count(self.controller.next_id)
        return plan(view, self.controller.running(), self.cfg.plan, lambda: next(ids), self.controller.paused)

    def _view(self) -> ClusterView:
        m = self._map
        assert m is not None and self._active_since is not None
        now = self.now()
        nodes = {}
        for n in m.nodes:
            rep = self._reports.get(n.id)
            silent = now - (rep.at if rep else self._active_since)
            if silent < self.cfg.down_after_s:
                live = Liveness.UP
            elif silent < self.cfg.max_down_time_s:
                live = Liveness.DOWN
            else:
                live = Liveness.DEAD
            nodes[n.id] = NodeView(
                n.id, n.state, live, rep.stats if rep else StoreStats(),
                rep.replicas if rep else (), silent if live is not Liveness.UP else 0.0,
            )
        return ClusterView.build(m, nodes)

    def _set_map(self, new: ClusterMap) -> None:
        assert self._map is not None
        res = self.meta.propose(set_map_command(self._map.version, new), 5.0)
        if res.get("ok"):
            self._map = new
        else:
            self.proposals_failed += 1
            m, _ = self.meta.read()
            if m is not None:
                self._map = m
            raise Unavailable(f"map update refused ({res.get('error')}); retrying next round")

    def _save(self) -> None:
        rec = self.controller.to_record(self._pd_version + 1)
        res = self.meta.propose(set_pd_command(self._pd_version, rec), 5.0)
        if res.get("ok"):
            self._pd_version += 1
        else:
            self.proposals_failed += 1
            self._active_since = None  # someone else wrote: take over again from the record
            raise Unavailable(f"pd record update refused ({res.get('error')})")

    def _forget_removed(self, view: ClusterView) -> None:
        """Nodes being removed leave the map once they hold nothing."""
        assert self._map is not None
        for n in self._map.nodes:
            if n.state == REMOVING and not self._map.shards_on(n.id) and n.id not in self._map.meta and not any(
                n.id in o.nodes_added() for o in self.controller.running()
            ):
                log.info("pd: node %s holds no replicas: removed from the cluster", n.id)
                self._set_map(self._map.without_node(n.id))
                self._reports.pop(n.id, None)

    # ---- gRPC threads -------------------------------------------------------

    def _require_active(self) -> ClusterMap:
        if self._active_since is None or self._map is None:
            leader, addr = self.meta.leader_hint()
            raise NotLeader(
                f"node {self.node_id} is not the placement driver (the metadata group's leader is {leader or 'unknown'})",
                leader if leader != self.node_id else None, addr,
            )
        return self._map

    def heartbeat(
        self, node: NodeInfo, map_version: int, stats: StoreStats, replicas: tuple[ReplicaReport, ...]
    ) -> HeartbeatReply:
        """Record a node's report and answer it.  While an operator that
        involves the node runs, the report wakes the PD's loop and the node
        is asked to report again after ``busy_heartbeat_s``."""
        with self._lock:
            m = self._require_active()
            known = m.node(node.id)
            if known is None:
                raise NotFound(f"node {node.id} is not a member of this cluster; start it with --join to add it")
            self._reports[node.id] = _Report(self.now(), node, stats, replicas)
            involved = node.id in self._involved(m)
            if involved:
                self._wake.set()
            fast = involved and self.cfg.busy_heartbeat_s < self.cfg.heartbeat_s
            return HeartbeatReply(
                m if map_version < m.version else None,
                list(self._instructions.get(node.id, ())),
                sorted(self.controller.paused),
                self.cfg.busy_heartbeat_s if fast else 0.0,
            )

    def _involved(self, m: ClusterMap) -> set[NodeId]:
        """Under the lock: the nodes whose reports a running operator waits
        for (its shard's replicas, the nodes it adds and removes)."""
        out: set[NodeId] = set()
        for op in self.controller.running():
            desc = m.group(op.shard)
            if desc is not None:
                out.update(desc.replicas)
            out |= op.nodes_added() | op.nodes_removed()
        return out

    def join(self, node: NodeInfo) -> ClusterMap:
        """Register a node (idempotent: a restarted node joins again)."""
        with self._lock:
            m = self._require_active()
            if not node.id or not node.address or not node.raft_address:
                raise InvalidArgument("a joining node needs an id, a client address and a Raft address")
            old = m.node(node.id)
            if old is not None and (old.address, old.raft_address) == (node.address, node.raft_address):
                return m
            for n in m.nodes:
                if n.id != node.id and (n.address == node.address or n.raft_address == node.raft_address):
                    raise FailedPrecondition(f"address already used by node {n.id}")
            state = old.state if old is not None else SERVING
            self._set_map(m.with_node(dataclasses.replace(node, state=state)))
            self._reports[node.id] = _Report(self.now(), node, StoreStats(), ())
            log.info("pd: node %s joined (%s, raft %s)", node.id, node.address, node.raft_address)
            assert self._map is not None
            return self._map

    def set_node_state(self, node_id: NodeId, action: str) -> str:
        """``drain`` | ``resume`` | ``remove``; returns a human message."""
        with self._lock:
            m = self._require_active()
            n = m.node(node_id)
            if n is None:
                raise NotFound(f"no node {node_id} in the cluster")
            if action == "drain":
                if n.state == DRAINING:
                    return f"node {node_id} is already draining"
                self._set_map(m.with_node(dataclasses.replace(n, state=DRAINING)))
                return f"node {node_id} is draining: its replicas and leaders move away; `cachectl cluster status` shows progress"
            if action == "resume":
                self._set_map(m.with_node(dataclasses.replace(n, state=SERVING)))
                return f"node {node_id} is serving again"
            if action != "remove":
                raise InvalidArgument(f"unknown node action {action!r}")
            view = self._view()
            held = len(m.shards_on(node_id)) + (node_id in m.meta)
            if not held:
                self._set_map(m.without_node(node_id))
                self._reports.pop(node_id, None)
                return f"node {node_id} removed from the cluster"
            if n.state == SERVING and view.is_up(node_id):
                raise FailedPrecondition(
                    f"node {node_id} is up and holds {_replicas(m, node_id)}; "
                    f"drain it first: cachectl node drain {node_id}"
                )
            self._set_map(m.with_node(dataclasses.replace(n, state=REMOVING)))
            return f"node {node_id} is being removed: its {_replicas(m, node_id)} are re-created elsewhere first"

    def add_operator(self, kind: str, shard: int, source: NodeId, target: NodeId) -> Operator:
        with self._lock:
            m = self._require_active()
            view = self._view()
            desc = m.group(shard)
            if desc is None:
                raise NotFound(f"unknown shard {shard}; `cachectl status` lists shards ('meta' names the metadata group)")
            what = group_label(shard)
            ids = self.controller.alloc_id
            if kind == "transfer-leader":
                if not target:
                    raise InvalidArgument("transfer-leader needs --to NODE")
                op = transfer_leader(ids(), shard, target, "requested by the user")
            elif kind == "move-replica":
                if not source or not target:
                    raise InvalidArgument("move-replica needs --from NODE and --to NODE")
                if source not in desc.replicas:
                    raise FailedPrecondition(f"node {source} holds no replica of {what} (replicas: {', '.join(desc.replicas)})")
                if target in desc.replicas:
                    raise FailedPrecondition(f"node {target} already holds a replica of {what}")
                down = view.others_down(shard, source)
                if shard == META_GROUP_ID and down:
                    raise FailedPrecondition(
                        f"metadata member {down[0]} is down: adding a member first would raise the quorum while it "
                        f"is silent; bring it back (or remove it: cachectl node remove {down[0]}) first"
                    )
                op = move_replica(ids(), view, shard, source, target, "requested by the user")
            else:
                raise InvalidArgument(f"unknown operator kind {kind!r}: transfer-leader or move-replica")
            try:
                self.controller.admit(op, view, self.now(), manual=True)
            except AdmitError as e:
                raise FailedPrecondition(str(e)) from None
            self._save()
            return op

    def cancel_operator(self, op_id: int) -> Operator:
        with self._lock:
            self._require_active()
            try:
                op = self.controller.cancel(op_id, self.now())
            except AdmitError as e:
                raise NotFound(str(e)) from None
            self._save()
            return op

    def set_scheduler(self, name: str, paused: bool) -> list[str]:
        with self._lock:
            self._require_active()
            try:
                self.controller.set_paused(name, paused)
            except AdmitError as e:
                raise InvalidArgument(str(e)) from None
            self._save()
            return sorted(self.controller.paused)

    def dry_run(self) -> Plan:
        """What the PD would propose now, and why (nothing is admitted)."""
        with self._lock:
            self._require_active()
            ids = itertools.count(self.controller.next_id)
            return plan(self._view(), self.controller.running(), self.cfg.plan, lambda: next(ids), self.controller.paused)

    def status(self) -> tuple[ClusterView, list[Operator], float, list[str]]:
        """(view, operators newest last, seconds since takeover, paused schedulers)."""
        with self._lock:
            self._require_active()
            ops = sorted(self.controller.ops.values(), key=lambda o: o.id)
            return self._view(), ops, self.now() - (self._active_since or 0), sorted(self.controller.paused)


def _replicas(m: ClusterMap, node_id: NodeId) -> str:
    """``3 replicas``, ``3 replicas and a metadata replica``, ..."""
    n = len(m.shards_on(node_id))
    text = f"{n} replica{'' if n == 1 else 's'}"
    return text + " and a metadata replica" if node_id in m.meta else text
