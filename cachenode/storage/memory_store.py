"""TEST DOUBLE: an in-memory :class:`~cachenode.storage.base.Storage`.  Not durable.

Implements the same contract as :class:`~cachenode.storage.lmdb_store.LmdbStorage`
(the conformance suite runs against both), for unit tests of the layers
above that do not want files.  Nothing survives the object.

How isolation works: committed state is a map group -> ``_Group`` whose
objects are never mutated once published.  A batch copies a group (shallow
dict copies) the first time it touches it, mutates its private copy, and
commit publishes the copies by swapping references.  Readers on any thread
pick up the current reference per call, so they never see a batch in
progress.  Copying costs O(group size) per batch: fine for tests, the reason
this is not a production store.

Dumps use the storage-independent format of ``lmdb_store`` and, for equal
state, are byte-identical to LMDB's.

Long keys (more than ``INLINE_KEY_BYTES``): records are kept under the full
key, but every order (items, expired ties, dumps) is LMDB's
(:func:`~cachenode.storage.lmdb_store.stored_key` order), and a digest
collision behaves as on LMDB: the key written last owns the slot and the
other one's record is dropped (``_Group.long`` maps stored key -> key).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import threading
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from .base import MAX_KEY_BYTES, Record, StateReader, StateWriter
from .lmdb_store import INLINE_KEY_BYTES, DumpReader, DumpWriter, dedup_entry, stored_key

__all__ = ["MemoryStorage"]

log = logging.getLogger(__name__)

_NO_FLOOR = 1 << 64


def _stored(r: Record) -> bytes:
    return r.version.to_bytes(8, "big") + r.expires_at_ms.to_bytes(8, "big") + r.value


class _Group:
    """State of one group.  Mutable only while private to one batch."""

    __slots__ = ("data", "long", "dedup", "applied", "clock", "size", "floor", "installing")

    def __init__(self) -> None:
        self.data: dict[bytes, Record] = {}
        # stored_key(key) -> key, for the keys of ``data`` longer than INLINE_KEY_BYTES
        self.long: dict[bytes, bytes] = {}
        # dedup entry key (see lmdb_store.dedup_entry) -> (now_ms, result)
        self.dedup: dict[bytes, tuple[int, bytes]] = {}
        self.applied = 0
        self.clock = 0
        self.size = 0
        self.floor = 0  # every dedup entry has now_ms >= floor
        self.installing = False

    def copy(self) -> _Group:
        g = _Group()
        g.data = self.data.copy()
        g.long = self.long.copy()
        g.dedup = self.dedup.copy()
        g.applied, g.clock, g.size, g.floor = self.applied, self.clock, self.size, self.floor
        g.installing = self.installing
        return g

    def empty(self) -> bool:
        return not (self.data or self.dedup or self.applied or self.clock or self.installing)


_EMPTY = _Group()


class _View:
    """Read operations over one ``_Group``; subclasses say which one."""

    __slots__ = ()

    def _g(self) -> _Group:
        raise NotImplementedError

    def get(self, key: bytes) -> Record | None:
        return self._g().data.get(key)

    def applied_index(self) -> int:
        return self._g().applied

    def installing(self) -> bool:
        return self._g().installing

    def answered(self, client_id: bytes, seq: int) -> bool:
        return dedup_entry(client_id, seq) in self._g().dedup

    def clock_ms(self) -> int:
        return self._g().clock

    def count(self) -> int:
        return len(self._g().data)

    def size_bytes(self) -> int:
        return self._g().size

    def expired(self, now_ms: int, limit: int) -> list[tuple[bytes, int]]:
        if limit <= 0:
            return []
        due = (
            (r.expires_at_ms, stored_key(k), k)
            for k, r in self._g().data.items()
            if 0 < r.expires_at_ms <= now_ms
        )
        return [(k, e) for e, _, k in heapq.nsmallest(limit, due)]

    def items(self) -> Iterator[tuple[bytes, Record]]:
        g = self._g()
        return iter([(k, g.data[k]) for k in _ordered(g)])

    def dump(self, out: BinaryIO) -> None:
        g = self._g()
        w = DumpWriter(out, g.applied, g.clock)
        for k in _ordered(g):
            w.data(k, _stored(g.data[k]))
        for e in sorted(g.dedup):
            now, result = g.dedup[e]
            w.dedup(e, now.to_bytes(8, "big") + result)
        w.finish()


def _ordered(g: _Group) -> list[bytes]:
    """The keys of ``g`` in LMDB's order (stored_key order; byte order
    unless there are long keys)."""
    if g.long:
        return sorted(g.data, key=stored_key)
    return sorted(g.data)


class _MemReader(_View):
    __slots__ = ("_storage", "_group")

    def __init__(self, storage: MemoryStorage, group: int) -> None:
        self._storage = storage
        self._group = group

    def _g(self) -> _Group:
        return self._storage._groups.get(self._group, _EMPTY)


class _MemView(_View):
    __slots__ = ("_grp",)

    def __init__(self, g: _Group) -> None:
        self._grp = g

    def _g(self) -> _Group:
        return self._grp


class _MemWriter(_View):
    __slots__ = ("_batch", "_grp")

    def __init__(self, batch: _MemBatch, g: _Group) -> None:
        self._batch = batch
        self._grp = g

    def _g(self) -> _Group:
        return self._grp

    def _check(self) -> _Group:
        if not self._batch._open:
            raise RuntimeError("writer used after its batch was committed or aborted")
        return self._grp

    def put(self, key: bytes, record: Record) -> None:
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"key of {len(key)} bytes exceeds MAX_KEY_BYTES ({MAX_KEY_BYTES})")
        g = self._check()
        if len(key) > INLINE_KEY_BYTES:
            sk = stored_key(key)
            other = g.long.get(sk)
            if other is not None and other != key:
                # A digest collision: as on LMDB, this key takes the slot over.
                log.error(
                    "blake2b digest collision between two keys longer than %d bytes: "
                    "the record of the older key is replaced",
                    INLINE_KEY_BYTES,
                )
                gone = g.data.pop(other)
                g.size -= len(other) + len(gone.value)
            g.long[sk] = key
        old = g.data.get(key)
        g.size += len(record.value) - (len(old.value) if old is not None else -len(key))
        g.data[key] = record

    def put_values(
        self, items: tuple[tuple[bytes, bytes, int], ...], version: int, clock_ms: int
    ) -> None:
        for key, value, exp in items:
            if exp and exp <= clock_ms:
                self.delete(key)
            else:
                self.put(key, Record(value, version, exp))

    def delete(self, key: bytes) -> bool:
        g = self._check()
        old = g.data.pop(key, None)
        if old is None:
            return False
        if len(key) > INLINE_KEY_BYTES:
            del g.long[stored_key(key)]
        g.size -= len(key) + len(old.value)
        return True

    def set_applied(self, index: int, clock_ms: int) -> None:
        g = self._check()
        g.applied, g.clock = index, clock_ms

    def dedup_get(self, client_id: bytes, seq: int) -> bytes | None:
        hit = self._grp.dedup.get(dedup_entry(client_id, seq))
        return None if hit is None else hit[1]

    def dedup_put(self, client_id: bytes, seq: int, result: bytes, now_ms: int) -> None:
        e = dedup_entry(client_id, seq)
        g = self._check()
        g.dedup[e] = (now_ms, result)
        g.floor = min(g.floor, now_ms)

    def dedup_prune(self, older_than_ms: int, limit: int) -> int:
        g = self._check()
        if limit <= 0 or older_than_ms <= g.floor:
            return 0
        # Same order as LMDB's dedupt index: (now_ms, entry bytes).
        old = sorted((t, e) for e, (t, _) in g.dedup.items() if t < older_than_ms)
        for _, e in old[:limit]:
            del g.dedup[e]
        if len(old) > limit:
            g.floor = old[limit][0]
        else:
            g.floor = min((t for t, _ in g.dedup.values()), default=_NO_FLOOR)
        return min(len(old), limit)

    def load(self, inp: BinaryIO) -> None:
        self._check()
        reader = DumpReader(inp)
        g = _Group()
        _put_records(g, reader.records())  # the reader refuses two keys with the same stored key
        g.applied, g.clock, g.size = reader.applied_index, reader.clock_ms, reader.size_bytes
        # Only now, with the whole stream verified, replace the group.
        self._grp = g

    def begin_install(self) -> None:
        g = self._check()
        g.installing = True
        g.applied = g.clock = g.size = 0
        g.floor = 0

    def clear_some(self, limit: int) -> bool:
        g = self._check()
        for k in list(g.data)[:limit]:
            del g.data[k]
            limit -= 1
        g.long = {sk: k for sk, k in g.long.items() if k in g.data}
        for e in list(g.dedup)[: max(limit, 0)]:
            del g.dedup[e]
            limit -= 1
        return not g.data and not g.dedup

    def install_records(self, records: Iterable[tuple[int, bytes, bytes]]) -> None:
        _put_records(self._check(), records)

    def end_install(self, applied_index: int, clock_ms: int, count: int, size_bytes: int) -> None:
        g = self._check()
        g.installing = False
        g.applied, g.clock, g.size = applied_index, clock_ms, size_bytes

    def clear(self) -> None:
        self._check()
        self._grp = _Group()


def _put_records(g: _Group, records: Iterable[tuple[int, bytes, bytes]]) -> None:
    """Dump records (``DumpReader.records()``) into ``g``."""
    for tag, key, value in records:
        if tag == DumpReader.TAG_DATA:
            g.data[key] = Record(value[16:], int.from_bytes(value[:8], "big"), int.from_bytes(value[8:16], "big"))
            if len(key) > INLINE_KEY_BYTES:
                g.long[stored_key(key)] = key
        else:
            g.dedup[key] = (int.from_bytes(value[:8], "big"), value[8:])


class _MemLog:
    __slots__ = ("_batch", "logs", "metas")

    def __init__(self, batch: _MemBatch) -> None:
        self._batch = batch
        self.logs: dict[int, dict[int, tuple[int, bytes]]] = {}
        self.metas: dict[int, dict[str, bytes]] = {}

    def _log(self, group: int) -> dict[int, tuple[int, bytes]]:
        if not self._batch._open:
            raise RuntimeError("log writer used after its batch was committed or aborted")
        log = self.logs.get(group)
        if log is None:
            log = self.logs[group] = dict(self._batch._storage._logs.get(group, {}))
        return log

    def _meta(self, group: int) -> dict[str, bytes]:
        if not self._batch._open:
            raise RuntimeError("log writer used after its batch was committed or aborted")
        meta = self.metas.get(group)
        if meta is None:
            meta = self.metas[group] = dict(self._batch._storage._log_meta.get(group, {}))
        return meta

    def append(self, group: int, index: int, term: int, command: bytes) -> None:
        self._log(group)[index] = (term, bytes(command))

    def delete_from(self, group: int, index: int) -> None:
        log = self._log(group)
        for i in [i for i in log if i >= index]:
            del log[i]

    def delete_before(self, group: int, index: int) -> None:
        log = self._log(group)
        for i in [i for i in log if i < index]:
            del log[i]

    def clear(self, group: int) -> None:
        self._log(group).clear()

    def set_meta(self, group: int, name: str, value: bytes) -> None:
        self._meta(group)[name] = bytes(value)

    def clear_meta(self, group: int) -> None:
        self._meta(group).clear()


class _MemBatch:
    __slots__ = ("_storage", "_writers", "_log", "_open")

    def __init__(self, storage: MemoryStorage) -> None:
        self._storage = storage
        self._writers: dict[int, _MemWriter] = {}
        self._log = _MemLog(self)
        self._open = True

    def state(self, group: int) -> StateWriter:
        if not self._open:
            raise RuntimeError("batch is closed")
        w = self._writers.get(group)
        if w is None:
            w = self._writers[group] = _MemWriter(
                self, self._storage._groups.get(group, _EMPTY).copy()
            )
        return w

    @property
    def log(self) -> _MemLog:
        return self._log

    def commit_journal(self) -> None:
        if not self._open:
            raise RuntimeError("batch is closed")
        s = self._storage
        with s._lock:
            for gid, log in self._log.logs.items():
                s._logs[gid] = log
            for gid, meta in self._log.metas.items():
                s._log_meta[gid] = meta
        self._log.logs, self._log.metas = {}, {}

    def commit(self) -> None:
        if not self._open:
            raise RuntimeError("batch is closed")
        self.commit_journal()
        s = self._storage
        with s._lock:
            for gid, w in self._writers.items():
                if w._grp.empty():
                    s._groups.pop(gid, None)
                else:
                    s._groups[gid] = w._grp
        self._close()

    def abort(self) -> None:
        if self._open:
            self._close()

    def _close(self) -> None:
        self._open = False
        self._storage._batch = None


class MemoryStorage:
    """TEST DOUBLE: in-memory, not durable.  Same threading rules as LmdbStorage."""

    def __init__(self) -> None:
        self._groups: dict[int, _Group] = {}
        self._logs: dict[int, dict[int, tuple[int, bytes]]] = {}
        self._log_meta: dict[int, dict[str, bytes]] = {}
        self._lock = threading.Lock()  # serializes publication with groups()/load_log
        self._batch: _MemBatch | None = None

    def begin(self) -> _MemBatch:
        if self._batch is not None:
            raise RuntimeError("a batch is already open (one batch at a time, driver thread only)")
        self._batch = _MemBatch(self)
        return self._batch

    def reader(self, group: int) -> StateReader:
        return _MemReader(self, group)

    @contextlib.contextmanager
    def view(self, group: int) -> Iterator[StateReader]:
        with self._lock:
            g = self._groups.get(group, _EMPTY)  # published groups are never changed in place
        yield _MemView(g)

    def load_log(self, group: int) -> list[tuple[bytes, int, int]]:
        with self._lock:
            log = self._logs.get(group, {})
            return [(log[i][1], i, log[i][0]) for i in sorted(log)]

    def log_sizes(self, group: int) -> list[tuple[int, int, int]]:
        with self._lock:
            log = self._logs.get(group, {})
            return [(i, log[i][0], len(log[i][1])) for i in sorted(log)]

    def log_entries(self, group: int, first: int, last: int) -> list[tuple[bytes, int, int]]:
        with self._lock:
            log = self._logs.get(group, {})
            return [(log[i][1], i, log[i][0]) for i in sorted(log) if first <= i <= last]

    def load_log_meta(self, group: int) -> dict[str, bytes]:
        with self._lock:
            return dict(self._log_meta.get(group, {}))

    def groups(self) -> set[int]:
        with self._lock:
            return (
                set(self._groups)
                | {g for g, log in self._logs.items() if log}
                | {g for g, m in self._log_meta.items() if m}
            )

    def set_short_of_disk(self, short: bool) -> None:
        """Nothing to give back: this storage holds no disk."""

    def close(self, clean: bool = True) -> None:
        if self._batch is not None:
            self._batch.abort()
