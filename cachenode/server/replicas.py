"""ReplicaManager: the shard replicas and the metadata replica of this node.

It keeps the set of hosted Raft groups equal to what the agreed cluster map
says (reconcile), bootstraps the map once, proposes commands with deadlines,
runs linearizable read barriers, keeps the per-shard *cluster clock*, and
runs active expiry on the shards this node leads.

Cluster clock (TTL time).  Every command carries ``now_ms`` stamped by the
proposing leader from :class:`~cachenode.server.cluster_clock.ClusterClock`:
a stamp from the log plus the monotonic time this node saw pass since, so
cluster time ignores wall-clock offsets between nodes and makes expiry late
(by an apply delay), never early; that module says how.  Across a restart
the last applied entry is as old as the outage, so every second each node
records, per shard, (cluster time, its own unskewed wall time) in
``cluster-clock.json``; after a restart, cluster time is at least the
recorded value plus the wall time that passed meanwhile (it assumes this
node's own wall clock did not step forward while the node was down), until
the replica follows live stamps again.

Which replicas this node hosts.  The agreed map says (its shards' replica
lists, and ``meta`` for the metadata group, which the placement driver moves
like a shard); this node learns it
from its metadata replica (metadata members) or from the placement driver's
heartbeat replies (every node), whichever is newer, and keeps the newest in
``cluster-map.json`` for restarts.  ``replicas.json`` records each hosted
replica with the map version that created it: a replica's data is deleted
only when a *newer* map no longer lists this node, so a node restarting with
a stale map never deletes a replica it was added to since.

Threads: public methods are safe from gRPC worker threads; ``_reconcile``,
``_expire`` and the apply wrappers run on the driver thread.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager
from typing import Any

import msgpack

from .._clock import Clock
from .._errors import CacheError, NotFound, NotLeader, OutcomeUnknown, Unavailable
from .._types import META_GROUP_ID, ClusterMap, NodeId, ShardDescriptor, group_label
from ..fsm import commands as C
from ..fsm.codec import decode_result, encode_command, restamp_command
from ..fsm.machine import ShardStateMachine
from ..fsm.meta_machine import (
    MetaStateMachine,
    StoredMap,
    barrier_command,
    bootstrap_command,
    current_map,
    current_pd,
)
from ..raft.group import RaftGroup
from ..raft.host import GroupHost
from ..storage.base import StateReader, Storage
from ..storage.wal import write_durably
from .cluster_clock import ClusterClock
from .config import NodeConfig

log = logging.getLogger(__name__)

_NEVER_MS = (1 << 63) - 1
"""A cluster time after every expiry: ``expired(_NEVER_MS, 1)`` finds any key with a TTL."""

IN_FLIGHT_MAX_S = 10.0
"""A periodic proposal (active expiry, clock tick) older than this no longer
blocks the next one.  pysyncobj itself never resolves a proposal whose entry
a snapshot install skipped (it jumps its applied index past it); since
session 30 the group fails those as outcome unknown once the install is in
(``GroupSyncObj.fail_skipped``).  The bound stays as the last guard: a
proposal that some other path leaves unresolved would otherwise block that
shard's expiry or ticks for good."""


def _in_flight(entry: tuple[Future[bytes], float] | None, now: float, max_age_s: float) -> bool:
    return entry is not None and not entry[0].done() and now - entry[1] < max_age_s


class ReplicaManager:
    def __init__(self, cfg: NodeConfig, host: GroupHost, storage: Storage, clock: Clock) -> None:
        self.cfg = cfg
        self.host = host
        self.storage = storage
        self.clock = clock
        self.fsm = ShardStateMachine(unsafe_dup_incr=cfg.unsafe.dup_incr)
        self.meta_fsm = MetaStateMachine()
        self._clock_file = os.path.join(cfg.data_dir, "cluster-clock.json")
        self.cluster_clock = ClusterClock(clock.monotonic)
        for gid, (floor_ms, floor_mono) in self._load_clock_floor().items():
            self.cluster_clock.set_floor(gid, floor_ms, floor_mono)
        self._map: ClusterMap | None = None
        self._stored_map = StoredMap()  # the metadata replica's map (driver thread)
        self._map_lock = threading.Lock()
        # gid -> (the proposal in flight, when proposed), driver thread:
        self._expiring: dict[int, tuple[Future[bytes], float]] = {}  # active expiry
        self._ticking: dict[int, tuple[Future[bytes], float]] = {}  # the clock tick
        self._bootstrap_inflight: Future[bytes] | None = None
        self.ready = threading.Event()
        self._map_file = os.path.join(cfg.data_dir, "cluster-map.json")
        self._adopted: ClusterMap | None = self._load_map_file()
        self._registry_file = os.path.join(cfg.data_dir, "replicas.json")
        self._registry: dict[int, dict[str, Any]] = self._load_registry()
        self.writes_applied = 0
        self.reads_served = 0
        # Schedulers the placement driver reports paused (PD agent thread
        # writes, the driver thread reads; one reference swap).
        self._paused_schedulers: frozenset[str] = frozenset()
        self.leader_balance_rounds = 0

    # ---- start-up (any thread) --------------------------------------------

    def start(self) -> None:
        def set_addresses() -> None:
            for n in self.cfg.initial_cluster:
                self.host.mux.set_address(n.id, n.raft_address)

        self.host.call(set_addresses)
        self._register_bootstrap_meta()
        self.host.call(self.recreate_registered).result(30)
        self.host.every(0.1, self._reconcile)
        self.host.every(self.cfg.expiry_interval_s, self._expire)
        self.host.every(1.0, self._save_clock)
        if self.cfg.clock_tick_s > 0:
            self.host.every(self.cfg.clock_tick_s / 4, self._tick_idle_clocks)
        if self.cfg.leader_balance_s > 0:
            self.host.every(self.cfg.leader_balance_s, self._prefer_leaders)

    # ---- the map ------------------------------------------------------------

    def adopt_map(self, m: ClusterMap) -> None:
        """A map from the placement driver (any thread).  Kept if newer;
        reconcile acts on it within 0.1 s."""
        with self._map_lock:
            if self._adopted is not None and self._adopted.version >= m.version:
                return
            # On disk before reconcile can act on it: a restart must never
            # know less than what this node already acted on.
            _write_json(self._map_file, m.to_dict())
            self._adopted = m

    def set_paused_schedulers(self, paused: frozenset[str]) -> None:
        """The paused schedulers, as the placement driver's last heartbeat
        reply named them (PD agent thread)."""
        if paused != self._paused_schedulers:
            log.info("placement driver: paused schedulers now %s", ", ".join(sorted(paused)) or "none")
        self._paused_schedulers = paused

    def leader_balancing(self) -> str:
        """``on``, ``paused`` (the PD's balance-leader is paused) or ``off``."""
        if self.cfg.leader_balance_s <= 0:
            return "off"
        return "paused" if "balance-leader" in self._paused_schedulers else "on"

    def _load_map_file(self) -> ClusterMap | None:
        try:
            with open(self._map_file) as f:
                return ClusterMap.from_dict(json.load(f))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _load_registry(self) -> dict[int, dict[str, Any]]:
        try:
            with open(self._registry_file) as f:
                return {int(k): v for k, v in json.load(f).items()}
        except (OSError, ValueError):
            return {}

    def _save_registry(self) -> None:
        _write_json(self._registry_file, {str(k): v for k, v in sorted(self._registry.items())})

    def cluster_map(self) -> ClusterMap:
        """The map this node acts on; right after a restart, until the first
        reconcile (which may wait behind journal loading on the driver
        thread), the map it last knew (``cluster-map.json``)."""
        m = self._map or self._adopted
        if m is None:
            raise Unavailable("the cluster map is not known yet (cluster still bootstrapping); retry in a moment")
        return m

    def shard_for_key(self, key: bytes) -> ShardDescriptor:
        return self.cluster_map().shard_for_key(key)

    def descriptor(self, shard_id: int) -> ShardDescriptor:
        s = self.cluster_map().shard(shard_id)
        if s is None:
            raise NotFound(f"unknown shard {shard_id}; run `cachectl status` to list shards")
        return s

    # ---- routing (any thread) -----------------------------------------------

    def local_group(self, shard_id: int) -> RaftGroup | None:
        return self.host.group(shard_id)

    def has_replica(self, shard_id: int) -> bool:
        """Whether this node holds a replica of ``shard_id`` (any thread)."""
        return self.host.group(shard_id) is not None

    def leader_hint(self, shard_id: int) -> tuple[NodeId | None, str | None]:
        g = self.host.group(shard_id)
        leader = g.status.leader if g is not None else None
        if leader is None:
            return None, None
        n = self._map.node(leader) if self._map else None
        return leader, n.address if n else None

    def leader_group(self, shard_id: int) -> RaftGroup:
        """The local replica if it leads ``shard_id``; else NotLeader with a hint."""
        g = self.host.group(shard_id)
        if g is not None and g.is_leader:
            return g
        leader, addr = self.leader_hint(shard_id)
        if g is None:
            self.descriptor(shard_id)
            raise NotLeader(f"node {self.cfg.node_id} holds no replica of shard {shard_id}", leader, addr)
        raise NotLeader(f"node {self.cfg.node_id} does not lead shard {shard_id}", leader, addr)

    # ---- proposing and reading (any thread) ---------------------------------

    def cluster_now(self, gid: int) -> int:
        """Cluster time of shard ``gid`` on this node (any thread): what a
        leader stamps into commands and judges TTLs with."""
        g = self.host.group(gid)
        st = g.status if g is not None else None
        term = st.term if st is not None and st.role == "leader" else None
        return self.cluster_clock.now(gid, term, self._initial_clock)

    def _initial_clock(self, gid: int) -> int:
        return self.storage.reader(gid).clock_ms() or self.clock.wall_ms()

    def _load_clock_floor(self) -> dict[int, tuple[int, float]]:
        """Per shard: (cluster time at start-up, monotonic time then)."""
        try:
            with open(self._clock_file) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return {}
        true_now, mono = self.clock.true_wall_ms(), self.clock.monotonic()
        out = {}
        for gid, (cluster_ms, true_wall) in saved.items():
            out[int(gid)] = (int(cluster_ms) + max(0, true_now - int(true_wall)), mono)
        return out

    def _save_clock(self) -> None:
        """Driver thread, every second: remember each hosted shard's cluster time."""
        true_now = self.clock.true_wall_ms()
        saved = {str(gid): [self.cluster_now(gid), true_now] for gid in self.host.groups() if gid != META_GROUP_ID}
        tmp = self._clock_file + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(saved, f)
            os.replace(tmp, self._clock_file)
        except OSError as e:
            log.warning("cannot record the cluster clock in %s: %s", self._clock_file, e)

    def start_proposal(self, group: RaftGroup, payload: bytes) -> Future[bytes]:
        """Propose on a leader replica; the future holds the encoded result."""
        if not group.status.has_quorum:
            raise Unavailable(f"shard {group.group_id} has lost its quorum (peers unreachable); the write was not applied")
        return group.propose(payload)

    def barrier_clock(self, group: RaftGroup, fut: Future[bytes], deadline: float) -> int:
        """Wait for a read barrier joined with ``group.read_barrier()``.

        After this returns, the local state holds every write acknowledged
        before the barrier was joined; the returned cluster time judges TTLs."""
        res = decode_result(wait_future(fut, deadline, writes=False))
        if isinstance(res, C.BarrierResult):
            self.reads_served += 1
            return res.clock_ms
        raise Unavailable(f"read barrier failed on shard {group.group_id}: {res}")

    def await_read_index(self, fut: Future[None], deadline: float) -> None:
        """Wait for a ReadIndex round joined with ``group.read_index()``.

        After this returns, the local committed state holds every write
        acknowledged before the round was joined (gRPC thread)."""
        wait_future(fut, deadline, writes=False)  # type: ignore[arg-type]
        self.reads_served += 1

    def reader(self, gid: int) -> StateReader:
        return self.storage.reader(gid)

    def view(self, gid: int) -> AbstractContextManager[StateReader]:
        """The replica's committed state as of one read transaction (Storage.view)."""
        return self.storage.view(gid)

    # ---- driver thread --------------------------------------------------------

    def _shard_apply(self, gid: int) -> Callable[[bytes, int], bytes]:
        fsm = self.fsm
        batch = self.host.batch
        applied = self.cluster_clock.applied
        entry_term = self._entry_term

        def apply(payload: bytes, index: int) -> bytes:
            w = batch().state(gid)
            res = fsm.apply(payload, index, w)
            applied(gid, w.clock_ms(), entry_term(gid, index))
            self.writes_applied += 1
            return res

        return apply

    def _shard_installed(self, gid: int) -> Callable[[int, int], None]:
        def installed(index: int, term: int) -> None:
            # A snapshot replaced the applies up to its last entry: its
            # clock is that entry's, as an apply of it would have left it.
            # The state may hold entries past it (dumped later, or this
            # replica's own newer state), whose term is not known here:
            # then no term, so no rule that trusts one applies.
            w = self.host.batch().state(gid)
            self.cluster_clock.applied(gid, w.clock_ms(), term if w.applied_index() == index else None)

        return installed

    def _entry_term(self, gid: int, index: int) -> int | None:
        """The Raft term of entry ``index`` of ``gid``'s log, being applied
        (driver thread); ``None`` when the log no longer holds it."""
        g = self.host.group(gid)
        return g.term_at(index) if g is not None else None

    def _meta_apply(self, payload: bytes, index: int) -> bytes:
        return self.meta_fsm.apply(payload, index, self.host.batch().state(META_GROUP_ID))

    def _reconcile(self) -> None:
        meta = self.host.group(META_GROUP_ID)
        m = self._stored_map.read(self.storage.reader(META_GROUP_ID)) if meta is not None else None
        if m is None and meta is not None and self._adopted is None:
            if meta.is_leader and (self._bootstrap_inflight is None or self._bootstrap_inflight.done()):
                boot = ClusterMap.bootstrap(self.cfg.initial_cluster, self.cfg.shards, self.cfg.replication)
                log.info("bootstrapping cluster map: %d nodes, %d shards, rf %d", len(boot.nodes), len(boot.shards), self.cfg.replication)
                self._bootstrap_inflight = meta.propose(bootstrap_command(boot))
            return
        adopted = self._adopted
        if m is None or (adopted is not None and adopted.version > m.version):
            m = adopted
        if m is None or (self._map is not None and m.version <= self._map.version):
            return
        for n in m.nodes:
            self.host.mux.set_address(n.id, n.raft_address)
        me = self.cfg.node_id
        changed = False
        for s in m.shards_on(me):
            if self.host.group(s.id) is None:
                known = self._registry.get(s.id)
                # New to this node in a shard that already existed: it is
                # being added by the placement driver, so hold elections.
                hold = (known["hold"] if known else s.epoch > 1) and self._map is not None
                if known is None or known.get("hold") != hold:
                    self._registry[s.id] = {"version": m.version, "members": list(s.replicas), "hold": hold}
                    changed = True
                self._create_group(s.id, list(s.replicas), hold)
        if m.meta and me in m.meta and meta is None:
            # The placement driver added this node to the metadata group.
            rec = self._registry.get(META_GROUP_ID)
            if rec is None or rec.get("removed"):
                self._registry[META_GROUP_ID] = {"version": m.version, "members": list(m.meta), "hold": True}
                changed = True
            log.info("metadata group: this node is a new member (map version %d)", m.version)
            self._create_group(META_GROUP_ID, list(m.meta), bool(self._registry[META_GROUP_ID].get("hold")))
        listed = {s.id for s in m.shards_on(me)}
        shard_replicas = len(listed)
        if me in m.meta or not m.meta:  # a map without members predates moving them
            listed.add(META_GROUP_ID)
        for gid in list(self.host.groups()):
            if gid in listed:
                continue
            created = self._registry.get(gid, {}).get("version", 0)
            if m.version > created:
                log.info("%s: this node is no longer a replica (map version %d): deleting its data", group_label(gid), m.version)
                self.host.remove_group(gid, delete_data=True)
                self.cluster_clock.forget(gid)
                self._ticking.pop(gid, None)
                self._expiring.pop(gid, None)
                if gid == META_GROUP_ID:
                    # A tombstone, not nothing: a first node (no --join) with
                    # no record would host a metadata replica again at start.
                    self._registry[gid] = {"version": m.version, "removed": True}
                else:
                    self._registry.pop(gid, None)
                changed = True
        if changed:
            self._save_registry()
        with self._map_lock:
            self._map = m
        log.info("cluster map version %d: hosting %d shard replicas%s", m.version, shard_replicas,
                 " and a metadata replica" if META_GROUP_ID in listed else "")
        self.ready.set()

    def _register_bootstrap_meta(self) -> None:
        """At start-up, before the driver recreates registered replicas: a
        node started without ``--join`` is one of the cluster's first nodes
        and hosts a metadata replica from the start, unless the last map it
        knows moved that replica elsewhere.  Recorded in ``replicas.json``
        like any replica (version 0: any map that no longer lists it deletes
        it, leaving a tombstone), so later starts follow the record, not the
        flags."""
        if META_GROUP_ID in self._registry or self.cfg.join:
            return
        known = self._adopted
        if known is not None and known.meta and self.cfg.node_id not in known.meta:
            return
        members = list(known.meta) if known is not None and known.meta else [n.id for n in self.cfg.initial_cluster]
        self._registry[META_GROUP_ID] = {"version": 0, "members": members, "hold": False}
        self._save_registry()

    def recreate_registered(self) -> None:
        """Driver thread, at start-up: bring back every replica this node
        hosted (the metadata replica too), even if the map it has is too old
        to list it."""
        for gid, rec in self._registry.items():
            if self.host.group(gid) is None and not rec.get("removed"):
                self._create_group(gid, list(rec["members"]), bool(rec.get("hold")))

    def _create_group(self, gid: int, members: list[NodeId], hold: bool) -> None:
        """Driver thread: host a replica of shard ``gid`` or of the metadata
        group.  ``hold``: it was added to a running group, so it stays out of
        elections until the leader reaches it."""
        def released() -> None:
            rec = self._registry.get(gid)
            if rec is not None and rec.get("hold"):
                rec["hold"] = False
                self._save_registry()
            log.info("%s: reached by the leader; this new replica now takes part in elections", group_label(gid))

        if gid == META_GROUP_ID:
            self.host.create_group(gid, members, self._meta_apply, barrier_command, hold, released)
        else:
            g = self.host.create_group(
                gid, members, self._shard_apply(gid), self._barrier_payload(gid), hold, released,
                self._shard_installed(gid), self._restamp(gid),
            )
            j = g.journal  # loaded: entries of newer terms than its last are a live leader's
            self.cluster_clock.set_floor_term(gid, int(j[len(j) - 1][2]) if len(j) else 0)

    def _prefer_leaders(self) -> None:
        """Hand leadership to each shard's preferred replica (the first in its
        descriptor) when that node is connected and fully caught up.

        Placement spreads first replicas evenly, so this spreads leaders
        evenly after bootstrap, restarts and failovers.  The group refuses a
        transfer to a target still catching up; we simply try again next
        period.

        Pausing the placement driver's ``balance-leader`` scheduler pauses
        this too (from the next heartbeat reply on): a user who paused leader
        balancing expects no leader to move unless an operator moves it.  A
        node that has not heard from the driver since it started balances."""
        self.leader_balance_rounds += 1
        m = self._map
        if m is None or "balance-leader" in self._paused_schedulers:
            return
        for s in m.shards:
            g = self.host.group(s.id)
            if g is None or not g.is_leader or not s.replicas:
                continue
            preferred = s.replicas[0]
            if preferred != self.cfg.node_id and self.host.mux.is_up(preferred):
                g.transfer_leadership(preferred, lambda err: None)

    def _restamp(self, gid: int) -> Callable[[bytes], bytes]:
        """A command another replica stamped, then forwarded to this one
        (the leader it held it for handed leadership over, or stepped down
        with it queued), gets this node's stamp: the stamp of an entry of
        this node's term must come from this node's chain, or applying it
        would move cluster time to the forwarder's chain, which can be
        ahead, and a TTL this node stamped before would end early.  Driver
        thread."""
        return lambda payload: restamp_command(payload, self.cluster_now(gid))

    def _barrier_payload(self, gid: int) -> Callable[[], bytes]:
        return lambda: encode_command(C.Barrier(now_ms=self.cluster_now(gid)))

    def _tick_idle_clocks(self) -> None:
        """Driver thread, every quarter of ``clock_tick_s``: propose a
        stamped Barrier into each shard this node leads that applied nothing
        for ``clock_tick_s``.  A replica that applies a shard's last entries
        late (it was paused, cut off or slow, or is new) takes their stamps
        as of then when another leader wrote them, so without fresh stamps
        in the log its clock could be late by however long the shard was
        idle, and, elected, it would serve values past their TTL (session
        29: 4 s late after a 4 s pause).  This bounds that to about
        1.25 ``clock_tick_s`` plus a commit, while a leader with a quorum
        ticks the shard.  Under writes no tick is proposed, nor into a
        shard that holds no key with a TTL: there a late clock judges only
        TTLs stamped from it later, which then run their full length."""
        tick = self.cfg.clock_tick_s
        idle_s = self.cluster_clock.idle_s
        now = self.clock.monotonic()
        for gid, g in self.host.groups().items():
            # leads_now too: a step-down earlier in this iteration is not in
            # the status yet, and a tick stamped from the old term's chain
            # would be appended by the new leader as its own.
            if gid == META_GROUP_ID or not g.is_leader or not g.leads_now or not g.status.has_quorum:
                continue
            if _in_flight(self._ticking.get(gid), now, max(IN_FLIGHT_MAX_S, 4 * tick)):
                continue
            idle = idle_s(gid)
            if idle is not None and idle < tick:
                continue
            if not self.storage.reader(gid).expired(_NEVER_MS, 1):
                continue  # no key with a TTL
            self._ticking[gid] = (g.propose(self._barrier_payload(gid)()), now)

    def _expire(self) -> None:
        """Active expiry: each shard leader proposes deletions of expired keys."""
        mono = self.clock.monotonic()
        for gid, g in self.host.groups().items():
            if gid == META_GROUP_ID or not g.is_leader:
                continue
            if _in_flight(self._expiring.get(gid), mono, IN_FLIGHT_MAX_S):
                continue
            now = self.cluster_now(gid)
            keys = self.storage.reader(gid).expired(now, self.cfg.expiry_batch)
            if keys:
                self._expiring[gid] = (g.propose(encode_command(C.Expire(keys=tuple(keys), now_ms=now))), mono)


class MetaGroupStore:
    """The metadata Raft group as the placement driver sees it
    (:class:`cachenode.pd.driver.MetaStore`).  Any thread."""

    def __init__(self, replicas: ReplicaManager) -> None:
        self.r = replicas

    def _group(self) -> RaftGroup | None:
        return self.r.host.group(META_GROUP_ID)

    def is_leader(self) -> bool:
        g = self._group()
        return g is not None and g.is_leader

    def leader_hint(self) -> tuple[NodeId | None, str | None]:
        g = self._group()
        leader = g.status.leader if g is not None else None
        m = self.r._map
        n = m.node(leader) if (m is not None and leader) else None
        return leader, n.address if n else None

    def read(self) -> tuple[ClusterMap | None, dict[str, Any]]:
        reader = self.r.storage.reader(META_GROUP_ID)
        return current_map(reader), current_pd(reader)

    def propose(self, payload: bytes, timeout: float) -> dict[str, Any]:
        g = self._group()
        if g is None or not g.is_leader:
            raise NotLeader("this node no longer leads the metadata group", None)
        raw = wait_future(g.propose(payload), time.monotonic() + timeout, writes=True)
        out: dict[str, Any] = msgpack.unpackb(raw, raw=False)
        return out

    def barrier(self, timeout: float) -> None:
        self.propose(barrier_command(), timeout)


def _write_json(path: str, obj: object) -> None:
    """Atomically and durably replace ``path`` (storage.wal.write_durably)."""
    write_durably(path, json.dumps(obj))


def wait_future(fut: Future[bytes], deadline: float, writes: bool) -> bytes:
    remaining = deadline - time.monotonic()
    try:
        return fut.result(timeout=max(0.0, remaining))
    except FutureTimeout:
        if writes:
            raise OutcomeUnknown(
                "the deadline passed before the write's outcome was known: it may or may not "
                "have been applied; retry with the same request id to apply it exactly once"
            ) from None
        raise Unavailable("no quorum confirmed this read before the deadline; retry") from None
    except CacheError:
        raise
