"""Run the real ``jepsen-lite`` CLI as a subprocess, and always clean up after it.

The harness stops its own nodes on every exit path it controls.  If it ever has
to be killed (a hung test), :func:`reap_leftovers` stops whatever it recorded in
``OUT/cluster/nodes.json`` -- by PID, and only if ``/proc/<pid>/cmdline`` still
names that node's data directory -- and deletes its network namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ENV = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "jepsen_lite.cli", *args]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def node_pids(out: Path) -> list[tuple[int, str]]:
    """(pid, data_dir) of every node recorded for the run in ``out``."""
    try:
        doc = json.loads((out / "cluster" / "nodes.json").read_text())
    except (OSError, ValueError):
        return []
    return [(n["pid"], n["data_dir"]) for n in doc.get("nodes", []) if n.get("pid")]


def live_nodes(out: Path) -> list[int]:
    """Recorded node PIDs that still run that node (not recycled, not zombies)."""
    alive = []
    for pid, data_dir in node_pids(out):
        if data_dir.encode() in _cmdline(pid):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                alive.append(pid)
    return alive


def reap_leftovers(out: Path) -> list[int]:
    """SIGKILL leftover nodes of the run in ``out`` and delete its namespaces."""
    killed = []
    for pid in live_nodes(out):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    try:
        doc = json.loads((out / "cluster" / "nodes.json").read_text())
    except (OSError, ValueError):
        doc = {}
    for ns in doc.get("netns", []):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if doc.get("bridge"):
        subprocess.run(["ip", "link", "del", doc["bridge"]], capture_output=True)
    return killed


def run_cli(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``jepsen-lite run --out OUT ARGS``; on timeout SIGTERM (the harness cleans
    up), then SIGKILL and :func:`reap_leftovers`.  Leftovers are reaped in any case."""
    proc = subprocess.Popen(
        cli("run", "--out", str(out), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        stderr += f"\n[test] timed out after {timeout} s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftovers = reap_leftovers(out)
    if leftovers:
        stderr += f"\n[test] reaped leftover nodes {leftovers}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def check_outputs(out: Path, workload: str) -> dict[str, Any]:
    """Assert history.jsonl / results.json / timeline.html exist and are well formed;
    return results.json."""
    from jepsen_lite.history import pair_operations, read_history

    hist = read_history(out / "history.jsonl")
    assert hist.workload == workload
    assert any(not o.is_nemesis and o.type == "ok" for o in hist.ops)
    pair_operations(hist.ops)  # raises on a malformed history
    results = json.loads((out / "results.json").read_text())
    for k in ("verdict", "valid", "exit", "ops", "faults", "keys", "checker_seconds", "node_info"):
        assert k in results, k
    page = (out / "timeline.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<svg" in page and 'class="lane"' in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    return dict(results)


def wait_for(pred: Any, timeout: float, interval: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return False
