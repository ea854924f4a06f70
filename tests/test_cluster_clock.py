"""ClusterClock: cluster time per shard, with a fake monotonic clock.

The properties that matter for TTLs: a leader's clock runs at real-time
rate whatever it applies (else TTLs are late under load and after an
outage), and no source can put a node ahead of the live leader's stamps
(else TTLs are early)."""

from __future__ import annotations

from cachenode.server.cluster_clock import ClusterClock


class FakeMono:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance_ms(self, ms: float) -> None:
        self.t += ms / 1000


def _start() -> tuple[ClusterClock, FakeMono]:
    mono = FakeMono()
    return ClusterClock(mono), mono


def near(ms: int, expected: int) -> bool:
    """Equal up to the 1 ms that truncating float seconds may take."""
    return expected - 1 <= ms <= expected


def test_a_leader_applying_its_own_stamps_keeps_real_time() -> None:
    """The bug it fixes: each apply set the clock back to the entry's stamp,
    by the entry's commit latency, so under back-to-back writes cluster time
    nearly stood still."""
    clock, mono = _start()
    clock.applied(0, 50_000, 1)  # the term's first entry
    start = clock.now(0, 1, lambda _: 0)
    for _ in range(1000):  # a write every 2 ms, committed 1.5 ms after its stamp
        stamp = clock.now(0, 1, lambda _: 0)
        mono.advance_ms(1.5)
        clock.applied(0, stamp, 1)
        mono.advance_ms(0.5)
    assert near(clock.now(0, 1, lambda _: 0) - start, 2000)


def test_a_leader_committing_its_own_older_entries_does_not_go_back() -> None:
    """Found by jepsen-lite (ttl x partition): a leader stamped entries, lost
    its majority before they committed, and after the 12 s partition led
    the next term; committing and applying its own old entries took its
    clock back by the outage (a TTL 12 s late)."""
    clock, mono = _start()
    clock.applied(3, 30_000, 6)  # leads term 6
    stamp = clock.now(3, 6, lambda _: 0)  # and stamps a write
    assert near(stamp, 30_000)
    mono.advance_ms(12_000)  # partition: the write is not committed, no leader
    clock.applied(3, stamp, 6)  # leads term 7: the term-6 entry commits first
    assert near(clock.now(3, 7, lambda _: 0), 42_000)
    clock.applied(3, 42_000, 7)
    mono.advance_ms(10)
    assert near(clock.now(3, 7, lambda _: 0), 42_010)


def test_late_entries_another_leader_stamped_make_the_clock_late_not_early() -> None:
    """This node cannot tell how long ago another node stamped an entry, so
    it takes the stamp as of the moment it applies it."""
    clock, mono = _start()
    clock.applied(3, 30_000, 6)
    assert near(clock.now(3, 6, lambda _: 0), 30_000)
    mono.advance_ms(12_000)
    clock.applied(3, 30_010, 7)  # term 7 was led elsewhere
    assert near(clock.now(3, None, lambda _: 0), 30_010)
    assert near(clock.now(3, 8, lambda _: 0), 30_010)


def test_a_follower_follows_the_last_applied_stamp() -> None:
    clock, mono = _start()
    clock.applied(0, 10_000, 1)
    mono.advance_ms(40)
    assert near(clock.now(0, None, lambda _: 0), 10_040)
    clock.applied(0, 10_100, 1)  # a newer stamp, applied at once
    assert near(clock.now(0, None, lambda _: 0), 10_100)
    mono.advance_ms(5)
    assert near(clock.now(0, None, lambda _: 0), 10_105)


def test_a_new_term_does_not_continue_an_older_leading_chain() -> None:
    """Between this node's terms another leader stamped from this node's
    stamps minus its apply delay; continuing the old chain would judge
    that leader's writes early by that delay."""
    clock, mono = _start()
    clock.applied(0, 10_000, 1)
    assert near(clock.now(0, 1, lambda _: 0), 10_000)  # leads term 1
    mono.advance_ms(1000)
    assert near(clock.now(0, 1, lambda _: 0), 11_000)
    # term 2 led elsewhere; this node applies that leader's stamps, 80 ms behind its own chain
    clock.applied(0, 10_920, 2)
    mono.advance_ms(100)
    assert near(clock.now(0, None, lambda _: 0), 11_020)
    # term 3: this node leads again and starts from what it applied
    assert near(clock.now(0, 3, lambda _: 0), 11_020)


def test_a_chain_starts_only_after_an_entry_of_its_term_is_applied() -> None:
    """This node led term 1, then leads term 3 before applying what the
    term-2 leader committed: a chain started then would start from its own
    term-1 chain, 80 ms ahead of the term-2 leader's stamps."""
    clock, mono = _start()
    clock.applied(0, 10_000, 1)
    assert near(clock.now(0, 1, lambda _: 0), 10_000)
    mono.advance_ms(1000)
    assert near(clock.now(0, 3, lambda _: 0), 11_000)  # what it applied, projected
    clock.applied(0, 10_920, 2)  # the term-2 leader's last stamp
    assert near(clock.now(0, 3, lambda _: 0), 10_920)  # late, not early
    mono.advance_ms(50)
    clock.applied(0, 10_920, 3)  # its own first term-3 entry
    mono.advance_ms(30)
    assert near(clock.now(0, 3, lambda _: 0), 10_950)
    clock.applied(0, 10_950, 3)
    mono.advance_ms(30)
    assert near(clock.now(0, 3, lambda _: 0), 10_980)  # the chain: real time from here


def test_a_stamp_ahead_of_the_leading_chain_moves_it_forward() -> None:
    """A command stamped by the previous leader and handed over in a
    leadership transfer is appended in the new leader's term."""
    clock, mono = _start()
    clock.applied(0, 10_000, 2)
    assert near(clock.now(0, 2, lambda _: 0), 10_000)
    clock.applied(0, 10_300, 2)
    assert near(clock.now(0, 2, lambda _: 0), 10_300)


def test_nothing_applied_starts_from_the_initial_value() -> None:
    clock, mono = _start()
    assert near(clock.now(7, None, lambda _: 123_456), 123_456)
    mono.advance_ms(10)
    assert near(clock.now(7, None, lambda _: 999), 123_466)  # asked once only


def test_the_floor_holds_while_the_replica_replays_old_entries() -> None:
    """After a whole-cluster outage the journal replays entries as old as
    the outage: the floor keeps cluster time from going back by it."""
    clock, mono = _start()
    clock.set_floor(0, 60_000, mono(), 2)
    clock.applied(0, 50_000, 2)  # replayed: 10 s behind the floor
    assert clock.has_floor(0)
    mono.advance_ms(100)
    assert near(clock.now(0, None, lambda _: 0), 60_100)
    assert near(clock.now(0, 3, lambda _: 0), 60_100)  # a new leader stamps from it
    mono.advance_ms(2)
    clock.applied(0, 60_100, 3)  # its first entry: the floor's term is over
    assert not clock.has_floor(0)
    mono.advance_ms(10)
    assert near(clock.now(0, 3, lambda _: 0), 60_110)  # late by one commit, once


def test_the_floor_is_dropped_once_live_stamps_are_applied() -> None:
    """Found by jepsen-lite (ttl x kill): the floor is this node's own older
    chain, which can run ahead of the live leader's stamps; kept, it made a
    TTL written by that leader expire early."""
    clock, mono = _start()
    clock.set_floor(0, 60_000, mono(), 2)
    mono.advance_ms(1000)
    clock.applied(0, 60_930, None)  # the live leader's stamp: 70 ms behind the floor's chain
    assert not clock.has_floor(0)
    assert near(clock.now(0, None, lambda _: 0), 60_930)
    assert near(clock.now(0, 4, lambda _: 0), 60_930)


def test_the_floor_is_dropped_at_the_first_entry_of_a_newer_term() -> None:
    """Found by jepsen-lite (ttl x kill): the leader elected while this node
    was down applied its predecessor's last stamps 1.2 s late, so its chain
    ran 1.2 s behind this node's floor; with the floor this node, leading
    again, expired that leader's TTLs 1.2 s early."""
    clock, mono = _start()
    clock.set_floor(0, 60_000, mono(), 2)
    mono.advance_ms(300)
    assert near(clock.now(0, 4, lambda _: 0), 60_300)  # leads term 4 before applying term 3
    clock.applied(0, 59_100, 3)  # the term-3 leader's stamp: 1.2 s behind the floor
    assert not clock.has_floor(0)
    assert near(clock.now(0, 4, lambda _: 0), 59_100)  # late, not early
    clock.applied(0, 59_100, 4)
    mono.advance_ms(100)
    assert near(clock.now(0, 4, lambda _: 0), 59_200)


def test_the_floor_margin_bounds_what_dropping_it_can_cost() -> None:
    clock, mono = _start()
    clock.set_floor(0, 60_000, mono(), 2)
    clock.applied(0, 60_000 - clock.floor_margin_ms - 1, None)
    assert clock.has_floor(0)
    clock.applied(0, 60_000 - clock.floor_margin_ms, None)
    assert not clock.has_floor(0)


def test_no_entry_drops_the_floor_by_term_before_the_log_is_loaded() -> None:
    """The floor is read at start-up, before the replica's log (and so the
    term of its last entry) is loaded."""
    clock, mono = _start()
    clock.set_floor(0, 60_000, mono())
    clock.applied(0, 50_000, 9)
    assert clock.has_floor(0)
    clock.set_floor_term(0, 9)
    clock.applied(0, 50_000, 9)  # replayed: a term it knew
    assert clock.has_floor(0)
    clock.applied(0, 50_010, 10)  # a leader elected since
    assert not clock.has_floor(0)


def test_only_the_newest_leading_chains_are_kept() -> None:
    clock, mono = _start()
    for term in range(1, 10):
        clock.applied(0, 10_000, term)
        clock.now(0, term, lambda _: 0)
    assert len(clock._leading[0]) == ClusterClock.KEEP_TERMS


def test_forget_drops_every_source() -> None:
    clock, mono = _start()
    clock.set_floor(5, 90_000, mono(), 2)
    clock.applied(5, 10_000, 1)
    clock.now(5, 1, lambda _: 0)
    clock.forget(5)
    assert not clock.has_floor(5)
    assert near(clock.now(5, None, lambda _: 42), 42)


def test_a_survivor_applying_its_dead_leaders_last_entries_late_does_not_go_back() -> None:
    """Found by jepsen-lite (ttl x mixed, seed 29): two of three replicas
    were killed for 7.5 s; the survivor, elected once they were back,
    applied the dead leader's last entries only then and went back by the
    outage (a 2 s TTL served 9.7 s after its write)."""
    clock, mono = _start()
    clock.applied(0, 10_000, 2)  # following the term-2 leader
    mono.advance_ms(8000)  # the outage
    clock.applied(0, 10_020, 2)  # its last entries, committed in term 3
    assert near(clock.now(0, None, lambda _: 0), 18_000)
    assert near(clock.now(0, 3, lambda _: 0), 18_000)
    clock.applied(0, 10_030, 4)  # another term's entry is taken as it is
    assert near(clock.now(0, None, lambda _: 0), 10_030)


def test_idle_s_counts_from_the_last_apply() -> None:
    """What the leader's clock tick (ReplicaManager._tick_idle_clocks) asks:
    how long since this node applied an entry of the shard."""
    clock, mono = _start()
    assert clock.idle_s(0) is None  # nothing applied or read yet
    clock.now(0, None, lambda _: 5_000)  # the first read starts the count
    mono.advance_ms(700)
    assert abs(clock.idle_s(0) - 0.7) < 1e-9  # type: ignore[operator]
    clock.applied(0, 5_800, 1)
    assert clock.idle_s(0) == 0.0
    mono.advance_ms(1_200)
    clock.now(0, 1, lambda _: 0)  # reading does not reset it
    assert abs(clock.idle_s(0) - 1.2) < 1e-9  # type: ignore[operator]
    clock.forget(0)
    assert clock.idle_s(0) is None
