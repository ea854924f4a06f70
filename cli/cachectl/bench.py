"""``cachectl bench``: measure a local cachenode cluster, and etcd and Redis beside it.

    cachectl bench [--out bench/results] [--seconds N] [--inflight 32] [--clients 2]
                   [--workloads set,get_linearizable,...] [--vs etcd,redis] [--rounds 3]
                   [--nodes 3] [--shards 16] [--node-arg=ARG ...] [--failover-trials 3]
                   [--move-mb 100] [--scaling] [--data-dir DIR] [--keep-data] [--markdown FILE]
    cachectl bench --render bench/results/latest.json [--markdown FILE]

What a run does, in order:

1. starts a local cluster (``--nodes`` nodes, ``--shards`` shards) with the
   code of ``cachectl local up`` in a fresh data directory on disk, and with
   ``--vs``: a 3-member etcd cluster and two Redis servers (``appendfsync
   always`` and ``everysec``), installing them first when missing;
2. writes the read keys into every system once;
3. runs every workload on every system ``--rounds`` times, interleaved
   (round 1: cachenode, etcd, redis...; round 2 in reverse order ...), each
   phase ``--seconds`` long (default ``BENCH_SECONDS`` or 5), driven by
   ``--clients`` separate load-generator processes sharing ``--inflight``
   requests in flight;
4. kills a shard leader with SIGKILL ``--failover-trials`` times and measures
   the time to the first acknowledged write on its shard and on every other
   shard it led (the node is restarted after each trial, and the next trial
   waits until every replica is back and caught up and, while the nodes
   balance leaders, every shard is led by its preferred replica); a shard with no
   acknowledged write within ``FAILOVER_PROBE_TIMEOUT_S`` fails the failover
   goal, and the nodes' logs are kept (the data is removed);
5. on a fresh 3-node cluster: fills one shard with ``--move-mb`` MiB, starts
   a 4th node that joins and times a ``move-replica`` operator of that shard
   from a follower to it (:mod:`cachenode.bench.move`); 0 skips it;
6. with ``--scaling``: ops/s of ``set`` and linearizable ``get`` on fresh
   clusters of 1, 4, 16 and 64 shards (3 nodes) and of 5 nodes (16 shards);
7. prints the tables and writes ``OUT/latest.json`` (``latest-vs.json``
   with ``--vs``) and a timestamped copy; a run of a subset of the
   workloads (``--workloads``) writes ``latest-partial.json``
   (``latest-vs-partial.json``) instead, so it never replaces the last full
   result.

Every process the run starts is stopped by pid when it ends, also on an
error, Ctrl-C or SIGTERM (exit status 130).  The data directory is removed
unless ``--keep-data``.  With ``--workloads none --failover-trials 0`` no
system is started for the workloads: only the replica move (and
``--scaling``) run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from cachectl import argtypes
from cachectl.output import CliError, ExitStatus

if TYPE_CHECKING:
    from rich.progress import Progress

    from cachectl.main import Context
    from cachenode.bench.targets import TargetSpec

DEFAULT_OUT = "bench/results"
DEFAULT_SECONDS = 5.0
VS_CHOICES = ("etcd", "redis")
SCALING_SHARDS = (1, 4, 16, 64)
SCALING_NODES = (3, 5)
SCALING_WORKLOADS = ("set", "get_linearizable")
FAILOVER_PROBE_TIMEOUT_S = 30.0
DEFAULT_MOVE_MB = 100
MOVE_NODES = 3


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    from cachenode.bench.loadgen import WORKLOADS

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="benchmark a local cluster (and etcd/Redis with --vs)",
        description="Benchmark a local cachenode cluster with separate load-generator processes.",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"where the JSON goes (default {DEFAULT_OUT})",
    )
    p.add_argument(
        "--seconds",
        type=argtypes.seconds,
        default=None,
        metavar="N",
        help=f"length of each measured phase (default: env BENCH_SECONDS, else {DEFAULT_SECONDS:g})",
    )
    p.add_argument(
        "--inflight",
        type=argtypes.count,
        default=32,
        help="requests in flight, over all client processes (default 32)",
    )
    p.add_argument("--clients", type=argtypes.count, default=2, help="load-generator processes (default 2)")
    p.add_argument(
        "--workloads",
        type=_names(WORKLOADS),
        default=list(WORKLOADS),
        metavar="W,...",
        help="comma-separated subset of: " + ", ".join(WORKLOADS) + " (or none)",
    )
    p.add_argument(
        "--vs",
        type=_names(VS_CHOICES),
        default=[],
        metavar="etcd,redis",
        help="also measure these systems",
    )
    p.add_argument(
        "--rounds",
        type=argtypes.count,
        default=3,
        help="rounds per workload and system; medians are reported (default 3)",
    )
    p.add_argument("--nodes", type=argtypes.count, default=3, help="cachenode nodes (default 3)")
    p.add_argument("--shards", type=argtypes.count, default=16, help="cachenode shards (default 16)")
    p.add_argument(
        "--node-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for every cachenode node, e.g. --node-arg=--tick-ms=5 (repeatable)",
    )
    p.add_argument(
        "--failover-trials",
        type=int,
        default=3,
        metavar="N",
        help="leader kills to time (default 3; 0 skips)",
    )
    p.add_argument(
        "--move-mb",
        type=argtypes.whole,
        default=DEFAULT_MOVE_MB,
        metavar="N",
        help=f"time moving a shard replica of N MiB to a new node (default {DEFAULT_MOVE_MB}; 0 skips)",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="also measure ops/s vs shards (1, 4, 16, 64) and nodes (3, 5)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="parent of the run's data directory (default /var/tmp, on disk)",
    )
    p.add_argument(
        "--keep-data", action="store_true", help="keep the data directory and logs after the run"
    )
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown to FILE")
    p.add_argument(
        "--render", metavar="JSON", help="only print the tables of a saved result; run nothing"
    )
    p.set_defaults(handler=cmd_bench)


def _names(allowed: Sequence[str] | Mapping[str, Any]) -> Callable[[str], list[str]]:
    known = list(allowed)

    def parse(text: str) -> list[str]:
        if text.strip().lower() == "none":
            return []
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown)} (choose from {', '.join(known)})"
            )
        return list(dict.fromkeys(names))

    return parse


# ---- the command ---------------------------------------------------------------


def cmd_bench(ctx: Context) -> int:
    a = ctx.args
    if a.render:
        return _render(ctx, Path(a.render))
    from cachenode.bench.systems import BenchError

    seconds = a.seconds if a.seconds is not None else _env_seconds(ctx.env)
    with _sigterm_as_interrupt():
        run = _Run(ctx, seconds)
        try:
            doc = run.execute()
        except BenchError as err:
            raise CliError(str(err)) from None
        finally:
            run.cleanup()
    latest_name = _latest_name(a)
    from cachenode.bench.report import write_documents

    latest, copy = write_documents(doc, Path(a.out), latest_name)
    _show(ctx, doc)
    ctx.out.note(f"wrote {latest} and {copy}")
    if a.markdown:
        _write_markdown(doc, Path(a.markdown))
        ctx.out.note(f"wrote {a.markdown}")
    failed = [p["failed"] for p in doc["phases"] if "failed" in p]
    move_failed = doc.get("move_replica", {}).get("failed")
    if move_failed:
        failed.append(move_failed)
    if failed:
        ctx.out.note(f"{len(failed)} phases failed; the first: {failed[0]}")
        return ExitStatus.FAILED
    return ExitStatus.OK


def _env_seconds(env: Mapping[str, str]) -> float:
    text = env.get("BENCH_SECONDS")
    if not text:
        return DEFAULT_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise CliError(
            f"BENCH_SECONDS must be a positive number of seconds, not {text!r}", ExitStatus.USAGE
        )
    return value


def _render(ctx: Context, path: Path) -> int:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CliError(
            f"cannot read {path} ({err}); give a JSON file that cachectl bench wrote",
            ExitStatus.USAGE,
        ) from None
    if doc.get("schema") != "cachenode-bench/1":
        raise CliError(
            f"{path} is not a cachectl bench result (no schema cachenode-bench/1)", ExitStatus.USAGE
        )
    _show(ctx, doc)
    if ctx.args.markdown:
        _write_markdown(doc, Path(ctx.args.markdown))
    return ExitStatus.OK


def _latest_name(a: argparse.Namespace) -> str:
    """``latest.json`` (``latest-vs.json`` with ``--vs``) for a run of every
    workload; ``latest-partial.json`` (``latest-vs-partial.json``) for a run
    of a subset, so a quick look at one workload, or ``--scaling`` alone,
    never replaces the last full result."""
    from cachenode.bench.loadgen import WORKLOADS

    base = "latest-vs" if a.vs else "latest"
    full = list(a.workloads) == list(WORKLOADS)
    return f"{base}.json" if full else f"{base}-partial.json"


def _show(ctx: Context, doc: Mapping[str, Any]) -> None:
    from cachenode.bench.report import rich_tables

    if ctx.json:
        ctx.out.json(doc)
        return
    for table in rich_tables(doc):
        ctx.out.table(table)


def _write_markdown(doc: Mapping[str, Any], path: Path) -> None:
    from cachenode.bench.report import markdown

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(doc))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (make killed, CI timeout) stops the run like Ctrl-C, so the finally blocks run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tests): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- systems under test ---------------------------------------------------------


class _CachenodeCluster:
    """A local cluster started and stopped with the code of ``cachectl local up/down``."""

    def __init__(
        self, ctx: Context, directory: Path, nodes: int, shards: int, node_args: Sequence[str]
    ) -> None:
        self.ctx = ctx
        self.directory = directory
        self.nodes = nodes
        self.shards = shards
        self.node_args = list(node_args)
        self.seen_pids: set[int] = set()

    def _local(self, *argv: str) -> tuple[int, str]:
        from cachectl.main import main

        out = io.StringIO()
        code = main(
            ["local", *argv, "--dir", str(self.directory)],
            dict(self.ctx.env),
            stdout=out,
            stderr=self.ctx.out.stderr,
        )
        self._remember()
        if code == ExitStatus.INTERRUPTED:
            raise KeyboardInterrupt
        return code, out.getvalue()

    def _remember(self) -> None:
        from cachectl import local

        doc = local.load(self.directory)
        if doc is not None:
            self.seen_pids.update(r.pid for r in doc.nodes if r.pid)

    def start(self) -> None:
        args = ["--nodes", str(self.nodes), "--shards", str(self.shards), "--wait", "180", "--json"]
        args += [f"--node-arg={arg}" for arg in self.node_args]
        code, _ = self._local("up", *args)
        if code != 0:
            raise CliError(
                f"the cachenode cluster did not start (cachectl local up exited {code}, error above); "
                f"node logs are in {self.directory}/<id>/node.log (rerun with --keep-data to keep them)"
            )

    def doc(self) -> Any:
        from cachectl import local

        doc = local.load(self.directory)
        if doc is None:
            raise CliError(f"{self.directory}/cluster.json vanished during the benchmark")
        return doc

    def endpoints(self) -> tuple[str, ...]:
        return tuple(r.address for r in self.doc().nodes)

    def pids(self) -> dict[str, int]:
        return {r.id: r.pid for r in self.doc().nodes if r.pid}

    def add_node(self) -> tuple[str, str]:
        """``local add-node``: a new node that joins; returns its id and address once it answers."""
        code, out = self._local("add-node", "--wait", "120", "--json")
        if code != 0:
            raise CliError(
                f"could not add a node (cachectl local add-node exited {code}, error above); "
                f"see {self.directory}/<id>/node.log"
            )
        doc = json.loads(out)
        return str(doc["node"]), str(doc["address"])

    def node_log(self, node_id: str) -> Path | None:
        from cachectl import local

        doc = local.load(self.directory)
        if doc is None:
            return None
        try:
            return Path(doc.node(node_id).log)
        except CliError:
            return None

    def restart_node(self, node_id: str) -> None:
        code, _ = self._local("start-node", node_id, "--wait", "120", "--json")
        if code != 0:
            raise CliError(
                f"could not restart {node_id} after a failover trial (exit {code}); see {self.directory}/{node_id}/node.log"
            )

    def stop(self) -> None:
        """``local down`` by pid; then SIGKILL any pid it recorded that still runs this node."""
        from cachectl import local

        with contextlib.suppress(Exception):
            self._local("down", "--grace", "10")
        doc = local.load(self.directory)
        records = {r.pid: r for r in doc.nodes if r.pid} if doc else {}
        for pid in sorted(self.seen_pids):
            rec = records.get(pid)
            if rec is not None and local.runs_node(pid, rec):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


MAX_RESTARTS = 3
"""How often a system that crashed is restarted (fresh directory) before its phases are skipped."""


class _Handle(Protocol):
    """A system's processes: ``start`` blocks until it answers; ``stop`` is idempotent."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def pids(self) -> dict[str, int]: ...


@dataclasses.dataclass
class _Target:
    """One system under test, restartable in a fresh directory after a crash."""

    label: str
    make: Callable[[Path], _Handle]  # builds the handle for a directory, starts nothing
    spec_of: Callable[[Any], TargetSpec]
    base: Path
    handle: Any = None
    spec: TargetSpec | None = None
    restarts: int = 0
    crashes: list[str] = dataclasses.field(default_factory=list)

    def start(self) -> None:
        directory = (
            self.base
            if not self.restarts
            else self.base.with_name(f"{self.base.name}-restart{self.restarts}")
        )
        self.handle = self.make(directory)
        self.handle.start()  # a failed start stops what it started
        self.spec = self.spec_of(self.handle)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.stop()

    def pids(self) -> dict[str, int]:
        return dict(self.handle.pids()) if self.handle is not None else {}


class _Run:
    """One ``cachectl bench`` run: owns every process it starts (see :meth:`cleanup`)."""

    def __init__(self, ctx: Context, seconds: float) -> None:
        from cachenode.bench.systems import fs_type

        self.ctx = ctx
        self.a = ctx.args
        self.seconds = seconds
        self.started_at = time.time()
        parent = Path(self.a.data_dir) if self.a.data_dir else _default_data_parent()
        parent.mkdir(parents=True, exist_ok=True)
        self.data = Path(tempfile.mkdtemp(prefix="cachenode-bench-", dir=parent))
        if fs_type(self.data) == "tmpfs":
            ctx.out.note(
                f"warning: {self.data} is on tmpfs: fsync costs nothing there; pass --data-dir on a disk"
            )
        self.systems: dict[str, dict[str, Any]] = {}
        self.targets: list[_Target] = []
        self.phases: list[dict[str, Any]] = []
        self.down: dict[str, str] = {}  # system label -> why its phases are skipped
        self.extra: list[_CachenodeCluster] = []  # clusters of single phases (replica move)
        self.keep_logs: str | None = None  # why a phase failed: keep the logs even without --keep-data

    # -- lifecycle --

    def cleanup(self) -> None:
        """Stop every system started, newest first; remove the data unless kept or needed."""
        for cluster in reversed(self.extra):
            with contextlib.suppress(Exception):
                cluster.stop()
        for target in reversed(self.targets):
            with contextlib.suppress(Exception):
                target.stop()
        if self.a.keep_data:
            self.ctx.out.note(f"data and logs kept in {self.data}")
        elif any(t.crashes for t in self.targets):
            _remove_all_but_logs(self.data)
            self.ctx.out.note(f"a system crashed: its logs are kept in {self.data}")
        elif self.keep_logs:
            _remove_all_but_logs(self.data)
            self.ctx.out.note(f"{self.keep_logs}: the node logs are kept in {self.data}")
        else:
            shutil.rmtree(self.data, ignore_errors=True)

    def execute(self) -> dict[str, Any]:
        from cachenode.bench.report import build_document
        from cachenode.bench.systems import code_facts, machine_facts

        machine = machine_facts(self.data)
        machine["load_before"] = list(os.getloadavg())
        code = code_facts()
        # Nothing to run on the systems (only the replica move, or scaling): start none.
        if self.a.workloads or self.a.failover_trials > 0:
            self._start_systems()
            self._measure_idle()
            for target in self.targets:
                self._prefill(target)
            self._rounds()
        failover = self._failover() if self.a.failover_trials > 0 else None
        for target in reversed(self.targets):
            target.stop()
        move = self._replica_move() if self.a.move_mb > 0 else None
        scaling = self._scaling() if self.a.scaling else None
        machine["load_after"] = list(os.getloadavg())
        for target in self.targets:
            self.systems[target.label]["crashes"] = target.crashes
        return build_document(
            kind="bench-vs" if self.a.vs else "bench",
            command=self._command(),
            config={
                "seconds": self.seconds,
                "rounds": self.a.rounds,
                "clients": self.a.clients,
                "inflight": self.a.inflight,
                "workloads": self.a.workloads,
                "vs": self.a.vs,
                "nodes": self.a.nodes,
                "shards": self.a.shards,
                "node_args": self.a.node_arg,
                "warmup_s": self._warmup(),
                "move_mb": self.a.move_mb,
                "read_keys": 10_000,
                # Nodes load the code when they start, load generators at every phase:
                # compare with code_after to know whether the code changed during the run.
                "code": code,
                "code_after": code_facts(),
            },
            machine=machine,
            systems=self.systems,
            phases=self.phases,
            failover=failover,
            scaling=scaling,
            started_at=self.started_at,
            finished_at=time.time(),
            move_replica=move,
        )

    def _command(self) -> str:
        env = (
            f"BENCH_SECONDS={self.ctx.env['BENCH_SECONDS']} "
            if self.ctx.env.get("BENCH_SECONDS")
            else ""
        )
        if Path(sys.argv[0]).name == "cachectl":
            return env + shlex.join(["cachectl", *sys.argv[1:]])
        return env + "cachectl bench (called in-process)"

    def _warmup(self) -> float:
        return min(1.0, max(0.2, self.seconds / 10))

    def _start_systems(self) -> None:
        from cachenode.bench.systems import EtcdCluster, RedisServer, ensure_installed, tool_version
        from cachenode.bench.targets import TargetSpec

        a = self.a
        if a.vs:
            ensure_installed(a.vs, self.ctx.out.note)
        fsync = "always" if not any("fsync" in x for x in a.node_arg) else " ".join(a.node_arg)
        self.systems["cachenode"] = {
            "kind": "cachenode",
            "processes": a.nodes,
            "settings": f"{a.nodes} nodes, {a.shards} shards, replication 3, fsync {fsync}",
        }
        self.targets.append(
            _Target(
                "cachenode",
                lambda d: _CachenodeCluster(self.ctx, d, a.nodes, a.shards, a.node_arg),
                lambda h: TargetSpec("cachenode", "cachenode", h.endpoints()),
                self.data / "cachenode",
            )
        )
        if "etcd" in a.vs:
            self.systems["etcd"] = {
                "kind": "etcd",
                "version": tool_version(["etcd", "--version"]),
                "processes": 3,
                "settings": "3 members on loopback, data on disk, fsync on (etcd default), "
                "clients round-robin over members",
            }
            self.targets.append(
                _Target(
                    "etcd",
                    lambda d: EtcdCluster(d, members=3),
                    lambda h: TargetSpec("etcd", "etcd", h.endpoints, {"pb2_dir": str(h.pb2_dir)}),
                    self.data / "etcd",
                )
            )
        if "redis" in a.vs:
            for policy in ("always", "everysec"):
                label = f"redis-{policy}"
                self.systems[label] = {
                    "kind": "redis",
                    "version": tool_version(["redis-server", "--version"]),
                    "processes": 1,
                    "settings": f"1 server, appendonly yes, appendfsync {policy}",
                }
                self.targets.append(
                    _Target(
                        label,
                        lambda d, p=policy: RedisServer(d, p),  # type: ignore[misc]
                        lambda h, lb=label: TargetSpec("redis", lb, (h.endpoint,)),  # type: ignore[misc]
                        self.data / label,
                    )
                )
        for target in self.targets:
            self.ctx.out.note(f"starting {target.label}: {self.systems[target.label]['settings']}")
            target.start()

    def _measure_idle(self, seconds: float = 2.0) -> None:
        """CPU the idle servers burn (heartbeats, ticks): it competes with every phase."""
        from cachenode.bench.systems import cpu_total

        before = {t.label: cpu_total(t.pids()) for t in self.targets}
        time.sleep(seconds)
        for t in self.targets:
            after, first = cpu_total(t.pids()), before[t.label]
            if first is not None and after is not None:
                self.systems[t.label]["idle_cpu_cores"] = round((after - first) / seconds, 3)

    def _prefill(self, target: _Target) -> None:
        from cachenode.bench.loadgen import WORKLOADS
        from cachenode.bench.runner import run_prefill

        if target.spec is None or not any(WORKLOADS[w].reads for w in self.a.workloads):
            return
        self.ctx.out.note(f"writing the read keys into {target.label}")
        run_prefill(target.spec, log_dir=self.data)

    def _progress(self) -> Progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.ctx.out.err_console,
            transient=True,
            disable=not self.ctx.out.interactive,
        )

    def _rounds(self) -> None:
        a = self.a
        total = a.rounds * len(a.workloads) * len(self.targets)
        with self._progress() as progress:
            task = progress.add_task("benchmark", total=total)
            for r in range(a.rounds):
                for workload in a.workloads:
                    order = self.targets if r % 2 == 0 else list(reversed(self.targets))
                    for target in order:
                        what = f"round {r + 1}/{a.rounds}: {workload} on {target.label}"
                        progress.update(task, description=what)
                        progress.advance(task)
                        skipped = self.down.get(target.label)
                        if skipped is not None:
                            self.phases.append(self._failed(target.label, workload, r, skipped))
                            continue
                        if not self.ctx.out.interactive:
                            self.ctx.out.note(what)
                        self._phase(target, workload, r, what)

    def _phase(self, target: _Target, workload: str, r: int, what: str) -> None:
        """Measure once; if the system crashed meanwhile, record it and restart it."""
        from cachenode.bench.runner import run_phase
        from cachenode.bench.systems import BenchError, dead_processes

        assert target.spec is not None
        failed: str | None = None
        try:
            result = run_phase(
                target.spec,
                target.pids(),
                workload,
                clients=self.a.clients,
                inflight=self.a.inflight,
                seconds=self.seconds,
                round_no=r,
                warmup_s=self._warmup(),
                log_dir=self.data,
            )
            doc = result.to_json()
            if result.ops == 0:
                failed = doc["failed"] = (
                    f"no request succeeded ({sum(result.errors.values())} errors; first: {result.error_sample})"
                )
            self.phases.append(doc)
        except BenchError as err:
            failed = str(err)
            self.phases.append(self._failed(target.label, workload, r, failed))
        if failed:
            self.ctx.out.note(f"{what} failed: {failed}")
        gone = dead_processes(target.pids())
        if not gone:
            return
        crash = f"{', '.join(gone)} exited during {workload} round {r + 1}"
        target.crashes.append(crash)
        self.phases[-1]["crashed"] = crash
        target.stop()
        if target.restarts >= MAX_RESTARTS:
            self.down[target.label] = f"skipped: {target.label} crashed {len(target.crashes)} times"
            self.ctx.out.note(f"{target.label} crashed: {crash}; its remaining phases are skipped")
            return
        target.restarts += 1
        self.ctx.out.note(
            f"{target.label} crashed: {crash} (logs in {self.data}); restarting it in a fresh directory"
        )
        try:
            target.start()
            self._prefill(target)
        except (BenchError, CliError) as err:
            self.down[target.label] = f"skipped: {target.label} could not be restarted ({err})"
            self.ctx.out.note(self.down[target.label])

    @staticmethod
    def _failed(target: str, workload: str, round_no: int, why: str) -> dict[str, Any]:
        return {"target": target, "workload": workload, "round": round_no, "failed": why}

    # -- failover --

    def _failover(self) -> dict[str, Any]:
        from cachenode.bench.systems import BenchError

        target = self.targets[0]
        if target.label in self.down:
            # The workloads broke it for good: time failover on a fresh cluster instead.
            self.ctx.out.note("starting a fresh cachenode cluster for the failover trials")
            target.stop()
            target.restarts += 1
            try:
                target.start()
            except (BenchError, CliError) as err:
                return {"skipped": f"no cluster for the failover trials: {err}"}
        cluster = target.handle
        assert isinstance(cluster, _CachenodeCluster)
        trials = []
        with self._progress() as progress:
            task = progress.add_task("failover", total=self.a.failover_trials)
            for t in range(self.a.failover_trials):
                progress.update(
                    task, description=f"failover trial {t + 1}/{self.a.failover_trials}"
                )
                if not self.ctx.out.interactive:
                    self.ctx.out.note(f"failover trial {t + 1}/{self.a.failover_trials}")
                try:
                    trial = _failover_trial(cluster, t)
                except CliError as err:
                    trial = {"error": err.message, "shard_s": None, "all_shards_s": None}
                trials.append(trial)
                if "error" in trial:
                    # The cluster may be broken now: record why, keep the logs, stop trying.
                    self.ctx.out.note(f"failover trial {t + 1} failed: {trial['error']}")
                    self.keep_logs = self.keep_logs or f"failover trial {t + 1} failed"
                    break
                progress.advance(task)
        shard_times = [x["shard_s"] for x in trials if x["shard_s"] is not None]
        all_times = [x["all_shards_s"] for x in trials if x["all_shards_s"] is not None]
        unrecovered = [
            {"trial": n, "killed": x["killed"], "shard": s}
            for n, x in enumerate(trials, 1)
            for s in x.get("unrecovered", ())
        ]
        doc: dict[str, Any] = {
            "failover_s": statistics.median(shard_times) if shard_times else None,
            "all_shards_s": statistics.median(all_times) if all_times else None,
            "unrecovered_trials": len(trials) - len(shard_times),
            "unrecovered_shards": unrecovered,
            "probe_timeout_s": FAILOVER_PROBE_TIMEOUT_S,
            "method": "SIGKILL of the node leading a shard; then Set of a key of each shard it led "
            "through every surviving node (0.5 s deadline per try) until one is acknowledged; no "
            "other load; the next trial starts once every replica is back and caught up and, while "
            "the nodes balance leaders, every shard is led by its preferred replica again",
            "trials": trials,
        }
        if unrecovered:
            # The logs say why (role changes and elections per group); the data goes.
            self.keep_logs = self.keep_logs or "a shard of a killed leader accepted no write"
            doc["logs"] = str(cluster.directory)
            self.ctx.out.note(
                f"failover: {len(unrecovered)} shard(s) of a killed leader accepted no write within "
                f"{FAILOVER_PROBE_TIMEOUT_S:g}s ("
                + ", ".join(f"trial {u['trial']}: shard {u['shard']}" for u in unrecovered)
                + f"); the nodes' logs will be kept in {cluster.directory}"
            )
        return doc

    # -- replica move --

    def _replica_move(self) -> dict[str, Any]:
        """Time moving one shard replica of ``--move-mb`` MiB to a new node, on a fresh cluster."""
        from cachenode.bench.move import ReplicaMove
        from cachenode.bench.systems import BenchError

        a = self.a
        self.ctx.out.note(
            f"replica move: starting a fresh cluster ({MOVE_NODES} nodes, {a.shards} shards)"
        )
        cluster = _CachenodeCluster(self.ctx, self.data / "move", MOVE_NODES, a.shards, a.node_arg)
        self.extra.append(cluster)
        note = self.ctx.out.note if not self.ctx.out.interactive else (lambda _text: None)
        move: ReplicaMove | None = None
        try:
            cluster.start()
            with self._progress() as progress:
                move = ReplicaMove(cluster, a.move_mb, progress=progress, note=note)
                doc = move.run()
        except (BenchError, CliError) as err:
            why = str(err) if isinstance(err, BenchError) else err.message
            doc = dict(move.doc) if move is not None else {"mb": a.move_mb, "verified": False}
            doc["failed"] = why
            self.ctx.out.note(f"replica move failed: {why}")
            self.keep_logs = self.keep_logs or "the replica move failed"
        finally:
            cluster.stop()
        if "failed" not in doc:
            from cachenode.bench.report import move_summary

            self.ctx.out.note(f"replica move: {move_summary(doc)}")
        return doc

    # -- scaling --

    def _scaling(self) -> dict[str, Any]:
        from cachenode.bench.runner import run_phase, run_prefill
        from cachenode.bench.systems import BenchError
        from cachenode.bench.targets import TargetSpec

        configs = [(3, s) for s in SCALING_SHARDS] + [(n, 16) for n in SCALING_NODES if n != 3]
        runs = []
        for nodes, shards in configs:
            self.ctx.out.note(f"scaling: {nodes} nodes, {shards} shards")
            cluster = _CachenodeCluster(
                self.ctx, self.data / f"scale-n{nodes}-s{shards}", nodes, shards, self.a.node_arg
            )
            row: dict[str, Any] = {"nodes": nodes, "shards": shards}
            try:
                cluster.start()
                spec = TargetSpec("cachenode", "cachenode", cluster.endpoints())
                run_prefill(spec, log_dir=self.data)
                for workload in SCALING_WORKLOADS:
                    try:
                        res = run_phase(
                            spec,
                            cluster.pids(),
                            workload,
                            clients=self.a.clients,
                            inflight=self.a.inflight,
                            seconds=self.seconds,
                            warmup_s=self._warmup(),
                            log_dir=self.data,
                        )
                        row[workload] = res.ops_per_s
                        row[f"{workload}_p99_s"] = res.p99_s
                        row[f"{workload}_cpu_s_per_1k_ops"] = res.cpu_s_per_1k_ops
                    except BenchError as err:
                        row[f"{workload}_failed"] = str(err)
            finally:
                cluster.stop()
            runs.append(row)
        return {"rounds": 1, "workloads": list(SCALING_WORKLOADS), "runs": runs}


def _remove_all_but_logs(directory: Path) -> None:
    """Delete every file under ``directory`` except ``*.log`` (data can be gigabytes)."""
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # only succeeds once empty
            elif path.suffix != ".log":
                path.unlink()


def _default_data_parent() -> Path:
    from cachenode.bench.systems import fs_type

    for candidate in (Path("/var/tmp"), Path(tempfile.gettempdir()), Path.cwd()):
        if candidate.is_dir() and os.access(candidate, os.W_OK) and fs_type(candidate) != "tmpfs":
            return candidate
    return Path.cwd()


# ---- failover -------------------------------------------------------------------


def _failover_trial(cluster: _CachenodeCluster, trial: int) -> dict[str, Any]:
    """Kill (SIGKILL) the leader of one shard; time the first acknowledged write on it."""
    from cachectl import local

    doc = cluster.doc()
    by_shard = _replicas_by_shard(_node_statuses([(r.id, r.address) for r in doc.nodes]))
    leaders = {s: n for s, reps in by_shard.items() for n, r in reps.items() if r.role == "leader"}
    hosts = {s: set(reps) for s, reps in by_shard.items()}
    if not leaders:
        raise CliError("failover: no node reports leading any shard; the cluster is unhealthy")
    leading_nodes = sorted(set(leaders.values()))
    victim = leading_nodes[trial % len(leading_nodes)]
    led = sorted(s for s, n in leaders.items() if n == victim)
    shard = led[0]
    rec = doc.node(victim)
    if rec.pid is None or not local.runs_node(rec.pid, rec):
        raise CliError(
            f"failover: {victim} is not running as recorded in {cluster.directory}/cluster.json"
        )
    survivors = [r.address for r in doc.nodes if r.id != victim]
    ranges, preferred = _shard_ranges(survivors[0])
    keys = {s: _key_in_range(*ranges[s]) for s in led}
    started = time.monotonic()
    os.kill(rec.pid, signal.SIGKILL)
    times = asyncio.run(_probe_writes(keys, survivors, started, FAILOVER_PROBE_TIMEOUT_S))
    done = [v for v in times.values() if v is not None]
    result: dict[str, Any] = {
        "killed": victim,
        "shard": shard,
        "shard_s": times.get(shard),
        "shards_led": led,
        "all_shards_s": max(done) if len(done) == len(times) else None,
        "per_shard_s": {str(s): v for s, v in times.items()},
        "unrecovered": sorted(s for s, v in times.items() if v is None),
    }
    try:
        cluster.restart_node(victim)
        _wait_caught_up(cluster, {s: hosts.get(s, set()) for s in ranges}, preferred, 120.0)
    except CliError as err:  # what the probe measured still counts
        result["error"] = err.message
    return result


def _node_statuses(nodes: Sequence[tuple[str, str]]) -> dict[str, Any]:
    import grpc

    from cachenode.v1 import cache_pb2 as pb
    from cachenode.v1 import cache_pb2_grpc as pb_grpc

    out: dict[str, Any] = {}
    for node_id, address in nodes:
        with grpc.insecure_channel(address) as ch:
            try:
                out[node_id] = pb_grpc.AdminStub(ch).GetNodeStatus(
                    pb.NodeStatusRequest(), timeout=2.0
                )
            except grpc.RpcError:
                continue
    return out


def _replicas_by_shard(statuses: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Shard id -> node id -> that node's ReplicaStatus, from nodes' statuses."""
    by_shard: dict[int, dict[str, Any]] = {}
    for node_id, st in statuses.items():
        for rep in st.replicas:
            by_shard.setdefault(rep.shard_id, {})[node_id] = rep
    return by_shard


def _shard_ranges(address: str) -> tuple[dict[int, tuple[int, int]], dict[int, str]]:
    """Each shard's hash range, and its preferred replica (the first in the map)."""
    import grpc

    from cachenode.v1 import cache_pb2 as pb
    from cachenode.v1 import cache_pb2_grpc as pb_grpc

    deadline = time.monotonic() + 30.0
    with grpc.insecure_channel(address) as ch:
        while True:
            try:
                cmap = pb_grpc.AdminStub(ch).GetClusterMap(pb.ClusterMapRequest(), timeout=5.0)
                break
            except grpc.RpcError as err:
                # A node restarted by the previous trial may still be loading.
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise CliError(f"failover: no cluster map from {address} ({err.code().name})") from None
                time.sleep(0.2)
    return (
        {s.id: (s.range_start, s.range_end) for s in cmap.shards},
        {s.id: s.replicas[0] for s in cmap.shards if s.replicas},
    )


def _key_in_range(start: int, end: int) -> bytes:
    from cachenode._types import key_hash
    from cachenode.bench.loadgen import bench_key

    for i in range(10_000_000):
        key = bench_key("f:", i)
        if start <= key_hash(key) <= end:
            return key
    raise CliError(f"failover: found no key for hash range {start}..{end}")


async def _probe_writes(
    keys: Mapping[int, bytes], survivors: Sequence[str], started: float, timeout_s: float
) -> dict[int, float | None]:
    """Seconds from ``started`` to the first acknowledged Set per shard (None: not within timeout)."""
    import grpc
    import grpc.aio

    from cachenode.v1 import cache_pb2 as pb
    from cachenode.v1 import cache_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(a) for a in survivors]
    stubs = [pb_grpc.CacheStub(ch) for ch in channels]
    deadline = started + timeout_s
    results: dict[int, float | None] = {s: None for s in keys}

    async def one_path(shard: int, stub: Any, done: asyncio.Event) -> None:
        while not done.is_set() and time.monotonic() < deadline:
            try:
                await stub.Set(pb.SetRequest(key=keys[shard], value=b"failover"), timeout=0.5)
            except grpc.RpcError:
                await asyncio.sleep(0.01)
                continue
            if not done.is_set():
                results[shard] = time.monotonic() - started
                done.set()
            return

    async def one_shard(shard: int) -> None:
        done = asyncio.Event()
        await asyncio.gather(*(one_path(shard, stub, done) for stub in stubs))

    try:
        await asyncio.gather(*(one_shard(s) for s in keys))
    finally:
        for ch in channels:
            await ch.close(None)
    return results


def _wait_caught_up(
    cluster: _CachenodeCluster,
    hosts: Mapping[int, set[str]],
    preferred: Mapping[int, str],
    timeout_s: float,
) -> None:
    """Until every node answers and every shard is whole again: each node in
    ``hosts[shard]`` (the shard's replicas before the trial) reports it, one
    of them leads, and the others follow that leader in its term and have
    applied every entry it has.  A trial that kills a leader while
    another replica of its shard is still catching up leaves that shard
    without a working majority, which would time the restart, not the
    failover.  While the nodes balance leaders, also until each shard is
    led by its ``preferred`` replica again, so that every trial starts from
    the spread a running cluster keeps (each node leading its share)."""
    doc = cluster.doc()
    nodes = [(r.id, r.address) for r in doc.nodes]
    end = time.monotonic() + timeout_s
    waiting = "no node answered"
    while time.monotonic() < end:
        statuses = _node_statuses(nodes)
        if len(statuses) < len(nodes):
            waiting = f"{len(nodes) - len(statuses)} node(s) do not answer"
        else:
            balancing = all(st.leader_balancing == "on" for st in statuses.values())
            found = _not_caught_up(statuses, hosts, preferred if balancing else {})
            if found is None:
                return
            waiting = found
        time.sleep(0.25)
    raise CliError(
        f"failover: the cluster did not recover within {timeout_s:g}s after a trial ({waiting}); "
        "see the node logs"
    )


def _not_caught_up(
    statuses: Mapping[str, Any], hosts: Mapping[int, set[str]], preferred: Mapping[int, str]
) -> str | None:
    """Why the shards are not whole yet (see :func:`_wait_caught_up`), or None."""
    by_shard = _replicas_by_shard(statuses)
    for shard, expected in sorted(hosts.items()):
        reps = by_shard.get(shard, {})
        missing = sorted(expected - set(reps))
        if missing:
            return f"shard {shard} has no replica on {', '.join(missing)} yet"
        leaders = [n for n, r in reps.items() if r.role == "leader"]
        if len(leaders) != 1:
            return f"shard {shard} has {len(leaders)} leaders"
        lead = reps[leaders[0]]
        if preferred.get(shard, leaders[0]) != leaders[0]:
            return f"shard {shard} is led by {leaders[0]}, not yet by {preferred[shard]}"
        for node_id, r in sorted(reps.items()):
            if r is lead:
                continue
            if r.role != "follower" or r.term != lead.term:
                return f"shard {shard}: the replica on {node_id} does not follow the leader yet"
            # Applied indexes, not commit indexes: a follower hears of the last
            # commit with the next append (up to a heartbeat later), and the
            # status counts only entries the state machine applied (not
            # pysyncobj's own no-op of an election), on the leader too.
            if r.applied_index < lead.applied_index:
                return (
                    f"shard {shard}: the replica on {node_id} has applied {r.applied_index} "
                    f"of the leader's {lead.applied_index}"
                )
    return None
