"""Worker threads: turn generated ops into history events through one node.

Each worker is pinned to one node for its whole life and holds one *process id*
at a time.  It records ``invoke`` before calling and exactly one completion
after: ``ok``, ``fail`` (definitely not applied) or ``info`` (unknown).  After an
``info`` it continues as a new process id (``process + n_workers``), because its
previous op may still take effect at any later time.  A read that is not ``ok``
is recorded as ``fail``: reads change nothing, so an unknown read is no read.

No hidden retries.  The one deliberate resend is the counter's, made with the
*same request id* so exactly-once semantics make it invisible:

* after an ``info`` the incr is sent once more; its answer (ok/fail/info) decides
  the recorded completion (a definite failure of the resend proves nothing about
  the first attempt, so it is recorded as ``info``);
* for the seeded ``dup`` fraction, after an ``ok`` the incr is sent once more and
  the recorded value is the LAST ok answer.  With exactly-once it equals the
  first; a node that applies the retry again (``--unsafe-dup-incr``) double-counts,
  which the counter model catches.

A worker whose node is down (the channel is in TRANSIENT_FAILURE) does not
invoke ops until the connection comes back: an op never sent is not an op.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from jepsen_lite.client import CacheClient, Outcome
from jepsen_lite.generator import Generator, OpSpec, element_key
from jepsen_lite.history import HistoryWriter

__all__ = ["ShardTracker", "Worker", "perform"]

READS = frozenset({"read"})


class ShardTracker:
    """Which shard each key lives on (learnt from reads' ``ReadMeta``), so the
    nemesis can aim at the leaders of shards the workload is using."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shard: dict[str, int] = {}
        self._order: list[str] = []

    def observe(self, key: str, shard: int | None) -> None:
        if shard is None:
            return
        with self._lock:
            if key not in self._shard:
                self._order.append(key)
            self._shard[key] = shard

    def hot(self, last: int = 8) -> list[int]:
        """Shards of the most recently discovered keys (may be empty)."""
        with self._lock:
            return sorted({self._shard[k] for k in self._order[-last:]})

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._shard)


def perform(
    client: CacheClient,
    spec: OpSpec,
    *,
    workload: str,
    client_id: bytes,
    next_seq: Callable[[], int],
    elements: Callable[[str], list[int]],
    tracker: ShardTracker | None = None,
) -> tuple[Outcome, Any]:
    """Run ``spec`` through ``client``; return its outcome and the completion
    value to record (the read result, the incr's new value, or the op's input)."""
    f, key, v = spec.f, spec.key, spec.value
    if f == "read":
        if workload == "set":
            elems = elements(key)
            o = client.present([element_key(key, e) for e in elems])
            if o.type != "ok":
                return o, None
            by_key = {element_key(key, e): e for e in elems}
            return o, sorted(by_key[k] for k in o.value)
        o = client.get(key)
        if tracker is not None:
            tracker.observe(key, o.shard)
        if o.type == "ok" and workload == "counter":
            return o, 0 if o.value is None else o.value
        return o, o.value
    if f == "write":
        if isinstance(v, dict):
            o = client.set(key, int(v["value"]), ttl_ms=int(v["ttl_ms"]))
        elif spec.mset:
            o = client.mset_one(key, int(v))
        else:
            o = client.set(key, int(v))
        return o, v
    if f == "cas":
        return client.cas(key, int(v[0]), int(v[1])), v
    if f == "add":
        return client.set(element_key(key, int(v)), 1), v
    if f == "incr":
        seq = next_seq()
        o = client.incr(key, int(v), client_id, seq)
        if o.type == "info":
            again = client.incr(key, int(v), client_id, seq)
            if again.type == "ok":
                o = again
            else:
                o = Outcome("info", None, f"{o.error}; resent: {again.error}")
        elif o.type == "ok" and spec.dup:
            again = client.incr(key, int(v), client_id, seq)
            if again.type == "ok":
                o = again
        return o, o.value if o.type == "ok" else v
    raise ValueError(f"unknown op {f!r}")


class Worker(threading.Thread):
    """One logical client thread: ``index`` picks its generator stream and its
    first process id; ``pace_s`` is the mean time between its invocations."""

    def __init__(
        self,
        index: int,
        n_workers: int,
        client: CacheClient,
        gen: Generator,
        history: HistoryWriter,
        stop: threading.Event,
        pace_s: float,
        seed: int,
        tracker: ShardTracker,
    ) -> None:
        super().__init__(name=f"jl-worker-{index}", daemon=True)
        self.index = index
        self.n_workers = n_workers
        self.client = client
        self.gen = gen
        self.history = history
        self.stop_event = stop
        self.pace_s = pace_s
        self.rng = random.Random(f"{seed}/pace/{index}")
        self.tracker = tracker
        self.process = index
        self.client_id = f"jl-{seed}-w{index}".encode()
        self._seq = 0
        self.error: BaseException | None = None

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # reported by the runner; a worker never kills the run
            self.error = e

    def _loop(self) -> None:
        next_at = time.monotonic() + self.rng.uniform(0, self.pace_s)
        while not self.stop_event.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self.stop_event.wait(delay):
                return
            next_at = max(time.monotonic(), next_at + self.rng.uniform(0, 2 * self.pace_s))
            if not self.client.usable(0.5):
                continue  # node down: nothing is invoked
            spec = self.gen.next_op(self.index)
            self.step(spec)

    def step(self, spec: OpSpec) -> str:
        """Invoke ``spec``, record its completion, return the recorded type."""
        node = self.client.node
        self.history.record(self.process, "invoke", spec.f, spec.key, spec.value, node=node)
        outcome, value = perform(
            self.client,
            spec,
            workload=self.gen.workload,
            client_id=self.client_id,
            next_seq=self._next_seq,
            elements=self.gen.elements,
            tracker=self.tracker,
        )
        typ = outcome.type
        if spec.f in READS and typ == "info":
            typ = "fail"
        self.history.record(
            self.process, typ, spec.f, spec.key, value, node=node, error=outcome.error
        )
        if typ == "info":
            self.process += self.n_workers
        return typ
