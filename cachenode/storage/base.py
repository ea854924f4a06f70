"""The storage contract: what the state machine and the Raft journal need from disk.

One :class:`Storage` per node holds the state of every Raft group hosted there
(shard replicas and the metadata group) *and* the Raft journal of each group.
All writes of one driver-loop iteration go into one :class:`Batch`; committing
it is the node's single durability point (one fsync for many log entries,
applies, term/vote updates of many groups: group commit).

Threads:
* ``Storage.begin`` and everything on a ``Batch`` (its ``state`` writers and
  ``log`` writer): the Raft driver thread only, one open batch at a time.
* ``Storage.reader`` and everything on a ``StateReader``: any thread, any time;
  readers see committed data only, never a batch in progress.
* ``load_log``/``load_log_meta``: at group start-up, driver thread.

Keys are opaque bytes.  Group ids are ints (shard id, or META_GROUP_ID).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import BinaryIO, Protocol


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    value: bytes
    version: int  # Raft index of the command that wrote it
    expires_at_ms: int = 0  # absolute leader-stamped time; 0 = never expires


class StorageFault(Exception):
    """The disk refused a write (map full, I/O error).  Fatal for the node:
    the Raft layer stops the process rather than let replicas diverge."""


class StateReader(Protocol):
    """Committed state of one group.  Any thread."""

    def get(self, key: bytes) -> Record | None: ...
    def applied_index(self) -> int: ...
    def clock_ms(self) -> int: ...
    def expired(self, now_ms: int, limit: int) -> list[tuple[bytes, int]]:
        """Up to ``limit`` (key, expires_at_ms) with 0 < expires_at_ms <= now_ms, oldest first."""
        ...
    def count(self) -> int: ...
    def size_bytes(self) -> int:
        """Sum of len(key) + len(value) of live records (as maintained by put/delete)."""
        ...
    def items(self) -> Iterator[tuple[bytes, Record]]:
        """Every record in key order (snapshot-consistent)."""
        ...


class StateWriter(StateReader, Protocol):
    """Write view of one group inside the current batch.  Driver thread only.

    Reads through a writer see the batch's own uncommitted writes.
    ``put``/``delete`` maintain the expiry index, ``count`` and ``size_bytes``.
    """

    def put(self, key: bytes, record: Record) -> None: ...
    def delete(self, key: bytes) -> bool: ...
    def set_applied(self, index: int, clock_ms: int) -> None: ...
    def dedup_get(self, client_id: bytes, seq: int) -> bytes | None: ...
    def dedup_put(self, client_id: bytes, seq: int, result: bytes, now_ms: int) -> None: ...
    def dedup_prune(self, older_than_ms: int, limit: int) -> int:
        """Forget up to ``limit`` dedup entries stored at now_ms < older_than_ms."""
        ...
    def dump(self, out: BinaryIO) -> None:
        """Stream everything of this group (data, expiry index, dedup, applied
        index, clock, counters) to ``out``.  Never builds it all in memory."""
        ...
    def load(self, inp: BinaryIO) -> None:
        """Replace everything of this group with what ``dump`` wrote."""
        ...
    def clear(self) -> None:
        """Remove everything of this group (replica deleted)."""
        ...


class LogWriter(Protocol):
    """Raft journal writes for any group, inside the current batch."""

    def append(self, group: int, index: int, term: int, command: bytes) -> None: ...
    def delete_from(self, group: int, index: int) -> None:
        """Delete entries with index >= ``index``."""
        ...
    def delete_before(self, group: int, index: int) -> None:
        """Delete entries with index < ``index``."""
        ...
    def clear(self, group: int) -> None: ...
    def set_meta(self, group: int, name: str, value: bytes) -> None: ...


class Batch(Protocol):
    def state(self, group: int) -> StateWriter: ...
    @property
    def log(self) -> LogWriter: ...
    def commit(self) -> None:
        """Make every write of the batch durable (per the storage's fsync
        mode) and visible to readers, atomically."""
        ...
    def abort(self) -> None: ...


class Storage(Protocol):
    def begin(self) -> Batch: ...
    def reader(self, group: int) -> StateReader: ...
    def load_log(self, group: int) -> list[tuple[bytes, int, int]]:
        """Committed journal of ``group`` as (command, index, term), index ascending."""
        ...
    def load_log_meta(self, group: int) -> dict[str, bytes]: ...
    def groups(self) -> set[int]:
        """Groups with any state or journal on disk."""
        ...
    def close(self) -> None: ...
