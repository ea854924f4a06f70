"""CacheService's routing of reads, and its waiting for a leader when it passes a
call on, with fakes for the replicas and the forwarder."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachenode._clock import SystemClock
from cachenode._errors import EpochMismatch, NotLeader, Unavailable
from cachenode._types import ClusterMap, NodeInfo, ShardDescriptor, key_hash
from cachenode.server.cache_service import CacheService
from cachenode.server.config import NodeConfig
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

    self_address = "n2:1"

    def __init__(self, answers: list[Exception] | None = None) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.to_self: list[bool] = []
        self.answers = list(answers or [])

    def forward(self, method: str, req: Any, targets: list[str], deadline: float, write: bool,
                to_self: bool = False) -> pb.GetResponse:
        self.calls.append((method, targets))
        self.to_self.append(to_self)
        if self.answers:
            raise self.answers.pop(0)
        return pb.GetResponse(found=True, value=b"leader value")


def service(installing: bool, storage: LmdbStorage | None = None,
            answers: list[Exception] | None = None) -> tuple[CacheService, Forwarder]:
    cfg = NodeConfig(node_id="n2", data_dir="/nonexistent", listen="127.0.0.1:0", raft_listen="127.0.0.1:0",
                     initial_cluster=(NodeInfo("n2", "127.0.0.1:0", "127.0.0.1:0"),), secret=b"s")
    fwd = Forwarder(answers)
    return CacheService(cfg, Replicas(installing, storage), fwd, SystemClock()), fwd  # type: ignore[arg-type]


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
    import grpc

    return ForwardedError(grpc.StatusCode.UNAVAILABLE, "the shard has no leader right now", ((ERROR_KEY, kind),))


def test_a_call_passed_on_asks_again_while_the_shard_has_no_leader() -> None:
    """Nobody reachable, then a former leader's "no leader right now": both
    mean not applied, so the node asks again, and the third try answers."""
    svc, fwd = service(installing=False, answers=[Unavailable("shard leader n1:1 is unreachable; retry"), leaderless()])
    resp = svc._start_get(pb.GetRequest(key=b"k"), deadline=time.monotonic() + 10)()
    assert resp.value == b"leader value"
    assert len(fwd.calls) == 3 and fwd.to_self == [False, True, True]


def test_a_call_passed_on_goes_to_this_node_once_it_leads() -> None:
    """Elected meanwhile: the next try goes to this node's own port first
    (with no_forward, it is then served as the leader's)."""
    svc, fwd = service(installing=False, answers=[Unavailable("no replica of the shard is reachable; retry later")])
    finish = svc._start_get(pb.GetRequest(key=b"k"), deadline=time.monotonic() + 10)
    svc.r.leads = True  # type: ignore[attr-defined]
    assert finish().value == b"leader value"
    assert fwd.calls[1][1][0] == "n2:1" and fwd.to_self[1]


def test_an_answer_other_than_no_leader_is_passed_through_at_once() -> None:
    err = leaderless(kind="invalid_argument")
    svc, fwd = service(installing=False, answers=[err])
    with pytest.raises(ForwardedError) as e:
        svc._start_get(pb.GetRequest(key=b"k"), deadline=time.monotonic() + 10)()
    assert e.value is err and len(fwd.calls) == 1


def test_waiting_for_a_leader_leaves_the_last_try_time_before_the_deadline() -> None:
    """With 0.3 s left, the floor (0.25 s) leaves room for at most two
    pauses: the node gives up with the last UNAVAILABLE, long before the
    deadline, instead of trying until a try runs out in flight."""
    svc, fwd = service(installing=False, answers=[Unavailable("nobody") for _ in range(50)])
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        svc._start_get(pb.GetRequest(key=b"k"), deadline=t0 + 0.3)()
    assert time.monotonic() - t0 < 0.3
    assert 1 <= len(fwd.calls) <= 3
