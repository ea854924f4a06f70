"""Node configuration: one frozen value built from flags and/or a TOML file."""

from __future__ import annotations

import dataclasses

from .._types import NodeInfo
from ..raft.group import RaftTiming
from ..storage.lmdb_store import BOOT_ID_PATH
from .disk_space import DiskReserve


@dataclasses.dataclass(frozen=True, slots=True)
class Unsafe:
    """TESTING ONLY switches that break a guarantee on purpose, so that
    jepsen-lite can prove it notices.  Each logs a loud warning at start."""

    local_reads: bool = False  # linearizable reads served locally, no barrier, no forwarding
    dup_incr: bool = False  # a retried incr with a known request id is applied again
    local_ttl: bool = False  # reads judge TTL by the local wall clock instead of cluster time
    skip_fsync: bool = False  # acknowledge before the journal is durable (commit once a second): a crash loses acked writes

    def enabled(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]


@dataclasses.dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str
    data_dir: str
    listen: str
    raft_listen: str
    initial_cluster: tuple[NodeInfo, ...]
    secret: bytes
    shards: int = 16
    replication: int = 3
    fsync: bool = True
    max_key_bytes: int = 1024
    max_value_bytes: int = 1024 * 1024
    max_batch_keys: int = 10_000
    default_deadline_s: float = 5.0
    leader_wait_s: float = 3.0
    """How long a call this node passes on waits for its shard to have a
    leader (CacheService._forwarded): one election after a leader died
    (timeout 0.8-1.6 s, then a pre-vote and a vote round), with room to
    spare; 0: answer at once (``--leader-wait``)."""
    grpc_workers: int = 64
    expiry_interval_s: float = 1.0
    expiry_batch: int = 256
    clock_tick_s: float = 1.0
    """A shard leader proposes a stamped Barrier into each shard it leads
    that holds a key with a TTL and applied nothing for this long
    (``--clock-tick``; 0: never; else at least 0.1 s): a
    replica that catches up on a shard's last entries late takes their
    stamps as of then, so this bounds how late its cluster clock can be
    (see :mod:`cachenode.server.cluster_clock`)."""
    tick_interval_s: float = 0.025  # idle groups ticked this often (heartbeats every 50 ms): 0.1 cores less on an idle 3-node cluster than 10 ms
    leader_balance_s: float = 2.0  # 0 disables preferred-leader balancing
    join: str | None = None  # HOST:PORT of any member: join that cluster instead of bootstrapping one
    heartbeat_s: float = 0.5  # to the placement driver
    max_down_time_s: float = 1800.0  # a node silent this long has its replicas re-created elsewhere
    down_after_s: float = 3.0  # a node silent this long is down (receives nothing new)
    timing: RaftTiming = RaftTiming()
    unsafe: Unsafe = Unsafe()
    map_size: int = 64 << 30
    disk_reserve: DiskReserve = DiskReserve()
    """Disk kept free: below it, the shards with a replica here refuse writes
    that add data (``--disk-reserve``; see :mod:`cachenode.server.disk_space`)."""
    lmdb_writemap: bool = True  # LMDB writes pages through its map (faster; the data file is sparse, map_size apparent)
    cpu_policy: str = "batch"
    """``batch``: every thread of a node process started under SCHED_OTHER
    runs under SCHED_BATCH; ``inherit``: the process keeps the policy it was
    started with.  Applied by ``cachenode serve`` at start (see
    main.set_cpu_policy), not by Node."""
    boot_id_file: str = BOOT_ID_PATH
    """Where the machine's boot id is read: the state is trusted after an
    unclean stop only within one boot (see LmdbStorage).  Tests point it at a
    file of their own to play a machine restart."""

    def me(self) -> NodeInfo:
        """This node's addresses (a joining node lists only itself in
        ``initial_cluster``)."""
        for n in self.initial_cluster:
            if n.id == self.node_id:
                return n
        raise ValueError(f"node {self.node_id} is not in --initial-cluster")
