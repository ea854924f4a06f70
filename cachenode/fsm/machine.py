"""The shard state machine: applies committed log entries to one group's state.

Deterministic: the result and the state change depend only on the entry's
bytes, its index and the group's stored state.  No clock (time arrives as
``now_ms`` inside commands, stamped by the leader), no randomness, no I/O
besides the :class:`~cachenode.storage.base.StateWriter` it is handed.

Rules every replica follows, so replicas never diverge:

* Idempotent by index: an index at or below the stored applied index is a
  replay (pysyncobj re-applies its journal after a restart) and changes
  nothing.
* Never raises because of a command: malformed entries and bugs become
  :class:`ErrorResult` values and the index is still marked applied, so the
  group never gets stuck.  Only :class:`StorageFault` propagates.
* All or nothing: a command's whole write set is computed (reads only)
  before the first write.
* The group clock is ``max(stored clock, cmd.now_ms)``: monotonic even when
  successive leaders' clocks disagree.  A record is live iff
  ``expires_at_ms == 0 or expires_at_ms > clock``; an expired record that is
  still stored behaves as absent for every command.
* Exactly once: a command with a request id that was seen before returns
  the result recorded the first time, and changes nothing else.  The record
  keeps the request's :func:`~.codec.fingerprint` too: a command that
  reuses the id for a different request is refused (``failed_precondition``,
  nothing applied, the record kept) instead of answered with another
  request's result.
"""

from __future__ import annotations

import logging
import re
import struct

from .._errors import FailedPrecondition, Internal, InvalidArgument
from ..storage.base import Record, StateReader, StateWriter, StorageFault
from .codec import (
    decode_command,
    decode_multi,
    encode_multi_result,
    encode_result,
    fingerprint,
    is_multi,
)
from .commands import (
    Barrier,
    BarrierResult,
    CasResult,
    Command,
    CompareAndSet,
    Condition,
    Delete,
    DeleteResult,
    ErrorResult,
    Expire,
    ExpireResult,
    Incr,
    IncrResult,
    MSet,
    MSetResult,
    Replayed,
    Result,
    Set,
    SetResult,
)

__all__ = [
    "ShardStateMachine",
    "REUSED_REQUEST_ID_HINT",
    "read_get",
    "ttl_remaining_ms",
    "DEDUP_WINDOW_MS",
    "DEDUP_PRUNE_LIMIT",
]

log = logging.getLogger(__name__)

DEDUP_WINDOW_MS = 300_000
"""How long a request id is remembered (at least; pruning is gradual)."""
DEDUP_PRUNE_LIMIT = 64
"""Dedup entries forgotten per apply at most: bounds the cost of one apply."""

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
# Redis's rule: canonical decimal, no '+', no leading zeros, no spaces.
_INTEGER = re.compile(rb"0|-?[1-9][0-9]{0,18}")

Write = tuple[bytes, Record | None]  # (key, record to put) or (key, None) = delete


def _live(rec: Record | None, clock: int) -> Record | None:
    if rec is None or (rec.expires_at_ms and rec.expires_at_ms <= clock):
        return None
    return rec


def read_get(reader: StateReader, key: bytes, clock_ms: int) -> Record | None:
    """The live record at ``key`` judged at ``clock_ms``, or None.

    For the server's reads (any thread).  Pass the clock the read is judged
    with: a barrier's ``clock_ms`` for a linearizable read, the replica's
    ``reader.clock_ms()`` for a stale one."""
    return _live(reader.get(key), clock_ms)


def ttl_remaining_ms(record: Record, clock_ms: int) -> int:
    """Milliseconds until ``record`` expires at ``clock_ms``; -1 if it never does."""
    if record.expires_at_ms == 0:
        return -1
    return max(0, record.expires_at_ms - clock_ms)


def _value_write(key: bytes, value: bytes, expires_at_ms: int, index: int, clock: int) -> Write:
    # A value that is already due when written is never live: store nothing
    # (and drop what was there) instead of leaving work for active expiry.
    if expires_at_ms and expires_at_ms <= clock:
        return key, None
    return key, Record(value, index, expires_at_ms)


_FINGERPRINTED = 0xF1
"""First byte of a dedup record that keeps its request's fingerprint: u8
0xF1 + BE8 fingerprint + the encoded result.  A record written before
fingerprints holds the encoded result alone, which starts with
``codec.FORMAT_VERSION``."""
_DEDUP_RECORD = struct.Struct(">BQ")


REUSED_REQUEST_ID_HINT = (
    "A retry must repeat its request exactly, and every new request needs a new seq "
    "(a client that restarts with a fixed client id must not reuse its seqs within the dedup window)"
)
"""What to do about a request id reused for a different request (also said by the server)."""


def _replayed(stored: bytes, fp: int, client_id: bytes, seq: int) -> bytes:
    """The answer to a command whose request id (client_id, seq) has the
    dedup record ``stored``: the recorded result when the command is the
    same request (``fp``, its fingerprint, matches), else a refusal."""
    if not stored or stored[0] != _FINGERPRINTED:
        return stored  # recorded before fingerprints: no way to tell
    if _DEDUP_RECORD.unpack_from(stored)[1] == fp:
        return stored[_DEDUP_RECORD.size:]
    client = client_id.hex() if len(client_id) <= 16 else client_id[:16].hex() + "..."
    return encode_result(ErrorResult(
        FailedPrecondition.kind,
        f"request id (client {client}, seq {seq}) was already used on this shard for a different "
        f"request, which it answered; nothing was applied on this shard. {REUSED_REQUEST_ID_HINT}",
    ))


class _Refused(Exception):
    """The command is valid but the data forbids it (no state change)."""


class ShardStateMachine:
    """Applies the commands of one shard group.  Holds no state of its own
    besides configuration, so one instance may serve any number of groups.

    Called by the Raft layer on the driver thread, in index order, with the
    group's writer of the current batch; the caller commits the batch."""

    __slots__ = ("dedup_window_ms", "unsafe_dup_incr")

    def __init__(
        self, dedup_window_ms: int = DEDUP_WINDOW_MS, unsafe_dup_incr: bool = False
    ) -> None:
        """``unsafe_dup_incr`` is for TESTING ONLY: a retried Incr whose
        request id is known is applied again instead of answered from the
        dedup table.  It breaks exactly-once on purpose, so that the jepsen
        harness can show it detects double increments."""
        self.dedup_window_ms = dedup_window_ms
        self.unsafe_dup_incr = unsafe_dup_incr

    def apply(self, payload: bytes, index: int, w: StateWriter) -> bytes:
        """Apply the log entry ``payload`` at Raft ``index``; return the encoded result.

        Raises only :class:`StorageFault` (the disk refused): the caller must
        then abort the batch and stop the node."""
        if index <= w.applied_index():
            return encode_result(Replayed(index))
        if is_multi(payload):
            # Several independent commands in one entry: each applied as if
            # alone (own dedup, own result), all with this entry's index.
            clock = w.clock_ms()
            try:
                subs = decode_multi(payload)
            except ValueError as e:
                err = ErrorResult(InvalidArgument.kind, f"index {index}: {e}")
                return self._finish(w, index, clock, encode_result(err))
            results = []
            for sub in subs:
                encoded, clock = self._apply_one(sub, index, w, clock)
                results.append(encoded)
            return self._finish(w, index, clock, encode_multi_result(results))
        encoded, clock = self._apply_one(payload, index, w, w.clock_ms())
        return self._finish(w, index, clock, encoded)

    def _apply_one(self, payload: bytes, index: int, w: StateWriter, stored_clock: int) -> tuple[bytes, int]:
        """Apply one command; return its encoded result and the clock after it."""
        try:
            cmd = decode_command(payload)
        except ValueError as e:
            err = ErrorResult(InvalidArgument.kind, f"undecodable command at index {index}: {e}")
            return encode_result(err), stored_clock

        clock = cmd.now_ms if cmd.now_ms > stored_clock else stored_clock
        rid = None if isinstance(cmd, Expire | Barrier) else cmd.rid
        fp = 0
        if rid is not None:
            fp = fingerprint(cmd)  # Expire and Barrier have no rid
            cached = w.dedup_get(rid.client_id, rid.seq)
            if cached is not None and not (self.unsafe_dup_incr and isinstance(cmd, Incr)):
                return _replayed(cached, fp, rid.client_id, rid.seq), clock

        try:
            result, writes = self._plan(cmd, index, clock, w)
        except StorageFault:
            raise
        except _Refused as refused:
            result, writes = ErrorResult(FailedPrecondition.kind, str(refused)), []
        except Exception as bug:  # a bug: answer it, keep the group moving
            log.exception("apply of %s at index %d failed", type(cmd).__name__, index)
            # The message becomes replicated state (dedup table), so it names
            # only the exception type: a repr could differ between replicas.
            msg = f"apply of {type(cmd).__name__} failed at index {index}: {type(bug).__name__}"
            result, writes = ErrorResult(Internal.kind, msg), []
        encoded = encode_result(result)

        try:
            if isinstance(cmd, MSet) and isinstance(result, MSetResult):
                w.put_values(cmd.items, index, clock)  # _plan leaves an MSet's items to this
            for key, rec in writes:
                if rec is None:
                    w.delete(key)
                else:
                    w.put(key, rec)
            if rid is not None:
                w.dedup_put(rid.client_id, rid.seq, _DEDUP_RECORD.pack(_FINGERPRINTED, fp) + encoded, clock)
        except StorageFault:
            raise
        except Exception as fault:
            # The write set is half applied: continuing would let this
            # replica diverge, so this is as fatal as a disk error.
            raise StorageFault(f"storage failed while applying index {index}: {fault!r}") from fault
        return encoded, clock

    def _finish(self, w: StateWriter, index: int, clock: int, encoded: bytes) -> bytes:
        w.dedup_prune(clock - self.dedup_window_ms, DEDUP_PRUNE_LIMIT)
        w.set_applied(index, clock)
        return encoded

    # -- planning: reads only ------------------------------------------------

    def _plan(
        self, cmd: Command, index: int, clock: int, w: StateWriter
    ) -> tuple[Result, list[Write]]:
        if isinstance(cmd, Set):
            # Only a conditional set reads the old record (w.put replaces it
            # and keeps the expiry index right by itself).
            if cmd.condition != Condition.ALWAYS:
                live = _live(w.get(cmd.key), clock)
                if cmd.condition == Condition.IF_ABSENT and live is not None:
                    return SetResult(False, live.version), []
                if cmd.condition == Condition.IF_PRESENT and live is None:
                    return SetResult(False, 0), []
            return SetResult(True, index), [
                _value_write(cmd.key, cmd.value, cmd.expires_at_ms, index, clock)
            ]

        if isinstance(cmd, Delete):
            raw = w.get(cmd.key)
            # An expired record is dropped too, but does not count as deleted.
            return DeleteResult(_live(raw, clock) is not None, index), (
                [(cmd.key, None)] if raw is not None else []
            )

        if isinstance(cmd, Incr):
            live = _live(w.get(cmd.key), clock)
            base = 0
            if live is not None:
                if _INTEGER.fullmatch(live.value) is None:
                    raise _Refused(
                        "value is not an integer: incr needs a canonical ASCII decimal "
                        "(optional '-', no leading zeros) within signed 64 bits"
                    )
                base = int(live.value)
                if not _I64_MIN <= base <= _I64_MAX:
                    raise _Refused("value is not an integer within signed 64 bits")
            new = base + cmd.delta
            if not _I64_MIN <= new <= _I64_MAX:
                raise _Refused(
                    f"incr would overflow: {base} + {cmd.delta} is outside signed 64 bits"
                )
            expires = live.expires_at_ms if live is not None else 0
            return IncrResult(new, index), [(cmd.key, Record(str(new).encode(), index, expires))]

        if isinstance(cmd, CompareAndSet):
            live = _live(w.get(cmd.key), clock)
            if cmd.expect_absent or cmd.expected_version == 0:
                ok = live is None
            elif cmd.expected_value is not None:
                ok = live is not None and live.value == cmd.expected_value
            else:
                ok = live is not None and live.version == cmd.expected_version
            if ok:
                return CasResult(True, index, False, None, 0), [
                    _value_write(cmd.key, cmd.new_value, cmd.expires_at_ms, index, clock)
                ]
            if live is None:
                return CasResult(False, 0, False, None, 0), []
            return CasResult(False, 0, True, live.value, live.version), []

        if isinstance(cmd, MSet):
            # Its items are written by w.put_values in _apply_one (each as
            # _value_write would: due ones deleted), without a Record per key:
            # this runs for every key of every MSet on every replica.
            return MSetResult(len(cmd.items), index), []

        if isinstance(cmd, Expire):
            writes: list[Write] = []
            seen: set[bytes] = set()
            for key, expires in cmd.keys:
                if key in seen:
                    continue
                rec = w.get(key)
                # Only the exact record the leader saw due: a key re-set since
                # the scan has another expiry (or none) and survives.
                if rec is not None and rec.expires_at_ms == expires and 0 < expires <= clock:
                    seen.add(key)
                    writes.append((key, None))
            return ExpireResult(len(writes)), writes

        return BarrierResult(index, clock), []
