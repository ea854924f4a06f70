"""Histories: the event record, the JSONL file format, and pairing into operations.

A history is the list of events a Jepsen-style harness observed, in the order it
observed them.  Every client operation contributes an ``invoke`` event and, unless
the harness died first, one completion event:

* ``ok``   -- the operation certainly happened, ``value`` is its result;
* ``fail`` -- the operation certainly did *not* happen (it is dropped before checking);
* ``info`` -- indeterminate: it may have happened at any point from its invocation
  to the end of time, so it stays open (concurrent with everything after it) until
  the end of the history.  A crashed *read* changes nothing, so it is dropped like a
  ``fail`` (Jepsen does the same).

Nemesis (fault injector) events share the file; they have ``process == "nemesis"``,
``type == "info"`` and an ``f`` such as ``start-partition``/``stop-partition``.

The JSONL file is one JSON object per line, optionally preceded by one header
object (``{"format": "jepsen-lite", "version": 1, "workload": "register", ...}``)
naming the workload so ``jepsen-lite check`` can pick the model::

    {"index":812,"time":184233011,"process":7,"type":"invoke","f":"cas","key":"r/17","value":[2,4],"node":"n3"}
    {"index":815,"time":190001277,"process":7,"type":"info","f":"cas","key":"r/17","value":[2,4],"error":"DEADLINE_EXCEEDED"}
    {"index":900,"time":201000000,"process":"nemesis","type":"info","f":"start-partition","value":{"n1":["n2","n3"]}}
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, Final, Literal

__all__ = [
    "NEMESIS",
    "OP_TYPES",
    "History",
    "HistoryError",
    "HistoryWriter",
    "Op",
    "Operation",
    "freeze",
    "nemesis_intervals",
    "pair_operations",
    "read_history",
]

NEMESIS: Final = "nemesis"
OP_TYPES: Final = frozenset({"invoke", "ok", "fail", "info"})
FORMAT_NAME: Final = "jepsen-lite"
FORMAT_VERSION: Final = 1

OpType = Literal["invoke", "ok", "fail", "info"]
Process = int | str


class HistoryError(ValueError):
    """A history is malformed (bad line, completion without invocation, ...)."""


def freeze(value: Any) -> Hashable:
    """Return a hashable, equality-preserving copy of a JSON-like value.

    Lists become tuples and dicts become sorted tuples of pairs, so values read from
    JSON can be used as model states and memo keys.
    """
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, set | frozenset):
        return frozenset(freeze(v) for v in value)
    return value  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Op:
    """One history event, exactly as recorded.

    ``index`` is unique and increasing in file order; ``time`` is the harness's
    ``time.monotonic_ns()`` (any monotone integer clock works, e.g. a line number).
    ``key`` is ``None`` for single-register histories and for nemesis events.
    """

    index: int
    time: int
    process: Process
    type: OpType
    f: str
    key: Hashable = None
    value: Any = None
    node: str | None = None
    error: str | None = None

    @property
    def is_nemesis(self) -> bool:
        return self.process == NEMESIS

    def to_json(self) -> dict[str, Any]:
        """The JSON object for this event; optional fields are omitted when unset."""
        d: dict[str, Any] = {
            "index": self.index,
            "time": self.time,
            "process": self.process,
            "type": self.type,
            "f": self.f,
        }
        if self.key is not None:
            d["key"] = list(self.key) if isinstance(self.key, tuple) else self.key
        if self.value is not None:
            d["value"] = self.value
        if self.node is not None:
            d["node"] = self.node
        if self.error is not None:
            d["error"] = self.error
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Op:
        """Build an event from its JSON object; raises HistoryError if it is malformed."""
        try:
            index, t, process, typ, f = d["index"], d["time"], d["process"], d["type"], d["f"]
        except KeyError as e:
            raise HistoryError(f"event lacks field {e.args[0]!r}") from None
        if not isinstance(index, int) or not isinstance(t, int):
            raise HistoryError("event 'index' and 'time' must be integers")
        if typ not in OP_TYPES:
            raise HistoryError(f"event type {typ!r} is not one of invoke|ok|fail|info")
        if not isinstance(process, int) and process != NEMESIS:
            raise HistoryError(f"event process {process!r} is neither an int nor 'nemesis'")
        if not isinstance(f, str):
            raise HistoryError("event 'f' must be a string")
        key = d.get("key")
        return cls(
            index=index,
            time=t,
            process=process,
            type=typ,
            f=f,
            key=freeze(key),
            value=d.get("value"),
            node=d.get("node"),
            error=d.get("error"),
        )


@dataclass(frozen=True, slots=True)
class History:
    """A parsed history file: its header (``{}`` if none) and its events in file order."""

    ops: list[Op]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def workload(self) -> str | None:
        w = self.meta.get("workload")
        return w if isinstance(w, str) else None


class HistoryWriter:
    """Append events to a JSONL history, one line per event, flushed after each.

    Flushing per event means a harness that crashes (or is SIGKILLed) still leaves a
    history that :func:`read_history` accepts: every complete line is an event, and
    ops whose completion never got written are simply open (treated as ``info``).

    Thread-safe: worker threads may call :meth:`record` concurrently; indices are
    assigned under a lock so they are unique and increase in file order.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        workload: str | None = None,
        meta: dict[str, Any] | None = None,
        fsync: bool = False,
        clock: Any = time.monotonic_ns,
    ) -> None:
        self._fh: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._next_index = 0
        self._fsync = fsync
        self._clock = clock
        header: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
        if workload is not None:
            header["workload"] = workload
        header.update(meta or {})
        self._write_line(header)

    def _write_line(self, obj: dict[str, Any]) -> None:
        self._fh.write(json.dumps(obj, separators=(",", ":"), default=_json_default) + "\n")
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def write(self, op: Op) -> None:
        """Write a fully built event (its index is used as given)."""
        with self._lock:
            self._write_line(op.to_json())
            self._next_index = max(self._next_index, op.index + 1)

    def record(
        self,
        process: Process,
        type: OpType,
        f: str,
        key: Hashable = None,
        value: Any = None,
        *,
        node: str | None = None,
        error: str | None = None,
    ) -> Op:
        """Stamp an event with the next index and the current clock, write it, return it."""
        with self._lock:
            op = Op(self._next_index, self._clock(), process, type, f, key, value, node, error)
            self._next_index += 1
            self._write_line(op.to_json())
        return op

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _json_default(o: Any) -> Any:
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def iter_history_lines(lines: Iterable[str], name: str = "<history>") -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL history, skipping blank lines.

    A torn final line (no trailing newline, invalid JSON) is what a harness killed
    mid-write leaves behind; it is ignored.  Any other bad line raises HistoryError.
    """
    pending_error: HistoryError | None = None
    for lineno, raw in enumerate(lines, 1):
        if pending_error is not None:
            raise pending_error
        line = raw.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            err = HistoryError(f"{name}:{lineno}: invalid JSON ({e.msg})")
            if raw.endswith("\n"):
                raise err from None
            pending_error = err  # only fatal if another line follows
            continue
        if not isinstance(obj, dict):
            raise HistoryError(f"{name}:{lineno}: expected a JSON object")
        yield obj


def parse_history_lines(lines: Iterable[str], name: str = "<history>") -> History:
    """Parse JSONL lines (see :func:`iter_history_lines`) into a :class:`History`."""
    ops: list[Op] = []
    meta: dict[str, Any] = {}
    for n, obj in enumerate(iter_history_lines(lines, name)):
        if "type" not in obj and "index" not in obj:
            if n == 0:
                meta = obj
                continue
            raise HistoryError(f"{name}: header object found after the first line")
        try:
            ops.append(Op.from_json(obj))
        except HistoryError as e:
            raise HistoryError(f"{name}: event {len(ops)}: {e}") from None
    return History(ops=ops, meta=meta)


def read_history(path: str | os.PathLike[str]) -> History:
    """Read a JSONL history file.  Raises OSError or HistoryError."""
    with open(path, encoding="utf-8") as fh:
        return parse_history_lines(fh, str(path))


@dataclass(frozen=True, slots=True)
class Operation:
    """A client operation: an invocation paired with its completion.

    ``call``/``ret`` are the event times; ``ret is None`` means the op is open until
    after the end of the history (it crashed: ``info``, or never completed).
    ``value`` is the invocation's value (the input) and ``output`` the completion's
    value (``None`` when ``crashed``).  ``id`` is the invocation event's index.
    """

    id: int
    process: Process
    f: str
    key: Hashable
    value: Any
    output: Any
    call: int
    ret: int | None
    node: str | None = None
    error: str | None = None

    @property
    def crashed(self) -> bool:
        return self.ret is None


READ_FS: Final = frozenset({"read", "get"})


def pair_operations(
    ops: Sequence[Op],
    *,
    drop_crashed_reads: bool = True,
    read_fs: frozenset[str] = READ_FS,
) -> list[Operation]:
    """Pair invocations with completions per process, applying Jepsen's rules.

    * ``fail`` completions: the op did not happen and is omitted;
    * ``info`` completions and invocations never completed: ``ret = None`` (open until
      the end of the history);
    * crashed ops whose ``f`` is in ``read_fs`` are omitted when ``drop_crashed_reads``
      (a read that may or may not have happened has no observable effect);
    * nemesis events are ignored.

    Raises HistoryError for a completion without a pending invocation, a completion
    whose ``f`` differs from its invocation's or whose time precedes it, or an
    invocation while the same process still has one pending.  Result is ordered by invocation index.
    """
    pending: dict[Process, Op] = {}
    out: list[Operation] = []
    for ev in ops:
        if ev.is_nemesis:
            continue
        if ev.type == "invoke":
            if ev.process in pending:
                raise HistoryError(
                    f"event {ev.index}: process {ev.process} invoked {ev.f} while "
                    f"event {pending[ev.process].index} is still pending"
                )
            pending[ev.process] = ev
            continue
        inv = pending.pop(ev.process, None)
        if inv is None:
            raise HistoryError(
                f"event {ev.index}: {ev.type} {ev.f} of process {ev.process} has no invocation"
            )
        if inv.f != ev.f:
            raise HistoryError(
                f"event {ev.index}: completion f={ev.f!r} does not match invocation f={inv.f!r}"
            )
        if ev.time < inv.time:
            raise HistoryError(f"event {ev.index}: completes before its invocation (time)")
        if ev.type == "fail":
            continue
        if ev.type == "info":
            if drop_crashed_reads and inv.f in read_fs:
                continue
            out.append(_operation(inv, None, None, ev.error))
        else:
            out.append(_operation(inv, ev.value, ev.time, ev.error))
    for inv in pending.values():
        if not (drop_crashed_reads and inv.f in read_fs):
            out.append(_operation(inv, None, None, None))
    out.sort(key=lambda o: o.id)
    return out


def _operation(inv: Op, output: Any, ret: int | None, error: str | None) -> Operation:
    return Operation(
        id=inv.index,
        process=inv.process,
        f=inv.f,
        key=inv.key,
        value=inv.value,
        output=output,
        call=inv.time,
        ret=ret,
        node=inv.node,
        error=error,
    )


@dataclass(frozen=True, slots=True)
class NemesisInterval:
    """A fault window: ``start``..``stop`` times (``stop is None``: never healed)."""

    name: str
    start: int
    stop: int | None
    value: Any = None


def nemesis_intervals(ops: Sequence[Op]) -> list[NemesisInterval]:
    """Pair ``start-X`` nemesis events with the next ``stop-X`` event.

    Nemesis events that are neither start-* nor stop-* become zero-length intervals
    (instant faults such as a kill).  An unmatched start runs to the end.
    """
    open_: dict[str, list[Op]] = {}
    out: list[NemesisInterval] = []
    for ev in ops:
        # Jepsen nemeses log an invoke and an info per fault; the info marks when
        # the fault is actually in place, so only those count.
        if not ev.is_nemesis or ev.type != "info":
            continue
        if ev.f.startswith("start-") or ev.f.startswith("start_"):
            open_.setdefault(ev.f[6:], []).append(ev)
        elif ev.f.startswith("stop-") or ev.f.startswith("stop_"):
            starts = open_.get(ev.f[5:])
            if starts:
                s = starts.pop(0)
                out.append(NemesisInterval(s.f[6:], s.time, ev.time, s.value))
        else:
            out.append(NemesisInterval(ev.f, ev.time, ev.time, ev.value))
    for name, starts in open_.items():
        out.extend(NemesisInterval(name, s.time, None, s.value) for s in starts)
    out.sort(key=lambda i: i.start)
    return out
