"""The short seeded jepsen-lite suite against real clusters (about 4 minutes).

Each test runs the real CLI (``jepsen-lite run``) as a subprocess with ``--out``
in tmp_path and checks its exit code and its three output files.  The harness
stops its nodes by PID on every exit path; :func:`jl_run.run_cli` additionally
reaps anything a killed harness left behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from jl_run import check_outputs, live_nodes, run_cli

pytestmark = pytest.mark.jepsen

# A scenario = (args, expected exit).  The seeds were chosen so that the fault
# schedule covers the interesting shapes within the time given.
SAFE = {
    "register-partition": (
        ["--workload", "register", "--nemesis", "partition", "--time", "50", "--seed", "5"],
        "bridge, isolate a shard leader, bridge, isolate a shard leader",
    ),
    "register-mixed": (
        ["--workload", "register", "--nemesis", "mixed", "--time", "30", "--seed", "9"],
        "isolate a shard leader, kill a minority, pause a minority",
    ),
    "register-membership": (
        ["--workload", "register", "--nemesis", "membership", "--time", "45", "--seed", "12"],
        "replica moves (also of the leader's replica), leader transfers and draining the PD's node under load",
    ),
    "counter-disk": (
        ["--workload", "counter", "--nemesis", "disk", "--time", "20", "--seed", "1"],
        "a node counts its disk as below its reserve: its shards refuse increments (definite failures, never "
        "applied) while the placement driver moves replicas off it, then back",
    ),
    "counter-kill": (
        ["--workload", "counter", "--nemesis", "kill", "--time", "40", "--seed", "5"],
        "kill all, a minority, one (restart on the same data)",
    ),
    "set-kill-all": (
        [
            "--workload",
            "set",
            "--nemesis",
            "kill",
            "--nemesis-target",
            "all",
            "--time",
            "20",
            "--seed",
            "1",
        ],
        "kill -9 of every node at once: no acknowledged element may be lost",
    ),  # fmt: skip
    "ttl-clock": (
        [
            "--workload",
            "ttl",
            "--nemesis",
            "clock",
            "--nemesis-target",
            "leader",
            "--shards",
            "1",
            "--time",
            "20",
            "--seed",
            "1",
        ],
        "leader clock skew must not change expiry",
    ),  # fmt: skip
}

UNSAFE = {
    "dup-incr": ["--workload", "counter", "--nemesis", "none", "--time", "10", "--seed", "1"],
    "local-reads": [
        "--workload", "register", "--nemesis", "partition", "--partition-shape", "isolate-leader",
        "--shards", "1", "--time", "20", "--seed", "3",
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", list(SAFE))
def test_safe_cluster_is_linearizable(name: str, tmp_path: Path) -> None:
    args, _why = SAFE[name]
    p = run_cli(tmp_path, *args, timeout=240)
    assert p.returncode == 0, f"{name}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    workload = args[args.index("--workload") + 1]
    res = check_outputs(tmp_path, workload)
    assert res["verdict"] == "linearizable" and res["exit"] == 0
    if "--nemesis" in args and args[args.index("--nemesis") + 1] != "none":
        assert res["faults_total"] >= 1
        assert not res["nemesis_errors"]
    assert res["ops"]["ok"] > 100
    if "disk" in args:
        history = (tmp_path / "history.jsonl").read_text()
        assert "RESOURCE_EXHAUSTED/disk_full" in history, "no write was refused: the disk fault hit no shard in use"
    assert live_nodes(tmp_path) == []


@pytest.mark.parametrize("switch", list(UNSAFE))
def test_unsafe_switch_is_caught(switch: str, tmp_path: Path) -> None:
    args = UNSAFE[switch]
    p = run_cli(tmp_path, *args, "--unsafe", switch, timeout=240)
    assert p.returncode == 1, f"--unsafe {switch}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    res = check_outputs(tmp_path, args[args.index("--workload") + 1])
    assert res["verdict"] == "violation"
    assert res["failures"] and res["failures"][0]["stuck"] is not None
    assert any(f"--unsafe-{switch}" in n["flags"] for n in res["node_info"])
    page = (tmp_path / "timeline.html").read_text()
    assert 'class="violation"' in page and "stuck" in page
    assert live_nodes(tmp_path) == []
