"""ReadIndex reads (RaftGroup.read_index) on three real GroupHosts in one
process: real pysyncobj, real loopback Raft links, real LMDB files.

The scenario that matters: a leader cut off from its followers still
believes it leads (its fallback timeout is set far away here), the others
elect a new leader and accept a write.  A read on the old leader must never
succeed: it waits for a majority to accept its term, which cannot happen,
and fails with NotLeader once the partition heals and it learns the new term.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cachenode._errors import NotLeader, OutcomeUnknown, Unavailable
from cachenode.raft.group import BULK_FLUSH_BYTES, RaftGroup, RaftTiming
from cachenode.raft.host import GroupHost
from cachenode.raft.journal import DiskCommand
from cachenode.storage.base import Record, StateReader, Storage, StorageFault
from cachenode.storage.lmdb_store import LmdbStorage

T = TypeVar("T")
IDS = ["a", "b", "c"]
GID = 7
T_MAP_SIZE = 1 << 26
# The old leader keeps believing it leads while cut off (fallback 60 s).
TIMING = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8, leader_fallback_s=60.0)


class Node:
    def __init__(
        self, nid: str, root: Path, timing: RaftTiming = TIMING, reopen: bool = False,
        wrap: Callable[[Storage], Storage] | None = None, tick_interval: float = 0.025,
    ) -> None:
        self.id = nid
        (root / nid).mkdir(exist_ok=reopen)
        self.storage: Storage = LmdbStorage(str(root / nid / "db"), map_size=T_MAP_SIZE, fsync=False)
        if wrap is not None:
            self.storage = wrap(self.storage)
        self.fatal: list[BaseException] = []  # what stopped the driver (the node would exit)
        self.host = GroupHost(nid, self.storage, "127.0.0.1:0", b"secret", str(root / nid), timing=timing,
                              on_fatal=self.fatal.append, tick_interval=tick_interval)
        self.applied: list[bytes] = []
        self.store_payloads = False  # apply also writes each payload into the state
        self.last_index = 0
        self.group: RaftGroup | None = None
        self.installs: list[tuple[int, int, int]] = []  # on_installed calls: (index, term, state's applied index then)
        self.restamp: Callable[[bytes], bytes] | None = None  # what the group's restamp hook does (None: nothing)

    def on_driver(self, fn: Callable[[], T]) -> T:
        return self.host.call(fn).result(timeout=10)

    def restamped(self, payload: bytes) -> bytes:
        return payload if self.restamp is None else self.restamp(payload)

    def on_installed(self, index: int, term: int) -> None:
        self.installs.append((index, term, self.host.batch().state(GID).applied_index()))

    def apply(self, payload: bytes, index: int) -> bytes:
        """Like the real state machine: the write goes into the host's batch."""
        self.applied.append(payload)
        self.last_index = index
        state = self.host.batch().state(GID)
        if self.store_payloads:
            state.put(b"%08d" % index, Record(payload, index))
        state.set_applied(index, 0)
        return payload

    @property
    def g(self) -> RaftGroup:
        assert self.group is not None
        return self.group

    def role(self) -> str:
        return self.on_driver(lambda: self.g.status.role)

    def block(self, peers: set[str]) -> None:
        def do() -> None:
            self.host.mux.blocked = set(peers)
        self.on_driver(do)


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def three_hosts(
    root: Path, timing: RaftTiming = TIMING, wrap: Callable[[Storage], Storage] | None = None
) -> Iterator[dict[str, Node]]:
    """Three started hosts, each with a replica of group GID; stopped on exit."""
    ns = {nid: Node(nid, root, timing, wrap=wrap) for nid in IDS}
    try:
        for n in ns.values():
            for other in ns.values():
                if other is not n:
                    n.host.mux.set_address(other.id, other.host.mux.listen_address)
            n.host.start()
        for n in ns.values():
            def create(n: Node = n) -> RaftGroup:
                return n.host.create_group(GID, IDS, n.apply, lambda: b"barrier", on_installed=n.on_installed,
                                           restamp=n.restamped)
            n.group = n.on_driver(create)
        yield ns
    finally:
        for n in ns.values():
            n.host.stop()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[dict[str, Node]]:
    with three_hosts(tmp_path) as ns:
        yield ns


def caught_up(leader: Node, follower: Node, want: int, what: str) -> None:
    """Wait until both have committed (not only applied) index ``want``:
    a batch of applies alone is committed lazily, so the leader's own
    committed state may lag its applied index too."""
    wait_for(lambda: min(leader.storage.reader(GID).applied_index(),
                         follower.storage.reader(GID).applied_index()) >= want, what)


def leader_of(ns: dict[str, Node], among: list[str]) -> Node | None:
    leaders = [ns[i] for i in among if ns[i].role() == "leader"]
    return leaders[0] if len(leaders) == 1 else None


def test_read_index_serves_after_committed_write(nodes: dict[str, Node]) -> None:
    leader = wait_for(lambda: leader_of(nodes, IDS), "a leader")
    leader.g.propose(b"w1").result(timeout=10)
    fut: Future[None] = leader.g.read_index()
    assert fut.result(timeout=10) is None
    # The local state holds the acknowledged write when the read resolves.
    assert b"w1" in leader.applied
    follower = next(n for n in nodes.values() if n is not leader)
    with pytest.raises(NotLeader):
        follower.g.read_index().result(timeout=10)


def cut_off_the_leader(ns: dict[str, Node]) -> tuple[Node, list[str]]:
    """Wait for a leader, commit ``v1`` through it, then cut it off from the
    others both ways.  Returns it and the others' ids; :func:`reconnect_all` undoes
    the cut.  TIMING's leader fallback keeps it leading meanwhile."""
    old = wait_for(lambda: leader_of(ns, IDS), "a leader")
    old.g.propose(b"v1").result(timeout=10)
    others = [n for n in IDS if n != old.id]
    old.block(set(others))
    for nid in others:
        ns[nid].block({old.id})
    return old, others


def reconnect_all(ns: dict[str, Node]) -> None:
    for n in ns.values():
        n.block(set())


def test_cut_off_leader_never_serves_a_read(nodes: dict[str, Node]) -> None:
    old, others = cut_off_the_leader(nodes)
    new = wait_for(lambda: leader_of(nodes, others), "a new leader among the others")
    new.g.propose(b"v2").result(timeout=10)
    assert old.role() == "leader", "the cut-off leader should still believe it leads"
    pending = old.g.read_index()
    # It cannot gather a majority while cut off: still pending once the new
    # leader has also served a read (which needs a full round of its own).
    new.g.read_index().result(timeout=10)
    assert not pending.done()
    reconnect_all(nodes)  # the old leader learns the new term and fails the read
    wait_for(pending.done, "the pending read to end")
    assert isinstance(pending.exception(), NotLeader)
    assert b"v1" in old.applied


def test_apply_only_batches_share_the_next_journal_fsync(nodes: dict[str, Node]) -> None:
    """One writer, one write at a time: the leader commits once per write
    (the journal append); the apply of the write waits to share the next."""
    leader = wait_for(lambda: leader_of(nodes, IDS), "a leader")
    leader.g.propose(b"warm").result(timeout=10)
    c0, i0 = leader.host.commits, leader.host.iterations
    for i in range(50):
        leader.g.propose(b"w%d" % i).result(timeout=10)
    commits, iterations = leader.host.commits - c0, leader.host.iterations - i0
    assert iterations >= 100  # at least: append, then apply, per write
    assert commits <= 55, f"{commits} commits for 50 writes: applies were fsynced on their own"
    # A read result waits for the pending applies to be committed.
    leader.g.read_index().result(timeout=10)
    assert leader.storage.reader(GID).applied_index() == leader.last_index > 0


def test_a_binary_payload_costs_its_own_size_in_every_journal(nodes: dict[str, Node]) -> None:
    """Proposals are pickled with protocol 5: pysyncobj's decorator pickles
    with protocol 2, which stores bytes as a latin-1 string, so every byte
    over 127 took two (random payloads: 1.5x in the log, on the wire and in
    every journal).  The entry applies on every replica all the same."""
    import os

    leader = wait_for(lambda: leader_of(nodes, IDS), "a leader")
    payload = os.urandom(10_000)
    leader.g.propose(payload).result(timeout=10)
    for n in nodes.values():
        wait_for(lambda n=n: payload in n.applied, f"the payload applied on {n.id}")
        sizes = [size for _, _, size in n.storage.log_sizes(GID)]
        assert max(sizes) < len(payload) + 100, f"{n.id}: an entry of {max(sizes)} bytes for a {len(payload)}-byte payload"


def test_term_at_gives_the_logs_terms_and_none_outside_the_log(nodes: dict[str, Node]) -> None:
    leader = wait_for(lambda: leader_of(nodes, IDS), "a leader")
    leader.g.propose(b"w1").result(timeout=10)
    term, last = leader.on_driver(lambda: (leader.g.current_term(), leader.last_index))
    assert term >= 1
    assert leader.on_driver(lambda: leader.g.term_at(last)) == term
    assert leader.on_driver(lambda: leader.g.term_at(1)) == 0  # pysyncobj's first entry, before any election
    assert leader.on_driver(lambda: leader.g.term_at(0)) is None
    assert leader.on_driver(lambda: leader.g.term_at(last + 1)) is None


def test_journal_is_compacted_by_size(tmp_path: Path) -> None:
    """pysyncobj keeps the journal in memory: a group whose log outgrows
    ``log_compaction_bytes`` (and its state) snapshots and drops it."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8,
                        log_compaction_bytes=1 << 20)
    with three_hosts(tmp_path, timing) as ns:
        leader = wait_for(lambda: leader_of(ns, IDS), "a leader")
        for i in range(24):
            leader.g.propose(bytes([i]) * 100_000).result(timeout=10)
        for n in ns.values():
            wait_for(lambda n=n: n.on_driver(lambda: n.g.journal.bytes) < 1 << 20, f"{n.id}'s journal to shrink")
            assert n.on_driver(lambda n=n: n.g.snapshots_written) >= 1
            assert n.on_driver(lambda n=n: n.g.term_at(2)) is None  # compacted away


def test_a_follower_far_behind_installs_a_snapshot_read_only_as_it_is_sent(tmp_path: Path) -> None:
    """A follower cut off while the leader compacted its log catches up from
    the leader's snapshot, through real pysyncobj and real links.  pysyncobj
    reads a snapshot it sends in 64 KiB chunks, for 50 ms every heartbeat,
    far ahead of the link; the transport now reads the file as it sends it,
    in pieces of up to BULK_FLUSH_BYTES (SnapshotTransfer)."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8,
                        log_compaction_bytes=1 << 20)
    with three_hosts(tmp_path, timing) as ns:
        for n in ns.values():
            n.store_payloads = True
        leader = wait_for(lambda: leader_of(ns, IDS), "a leader")
        victim = next(n for n in ns.values() if n is not leader)
        others = {n.id for n in ns.values() if n is not victim}
        victim.block(others)
        for n in ns.values():
            if n is not victim:
                n.block({victim.id})
        for i in range(40):
            leader.g.propose(bytes([i]) * 200_000).result(timeout=10)
        wait_for(lambda: leader.on_driver(lambda: leader.g.snapshots_written) >= 1, "the leader's snapshot")
        pieces: list[tuple[int, bool, bool]] = []

        def spy(node: str, group: int, message: Any) -> None:
            ser = message.get("serialized") if isinstance(message, dict) else None
            if ser is not None and node == victim.id:
                pieces.append((len(ser[0]), ser[1], ser[2]))

        def heal() -> None:
            leader.host.mux.tap = spy
            for n in ns.values():
                n.host.mux.blocked = set()
        for n in ns.values():
            n.on_driver(heal if n is leader else lambda n=n: setattr(n.host.mux, "blocked", set()))
        want = leader.on_driver(lambda: leader.last_index)  # the last data entry: a new term's no-op never reaches the storage
        caught_up(leader, victim, want, "the follower to catch up (committed)")
        assert victim.on_driver(lambda: victim.g.snapshots_installed) >= 1
        assert dict(victim.storage.reader(GID).items()) == dict(leader.storage.reader(GID).items())
        assert len(dict(victim.storage.reader(GID).items())) == 40
        # on_installed (the cluster clock's hook): once per install, with the
        # snapshot's last entry, the state already holding it (the state is
        # dumped after pysyncobj picked that entry, so it may hold a few more).
        installs = victim.on_driver(lambda: list(victim.installs))
        assert len(installs) == victim.on_driver(lambda: victim.g.snapshots_installed), installs
        term = leader.on_driver(lambda: leader.g.status.term)
        assert all(i > 0 and t == term and applied >= i for i, t, applied in installs), (installs, term)
        assert not leader.installs and all(not n.installs for n in ns.values() if n is not victim)
        assert pieces and pieces[0][1] and pieces[-1][2], pieces  # isFirst first, isLast last
        assert max(n for n, _, _ in pieces) > 64 * 1024, "sent in pysyncobj's 64 KiB chunks"
        assert max(n for n, _, _ in pieces) <= BULK_FLUSH_BYTES
        last = max(k for k, p in enumerate(pieces) if p[1])  # the transmission that was installed
        assert [p[2] for p in pieces[last:]] == [False] * (len(pieces) - last - 1) + [True]


def test_a_write_on_a_cut_off_leader_ends_as_outcome_unknown_once_a_snapshot_covers_its_entry(
    tmp_path: Path,
) -> None:
    """pysyncobj calls a proposal back when it applies the proposal's entry;
    a replica that installs a snapshot applies on from the snapshot's end.
    A leader cut off with a write in flight, then caught up by a snapshot
    of the new leader's log, must end that write (its entry may or may not
    be in the snapshot: outcome unknown), not hold it until the client's
    deadline."""
    timing = dataclasses.replace(TIMING, log_compaction_bytes=1 << 20)
    with three_hosts(tmp_path, timing) as ns:
        old, others = cut_off_the_leader(ns)
        lost = old.g.propose(b"lost")
        new = wait_for(lambda: leader_of(ns, others), "a new leader among the others")
        for i in range(24):
            new.g.propose(bytes([i]) * 100_000).result(timeout=10)
        wait_for(lambda: new.on_driver(lambda: new.g.snapshots_written) >= 1, "the new leader's snapshot")
        assert not lost.done(), "a cut-off leader cannot commit"
        reconnect_all(ns)
        wait_for(lambda: old.on_driver(lambda: old.g.snapshots_installed) >= 1, "the old leader to install a snapshot")
        with pytest.raises(OutcomeUnknown, match="outcome is unknown; retry with the same request id"):
            lost.result(timeout=5)
        assert b"lost" not in old.applied


def test_a_follower_catches_up_from_entries_that_left_the_leaders_memory(tmp_path: Path) -> None:
    """Only the newest ``log_memory_bytes`` of each journal stay in memory:
    a follower cut off for 6 MB of writes (no snapshot: the log is below
    its compaction size) catches up from entries the leader reads back from
    its LMDB file, and ends with the leader's state."""
    budget = 256 * 1024
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8, log_memory_bytes=budget)
    with three_hosts(tmp_path, timing) as ns:
        leader, victim = _cut_off(ns, writes=30)

        def on_disk() -> int:
            return sum(type(e[0]) is DiskCommand for e in leader.g.journal[:])
        assert leader.on_driver(on_disk) >= 29
        assert leader.on_driver(lambda: leader.g.journal.memory_held) <= budget
        for n in ns.values():
            n.on_driver(lambda n=n: setattr(n.host.mux, "blocked", set()))
        want = leader.on_driver(lambda: leader.last_index)  # the last data entry: a new term's no-op never reaches the storage
        caught_up(leader, victim, want, "the follower to catch up (committed)")
        assert victim.on_driver(lambda: victim.g.snapshots_installed) == 0  # entries, not a snapshot
        assert dict(victim.storage.reader(GID).items()) == dict(leader.storage.reader(GID).items())
        assert len(dict(victim.storage.reader(GID).items())) == 30
        assert victim.on_driver(lambda: victim.g.journal.memory_held) <= budget


class _HookedWriters:
    """A Storage whose batch writers call ``self.<name>(writer, *args)``
    instead of ``writer.<name>(*args)`` for each name in ``HOOKED``;
    everything else goes to the wrapped storage."""

    HOOKED: tuple[str, ...] = ()

    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    def begin(self) -> Any:
        batch, outer = self._inner.begin(), self

        class Batch:
            def __getattr__(self, name: str) -> Any:
                return getattr(batch, name)

            def state(self, group: int) -> Any:
                w = batch.state(group)

                class Writer:
                    def __getattr__(self, name: str) -> Any:
                        if name in outer.HOOKED:
                            return functools.partial(getattr(outer, name), w)
                        return getattr(w, name)

                return Writer()

        return Batch()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _GatedInstall(_HookedWriters):
    """A Storage whose writers' ``install_records`` wait for ``gate`` from
    the ``stop_at``-th call on (it blocks that host's driver: the install
    is then caught half done)."""

    HOOKED = ("install_records",)

    def __init__(self, inner: Storage, gate: threading.Event, stop_at: int, fail: bool = False) -> None:
        super().__init__(inner)
        self.gate = gate
        self.stop_at = stop_at
        self.fail = fail  # raise an I/O error at stop_at instead of waiting
        self.calls = 0

    def install_records(self, w: Any, records: Any) -> None:
        self.calls += 1
        if self.fail:
            if self.calls == self.stop_at:
                raise OSError(5, "Input/output error (injected)")
        elif self.calls >= self.stop_at and not self.gate.wait(30):
            raise TimeoutError("gate never opened")
        w.install_records(records)


def _isolate_a_follower(ns: dict[str, Node]) -> tuple[Node, Node]:
    """(leader, follower): messages between the follower and the others are
    dropped from now on; the links stay up."""
    leader = wait_for(lambda: leader_of(ns, IDS), "a leader")
    victim = next(n for n in ns.values() if n is not leader)
    victim.block({n.id for n in ns.values() if n is not victim})
    for n in ns.values():
        if n is not victim:
            n.block({victim.id})
    return leader, victim


def _cut_off(ns: dict[str, Node], writes: int) -> tuple[Node, Node]:
    """(leader, follower): the follower, cut off, missed ``writes`` writes
    of 200 KB (every apply also stored in the state); still cut off on return."""
    for n in ns.values():
        n.store_payloads = True
    leader, victim = _isolate_a_follower(ns)
    for i in range(writes):
        leader.g.propose(bytes([i]) * 200_000).result(timeout=10)
    return leader, victim


def _compaction_settled(n: Node) -> bool:
    """No snapshot writer runs on ``n`` and its journal is below the size
    that forces one (driver thread)."""
    g = n.g
    state = n.storage.reader(GID).size_bytes()
    return g._snap is None and g.journal.bytes <= max(g._timing.log_compaction_bytes, state)


def _await_full_snapshot(leader: Node) -> None:
    """Until the leader has compacted its log and its last snapshot holds
    every write so far (so a follower that lacks them gets one snapshot)."""
    wait_for(lambda: leader.on_driver(lambda: leader.g.snapshots_written) >= 1, "the leader's snapshot")
    # ...and its last one: compaction by size must be over before the links
    # heal, or the follower may install a snapshot that a newer one replaces
    # in the leader's log while it loads (then it needs a second one).
    wait_for(lambda: leader.on_driver(lambda: _compaction_settled(leader)), "the leader's compactions to end")
    # The last snapshot by size may have started while the writes went on,
    # holding only part of them (its size then depends on timing): one more,
    # taken now, holds all of them.
    # (pysyncobj's log starts one entry before its last snapshot's.)
    if leader.on_driver(lambda: leader.g.journal[0][1] < leader.g.sync.raftLastApplied - 1):
        written = leader.on_driver(lambda: leader.g.snapshots_written)
        leader.on_driver(leader.g.force_compaction)
        wait_for(lambda: leader.on_driver(lambda: leader.g.snapshots_written) > written, "the leader's last snapshot")


def _cut_off_while_the_leader_compacts(ns: dict[str, Node], writes: int = 40) -> tuple[Node, Node]:
    """(leader, follower): the follower missed ``writes`` writes of 200 KB and
    the leader's log was compacted past it; the links are healed on return."""
    leader, victim = _cut_off(ns, writes)
    _await_full_snapshot(leader)
    for n in ns.values():
        n.on_driver(lambda n=n: setattr(n.host.mux, "blocked", set()))
    return leader, victim


def test_a_received_snapshot_is_loaded_in_steps_with_the_replica_frozen(tmp_path: Path) -> None:
    """pysyncobj loaded a received snapshot in one storage batch: one commit
    of all of it on the driver (3 s in a 2,000 MiB move, every group of the node
    waiting) with all its pages in memory.  It is now loaded a chunk per
    driver iteration, each committed, while the replica neither ticks nor
    takes messages, and its state is marked installing (readers refuse it)."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8,
                        log_compaction_bytes=1 << 20, snapshot_install_chunk_bytes=256 * 1024)
    gate = threading.Event()
    gated: list[_GatedInstall] = []

    def wrap(s: Storage) -> Storage:
        gated.append(_GatedInstall(s, gate, stop_at=4))
        return gated[-1]  # type: ignore[return-value]
    try:
        with three_hosts(tmp_path, timing, wrap=wrap) as ns:
            leader, victim = _cut_off_while_the_leader_compacts(ns)
            g = gated[IDS.index(victim.id)]
            wait_for(lambda: g.calls >= 4, "the install to reach its 4th chunk")
            # Caught half done: three chunks are committed, under the mark.
            assert victim.storage.reader(GID).installing()
            assert victim.storage.reader(GID).applied_index() == 0
            assert 0 < len(list(victim.storage.reader(GID).items())) < 40
            gate.set()
            want = leader.on_driver(lambda: leader.last_index)  # the last data entry: a new term's no-op never reaches the storage
            caught_up(leader, victim, want, "the follower to catch up (committed)")
            assert not victim.storage.reader(GID).installing()
            assert dict(victim.storage.reader(GID).items()) == dict(leader.storage.reader(GID).items())
            assert victim.on_driver(lambda: victim.g.snapshots_installed) == 1
            assert victim.on_driver(lambda: victim.g.install_steps) >= 8
            assert victim.on_driver(lambda: victim.g.transport.frozen) is False
            # pysyncobj took the install: its log starts at the snapshot, and it goes on.
            leader.g.propose(b"after").result(timeout=10)
            wait_for(lambda: victim.storage.reader(GID).applied_index() > want, "the next write on the follower")
    finally:
        gate.set()


class _SlowInstall(_HookedWriters):
    """A Storage whose writers' ``install_records`` each take ``delay``
    longer: the install of a large snapshot, on a slow disk."""

    HOOKED = ("install_records",)

    def __init__(self, inner: Storage, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    def install_records(self, w: Any, records: Any) -> None:
        time.sleep(self.delay)
        w.install_records(records)


def test_a_leader_keeps_leading_while_its_only_live_follower_loads_its_snapshot(tmp_path: Path) -> None:
    """One node down, another catching up: the leader's quorum is the
    follower that loads its snapshot, frozen, for longer than
    ``leader_fallback_s``.  pysyncobj's follower answers no snapshot piece,
    and a frozen replica answers nothing, so the leader gave up leading,
    was elected again once the install was over, and began anew what it
    sent (with 16 shards of 16 MiB, shards stayed unwritable for up to
    13 s).  The follower now says it is receiving, so its leader keeps
    leading in the same term, and a write commits on the two of them."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8, leader_fallback_s=0.4,
                        log_compaction_bytes=1 << 20, snapshot_install_chunk_bytes=256 * 1024)
    with three_hosts(tmp_path, timing, wrap=lambda s: _SlowInstall(s, 0.1)) as ns:  # type: ignore[arg-type,return-value]
        _, victim = _cut_off_while_the_leader_compacts(ns)  # 8 MB: about 3 s to load
        wait_for(lambda: victim.on_driver(lambda: victim.g.transport.frozen), "the follower to load the snapshot")
        # The follower, cut off, stood for election in ever higher terms: on
        # its return, a leader was elected anew (Raft without pre-vote), and
        # sent it the snapshot.
        leader = wait_for(lambda: leader_of(ns, [n for n in IDS if n != victim.id]), "the leader")
        third = next(n for n in ns.values() if n is not leader and n is not victim)
        third.host.stop()
        term = leader.on_driver(lambda: leader.g.status.term)
        roles: list[str] = []
        noted: list[bool] = []  # the leader still counts the follower as installing (sampled while it was)
        began = time.monotonic()
        while True:
            installing = leader.on_driver(lambda: victim.id in leader.g.transport.installing_peers)
            if not victim.on_driver(lambda: victim.g.transport.frozen):
                break
            noted.append(installing)
            roles.append(leader.role())
            time.sleep(0.05)
        took = time.monotonic() - began
        assert took > 5 * timing.leader_fallback_s, f"the install took {took:.1f} s: too short to test the fallback"
        assert set(roles) == {"leader"}, roles
        # Its "receiving" answers did not end the install on the leader's side:
        # no bulk data left for it while it loaded.
        assert all(noted), noted
        assert leader.on_driver(lambda: leader.g.status.term) == term
        assert victim.on_driver(lambda: victim.g.receiving_said) >= took / (4 * timing.heartbeat_s)
        leader.g.propose(b"after").result(timeout=10)  # committed by the leader and the follower alone
        want = leader.on_driver(lambda: leader.last_index)
        caught_up(leader, victim, want, "the follower to apply the write after the install")
        assert leader.on_driver(lambda: leader.g.status.term) == term


def test_a_follower_answers_while_a_snapshot_arrives(nodes: dict[str, Node]) -> None:
    """While a transmission from its leader is open, the follower answers
    each piece and each tick, at most once a heartbeat, in the form the
    leader's pysyncobj counts as hearing from it; nothing once it closes,
    nor for a piece of a transmission it is not receiving."""
    leader = wait_for(lambda: leader_of(nodes, IDS), "a leader")
    follower = next(n for n in nodes.values() if n is not leader)
    answers: list[dict[str, Any]] = []

    def spy(node: str, group: int, message: Any) -> None:
        if node == leader.id and isinstance(message, dict) and message.get("receiving"):
            answers.append(message)

    def piece(first: bool) -> None:
        g = follower.g
        g._on_snapshot_piece(leader.id, {
            "type": "append_entries", "term": g.sync.raftCurrentTerm, "serialized": (b"x" * 100, first, False),
        })

    def said() -> int:
        return follower.on_driver(lambda: follower.g.receiving_said)

    def two_pieces() -> int:
        piece(False)
        piece(False)
        return follower.g.receiving_said

    follower.on_driver(lambda: setattr(follower.host.mux, "tap", spy))
    follower.on_driver(lambda: piece(True))
    assert said() == 1
    wait_for(lambda: said() >= 4, "answers at the follower's ticks, between pieces", timeout=5)
    before = said()
    assert follower.on_driver(two_pieces) <= before + 1  # at most one a heartbeat
    follower.on_driver(follower.g._close_rx)
    closed = said()
    time.sleep(4 * TIMING.heartbeat_s)
    follower.on_driver(lambda: piece(False))  # not the transmission it receives (none is open)
    time.sleep(2 * TIMING.heartbeat_s)
    assert said() == closed
    wait_for(lambda: len(answers) == closed, "every answer to leave")
    assert answers[0] == {"type": "next_node_idx", "next_node_idx": 0, "reset": False, "success": False,
                          "receiving": True}


def test_a_leader_keeps_leading_while_its_only_live_follower_receives_its_snapshot(tmp_path: Path) -> None:
    """As above, but the pieces come slowly (the follower takes them in at
    20 MiB/s, as under a catch-up of many shards at once): a leader that
    fell back during the transfer began it again in its next term, so a
    snapshot slower to send than the fallback never got through.  Now the
    snapshot arrives in one transmission, in one term, and the leader
    leads throughout.

    The delay is per byte, not per piece: a slow receiver makes the
    leader's pieces small (each fills what room the link has left), and
    a driver iteration that read three pieces at 0.2 s each was stalled
    past the 0.6 s fallback with nothing sent.  No replica can keep its
    leader while its own driver stands still that long.  Per byte, an
    iteration (one read of at most 1 MiB, completing at most one 4 MiB
    piece) stalls at most about 0.25 s."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8, leader_fallback_s=0.6,
                        log_compaction_bytes=1 << 20)
    with three_hosts(tmp_path, timing) as ns:
        for n in ns.values():
            n.store_payloads = True
        leader, victim = _isolate_a_follower(ns)
        for _ in range(160):  # 32 MB that do not compress: eight pieces or more, 1.5 s or more to take
            leader.g.propose(os.urandom(200_000)).result(timeout=10)
        _await_full_snapshot(leader)
        third = next(n for n in ns.values() if n is not leader and n is not victim)
        third.host.stop()  # from now on the leader's quorum is the follower that receives the snapshot
        pieces: list[tuple[int, bool, bool]] = []  # (term, first, last) of each piece the follower took

        def slow_receiver() -> None:
            g = victim.g
            take = g.transport.receiver
            assert take is not None

            def slow(node_id: str, message: dict[str, Any]) -> dict[str, Any]:
                data, first, last = message["serialized"]
                pieces.append((int(message.get("term", 0)), bool(first), bool(last)))
                time.sleep(len(data) / (20 << 20))
                return take(node_id, message)
            g.transport.receiver = slow
        victim.on_driver(slow_receiver)
        for n in (leader, victim):
            n.on_driver(lambda n=n: setattr(n.host.mux, "blocked", set()))
        wait_for(lambda: victim.on_driver(lambda: victim.g.snapshots_installed) >= 1, "the install", timeout=60)
        firsts = [p for p in pieces if p[1]]
        assert len(pieces) >= 6, pieces
        assert len(firsts) == 1 and pieces[0][1] and pieces[-1][2], pieces  # one transmission, never begun again
        assert {p[0] for p in pieces} == {pieces[0][0]}, pieces  # in one term
        now = wait_for(lambda: leader_of(ns, [leader.id, victim.id]), "a leader")
        assert now is leader and leader.on_driver(lambda: leader.g.status.term) == pieces[0][0]
        leader.g.propose(b"after").result(timeout=10)  # committed by the leader and the follower alone


def _restart(ns: dict[str, Node], victim: Node, root: Path, timing: RaftTiming) -> Node:
    """Stop ``victim``'s host (if still running) and start its node again on the same files."""
    victim.host.stop()
    victim.storage.close()
    again = ns[victim.id] = Node(victim.id, root, timing, reopen=True)
    for other in ns.values():
        if other is not again:
            again.host.mux.set_address(other.id, other.host.mux.listen_address)
            other.on_driver(lambda o=other: o.host.mux.set_address(again.id, again.host.mux.listen_address))
    again.host.start()
    again.store_payloads = True
    again.group = again.on_driver(lambda: again.host.create_group(GID, IDS, again.apply, lambda: b"b"))
    return again


def test_a_failure_half_way_through_an_install_stops_the_node_and_a_restart_rebuilds(tmp_path: Path) -> None:
    """Half the state is replaced when the disk fails: that can be neither
    resumed nor undone in place, so the node stops (fail-stop), and at
    restart the install mark makes it rebuild the replica.  Found by review:
    the error was logged as a failed tick and the next step ended the
    install with the rest of the records missing."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8,
                        log_compaction_bytes=1 << 20, snapshot_install_chunk_bytes=256 * 1024)
    with three_hosts(tmp_path, timing, wrap=lambda s: _GatedInstall(  # type: ignore[arg-type, return-value]
            s, threading.Event(), stop_at=3, fail=True)) as ns:
        leader, victim = _cut_off_while_the_leader_compacts(ns)
        wait_for(lambda: victim.fatal, "the victim's driver to stop")
        assert isinstance(victim.fatal[0], StorageFault) and "half way" in str(victim.fatal[0])
        assert victim.storage.reader(GID).installing()  # never marked done over a partial state
        again = _restart(ns, victim, tmp_path, timing)
        want = leader.on_driver(lambda: leader.last_index)  # the last data entry: a new term's no-op never reaches the storage
        caught_up(leader, again, want, "the rebuilt replica to catch up")
        assert not again.storage.reader(GID).installing()
        assert dict(again.storage.reader(GID).items()) == dict(leader.storage.reader(GID).items())


def test_a_replica_whose_install_was_cut_short_is_rebuilt(tmp_path: Path) -> None:
    """A node stopped half way through loading a snapshot finds its state
    marked installing: it clears it and rebuilds the replica from its own
    snapshot and journal (which the install had not touched), then catches
    up; nothing of the half-loaded state survives."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8)
    with three_hosts(tmp_path, timing) as ns:
        for n in ns.values():
            n.store_payloads = True
        leader = wait_for(lambda: leader_of(ns, IDS), "a leader")
        for i in range(10):
            leader.g.propose(bytes([i]) * 1000).result(timeout=10)
        victim = next(n for n in ns.values() if n is not leader)
        wait_for(lambda: victim.storage.reader(GID).applied_index() >= 10, "the follower's applies")
        victim.host.stop()
        # What a stop in the middle of an install leaves: the mark, no meta,
        # and a part of some other state.
        b = victim.storage.begin()
        w = b.state(GID)
        w.begin_install()
        w.install_records([(1, b"half-loaded", (0).to_bytes(8, "big") * 2 + b"junk")])
        b.commit()
        again = _restart(ns, victim, tmp_path, timing)
        leader.g.propose(b"after").result(timeout=10)
        want = leader.on_driver(lambda: leader.last_index)  # the last data entry: a new term's no-op never reaches the storage
        caught_up(leader, again, want, "the rebuilt replica to catch up")
        assert not again.storage.reader(GID).installing()
        assert dict(again.storage.reader(GID).items()) == dict(leader.storage.reader(GID).items())


class _GatedDumps:
    """A Storage whose readers' ``dump`` waits for ``gate`` and notes its thread."""

    def __init__(self, inner: Storage, gate: threading.Event, threads: list[str]) -> None:
        self._inner = inner
        self._gate = gate
        self._threads = threads

    def reader(self, group: int) -> StateReader:
        inner, gate, threads = self._inner.reader(group), self._gate, self._threads

        class Reader:
            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            def dump(self, out: Any) -> None:
                threads.append(threading.current_thread().name)
                if not gate.wait(30):
                    raise TimeoutError("gate never opened")
                inner.dump(out)

        return Reader()  # type: ignore[return-value]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_snapshot_is_written_beside_the_driver_not_on_it(tmp_path: Path) -> None:
    """Writing a snapshot dumps the whole shard: on the driver thread a large
    shard stalled every group of the node (a leader missed its heartbeats and
    lost an election during `make bench-vs`'s 100 MiB fill).  Here every dump
    is held at a gate: the group keeps committing meanwhile, and the log is
    dropped only once the snapshot file is complete."""
    gate = threading.Event()
    threads: list[str] = []
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8,
                        log_compaction_bytes=1 << 20)
    with three_hosts(tmp_path, timing, wrap=lambda s: _GatedDumps(s, gate, threads)) as ns:  # type: ignore[arg-type,return-value]
        leader = wait_for(lambda: leader_of(ns, IDS), "a leader")
        for i in range(24):
            leader.g.propose(bytes([i]) * 100_000).result(timeout=10)
        wait_for(lambda: len(threads) >= 3, "every replica to start its snapshot")
        assert all(t.startswith("snapshot-") for t in threads), threads
        # The dumps wait at the gate; the drivers do not.
        for i in range(20):
            leader.g.propose(b"during %d" % i).result(timeout=10)
        for n in ns.values():
            assert n.on_driver(lambda n=n: n.g.snapshots_written) == 0
            assert n.on_driver(lambda n=n: n.g.journal.bytes) >= 1 << 20  # the log is kept until the file is done
        assert leader_of(ns, IDS) is leader  # no election while the dumps wait
        gate.set()
        for n in ns.values():
            wait_for(lambda n=n: n.on_driver(lambda: n.g.snapshots_written) >= 1, f"{n.id}'s snapshot")
            wait_for(lambda n=n: n.on_driver(lambda: n.g.journal.bytes) < 1 << 20, f"{n.id}'s journal to shrink")
            # Once no writer runs (a follower that learned its last commits
            # late may start a second one), none leaves its temp file behind.
            wait_for(lambda n=n: n.on_driver(lambda: n.g._snap is None), f"{n.id}'s snapshot writers to finish")
            assert not list(tmp_path.joinpath(n.id).rglob("snapshot.bin.part")), "the writer's temp file is left"
            assert list(tmp_path.joinpath(n.id).rglob("snapshot.bin")), f"{n.id} has no snapshot file"


def test_replica_restarted_from_a_snapshot_keeps_three_members(tmp_path: Path) -> None:
    """A replica that loads its snapshot at start must see the two others as
    its peers (not itself as a fourth member): with one peer then down, the
    two that are left must still elect a leader and commit."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8,
                        log_compaction_bytes=1 << 20)
    ns = {nid: Node(nid, tmp_path, timing) for nid in IDS}
    running: list[Node] = []

    def start(n: Node) -> None:
        for other in running:
            n.host.mux.set_address(other.id, other.host.mux.listen_address)
            other.on_driver(lambda o=other: o.host.mux.set_address(n.id, n.host.mux.listen_address))
        n.host.start()
        running.append(n)
        n.group = n.on_driver(lambda: n.host.create_group(GID, IDS, n.apply, lambda: b"b"))

    def stop(n: Node) -> None:
        running.remove(n)
        n.host.stop()

    try:
        for n in ns.values():
            start(n)
        leader = wait_for(lambda: leader_of(ns, IDS), "a leader")
        for i in range(24):
            leader.g.propose(bytes([i]) * 100_000).result(timeout=10)
        victim = next(n for n in ns.values() if n is not leader)
        wait_for(lambda: victim.on_driver(lambda: victim.g.snapshots_written) >= 1, "a snapshot on the follower")
        stop(victim)
        victim.storage.close()
        again = ns[victim.id] = Node(victim.id, tmp_path, timing, reopen=True)
        start(again)
        peers = again.on_driver(lambda: sorted(n.id for n in again.g.sync.otherNodes))
        assert peers == sorted(i for i in IDS if i != again.id)
        # Stop the third node: the restarted replica and the leader must
        # still agree on a leader and commit.
        stop(next(n for n in ns.values() if n is not again and n is not leader))
        pair = [again.id, leader.id]
        new = wait_for(lambda: leader_of(ns, pair), "a leader of the two that are left", timeout=20)
        new.g.propose(b"after").result(timeout=10)
    finally:
        for n in list(running):
            stop(n)


def test_a_write_is_acknowledged_only_once_durable_on_a_majority(nodes: dict[str, Node]) -> None:
    """Write results are released as soon as the leader's tick applies
    them, before that iteration's storage commit: safe only because an
    applied entry was appended, and committed to disk, in an earlier
    iteration.  At the moment each future resolves (its callback runs on
    the leader's driver thread), the entry must already be in the committed
    journal of a majority of the replicas.  (With the hosts in unsafe
    lazy-commit mode, which acknowledges before committing, this fails.)"""
    leader = wait_for(lambda: leader_of(nodes, IDS), "a leader")
    seen: list[tuple[bytes, int]] = []

    def check(payload: bytes) -> Callable[[Future[bytes]], None]:
        def cb(_: Future[bytes]) -> None:
            # (the journal holds pysyncobj's wrapper around the payload)
            durable = sum(1 for n in nodes.values() if any(payload in e[0] for e in n.storage.load_log(GID)))
            seen.append((payload, durable))
        return cb

    futs = []
    for i in range(60):
        payload = b"durable-%03d" % i
        fut = leader.g.propose(payload)
        fut.add_done_callback(check(payload))
        futs.append(fut)
        if i % 3 == 0:
            fut.result(timeout=10)  # a mix of lone writes and pipelined ones
    for f in futs:
        f.result(timeout=10)
    wait_for(lambda: len(seen) == 60, "every callback (they run after result() returns)")
    assert all(durable >= 2 for _, durable in seen), [s for s in seen if s[1] < 2]


class _HalfLoad(_HookedWriters):
    """A Storage whose writers' ``load`` writes a record and then fails with
    a StorageFault: a snapshot load cut off half way by the disk."""

    HOOKED = ("load",)

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.loads = 0

    def load(self, w: Any, inp: Any) -> None:
        self.loads += 1
        w.put(b"half", Record(b"loaded", 1))
        raise StorageFault("injected: the disk failed half way through a snapshot load")


def test_a_snapshot_load_that_fails_at_start_stops_the_node_and_commits_nothing(tmp_path: Path) -> None:
    """pysyncobj calls the snapshot deserializer inside a bare ``except:``
    that logs and goes on.  A StorageFault there (the state half loaded in
    the open batch) must still stop the driver, and the half-written batch
    must be aborted, not committed at shutdown.  Found by review of the
    two-pass load (session 11): without the hand-over the node ran on and
    committed the half."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8, log_compaction_bytes=1 << 20)
    with three_hosts(tmp_path, timing) as ns:
        leader = wait_for(lambda: leader_of(ns, IDS), "a leader")
        for i in range(24):
            leader.g.propose(bytes([i]) * 100_000).result(timeout=10)
        victim = next(n for n in ns.values() if n is not leader)
        wait_for(lambda: victim.on_driver(lambda: victim.g.snapshots_written) >= 1, "a snapshot on the follower")
        victim.host.stop()
        victim.storage.close()
        db = tmp_path / victim.id / "db"
        for name in ("data.mdb", "lock.mdb"):  # the state is gone: the restart must load the snapshot
            (db / name).unlink()
        again = ns[victim.id] = Node(victim.id, tmp_path, timing, reopen=True, wrap=_HalfLoad)
        try:
            for other in ns.values():
                if other is not again:
                    again.host.mux.set_address(other.id, other.host.mux.listen_address)
            again.host.start()
            # pysyncobj loads the snapshot in the group's first tick
            again.host.call(lambda: again.host.create_group(GID, IDS, again.apply, lambda: b"b"))
            wait_for(lambda: again.fatal, "the restarted node's driver to stop")
            assert isinstance(again.fatal[0], StorageFault) and "half way" in str(again.fatal[0])
            assert again.storage.loads == 1  # type: ignore[attr-defined]
        finally:
            again.host.stop()
            again.storage.close()
    reopened = LmdbStorage(str(db), map_size=T_MAP_SIZE, fsync=False)
    try:
        assert reopened.reader(GID).get(b"half") is None
        assert reopened.reader(GID).applied_index() == 0
    finally:
        reopened.close()


def test_a_log_over_its_size_is_compacted_once(tmp_path: Path) -> None:
    """A log that outgrows ``log_compaction_bytes`` once is snapshotted once.

    The size check runs every tick; while the snapshot writer runs, the log
    is still long.  Asking pysyncobj to compact again then left its flag set,
    so the node dumped the whole shard a second time as soon as the first
    dump was in (seen in the nodes' logs: two snapshots 50 ms apart)."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=0.4, election_max_s=0.8,
                        log_compaction_bytes=1 << 20)
    with three_hosts(tmp_path, timing) as ns:
        leader = wait_for(lambda: leader_of(ns, IDS), "a leader")
        for i in range(14):  # 1.4 MB: over the bound once, not twice
            leader.g.propose(bytes([i]) * 100_000).result(timeout=10)
        for n in ns.values():
            wait_for(lambda n=n: n.on_driver(lambda: n.g.snapshots_written) >= 1, f"{n.id}'s snapshot")
            wait_for(lambda n=n: n.on_driver(lambda: _compaction_settled(n)), f"{n.id}'s compaction to end")
        # A few more ticks' worth of small writes: any compaction still asked
        # for starts now.
        for i in range(20):
            leader.g.propose(b"small %d" % i).result(timeout=10)
        for n in ns.values():
            wait_for(lambda n=n: n.on_driver(lambda: n.g._snap is None), f"{n.id}'s writer to finish")
            assert n.on_driver(lambda n=n: n.g.snapshots_written) == 1, n.id


def _checked_again(n: Node, short: bool) -> None:
    """Wait until ``n``'s group weighed its log once more, with the log as
    it is now (a check is repeated every COMPACT_CHECK_S)."""
    before = n.on_driver(lambda: n.g._compact_check_at)
    wait_for(lambda: n.on_driver(lambda: n.g._compact_check_at > before
                                 and n.g._compact_checked == (n.g.journal.bytes, short)),
             f"{n.id} to weigh its log again")


def test_a_node_short_of_disk_compacts_a_log_as_soon_as_that_gives_disk_back(tmp_path: Path) -> None:
    """Short of disk (``GroupHost.set_short_of_disk``), a replica compacts
    its log once the snapshot would give disk back, long before
    ``log_compaction_bytes`` (16 MiB here): so deleting keys gives the
    journal's disk back.  Not when the log is no larger than the state (the
    snapshot would take as much again), not when the disk has no room for
    the snapshot, not with room on the disk, and once compacted, not again
    for nothing."""
    big = 1 << 40
    with three_hosts(tmp_path) as ns:
        leader = wait_for(lambda: leader_of(ns, IDS), "a leader")
        for n in ns.values():
            n.store_payloads = True
        for i in range(20):  # 2 MB of log, 2 MB of state
            leader.g.propose(bytes([i]) * 100_000).result(timeout=10)
        for n in ns.values():
            wait_for(lambda n=n: n.on_driver(lambda: n.last_index) >= leader.last_index, f"{n.id} to apply")
            n.store_payloads = False
            n.host.set_short_of_disk(True, big)
        for n in ns.values():
            _checked_again(n, True)
            assert n.on_driver(lambda n=n: (n.g.snapshots_written, n.g._snap)) == (0, None), "log = state: kept"
            n.host.set_short_of_disk(False, big)
        for i in range(25):  # 2.5 MB more log, and no more state (like overwrites or deletes)
            leader.g.propose(bytes([i]) * 100_000).result(timeout=10)
        for n in ns.values():
            wait_for(lambda n=n: n.on_driver(lambda: n.last_index) >= leader.last_index, f"{n.id} to apply")
            # With room, the log (4.5 MB) is under its bound: not even weighed.
            assert n.on_driver(lambda n=n: (n.g.snapshots_written, n.g._snap)) == (0, None), "room: no compaction"
            n.host.set_short_of_disk(True, 1 << 20)  # short, and no room for a 2 MB snapshot
        for n in ns.values():
            _checked_again(n, True)
            assert n.on_driver(lambda n=n: (n.g.snapshots_written, n.g._snap)) == (0, None), "no room for it"
            n.host.set_short_of_disk(True, big)
        for n in ns.values():
            wait_for(lambda n=n: n.on_driver(lambda: n.g.snapshots_written) >= 1, f"{n.id}'s snapshot")
            wait_for(lambda n=n: n.on_driver(lambda: n.g.journal.bytes) < 1 << 20, f"{n.id}'s log to go")
            assert n.on_driver(lambda n=n: n.g.term_at(2)) is None  # compacted away
            assert len(dict(n.storage.reader(GID).items())) == 20
        for n in ns.values():  # compacted: weighed again and again, and not compacted again
            wait_for(lambda n=n: n.on_driver(lambda: n.g._snap is None), f"{n.id}'s writer to finish")
            written = n.on_driver(lambda n=n: n.g.snapshots_written)
            _checked_again(n, True)
            _checked_again(n, True)
            assert n.on_driver(lambda n=n: (n.g.snapshots_written, n.g._snap)) == (written, None), n.id


def _cut_off_over_the_bound(ns: dict[str, Node]) -> tuple[Node, Node]:
    """(leader, follower): the follower, cut off (its link stays up), missed
    1.2 MB of writes, so the leader's log (1 MiB bound) is over it once."""
    leader, victim = _isolate_a_follower(ns)
    for i in range(12):
        leader.g.propose(bytes([i]) * 100_000).result(timeout=10)
    return leader, victim


def _dump_done(n: Node) -> bool:
    """``n``'s snapshot writer has finished, reported or not (driver thread)."""
    g = n.g
    return g.snapshots_written >= 1 or (g._snap is not None and g._snap[0].done())


def test_a_leader_keeps_the_log_a_lagging_follower_still_needs(tmp_path: Path) -> None:
    """A follower briefly out of reach while the leader's log passes its size
    bound catches up from entries, not from a whole snapshot: the leader
    reports its snapshot (and pysyncobj drops the log it covers) only once
    every follower has acknowledged up to it.  Before, the log went at once
    and the follower was sent the whole shard (the bench saw 7 shards sent
    to a follower that was merely slow under 10 KiB writes).  The cut-off
    follower hears nothing meanwhile: its election timeout is long enough
    (3-6 s) that it never campaigns, which would depose the leader on its
    return and end the hold."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=3.0, election_max_s=6.0,
                        log_compaction_bytes=1 << 20, snapshot_follower_wait_s=30.0)
    with three_hosts(tmp_path, timing) as ns:
        leader, victim = _cut_off_over_the_bound(ns)
        wait_for(lambda: leader.on_driver(lambda: _dump_done(leader)), "the leader's snapshot dump")
        last = leader.last_index
        # pysyncobj sends entries only from after its log's first entry.
        victim_last = victim.on_driver(lambda: victim.g.journal[-1][1])
        assert leader.on_driver(lambda: leader.g.journal[0][1]) <= victim_last, "the leader dropped the log the follower lacks"
        for n in ns.values():
            n.block(set())
        wait_for(lambda: victim.last_index >= last, "the follower to catch up")
        wait_for(lambda: leader.on_driver(lambda: _compaction_settled(leader)), "the leader's compaction to end")
        assert leader.on_driver(lambda: leader.g.snapshots_written) == 1
        assert leader.on_driver(lambda: leader.g.journal.bytes) < 1 << 20
        assert victim.on_driver(lambda: victim.g.snapshots_installed) == 0, "the follower was sent the whole state"


def test_a_follower_that_stays_away_does_not_hold_compaction(tmp_path: Path) -> None:
    """The leader keeps its log for a lagging follower only
    ``snapshot_follower_wait_s``: it holds the log at first, then compacts
    it although the follower never answered, and the follower gets the
    snapshot when it returns."""
    timing = RaftTiming(heartbeat_s=0.05, election_min_s=3.0, election_max_s=6.0,
                        log_compaction_bytes=1 << 20, snapshot_follower_wait_s=3.0)
    with three_hosts(tmp_path, timing) as ns:
        leader, victim = _cut_off_over_the_bound(ns)
        wait_for(lambda: leader.on_driver(lambda: _dump_done(leader)), "the leader's dump")
        leader.g.propose(b"more ticks").result(timeout=10)
        assert leader.on_driver(lambda: leader.g.snapshots_written) == 0, "reported at once: the log was not held"
        wait_for(lambda: leader.on_driver(lambda: leader.g.snapshots_written) >= 1, "the leader's snapshot, reported")
        assert leader.on_driver(lambda: leader.g.journal.bytes) < 1 << 20
        for n in ns.values():
            n.block(set())
        wait_for(lambda: victim.on_driver(lambda: victim.g.snapshots_installed) >= 1, "the snapshot on the follower")
        wait_for(lambda: victim.last_index >= leader.last_index, "the follower to catch up")


def test_the_status_quorum_follows_the_links(nodes: dict[str, Node]) -> None:
    """``status.has_quorum`` (what a leader checks before it proposes) is
    recomputed only on link and membership events: it must still follow
    each peer going away."""
    leader = wait_for(lambda: leader_of(nodes, IDS), "a leader")
    first, second = [n for n in nodes.values() if n is not leader]

    def quorum() -> bool:
        return leader.on_driver(lambda: leader.g.status.has_quorum)

    def link_up(peer: Node) -> bool:
        return leader.on_driver(lambda: leader.host.mux.is_up(peer.id))

    wait_for(quorum, "the leader to see a quorum")
    first.host.stop()
    wait_for(lambda: not link_up(first), "the leader to lose its link to one peer")
    assert quorum(), "two of three replicas are still a quorum"
    second.host.stop()
    wait_for(lambda: not quorum(), "the leader to see it has no quorum left")


def test_no_proposal_waits_in_the_queue_for_a_later_one(nodes: dict[str, Node]) -> None:
    """A tick drains pysyncobj's command queue only when something was
    queued since the last drain (GroupSyncObj._checkCommandsToApply).  A
    proposal queued while the driver drains must still be drained by a later
    tick, not wait for the next proposal: here four threads each wait for
    their own write before proposing the next, so a stranded one times out."""
    leader = wait_for(lambda: leader_of(nodes, IDS), "a leader")
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(40):
                payload = b"w%d-%d" % (i, j)
                assert leader.g.propose(payload).result(timeout=5) == payload
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    # Drained: the flag goes down (a writer's last raise may come after the
    # drain that took its command: the next tick lowers it), and a tick
    # with nothing queued keeps it down.
    wait_for(lambda: leader.on_driver(lambda: not leader.g.sync._commands_queued), "the flag down")
    leader.on_driver(leader.g.tick)
    assert leader.on_driver(lambda: leader.g.sync._commands_queued) is False
    fut = leader.g.propose(b"after")
    assert fut.result(timeout=5) == b"after"


def _drain_once_instead(monkeypatch: pytest.MonkeyPatch, instead: Callable[[], None]) -> list[int]:
    """pysyncobj's own drain (under GroupSyncObj's) replaced by ``instead``
    for its first call, then real again; the list gets an item at that call."""
    from pysyncobj import SyncObj

    real = SyncObj._checkCommandsToApply
    calls: list[int] = []

    def once(self: Any) -> None:
        if not calls:
            calls.append(1)
            instead()
            return
        real(self)

    monkeypatch.setattr(SyncObj, "_checkCommandsToApply", once)
    return calls


def test_a_drain_that_failed_is_tried_again_by_the_next_tick(
    nodes: dict[str, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host logs a tick that raised and goes on; the command still
    queued must be drained by a later tick, not wait for another proposal
    (pysyncobj's drain made to fail once, before it took anything)."""
    leader = wait_for(lambda: leader_of(nodes, IDS), "a leader")

    def fail() -> None:
        raise RuntimeError("injected drain failure")

    failed = _drain_once_instead(monkeypatch, fail)
    assert leader.g.propose(b"after a failed drain").result(timeout=5) == b"after a failed drain"
    assert failed and leader.host.handler_errors >= 1


def test_a_drain_cut_short_by_its_time_bound_is_finished_by_the_next_tick(
    nodes: dict[str, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pysyncobj stops draining after one append period by its own clock;
    what is left must be drained by the next tick.  Here its drain finds,
    once, that its time is up before it took anything (pysyncobj's clock
    made to jump by more than the period inside it)."""
    import pysyncobj.syncobj as so

    leader = wait_for(lambda: leader_of(nodes, IDS), "a leader")
    real_clock = so.monotonicTime
    jump = [0.0]

    def clock() -> float:
        return float(real_clock()) + jump[0]

    def out_of_time() -> None:
        jump[0] += 2 * TIMING.heartbeat_s  # the period passed: pysyncobj takes nothing

    monkeypatch.setattr(so, "monotonicTime", clock)
    cut = _drain_once_instead(monkeypatch, out_of_time)
    assert leader.g.propose(b"after a cut drain").result(timeout=5) == b"after a cut drain"
    assert cut


def test_a_lone_replica_commits_without_waiting_for_the_periodic_tick(tmp_path: Path) -> None:
    """Replication 1: the leader is its own majority and no follower's ack
    wakes it, while pysyncobj counts an entry only in a tick after the one
    that appended it.  That later tick is the next driver iteration's (after
    the journal commit), not the periodic one: here ticks are 3 s apart and
    every write is answered within 1.5 s (before: each waited for the
    periodic tick, 25 ms in a node)."""
    n = Node("a", tmp_path, tick_interval=3.0)
    n.host.start()
    try:
        n.group = n.on_driver(lambda: n.host.create_group(GID, ["a"], n.apply, lambda: b"barrier"))
        wait_for(lambda: n.role() == "leader", "the lone replica to lead", timeout=30)
        assert n.g.propose(b"first").result(timeout=10) == b"first"
        for i in range(5):
            payload = b"w%d" % i
            assert n.g.propose(payload).result(timeout=1.5) == payload
        # Nothing left to commit, so nothing wakes the group again: the
        # driver goes back to waiting for the periodic tick.
        last = n.on_driver(lambda: n.g.journal[-1][1])
        wait_for(lambda: n.on_driver(lambda: n.g.status.commit_index) == last, "the last entry committed")
        assert n.on_driver(lambda: n.g not in n.host._dirty)
        assert n.fatal == []
    finally:
        n.host.stop()


# ---- pre-vote ---------------------------------------------------------------

# Elections 1.0-2.0 s: a replica asks for pre-votes, and grants them, after
# 0.75 s without its leader, far above a stall of three hosts sharing one
# process and two busy cores.  Fallback 60 s: only a higher term deposes.
PV_TIMING = dataclasses.replace(TIMING, election_min_s=1.0, election_max_s=2.0)


def _votes(n: Node) -> dict[str, int]:
    """The replica's pre-vote counters and its term."""
    def read() -> dict[str, int]:
        g = n.g
        return {"started": g.prevotes_started, "won": g.prevotes_won, "granted": g.prevotes_granted,
                "refused": g.prevotes_refused, "term": g.status.term}
    return n.on_driver(read)


def _led_with_a_write(ns: dict[str, Node]) -> tuple[Node, int]:
    """The leader, once it has committed one write, and its term."""
    leader = wait_for(lambda: leader_of(ns, IDS), "a leader")
    leader.g.propose(b"before").result(timeout=10)
    return leader, _votes(leader)["term"]


def _in_step(ns: dict[str, Node], term: int) -> bool:
    """Every replica in ``term`` and one of them leading."""
    return [_votes(n)["term"] for n in ns.values()] == [term] * 3 and leader_of(ns, IDS) is not None


@pytest.mark.parametrize("pre_vote", [True, False], ids=["pre_vote", "without"])
def test_a_follower_that_alone_cannot_hear_its_leader_does_not_depose_it(tmp_path: Path, pre_vote: bool) -> None:
    """The links between the leader and one follower drop everything; the
    third replica hears both.  Without pre-vote (the control) the cut
    follower stands for election in a higher term, the third votes for
    it, and the leader is deposed though it never failed.  With pre-vote
    the third refuses (it hears the leader), so no term moves, writes go
    on, and once healed the follower catches up under the same leader."""
    with three_hosts(tmp_path, dataclasses.replace(PV_TIMING, pre_vote=pre_vote)) as ns:
        leader, term = _led_with_a_write(ns)
        cut, third = [n for n in ns.values() if n is not leader]
        won, refused = _votes(cut)["won"], _votes(third)["refused"]  # the first election's
        leader.block({cut.id})
        cut.block({leader.id})
        if not pre_vote:
            wait_for(lambda: _votes(third)["term"] > term, "the third replica to follow a higher term")
            return
        wait_for(lambda: _votes(third)["refused"] >= refused + 5, "the third replica to refuse five pre-votes")
        assert _votes(cut)["won"] == won
        assert [_votes(n)["term"] for n in ns.values()] == [term] * 3
        leader.g.propose(b"during").result(timeout=10)  # the leader and the third commit it
        reconnect_all(ns)
        caught_up(leader, cut, leader.last_index, "the cut follower to catch up")
        assert leader.role() == "leader" and [_votes(n)["term"] for n in ns.values()] == [term] * 3


@pytest.mark.parametrize("pre_vote", [True, False], ids=["pre_vote", "without"])
def test_a_follower_cut_off_from_all_keeps_its_term_and_rejoins_without_an_election(
    tmp_path: Path, pre_vote: bool
) -> None:
    """A follower that hears no one asks for pre-votes and gets none, so its
    term stays; healed, it follows the leader it left.  Without pre-vote
    (the control) its term rises at every election timeout."""
    with three_hosts(tmp_path, dataclasses.replace(PV_TIMING, pre_vote=pre_vote)) as ns:
        leader, victim = _isolate_a_follower(ns)
        term = _votes(leader)["term"]
        before = _votes(victim)
        if not pre_vote:
            wait_for(lambda: _votes(victim)["term"] > term + 1, "the cut-off follower's term to rise twice")
            return
        wait_for(lambda: _votes(victim)["started"] >= before["started"] + 5, "five pre-vote rounds from the cut-off follower")
        assert _votes(victim)["term"] == term and _votes(victim)["won"] == before["won"]
        leader.g.propose(b"while cut off").result(timeout=10)
        reconnect_all(ns)
        caught_up(leader, victim, leader.last_index, "the follower to catch up")
        assert leader.role() == "leader" and [_votes(n)["term"] for n in ns.values()] == [term] * 3


def test_a_candidate_cut_off_from_all_stands_once_and_then_keeps_its_term(tmp_path: Path) -> None:
    """A replica whose gate is open when it is cut off stands for election
    once (in term + 1), then its gate closes and, without pre-votes, its
    term stays."""
    with three_hosts(tmp_path, PV_TIMING) as ns:
        leader, term = _led_with_a_write(ns)
        victim = next(n for n in ns.values() if n is not leader)

        def cut_off_with_the_gate_open() -> None:
            victim.host.mux.blocked = {n for n in IDS if n != victim.id}
            victim.g.transport.open_gate()
        victim.on_driver(cut_off_with_the_gate_open)
        wait_for(lambda: _votes(victim)["term"] == term + 1, "the cut-off replica to stand once")
        started = _votes(victim)["started"]
        wait_for(lambda: _votes(victim)["started"] >= started + 5, "five pre-vote rounds after it stood")
        assert _votes(victim)["term"] == term + 1


def test_a_replica_whose_term_is_above_its_leaders_stands_and_rejoins(tmp_path: Path) -> None:
    """pysyncobj ignores appends of a lower term, and no peer grants a
    pre-vote while it hears its leader: a follower whose term got ahead
    stands without a pre-vote, deposes that leader once, and the group
    goes on with all three."""
    with three_hosts(tmp_path, PV_TIMING) as ns:
        leader, term = _led_with_a_write(ns)
        ahead = next(n for n in ns.values() if n is not leader)
        ahead.on_driver(lambda: ahead.g.sync._SyncObj__setCurrentTerm(term + 5, None))
        wait_for(lambda: max(_votes(n)["term"] for n in ns.values()) > term + 5 and leader_of(ns, IDS) is not None,
                 "an election above the replica's term")
        now = wait_for(lambda: leader_of(ns, IDS), "a leader")
        now.g.propose(b"after").result(timeout=10)
        caught_up(now, ahead, now.last_index, "the replica to take the write")
        wait_for(lambda: _in_step(ns, _votes(now)["term"]), "all three in one term")


def test_two_replicas_left_a_term_apart_still_elect_a_leader(tmp_path: Path) -> None:
    """The third replica is gone; of the two left, one is a term ahead (it
    voted in an election that failed) and the other has the longer log.
    Each refuses the other's pre-vote (a term not above its own; a shorter
    log), so the one behind in term, told the other's term, stands once to
    catch up and then wins."""
    with three_hosts(tmp_path, PV_TIMING) as ns:
        leader, _ = _led_with_a_write(ns)
        longer, shorter = [n for n in ns.values() if n is not leader]
        caught_up(leader, shorter, leader.last_index, "both followers to have the write")
        shorter.block({leader.id})
        leader.block({shorter.id})
        leader.g.propose(b"only on two").result(timeout=10)  # the leader and `longer`
        term = _votes(leader)["term"]
        shorter.on_driver(lambda: shorter.g.sync._SyncObj__setCurrentTerm(term + 1, leader.id))  # voted, in vain
        leader.host.stop()
        shorter.block(set())
        new = wait_for(lambda: leader_of(ns, [longer.id, shorter.id]), "a leader of the two")
        assert new is longer
        new.g.propose(b"after").result(timeout=10)


def test_when_the_leader_stops_a_follower_wins_a_pre_vote_then_the_election(tmp_path: Path) -> None:
    with three_hosts(tmp_path, PV_TIMING) as ns:
        leader, term = _led_with_a_write(ns)
        others = [i for i in IDS if i != leader.id]
        before = {i: _votes(ns[i])["won"] for i in others}
        leader.host.stop()
        new = wait_for(lambda: leader_of(ns, others), "a new leader")
        assert _votes(new)["won"] > before[new.id] and _votes(new)["term"] > term
        new.g.propose(b"after").result(timeout=10)


def test_a_leadership_transfer_needs_no_pre_vote(tmp_path: Path) -> None:
    """The leader's ``timeout_now`` opens the target's gate at once: the
    target stands without a pre-vote, while the leader is still heard."""
    with three_hosts(tmp_path, PV_TIMING) as ns:
        leader, _ = _led_with_a_write(ns)
        target = next(n for n in ns.values() if n is not leader)

        def target_matched() -> bool:
            def check() -> bool:
                return leader.g.match_index().get(target.id) == leader.g.journal[-1][1]
            return leader.on_driver(check)
        wait_for(target_matched, "the target to hold the leader's whole log")  # or pysyncobj refuses the transfer
        won = _votes(target)["won"]
        done: Future[Any] = Future()
        leader.on_driver(lambda: leader.g.transfer_leadership(target.id, done.set_result))
        assert done.result(timeout=10) is None
        wait_for(lambda: target.role() == "leader", "the target to lead")
        assert _votes(target)["won"] == won
        target.g.propose(b"after").result(timeout=10)


def test_a_transfer_under_load_elects_its_target_in_one_term(tmp_path: Path) -> None:
    """Writes keep coming while leadership moves round the three replicas.
    Each transfer is one election in the next term, won by its target: the
    leader appends nothing new between the target's catching up and its
    standing, so the target's log is never shorter than a voter's.  No
    write fails: those proposed meanwhile wait, and the old leader hands
    them on to the new one."""
    with three_hosts(tmp_path, PV_TIMING) as ns:
        leader, _ = _led_with_a_write(ns)
        stop = threading.Event()
        current = [leader]
        written = [0]
        failed: list[Exception] = []

        def writer() -> None:
            inflight: list[Future[bytes]] = []
            while not stop.is_set():
                inflight.append(current[0].g.propose(os.urandom(100)))
                if len(inflight) >= 8:
                    try:
                        inflight.pop(0).result(timeout=10)
                        written[0] += 1
                    except Exception as e:
                        failed.append(e)
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        try:
            for _ in range(10):
                target = ns[IDS[(IDS.index(leader.id) + 1) % len(IDS)]]
                term = _votes(leader)["term"]
                before = written[0]
                wait_for(lambda before=before: written[0] >= before + 20, "writes under way")

                def asked(leader: Node = leader, target: Node = target) -> bool:
                    f: Future[Any] = Future()
                    leader.on_driver(lambda: leader.g.transfer_leadership(target.id, f.set_result))
                    return f.result(timeout=10) is None  # refused while the target lags: ask again
                wait_for(asked, "the leader to start the transfer")

                def elected(term: int = term) -> tuple[str, int] | None:
                    """A leader of a later term, role and term read together."""
                    seen = [(n.id, *n.on_driver(lambda n=n: (n.g.status.role, n.g.status.term))) for n in ns.values()]
                    later = [(nid, t) for nid, role, t in seen if role == "leader" and t > term]
                    return later[0] if len(later) == 1 else None
                assert wait_for(elected, "a leader in a later term") == (target.id, term + 1)
                current[0] = leader = target
        finally:
            stop.set()
            t.join(timeout=15)
        assert not failed, failed[:3]  # writes waited for the transfer, none was refused or discarded


def test_proposals_a_transfer_held_are_restamped_by_the_leader_they_are_forwarded_to(tmp_path: Path) -> None:
    """The old leader holds what is proposed during a transfer and forwards
    it to the new leader, which appends it in its own term: each payload
    goes through the new leader's ``restamp`` hook first (the server gives
    it the new leader's cluster-clock stamp), and every replica applies what
    the hook returned.  What is proposed on the leader itself is not
    touched, nor is anything else the hook did not change."""
    with three_hosts(tmp_path, PV_TIMING) as ns:
        leader, term = _led_with_a_write(ns)
        target = next(n for n in ns.values() if n is not leader)
        for n in ns.values():
            n.restamp = lambda p, nid=n.id: b"restamped by " + nid.encode() + b": " + p
        caught_up(leader, target, leader.last_index, "the target to have the write")
        held = _transfer_holding(leader, target, [b"held %d" % i for i in range(3)])
        want = [b"restamped by " + target.id.encode() + b": held %d" % i for i in range(3)]
        assert [f.result(timeout=15) for f in held] == want  # the apply result echoes the applied payload
        assert (target.role(), _votes(target)["term"]) == ("leader", term + 1)
        assert target.g.propose(b"direct").result(timeout=10) == b"direct"
        for n in ns.values():
            wait_for(lambda n=n: b"direct" in n.applied, f"{n.id} to apply the last write")
            applied = [p for p in n.applied if b"held" in p]
            assert applied == want, (n.id, applied)


def _transfer_holding(leader: Node, target: Node, payloads: list[bytes]) -> list[Future[bytes]]:
    """Start handing leadership from ``leader`` to ``target`` and propose
    ``payloads`` on ``leader`` in the same driver step, so the transfer
    holds them and the old leader forwards them to ``target``."""
    def transfer_then_propose() -> list[Future[bytes]] | None:
        asked: Future[Any] = Future()
        leader.g.transfer_leadership(target.id, asked.set_result)
        if asked.done() and asked.result() is not None:
            return None  # refused while the target lags: ask again
        return [leader.g.propose(p) for p in payloads]
    held: list[Future[bytes]] = wait_for(lambda: leader.on_driver(transfer_then_propose), "the leader to start the transfer")
    return held


def test_a_forwarded_proposal_whose_restamp_fails_is_refused_not_lost(tmp_path: Path) -> None:
    """The hook raising (a bug, or the store failing under the clock) must
    not leave the forwarder waiting out its deadline: the new leader refuses
    the command, and the proposer learns at once that it was not applied."""
    with three_hosts(tmp_path, PV_TIMING) as ns:
        leader, _ = _led_with_a_write(ns)
        target = next(n for n in ns.values() if n is not leader)

        def broken(payload: bytes) -> bytes:
            raise RuntimeError("restamp failed")
        target.restamp = broken
        caught_up(leader, target, leader.last_index, "the target to have the write")
        held = _transfer_holding(leader, target, [b"held"])
        with pytest.raises(Unavailable, match="denied"):
            held[0].result(timeout=15)
        assert all(b"held" not in n.applied for n in ns.values())
        assert not target.fatal  # logged and gone on, as for any failed message


def _transfer_into_a_cut_link(ns: dict[str, Node]) -> tuple[Node, Node, int]:
    """The leader (with a write its target has), the target and the term,
    once the leader cut its link to the target and sent it ``timeout_now``
    (lost in the cut link): the leader holds its proposals."""
    leader, term = _led_with_a_write(ns)
    target = next(n for n in ns.values() if n is not leader)
    caught_up(leader, target, leader.last_index, "the target to have the write")
    sent: Future[Any] = Future()

    def cut_and_transfer() -> None:
        leader.host.mux.blocked = {target.id}
        leader.g.transfer_leadership(target.id, sent.set_result)
    leader.on_driver(cut_and_transfer)
    assert sent.result(timeout=10) is None
    return leader, target, term


def test_a_transfer_whose_target_never_stands_is_given_up(tmp_path: Path) -> None:
    """The target's ``timeout_now`` is lost (the leader's link to it is
    cut): the write proposed meanwhile waits out the window, then the
    leader leads on in its term.  A second call joins the transfer under
    way; after the give-up the target is refused for a while, then a
    transfer goes through."""
    with three_hosts(tmp_path, PV_TIMING) as ns:
        leader, target, term = _transfer_into_a_cut_link(ns)
        joined: Future[Any] = Future()
        leader.on_driver(lambda: leader.g.transfer_leadership(target.id, joined.set_result))
        assert joined.result(timeout=1) is None  # already sent: answered at once
        start = time.monotonic()
        leader.g.propose(b"held").result(timeout=10)
        assert time.monotonic() - start >= 0.5 * PV_TIMING.election_min_s  # held for the window, not appended at once
        assert (leader.role(), _votes(leader)["term"]) == ("leader", term)
        leader.on_driver(lambda: setattr(leader.host.mux, "blocked", set()))
        caught_up(leader, target, leader.last_index, "the target to have the held write")
        refused: Future[Any] = Future()
        leader.on_driver(lambda: leader.g.transfer_leadership(target.id, refused.set_result))
        err = refused.result(timeout=1)
        assert isinstance(err, Unavailable) and "did not take over" in str(err)

        def transferred() -> bool:
            f: Future[Any] = Future()
            leader.on_driver(lambda: leader.g.transfer_leadership(target.id, f.set_result))
            return f.result(timeout=10) is None and wait_for(
                lambda: target.role() == "leader" or None, "the target to lead", timeout=5) is True
        wait_for(transferred, "a transfer once the back-off has passed")
        assert _votes(target)["term"] == term + 1


def test_a_replica_removed_during_a_transfer_fails_the_writes_it_held(tmp_path: Path) -> None:
    """A write held by a transfer was never appended.  When the replica is
    removed meanwhile, the write fails as not applied instead of waiting
    out its caller's deadline (a removed replica is never ticked again)."""
    with three_hosts(tmp_path, PV_TIMING) as ns:
        leader, _, _ = _transfer_into_a_cut_link(ns)
        held = leader.g.propose(b"held")
        leader.on_driver(lambda: leader.host.remove_group(GID, delete_data=False))
        with pytest.raises(Unavailable, match="not applied"):
            held.result(timeout=10)


def test_the_pre_vote_rule(tmp_path: Path) -> None:
    """A replica grants a pre-vote only when it could vote: not while it
    leads or hears its leader, not for its own term or a lower one, not for
    a log less up to date than its own."""
    with three_hosts(tmp_path, PV_TIMING) as ns:
        leader = wait_for(lambda: leader_of(ns, IDS), "a leader")
        leader.g.propose(b"w").result(timeout=10)
        follower = next(n for n in ns.values() if n is not leader)
        caught_up(leader, follower, leader.last_index, "the follower to have the write")

        def rule(n: Node, dterm: int, dindex: int, dlterm: int) -> bool:
            def ask() -> bool:
                g = n.g
                _, idx, lterm = g.journal[-1][:3]
                return g._grants_prevote(g.status.term + dterm, idx + dindex, lterm + dlterm)
            return n.on_driver(ask)

        assert not rule(leader, 1, 0, 0)  # it leads
        assert not rule(follower, 1, 0, 0)  # it hears its leader
        # Left alone (the third first, so that no pre-vote can win), the
        # follower stays a follower in its term.
        next(n for n in ns.values() if n is not leader and n is not follower).host.stop()
        leader.host.stop()
        wait_for(lambda: rule(follower, 1, 0, 0), "the follower to grant once its leader is silent")
        assert not rule(follower, 0, 0, 0)  # its own term: it may have voted in it
        assert not rule(follower, -1, 0, 0)  # a lower term
        assert not rule(follower, 1, -1, 0)  # a shorter log
        assert not rule(follower, 1, 5, -1)  # a longer log of an older term
        assert rule(follower, 1, 1, 0)
