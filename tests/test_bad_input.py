"""Bad input and overload get precise statuses; nothing is half-applied."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from _nodes import LocalCluster, cachectl, local_cluster, wait_for

from cachenode.v1 import cache_pb2 as pb

pytestmark = pytest.mark.cluster
IA = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path_factory.mktemp("bad") / "c", nodes=3, shards=2) as c:
        yield c


def status_of(call: object, *args: object) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    try:
        call(*args, timeout=5)  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code(), e.details() or "", dict(e.trailing_metadata() or ())
    raise AssertionError("the call succeeded")


CASES = [
    ("empty key", "Set", pb.SetRequest(key=b"", value=b"v"), IA, "key is empty"),
    ("key over 1 KiB", "Set", pb.SetRequest(key=b"k" * 1025, value=b"v"), IA, "limit is 1024"),
    ("value over 1 MiB", "Set", pb.SetRequest(key=b"k", value=b"v" * (1024 * 1024 + 1)), IA, "limit is 1048576"),
    ("unknown consistency", "Get", pb.GetRequest(key=b"k", header=pb.RequestHeader(consistency=7)), IA, "unknown consistency"),
    ("empty client id", "Incr", pb.IncrRequest(key=b"k", header=pb.RequestHeader(request_id=pb.RequestId(client_id=b"", seq=1))), IA, "client_id"),
    ("long client id", "Incr", pb.IncrRequest(key=b"k", header=pb.RequestHeader(request_id=pb.RequestId(client_id=b"c" * 65, seq=1))), IA, "client_id"),
    ("seq zero", "Incr", pb.IncrRequest(key=b"k", header=pb.RequestHeader(request_id=pb.RequestId(client_id=b"c", seq=0))), IA, "seq"),
    ("cas without expectation", "CompareAndSet", pb.CompareAndSetRequest(key=b"k", new_value=b"v"), IA, "expected"),
    ("unknown set condition", "Set", pb.SetRequest(key=b"k", value=b"v", condition=9), IA, "condition"),
    ("mget of nothing", "MGet", pb.MGetRequest(), IA, "no keys"),
    ("huge ttl", "Set", pb.SetRequest(key=b"k", value=b"v", ttl_ms=1 << 50), IA, "ttl_ms"),
]


@pytest.mark.parametrize("name,method,req,code,text", CASES, ids=[c[0] for c in CASES])
def test_bad_request_status(cluster: LocalCluster, name: str, method: str, req: object, code: grpc.StatusCode, text: str) -> None:
    for nid in cluster.node_ids:  # leader or not: validation comes first
        got, details, md = status_of(getattr(cluster.cache(nid), method), req)
        assert got == code, (name, got, details)
        assert text in details
        assert md.get("cachenode-error") == "invalid_argument"


def test_mset_with_one_bad_key_writes_nothing(cluster: LocalCluster) -> None:
    items = [pb.KeyValue(key=f"half/{i}".encode(), value=b"v") for i in range(20)] + [pb.KeyValue(key=b"", value=b"v")]
    code, _, _ = status_of(cluster.cache(cluster.node_ids[0]).MSet, pb.MSetRequest(items=items))
    assert code == IA
    r = cluster.cache(cluster.node_ids[1]).MGet(pb.MGetRequest(keys=[i.key for i in items[:20]]), timeout=5)
    assert not any(it.found for it in r.items)


def test_incr_on_text_is_failed_precondition_and_changes_nothing(cluster: LocalCluster) -> None:
    stub = cluster.cache(cluster.node_ids[0])
    stub.Set(pb.SetRequest(key=b"txt", value=b"hello"), timeout=5)
    code, details, md = status_of(stub.Incr, pb.IncrRequest(key=b"txt", delta=1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not an integer" in details
    assert md["cachenode-error"] == "failed_precondition"
    assert stub.Get(pb.GetRequest(key=b"txt"), timeout=5).value == b"hello"


def test_a_request_id_reused_for_a_different_request_is_refused_and_changes_nothing(cluster: LocalCluster) -> None:
    """Answering it with the first request's result would acknowledge a write
    that was never applied, or hand an incr the answer of a set."""
    stub = cluster.cache(cluster.node_ids[0])
    h = pb.RequestHeader(request_id=pb.RequestId(client_id=b"reuser", seq=1))
    first = stub.Set(pb.SetRequest(header=h, key=b"reuse", value=b"first", ttl_ms=60_000), timeout=5)
    # The same request again is a retry (its TTL is stamped anew): the first answer.
    again = stub.Set(pb.SetRequest(header=h, key=b"reuse", value=b"first", ttl_ms=60_000), timeout=5)
    assert (again.applied, again.version) == (first.applied, first.version)
    reuses = [
        ("Set", pb.SetRequest(header=h, key=b"reuse", value=b"second")),
        ("Incr", pb.IncrRequest(header=h, key=b"reuse", delta=1)),
        ("Delete", pb.DeleteRequest(header=h, key=b"reuse")),
        ("CompareAndSet", pb.CompareAndSetRequest(header=h, key=b"reuse", expected_value=b"first", new_value=b"x")),
        ("MSet", pb.MSetRequest(header=h, items=[pb.KeyValue(key=b"reuse", value=b"m")])),
    ]
    for method, req in reuses:
        code, details, md = status_of(getattr(stub, method), req)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (method, code, details)
        assert f"request id (client {b'reuser'.hex()}, seq 1)" in details, details
        assert "was already used on this shard for a different request" in details
        assert "nothing was applied on this shard" in details
        assert md["cachenode-error"] == "failed_precondition"
    batch = stub.Batch(pb.BatchRequest(ops=[pb.BatchOp(incr=pb.IncrRequest(header=h, key=b"reuse", delta=1))]), timeout=5)
    assert batch.results[0].error.kind == "failed_precondition", batch
    assert batch.results[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    settled = stub.Get(pb.GetRequest(key=b"reuse"), timeout=5)  # linearizable: after every refusal
    assert (settled.value, settled.version) == (b"first", first.version)
    for nid in cluster.node_ids:  # and each replica's own state, once it has applied as far
        def caught_up(n: str = nid) -> pb.GetResponse | None:
            g = cluster.cache(n).Get(pb.GetRequest(key=b"reuse", header=pb.RequestHeader(consistency=pb.STALE)), timeout=5)
            return g if g.meta.applied_index >= settled.meta.applied_index else None
        g = wait_for(caught_up, 10, f"{nid} to apply the refusals")
        assert (g.value, g.version, g.meta.served_by) == (b"first", first.version, nid)


def test_unknown_shard_is_not_found(cluster: LocalCluster) -> None:
    code, details, _ = status_of(cluster.admin(cluster.node_ids[0]).GetShardStatus, pb.ShardStatusRequest(shard_id=999))
    assert code == grpc.StatusCode.NOT_FOUND and "999" in details


def test_not_leader_carries_a_hint(cluster: LocalCluster) -> None:
    leader = cluster.leader_of(0)
    other = next(n for n in cluster.node_ids if n != leader)
    key = next(f"nl{i}".encode() for i in range(1000) if cluster.shard_of(f"nl{i}".encode()) == 0)
    req = pb.SetRequest(key=key, value=b"v", header=pb.RequestHeader(no_forward=True))
    code, _, md = status_of(cluster.cache(other).Set, req)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert md["cachenode-error"] == "not_leader"
    assert md["cachenode-leader"] == f"{leader}@{cluster.address(leader)}"  # type: ignore[arg-type]


def test_cachectl_bad_input_one_line_nonzero(cluster: LocalCluster) -> None:
    env = {"CACHECTL_ENDPOINTS": cluster.endpoints}
    for args in (["set", "", "v"], ["set", "k" * 1025, "v"], ["get", "k" * 2000]):
        r = cachectl(*args, env=env)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "limit" in r.stderr or "empty" in r.stderr
    r = cachectl("set", "t", "x", env=env)
    assert r.returncode == 0
    r = cachectl("incr", "t", env=env)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "integer" in r.stderr


def test_cachectl_unreachable_node(tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = cachectl("--endpoints", f"127.0.0.1:{port}", "--timeout", "2", "get", "k", timeout=30)
    assert r.returncode == 3
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_quorum_is_unavailable_and_not_applied(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "q", nodes=3, shards=1) as c:
        leader = c.leader_of(0)
        assert leader
        others = [n for n in c.node_ids if n != leader]
        for n in others:
            c.kill9(n)
        refused_keys: list[bytes] = []
        attempt = iter(range(10_000))

        # Attempts before the leader notices may be appended (outcome unknown);
        # once it answers "unavailable" the write must never apply.
        def refused() -> bool:
            key = b"nq%d" % next(attempt)
            code, details, md = status_of(c.cache(leader).Set, pb.SetRequest(key=key, value=b"v"))
            if code == grpc.StatusCode.UNAVAILABLE and md.get("cachenode-error") == "unavailable":
                refused_keys.append(key)
                return True
            return False

        wait_for(refused, 10, "UNAVAILABLE without quorum")
        for _ in range(5):
            assert refused()
        for n in others:
            c.start_node(n)
        c.wait_all_leaders()
        r = c.cache(leader).MGet(pb.MGetRequest(keys=refused_keys), timeout=5)
        assert not any(it.found for it in r.items), "a write answered UNAVAILABLE was applied"


def test_stuck_quorum_gives_deadline_exceeded_outcome_unknown(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "d", nodes=3, shards=1) as c:
        leader = c.leader_of(0)
        assert leader
        others = [n for n in c.node_ids if n != leader]
        pids = [int(c.node(n)["pid"]) for n in others]
        for p in pids:
            os.kill(p, signal.SIGSTOP)  # links stay up, nobody answers
        try:
            try:
                c.cache(leader).Set(pb.SetRequest(key=b"dx", value=b"v"), timeout=0.5)
                raise AssertionError("the write succeeded without a quorum")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                md = dict(e.trailing_metadata() or ())
                # the server answers just before the caller's deadline, naming the unknown outcome
                assert md.get("cachenode-error") == "outcome_unknown", (e.details(), md)
                assert "outcome" in (e.details() or "")
        finally:
            for p in pids:
                os.kill(p, signal.SIGCONT)


def test_malformed_request_bytes_are_invalid_argument(cluster: LocalCluster) -> None:
    ch = cluster.channel(cluster.node_ids[0])
    raw = ch.unary_unary("/cachenode.v1.Cache/Get", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff\xff garbage", timeout=5)
    assert e.value.code() == IA
    assert "malformed Get request" in (e.value.details() or "")
    md = dict(e.value.trailing_metadata() or ())
    assert md["cachenode-error"] == "invalid_argument"
    # a well-formed request on the same channel still works
    assert not cluster.cache(cluster.node_ids[0]).Get(pb.GetRequest(key=b"absent-key"), timeout=5).found
