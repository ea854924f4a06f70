"""The parent side of a measurement: start load generators, measure the servers, merge.

:func:`run_phase` measures one workload on one system once:

1. starts ``clients`` load-generator processes (:mod:`cachenode.bench.loadgen`),
   the requests in flight split evenly between them;
2. waits until every one has connected and warmed up (``ready``);
3. resets each server process's peak RSS, reads its CPU time, says ``go`` to
   all generators at once;
4. collects their results, reads the servers' CPU time and peak RSS again.

CPU per 1,000 ops is the servers' CPU (all their processes, all threads)
over that window divided by the successful requests.  Every generator runs
in its own session and is killed by pid in a ``finally``, also on Ctrl-C.
Blocking; call from one thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from cachenode.bench.loadgen import WORKLOADS, LatencyHistogram, LoadResult, LoadSpec
from cachenode.bench.systems import BenchError, cpu_total, peak_rss_bytes, reset_peak_rss
from cachenode.bench.targets import TargetSpec

__all__ = ["PhaseResult", "run_phase", "run_prefill", "split_inflight"]

READY_TIMEOUT_S = 60.0
RESULT_GRACE_S = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class PhaseResult:
    """One workload measured once on one system.  Latencies in seconds; None when unknown."""

    target: str
    workload: str
    round: int
    clients: int
    inflight: int
    ops: int
    keys: int
    elapsed_s: float
    ops_per_s: float
    keys_per_s: float
    p50_s: float | None
    p99_s: float | None
    p999_s: float | None
    mean_s: float | None
    errors: Mapping[str, int]
    error_sample: str | None
    server_cpu_s: float | None
    cpu_s_per_1k_ops: float | None
    peak_rss_bytes: Mapping[str, int | None]
    peak_rss_scope: str  # "phase" (reset before it) or "process" (since start)
    loadgen_cpu_s: float
    loadgen_event_loop: str  # "uvloop" or "asyncio" (comma-joined if they differed)

    def to_json(self) -> dict[str, Any]:
        busy = self.elapsed_s if self.elapsed_s > 0 else None
        return {
            **dataclasses.asdict(self),
            "errors": dict(self.errors),
            "peak_rss_bytes": dict(self.peak_rss_bytes),
            # Cores kept busy: near the machine's core count means the phase was CPU-bound.
            "server_cpu_cores": self.server_cpu_s / busy
            if busy and self.server_cpu_s is not None
            else None,
            "loadgen_cpu_cores": self.loadgen_cpu_s / busy if busy else None,
        }


def split_inflight(inflight: int, clients: int) -> list[int]:
    """Requests in flight per client process: ``inflight`` spread evenly, none idle."""
    clients = max(1, min(clients, inflight))
    base, extra = divmod(inflight, clients)
    return [base + (1 if i < extra else 0) for i in range(clients)]


class _Generator:
    """One load-generator child process and its line-oriented stdout."""

    def __init__(self, spec: LoadSpec, log: Path) -> None:
        self.spec = spec
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as err:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cachenode.bench.loadgen",
                    "--spec",
                    json.dumps(spec.to_json()),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # Ctrl-C reaches the parent only; it stops us by pid
                close_fds=True,
            )
        self.log = log
        self._buf = b""

    def event(self, deadline: float) -> dict[str, Any]:
        """The next JSON line on stdout; raises BenchError on timeout, exit or an error event."""
        stdout: IO[bytes] | None = self.popen.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(
                    f"a load generator ({self.spec.workload} on {self.spec.target.label}) did not answer "
                    f"in time; see {self.log}"
                )
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    code = self.popen.wait(timeout=5)
                    raise BenchError(
                        f"a load generator ({self.spec.workload} on {self.spec.target.label}) exited "
                        f"with code {code} without a result; see {self.log}"
                    )
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            doc: dict[str, Any] = json.loads(line)
        except ValueError:
            raise BenchError(
                f"a load generator wrote something else than JSON on stdout ({line[:80]!r}); see {self.log}"
            ) from None
        if doc.get("event") == "error":
            raise BenchError(
                f"the load generator for {self.spec.workload} on {self.spec.target.label} failed: "
                f"{doc.get('message')}"
            )
        return doc

    def go(self) -> None:
        stdin = self.popen.stdin
        assert stdin is not None
        stdin.write(b"go\n")
        stdin.flush()

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def run_phase(
    target: TargetSpec,
    server_pids: Mapping[str, int],
    workload: str,
    *,
    clients: int,
    inflight: int,
    seconds: float,
    round_no: int = 0,
    warmup_s: float = 0.5,
    log_dir: Path,
) -> PhaseResult:
    """Measure ``workload`` on ``target`` once (see the module docstring)."""
    wl = WORKLOADS[workload]
    clients = wl.clients or clients
    inflight = wl.inflight or inflight
    shares = split_inflight(inflight, clients)
    gens: list[_Generator] = []
    try:
        for i, share in enumerate(shares):
            spec = LoadSpec(
                target=target,
                workload=workload,
                inflight=share,
                seconds=seconds,
                warmup_s=warmup_s,
                seed=(round_no << 8) + i + 1,
            )
            gens.append(_Generator(spec, log_dir / "loadgen.log"))
        ready_by = time.monotonic() + READY_TIMEOUT_S + warmup_s
        for g in gens:
            if g.event(ready_by).get("event") != "ready":
                raise BenchError(f"a load generator sent something else than ready; see {g.log}")
        scope = "phase" if all([reset_peak_rss(pid) for pid in server_pids.values()]) else "process"
        cpu0 = cpu_total(server_pids)
        for g in gens:
            g.go()
        results_by = time.monotonic() + seconds + RESULT_GRACE_S
        results = [LoadResult.from_json(g.event(results_by)) for g in gens]
        cpu1 = cpu_total(server_pids)
        peaks = {name: peak_rss_bytes(pid) for name, pid in server_pids.items()}
    finally:
        for g in gens:
            g.kill()
    hist = LatencyHistogram()
    errors: dict[str, int] = {}
    sample = None
    for r in results:
        hist.merge(r.histogram)
        for name, n in r.errors.items():
            errors[name] = errors.get(name, 0) + n
        sample = sample or r.error_sample
    ops = sum(r.ops for r in results)
    server_cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return PhaseResult(
        target=target.label,
        workload=workload,
        round=round_no,
        clients=len(shares),
        inflight=sum(shares),
        ops=ops,
        keys=sum(r.keys for r in results),
        elapsed_s=max(r.elapsed_s for r in results),
        ops_per_s=sum(r.ops / r.elapsed_s for r in results if r.elapsed_s > 0),
        keys_per_s=sum(r.keys / r.elapsed_s for r in results if r.elapsed_s > 0),
        p50_s=hist.percentile(0.50),
        p99_s=hist.percentile(0.99),
        p999_s=hist.percentile(0.999),
        mean_s=hist.mean(),
        errors=errors,
        error_sample=sample,
        server_cpu_s=server_cpu,
        cpu_s_per_1k_ops=server_cpu / ops * 1000 if server_cpu is not None and ops else None,
        peak_rss_bytes=peaks,
        peak_rss_scope=scope,
        loadgen_cpu_s=sum(r.cpu_s for r in results),
        loadgen_event_loop=",".join(sorted({r.event_loop for r in results})),
    )


def run_prefill(target: TargetSpec, *, log_dir: Path, timeout_s: float = 300.0) -> LoadResult:
    """Write the read keys into ``target`` from one load-generator process."""
    spec = LoadSpec(
        target=target, workload="get_linearizable", inflight=8, seconds=0, mode="prefill"
    )
    gen = _Generator(spec, log_dir / "loadgen.log")
    try:
        return LoadResult.from_json(gen.event(time.monotonic() + timeout_s))
    finally:
        gen.kill()
