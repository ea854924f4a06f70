"""The storage contract: what the state machine and the Raft journal need from disk.

One :class:`Storage` per node holds the state of every Raft group hosted there
(shard replicas and the metadata group) *and* the Raft journal of each group.
All writes of one driver-loop iteration go into one :class:`Batch`; committing
it is the node's single durability point (one fsync for many log entries,
applies, term/vote updates of many groups: group commit).

Threads:
* ``Storage.begin`` and everything on a ``Batch`` (its ``state`` writers and
  ``log`` writer): the Raft driver thread only, one open batch at a time.
  A writer or log writer must not be used after its batch's ``commit`` or
  ``abort``.
* ``Storage.reader`` and everything on a ``StateReader``: any thread, any time;
  readers see committed data only, never a batch in progress, and never block
  on (or are blocked by) the batch in progress.
* ``load_log``/``load_log_meta``/``groups``: at group start-up, driver thread.

Keys are opaque bytes of at most :data:`MAX_KEY_BYTES`.  Group ids are ints
in 0..2**32-1 (shard id, or META_GROUP_ID).  Versions, expiry times, clocks,
indices and sequence numbers are unsigned 64-bit ints.

Everything returned (``bytes``, ``Record``, lists) belongs to the caller.

Errors: :class:`StorageFault` when the disk refuses (fatal for the node);
``ValueError`` for a caller bug that the storage detects before writing
(oversized key or client id) and for a malformed dump passed to ``load``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO, Final, Protocol

from .._value import Value

MAX_KEY_BYTES = 4096
"""Longest key every storage accepts (the ceiling for ``--max-key-bytes``).
LMDB's own key limit is 511 bytes: keys longer than 480 bytes are stored
under their first 480 bytes + a digest, with the full key kept in the record
(see :mod:`cachenode.storage.lmdb_store`), which callers never see except in
the order described at :meth:`StateReader.items`.  The state machine rejects
empty or longer keys as invalid arguments, so a client cannot make a replica
fault."""


class Record(Value):
    """One stored value.  Every apply builds one per key written, so it is a
    compiled value class (0.03 us to build; a NamedTuple took 0.2 us and a
    frozen dataclass five times that)."""

    __slots__ = ("value", "version", "expires_at_ms")
    FIELDS = ("value", "version", "expires_at_ms")

    def __init__(self, value: bytes, version: int, expires_at_ms: int = 0) -> None:
        self.value: Final[bytes] = value
        self.version: Final[int] = version  # Raft index of the command that wrote it
        self.expires_at_ms: Final[int] = expires_at_ms  # absolute leader-stamped time; 0 = never expires


class StorageFault(Exception):
    """The disk refused a write (map full, I/O error).  Fatal for the node:
    the Raft layer stops the process rather than let replicas diverge."""


class StateReader(Protocol):
    """Committed state of one group.  Any thread.

    The storage does not judge expiry: a record whose ``expires_at_ms`` has
    passed is still returned (and counted) until a command deletes it; the
    state machine decides what is live, at its own clock.
    """

    def get(self, key: bytes) -> Record | None: ...
    def applied_index(self) -> int:
        """Raft index of the last applied command (0 if none)."""
        ...

    def clock_ms(self) -> int:
        """The group's clock as of that command (0 if none)."""
        ...

    def expired(self, now_ms: int, limit: int) -> list[tuple[bytes, int]]:
        """Up to ``limit`` (key, expires_at_ms) with 0 < expires_at_ms <= now_ms,
        ordered by (expires_at_ms, key), keys in the order of :meth:`items`."""
        ...

    def count(self) -> int:
        """Number of stored records (O(1))."""
        ...

    def answered(self, client_id: bytes, seq: int) -> bool:
        """True when the request id (client_id, seq) has a dedup record: the
        group applied a write with it, and answers its retries from it."""
        ...

    def installing(self) -> bool:
        """True while a snapshot is being loaded piece by piece
        (:meth:`StateWriter.begin_install`): the state is then neither the
        old one nor the new one, and must not be read."""
        ...

    def size_bytes(self) -> int:
        """Sum of len(key) + len(value) of stored records (as maintained by put/delete; O(1))."""
        ...

    def items(self) -> Iterator[tuple[bytes, Record]]:
        """Every record in key order (snapshot-consistent).  On LMDB the
        iterator holds a read transaction open until it is exhausted or
        closed: do not park it.

        Key order is byte order, with one exception every storage shares:
        keys longer than 480 bytes that have the same first 480 bytes are
        ordered among themselves by a digest of the whole key, not by their
        remaining bytes (exactly: byte order of
        :func:`cachenode.storage.lmdb_store.stored_key`)."""
        ...

    def dump(self, out: BinaryIO) -> None:
        """Stream everything of this group (data, expiry index, dedup, applied
        index, clock, counters) to ``out`` in the storage-independent dump
        format, from one consistent view.  Never builds it all in memory.
        On a reader this dumps committed state and may run on any thread
        (a snapshot taken off the driver thread)."""
        ...


class StateWriter(StateReader, Protocol):
    """Write view of one group inside the current batch.  Driver thread only.

    Reads through a writer see the batch's own uncommitted writes.
    ``put``/``delete`` maintain the expiry index, ``count`` and ``size_bytes``.
    ``dump`` on a writer includes the batch's uncommitted writes.
    """

    def put(self, key: bytes, record: Record) -> None:
        """Insert or replace; ``ValueError`` if ``len(key) > MAX_KEY_BYTES``.

        Two different keys longer than 480 bytes whose 128-bit blake2b
        digests and first 480 bytes both collide (not known to be possible)
        share one slot: the key put last replaces the other's record, which
        then reads as absent.  Deterministic, so replicas stay identical."""
        ...

    def put_values(
        self, items: tuple[tuple[bytes, bytes, int], ...], version: int, clock_ms: int
    ) -> None:
        """Write each ``(key, value, expires_at_ms)`` as ``Record(value,
        version, expires_at_ms)``, in order; an item already due at
        ``clock_ms`` (``0 < expires_at_ms <= clock_ms``) deletes its key
        instead.  The same effect as ``put``/``delete`` item by item, without
        a ``Record`` per item: an MSet's keys on every replica (apply)."""
        ...

    def delete(self, key: bytes) -> bool:
        """Remove the record; False if there was none."""
        ...

    def set_applied(self, index: int, clock_ms: int) -> None:
        """Record the applied index and clock; committed atomically with the
        data writes of the same batch."""
        ...

    def dedup_get(self, client_id: bytes, seq: int) -> bytes | None: ...
    def dedup_put(self, client_id: bytes, seq: int, result: bytes, now_ms: int) -> None:
        """Remember ``result`` for (client_id, seq), stored at ``now_ms``;
        replaces an existing entry.  ``ValueError`` unless 1 <= len(client_id) <= 255."""
        ...

    def dedup_prune(self, older_than_ms: int, limit: int) -> int:
        """Forget up to ``limit`` dedup entries stored at now_ms < older_than_ms,
        oldest first, ties in (len(client_id), client_id, seq) order, so every
        storage prunes the same entries.  Returns how many were forgotten."""
        ...

    def load(self, inp: BinaryIO) -> None:
        """Replace everything of this group with what ``dump`` wrote (by any
        storage).  Reads one dump from ``inp`` and stops after its end record.

        Atomic within the batch: on a truncated or corrupt stream it raises
        ``ValueError`` and the group is as it was before the call."""
        ...

    def begin_install(self) -> None:
        """Start replacing this group's state with a dump loaded piece by
        piece over several batches: marks the group :meth:`installing`
        (readers must refuse it) and zeroes its applied index, clock and
        counters.  Then :meth:`clear_some` until it returns True,
        :meth:`install_records` for the dump's records, and
        :meth:`end_install`.  A crash in between leaves the mark: the owner
        must then :meth:`clear` the group and rebuild it."""
        ...

    def clear_some(self, limit: int) -> bool:
        """Delete up to ``limit`` of this group's records (data, expiry
        index, dedup); True once none is left."""
        ...

    def install_records(self, records: Iterable[tuple[int, bytes, bytes]]) -> None:
        """Write ``(tag, key, value)`` records as :class:`~cachenode.storage.lmdb_store.DumpReader`
        yields them (after :meth:`begin_install` and the clearing)."""
        ...

    def end_install(self, applied_index: int, clock_ms: int, count: int, size_bytes: int) -> None:
        """Finish an install: the dump's meta, and the mark removed."""
        ...

    def clear(self) -> None:
        """Remove everything of this group's state (replica deleted).  The
        journal is separate: see :meth:`LogWriter.clear`/:meth:`LogWriter.clear_meta`."""
        ...


class LogWriter(Protocol):
    """Raft journal writes for any group, inside the current batch."""

    def append(self, group: int, index: int, term: int, command: bytes) -> None:
        """Store an entry (replacing any entry at the same index)."""
        ...

    def delete_from(self, group: int, index: int) -> None:
        """Delete entries with index >= ``index``."""
        ...

    def delete_before(self, group: int, index: int) -> None:
        """Delete entries with index < ``index``."""
        ...

    def clear(self, group: int) -> None:
        """Delete every entry of ``group``; its meta (term, vote) stays."""
        ...

    def set_meta(self, group: int, name: str, value: bytes) -> None: ...
    def clear_meta(self, group: int) -> None:
        """Delete every meta value of ``group`` (replica deleted)."""
        ...


class Batch(Protocol):
    def state(self, group: int) -> StateWriter:
        """The writer of ``group`` in this batch (the same object on every call)."""
        ...

    @property
    def log(self) -> LogWriter: ...
    def commit_journal(self) -> None:
        """Make the batch's journal writes durable now (per the storage's
        fsync mode) and readable through ``log_entries``; the state writes
        stay invisible until :meth:`commit`.  The batch stays open for
        nothing but :meth:`commit`.  Lets the caller release what depends
        on the journal only (Raft acknowledgements, votes) before the state
        commit.  ``StorageFault`` if the disk refuses."""
        ...

    def commit(self) -> None:
        """Make the batch's journal writes durable (per the storage's fsync
        mode) and all its writes visible to readers.  The state writes need
        not be durable: a storage may rebuild them from the journal and the
        groups' snapshots after a machine crash (LmdbStorage does), but the
        state is never ahead of the durable journal once the node runs again.
        Does :meth:`commit_journal` first unless it was called.
        ``StorageFault`` if the disk refuses; the batch is closed either way."""
        ...

    def abort(self) -> None:
        """Discard every write of the batch."""
        ...


class Storage(Protocol):
    def begin(self) -> Batch:
        """Open the batch (``RuntimeError`` if one is already open)."""
        ...

    def reader(self, group: int) -> StateReader: ...
    def view(self, group: int) -> AbstractContextManager[StateReader]:
        """A StateReader over one read transaction, for the ``with`` block:
        every call sees the same committed state (a reader from
        :meth:`reader` sees the latest commit at each call).  Any thread."""
        ...

    def load_log(self, group: int) -> list[tuple[bytes, int, int]]:
        """Committed journal of ``group`` as (command, index, term), index ascending."""
        ...

    def log_sizes(self, group: int) -> list[tuple[int, int, int]]:
        """Committed journal of ``group`` as (index, term, command size),
        index ascending, without reading the commands into memory."""
        ...

    def log_entries(self, group: int, first: int, last: int) -> list[tuple[bytes, int, int]]:
        """Committed journal entries of ``group`` with ``first <= index <=
        last``, as (command, index, term), index ascending.  Any thread."""
        ...

    def load_log_meta(self, group: int) -> dict[str, bytes]: ...
    def groups(self) -> set[int]:
        """Groups with any state or journal on disk."""
        ...

    def set_short_of_disk(self, short: bool) -> None:
        """The node's disk is below its reserve (True) or has room again:
        while short, the journal gives back disk it holds for little
        (``WriteAheadLog.thrifty``).  Any thread."""
        ...

    def close(self, clean: bool = True) -> None:
        """Abort an open batch and release the storage.  ``clean=False``:
        a writer may still be running (its driver did not stop), so the
        storage must not vouch for its state at the next open."""
        ...
