"""Placement commands: ``cluster status``, ``node``, ``operator``,
``scheduler`` and ``rebalance``.  Every one talks to the placement driver
(the metadata group's leader), found from any endpoint.

``cluster status --json`` prints ``{"pd": node id, "map_version": N,
"balanced": {"replicas": bool, "leaders": bool}, "nodes": [{"id", "address",
"state", "liveness", "replicas", "leaders", "preferred_leaders",
"down_for_s", "removable", "meta", "available_bytes", "below_reserve",
"write_rate", "read_rate"}], "operators": [...], "paused": [...]}`` (a node
below its disk reserve does not count for "balanced": the placement driver
moves its replicas away); an operator is
``{"id", "kind", "shard", "status", "step", "steps", "reason", "detail",
"source"}``.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from cachectl.output import ExitStatus
from cachenode._types import META_GROUP_ID, group_label

if TYPE_CHECKING:
    from cachectl.main import Context

SCHEDULERS = ("replica-checker", "balance-replica", "balance-leader")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    cluster = sub.add_parser("cluster", parents=[common], help="placement: nodes, balance, operators")
    acts = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", parser_class=type(cluster))
    acts.required = True
    p = acts.add_parser("status", parents=[common], help="nodes with replica and leader counts, balance, running operators")
    p.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    p.add_argument("--all", action="store_true", help="list finished operators too")
    p.set_defaults(handler=cmd_cluster_status)

    node = sub.add_parser("node", parents=[common], help="add, drain or remove nodes")
    acts = node.add_subparsers(dest="node_command", metavar="ACTION", parser_class=type(node))
    acts.required = True
    p = acts.add_parser("join", parents=[common], help="register a node (then start it with --join); usually the node does this itself")
    p.add_argument("node_id", metavar="ID")
    p.add_argument("--address", required=True, help="its client address HOST:PORT")
    p.add_argument("--raft-address", required=True, help="its Raft address HOST:PORT")
    p.set_defaults(handler=cmd_node_join)
    for action, text in (
        ("drain", "move every replica and leader off the node; it then shows as removable"),
        ("resume", "undo drain: the node takes replicas again"),
        ("remove", "remove a drained or dead node from the cluster"),
    ):
        p = acts.add_parser(action, parents=[common], help=text)
        p.add_argument("node_id", metavar="ID")
        p.set_defaults(handler=cmd_node_state, node_action=action)

    op = sub.add_parser("operator", parents=[common], help="list, add or cancel placement operators")
    acts = op.add_subparsers(dest="operator_command", metavar="ACTION", parser_class=type(op))
    acts.required = True
    p = acts.add_parser("list", parents=[common], help="running and recent operators")
    p.set_defaults(handler=cmd_operator_list)
    p = acts.add_parser("add", parents=[common], help="move a replica or transfer a leader by hand")
    p.add_argument("kind", choices=("move-replica", "transfer-leader"))
    p.add_argument("--shard", type=_shard_arg, required=True, metavar="ID",
                   help="a shard id, or 'meta' for the metadata group (where the placement driver runs)")
    p.add_argument("--from", dest="from_node", default="", metavar="NODE", help="move-replica: the node that gives up its replica")
    p.add_argument("--to", dest="to_node", required=True, metavar="NODE")
    p.set_defaults(handler=cmd_operator_add)
    p = acts.add_parser("cancel", parents=[common], help="abandon a running operator (the replica checker repairs what it left)")
    p.add_argument("op_id", type=int, metavar="ID")
    p.set_defaults(handler=cmd_operator_cancel)

    sch = sub.add_parser("scheduler", parents=[common], help="pause or resume the placement schedulers")
    acts = sch.add_subparsers(dest="scheduler_command", metavar="ACTION", parser_class=type(sch))
    acts.required = True
    for action in ("pause", "resume"):
        p = acts.add_parser(action, parents=[common], help=f"{action} a scheduler")
        p.add_argument("name", choices=SCHEDULERS)
        p.set_defaults(handler=cmd_scheduler, paused=action == "pause")

    p = sub.add_parser("rebalance", parents=[common], help="what the placement driver would do now, and why")
    p.add_argument("--dry-run", action="store_true", default=True, help="only show the plan (the default: the PD acts on its own)")
    p.set_defaults(handler=cmd_rebalance)


def _pb() -> Any:
    from cachenode.v1 import cache_pb2

    return cache_pb2


def _call(ctx: Context, method: str, request: Any, what: str) -> Any:
    with ctx.client() as c:
        return c.placement_driver(method, request, what)


def _shard_arg(text: str) -> int:
    """``--shard``: a shard id, or ``meta``."""
    if text == "meta":
        return META_GROUP_ID
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shard id or 'meta': {text!r}") from None


def _group(shard: int) -> str:
    """The SHARD column: the id, or ``meta`` for the metadata group."""
    return "meta" if shard == META_GROUP_ID else str(shard)


def op_doc(o: Any) -> dict[str, Any]:
    return {
        "id": o.id, "kind": o.kind, "shard": o.shard_id, "status": o.status, "step": o.step,
        "steps": list(o.steps), "reason": o.reason, "detail": o.detail, "source": o.source,
    }


def status_doc(st: Any) -> dict[str, Any]:
    nodes = [
        {
            "id": n.id, "address": n.address, "state": n.state, "liveness": n.liveness,
            "replicas": n.replicas, "leaders": n.leaders, "preferred_leaders": n.preferred_leaders,
            "down_for_s": round(n.down_for_s, 1), "removable": n.removable, "meta": n.meta,
            "available_bytes": n.stats.available_bytes, "below_reserve": n.stats.below_reserve,
            "write_rate": round(n.stats.write_rate, 1),
            "read_rate": round(n.stats.read_rate, 1),
        }
        for n in st.nodes
    ]
    active = [n for n in nodes if n["state"] == "serving" and n["liveness"] == "up" and not n["below_reserve"]]

    def spread(key: str) -> bool:
        vals = [n[key] for n in active]
        return not vals or max(vals) - min(vals) <= 1

    return {
        "pd": st.pd_node, "map_version": st.map_version,
        "balanced": {"replicas": spread("replicas"), "leaders": spread("leaders")},
        "nodes": nodes, "operators": [op_doc(o) for o in st.operators], "paused": list(st.paused),
    }


def _render(doc: dict[str, Any], show_all: bool) -> Group:
    nt = Table(title=f"Nodes (placement driver on {doc['pd']}, map version {doc['map_version']})", title_justify="left")
    for col in ("ID", "ADDRESS", "STATE", "LIVENESS", "REPLICAS", "LEADERS", "WRITES/S", "NOTE"):
        nt.add_column(col)
    for n in doc["nodes"]:
        live = {"up": "[green]up[/]", "down": "[yellow]down[/]", "dead": "[red]dead[/]"}[n["liveness"]]
        note = []
        if n["removable"]:
            note.append("removable")
        if n["meta"]:
            note.append("metadata")
        if n["liveness"] != "up":
            note.append(f"silent {n['down_for_s']:.0f}s")
        if n["below_reserve"]:
            note.append("[red]below its disk reserve: its replicas move away[/]")
        nt.add_row(
            n["id"], n["address"], n["state"], live, str(n["replicas"]), str(n["leaders"]),
            f"{n['write_rate']:.0f}", ", ".join(note),
        )
    ops = [o for o in doc["operators"] if show_all or o["status"] == "running"]
    ot = Table(title="Operators" + ("" if show_all else " (running)"), title_justify="left")
    for col in ("ID", "KIND", "SHARD", "STATUS", "PROGRESS", "STEP", "REASON"):
        ot.add_column(col)
    for o in ops:
        total = len(o["steps"])
        now = o["steps"][o["step"]] if o["step"] < total else "done"
        ot.add_row(
            str(o["id"]), o["kind"], _group(o["shard"]), o["status"],
            ProgressBar(total=total, completed=o["step"], width=12), f"{o['step']}/{total} {now}",
            o["reason"] + (f" [red]({o['detail']})[/]" if o["detail"] else ""),
        )
    b = doc["balanced"]
    verdict = (
        f"replicas {'[green]balanced[/]' if b['replicas'] else '[yellow]unbalanced[/]'}, "
        f"leaders {'[green]balanced[/]' if b['leaders'] else '[yellow]unbalanced[/]'} (within ±1)"
    )
    if doc["paused"]:
        verdict += f"; paused: {', '.join(doc['paused'])}"
    from rich.text import Text

    parts: list[Any] = [nt]
    if ops:
        parts.append(ot)
    else:
        parts.append(Text("no operator running"))
    parts.append(Text.from_markup(verdict))
    return Group(*parts)


def cmd_cluster_status(ctx: Context) -> int:
    pb = _pb()
    fetch = lambda: status_doc(_call(ctx, "GetPdStatus", pb.PdStatusRequest(), "cluster status"))  # noqa: E731
    doc = fetch()
    if ctx.json:
        ctx.out.json(doc)
        return ExitStatus.OK
    if not ctx.args.watch:
        ctx.out.table(_render(doc, ctx.args.all))  # type: ignore[arg-type]
        return ExitStatus.OK
    with Live(_render(doc, ctx.args.all), console=ctx.out.console, refresh_per_second=2) as live:
        while True:
            time.sleep(1.0)
            live.update(_render(fetch(), ctx.args.all))


def cmd_node_join(ctx: Context) -> int:
    pb = _pb()
    a = ctx.args
    req = pb.JoinRequest(node=pb.NodeInfo(id=a.node_id, address=a.address, raft_address=a.raft_address))
    _call(ctx, "JoinCluster", req, f"join node {a.node_id}")
    msg = f"node {a.node_id} registered; start it with: cachenode serve --node-id {a.node_id} --join <any member> --listen {a.address} --raft-listen {a.raft_address} ..."
    ctx.out.json({"node": a.node_id, "result": msg}) if ctx.json else ctx.out.line(msg)
    return ExitStatus.OK


def cmd_node_state(ctx: Context) -> int:
    pb = _pb()
    a = ctx.args
    resp = _call(ctx, "SetNodeState", pb.NodeStateRequest(node_id=a.node_id, action=a.node_action), f"{a.node_action} node {a.node_id}")
    ctx.out.json({"node": a.node_id, "result": resp.message}) if ctx.json else ctx.out.line(resp.message)
    return ExitStatus.OK


def cmd_operator_list(ctx: Context) -> int:
    pb = _pb()
    doc = status_doc(_call(ctx, "GetPdStatus", pb.PdStatusRequest(), "list operators"))
    if ctx.json:
        ctx.out.json({"operators": doc["operators"]})
        return ExitStatus.OK
    t = Table(title="Operators", title_justify="left")
    for col in ("ID", "KIND", "SHARD", "STATUS", "STEP", "SOURCE", "REASON"):
        t.add_column(col)
    for o in doc["operators"]:
        t.add_row(
            str(o["id"]), o["kind"], _group(o["shard"]), o["status"], f"{o['step']}/{len(o['steps'])}",
            o["source"], o["reason"] + (f" ({o['detail']})" if o["detail"] else ""),
        )
    ctx.out.table(t)
    return ExitStatus.OK


def cmd_operator_add(ctx: Context) -> int:
    pb = _pb()
    a = ctx.args
    req = pb.AddOperatorRequest(kind=a.kind, shard_id=a.shard, from_node=a.from_node, to_node=a.to_node)
    o = _call(ctx, "AddOperator", req, f"{a.kind} on {group_label(a.shard)}")
    if ctx.json:
        ctx.out.json(op_doc(o))
    else:
        ctx.out.line(f"operator {o.id} {o.kind} on {group_label(o.shard_id)} admitted: " + "; ".join(o.steps))
    return ExitStatus.OK


def cmd_operator_cancel(ctx: Context) -> int:
    pb = _pb()
    o = _call(ctx, "CancelOperator", pb.CancelOperatorRequest(id=ctx.args.op_id), f"cancel operator {ctx.args.op_id}")
    if ctx.json:
        ctx.out.json(op_doc(o))
    else:
        ctx.out.line(f"operator {o.id} cancelled at step {o.step}/{len(o.steps)}; the replica checker repairs what it left")
    return ExitStatus.OK


def cmd_scheduler(ctx: Context) -> int:
    pb = _pb()
    a = ctx.args
    resp = _call(ctx, "SetScheduler", pb.SchedulerRequest(name=a.name, paused=a.paused), f"{'pause' if a.paused else 'resume'} {a.name}")
    paused = list(resp.paused)
    if ctx.json:
        ctx.out.json({"paused": paused})
    else:
        ctx.out.line(f"{a.name} {'paused' if a.paused else 'resumed'}; paused now: {', '.join(paused) or 'none'}")
    return ExitStatus.OK


def cmd_rebalance(ctx: Context) -> int:
    pb = _pb()
    plan = _call(ctx, "PlanRebalance", pb.RebalanceRequest(), "rebalance --dry-run")
    ops = [op_doc(o) for o in plan.operators]
    if ctx.json:
        ctx.out.json({"operators": ops, "notes": list(plan.notes)})
        return ExitStatus.OK
    if not ops:
        ctx.out.line("the placement driver would start no operator now")
    for o in ops:
        ctx.out.line(f"would start {o['kind']} on {group_label(o['shard'])}: {'; '.join(o['steps'])}")
        ctx.out.line(f"  because {o['reason']}")
    for n in plan.notes:
        ctx.out.line(f"note: {n}")
    return ExitStatus.OK
