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
  While the entries applied come from one term (one leader), it does not
  go back to a later entry's stamp: what it derived from that leader's
  earlier stamps is below that leader's chain too.  Without this a
  survivor of a majority outage, elected once the others were back,
  applied the dead leader's last entries after its election and went back
  by the outage (jepsen-lite, ttl x mixed, seed 29: a 2 s TTL served 9.7 s
  after its write).  An entry of another term is taken as it is.
- **leading**: the chain this node stamps with while it leads the shard,
  one per term it led.  It starts once the leader has applied an entry of
  its own term (so every earlier leader's entry first), from the other two
  sources, and then runs at real-time rate, whatever the node applies;
  and an entry of a term this node led was stamped from that term's chain,
  so applying it, even terms later, continues that chain instead of going
  back to the stamp.  Without this a leader's clock went back to its own
  last stamp at every apply, by that entry's commit latency.  Under
  continuous writes cluster time nearly stood still (4 writers back to
  back: it ran at 37 % of real time, and a 5 s TTL had 2 s left after 8 s),
  and a leader that after a partition committed the entries it had stamped
  before it went back by the outage (jepsen-lite: a TTL 12 s late).
  A chain never starts earlier: before its term's first entry is applied,
  a chain could start from an older chain of this node's own or from the
  floor, either of which can be ahead of the leader in between (it started
  from this node's stamps minus its own apply delay), and judging that
  leader's TTLs with it would make them early.
- **floor**: after a restart, the cluster time this node recorded before
  (``cluster-clock.json``) plus the wall time that passed; without it the
  last applied entry is as old as the outage.  It is this node's *own*
  older chain, so it can run ahead of the chain of a leader elected while
  this node was down, by however late that leader applied its
  predecessor's last stamps (jepsen-lite, ttl x kill: 1.2 s, and TTLs that
  leader wrote expired that much early on this node).  So the floor holds
  only until this node applies an entry of a term newer than the last entry
  of its log when it stopped (a leader elected since: follow its stamps),
  or until its applied clock comes within :data:`FLOOR_MARGIN_MS` of the
  floor.  Dropping it makes this node's clock late, never early.

Catching up late: a replica that applies entries of a term it did not
follow long after they were stamped (it was paused, cut off or slow, or is
new) takes their stamps as of the apply, so it is late by how long they
waited, and on an idle shard that is how long the shard was idle; elected,
it judged TTLs that late (session 29: a 7 s TTL served 11.07 s after its
write, after a 4 s pause).  Two things bound it.  A shard leader proposes a
stamped Barrier into every shard it leads that applied nothing for
``--clock-tick`` (1 s) while the shard holds a key with a TTL
(``ReplicaManager._tick_idle_clocks``), so while a leader with a quorum
ticks the shard, the newest stamp in its log is at most about 1.25 ticks
plus a commit old (the same test: 7.73-7.94 s).  And a snapshot
install counts as the apply of the snapshot's last entry (``RaftGroup``'s
``on_installed``), so a replica caught up by a snapshot, or a new one
whose first clock was its own wall clock (it had nothing applied and no
stored clock), takes the snapshot's clock at once.  The snapshot's state
may hold a few entries past that last entry, whose term is not known
here: then the install passes no term, so no rule that trusts one applies.

Forwarded commands: a leader that hands leadership over forwards to its
successor what it held during the transfer (and pysyncobj forwards what a
replica had queued when it stepped down); the successor appends them in
its own term.  Kept as the old leader stamped them, they would count as the
new leader's own stamps, and the old chain can be ahead of the new one (by
an apply delay after a planned transfer, up to about a clock tick after a
failover to a successor that was behind): a TTL the new leader stamped
before them would then end early by that much.  So the new leader stamps
each forwarded command again from its own clock, before it is appended,
and moves the expiries the command sets by the same amount
(``ReplicaManager._restamp``, through ``RaftGroup``'s ``restamp`` hook).

Threads: :meth:`now` from any thread (gRPC workers stamp and judge with
it; the driver stamps expiry and barriers); :meth:`applied`,
:meth:`set_floor` and :meth:`forget` from the driver thread.  State is one
tuple per shard and source, replaced whole (a reference swap), so readers
never see half an update; :meth:`applied` records the entry's term last,
so a thread that sees its term also sees the floor that entry dropped; two
threads that start a term's leading chain at once both start it from the
same sources.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ClusterClock", "FLOOR_MARGIN_MS", "UNKNOWN_TERM"]

UNKNOWN_TERM = 1 << 62
"""A floor's term before the replica's log is loaded: no entry is newer."""

FLOOR_MARGIN_MS = 500
"""The floor is dropped once the applied clock is within this of it."""


class ClusterClock:
    __slots__ = ("_mono", "_applied", "_applied_term", "_leading", "_floor", "floor_margin_ms")

    KEEP_TERMS = 4
    """Leading chains kept per shard (the newest terms this node led)."""

    def __init__(self, monotonic: Callable[[], float], floor_margin_ms: int = FLOOR_MARGIN_MS) -> None:
        """``monotonic``: seconds, never going backwards (``Clock.monotonic``)."""
        self._mono = monotonic
        self._applied: dict[int, tuple[int, float]] = {}  # gid -> (cluster ms, mono s)
        self._applied_term: dict[int, int] = {}  # gid -> term of the last entry applied
        self._leading: dict[int, dict[int, tuple[int, float]]] = {}  # gid -> term -> (cluster ms, mono s)
        self._floor: dict[int, tuple[int, float, int]] = {}  # gid -> (cluster ms, mono s, term)
        self.floor_margin_ms = floor_margin_ms

    def now(self, gid: int, leader_term: int | None, initial: Callable[[int], int]) -> int:
        """Cluster time of shard ``gid`` on this node, in ms.

        ``leader_term``: the Raft term this node leads the shard in, or
        ``None`` when it does not lead it.  ``initial(gid)`` gives the cluster
        time to start from when nothing was applied since the start (the
        stored state's clock, or the wall clock for a new shard)."""
        mono = self._mono()
        base = self._applied.get(gid)
        if base is None:
            base = self._applied[gid] = (initial(gid), mono)
        t = base[0] + int((mono - base[1]) * 1000)
        floor = self._floor.get(gid)
        if floor is not None:
            t = max(t, floor[0] + int((mono - floor[1]) * 1000))
        if leader_term is not None and self._applied_term.get(gid) == leader_term:
            # Only once an entry of its own term is applied: every entry of
            # earlier leaders is applied then (and has dropped the floor if
            # one of them was elected since this node's record), so the
            # chain cannot start ahead of their stamps.  Until then a new
            # leader stamps from what it applied, one commit latency.
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
        elif entry_term is not None and entry_term == self._applied_term.get(gid):
            # The same leader stamped the last entry applied: what this node
            # derived from that leader's earlier stamps is still below its
            # chain, however late this entry comes (a new leader applying
            # its predecessor's last entries after its election).
            base = self._applied.get(gid)
            if base is not None:
                clock_ms = max(clock_ms, base[0] + int((mono - base[1]) * 1000))
        self._applied[gid] = (clock_ms, mono)
        floor = self._floor.get(gid)
        if floor is not None:
            if entry_term is not None and entry_term > floor[2]:
                del self._floor[gid]  # a stamp of a term newer than the record: follow it
            elif clock_ms >= floor[0] + int((mono - floor[1]) * 1000) - self.floor_margin_ms:
                del self._floor[gid]
        if entry_term is not None:
            self._applied_term[gid] = entry_term  # last: now() reads it first

    def idle_s(self, gid: int) -> float | None:
        """Seconds since this node last applied an entry of ``gid`` (or,
        before its first apply since the start, first read its clock);
        ``None`` before either."""
        base = self._applied.get(gid)
        return None if base is None else self._mono() - base[1]

    def set_floor(self, gid: int, cluster_ms: int, mono: float, term: int = UNKNOWN_TERM) -> None:
        """After a restart: cluster time was at least ``cluster_ms`` at
        ``mono``.  ``term``: the Raft term of the last entry in this replica's
        log when it stopped, once the log is loaded; until then no entry's
        term drops the floor."""
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
        self._applied_term.pop(gid, None)
        self._leading.pop(gid, None)
        self._floor.pop(gid, None)
