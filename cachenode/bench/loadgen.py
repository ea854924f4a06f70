"""The load-generator process: one asyncio loop, N requests in flight, one target.

    python -m cachenode.bench.loadgen --spec '{"target": {...}, "workload": "set", ...}'

Protocol with the parent (:mod:`cachenode.bench.runner`), one JSON document
per line on stdout, nothing else ever written there:

1. the process connects, prefills nothing (the parent prefills once per
   target, see :func:`prefill`), and runs the workload for ``warmup_s``
   without recording anything;
2. it prints ``{"event": "ready"}`` and waits for one line on stdin
   (``go``; end of input aborts with exit status 1);
3. it runs the workload for ``seconds``: ``inflight`` worker tasks each
   issue one request, wait for the answer, and issue the next; a worker
   stops issuing when the time is up and finishes its last request;
4. it prints ``{"event": "result", ...}`` (:class:`LoadResult`) and exits 0.

Any failure before the result prints ``{"event": "error", "message": ...}``
and exits 1.  Failed requests during the run are counted by exception type,
not fatal: the parent decides what an error rate means.

Latencies are measured around each awaited call with
:func:`time.perf_counter` and kept in a :class:`LatencyHistogram` (1 %
buckets), so results of many processes merge exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import json
import math
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

from cachenode.bench.targets import Driver, TargetSpec, open_driver

__all__ = [
    "READ_KEYS",
    "READ_PREFIX",
    "WORKLOADS",
    "LatencyHistogram",
    "LoadResult",
    "LoadSpec",
    "OpKind",
    "Workload",
    "bench_key",
    "main",
]

KEY_BYTES = 16
READ_PREFIX = "r:"
READ_KEYS = 10_000
"""Reads go to ``READ_KEYS`` keys of 100 B written once per target before any read runs."""


class OpKind(enum.Enum):
    """What one request of a workload does."""

    SET = "set"
    GET = "get"  # linearizable
    GET_STALE = "get_stale"
    MIX = "mix"  # read_fraction linearizable gets, the rest sets
    INCR = "incr"
    MSET = "mset"
    MGET = "mget"


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    """One benchmark workload.

    ``batch`` keys per request (``keys/s = ops/s * batch``).  Writes pick keys
    uniformly from ``keyspace`` keys named ``key_prefix + digits`` (16 bytes);
    reads pick from the prefilled read keys.  ``clients``/``inflight``, when
    set, override the command line (``write_1client`` is always 1 and 1).
    """

    name: str
    kind: OpKind
    summary: str
    value_bytes: int = 100
    batch: int = 1
    keyspace: int = 100_000
    key_prefix: str = "w:"
    read_fraction: float = 0.0
    clients: int | None = None
    inflight: int | None = None

    @property
    def reads(self) -> bool:
        return self.kind in (OpKind.GET, OpKind.GET_STALE, OpKind.MIX, OpKind.MGET)


WORKLOADS: Mapping[str, Workload] = {
    w.name: w
    for w in (
        Workload("set", OpKind.SET, "set, 100 B values"),
        Workload("get_linearizable", OpKind.GET, "linearizable get of a 100 B value"),
        Workload("get_stale", OpKind.GET_STALE, "stale (local replica) get of a 100 B value"),
        Workload(
            "mix_90_10", OpKind.MIX, "90 % linearizable gets, 10 % sets, 100 B", read_fraction=0.9
        ),
        Workload(
            "incr", OpKind.INCR, "incr of one of 10,000 counters", keyspace=10_000, key_prefix="c:"
        ),
        Workload(
            "mset100", OpKind.MSET, "mset of 100 keys, 100 B values", batch=100, key_prefix="m:"
        ),
        Workload("mget100", OpKind.MGET, "linearizable mget of 100 keys", batch=100),
        Workload(
            "set_10k",
            OpKind.SET,
            "set, 10 KiB values",
            value_bytes=10 * 1024,
            keyspace=10_000,
            key_prefix="t:",
        ),
        Workload(
            "write_1client",
            OpKind.SET,
            "set, 100 B, one client process with one request in flight (latency)",
            clients=1,
            inflight=1,
        ),
        Workload(
            "set_1m",
            OpKind.SET,
            "set, 1 MiB values",
            value_bytes=1024 * 1024,
            keyspace=64,
            key_prefix="b:",
        ),
    )
}
"""Every workload, in the order they run (the 1 MiB one last: it is the likeliest to break a system)."""


def bench_key(prefix: str, index: int) -> bytes:
    """The 16-byte key number ``index`` of a key space (``prefix`` + zero-padded digits)."""
    width = KEY_BYTES - len(prefix)
    return f"{prefix}{index:0{width}d}".encode()


# ---- latency histogram ------------------------------------------------------


class LatencyHistogram:
    """Latencies in logarithmic buckets 1 % wide; merging two is exact.

    Not thread-safe; one per worker loop (all workers of a process share one,
    they run on one event loop).  Percentiles return a bucket's upper edge,
    capped at the largest value seen, so they are at most 1 % high.
    """

    _STEP = math.log(1.01)
    _FLOOR_S = 1e-7

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        s = max(seconds, self._FLOOR_S)
        bucket = math.floor(math.log(s) / self._STEP)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.count += 1
        self.total_s += s
        if s > self.max_s:
            self.max_s = s

    def merge(self, other: LatencyHistogram) -> None:
        for bucket, n in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + n
        self.count += other.count
        self.total_s += other.total_s
        self.max_s = max(self.max_s, other.max_s)

    def percentile(self, q: float) -> float | None:
        """The ``q``-quantile (0 < q <= 1) in seconds; ``None`` when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(math.exp((bucket + 1) * self._STEP), self.max_s)
        return self.max_s

    def mean(self) -> float | None:
        return self.total_s / self.count if self.count else None

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": {str(b): n for b, n in sorted(self.counts.items())},
            "total_s": self.total_s,
            "max_s": self.max_s,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LatencyHistogram:
        h = cls()
        h.counts = {int(b): int(n) for b, n in doc["counts"].items()}
        h.count = sum(h.counts.values())
        h.total_s = float(doc["total_s"])
        h.max_s = float(doc["max_s"])
        return h


# ---- spec and result --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LoadSpec:
    """What one load-generator process does; crosses the process boundary as JSON.

    ``mode`` is ``run`` (the protocol in the module docstring) or ``prefill``
    (write the read keys with batches of 100, then print the result; no
    ready/go handshake).
    """

    target: TargetSpec
    workload: str
    inflight: int
    seconds: float
    warmup_s: float = 0.5
    seed: int = 0
    mode: str = "run"

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target.to_json(),
            "workload": self.workload,
            "inflight": self.inflight,
            "seconds": self.seconds,
            "warmup_s": self.warmup_s,
            "seed": self.seed,
            "mode": self.mode,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LoadSpec:
        return cls(
            target=TargetSpec.from_json(doc["target"]),
            workload=str(doc["workload"]),
            inflight=int(doc["inflight"]),
            seconds=float(doc["seconds"]),
            warmup_s=float(doc.get("warmup_s", 0.5)),
            seed=int(doc.get("seed", 0)),
            mode=str(doc.get("mode", "run")),
        )


@dataclasses.dataclass(slots=True)
class LoadResult:
    """What one process measured.  ``ops`` counts successful requests only."""

    ops: int
    keys: int
    elapsed_s: float
    histogram: LatencyHistogram
    errors: dict[str, int]
    error_sample: str | None
    cpu_s: float  # this process's own CPU time during the measured run
    event_loop: str = "asyncio"  # the asyncio loop implementation that ran it

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "result",
            "ops": self.ops,
            "keys": self.keys,
            "elapsed_s": self.elapsed_s,
            "histogram": self.histogram.to_json(),
            "errors": self.errors,
            "error_sample": self.error_sample,
            "cpu_s": self.cpu_s,
            "event_loop": self.event_loop,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LoadResult:
        return cls(
            ops=int(doc["ops"]),
            keys=int(doc["keys"]),
            elapsed_s=float(doc["elapsed_s"]),
            histogram=LatencyHistogram.from_json(doc["histogram"]),
            errors={str(k): int(v) for k, v in doc["errors"].items()},
            error_sample=doc.get("error_sample"),
            cpu_s=float(doc["cpu_s"]),
            event_loop=str(doc.get("event_loop", "asyncio")),
        )


# ---- operations ------------------------------------------------------------


class _Values:
    """Fresh random values, so no layer can compress repeated payloads.

    Small ones come from the process's seeded generator, not ``os.urandom``:
    a ``getrandom`` system call per value cost 0.7 us against 0.3 us (100
    bytes), 5 % of the load generator's CPU under ``mset100``, taken from the
    two cores the systems under test share with it."""

    _POOL = 4

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self._rng = rng
        self._pool = [os.urandom(size) for _ in range(self._POOL)] if size > 16 * 1024 else []
        self._n = rng.randrange(1 << 32)

    def next(self) -> bytes:
        if not self._pool:
            return self._rng.randbytes(self.size)
        # Large values: a random pool entry with a unique 8-byte head (cheap, never repeated).
        self._n += 1
        base = self._pool[self._n % self._POOL]
        return self._n.to_bytes(8, "big") + base[8:]


Op = Callable[[], Awaitable[None]]


def make_op(workload: Workload, driver: Driver, rng: random.Random) -> Op:
    """One request of ``workload`` against ``driver`` per call of the returned coroutine function."""
    values = _Values(workload.value_bytes, rng)
    ks, prefix = workload.keyspace, workload.key_prefix

    def write_key() -> bytes:
        return bench_key(prefix, rng.randrange(ks))

    def read_key() -> bytes:
        return bench_key(READ_PREFIX, rng.randrange(READ_KEYS))

    kind = workload.kind
    if kind is OpKind.SET:

        async def op_set() -> None:
            await driver.set(write_key(), values.next())

        return op_set
    if kind in (OpKind.GET, OpKind.GET_STALE):
        linearizable = kind is OpKind.GET

        async def op_get() -> None:
            await driver.get(read_key(), linearizable=linearizable)

        return op_get
    if kind is OpKind.MIX:
        fraction = workload.read_fraction

        async def op_mix() -> None:
            if rng.random() < fraction:
                await driver.get(read_key(), linearizable=True)
            else:
                await driver.set(write_key(), values.next())

        return op_mix
    if kind is OpKind.INCR:

        async def op_incr() -> None:
            await driver.incr(write_key())

        return op_incr
    if kind is OpKind.MSET:
        batch = workload.batch

        async def op_mset() -> None:
            picks = rng.sample(range(ks), batch)
            await driver.mset([(bench_key(prefix, i), values.next()) for i in picks])

        return op_mset
    if kind is OpKind.MGET:
        batch = workload.batch

        async def op_mget() -> None:
            picks = rng.sample(range(READ_KEYS), batch)
            await driver.mget([bench_key(READ_PREFIX, i) for i in picks])

        return op_mget
    raise ValueError(f"no operation for {kind}")


@dataclasses.dataclass(slots=True)
class _Tally:
    ops: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    error_sample: str | None = None


async def _worker(op: Op, end: float, hist: LatencyHistogram | None, tally: _Tally) -> None:
    clock = time.perf_counter
    while True:
        started = clock()
        if started >= end:
            return
        try:
            await op()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # counted, not fatal: the parent judges error rates
            name = type(err).__name__
            tally.errors[name] = tally.errors.get(name, 0) + 1
            if tally.error_sample is None:
                tally.error_sample = f"{name}: {err}"[:300]
            await asyncio.sleep(0.01)  # a failing target must not turn into a busy loop
            continue
        if hist is not None:
            hist.record(clock() - started)
        tally.ops += 1


async def _drive(
    op: Op, inflight: int, seconds: float, record: bool
) -> tuple[_Tally, LatencyHistogram, float]:
    hist = LatencyHistogram()
    tally = _Tally()
    start = time.perf_counter()
    end = start + seconds
    await asyncio.gather(
        *(_worker(op, end, hist if record else None, tally) for _ in range(inflight))
    )
    return tally, hist, time.perf_counter() - start


async def _read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _emit(doc: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def prefill(
    driver: Driver, *, keys: int = READ_KEYS, batch: int = 100, inflight: int = 8
) -> int:
    """Write the read keys (100 B values) with ``mset`` batches; returns the number written."""
    rng = random.Random(1)
    values = _Values(100, rng)
    starts = list(range(0, keys, batch))
    sem = asyncio.Semaphore(inflight)

    async def one(first: int) -> None:
        async with sem:
            items = [
                (bench_key(READ_PREFIX, i), values.next())
                for i in range(first, min(first + batch, keys))
            ]
            await driver.mset(items)

    await asyncio.gather(*(one(s) for s in starts))
    return keys


async def run(spec: LoadSpec) -> LoadResult:
    """Run ``spec`` in this process (the protocol in the module docstring)."""
    workload = WORKLOADS[spec.workload]
    driver = await open_driver(spec.target)
    try:
        if spec.mode == "prefill":
            started = time.perf_counter()
            cpu0 = time.process_time()
            n = await prefill(driver)
            return LoadResult(
                n // 100,
                n,
                time.perf_counter() - started,
                LatencyHistogram(),
                {},
                None,
                time.process_time() - cpu0,
            )
        rng = random.Random(spec.seed)
        op = make_op(workload, driver, rng)
        if spec.warmup_s > 0:
            await _drive(op, spec.inflight, spec.warmup_s, record=False)
        _emit({"event": "ready"})
        line = await _read_line()
        if not line.strip():
            raise RuntimeError("the parent closed stdin before saying go")
        cpu0 = time.process_time()
        tally, hist, elapsed = await _drive(op, spec.inflight, spec.seconds, record=True)
        return LoadResult(
            ops=tally.ops,
            keys=tally.ops * workload.batch,
            elapsed_s=elapsed,
            histogram=hist,
            errors=tally.errors,
            error_sample=tally.error_sample,
            cpu_s=time.process_time() - cpu0,
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
    finally:
        await driver.close()


def _run_loop(main: Coroutine[Any, Any, LoadResult]) -> LoadResult:
    """Run ``main`` on uvloop when it is installed (it is a dependency; the
    fallback keeps a bare ``asyncio`` install working).  uvloop costs the
    load generator 7-10 % less CPU per request, which on a 2-core machine
    shared with the systems under test leaves them that much more, for every
    system alike (measured in session 6, docs/benchmarks-history.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the load-generator process; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m cachenode.bench.loadgen")
    parser.add_argument("--spec", required=True, help="the LoadSpec as JSON")
    args = parser.parse_args(argv)
    try:
        spec = LoadSpec.from_json(json.loads(args.spec))
        if spec.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {spec.workload!r}")
        result = _run_loop(run(spec))
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        _emit({"event": "error", "message": f"{type(err).__name__}: {err}"})
        return 1
    _emit(result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
