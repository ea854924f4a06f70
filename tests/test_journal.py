"""StorageJournal: only the newest commands stay in memory; older ones are
read back from the real LMDB file wherever pysyncobj uses them."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachenode.raft.journal import DiskCommand, StorageJournal, materialize
from cachenode.storage.base import Batch
from cachenode.storage.lmdb_store import LmdbStorage

GROUP = 3
KB = 1024


class Batches:
    """The host's role: one storage batch at a time, committed by the test."""

    def __init__(self, storage: LmdbStorage) -> None:
        self.storage = storage
        self.open: Batch | None = None

    def __call__(self) -> Batch:
        if self.open is None:
            self.open = self.storage.begin()
        return self.open

    def commit(self) -> None:
        if self.open is not None:
            self.open.commit()
            self.open = None


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[LmdbStorage]:
    s = LmdbStorage(str(tmp_path / "db"), map_size=1 << 28, fsync=False)
    yield s
    s.close()


def cmd(i: int, size: int = 100 * KB) -> bytes:
    return bytes([1]) + bytes([i % 256]) * (size - 1)


def filled(storage: LmdbStorage, n: int = 20, memory: int = 300 * KB) -> tuple[StorageJournal, Batches]:
    batches = Batches(storage)
    j = StorageJournal(GROUP, storage, batches, memory_bytes=memory)
    for i in range(1, n + 1):
        j.add(cmd(i), i, 1 + i // 10)
    batches.commit()
    j.release_memory()
    return j, batches


def in_memory(j: StorageJournal) -> int:
    return sum(len(e[0]) for e in j[:] if type(e[0]) is bytes)


def test_old_commands_leave_memory_and_read_back_the_same(storage: LmdbStorage) -> None:
    j, _ = filled(storage)
    assert len(j) == 20 and j.bytes == 20 * 100 * KB
    assert j.memory_held == in_memory(j) <= 300 * KB
    lazy = [e for e in j[:] if type(e[0]) is DiskCommand]
    assert len(lazy) == 17  # the newest three stay
    for c, i, t in j[:]:
        assert (c, i, t) == (cmd(i), i, 1 + i // 10)  # compares by loading
        assert len(c) == 100 * KB and c[:1] == b"\x01" and c[1:] == cmd(i)[1:]
        assert pickle.loads(pickle.dumps((c, i, t))) == (cmd(i), i, 1 + i // 10)
        assert bytes(c) == cmd(i)
    assert materialize(j[0:20]) == [(cmd(i), i, 1 + i // 10) for i in range(1, 21)]
    tail = j[18:]
    assert materialize(tail) is tail  # nothing to read


def test_a_command_leaves_memory_only_once_committed(storage: LmdbStorage) -> None:
    batches = Batches(storage)
    j = StorageJournal(GROUP, storage, batches, memory_bytes=100 * KB)
    for i in range(1, 6):
        j.add(cmd(i), i, 1)
    # the host calls release_memory only after its commit; the rule it relies on:
    assert storage.log_entries(GROUP, 1, 5) == []
    batches.commit()
    j.release_memory()
    assert j.memory_held == 100 * KB
    assert [type(e[0]) for e in j[:]] == [DiskCommand] * 4 + [bytes]


def test_a_restart_reads_only_the_newest_commands(storage: LmdbStorage) -> None:
    filled(storage)
    j = StorageJournal(GROUP, storage, Batches(storage), memory_bytes=300 * KB)
    assert [i for _, i, _ in j[:]] == list(range(1, 21)) and j.bytes == 20 * 100 * KB
    assert j.memory_held == in_memory(j) == 300 * KB
    assert [c for c, _, _ in j[:]] == [cmd(i) for i in range(1, 21)]


def test_truncation_and_compaction_keep_the_accounting(storage: LmdbStorage) -> None:
    j, batches = filled(storage)
    stale = j[5][0]
    j.deleteEntriesFrom(5)  # a follower's conflicting suffix: index 6 on
    assert j.memory_held == in_memory(j) == 0 and len(j) == 5
    j.add(b"\x01replaced", 6, 9)
    batches.commit()
    j.release_memory()
    with pytest.raises(LookupError):  # index 6 is now another term's entry
        stale.load()
    assert j[5] == (b"\x01replaced", 6, 9)
    j.deleteEntriesTo(3)  # compaction
    batches.commit()
    assert [i for _, i, _ in j[:]] == [4, 5, 6] and j.memory_held == in_memory(j) == len(b"\x01replaced")
    assert j[0] == (cmd(4), 4, 1)
    j.clear()
    batches.commit()
    assert len(j) == 0 and j.memory_held == 0 and j.bytes == 0
