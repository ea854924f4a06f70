"""A durable pysyncobj journal kept in the node's storage (its write-ahead log).

pysyncobj's own ``FileJournal`` never fsyncs.  ``StorageJournal`` writes every
change (append, truncate, compact, term/vote, commit index) into the driver
loop's current storage batch; the host commits that batch (one journal
fdatasync for every group) *before* it flushes any network message or
acknowledges any client.  So a follower
never acknowledges an entry, a voter never grants a vote, and a leader never
acknowledges a write that is not on disk: group commit, with Raft's
persistence rules intact.

The entries are also kept in a Python list, because pysyncobj indexes and
slices its journal freely; but only the newest ``memory_bytes`` of commands
stay in memory.  The log may hold as much as the shard's state (it is
compacted at 16 MiB or the state's size, whichever is larger), so keeping
every command doubled a large shard's memory: 1.2 GiB of heap on a leader
of a 2 GiB shard.  An older entry's command is a :class:`DiskCommand`,
read from the storage when used: by the transport when it sends a lagging
follower its backlog (:func:`materialize`), by pysyncobj when it applies an
entry that has already left memory, or when it pickles one.  A command
leaves memory only once committed (:meth:`StorageJournal.release_memory`,
called by the host right after its storage commit).

The seam: pysyncobj builds its journal with ``createJournal(conf.journalFile)``
(a module global in ``pysyncobj.syncobj``).  :func:`install` wraps that
factory once so that a ``StorageJournal`` passed as ``journalFile`` is used
as-is; any other value still gets pysyncobj's own journal.

Threading: driver thread only.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import pysyncobj.syncobj as _syncobj_module

from ..storage.base import Batch, Storage

Entry = tuple[Any, int, int]  # (command, index, term) as pysyncobj stores them; command: bytes | DiskCommand

MEMORY_BYTES = 8 * 1024 * 1024
"""Default for the commands a journal keeps in memory (the newest ones)."""


class DiskCommand:
    """The command of a committed journal entry that is no longer kept in
    memory.  Behaves like its bytes where pysyncobj uses a command (``len``,
    indexing and slicing, comparison, pickling), reading them from the
    storage each time (page cache; the journal is there anyway).

    Raises LookupError when the entry is gone from the storage (compacted
    or truncated since), or was replaced by one of another term."""

    __slots__ = ("_storage", "_group", "_index", "_term", "_size", "_head")

    def __init__(
        self, storage: Storage, group: int, index: int, term: int, size: int, head: bytes | None = None
    ) -> None:
        self._storage = storage
        self._group = group
        self._index = index
        self._term = term
        self._size = size
        self._head = head  # the command's type byte (pysyncobj reads it alone), once known

    def load(self) -> bytes:
        got = self._storage.log_entries(self._group, self._index, self._index)
        if not got or got[0][2] != self._term:
            raise LookupError(f"journal entry {self._index} (term {self._term}) of group {self._group} is gone")
        return got[0][0]

    def __bytes__(self) -> bytes:
        return self.load()

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            if item == slice(None, 1, None):
                if self._head is None:
                    self._head = self.load()[:1]
                return self._head
            return self.load()[item.start : item.stop : item.step]
        return self.load()[item]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DiskCommand | bytes | bytearray | memoryview):
            return self.load() == bytes(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (bytes, (self.load(),))

    def __repr__(self) -> str:
        return f"DiskCommand(group={self._group}, index={self._index}, {self._size} bytes)"


def materialize(entries: list[Entry]) -> list[Entry]:
    """``entries`` with every :class:`DiskCommand` read into bytes (LookupError if one is gone)."""
    for e in entries:
        if type(e[0]) is DiskCommand:
            break
    else:
        return entries
    return [(e[0].load(), e[1], e[2]) if type(e[0]) is DiskCommand else e for e in entries]


class StorageJournal:
    """pysyncobj's journal interface (``pysyncobj.journal.Journal``: every method
    it declares is implemented here), on the node's storage.  It does not inherit
    ``Journal``, which declares only that interface, so that it compiles to a
    native class."""

    def __init__(
        self, group: int, storage: Storage, batch: Callable[[], Batch],
        durable_batch: Callable[[], Batch] | None = None,
        memory_bytes: int = MEMORY_BYTES,
    ) -> None:
        """``durable_batch``: the batch for writes that must be fsynced before
        the iteration ends (entries, term, vote); ``batch`` serves the lazy
        commit-index hint.  Both are the host's (driver thread).
        ``memory_bytes``: the newest commands kept in memory (see the module)."""
        self._group = group
        self._storage = storage
        self._hint_batch = batch
        self._batch = durable_batch or batch
        self.memory_bytes = memory_bytes
        sizes = storage.log_sizes(group)
        self.bytes = sum(n for _, _, n in sizes)
        """Total size of the commands held (in memory and on disk)."""
        # Only the newest memory_bytes of commands are read into memory.
        first_mem = len(sizes)
        self._mem_bytes = 0
        while first_mem > 0 and self._mem_bytes + sizes[first_mem - 1][2] <= memory_bytes:
            first_mem -= 1
            self._mem_bytes += sizes[first_mem][2]
        self._entries: list[Entry] = []
        if first_mem:
            self._entries = [(DiskCommand(storage, group, i, t, n), i, t) for i, t, n in sizes[:first_mem]]
        if first_mem < len(sizes):
            self._entries += storage.log_entries(group, sizes[first_mem][0], sizes[-1][0])
        self._first_mem = first_mem
        """Position of the first entry whose command is in memory: all after it are too."""
        meta = storage.load_log_meta(group)
        self._commit = int(meta["commit"]) if "commit" in meta else 1
        self._term = int(meta["term"]) if "term" in meta else 0
        self._voted: Any = pickle.loads(meta["voted"]) if "voted" in meta else None
        self._pending_commit: int | None = None

    # -- entries ------------------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        command = bytes(command)
        self._entries.append((command, idx, term))
        self.bytes += len(command)
        self._mem_bytes += len(command)
        self._batch().log.append(self._group, idx, term, command)

    def clear(self) -> None:
        self._entries = []
        self.bytes = 0
        self._mem_bytes = 0
        self._first_mem = 0
        self._batch().log.clear(self._group)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        if entryFrom >= len(self._entries):
            return
        first_idx = self._entries[entryFrom][1]
        self.bytes -= sum(len(e[0]) for e in self._entries[entryFrom:])
        self._mem_bytes -= sum(len(e[0]) for e in self._entries[max(entryFrom, self._first_mem):])
        del self._entries[entryFrom:]
        self._first_mem = min(self._first_mem, entryFrom)
        self._batch().log.delete_from(self._group, first_idx)

    def deleteEntriesTo(self, entryTo: int) -> None:
        if entryTo <= 0:
            return
        if entryTo >= len(self._entries):
            self.clear()
            return
        keep_from = self._entries[entryTo][1]
        self.bytes -= sum(len(e[0]) for e in self._entries[:entryTo])
        self._mem_bytes -= sum(len(e[0]) for e in self._entries[self._first_mem:entryTo])
        self._entries = self._entries[entryTo:]
        self._first_mem = max(0, self._first_mem - entryTo)
        self._batch().log.delete_before(self._group, keep_from)

    def release_memory(self) -> None:
        """Let the oldest commands leave memory until at most ``memory_bytes``
        stay (the newest always do).  Host, driver thread, right after a
        storage commit: every entry in the journal is then committed, so a
        :class:`DiskCommand` can read it back."""
        if self._mem_bytes <= self.memory_bytes:
            return
        entries = self._entries
        pos = self._first_mem
        while self._mem_bytes > self.memory_bytes and pos < len(entries) - 1:
            cmd, idx, term = entries[pos]
            entries[pos] = (DiskCommand(self._storage, self._group, idx, term, len(cmd), cmd[:1]), idx, term)
            self._mem_bytes -= len(cmd)
            pos += 1
        self._first_mem = pos

    @property
    def memory_held(self) -> int:
        """Bytes of commands held in memory."""
        return self._mem_bytes

    def __getitem__(self, item: int | slice) -> Any:
        # Slicing spelled out: compiled code given a slice object where it
        # expects an index raises TypeError instead of slicing.
        if isinstance(item, slice):
            return self._entries[item.start : item.stop : item.step]
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        self.flush_meta()

    def align_to(self, prev_entry: Entry) -> None:
        """Drop entries before ``prev_entry`` when it is in the journal.

        Called from the snapshot loader: after a crash between "snapshot file
        renamed" and "journal compacted", the journal still starts earlier
        than the snapshot; without this pysyncobj would clear the whole journal
        and lose the entries after the snapshot."""
        for pos, e in enumerate(self._entries):
            if e[1] == prev_entry[1]:
                if e[2] == prev_entry[2] and pos > 0:
                    self.deleteEntriesTo(pos)
                return

    # -- metadata -----------------------------------------------------------

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if raftCommitIndex != self._commit:
            self._commit = raftCommitIndex
            self._pending_commit = raftCommitIndex

    def getRaftCommitIndex(self) -> int:
        return self._commit

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        self._term = term
        self._voted = votedForNodeId
        log = self._batch().log
        log.set_meta(self._group, "term", str(term).encode())
        log.set_meta(self._group, "voted", pickle.dumps(votedForNodeId))

    def getCurrentTerm(self) -> int:
        return self._term

    def getVotedForNodeId(self) -> Any:
        return self._voted

    def onOneSecondTimer(self) -> None:
        self.flush_meta()

    def flush_meta(self) -> None:
        # The commit index is a hint (it can be recomputed from a quorum), so
        # it is written lazily, like pysyncobj's own journal does.
        if self._pending_commit is not None:
            self._hint_batch().log.set_meta(self._group, "commit", str(self._pending_commit).encode())
            self._pending_commit = None


_original_create_journal = _syncobj_module.createJournal


def _create_journal(journalFile: Any = None) -> Any:
    if isinstance(journalFile, StorageJournal):
        return journalFile
    return _original_create_journal(journalFile)


def install() -> None:
    """Route pysyncobj's journal factory to :class:`StorageJournal` (idempotent).

    Also switches off pysyncobj's per-group wake-up pipe: every proposal
    would write a byte to it, while our driver is already woken by the host
    (one shared wake-up for all groups)."""
    _syncobj_module.createJournal = _create_journal
    _syncobj_module.PIPE_NOTIFIER_ENABLED = False
