"""The database under test as a set of OS processes: start, kill, pause, restart.

Nodes are started as ``python -m cachenode.server.main serve ...`` processes
(optionally wrapped, e.g. by ``ip netns exec``), each in its own session so a
Ctrl-C in the terminal reaches only the harness, with its data in
``ROOT/<id>/data`` and its output in ``ROOT/<id>/node.log``.  A restart reuses
the same argv and data directory.

Processes are signalled **only by PID**, and only PIDs of children this object
started and has not yet reaped (an unreaped child's PID cannot be recycled).
:meth:`Cluster.close` stops every node it started (SIGCONT first if paused,
SIGTERM, SIGKILL after a grace period); it is idempotent and is called on every
exit path by the runner (``with Cluster(...)``, including exceptions and
Ctrl-C).  Nothing here imports cachenode internals: readiness and leaders are
learnt through the public Admin API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc

from jepsen_lite.client import AdminClient

__all__ = [
    "Cluster",
    "HarnessError",
    "Node",
    "PortTaken",
    "START_ATTEMPTS",
    "UNSAFE_SWITCHES",
    "free_ports",
    "start_cluster",
]

log = logging.getLogger(__name__)

NODE_MODULE: Final = "cachenode.server.main"
UNSAFE_SWITCHES: Final = ("local-reads", "dup-incr", "local-ttl", "skip-fsync")
NETNS_CLIENT_PORT: Final = 7100
NETNS_RAFT_PORT: Final = 7101
START_ATTEMPTS: Final = 3
"""How many sets of fresh loopback ports :func:`start_cluster` tries."""


class HarnessError(RuntimeError):
    """The harness could not do its job (exit 3); the message is one line."""


def _exit_address_in_use() -> int:
    """The node's exit code for "an address it listens on is in use";
    imported only once a node has died (jepsen-lite otherwise loads only
    cachenode's client and protocol stubs)."""
    from cachenode.server.main import EXIT_ADDRESS_IN_USE

    return EXIT_ADDRESS_IN_USE


class PortTaken(HarnessError):
    """A node exited because it could not listen: a port that was free when
    :func:`free_ports` chose it was bound by another process before the node
    bound it (another ``bind(0)``, such as a second test worker's)."""


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` a moment ago."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    """One node: where it listens, its files, and its current process (if any)."""

    id: str
    host: str
    client_port: int
    raft_port: int
    data_dir: Path
    log_path: Path
    argv: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    starts: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        """True while our child process for this node has not exited."""
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """N cachenode processes forming one cluster, managed by PID.

    ``hosts`` maps node id -> listen IP (default 127.0.0.1 with free ports);
    ``wrap(node, argv)`` may prefix the command (network namespaces);
    ``unsafe`` are switch names from :data:`UNSAFE_SWITCHES`;
    ``extra_args`` are appended to every node's argv.
    Fault injection is always enabled (the nemesis needs it).
    """

    def __init__(
        self,
        root: Path,
        node_ids: Sequence[str],
        *,
        shards: int,
        unsafe: Sequence[str] = (),
        hosts: Mapping[str, str] | None = None,
        wrap: Callable[[str, list[str]], list[str]] | None = None,
        extra_args: Sequence[str] = (),
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        extra_record: Mapping[str, Any] | None = None,
        choose_ports: Callable[[str, int], list[int]] = free_ports,
    ) -> None:
        for u in unsafe:
            if u not in UNSAFE_SWITCHES:
                raise HarnessError(
                    f"unknown unsafe switch {u!r}; choose from {', '.join(UNSAFE_SWITCHES)}"
                )
        self.root = root
        self.shards = shards
        self.unsafe = list(unsafe)
        self.env = dict(os.environ if env is None else env)
        self._wrap = wrap
        self.secret_file = root / "secret"
        self.record_file = root / "nodes.json"
        self.extra_record: dict[str, Any] = dict(extra_record or {})
        self.nodes: dict[str, Node] = {}
        self._admins: dict[str, AdminClient] = {}
        self._closed = False
        if hosts is None:
            ports = choose_ports("127.0.0.1", 2 * len(node_ids))
            for i, nid in enumerate(node_ids):
                self.nodes[nid] = self._node(nid, "127.0.0.1", ports[2 * i], ports[2 * i + 1])
        else:
            for nid in node_ids:
                self.nodes[nid] = self._node(nid, hosts[nid], NETNS_CLIENT_PORT, NETNS_RAFT_PORT)
        initial = ",".join(f"{n.id}={n.address}/{n.raft_address}" for n in self.nodes.values())
        for n in self.nodes.values():
            n.argv = [
                python, "-m", NODE_MODULE, "serve",
                "--node-id", n.id,
                "--data-dir", str(n.data_dir),
                "--listen", n.address,
                "--raft-listen", n.raft_address,
                "--initial-cluster", initial,
                "--shards", str(shards),
                "--replication", str(min(3, len(node_ids))),
                "--secret-file", str(self.secret_file),
                "--enable-fault-injection",
                *(f"--unsafe-{u}" for u in self.unsafe),
                *extra_args,
            ]  # fmt: skip

    def _node(self, nid: str, host: str, cport: int, rport: int) -> Node:
        d = self.root / nid
        return Node(nid, host, cport, rport, d / "data", d / "node.log")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Write the secret (mode 0600) and start every node."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
        finally:
            os.close(fd)
        for n in self.nodes.values():
            self._spawn(n)

    def _spawn(self, n: Node) -> None:
        if n.running():
            raise HarnessError(f"{n.id} is already running (pid {n.pid})")
        n.data_dir.mkdir(parents=True, exist_ok=True)
        argv = self._wrap(n.id, n.argv) if self._wrap else list(n.argv)
        with open(n.log_path, "ab") as logf:
            logf.write(f"\n=== jepsen-lite: start #{n.starts + 1} of {n.id} ===\n".encode())
            logf.flush()
            try:
                n.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=self.env,
                    cwd=str(n.log_path.parent),
                    close_fds=True,
                )
            except OSError as e:
                raise HarnessError(f"could not start {n.id} ({argv[0]}): {e}") from None
        n.paused = False
        n.starts += 1
        self._write_record()

    def _write_record(self) -> None:
        """``ROOT/nodes.json``: every node's current PID, data dir and argv, so a
        supervisor can clean up even if this process is SIGKILLed."""
        doc = {
            "harness_pid": os.getpid(),
            "nodes": [
                {
                    "id": n.id,
                    "pid": n.pid,
                    "address": n.address,
                    "data_dir": str(n.data_dir),
                    "log": str(n.log_path),
                    "argv": n.argv,
                }
                for n in self.nodes.values()
            ],
            **self.extra_record,
        }
        tmp = self.record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, self.record_file)

    def _signal(self, n: Node, sig: int) -> bool:
        """Send ``sig`` to ``n``'s process if it is still our unreaped child."""
        if n.proc is None or n.proc.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(n.proc.pid, sig)
            return True
        return False

    def kill(self, ids: Iterable[str]) -> None:
        """SIGKILL (a crash: no shutdown code runs) and reap."""
        targets = [self.nodes[i] for i in ids]
        for n in targets:
            self._signal(n, signal.SIGKILL)
        for n in targets:
            if n.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    n.proc.wait(timeout=10)
            n.paused = False

    def pause(self, ids: Iterable[str]) -> None:
        """SIGSTOP: the process freezes with its sockets open."""
        for i in ids:
            n = self.nodes[i]
            if self._signal(n, signal.SIGSTOP):
                n.paused = True

    def resume(self, ids: Iterable[str]) -> None:
        """SIGCONT."""
        for i in ids:
            n = self.nodes[i]
            self._signal(n, signal.SIGCONT)
            n.paused = False

    def restart(self, ids: Iterable[str]) -> None:
        """Start again on the same data every listed node that is not running."""
        for i in ids:
            n = self.nodes[i]
            if not n.running():
                self._spawn(n)

    def down(self) -> list[str]:
        """Nodes whose process is not running (killed, or died on its own)."""
        return [n.id for n in self.nodes.values() if not n.running()]

    def stop(self, grace: float = 5.0) -> None:
        """Stop every node: SIGCONT (if paused), SIGTERM, SIGKILL after ``grace``."""
        live = [n for n in self.nodes.values() if n.running()]
        for n in live:
            if n.paused:
                self._signal(n, signal.SIGCONT)
                n.paused = False
            self._signal(n, signal.SIGTERM)
        end = time.monotonic() + grace
        for n in live:
            assert n.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                n.proc.wait(timeout=max(0.0, end - time.monotonic()))
        for n in live:
            assert n.proc is not None
            if n.proc.poll() is None:
                self._signal(n, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    n.proc.wait(timeout=10)

    def close(self) -> None:
        """Stop everything and close admin channels.  Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop(grace=5.0)
        except Exception as e:  # last resort: SIGKILL whatever is left
            log.warning("stopping nodes: %s", e)
            for n in self.nodes.values():
                self._signal(n, signal.SIGCONT)
                self._signal(n, signal.SIGKILL)
        for a in self._admins.values():
            with contextlib.suppress(Exception):
                a.close()
        self._admins.clear()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ admin API

    def admin(self, nid: str) -> AdminClient:
        a = self._admins.get(nid)
        if a is None:
            a = self._admins[nid] = AdminClient(self.nodes[nid].address)
        return a

    def statuses(self, ids: Iterable[str] | None = None, timeout: float = 1.0) -> dict[str, Any]:
        """GetNodeStatus of every listed (default: running, unpaused) node that answers."""
        out: dict[str, Any] = {}
        for nid in ids if ids is not None else self.nodes:
            n = self.nodes[nid]
            if not n.running() or n.paused:
                continue
            with contextlib.suppress(grpc.RpcError):
                out[nid] = self.admin(nid).node_status(timeout=timeout)
        return out

    def leaders(self, timeout: float = 1.0) -> dict[int, str]:
        """shard id -> node id of the leader with the highest term, as the nodes say."""
        best: dict[int, tuple[int, str]] = {}
        for nid, st in self.statuses(timeout=timeout).items():
            for r in st.replicas:
                if r.role == "leader" and (r.shard_id not in best or r.term > best[r.shard_id][0]):
                    best[r.shard_id] = (int(r.term), nid)
        return {s: nid for s, (_t, nid) in best.items()}

    def log_tail(self, nid: str, lines: int = 15) -> str:
        try:
            text = self.nodes[nid].log_path.read_text(errors="replace")
        except OSError as e:
            return f"(cannot read {self.nodes[nid].log_path}: {e})"
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def wait_ready(self, timeout: float, ids: Sequence[str] | None = None) -> float:
        """Wait until every listed node (default all) answers and every shard has a
        leader.  Returns the seconds waited; raises HarnessError on timeout or
        when a node process exits."""
        t0 = time.monotonic()
        want = list(ids if ids is not None else self.nodes)
        summary = "no node answered yet"
        while True:
            for nid in want:
                n = self.nodes[nid]
                if n.proc is not None and n.proc.poll() is not None:
                    code = n.proc.returncode
                    why = PortTaken if code == _exit_address_in_use() else HarnessError
                    one_line = self.log_tail(nid, 3).replace("\n", " | ")
                    raise why(f"node {nid} exited with code {code} (log {n.log_path}: {one_line})")
            st = self.statuses(want)
            led: set[int] = set()
            for s in st.values():
                led |= {r.shard_id for r in s.replicas if r.role == "leader"}
            shards = set(range(self.shards))
            hosted: set[int] = set()
            for s in st.values():
                hosted |= {r.shard_id for r in s.replicas}
            missing = sorted(shards - led)
            silent = [i for i in want if i not in st]
            if not silent and not missing and hosted >= shards:
                return time.monotonic() - t0
            summary = (
                f"{len(st)}/{len(want)} nodes answer"
                + (f" (silent: {', '.join(silent)})" if silent else "")
                + (f"; shards without a leader: {missing[:8]}" if missing else "")
            )
            if time.monotonic() - t0 > timeout:
                raise HarnessError(f"cluster not ready within {timeout:g} s: {summary}")
            time.sleep(0.25)

    def wait_answering(self, ids: Sequence[str], timeout: float) -> bool:
        """Wait until each listed node answers GetNodeStatus; False on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.statuses(ids)) == len(ids):
                return True
            time.sleep(0.2)
        return False

    def describe(self) -> list[dict[str, Any]]:
        """Per node: id, address, version, fsync mode and flags, for results.json."""
        st = self.statuses()
        out = []
        for n in self.nodes.values():
            s = st.get(n.id)
            flags = [
                a for a in n.argv if a.startswith("--unsafe") or a == "--enable-fault-injection"
            ]
            out.append(
                {
                    "id": n.id,
                    "address": n.address,
                    "raft_address": n.raft_address,
                    "version": s.version if s is not None else None,
                    "fsync": s.fsync if s is not None else None,
                    "flags": flags,
                    "starts": n.starts,
                    "log": str(n.log_path),
                }
            )
        return out


def start_cluster(
    root: Path,
    node_ids: Sequence[str],
    *,
    timeout: float,
    note: Callable[[str], None],
    made: Callable[[Cluster], None] = lambda cluster: None,
    attempts: int = START_ATTEMPTS,
    **kwargs: Any,
) -> tuple[Cluster, float]:
    """Make a :class:`Cluster` under ``root`` (``kwargs`` go to its constructor),
    start it and wait until it is ready; returns it and the seconds waited.

    ``made(cluster)`` runs as soon as each cluster object exists, before any
    of its nodes starts: the caller registers its cleanup there, so that an
    interrupt at any point stops every node.  On loopback ports (no
    ``hosts``) a node that lost its port (:class:`PortTaken`) makes it start
    again: every node is stopped, ``root`` is emptied (nothing was
    acknowledged yet) and new ports are chosen, for at most ``attempts``
    starts in all, with a one-line ``note`` before each new one.  Any other
    failure, or the last start's, stops every node and raises."""
    attempt = 1
    while True:
        cluster = Cluster(root, node_ids, **kwargs)
        made(cluster)
        try:
            cluster.start()
            return cluster, cluster.wait_ready(timeout)
        except PortTaken as e:
            cluster.close()
            if kwargs.get("hosts") is not None or attempt >= attempts:
                raise
            note(f"note: {e}; starting the cluster again on new ports")
            shutil.rmtree(root, ignore_errors=True)
            attempt += 1
        except BaseException:
            cluster.close()
            raise
