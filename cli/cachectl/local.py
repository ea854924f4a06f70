"""``cachectl local``: run a cluster of node processes on this machine.

    cachectl local up [--nodes 3] [--shards 4] [--replication 3] [--dir .cluster] [--fsync always|never]
    cachectl local down [--dir .cluster]
    cachectl local stop-node [--dir .cluster] ID [--kill]
    cachectl local start-node [--dir .cluster] ID

``up`` picks free loopback ports, writes a random secret (mode 0600) to
``DIR/secret``, starts one ``python -m cachenode.server.main serve`` process
per node (its own session, output to ``DIR/<id>/node.log``, data in
``DIR/<id>/data``) and waits until every node answers and every shard has a
leader.  ``DIR/cluster.json`` records each node's id, client and Raft
address, pid, data dir, log and the exact argv; it is written as soon as the
processes exist, so ``down`` can always find them.  If a node dies during
startup, or the deadline (``--wait``, 60 s) passes, ``up`` stops every node it
started and fails (the dead node's log tail goes to stderr).  ``up`` on a
directory whose cluster is stopped restarts it from its data.

Processes are only ever signalled by the pid recorded in cluster.json, and
only if ``/proc/<pid>/cmdline`` still shows that node (a recycled pid is left
alone).  Never by name.

Concurrency: commands on one directory take an exclusive lock on
``DIR/.cachectl.lock``, so two ``local`` commands never interleave.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from cachectl import argtypes
from cachectl.output import CliError, ExitStatus

if TYPE_CHECKING:
    from cachectl.main import Context

CLUSTER_FILE = "cluster.json"
LOCK_FILE = ".cachectl.lock"
SECRET_FILE = "secret"
DEFAULT_DIR = ".cluster"
NODE_MODULE = "cachenode.server.main"
LOG_TAIL_LINES = 30
WATCH_INTERVAL_S = 1.0  # how often `local up --foreground` looks whether its nodes still run

# Popen objects of the nodes this process started, so they can be reaped.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclasses.dataclass
class NodeRecord:
    id: str
    address: str
    raft_address: str
    pid: int | None
    data_dir: str
    log: str
    argv: list[str]


@dataclasses.dataclass
class ClusterDoc:
    directory: str
    shards: int
    replication: int
    secret_file: str
    nodes: list[NodeRecord]
    created_at: float = 0.0
    node_args: list[str] = dataclasses.field(default_factory=list)
    fsync: str | None = None
    log_format: str | None = None

    def node(self, node_id: str) -> NodeRecord:
        for rec in self.nodes:
            if rec.id == node_id:
                return rec
        known = ", ".join(r.id for r in self.nodes)
        raise CliError(
            f"no node {node_id!r} in {self.directory} (nodes: {known})", ExitStatus.USAGE
        )

    def endpoints(self) -> str:
        return ",".join(r.address for r in self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "directory": self.directory,
            "created_at": self.created_at,
            "shards": self.shards,
            "replication": self.replication,
            "secret_file": self.secret_file,
            "endpoints": self.endpoints(),
            "nodes": [dataclasses.asdict(r) for r in self.nodes],
            "node_args": self.node_args,
            "fsync": self.fsync,
            "log_format": self.log_format,
        }

    @staticmethod
    def from_json(doc: dict[str, Any]) -> ClusterDoc:
        return ClusterDoc(
            directory=doc["directory"],
            shards=int(doc["shards"]),
            replication=int(doc["replication"]),
            secret_file=doc["secret_file"],
            nodes=[NodeRecord(**n) for n in doc["nodes"]],
            created_at=float(doc.get("created_at", 0.0)),
            node_args=list(doc.get("node_args", [])),
            fsync=doc.get("fsync"),
            log_format=doc.get("log_format"),
        )


# ---- command line -----------------------------------------------------------


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    local = sub.add_parser("local", parents=[common], help="run a cluster on this machine")
    actions = local.add_subparsers(dest="local_command", metavar="ACTION", parser_class=type(local))
    actions.required = True

    def with_grace(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--grace",
            type=argtypes.seconds,
            default=10.0,
            metavar="SECONDS",
            help="wait before SIGKILL (default 10)",
        )

    def with_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir",
            default=DEFAULT_DIR,
            help=f"directory for cluster.json, data and logs (default {DEFAULT_DIR})",
        )

    p = actions.add_parser(
        "up", parents=[common], help="start a local cluster and wait for leaders"
    )
    with_dir(p)
    p.add_argument("--nodes", type=argtypes.count, default=3, help="number of nodes (default 3)")
    p.add_argument("--shards", type=argtypes.count, default=4, help="number of shards (default 4)")
    p.add_argument("--replication", type=argtypes.count, default=3, help="replicas per shard (default 3)")
    p.add_argument(
        "--fsync", choices=("always", "never"), help="node fsync policy (node default if omitted)"
    )
    p.add_argument("--log-format", choices=("text", "json"), help="node log format")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    p.add_argument(
        "--node-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for every node, e.g. --node-arg=--log-compaction-entries=2000 (repeatable)",
    )
    p.add_argument(
        "--foreground",
        action="store_true",
        help="stay in the foreground with a short how-to; Ctrl-C stops every node, "
        "and it ends by itself once every node has stopped",
    )
    p.add_argument(
        "--wait",
        type=argtypes.seconds,
        default=60.0,
        metavar="SECONDS",
        help="startup deadline (default 60)",
    )
    p.set_defaults(handler=cmd_up)

    p = actions.add_parser("down", parents=[common], help="stop every node of the local cluster")
    with_dir(p)
    with_grace(p)
    p.set_defaults(handler=cmd_down)

    p = actions.add_parser(
        "stop-node", parents=[common], help="stop one node (SIGTERM, or SIGKILL with --kill)"
    )
    with_dir(p)
    p.add_argument("node_id", metavar="ID")
    p.add_argument(
        "--kill", action="store_true", help="SIGKILL at once (a crash) instead of a clean stop"
    )
    with_grace(p)
    p.set_defaults(handler=cmd_stop_node)

    p = actions.add_parser(
        "start-node", parents=[common], help="start a stopped node again with its data"
    )
    with_dir(p)
    p.add_argument("node_id", metavar="ID")
    p.add_argument(
        "--wait",
        type=argtypes.seconds,
        default=60.0,
        metavar="SECONDS",
        help="deadline to answer (default 60)",
    )
    p.set_defaults(handler=cmd_start_node)

    p = actions.add_parser(
        "add-node", parents=[common],
        help="start a new node that joins the local cluster (the placement driver then moves replicas to it)",
    )
    with_dir(p)
    p.add_argument(
        "--node-arg", action="append", default=[], metavar="ARG",
        help="extra flag for the new node (repeatable; the cluster's own --node-arg flags apply too)",
    )
    p.add_argument(
        "--wait", type=argtypes.seconds, default=60.0, metavar="SECONDS",
        help="deadline for the node to answer (default 60)",
    )
    p.set_defaults(handler=cmd_add_node)






# ---- cluster.json and the lock ------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CliError(
                f"another cachectl local command is working on {directory}; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load(directory: Path) -> ClusterDoc | None:
    path = directory / CLUSTER_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return ClusterDoc.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as err:
        raise CliError(
            f"{path} is not a cluster file cachectl wrote ({err}); move it away"
        ) from None


def _require(directory: Path) -> ClusterDoc:
    doc = load(directory)
    if doc is None:
        raise CliError(
            f"no local cluster in {directory} ({CLUSTER_FILE} is missing); "
            f"start one with `cachectl local up --dir {directory}`"
        )
    return doc


def save(doc: ClusterDoc) -> None:
    path = Path(doc.directory) / CLUSTER_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


# ---- processes --------------------------------------------------------------


def _has_proc() -> bool:
    return Path("/proc/self/cmdline").exists()


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def runs_node(pid: int, rec: NodeRecord) -> bool:
    """Is ``pid`` alive and still the process recorded for ``rec`` (not a recycled pid)?"""
    if not alive(pid):
        return False
    if not _has_proc():
        return True
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return rec.id.encode() in args and rec.data_dir.encode() in args


def _exit_code(pid: int) -> int | None:
    proc = _CHILDREN.get(pid)
    return proc.poll() if proc is not None else None


def _child_env(env: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment, with the directory holding ``cachenode`` on PYTHONPATH."""
    import cachenode

    root = str(Path(cachenode.__file__).resolve().parent.parent)
    child = dict(env)
    parts = [p for p in child.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        parts.insert(0, root)
    child["PYTHONPATH"] = os.pathsep.join(parts)
    return child


def spawn(rec: NodeRecord, env: Mapping[str, str]) -> int:
    log = Path(rec.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    Path(rec.data_dir).mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as logf:
        logf.write(
            f"\n=== cachectl: starting {rec.id} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode()
        )
        logf.flush()
        try:
            proc = subprocess.Popen(
                rec.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in this terminal must not reach the nodes
                env=_child_env(env),
                cwd=str(log.parent),
                close_fds=True,
            )
        except OSError as err:
            raise CliError(f"could not start {rec.id} ({rec.argv[0]}): {err}") from None
    _CHILDREN[proc.pid] = proc
    return proc.pid


def stop(records: list[NodeRecord], *, grace: float, kill: bool = False) -> list[str]:
    """Stop the recorded processes (SIGTERM, SIGKILL after ``grace``); clears their pids.

    Returns one note per node that was signalled.
    """
    notes: list[str] = []
    targets: list[tuple[NodeRecord, int]] = []
    for rec in records:
        pid = rec.pid
        if pid is None:
            continue
        if runs_node(pid, rec):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
            targets.append((rec, pid))
        else:
            _CHILDREN.pop(pid, None)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(alive(pid) for _, pid in targets):
        time.sleep(0.05)
    for rec, pid in targets:
        how = "killed" if kill else "stopped"
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            how = f"killed after {grace:g}s"
        notes.append(f"{rec.id} (pid {pid}) {how}")
    end = time.monotonic() + 5.0
    while time.monotonic() < end and any(alive(pid) for _, pid in targets):
        time.sleep(0.05)
    for _rec, pid in targets:
        if not alive(pid):
            _CHILDREN.pop(pid, None)
    for rec in records:
        rec.pid = None
    return notes


def log_tail(rec: NodeRecord, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(rec.log).read_text(errors="replace")
    except OSError as err:
        return f"(cannot read {rec.log}: {err})"
    tail = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join(tail)


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (all held open while choosing)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(
                socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
            )
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    except OSError as err:
        raise CliError(f"could not find free ports on {host}: {err}") from None
    finally:
        for s in socks:
            s.close()


# ---- readiness ----------------------------------------------------------------


class _NodeDied(Exception):
    def __init__(self, rec: NodeRecord, code: int | None) -> None:
        super().__init__(rec.id)
        self.rec, self.code = rec, code


class _NotReady(Exception):
    pass


def wait_ready(
    ctx: Context, doc: ClusterDoc, deadline: float, *, only: NodeRecord | None = None
) -> None:
    """Wait until every node answers and every shard has a leader (or just ``only`` answers)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from cachenode.client import CacheClient, CacheError

    watched = [only] if only is not None else doc.nodes
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=ctx.out.err_console,
        transient=True,
        disable=not ctx.out.interactive,
    )
    summary = "no node answered yet"
    with CacheClient(doc.endpoints(), timeout=1.0, max_attempts=1) as client, progress:
        task = progress.add_task("starting nodes", total=None)
        while True:
            for rec in watched:
                if rec.pid is not None and not alive(rec.pid):
                    raise _NodeDied(rec, _exit_code(rec.pid))
            answered: dict[str, Any] = {}
            for rec in watched:
                with contextlib.suppress(CacheError):
                    answered[rec.id] = client.node_status(rec.address)
            if only is not None:
                if answered:
                    return
                summary = f"{only.id} does not answer at {only.address} yet"
            else:
                cmap = None
                with contextlib.suppress(CacheError):
                    cmap = client.cluster_map(refresh=True)
                led = {
                    r.shard_id
                    for st in answered.values()
                    for r in st.replicas
                    if r.role == "leader"
                }
                missing = [s.id for s in cmap.shards if s.id not in led] if cmap else None
                silent = [r.id for r in watched if r.id not in answered]
                if cmap is not None and not silent and not missing:
                    return
                summary = (
                    f"{len(answered)}/{len(watched)} nodes answer"
                    + (f" (waiting for {', '.join(silent)})" if silent else "")
                    + (
                        f"; shards without a leader: {', '.join(map(str, missing))}"
                        if missing
                        else "; no cluster map yet"
                        if cmap is None
                        else ""
                    )
                )
            progress.update(task, description=summary)
            if time.monotonic() >= deadline:
                raise _NotReady(summary)
            time.sleep(0.25)


# ---- commands ---------------------------------------------------------------


def _node_argv(
    python: str,
    rec: NodeRecord,
    initial_cluster: str,
    shards: int,
    replication: int,
    secret_file: str,
    fsync: str | None,
    log_format: str | None,
    extra: list[str] | None = None,
) -> list[str]:
    argv = [
        python,
        "-m",
        NODE_MODULE,
        "serve",
        "--node-id",
        rec.id,
        "--data-dir",
        rec.data_dir,
        "--listen",
        rec.address,
        "--raft-listen",
        rec.raft_address,
        "--initial-cluster",
        initial_cluster,
        "--shards",
        str(shards),
        "--replication",
        str(replication),
        "--secret-file",
        secret_file,
    ]
    if fsync:
        argv += ["--fsync", fsync]
    if log_format:
        argv += ["--log-format", log_format]
    return argv + list(extra or [])


def _write_secret(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
    finally:
        os.close(fd)


START_ATTEMPTS = 3
"""How often ``local up`` starts a new cluster when a node finds its port
taken.  The ports are chosen free, closed, and bound by the nodes a moment
later: another process's ``bind`` can take one in between (a second test
worker, another ``local up``).  Nothing was acknowledged yet, so the next
attempt empties the data directories and chooses new ports."""


def _lost_its_port(died: _NodeDied) -> bool:
    """The node stopped at start because an address it listens on was in use."""
    # Imported only once a node has died: keeps the CLI's start light.
    from cachenode.server.main import EXIT_ADDRESS_IN_USE

    return died.code == EXIT_ADDRESS_IN_USE


def _new_cluster(
    ctx: Context, directory: Path, choose_ports: Callable[[str, int], list[int]] = free_ports
) -> ClusterDoc:
    a = ctx.args
    if a.replication > a.nodes:
        raise CliError(
            f"--replication {a.replication} needs at least that many nodes, got --nodes {a.nodes}",
            ExitStatus.USAGE,
        )
    host = a.host
    ports = choose_ports(host, 2 * a.nodes)
    fmt = f"[{host}]:{{}}" if ":" in host else f"{host}:{{}}"
    secret = directory / SECRET_FILE
    _write_secret(secret)
    records = []
    for i in range(a.nodes):
        node_id = f"n{i + 1}"
        node_dir = directory / node_id
        records.append(
            NodeRecord(
                id=node_id,
                address=fmt.format(ports[2 * i]),
                raft_address=fmt.format(ports[2 * i + 1]),
                pid=None,
                data_dir=str(node_dir / "data"),
                log=str(node_dir / "node.log"),
                argv=[],
            )
        )
    initial = ",".join(f"{r.id}={r.address}/{r.raft_address}" for r in records)
    for rec in records:
        rec.argv = _node_argv(
            sys.executable,
            rec,
            initial,
            a.shards,
            a.replication,
            str(secret),
            a.fsync,
            a.log_format,
            a.node_arg,
        )
    return ClusterDoc(
        str(directory), a.shards, a.replication, str(secret), records, time.time(),
        list(a.node_arg), a.fsync, a.log_format,
    )


def _startup_failed(ctx: Context, doc: ClusterDoc, died: _NodeDied) -> NoReturn:
    """Stop every node of ``doc``, show ``died``'s log tail, raise the CLI error."""
    code = died.code
    tail = log_tail(died.rec)
    stop(doc.nodes, grace=5.0)
    save(doc)
    ctx.out.raw_err(f"--- last lines of {died.rec.log} ---\n{tail}\n---")
    raise CliError(
        f"node {died.rec.id} exited{_died_how(code)} during startup; the other nodes were stopped; its log is {died.rec.log} (tail above)"
    )


def cmd_up(ctx: Context, choose_ports: Callable[[str, int], list[int]] = free_ports) -> int:
    """``local up``; ``choose_ports(host, count)`` picks a new cluster's ports."""
    a = ctx.args
    directory = Path(a.dir).resolve()
    with _locked(directory):
        doc = load(directory)
        restarted = doc is not None
        if doc is not None:
            running = [f"{r.id} (pid {r.pid})" for r in doc.nodes if r.pid and runs_node(r.pid, r)]
            if running:
                raise CliError(
                    f"a cluster is already running in {directory}: {', '.join(running)}; "
                    f"stop it with `cachectl local down --dir {a.dir}`"
                )
            ctx.out.note(f"restarting the stopped cluster in {directory} from its data")
        else:
            doc = _new_cluster(ctx, directory, choose_ports)
            save(doc)
        for attempt in range(1, START_ATTEMPTS + 1):
            started = time.monotonic()
            try:
                for rec in doc.nodes:
                    rec.pid = spawn(rec, ctx.env)
                    save(doc)  # record every pid at once: `local down` must find them
                wait_ready(ctx, doc, started + a.wait)
                break
            except _NodeDied as died:
                if restarted or attempt == START_ATTEMPTS or not _lost_its_port(died):
                    _startup_failed(ctx, doc, died)
                stop(doc.nodes, grace=5.0)
                ctx.out.note(
                    f"node {died.rec.id}'s port was taken before it could listen "
                    f"({died.rec.address}, {died.rec.raft_address}); starting again on new ports"
                )
                for rec in doc.nodes:
                    shutil.rmtree(rec.data_dir, ignore_errors=True)
                doc = _new_cluster(ctx, directory, choose_ports)
                save(doc)
            except _NotReady as nr:
                stop(doc.nodes, grace=5.0)
                save(doc)
                raise CliError(
                    f"the cluster was not ready within {a.wait:g}s ({nr}); every node was stopped; "
                    f"see the logs in {directory}/<id>/node.log, or retry with a larger --wait",
                    ExitStatus.TIMEOUT,
                ) from None
            except BaseException:
                stop(doc.nodes, grace=5.0)
                save(doc)
                raise
        elapsed = time.monotonic() - started
    if ctx.json:
        ctx.out.json(doc.to_json())
    else:
        verb = "restarted" if restarted else "started"
        ctx.out.line(
            f"{verb} {len(doc.nodes)} nodes in {directory}; every shard has a leader ({elapsed:.1f}s)"
        )
        ctx.out.line(f"endpoints: {doc.endpoints()}")
        ctx.out.line(f"export CACHECTL_ENDPOINTS={doc.endpoints()}")
    if a.foreground:
        return _foreground(ctx, doc, directory)
    return ExitStatus.OK


def _foreground(ctx: Context, doc: ClusterDoc, directory: Path) -> int:
    """Keep the cluster in the foreground until Ctrl-C/SIGTERM, then stop it;
    or until every node has stopped by other means (see `_nodes_gone`)."""
    import signal
    import threading

    eps = doc.endpoints()
    ctx.out.line("")
    ctx.out.line("Try it (in another terminal, from this directory):")
    ctx.out.line("  source .venv/bin/activate")
    ctx.out.line(f"  export CACHECTL_ENDPOINTS={eps}")
    ctx.out.line("  cachectl set user:1 alice && cachectl get user:1 --json")
    ctx.out.line("  cachectl set session:9 token --ttl 30000 && cachectl ttl session:9")
    ctx.out.line("  cachectl incr hits && cachectl mset a 1 b 2 && cachectl mget a b")
    ctx.out.line("  cachectl status")
    ctx.out.line(f"  cachectl local stop-node --dir {directory} n2   # then keep using the cluster")
    ctx.out.line(f"  cachectl local add-node --dir {directory} && cachectl cluster status --watch")
    ctx.out.line(f"Logs: {directory}/<node>/node.log. Press Ctrl-C to stop every node.")
    stop_evt = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_evt.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    ended: tuple[str, ExitStatus] | None = None
    try:
        while ended is None and not stop_evt.wait(WATCH_INTERVAL_S):
            ended = _nodes_gone(directory, doc)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if ended is not None:
        message, status = ended
        if status is not ExitStatus.OK:
            raise CliError(message, status)
        ctx.out.line(message)
        return status
    with _locked(directory):
        current = load(directory) or doc
        notes = stop(current.nodes, grace=10.0)
        save(current)
    ctx.out.line("; ".join(notes) + f"; data kept in {directory}" if notes else "stopped")
    return ExitStatus.OK


def _nodes_gone(directory: Path, doc: ClusterDoc) -> tuple[str, ExitStatus] | None:
    """Has every node of the foreground cluster stopped?  ``None`` while one runs.

    Called by `_foreground` on the main thread every `WATCH_INTERVAL_S`, while
    other cachectl commands may be changing the cluster file.  It reads the file
    without the lock (`save` replaces it whole).  Nodes stopped by another command
    (`local down`, `stop-node`) have no pid there: the cluster was stopped on
    purpose.  Nodes that still have a pid but no process exited by themselves;
    that is confirmed under the lock, because a `local down` in progress has
    signalled its nodes before it clears their pids, and the pids are cleared.
    """
    try:
        current = load(directory) or doc
    except (CliError, OSError):
        return None  # not a file we can read now: look again at the next round
    stopped = (
        f"every node was stopped by another cachectl command; data kept in {directory}",
        ExitStatus.OK,
    )
    recorded = [(r, r.pid) for r in current.nodes if r.pid]
    if not recorded:
        return stopped
    if any(runs_node(pid, r) for r, pid in recorded):
        return None
    try:
        with _locked(directory):
            current = load(directory) or current
            recorded = [(r, r.pid) for r in current.nodes if r.pid]
            if not recorded:
                return stopped
            if any(runs_node(pid, r) for r, pid in recorded):
                return None
            exited = ", ".join(f"{r.id} ({_how_it_ended(pid)})" for r, pid in recorded)
            if any(_exit_code(pid) == -signal.SIGBUS for _, pid in recorded):
                exited += f" ({SIGBUS_HINT})"
            stop(current.nodes, grace=0.0)  # nothing runs: this clears the pids
            save(current)
    except (CliError, OSError):
        return None  # another command holds the lock (it is changing the cluster), or no lock file now
    return (
        f"every node that was running has exited by itself: {exited}; see {directory}/<node>/node.log, "
        f"then start the cluster again from its data with `cachectl local up --dir {directory}`",
        ExitStatus.FAILED,
    )


def _how_it_ended(pid: int) -> str:
    code = _exit_code(pid)
    if code is None:
        return f"pid {pid}, gone"  # not our child (a restarted cluster): no status to read
    return f"pid {pid}, {_ended(code)}"


def _ended(code: int) -> str:
    """How a node process ended: ``exit status 3``, ``killed by SIGKILL``."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


SIGBUS_HINT = ("SIGBUS usually means that the node's data disk is full (LMDB writes through its memory map): "
               "free space there, then start it again")


def _died_how(code: int | None) -> str:
    """For "node n1 exited{...} right after starting": its exit code, or
    the signal that killed it and what that signal may mean."""
    if code is None:
        return ""
    if code >= 0:
        return f" with code {code}"
    return f" ({_ended(code)}" + (f"; {SIGBUS_HINT})" if -code == signal.SIGBUS else ")")


def cmd_down(ctx: Context) -> int:
    a = ctx.args
    directory = Path(a.dir).resolve()
    with _locked(directory):
        doc = _require(directory)
        notes = stop(doc.nodes, grace=a.grace)
        save(doc)
    if ctx.json:
        ctx.out.json({"stopped": notes, "directory": str(directory)})
    elif notes:
        ctx.out.line("; ".join(notes) + f"; data kept in {directory}")
    else:
        ctx.out.line(f"no node was running in {directory}")
    return ExitStatus.OK


def cmd_stop_node(ctx: Context) -> int:
    a = ctx.args
    directory = Path(a.dir).resolve()
    with _locked(directory):
        doc = _require(directory)
        rec = doc.node(a.node_id)
        notes = stop([rec], grace=a.grace, kill=a.kill)
        save(doc)
    message = notes[0] if notes else f"{rec.id} was not running"
    if ctx.json:
        ctx.out.json({"node": rec.id, "result": message})
    else:
        ctx.out.line(message)
    return ExitStatus.OK


def _spawn_and_wait(ctx: Context, doc: ClusterDoc, rec: NodeRecord, wait_s: float, what: str) -> None:
    """Start ``rec``'s process, record its pid, and wait until it answers.

    Caller holds the directory lock. A node that exits at once has its pid
    cleared and its log tail printed; one that runs but never answers keeps
    running, and the error says how to stop it.
    """
    started = time.monotonic()
    rec.pid = spawn(rec, ctx.env)
    save(doc)
    try:
        wait_ready(ctx, doc, started + wait_s, only=rec)
    except _NodeDied as died:
        rec.pid = None
        save(doc)
        ctx.out.raw_err(f"--- last lines of {rec.log} ---\n{log_tail(rec)}\n---")
        raise CliError(
            f"{what} {rec.id} exited{_died_how(died.code)} right after starting; its log is {rec.log} (tail above)"
        ) from None
    except _NotReady:
        raise CliError(
            f"{rec.id} (pid {rec.pid}) started but did not answer at {rec.address} within "
            f"{wait_s:g}s; it keeps running: see {rec.log}, or `cachectl local stop-node {rec.id}`",
            ExitStatus.TIMEOUT,
        ) from None


def _report_node(ctx: Context, rec: NodeRecord, message: str) -> int:
    """The one-line (or JSON) result of start-node and add-node."""
    if ctx.json:
        ctx.out.json({"node": rec.id, "pid": rec.pid, "address": rec.address, "result": message})
    else:
        ctx.out.line(message)
    return ExitStatus.OK


def cmd_start_node(ctx: Context) -> int:
    a = ctx.args
    directory = Path(a.dir).resolve()
    with _locked(directory):
        doc = _require(directory)
        rec = doc.node(a.node_id)
        if rec.pid is not None and runs_node(rec.pid, rec):
            message = f"{rec.id} is already running (pid {rec.pid})"
        else:
            _spawn_and_wait(ctx, doc, rec, a.wait, "node")
            message = f"{rec.id} started (pid {rec.pid}) at {rec.address}"
    return _report_node(ctx, rec, message)


def cmd_add_node(ctx: Context) -> int:
    a = ctx.args
    directory = Path(a.dir).resolve()
    with _locked(directory):
        doc = _require(directory)
        running = [r for r in doc.nodes if r.pid is not None and runs_node(r.pid, r)]
        if not running:
            raise CliError(
                f"no node of {directory} is running; start the cluster first: cachectl local up --dir {a.dir}"
            )
        taken = {r.id for r in doc.nodes}
        k = len(doc.nodes) + 1
        while f"n{k}" in taken:
            k += 1
        host = running[0].address.rsplit(":", 1)[0]
        ports = free_ports(host.strip("[]"), 2)
        node_dir = directory / f"n{k}"
        rec = NodeRecord(
            id=f"n{k}", address=f"{host}:{ports[0]}", raft_address=f"{host}:{ports[1]}", pid=None,
            data_dir=str(node_dir / "data"), log=str(node_dir / "node.log"), argv=[],
        )
        argv = _node_argv(
            sys.executable, rec, "", doc.shards, doc.replication, doc.secret_file,
            doc.fsync, doc.log_format, doc.node_args + list(a.node_arg),
        )
        i = argv.index("--initial-cluster")
        argv[i : i + 2] = ["--join", ",".join(r.address for r in running)]
        rec.argv = argv
        doc.nodes.append(rec)
        _spawn_and_wait(ctx, doc, rec, a.wait, "new node")
    message = f"{rec.id} started (pid {rec.pid}) at {rec.address} and joins the cluster; `cachectl cluster status` shows replicas moving to it"
    return _report_node(ctx, rec, message)
