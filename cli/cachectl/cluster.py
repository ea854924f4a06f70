"""``cachectl status``: nodes and shards at a glance.

The map comes from any endpoint that answers; then every node in it is asked
for its own status in parallel.  A node that does not answer within the
timeout is "down".  A shard's leader is the replica that says it leads (the
highest term wins if two do, during a handover); when no reachable replica
claims it, the map's leader is shown if that node is up.

``--json`` prints ``{"nodes": [...], "shards": [...], "map_version": N}``:
nodes ``{"id", "address", "raft_address", "state": "up"|"down", "replicas":
[shard ids], "leaders": [shard ids], "uptime_s", "version", "fsync",
"leader_balancing": "on"|"paused"|"off", "metadata": this node's role in
the metadata group ("leader"|"follower"|"candidate", null: not a member),
"disk": {"free_bytes", "capacity_bytes", "reserve_bytes", "full"} (full:
below ``--disk-reserve``, so the shards with a replica on it refuse writes
that add data; null when down), "error"}``,
shards ``{"id", "range": [lo, hi], "epoch", "replicas": [node ids], "leader":
node id or null, "term", "applied_index", "commit_index", "keys", "size_bytes"}``
(term and indexes from the leader, or the most advanced reachable replica).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from rich.table import Table

from cachectl.output import ExitStatus, one_line
from cachenode._sizes import show_size

if TYPE_CHECKING:
    from cachectl.main import Context
    from cachenode.client import CacheClient, NodeStatus


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="nodes and shards of the cluster")
    p.set_defaults(handler=cmd_status)


def gather_status(client: CacheClient) -> dict[str, Any]:
    """The status document (see the module docstring).  Raises if no node hands out a map."""
    from cachenode._errors import CacheError

    cmap = client.cluster_map(refresh=True)
    map_leaders = client.leaders()

    def ask(address: str) -> NodeStatus | str:
        try:
            return client.node_status(address)
        except CacheError as err:
            return one_line(err.message)

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(cmap.nodes)))) as pool:
        answers = dict(
            zip(
                [n.id for n in cmap.nodes],
                pool.map(ask, [n.address for n in cmap.nodes]),
                strict=True,
            )
        )

    statuses = {nid: a for nid, a in answers.items() if not isinstance(a, str)}
    nodes: list[dict[str, Any]] = []
    for n in cmap.nodes:
        st = statuses.get(n.id)
        if st is None:
            nodes.append(
                {
                    "id": n.id,
                    "address": n.address,
                    "raft_address": n.raft_address,
                    "state": "down",
                    "replicas": [s.id for s in cmap.shards_on(n.id)],
                    "leaders": [],
                    "uptime_s": None,
                    "version": None,
                    "fsync": None,
                    "leader_balancing": None,
                    "metadata": None,
                    "disk": None,
                    "error": answers.get(n.id),
                }
            )
        else:
            nodes.append(
                {
                    "id": n.id,
                    "address": n.address,
                    "raft_address": n.raft_address,
                    "state": "up",
                    "replicas": sorted(r.shard_id for r in st.replicas),
                    "leaders": sorted(r.shard_id for r in st.replicas if r.role == "leader"),
                    "uptime_s": round(st.uptime_s, 1),
                    "version": st.version,
                    "fsync": st.fsync,
                    "leader_balancing": st.leader_balancing or None,
                    "metadata": st.metadata_role or None,
                    "disk": {
                        "free_bytes": st.disk_free_bytes,
                        "capacity_bytes": st.disk_capacity_bytes,
                        "reserve_bytes": st.disk_reserve_bytes,
                        "full": st.disk_full,
                    },
                    "error": None,
                }
            )

    shards: list[dict[str, Any]] = []
    for s in cmap.shards:
        reports = [
            (nid, r) for nid, st in statuses.items() for r in st.replicas if r.shard_id == s.id
        ]
        claimed = [(r.term, nid, r) for nid, r in reports if r.role == "leader"]
        leader: str | None = None
        best = None
        if claimed:
            _, leader, best = max(claimed, key=lambda c: (c[0], c[2].applied_index))
        else:
            named = map_leaders.get(s.id)
            if named in statuses:
                leader = named
        if best is None and reports:
            best = max((r for _, r in reports), key=lambda r: (r.term, r.applied_index))
        shards.append(
            {
                "id": s.id,
                "range": [s.range_start, s.range_end],
                "epoch": s.epoch,
                "replicas": list(s.replicas),
                "leader": leader,
                "term": best.term if best else None,
                "applied_index": best.applied_index if best else None,
                "commit_index": best.commit_index if best else None,
                "keys": best.keys if best else None,
                "size_bytes": best.size_bytes if best else None,
            }
        )
    return {"map_version": cmap.version, "nodes": nodes, "shards": shards}


def cmd_status(ctx: Context) -> int:
    with ctx.client() as c:
        doc = gather_status(c)
    if ctx.json:
        ctx.out.json(doc)
        return ExitStatus.OK

    nt = Table(title="Nodes", title_justify="left")
    for col in ("ID", "ADDRESS", "RAFT", "STATE", "REPLICAS", "LEADS", "METADATA", "UPTIME", "DISK FREE"):
        nt.add_column(col)
    for n in doc["nodes"]:
        state = "[green]up[/]" if n["state"] == "up" else "[red]down[/]"
        nt.add_row(
            n["id"],
            n["address"],
            n["raft_address"],
            state,
            _ids(n["replicas"]),
            _ids(n["leaders"]),
            n["metadata"] or "-",
            f"{n['uptime_s']:.0f}s" if n["uptime_s"] is not None else "-",
            _disk(n["disk"]),
        )
    st = Table(title="Shards", title_justify="left")
    for col in ("ID", "RANGE", "EPOCH", "REPLICAS", "LEADER", "TERM", "APPLIED", "KEYS"):
        st.add_column(col)
    for s in doc["shards"]:
        lo, hi = s["range"]
        st.add_row(
            str(s["id"]),
            f"{lo:016x}-{hi:016x}",
            str(s["epoch"]),
            ",".join(s["replicas"]),
            s["leader"] or "[red]none[/]",
            _opt(s["term"]),
            _opt(s["applied_index"]),
            _opt(s["keys"]),
        )
    ctx.out.table(nt)
    ctx.out.table(st)
    for n in doc["nodes"]:
        if n["disk"] and n["disk"]["full"]:
            ctx.out.line(
                f"{n['id']} has {show_size(n['disk']['free_bytes'])} free, below its disk reserve of "
                f"{show_size(n['disk']['reserve_bytes'])}: the shards with a replica on it refuse writes that add data "
                f"until space is freed on it (or --disk-reserve is lowered)"
            )
    up = sum(n["state"] == "up" for n in doc["nodes"])
    led = sum(s["leader"] is not None for s in doc["shards"])
    ctx.out.line(
        f"{up}/{len(doc['nodes'])} nodes up, {led}/{len(doc['shards'])} shards have a leader "
        f"(map version {doc['map_version']})"
    )
    return ExitStatus.OK


def _disk(disk: dict[str, Any] | None) -> str:
    """``12.0 GiB``, or in red ``95.6 MiB FULL`` (below the reserve: the
    line under the table says what that means)."""
    if not disk or not disk["capacity_bytes"]:
        return "-"
    free = show_size(disk["free_bytes"])
    return f"[red]{free} FULL[/]" if disk["full"] else free


def _ids(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids) or "-"


def _opt(value: object) -> str:
    return "-" if value is None else str(value)
