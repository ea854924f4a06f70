"""Turn measured phases into the result document, rich tables and Markdown.

The result document (``bench/results/latest.json`` / ``latest-vs.json``) is
plain JSON built by :func:`build_document`; everything else here renders a
document, so a saved one renders again the same (``cachectl bench --render``).

Summaries are medians over rounds, per workload and system.  Ratios are
cachenode / other for throughput and other / cachenode for latency, so that
higher is better for cachenode everywhere.  Pure functions; no I/O except
:func:`write_documents`.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from cachenode.bench.loadgen import WORKLOADS

__all__ = [
    "CACHENODE",
    "RATIO_NAMES",
    "SCHEMA",
    "Goal",
    "build_document",
    "evaluate_goals",
    "move_summary",
    "markdown",
    "ratios",
    "rich_tables",
    "summarize",
    "write_documents",
]

SCHEMA = "cachenode-bench/1"
MIB = 1 << 20
CACHENODE = "cachenode"
RATIO_NAMES: Mapping[str, str] = {
    "set": "write",
    "get_linearizable": "read_linearizable",
    "get_stale": "read_stale",
    "mix_90_10": "mix_90_10",
    "incr": "incr",
    "mset100": "mset100",
    "mget100": "mget100",
    "set_10k": "write_10k",
    "set_1m": "write_1m",
    "write_1client": "write_1client",
}
"""Workload name -> the key of its throughput ratio in ``ratios_vs_*``."""

_SUMMARY_FIELDS = (
    "ops_per_s",
    "keys_per_s",
    "p50_s",
    "p99_s",
    "p999_s",
    "mean_s",
    "cpu_s_per_1k_ops",
    "server_cpu_cores",
    "loadgen_cpu_cores",
)


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(phases: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{workload: {system: summary}}``: medians over the rounds that completed.

    A summary holds the median of every field in ``_SUMMARY_FIELDS``, the
    largest peak RSS seen per server process, the error total, the number of
    rounds measured and of rounds that failed outright.
    """
    grouped: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for ph in phases:
        grouped.setdefault(ph["workload"], {}).setdefault(ph["target"], []).append(ph)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for workload in [w for w in WORKLOADS if w in grouped] + [
        w for w in grouped if w not in WORKLOADS
    ]:
        for target, runs in grouped[workload].items():
            ok = [r for r in runs if "failed" not in r]
            summary: dict[str, Any] = {f: _median(r.get(f) for r in ok) for f in _SUMMARY_FIELDS}
            peaks: dict[str, int | None] = {}
            for r in ok:
                for proc, peak in r.get("peak_rss_bytes", {}).items():
                    prev = peaks.get(proc)
                    peaks[proc] = peak if prev is None else max(prev, peak or 0)
            summary["peak_rss_bytes"] = peaks
            summary["errors"] = sum(sum(r.get("errors", {}).values()) for r in runs)
            summary["rounds"] = len(ok)
            summary["failed_rounds"] = len(runs) - len(ok)
            if ok:
                summary["clients"] = ok[0]["clients"]
                summary["inflight"] = ok[0]["inflight"]
            out.setdefault(workload, {})[target] = summary
    return out


def ratios(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]], other: str
) -> dict[str, float | None]:
    """cachenode / ``other`` per workload (throughput), plus latency ratios ``other / cachenode``.

    Keys follow :data:`RATIO_NAMES`; ``p50_write_1client`` compares p50 of
    ``write_1client``, ``p99_write`` compares p99 of ``set``.  None when
    either side is missing.
    """

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    out: dict[str, float | None] = {}
    for workload, by_system in results.items():
        ours, theirs = by_system.get(CACHENODE), by_system.get(other)
        if ours is None or theirs is None:
            continue
        out[RATIO_NAMES.get(workload, workload)] = div(
            ours.get("ops_per_s"), theirs.get("ops_per_s")
        )
        if workload == "write_1client":
            out["p50_write_1client"] = div(theirs.get("p50_s"), ours.get("p50_s"))
        if workload == "set":
            out["p99_write"] = div(theirs.get("p99_s"), ours.get("p99_s"))
    return out


_VERDICTS: Mapping[bool | None, str] = {True: "met", False: "not met", None: "not measured"}


@dataclasses.dataclass(frozen=True, slots=True)
class Goal:
    """One target of issue #5 and whether the run met it (``met`` None: not measured).

    ``verdict`` overrides the one ``met`` implies, for figures the issue asks
    for without a target: ``measured`` or ``failed``.
    """

    name: str
    goal: str
    measured: str
    met: bool | None
    verdict: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "verdict": self.verdict or _VERDICTS[self.met]}


def _move_goal(move: Mapping[str, Any] | None) -> Goal:
    """The replica-move figure (no target: ``measured`` when it ran and verified)."""
    goal = "time to move a 100 MB shard replica to a new node (figure only, no target)"
    if not move or "skipped" in move:
        why = (move or {}).get("skipped", "not run")
        return Goal("replica_move", goal, f"not measured ({why})", None)
    if "failed" in move:
        return Goal("replica_move", goal, f"failed: {move['failed']}", None, "failed")
    return Goal("replica_move", goal, move_summary(move), None, "measured")


def move_summary(move: Mapping[str, Any]) -> str:
    """One line: the move's time and rate, the data transfer's, and the size when not 100 MiB."""
    text = f"{_secs(move.get('seconds'))} ({_rate(move.get('mb_per_s'))})"
    if move.get("mb") != 100:
        text += f" for {move.get('mb')} MiB, not 100"
    if move.get("caught_up_s") is not None:
        text += (
            f"; data caught up after {_secs(move['caught_up_s'])} "
            f"({_rate(move.get('catch_up_mb_per_s'))})"
        )
    return text + ("; verified" if move.get("verified") else "; NOT verified")


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} MiB/s"


def evaluate_goals(
    vs_etcd: Mapping[str, float | None],
    failover_s: float | None,
    move_replica: Mapping[str, Any] | None = None,
    unrecovered: Sequence[Mapping[str, Any]] = (),
) -> list[Goal]:
    """The issue's targets (3-node cachenode vs 3-member etcd, same run) against the ratios,
    and the replica-move figure.  ``unrecovered``: the failover trials' shards
    (``{"trial", "killed", "shard"}``) that accepted no write within the probe's
    timeout; any of them fails the failover goal, whatever the median."""

    def fmt(x: float | None, unit: str = "x") -> str:
        return "not measured (needs --vs etcd and the workload)" if x is None else f"{x:.2f}{unit}"

    write, p99 = vs_etcd.get("write"), vs_etcd.get("p99_write")
    reads, mset = vs_etcd.get("read_linearizable"), vs_etcd.get("mset100")
    p50 = vs_etcd.get("p50_write_1client")
    return [
        Goal(
            "write",
            ">= 1.25x etcd's ops/s (100 B, 32 in flight), p99 no worse than etcd's",
            fmt(write) + ("" if p99 is None else f" ops/s; p99 etcd/cachenode {p99:.2f}x"),
            None if write is None or p99 is None else write >= 1.25 and p99 >= 1.0,
        ),
        Goal(
            "read_linearizable",
            ">= 1.5x etcd's linearizable reads/s",
            fmt(reads),
            None if reads is None else reads >= 1.5,
        ),
        Goal(
            "mset100",
            ">= 2x etcd's keys/s in a 100-put txn",
            fmt(mset),
            None if mset is None else mset >= 2.0,
        ),
        Goal(
            "p50_write_1client",
            "one client, one in flight: p50 write latency <= etcd's (ratio etcd/cachenode >= 1)",
            fmt(p50),
            None if p50 is None else p50 >= 1.0,
        ),
        Goal(
            "failover",
            "kill -9 of a shard leader: writes on its shard resume in <= 2 s",
            ("not measured" if failover_s is None else f"{failover_s:.2f} s")
            + unrecovered_text(unrecovered),
            False if unrecovered else None if failover_s is None else failover_s <= 2.0,
        ),
        _move_goal(move_replica),
    ]


def unrecovered_text(unrecovered: Sequence[Mapping[str, Any]]) -> str:
    """``"; no write within the probe's timeout on shard 7 (trial 2, n2 killed)"``, or ``""``."""
    if not unrecovered:
        return ""
    return "; no write within the probe's timeout on " + ", ".join(
        f"shard {u['shard']} (trial {u['trial']}, {u['killed']} killed)" for u in unrecovered
    )


def build_document(
    *,
    kind: str,
    command: str,
    config: Mapping[str, Any],
    machine: Mapping[str, Any],
    systems: Mapping[str, Any],
    phases: Sequence[Mapping[str, Any]],
    failover: Mapping[str, Any] | None,
    scaling: Mapping[str, Any] | None,
    started_at: float,
    finished_at: float,
    move_replica: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole result document (schema :data:`SCHEMA`); see docs/benchmarks.md for the fields."""
    results = summarize(phases)
    others = [s for s in systems if s != CACHENODE]
    ratio_docs = {f"ratios_vs_{_ratio_suffix(o)}": ratios(results, o) for o in others}
    failover_s = failover.get("failover_s") if failover else None
    move = dict(move_replica) if move_replica else {"skipped": "--move-mb 0"}
    goals = evaluate_goals(
        ratio_docs.get("ratios_vs_etcd", {}),
        failover_s,
        move,
        failover.get("unrecovered_shards", ()) if failover else (),
    )
    moved_100 = move.get("mb") == 100 and move.get("verified") and "failed" not in move
    return {
        "schema": SCHEMA,
        "kind": kind,
        "command": command,
        "started_at": _iso(started_at),
        "finished_at": _iso(finished_at),
        "duration_s": round(finished_at - started_at, 1),
        "config": dict(config),
        "machine": dict(machine),
        "systems": dict(systems),
        "results": results,
        **ratio_docs,
        "failover_s": failover_s,
        "failover": dict(failover) if failover else {"skipped": "--failover-trials 0"},
        "scaling": dict(scaling) if scaling else {"skipped": "run with --scaling"},
        "replica_move_100mb_s": move.get("seconds") if moved_100 else None,
        "move_replica": move,
        "goals": [g.to_json() for g in goals],
        "phases": list(phases),
    }


def _ratio_suffix(label: str) -> str:
    # "redis-always" -> "redis", "redis-everysec" -> "redis_everysec", "etcd" -> "etcd"
    if label == "redis-always":
        return "redis"
    return label.replace("-", "_")


def _label_of(suffix: str) -> str:
    return "redis-always" if suffix == "redis" else suffix.replace("_", "-")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


def write_documents(doc: Mapping[str, Any], out_dir: Path, latest_name: str) -> tuple[Path, Path]:
    """Write ``out_dir/latest_name`` and a timestamped copy; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1, sort_keys=False) + "\n"
    stem = latest_name.removesuffix(".json").replace("latest", "bench")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    copy = out_dir / f"{stem}-{stamp}.json"
    latest = out_dir / latest_name
    for path in (copy, latest):
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return latest, copy


# ---- rendering ---------------------------------------------------------------


def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    ms = s * 1000
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _cpu(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _cores(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _rss(peaks: Mapping[str, int | None]) -> str:
    values = [v for v in peaks.values() if v is not None]
    return "-" if not values else f"{max(values) / 2**20:,.0f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _rows(doc: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for workload, by_system in doc["results"].items():
        batch = WORKLOADS[workload].batch if workload in WORKLOADS else 1
        for system, s in by_system.items():
            rows.append(
                [
                    workload,
                    system,
                    _num(s["ops_per_s"]),
                    _num(s["keys_per_s"]) if batch > 1 else "",
                    _ms(s["p50_s"]),
                    _ms(s["p99_s"]),
                    _ms(s["p999_s"]),
                    _cpu(s["cpu_s_per_1k_ops"]),
                    _cores(s.get("server_cpu_cores")),
                    _cores(s.get("loadgen_cpu_cores")),
                    _rss(s["peak_rss_bytes"]),
                    str(s["errors"])
                    + (f" ({s['failed_rounds']} rounds failed)" if s["failed_rounds"] else ""),
                ]
            )
    return rows


_HEADERS = [
    "workload",
    "system",
    "ops/s",
    "keys/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "CPU s / 1k ops",
    "server cores",
    "client cores",
    "peak RSS MiB / process",
    "errors",
]


def _ratio_rows(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in doc if k.startswith("ratios_vs_")]
    names: list[str] = []
    for k in keys:
        names += [n for n in doc[k] if n not in names]
    return (
        [
            "ratio (higher is better for cachenode)",
            *[_label_of(k.removeprefix("ratios_vs_")) for k in keys],
        ],
        [[n, *[_ratio(doc[k].get(n)) for k in keys]] for n in names],
    )


def _goal_rows(doc: Mapping[str, Any]) -> list[list[str]]:
    goals = doc.get("goals", [])
    rows = [
        [g["name"], g["goal"], g["measured"], g.get("verdict") or _VERDICTS[g["met"]]]
        for g in goals
    ]
    if not any(g["name"] == "replica_move" for g in goals):  # a document from before the phase
        rows.append(
            ["replica move", "move a 100 MB replica", doc.get("replica_move", "-"), "not measured"]
        )
    return rows


def _move_rows(move: Mapping[str, Any]) -> list[list[str]]:
    """The replica move's details, for a document where it ran (measured or failed)."""
    if not move or "skipped" in move or move.get("keys") is None:
        return []

    def s(key: str) -> str:
        return _secs(move.get(key))

    rows = [
        [
            "data",
            f"{move.get('mb')} MiB in {move.get('keys'):,} values of 64 KiB, shard {move.get('shard', '-')}",
        ],
        [
            "fill (MSet through the smart client)",
            f"{s('fill_s')} ({_rate(move.get('fill_mb_per_s'))})",
        ],
        ["new node up per the placement driver", s("join_s")],
        [
            f"move {move.get('from', '?')} -> {move.get('to', '?')}, AddOperator to success",
            f"{s('seconds')} ({_rate(move.get('mb_per_s'))})",
        ],
        [
            "new replica's applied index at the leader's",
            f"{s('caught_up_s')} ({_rate(move.get('catch_up_mb_per_s'))})",
        ],
    ]
    for st in (move.get("operator") or {}).get("steps", []):
        rows.append([f"  step: {st['step']}", f"done at {_secs(st.get('done_s'))}"])
    for role, what in (("leader", "sending leader"), ("new_node", "new node")):
        m = (move.get("memory") or {}).get(role) or {}
        start, peak = m.get("rss_anon_start_bytes"), m.get("rss_anon_peak_bytes")
        if start is not None and peak is not None:
            rows.append([
                f"{what} {m.get('node')}: heap (RssAnon) during the move",
                f"{start / MIB:,.0f} MiB at the start, peak {peak / MIB:,.0f} MiB (+{(peak - start) / MIB:,.0f})",
            ])
    size = move.get("replica_bytes")
    rows.append(
        [
            "new replica's size; transfer",
            f"{'-' if size is None else f'{size / MIB:,.1f} MiB'}; {move.get('transfer') or 'unknown'}",
        ]
    )
    v = move.get("verify") or {}
    rows.append(
        [
            "verified",
            ("yes" if move.get("verified") else "NO")
            + (
                f" ({v.get('stale_reads_on_new_node')} stale reads on the new node, {v.get('keys_read_back')} keys read back)"
                if v
                else ""
            ),
        ]
    )
    if "failed" in move:
        rows.append(["failed", str(move["failed"])])
    return rows


def _facts_line(doc: Mapping[str, Any]) -> str:
    m, c = doc["machine"], doc["config"]
    before, after = m.get("load_before"), m.get("load_after")
    load = (
        f"load average (1 min) {before[0]:.2f} before, {after[0]:.2f} after"
        if before and after
        else ""
    )
    code = c.get("code") or {}
    commit = code.get("commit")
    where = ""
    if commit:
        where = f"code {commit}" + (" with local changes" if code.get("dirty") else "")
        later = c.get("code_after") or {}
        after = later.get("commit")
        if after and (after != commit or later.get("diff_sha") != code.get("diff_sha")):
            where += f" (the code changed during the run: {after} at the end)"
        where += "; "
    return where + (
        f"{m.get('cores')} cores ({m.get('cpu_model') or 'unknown CPU'}), Python {m.get('python')}, "
        f"{_native_line(m.get('native'))}, "
        f"{load}; {c.get('seconds')} s per phase, medians of {c.get('rounds')} round(s), "
        f"{c.get('clients')} client processes, {c.get('inflight')} requests in flight; "
        f"data on {m.get('data_fs')}"
    )


def _native_line(native: Any) -> str:
    """How much of cachenode ran compiled (mypyc), from the machine facts."""
    if not isinstance(native, Mapping):
        return "compiled: not recorded"
    if not native.get("compiled"):
        return "interpreted (not compiled)"
    return f"compiled ({native.get('compiled')} of {native.get('of')} hot modules)"


def rich_tables(doc: Mapping[str, Any]) -> list[Table]:
    """The results, the ratios (when other systems ran), the goals, the extra figures."""
    tables = []
    main = Table(title=f"cachenode bench ({doc['started_at']})", caption=_facts_line(doc))
    for i, h in enumerate(_HEADERS):
        main.add_column(h, justify="left" if i < 2 else "right")
    last = None
    for row in _rows(doc):
        main.add_row(*([row[0] if row[0] != last else ""] + row[1:]))
        last = row[0]
    if main.row_count:  # a run of the replica move alone has no workload results
        tables.append(main)
    headers, rows = _ratio_rows(doc)
    if rows:
        t = Table(title="cachenode vs the others (medians)")
        for i, h in enumerate(headers):
            t.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*r)
        tables.append(t)
    t = Table(
        title="issue #5 targets" if main.row_count else f"cachenode bench ({doc['started_at']})",
        caption=None if main.row_count else _facts_line(doc),
    )
    for h in ("target", "goal", "measured", "verdict"):
        t.add_column(h)
    for r in _goal_rows(doc):
        t.add_row(*r)
    tables.append(t)
    move_rows = _move_rows(doc.get("move_replica", {}))
    if move_rows:
        t = Table(title="replica move (one shard replica to a new node)")
        t.add_column("what")
        t.add_column("measured", justify="right")
        for r in move_rows:
            t.add_row(*r)
        tables.append(t)
    scaling = doc.get("scaling", {})
    if scaling.get("runs"):
        t = Table(title="scaling (set and linearizable get, ops/s, 1 round each)")
        for h in ("nodes", "shards", "set ops/s", "get ops/s"):
            t.add_column(h, justify="right")
        for r in scaling["runs"]:
            t.add_row(
                str(r["nodes"]),
                str(r["shards"]),
                _num(r.get("set")),
                _num(r.get("get_linearizable")),
            )
        tables.append(t)
    return tables


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(doc: Mapping[str, Any]) -> str:
    """The same tables as Markdown, for docs/benchmarks.md."""
    parts = [
        f"Run `{doc['command']}` at {doc['started_at']} ({doc['duration_s']:.0f} s). {_facts_line(doc)}.",
        "",
        _md_table(_HEADERS, _rows(doc)),
    ]
    headers, rows = _ratio_rows(doc)
    if rows:
        parts += ["", _md_table(headers, rows)]
    fo = doc.get("failover", {})
    if fo.get("trials"):
        parts += [
            "",
            f"Failover (kill -9 of a shard leader to the first acknowledged write on its shard): "
            f"median {_secs(fo.get('failover_s'))} over {len(fo['trials'])} trials "
            f"({', '.join(_secs(t.get('shard_s')) for t in fo['trials'])}); "
            f"every shard the killed node led: median {_secs(fo.get('all_shards_s'))}"
            f"{unrecovered_text(fo.get('unrecovered_shards', ()))}.",
        ]
    scaling = doc.get("scaling", {})
    if scaling.get("runs"):
        parts += [
            "",
            _md_table(
                ["nodes", "shards", "set ops/s", "get (linearizable) ops/s"],
                [
                    [
                        str(r["nodes"]),
                        str(r["shards"]),
                        _num(r.get("set")),
                        _num(r.get("get_linearizable")),
                    ]
                    for r in scaling["runs"]
                ],
            ),
        ]
    parts += ["", _md_table(["target", "goal", "measured", "verdict"], _goal_rows(doc))]
    move_rows = _move_rows(doc.get("move_replica", {}))
    if move_rows:
        parts += [
            "",
            "Replica move (one shard replica to a new node):",
            "",
            _md_table(["what", "measured"], move_rows),
        ]
    return "\n".join(parts) + "\n"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"
