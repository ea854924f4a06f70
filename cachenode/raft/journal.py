"""A durable pysyncobj journal kept in the node's LMDB storage.

pysyncobj's own ``FileJournal`` never fsyncs.  ``StorageJournal`` writes every
change (append, truncate, compact, term/vote, commit index) into the driver
loop's current storage batch; the host commits that batch (one fsync) *before*
it flushes any network message or acknowledges any client.  So a follower
never acknowledges an entry, a voter never grants a vote, and a leader never
acknowledges a write that is not on disk: group commit, with Raft's
persistence rules intact.

The entries are also kept in a Python list, because pysyncobj indexes and
slices its journal freely.

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
from pysyncobj.journal import Journal

from ..storage.base import Batch, Storage

Entry = tuple[bytes, int, int]  # (command, index, term) as pysyncobj stores them


class StorageJournal(Journal):  # type: ignore[misc]
    def __init__(
        self, group: int, storage: Storage, batch: Callable[[], Batch],
        durable_batch: Callable[[], Batch] | None = None,
    ) -> None:
        """``durable_batch``: the batch for writes that must be fsynced before
        the iteration ends (entries, term, vote); ``batch`` serves the lazy
        commit-index hint.  Both are the host's (driver thread)."""
        self._group = group
        self._hint_batch = batch
        self._batch = durable_batch or batch
        self._entries: list[Entry] = storage.load_log(group)
        self.bytes = sum(len(e[0]) for e in self._entries)
        """Total size of the commands held (in memory and on disk)."""
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
        self._batch().log.append(self._group, idx, term, command)

    def clear(self) -> None:
        self._entries = []
        self.bytes = 0
        self._batch().log.clear(self._group)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        if entryFrom >= len(self._entries):
            return
        first_idx = self._entries[entryFrom][1]
        self.bytes -= sum(len(e[0]) for e in self._entries[entryFrom:])
        del self._entries[entryFrom:]
        self._batch().log.delete_from(self._group, first_idx)

    def deleteEntriesTo(self, entryTo: int) -> None:
        if entryTo <= 0:
            return
        if entryTo >= len(self._entries):
            self.clear()
            return
        keep_from = self._entries[entryTo][1]
        self.bytes -= sum(len(e[0]) for e in self._entries[:entryTo])
        self._entries = self._entries[entryTo:]
        self._batch().log.delete_before(self._group, keep_from)

    def __getitem__(self, item: Any) -> Any:
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
