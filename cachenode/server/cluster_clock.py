"""ClusterClock: the per-shard cluster time (TTL time) of one node.

Every command carries ``now_ms``, stamped by the proposing leader from this
clock, and the state machine keeps the largest stamp it applied.  Cluster
time is never a node's wall clock: it is a stamp from the log plus the
*monotonic* time this node saw pass since, so wall-clock offsets between
nodes do not matter.  Three sources, per shard:

- **applied**: the state's clock after the last entry this node applied,
  plus the time since it applied it.  It is never ahead of the clock of the
  leader that stamped the entry (the entry was applied after it was
  stamped), so judging a TTL with it is late by the apply delay, never early.
- **leading**: the chain this node stamps with while it leads the shard,
  one per term it led.  It starts at the term's first use from the other
  two sources and then runs at real-time rate, whatever the node applies;
  and an entry of a term this node led was stamped from that term's chain,
  so applying it, even terms later, continues that chain instead of going
  back to the stamp.  Without this a leader's clock went back to its own
  last stamp at every apply, by that entry's commit latency.  Under
  continuous writes cluster time nearly stood still (4 writers back to
  back: it ran at 37 % of real time, and a 5 s TTL had 2 s left after 8 s),
  and a leader that after a partition committed the entries it had stamped
  before it went back by the outage (jepsen-lite: a TTL 12 s late).
  Applying another leader's entry drops every chain of a newer term: such a
  chain started before this node had that entry, from an older chain of its
  own or the floor, which can be ahead of that leader's stamps (the leader
  in between started from this node's stamps minus its own apply delay),
  and judging that leader's TTLs with it would make them early.
- **floor**: after a restart, the cluster time this node recorded before
  (``cluster-clock.json``) plus the wall time that passed; without it the
  last applied entry is as old as the outage.  It is this node's *own*
  older chain, so it can run ahead of the chain of a leader elected while
  this node was down, by however late that leader applied its
  predecessor's last stamps (jepsen-lite, ttl x kill: 1.2 s, and TTLs that
  leader wrote expired that much early on this node).  So the floor holds
  only until this node applies an entry of a term newer than any it knew
  before it stopped (a leader elected since: follow its stamps), or until
  its applied clock comes within :data:`FLOOR_MARGIN_MS` of the floor (a
  leading chain started from it before is dropped by the rule above).
  Dropping it makes this node's clock late, never early.

Threads: :meth:`now` from any thread (gRPC workers stamp and judge with
it; the driver stamps expiry and barriers); :meth:`applied`,
:meth:`set_floor` and :meth:`forget` from the driver thread.  State is one
tuple per shard and source, replaced whole (a reference swap), so readers
never see half an update; two threads that start a term's leading chain at
once both start it from the same sources.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ClusterClock", "FLOOR_MARGIN_MS", "UNKNOWN_TERM"]

UNKNOWN_TERM = 1 << 62
"""A floor's term before the replica's log is loaded: no entry is newer."""

FLOOR_MARGIN_MS = 500
"""The floor is dropped once the applied clock is within this of it."""


class ClusterClock:
    __slots__ = ("_mono", "_applied", "_leading", "_floor", "floor_margin_ms")

    KEEP_TERMS = 4
    """Leading chains kept per shard (the newest terms this node led)."""

    def __init__(self, monotonic: Callable[[], float], floor_margin_ms: int = FLOOR_MARGIN_MS) -> None:
        """``monotonic``: seconds, never going backwards (``Clock.monotonic``)."""
        self._mono = monotonic
        self._applied: dict[int, tuple[int, float]] = {}  # gid -> (cluster ms, mono s)
        self._leading: dict[int, dict[int, tuple[int, float]]] = {}  # gid -> term -> (cluster ms, mono s)
        self._floor: dict[int, tuple[int, float, int]] = {}  # gid -> (cluster ms, mono s, term)
        self.floor_margin_ms = floor_margin_ms

    def now(self, gid: int, leader_term: int | None, initial: Callable[[], int]) -> int:
        """Cluster time of shard ``gid`` on this node, in ms.

        ``leader_term``: the Raft term this node leads the shard in, or
        ``None`` when it does not lead it.  ``initial()`` gives the cluster
        time to start from when nothing was applied since the start (the
        stored state's clock, or the wall clock for a new shard)."""
        mono = self._mono()
        base = self._applied.get(gid)
        if base is None:
            base = self._applied[gid] = (initial(), mono)
        t = base[0] + int((mono - base[1]) * 1000)
        floor = self._floor.get(gid)
        if floor is not None:
            t = max(t, floor[0] + int((mono - floor[1]) * 1000))
        if leader_term is not None:
            chains = self._leading.get(gid)
            if chains is None:
                chains = self._leading[gid] = {}
            chain = chains.get(leader_term)
            if chain is None:
                chains[leader_term] = (t, mono)
                terms = list(chains)  # one C-level copy: the driver may delete meanwhile
                if len(terms) > self.KEEP_TERMS:
                    chains.pop(min(terms), None)
            else:
                t = max(t, chain[0] + int((mono - chain[1]) * 1000))
        return t

    def applied(self, gid: int, clock_ms: int, entry_term: int | None) -> None:
        """The state of ``gid`` now has clock ``clock_ms``, after applying an
        entry of Raft term ``entry_term`` (``None``: not known)."""
        mono = self._mono()
        chains = self._leading.get(gid)
        chain = chains.get(entry_term) if chains is not None and entry_term is not None else None
        if chain is not None:
            # This node led that term, so it stamped the entry from that
            # term's chain: the chain is as good as the stamp, and better.
            clock_ms = max(clock_ms, chain[0] + int((mono - chain[1]) * 1000))
        elif chains and entry_term is not None:
            # Another leader's entry.  A chain of a newer term started before
            # this node applied it, maybe from an older chain of its own or
            # the floor, so it may be ahead of that leader's stamps: drop it.
            for term in list(chains):
                if term > entry_term:
                    chains.pop(term, None)
        self._applied[gid] = (clock_ms, mono)
        floor = self._floor.get(gid)
        if floor is None:
            return
        if entry_term is not None and entry_term > floor[2]:
            del self._floor[gid]  # a stamp of a term newer than the record: follow it
        elif clock_ms >= floor[0] + int((mono - floor[1]) * 1000) - self.floor_margin_ms:
            del self._floor[gid]

    def set_floor(self, gid: int, cluster_ms: int, mono: float, term: int = UNKNOWN_TERM) -> None:
        """After a restart: cluster time was at least ``cluster_ms`` at
        ``mono``.  ``term``: the newest Raft term this replica knew before it
        stopped (its persisted current term), once its log is loaded; until
        then no entry's term drops the floor."""
        self._floor[gid] = (cluster_ms, mono, term)

    def set_floor_term(self, gid: int, term: int) -> None:
        """The replica's log is loaded: ``term`` as in :meth:`set_floor`."""
        floor = self._floor.get(gid)
        if floor is not None:
            self._floor[gid] = (floor[0], floor[1], term)

    def has_floor(self, gid: int) -> bool:
        return gid in self._floor

    def forget(self, gid: int) -> None:
        """The replica of ``gid`` is gone from this node."""
        self._applied.pop(gid, None)
        self._leading.pop(gid, None)
        self._floor.pop(gid, None)
