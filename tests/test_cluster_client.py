"""The smart client, the async client and cachectl against a REAL 3-node cluster.

One cluster (started with `cachectl local up`, always torn down by PID) serves
the whole module; the tests that stop nodes come last.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
if str(TESTS.parent / "cli") not in sys.path:
    sys.path.insert(0, str(TESTS.parent / "cli"))

from _cluster import local_cluster  # noqa: E402
from cachectl.main import main  # noqa: E402

from cachenode._errors import FailedPrecondition  # noqa: E402
from cachenode.client import AsyncCacheClient, CacheClient  # noqa: E402

pytestmark = pytest.mark.cluster

SHARDS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    directory = tmp_path_factory.mktemp("cluster")
    with local_cluster(directory, nodes=3, shards=SHARDS) as endpoints:
        yield directory, endpoints


@pytest.fixture
def endpoints(cluster: tuple[Path, list[str]]) -> list[str]:
    return cluster[1]


def ctl(*argv: str, endpoint: str | None = None, timeout: float = 10.0) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    env = dict(os.environ)
    if endpoint:
        env["CACHECTL_ENDPOINTS"] = endpoint
    code = main(["--timeout", str(timeout), *argv], env, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_smart_client_operations(endpoints: list[str]) -> None:
    with CacheClient(endpoints[:1], timeout=10.0) as c:
        assert c.get("sc:missing") is None
        assert c.set("sc:k", "v1") is True
        r = c.get("sc:k")
        assert r is not None and r.value == b"v1" and r.ttl_ms is None and r.version > 0
        assert c.set("sc:k", "x", if_absent=True) is False
        assert c.set("sc:absent", "x", if_present=True) is False
        assert c.ttl("sc:k") == -1 and c.ttl("sc:missing") is None
        assert c.set("sc:t", "v", ttl_ms=60_000)
        ttl = c.ttl("sc:t")
        assert ttl is not None and 0 < ttl <= 60_000
        assert c.incr("sc:n") == 1 and c.incr("sc:n", 41) == 42 and c.incr("sc:n", -2) == 40
        c.set("sc:text", "abc")
        with pytest.raises(FailedPrecondition):
            c.incr("sc:text")
        assert c.cas("sc:c", "1", absent=True).succeeded
        bad = c.cas("sc:c", "2", expected="nope")
        assert not bad.succeeded and bad.current_value == b"1"
        assert c.cas("sc:c", "2", expected="1").succeeded
        version = c.get("sc:c").version  # type: ignore[union-attr]
        assert c.cas("sc:c", "3", expected_version=version).succeeded
        assert not c.cas("sc:c", "4", expected_version=version).succeeded
        assert c.delete("sc:c") is True and c.delete("sc:c") is False
        stale = c.get("sc:k", consistency="stale")
        assert stale is not None and stale.value == b"v1"


def test_an_mget_answer_larger_than_grpcs_default_message_reaches_the_client(endpoints: list[str]) -> None:
    """gRPC receives at most 4 MiB by default.  Twelve 1 MiB values over
    three nodes put at least four in one node's answer."""
    keys = [f"mib:{i}" for i in range(12)]
    with CacheClient(endpoints, timeout=30.0) as c:
        c.mset({k: bytes([i]) * (1 << 20) for i, k in enumerate(keys)})
        got = c.mget(keys)
        assert [got[k].value for k in keys] == [bytes([i]) * (1 << 20) for i in range(12)]
    code, out, err = ctl("mget", *keys, "--json", endpoint=",".join(endpoints), timeout=30.0)  # cachectl too
    assert code == 0, err
    assert len(out) > 12 * (1 << 20)


def test_smart_client_covers_every_shard(endpoints: list[str]) -> None:
    with CacheClient(endpoints, timeout=10.0) as c:
        data = {f"many:{i}": f"v{i}" for i in range(200)}
        assert c.mset(data) == 200
        table = c.route_table
        assert table is not None
        assert {table.shard_for_key(k.encode()).id for k in data} == set(range(SHARDS))
        got = c.mget([*data, "many:absent"])
        assert got["many:absent"] is None
        assert {k: v.value.decode() for k, v in got.items() if v} == data
        for k in list(data)[:40]:  # single-key reads hit every shard leader too
            assert c.get(k).value == data[k].encode()  # type: ignore[union-attr]
        assert c.mset({"many:ttl": "x"}, ttl_ms=30_000) == 1
        r = c.mget(["many:ttl"])["many:ttl"]
        assert r is not None and r.ttl_ms is not None and 0 < r.ttl_ms <= 30_000


def test_incr_is_exactly_once_under_concurrency(endpoints: list[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with CacheClient(endpoints, timeout=10.0) as c:
        with ThreadPoolExecutor(8) as pool:
            results = sorted(pool.map(lambda _: c.incr("conc:n"), range(100)))
        assert results == list(range(1, 101))
        assert c.get("conc:n").value == b"100"  # type: ignore[union-attr]


def test_async_client(endpoints: list[str]) -> None:
    async def run() -> None:
        async with AsyncCacheClient(endpoints, timeout=10.0) as c:
            assert await c.set("as:k", "v") is True
            r = await c.get("as:k")
            assert r is not None and r.value == b"v"
            assert await c.ttl("as:k") == -1
            assert (await c.cas("as:k", "w", expected="v")).succeeded
            results = await asyncio.gather(*(c.incr("as:n") for _ in range(30)))
            assert sorted(results) == list(range(1, 31))
            data = {f"as:{i}": str(i) for i in range(60)}
            assert await c.mset(data) == 60
            got = await c.mget(list(data))
            assert {k: v.value.decode() for k, v in got.items() if v} == data
            assert await c.delete("as:k") is True
            m = await c.cluster_map()
            assert len(m.nodes) == 3 and len(m.shards) == SHARDS

    asyncio.run(run())


@pytest.mark.parametrize("forward", [False, True], ids=["smart", "forward"])
def test_cachectl_against_every_endpoint(endpoints: list[str], forward: bool) -> None:
    mode = ["--forward"] if forward else []
    for i, ep in enumerate(endpoints):
        key = f"ctl:{int(forward)}:{i}"
        assert ctl(*mode, "set", key, f"value-{i}", endpoint=ep)[:2] == (0, "OK\n")
        # read it back through every endpoint
        for other in endpoints:
            assert ctl(*mode, "get", key, endpoint=other)[:2] == (0, f"value-{i}\n")
        code, out, _ = ctl(*mode, "get", key, "--json", endpoint=ep)
        doc = json.loads(out)
        assert (
            code == 0
            and doc["value"] == f"value-{i}"
            and doc["version"] > 0
            and doc["ttl_ms"] is None
        )
        assert ctl(*mode, "get", f"{key}:missing", "--json", endpoint=ep)[1].startswith('{"key"')
        assert ctl(*mode, "incr", f"{key}:n", "7", endpoint=ep)[1] == "7\n"
        assert ctl(*mode, "cas", key, "swapped", "--expected", f"value-{i}", endpoint=ep)[0] == 0
        assert ctl(*mode, "cas", key, "again", "--expected", f"value-{i}", endpoint=ep)[0] == 1
        assert ctl(*mode, "set", f"{key}:t", "v", "--ttl", "50000", endpoint=ep)[0] == 0
        assert 0 < int(ctl(*mode, "ttl", f"{key}:t", endpoint=ep)[1]) <= 50000
        assert (
            ctl(*mode, "mset", f"{key}:a", "1", f"{key}:b", "2", endpoint=ep)[1] == "OK (2 keys)\n"
        )
        assert (
            ctl(*mode, "mget", f"{key}:a", f"{key}:zz", f"{key}:b", endpoint=ep)[1]
            == "1\n(nil)\n2\n"
        )
        assert ctl(*mode, "del", f"{key}:a", endpoint=ep)[1] == "deleted\n"
        code, out, _ = ctl(*mode, "get", key, "--stale", "--json", endpoint=ep)
        assert code == 0 and json.loads(out)["value"] == "swapped"


def test_status_json_shape(endpoints: list[str]) -> None:
    code, out, err = ctl("status", "--json", endpoint=",".join(endpoints))
    assert code == 0, err
    doc = json.loads(out)
    assert [n["id"] for n in doc["nodes"]] == ["n1", "n2", "n3"]
    for n in doc["nodes"]:
        assert n["state"] == "up" and n["address"] in endpoints and n["raft_address"]
        assert sorted(n["replicas"]) == list(range(SHARDS))
    assert sorted(s for n in doc["nodes"] for s in n["leaders"]) == list(range(SHARDS))
    assert [s["id"] for s in doc["shards"]] == list(range(SHARDS))
    for s in doc["shards"]:
        assert s["leader"] in {"n1", "n2", "n3"}
        assert sorted(s["replicas"]) == ["n1", "n2", "n3"]
        assert s["term"] >= 1 and s["applied_index"] >= 0 and s["epoch"] >= 1
        assert len(s["range"]) == 2
    assert doc["shards"][0]["range"][0] == 0 and doc["shards"][-1]["range"][1] == 2**64 - 1
    code, out, _ = ctl("status", endpoint=endpoints[0])
    assert code == 0 and f"3/3 nodes up, {SHARDS}/{SHARDS} shards have a leader" in out


# ---- these change the cluster: keep them last ------------------------------


def _leader_of(endpoints: list[str], key: str) -> str:
    with CacheClient(endpoints, timeout=10.0) as c:
        c.cluster_map()
        table = c.route_table
        assert table is not None
        leader = table.leader(table.shard_for_key(key.encode()).id)
        assert leader is not None
        return leader


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux only")
@pytest.mark.skipif(
    hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER,
    reason="the nodes inherit this runner's scheduling policy, which is not the default one",
)
def test_every_thread_of_a_node_runs_under_sched_batch(cluster: tuple[Path, list[str]]) -> None:
    """`cachectl local up` starts nodes with the default --cpu-policy: every
    thread, the ones gRPC and the Raft driver started too, is SCHED_BATCH."""
    import contextlib

    from _cluster import recorded_pids

    pids = recorded_pids(cluster[0])
    assert len(pids) == 3
    for pid in pids:
        policies = {}
        for tid in (int(t) for t in os.listdir(f"/proc/{pid}/task")):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                policies[tid] = os.sched_getscheduler(tid)
        assert len(policies) > 5, policies  # gRPC's threads, the workers, the driver
        assert set(policies.values()) == {os.SCHED_BATCH}, policies


def test_leader_failover_and_restart(cluster: tuple[Path, list[str]]) -> None:
    directory, endpoints = cluster
    key = "fo:key"
    with CacheClient(endpoints, timeout=15.0, max_attempts=8) as c:
        assert c.set(key, "before")
        leader = _leader_of(endpoints, key)
        code, out, err = ctl("local", "stop-node", "--dir", str(directory), leader, "--kill")
        assert code == 0, err
        t0 = time.monotonic()
        assert c.set(key, "after") is True  # waits for the election, then goes to the new leader
        assert c.incr("fo:n", 1) == 1
        assert c.get(key).value == b"after"  # type: ignore[union-attr]
        assert time.monotonic() - t0 < 15
        code, out, _ = ctl("status", "--json", endpoint=",".join(endpoints))
        states = {n["id"]: n["state"] for n in json.loads(out)["nodes"]}
        assert states[leader] == "down" and list(states.values()).count("up") == 2

        code, out, err = ctl("local", "start-node", "--dir", str(directory), leader)
        assert code == 0, err
        # the restarted node catches up and serves stale reads of its replica
        deadline = time.monotonic() + 30
        while True:
            code, out, _ = ctl(
                "get", key, "--forward", "--stale", "--json", endpoint=_address(directory, leader)
            )
            if code == 0 and json.loads(out)["value"] == "after":
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.3)


def test_whole_cluster_restart_keeps_data(cluster: tuple[Path, list[str]]) -> None:
    directory, endpoints = cluster
    with CacheClient(endpoints, timeout=10.0) as c:
        c.set("rs:k", "durable")
    code, _, err = ctl("local", "down", "--dir", str(directory))
    assert code == 0, err
    code, out, err = ctl("local", "up", "--dir", str(directory), "--wait", "90", "--json")
    assert code == 0, err
    assert json.loads(out)["endpoints"] == ",".join(endpoints)
    with CacheClient(endpoints, timeout=10.0) as c:
        r = c.get("rs:k")
        assert r is not None and r.value == b"durable"


def _address(directory: Path, node_id: str) -> str:
    doc: dict[str, Any] = json.loads((directory / "cluster.json").read_text())
    return next(n["address"] for n in doc["nodes"] if n["id"] == node_id)


def test_local_up_starts_again_on_new_ports_when_a_node_finds_its_port_taken(tmp_path: Path) -> None:
    """The ports of a new cluster are chosen free, then closed, then bound by
    the nodes: another process can take one in between.  Here a socket holds
    n2's client port before the nodes start; n2 exits (it cannot listen) and
    ``local up`` starts the cluster again on new ports."""
    import socket

    from _cluster import kill_by_pid, recorded_pids
    from cachectl import local
    from cachectl.main import Context, build_parser
    from cachectl.output import Output

    taken = socket.create_server(("127.0.0.1", 0))
    chosen: list[list[int]] = []

    def choose(host: str, count: int) -> list[int]:
        ports = local.free_ports(host, count)
        if not chosen:
            ports[2] = taken.getsockname()[1]  # n2's client port
        chosen.append(ports)
        return ports

    env = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    argv = ["local", "up", "--nodes", "3", "--shards", "2", "--dir", str(tmp_path), "--wait", "90"]
    ctx = Context(build_parser().parse_args(argv), env, Output(out, err, env))
    pids: list[int] = []
    try:
        assert local.cmd_up(ctx, choose_ports=choose) == 0, err.getvalue()
        pids = recorded_pids(tmp_path)
        assert len(chosen) == 2
        doc = json.loads((tmp_path / "cluster.json").read_text())
        addresses = [n["address"] for n in doc["nodes"]]
        assert f"127.0.0.1:{taken.getsockname()[1]}" not in addresses
        assert "n2's port was taken before it could listen" in err.getvalue()
        said = f"cannot listen for clients on 127.0.0.1:{taken.getsockname()[1]}: address already in use"
        assert said in (tmp_path / "n2" / "node.log").read_text()
        with CacheClient(addresses, timeout=10.0) as c:
            c.set("retry:k", b"v")
            assert c.get("retry:k").value == b"v"
    finally:
        pids = sorted(set(pids) | set(recorded_pids(tmp_path)))
        main(["local", "down", "--dir", str(tmp_path)], env, stdout=io.StringIO(), stderr=io.StringIO())
        kill_by_pid(pids)
        taken.close()
