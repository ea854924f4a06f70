"""Operators: ordered steps that change one shard's placement safely.

The metadata group (where the PD itself runs) is moved by the same operators
under the group id :data:`META_GROUP_ID`: its "replicas" are the map's
``meta`` members, and its leader carries out node steps like a shard leader.

An operator is a plan, not a procedure.  Each step says how to tell from
*observed* state (the map, the shard leader's heartbeat) that it is done, so
repeating an instruction, losing a heartbeat or failing the PD over to
another node is harmless: the next look at the state moves the operator on.

Steps are of two kinds:

* map steps (``add_to_map``, ``remove_from_map``, the map half of
  ``transfer_leader``): the PD itself edits the cluster map;
* node steps (``add_member``, ``remove_member``, ``transfer_leader``): the
  PD hands an :class:`Instruction` to the shard's current leader in its next
  heartbeat reply.

The builders (:func:`move_replica`, :func:`replace_replica`, ...) put the
steps in the only safe orders.  Pure values; no I/O, no clock (``now`` is
an argument).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

from .._types import META_GROUP_ID, ClusterMap, NodeId, ShardId, group_label
from .model import ClusterView

CATCH_UP_LAG = 64
"""A new member counts as caught up when at most this many entries behind."""


class StepKind(enum.Enum):
    ADD_TO_MAP = "add_to_map"
    ADD_MEMBER = "add_member"
    TRANSFER_LEADER = "transfer_leader"
    REMOVE_MEMBER = "remove_member"
    REMOVE_FROM_MAP = "remove_from_map"
    WAIT_REPLICA_GONE = "wait_replica_gone"


STEP_TIMEOUT_S = {
    StepKind.ADD_TO_MAP: 15.0,
    StepKind.ADD_MEMBER: 180.0,  # includes the snapshot transfer
    StepKind.TRANSFER_LEADER: 20.0,
    StepKind.REMOVE_MEMBER: 20.0,
    StepKind.REMOVE_FROM_MAP: 15.0,
    StepKind.WAIT_REPLICA_GONE: 30.0,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Instruction:
    """What the PD asks one node to do to a shard it leads."""

    op_id: int
    shard: ShardId
    action: str  # add_member | remove_member | transfer_leader
    target: NodeId


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    kind: StepKind
    shard: ShardId
    node: NodeId

    def describe(self) -> str:
        return {
            StepKind.ADD_TO_MAP: "add {n} to the map",
            StepKind.ADD_MEMBER: "add {n} to the Raft group and wait until it caught up",
            StepKind.TRANSFER_LEADER: "make {n} the leader",
            StepKind.REMOVE_MEMBER: "remove {n} from the Raft group",
            StepKind.REMOVE_FROM_MAP: "remove {n} from the map",
            StepKind.WAIT_REPLICA_GONE: "wait until {n} deleted its replica",
        }[self.kind].format(n=self.node)

    def finished(self, view: ClusterView) -> bool:
        sv = view.shards.get(self.shard)
        if sv is None:
            return False
        n = self.node
        k = self.kind
        if k is StepKind.ADD_TO_MAP:
            return n in sv.desc.replicas
        if k is StepKind.REMOVE_FROM_MAP:
            return n not in sv.desc.replicas
        if k is StepKind.ADD_MEMBER:
            # Caught up, and everything it holds is committed: its log holds
            # the membership entry that added it, so that entry is committed.
            rep = sv.report
            if rep is None or n not in rep.members:
                return False
            if n == sv.leader:
                return True
            m = rep.match.get(n, 0)
            return 0 < m <= rep.commit_index and rep.commit_index - m <= CATCH_UP_LAG
        if k is StepKind.REMOVE_MEMBER:
            return sv.members is not None and n not in sv.members
        if k is StepKind.TRANSFER_LEADER:
            return sv.leader == n
        # WAIT_REPLICA_GONE: done once the node stops reporting the replica,
        # or is not up (a down node cleans up when it returns).
        nv = view.nodes.get(n)
        return nv is None or not view.is_up(n) or all(r.shard != self.shard for r in nv.replicas)

    def map_edit(self, m: ClusterMap) -> ClusterMap | None:
        """The map change this step makes (PD side), or None."""
        s = m.group(self.shard)
        if s is None:
            return None
        reps = list(s.replicas)
        if self.kind is StepKind.ADD_TO_MAP and self.node not in reps:
            return m.with_replicas(s.id, reps + [self.node])
        if self.kind is StepKind.REMOVE_FROM_MAP and self.node in reps:
            reps.remove(self.node)
            return m.with_replicas(s.id, reps)
        if self.kind is StepKind.TRANSFER_LEADER and self.node in reps and reps[0] != self.node:
            # The map's first replica is the preferred leader, which nodes
            # enforce on their own: say it there too, or they would move the
            # leadership back.
            reps.remove(self.node)
            return m.with_replicas(s.id, [self.node] + reps)
        return None

    def instruction(self, op_id: int, view: ClusterView) -> tuple[NodeId, Instruction] | None:
        """(node, instruction) for a node step, addressed to the shard's leader."""
        sv = view.shards.get(self.shard)
        if sv is None or sv.leader is None or sv.members is None:
            return None
        leader = sv.leader
        if self.kind is StepKind.ADD_MEMBER and self.node not in sv.members:
            return leader, Instruction(op_id, self.shard, "add_member", self.node)
        if self.kind is StepKind.TRANSFER_LEADER and leader != self.node and self.node in sv.members:
            return leader, Instruction(op_id, self.shard, "transfer_leader", self.node)
        if self.kind is StepKind.REMOVE_MEMBER and self.node in sv.members:
            if leader == self.node:
                # A leader cannot remove itself: hand leadership to a caught-up peer first.
                others = [m for m in sv.members if m != leader and view.is_up(m) and (sv.lag(m) or 0) <= CATCH_UP_LAG]
                if not others:
                    return None
                return leader, Instruction(op_id, self.shard, "transfer_leader", sorted(others)[0])
            return leader, Instruction(op_id, self.shard, "remove_member", self.node)
        return None

    def to_list(self) -> list[Any]:
        return [self.kind.value, self.node]


class OpStatus(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    SUCCESS = "success"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    FAILED = "failed"


TRANSITIONS: dict[OpStatus, frozenset[OpStatus]] = {
    OpStatus.CREATED: frozenset({OpStatus.RUNNING, OpStatus.CANCELLED}),
    OpStatus.RUNNING: frozenset({OpStatus.SUCCESS, OpStatus.TIMEOUT, OpStatus.CANCELLED, OpStatus.FAILED}),
    OpStatus.SUCCESS: frozenset(),
    OpStatus.TIMEOUT: frozenset(),
    OpStatus.CANCELLED: frozenset(),
    OpStatus.FAILED: frozenset(),
}
"""The operator lifecycle.  Every status change goes through
:meth:`Operator.to`, which refuses anything not in this table."""


class IllegalTransition(Exception):
    pass


@dataclasses.dataclass(slots=True)
class Operator:
    """Mutable: owned by the controller, changed only on its thread."""

    id: int
    kind: str  # move-replica | add-replica | remove-replica | replace-replica | transfer-leader
    shard: ShardId
    steps: tuple[Step, ...]
    reason: str
    status: OpStatus = OpStatus.CREATED
    step: int = 0
    started_s: float = 0.0
    step_started_s: float = 0.0
    ended_s: float = 0.0
    detail: str = ""
    source: str = "pd"  # pd | manual

    @property
    def done(self) -> bool:
        return not TRANSITIONS[self.status]

    @property
    def current(self) -> Step | None:
        return self.steps[self.step] if self.step < len(self.steps) else None

    def to(self, status: OpStatus, now: float, detail: str = "") -> None:
        if status not in TRANSITIONS[self.status]:
            raise IllegalTransition(f"operator {self.id}: {self.status.value} -> {status.value}")
        self.status = status
        if status is OpStatus.RUNNING:
            self.started_s = self.step_started_s = now
        if not TRANSITIONS[status]:
            self.ended_s = now
        if detail:
            self.detail = detail

    def nodes_added(self) -> set[NodeId]:
        return {s.node for s in self.steps if s.kind is StepKind.ADD_MEMBER}

    def nodes_removed(self) -> set[NodeId]:
        return {s.node for s in self.steps if s.kind is StepKind.REMOVE_MEMBER}

    def summary(self) -> str:
        return f"{self.kind} {group_label(self.shard)}: " + ", ".join(
            f"{s.kind.value} {s.node}" for s in self.steps
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "shard": self.shard,
            "steps": [s.to_list() for s in self.steps], "reason": self.reason,
            "status": self.status.value, "step": self.step, "detail": self.detail,
            "source": self.source,
        }

    @staticmethod
    def from_dict(d: dict[str, Any], now: float) -> Operator:
        steps = tuple(Step(StepKind(k), int(d["shard"]), n) for k, n in d["steps"])
        op = Operator(
            int(d["id"]), d["kind"], int(d["shard"]), steps, d["reason"],
            OpStatus(d["status"]), int(d["step"]), now, now, 0.0, d.get("detail", ""),
            d.get("source", "pd"),
        )
        return op


# ---- builders: the safe step orders -------------------------------------


def _leader_target(view: ClusterView, shard: ShardId, avoid: NodeId, candidates: Sequence[NodeId]) -> NodeId | None:
    """The replica that should lead instead of ``avoid``: up, not below its
    disk reserve (its replicas are moving away), fewest preferred
    leaderships, then lowest id."""
    ok = [c for c in candidates if c != avoid and view.is_up(c)]
    if not ok:
        return None
    return min(ok, key=lambda c: (c in view.nodes and view.nodes[c].below_reserve, view.preferred_leader_count(c), c))


def _leads(view: ClusterView, shard: ShardId, node: NodeId) -> bool:
    """``node`` leads ``shard``, or is its preferred leader (the first
    replica, which the nodes make the leader; the metadata group has none)."""
    sv = view.shards[shard]
    preferred = bool(sv.desc.replicas) and sv.desc.replicas[0] == node and shard != META_GROUP_ID
    return preferred or sv.leader == node


def move_replica(op_id: int, view: ClusterView, shard: ShardId, source: NodeId, target: NodeId, reason: str) -> Operator:
    """Move a replica between two live nodes: add first (the group grows to
    4 and needs 3 of 4, so the new replica's catch-up does not block
    writes), move leadership away if the source leads, then remove."""
    desc = view.shards[shard].desc
    steps = [Step(StepKind.ADD_TO_MAP, shard, target), Step(StepKind.ADD_MEMBER, shard, target)]
    if _leads(view, shard, source):
        to = _leader_target(view, shard, source, list(desc.replicas) + [target])
        if to is not None:
            steps.append(Step(StepKind.TRANSFER_LEADER, shard, to))
    steps += [
        Step(StepKind.REMOVE_MEMBER, shard, source),
        Step(StepKind.REMOVE_FROM_MAP, shard, source),
        Step(StepKind.WAIT_REPLICA_GONE, shard, source),
    ]
    return Operator(op_id, "move-replica", shard, tuple(steps), reason)


def replace_replica(op_id: int, view: ClusterView, shard: ShardId, dead: NodeId, target: NodeId, reason: str) -> Operator:
    """Replace the replica of a node that is gone: remove first.  With the
    dead member still counted, adding a fourth would need 3 of {2 live + new}
    and writes would stall until the new replica caught up; removing first
    keeps a 2-of-2 quorum, then 2-of-3 while the new one catches up."""
    steps = (
        Step(StepKind.REMOVE_MEMBER, shard, dead),
        Step(StepKind.REMOVE_FROM_MAP, shard, dead),
        Step(StepKind.ADD_TO_MAP, shard, target),
        Step(StepKind.ADD_MEMBER, shard, target),
    )
    return Operator(op_id, "replace-replica", shard, steps, reason)


def add_replica(op_id: int, shard: ShardId, target: NodeId, reason: str) -> Operator:
    steps = (Step(StepKind.ADD_TO_MAP, shard, target), Step(StepKind.ADD_MEMBER, shard, target))
    return Operator(op_id, "add-replica", shard, steps, reason)


def remove_replica(op_id: int, view: ClusterView, shard: ShardId, node: NodeId, reason: str) -> Operator:
    desc = view.shards[shard].desc
    steps = []
    if _leads(view, shard, node):
        to = _leader_target(view, shard, node, desc.replicas)
        if to is not None:
            steps.append(Step(StepKind.TRANSFER_LEADER, shard, to))
    steps += [
        Step(StepKind.REMOVE_MEMBER, shard, node),
        Step(StepKind.REMOVE_FROM_MAP, shard, node),
        Step(StepKind.WAIT_REPLICA_GONE, shard, node),
    ]
    return Operator(op_id, "remove-replica", shard, tuple(steps), reason)


def transfer_leader(op_id: int, shard: ShardId, target: NodeId, reason: str) -> Operator:
    return Operator(op_id, "transfer-leader", shard, (Step(StepKind.TRANSFER_LEADER, shard, target),), reason)
