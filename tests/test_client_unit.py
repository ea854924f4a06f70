"""CacheClient / AsyncCacheClient without a real cluster.

Retries and routing are exercised over real loopback sockets against
in-process gRPC servers: a tiny one defined here, and the FakeCluster test
double from tests/_cluster.py.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import cachenode.client as client_pkg
from cachenode._errors import (
    CacheError,
    DiskFull,
    EpochMismatch,
    FailedPrecondition,
    InvalidArgument,
    OutcomeUnknown,
    Overloaded,
    Unavailable,
)
from cachenode.client import AsyncCacheClient, CacheClient, CasResult, GetResult, _call, _core
from cachenode.client._status import Retry, classify, parse_leader_hint
from cachenode.v1 import cache_pb2 as pb
from cachenode.v1 import cache_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from _cluster import FakeCluster, Fault, batch_via_unary  # noqa: E402

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connection refused


# ---------------------------------------------------------------------------
# public surface
# ---------------------------------------------------------------------------


def test_public_surface_is_exactly_all() -> None:
    expected = {
        "AsyncCacheClient",
        "CacheClient",
        "CacheError",
        "CasResult",
        "EpochMismatch",
        "DiskFull",
        "FailedPrecondition",
        "GetResult",
        "Internal",
        "InvalidArgument",
        "NodeStatus",
        "NotFound",
        "NotLeader",
        "OutcomeUnknown",
        "Overloaded",
        "ReplicaStatus",
        "Route",
        "RouteTable",
        "Unavailable",
    }
    assert set(client_pkg.__all__) == expected
    for name in client_pkg.__all__:
        assert getattr(client_pkg, name) is not None
    public = {n for n in vars(client_pkg) if not n.startswith("_")}
    # submodules are importable but everything else public is in __all__
    assert public - expected <= {"async_client", "sync_client", "route_table"}
    import cachenode._errors as errors

    assert client_pkg.Unavailable is errors.Unavailable


# ---------------------------------------------------------------------------
# argument validation (nothing is sent)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"endpoints": []},
        {"endpoints": ""},
        {"endpoints": ["nohost"]},
        {"endpoints": ["host:notaport"]},
        {"endpoints": ["h:0"]},
        {"endpoints": [UNREACHABLE], "timeout": 0},
        {"endpoints": [UNREACHABLE], "timeout": -1},
        {"endpoints": [UNREACHABLE], "max_attempts": 0},
        {"endpoints": [UNREACHABLE], "client_id": b""},
        {"endpoints": [UNREACHABLE], "client_id": b"x" * 65},
        {"endpoints": [UNREACHABLE], "routing": "direct"},
    ],
)
def test_constructor_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        CacheClient(**kwargs)
    with pytest.raises(InvalidArgument):
        AsyncCacheClient(**kwargs)


def test_endpoints_accept_comma_string_and_dedup() -> None:
    with CacheClient("a:1, b:2,a:1") as c:
        assert c.endpoints == ("a:1", "b:2")


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get(""),
        lambda c: c.get(123),
        lambda c: c.get("k", consistency="eventual"),
        lambda c: c.set("k", 5),
        lambda c: c.set("k", "v", ttl_ms=0),
        lambda c: c.set("k", "v", ttl_ms=-5),
        lambda c: c.set("k", "v", ttl_ms=1.5),
        lambda c: c.set("k", "v", if_absent=True, if_present=True),
        lambda c: c.cas("k", "v"),
        lambda c: c.cas("k", "v", expected="a", expected_version=3),
        lambda c: c.cas("k", "v", expected="a", absent=True),
        lambda c: c.cas("k", "v", expected_version=-1),
        lambda c: c.incr("k", "1"),
        lambda c: c.incr("k", 1 << 63),
        lambda c: c.incr("k", True),
        lambda c: c.mget(["a", ""]),
        lambda c: c.mset("notpairs"),
        lambda c: c.mset([("a",)]),
        lambda c: c.mset({"a": "1"}, ttl_ms=0),
    ],
)
def test_bad_arguments_raise_invalid_argument_before_any_io(call: Any) -> None:
    with CacheClient([UNREACHABLE], timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(InvalidArgument):
            call(c)
        assert time.monotonic() - t0 < 0.2


def test_empty_multi_ops_do_nothing() -> None:
    with CacheClient([UNREACHABLE], timeout=0.5) as c:
        assert c.mget([]) == {}
        assert c.mset({}) == 0


# ---------------------------------------------------------------------------
# error classification
# ---------------------------------------------------------------------------


class _FakeRpcError(grpc.RpcError):
    def __init__(
        self, code: grpc.StatusCode, details: str = "", md: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._code, self._details, self._md = code, details, md

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._md


@pytest.mark.parametrize(
    ("code", "md", "details", "cls_name", "retry", "maybe_sent"),
    [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            (("cachenode-error", "invalid_argument"),),
            "",
            "InvalidArgument",
            Retry.NEVER,
            False,
        ),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            (("cachenode-error", "failed_precondition"),),
            "",
            "FailedPrecondition",
            Retry.NEVER,
            False,
        ),
        (
            grpc.StatusCode.NOT_FOUND,
            (("cachenode-error", "not_found"),),
            "",
            "NotFound",
            Retry.NEVER,
            False,
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            (("cachenode-error", "not_leader"),),
            "",
            "NotLeader",
            Retry.REDIRECT,
            False,
        ),
        (
            grpc.StatusCode.ABORTED,
            (("cachenode-error", "epoch_mismatch"),),
            "",
            "EpochMismatch",
            Retry.STALE_ROUTE,
            False,
        ),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            (("cachenode-error", "overloaded"),),
            "",
            "Overloaded",
            Retry.BUSY,
            False,
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            (("cachenode-error", "unavailable"),),
            "",
            "Unavailable",
            Retry.NO_LEADER,
            False,
        ),
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            (("cachenode-error", "outcome_unknown"),),
            "",
            "OutcomeUnknown",
            Retry.TIMEOUT,
            True,
        ),
        (
            grpc.StatusCode.INTERNAL,
            (("cachenode-error", "internal"),),
            "",
            "Internal",
            Retry.NEVER,
            False,
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            (),
            "failed to connect to all addresses",
            "Unavailable",
            Retry.NODE_DOWN,
            False,
        ),
        (grpc.StatusCode.UNAVAILABLE, (), "Socket closed", "Unavailable", Retry.NODE_DOWN, True),
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            (),
            "Deadline Exceeded",
            "OutcomeUnknown",
            Retry.TIMEOUT,
            True,
        ),
        (grpc.StatusCode.UNIMPLEMENTED, (), "", "Internal", Retry.NEVER, False),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            (),
            "Received message larger than max",  # the node refused the request
            "InvalidArgument",
            Retry.NEVER,
            False,
        ),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            (),
            "Stream removed (CLIENT: Received message larger than max (6291630 vs. 4194304))",  # the answer
            "InvalidArgument",
            Retry.NEVER,
            True,
        ),
    ],
)
def test_classify(
    code: grpc.StatusCode, md: Any, details: str, cls_name: str, retry: Retry, maybe_sent: bool
) -> None:
    f = classify(_FakeRpcError(code, details, md), what="set 'k'", target="node n1 at h:1")
    assert type(f.error).__name__ == cls_name
    assert f.retry is retry
    assert f.maybe_sent is maybe_sent
    assert "set 'k'" in f.error.message and "\n" not in f.error.message


@pytest.mark.parametrize(
    ("details", "says"),
    [
        ("Stream removed (CLIENT: Received message larger than max (6291630 vs. 4194304))",
         "the answer is larger than one gRPC message may be"),
        ("SERVER: Sent message larger than max (272637970 vs. 268435456)",
         "the answer is larger than one gRPC message may be"),
        ("CLIENT: Sent message larger than max (272637970 vs. 268435456)",
         "the request is larger than one gRPC message may be"),
        ("Received message larger than max (272637970 vs. 268435456)",
         "the request is larger than one gRPC message may be"),
    ],
)
def test_classify_names_the_message_that_was_too_large(details: str, says: str) -> None:
    f = classify(_FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, details, ()), what="mget", target="n1")
    assert f.error.message.startswith(f"mget: {says} ({details}); "), f.error.message
    hint = "ask for fewer keys per call" if "answer" in says else "send less data per call"
    assert f.error.message.endswith(hint)


def test_classify_not_leader_hint() -> None:
    err = _FakeRpcError(
        grpc.StatusCode.UNAVAILABLE,
        "no",
        (("cachenode-error", "not_leader"), ("cachenode-leader", "n2@10.0.0.2:7002")),
    )
    f = classify(err, what="get 'k'", target="n1")
    assert (f.leader_id, f.leader_address) == ("n2", "10.0.0.2:7002")
    assert parse_leader_hint("n3") == ("n3", None)
    assert parse_leader_hint("") == (None, None)


# ---------------------------------------------------------------------------
# the retry budget, on a clock the test moves
# ---------------------------------------------------------------------------


class _NoLeaderCall:
    """One call driven by hand against a shard with no leader, on a clock the
    test moves: each attempt fails 1 ms after it is sent."""

    NO_LEADER = _FakeRpcError(
        grpc.StatusCode.UNAVAILABLE, "no leader", (("cachenode-error", "unavailable"),)
    )

    def __init__(self, write: bool, timeout: float) -> None:
        self.now = 0.0
        core = _core.ClientCore(
            [UNREACHABLE], timeout=timeout, max_attempts=3, client_id=None, routing="smart",
            clock=lambda: self.now, rng=random.Random(7),
        )  # fmt: skip
        op = _call.Op("Set" if write else "Get", (b"k",), pb.SetRequest, write=write)
        self.state = _core.CallState(core, op, deadline=timeout)
        self.timeouts: list[float] = []

    def attempt(self) -> float:
        """Send one attempt and fail it; returns the backoff before the next."""
        target = self.state.target()
        self.timeouts.append(self.state.attempt_timeout())
        self.now += 0.001
        return self.state.failed(self.NO_LEADER, target)

    def until_final_error(self) -> CacheError:
        while True:
            try:
                delay = self.attempt()  # moves the clock itself: add the delay after
            except CacheError as e:
                return e
            self.now += delay


def test_a_write_not_yet_applied_is_not_retried_in_an_attempt_too_short_to_finish() -> None:
    # A last attempt of a few milliseconds times out on a busy machine, and a
    # write attempt that times out may have been applied: it would turn the
    # definite "not applied" into "outcome unknown" for nothing.
    write = _NoLeaderCall(write=True, timeout=1.0)
    err = write.until_final_error()
    assert len(write.timeouts) > 4
    assert min(write.timeouts) > _core.SAFE_ATTEMPT_S * 0.999  # the last gets the floor, to rounding
    assert isinstance(err, Unavailable) and "It was not applied" in err.message
    # The last wait is shortened to leave the last attempt its floor: the
    # call ends with less than two floors of its budget left.
    assert write.now > 1.0 - 2 * _core.SAFE_ATTEMPT_S
    # A read spends nothing by trying, so it keeps trying to the end of its budget.
    read = _NoLeaderCall(write=False, timeout=1.0)
    assert isinstance(read.until_final_error(), Unavailable)
    assert min(read.timeouts) < _core.SAFE_ATTEMPT_S
    # A short timeout scales the floor down: a 100 ms write still retries.
    short = _NoLeaderCall(write=True, timeout=0.1)
    err = short.until_final_error()
    assert len(short.timeouts) > 2 and min(short.timeouts) >= 0.01
    assert isinstance(err, Unavailable) and "It was not applied" in err.message


@pytest.mark.parametrize("write", [True, False])
def test_an_answer_too_large_leaves_a_write_unknown_and_a_read_refused(write: bool) -> None:
    """A write coalesced into one Batch with reads of large values was sent
    and maybe applied, though the Batch's answer could not be taken."""
    call = _NoLeaderCall(write=write, timeout=1.0)
    too_large = _FakeRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "Stream removed (CLIENT: Received message larger than max (9 vs. 4))", ()
    )
    with pytest.raises(CacheError) as e:
        call.state.failed(too_large, call.state.target())
    if write:
        assert isinstance(e.value, OutcomeUnknown), e.value
        assert e.value.message.endswith("This write may or may not have been applied (at most once); read the key to find out")
    else:
        assert isinstance(e.value, InvalidArgument), e.value
    assert "the answer is larger than one gRPC message may be" in e.value.message


DISK_FULL = _FakeRpcError(
    grpc.StatusCode.RESOURCE_EXHAUSTED, "node n1 has 1.0 MiB free ..., so it takes no writes that add data; "
    "nothing was applied.", (("cachenode-error", "disk_full"),)
)
TIMED_OUT = _FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


@pytest.mark.parametrize("write", [True, False])
def test_a_full_disk_refuses_at_once_and_is_not_retried(write: bool) -> None:
    call = _NoLeaderCall(write=write, timeout=5.0)
    with pytest.raises(DiskFull, match="nothing was applied"):
        call.state.failed(DISK_FULL, call.state.target())


def test_a_full_disk_after_an_attempt_that_may_have_applied_leaves_the_write_unknown() -> None:
    """The first attempt timed out (maybe applied, maybe still in flight);
    the retry's refusal says nothing about it."""
    call = _NoLeaderCall(write=True, timeout=5.0)
    delay = call.state.failed(TIMED_OUT, call.state.target())
    call.now += delay + 0.001
    with pytest.raises(OutcomeUnknown) as e:
        call.state.failed(DISK_FULL, call.state.target())
    assert "An earlier attempt of this write may have been applied" in e.value.message


def test_a_retry_whose_budget_went_meanwhile_is_not_sent() -> None:
    # Between a failure and the next attempt the client may refresh its map,
    # which can spend most of what was left: the floor holds at the send.
    write = _NoLeaderCall(write=True, timeout=1.0)
    write.attempt()
    write.now = 0.96  # a slow map refresh
    with pytest.raises(Unavailable, match="It was not applied"):
        write.state.attempt_timeout()
    read = _NoLeaderCall(write=False, timeout=1.0)
    read.attempt()
    read.now = 0.96
    assert read.state.attempt_timeout() == pytest.approx(0.02)


# ---------------------------------------------------------------------------
# a tiny server: DEADLINE_EXCEEDED after applying, then success
# ---------------------------------------------------------------------------


class TinyNode(pb_grpc.CacheServicer, pb_grpc.AdminServicer):
    """One node, one shard.  The first Incr applies, then claims DEADLINE_EXCEEDED."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counter = 0
        self.incr_calls: list[tuple[bytes, int]] = []
        self.results: dict[tuple[bytes, int], int] = {}
        self.address = ""

    def GetClusterMap(self, request: Any, context: Any) -> pb.ClusterMap:
        return pb.ClusterMap(
            version=1,
            nodes=[pb.NodeInfo(id="t1", address=self.address, raft_address="127.0.0.1:2")],
            shards=[
                pb.ShardDescriptor(
                    id=0, range_start=0, range_end=(1 << 64) - 1, epoch=1, replicas=["t1"]
                )
            ],
            leaders={0: "t1"},
        )

    def Batch(self, request: pb.BatchRequest, context: Any) -> pb.BatchResponse:
        return batch_via_unary(self, request, context)

    def Incr(self, request: pb.IncrRequest, context: Any) -> pb.IncrResponse:
        rid = (request.header.request_id.client_id, request.header.request_id.seq)
        with self.lock:
            self.incr_calls.append(rid)
            if rid not in self.results:  # apply at most once per request id
                self.counter += request.delta
                self.results[rid] = self.counter
            first = len(self.incr_calls) == 1
            value = self.results[rid]
        if first:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "took too long")
        return pb.IncrResponse(value=value, version=len(self.incr_calls))


@pytest.fixture
def tiny() -> Any:
    node = TinyNode()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CacheServicer_to_server(node, server)
    pb_grpc.add_AdminServicer_to_server(node, server)
    port = server.add_insecure_port("127.0.0.1:0")
    node.address = f"127.0.0.1:{port}"
    server.start()
    yield node
    server.stop(None).wait()


def test_retried_incr_reuses_request_id_and_applies_once(tiny: TinyNode) -> None:
    with CacheClient([tiny.address], timeout=3.0, client_id=b"tester") as c:
        assert c.incr("counter", 5) == 5
        assert len(tiny.incr_calls) == 2
        assert tiny.incr_calls[0] == tiny.incr_calls[1] == (b"tester", tiny.incr_calls[0][1])
        assert tiny.counter == 5
        # the next user call is a new write: new request id
        assert c.incr("counter", 1) == 6
        assert tiny.incr_calls[2][1] == tiny.incr_calls[0][1] + 1


def test_async_retried_incr_reuses_request_id(tiny: TinyNode) -> None:
    async def run() -> int:
        async with AsyncCacheClient([tiny.address], timeout=3.0) as c:
            return await c.incr("counter", 2)

    assert asyncio.run(run()) == 2
    assert len(tiny.incr_calls) == 2 and tiny.incr_calls[0] == tiny.incr_calls[1]
    assert tiny.counter == 2


# ---------------------------------------------------------------------------
# FakeCluster: routing and retries across nodes
# ---------------------------------------------------------------------------


@pytest.fixture
def cluster() -> Any:
    with FakeCluster(nodes=3, shards=4) as fc:
        yield fc


def test_basic_operations(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints[:1]) as c:
        assert c.get("missing") is None
        assert c.set("k", "v1") is True
        r = c.get("k")
        assert isinstance(r, GetResult) and r.value == b"v1" and r.ttl_ms is None and r.version > 0
        assert r.served_by == cluster.leader_of_key(b"k")
        assert c.get(b"k", consistency="stale") is not None
        assert c.set("k", "v2", if_absent=True) is False
        assert c.set("new", "x", if_present=True) is False
        assert c.set("k", b"\x00\xff", if_present=True) is True
        assert c.get("k").value == b"\x00\xff"  # type: ignore[union-attr]
        assert c.ttl("k") == -1
        assert c.ttl("missing") is None
        assert c.set("t", "v", ttl_ms=60_000)
        ttl = c.ttl("t")
        assert ttl is not None and 0 < ttl <= 60_000
        assert c.delete("k") is True and c.delete("k") is False
        assert c.incr("n") == 1 and c.incr("n", 10) == 11 and c.incr("n", -12) == -1
        res = c.cas("c", "1", absent=True)
        assert isinstance(res, CasResult) and res.succeeded and bool(res)
        bad = c.cas("c", "2", expected="nope")
        assert not bad and bad.current_value == b"1" and bad.current_version == res.version
        assert c.cas("c", "2", expected="1").succeeded
        v = c.get("c").version  # type: ignore[union-attr]
        assert c.cas("c", "3", expected_version=v).succeeded
        assert not c.cas("c", "4", expected_version=0).succeeded  # 0 = must be absent
        c.set("txt", "hello")
        with pytest.raises(FailedPrecondition, match="not an integer"):
            c.incr("txt")
    # not retried: exactly one Incr reached the cluster for that call
    assert len([x for x in cluster.calls("Incr") if x.request.key == b"txt"]) == 1


def test_requests_go_straight_to_leaders_with_no_forward(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints[:1]) as c:
        for i in range(20):
            c.set(f"key{i}", "v")
        for call in cluster.calls("Set"):
            assert call.request.header.no_forward
            assert call.node == cluster.leader_of_key(call.request.key)
            assert call.request.header.shard_epoch == 1
            assert call.request.header.request_id.seq > 0


def test_not_leader_hint_is_followed_and_cached(cluster: FakeCluster) -> None:
    key = b"hello"
    with CacheClient(cluster.endpoints[:1]) as c:
        c.set(key, "1")
        shard, old, new = cluster.leader_and_follower(key)
        cluster.move_leader(shard.id, new)
        cluster.clear_calls()
        c.set(key, "2")
        nodes = [x.node for x in cluster.calls("Set")]
        assert nodes == [old, new]  # one redirect, no map refresh needed
        assert not cluster.calls("GetClusterMap")
        cluster.clear_calls()
        c.get(key)
        assert [x.node for x in cluster.calls("Get")] == [new]  # cached


def test_a_leader_transfer_costs_a_backoff_not_a_share_of_the_timeout(cluster: FakeCluster) -> None:
    """Found with a 30 s timeout: the leader answered "not the leader, leader
    unknown" for the instant of a transfer, and the client waited a quarter
    of its budget (7.5 s) before asking again.  It waits a short backoff."""
    key = b"transfer"
    with CacheClient(cluster.endpoints, timeout=30.0, max_attempts=4) as c:
        c.set(key, "1")
        shard, old, new = cluster.leader_and_follower(key)
        # Every replica says "not the leader, leader unknown" twice, then the transfer is done.
        cluster.inject(
            Fault("Set", grpc.StatusCode.FAILED_PRECONDITION, kind="not_leader", count=2)
        )
        cluster.move_leader(shard.id, new)
        t0 = time.monotonic()
        assert c.set(key, "2") is True
        assert time.monotonic() - t0 < 1.0
        # Elections do not use up the attempts either: more of them than
        # max_attempts, each after a backoff, all within the timeout.
        cluster.inject(
            Fault("Set", grpc.StatusCode.FAILED_PRECONDITION, kind="not_leader", count=6)
        )
        cluster.clear_calls()
        assert c.set(key, "3") is True
        assert (
            len(cluster.calls("Set")) >= 7
        )  # 6 refusals (and maybe a probe of a follower), then the write


def test_unknown_leader_probes_replicas(cluster: FakeCluster) -> None:
    cluster.state.published_leaders = {}  # the map names no leaders
    with CacheClient(cluster.endpoints[:1]) as c:
        assert c.set("probe", "v") is True
        assert c.get("probe").value == b"v"  # type: ignore[union-attr]


def test_epoch_mismatch_refreshes_map(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints[:1]) as c:
        c.set("a", "1")
        cluster.inject(Fault("Set", grpc.StatusCode.ABORTED, kind="epoch_mismatch"))
        maps_before = len(cluster.calls("GetClusterMap"))
        assert c.set("a", "2") is True
        assert len(cluster.calls("GetClusterMap")) == maps_before + 1


def test_never_retries_definite_request_errors(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints) as c:
        for kind, code, cls in [
            ("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
            ("failed_precondition", grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        ]:
            cluster.clear_calls()
            cluster.inject(Fault("Set", code, kind=kind))
            with pytest.raises(cls):
                c.set("x", "y")
            assert len(cluster.calls("Set")) == 1


def test_overloaded_is_retried_with_backoff(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints, max_attempts=4) as c:
        cluster.inject(Fault("Get", grpc.StatusCode.RESOURCE_EXHAUSTED, kind="overloaded", count=2))
        assert c.get("x") is None
        assert len(cluster.calls("Get")) == 3
        cluster.clear_calls()
        cluster.inject(
            Fault("Get", grpc.StatusCode.RESOURCE_EXHAUSTED, kind="overloaded", count=10)
        )
        with pytest.raises(Overloaded, match="overloaded"):
            c.get("x")
        assert len(cluster.calls("Get")) == 4


def test_write_with_unknown_outcome_retried_on_new_leader_applies_once(
    cluster: FakeCluster,
) -> None:
    key = b"acct"
    with CacheClient(cluster.endpoints[:1], timeout=3.0) as c:
        c.set(key, "100")
        shard, old, new = cluster.leader_and_follower(key)
        # the old leader applies the incr, then times out; meanwhile leadership moves
        fault = cluster.inject(
            Fault("Incr", grpc.StatusCode.DEADLINE_EXCEEDED, node=old, apply_first=True)
        )
        orig = cluster.state.fault_for

        def moving(node: str, method: str) -> Fault | None:
            f = orig(node, method)
            if f is fault:
                cluster.move_leader(shard.id, new)
            return f

        cluster.state.fault_for = moving  # type: ignore[method-assign]
        assert c.incr(key, 5) == 105
        incrs = cluster.calls("Incr")
        assert [x.node for x in incrs][0] == old and incrs[-1].node == new
        rids = {
            (x.request.header.request_id.client_id, x.request.header.request_id.seq) for x in incrs
        }
        assert len(rids) == 1
        assert cluster.state.applies[rids.pop()] == 1
        assert c.get(key).value == b"105"  # type: ignore[union-attr]


def test_write_that_keeps_timing_out_raises_outcome_unknown(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints, timeout=1.0, max_attempts=3) as c:
        cluster.inject(
            Fault("Set", grpc.StatusCode.DEADLINE_EXCEEDED, kind="outcome_unknown", count=10)
        )
        with pytest.raises(OutcomeUnknown, match="may or may not have been applied"):
            c.set("k", "v")
        sets = cluster.calls("Set")
        assert len(sets) == 3
        assert len({x.request.header.request_id.seq for x in sets}) == 1


def test_definite_failures_say_not_applied(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints, timeout=1.0, max_attempts=3) as c:
        # "No leader / no quorum" answers are waited out (with backoff) until
        # the timeout, not counted against max_attempts.
        cluster.inject(Fault("Set", grpc.StatusCode.UNAVAILABLE, kind="unavailable", count=1000))
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="It was not applied"):
            c.set("k", "v")
        assert time.monotonic() - t0 < 1.5
        assert len(cluster.calls("Set")) > 3


def test_deadline_bounds_a_slow_node(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints, timeout=0.6) as c:
        c.get("warm")  # learn the map first
        cluster.inject(Fault("Get", grpc.StatusCode.OK, delay_s=2.0, count=10))
        t0 = time.monotonic()
        with pytest.raises(OutcomeUnknown, match="got no answer"):
            c.get("k")
        assert time.monotonic() - t0 < 1.0


def test_node_down_fails_over_to_new_leader(cluster: FakeCluster) -> None:
    key = b"failover"
    with CacheClient(cluster.endpoints, timeout=3.0) as c:
        c.set(key, "1")
        shard, old, new = cluster.leader_and_follower(key)
        cluster.nodes[old].stop()
        cluster.move_leader(shard.id, new)
        assert c.set(key, "2") is True
        assert c.get(key).value == b"2"  # type: ignore[union-attr]


def test_stale_hint_to_dead_leader_waits_for_the_election(cluster: FakeCluster) -> None:
    key = b"election"
    with CacheClient(cluster.endpoints, timeout=4.0, max_attempts=6) as c:
        c.set(key, "1")
        shard, old, new = cluster.leader_and_follower(key)
        cluster.nodes[old].stop()  # followers keep naming the dead node in their hints
        timer = threading.Timer(1.0, cluster.move_leader, (shard.id, new))  # the election ends
        timer.start()
        try:
            t0 = time.monotonic()
            assert c.set(key, "2") is True
            assert 0.9 < time.monotonic() - t0 < 4.0
        finally:
            timer.cancel()
        # attempts were spread over the wait instead of being burnt at once
        assert len(cluster.calls("Set")) <= 1 + 6


def test_unreachable_endpoints_fail_fast_with_readable_error() -> None:
    with CacheClient([UNREACHABLE, "127.0.0.1:2"], timeout=2.0) as c:
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as info:
            c.get("k")
        assert time.monotonic() - t0 < 2.5
        msg = str(info.value)
        assert "127.0.0.1:1" in msg and "127.0.0.1:2" in msg and "\n" not in msg


def test_mget_mset_fan_out_per_shard(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints[:1]) as c:
        data = {f"k{i}": f"v{i}" for i in range(40)}
        assert c.mset(data) == 40
        msets = cluster.calls("MSet")
        assert len(msets) == 4  # one per shard
        for call in msets:
            assert call.node == cluster.leader_of_key(call.request.items[0].key)
        assert len({x.request.header.request_id.seq for x in msets}) == 4
        got = c.mget([*data, "absent"])
        assert got["absent"] is None
        assert {k: r.value.decode() for k, r in got.items() if r} == data
        assert len(cluster.calls("MGet")) == 4
        assert c.mset([("a", "1"), ("a", "2")], ttl_ms=5000) == 1
        a = c.mget([b"a"])[b"a"]
        assert a is not None and a.value == b"2" and a.ttl_ms is not None


def test_mset_partial_failure_is_explained(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints[:1], max_attempts=2) as c:
        cluster.inject(
            Fault("MSet", grpc.StatusCode.FAILED_PRECONDITION, kind="failed_precondition", count=1)
        )
        with pytest.raises(
            FailedPrecondition, match=r"1 of 4 shard writes failed.*atomic per shard"
        ):
            c.mset({f"k{i}": "v" for i in range(40)})


def test_proxy_routing_lets_the_endpoint_forward(cluster: FakeCluster) -> None:
    first = cluster.endpoints[0]
    with CacheClient([first], routing="proxy") as c:
        for i in range(10):
            c.set(f"p{i}", "v")
            c.get(f"p{i}", consistency="stale")
        assert not cluster.calls("GetClusterMap")  # single-key ops need no map
        assert {x.node for x in cluster.calls("Set")} == {"n1"}
        assert all(not x.request.header.no_forward for x in cluster.calls("Set"))
        assert all(x.request.header.consistency == pb.STALE for x in cluster.calls("Get"))


def test_proxy_routing_moves_to_next_endpoint_when_one_is_down(cluster: FakeCluster) -> None:
    cluster.nodes["n1"].stop()
    with CacheClient(
        [cluster.nodes["n1"].address, cluster.nodes["n2"].address], routing="proxy"
    ) as c:
        assert c.set("x", "1")
        assert c.get("x").value == b"1"  # type: ignore[union-attr]


def test_cluster_map_leaders_and_node_status(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints[:1]) as c:
        m = c.cluster_map()
        assert [n.id for n in m.nodes] == ["n1", "n2", "n3"] and len(m.shards) == 4
        assert c.leaders() == cluster.state.leaders
        st = c.node_status("n2")
        assert st.node.id == "n2" and {r.shard_id for r in st.replicas} == {0, 1, 2, 3}
        assert c.node_status(cluster.nodes["n3"].address).node.id == "n3"
        cluster.nodes["n3"].stop()
        with pytest.raises(Unavailable):
            c.node_status("n3")


def test_closed_client_raises_unavailable(cluster: FakeCluster) -> None:
    c = CacheClient(cluster.endpoints)
    c.set("a", "b")
    c.close()
    c.close()
    with pytest.raises(Unavailable, match="closed"):
        c.get("a")


def test_threads_share_one_client(cluster: FakeCluster) -> None:
    with CacheClient(cluster.endpoints) as c:

        def work(i: int) -> int:
            return c.incr("shared")

        with futures.ThreadPoolExecutor(8) as pool:
            results = sorted(pool.map(work, range(50)))
        assert results == list(range(1, 51))
        seqs = [x.request.header.request_id.seq for x in cluster.calls("Incr")]
        assert len(set(seqs)) == 50


# ---------------------------------------------------------------------------
# async client
# ---------------------------------------------------------------------------


def test_async_client_full_api(cluster: FakeCluster) -> None:
    async def run() -> None:
        async with AsyncCacheClient(cluster.endpoints[:1]) as c:
            assert await c.get("k") is None
            assert await c.set("k", "v") is True
            r = await c.get("k")
            assert r is not None and r.value == b"v"
            assert await c.ttl("k") == -1
            assert await c.incr("n", 3) == 3
            assert (await c.cas("k", "w", expected="v")).succeeded
            assert await c.delete("k") is True
            data = {f"a{i}": str(i) for i in range(30)}
            assert await c.mset(data) == 30
            got = await c.mget(list(data))
            assert {k: v.value.decode() for k, v in got.items() if v} == data
            results = await asyncio.gather(*(c.incr("par") for _ in range(20)))
            assert sorted(results) == list(range(1, 21))
            m = await c.cluster_map()
            assert len(m.shards) == 4
            st = await c.node_status("n1")
            assert st.node.id == "n1"
            with pytest.raises(InvalidArgument):
                await c.set("", "x")

    asyncio.run(run())


def test_async_client_retries_and_redirects(cluster: FakeCluster) -> None:
    key = b"async-key"

    async def run() -> None:
        async with AsyncCacheClient(cluster.endpoints[:1], timeout=3.0) as c:
            await c.set(key, "1")
            shard, _, new = cluster.leader_and_follower(key)
            cluster.move_leader(shard.id, new)
            cluster.inject(Fault("Set", grpc.StatusCode.RESOURCE_EXHAUSTED, kind="overloaded"))
            assert await c.set(key, "2")
            cluster.inject(
                Fault("Set", grpc.StatusCode.DEADLINE_EXCEEDED, kind="outcome_unknown", count=10)
            )
            with pytest.raises(OutcomeUnknown):
                await c.set(key, "3")

    asyncio.run(run())


def test_async_unreachable() -> None:
    async def run() -> None:
        async with AsyncCacheClient([UNREACHABLE], timeout=1.0) as c:
            with pytest.raises(Unavailable, match="127.0.0.1:1"):
                await c.get("k")

    asyncio.run(run())


def test_errors_are_cache_errors() -> None:
    for cls in (EpochMismatch, FailedPrecondition, Overloaded, Unavailable, OutcomeUnknown):
        assert issubclass(cls, CacheError)
