"""`cachectl local up --foreground` (what `make run` runs) in a real process.

It keeps a real 3-node cluster until Ctrl-C, and it ends by itself once every
node has stopped: stopped on purpose by another cachectl command (exit 0), or
exited by itself (exit 1, one line that says what to do).  Every process is
stopped by pid, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from _cluster import kill_by_pid, recorded_pids  # noqa: E402
from _nodes import CACHECTL, cachectl, pid_alive, wait_for  # noqa: E402

pytestmark = pytest.mark.cluster

HOW_TO_ENDS = "Press Ctrl-C to stop every node."  # the how-to's last line ends so


class Foreground:
    """A running `cachectl local up --foreground` and what it printed so far."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc = subprocess.Popen(
            [*CACHECTL, "local", "up", "--foreground", "--nodes", "3", "--shards", "2",
             "--dir", str(directory), "--wait", "90"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=dict(os.environ), start_new_session=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in self._readers:
            t.start()
        self.node_pids: list[int] = []
        self.err_at_ready = 0

    def err_since_ready(self) -> list[str]:
        return self.err[self.err_at_ready:]

    @staticmethod
    def _read(stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line.rstrip("\n"))

    def printed_how_to(self) -> bool:
        return any(line.endswith(HOW_TO_ENDS) for line in self.out)

    def wait_ready(self) -> None:
        wait_for(lambda: self.printed_how_to() or self.proc.poll() is not None,
                 timeout=120, what="the how-to")
        assert self.printed_how_to(), (self.out, self.err)
        self.err_at_ready = len(self.err)  # a port-clash retry notes it on stderr while starting
        self.node_pids = recorded_pids(self.directory)
        assert len(self.node_pids) == 3 and all(pid_alive(p) for p in self.node_pids)

    def wait_exit(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=5)
        return code


@contextlib.contextmanager
def foreground(directory: Path) -> Iterator[Foreground]:
    fg = Foreground(directory)
    try:
        fg.wait_ready()
        yield fg
    finally:
        pids = set(fg.node_pids) | set(recorded_pids(directory))
        if fg.proc.poll() is None:  # only while it runs: a reaped pid may name another process
            fg.proc.terminate()  # as Ctrl-C: it stops its nodes
            try:
                fg.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                fg.proc.kill()
                fg.proc.wait(timeout=10)
        cachectl("local", "down", "--dir", str(directory))
        kill_by_pid([p for p in pids if _runs_in(p, directory)])


def _runs_in(pid: int, directory: Path) -> bool:
    """Is ``pid`` alive and a node of the cluster in ``directory`` (not a recycled pid)?"""
    try:
        return pid_alive(pid) and str(directory).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _pids_in_file(directory: Path) -> list[int | None]:
    doc = json.loads((directory / "cluster.json").read_text())
    return [n["pid"] for n in doc["nodes"]]


def test_ctrl_c_stops_every_node(tmp_path: Path) -> None:
    with foreground(tmp_path) as fg:
        fg.proc.send_signal(signal.SIGINT)
        assert fg.wait_exit() == 0, (fg.out, fg.err)
        assert not any(pid_alive(p) for p in fg.node_pids)
        assert fg.out[-1].startswith("n1 (pid "), fg.out
        assert f"data kept in {tmp_path}" in fg.out[-1]
        assert _pids_in_file(tmp_path) == [None, None, None]


def test_it_ends_by_itself_after_local_down(tmp_path: Path) -> None:
    with foreground(tmp_path) as fg:
        down = cachectl("local", "down", "--dir", str(tmp_path))
        assert down.returncode == 0, down.stderr
        assert fg.wait_exit() == 0, (fg.out, fg.err)
        assert fg.out[-1] == (
            f"every node was stopped by another cachectl command; data kept in {tmp_path}"
        )
        assert fg.err_since_ready() == []


def test_it_ends_with_an_error_when_every_node_has_exited_by_itself(tmp_path: Path) -> None:
    with foreground(tmp_path) as fg:
        # One node going leaves the foreground waiting: the cluster still serves.
        os.kill(fg.node_pids[0], signal.SIGKILL)
        wait_for(lambda: not pid_alive(fg.node_pids[0]), timeout=10, what="n1 to die")
        with pytest.raises(subprocess.TimeoutExpired):
            fg.proc.wait(timeout=2.5)  # more than two of its looks (WATCH_INTERVAL_S)
        for pid in fg.node_pids[1:]:
            os.kill(pid, signal.SIGKILL)
        assert fg.wait_exit() == 1, (fg.out, fg.err)
        assert len(fg.err_since_ready()) == 1, fg.err
        line = fg.err_since_ready()[0]
        assert line.startswith("cachectl: error: every node that was running has exited by itself: "), line
        for node, pid in zip(("n1", "n2", "n3"), fg.node_pids, strict=True):
            assert f"{node} (pid {pid}, killed by SIGKILL)" in line, line
        assert f"`cachectl local up --dir {tmp_path}`" in line
        assert _pids_in_file(tmp_path) == [None, None, None]
        # ... and the cluster starts again from its data, as the line says.
        again = cachectl("local", "up", "--dir", str(tmp_path), "--wait", "90")
        try:
            assert again.returncode == 0, again.stderr
            assert "restarting the stopped cluster" in again.stderr
        finally:
            cachectl("local", "down", "--dir", str(tmp_path))
