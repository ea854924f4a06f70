"""cachectl without a real cluster: parsing, exit statuses, one-line errors,
--json shapes (against the in-process FakeCluster), and the `local`
lifecycle (against fake node processes from tests/_cluster.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
if str(ROOT / "cli") not in sys.path:
    sys.path.insert(0, str(ROOT / "cli"))

import cachectl.kv  # noqa: E402
import cachectl.local  # noqa: E402
from _cluster import FakeCluster, Fault, kill_by_pid, recorded_pids  # noqa: E402
from cachectl.main import main  # noqa: E402

UNREACHABLE = "127.0.0.1:1"


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def doc(self) -> Any:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out!r}, err={self.err!r})"


def run(*argv: str, env: dict[str, str] | None = None) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), env if env is not None else {}, stdout=out, stderr=err)
    return Result(code, out.getvalue(), err.getvalue())


def assert_one_line_error(r: Result) -> None:
    lines = r.err.splitlines()
    assert len(lines) == 1, r
    assert lines[0].startswith("cachectl: error: "), r
    assert "Traceback" not in r.err


# ---------------------------------------------------------------------------
# parsing and usage errors
# ---------------------------------------------------------------------------


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"], {}) == 0
    assert "cachectl" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["get"],
        ["set", "k"],
        ["set", "k", "v", "--nx", "--xx"],
        ["set", "k", "v", "--ttl", "0"],
        ["set", "k", "v", "--ttl", "soon"],
        ["cas", "k", "v"],
        ["cas", "k", "v", "--expected", "a", "--absent"],
        ["cas", "k", "v", "--expected-version", "-1"],
        ["incr", "k", "one"],
        ["--timeout", "0", "get", "k"],
        ["--timeout", "abc", "get", "k"],
        ["mset", "a", "1", "b"],
        ["mget"],
        ["local"],
        ["local", "up", "--nodes", "0"],
        ["--endpoints", "nonsense", "get", "k"],
        ["operator", "add", "move-replica", "--shard", "metadata", "--from", "n1", "--to", "n4"],
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str]) -> None:
    r = run(*argv, env={"CACHECTL_ENDPOINTS": UNREACHABLE})
    assert r.code == 2, r
    assert_one_line_error(r)
    assert r.out == ""


def test_replication_above_nodes_is_usage_error(tmp_path: Path) -> None:
    r = run("local", "up", "--nodes", "2", "--replication", "3", "--dir", str(tmp_path))
    assert r.code == 2, r
    assert_one_line_error(r)


# ---------------------------------------------------------------------------
# unreachable cluster
# ---------------------------------------------------------------------------


def test_unreachable_endpoint_exit_3_fast_one_line() -> None:
    t0 = time.monotonic()
    r = run("--endpoints", UNREACHABLE, "--timeout", "2", "get", "k")
    assert time.monotonic() - t0 < 2.5
    assert r.code == 3, r
    assert_one_line_error(r)
    assert UNREACHABLE in r.err and "--endpoints" in r.err


def test_unreachable_from_env_and_options_after_command() -> None:
    r = run("get", "k", "--timeout", "1", env={"CACHECTL_ENDPOINTS": f"{UNREACHABLE},127.0.0.1:2"})
    assert r.code == 3, r
    assert_one_line_error(r)
    assert "127.0.0.1:2" in r.err and "CACHECTL_ENDPOINTS" in r.err


def test_default_endpoint_is_named_in_the_error() -> None:
    # nothing listens on 127.0.0.1:7001 in the test environment
    r = run("--timeout", "1", "status")
    if r.code == 0:  # pragma: no cover - someone runs a cluster there
        pytest.skip("a cluster is listening on 127.0.0.1:7001")
    assert r.code == 3, r
    assert_one_line_error(r)
    assert "default 127.0.0.1:7001" in r.err


def test_real_process_prints_one_line_and_no_traceback() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "cli"), str(ROOT)])
    t0 = time.monotonic()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cachectl.main",
            "--endpoints",
            UNREACHABLE,
            "--timeout",
            "2",
            "get",
            "k",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert p.returncode == 3, p
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cachectl: error: "), p.stderr
    assert time.monotonic() - t0 < 15


# ---------------------------------------------------------------------------
# key-value commands against the FakeCluster
# ---------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeCluster]:
    with FakeCluster(nodes=3, shards=4) as fc:
        yield fc


@pytest.fixture
def env(fake: FakeCluster) -> dict[str, str]:
    return {"CACHECTL_ENDPOINTS": ",".join(fake.endpoints)}


def test_get_missing_text_and_json(env: dict[str, str]) -> None:
    r = run("get", "nope", env=env)
    assert (r.code, r.out, r.err) == (0, "(nil)\n", "")
    r = run("get", "nope", "--json", env=env)
    assert r.code == 0
    assert r.doc == {"key": "nope", "value": None, "version": None, "ttl_ms": None}


def test_set_get_roundtrip_and_json_shapes(env: dict[str, str], fake: FakeCluster) -> None:
    assert run("set", "k", "héllo", env=env).out == "OK\n"
    r = run("get", "k", env=env)
    assert (r.code, r.out) == (0, "héllo\n")
    doc = run("--json", "get", "k", env=env).doc
    assert set(doc) == {"key", "value", "version", "ttl_ms"}
    assert doc["value"] == "héllo" and doc["ttl_ms"] is None and doc["version"] > 0

    r = run("set", "t", "v", "--ttl", "60000", "--json", env=env)
    assert r.doc == {"key": "t", "applied": True}
    ttl = run("get", "t", "--json", env=env).doc["ttl_ms"]
    assert 0 < ttl <= 60000
    assert 0 < int(run("ttl", "t", env=env).out) <= 60000
    assert run("ttl", "k", env=env).out == "-1\n"
    assert run("ttl", "none", env=env).out == "(nil)\n"
    assert run("ttl", "none", "--json", env=env).doc == {
        "key": "none",
        "found": False,
        "ttl_ms": None,
    }
    assert run("ttl", "k", "--json", env=env).doc == {"key": "k", "found": True, "ttl_ms": None}

    # stale get reports where it was served
    d = run("get", "k", "--stale", "--json", env=env).doc
    assert d["value"] == "héllo" and d["served_by"] in fake.nodes


def test_binary_values_are_base64_in_json(env: dict[str, str], fake: FakeCluster) -> None:
    from cachenode.client import CacheClient

    with CacheClient(fake.endpoints) as c:
        c.set("bin", b"\xff\x00")
    doc = run("get", "bin", "--json", env=env).doc
    assert doc.pop("version") > 0
    assert doc == {"key": "bin", "value": "/wA=", "encoding": "base64", "ttl_ms": None}
    assert run("get", "bin", env=env).out == "\\xff\x00\n"  # invalid UTF-8 escaped, NUL kept


def test_conditional_writes_exit_1_when_not_applied(env: dict[str, str]) -> None:
    assert run("set", "k", "1", "--nx", env=env).code == 0
    r = run("set", "k", "2", "--nx", env=env)
    assert (r.code, r.out) == (1, "(not set: the key exists)\n") and r.err == ""
    r = run("set", "absent", "2", "--xx", "--json", env=env)
    assert r.code == 1 and r.doc == {"key": "absent", "applied": False}

    r = run("cas", "k", "3", "--expected", "1", env=env)
    assert r.code == 0 and r.out.startswith("OK (version ")
    r = run("cas", "k", "4", "--expected", "1", "--json", env=env)
    assert r.code == 1
    assert r.doc["succeeded"] is False and r.doc["current"]["value"] == "3"
    version = r.doc["current"]["version"]
    r = run("cas", "k", "5", "--expected-version", str(version), "--json", env=env)
    assert r.code == 0 and r.doc["succeeded"] is True and r.doc["current"] is None
    assert run("cas", "fresh", "x", "--absent", env=env).code == 0
    r = run("cas", "fresh", "y", "--absent", env=env)
    assert r.code == 1 and "holds 'x'" in r.out


def test_del_incr_mget_mset(env: dict[str, str]) -> None:
    assert run("del", "zzz", env=env).out == "(not found)\n"
    run("set", "zzz", "1", env=env)
    assert run("del", "zzz", "--json", env=env).doc == {"key": "zzz", "deleted": True}

    assert run("incr", "n", env=env).out == "1\n"
    assert run("incr", "n", "10", env=env).out == "11\n"
    assert run("incr", "n", "-20", env=env).out == "-9\n"  # a negative delta is not an option
    assert run("incr", "n", "--json", env=env).doc == {"key": "n", "value": -8}

    r = run("mset", "a", "1", "b", "2", "c", "3", "--ttl", "9000", env=env)
    assert (r.code, r.out) == (0, "OK (3 keys)\n")
    assert run("mset", "d", "4", "--json", env=env).doc == {"count": 1}
    r = run("mget", "a", "missing", "c", env=env)
    assert r.out == "1\n(nil)\n3\n"
    docs = run("mget", "a", "missing", "--json", env=env).doc
    assert [d["key"] for d in docs] == ["a", "missing"]
    assert docs[0]["value"] == "1" and 0 < docs[0]["ttl_ms"] <= 9000
    assert docs[1] == {"key": "missing", "value": None, "version": None, "ttl_ms": None}


def test_value_starting_with_dash_after_double_dash(env: dict[str, str]) -> None:
    assert run("set", "k", "--", "--weird", env=env).code == 0
    assert run("get", "k", env=env).out == "--weird\n"


def test_incr_on_text_exits_1(env: dict[str, str]) -> None:
    run("set", "txt", "hello", env=env)
    r = run("incr", "txt", env=env)
    assert r.code == 1, r
    assert_one_line_error(r)
    assert "not an integer" in r.err


def test_timeout_exits_4(env: dict[str, str], fake: FakeCluster) -> None:
    fake.inject(Fault("Get", grpc.StatusCode.OK, delay_s=3.0, count=20))
    t0 = time.monotonic()
    r = run("--timeout", "0.8", "get", "k", env=env)
    assert time.monotonic() - t0 < 2.0
    assert r.code == 4, r
    assert_one_line_error(r)
    fake.state.faults.clear()
    fake.inject(Fault("Set", grpc.StatusCode.DEADLINE_EXCEEDED, kind="outcome_unknown", count=20))
    r = run("--timeout", "0.8", "set", "k", "v", env=env)
    assert r.code == 4 and "may or may not have been applied" in r.err


def test_no_leader_exits_3(env: dict[str, str], fake: FakeCluster) -> None:
    fake.inject(Fault("Set", grpc.StatusCode.UNAVAILABLE, kind="unavailable", count=50))
    r = run("--timeout", "1", "set", "k", "v", env=env)
    assert r.code == 3, r
    assert_one_line_error(r)
    assert "not applied" in r.err


def test_forward_mode_sends_to_the_given_endpoint(fake: FakeCluster) -> None:
    env = {"CACHECTL_ENDPOINTS": fake.nodes["n2"].address}
    for i in range(8):
        assert run("--forward", "set", f"f{i}", "v", env=env).code == 0
    assert {c.node for c in fake.calls("Set")} == {"n2"}
    assert run("get", "f3", "--forward", "--stale", env=env).out == "v\n"


def test_keyboard_interrupt_exits_130(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(ctx: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cachectl.kv, "cmd_get", boom)
    r = run("get", "k", env=env)
    assert r.code == 130
    assert_one_line_error(r)


def test_unexpected_exception_is_one_line(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(ctx: Any) -> int:
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(cachectl.kv, "cmd_get", boom)
    r = run("get", "k", env=env)
    assert r.code == 1
    assert_one_line_error(r)
    assert "kaboom second line" in r.err
    r = run("get", "k", env={**env, "CACHECTL_DEBUG": "1"})
    assert "Traceback" in r.err and r.err.splitlines()[-1].startswith("cachectl: error:")


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------


def test_status_json_shape(env: dict[str, str], fake: FakeCluster) -> None:
    doc = run("status", "--json", env=env).doc
    assert [n["id"] for n in doc["nodes"]] == ["n1", "n2", "n3"]
    for n in doc["nodes"]:
        assert {"id", "address", "raft_address", "state", "replicas", "leaders"} <= set(n)
        assert n["state"] == "up" and n["replicas"] == [0, 1, 2, 3]
    assert sorted(s for n in doc["nodes"] for s in n["leaders"]) == [0, 1, 2, 3]
    assert len(doc["shards"]) == 4
    for s in doc["shards"]:
        assert {"id", "range", "epoch", "replicas", "leader", "term", "applied_index"} <= set(s)
        lo, hi = s["range"]
        assert 0 <= lo <= hi < 2**64
        assert s["leader"] == fake.state.leaders[s["id"]]
        assert s["replicas"] == ["n1", "n2", "n3"][: len(s["replicas"])] or len(s["replicas"]) == 3
    assert doc["shards"][0]["range"][0] == 0 and doc["shards"][-1]["range"][1] == 2**64 - 1


def test_status_marks_down_nodes(env: dict[str, str], fake: FakeCluster) -> None:
    fake.nodes["n3"].stop()
    r = run("status", "--json", "--timeout", "2", env=env)
    assert r.code == 0, r
    states = {n["id"]: n["state"] for n in r.doc["nodes"]}
    assert states == {"n1": "up", "n2": "up", "n3": "down"}
    down = next(n for n in r.doc["nodes"] if n["id"] == "n3")
    assert down["leaders"] == [] and down["error"]
    # shards led by n3 have no reachable leader any more
    for s in r.doc["shards"]:
        if fake.state.leaders[s["id"]] == "n3":
            assert s["leader"] is None
        else:
            assert s["leader"] is not None


def test_status_text_tables(env: dict[str, str]) -> None:
    r = run("status", env=env)
    assert r.code == 0
    assert (
        "Nodes" in r.out and "Shards" in r.out and "3/3 nodes up, 4/4 shards have a leader" in r.out
    )


# ---------------------------------------------------------------------------
# local: lifecycle with fake node processes
# ---------------------------------------------------------------------------


@pytest.fixture
def fake_nodes(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Make `local up` start tests/_cluster.py fake nodes instead of the real server."""
    monkeypatch.setattr(cachectl.local, "NODE_MODULE", "_cluster")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TESTS)
    env.pop("FAKE_NODE_FAIL", None)
    return env


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "c"
    try:
        yield d
    finally:
        kill_by_pid(recorded_pids(d))


def test_local_lifecycle(fake_nodes: dict[str, str], cluster_dir: Path) -> None:
    d = str(cluster_dir)
    r = run(
        "local", "up", "--nodes", "3", "--shards", "2", "--dir", d, "--wait", "30", env=fake_nodes
    )
    assert r.code == 0, r
    assert "endpoints: 127.0.0.1:" in r.out
    doc = json.loads((cluster_dir / "cluster.json").read_text())
    assert [n["id"] for n in doc["nodes"]] == ["n1", "n2", "n3"]
    for n in doc["nodes"]:
        assert {"id", "address", "raft_address", "pid", "data_dir", "log", "argv"} <= set(n)
        assert n["argv"][1:4] == ["-m", "_cluster", "serve"]
        assert "--initial-cluster" in n["argv"] and Path(n["log"]).exists()
        assert cachectl.local.alive(n["pid"])
    secret = cluster_dir / "secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_text().strip()) == 64

    env = {"CACHECTL_ENDPOINTS": doc["endpoints"]}
    st = run("status", "--json", env=env).doc
    assert [n["state"] for n in st["nodes"]] == ["up", "up", "up"]
    assert all(s["leader"] for s in st["shards"])

    # a second `up` refuses while it runs
    r = run("local", "up", "--dir", d, env=fake_nodes)
    assert r.code == 1 and "already running" in r.err

    old_pid = doc["nodes"][1]["pid"]
    r = run("local", "stop-node", "--dir", d, "n2", env=fake_nodes)
    assert r.code == 0 and "n2" in r.out, r
    assert not cachectl.local.alive(old_pid)
    after = json.loads((cluster_dir / "cluster.json").read_text())
    assert after["nodes"][1]["pid"] is None
    st = run("status", "--json", "--timeout", "2", env=env).doc
    assert [n["state"] for n in st["nodes"]] == ["up", "down", "up"]
    assert run("local", "stop-node", "--dir", d, "n2", env=fake_nodes).out == "n2 was not running\n"

    r = run("local", "start-node", "--dir", d, "n2", env=fake_nodes)
    assert r.code == 0, r
    new_pid = json.loads((cluster_dir / "cluster.json").read_text())["nodes"][1]["pid"]
    assert new_pid and new_pid != old_pid and cachectl.local.alive(new_pid)
    assert run("status", "--json", env=env).doc["nodes"][1]["state"] == "up"

    r = run("local", "stop-node", "--dir", d, "n3", "--kill", "--json", env=fake_nodes)
    assert r.code == 0 and "killed" in r.doc["result"]
    r = run("local", "stop-node", "--dir", d, "n9", env=fake_nodes)
    assert r.code == 2 and "n9" in r.err

    pids = [
        n["pid"]
        for n in json.loads((cluster_dir / "cluster.json").read_text())["nodes"]
        if n["pid"]
    ]
    r = run("local", "down", "--dir", d, env=fake_nodes)
    assert r.code == 0, r
    assert not any(cachectl.local.alive(p) for p in pids)
    assert all(
        n["pid"] is None for n in json.loads((cluster_dir / "cluster.json").read_text())["nodes"]
    )
    assert run("local", "down", "--dir", d, env=fake_nodes).out.startswith("no node was running")

    # `up` on the stopped directory restarts the same nodes from their data
    r = run("local", "up", "--dir", d, "--json", env=fake_nodes)
    assert r.code == 0, r
    assert r.doc["nodes"][0]["address"] == doc["nodes"][0]["address"]
    assert "restarting" in r.err
    assert run("local", "down", "--dir", d, env=fake_nodes).code == 0


def test_local_up_failure_stops_the_others_and_shows_the_log(
    fake_nodes: dict[str, str], cluster_dir: Path
) -> None:
    env = {**fake_nodes, "FAKE_NODE_FAIL": "n2"}
    r = run("local", "up", "--nodes", "3", "--dir", str(cluster_dir), "--wait", "30", env=env)
    assert r.code == 1, r
    assert "failing on purpose" in r.err  # the log tail
    last = r.err.splitlines()[-1]
    assert last.startswith("cachectl: error: node n2 exited with code 1")
    assert sum(line.startswith("cachectl: error:") for line in r.err.splitlines()) == 1
    doc = json.loads((cluster_dir / "cluster.json").read_text())
    assert all(n["pid"] is None for n in doc["nodes"])


def test_local_up_timeout_exits_4_and_stops_nodes(
    fake_nodes: dict[str, str], cluster_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nodes that never get ready: a module that sleeps
    (cluster_dir.parent / "sleepy_node.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(cachectl.local, "NODE_MODULE", "sleepy_node")
    env = {**fake_nodes, "PYTHONPATH": str(cluster_dir.parent)}
    t0 = time.monotonic()
    r = run(
        "local",
        "up",
        "--nodes",
        "2",
        "--replication",
        "2",
        "--dir",
        str(cluster_dir),
        "--wait",
        "2",
        env=env,
    )
    assert r.code == 4, r
    assert_one_line_error(r)
    assert time.monotonic() - t0 < 15
    doc = json.loads((cluster_dir / "cluster.json").read_text())
    assert all(n["pid"] is None for n in doc["nodes"])


def test_local_commands_without_cluster(tmp_path: Path) -> None:
    for argv in (["down"], ["stop-node", "n1"], ["start-node", "n1"]):
        r = run("local", *argv, "--dir", str(tmp_path / "empty"))
        assert r.code == 1, r
        assert_one_line_error(r)
        assert "local up" in r.err


def test_pid_reuse_is_never_signalled(tmp_path: Path) -> None:
    # a pid that runs something else than the recorded node must be left alone
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rec = cachectl.local.NodeRecord(
            "n1", "a:1", "a:2", sleeper.pid, str(tmp_path / "n1/data"), "log", []
        )
        assert not cachectl.local.runs_node(sleeper.pid, rec)
        notes = cachectl.local.stop([rec], grace=0.5)
        assert notes == [] and sleeper.poll() is None and rec.pid is None
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize(("code", "said"), [
    (None, ""),
    (3, " with code 3"),
    (-9, " (killed by SIGKILL)"),
    (-7, " (killed by SIGBUS; SIGBUS usually means that the node's data disk is full (LMDB writes through "
         "its memory map): free space there, then start it again)"),
    (-99, " (killed by signal 99)"),
])
def test_a_node_that_died_is_said_to_have_ended_by_its_code_or_signal(code: int | None, said: str) -> None:
    """SIGBUS is what a node gets when LMDB cannot back a page of its map
    on a full disk: the message says so, and what to do."""
    assert cachectl.local._died_how(code) == said
