"""Seeded operation generators: independent keys, several workers per key.

Like Jepsen's ``independent/concurrent-generator``: the workers are split into
*groups* of ``workers_per_key``; each group works on one key at a time and moves
to a fresh key once ``ops_per_key`` operations were invoked on it.  Group ``g``
uses keys ``g, g + G, g + 2G, ...`` (G = number of groups), so the key sequence
of every group is fixed by the parameters alone.

Each worker draws from its own ``random.Random`` seeded from ``(seed, worker)``,
so for a given seed a worker's choices (which op, which value) are the same on
every run, whatever the thread interleaving.  The only inputs that are not the
seed are the key switch points (shared op counts) and, for ``ttl``, the time at
which a group's next write is due (time-based, like Jepsen's ``stagger``).

Workloads and their ops (``OpSpec.f``/``value``):

* ``register``: ``read``, ``write v``, ``cas [expected new]``; values 0-4; a
  seeded ``MSET_FRACTION`` of the writes is sent as a one-item ``MSet``
  (``OpSpec.mset``), so the multi-key write path (its own command and apply)
  is checked under the same faults;
* ``counter``: ``incr d`` (d in 1..5; a seeded ``dup`` fraction is re-sent with the
  same request id after a success), ``read``;
* ``set``: ``add e`` (e unique per key), ``read`` (all elements added so far);
* ``ttl``: ``write {"value": v, "ttl_ms": T}`` (T in 1000..3000 ms) when the
  group's next write is due, else ``read``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "DEFAULTS",
    "WORKLOADS",
    "Generator",
    "OpSpec",
    "WorkloadShape",
    "element_key",
]

WORKLOADS: Final = ("register", "counter", "set", "ttl")
KEY_PREFIX: Final = {"register": "r", "counter": "c", "set": "s", "ttl": "t"}


@dataclass(frozen=True, slots=True)
class WorkloadShape:
    """How many keys are worked on at once, by how many workers, for how long."""

    key_groups: int
    workers_per_key: int
    ops_per_key: int


DEFAULTS: Final = {
    "register": WorkloadShape(key_groups=3, workers_per_key=3, ops_per_key=150),
    "counter": WorkloadShape(key_groups=3, workers_per_key=3, ops_per_key=150),
    "set": WorkloadShape(key_groups=2, workers_per_key=3, ops_per_key=200),
    "ttl": WorkloadShape(key_groups=6, workers_per_key=2, ops_per_key=120),
}

DUP_FRACTION: Final = 0.2
MSET_FRACTION: Final = 0.5
TTL_MIN_MS: Final = 1000
TTL_MAX_MS: Final = 3000


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One operation for a worker to perform.  ``dup`` (counter only): after a
    successful incr, send the same request id once more.  ``mset`` (register
    writes only): send the write as a one-item MSet instead of a Set."""

    f: str
    key: str
    value: Any = None
    dup: bool = False
    mset: bool = False


def element_key(set_key: str, element: int) -> str:
    """The cache key that records ``element`` of the set ``set_key``."""
    return f"{set_key}/e{element}"


@dataclass
class _Group:
    index: int
    key_no: int
    count: int = 0
    next_write_at: float = 0.0


@dataclass
class Generator:
    """Thread-safe source of ops for ``n_workers`` workers.

    ``next_op(worker)`` returns the worker's next :class:`OpSpec`.  Worker ``w``
    belongs to group ``w // workers_per_key``.  ``clock`` (monotonic seconds) is
    only consulted by the ttl workload.
    """

    workload: str
    seed: int
    shape: WorkloadShape
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _groups: list[_Group] = field(default_factory=list, repr=False)
    _rngs: list[random.Random] = field(default_factory=list, repr=False)
    _via_rngs: list[random.Random] = field(default_factory=list, repr=False)
    _elements: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _keys: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(
                f"unknown workload {self.workload!r}; choose from {', '.join(WORKLOADS)}"
            )
        s = self.shape
        if min(s.key_groups, s.workers_per_key, s.ops_per_key) < 1:
            raise ValueError("key_groups, workers_per_key and ops_per_key must be >= 1")
        self._groups = [_Group(g, g) for g in range(s.key_groups)]
        self._rngs = [random.Random(f"{self.seed}/worker/{w}") for w in range(self.n_workers)]
        # Which RPC carries a write: a stream of its own, so the ops and values
        # drawn for a seed are what they were before MSet writes existed.
        self._via_rngs = [random.Random(f"{self.seed}/via/{w}") for w in range(self.n_workers)]
        for g in self._groups:
            self._note_key(self._key(g.key_no))

    @classmethod
    def for_workload(cls, workload: str, seed: int, **overrides: int) -> Generator:
        """A generator with the workload's default shape, fields overridable."""
        base = DEFAULTS[workload] if workload in DEFAULTS else WorkloadShape(1, 1, 1)
        shape = WorkloadShape(
            key_groups=overrides.get("key_groups", base.key_groups),
            workers_per_key=overrides.get("workers_per_key", base.workers_per_key),
            ops_per_key=overrides.get("ops_per_key", base.ops_per_key),
        )
        return cls(workload, seed, shape)

    @property
    def n_workers(self) -> int:
        return self.shape.key_groups * self.shape.workers_per_key

    def _key(self, key_no: int) -> str:
        return f"{KEY_PREFIX[self.workload]}/{key_no}"

    def _note_key(self, key: str) -> None:
        if key not in self._elements:
            self._elements[key] = []
            self._keys.append(key)

    def keys(self) -> list[str]:
        """Every key any group has used so far, in first-use order."""
        with self._lock:
            return list(self._keys)

    def elements(self, set_key: str) -> list[int]:
        """Elements whose ``add`` was handed out for ``set_key`` so far."""
        with self._lock:
            return list(self._elements.get(set_key, ()))

    def next_op(self, worker: int) -> OpSpec:
        """The next op for ``worker`` (0 <= worker < n_workers)."""
        rng = self._rngs[worker]
        with self._lock:
            g = self._groups[worker // self.shape.workers_per_key]
            if g.count >= self.shape.ops_per_key:
                g.key_no += self.shape.key_groups
                g.count = 0
                g.next_write_at = 0.0
                self._note_key(self._key(g.key_no))
            g.count += 1
            key = self._key(g.key_no)
            op = self._make(rng, g, key)
            if op.f == "write" and self.workload == "register":
                if self._via_rngs[worker].random() < MSET_FRACTION:
                    op = OpSpec(op.f, op.key, op.value, mset=True)
            return op

    def _make(self, rng: random.Random, g: _Group, key: str) -> OpSpec:
        w = self.workload
        if w == "register":
            r = rng.random()
            if r < 0.5:
                return OpSpec("read", key)
            if r < 0.75:
                return OpSpec("write", key, rng.randint(0, 4))
            return OpSpec("cas", key, [rng.randint(0, 4), rng.randint(0, 4)])
        if w == "counter":
            if rng.random() < 0.4:
                return OpSpec("read", key)
            return OpSpec("incr", key, rng.randint(1, 5), dup=rng.random() < DUP_FRACTION)
        if w == "set":
            if rng.random() < 0.15:
                return OpSpec("read", key)
            elems = self._elements[key]
            e = len(elems)
            elems.append(e)
            return OpSpec("add", key, e)
        # ttl: a write when the group's next write is due, reads in between, so
        # values are observed both alive and expired.
        now = self.clock()
        v, ttl = rng.randint(0, 4), rng.randint(TTL_MIN_MS, TTL_MAX_MS)
        if now >= g.next_write_at:
            g.next_write_at = now + rng.uniform(0.5, 2.0) * ttl / 1000
            return OpSpec("write", key, {"value": v, "ttl_ms": ttl})
        return OpSpec("read", key)
