"""LMDB-backed :class:`~cachenode.storage.base.Storage`: one environment per node.

The state of every group hosted here lives in one LMDB environment; the
Raft journal of every group lives beside it in a write-ahead log
(:mod:`.wal`, ``<path>/wal``; until session 9 it was in LMDB too, in the
``log``/``logmeta`` databases, and a node of that time moves it on its
first start).  One storage batch per driver-loop iteration carries every
journal write, every apply and every term/vote update of every group: one
journal ``fdatasync`` for all of them (group commit), and one LMDB commit
that is not synced at all (see :class:`LmdbStorage` for why that is safe).

Why one environment per node (not one per shard replica): LMDB allows one
writer per environment, so a single environment lets one write transaction
per iteration carry every apply of every group.

Why a fixed set of sub-databases with the group id as a key prefix (instead
of one named database per group): LMDB's named databases are limited and
looked up linearly; with prefixes, adding a group costs nothing and deleting
one is a range delete.

Layout (``G`` = group id, 4 bytes big-endian; ``BE8`` = u64 big-endian;
``K`` = the stored form of a key, see below)::

    data     G + K                           -> BE8 version + BE8 expires_at_ms + value
                                                (+ BE2 n + key[480:] before the value
                                                when the key is long, see below)
    expiry   G + BE8 expires_at_ms + K       -> b''   (only when expires_at_ms != 0)
    dedup    G + u8 len(cid) + cid + BE8 seq -> BE8 now_ms + result
    dedupt   G + BE8 now_ms + (dedup entry)  -> b''   (time order, for pruning)
    gmeta    G + b"applied"                  -> BE8 applied_index + BE8 clock_ms
             G + b"stats"                    -> BE8 count + BE8 size_bytes
    log      G + BE8 index                   -> BE8 term + command   (before session 9 only:
    logmeta  G + name (utf-8)                -> value                 moved into the WAL at open)

Big-endian keys make LMDB's byte order the numeric order, so ranges
(expired keys, old dedup entries, journal suffixes) are cursor scans.

Keys up to 4096 bytes (``MAX_KEY_BYTES``) while LMDB's own key limit is
511 bytes: ``K`` is :func:`stored_key` of the user key.

* A key of at most ``INLINE_KEY_BYTES`` (480) bytes is stored as itself:
  ``K = key`` (the original layout; no migration, nothing extra on the hot
  path).  ``G + BE8 + K`` is at most 492 bytes.
* A longer ("long") key is stored as ``K = key[:480] + blake2b-128(key)``,
  exactly 496 bytes (``G + BE8 + K`` = 508 <= 511).  The rest of the key,
  ``key[480:]``, is kept in the data value (``BE2 n`` + ``n`` bytes, between
  the 16-byte header and the value), so items(), expired() and dumps return
  the full key, and every lookup checks it.  No marker byte is needed: a
  short ``K`` has at most 480 bytes and a long one exactly 496, so the two
  kinds never collide and a stored key's kind is its length.
* Order: LMDB orders by ``K``, and so does every storage (the contract's
  "key order" is :func:`stored_key` order).  It equals byte order of the
  full keys except among long keys that share their first 480 bytes, which
  are ordered by their digest.  Between a short and a long key the order
  is always byte order: the short key either differs from the long one
  within its first 480 bytes or is a prefix of it (and sorts first).
* Digest collision (two different long keys with the same first 480 bytes
  and the same 128-bit digest, only by breaking blake2b): the slot belongs
  to whichever key was written last.  ``get``/``delete`` of the other key
  see it absent; ``put`` replaces the other key's record (counters adjusted,
  an error logged) instead of raising: the outcome depends only on the
  replicated state, so replicas stay identical, and no client input can
  make every replica fault on the same log entry forever.
  blake2b (not xxh3) because clients choose keys: a non-cryptographic hash
  would let a client craft colliding keys on purpose.

Counters and the applied index/clock are cached in the group's writer for
the length of a batch and written once at commit: the hot path then costs
no extra B-tree operations per apply.

Opening: ``sync`` and ``metasync`` off (the state is derived from the
journal and the snapshots; see :class:`LmdbStorage`), ``lock`` on,
``max_readers`` 1024 so reader threads never run out of slots, and
``writemap`` on unless the caller turns it off.  The map size is virtual:
make it generous.

``writemap`` (LMDB's ``MDB_WRITEMAP``): a write transaction changes its
pages in place through a writable memory map, instead of in copies that
LMDB allocates and then writes back with one ``pwrite`` per page at commit.
Measured in session 11 (3 nodes, 16 shards, fsync on, 4 rounds A/B): node
CPU per write -10 %, ``set`` +10 %, 100-key ``mset`` +19 %.  What it costs:

* LMDB sizes the data file to the map at open (``ftruncate``): the file's
  apparent size is ``map_size`` (64 GiB by default) while only the pages
  in use take disk space (a sparse file).  ``du`` tells the truth, ``ls``
  does not; copy a data directory with a hole-preserving tool (``cp``
  does so by default, ``rsync`` needs ``-S``), or turn writemap off
  (``--lmdb-writemap off``) on filesystems without sparse files.
* Nested transactions are unavailable, so :meth:`_LmdbStateWriter.load`
  validates the whole dump before it writes anything (two passes) instead
  of writing into a child transaction it can abort.
* A full disk surfaces as SIGBUS in the writing thread (a page of the file
  cannot be allocated when it is first written) rather than as an LMDB
  error: either way the node stops (fail-stop), the acknowledged journal
  is in the write-ahead log, and the state's last commit is intact (LMDB
  never writes a committed page in place).

This module also defines the storage-independent dump format
(:class:`DumpWriter`, :class:`DumpReader`) used by every storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, ClassVar, TypeVar

import lmdb

from .._sizes import show_size
from .base import MAX_KEY_BYTES, Record, StateReader, StateWriter, StorageFault
from .wal import SEGMENT_BYTES, WalBatch, WriteAheadLog, fsync_dir, write_durably

__all__ = [
    "LmdbStorage",
    "DumpWriter",
    "DumpReader",
    "DEFAULT_MAP_SIZE",
    "INLINE_KEY_BYTES",
    "dedup_entry",
    "stored_key",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_MAP_SIZE = 64 << 30
"""64 GiB of address space; LMDB files are sparse, so this costs nothing until used."""

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U64X2 = struct.Struct(">QQ")  # data header (version, expires_at_ms); applied+clock; count+size
_HDR_LEN = 16
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")

INLINE_KEY_BYTES = 480
"""Keys up to this length are stored under themselves; longer keys under
their first ``INLINE_KEY_BYTES`` bytes + a 16-byte digest (see the module
docstring).  Fixed forever: it decides where existing records are found."""
_DIGEST_LEN = 16
_LONG_K = INLINE_KEY_BYTES + _DIGEST_LEN  # length of K for every long key
_INLINE_DATA_KEY = 4 + INLINE_KEY_BYTES  # longest data-db key of a short key
_INLINE_EXPIRY_KEY = 12 + INLINE_KEY_BYTES  # longest expiry-db key of a short key
_LONG_HDR = _HDR_LEN + 2  # header + BE2 length of the key's rest
_LMDB_MAX_KEY = 511
assert 12 + _LONG_K <= _LMDB_MAX_KEY and _LONG_K > INLINE_KEY_BYTES
assert MAX_KEY_BYTES - INLINE_KEY_BYTES <= 0xFFFF

_CLEAN = "state.clean"
_BOOT = "state.boot"
_TORN = "state.torn"
"""Written when a sync of the state failed: the next open rebuilds it, even in the same boot."""
MIGRATE_FRAME_BYTES = 64 << 20
"""A legacy journal moves into the write-ahead log in frames of about this size."""
SYNC_EVERY_S = 30.0
"""How often the state is synced in the background (see LmdbStorage._sync_loop)."""
COMPACT_AT_OPEN_BYTES = 64 << 20
"""At open, the state's file is copied without its free pages when at least
this much of it, and at least half of it, is free (see
:meth:`LmdbStorage._compact_if_mostly_free`)."""
_COMPACT_SUFFIX = ".compact"

_APPLIED = b"applied"
_STATS = b"stats"
_INSTALLING = b"installing"
_MAX_GROUP = 0xFFFF_FFFF
_NO_FLOOR = 1 << 64  # larger than any u64 timestamp: "no dedup entry at all"


def _fault(e: Exception) -> StorageFault:
    return StorageFault(f"LMDB refused the operation: {type(e).__name__}: {e}")


def _decode_record(raw: bytes) -> Record:
    version, expires = _U64X2.unpack_from(raw)
    return Record(raw[_HDR_LEN:], version, expires)


_blake2b = hashlib.blake2b


def stored_key(key: bytes) -> bytes:
    """``K``: how ``key`` is stored in LMDB (without the group prefix), and
    its position in every storage's order (items, expired ties, dumps).

    ``key`` itself if it has at most ``INLINE_KEY_BYTES`` bytes, else
    ``key[:INLINE_KEY_BYTES]`` + blake2b-128 of the whole key."""
    if len(key) <= INLINE_KEY_BYTES:
        return key
    return key[:INLINE_KEY_BYTES] + _blake2b(key, digest_size=_DIGEST_LEN).digest()


def _long_rest(raw: bytes) -> tuple[bytes, int]:
    """(key[INLINE_KEY_BYTES:], offset of the value) of a long key's data value."""
    (n,) = _U16.unpack_from(raw, _HDR_LEN)
    end = _LONG_HDR + n
    return raw[_LONG_HDR:end], end


def _long_value(key: bytes, record: Record) -> bytes:
    rest = key[INLINE_KEY_BYTES:]
    return (
        _U64X2.pack(record.version, record.expires_at_ms)
        + _U16.pack(len(rest))
        + rest
        + record.value
    )


def _get_long(
    txn: lmdb.Transaction[bytes], data: lmdb._Database, p: bytes, key: bytes
) -> Record | None:
    """get() of a key longer than INLINE_KEY_BYTES: absent unless the stored
    key is exactly ``key`` (a digest collision reads as absent)."""
    if len(key) > MAX_KEY_BYTES:
        return None  # can never have been stored
    raw = txn.get(p + stored_key(key), db=data)
    if raw is None:
        return None
    rest, at = _long_rest(raw)
    if rest != key[INLINE_KEY_BYTES:]:
        return None
    version, expires = _U64X2.unpack_from(raw)
    return Record(raw[at:], version, expires)


def dedup_entry(client_id: bytes, seq: int) -> bytes:
    """The dedup key of (client_id, seq) without its group prefix.

    Its byte order is (len(client_id), client_id, seq): the order in which
    every storage prunes entries stored at the same time."""
    n = len(client_id)
    if not 0 < n <= 255:
        raise ValueError(f"client id must be 1..255 bytes, got {n}")
    return _U8.pack(n) + client_id + _U64.pack(seq)


# ---------------------------------------------------------------------------
# Dump format (shared by every storage)
#
#   header  : MAGIC (8) + FORMAT_VERSION (1)
#   records : tag u8 + klen u32 + vlen u32 + key + value, in this order:
#     'M'  once : key b"",  value BE8 applied_index + BE8 clock_ms
#     'D'  *    : key = user key (ascending in stored_key order: byte order,
#                 except long keys sharing their first 480 bytes, which
#                 follow their digest), value = BE8 version + BE8 expires + value
#     'U'  *    : key = dedup entry (ascending), value = BE8 now_ms + result
#     'E'  once : key b"",  value BE8 count + BE8 size_bytes + BE8 records + BE4 crc32
#   crc32 covers every byte from the magic up to, not including, the crc itself.
#
# The expiry and dedup-time indexes are not written: load rebuilds them from
# the records, so they cannot disagree with the data.  Counters are
# recomputed on load and checked against the end record.
#
# Keys longer than 480 bytes did not change the format (version 1): a dump
# without them is byte for byte what it was, and an older reader refuses a
# dump with them ("bad data record lengths") rather than misreading it.
# ---------------------------------------------------------------------------

DUMP_MAGIC = b"CNDUMP\r\n"
DUMP_VERSION = 1
_REC = struct.Struct(">BII")
_TAG_META = ord("M")
_TAG_DATA = ord("D")
_TAG_DEDUP = ord("U")
_TAG_END = ord("E")
_END_BODY = struct.Struct(">QQQ")
_FLUSH_AT = 1 << 16
_MAX_DUMP_KEY = max(MAX_KEY_BYTES, 1 + 255 + 8)  # a data key or a dedup entry


class DumpWriter:
    """Writes one dump to ``out``, buffering 64 KiB at a time.

    Call :meth:`data` for every record in key order, then :meth:`dedup` for
    every dedup entry in entry order, then :meth:`finish`."""

    def __init__(self, out: BinaryIO, applied_index: int, clock_ms: int) -> None:
        self._out = out
        self._crc = 0
        self._buf = bytearray(DUMP_MAGIC)
        self._buf.append(DUMP_VERSION)
        self._records = 0
        self._count = 0
        self._size = 0
        self._record(_TAG_META, b"", _U64X2.pack(applied_index, clock_ms))

    def _record(self, tag: int, key: bytes, value: bytes) -> None:
        buf = self._buf
        buf += _REC.pack(tag, len(key), len(value))
        buf += key
        buf += value
        self._records += 1
        if len(buf) >= _FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        self._crc = zlib.crc32(self._buf, self._crc)
        self._out.write(bytes(self._buf))
        self._buf.clear()

    def data(self, key: bytes, stored: bytes) -> None:
        """``stored`` = 16-byte header (version, expires_at_ms) + value."""
        self._count += 1
        self._size += len(key) + len(stored) - _HDR_LEN
        self._record(_TAG_DATA, key, stored)

    def dedup(self, entry: bytes, stored: bytes) -> None:
        """``entry`` from :func:`dedup_entry`; ``stored`` = BE8 now_ms + result."""
        self._record(_TAG_DEDUP, entry, stored)

    def finish(self) -> None:
        self._records += 1  # the end record itself
        self._buf += _REC.pack(_TAG_END, 0, _END_BODY.size + 4)
        self._buf += _END_BODY.pack(self._count, self._size, self._records)
        crc = zlib.crc32(self._buf, self._crc)
        self._buf += _U32.pack(crc)
        self._out.write(bytes(self._buf))
        self._buf.clear()


class DumpReader:
    """Reads and validates one dump from ``inp``.

    The constructor reads the header and meta record (so ``applied_index``
    and ``clock_ms`` are known before anything is loaded).  :meth:`records`
    then yields ``(tag, key, value)`` for data (``TAG_DATA``) and dedup
    (``TAG_DEDUP``) records; after it is exhausted ``count`` and
    ``size_bytes`` hold the verified counters.  Every problem (truncation,
    bad magic, unknown version or tag, records out of order, bad lengths,
    counter or checksum mismatch) raises ``ValueError``.  A consumer must
    exhaust :meth:`records` before trusting anything it yielded."""

    TAG_DATA: ClassVar[int] = _TAG_DATA
    TAG_DEDUP: ClassVar[int] = _TAG_DEDUP

    def __init__(self, inp: BinaryIO) -> None:
        self._inp = inp
        self._crc = 0
        self.count = 0
        self.size_bytes = 0
        head = self._read(len(DUMP_MAGIC) + 1)
        if head[:-1] != DUMP_MAGIC:
            raise ValueError("not a cachenode dump (bad magic)")
        if head[-1] != DUMP_VERSION:
            raise ValueError(
                f"unsupported dump format version {head[-1]} (expected {DUMP_VERSION})"
            )
        tag, key, value = self._next()
        if tag != _TAG_META or key or len(value) != 16:
            raise ValueError("corrupt dump: missing meta record")
        self.applied_index, self.clock_ms = _U64X2.unpack(value)

    def _read(self, n: int) -> bytes:
        b = self._inp.read(n)
        if b is None or len(b) != n:
            raise ValueError("truncated dump")
        self._crc = zlib.crc32(b, self._crc)
        return b

    def _next(self) -> tuple[int, bytes, bytes]:
        tag, klen, vlen = _REC.unpack(self._read(_REC.size))
        if tag == _TAG_END:
            # The end record's value is read by records(): its last 4 bytes
            # (the checksum) are not part of what the checksum covers.
            if klen or vlen != _END_BODY.size + 4:
                raise ValueError("corrupt dump: bad end record")
            return tag, b"", b""
        if klen > _MAX_DUMP_KEY:  # a corrupt length must not make us read gigabytes
            raise ValueError("corrupt dump: key length out of range")
        return tag, self._read(klen), self._read(vlen)

    def records(self) -> Iterator[tuple[int, bytes, bytes]]:
        n_records = 1  # the meta record
        count = size = 0
        phase = _TAG_DATA
        last = b""
        first = True
        while True:
            tag, key, value = self._next()
            n_records += 1
            if tag == _TAG_DATA:
                if phase != _TAG_DATA:
                    raise ValueError("corrupt dump: data record after dedup records")
                if len(value) < _HDR_LEN or len(key) > MAX_KEY_BYTES:
                    raise ValueError("corrupt dump: bad data record lengths")
                order = key if len(key) <= INLINE_KEY_BYTES else stored_key(key)
                if not first and order <= last:
                    # also refuses two keys with the same stored key
                    raise ValueError("corrupt dump: data keys out of order")
                last = order
                count += 1
                size += len(key) + len(value) - _HDR_LEN
            elif tag == _TAG_DEDUP:
                if phase == _TAG_DATA:
                    phase, first = _TAG_DEDUP, True
                if len(value) < 8 or len(key) < 10 or key[0] != len(key) - 9:
                    raise ValueError("corrupt dump: bad dedup record")
                if not first and key <= last:
                    raise ValueError("corrupt dump: dedup entries out of order")
                last = key
            elif tag == _TAG_END:
                break
            else:
                raise ValueError(f"corrupt dump: unknown record tag {tag}")
            first = False
            yield tag, key, value
        body = self._read(_END_BODY.size)
        crc = self._crc
        (want_crc,) = _U32.unpack(self._read(4))
        if want_crc != crc:
            raise ValueError("corrupt dump: checksum mismatch")
        want_count, want_size, want_records = _END_BODY.unpack(body)
        if (want_count, want_size, want_records) != (count, size, n_records):
            raise ValueError("corrupt dump: record counts do not match the end record")
        self.count, self.size_bytes = count, size


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------


class _Dbs:
    """The sub-database handles, opened once per environment."""

    __slots__ = ("data", "expiry", "dedup", "dedupt", "gmeta", "log", "logmeta", "state", "all")

    def __init__(self, env: lmdb.Environment) -> None:
        self.data = env.open_db(b"data")
        self.expiry = env.open_db(b"expiry")
        self.dedup = env.open_db(b"dedup")
        self.dedupt = env.open_db(b"dedupt")
        self.gmeta = env.open_db(b"gmeta")
        self.log = env.open_db(b"log")
        self.logmeta = env.open_db(b"logmeta")
        self.state = (self.data, self.expiry, self.dedup, self.dedupt, self.gmeta)
        self.all = (*self.state, self.log, self.logmeta)


def _pages(stat: Any) -> int:
    """Pages a database takes (``stat`` of the environment or a transaction)."""
    return int(stat["branch_pages"]) + int(stat["leaf_pages"]) + int(stat["overflow_pages"])


def _put_records(
    txn: lmdb.Transaction[bytes], dbs: _Dbs, p: bytes, records: Iterable[tuple[int, bytes, bytes]]
) -> None:
    """Write dump records (``DumpReader.records()``) of group prefix ``p``."""
    put = txn.put
    for tag, key, value in records:
        if tag == _TAG_DATA:
            if len(key) > INLINE_KEY_BYTES:
                rest = key[INLINE_KEY_BYTES:]
                key = stored_key(key)
                put(
                    p + key,
                    value[:_HDR_LEN] + _U16.pack(len(rest)) + rest + value[_HDR_LEN:],
                    db=dbs.data,
                )
            else:
                put(p + key, value, db=dbs.data)
            exp = value[8:16]
            if exp != b"\0\0\0\0\0\0\0\0":
                put(p + exp + key, b"", db=dbs.expiry)
        else:
            put(p + key, value, db=dbs.dedup)
            put(p + value[:8] + key, b"", db=dbs.dedupt)


def _delete_prefix(txn: lmdb.Transaction[bytes], db: lmdb._Database, prefix: bytes) -> None:
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return
    while cur.key().startswith(prefix):
        if not cur.delete():
            return


def _delete_range(txn: lmdb.Transaction[bytes], db: lmdb._Database, lo: bytes, hi: bytes) -> None:
    """Delete keys in [lo, hi)."""
    cur = txn.cursor(db=db)
    if not cur.set_range(lo):
        return
    while True:
        k = cur.key()
        if not k or k >= hi:
            return
        if not cur.delete():
            return


def _read_meta(txn: lmdb.Transaction[bytes], dbs: _Dbs, p: bytes) -> tuple[int, int, int, int]:
    a = txn.get(p + _APPLIED, db=dbs.gmeta)
    s = txn.get(p + _STATS, db=dbs.gmeta)
    applied, clock = _U64X2.unpack(a) if a is not None else (0, 0)
    count, size = _U64X2.unpack(s) if s is not None else (0, 0)
    return applied, clock, count, size


def _write_meta(
    txn: lmdb.Transaction[bytes],
    dbs: _Dbs,
    p: bytes,
    applied: int,
    clock: int,
    count: int,
    size: int,
) -> None:
    # All-zero meta is deleted rather than written, so a cleared group leaves
    # no key behind and disappears from groups().
    if applied or clock:
        txn.put(p + _APPLIED, _U64X2.pack(applied, clock), db=dbs.gmeta)
    else:
        txn.delete(p + _APPLIED, db=dbs.gmeta)
    if count or size:
        txn.put(p + _STATS, _U64X2.pack(count, size), db=dbs.gmeta)
    else:
        txn.delete(p + _STATS, db=dbs.gmeta)


def _iter_prefix(
    txn: lmdb.Transaction[bytes], db: lmdb._Database, p: bytes
) -> Iterator[tuple[bytes, bytes]]:
    cur = txn.cursor(db=db)
    if not cur.set_range(p):
        return
    for k, v in cur.iternext():
        if not k.startswith(p):
            return
        yield k, v


def _expired(
    txn: lmdb.Transaction[bytes], dbs: _Dbs, p: bytes, now_ms: int, limit: int
) -> list[tuple[bytes, int]]:
    out: list[tuple[bytes, int]] = []
    if limit <= 0 or now_ms <= 0:
        return out
    unpack = _U64.unpack_from
    for k, _ in _iter_prefix(txn, dbs.expiry, p):
        (exp,) = unpack(k, 4)
        if exp > now_ms:
            break
        if len(k) > _INLINE_EXPIRY_KEY:  # long key: the rest is in the record
            raw = txn.get(p + k[12:], db=dbs.data)
            if raw is None:
                raise StorageFault("expiry index names a record that does not exist")
            out.append((k[12:_INLINE_EXPIRY_KEY] + _long_rest(raw)[0], exp))
        else:
            out.append((k[12:], exp))
        if len(out) >= limit:
            break
    return out


def _items(txn: lmdb.Transaction[bytes], dbs: _Dbs, p: bytes) -> Iterator[tuple[bytes, Record]]:
    for k, v in _iter_prefix(txn, dbs.data, p):
        if len(k) > _INLINE_DATA_KEY:
            rest, at = _long_rest(v)
            version, expires = _U64X2.unpack_from(v)
            yield k[4:_INLINE_DATA_KEY] + rest, Record(v[at:], version, expires)
        else:
            yield k[4:], _decode_record(v)


def _dump(
    txn: lmdb.Transaction[bytes], dbs: _Dbs, p: bytes, applied: int, clock: int, out: BinaryIO
) -> None:
    w = DumpWriter(out, applied, clock)
    for k, v in _iter_prefix(txn, dbs.data, p):
        if len(k) > _INLINE_DATA_KEY:
            rest, at = _long_rest(v)
            w.data(k[4:_INLINE_DATA_KEY] + rest, v[:_HDR_LEN] + v[at:])
        else:
            w.data(k[4:], v)
    for k, v in _iter_prefix(txn, dbs.dedup, p):
        w.dedup(k[4:], v)
    w.finish()


class _LmdbStateReader:
    """Committed state of one group; every call opens its own short read
    transaction (MVCC: never waits for the writer) and reads it through an
    :class:`_LmdbView`.  Any thread."""

    __slots__ = ("_env", "_dbs", "_group")

    def __init__(self, env: lmdb.Environment, dbs: _Dbs, group: int) -> None:
        self._env = env
        self._dbs = dbs
        self._group = group

    def _in_txn(self, read: Callable[[_LmdbView], T]) -> T:
        try:
            with self._env.begin() as txn:
                return read(_LmdbView(txn, self._dbs, self._group))
        except lmdb.Error as e:
            raise _fault(e) from e

    def get(self, key: bytes) -> Record | None:
        return self._in_txn(lambda v: v.get(key))

    def applied_index(self) -> int:
        return self._in_txn(_LmdbView.applied_index)

    def installing(self) -> bool:
        return self._in_txn(_LmdbView.installing)

    def answered(self, client_id: bytes, seq: int) -> bool:
        return self._in_txn(lambda v: v.answered(client_id, seq))

    def clock_ms(self) -> int:
        return self._in_txn(_LmdbView.clock_ms)

    def count(self) -> int:
        return self._in_txn(_LmdbView.count)

    def size_bytes(self) -> int:
        return self._in_txn(_LmdbView.size_bytes)

    def expired(self, now_ms: int, limit: int) -> list[tuple[bytes, int]]:
        return self._in_txn(lambda v: v.expired(now_ms, limit))

    def items(self) -> Iterator[tuple[bytes, Record]]:
        with self._env.begin() as txn:
            yield from _LmdbView(txn, self._dbs, self._group).items()

    def dump(self, out: BinaryIO) -> None:
        """One read transaction for the whole dump: a consistent snapshot.
        While it runs LMDB cannot reuse pages freed by later commits, so the
        file may grow by what is written meanwhile."""
        self._in_txn(lambda v: v.dump(out))


class _LmdbView:
    """One group's committed state as of one read transaction (LmdbStorage.view)."""

    __slots__ = ("_txn", "_dbs", "_p")

    def __init__(self, txn: lmdb.Transaction[bytes], dbs: _Dbs, group: int) -> None:
        self._txn = txn
        self._dbs = dbs
        self._p = _U32.pack(group)

    def get(self, key: bytes) -> Record | None:
        try:
            if len(key) > INLINE_KEY_BYTES:
                return _get_long(self._txn, self._dbs.data, self._p, key)
            raw = self._txn.get(self._p + key, db=self._dbs.data)
        except lmdb.Error as e:
            raise _fault(e) from e
        return None if raw is None else _decode_record(raw)

    def _meta(self) -> tuple[int, int, int, int]:
        try:
            return _read_meta(self._txn, self._dbs, self._p)
        except lmdb.Error as e:
            raise _fault(e) from e

    def applied_index(self) -> int:
        return self._meta()[0]

    def clock_ms(self) -> int:
        return self._meta()[1]

    def count(self) -> int:
        return self._meta()[2]

    def size_bytes(self) -> int:
        return self._meta()[3]

    def installing(self) -> bool:
        try:
            return self._txn.get(self._p + _INSTALLING, db=self._dbs.gmeta) is not None
        except lmdb.Error as e:
            raise _fault(e) from e

    def answered(self, client_id: bytes, seq: int) -> bool:
        try:
            return self._txn.get(self._p + dedup_entry(client_id, seq), db=self._dbs.dedup) is not None
        except lmdb.Error as e:
            raise _fault(e) from e

    def expired(self, now_ms: int, limit: int) -> list[tuple[bytes, int]]:
        try:
            return _expired(self._txn, self._dbs, self._p, now_ms, limit)
        except lmdb.Error as e:
            raise _fault(e) from e

    def items(self) -> Iterator[tuple[bytes, Record]]:
        return _items(self._txn, self._dbs, self._p)

    def dump(self, out: BinaryIO) -> None:
        try:
            applied, clock, _, _ = _read_meta(self._txn, self._dbs, self._p)
            _dump(self._txn, self._dbs, self._p, applied, clock, out)
        except lmdb.Error as e:
            raise _fault(e) from e


def _seekable(f: object) -> bool:
    fn = getattr(f, "seekable", None)
    return bool(fn()) if callable(fn) else False


class _Tee:
    """Reads from ``inp`` and copies what it read to ``out`` (a one-pass
    source read twice by ``_load_validated``)."""

    def __init__(self, inp: BinaryIO, out: BinaryIO) -> None:
        self._inp, self._out = inp, out

    def read(self, n: int = -1) -> bytes:
        b = self._inp.read(n)
        if b:
            self._out.write(b)
        return b


class _LmdbStateWriter:
    """One group's view of the batch's write transaction.  Driver thread only.

    ``_applied``, ``_clock``, ``_count``, ``_size`` are the group's meta as of
    this batch; they are written to ``gmeta`` by :meth:`_flush` at commit."""

    __slots__ = (
        "_env", "_txn", "_dbs", "_p", "_applied", "_clock", "_count", "_size", "_dirty",
        "_prune_floor", "_nested",
    )  # fmt: skip

    def __init__(
        self, env: lmdb.Environment, txn: lmdb.Transaction[bytes], dbs: _Dbs, group: int,
        nested: bool = False,
    ) -> None:
        """``nested``: the environment allows nested transactions (writemap
        off), which ``load`` then uses."""
        self._env = env
        self._nested = nested
        self._txn = txn
        self._dbs = dbs
        self._p = _U32.pack(group)
        self._applied, self._clock, self._count, self._size = _read_meta(txn, dbs, self._p)
        self._dirty = False
        # Every dedup entry of the group was stored at now_ms >= _prune_floor,
        # so a prune with older_than_ms <= _prune_floor can skip the cursor.
        # 0 is always true; a prune raises it to the oldest remaining entry.
        self._prune_floor = 0

    # -- reads (see the batch's own writes) ----------------------------------

    def get(self, key: bytes) -> Record | None:
        try:
            if len(key) > INLINE_KEY_BYTES:
                return _get_long(self._txn, self._dbs.data, self._p, key)
            raw = self._txn.get(self._p + key, db=self._dbs.data)
        except lmdb.Error as e:
            raise _fault(e) from e
        return None if raw is None else _decode_record(raw)

    def applied_index(self) -> int:
        return self._applied

    def clock_ms(self) -> int:
        return self._clock

    def count(self) -> int:
        return self._count

    def size_bytes(self) -> int:
        return self._size

    def expired(self, now_ms: int, limit: int) -> list[tuple[bytes, int]]:
        try:
            return _expired(self._txn, self._dbs, self._p, now_ms, limit)
        except lmdb.Error as e:
            raise _fault(e) from e

    def items(self) -> Iterator[tuple[bytes, Record]]:
        return _items(self._txn, self._dbs, self._p)

    def dump(self, out: BinaryIO) -> None:
        try:
            _dump(self._txn, self._dbs, self._p, self._applied, self._clock, out)
        except lmdb.Error as e:
            raise _fault(e) from e

    # -- writes ----------------------------------------------------------------

    def put(self, key: bytes, record: Record) -> None:
        if len(key) > INLINE_KEY_BYTES:
            return self._put_long(key, record)
        exp = record.expires_at_ms
        self._put_inline(key, _U64X2.pack(record.version, exp) + record.value, len(record.value), exp)
        self._dirty = True

    def put_values(
        self, items: tuple[tuple[bytes, bytes, int], ...], version: int, clock_ms: int
    ) -> None:
        # The common item (a short key, no expiry) shares one header and
        # needs no Record; long keys, expiries and due items take put/delete.
        hdr = _U64X2.pack(version, 0)
        for key, value, exp in items:
            if exp or len(key) > INLINE_KEY_BYTES:
                if exp and exp <= clock_ms:
                    self.delete(key)
                else:
                    self.put(key, Record(value, version, exp))
            else:
                self._put_inline(key, hdr + value, len(value), 0)
        self._dirty = True

    def _put_inline(self, key: bytes, stored: bytes, value_len: int, exp: int) -> None:
        """Store ``stored`` (header + value) under a short ``key``; keep the
        expiry index, ``count`` and ``size_bytes`` right (put, put_values)."""
        txn = self._txn
        p = self._p
        try:
            old = txn.replace(p + key, stored, db=self._dbs.data)
            if old is None:
                self._count += 1
                self._size += len(key) + value_len
                if exp:
                    txn.put(p + _U64.pack(exp) + key, b"", db=self._dbs.expiry)
            else:
                self._size += value_len - (len(old) - _HDR_LEN)
                (old_exp,) = _U64.unpack_from(old, 8)
                if old_exp != exp:
                    if old_exp:
                        txn.delete(p + _U64.pack(old_exp) + key, db=self._dbs.expiry)
                    if exp:
                        txn.put(p + _U64.pack(exp) + key, b"", db=self._dbs.expiry)
        except lmdb.Error as e:
            raise _fault(e) from e

    def _put_long(self, key: bytes, record: Record) -> None:
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"key of {len(key)} bytes exceeds MAX_KEY_BYTES ({MAX_KEY_BYTES})")
        txn = self._txn
        p = self._p
        sk = stored_key(key)
        exp = record.expires_at_ms
        try:
            old = txn.replace(p + sk, _long_value(key, record), db=self._dbs.data)
            if old is None:
                self._count += 1
                self._size += len(key) + len(record.value)
                if exp:
                    txn.put(p + _U64.pack(exp) + sk, b"", db=self._dbs.expiry)
            else:
                # old key length + old value length = INLINE + len(old) - _LONG_HDR
                self._size += (
                    len(key) + len(record.value) - (INLINE_KEY_BYTES + len(old) - _LONG_HDR)
                )
                if _long_rest(old)[0] != key[INLINE_KEY_BYTES:]:
                    log.error(
                        "blake2b digest collision between two keys longer than %d bytes: "
                        "the record of the older key is replaced (group %d)",
                        INLINE_KEY_BYTES,
                        _U32.unpack(p)[0],
                    )
                (old_exp,) = _U64.unpack_from(old, 8)
                if old_exp != exp:  # same K, so the index keys differ only by time
                    if old_exp:
                        txn.delete(p + _U64.pack(old_exp) + sk, db=self._dbs.expiry)
                    if exp:
                        txn.put(p + _U64.pack(exp) + sk, b"", db=self._dbs.expiry)
        except lmdb.Error as e:
            raise _fault(e) from e
        self._dirty = True

    def delete(self, key: bytes) -> bool:
        if len(key) > INLINE_KEY_BYTES:
            return self._delete_long(key)
        txn = self._txn
        try:
            old = txn.pop(self._p + key, db=self._dbs.data)
            if old is None:
                return False
            (old_exp,) = _U64.unpack_from(old, 8)
            if old_exp:
                txn.delete(self._p + _U64.pack(old_exp) + key, db=self._dbs.expiry)
        except lmdb.Error as e:
            raise _fault(e) from e
        self._count -= 1
        self._size -= len(key) + len(old) - _HDR_LEN
        self._dirty = True
        return True

    def _delete_long(self, key: bytes) -> bool:
        if len(key) > MAX_KEY_BYTES:
            return False
        txn = self._txn
        p = self._p
        sk = stored_key(key)
        try:
            cur = txn.cursor(db=self._dbs.data)
            if not cur.set_key(p + sk):
                return False
            old = cur.value()
            if _long_rest(old)[0] != key[INLINE_KEY_BYTES:]:
                return False  # a digest collision: the slot holds another key
            cur.delete()
            (old_exp,) = _U64.unpack_from(old, 8)
            if old_exp:
                txn.delete(p + _U64.pack(old_exp) + sk, db=self._dbs.expiry)
        except lmdb.Error as e:
            raise _fault(e) from e
        self._count -= 1
        self._size -= INLINE_KEY_BYTES + len(old) - _LONG_HDR
        self._dirty = True
        return True

    def set_applied(self, index: int, clock_ms: int) -> None:
        self._applied = index
        self._clock = clock_ms
        self._dirty = True

    def answered(self, client_id: bytes, seq: int) -> bool:
        return self.dedup_get(client_id, seq) is not None

    def dedup_get(self, client_id: bytes, seq: int) -> bytes | None:
        try:
            raw = self._txn.get(self._p + dedup_entry(client_id, seq), db=self._dbs.dedup)
        except lmdb.Error as e:
            raise _fault(e) from e
        return None if raw is None else raw[8:]

    def dedup_put(self, client_id: bytes, seq: int, result: bytes, now_ms: int) -> None:
        entry = dedup_entry(client_id, seq)
        p = self._p
        t = _U64.pack(now_ms)
        txn = self._txn
        try:
            old = txn.replace(p + entry, t + result, db=self._dbs.dedup)
            if old is not None and old[:8] != t:
                txn.delete(p + old[:8] + entry, db=self._dbs.dedupt)
            txn.put(p + t + entry, b"", db=self._dbs.dedupt)
        except lmdb.Error as e:
            raise _fault(e) from e
        if now_ms < self._prune_floor:
            self._prune_floor = now_ms

    def dedup_prune(self, older_than_ms: int, limit: int) -> int:
        if limit <= 0 or older_than_ms <= self._prune_floor:
            return 0
        p = self._p
        txn = self._txn
        dedup_db = self._dbs.dedup
        n = 0
        floor = _NO_FLOOR
        try:
            cur = txn.cursor(db=self._dbs.dedupt)
            if cur.set_range(p):
                while True:
                    k = cur.key()
                    if not k.startswith(p):
                        break
                    (t,) = _U64.unpack_from(k, 4)
                    if t >= older_than_ms or n >= limit:
                        floor = t
                        break
                    txn.delete(p + k[12:], db=dedup_db)
                    n += 1
                    if not cur.delete():
                        break
        except lmdb.Error as e:
            raise _fault(e) from e
        self._prune_floor = floor
        return n

    def load(self, inp: BinaryIO) -> None:
        if not self._nested:
            self._load_validated(inp)
            return
        reader = DumpReader(inp)
        # A child transaction makes the load atomic inside the batch: on any
        # error it is aborted and the group is exactly as before.
        try:
            child = self._env.begin(write=True, parent=self._txn)
        except lmdb.Error as e:
            raise _fault(e) from e
        try:
            self._replace_with(child, reader)
        except lmdb.Error as e:
            child.abort()
            raise _fault(e) from e
        except BaseException:
            child.abort()
            raise
        try:
            child.commit()
        except lmdb.Error as e:
            raise _fault(e) from e
        self._loaded(reader)

    def _replace_with(self, txn: lmdb.Transaction[bytes], reader: DumpReader) -> None:
        """Delete the group's state in ``txn`` and write the dump's records and meta."""
        dbs, p = self._dbs, self._p
        for db in dbs.state:
            _delete_prefix(txn, db, p)
        _put_records(txn, dbs, p, reader.records())
        _write_meta(txn, dbs, p, reader.applied_index, reader.clock_ms, reader.count, reader.size_bytes)

    def _loaded(self, reader: DumpReader) -> None:
        """The cached meta after a load of ``reader``'s dump (already written)."""
        self._applied, self._clock = reader.applied_index, reader.clock_ms
        self._count, self._size = reader.count, reader.size_bytes
        self._dirty = False
        self._prune_floor = 0

    def _load_validated(self, inp: BinaryIO) -> None:
        """``load`` without a child transaction (writemap): the first pass
        reads and validates the whole dump and writes nothing, so every
        ``ValueError`` leaves the group as it was; the second pass, over the
        same bytes, writes.  A seekable ``inp`` is read twice; anything else
        is copied aside during the first pass (a temporary file once it
        passes 16 MiB).  If the second pass fails anyway (the file changed
        underneath, or a read error) the group is half-written inside the
        batch: that raises StorageFault, and the batch must not commit."""
        start = inp.tell() if _seekable(inp) else None
        spool = None
        if start is None:
            spool = tempfile.SpooledTemporaryFile(max_size=16 << 20)  # noqa: SIM115 - closed below
            src: BinaryIO = spool  # type: ignore[assignment]
            inp = _Tee(inp, src)  # type: ignore[assignment]
        else:
            src = inp
        try:
            first = DumpReader(inp)
            for _ in first.records():
                pass
            end = inp.tell() if start is not None else None
            src.seek(start or 0)
            reader = DumpReader(src)
            try:
                self._replace_with(self._txn, reader)
            except lmdb.Error as e:
                raise _fault(e) from e
            except (ValueError, OSError) as reread:
                raise StorageFault(
                    f"a dump validated for group {_U32.unpack(self._p)[0]} failed while it was loaded "
                    f"({type(reread).__name__}: {reread}): its file changed or could not be read again; "
                    "the batch holds half of it and must not commit"
                ) from reread
            if end is not None:
                src.seek(end)  # the caller's stream ends where the dump did, as after one pass
        finally:
            if spool is not None:
                spool.close()
        self._loaded(reader)

    def installing(self) -> bool:
        try:
            return self._txn.get(self._p + _INSTALLING, db=self._dbs.gmeta) is not None
        except lmdb.Error as e:
            raise _fault(e) from e

    def begin_install(self) -> None:
        try:
            self._txn.put(self._p + _INSTALLING, b"1", db=self._dbs.gmeta)
        except lmdb.Error as e:
            raise _fault(e) from e
        self._applied = self._clock = self._count = self._size = 0
        self._dirty = True
        self._prune_floor = 0

    def clear_some(self, limit: int) -> bool:
        p = self._p
        n = 0
        try:
            for db in (self._dbs.data, self._dbs.expiry, self._dbs.dedup, self._dbs.dedupt):
                cur = self._txn.cursor(db=db)
                if not cur.set_range(p):
                    continue
                while cur.key()[:4] == p:
                    if n >= limit:
                        return False
                    n += 1
                    if not cur.delete():
                        break
        except lmdb.Error as e:
            raise _fault(e) from e
        return True

    def install_records(self, records: Iterable[tuple[int, bytes, bytes]]) -> None:
        try:
            _put_records(self._txn, self._dbs, self._p, records)
        except lmdb.Error as e:
            raise _fault(e) from e

    def end_install(self, applied_index: int, clock_ms: int, count: int, size_bytes: int) -> None:
        try:
            self._txn.delete(self._p + _INSTALLING, db=self._dbs.gmeta)
        except lmdb.Error as e:
            raise _fault(e) from e
        self._applied, self._clock, self._count, self._size = applied_index, clock_ms, count, size_bytes
        self._dirty = True

    def clear(self) -> None:
        try:
            for db in self._dbs.state:
                _delete_prefix(self._txn, db, self._p)
        except lmdb.Error as e:
            raise _fault(e) from e
        self._applied = self._clock = self._count = self._size = 0
        self._dirty = False
        self._prune_floor = _NO_FLOOR

    def _flush(self) -> None:
        if self._dirty:
            _write_meta(
                self._txn, self._dbs, self._p, self._applied, self._clock, self._count, self._size
            )
            self._dirty = False


class _LmdbBatch:
    """The one write transaction of a driver-loop iteration, and its journal
    writes (a :class:`~cachenode.storage.wal.WalBatch`).  Driver thread only."""

    __slots__ = ("_storage", "_txn", "_writers", "_log", "_open", "_journaled")

    def __init__(self, storage: LmdbStorage, txn: lmdb.Transaction[bytes]) -> None:
        self._storage = storage
        self._txn = txn
        self._writers: dict[int, _LmdbStateWriter] = {}
        self._log = storage._wal.writer()
        self._open = True
        self._journaled = False

    def state(self, group: int) -> StateWriter:
        w = self._writers.get(group)
        if w is None:
            if not self._open:
                raise RuntimeError("batch is closed")
            if not 0 <= group <= _MAX_GROUP:
                raise ValueError(f"group id {group} out of range")
            try:
                w = _LmdbStateWriter(
                    self._storage._env, self._txn, self._storage._dbs, group, nested=not self._storage.writemap
                )
            except lmdb.Error as e:
                raise _fault(e) from e
            self._writers[group] = w
        return w

    @property
    def log(self) -> WalBatch:
        return self._log

    def _close(self) -> None:
        self._open = False
        self._writers.clear()
        self._storage._batch = None

    def commit_journal(self) -> None:
        """Write the journal frame, sync it and publish it (readers of the
        log see it); the state transaction stays open until :meth:`commit`.
        So acknowledgements wait for one ``pwrite`` and one ``fdatasync``,
        not for the state's page writes too."""
        if not self._open or self._journaled:
            raise RuntimeError("batch is closed" if not self._open else "journal already committed")
        self._journaled = True
        wal = self._storage._wal
        try:
            if self._log.write():
                wal.sync()
                wal.publish()
        except BaseException:
            # The node stops (StorageFault).  A frame written but not synced
            # is like any write a crash interrupts: at most unacknowledged.
            self._txn.abort()
            self._log.discard()
            self._close()
            raise

    def commit(self) -> None:
        """The journal first (:meth:`commit_journal`, unless done), then the
        state (not synced: see LmdbStorage).  The journal is never behind the
        state, and a process crash loses neither (both are in the page cache
        once written)."""
        if not self._open:
            raise RuntimeError("batch is closed")
        if not self._journaled:
            self.commit_journal()
        try:
            for w in self._writers.values():
                w._flush()
            self._txn.commit()
        except BaseException as e:
            # Whatever failed, release the write lock: a transaction left open
            # would block every later batch.  (abort after a failed commit is
            # a no-op.)
            self._txn.abort()
            if isinstance(e, lmdb.Error):
                raise _fault(e) from e
            raise
        finally:
            self._close()

    def abort(self) -> None:
        if self._open:
            self._txn.abort()
            self._log.discard()
            self._close()


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def read_boot_id(path: str = BOOT_ID_PATH) -> str:
    """This boot of the machine (Linux), or "" if unknown (then every
    unclean stop counts as a machine crash)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


class LmdbStorage:
    """Storage of every group on this node: the state in one LMDB
    environment, the Raft journal in a write-ahead log beside it
    (:mod:`.wal`, in ``<path>/wal``).

    Durability: ``commit`` makes the journal durable (one ``fdatasync``) and
    the state visible, but does not sync the state: it is derived from the
    journal (apply is idempotent by index) and each group's snapshot file.
    LMDB without syncs keeps its integrity across a *process* crash (the page
    cache survives), but a *machine* crash can tear it.  So the state is
    trusted at open only if the node shut down cleanly (``state.clean``,
    written after a final sync) or the machine has not restarted since the
    node last wrote it (``state.boot`` holds the boot id of that time);
    otherwise it is deleted and rebuilt from the snapshots and the journal as
    the groups start (``rebuilt`` is then True, and a warning says so).  A
    thread syncs the state every SYNC_EVERY_S, so a failed write-back (a
    failing disk) stops the node at its next batch instead of being read
    back after a restart in the same boot.  A data directory of before
    session 9 keeps its journal in LMDB: it moves into the log at the first
    open, before any boot is recorded (so the only copy of the journal is
    never taken for a torn state); going back to an older version after
    that is not supported.

    ``fsync=False`` (benchmarks only): the journal is never synced either; a
    machine crash may lose acknowledged entries.  ``writemap``: see the
    module docstring (on by default; off for filesystems without sparse
    files).  ``boot_id``: reads this
    boot's id (tests pass their own to play a machine restart).
    ``wal_segment_bytes``: see :data:`cachenode.storage.wal.SEGMENT_BYTES`.
    ``wal_class`` and ``migrate_frame_bytes``: the write-ahead log's class
    and the frame size of the legacy journal's move into it (tests pass a
    subclass that dies half way, and small frames).
    ``compact_at_open_bytes``: see :data:`COMPACT_AT_OPEN_BYTES` (0: never).
    Open one ``LmdbStorage`` per path per process."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        map_size: int = DEFAULT_MAP_SIZE,
        fsync: bool = True,
        max_readers: int = 1024,
        boot_id: Callable[[], str] = read_boot_id,
        wal_segment_bytes: int = SEGMENT_BYTES,
        writemap: bool = True,
        wal_class: type[WriteAheadLog] = WriteAheadLog,
        migrate_frame_bytes: int = MIGRATE_FRAME_BYTES,
        compact_at_open_bytes: int = COMPACT_AT_OPEN_BYTES,
    ) -> None:
        self.path = os.fspath(path)
        self._migrate_frame_bytes = migrate_frame_bytes
        self.fsync = fsync
        self.writemap = writemap
        self.rebuilt = False
        os.makedirs(self.path, exist_ok=True)
        self._wal = wal_class(os.path.join(self.path, "wal"), fsync=fsync, segment_bytes=wal_segment_bytes)
        self._sync_error: str | None = None
        self._stop_sync = threading.Event()
        try:
            boot = boot_id()
            self._trust_state(boot)

            def open_env() -> lmdb.Environment:
                return lmdb.open(
                    self.path,
                    map_size=map_size,
                    subdir=True,
                    create=True,
                    sync=False,
                    metasync=False,
                    writemap=writemap,
                    lock=True,
                    max_readers=max_readers,
                    max_dbs=8,
                )

            self._env = open_env()
            self._dbs = _Dbs(self._env)
            self._batch: _LmdbBatch | None = None
            self._migrate_journal()
            self.compacted_bytes = self._compact_if_mostly_free(compact_at_open_bytes, open_env)
            self._record_boot(boot)
        except lmdb.Error as e:
            self._wal.close()
            raise _fault(e) from e
        except OSError as os_err:
            self._wal.close()
            raise StorageFault(f"cannot open the state in {self.path}: {os_err}") from os_err
        self._syncer = threading.Thread(target=self._sync_loop, name="lmdb-sync", daemon=True)
        self._syncer.start()

    def _trust_state(self, boot: str) -> None:
        """Decide whether the LMDB state survived (see the class docstring),
        and delete it if not.  Writes nothing else."""
        clean = os.path.exists(os.path.join(self.path, _CLEAN))
        try:
            with open(os.path.join(self.path, _BOOT)) as f:
                last_boot: str | None = f.read().strip()
        except FileNotFoundError:
            # Never written without syncs: a new node, or one of before
            # session 9 (whose journal is still in LMDB until it has moved).
            last_boot = None
        data = os.path.join(self.path, "data.mdb")
        torn = os.path.exists(os.path.join(self.path, _TORN))
        if os.path.exists(data) and (torn or (not clean and last_boot is not None and (last_boot != boot or not boot))):
            log.warning(
                "%s: the state may be torn, so it is rebuilt from the snapshots and the journal",
                "a sync of the state failed before" if torn else
                "the machine restarted since this node last wrote its state without a clean shutdown",
            )
            for name in ("data.mdb", "lock.mdb"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))
            self.rebuilt = True
        if torn:
            os.unlink(os.path.join(self.path, _TORN))

    def _compact_if_mostly_free(self, limit: int, open_env: Callable[[], lmdb.Environment]) -> int:
        """At open, before the first batch: when at least ``limit`` bytes and
        half of the state's file are free pages, copy the state without them
        and put the copy in its place; returns the bytes given back (0: not
        done).  LMDB reuses the pages that deletes and deleted replicas free,
        but never gives them back to the filesystem, so a node the placement
        driver emptied because its disk was below the reserve stayed there;
        a restart now gives that disk back.

        Crash safety: the copy (one read transaction: the state as last
        committed) is synced before it replaces the file, and the state's
        marks (``state.clean``, ``state.boot``) are untouched, so a crash
        leaves either file, each whole.  A copy that fails (no room for
        it, say) is deleted and the state opened as it is."""
        copy = os.path.join(self.path, "data.mdb" + _COMPACT_SUFFIX)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy)  # a copy a crash cut short
        if limit <= 0:
            return 0
        env = self._env
        main = env.stat()
        psize = int(main["psize"])
        used = 2 + _pages(main)  # the two meta pages, the main database (it names the others)
        with env.begin() as txn:
            used += sum(_pages(txn.stat(db)) for db in self._dbs.all)
        size = (int(env.info()["last_pgno"]) + 1) * psize
        free = size - used * psize
        if free < limit or 2 * free < size:
            return 0
        started = time.monotonic()
        try:
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                env.copyfd(fd, compact=True)
                os.fsync(fd)
            finally:
                os.close(fd)
        except (OSError, lmdb.Error) as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy)
            log.warning("could not compact the state's file in %s (%s free of %s): %s; it is used as it is",
                        self.path, show_size(free), show_size(size), e)
            return 0
        env.close()
        os.replace(copy, os.path.join(self.path, "data.mdb"))
        fsync_dir(self.path)
        self._env = open_env()
        self._dbs = _Dbs(self._env)
        log.info("compacted the state's file in %s: %s of free pages given back to the disk, %s kept (%.1f s)",
                 self.path, show_size(free), show_size(size - free), time.monotonic() - started)
        return free

    def _record_boot(self, boot: str) -> None:
        """From here on the state is written without syncs: drop the clean
        mark and record this boot, both durably, before the first batch."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, _CLEAN))
        write_durably(os.path.join(self.path, _BOOT), boot + "\n")  # its directory sync covers the unlink too

    def _migrate_journal(self) -> None:
        """Move a journal kept in LMDB (nodes of before session 9) into the
        write-ahead log: each group's log there is cleared, then filled
        from LMDB, in frames of at most ``migrate_frame_bytes``, each synced;
        then the LMDB copy is deleted and LMDB synced.  A crash anywhere in
        between redoes it (the copy is authoritative and complete each
        time).  Until it is done no boot is recorded, so a machine restart
        meanwhile never makes the state (which holds the journal) count as
        torn."""
        with self._env.begin() as txn:
            legacy = txn.cursor(db=self._dbs.log).first() or txn.cursor(db=self._dbs.logmeta).first()
        if not legacy:
            return
        wb = self._wal.writer()
        n = 0
        cleared: set[int] = set()

        def flush_if(full: bool) -> None:
            nonlocal wb
            if (full or len(wb) >= self._migrate_frame_bytes) and wb.write():
                self._wal.sync()
                self._wal.publish()
                wb = self._wal.writer()

        def group(k: bytes) -> int:
            """The group of a legacy key; its log is cleared at its first key."""
            g: int = _U32.unpack_from(k)[0]
            if g not in cleared:
                cleared.add(g)
                wb.clear(g)
                wb.clear_meta(g)
            return g

        with self._env.begin() as txn:
            for k, v in txn.cursor(db=self._dbs.logmeta):
                wb.set_meta(group(k), k[4:].decode(), v)
            for k, v in txn.cursor(db=self._dbs.log):
                wb.append(group(k), _U64.unpack_from(k, 4)[0], _U64.unpack_from(v)[0], v[8:])
                n += 1
                flush_if(False)
        flush_if(True)
        try:
            with self._env.begin(write=True) as txn:
                txn.drop(self._dbs.log, delete=False)
                txn.drop(self._dbs.logmeta, delete=False)
            self._env.sync(True)
        except lmdb.Error as e:
            raise _fault(e) from e
        log.info("moved the Raft journal (%d entries of %d groups) from LMDB into the write-ahead log", n, len(cleared))

    def _sync_loop(self) -> None:
        """Every SYNC_EVERY_S: sync the state, so a failed write-back of
        its pages (a failing disk) is noticed (the next batch fails) rather
        than read back torn after a restart in the same boot."""
        while not self._stop_sync.wait(SYNC_EVERY_S):
            try:
                self._env.sync(True)
            except lmdb.Error as e:
                self._state_torn(f"{type(e).__name__}: {e}")
                return

    def _state_torn(self, why: str) -> None:
        """The state could not be written back: refuse further batches, and
        make the next open rebuild it (its pages on disk may be stale even
        if the machine does not restart)."""
        self._sync_error = why
        log.error("the state could not be written back to disk (%s); the node stops, and rebuilds "
                  "its state from the snapshots and the journal when restarted", why)
        try:
            write_durably(os.path.join(self.path, _TORN), why + "\n")
        except OSError as e:
            log.error("could not mark the state torn either (%s): restart only after checking the disk", e)

    def begin(self) -> _LmdbBatch:
        if self._batch is not None:
            raise RuntimeError("a batch is already open (one batch at a time, driver thread only)")
        if self._sync_error is not None:
            raise StorageFault(f"the state could not be written back to disk ({self._sync_error}); check the disk")
        try:
            txn = self._env.begin(write=True)
        except lmdb.Error as e:
            raise _fault(e) from e
        self._batch = _LmdbBatch(self, txn)
        return self._batch

    def reader(self, group: int) -> StateReader:
        return _LmdbStateReader(self._env, self._dbs, group)

    @contextlib.contextmanager
    def view(self, group: int) -> Iterator[StateReader]:
        try:
            txn = self._env.begin()
        except lmdb.Error as e:
            raise _fault(e) from e
        try:
            yield _LmdbView(txn, self._dbs, group)
        finally:
            txn.abort()

    def load_log(self, group: int) -> list[tuple[bytes, int, int]]:
        return self._wal.load_log(group)

    def log_sizes(self, group: int) -> list[tuple[int, int, int]]:
        return self._wal.log_sizes(group)

    def log_entries(self, group: int, first: int, last: int) -> list[tuple[bytes, int, int]]:
        return self._wal.log_entries(group, first, last)

    def load_log_meta(self, group: int) -> dict[str, bytes]:
        return self._wal.load_log_meta(group)

    def journal_stats(self) -> dict[str, int]:
        """The write-ahead log's segments and bytes (for status and tests)."""
        return self._wal.stats()

    def set_short_of_disk(self, short: bool) -> None:
        self._wal.thrifty = short

    def groups(self) -> set[int]:
        out: set[int] = self._wal.groups()
        with self._env.begin() as txn:
            for db in self._dbs.state:
                cur = txn.cursor(db=db)
                ok = cur.first()
                while ok:
                    (g,) = _U32.unpack_from(cur.key())
                    out.add(g)
                    if g == _MAX_GROUP:
                        break
                    ok = cur.set_range(_U32.pack(g + 1))  # skip the rest of g
        return out

    def close(self, clean: bool = True) -> None:
        """Abort an open batch, close the journal, sync the state and mark
        the shutdown clean (so the next open trusts the state even in
        another boot).  ``clean=False``: the caller may still write (a
        driver that did not stop): no mark."""
        self._stop_sync.set()
        if self._syncer.is_alive():
            self._syncer.join()
        if self._batch is not None:
            self._batch.abort()
        self._wal.close()
        if not clean or self._sync_error is not None:
            self._env.close()
            return
        try:
            self._env.sync(True)
            write_durably(os.path.join(self.path, _CLEAN), "")
        except (lmdb.Error, OSError) as e:
            log.warning("could not mark a clean shutdown (the state will be rebuilt at the next start "
                        "if the machine restarts meanwhile): %s", e)
        self._env.close()

    def __enter__(self) -> LmdbStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
