"""Checkers and schedulers: they look at a :class:`ClusterView` and *propose*
operators.  They never act; the controller decides what runs.

* ``replica-checker`` keeps every shard, and the metadata group, at the
  replication factor on distinct, live, serving nodes: replaces replicas of
  dead nodes, moves them off draining nodes, adds missing and removes extra
  replicas.  Once nothing else is wrong with a shard, it moves the shard's
  replica off a node below its disk reserve to a node with room (a shard
  with a replica there refuses writes that add data).  The metadata group
  is not shrunk while its members are healthy (it keeps the size the
  cluster started with), grows in pairs, and its replicas move only while
  all its other members are up.
* ``balance-replica`` evens out replica counts (to within ``tolerance``).
* ``balance-leader`` evens out preferred leaders (the first replica in each
  shard's descriptor, which the nodes make the actual leader).

Anti-thrash: a scheduler moves only when the gap between the fullest and the
emptiest node is larger than the tolerance, and it counts the effect of
operators already running or proposed this round (*influence*), so it never
re-proposes what is in flight.  Pure functions of (view, running operators,
config); golden tests drive them with text scenarios.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Iterable

from .._types import META_GROUP_ID, NodeId, ShardId, group_label
from .model import ClusterView, Liveness, ShardView
from .operator import (
    Operator,
    Step,
    StepKind,
    add_replica,
    move_replica,
    remove_replica,
    replace_replica,
    transfer_leader,
)

SCHEDULERS = ("replica-checker", "balance-replica", "balance-leader")


@dataclasses.dataclass(frozen=True, slots=True)
class PlanConfig:
    replication: int = 3
    tolerance: int = 1  # allowed max-min gap in replica and leader counts
    min_free_ratio: float = 0.05  # a node with less free space is full
    store_limit: int = 2  # concurrent replica additions (snapshots) per node
    max_operators: int = 8  # running operators, cluster-wide


@dataclasses.dataclass(slots=True)
class Plan:
    operators: list[Operator]
    notes: list[str]  # why nothing (more) was proposed, for --dry-run


class _Round:
    """Book-keeping of one planning round: busy shards, influence, ids."""

    def __init__(self, view: ClusterView, running: Iterable[Operator], cfg: PlanConfig, next_id: Callable[[], int]) -> None:
        self.view = view
        self.cfg = cfg
        self.next_id = next_id
        self.busy: set[ShardId] = set()
        self.replicas: Counter[NodeId] = Counter()
        self.leaders: Counter[NodeId] = Counter()
        self.adding: Counter[NodeId] = Counter()
        self.count = 0
        for s in view.map.shards:
            for r in s.replicas:
                self.replicas[r] += 1
            if s.replicas:
                self.leaders[s.replicas[0]] += 1
        for op in running:
            if not op.done:
                self.influence(op)
        self.out: list[Operator] = []
        self.notes: list[str] = []

    def influence(self, op: Operator) -> None:
        """Count the effect of the not-yet-done steps of ``op``.  Metadata
        replicas are not counted as shard replicas or leaderships (the
        balancers do not count them either); only their snapshots are."""
        self.busy.add(op.shard)
        self.count += 1
        if op.shard == META_GROUP_ID:
            self.adding.update(st.node for st in op.steps[op.step:] if st.kind is StepKind.ADD_MEMBER)
            return
        desc = self.view.map.group(op.shard)
        reps = list(desc.replicas) if desc else []
        for st in op.steps[op.step:]:
            if st.kind is StepKind.ADD_TO_MAP and st.node not in reps:
                self.replicas[st.node] += 1
            elif st.kind is StepKind.REMOVE_FROM_MAP and st.node in reps:
                self.replicas[st.node] -= 1
            elif st.kind is StepKind.ADD_MEMBER:
                self.adding[st.node] += 1
            elif st.kind is StepKind.TRANSFER_LEADER and reps and reps[0] != st.node:
                self.leaders[st.node] += 1
                self.leaders[reps[0]] -= 1

    def room(self) -> bool:
        return self.count < self.cfg.max_operators

    def propose(self, op: Operator) -> None:
        self.influence(op)
        self.out.append(op)

    def target_for(self, shard: ShardId, exclude: Iterable[NodeId] = (), limit: bool = True) -> NodeId | None:
        """The best node for a new replica of ``shard``: serving, up, not
        full, below its snapshot limit (``limit``), without a replica of the
        shard; fewest replicas (counting influence), then lowest id."""
        desc = self.view.map.group(shard)
        have = set(desc.replicas if desc else ()) | set(exclude)
        ok = [
            n.id for n in self.view.nodes.values()
            if n.accepts_replicas and n.id not in have and n.id in _map_ids(self.view)
            and not n.full(self.cfg.min_free_ratio) and (not limit or self.adding[n.id] < self.cfg.store_limit)
        ]
        if not ok:
            return None
        return min(ok, key=lambda n: (self.replicas[n], n))


def _map_ids(view: ClusterView) -> set[NodeId]:
    return {n.id for n in view.map.nodes}


def _liveness(view: ClusterView, node: NodeId) -> Liveness:
    n = view.nodes.get(node)
    if n is None or node not in _map_ids(view):
        return Liveness.DEAD  # not in the map, or never heard of: gone
    return n.liveness


def check_replicas(r: _Round) -> None:
    """Every shard, and the metadata group, the same way: a group whose
    member dies is repaired like any shard, so the control plane survives
    losing nodes one at a time, as the data does."""
    view, cfg = r.view, r.cfg
    for s in view.map.groups():
        if not r.room():
            r.notes.append(f"operator limit ({cfg.max_operators}) reached")
            return
        if s.id in r.busy:
            continue
        reps = list(s.replicas)
        dead = [n for n in reps if _liveness(view, n) is Liveness.DEAD]
        if dead:
            why = f"node {dead[0]} is dead (silent longer than max-down-time)" if dead[0] in _map_ids(view) else f"node {dead[0]} left the cluster"
            tgt = r.target_for(s.id)
            if tgt is not None:
                r.propose(replace_replica(r.next_id(), view, s.id, dead[0], tgt, why))
            elif len(reps) > cfg.replication:  # enough without it: just remove it
                r.propose(remove_replica(r.next_id(), view, s.id, dead[0], why + "; no node can take its replica"))
            else:
                r.notes.append(f"{group_label(s.id)}: replica on dead node {dead[0]}, but no node can take a new replica")
            continue
        leaving = [n for n in reps if view.nodes[n].leaving]
        if leaving:
            src = leaving[0]
            if reps[0] == src and view.is_up(src) and s.id != META_GROUP_ID:
                to = _best_leader(r, s.id, avoid=src)
                if to is not None:
                    r.propose(transfer_leader(r.next_id(), s.id, to, f"node {src} is {view.nodes[src].state}: leadership first"))
                    continue
            down = view.others_down(s.id, src)
            if s.id == META_GROUP_ID and down and view.is_up(src):
                # Adding first raises the quorum while a member is silent.
                r.notes.append(f"{group_label(s.id)}: node {src} is {view.nodes[src].state}; its replica moves once {down[0]} is up again")
                continue
            tgt = r.target_for(s.id)
            if tgt is None:
                if len(reps) > cfg.replication:  # enough without it: just remove it
                    r.propose(remove_replica(r.next_id(), view, s.id, src, f"node {src} is {view.nodes[src].state}; no node can take its replica"))
                else:
                    r.notes.append(f"{group_label(s.id)}: node {src} is {view.nodes[src].state}, but no node can take its replica")
                continue
            if view.is_up(src):
                r.propose(move_replica(r.next_id(), view, s.id, src, tgt, f"node {src} is {view.nodes[src].state}"))
            else:
                r.propose(replace_replica(r.next_id(), view, s.id, src, tgt, f"node {src} is {view.nodes[src].state} and down"))
            continue
        if len(reps) < cfg.replication:
            tgt = r.target_for(s.id)
            if tgt is not None and s.id == META_GROUP_ID and len(reps) % 2 and r.target_for(s.id, (tgt,)) is None:
                # 2 members survive no more failures than 1 and stop on either's loss.
                r.notes.append(f"{group_label(s.id)}: {len(reps)} of {cfg.replication} members; it grows once two nodes can join")
                continue
            if tgt is None:
                r.notes.append(f"{group_label(s.id)}: {len(reps)} of {cfg.replication} replicas, and no node can take another")
                continue
            r.propose(add_replica(r.next_id(), s.id, tgt, f"{len(reps)} of {cfg.replication} replicas"))
            continue
        if len(reps) > cfg.replication and s.id != META_GROUP_ID:
            # A metadata group started larger (every first node is a member)
            # keeps its size: five members survive two failures.
            worst = max(reps, key=functools.partial(_badness, r, view.shards[s.id]))
            r.propose(remove_replica(r.next_id(), view, s.id, worst, f"{len(reps)} replicas, {cfg.replication} wanted"))
            continue
        # The map and the Raft membership disagree (an operator was abandoned
        # half-way, or a leader change lost an unfinished membership entry).
        members = view.shards[s.id].members
        if members is not None:
            missing = [n for n in reps if n not in members and view.is_up(n)]
            extra = [n for n in members if n not in reps]
            if missing:
                r.propose(Operator(r.next_id(), "add-member", s.id, (Step(StepKind.ADD_MEMBER, s.id, missing[0]),),
                                   f"{missing[0]} is in the map but not in the Raft group"))
            elif extra:
                r.propose(Operator(r.next_id(), "remove-member", s.id, (Step(StepKind.REMOVE_MEMBER, s.id, extra[0]),),
                                   f"{extra[0]} is in the Raft group but not in the map"))
            if not (missing or extra):
                _move_off_full_disk(r, s.id, reps)


def _move_off_full_disk(r: _Round, shard: ShardId, reps: list[NodeId]) -> None:
    """A shard whose replica sits on a node below its disk reserve refuses
    writes that add data (server/disk_space.py): move that replica to a
    node with room.  Not the metadata group: its writes are never refused.
    The node's freed pages stay in its LMDB file until it restarts (and
    compacts the file), so it may count as full (and take no replica) until
    then, or until space is freed on it."""
    if shard == META_GROUP_ID:
        return
    view = r.view
    full = [n for n in reps if view.is_up(n) and view.nodes[n].below_reserve]
    if not full:
        return
    src = full[0]
    tgt = r.target_for(shard)
    if tgt is None:
        if r.target_for(shard, limit=False) is not None:
            r.notes.append(f"{group_label(shard)}: node {src} is below its disk reserve; its replica moves once a "
                           f"node with room is below its snapshot limit ({r.cfg.store_limit})")
        else:
            r.notes.append(f"{group_label(shard)}: node {src} is below its disk reserve, but no node with room can "
                           f"take its replica (free disk space on {src}, or add a node)")
        return
    r.propose(move_replica(r.next_id(), view, shard, src, tgt,
                           f"node {src} is below its disk reserve: the shard refuses writes that add data while a "
                           f"replica is there"))


def _badness(r: _Round, sv: ShardView, n: NodeId) -> tuple[int, int, int, str]:
    """Which replica of an over-replicated shard goes: down first, then the
    furthest behind (unknown lag counts as far), then the busiest node."""
    lag = sv.lag(n)
    return (0 if r.view.is_up(n) else 1, 1 << 62 if lag is None else lag, r.replicas[n], n)


def _balance_nodes(r: _Round) -> list[NodeId]:
    return sorted(n.id for n in r.view.nodes.values() if n.accepts_replicas and n.id in _map_ids(r.view))


def balance_replicas(r: _Round) -> None:
    view, cfg = r.view, r.cfg
    nodes = _balance_nodes(r)
    if len(nodes) < 2:
        return
    if any(not n.accepts_replicas and r.replicas[n.id] > 0 for n in view.nodes.values() if n.id in _map_ids(view)):
        # Repair first: balancing while a node is down or draining would move
        # replicas twice.
        r.notes.append("balance-replica waits: a node is down, draining or removing")
        return
    while r.room():
        src = max(nodes, key=lambda n: (r.replicas[n], n))
        sinks = [n for n in nodes if not view.nodes[n].full(cfg.min_free_ratio) and r.adding[n] < cfg.store_limit]
        if not sinks:
            r.notes.append("balance-replica: every candidate target is full or at its snapshot limit")
            return
        dst = min(sinks, key=lambda n: (r.replicas[n], n))
        if r.replicas[src] - r.replicas[dst] <= cfg.tolerance:
            if not r.out:
                r.notes.append(f"replicas balanced: {src} has {r.replicas[src]}, {dst} has {r.replicas[dst]} (tolerance {cfg.tolerance})")
            return
        cands = [
            s for s in view.map.shards
            if src in s.replicas and dst not in s.replicas and s.id not in r.busy
        ]
        if not cands:
            r.notes.append(f"balance-replica: no movable shard from {src} to {dst}")
            return
        # Prefer shards the source does not lead: no leadership change needed.
        shard = min(cands, key=lambda s: (s.replicas[0] == src, s.id))
        r.propose(move_replica(
            r.next_id(), view, shard.id, src, dst,
            f"replica counts: {src} has {r.replicas[src]}, {dst} has {r.replicas[dst]}",
        ))


def _best_leader(r: _Round, shard: ShardId, avoid: NodeId | None = None) -> NodeId | None:
    desc = r.view.map.group(shard)
    if desc is None:
        return None
    ok = [n for n in desc.replicas if n != avoid and r.view.nodes.get(n) is not None and r.view.nodes[n].accepts_replicas]
    if not ok:
        return None
    return min(ok, key=lambda n: (r.leaders[n], n))


def balance_leaders(r: _Round) -> None:
    """Even out preferred leaders among the balanceable nodes, leaving out
    nodes below their disk reserve: the replica checker moves their
    replicas (leaderships first) away."""
    view, cfg = r.view, r.cfg
    nodes = [n for n in _balance_nodes(r) if not view.nodes[n].below_reserve]
    if len(nodes) < 2:
        return
    while r.room():
        src = max(nodes, key=lambda n: (r.leaders[n], n))
        moved = False
        for dst in sorted(nodes, key=lambda n: (r.leaders[n], n)):
            if r.leaders[src] - r.leaders[dst] <= cfg.tolerance:
                break
            cands = [
                s for s in view.map.shards
                if s.replicas and s.replicas[0] == src and dst in s.replicas and s.id not in r.busy
            ]
            if cands:
                s = min(cands, key=lambda s: s.id)
                r.propose(transfer_leader(
                    r.next_id(), s.id, dst,
                    f"leader counts: {src} leads {r.leaders[src]}, {dst} leads {r.leaders[dst]}",
                ))
                moved = True
                break
        if not moved:
            lo = min(nodes, key=lambda n: (r.leaders[n], n))
            if r.leaders[src] - r.leaders[lo] <= cfg.tolerance:
                if not any(o.kind == "transfer-leader" for o in r.out):
                    r.notes.append(f"leaders balanced: {src} leads {r.leaders[src]}, {lo} leads {r.leaders[lo]} (tolerance {cfg.tolerance})")
            else:
                r.notes.append(
                    f"balance-leader: {src} leads {r.leaders[src]} and {lo} leads {r.leaders[lo]}, but no shard "
                    f"{src} leads has a replica on a node that leads fewer (wait for replica moves)"
                )
            return


_RUN = {
    "replica-checker": check_replicas,
    "balance-replica": balance_replicas,
    "balance-leader": balance_leaders,
}


def plan(
    view: ClusterView,
    running: Iterable[Operator],
    cfg: PlanConfig,
    next_id: Callable[[], int],
    paused: Iterable[str] = (),
) -> Plan:
    """Propose operators for ``view``.  ``running``: operators not yet done
    (their shards are busy and their effects count).  Checkers run before
    schedulers: repair before balance."""
    r = _Round(view, running, cfg, next_id)
    paused = set(paused)
    for name in SCHEDULERS:
        if name in paused:
            r.notes.append(f"{name} is paused")
            continue
        _RUN[name](r)
    return Plan(r.out, r.notes)
