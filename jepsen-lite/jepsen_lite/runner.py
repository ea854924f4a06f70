"""``jepsen-lite run``: one test of a real cluster under a seeded nemesis.

The sequence (every step has a deadline; every resource is released on every
exit path, including exceptions, SIGTERM and Ctrl-C):

1. refuse what cannot run (``--net netns`` without root) -> exit 3;
2. set up the network mechanism (namespaces when root and ``ip netns add`` works,
   else the node fault filter), start the nodes (``DIR/cluster``; secret in
   ``DIR/cluster/secret``), wait until every shard has a leader;
3. run the workers (pinned to nodes) and the nemesis for ``--time`` seconds,
   appending every event to ``DIR/history.jsonl`` as it happens;
4. heal everything, wait for leaders, read every key once more (final reads);
5. stop the nodes (by PID) and tear the network down;
6. check the history (WGL per key; set-full for ``set``), write
   ``DIR/results.json`` and ``DIR/timeline.html``, print a summary.

Exit status: 0 linearizable, 1 violation, 2 unknown (a key ran out of checker
budget, or elements were never read), 3 harness error (cluster did not start,
no op completed, no usable fault mechanism, bad arguments), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

from jepsen_lite import __version__, net
from jepsen_lite.checker import CheckResult, KeyResult, check_history
from jepsen_lite.checker.models import Model, get_model, set_full_summary
from jepsen_lite.client import CacheClient
from jepsen_lite.db import UNSAFE_SWITCHES, Cluster, HarnessError, start_cluster
from jepsen_lite.generator import WORKLOADS, Generator, OpSpec
from jepsen_lite.history import HistoryWriter, Op, pair_operations, read_history
from jepsen_lite.nemesis import NEMESES, TARGETS, Nemesis, build_schedule
from jepsen_lite.report import write_timeline
from jepsen_lite.workers import ShardTracker, Worker, perform

__all__ = ["RunConfig", "RunOutcome", "Interrupted", "run", "TTL_EPSILON_MS", "TTL_LATE_MS"]

TTL_EPSILON_MS: Final = 50
"""Client<->node timing slack for TTL judgements (both directions)."""
TTL_LATE_MS: Final = 2500
"""Extra slack on the late side only: expiry may lag by ~2 s across a leader change."""
STARTUP_TIMEOUT_S: Final = 60.0
RECOVERY_TIMEOUT_S: Final = 60.0
FINAL_READ_ATTEMPTS: Final = 10


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a run (exit 130 after cleanup)."""


@dataclass
class RunConfig:
    """Everything ``jepsen-lite run`` was asked to do."""

    workload: str
    nemesis: str
    out: Path
    nodes: int = 5
    shards: int = 4
    time_s: float = 30.0
    rate: float = 50.0
    seed: int = 0
    unsafe: list[str] = field(default_factory=list)
    net: str = "auto"
    partition_shape: str | None = None
    nemesis_target: str | None = None
    op_timeout_s: float = 2.0
    ops_per_key: int | None = None
    workers_per_key: int | None = None
    key_groups: int | None = None

    def validate(self) -> None:
        """Raise HarnessError (exit 3) for a configuration that cannot run."""
        if self.workload not in WORKLOADS:
            raise HarnessError(f"unknown workload {self.workload!r}")
        if self.nemesis not in NEMESES:
            raise HarnessError(f"unknown nemesis {self.nemesis!r}")
        for u in self.unsafe:
            if u not in UNSAFE_SWITCHES:
                raise HarnessError(
                    f"unknown --unsafe {u!r}; choose from {', '.join(UNSAFE_SWITCHES)}"
                )
        if self.net not in ("auto", "netns", "filter"):
            raise HarnessError(f"unknown --net {self.net!r}")
        if self.nemesis_target is not None and self.nemesis_target not in TARGETS:
            raise HarnessError(f"unknown --nemesis-target {self.nemesis_target!r}")
        if self.partition_shape is not None and self.partition_shape not in net.SHAPES:
            raise HarnessError(f"unknown --partition-shape {self.partition_shape!r}")
        if self.nodes < 1 or self.shards < 1 or self.time_s <= 0 or self.rate <= 0:
            raise HarnessError("--nodes, --shards, --time and --rate must be positive")


@dataclass
class RunOutcome:
    """The exit status and the results document (also in ``results.json``)."""

    exit: int
    results: dict[str, Any]


Say = Callable[[str], None]


# --------------------------------------------------------------------------- signals


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into :class:`Interrupted` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- network


def _choose_net(cfg: RunConfig, say: Say) -> str:
    """``netns`` or ``filter`` (or ``none`` when the nemesis never partitions)."""
    if cfg.nemesis not in ("partition", "mixed"):
        return "none"
    if cfg.net == "filter":
        return "filter"
    why = net.netns_available()
    if cfg.net == "netns":
        if why is not None:
            raise HarnessError(f"--net netns is not usable here: {why}")
        return "netns"
    if why is not None:
        say(f"network namespaces unavailable ({why}); using the node fault filter")
        return "filter"
    return "netns"


# --------------------------------------------------------------------------- the run


def _model_params(workload: str, origin_ns: int = 0) -> dict[str, Any]:
    """Model parameters recorded in the history header (``origin_ns``: the
    history's start, so TTL windows read as seconds into the run)."""
    if workload == "ttl":
        p: dict[str, Any] = {"epsilon_ms": TTL_EPSILON_MS, "late_ms": TTL_LATE_MS}
        if origin_ns:
            p["origin_ns"] = origin_ns
        return p
    return {}


def _model_name(workload: str) -> str:
    return workload


def run(cfg: RunConfig, say: Say = print, console_file: IO[str] | None = None) -> RunOutcome:
    """Run one test; see the module docstring.  Raises HarnessError (exit 3) and
    Interrupted (exit 130) after cleaning up; returns the outcome otherwise."""
    cfg.validate()
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("history.jsonl", "results.json", "timeline.html"):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    cluster_dir = out / "cluster"
    if cluster_dir.exists():
        shutil.rmtree(cluster_dir)
    node_ids = [f"n{i + 1}" for i in range(cfg.nodes)]
    t_start = time.monotonic()
    info: dict[str, Any] = {"notes": []}
    with _interruptible(), contextlib.ExitStack() as stack:
        net_kind = _choose_net(cfg, say)
        mechanism: net.NetMechanism | None = None
        hosts = wrap = None
        if net_kind == "netns":
            ns = net.NetnsNet(node_ids)
            stack.callback(ns.close)
            ns.setup()
            mechanism = ns
            hosts = {n: ns.host_of(n) for n in node_ids}
            wrap = ns.wrap
        say(
            f"starting {cfg.nodes} nodes, {cfg.shards} shards"
            + (f", unsafe: {', '.join(cfg.unsafe)}" if cfg.unsafe else "")
            + (f", network faults via {net_kind}" if net_kind != "none" else "")
        )

        def note(line: str) -> None:
            say(line)
            info["notes"].append(line)

        def made(c: Cluster) -> None:
            stack.callback(c.close)  # before any node starts: an interrupt stops them all

        cluster, ready_s = start_cluster(
            cluster_dir,
            node_ids,
            timeout=STARTUP_TIMEOUT_S,
            note=note,
            made=made,
            shards=cfg.shards,
            unsafe=cfg.unsafe,
            hosts=hosts,
            wrap=wrap,
            extra_record=(
                {"netns": ns.namespaces(), "bridge": ns.bridge_if} if net_kind == "netns" else None
            ),
        )
        if net_kind == "filter":

            def set_filter(node: str, blocked: list[str]) -> None:
                cluster.admin(node).set_fault_filter(blocked)

            fnet = net.FilterNet(node_ids, set_filter)
            mechanism = fnet
        info["startup_s"] = round(ready_s, 2)
        if net_kind == "filter":
            # Prove the mechanism works before relying on it.
            try:
                assert mechanism is not None
                mechanism.heal()
                for n in node_ids:
                    cluster.admin(n).set_fault_filter([])
            except Exception as e:
                raise HarnessError(
                    f"no usable fault mechanism: the fault filter failed: {e}"
                ) from None

        gen = Generator.for_workload(
            cfg.workload,
            cfg.seed,
            **{
                k: v
                for k, v in (
                    ("ops_per_key", cfg.ops_per_key),
                    ("workers_per_key", cfg.workers_per_key),
                    ("key_groups", cfg.key_groups),
                )
                if v is not None
            },
        )
        header = {
            "model_params": _model_params(cfg.workload, time.monotonic_ns()),
            "seed": cfg.seed,
            "nemesis": cfg.nemesis,
            "nodes": node_ids,
            "shards": cfg.shards,
            "unsafe": cfg.unsafe,
            "net": net_kind,
            "rate": cfg.rate,
            "time_s": cfg.time_s,
            "jepsen_lite": __version__,
        }
        history = HistoryWriter(out / "history.jsonl", workload=cfg.workload, meta=header)
        stack.callback(history.close)
        clients = {
            n: CacheClient(n, cluster.nodes[n].address, timeout=cfg.op_timeout_s) for n in node_ids
        }
        for c in clients.values():
            stack.callback(c.close)
        tracker = ShardTracker()
        stop = threading.Event()
        n_workers = gen.n_workers
        pace = n_workers / cfg.rate
        workers = [
            Worker(
                i, n_workers, clients[node_ids[i % len(node_ids)]], gen, history, stop,
                pace, cfg.seed, tracker,
            )
            for i in range(n_workers)
        ]  # fmt: skip
        plans = build_schedule(
            cfg.nemesis,
            cfg.seed,
            cfg.time_s,
            n_nodes=cfg.nodes,
            shape=cfg.partition_shape,
            target=cfg.nemesis_target,
        )
        t0 = time.monotonic()
        nemesis = Nemesis(plans, cluster, mechanism, history, tracker, cfg.seed, time.monotonic, t0)

        def shutdown_workers() -> None:
            stop.set()
            nemesis.halt()
            for w in workers:
                w.join(timeout=3 * cfg.op_timeout_s + 2)

        stack.callback(shutdown_workers)
        say(
            f"running {cfg.workload} x {cfg.nemesis} for {cfg.time_s:g} s at {cfg.rate:g} ops/s, "
            f"{n_workers} workers, seed {cfg.seed}, {len(plans)} faults planned"
        )
        for w in workers:
            w.start()
        nemesis.start()
        end = t0 + cfg.time_s
        while time.monotonic() < end:
            time.sleep(min(0.25, max(0.0, end - time.monotonic())))
        shutdown_workers()
        nemesis.join(timeout=30)
        for w in workers:
            if w.error is not None:
                raise HarnessError(f"worker {w.index} crashed: {type(w.error).__name__}: {w.error}")
        if nemesis.error is not None:
            info["notes"].append(f"nemesis crashed: {nemesis.error}")
        say("healing the cluster")
        nemesis.heal_all()
        try:
            rec = cluster.wait_ready(RECOVERY_TIMEOUT_S)
            info["recovery_s"] = round(rec, 2)
        except HarnessError as e:
            info["notes"].append(f"after healing: {e}")
            info["recovery_s"] = None
            say(f"warning: after healing: {e}")
        _final_reads(cfg, gen, clients, node_ids, history, tracker, n_workers, workers)
        info["node_info"] = cluster.describe()
        info["fault_counts"] = dict(nemesis.counts)
        info["nemesis_errors"] = list(nemesis.errors)
        info["net"] = net_kind
        info["schedule"] = [asdict(p) for p in plans]
        info["workload_s"] = round(time.monotonic() - t0, 2)
        history.close()
    # Cluster stopped, network removed: now check.
    if plans and nemesis.counts and len(nemesis.errors) >= sum(nemesis.counts.values()):
        raise HarnessError(f"no usable fault mechanism: every fault failed ({nemesis.errors[0]})")
    return _check_and_report(cfg, out, info, t_start, say, console_file)


def _final_reads(
    cfg: RunConfig,
    gen: Generator,
    clients: dict[str, CacheClient],
    node_ids: Sequence[str],
    history: HistoryWriter,
    tracker: ShardTracker,
    n_workers: int,
    workers: Sequence[Worker],
) -> None:
    """Read every key once more after healing, through any node that answers;
    each attempt is recorded (failed reads as ``fail``) by one fresh process."""
    process = max([w.process for w in workers] + [n_workers]) + 1
    for i, key in enumerate(gen.keys()):
        for attempt in range(FINAL_READ_ATTEMPTS):
            node = node_ids[(i + attempt) % len(node_ids)]
            client = clients[node]
            if not client.usable(1.0):
                continue
            spec = OpSpec("read", key)
            history.record(process, "invoke", "read", key, None, node=node)
            outcome, value = perform(
                client,
                spec,
                workload=cfg.workload,
                client_id=b"jl-final",
                next_seq=lambda: 1,
                elements=gen.elements,
                tracker=tracker,
            )
            if outcome.type == "ok":
                history.record(process, "ok", "read", key, value, node=node)
                break
            history.record(process, "fail", "read", key, None, node=node, error=outcome.error)
            time.sleep(0.3)


# --------------------------------------------------------------------------- checking


def _set_full(ops: Sequence[Op]) -> CheckResult:
    """Set-full verdict per set key, shaped as a CheckResult for the report."""
    t0 = time.perf_counter()
    operations = pair_operations(ops)
    by_key: dict[Hashable, list[Any]] = {}
    for o in operations:
        by_key.setdefault(o.key, []).append(o)
    keys: list[KeyResult] = []
    for key in sorted(by_key, key=repr):
        kops = by_key[key]
        s = set_full_summary(kops)
        stuck = None
        reason = None
        state: Any = None
        if s.valid is False:
            bad = (s.lost or s.stale)[0]
            stuck = next((o.id for o in kops if o.f == "add" and o.value == bad), None)
            reason = f"lost {s.lost[:20]}" if s.lost else f"stale {s.stale[:20]}"
            reads = [o for o in kops if o.f == "read" and o.ret is not None]
            state = frozenset(reads[-1].output or []) if reads else frozenset()
        elif s.valid is None:
            reason = f"never read {len(s.never_read)} elements"
        keys.append(KeyResult(key, s.valid, len(kops), reason=reason, stuck=stuck, state=state))
    valid: bool | None
    if any(k.valid is False for k in keys):
        valid = False
    elif any(k.valid is None for k in keys):
        valid = None
    else:
        valid = True
    return CheckResult(
        valid=valid,
        model="set",
        keys=keys,
        ops=len(operations),
        seconds=time.perf_counter() - t0,
        all_keys=True,
        by_id={o.id: o for o in operations},
    )


def _set_details(ops: Sequence[Op]) -> dict[str, Any]:
    operations = pair_operations(ops)
    by_key: dict[Hashable, list[Any]] = {}
    for o in operations:
        by_key.setdefault(o.key, []).append(o)
    out: dict[str, Any] = {}
    for key, kops in by_key.items():
        s = set_full_summary(kops)
        out[str(key)] = {
            "valid": s.valid,
            "stable": s.stable,
            "lost": list(s.lost),
            "stale": list(s.stale),
            "never_read": len(s.never_read),
        }
    return out


def _op_counts(ops: Sequence[Op]) -> dict[str, Any]:
    by_type: Counter[str] = Counter()
    by_f: dict[str, Counter[str]] = {}
    for o in ops:
        if o.is_nemesis or o.type == "invoke":
            continue
        by_type[o.type] += 1
        by_f.setdefault(o.f, Counter())[o.type] += 1
    return {
        "ok": by_type["ok"],
        "fail": by_type["fail"],
        "info": by_type["info"],
        "by_f": {f: dict(c) for f, c in sorted(by_f.items())},
    }


def _key_json(kr: KeyResult) -> dict[str, Any]:
    return {
        "key": kr.key,
        "valid": kr.valid,
        "ops": kr.ops,
        "steps": kr.steps,
        "seconds": round(kr.seconds, 4),
        "reason": kr.reason,
    }


def _failure_json(kr: KeyResult, result: CheckResult, model: Model) -> dict[str, Any]:
    stuck = result.by_id.get(kr.stuck) if kr.stuck is not None else None
    return {
        "key": kr.key,
        "reason": kr.reason,
        "prefix": list(kr.prefix),
        "stuck": kr.stuck,
        "stuck_op": model.describe_op(stuck) if stuck is not None else None,
        "stuck_process": stuck.process if stuck is not None else None,
        "stuck_node": stuck.node if stuck is not None else None,
        "state": model.describe_state(kr.state) if kr.state is not None else None,
    }


def _check_and_report(
    cfg: RunConfig,
    out: Path,
    info: dict[str, Any],
    t_start: float,
    say: Say,
    console_file: IO[str] | None,
) -> RunOutcome:
    hist = read_history(out / "history.jsonl")
    ops = hist.ops
    counts = _op_counts(ops)
    client_ok = sum(1 for o in ops if not o.is_nemesis and o.type == "ok")
    if client_ok == 0:
        raise HarnessError(
            "no operation completed; see the node logs under " + str(out / "cluster")
        )
    say("checking the history")
    params = hist.meta.get("model_params") or _model_params(cfg.workload)
    model = get_model(_model_name(cfg.workload), **params)
    t_check = time.perf_counter()
    if cfg.workload == "set":
        result = _set_full(ops)
    else:
        result = check_history(ops, model, all_keys=True, workers=min(2, os.cpu_count() or 1))
    check_s = time.perf_counter() - t_check
    valid = result.valid
    exit_code = {True: 0, False: 1, None: 2}[valid]
    verdict = {True: "linearizable", False: "violation", None: "unknown"}[valid]
    results: dict[str, Any] = {
        "verdict": verdict,
        "valid": valid,
        "exit": exit_code,
        "workload": cfg.workload,
        "nemesis": cfg.nemesis,
        "seed": cfg.seed,
        "time_s": cfg.time_s,
        "rate": cfg.rate,
        "nodes": cfg.nodes,
        "shards": cfg.shards,
        "unsafe": cfg.unsafe,
        "partition_shape": cfg.partition_shape,
        "nemesis_target": cfg.nemesis_target,
        "model": result.model,
        "model_params": params,
        "ops": counts,
        "faults": info.get("fault_counts", {}),
        "faults_total": sum(info.get("fault_counts", {}).values()),
        "checker_seconds": round(check_s, 3),
        "keys": [_key_json(k) for k in result.keys],
        "failures": [_failure_json(k, result, model) for k in result.failures],
        "unknown_keys": [k.key for k in result.unknowns if k.reason != "skipped"],
        "total_seconds": 0.0,
        "jepsen_lite": __version__,
        **{k: v for k, v in info.items() if k != "fault_counts"},
    }
    if cfg.workload == "set":
        results["set"] = _set_details(ops)
    title = f"jepsen-lite run: {cfg.workload} x {cfg.nemesis}, seed {cfg.seed}" + (
        f", unsafe {', '.join(cfg.unsafe)}" if cfg.unsafe else ""
    )
    write_timeline(out / "timeline.html", ops, result, title)
    results["total_seconds"] = round(time.monotonic() - t_start, 2)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    os.replace(tmp, out / "results.json")
    _print_summary(results, out, console_file)
    return RunOutcome(exit_code, results)


def _json_default(o: Any) -> Any:
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    return str(o)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _print_summary(r: dict[str, Any], out: Path, file: IO[str] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    env = os.environ
    console = Console(file=file, no_color="NO_COLOR" in env, highlight=False)
    style = {"linearizable": "bold green", "violation": "bold red", "unknown": "bold yellow"}[
        r["verdict"]
    ]
    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="dim")
    t.add_column()
    t.add_row("verdict", f"[{style}]{r['verdict']}[/] (exit {r['exit']})")
    t.add_row(
        "test",
        f"{r['workload']} x {r['nemesis']}, seed {r['seed']}, {r['time_s']:g} s, "
        f"{r['nodes']} nodes, {r['shards']} shards"
        + (f", unsafe {', '.join(r['unsafe'])}" if r["unsafe"] else ""),
    )
    o = r["ops"]
    t.add_row("ops", f"{o['ok']} ok, {o['fail']} fail, {o['info']} info")
    faults = ", ".join(f"{n} {k}" for k, n in sorted(r["faults"].items())) or "none"
    t.add_row(
        "faults",
        faults + (f" ({len(r['nemesis_errors'])} errors)" if r.get("nemesis_errors") else ""),
    )
    t.add_row("checker", f"{len(r['keys'])} keys in {r['checker_seconds']:.2f} s")
    for f in r["failures"][:3]:
        what = f["stuck_op"] or "?"
        where = (
            f" (process {f['stuck_process']} on {f['stuck_node']})"
            if f["stuck_process"] is not None
            else ""
        )
        detail = f["reason"] if r["workload"] == "set" else f"state {f['state']}"
        t.add_row("[red]violation[/]", _clip(f"key {f['key']}: {what}{where}; {detail}", 160))
    if r["unknown_keys"]:
        t.add_row("[yellow]unknown[/]", ", ".join(map(str, r["unknown_keys"][:8])))
    for n in r.get("notes", []):
        t.add_row("note", str(n))
    t.add_row(
        "output", f"{out}/history.jsonl, results.json, timeline.html ({r['total_seconds']:.0f} s)"
    )
    console.print(t)
