"""The benchmark tooling: the load generator against a real cluster, and the result document.

Never asserts speeds: only that every number exists, has the right shape,
and that nothing the benchmark started outlives it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import socket
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from _cluster import local_cluster
from cachectl.main import main

from cachenode.bench.loadgen import WORKLOADS, LatencyHistogram, _Values, bench_key
from cachenode.bench.report import (
    build_document,
    evaluate_goals,
    markdown,
    ratios,
    rich_tables,
    summarize,
)
from cachenode.bench.runner import run_phase, run_prefill, split_inflight
from cachenode.bench.systems import (
    EtcdCluster,
    RedisServer,
    free_ports,
    fs_type,
    no_service_starts,
)
from cachenode.bench.targets import TargetSpec

# ---- fast: no process started ---------------------------------------------------


def test_histogram_percentiles_are_within_one_percent() -> None:
    h = LatencyHistogram()
    values = [i / 10_000 for i in range(1, 10_001)]  # 0.1 ms .. 1 s
    for v in values:
        h.record(v)
    for q in (0.5, 0.99, 0.999):
        exact = values[math.ceil(q * len(values)) - 1]
        got = h.percentile(q)
        assert got is not None and exact <= got <= exact * 1.0101
    assert h.percentile(1.0) == pytest.approx(1.0)


def test_histogram_merge_and_json_round_trip() -> None:
    a, b = LatencyHistogram(), LatencyHistogram()
    for v in (0.001, 0.002, 0.003):
        a.record(v)
    b.record(0.5)
    a.merge(LatencyHistogram.from_json(json.loads(json.dumps(b.to_json()))))
    assert a.count == 4
    assert a.max_s == 0.5
    assert LatencyHistogram().percentile(0.5) is None


def test_split_inflight_spreads_evenly_and_never_idles_a_client() -> None:
    assert split_inflight(32, 2) == [16, 16]
    assert split_inflight(5, 2) == [3, 2]
    assert split_inflight(1, 4) == [1]


def test_only_a_run_of_every_workload_writes_the_latest_documents() -> None:
    import argparse

    from cachectl.bench import _latest_name

    every = list(WORKLOADS)
    assert _latest_name(argparse.Namespace(workloads=every, vs=[])) == "latest.json"
    assert _latest_name(argparse.Namespace(workloads=every, vs=["etcd"])) == "latest-vs.json"
    assert _latest_name(argparse.Namespace(workloads=["set"], vs=[])) == "latest-partial.json"
    assert _latest_name(argparse.Namespace(workloads=[], vs=["etcd", "redis"])) == "latest-vs-partial.json"


def test_keys_are_16_bytes() -> None:
    assert len(bench_key("r:", 7)) == 16
    assert len(bench_key("w:", 99_999)) == 16


def _phase(
    target: str, workload: str, ops_per_s: float, p50: float, p99: float, rnd: int = 0
) -> dict[str, Any]:
    return {
        "target": target,
        "workload": workload,
        "round": rnd,
        "clients": 2,
        "inflight": 32,
        "ops_per_s": ops_per_s,
        "keys_per_s": ops_per_s * WORKLOADS[workload].batch,
        "p50_s": p50,
        "p99_s": p99,
        "p999_s": p99,
        "mean_s": p50,
        "cpu_s_per_1k_ops": 0.1,
        "server_cpu_cores": 1.0,
        "loadgen_cpu_cores": 0.5,
        "peak_rss_bytes": {"n1": 100},
        "errors": {},
    }


def test_values_are_fresh_for_every_write_and_differ_between_processes() -> None:
    """No layer may compress or deduplicate the payloads: every value is
    new, of the workload's size, and another process's seed gives others."""
    for size in (100, 10 * 1024, 1024 * 1024):
        a, b = _Values(size, random.Random(1)), _Values(size, random.Random(2))
        va = [a.next() for _ in range(50)]
        vb = [b.next() for _ in range(50)]
        assert {len(v) for v in va + vb} == {size}
        assert len(set(va)) == len(set(vb)) == 50
        assert not set(va) & set(vb)
    small = _Values(100, random.Random(3))
    blob = b"".join(small.next() for _ in range(100))
    assert len(zlib.compress(blob)) > 0.95 * len(blob)  # random, not patterned


def test_summary_takes_medians_and_ratios_favour_cachenode_when_higher() -> None:
    phases = [
        _phase("cachenode", "set", v, 0.002, 0.004, r) for r, v in enumerate((100.0, 300.0, 200.0))
    ] + [
        _phase("etcd", "set", 100.0, 0.004, 0.008),
        _phase("cachenode", "write_1client", 500.0, 0.001, 0.002),
        _phase("etcd", "write_1client", 500.0, 0.002, 0.004),
        {"target": "etcd", "workload": "mset100", "round": 0, "failed": "boom"},
    ]
    results = summarize(phases)
    assert results["set"]["cachenode"]["ops_per_s"] == 200.0
    assert results["set"]["cachenode"]["rounds"] == 3
    assert results["mset100"]["etcd"]["failed_rounds"] == 1
    r = ratios(results, "etcd")
    assert r["write"] == pytest.approx(2.0)
    assert r["p99_write"] == pytest.approx(2.0)
    assert r["p50_write_1client"] == pytest.approx(2.0)
    assert "mset100" not in r  # cachenode never ran it
    goals = {g.name: g.met for g in evaluate_goals(r, 1.5)}
    assert goals == {
        "write": True,
        "read_linearizable": None,
        "mset100": None,
        "p50_write_1client": True,
        "failover": True,
        "replica_move": None,
    }


def test_a_shard_that_never_accepted_a_write_fails_the_failover_goal() -> None:
    """The median of the trials can hide one shard of a killed leader that
    stayed without a leader: it must fail the goal and be named."""
    lost = [{"trial": 2, "killed": "n2", "shard": 7}]
    goal = next(g for g in evaluate_goals({}, 1.2, None, lost) if g.name == "failover")
    assert goal.met is False
    assert goal.measured == "1.20 s; no write within the probe's timeout on shard 7 (trial 2, n2 killed)"
    assert next(g for g in evaluate_goals({}, 1.2) if g.name == "failover").met is True
    # also when no trial's first shard took a write (so there is no median)
    alone = next(g for g in evaluate_goals({}, None, None, lost) if g.name == "failover")
    assert alone.met is False and alone.measured.startswith("not measured; no write within")
    doc = _bare_doc(failover={
        "failover_s": 1.2, "all_shards_s": 1.3, "unrecovered_shards": lost,
        "trials": [{"shard_s": 1.1}, {"shard_s": 1.2}, {"shard_s": 1.3}],
    })  # fmt: skip
    assert next(g for g in doc["goals"] if g["name"] == "failover")["met"] is False
    assert "no write within the probe's timeout on shard 7 (trial 2, n2 killed)." in markdown(doc)


def _status(node: str, *replicas: tuple[int, str, int, int, int]) -> Any:
    from cachenode.v1 import cache_pb2 as pb

    return pb.NodeStatus(
        node=pb.NodeInfo(id=node),
        replicas=[
            pb.ReplicaStatus(shard_id=s, role=role, term=term, commit_index=commit, applied_index=applied)
            for s, role, term, commit, applied in replicas
        ],
    )


def test_the_next_failover_trial_waits_for_every_replica_to_catch_up() -> None:
    from cachectl.bench import _not_caught_up

    hosts = {0: {"n1", "n2", "n3"}, 1: {"n1", "n2", "n3"}}
    # (shard, role, term, commit index, applied index); the leader's last
    # entry is its election's no-op, which no state machine applies
    whole = {
        "n1": _status("n1", (0, "leader", 3, 11, 10), (1, "follower", 2, 6, 5)),
        "n2": _status("n2", (0, "follower", 3, 10, 10), (1, "leader", 2, 6, 5)),
        "n3": _status("n3", (0, "follower", 3, 10, 9), (1, "follower", 2, 6, 5)),
    }
    assert _not_caught_up(whole, hosts, {}) == "shard 0: the replica on n3 has applied 9 of the leader's 10"
    whole["n3"] = _status("n3", (0, "follower", 3, 11, 10), (1, "follower", 2, 6, 5))
    assert _not_caught_up(whole, hosts, {}) is None
    restarted = dict(whole, n3=_status("n3", (0, "follower", 3, 10, 10)))
    assert _not_caught_up(restarted, hosts, {}) == "shard 1 has no replica on n3 yet"
    candidate = dict(whole, n3=_status("n3", (0, "candidate", 4, 10, 10), (1, "follower", 2, 5, 5)))
    assert _not_caught_up(candidate, hosts, {}) == "shard 0: the replica on n3 does not follow the leader yet"
    old_term = dict(whole, n3=_status("n3", (0, "follower", 2, 10, 10), (1, "follower", 2, 5, 5)))
    assert _not_caught_up(old_term, hosts, {}) == "shard 0: the replica on n3 does not follow the leader yet"
    headless = dict(whole, n1=_status("n1", (0, "follower", 3, 10, 10), (1, "follower", 2, 5, 5)))
    assert _not_caught_up(headless, hosts, {}) == "shard 0 has 0 leaders"
    # while the nodes balance leaders: each shard back on its preferred replica
    assert _not_caught_up(whole, hosts, {0: "n1", 1: "n2"}) is None
    assert _not_caught_up(whole, hosts, {0: "n3", 1: "n2"}) == "shard 0 is led by n1, not yet by n3"


def test_a_document_renders_as_markdown_and_rich_tables() -> None:
    phases = [
        _phase("cachenode", "set", 10.0, 0.002, 0.004),
        _phase("etcd", "set", 5.0, 0.003, 0.009),
    ]
    doc = build_document(
        kind="bench-vs",
        command="cachectl bench --vs etcd",
        config={"seconds": 1, "rounds": 1, "clients": 2, "inflight": 32},
        machine={"cores": 2, "load_before": [1.0, 1.0, 1.0], "load_after": [2.0, 1.0, 1.0]},
        systems={"cachenode": {}, "etcd": {}},
        phases=phases,
        failover={"failover_s": 1.0, "all_shards_s": 1.5, "trials": [{"shard_s": 1.0}]},
        scaling=None,
        started_at=0.0,
        finished_at=10.0,
    )
    assert doc["ratios_vs_etcd"]["write"] == pytest.approx(2.0)
    assert doc["failover_s"] == 1.0
    text = markdown(json.loads(json.dumps(doc)))
    assert "| set | cachenode | 10 |" in text and "| write | 2.00x |" in text
    assert "| replica_move |" in text and "not measured (--move-mb 0)" in text
    assert len(rich_tables(doc)) == 3


_MOVE = {
    "mb": 100, "bytes": 100 << 20, "keys": 1600, "value_bytes": 65536, "shard": 0,
    "from": "n3", "to": "n4", "fill_s": 9.5, "fill_mb_per_s": 10.5, "join_s": 1.2,
    "seconds": 12.5, "mb_per_s": 8.0, "caught_up_s": 10.0, "catch_up_mb_per_s": 10.0,
    "replica_bytes": 105_000_000, "transfer": "log entries", "verified": True,
    "operator": {"id": 1, "status": "success", "detail": "", "steps": [
        {"step": "add n4 to the map", "done_s": 0.5},
    ]},
    "verify": {"stale_reads_on_new_node": 64, "keys_read_back": 1600},
}  # fmt: skip


def _move_doc(move: dict[str, Any] | None) -> dict[str, Any]:
    return _bare_doc(move=move)


def _bare_doc(*, move: dict[str, Any] | None = None, failover: dict[str, Any] | None = None) -> dict[str, Any]:
    """A result document of no workload: only a replica move and/or failover trials."""
    return build_document(
        kind="bench",
        command="cachectl bench",
        config={"seconds": 1, "rounds": 1, "clients": 2, "inflight": 32},
        machine={"cores": 2},
        systems={},
        phases=[],
        failover=failover,
        scaling=None,
        started_at=0.0,
        finished_at=10.0,
        move_replica=move,
    )


def test_the_replica_move_is_a_figure_in_the_goals_and_its_own_table() -> None:
    doc = json.loads(json.dumps(_move_doc(_MOVE)))
    assert doc["move_replica"]["seconds"] == 12.5 and doc["replica_move_100mb_s"] == 12.5
    goal = next(g for g in doc["goals"] if g["name"] == "replica_move")
    assert goal["verdict"] == "measured" and goal["met"] is None
    assert goal["measured"].startswith("12.50 s (8.0 MiB/s)") and "verified" in goal["measured"]
    assert len(rich_tables(doc)) == 2  # no workload ran: goals (with the facts), replica move
    text = markdown(doc)
    assert "| replica_move |" in text and "| measured |" in text and "log entries" in text
    # another size is said, and a failed move is a failed row, never a figure
    small = json.loads(json.dumps(_move_doc({**_MOVE, "mb": 2})))
    assert small["replica_move_100mb_s"] is None
    assert "for 2 MiB, not 100" in next(g for g in small["goals"] if g["name"] == "replica_move")["measured"]
    failed = _move_doc({**_MOVE, "verified": False, "failed": "3 of 1600 keys read back wrong"})
    goal = next(g for g in failed["goals"] if g["name"] == "replica_move")
    assert goal["verdict"] == "failed" and "3 of 1600" in goal["measured"]
    assert failed["replica_move_100mb_s"] is None
    # a document written before the phase existed still renders its row
    old = json.loads(json.dumps(_move_doc(None)))
    old["goals"] = [g for g in old["goals"] if g["name"] != "replica_move"]
    old["replica_move"] = "not measured: needs the placement driver"
    assert "not measured: needs the placement driver" in markdown(old)


# ---- against real processes ------------------------------------------------------


def _cluster_pids(directory: Path) -> dict[str, int]:
    doc = json.loads((directory / "cluster.json").read_text())
    return {n["id"]: n["pid"] for n in doc["nodes"]}


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.cluster
def test_load_generator_measures_a_real_cluster(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    with local_cluster(directory, nodes=3, shards=4) as endpoints:
        spec = TargetSpec("cachenode", "cachenode", tuple(endpoints))
        pids = _cluster_pids(directory)
        prefill = run_prefill(spec, log_dir=tmp_path)
        assert prefill.keys == 10_000 and not prefill.errors
        for workload in ("set", "get_linearizable", "mget100"):
            res = run_phase(
                spec,
                pids,
                workload,
                clients=2,
                inflight=4,
                seconds=1.0,
                warmup_s=0.2,
                log_dir=tmp_path,
            )
            doc = json.loads(json.dumps(res.to_json()))
            assert doc["errors"] == {}, doc["error_sample"]
            assert doc["ops"] > 0 and doc["clients"] == 2 and doc["inflight"] == 4
            assert doc["keys"] == doc["ops"] * WORKLOADS[workload].batch
            assert doc["p50_s"] <= doc["p99_s"] <= doc["p999_s"]
            assert doc["cpu_s_per_1k_ops"] is not None and doc["cpu_s_per_1k_ops"] >= 0
            assert set(doc["peak_rss_bytes"]) == set(pids)
            assert all(v and v > 0 for v in doc["peak_rss_bytes"].values())
    assert not _processes_mentioning("cachenode.bench.loadgen --spec")


@pytest.mark.cluster
def test_cachectl_bench_writes_the_result_document(tmp_path: Path) -> None:
    out = tmp_path / "results"
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = [
        "bench", "--seconds", "1", "--rounds", "1", "--workloads", "set,mget100",
        "--clients", "1", "--inflight", "4", "--shards", "4", "--failover-trials", "1",
        "--move-mb", "0", "--out", str(out), "--data-dir", str(tmp_path), "--markdown", str(tmp_path / "t.md"),
    ]  # fmt: skip
    code = main(argv, dict(os.environ), stdout=stdout, stderr=stderr)
    assert code == 0, stderr.getvalue()
    doc = json.loads((out / "latest-partial.json").read_text())
    assert not (out / "latest.json").exists(), "a run of two workloads replaced the full result"
    assert doc["schema"] == "cachenode-bench/1" and doc["kind"] == "bench"
    assert len(list(out.glob("bench-*.json"))) == 1
    m = doc["machine"]
    assert m["cores"] >= 1 and len(m["load_before"]) == 3 and len(m["load_after"]) == 3
    assert m["versions"]["grpcio"] and m["versions"]["pysyncobj"] and m["versions"]["lmdb"]
    # the load generators ran on uvloop (a dependency), as the phase says
    assert m["versions"]["uvloop"] and {p["loadgen_event_loop"] for p in doc["phases"]} == {"uvloop"}
    assert set(doc["results"]) == {"set", "mget100"}
    s = doc["results"]["set"]["cachenode"]
    for field in ("ops_per_s", "p50_s", "p99_s", "p999_s", "cpu_s_per_1k_ops"):
        assert isinstance(s[field], float), field
    assert doc["results"]["mget100"]["cachenode"]["keys_per_s"] > 0
    assert len(doc["phases"]) == 2
    assert isinstance(doc["failover_s"], float)
    assert doc["failover"]["trials"][0]["killed"] in ("n1", "n2", "n3")
    assert doc["failover"]["trials"][0]["unrecovered"] == [] and doc["failover"]["unrecovered_shards"] == []
    assert doc["move_replica"] == {"skipped": "--move-mb 0"}
    assert {g["name"] for g in doc["goals"]} >= {"write", "failover"}
    assert "| workload |" in (tmp_path / "t.md").read_text()
    assert "cachenode bench" in stdout.getvalue()
    # everything it started is gone, and its data directory too
    assert not _processes_mentioning(str(tmp_path / "cachenode-bench-"))
    assert not list(tmp_path.glob("cachenode-bench-*"))


@pytest.mark.cluster
def test_cachectl_bench_times_a_replica_move(tmp_path: Path) -> None:
    """Only the replica-move phase (no workload, no failover), 2 MiB, for real."""
    out = tmp_path / "results"
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = [
        "bench", "--workloads", "none", "--failover-trials", "0", "--rounds", "1",
        "--move-mb", "2", "--out", str(out), "--data-dir", str(tmp_path),
    ]  # fmt: skip
    code = main(argv, dict(os.environ), stdout=stdout, stderr=stderr)
    assert code == 0, stderr.getvalue()
    doc = json.loads((out / "latest-partial.json").read_text())
    mv = doc["move_replica"]
    assert "failed" not in mv, mv
    assert mv["mb"] == 2 and mv["keys"] == 32 and mv["bytes"] == 2 << 20
    assert mv["verified"] is True
    assert mv["seconds"] > 0 and mv["mb_per_s"] > 0
    assert mv["fill_s"] > 0 and mv["join_s"] > 0
    assert mv["caught_up_s"] is not None and 0 < mv["caught_up_s"] <= mv["seconds"]
    assert mv["to"] == "n4" and mv["from"] in ("n1", "n2", "n3") and mv["from"] != mv["leader"]
    assert mv["operator"]["status"] == "success"
    assert all(s["done_s"] is not None for s in mv["operator"]["steps"])
    assert mv["replica_keys"] == 32 and mv["replica_bytes"] >= 2 << 20
    assert mv["verify"]["keys_wrong"] == 0 and mv["verify"]["stale_reads_wrong"] == 0
    assert mv["transfer"] in ("log entries", "snapshot")
    mem = mv["memory"]
    assert mem["leader"]["node"] == mv["leader"] and mem["new_node"]["node"] == "n4"
    for m in mem.values():  # the nodes' own heap, sampled from /proc during the move
        assert 10 << 20 < m["rss_anon_start_bytes"] <= m["rss_anon_peak_bytes"] < 4 << 30, m
    goal = next(g for g in doc["goals"] if g["name"] == "replica_move")
    assert goal["verdict"] == "measured"
    assert doc["results"] == {} and doc["phases"] == [] and doc["config"]["move_mb"] == 2
    assert "replica move" in stdout.getvalue()
    # everything it started is gone, and its data directory too
    assert not _processes_mentioning(str(tmp_path / "cachenode-bench-"))
    assert not list(tmp_path.glob("cachenode-bench-*"))
    # a saved result renders the figure again
    rendered = io.StringIO()
    code = main(["bench", "--render", str(out / "latest-partial.json")], {}, stdout=rendered, stderr=stderr)
    assert code == 0 and "replica move" in rendered.getvalue()
    assert "heap (RssAnon) during the move" in rendered.getvalue()
    assert "measured" in rendered.getvalue()


def _move_phase_only(tmp_path: Path, out: Path) -> tuple[int, str, dict[str, Any]]:
    """``cachectl bench`` with only a 1 MiB replica move: (exit code, stderr, the move's document)."""
    stderr = io.StringIO()
    argv = [
        "bench", "--workloads", "none", "--failover-trials", "0", "--move-mb", "1",
        "--out", str(out), "--data-dir", str(tmp_path),
    ]  # fmt: skip
    code = main(argv, dict(os.environ), stdout=io.StringIO(), stderr=stderr)
    return code, stderr.getvalue(), json.loads((out / "latest-partial.json").read_text())["move_replica"]


@pytest.mark.cluster
def test_a_wrong_value_after_the_move_fails_the_phase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One key overwritten before the checks: the phase fails, exit 1, logs kept, nothing runs."""
    from cachenode.bench import move as move_module

    real_verify = move_module.ReplicaMove._verify

    def corrupting_verify(self: Any, client: Any, *args: Any) -> None:
        keys = args[-2]
        client.set(keys[len(keys) // 2], b"not what was written")
        real_verify(self, client, *args)

    monkeypatch.setattr(move_module.ReplicaMove, "_verify", corrupting_verify)
    out = tmp_path / "results"
    code, err, mv = _move_phase_only(tmp_path, out)
    assert code == 1, err
    assert mv["verified"] is False and "verification failed" in mv["failed"]
    assert mv["verify"]["keys_wrong"] == 1 and mv["seconds"] > 0
    goal = next(g for g in json.loads((out / "latest-partial.json").read_text())["goals"] if g["name"] == "replica_move")
    assert goal["verdict"] == "failed"
    assert not _processes_mentioning(str(tmp_path / "cachenode-bench-"))
    (kept,) = tmp_path.glob("cachenode-bench-*")
    assert list(kept.glob("move/n*/node.log")) and not list(kept.rglob("data.mdb"))


@pytest.mark.cluster
def test_a_leader_change_after_the_fill_does_not_fail_the_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by `make bench-vs`: an election during the fill left the shard's
    log ending on the new leader's no-op, so the leader's commit index was one
    past every replica's applied index (which counts data entries only) and
    the move "never caught up".  Here the leadership of the filled shard is
    moved on purpose after the fill: the phase still succeeds."""
    import grpc

    from cachenode.bench import move as move_module
    from cachenode.v1 import cache_pb2 as pb
    from cachenode.v1 import cache_pb2_grpc as rpc

    real_fill = move_module.ReplicaMove._fill
    moved: dict[str, Any] = {}

    def fill_then_move_the_leader(self: Any, client: Any) -> Any:
        shard, keys, digests = real_fill(self, client)
        leader, _ = self._leader(client, shard)
        address = client.cluster_map(refresh=True).node(leader).address
        with grpc.insecure_channel(address) as ch:
            rpc.AdminStub(ch).TransferLeader(pb.TransferLeaderRequest(shard_id=shard), timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                new_leader, _ = self._leader(client, shard)
                if new_leader != leader:
                    break
            time.sleep(0.05)
        # the new leader's no-op is committed: commit index > applied index
        st = self._replica(client, client.cluster_map(refresh=True).node(new_leader).address, shard)
        moved.update(old=leader, new=new_leader, commit=st.commit_index, applied=st.applied_index)
        return shard, keys, digests

    monkeypatch.setattr(move_module.ReplicaMove, "_fill", fill_then_move_the_leader)
    code, err, mv = _move_phase_only(tmp_path, tmp_path / "results")
    assert moved["new"] != moved["old"] and moved["commit"] > moved["applied"], moved
    assert code == 0, err
    # The new leader may apply the last data entries only after the change
    # (followers learn an idle group's commit index up to ~50 ms late).
    assert mv["verified"] is True and mv["leader_applied_index"] >= moved["applied"]
    assert mv["caught_up_s"] is not None


def test_bench_rejects_bad_input_in_one_line(tmp_path: Path) -> None:
    for argv, env in (
        (["bench", "--workloads", "nope"], {}),
        (["bench", "--vs", "mysql"], {}),
        (["bench", "--move-mb", "-1"], {}),
        (["bench", "--render", str(tmp_path / "missing.json")], {}),
        (["bench", "--out", str(tmp_path)], {"BENCH_SECONDS": "soon"}),
    ):
        stderr = io.StringIO()
        code = main(argv, {**os.environ, **env}, stdout=io.StringIO(), stderr=stderr)
        assert code == 2, (argv, stderr.getvalue())
        assert len(stderr.getvalue().strip().splitlines()) == 1


def test_installing_packages_starts_no_service(tmp_path: Path) -> None:
    # Debian starts a package's service at install unless policy-rc.d says no:
    # a redis-server on 6379 would outlive the benchmark.
    policy = tmp_path / "policy-rc.d"
    with no_service_starts(policy):
        assert os.access(policy, os.X_OK)
        done = subprocess.run([str(policy), "redis-server", "start"], check=False)
        assert done.returncode == 101  # "action forbidden by policy"
    assert not policy.exists()
    policy.write_text("#!/bin/sh\nexit 0\n")  # the machine's own policy stays as it is
    with no_service_starts(policy):
        pass
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"


needs_etcd_and_redis = pytest.mark.skipif(
    not (shutil.which("etcd") and shutil.which("redis-server")),
    reason="etcd-server and redis-server are not installed (make test installs them as root)",
)


@pytest.mark.cluster
@needs_etcd_and_redis
def test_etcd_and_redis_start_again_on_new_ports_when_a_chosen_port_is_taken(
    tmp_path: Path,
) -> None:
    # Ports are chosen free, closed, then bound by the servers a moment later:
    # another process's bind(0) can take one in between.
    holder = socket.create_server(("127.0.0.1", 0))
    taken = holder.getsockname()[1]
    chosen: list[list[int]] = []

    def choose(count: int) -> list[int]:
        ports = free_ports(count)
        if len(chosen) % 2 == 0:  # the first choice of each server
            ports[-1] = taken
        chosen.append(ports)
        return ports

    etcd = EtcdCluster(tmp_path / "etcd", members=3, choose_ports=choose)
    redis = RedisServer(tmp_path / "redis", "always", choose_ports=choose)
    try:
        etcd.start()
        assert len(chosen) == 2 and taken not in chosen[1]
        assert "address already in use" in (tmp_path / "etcd" / "m3.log").read_text().lower()
        redis.start()
        assert len(chosen) == 4 and redis.port == chosen[3][0] != taken
        assert len(etcd.procs) == 3 and len(redis.procs) == 1
        assert all(p.alive() for p in [*etcd.procs, *redis.procs])
    finally:
        holder.close()
        etcd.stop()
        redis.stop()
    assert not any(p.alive() for p in [*etcd.procs, *redis.procs])


@pytest.mark.cluster
@needs_etcd_and_redis
def test_same_load_generator_drives_etcd_and_redis(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    assert fs_type(tmp_path) != "unknown"
    etcd = EtcdCluster(tmp_path / "etcd", members=3)
    redis = RedisServer(tmp_path / "redis", "always")
    try:
        etcd.start()
        redis.start()
        targets = [
            (
                TargetSpec("etcd", "etcd", etcd.endpoints, {"pb2_dir": str(etcd.pb2_dir)}),
                etcd.pids(),
            ),
            (TargetSpec("redis", "redis-always", (redis.endpoint,)), redis.pids()),
        ]
        for spec, pids in targets:
            run_prefill(spec, log_dir=tmp_path)
            for workload in ("incr", "mget100", "get_stale"):
                res = run_phase(
                    spec,
                    pids,
                    workload,
                    clients=1,
                    inflight=2,
                    seconds=0.5,
                    warmup_s=0.1,
                    log_dir=tmp_path,
                )
                assert res.ops > 0 and not res.errors, (spec.label, workload, res.error_sample)
    finally:
        etcd.stop()
        redis.stop()
    assert not etcd.procs[0].alive() and not redis.procs[0].alive()
