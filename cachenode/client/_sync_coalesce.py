"""Coalescing for the blocking client: concurrent calls from many threads to
one node travel as one Batch RPC.

:mod:`cachenode.client._coalesce` does this for the asyncio client.  The
blocking client used to send every call as its own unary RPC, so N threads
sharing one :class:`~cachenode.client.CacheClient` cost the node N RPCs (and
the node ~100-150 us of CPU each) where one Batch would do.

Policy (the async client's, with threads): at most one RPC in flight per
node.  A call that finds none in flight is made at once, alone, as the plain
blocking unary call in the caller's thread (a single-threaded caller pays
nothing and sees exactly the unary call's behaviour); calls that arrive
while one is in flight queue, and when it answers they all leave together as
one ``Batch`` (at most ``max_batch`` ops and ``max_keys`` keys; the rest
leave next).  No timer: nothing waits for company.

Threads: :meth:`SyncCoalescer.call` may be called from any number of threads
at once.  Queued calls leave with ``.future()`` and are finished by gRPC's
own callback thread, which hands out the results and starts the next batch;
so no caller ever waits past its own deadline for another caller's RPC.
Each caller waits for its own result until its own deadline and then gets a
DEADLINE_EXCEEDED shaped error if its op was sent; an op still queued at its
deadline is taken out, never sent, and fails as ``overloaded`` (not applied,
retried with a backoff).  An RPC that cannot be started (a closed channel)
fails its ops as never sent.  A batch's RPC carries the latest deadline of
its ops (as in the async client), so an op may still be applied after its
own caller gave up: writes carry request ids, so a retry never applies
twice.  A whole failed RPC fails each of its ops with that RPC's error; one op's failure in a
Batch is an :class:`~cachenode.client._coalesce.OpRpcError` shaped like the
unary call's, so the caller's retry rules treat both alike.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from cachenode.client._coalesce import (
    BATCH_FIELD,
    DeadlineError,
    batch_length,
    batch_request,
    op_outcomes,
)
from cachenode.client._status import ERROR_KEY


class NotSentError(grpc.RpcError):
    """A call that never left this client, shaped like an answer the retry
    rules (``_status.classify``) read as *not applied*: ``overloaded`` when it
    waited in the queue past its deadline, a connection failure when its RPC
    could not be started (a closed channel)."""

    def __init__(self, code: grpc.StatusCode, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self._code, self._message, self._kind = code, message, kind

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> Any:
        return ((ERROR_KEY, self._kind),) if self._kind else ()


def _not_started(err: Exception) -> NotSentError:
    return NotSentError(grpc.StatusCode.UNAVAILABLE, f"the call was never sent: {err}")


def _queued_too_long(inflight: int) -> NotSentError:
    return NotSentError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"waited its whole deadline behind {inflight} call(s) in flight to this node; it was never sent",
        "overloaded",
    )


class _Slot:
    """One caller's op and, once known, its outcome."""

    __slots__ = ("method", "field", "request", "deadline", "done", "outcome", "notify")

    def __init__(self, method: str, request: Any, deadline: float,
                 notify: queue.SimpleQueue[_Slot] | None = None) -> None:
        self.method = method
        self.field = BATCH_FIELD[method]
        self.request = request
        self.deadline = deadline
        self.done = threading.Event()
        self.outcome: Any = None  # the response message, or the exception to raise
        self.notify = notify  # also told when the outcome is known

    def finish(self, outcome: Any) -> None:
        self.outcome = outcome
        self.done.set()
        if self.notify is not None:
            self.notify.put(self)


class SyncCoalescer:
    """One per node address; see the module docstring."""

    def __init__(
        self, stub: Any, max_inflight: int = 2, max_batch: int = 256, max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``stub``: the node's ``CacheStub`` (its unary methods and ``Batch``).
        ``max_inflight``: RPCs in flight to the node before calls queue."""
        self._stub = stub
        self._max_inflight = max_inflight
        self._max_batch = max_batch
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._queue: list[_Slot] = []
        self._inflight = 0  # RPCs in flight
        self.rpcs = 0
        self.batches = 0  # RPCs that were Batch calls of two or more ops
        self.ops = 0
        self.largest = 0

    def call(self, method: str, request: Any, timeout: float) -> Any:
        """Send ``request`` (a request of the unary ``method``) and return its
        response message; raises a ``grpc.RpcError`` as the unary call would."""
        with self._lock:
            direct = self._inflight < self._max_inflight and not self._queue
            if direct:
                self._inflight += 1
                self.rpcs += 1
                self.ops += 1
                self.largest = max(self.largest, 1)
            else:
                slot = _Slot(method, request, self._clock() + timeout)
                self._queue.append(slot)
        if direct:
            # Room and no queue: the plain blocking call, in this thread (a
            # lone caller pays no hand-off between threads).
            try:
                return getattr(self._stub, method)(request, timeout=timeout)
            except ValueError as err:  # the channel was closed under us
                raise _not_started(err) from None
            finally:
                self._next()
        return self.result(slot)

    def start(self, calls: list[tuple[str, Any, float]],
              notify: queue.SimpleQueue[_Slot] | None = None) -> list[_Slot]:
        """Queue several ``(method, request, timeout)`` at once and return
        without waiting: they leave together, as few Batch RPCs as the limits
        allow (an mget's or mset's parts on this node: one).  Each slot is put
        on ``notify`` when its outcome is known; take it with :meth:`result`,
        which also waits for it until its deadline.  Any thread."""
        now = self._clock()
        slots = [_Slot(method, request, now + timeout, notify) for method, request, timeout in calls]
        batches: list[list[_Slot]] = []
        with self._lock:
            self._queue += slots
            while (batch := self._take()) is not None:
                batches.append(batch)
        for batch in batches:
            self._launch(batch)
        return slots

    def result(self, slot: _Slot) -> Any:
        """The response of a :meth:`start`-ed call, waiting until its deadline;
        raises a ``grpc.RpcError`` as :meth:`call` does."""
        if not slot.done.wait(max(0.0, slot.deadline - self._clock())):
            with self._lock:
                if slot in self._queue:  # never sent: it must never be
                    self._queue.remove(slot)
                    slot.finish(_queued_too_long(self._inflight))
            if not slot.done.is_set():
                raise DeadlineError()  # sent, no answer yet
        if isinstance(slot.outcome, BaseException):
            raise slot.outcome
        return slot.outcome

    # ---- internals (under self._lock, or on the RPC's callback thread) ----

    def _next(self) -> None:
        """An RPC ended: launch what queued meanwhile in its place."""
        with self._lock:
            self._inflight -= 1
            batch = self._take()
        if batch is not None:
            self._launch(batch)

    def _take(self) -> list[_Slot] | None:
        """Under the lock: the next batch, counted in flight (None: nothing
        queued or no room).  Calls already past their deadline are answered
        here, never sent."""
        if not self._queue or self._inflight >= self._max_inflight:
            return None
        now = self._clock()
        if any(s.deadline <= now for s in self._queue):
            for s in self._queue:
                if s.deadline <= now:
                    s.finish(_queued_too_long(self._inflight))
            self._queue = [s for s in self._queue if s.deadline > now]
            if not self._queue:
                return None
        head = self._queue[: self._max_batch]
        n = batch_length([(s.field, s.request) for s in head], self._max_batch, self._max_keys)
        batch, self._queue = self._queue[:n], self._queue[n:]
        self._inflight += 1
        self.rpcs += 1
        self.ops += n
        self.largest = max(self.largest, n)
        if n > 1:
            self.batches += 1
        return batch

    def _launch(self, batch: list[_Slot]) -> None:
        """Start one RPC for ``batch`` (taken, so counted in flight); its
        callback finishes the batch and launches the next."""
        while batch:
            timeout = max(s.deadline for s in batch) - self._clock()
            try:
                if len(batch) == 1:
                    fut = getattr(self._stub, batch[0].method).future(batch[0].request, timeout=max(timeout, 0.001))
                else:
                    req = batch_request([(s.field, s.request) for s in batch])
                    fut = self._stub.Batch.future(req, timeout=max(timeout, 0.001))
            except Exception as err:  # closed channel and the like: never strand a caller
                for s in batch:
                    s.finish(_not_started(err))
                with self._lock:
                    self._inflight -= 1
                    batch = self._take() or []
                continue
            try:
                fut.add_done_callback(lambda f, b=batch: self._finished(b, f))
            except Exception:  # sent, but its answer would reach no one
                fut.cancel()
                for s in batch:
                    s.finish(DeadlineError())
                self._next()
            return

    def _finished(self, batch: list[_Slot], fut: Any) -> None:
        """gRPC's callback thread (or the launching thread if it already ended)."""
        try:
            try:
                resp = fut.result()
            except grpc.RpcError as err:
                for s in batch:
                    s.finish(err)
            except BaseException:  # noqa: BLE001 - cancelled: sent, outcome unknown
                for s in batch:
                    s.finish(DeadlineError())
            else:
                if len(batch) == 1:
                    batch[0].finish(resp)
                else:
                    for s, outcome in zip(batch, op_outcomes([s.field for s in batch], resp), strict=True):
                        s.finish(outcome)
        finally:
            self._next()
