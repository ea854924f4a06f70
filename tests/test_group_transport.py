"""GroupTransport: resend trimming that keeps followers from truncating acked
entries, merging of one iteration's appends, and pacing of bulk data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pysyncobj.node import Node

from cachenode.raft.group import (
    BULK_FLUSH_BYTES,
    BULK_STARVE_S,
    QUIET_S,
    GroupTransport,
    SnapshotFile,
    SnapshotTransfer,
)


class FakeMux:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, Any]] = []
        self.up = True
        self.unsent = 0  # what queued_bytes reports: bytes the link still holds

    def queued_bytes(self, node: str) -> int:
        return self.unsent

    def send(self, node: str, group: int, message: Any) -> bool:
        if not self.up:
            return False
        self.sent.append((node, group, message))
        return True

    def is_up(self, node: str) -> bool:
        return self.up

    def link_up(self, node: str) -> bool:
        return self.up


class FakeHost:
    def __init__(self) -> None:
        self.mux = FakeMux()
        self.marked = 0

    def want_peer(self, node: str) -> None:
        pass

    def unwant_peer(self, node: str) -> None:
        pass

    def mark_unflushed(self, transport: Any) -> None:
        self.marked += 1


def send(t: GroupTransport, node: Node, m: dict[str, Any]) -> None:
    """One message per driver iteration: send, then flush."""
    assert t.send(node, m)
    t.flush()


def ae(prev: int, entries: list[tuple[bytes, int, int]], term: int = 1) -> dict[str, Any]:
    return {"type": "append_entries", "term": term, "commit_index": 0, "entries": entries,
            "prevLogIdx": prev, "prevLogTerm": 1}


def e(i: int, t: int = 1) -> tuple[bytes, int, int]:
    return (b"c%d" % i, i, t)


class SteppingClock:
    """Each reading is ``step`` seconds after the previous one."""

    def __init__(self, step: float = 1.0) -> None:
        self.t = 0.0
        self.step = step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_lagging_ack_resend_is_trimmed_to_new_entries() -> None:
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"], monotonic=SteppingClock())  # type: ignore[arg-type]  # no quieting
    n2 = Node("n2")
    send(t, n2, ae(9, [e(10)]))
    send(t, n2, ae(10, [e(11)]))
    # a lagging ack moved pysyncobj's nextIndex back to 11: it resends 11..12
    send(t, n2, ae(10, [e(11), e(12)]))
    last = h.mux.sent[-1][2]
    assert last["prevLogIdx"] == 11 and last["prevLogTerm"] == 1
    assert last["entries"] == [e(12)]
    assert t.trimmed == 1
    # a pure duplicate becomes a heartbeat at the last sent entry
    send(t, n2, ae(10, [e(11), e(12)]))
    hb = h.mux.sent[-1][2]
    assert hb["entries"] == [] and hb["prevLogIdx"] == 12


class ManualClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def quiet_transport() -> tuple[FakeHost, ManualClock, GroupTransport, Node]:
    """A transport to n2 on a manual clock that has just sent n2 an append."""
    h = FakeHost()
    clock = ManualClock()
    t = GroupTransport(h, 5, ["n2"], monotonic=clock)  # type: ignore[arg-type]
    n2 = Node("n2")
    send(t, n2, ae(9, [e(10)]))
    return h, clock, t, n2


def test_an_entry_less_append_right_after_another_waits_and_its_commit_rides_the_next() -> None:
    h, clock, t, n2 = quiet_transport()
    commit_only = dict(ae(10, []), commit_index=10)
    send(t, n2, commit_only)  # pysyncobj announces the commit of 10
    assert len(h.mux.sent) == 1 and t.quieted == 1
    clock.t += 0.005
    send(t, n2, ae(10, [e(11)]))  # the next write's append carries it
    assert len(h.mux.sent) == 2 and h.mux.sent[-1][2]["commit_index"] == 10
    t.release_quiet()
    t.flush()
    assert len(h.mux.sent) == 2  # nothing left waiting


def test_a_waiting_entry_less_append_leaves_once_quiet_s_old() -> None:
    h, clock, t, n2 = quiet_transport()
    send(t, n2, dict(ae(10, []), commit_index=9))
    send(t, n2, dict(ae(10, []), commit_index=10))  # only the newest waits
    clock.t += QUIET_S / 2
    t.release_quiet()
    t.flush()
    assert len(h.mux.sent) == 1
    clock.t += QUIET_S / 2
    t.release_quiet()
    t.flush()
    assert len(h.mux.sent) == 2 and h.mux.sent[-1][2]["commit_index"] == 10
    t.release_quiet()
    t.flush()
    assert len(h.mux.sent) == 2
    # a heartbeat to a follower that heard nothing for a while leaves at once
    clock.t += 1.0
    send(t, n2, dict(ae(10, []), commit_index=10))
    assert len(h.mux.sent) == 3


def test_nothing_overtakes_a_waiting_entry_less_append() -> None:
    """Another kind of message (a TimeoutNow, say) drops the waiting append
    rather than leave before it; a new term's append does not take the old
    term's commit index."""
    h, clock, t, n2 = quiet_transport()
    send(t, n2, dict(ae(10, []), commit_index=10))
    send(t, n2, {"type": "timeout_now", "term": 1})
    clock.t += 1.0
    t.release_quiet()
    t.flush()
    assert [m[2]["type"] for m in h.mux.sent] == ["append_entries", "timeout_now"]
    send(t, n2, dict(ae(10, []), commit_index=10))
    clock.t += QUIET_S / 5
    send(t, n2, dict(ae(10, []), commit_index=11))  # waits
    send(t, n2, dict(ae(10, [e(11, 2)], term=2), commit_index=0))
    assert h.mux.sent[-1][2]["term"] == 2 and h.mux.sent[-1][2]["commit_index"] == 0


def test_reset_and_disconnect_disable_trimming() -> None:
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    n2 = Node("n2")
    send(t, n2, ae(9, [e(10), e(11)]))
    # the follower rejects and asks for a resend from 5: must go out untouched
    t.deliver("n2", {"type": "next_node_idx", "reset": True, "next_node_idx": 5, "success": False})
    send(t, n2, ae(4, [e(5), e(6)]))
    assert h.mux.sent[-1][2]["prevLogIdx"] == 4
    send(t, n2, ae(6, [e(7)]))
    t.peer_event("n2", False)
    send(t, n2, ae(4, [e(5), e(6), e(7)]))
    assert h.mux.sent[-1][2]["prevLogIdx"] == 4  # the link broke: resend everything


def test_new_term_is_not_trimmed() -> None:
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    n2 = Node("n2")
    send(t, n2, ae(9, [e(10), e(11)], term=1))
    send(t, n2, ae(9, [e(10, 2)], term=2))
    assert h.mux.sent[-1][2]["prevLogIdx"] == 9


def test_appends_in_one_iteration_merge_into_one_message() -> None:
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    n2 = Node("n2")
    for i in range(10, 20):
        m = ae(i - 1, [e(i)])
        m["commit_index"] = i - 5
        t.send(n2, m)
    t.send(n2, {"type": "append_entries", "term": 1, "commit_index": 15, "entries": [], "prevLogIdx": 19, "prevLogTerm": 1})
    t.send(n2, {"type": "request_vote", "term": 2})
    t.send(n2, ae(19, [e(20)]))
    assert h.mux.sent == []  # nothing leaves before the end of the iteration
    t.flush()
    msgs = [m[2] for m in h.mux.sent]
    assert [m["type"] for m in msgs] == ["append_entries", "request_vote", "append_entries"]
    assert [x[1] for x in msgs[0]["entries"]] == list(range(10, 20))
    assert msgs[0]["prevLogIdx"] == 9 and msgs[0]["commit_index"] == 15


MiB = 1024 * 1024


def big(i: int, size: int = MiB) -> tuple[bytes, int, int]:
    return (bytes([i % 256]) * size, i, 1)


def test_a_large_backlog_leaves_in_paced_pieces_in_order() -> None:
    """A follower far behind gets its backlog in pieces of at most
    BULK_FLUSH_BYTES per iteration, chained, each entry once, in order."""
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    n2 = Node("n2")
    m = ae(99, [big(i) for i in range(100, 120)])  # 20 MiB in one append, as pysyncobj sends a backlog
    m["commit_index"] = 119
    t.send(n2, m)
    t.send(n2, {"type": "append_entries", "term": 1, "commit_index": 119, "entries": [], "prevLogIdx": 119, "prevLogTerm": 1})
    pieces = []
    for _ in range(10):
        h.marked = 0
        before = len(h.mux.sent)
        t.flush()
        out = [x[2] for x in h.mux.sent[before:]]
        if not out:
            break
        assert sum(len(c) for x in out for c, _, _ in x.get("entries") or []) <= BULK_FLUSH_BYTES
        pieces += out
        assert h.marked == (1 if t._queue else 0)  # held back: flushed again next iteration
    got = [x[1] for p in pieces for x in p["entries"]]
    assert got == list(range(100, 120))
    assert len([p for p in pieces if p["entries"]]) == 5
    prev = 99
    for p in pieces:  # each piece continues the one before it
        assert p["prevLogIdx"] == prev
        prev = p["entries"][-1][1] if p["entries"] else prev
    assert not t._queue


def test_small_messages_pass_a_busy_link_and_bulk_waits_for_it() -> None:
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    n2 = Node("n2")
    h.mux.unsent = BULK_FLUSH_BYTES  # the link is full
    send(t, n2, ae(9, [e(10)]))  # ordinary replication is never held back
    assert [x[2]["entries"][0][1] for x in h.mux.sent] == [10]
    t.send(n2, ae(10, [big(11)]))
    h.marked = 0
    t.flush()
    assert len(h.mux.sent) == 1 and h.marked == 1  # bulk waits for room ...
    h.mux.unsent = 0
    t.flush()
    assert [x[2]["entries"][0][1] for x in h.mux.sent] == [10, 11]  # ... and leaves once there is some
    # a snapshot chunk cannot be split, but is paced like entries
    h.mux.unsent = BULK_FLUSH_BYTES
    chunk = {"type": "append_entries", "term": 1, "commit_index": 11, "serialized": (b"s" * 65536, True, False)}
    t.send(n2, chunk)
    t.flush()
    assert len(h.mux.sent) == 2
    h.mux.unsent = 0
    t.flush()
    assert h.mux.sent[-1][2] is chunk


def test_a_group_starved_of_room_still_sends_a_piece_every_so_often() -> None:
    """Another group's catch-up keeps the link full: this group still sends
    one entry every BULK_STARVE_S, so its follower keeps hearing from it."""
    h = FakeHost()
    clock = [100.0]
    t = GroupTransport(h, 5, ["n2"], monotonic=lambda: clock[0])  # type: ignore[arg-type]
    n2 = Node("n2")
    h.mux.unsent = 10 * BULK_FLUSH_BYTES  # full: another group's data
    t.send(n2, ae(99, [big(i, 40 * 1024) for i in range(100, 110)]))
    sent_at: list[float] = []
    for _ in range(60):  # 0.6 s of 10 ms iterations
        before = len(h.mux.sent)
        t.flush()
        sent_at += [clock[0]] * (len(h.mux.sent) - before)
        clock[0] += 0.01
    entries = [len(x[2]["entries"]) for x in h.mux.sent]
    assert entries == [1, 1], entries  # one entry per starved period, no more
    assert sent_at[1] - sent_at[0] >= BULK_STARVE_S
    assert sent_at[0] - 100.0 >= BULK_STARVE_S


def held_backlog() -> tuple[FakeHost, GroupTransport, Node]:
    """A transport that holds most of a 12 MiB backlog for n2 after one flush."""
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    t.setOnMessageReceivedCallback(lambda node, m: None)
    n2 = Node("n2")
    t.send(n2, ae(99, [big(i) for i in range(100, 112)]))
    t.flush()
    assert t._queue and t.holding
    return h, t, n2


def test_a_reset_drops_what_is_held_for_that_follower() -> None:
    """Held pieces continue a chain the follower rejected: each would cost
    another reset and another full resend."""
    h, t, n2 = held_backlog()
    t.deliver("n2", {"type": "next_node_idx", "term": 1, "reset": True, "next_node_idx": 50, "success": False})
    assert not t._queue
    send(t, n2, ae(49, [e(50)]))  # pysyncobj's resend from 50 goes out as is
    assert h.mux.sent[-1][2]["prevLogIdx"] == 49 and not t.holding


def test_a_new_term_drops_what_an_old_term_held() -> None:
    """Votes and the new term's appends do not wait behind old bulk data."""
    h, t, n2 = held_backlog()
    sent = len(h.mux.sent)
    t.send(n2, {"type": "request_vote", "term": 2, "last_log_index": 111, "last_log_term": 1})
    t.flush()
    assert [x[2]["type"] for x in h.mux.sent[sent:]] == ["request_vote"] and not t._queue


def test_a_removed_member_gets_nothing_more() -> None:
    h, t, n2 = held_backlog()
    sent = len(h.mux.sent)
    t.dropNode(n2)
    t.flush()
    assert len(h.mux.sent) == sent and not t._queue and not t.holding


def test_pysyncobj_internals_we_lean_on() -> None:
    """Fails loudly if a pysyncobj upgrade moves the seams we use."""
    import pysyncobj
    import pysyncobj.syncobj as so

    from cachenode.raft import journal

    assert pysyncobj.__name__ and hasattr(so, "createJournal") and hasattr(so, "PIPE_NOTIFIER_ENABLED")
    journal.install()
    assert so.createJournal is journal._create_journal
    assert so.PIPE_NOTIFIER_ENABLED is False
    assert hasattr(so, "Serializer")
    for name in ("getTransmissionData", "cancelTransmisstion", "setTransmissionData", "serialize", "deserialize"):
        assert hasattr(so.Serializer, name), name  # SnapshotTransfer wraps SyncObj._SyncObj__serializer
    for name in ("_getLeader", "raftLastApplied", "raftCommitIndex", "raftCurrentTerm", "hasQuorum",
                 "doTick", "transferLeadership", "forceLogCompaction", "_doDestroy", "getStatus",
                 "_applyCommand", "_checkCommandsToApply", "_getFuncName", "_onTick",
                 "_SyncObj__callErrCallback"):  # GroupSyncObj
        assert hasattr(so.SyncObj, name), name
    assert isinstance(so._COMMAND_TYPE.REGULAR, int)
    assert isinstance(so.FAIL_REASON.UNKNOWN_OUTCOME, int)  # GroupSyncObj.fail_skipped
    assert callable(so.monotonicTime)  # the clock of pysyncobj's drain, read by GroupSyncObj's


def test_member_added_while_its_link_is_up_is_reported_connected() -> None:
    """pysyncobj's leader sends nothing to a node it never heard "connected":
    a member added at run time whose link was already up must be announced."""
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    connected: list[str] = []
    t.setOnNodeConnectedCallback(lambda node: connected.append(node.id))
    t.addNode(Node("n4"))
    assert connected == ["n4"]


def test_held_replica_reports_no_peer_until_a_leader_appends() -> None:
    """A replica being added takes no part in elections (pysyncobj campaigns
    only when connected to someone) until a leader's append reaches it."""
    h = FakeHost()
    released: list[bool] = []
    t = GroupTransport(h, 5, ["n1", "n2"], hold=True, on_release=lambda: released.append(True))  # type: ignore[arg-type]
    connected: list[str] = []
    received: list[str] = []
    t.setOnNodeConnectedCallback(lambda node: connected.append(node.id))
    t.setOnMessageReceivedCallback(lambda node, m: received.append(m["type"]))
    t.announce_connected()
    t.peer_event("n1", True)
    t.addNode(Node("n3"))
    assert connected == []
    t.deliver("n2", {"type": "request_vote", "term": 3})
    assert connected == [] and released == []
    t.deliver("n1", ae(0, [e(1)]))
    assert sorted(connected) == ["n1", "n2", "n3"] and released == [True]
    assert received == ["request_vote", "append_entries"]


def test_a_gated_replica_reports_no_peer_until_its_gate_opens() -> None:
    """The election gate (pre-vote): closed, pysyncobj hears of no connected
    peer, so it cannot stand for election; opened, it hears of every peer
    whose link is up; closed again, of none.  Pre-vote messages go to the
    group, never to pysyncobj; a leader's ``timeout_now`` opens the gate; a
    leader's append is remembered with its term (stale terms are not)."""
    h = FakeHost()
    clock = ManualClock()
    t = GroupTransport(h, 5, ["n1", "n2"], monotonic=clock, gated=True)  # type: ignore[arg-type]
    up: set[str] = set()
    received: list[str] = []
    prevotes: list[tuple[str, str]] = []
    t.setOnNodeConnectedCallback(lambda node: up.add(node.id))
    t.setOnNodeDisconnectedCallback(lambda node: up.discard(node.id))
    t.setOnMessageReceivedCallback(lambda node, m: received.append(m["type"]))
    t.on_prevote = lambda nid, m: prevotes.append((nid, m["type"]))
    t.announce_connected()
    t.peer_event("n1", True)
    t.addNode(Node("n3"))
    assert up == set()
    t.open_gate()
    assert up == {"n1", "n2", "n3"} and not t.gated and t.opened_at == clock.t
    t.close_gate()
    assert up == set() and t.gated
    t.deliver("n1", {"type": "pre_vote", "next_term": 4, "last_log_index": 9, "last_log_term": 3})
    t.deliver("n2", {"type": "pre_vote_ack", "next_term": 4, "granted": True})
    assert prevotes == [("n1", "pre_vote"), ("n2", "pre_vote_ack")] and received == []
    clock.t = 200.0
    t.deliver("n1", ae(0, [e(1)], term=3))
    assert (t.heard_term, t.heard_at) == (3, 200.0)
    clock.t = 201.0
    t.deliver("n2", ae(0, [], term=2))  # a deposed leader's late heartbeat
    assert (t.heard_term, t.heard_at) == (3, 200.0)
    t.deliver("n1", {"type": "timeout_now", "term": 3})
    assert up == {"n1", "n2", "n3"} and not t.gated
    assert received == ["append_entries", "append_entries", "timeout_now"]


def test_a_held_and_gated_replica_stays_gated_after_its_first_append() -> None:
    """A replica being added (``hold``) is released by its first append, but
    a leader is then heard, so its election gate stays closed: pysyncobj
    still hears of no connected peer."""
    h = FakeHost()
    released: list[bool] = []
    t = GroupTransport(h, 5, ["n1", "n2"], hold=True, on_release=lambda: released.append(True),  # type: ignore[arg-type]
                       gated=True)
    up: set[str] = set()
    t.setOnNodeConnectedCallback(lambda node: up.add(node.id))
    t.setOnMessageReceivedCallback(lambda node, m: None)
    t.deliver("n1", ae(0, [e(1)], term=2))
    assert released == [True] and not t.hold and t.gated and up == set()
    assert (t.heard_term, t.heard_from) == (2, "n1")
    t.deliver("n2", {"type": "timeout_now", "term": 2})  # not from the leader it hears: ignored
    assert t.gated and up == set()
    t.deliver("n1", {"type": "timeout_now", "term": 2})
    assert not t.gated and up == {"n1", "n2"}


class FakeSerializer:
    def checkSerializing(self) -> str:  # noqa: N802 - pysyncobj's name
        return "delegated"


def snapshot(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def transmission(s: SnapshotTransfer, n2: Node) -> dict[str, Any]:
    """What pysyncobj's leader loop sends: one call, and it is done (isLast)."""
    data = s.getTransmissionData(n2)
    assert data is not None and data[1] and data[2]
    return {"type": "append_entries", "term": 1, "commit_index": 7, "serialized": data}


def test_a_snapshot_is_read_only_as_fast_as_the_link_takes_it(tmp_path: Path) -> None:
    """pysyncobj gets the whole transmission in one call; the file is read
    at flush time, at most BULK_FLUSH_BYTES per flush and only while the
    link has room; the first piece says isFirst, only the last isLast, and
    the entries queued after it follow."""
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    n2 = Node("n2")
    path = tmp_path / "snapshot.bin"
    data = snapshot(path, 3 * BULK_FLUSH_BYTES + 12345)
    s = SnapshotTransfer(FakeSerializer(), str(path))
    assert s.checkSerializing() == "delegated"
    t.send(n2, transmission(s, n2))
    t.send(n2, ae(7, [e(8)]))
    src = t._queue["n2"][0]["serialized"][0]
    assert isinstance(src, SnapshotFile) and src.pos == 0  # nothing read ahead
    path.unlink()  # a newer snapshot replacing the file does not change what is sent

    def pieces() -> list[bytes]:
        return [x[2]["serialized"][0] for x in h.mux.sent if "serialized" in x[2]]

    for _ in range(10):
        h.mux.unsent = BULK_FLUSH_BYTES  # full: nothing more is read (but a last piece of <= 32 KiB)
        before = len(pieces())
        t.flush()
        assert src.pos == sum(len(p) for p in pieces())
        assert len(pieces()) == before or len(pieces()[-1]) <= 32 * 1024
        h.mux.unsent = 0
        t.flush()
        assert src.pos == sum(len(p) for p in pieces())
        assert all(len(p) <= BULK_FLUSH_BYTES for p in pieces())
        if not t._queue:
            break
    msgs = [x[2] for x in h.mux.sent]
    flags = [m["serialized"][1:] for m in msgs if "serialized" in m]
    assert flags == [(True, False), (False, False), (False, False), (False, True)]
    assert b"".join(pieces()) == data
    assert msgs[-1]["entries"] == [e(8)] and not t.holding and src.closed


def test_a_dropped_transmission_never_ends_and_the_next_starts_over(tmp_path: Path) -> None:
    """A reset (or a lost link, a new term) drops the half-sent file: the
    follower, holding part of it, never gets an isLast for it; pysyncobj's
    next request is a new transmission from the first byte."""
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    t.setOnMessageReceivedCallback(lambda node, m: None)
    n2 = Node("n2")
    path = tmp_path / "snapshot.bin"
    data = snapshot(path, 2 * BULK_FLUSH_BYTES)
    s = SnapshotTransfer(FakeSerializer(), str(path))
    first = transmission(s, n2)
    t.send(n2, first)
    t.flush()
    assert t.holding and [x[2]["serialized"][1:] for x in h.mux.sent] == [(True, False)]
    t.deliver("n2", {"type": "next_node_idx", "term": 1, "reset": True, "next_node_idx": 1, "success": False})
    assert first["serialized"][0].closed and not t._queue
    again = transmission(s, n2)
    assert again["serialized"][0].pos == 0
    t.send(n2, again)
    t.flush()
    t.flush()
    sent = [x[2]["serialized"] for x in h.mux.sent]
    assert [x[1:] for x in sent] == [(True, False), (True, False), (False, True)]
    assert sent[1][0] + sent[2][0] == data


def test_a_snapshot_that_cannot_be_read_drops_that_peer_only(tmp_path: Path) -> None:
    """A read error of the file being sent costs that follower its queue
    (it asks again), never the node's driver."""
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    n2 = Node("n2")
    path = tmp_path / "snapshot.bin"
    snapshot(path, 2 * BULK_FLUSH_BYTES)
    m = transmission(SnapshotTransfer(FakeSerializer(), str(path)), n2)
    os.truncate(path, 1000)  # shrinks under the open file: a read error
    t.send(n2, m)
    t.flush()
    assert h.mux.sent == [] and not t._queue and not t.holding
    send(t, n2, ae(9, [e(10)]))  # the link goes on
    assert h.mux.sent[-1][2]["entries"] == [e(10)]


class EmptyLog:
    """A storage whose journal holds nothing (every entry was compacted away)."""

    def log_entries(self, group: int, first: int, last: int) -> list[tuple[bytes, int, int]]:
        return []


def test_entries_read_from_disk_are_sent_as_bytes_or_not_at_all() -> None:
    """An append may carry commands that left memory (DiskCommand): they
    leave as bytes; one gone meanwhile (compacted) drops the peer's queue,
    as a lossy network would, and the follower asks again."""
    from cachenode.raft.journal import DiskCommand

    class OneEntry(EmptyLog):
        def log_entries(self, group: int, first: int, last: int) -> list[tuple[bytes, int, int]]:
            return [(b"c10", 10, 1)] if first <= 10 <= last else []

    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    n2 = Node("n2")
    send(t, n2, ae(9, [(DiskCommand(OneEntry(), 5, 10, 1, 3), 10, 1), e(11)]))  # type: ignore[arg-type]
    assert h.mux.sent[-1][2]["entries"] == [e(10), e(11)]
    gone = DiskCommand(EmptyLog(), 5, 12, 1, 3)  # type: ignore[arg-type]
    t.send(n2, ae(11, [(gone, 12, 1)]))  # type: ignore[list-item]
    t.send(n2, ae(12, [e(13)]))
    t.flush()
    assert len(h.mux.sent) == 1 and not t._queue and not t.holding


def test_what_waited_during_an_install_is_released_in_order_a_part_at_a_time() -> None:
    """A frozen replica (loading a snapshot) holds every message; thawed, it
    takes about ``budget`` bytes of them per driver iteration, in order,
    and what arrives meanwhile waits behind them."""
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    got: list[int] = []
    t.setOnMessageReceivedCallback(lambda node, m: got.append(m["prevLogIdx"]))
    t.frozen = True
    for i in range(10):
        t.deliver("n2", ae(i, [big(i + 1, 1 << 20)]))
    assert got == [] and len(t.held_in) == 10
    t.frozen = False
    assert t.release_held(3 << 20) and got == [0, 1, 2]
    t.deliver("n2", ae(10, [e(11)]))  # arrives while some still wait: goes behind them
    assert t.release_held(3 << 20) and got == [0, 1, 2, 3, 4, 5]
    assert not t.release_held(100 << 20) and got == list(range(11))
    t.deliver("n2", ae(11, [e(12)]))  # nothing waits: straight through
    assert got[-1] == 11


def test_after_a_whole_snapshot_bulk_waits_until_the_follower_answers(tmp_path: Path) -> None:
    """The follower loads a snapshot frozen, holding whatever arrives: the
    backlog after the snapshot waits here (its commands lazily on disk)
    until the follower answers, even past the starvation period."""
    h = FakeHost()
    clock = [100.0]
    t = GroupTransport(h, 5, ["n2"], monotonic=lambda: clock[0])  # type: ignore[arg-type]
    t.setOnMessageReceivedCallback(lambda node, m: None)
    n2 = Node("n2")
    path = tmp_path / "snapshot.bin"
    snapshot(path, 100_000)
    t.send(n2, transmission(SnapshotTransfer(FakeSerializer(), str(path)), n2))
    t.send(n2, ae(20, [big(i, 40 * 1024) for i in range(21, 30)]))
    for _ in range(50):
        t.send(n2, dict(ae(29, []), commit_index=29))  # pysyncobj's heartbeats: merged into the held append
        t.flush()
        clock[0] += 0.01
    assert "serialized" in h.mux.sent[0][2] and t.holding  # the file, whole
    alive = [x[2] for x in h.mux.sent[1:]]
    # ... then only keep-alives, one per BULK_STARVE_S, continuing where the snapshot ends
    assert alive and len(alive) <= 0.5 / BULK_STARVE_S + 1
    assert all(m["entries"] == [] and m["prevLogIdx"] == 20 for m in alive)
    t.deliver("n2", {"type": "next_node_idx", "term": 1, "next_node_idx": 21, "success": True})
    t.flush()
    assert h.mux.sent[-1][2]["entries"][0][1] == 21


def test_an_installing_follower_is_remembered_when_nothing_else_waits(tmp_path: Path) -> None:
    """The snapshot alone in the queue (the usual case after a fresh
    compaction): the queue is empty once it left, and the bulk data queued
    in a later iteration still waits for the follower's answer.  Found by
    review: emptying the queue forgot the follower was installing."""
    h = FakeHost()
    t = GroupTransport(h, 5, ["n2"])  # type: ignore[arg-type]
    n2 = Node("n2")
    path = tmp_path / "snapshot.bin"
    snapshot(path, 100_000)
    t.send(n2, transmission(SnapshotTransfer(FakeSerializer(), str(path)), n2))
    t.flush()
    t.send(n2, ae(20, [big(i, 40 * 1024) for i in range(21, 30)]))
    t.flush()
    assert [m[2].get("entries") for m in h.mux.sent[1:]] in ([], [[]]), "bulk data left before the follower answered"
