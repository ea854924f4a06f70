"""``jepsen-lite run``'s harness-error paths (exit 3) and its cleanup on signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from jepsen_lite import cli, client, db, net, runner
from jl_run import ENV, live_nodes, reap_leftovers, run_cli, wait_for
from jl_run import cli as cli_argv


def _main(*args: str) -> int:
    return cli.main(list(args), {"NO_COLOR": "1", "COLUMNS": "120"})


def test_bad_arguments_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main("run", "--workload", "bank", "--out", str(tmp_path)) == 3
    assert _main("run", "--workload", "register", "--unsafe", "nope", "--out", str(tmp_path)) == 3
    assert _main("run", "--workload", "register", "--time", "0", "--out", str(tmp_path)) == 3
    assert "Traceback" not in capsys.readouterr().err


def test_netns_requested_but_unusable_exits_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(net, "netns_available", lambda: "not running as root")
    code = _main(
        "run", "--workload", "register", "--nemesis", "partition", "--net", "netns",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 3
    assert "not usable here: not running as root" in capsys.readouterr().err


@pytest.mark.cluster
def test_cluster_that_does_not_start_exits_3(tmp_path: Path) -> None:
    # 5000 shards is more than a node accepts: every node exits at once.
    p = run_cli(tmp_path, "--workload", "register", "--shards", "5000", "--time", "5", timeout=120)
    assert p.returncode == 3, p.stderr
    assert "exited with code" in p.stderr
    assert "Traceback" not in p.stderr
    assert live_nodes(tmp_path) == []


@pytest.mark.cluster
def test_no_operation_completed_exits_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A client that never gets a connection: no op is ever invoked.
    monkeypatch.setattr(client.CacheClient, "usable", lambda self, timeout: False)
    monkeypatch.setattr(runner, "FINAL_READ_ATTEMPTS", 1)
    try:
        code = _main("run", "--workload", "register", "--time", "1", "--shards", "1",
                     "--out", str(tmp_path))  # fmt: skip
    finally:
        reap_leftovers(tmp_path)
    assert code == 3
    assert "no operation completed" in capsys.readouterr().err
    assert live_nodes(tmp_path) == []


@pytest.mark.cluster
def test_fault_filter_that_does_not_work_exits_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(self: client.AdminClient, blocked: list[str]) -> list[str]:
        raise RuntimeError("SetFaultFilter refused")

    monkeypatch.setattr(client.AdminClient, "set_fault_filter", broken)
    try:
        code = _main("run", "--workload", "register", "--nemesis", "partition", "--net", "filter",
                     "--time", "5", "--shards", "1", "--out", str(tmp_path))  # fmt: skip
    finally:
        reap_leftovers(tmp_path)
    assert code == 3
    assert "no usable fault mechanism" in capsys.readouterr().err
    assert live_nodes(tmp_path) == []


@pytest.mark.cluster
def test_a_cluster_whose_node_finds_its_port_taken_starts_again_on_new_ports(
    tmp_path: Path,
) -> None:
    # Ports are chosen free, closed, then bound by the nodes a moment later:
    # another process's bind(0) can take one in between.  Here a listening
    # socket holds n2's client port from the first choice.
    holder = socket.create_server(("127.0.0.1", 0))
    choices: list[list[int]] = []

    def choose(host: str, count: int) -> list[int]:
        ports = db.free_ports(host, count)
        if not choices:
            ports[2] = holder.getsockname()[1]  # n2's client port
        choices.append(ports)
        return ports

    notes: list[str] = []
    try:
        cluster, _ = db.start_cluster(
            tmp_path / "cluster", ["n1", "n2", "n3"], timeout=60, note=notes.append,
            shards=2, choose_ports=choose,
        )  # fmt: skip
        try:
            assert len(choices) == 2
            assert cluster.nodes["n2"].client_port == choices[1][2]
            assert set(cluster.statuses()) == {"n1", "n2", "n3"}
        finally:
            cluster.close()
    finally:
        holder.close()
        reap_leftovers(tmp_path)
    assert len(notes) == 1
    assert "node n2 exited with code 4" in notes[0] and "address already in use" in notes[0]
    assert "starting the cluster again on new ports" in notes[0]
    assert live_nodes(tmp_path) == []


@pytest.mark.cluster
def test_a_node_that_cannot_listen_on_fixed_ports_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Network-namespace runs give every node fixed ports: new ones would not
    # help.  Here the fixed client port is one a listening socket holds.
    holder = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(db, "NETNS_CLIENT_PORT", holder.getsockname()[1])
    monkeypatch.setattr(db, "NETNS_RAFT_PORT", db.free_ports("127.0.0.1", 1)[0])
    notes: list[str] = []
    try:
        with pytest.raises(db.PortTaken, match="exited with code 4.*address already in use"):
            db.start_cluster(
                tmp_path / "cluster", ["n1"], timeout=60, note=notes.append, shards=1,
                hosts={"n1": "127.0.0.1"},
            )  # fmt: skip
    finally:
        holder.close()
        reap_leftovers(tmp_path)
    assert notes == []
    assert live_nodes(tmp_path) == []


@pytest.mark.jepsen
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_stops_every_node_and_namespace(tmp_path: Path, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        cli_argv("run", "--workload", "register", "--nemesis", "partition", "--time", "120",
                 "--shards", "1", "--out", str(tmp_path)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        hist = tmp_path / "history.jsonl"
        assert wait_for(
            lambda: hist.exists() and len(hist.read_text().splitlines()) > 30, timeout=90
        ), "the run never got going"
        pids = live_nodes(tmp_path)
        assert len(pids) == 5
        doc = json.loads((tmp_path / "cluster" / "nodes.json").read_text())
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert live_nodes(tmp_path) == []
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(ns in listed for ns in doc.get("netns", []))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reap_leftovers(tmp_path)
