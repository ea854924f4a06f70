"""Cluster states as text, for golden tests and ``cachectl rebalance``.

A scenario is one directive per line (``#`` starts a comment)::

    config replication=3 tolerance=1 store_limit=2 max_operators=8
    node n1                      # serving, up (the defaults)
    node n4 draining
    node n5 serving dead capacity=100 available=1
    node n6 below-reserve          # below its own --disk-reserve
    bootstrap 16 n1 n2 n3        # 16 shards placed as at cluster start
    shard 3 n1 n2 n4 leader=n2 members=n1,n2 lag=n4:500
    meta n1 n2 n3 leader=n2        # the metadata group (same keywords)
    paused balance-leader

``shard`` replaces the shard's replicas (first = preferred leader).  The
observed leader defaults to the first replica on an up node; members default
to the replicas; every member is caught up unless ``lag`` says otherwise.
:func:`render` prints a plan the same way every time.
"""

from __future__ import annotations

import dataclasses

from .._types import (
    HASH_SPACE,
    META_GROUP_ID,
    NODE_STATES,
    ClusterMap,
    NodeInfo,
    ShardDescriptor,
    initial_placement,
)
from .model import ClusterView, Liveness, NodeView, ReplicaReport, StoreStats
from .planner import Plan, PlanConfig

COMMIT = 1000
"""Commit index every scenario leader reports."""


class ScenarioError(ValueError):
    pass


@dataclasses.dataclass(slots=True)
class Scenario:
    view: ClusterView
    config: PlanConfig
    paused: list[str]


def parse(text: str) -> Scenario:
    cfg = PlanConfig()
    nodes: dict[str, tuple[str, Liveness, StoreStats]] = {}
    shards: dict[int, ShardDescriptor] = {}
    extra: dict[int, dict[str, str]] = {}
    paused: list[str] = []
    meta: tuple[str, ...] = ()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        kw = {k: v for k, _, v in (w.partition("=") for w in words[1:] if "=" in w)}
        pos = [w for w in words[1:] if "=" not in w]
        try:
            if words[0] == "config":
                cfg = dataclasses.replace(cfg, **{k: type(getattr(cfg, k))(v) for k, v in kw.items()})
            elif words[0] == "node":
                state = next((p for p in pos[1:] if p in NODE_STATES), "serving")
                live = next((Liveness(p) for p in pos[1:] if p in ("up", "down", "dead")), Liveness.UP)
                cap = int(kw.get("capacity", 0))
                stats = StoreStats(capacity_bytes=cap, available_bytes=int(kw.get("available", cap)),
                                   below_reserve="below-reserve" in pos[1:])
                nodes[pos[0]] = (state, live, stats)
            elif words[0] == "bootstrap":
                n = int(pos[0])
                for s in initial_placement(pos[1:], n, cfg.replication):
                    shards[s.id] = s
            elif words[0] == "shard":
                sid = int(pos[0])
                lo = shards[sid].range_start if sid in shards else sid * (HASH_SPACE // 4096)
                hi = shards[sid].range_end if sid in shards else lo
                shards[sid] = ShardDescriptor(sid, lo, hi, 2, tuple(pos[1:]))
                extra[sid] = kw
            elif words[0] == "meta":
                meta = tuple(pos)
                extra[META_GROUP_ID] = kw
            elif words[0] == "paused":
                paused += pos
            else:
                raise ScenarioError(f"unknown directive {words[0]!r}")
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ScenarioError(f"line {lineno}: {raw.strip()!r}: {e}") from None
    infos = tuple(NodeInfo(n, "", "", state) for n, (state, _, _) in sorted(nodes.items()))
    m = ClusterMap(2, infos, tuple(sorted(shards.values(), key=lambda s: s.range_start)), meta)
    reports: dict[str, list[ReplicaReport]] = {n: [] for n in nodes}
    for s in m.groups():
        kw = extra.get(s.id, {})
        up = [r for r in s.replicas if r in nodes and nodes[r][1] is Liveness.UP]
        leader = kw.get("leader", up[0] if up else "")
        members = tuple(kw["members"].split(",")) if "members" in kw else s.replicas
        lag = {k: int(v) for k, _, v in (p.partition(":") for p in kw["lag"].split(","))} if "lag" in kw else {}
        for r in members:
            if r not in reports or nodes[r][1] is not Liveness.UP:
                continue
            match = {o: COMMIT - lag.get(o, 0) for o in members if o != r} if r == leader else {}
            reports[r].append(ReplicaReport(
                s.id, "leader" if r == leader else "follower", leader or None, 5,
                COMMIT, COMMIT - lag.get(r, 0), members, match,
            ))
    views = {
        n: NodeView(n, state, live, stats, tuple(reports[n]), 0.0 if live is Liveness.UP else 60.0)
        for n, (state, live, stats) in nodes.items()
    }
    return Scenario(ClusterView.build(m, views), cfg, paused)


def render(plan: Plan) -> str:
    out = []
    for op in plan.operators:
        out.append(f"op {op.id} {op.summary()}")
        out.append(f"   because {op.reason}")
    for note in plan.notes:
        out.append(f"note: {note}")
    return "\n".join(out) + "\n"
