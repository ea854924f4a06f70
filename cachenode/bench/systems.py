"""The systems compared with cachenode, run as local processes, and /proc readings.

* :class:`EtcdCluster` -- N etcd members on free loopback ports, data on disk,
  etcd's defaults otherwise (fsync on every commit).
* :class:`RedisServer` -- one redis-server, ``appendonly yes`` with the
  chosen ``appendfsync`` (``always`` or ``everysec``), no RDB snapshots.
* :func:`cpu_seconds`, :func:`peak_rss_bytes`, :func:`reset_peak_rss` -- what
  the benchmark measures of every server process, by pid.
* :func:`ensure_installed` -- installs the Debian packages (and redis-py)
  when missing, only when asked to.

Lifecycle contract: ``start()`` returns only when every process answers, or
raises :class:`BenchError` after stopping what it started.  ``stop()`` signals
only the pids this object started (SIGTERM, then SIGKILL after ``grace``),
is idempotent, and must be called in a ``finally``.  Not thread-safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._compiled import status as native_status

__all__ = [
    "BenchError",
    "code_facts",
    "EtcdCluster",
    "ManagedProcess",
    "PortTaken",
    "RedisServer",
    "cpu_seconds",
    "cpu_total",
    "dead_processes",
    "ensure_installed",
    "no_service_starts",
    "free_ports",
    "fs_type",
    "machine_facts",
    "peak_rss_bytes",
    "reset_peak_rss",
    "tool_version",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
LOG_TAIL_LINES = 20


class BenchError(Exception):
    """A benchmark step failed; the message is one line that says what to do next."""


class PortTaken(BenchError):
    """A server exited because a port :func:`free_ports` chose was bound by
    another process before the server bound it (another ``bind(0)``)."""


START_ATTEMPTS = 3
"""How many sets of fresh ports ``start()`` tries when a server lost its port."""


# ---- /proc ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (all threads); None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_total(pids: Mapping[str, int]) -> float | None:
    """CPU seconds of all ``pids`` together; None when any of them is gone."""
    total = 0.0
    for pid in pids.values():
        cpu = cpu_seconds(pid)
        if cpu is None:
            return None
        total += cpu
    return total


def dead_processes(pids: Mapping[str, int]) -> list[str]:
    """Names of the ``pids`` that are gone or zombies."""
    dead = []
    for name, pid in pids.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            dead.append(name)
            continue
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            dead.append(name)
    return dead


def peak_rss_bytes(pid: int) -> int | None:
    """``VmHWM`` of ``pid``: its peak resident set since start or the last reset."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def anon_rss_bytes(pid: int) -> int | None:
    """``RssAnon`` of ``pid``: its resident heap (and other anonymous)
    memory, without the file pages it maps (LMDB's data), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (``5`` > clear_refs; needs Linux >= 4.0 and rights)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def fs_type(path: Path) -> str:
    """The file system type holding ``path`` (``ext4``, ``tmpfs`` ...), from /proc/mounts."""
    target = str(path.resolve())
    best, best_type = "", "unknown"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best_type
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, best_type = mount, parts[2]
    return best_type


# ---- processes -----------------------------------------------------------------


@dataclasses.dataclass
class ManagedProcess:
    """A server process this benchmark started; stopped only through its own pid."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    log_start: int = 0  # where this process's output begins in ``log`` (appended to across starts)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines this process wrote (not an earlier start's)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_start)
                text = f.read().decode(errors="replace")
        except OSError as err:
            return f"(cannot read {self.log}: {err})"
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def spawn(
    name: str, argv: Sequence[str], log: Path, cwd: Path, env: Mapping[str, str] | None = None
) -> ManagedProcess:
    """Start ``argv`` in its own session (Ctrl-C goes to us, not to it), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        start = out.tell()
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(cwd),
                env=dict(env) if env is not None else None,
                close_fds=True,
            )
        except OSError as err:
            raise BenchError(f"could not start {name} ({argv[0]}): {err}") from None
    return ManagedProcess(name, popen, log, start)


def stop_processes(procs: Iterable[ManagedProcess], grace: float = 10.0) -> None:
    """SIGTERM each live process by pid, SIGKILL what is left after ``grace``; reap all."""
    live = [p for p in procs if p.alive()]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(p.alive() for p in live):
        time.sleep(0.05)
    for p in live:
        if p.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    for p in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=5.0)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
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


def _wait_until(
    procs: Sequence[ManagedProcess], ready: Callable[[], bool], deadline_s: float, what: str
) -> None:
    end = time.monotonic() + deadline_s
    while True:
        for p in procs:
            if not p.alive():
                why = PortTaken if "address already in use" in p.log_tail().lower() else BenchError
                raise why(
                    f"{p.name} exited with code {p.popen.returncode} while starting; "
                    f"its log is {p.log} (last line: {p.log_tail(1).strip() or 'empty'})"
                )
        # Ready, and still ours: another server may answer on a port ours lost.
        if ready() and all(p.alive() for p in procs):
            return
        if time.monotonic() >= end:
            raise BenchError(
                f"{what} did not answer within {deadline_s:g}s; see the logs in {procs[0].log.parent}"
            )
        time.sleep(0.1)


def _start_with_retries(start_once: Callable[[], None], reset: Callable[[], None]) -> None:
    """``start_once()`` (which stops what it started when it fails); when a
    server lost its port, ``reset()`` and start again on new ports, at most
    :data:`START_ATTEMPTS` times."""
    attempt = 1
    while True:
        try:
            start_once()
            return
        except PortTaken:
            if attempt >= START_ATTEMPTS:
                raise
            reset()
            attempt += 1


# ---- etcd ------------------------------------------------------------------------


class EtcdCluster:
    """A local etcd cluster of ``members`` members under ``base`` (lifecycle in the module docstring)."""

    def __init__(
        self,
        base: Path,
        members: int = 3,
        binary: str = "etcd",
        choose_ports: Callable[[int], list[int]] = free_ports,
    ) -> None:
        self.base = base
        self.members = members
        self.binary = binary
        self.choose_ports = choose_ports
        self.procs: list[ManagedProcess] = []
        self.client_urls: list[str] = []
        self.pb2_dir = base / "stubs"

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(u.removeprefix("http://") for u in self.client_urls)

    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self.procs}

    def start(self, deadline_s: float = 60.0) -> None:
        _start_with_retries(lambda: self._start_once(deadline_s), self._reset)

    def _reset(self) -> None:
        """Forget a failed start: its processes (stopped) and its members' data."""
        self.procs.clear()
        for i in range(self.members):
            shutil.rmtree(self.base / f"m{i + 1}", ignore_errors=True)

    def _start_once(self, deadline_s: float) -> None:
        from cachenode.bench.targets import load_etcd_pb2

        self.base.mkdir(parents=True, exist_ok=True)
        ports = self.choose_ports(2 * self.members)
        names = [f"m{i + 1}" for i in range(self.members)]
        peer_urls = [f"http://127.0.0.1:{ports[2 * i + 1]}" for i in range(self.members)]
        self.client_urls = [f"http://127.0.0.1:{ports[2 * i]}" for i in range(self.members)]
        initial = ",".join(f"{n}={u}" for n, u in zip(names, peer_urls, strict=True))
        token = f"cachenode-bench-{secrets.token_hex(4)}"
        try:
            for i, name in enumerate(names):
                argv = [
                    self.binary,
                    "--name", name,
                    "--data-dir", str(self.base / name),
                    "--listen-client-urls", self.client_urls[i],
                    "--advertise-client-urls", self.client_urls[i],
                    "--listen-peer-urls", peer_urls[i],
                    "--initial-advertise-peer-urls", peer_urls[i],
                    "--initial-cluster", initial,
                    "--initial-cluster-token", token,
                    "--initial-cluster-state", "new",
                    # 1 MiB values fill the default 2 GiB quota within minutes (MVCC keeps history).
                    "--quota-backend-bytes", str(8 * 1024**3),
                    "--logger", "zap",
                    "--log-outputs", "stderr",
                ]  # fmt: skip
                self.procs.append(spawn(f"etcd {name}", argv, self.base / f"{name}.log", self.base))
            pb2 = load_etcd_pb2(self.pb2_dir)
            _wait_until(self.procs, lambda: self._all_answer(pb2), deadline_s, "the etcd cluster")
        except BaseException:
            self.stop()
            raise

    def _all_answer(self, pb2: Any) -> bool:
        import grpc

        for endpoint in self.endpoints:
            with grpc.insecure_channel(endpoint) as ch:
                call = ch.unary_unary(
                    "/etcdserverpb.KV/Put",
                    request_serializer=pb2.PutRequest.SerializeToString,
                    response_deserializer=pb2.PutResponse.FromString,
                )
                try:
                    call(pb2.PutRequest(key=b"bench:ready", value=b"1"), timeout=2.0)
                except grpc.RpcError:
                    return False
        return True

    def stop(self, grace: float = 10.0) -> None:
        stop_processes(self.procs, grace)


# ---- Redis -----------------------------------------------------------------------


class RedisServer:
    """One redis-server with an append-only file fsynced per ``appendfsync``."""

    def __init__(
        self,
        base: Path,
        appendfsync: str,
        binary: str = "redis-server",
        choose_ports: Callable[[int], list[int]] = free_ports,
    ) -> None:
        if appendfsync not in ("always", "everysec"):
            raise ValueError(f"appendfsync must be always or everysec, not {appendfsync!r}")
        self.base = base
        self.appendfsync = appendfsync
        self.binary = binary
        self.choose_ports = choose_ports
        self.port = 0
        self.procs: list[ManagedProcess] = []

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self.procs}

    def start(self, deadline_s: float = 30.0) -> None:
        _start_with_retries(lambda: self._start_once(deadline_s), self.procs.clear)

    def _start_once(self, deadline_s: float) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        (self.port,) = self.choose_ports(1)
        conf = self.base / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    "daemonize no",
                    f'dir "{self.base}"',
                    "appendonly yes",
                    f"appendfsync {self.appendfsync}",
                    'save ""',
                    'logfile ""',
                    "",
                ]
            )
        )
        try:
            self.procs.append(
                spawn(
                    f"redis-{self.appendfsync}",
                    [self.binary, str(conf)],
                    self.base / "redis.log",
                    self.base,
                )
            )
            _wait_until(self.procs, self._answers, deadline_s, f"redis-server ({self.appendfsync})")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, grace: float = 10.0) -> None:
        stop_processes(self.procs, grace)


# ---- installation and facts -------------------------------------------------------


POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


@contextlib.contextmanager
def no_service_starts(policy: Path = POLICY_RC_D) -> Iterator[None]:
    """While a package installs, Debian's policy hook says no to starting
    services (unless the machine has its own policy): the benchmark starts
    its own servers on free ports, and nothing may be left listening on a
    default port."""
    created = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        created = True
    try:
        yield
    finally:
        if created:
            policy.unlink(missing_ok=True)


def ensure_installed(systems: Iterable[str], note: Callable[[str], None]) -> None:
    """Install what ``--vs`` needs and lacks: Debian ``etcd-server``/``redis-server``, PyPI ``redis``.

    Debian packages are installed only as root with apt-get; otherwise raises
    :class:`BenchError` naming the command to run.
    """
    wanted = set(systems)
    debs = []
    if "etcd" in wanted and shutil.which("etcd") is None:
        debs.append("etcd-server")
    if "redis" in wanted and shutil.which("redis-server") is None:
        debs.append("redis-server")
    if debs:
        command = f"apt-get install -y {' '.join(debs)}"
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise BenchError(
                f"--vs needs {', '.join(debs)}; install it with `sudo {command}` and rerun"
            )
        note(f"installing {', '.join(debs)} from Debian (needed by --vs)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *debs]):
            with no_service_starts():
                done = subprocess.run(
                    argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
                )
            if done.returncode != 0:
                last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise BenchError(
                    f"`{' '.join(argv)}` failed ({last[0]}); run `{command}` by hand and rerun"
                )
    if "redis" in wanted and importlib.util.find_spec("redis") is None:
        note("installing the Python package redis into this environment (needed by --vs redis)")
        argv = [sys.executable, "-m", "pip", "install", "--quiet", "redis>=5"]
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise BenchError(
                f"could not install redis-py; run `{sys.executable} -m pip install redis` and rerun"
            )
        importlib.invalidate_caches()


def tool_version(argv: Sequence[str]) -> str | None:
    """First line of ``argv``'s output (``etcd --version`` ...), or None when it cannot run."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


_CODE_PATHS = ("cachenode", "cli", "pyproject.toml")
"""What runs in a benchmark; local changes elsewhere (tests, docs) do not count."""


def code_facts() -> dict[str, Any]:
    """The git commit of the cachenode checkout being measured, and its local changes to the code.

    Read-only git commands; ``{"commit": None}`` outside a checkout.
    """
    import cachenode

    root = Path(cachenode.__file__).resolve().parent.parent
    commit = tool_version(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"])
    if commit is None or " " in commit:
        return {"commit": None}
    try:
        status = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                *_CODE_PATHS,
            ],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        status = ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    diff_sha = None
    if changed:
        import hashlib

        try:
            diff = subprocess.run(
                ["git", "-C", str(root), "diff", "HEAD", "--binary", "--", *_CODE_PATHS],
                capture_output=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            ).stdout
            diff_sha = hashlib.sha256(diff).hexdigest()[:12]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {
        "commit": commit,
        "dirty": bool(changed),
        "diff_sha": diff_sha,
        "changed_files": changed,
    }


def machine_facts(data_dir: Path) -> dict[str, Any]:
    """Cores, memory, kernel, versions and the data directory's file system."""
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_bytes": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            name: _dist_version(name)
            for name in ("cachenode", "grpcio", "protobuf", "pysyncobj", "lmdb", "redis", "uvloop")
        },
        "data_dir": str(data_dir),
        "data_fs": fs_type(data_dir),
        "native": native_status(),
    }
