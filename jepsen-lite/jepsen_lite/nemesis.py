"""The nemesis: a seeded schedule of faults, executed against a live cluster.

:func:`build_schedule` is pure: from the nemesis name, the seed and the run time
it derives a list of :class:`FaultPlan` -- quiet 3-6 s, fault 5-10 s, heal,
repeat -- with each fault's kind, shape/target and clock offset already drawn.
Only what cannot be known in advance (which node leads a shard right now) is
resolved when the fault starts, with a per-fault RNG from the same seed.

Kinds (``--nemesis``):

* ``partition`` -- a grudge shape from :data:`jepsen_lite.net.SHAPES` (isolate a
  node, isolate a shard leader, random halves, bridge, majorities ring), applied
  by the network mechanism, healed at the end of the window;
* ``kill`` -- SIGKILL one node, a minority, a shard leader, or all nodes; they
  are restarted on the same data at the end of the window;
* ``pause`` -- SIGSTOP one node, a minority or a shard leader; SIGCONT at the end;
* ``clock`` -- ``Admin.SetClockOffset`` of +-5..60 s on a shard leader or one node;
  reset to 0 at the end;
* ``mixed`` -- each window draws one of the four kinds above;
* ``disk`` -- ``Admin.SetDiskFault`` on a shard leader, one node or a
  minority: the node counts its disk as below its reserve, so every shard
  with a replica there refuses writes that add data (``disk_full``, a
  definite ``fail``), and the placement driver moves replicas off it;
  lifted at the end (not part of ``mixed``, so that the schedules of earlier
  seeds stay as they were);
* ``none`` -- no faults;
* ``membership`` -- through the placement driver: move a replica of a hot
  shard to a node that has none (``move-replica``: add, catch up, hand over
  leadership if needed, remove, delete) or hand a shard's leadership to a
  follower (``transfer-leader``); moves are permanent, nothing to heal.  Or
  drain the placement driver's own node (``drain-pd-node``): its shard
  replicas and leaders move away and so does its metadata replica, so the
  PD moves to another node mid-operators; the node is resumed (serving
  again, the balancer moves replicas back) at the end of the window.

Every fault is logged into the history as process ``"nemesis"``, type ``info``,
``f = start-<kind>`` / ``stop-<kind>`` with the concrete targets as value.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from jepsen_lite import net
from jepsen_lite.db import Cluster
from jepsen_lite.history import NEMESIS, HistoryWriter
from jepsen_lite.workers import ShardTracker

__all__ = [
    "FAULT_KINDS",
    "NEMESES",
    "TARGETS",
    "FaultPlan",
    "Nemesis",
    "build_schedule",
]

log = logging.getLogger(__name__)

FAULT_KINDS: Final = ("partition", "kill", "pause", "clock")
MEMBERSHIP_ACTIONS: Final = (
    ("move-replica", 3), ("move-leader-replica", 2), ("transfer-leader", 2), ("drain-pd-node", 2),
)
NEMESES: Final = ("none", "partition", "kill", "pause", "clock", "membership", "mixed", "disk")
TARGETS: Final = ("one", "minority", "leader", "all")
_TARGETS_BY_KIND: Final = {
    "kill": (("one", 3), ("minority", 3), ("leader", 3), ("all", 1)),
    "pause": (("one", 1), ("minority", 1), ("leader", 1)),
    "clock": (("leader", 2), ("one", 1)),
    "disk": (("leader", 2), ("one", 2), ("minority", 1)),
}
QUIET_S: Final = (3.0, 6.0)
FAULT_S: Final = (5.0, 10.0)
CLOCK_OFFSET_MS: Final = (5_000, 60_000)


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """One fault window: starts ``start_s`` after the workload began, lasts
    ``duration_s``.  ``shape`` (partition) or ``target`` (kill/pause/clock) says
    what to hit; ``offset_ms`` is the clock skew; ``draw`` seeds the choices made
    when the fault starts (which node, how to shuffle)."""

    start_s: float
    duration_s: float
    kind: str
    shape: str | None = None
    target: str | None = None
    offset_ms: int = 0
    draw: int = 0


def _weighted(rng: random.Random, choices: Sequence[tuple[str, int]]) -> str:
    names = [c for c, _ in choices]
    weights = [w for _, w in choices]
    return rng.choices(names, weights=weights, k=1)[0]


def build_schedule(
    nemesis: str,
    seed: int,
    total_s: float,
    *,
    n_nodes: int = 5,
    shape: str | None = None,
    target: str | None = None,
) -> list[FaultPlan]:
    """The fault windows for a run of ``total_s`` seconds (pure; same inputs, same
    plan).  Windows start at least 1 s before the end and are cut at the end.
    ``shape``/``target`` pin the partition shape / kill-pause-clock target."""
    if nemesis not in NEMESES:
        raise ValueError(f"unknown nemesis {nemesis!r}; choose from {', '.join(NEMESES)}")
    if shape is not None and shape not in net.SHAPES:
        raise ValueError(f"unknown partition shape {shape!r}; choose from {', '.join(net.SHAPES)}")
    if target is not None and target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if nemesis == "none":
        return []
    rng = random.Random(f"{seed}/nemesis/{nemesis}")
    shapes = list(net.SHAPES) if n_nodes >= 3 else ["isolate", "isolate-leader"]
    plans: list[FaultPlan] = []
    t = 0.0
    while True:
        t += rng.uniform(*QUIET_S)
        dur = rng.uniform(*FAULT_S)
        kind = rng.choice(FAULT_KINDS) if nemesis == "mixed" else nemesis
        draw = rng.randrange(1 << 30)
        sh = shape or rng.choice(shapes)
        offset = rng.randint(*CLOCK_OFFSET_MS) * rng.choice((-1, 1))
        if t > total_s - 1.0:
            break
        dur = min(dur, total_s - t)
        if kind == "partition":
            plans.append(FaultPlan(t, dur, kind, shape=sh, draw=draw))
        elif kind == "membership":
            plans.append(FaultPlan(t, dur, kind, target=_weighted(rng, MEMBERSHIP_ACTIONS), draw=draw))
        else:
            tg = target
            if tg is None or (kind != "kill" and tg == "all"):
                tg = _weighted(rng, _TARGETS_BY_KIND[kind])
            plans.append(
                FaultPlan(
                    t, dur, kind, target=tg, offset_ms=offset if kind == "clock" else 0, draw=draw
                )
            )
        t += dur
    return plans


@dataclass
class _Active:
    plan: FaultPlan
    nodes: list[str] = field(default_factory=list)
    drained: str | None = None  # drain-pd-node: the node to resume


class Nemesis(threading.Thread):
    """Executes a schedule against ``cluster`` (through ``mechanism`` for
    partitions) and logs every fault into ``history``.

    ``t0`` is the monotonic time the workload started (plans are relative to it).
    :meth:`heal_all` undoes everything (heal the network, SIGCONT, restart dead
    nodes, reset clocks); the runner calls it after :meth:`halt`.  Errors while
    injecting are logged into the history (``error``) and counted in
    ``errors``; they never end the run.
    """

    def __init__(
        self,
        plans: Sequence[FaultPlan],
        cluster: Cluster,
        mechanism: net.NetMechanism | None,
        history: HistoryWriter,
        tracker: ShardTracker,
        seed: int,
        clock: Callable[[], float],
        t0: float,
    ) -> None:
        super().__init__(name="jl-nemesis", daemon=True)
        self.plans = list(plans)
        self.cluster = cluster
        self.net = mechanism
        self.history = history
        self.tracker = tracker
        self.seed = seed
        self.clock = clock
        self.t0 = t0
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._active: _Active | None = None
        self._skewed: set[str] = set()
        self._disk_faulted: set[str] = set()
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []
        self.error: BaseException | None = None

    # -------------------------------------------------------------------- loop

    def halt(self) -> None:
        """Stop starting new faults (the current one is left for heal_all)."""
        self._halt.set()

    def run(self) -> None:
        try:
            for plan in self.plans:
                if self._sleep_until(plan.start_s):
                    return
                with self._lock:
                    if self._halt.is_set():
                        return
                    self._start(plan)
                if self._sleep_until(plan.start_s + plan.duration_s):
                    return
                with self._lock:
                    self._stop_active()
        except BaseException as e:
            self.error = e

    def _sleep_until(self, rel_s: float) -> bool:
        delay = self.t0 + rel_s - self.clock()
        return self._halt.wait(delay) if delay > 0 else self._halt.is_set()

    # -------------------------------------------------------------- targeting

    def _leader(self, rng: random.Random) -> str | None:
        leaders = self.cluster.leaders()
        hot = [s for s in self.tracker.hot() if s in leaders]
        pool = hot or sorted(leaders)
        if not pool:
            return None
        return leaders[rng.choice(pool)]

    def _targets(self, target: str, rng: random.Random) -> list[str]:
        nodes = sorted(self.cluster.nodes)
        if target == "all":
            return nodes
        if target == "leader":
            ld = self._leader(rng)
            if ld is not None:
                return [ld]
            target = "one"
        if target == "minority":
            return sorted(rng.sample(nodes, max(1, (len(nodes) - 1) // 2)))
        return [rng.choice(nodes)]

    def _disk_targets(self, target: str, rng: random.Random) -> list[str]:
        """As :meth:`_targets`, but ``one`` is a replica of a hot shard: a
        node that holds none of the keys in use would refuse nothing."""
        if target != "one":
            return self._targets(target, rng)
        cmap = self.cluster.admin(sorted(self.cluster.nodes)[0]).cluster_map()
        shards = {s.id: list(s.replicas) for s in cmap.shards}
        hot = [s for s in self.tracker.hot(last=3) if s in shards]  # the keys in use now
        if not hot:
            return self._targets(target, rng)
        return [rng.choice(shards[rng.choice(hot)])]

    # -------------------------------------------------------------- membership

    def _membership(self, action: str, rng: random.Random) -> dict[str, Any]:
        """Start one placement operator on a hot shard, or drain the PD's
        node; returns what was asked."""
        if action == "drain-pd-node":
            pd = self._on_pd(lambda a: a.pd_node())
            message = self._on_pd(lambda a: a.set_node_state(pd, "drain"))
            return {"action": "drain", "node": pd, "message": message}
        cmap = self.cluster.admin(sorted(self.cluster.nodes)[0]).cluster_map()
        leaders = self.cluster.leaders()
        hot = [s for s in self.tracker.hot() if any(x.id == s for x in cmap.shards)]
        shard_id = rng.choice(hot or sorted(x.id for x in cmap.shards))
        shard = next(x for x in cmap.shards if x.id == shard_id)
        reps = list(shard.replicas)
        others = sorted(n.id for n in cmap.nodes if n.id not in reps)
        leader = leaders.get(shard_id)
        if action == "transfer-leader" or not others:
            followers = [r for r in reps if r != leader]
            kind, source, target = "transfer-leader", "", rng.choice(followers or reps)
        else:
            kind = "move-replica"
            if action == "move-leader-replica" and leader in reps:
                source = leader
            else:
                source = rng.choice([r for r in reps if r != leader] or reps)
            target = rng.choice(others)
        info = self._pd_call(kind, shard_id, source, target)
        return {"action": kind, "shard": shard_id, "from": source or None, "to": target, "operator": info}

    def _pd_call(self, kind: str, shard: int, source: str, target: str) -> int:
        """AddOperator on the placement driver."""
        return int(self._on_pd(lambda a: a.add_operator(kind, shard, source, target)).id)

    def _on_pd(self, call: Callable[[Any], Any]) -> Any:
        """``call(admin client)`` on the placement driver: every running node
        in turn until one is not "not the placement driver"."""
        last: Exception | None = None
        for nid in sorted(self.cluster.nodes):
            if not self.cluster.nodes[nid].running():
                continue
            try:
                return call(self.cluster.admin(nid))
            except Exception as e:  # grpc.RpcError: not the PD, or refused
                last = e
                details = getattr(e, "details", lambda: "")() or ""
                if "not the placement driver" not in details:
                    raise
        raise RuntimeError(f"no placement driver answered: {last}")

    # -------------------------------------------------------------- start/stop

    def _log(self, f: str, value: Any, error: str | None = None) -> None:
        self.history.record(NEMESIS, "info", f, None, value, error=error)

    def _fail(self, what: str, e: BaseException) -> str:
        msg = f"{what}: {type(e).__name__}: {e}".splitlines()[0][:200]
        self.errors.append(msg)
        log.warning("nemesis %s", msg)
        return msg

    def _start(self, plan: FaultPlan) -> None:
        rng = random.Random(f"{self.seed}/fault/{plan.draw}")
        nodes = sorted(self.cluster.nodes)
        self.counts[plan.kind] = self.counts.get(plan.kind, 0) + 1
        act = _Active(plan)
        self._active = act
        try:
            if plan.kind == "partition":
                if self.net is None:
                    raise RuntimeError("no network mechanism")
                shape = plan.shape or "isolate"
                if shape == "isolate-leader":
                    ld = self._leader(rng) or rng.choice(nodes)
                    g = net.isolate_leader(ld, nodes)
                elif shape == "isolate":
                    g = net.isolate(rng.choice(nodes), nodes)
                elif shape == "halves":
                    g = net.random_halves(nodes, rng)
                elif shape == "bridge":
                    g = net.bridge(nodes, rng)
                else:
                    g = net.majorities_ring(nodes, rng)
                self.net.apply(g)
                act.nodes = sorted(g)
                self._log("start-partition", {"shape": shape, "grudge": net.grudge_json(g)})
            elif plan.kind == "kill":
                act.nodes = self._targets(plan.target or "one", rng)
                self.cluster.kill(act.nodes)
                self._log("start-kill", {"target": plan.target, "nodes": act.nodes})
            elif plan.kind == "pause":
                act.nodes = self._targets(plan.target or "one", rng)
                self.cluster.pause(act.nodes)
                self._log("start-pause", {"target": plan.target, "nodes": act.nodes})
            elif plan.kind == "clock":
                act.nodes = self._targets(plan.target or "one", rng)
                for n in act.nodes:
                    self._skewed.add(n)
                    self.cluster.admin(n).set_clock_offset(plan.offset_ms)
                self._log(
                    "start-clock",
                    {"target": plan.target, "offsets_ms": {n: plan.offset_ms for n in act.nodes}},
                )
            elif plan.kind == "disk":
                act.nodes = self._disk_targets(plan.target or "one", rng)
                for n in act.nodes:
                    self._disk_faulted.add(n)
                    self.cluster.admin(n).set_disk_fault(True)
                self._log("start-disk", {"target": plan.target, "nodes": act.nodes})
            elif plan.kind == "membership":
                info = self._membership(plan.target or "move-replica", rng)
                if info["action"] == "drain":
                    act.drained = info["node"]
                self._log("start-membership", info)
            else:
                raise RuntimeError(f"unknown fault kind {plan.kind}")
        except Exception as e:
            self._log(
                f"start-{plan.kind}",
                {"target": plan.target, "nodes": act.nodes},
                error=self._fail(f"start-{plan.kind}", e),
            )

    def _stop_active(self) -> None:
        act, self._active = self._active, None
        if act is None:
            return
        kind = act.plan.kind
        try:
            if kind == "partition":
                if self.net is not None:
                    self.net.heal()
                self._log("stop-partition", None)
            elif kind == "kill":
                self.cluster.restart(act.nodes)
                self._log("stop-kill", {"nodes": act.nodes})
            elif kind == "pause":
                self.cluster.resume(act.nodes)
                self._log("stop-pause", {"nodes": act.nodes})
            elif kind == "clock":
                self._reset_clocks(act.nodes)
                self._log("stop-clock", {"nodes": act.nodes})
            elif kind == "disk":
                self._lift_disk_faults(act.nodes)
                self._log("stop-disk", {"nodes": act.nodes})
            elif kind == "membership":
                if act.drained is not None:
                    drained = act.drained
                    self._on_pd(lambda a: a.set_node_state(drained, "resume"))
                self._log("stop-membership", {"resumed": act.drained})  # moves are permanent
        except Exception as e:
            self._log(f"stop-{kind}", {"nodes": act.nodes}, error=self._fail(f"stop-{kind}", e))

    def _reset_clocks(self, nodes: Sequence[str]) -> None:
        for n in nodes:
            if not self.cluster.nodes[n].running():
                continue  # a restarted process starts with no offset
            self.cluster.admin(n).set_clock_offset(0)
            self._skewed.discard(n)

    def _lift_disk_faults(self, nodes: Sequence[str]) -> None:
        for n in nodes:
            if self.cluster.nodes[n].running():  # a restarted process starts with none
                self.cluster.admin(n).set_disk_fault(False)
            self._disk_faulted.discard(n)

    def heal_all(self) -> None:
        """Undo every fault: the active one, then a blanket heal (network healed,
        every paused node continued, every dead node restarted, clocks reset, disk
        faults lifted)."""
        self.halt()
        with self._lock:
            self._stop_active()
            problems: list[str] = []
            if self.net is not None:
                try:
                    self.net.heal()
                except Exception as e:
                    problems.append(self._fail("heal network", e))
            paused = [n.id for n in self.cluster.nodes.values() if n.paused]
            self.cluster.resume(paused)
            dead = self.cluster.down()
            try:
                self.cluster.restart(dead)
            except Exception as e:
                problems.append(self._fail("restart", e))
            for n in sorted(self._skewed):
                with contextlib.suppress(Exception):
                    self._reset_clocks([n])
            for n in sorted(self._disk_faulted):
                with contextlib.suppress(Exception):
                    self._lift_disk_faults([n])
            self._log(
                "heal", {"resumed": paused, "restarted": dead}, error="; ".join(problems) or None
            )
