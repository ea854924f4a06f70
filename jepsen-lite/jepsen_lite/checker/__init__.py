"""Linearizability checking of whole histories: partition by key, search each key.

Entry points:

* :func:`check_history` -- raw events (:class:`~jepsen_lite.history.Op`) in,
  :class:`CheckResult` out (pairs invocations/completions with Jepsen's rules);
* :func:`check_operations` -- the same from already paired operations.

Keys are independent (Horn–Kroening P-compositionality), so each is searched
alone, smallest first.  With several keys the work runs in two phases: a quick
serial pass with a small step budget settles the many easy keys without any
process start-up cost; only the keys that exceeded it go to a process pool with
the full budget.  Unless ``all_keys`` is set, the first violation stops the check
(running workers are told to stop through a shared flag).

The overall verdict is three-valued: False if any key is not linearizable, else
None if any key is unknown (budget, cancelled), else True.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections import defaultdict
from collections.abc import Hashable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from multiprocessing.synchronize import Event as EventType
from time import perf_counter
from types import TracebackType
from typing import Any, Final

from jepsen_lite.checker.models import (
    Model,
    ModelError,
    NondeterministicModel,
    as_model,
    get_model,
)
from jepsen_lite.checker.wgl import (
    DEFAULT_MAX_MEMO,
    DEFAULT_MAX_STEPS,
    EncodedOp,
    KeyResult,
    check_key,
)
from jepsen_lite.history import Op, Operation, pair_operations

__all__ = [
    "DEFAULT_MAX_MEMO",
    "DEFAULT_MAX_STEPS",
    "CheckResult",
    "KeyResult",
    "ModelError",
    "WorkerPool",
    "check_history",
    "check_key",
    "check_operations",
    "get_model",
]

log = logging.getLogger(__name__)

QUICK_STEPS: Final = 50_000
"""Phase-one budget per key: a valid key of a few hundred ops needs far fewer."""


@dataclass(frozen=True)
class CheckResult:
    """Verdict for a whole history.  ``keys`` are in the order they were decided."""

    valid: bool | None
    model: str
    keys: list[KeyResult]
    ops: int
    seconds: float
    all_keys: bool = False
    by_id: dict[int, Operation] = field(default_factory=dict, repr=False, compare=False)

    @property
    def failures(self) -> list[KeyResult]:
        return [k for k in self.keys if k.valid is False]

    @property
    def unknowns(self) -> list[KeyResult]:
        return [k for k in self.keys if k.valid is None]


def _verdict(results: Sequence[KeyResult]) -> bool | None:
    if any(r.valid is False for r in results):
        return False
    if any(r.valid is None for r in results):
        return None
    return True


# ------------------------------------------------------------------------ worker pool

_CANCEL: EventType | None = None


def _init_worker(cancel: EventType) -> None:
    global _CANCEL
    _CANCEL = cancel
    # Ctrl-C is the parent's business: it cancels us through the flag.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_check(
    model: Model, key: Hashable, ops: list[EncodedOp], max_steps: int, max_memo: int
) -> KeyResult:
    flag = _CANCEL
    return check_key(
        model,
        ops,
        key=key,
        max_steps=max_steps,
        max_memo=max_memo,
        cancelled=flag.is_set if flag is not None else None,
    )


class WorkerPool:
    """A lazily started process pool for key searches, reusable across histories.

    Not thread-safe: one :func:`check_operations` at a time may use it.  Close it (or
    use it as a context manager) to stop the worker processes.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self._executor: ProcessPoolExecutor | None = None
        self._cancel: EventType | None = None

    def _get(self) -> tuple[ProcessPoolExecutor, EventType]:
        if self._executor is None or self._cancel is None:
            # fork starts in milliseconds and needs no re-import, but forking a
            # process with other threads running (a harness with client threads)
            # can deadlock the child on a lock copied mid-use; forkserver is safe.
            method: str | None = None
            if sys.platform == "linux":
                method = "fork" if threading.active_count() == 1 else "forkserver"
            ctx = multiprocessing.get_context(method)
            self._cancel = ctx.Event()
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(self._cancel,),
            )
        return self._executor, self._cancel

    def reset(self) -> None:
        """Drop a broken executor without waiting; the next run starts a new one."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        self._cancel = None

    def close(self) -> None:
        if self._executor is not None:
            if self._cancel is not None:
                self._cancel.set()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
            self._cancel = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run(
        self,
        model: Model,
        tasks: list[tuple[Hashable, list[EncodedOp]]],
        max_steps: int,
        max_memo: int,
        all_keys: bool,
    ) -> list[KeyResult]:
        """Check ``tasks`` in the pool, in submission order of priority."""
        executor, cancel = self._get()
        cancel.clear()
        futures: dict[Future[KeyResult], tuple[Hashable, int]] = {
            executor.submit(_worker_check, model, key, ops, max_steps, max_memo): (key, len(ops))
            for key, ops in tasks
        }
        results: list[KeyResult] = []
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: futures[f][1]):
                    if fut.cancelled():
                        key, n = futures[fut]
                        results.append(KeyResult(key, None, n, reason="skipped"))
                        continue
                    r = fut.result()
                    results.append(r)
                    if r.valid is False and not all_keys:
                        cancel.set()
                        for other in pending:
                            other.cancel()
        except BaseException:
            cancel.set()
            for fut in futures:
                fut.cancel()
            raise
        finally:
            if not pending:
                cancel.clear()
        return results


# ---------------------------------------------------------------------------- checking


def _check_serially(
    model: Model,
    tasks: list[tuple[Hashable, list[EncodedOp]]],
    max_steps: int,
    max_memo: int,
    all_keys: bool,
) -> list[KeyResult]:
    out: list[KeyResult] = []
    stop = False
    for key, ops in tasks:
        if stop:
            out.append(KeyResult(key, None, len(ops), reason="skipped"))
            continue
        r = check_key(model, ops, key=key, max_steps=max_steps, max_memo=max_memo)
        out.append(r)
        stop = r.valid is False and not all_keys
    return out


def check_history(
    ops: Sequence[Op],
    model: Model | NondeterministicModel | str,
    **kwargs: Any,
) -> CheckResult:
    """Pair raw events (Jepsen rules, see :func:`pair_operations`) and check them.

    Keyword arguments are those of :func:`check_operations`.  Raises HistoryError
    for a malformed history and ModelError for ops the model cannot express.
    """
    return check_operations(pair_operations(ops), model, **kwargs)


def check_operations(
    operations: Sequence[Operation],
    model: Model | NondeterministicModel | str,
    *,
    all_keys: bool = False,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_memo: int = DEFAULT_MAX_MEMO,
    workers: int | None = None,
    pool: WorkerPool | None = None,
    quick_steps: int = QUICK_STEPS,
) -> CheckResult:
    """Check paired operations for linearizability, key by key.

    ``max_steps``/``max_memo`` are per key.  ``workers`` caps the processes used for
    hard keys (default: CPU count; 1 = never fork); pass a long-lived ``pool`` to
    amortise its start-up over many histories (its size then wins).  Keys needing
    more than ``quick_steps`` are the "hard" ones handed to the pool.
    """
    t0 = perf_counter()
    m = get_model(model) if isinstance(model, str) else as_model(model)
    grouped: dict[Hashable, list[Operation]] = defaultdict(list)
    by_id: dict[int, Operation] = {}
    for op in operations:
        grouped[op.key].append(op)
        by_id[op.id] = op
    by_key: dict[Hashable, list[EncodedOp]] = {}
    for key, key_ops in grouped.items():
        inputs = m.encode_all(key_ops)
        by_key[key] = [(o.id, o.call, o.ret, inp) for o, inp in zip(key_ops, inputs, strict=True)]
    # Smallest keys first: they are cheapest, so a violation there is found soonest.
    tasks = sorted(by_key.items(), key=lambda kv: (len(kv[1]), repr(kv[0])))

    results: list[KeyResult] = []
    hard: list[tuple[Hashable, list[EncodedOp]]] = []
    quick = min(quick_steps, max_steps) if len(tasks) > 1 else max_steps
    for key, ops in tasks:
        r = check_key(m, ops, key=key, max_steps=quick, max_memo=max_memo)
        if r.valid is None and quick < max_steps and r.reason == "budget-steps":
            hard.append((key, ops))
            continue
        results.append(r)
        if r.valid is False and not all_keys:
            break

    if hard:
        if results and results[-1].valid is False and not all_keys:
            results.extend(KeyResult(k, None, len(o), reason="skipped") for k, o in hard)
        else:
            n_workers = pool.workers if pool is not None else (workers or os.cpu_count() or 1)
            pooled: list[KeyResult] | None = None
            if n_workers > 1 and len(hard) > 1:
                own = pool is None
                p = pool if pool is not None else WorkerPool(min(n_workers, len(hard)))
                try:
                    pooled = p.run(m, hard, max_steps, max_memo, all_keys)
                except BrokenProcessPool as e:
                    # Workers could not start or died (e.g. an unguarded __main__
                    # under forkserver): the answer matters more than the speed-up.
                    log.warning("process pool failed (%s); checking %d keys serially", e, len(hard))
                    p.reset()
                finally:
                    if own:
                        p.close()
            if pooled is not None:
                results.extend(pooled)
            else:
                results.extend(_check_serially(m, hard, max_steps, max_memo, all_keys))

    decided = {r.key for r in results}
    results.extend(
        KeyResult(k, None, len(o), reason="skipped") for k, o in tasks if k not in decided
    )
    # Give reports the model's natural view of the state where the search got stuck.
    results = [
        replace(r, state=m.decode_state(r.state, [e[3] for e in by_key[r.key]]))
        if r.valid is False
        else r
        for r in results
    ]
    return CheckResult(
        valid=_verdict(results),
        model=m.name,
        keys=results,
        ops=len(operations),
        seconds=perf_counter() - t0,
        all_keys=all_keys,
        by_id=by_id,
    )
