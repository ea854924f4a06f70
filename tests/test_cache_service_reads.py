"""CacheService's routing of reads, and its waiting for a leader when it passes a
call on, with fakes for the replicas and the forwarder."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachenode._clock import SystemClock
from cachenode._errors import EpochMismatch, NotLeader, OutcomeUnknown, Unavailable
from cachenode._types import ClusterMap, NodeInfo, ShardDescriptor, key_hash
from cachenode.server.cache_service import CacheService
from cachenode.server.config import NodeConfig
from cachenode.server.disk_space import DiskReserve, DiskSpace
from cachenode.server.forwarding import ForwardedError
from cachenode.server.status import ERROR_KEY
from cachenode.storage.base import Record
from cachenode.storage.lmdb_store import LmdbStorage
from cachenode.v1 import cache_pb2 as pb

SHARD = ShardDescriptor(id=3, range_start=0, range_end=2**64 - 1, epoch=1, replicas=("n1", "n2", "n3"))


class Reader:
    def __init__(self, installing: bool) -> None:
        self._installing = installing

    def installing(self) -> bool:
        return self._installing

    def clock_ms(self) -> int:
        return 1000

    def applied_index(self) -> int:
        return 7

    def get(self, key: bytes) -> Record | None:
        return Record(b"local value", 7) if key == b"k" else None


MAP = ClusterMap(
    version=1, nodes=tuple(NodeInfo(n, f"{n}:1", f"{n}:2") for n in ("n1", "n2", "n3")), shards=(SHARD,)
)


class Replicas:
    """n2's view: a follower replica of SHARD, its leader on n1."""

    def __init__(self, installing: bool, storage: LmdbStorage | None = None) -> None:
        self._reader = Reader(installing)
        self._storage = storage
        self.leads = False  # set by a test: this node has become the shard's leader

    def shard_for_key(self, key: bytes) -> ShardDescriptor:
        return SHARD

    def has_replica(self, shard_id: int) -> bool:
        return True

    def reader(self, gid: int) -> Reader:
        raise AssertionError("a stale read must read one view, not a reader that may see several commits")

    @contextlib.contextmanager
    def view(self, gid: int) -> Iterator[Any]:
        if self._storage is not None:
            with self._storage.view(gid) as v:
                yield v
        else:
            yield self._reader

    def leader_group(self, shard_id: int) -> Any:
        if self.leads:
            return object()
        raise NotLeader("not the leader", leader_id="n1", leader_address="n1:1")

    def descriptor(self, shard_id: int) -> ShardDescriptor:
        return SHARD


    def cluster_map(self) -> ClusterMap:
        return MAP


class Forwarder:
    """Answers each call with the next of ``answers`` (an exception is
    raised), then with the leader's value."""

    def __init__(self, answers: list[Exception] | None = None) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.reqs: list[Any] = []
        self.answers = list(answers or [])
        self._lock = threading.Lock()

    def forward(self, method: str, req: Any, targets: list[str], deadline: float, write: bool) -> pb.GetResponse:
        with self._lock:
            self.calls.append((method, targets))
            self.reqs.append(req)
            if self.answers:
                raise self.answers.pop(0)
        return pb.GetResponse(found=True, value=b"leader value")


def service(installing: bool, storage: LmdbStorage | None = None, answers: list[Exception] | None = None,
            workers: int = 64, leader_wait_s: float = 3.0) -> tuple[CacheService, Forwarder]:
    cfg = NodeConfig(node_id="n2", data_dir="/nonexistent", listen="127.0.0.1:0", raft_listen="127.0.0.1:0",
                     initial_cluster=(NodeInfo("n2", "127.0.0.1:0", "127.0.0.1:0"),), secret=b"s",
                     grpc_workers=workers, leader_wait_s=leader_wait_s)
    fwd = Forwarder(answers)
    no_reserve = DiskSpace("/nonexistent", DiskReserve(percent=0.0, size=0), "n2")
    return CacheService(cfg, Replicas(installing, storage), fwd, SystemClock(), no_reserve), fwd  # type: ignore[arg-type]


def stale_get() -> pb.GetRequest:
    return pb.GetRequest(key=b"k", header=pb.RequestHeader(consistency=pb.STALE))


def test_a_stale_read_is_served_by_the_local_replica() -> None:
    svc, fwd = service(installing=False)
    resp = svc._start_get(stale_get(), deadline=1e18)()
    assert resp.value == b"local value" and fwd.calls == []


def test_a_replica_loading_a_snapshot_hands_stale_reads_to_its_leader() -> None:
    """Its state is part old, part new: never read it; the leader answers."""
    svc, fwd = service(installing=True)
    resp = svc._start_get(stale_get(), deadline=1e18)()
    assert resp.value == b"leader value"
    assert fwd.calls and fwd.calls[0][0] == "Get" and fwd.calls[0][1][0] == "n1:1"


def test_an_install_beginning_between_the_two_phases_of_a_read_is_seen(tmp_path: Path) -> None:
    """A read starts (phase 1), the replica's first install step commits,
    the read finishes (phase 2): the mark and the record are read in one
    view, at the finish, so the half-installed state is never served.
    Found by review: checked at the start, in its own transaction, the
    record then read in another, it was."""
    s = LmdbStorage(str(tmp_path / "db"), map_size=1 << 26, fsync=False)
    try:
        b = s.begin()
        w = b.state(SHARD.id)
        w.put(b"k", Record(b"local value", 5))
        w.set_applied(5, 0)
        b.commit()
        svc, fwd = service(installing=False, storage=s)
        finish = svc._start_get(stale_get(), deadline=1e18)
        b = s.begin()  # the driver: the install's first step (mark, old state cleared)
        w = b.state(SHARD.id)
        w.begin_install()
        w.clear_some(50_000)
        b.commit()
        resp = finish()
        assert resp.value == b"leader value" and len(fwd.calls) == 1
    finally:
        s.close()


def test_a_multi_key_request_names_the_first_shard_whose_epoch_differs() -> None:
    """Two shards at different epochs: a request naming either epoch fails
    with EPOCH_MISMATCH for the other shard, before anything starts; every
    shard of the request is checked, not only the first key's."""
    low = ShardDescriptor(id=1, range_start=0, range_end=2**63 - 1, epoch=4, replicas=("n1", "n2", "n3"))
    high = ShardDescriptor(id=2, range_start=2**63, range_end=2**64 - 1, epoch=9, replicas=("n1", "n2", "n3"))
    two = ClusterMap(version=2, nodes=MAP.nodes, shards=(low, high))

    class TwoShards(Replicas):
        def cluster_map(self) -> ClusterMap:
            return two

        def leader_group(self, shard_id: int) -> Any:
            raise AssertionError("nothing may start when an epoch differs")

    svc, fwd = service(installing=False)
    svc.r = TwoShards(False)
    k_low = next(k for k in (b"e%d" % i for i in range(1000)) if key_hash(k) < 2**63)
    k_high = next(k for k in (b"e%d" % i for i in range(1000)) if key_hash(k) >= 2**63)
    for epoch, wrong in ((4, high), (9, low)):
        header = pb.RequestHeader(shard_epoch=epoch)
        mget = pb.MGetRequest(header=header, keys=[k_low, k_high])
        mset = pb.MSetRequest(header=header, items=[pb.KeyValue(key=k_low, value=b"v"), pb.KeyValue(key=k_high, value=b"v")])
        for request, start in ((mget, svc._start_mget), (mset, svc._start_mset)):
            with pytest.raises(EpochMismatch) as e:
                start(request, 1e18)
            assert f"shard {wrong.id} is at epoch {wrong.epoch}, the request named {epoch}" in str(e.value)
    assert fwd.calls == []


def leaderless(kind: str = "unavailable") -> ForwardedError:
    return ForwardedError(grpc.StatusCode.UNAVAILABLE, "the shard has no leader right now", ((ERROR_KEY, kind),))


def test_a_call_passed_on_asks_again_while_the_shard_has_no_leader() -> None:
    """Nobody reachable, then a former leader's "no leader right now": both
    mean not applied, so the node asks again (the leader it knows first),
    and the third try answers."""
    svc, fwd = service(installing=False, answers=[Unavailable("shard leader n1:1 is unreachable; retry"), leaderless()])
    resp = svc._start_get(pb.GetRequest(key=b"k"), deadline=time.monotonic() + 10)()
    assert resp.value == b"leader value"
    assert len(fwd.calls) == 3 and all(targets[0] == "n1:1" for _, targets in fwd.calls)


def test_a_write_passed_on_asks_again_while_the_shard_has_no_leader() -> None:
    svc, fwd = service(installing=False, answers=[Unavailable("no replica of the shard is reachable; retry later")])
    svc._start_set(pb.SetRequest(key=b"k", value=b"v"), deadline=time.monotonic() + 10)()
    assert [m for m, _ in fwd.calls] == ["Set", "Set"] and fwd.reqs[1].value == b"v"


def test_a_call_that_waited_runs_here_once_this_node_leads() -> None:
    """Elected meanwhile: the operation starts again here (never a call to
    this node's own port, which would need a second worker thread)."""
    svc, fwd = service(installing=True, answers=[Unavailable("no replica of the shard is reachable; retry later")])
    replicas = svc.r
    forward = fwd.forward

    def elected_meanwhile(*args: Any) -> Any:
        replicas.leads = True  # type: ignore[attr-defined]
        replicas._reader._installing = False  # type: ignore[attr-defined]
        return forward(*args)

    fwd.forward = elected_meanwhile  # type: ignore[method-assign]
    assert svc._start_get(stale_get(), deadline=time.monotonic() + 10)().value == b"local value"
    assert len(fwd.calls) == 1


@pytest.mark.parametrize("err", [OutcomeUnknown("the link broke; outcome unknown"), leaderless(kind="outcome_unknown"),
                                 leaderless(kind="invalid_argument")], ids=["outcome_unknown", "forwarded_outcome_unknown",
                                                                            "forwarded_invalid_argument"])
def test_an_answer_other_than_no_leader_is_passed_through_at_once(err: Exception) -> None:
    """"Outcome unknown" above all: the write may be applied, so asking
    again could apply it twice."""
    svc, fwd = service(installing=False, answers=[err])
    with pytest.raises(type(err)) as e:
        svc._start_set(pb.SetRequest(key=b"k", value=b"v"), deadline=time.monotonic() + 10)()
    assert e.value is err and len(fwd.calls) == 1


def test_waiting_for_a_leader_ends_the_floor_before_the_deadline() -> None:
    """With 1 s left the waiting ends after 0.5 s (the floor is 0.5 s), with
    the last UNAVAILABLE, instead of trying until a try runs out in flight."""
    svc, fwd = service(installing=False, answers=[Unavailable("nobody") for _ in range(100)])
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        svc._start_get(pb.GetRequest(key=b"k"), deadline=t0 + 1.0)()
    assert time.monotonic() - t0 < 0.7
    assert len(fwd.calls) >= 2


def test_a_leader_wait_of_zero_answers_at_once() -> None:
    """``--leader-wait 0``: the first try's UNAVAILABLE goes to the caller."""
    svc, fwd = service(installing=False, answers=[Unavailable("nobody") for _ in range(10)], leader_wait_s=0.0)
    with pytest.raises(Unavailable):
        svc._start_get(pb.GetRequest(key=b"k"), deadline=time.monotonic() + 10)()
    assert len(fwd.calls) == 1


def test_the_ops_started_together_wait_for_a_leader_together() -> None:
    """A Batch starts all its ops, then finishes them one by one: the
    second finds the first's wait over and does not wait again."""
    svc, fwd = service(installing=False, answers=[Unavailable("nobody") for _ in range(1000)], leader_wait_s=1.0)
    t0 = time.monotonic()
    finishes = [svc._start_get(pb.GetRequest(key=k), deadline=t0 + 10) for k in (b"a", b"b")]
    for f in finishes:
        with pytest.raises(Unavailable):
            f()
    assert time.monotonic() - t0 < 1.4  # one wait of 1 s, not two


class Stuck(Forwarder):
    """Every forward takes 0.6 s (a leader that does not answer in time)."""

    def forward(self, method: str, req: Any, targets: list[str], deadline: float, write: bool) -> pb.GetResponse:
        with self._lock:
            self.calls.append((method, targets))
        time.sleep(0.6)
        raise Unavailable("too late")


def test_a_forwarded_write_still_in_flight_at_the_deadline_is_outcome_unknown() -> None:
    """Not retried, and not UNAVAILABLE: the leader may have applied it."""
    svc, _ = service(installing=False)
    svc.fwd = stuck = Stuck()
    with pytest.raises(OutcomeUnknown):
        svc._start_set(pb.SetRequest(key=b"k", value=b"v"), deadline=time.monotonic() + 0.2)()
    assert len(stuck.calls) == 1


def test_a_forwarded_read_still_in_flight_at_the_deadline_is_unavailable() -> None:
    svc, _ = service(installing=False)
    svc.fwd = stuck = Stuck()
    with pytest.raises(Unavailable):
        svc._start_get(pb.GetRequest(key=b"k"), deadline=time.monotonic() + 0.2)()
    assert len(stuck.calls) == 1


def test_a_call_finds_no_waiting_room_and_fails_at_once() -> None:
    """4 worker threads: one call may wait for a leader; a second one gets
    the UNAVAILABLE at once, so waiting calls never take every worker."""
    svc, fwd = service(installing=False, answers=[Unavailable("nobody") for _ in range(1000)], workers=4)
    assert svc.max_waiters == 1
    first: list[BaseException] = []

    def waiter() -> None:
        try:
            svc._start_get(pb.GetRequest(key=b"a"), deadline=time.monotonic() + 2)()
        except Unavailable as e:
            first.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    try:
        wait_until = time.monotonic() + 5
        while sum(getattr(r, "key", None) == b"a" for r in fwd.reqs) < 2:  # the first call has asked again: it waits
            assert time.monotonic() < wait_until, "the first call never asked again"
            time.sleep(0.005)
        with pytest.raises(Unavailable):
            svc._start_get(pb.GetRequest(key=b"b"), deadline=time.monotonic() + 2)()
        assert sum(getattr(r, "key", None) == b"b" for r in fwd.reqs) == 1
    finally:
        t.join(5)
    assert first, "the first call should end UNAVAILABLE once its wait is over"
    # its slot is free again: a new call waits (asks more than once)
    with pytest.raises(Unavailable):
        svc._start_get(pb.GetRequest(key=b"c"), deadline=time.monotonic() + 1)()
    assert sum(getattr(r, "key", None) == b"c" for r in fwd.reqs) >= 2
