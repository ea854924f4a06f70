"""``cachenode serve``: run one node in the foreground.

Exit codes: 0 clean stop (SIGTERM/SIGINT), 2 bad configuration, 3 could not
start (data dir locked, cannot listen), 4 could not start because an address
it listens on is in use (choose another port), 70 stopped to protect data
(disk fault).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import json
import logging
import os
import signal
import sys
import threading
import tomllib
from collections.abc import Sequence

from .._types import NodeInfo
from ..raft.group import RaftTiming
from ..storage.base import MAX_KEY_BYTES
from ..storage.lmdb_store import BOOT_ID_PATH
from .config import NodeConfig, Unsafe
from .disk_space import DiskReserve, parse_reserve

log = logging.getLogger("cachenode")

EXIT_ADDRESS_IN_USE = 4
"""The node did not start: an address it listens on is in use.  Harnesses
that choose free ports start again on new ones on this code alone."""

CPU_POLICIES = ("batch", "inherit")
"""``--cpu-policy`` values: see :func:`set_cpu_policy`."""


class ConfigError(Exception):
    pass


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k in ("node",):
            if hasattr(record, k):
                d[k] = getattr(record, k)
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def parse_cluster(spec: str) -> tuple[NodeInfo, ...]:
    """``n1=HOST:CPORT/HOST:RPORT,n2=...`` -> NodeInfo tuple."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nid, addrs = part.split("=", 1)
            client, raft = addrs.split("/", 1)
            for a in (client, raft):
                host, port = a.rsplit(":", 1)
                if not host or not 0 < int(port) < 65536:
                    raise ValueError
        except ValueError:
            raise ConfigError(f"bad --initial-cluster entry {part!r}; expected ID=HOST:CLIENTPORT/HOST:RAFTPORT") from None
        out.append(NodeInfo(nid.strip(), client.strip(), raft.strip()))
    if not out:
        raise ConfigError("--initial-cluster is empty")
    if len({n.id for n in out}) != len(out):
        raise ConfigError("--initial-cluster names a node id twice")
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachenode", description="cachenode: a linearizable, durable, sharded cache node")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run a node in the foreground")
    s.add_argument("--config", help="TOML file with any of the options below (flags win)")
    s.add_argument("--node-id", help="this node's id (must appear in --initial-cluster, unless --join)")
    s.add_argument("--data-dir", help="directory for the LMDB store and snapshots")
    s.add_argument("--listen", help="client gRPC address HOST:PORT (default: from --initial-cluster)")
    s.add_argument("--raft-listen", help="Raft peer address HOST:PORT (default: from --initial-cluster)")
    s.add_argument("--initial-cluster", help="ID=HOST:CLIENTPORT/HOST:RAFTPORT,... (same on every node)")
    s.add_argument("--join", metavar="HOST:PORT", help="join the cluster that answers at this client address (any member) instead of bootstrapping; needs --listen and --raft-listen")
    s.add_argument("--max-down-time", help="re-create the replicas of a node silent this long elsewhere (e.g. 30m, 90s; default 30m)")
    s.add_argument("--down-after", help="a node silent this long counts as down (default 3s)")
    s.add_argument("--heartbeat-interval", help="heartbeats to the placement driver (default 0.5s)")
    s.add_argument("--leader-wait", help="how long a call this node passes on waits for its shard to have a leader "
                   "(an election under way), within the call's deadline (default 3s; 0: answer UNAVAILABLE at once)")
    s.add_argument("--shards", type=int, help="number of shards at bootstrap (default 16)")
    s.add_argument("--replication", type=int, help="replicas per shard (default 3, or N when N < 3)")
    s.add_argument("--secret-file", help="file holding the cluster secret (or env CACHENODE_SECRET)")
    s.add_argument("--fsync", choices=["always", "never"], help="always (default): fsync before acknowledging; never: benchmarks only, acknowledged writes can be lost on power loss")
    s.add_argument("--lmdb-writemap", choices=["on", "off"],
                   help="on (default): LMDB changes pages in place through its memory map (faster; the data file "
                   "is sparse and its apparent size is the map size, 64 GiB); off: for filesystems without sparse files")
    s.add_argument("--disk-reserve",
                   help="disk space to keep free, as a share of the data directory's filesystem (e.g. 5%%) or a "
                        "size (e.g. 2GiB): below it, the shards with a replica here refuse writes that add data with "
                        "RESOURCE_EXHAUSTED (disk_full) instead of filling the disk; deletes and reads go on "
                        "(default 5%%; 0: off)")
    s.add_argument("--pre-vote", choices=["on", "off"],
                   help="on (default): a replica stands for election only once a majority of its shard's replicas "
                   "say they hear no leader either (Raft's PreVote), so one that alone cannot hear its leader (a "
                   "one-way link, a slow catch-up) cannot depose it; off: plain pysyncobj elections")
    s.add_argument("--cpu-policy", choices=CPU_POLICIES,
                   help="batch (default): a node started under the default policy (SCHED_OTHER) runs every thread "
                   "under Linux's SCHED_BATCH, so a thread the node wakes does not preempt the one that woke it; a policy "
                   "the node was started with (chrt, systemd's CPUSchedulingPolicy=) is kept. inherit: keep the policy "
                   "the node was started with, whatever it is")
    s.add_argument("--boot-id-file", help="where to read the machine's boot id (default /proc/sys/kernel/random/boot_id); "
                   "after an unclean stop in another boot the state is rebuilt from snapshots and the journal")
    s.add_argument("--max-key-bytes", type=int)
    s.add_argument("--max-value-bytes", type=int)
    s.add_argument("--log-compaction-entries", type=int, help="snapshot a shard after this many log entries (default 20000)")
    s.add_argument("--log-compaction-mb", type=float,
                   help="also snapshot a shard once its log holds this many MiB, or its state's size if larger (default 16)")
    s.add_argument("--tick-ms", type=float, help="every group is ticked at least this often: heartbeats, election timers (default 25)")
    s.add_argument("--grpc-workers", type=int, help="client gRPC worker threads (default 64); half of them at most serve BatchStream streams")
    s.add_argument("--clock-tick", help="a shard leader stamps an entry into a shard that holds a key with a TTL and "
                   "applied nothing for this long, so a replica catching up on an idle shard is at most about 1.25 "
                   "times this late on TTLs (default 1s; 0 = off, else at least 0.1s)")
    s.add_argument("--leader-balance-s", type=float, help="move leadership to each shard's preferred replica every N s (default 2; 0 = off)")
    s.add_argument("--log-format", choices=["text", "json"], default=None)
    s.add_argument("--log-level", default=None)
    s.add_argument("--enable-fault-injection", action="store_true", default=None, help="TESTING: allow admin clock offsets and Raft fault filters")
    for name, why in (
        ("local-reads", "serve linearizable reads locally without a read barrier"),
        ("dup-incr", "apply a retried incr twice"),
        ("local-ttl", "judge TTL by the local wall clock"),
        ("skip-fsync", "never fsync"),
    ):
        s.add_argument(f"--unsafe-{name}", action="store_true", default=None, help=f"TESTING ONLY, breaks guarantees: {why}")
    return p


def parse_duration(flag: str, v: object, zero: bool = False, least: tuple[float, str] | None = None) -> float:
    """``90``, ``90s``, ``1.5m``, ``2h`` -> seconds (> 0, or >= 0 with ``zero``);
    ``least`` = (seconds, why): a value other than 0 below it is refused, saying why."""
    text = str(v).strip().lower()
    mult = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(text[-1:], None)
    try:
        secs = float(text[:-1]) * mult if mult else float(text)
    except ValueError:
        raise ConfigError(f"{flag}: {v!r} is not a duration (e.g. 30s, 10m, 1h)") from None
    if not (secs >= 0 if zero else secs > 0):
        raise ConfigError(f"{flag} must be {'>=' if zero else '>'} 0")
    if least is not None and 0 < secs < least[0]:
        raise ConfigError(f"{flag} must be {'0 (off) or ' if zero else ''}at least {least[0]:g}s: {least[1]}")
    return secs


def load_config(args: argparse.Namespace, env: dict[str, str]) -> tuple[NodeConfig, bool, str, str]:
    file_cfg: dict[str, object] = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                file_cfg = {k.replace("-", "_"): v for k, v in tomllib.load(f).items()}
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {args.config}: {e}") from None

    def opt(name: str, default: object = None) -> object:
        v = getattr(args, name, None)
        if v is not None:
            return v
        return file_cfg.get(name, default)

    node_id = opt("node_id")
    if not node_id:
        raise ConfigError("--node-id is required")
    join = opt("join")
    cluster_spec = opt("initial_cluster")
    if join:
        if cluster_spec:
            raise ConfigError("--join and --initial-cluster exclude each other: a node either bootstraps a cluster or joins one")
        if not opt("listen") or not opt("raft_listen"):
            raise ConfigError("--join needs --listen HOST:PORT and --raft-listen HOST:PORT (the addresses peers and clients use)")
        me = NodeInfo(str(node_id), str(opt("listen")), str(opt("raft_listen")))
        cluster: tuple[NodeInfo, ...] = (me,)
    else:
        if not cluster_spec:
            raise ConfigError("--initial-cluster is required (or --join HOST:PORT to join a running cluster)")
        cluster = parse_cluster(str(cluster_spec))
        found = next((n for n in cluster if n.id == node_id), None)
        if found is None:
            raise ConfigError(f"node id {node_id!r} is not in --initial-cluster ({', '.join(n.id for n in cluster)})")
        me = found
    data_dir = opt("data_dir")
    if not data_dir:
        raise ConfigError("--data-dir is required")
    secret: bytes | None = None
    secret_file = opt("secret_file")
    if secret_file:
        try:
            with open(str(secret_file), "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --secret-file {secret_file}: {e.strerror}") from None
    elif env.get("CACHENODE_SECRET"):
        secret = env["CACHENODE_SECRET"].encode()
    if not secret:
        raise ConfigError("no cluster secret: pass --secret-file FILE or set CACHENODE_SECRET (the same on every node)")
    unsafe = Unsafe(
        local_reads=bool(opt("unsafe_local_reads", False)),
        dup_incr=bool(opt("unsafe_dup_incr", False)),
        local_ttl=bool(opt("unsafe_local_ttl", False)),
        skip_fsync=bool(opt("unsafe_skip_fsync", False)),
    )
    fsync = str(opt("fsync", "always"))
    if fsync not in ("always", "never"):
        raise ConfigError("--fsync must be always or never")
    cpu_policy = str(opt("cpu_policy", "batch"))
    if cpu_policy not in CPU_POLICIES:
        raise ConfigError("--cpu-policy must be batch or inherit")
    writemap = str(opt("lmdb_writemap", "on"))
    if writemap not in ("on", "off"):
        raise ConfigError("--lmdb-writemap must be on or off")
    reserve_spec = opt("disk_reserve", str(DiskReserve()))
    if not isinstance(reserve_spec, str) and reserve_spec != 0:  # a TOML number: a share or bytes?
        raise ConfigError(f"--disk-reserve: write {reserve_spec!r} as a string, \"{reserve_spec}%\" or "
                          f"\"{reserve_spec}MiB\" (a bare number is bytes)")
    try:
        disk_reserve = parse_reserve(str(reserve_spec))
    except ValueError as e:
        raise ConfigError(f"--disk-reserve: {e}") from None
    shards = int(opt("shards", 16))  # type: ignore[call-overload]
    if not 1 <= shards <= 4096:
        raise ConfigError("--shards must be 1..4096")
    rep = int(opt("replication", 3))  # type: ignore[call-overload]
    if rep < 1:
        raise ConfigError("--replication must be >= 1")
    max_key = int(opt("max_key_bytes", 1024))  # type: ignore[call-overload]
    if not 1 <= max_key <= MAX_KEY_BYTES:
        raise ConfigError(f"--max-key-bytes must be 1..{MAX_KEY_BYTES} (the storage limit)")
    max_value = int(opt("max_value_bytes", 1 << 20))  # type: ignore[call-overload]
    if not 1 <= max_value <= 64 << 20:
        raise ConfigError("--max-value-bytes must be 1..67108864 (64 MiB)")
    if float(opt("log_compaction_mb", 16.0)) <= 0:  # type: ignore[arg-type]
        raise ConfigError("--log-compaction-mb must be positive")
    workers = int(opt("grpc_workers", 64))  # type: ignore[call-overload]
    if not 2 <= workers <= 1024:
        raise ConfigError("--grpc-workers must be 2..1024")
    pre_vote = str(opt("pre_vote", "on"))
    if pre_vote not in ("on", "off"):
        raise ConfigError("--pre-vote must be on or off")
    timing = RaftTiming(
        pre_vote=pre_vote == "on",
        log_compaction_entries=int(opt("log_compaction_entries", 20000)),  # type: ignore[call-overload]
        log_compaction_bytes=int(float(opt("log_compaction_mb", 16.0)) * 1024 * 1024),  # type: ignore[arg-type]
    )
    cfg = NodeConfig(
        node_id=str(node_id), data_dir=str(data_dir),
        listen=str(opt("listen") or me.address), raft_listen=str(opt("raft_listen") or me.raft_address),
        initial_cluster=cluster, secret=secret, shards=shards, replication=rep,
        fsync=fsync == "always",
        lmdb_writemap=writemap == "on",
        disk_reserve=disk_reserve,
        cpu_policy=cpu_policy,
        max_key_bytes=max_key,
        max_value_bytes=max_value,
        tick_interval_s=float(opt("tick_ms", 25.0)) / 1000.0,  # type: ignore[arg-type]
        grpc_workers=workers,
        timing=timing, unsafe=unsafe,
        leader_balance_s=float(opt("leader_balance_s", 2.0)),  # type: ignore[arg-type]
        join=str(join) if join else None,
        max_down_time_s=parse_duration("--max-down-time", opt("max_down_time", "30m")),
        down_after_s=parse_duration("--down-after", opt("down_after", "3s")),
        heartbeat_s=parse_duration("--heartbeat-interval", opt("heartbeat_interval", "0.5s")),
        leader_wait_s=parse_duration("--leader-wait", opt("leader_wait", "3s"), zero=True),
        clock_tick_s=parse_duration("--clock-tick", opt("clock_tick", "1s"), zero=True,
                                    least=(0.1, "each tick is a journal write on every replica of every shard holding a TTL")),
        boot_id_file=str(opt("boot_id_file", BOOT_ID_PATH)),
    )
    if cfg.down_after_s <= cfg.heartbeat_s:
        raise ConfigError("--down-after must be longer than --heartbeat-interval")
    return cfg, bool(opt("enable_fault_injection", False)), str(opt("log_format", "text")), str(opt("log_level", "INFO"))


def setup_logging(fmt: str, level: str, node_id: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {node_id} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pysyncobj").setLevel(logging.WARNING)


GC_THRESHOLDS = (50_000, 20, 10)
"""The cyclic collector's generation thresholds in a node process (Python's
defaults: 700, 10, 10).  A node allocates a few container objects per
request and frees nearly all of them by reference count; with the defaults
the collector ran every few hundred requests and scanned the young objects
each time.  Measured (A/B on fresh 3-node clusters, the bench's load
generator, 4 rounds each): 100-key msets +3-4 % msets/s and -3 % node CPU
per mset, single-key sets unchanged, the nodes' heap after 40 s of mixed
load unchanged (141 MiB either way).  The oldest generation keeps Python's
10: a larger value would leave cyclic garbage that reached it uncollected
for hours."""


def set_cpu_policy(policy: str, tasks_dir: str = "/proc/self/task") -> tuple[bool, str]:
    """Apply ``--cpu-policy`` (:data:`CPU_POLICIES`) to every thread of this
    process; threads started afterwards inherit it.  Called once by
    :func:`main` on the main thread, before the node starts its threads
    (the process then has that one thread; a thread another thread starts
    while this runs is caught by listing the threads again).  Returns
    ``(True, what the process runs under)``, or ``(False, why the policy
    could not be set)``; either way the node goes on.

    ``batch`` is Linux's SCHED_BATCH: the same fair share of the CPU as
    SCHED_OTHER (and the same nice value), but a woken thread never
    preempts the running one; it runs when that one blocks or its time
    slice ends (checked at the scheduler's tick, every few milliseconds).
    A write passes through about ten hand-offs between a node's threads
    (gRPC's pollers, the stream's worker, the Raft driver), and under
    SCHED_OTHER each wake-up could preempt the thread that made it, in the
    middle of its work.  Measured on 3-node clusters of 16 shards with the
    bench's load generator on 2 cores: involuntary context switches per
    write 3.0 -> 1.3 in `set` (one client: 6.6 -> 1.5; `mset100`: 10.1 ->
    4.5 per mset); in A/B experiments of 6-12 pairs `set` +3.5 to +9.5 %
    (four experiments), linearizable gets +5 to +14 % (three), `mset100`
    +9.5 to +16 % in three of five (-1 % and -12.5 % in the others) and one
    client's p50 write 2-10 % lower in three of four (7 % higher in the
    fourth; see docs/benchmarks-history.md, Session 20).  The gain comes from CPUs
    shared by more runnable threads than they can run; the cost is on a
    machine whose CPUs the node shares with other busy programs: a node
    thread that wakes never preempts theirs, while theirs still preempt
    the node's.

    Only a process running under SCHED_OTHER (every program's default) is
    switched: any other policy an operator started the node with (``chrt``,
    systemd's ``CPUSchedulingPolicy=``) is theirs to keep.  ``inherit``
    changes nothing (the way to keep SCHED_OTHER)."""
    if policy == "inherit":
        return True, "it keeps the scheduling policy it was started with (--cpu-policy inherit)"
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None or not hasattr(os, "sched_setscheduler"):
        return False, "this platform has no SCHED_BATCH (Linux only)"
    flags = getattr(os, "SCHED_RESET_ON_FORK", 0)  # a flag sched_getscheduler may OR into the policy
    try:
        started = os.sched_getscheduler(0) & ~flags
        if started != batch and started != os.SCHED_OTHER:
            names = {getattr(os, n): n for n in ("SCHED_FIFO", "SCHED_RR", "SCHED_IDLE", "SCHED_DEADLINE") if hasattr(os, n)}
            return True, f"it keeps {names.get(started, f'scheduling policy {started}')}, which it was started under"
        done: set[int] = set()
        while True:
            try:
                tids = {int(t) for t in os.listdir(tasks_dir)} - done
            except OSError:
                tids = {0} - done  # no /proc: the calling thread, the only one at start
            if not tids:
                break
            for tid in tids:
                with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                    os.sched_setscheduler(tid, batch, os.sched_param(0))
            done |= tids
        if os.sched_getscheduler(0) & ~flags != batch:
            # e.g. a /proc of another PID namespace: its thread ids are not ours
            os.sched_setscheduler(0, batch, os.sched_param(0))
            return False, f"only the main thread could be switched ({tasks_dir} lists other threads than this process's)"
    except OSError as e:
        return False, f"sched_setscheduler: {e.strerror}; some threads may run under SCHED_OTHER"
    return True, "every thread runs under SCHED_BATCH (--cpu-policy batch)"


def tune_gc() -> None:
    """Called once by :func:`main` on the main thread, after the node started:
    everything built so far (modules, the node's long-lived objects) moves
    to the collector's permanent generation, which it never scans again,
    and the thresholds become :data:`GC_THRESHOLDS`."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> int:
    env = dict(os.environ) if env is None else env
    args = build_parser().parse_args(argv)
    try:
        cfg, faults, fmt, level = load_config(args, env)
    except ConfigError as e:
        print(f"cachenode: error: {e}", file=sys.stderr)
        return 2
    setup_logging(fmt, level, cfg.node_id)
    # A fatal signal (SIGBUS: LMDB writing through its map onto a full disk;
    # SIGSEGV) leaves every thread's stack in the log instead of nothing.
    faulthandler.enable()
    applied, what = set_cpu_policy(cfg.cpu_policy)
    if applied:
        log.info("CPU scheduling: %s", what)
    else:
        log.warning("--cpu-policy %s not applied: %s", cfg.cpu_policy, what)
    for name in cfg.unsafe.enabled():
        log.warning("!!! UNSAFE MODE --unsafe-%s IS ON: this node breaks cachenode's guarantees on purpose. TESTING ONLY !!!", name.replace("_", "-"))
    if not cfg.fsync:
        log.warning("--fsync=never: acknowledged writes can be lost on power loss (benchmarks only)")
    from .app import AddressInUse, Node, NodeStartError  # deferred: keeps --help fast

    try:
        node = Node(cfg, fault_injection=faults)
    except NodeStartError as e:
        print(f"cachenode: error: {e}", file=sys.stderr)
        return EXIT_ADDRESS_IN_USE if isinstance(e, AddressInUse) else 3
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    tune_gc()
    while not stop.wait(0.5):
        pass
    log.info("stopping")
    node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
