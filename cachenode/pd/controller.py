"""The operator controller: the one place that admits, runs, times out and
cancels operators.

Checkers and schedulers (``planner``) and users (``cachectl operator add``)
only propose; :meth:`OperatorController.admit` decides (one operator per
shard, per-node snapshot limits, a cluster-wide cap).  :meth:`step` moves
every running operator on from observed state and returns what must happen
next: one map edit for the PD to propose, and per-node instructions for the
heartbeat replies.

A failed, timed-out or cancelled operator is abandoned where it stands; every
intermediate state is safe (the map always lists every Raft member), and the
replica checker repairs what is left (an extra replica is removed, choosing
the one furthest behind, which is the unfinished new one).

Not thread-safe: the PD driver calls it under its lock.  ``now`` is
monotonic seconds, passed in.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from .._types import ClusterMap, NodeId, group_label
from .model import ClusterView, Liveness
from .operator import STEP_TIMEOUT_S, Instruction, Operator, OpStatus, StepKind
from .planner import SCHEDULERS, PlanConfig

HISTORY = 50
"""Finished operators kept for ``cachectl operator list``."""


class AdmitError(Exception):
    """An operator was refused; the message says why."""


@dataclasses.dataclass(slots=True)
class StepOutcome:
    map: ClusterMap | None  # the edited map to propose, or None
    instructions: dict[NodeId, list[Instruction]]
    changed: bool  # operator records changed: persist them


class OperatorController:
    def __init__(self, cfg: PlanConfig) -> None:
        self.cfg = cfg
        self.ops: dict[int, Operator] = {}
        self.next_id = 1
        self.paused: set[str] = set()
        self.finished_total: Counter[str] = Counter()

    # ---- state --------------------------------------------------------------

    def running(self) -> list[Operator]:
        return [o for o in self.ops.values() if not o.done]

    def alloc_id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i

    def load(self, record: dict[str, Any], now: float) -> None:
        """Take over the replicated record (a new PD leader calls this)."""
        self.ops = {int(d["id"]): Operator.from_dict(d, now) for d in record.get("operators", [])}
        self.next_id = max([int(record.get("next_id", 1))] + [i + 1 for i in self.ops])
        self.paused = set(record.get("paused", []))

    def to_record(self, version: int) -> dict[str, Any]:
        return {
            "version": version,
            "next_id": self.next_id,
            "paused": sorted(self.paused),
            "operators": [o.to_dict() for o in sorted(self.ops.values(), key=lambda o: o.id)],
        }

    # ---- admission -------------------------------------------------------------

    def admit(self, op: Operator, view: ClusterView, now: float, manual: bool = False) -> None:
        """Accept ``op`` or raise AdmitError.  Manual operators skip the
        cluster-wide cap (a user asked) but not the safety checks."""
        if view.map.group(op.shard) is None:
            raise AdmitError(f"unknown {group_label(op.shard)}")
        busy = [o for o in self.running() if o.shard == op.shard]
        if busy:
            raise AdmitError(f"{group_label(op.shard)} already has operator {busy[0].id} ({busy[0].kind}) running")
        running = self.running()
        if not manual and len(running) >= self.cfg.max_operators:
            raise AdmitError(f"{len(running)} operators running (limit {self.cfg.max_operators})")
        adding: Counter[NodeId] = Counter()
        for o in running:
            adding.update(o.nodes_added())
        for n in op.nodes_added():
            nv = view.nodes.get(n)
            if nv is None or view.map.node(n) is None:
                raise AdmitError(f"node {n} is not in the cluster")
            if not nv.accepts_replicas:
                raise AdmitError(f"node {n} cannot take replicas now ({nv.state}, {nv.liveness.value})")
            if adding[n] >= self.cfg.store_limit:
                raise AdmitError(f"node {n} already receives {adding[n]} replicas (store limit {self.cfg.store_limit})")
        desc = view.map.group(op.shard)
        assert desc is not None
        final = set(desc.replicas) | op.nodes_added()
        for st in op.steps:
            if st.kind is StepKind.TRANSFER_LEADER and st.node not in final:
                raise AdmitError(f"node {st.node} holds no replica of {group_label(op.shard)}")
        op.source = "manual" if manual else "pd"
        self.ops[op.id] = op
        self.next_id = max(self.next_id, op.id + 1)
        op.to(OpStatus.RUNNING, now)

    def cancel(self, op_id: int, now: float) -> Operator:
        op = self.ops.get(op_id)
        if op is None:
            raise AdmitError(f"no operator {op_id}")
        if op.done:
            raise AdmitError(f"operator {op_id} already ended ({op.status.value})")
        op.to(OpStatus.CANCELLED, now, "cancelled by the user")
        return op

    def set_paused(self, name: str, paused: bool) -> None:
        if name not in SCHEDULERS:
            raise AdmitError(f"unknown scheduler {name!r}; one of: {', '.join(SCHEDULERS)}")
        (self.paused.add if paused else self.paused.discard)(name)

    # ---- running -------------------------------------------------------------

    def step(self, view: ClusterView, now: float) -> StepOutcome:
        m = view.map
        edited = False
        changed = False
        instr: dict[NodeId, list[Instruction]] = {}
        for op in sorted(self.running(), key=lambda o: o.id):
            before = (op.step, op.status)
            while (cur := op.current) is not None and cur.finished(view):
                op.step += 1
                op.step_started_s = now
            cur = op.current
            if cur is None:
                op.to(OpStatus.SUCCESS, now)
            elif now - op.step_started_s > STEP_TIMEOUT_S[cur.kind]:
                op.to(OpStatus.TIMEOUT, now, f"step {op.step + 1} ({cur.describe()}) took longer than {STEP_TIMEOUT_S[cur.kind]:.0f} s")
            elif (why := self._broken(op, view)) is not None:
                op.to(OpStatus.FAILED, now, why)
            else:
                nm = cur.map_edit(m)
                if nm is not None:
                    m, edited = nm, True
                got = cur.instruction(op.id, view)
                if got is not None:
                    instr.setdefault(got[0], []).append(got[1])
            if (op.step, op.status) != before:
                changed = True
            if op.done:
                self.finished_total[op.status.value] += 1
        if changed:
            self._trim()
        if edited:
            # One proposal carries every operator's edit of this round.
            m = dataclasses.replace(m, version=view.map.version + 1)
        return StepOutcome(m if edited else None, instr, changed)

    def _broken(self, op: Operator, view: ClusterView) -> str | None:
        """Why ``op`` can no longer finish, or None."""
        cur = op.current
        assert cur is not None
        if cur.kind in (StepKind.ADD_TO_MAP, StepKind.ADD_MEMBER):
            nv = view.nodes.get(cur.node)
            if nv is None or view.map.node(cur.node) is None:
                return f"node {cur.node} left the cluster"
            if nv.liveness is Liveness.DEAD:
                return f"node {cur.node} is dead"
            if cur.kind is StepKind.ADD_TO_MAP and nv.leaving:
                return f"node {cur.node} is {nv.state}"
        if cur.kind is StepKind.TRANSFER_LEADER:
            desc = view.map.group(op.shard)
            if desc is not None and cur.node not in desc.replicas:
                return f"node {cur.node} holds no replica of {group_label(op.shard)}"
        return None

    def _trim(self) -> None:
        done = sorted((o for o in self.ops.values() if o.done), key=lambda o: o.id)
        for o in done[:-HISTORY] if len(done) > HISTORY else []:
            del self.ops[o.id]
