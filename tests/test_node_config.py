"""`cachenode serve` refuses bad settings with one line and exit 2, before
it binds anything; an address it cannot listen on ends it with one line and
exit 4 (in use) or 3 (anything else)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachenode.server.main import build_parser, load_config
from cachenode.server.main import main as serve_main

BASE = [
    "serve", "--node-id", "n1", "--listen", "127.0.0.1:0", "--raft-listen", "127.0.0.1:0",
    "--initial-cluster", "n1=127.0.0.1:7001/127.0.0.1:7002", "--data-dir", "/nonexistent/never-created",
]


def test_log_compaction_mb_reaches_the_raft_timing() -> None:
    args = build_parser().parse_args([*BASE, "--log-compaction-mb", "2.5"])
    cfg, *_ = load_config(args, {"CACHENODE_SECRET": "s"})
    assert cfg.timing.log_compaction_bytes == int(2.5 * 1024 * 1024)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_log_compaction_mb_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main([*BASE, "--log-compaction-mb", value], env={"CACHENODE_SECRET": "s"}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cachenode: error: --log-compaction-mb must be positive"]


def test_grpc_workers_reach_the_config_and_bound_the_streams() -> None:
    from cachenode.server.cache_service import CacheService

    args = build_parser().parse_args([*BASE, "--grpc-workers", "6"])
    cfg, *_ = load_config(args, {"CACHENODE_SECRET": "s"})
    assert cfg.grpc_workers == 6
    # the stream cap is derived from it (no replicas needed to build the service)
    assert CacheService(cfg, None, None, None, None).max_streams == 3  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["1", "0", "5000"])
def test_out_of_range_grpc_workers_are_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main([*BASE, "--grpc-workers", value], env={"CACHENODE_SECRET": "s"}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cachenode: error: --grpc-workers must be 2..1024"]


@pytest.mark.parametrize(("flag", "field", "default"), [
    ("--leader-wait", "leader_wait_s", 3.0),
    ("--clock-tick", "clock_tick_s", 1.0),
])
def test_a_duration_flag_reaches_the_config_and_zero_turns_it_off(
    flag: str, field: str, default: float, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"CACHENODE_SECRET": "s"}
    for args, want in (([], default), ([flag, "1.5s"], 1.5), ([flag, "0"], 0.0)):
        cfg, *_ = load_config(build_parser().parse_args([*BASE, *args]), env)
        assert getattr(cfg, field) == want, args
    for value, error in (("-1s", f"{flag} must be >= 0"), ("soon", f"{flag}: 'soon' is not a duration (e.g. 30s, 10m, 1h)")):
        assert serve_main([*BASE, f"{flag}={value}"], env=env) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"cachenode: error: {error}"]


def test_a_clock_tick_below_a_tenth_of_a_second_is_refused_saying_why(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"CACHENODE_SECRET": "s"}
    cfg, *_ = load_config(build_parser().parse_args([*BASE, "--clock-tick", "0.1s"]), env)
    assert cfg.clock_tick_s == 0.1
    assert serve_main([*BASE, "--clock-tick=0.05s"], env=env) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "cachenode: error: --clock-tick must be 0 (off) or at least 0.1s: "
        "each tick is a journal write on every replica of every shard holding a TTL"
    ]


def test_pre_vote_is_on_unless_turned_off() -> None:
    cfg, *_ = load_config(build_parser().parse_args(BASE), {"CACHENODE_SECRET": "s"})
    assert cfg.timing.pre_vote is True
    cfg, *_ = load_config(build_parser().parse_args([*BASE, "--pre-vote", "off"]), {"CACHENODE_SECRET": "s"})
    assert cfg.timing.pre_vote is False


def test_lmdb_writemap_is_on_unless_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    cfg, *_ = load_config(build_parser().parse_args(BASE), {"CACHENODE_SECRET": "s"})
    assert cfg.lmdb_writemap is True
    cfg, *_ = load_config(build_parser().parse_args([*BASE, "--lmdb-writemap", "off"]), {"CACHENODE_SECRET": "s"})
    assert cfg.lmdb_writemap is False
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--lmdb-writemap", "maybe"])
    assert "invalid choice: 'maybe'" in capsys.readouterr().err


def test_tune_gc_freezes_what_exists_and_raises_the_thresholds() -> None:
    # In a fresh interpreter: the test process's own collector stays as it is.
    import subprocess
    import sys

    code = (
        "import gc; from cachenode.server.main import tune_gc, GC_THRESHOLDS; "
        "before = gc.get_freeze_count(); tune_gc(); "
        "print(before, gc.get_freeze_count(), gc.get_threshold() == GC_THRESHOLDS, *GC_THRESHOLDS)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, after, applied, gen0, _gen1, gen2 = out.stdout.split()
    assert int(before) == 0 and int(after) > 1000  # the imported modules' objects, at least
    assert applied == "True"
    assert int(gen0) > 700  # young objects scanned less often than Python's default
    assert int(gen2) <= 10  # but cyclic garbage in the oldest generation is not left for hours


def test_cpu_policy_is_batch_unless_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, *_ = load_config(build_parser().parse_args(BASE), {"CACHENODE_SECRET": "s"})
    assert cfg.cpu_policy == "batch"
    cfg, *_ = load_config(build_parser().parse_args([*BASE, "--cpu-policy", "inherit"]), {"CACHENODE_SECRET": "s"})
    assert cfg.cpu_policy == "inherit"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--cpu-policy", "fifo"])
    assert "invalid choice: 'fifo'" in capsys.readouterr().err
    toml = tmp_path / "node.toml"
    toml.write_text('cpu-policy = "realtime"\n')
    assert serve_main([*BASE, "--config", str(toml)], env={"CACHENODE_SECRET": "s"}) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["cachenode: error: --cpu-policy must be batch or inherit"]


def _policies_in_a_fresh_interpreter(script: str) -> list[object]:
    """Run ``script`` (which ends by printing a repr) in a new interpreter, so
    the test process's own policy stays as it is."""
    import subprocess
    import sys

    prelude = """
import os, threading
from cachenode.server.main import set_cpu_policy
os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # whatever the test runner runs under
def policies():
    return sorted({os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")})
"""
    done = subprocess.run([sys.executable, "-c", prelude + script], capture_output=True, text=True, timeout=60, check=True)
    out: list[object] = eval(done.stdout)  # noqa: S307 - our own repr
    return out


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux only")
def test_set_cpu_policy_covers_running_threads_and_later_ones() -> None:
    before, applied, threads, batch, inherit, after_inherit = _policies_in_a_fresh_interpreter("""
hold = threading.Event()
early = threading.Thread(target=hold.wait); early.start()
out = [policies(), set_cpu_policy("batch")]
late = threading.Thread(target=hold.wait); late.start()
out += [len(os.listdir("/proc/self/task")), policies(), set_cpu_policy("inherit"), policies()]
hold.set(); early.join(); late.join()
print(repr(out))
""")
    assert before == [os.SCHED_OTHER]
    assert applied == (True, "every thread runs under SCHED_BATCH (--cpu-policy batch)")
    assert threads == 3  # main, the thread running before, the one started after
    assert batch == [os.SCHED_BATCH]
    assert inherit[0] is True and after_inherit == [os.SCHED_BATCH]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux only")
def test_set_cpu_policy_keeps_a_policy_the_node_was_started_with() -> None:
    # An operator's choice (chrt, systemd's CPUSchedulingPolicy=) stays; SCHED_IDLE
    # stands in for it because any process may choose it without privileges.
    outcome, after = _policies_in_a_fresh_interpreter("""
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
print(repr([set_cpu_policy("batch"), policies()]))
""")
    assert after == [os.SCHED_IDLE]
    assert outcome == (True, "it keeps SCHED_IDLE, which it was started under")
    inherit, inherit_after = _policies_in_a_fresh_interpreter("""
print(repr([set_cpu_policy("inherit"), policies()]))
""")
    assert inherit[0] is True and inherit_after == [os.SCHED_OTHER]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux only")
def test_set_cpu_policy_reports_threads_it_could_not_find(tmp_path: Path) -> None:
    # A /proc that lists no thread of ours (another PID namespace's, say):
    # the main thread is still switched, and the outcome says the rest was not.
    empty = tmp_path / "task"
    empty.mkdir()
    outcome, after = _policies_in_a_fresh_interpreter(f"""
print(repr([set_cpu_policy("batch", {str(empty)!r}), policies()]))
""")
    assert outcome[0] is False and "only the main thread" in outcome[1]
    assert after == [os.SCHED_BATCH]  # the one thread there is


def _serve(tmp_path: Path, listen: str, raft_listen: str) -> tuple[int, list[str]]:
    """Run a real `cachenode serve` that must fail to start: its exit code
    and its stderr lines.  The deadline ends it if it started after all."""
    import subprocess
    import sys

    args = ["serve", "--node-id", "n1", "--listen", listen, "--raft-listen", raft_listen,
            "--initial-cluster", f"n1={listen}/{raft_listen}", "--data-dir", str(tmp_path / "n1"),
            "--cpu-policy", "inherit"]
    env = {**os.environ, "CACHENODE_SECRET": "s"}
    done = subprocess.run([sys.executable, "-m", "cachenode.server.main", *args], capture_output=True,
                          text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    return done.returncode, [line for line in done.stderr.splitlines() if "error" in line]


@pytest.mark.parametrize("which", ["client", "raft"])
def test_a_port_another_socket_holds_exits_4_saying_so(tmp_path: Path, which: str) -> None:
    """Exit 4 is the one code harnesses that choose ports retry on (a
    process took the port between choosing and binding)."""
    import socket

    from cachenode.server.main import EXIT_ADDRESS_IN_USE

    with socket.create_server(("127.0.0.1", 0)) as held, socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        taken, free = f"127.0.0.1:{held.getsockname()[1]}", f"127.0.0.1:{spare.getsockname()[1]}"
        spare.close()
        code, errors = _serve(tmp_path, taken, free) if which == "client" else _serve(tmp_path, free, taken)
    assert code == EXIT_ADDRESS_IN_USE == 4
    what, flag = ("clients", "--listen") if which == "client" else ("Raft peers", "--raft-listen")
    assert errors == [f"cachenode: error: cannot listen for {what} on {taken}: address already in use; "
                      f"stop what holds it, or choose another port with {flag}"], errors


def test_an_address_that_cannot_be_bound_for_another_reason_exits_3(tmp_path: Path) -> None:
    """192.0.2.1 (TEST-NET-1) is no address of this machine's: choosing
    another port would not help, so it is not exit 4."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        raft = f"127.0.0.1:{s.getsockname()[1]}"
    code, errors = _serve(tmp_path, "192.0.2.1:7001", raft)
    assert code == 3
    assert errors == ["cachenode: error: cannot listen for clients on 192.0.2.1:7001; check --listen"], errors
