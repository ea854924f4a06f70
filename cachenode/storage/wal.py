"""WriteAheadLog: the Raft journal of every group of a node, in segment files.

Why a log of our own (until session 9 the journal lived in LMDB beside the
state): an LMDB commit syncs twice (the data pages, then the meta page) and
writes every dirty B-tree page on its own (about 30 ``pwrite`` calls per
driver iteration under writes).  Measured on the reference machine with one
client writing (3 nodes, 16 shards): an LMDB commit took 0.6 ms at the
median, one ``fdatasync`` of an append to a preallocated file 0.27 ms, and
the single-client p50 write went from 2.56 to 2.17 ms; 32 writes in flight
went from 1,617 to 1,946 ops/s.  The state stays in LMDB, committed without
syncing (see :mod:`.lmdb_store`: it is rebuilt from snapshots and this log
when a machine crash may have torn it).

Files (in one directory)::

    <seq:016x>.wal     segments, in sequence order; each preallocated
                       (``posix_fallocate``) to ``segment_bytes`` or more

    segment  = header | frame* | zeros
    header   = b"CNWAL1\\0\\0" | BE8 seq | BE8 sealed_end (0 while open) | u8 closed cleanly
    frame    = b"CNwf" | BE4 body length | BE4 crc32(body) | body
    body     = record*
    record   = u8 type | fields (big-endian):
        APPEND      1  BE4 group, BE8 index, BE8 term, BE4 n, n bytes command
        DEL_FROM    2  BE4 group, BE8 index      (entries >= index)
        DEL_BEFORE  3  BE4 group, BE8 index      (entries <  index)
        CLEAR       4  BE4 group                 (every entry; meta stays)
        META        5  BE4 group, u8 n, n bytes name, BE4 m, m bytes value
        CLEAR_META  6  BE4 group

One frame per storage batch (one driver iteration): written with one
``pwrite`` and made durable with one ``fdatasync``.  Replaying every
segment's frames in order rebuilds each group's journal and meta.

Crash safety:

* A frame counts only if its magic, length and CRC hold.  Each frame is
  synced before the next one is written, so a crash can tear only the last
  frame of the segment that was current: nothing after it was ever synced,
  so nothing acknowledged is lost by ignoring it.  A bad frame that a valid
  frame follows is therefore not a torn write but corruption of synced
  (maybe acknowledged) entries, and so is any bad frame in a sealed
  segment (``sealed_end`` in its header): the log refuses to open
  (``StorageFault``) rather than silently drop them.
* A run that ends cleanly seals its segment and marks it closed; the next
  run appends to it.  After a crash the next run seals the last segment at
  its valid end and starts a new one, so no frame is ever written after a
  torn one.  A new segment is created under a temporary name, preallocated,
  given its header, synced and only then renamed into place: a crash never
  leaves a segment without a header.
* A short ``pwrite`` (a full disk, a write over 2 GiB) is finished or
  fails the batch (``StorageFault``); it is never published.
* Each new segment starts with a frame of every group's meta (term, vote,
  commit hint), so an older segment never holds the only copy of a meta
  value.

Space: a segment is deleted once it and every older segment hold no live
entry (oldest first, so a deletion record is never dropped while an entry it
deleted survives in an older file; if a deletion fails, nothing newer is
deleted).  A group that stays idle would pin the oldest segment forever, so
once at least two sealed segments exist and the oldest holds at most a
quarter of a segment of live entries, or the log holds more than twice its
live bytes plus four segments, a batch copies the oldest segment's live
entries forward (``REWRITE_BYTES`` per batch at most): replaying the copy
replaces the original, and the old file can go.  While the node is short of
disk (:attr:`WriteAheadLog.thrifty`), one sealed segment is enough, and a
batch with nothing of its own copies too, as long as the copy fits in the
current segment.

Threads: one writer, the storage's batch owner (the Raft driver thread):
:meth:`WriteAheadLog.writer`, :meth:`WalBatch.write`, :meth:`sync`,
:meth:`publish`.  The readers (``load_log``, ``log_sizes``, ``log_entries``,
``load_log_meta``, ``groups``) may run on any thread and see published
(committed) frames only; they share one lock with publication and deletion.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable

from mypy_extensions import mypyc_attr

from .base import StorageFault

__all__ = ["WriteAheadLog", "WalBatch", "SEGMENT_BYTES", "fsync_dir", "write_durably"]

log = logging.getLogger(__name__)

SEGMENT_BYTES = 16 << 20
"""Default segment size (a batch larger than that gets a segment of its own size)."""
REWRITE_BYTES = 1 << 20
"""Live entries copied forward out of the oldest segment per batch, at most."""
REWRITE_EVERY_S = 0.5
"""How often a batch checks whether the oldest segment should be copied forward."""
THRIFTY_SLACK_BYTES = 64 * 1024
"""A thrifty log copies a segment's live entries forward only while they fit,
with this much to spare (an eighth of a segment if less), in the room
already allocated to the current segment: starting a new one would take
disk the node is short of."""

_MAGIC = b"CNWAL1\0\0"
_HEADER = struct.Struct(">8sQQB")  # magic, seq, sealed_end, closed cleanly
_HEADER_LEN = _HEADER.size
_FRAME_MAGIC = b"CNwf"
_FRAME = struct.Struct(">4sII")  # frame magic, body length, crc32(body)
_APPEND = struct.Struct(">BIQQI")
_IDX = struct.Struct(">BIQ")
_GROUP = struct.Struct(">BI")
_META = struct.Struct(">BIB")
_U32 = struct.Struct(">I")
_MAX_FRAME = 0xFFFF_FFFF

APPEND, DEL_FROM, DEL_BEFORE, CLEAR, META, CLEAR_META = 1, 2, 3, 4, 5, 6
_NAME = re.compile(r"^[0-9a-f]{16}\.wal$")
_TMP = ".tmp"

Loc = tuple[int, int, int, int]
"""(term, segment seq, offset of the command in the segment, command size)."""


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` (Linux moves at most 2 GiB per call, and a
    full disk may write part): OSError if it cannot."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes at offset {offset}")
        view = view[n:]
        offset += n


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """Read ``size`` bytes (or fewer at the end of the file), in calls of at
    most 1 GiB."""
    parts = []
    while size > 0:
        chunk = os.pread(fd, min(size, 1 << 30), offset)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def fsync_dir(path: str) -> None:
    """fsync a directory (so a file created, renamed or deleted in it stays so)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, text: str) -> None:
    """Replace the small file ``path`` with ``text`` atomically and durably:
    write a temporary file, fsync it, rename it over ``path``, fsync the
    directory.  OSError if the disk refuses."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def _valid_frame_after(data: bytes, pos: int) -> bool:
    """Whether a valid frame starts anywhere after ``pos`` in ``data``."""
    at = data.find(_FRAME_MAGIC, pos + 1)
    while at >= 0:
        if at + _FRAME.size <= len(data):
            _, n, crc = _FRAME.unpack_from(data, at)
            body_at = at + _FRAME.size
            if body_at + n <= len(data) and zlib.crc32(memoryview(data)[body_at:body_at + n]) == crc:
                return True
        at = data.find(_FRAME_MAGIC, at + 1)
    return False


class _GroupLog:
    """One group's journal index and meta (published state)."""

    __slots__ = ("idxs", "locs", "meta")

    def __init__(self) -> None:
        self.idxs: list[int] = []  # ascending
        self.locs: dict[int, Loc] = {}
        self.meta: dict[str, bytes] = {}


class _Segment:
    __slots__ = ("seq", "path", "fd", "size", "end", "sealed", "live", "entries", "groups")

    def __init__(self, seq: int, path: str, fd: int, size: int, end: int, sealed: bool) -> None:
        self.seq = seq
        self.path = path
        self.fd = fd
        self.size = size  # allocated bytes
        self.end = end  # first byte after the last frame
        self.sealed = sealed
        self.live = 0  # bytes of live commands stored here
        self.entries = 0  # live entries stored here (commands may be empty)
        self.groups: set[int] = set()  # groups that appended here (a superset of those with live entries)


class WalBatch:
    """The journal writes of one storage batch, buffered until commit.

    Driver thread only.  Nothing is visible to readers before
    :meth:`WriteAheadLog.publish`."""

    __slots__ = ("_wal", "_body", "_ops", "_open")

    def __init__(self, wal: WriteAheadLog) -> None:
        self._wal = wal
        self._body = bytearray()
        # (type, group, index, term, position of the command in the body, size, name, value)
        self._ops: list[tuple[int, int, int, int, int, int, str, bytes]] = []
        self._open = True

    def __len__(self) -> int:
        return len(self._body)

    def append(self, group: int, index: int, term: int, command: bytes) -> None:
        body = self._body
        body += _APPEND.pack(APPEND, group, index, term, len(command))
        self._ops.append((APPEND, group, index, term, len(body), len(command), "", b""))
        body += command

    def delete_from(self, group: int, index: int) -> None:
        self._body += _IDX.pack(DEL_FROM, group, index)
        self._ops.append((DEL_FROM, group, index, 0, 0, 0, "", b""))

    def delete_before(self, group: int, index: int) -> None:
        self._body += _IDX.pack(DEL_BEFORE, group, index)
        self._ops.append((DEL_BEFORE, group, index, 0, 0, 0, "", b""))

    def clear(self, group: int) -> None:
        self._body += _GROUP.pack(CLEAR, group)
        self._ops.append((CLEAR, group, 0, 0, 0, 0, "", b""))

    def set_meta(self, group: int, name: str, value: bytes) -> None:
        n = name.encode()
        if len(n) > 255:
            raise ValueError(f"meta name of {len(n)} bytes is longer than 255")
        self._body += _META.pack(META, group, len(n)) + n + _U32.pack(len(value)) + value
        self._ops.append((META, group, 0, 0, 0, 0, name, bytes(value)))

    def clear_meta(self, group: int) -> None:
        self._body += _GROUP.pack(CLEAR_META, group)
        self._ops.append((CLEAR_META, group, 0, 0, 0, 0, "", b""))

    def write(self) -> bool:
        """Write the batch's frame (one ``pwrite``; not yet durable).  False
        if the batch holds nothing.  Then :meth:`WriteAheadLog.sync` and
        :meth:`WriteAheadLog.publish`, in that order."""
        if not self._open:
            raise RuntimeError("WAL batch is closed")
        if self._body or self._wal.thrifty:
            rw = self._wal._rewrites()
            if rw is not None:
                self._prepend(rw)
        if not self._body:
            return False
        self._wal._write_frame(self)
        return True

    def _prepend(self, first: WalBatch) -> None:
        """Put ``first``'s records before this batch's own (copies forward
        must replay before this batch's deletions, or a copy would bring a
        deleted entry back)."""
        shift = len(first._body)
        self._ops = first._ops + [
            (k, g, i, t, pos + shift if k == APPEND else pos, n, name, v) for k, g, i, t, pos, n, name, v in self._ops
        ]
        self._body = first._body + self._body

    def discard(self) -> None:
        self._open = False
        self._body = bytearray()
        self._ops = []


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it to die half way
class WriteAheadLog:
    """The journal of every group on a node: see the module docstring.

    ``fsync=False`` (benchmarks only) never syncs: a machine crash may lose
    acknowledged entries.  ``segment_bytes``: see :data:`SEGMENT_BYTES`
    (tests pass small ones to exercise rotation and clean-up).
    ``monotonic``: the clock of REWRITE_EVERY_S (tests pass a fake)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        fsync: bool = True,
        segment_bytes: int = SEGMENT_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dir = os.fspath(directory)
        self.fsync = fsync
        self.segment_bytes = max(segment_bytes, 4096)
        self._now = monotonic
        self._lock = threading.Lock()
        self._groups: dict[int, _GroupLog] = {}
        self._segments: list[_Segment] = []
        self._by_seq: dict[int, _Segment] = {}
        self.thrifty = False
        """True while the node is short of disk (``LmdbStorage.set_short_of_disk``,
        any thread): the oldest segment, once sealed and mostly dead, is
        copied forward without waiting for a second sealed segment, also by
        a batch that writes nothing else (the host opens one every second
        then), so that a few live entries of an idle group do not keep 16
        MiB of disk; only while the copy fits in the current segment's
        allocated room (THRIFTY_SLACK_BYTES)."""
        self._pending: WalBatch | None = None  # written, not yet published
        self._pending_at: tuple[_Segment, int] | None = None
        self._next_rewrite = 0.0
        self.rewritten_bytes = 0
        self.deleted_segments = 0
        self.torn_frames = 0
        os.makedirs(self.dir, exist_ok=True)
        try:
            if self._recover():
                self._reopen(self._segments[-1])
            else:
                self._start_segment(0)
            self._collect()
        except OSError as e:
            raise StorageFault(f"cannot open the journal in {self.dir}: {e}") from e

    # ---- any thread -------------------------------------------------------

    def load_log(self, group: int) -> list[tuple[bytes, int, int]]:
        with self._lock:
            g = self._groups.get(group)
            if g is None:
                return []
            return [(self._read(g.locs[i]), i, g.locs[i][0]) for i in g.idxs]

    def log_sizes(self, group: int) -> list[tuple[int, int, int]]:
        with self._lock:
            g = self._groups.get(group)
            if g is None:
                return []
            return [(i, g.locs[i][0], g.locs[i][3]) for i in g.idxs]

    def log_entries(self, group: int, first: int, last: int) -> list[tuple[bytes, int, int]]:
        with self._lock:
            g = self._groups.get(group)
            if g is None or first > last:
                return []
            lo = bisect.bisect_left(g.idxs, first)
            hi = bisect.bisect_right(g.idxs, last)
            return [(self._read(g.locs[i]), i, g.locs[i][0]) for i in g.idxs[lo:hi]]

    def load_log_meta(self, group: int) -> dict[str, bytes]:
        with self._lock:
            g = self._groups.get(group)
            return dict(g.meta) if g is not None else {}

    def groups(self) -> set[int]:
        """Groups with any entry or meta value."""
        with self._lock:
            return {gid for gid, g in self._groups.items() if g.idxs or g.meta}

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "segments": len(self._segments),
                "bytes": sum(s.end for s in self._segments),
                "live_bytes": sum(s.live for s in self._segments),
                "live_entries": sum(s.entries for s in self._segments),
                "rewritten_bytes": self.rewritten_bytes,
                "deleted_segments": self.deleted_segments,
            }

    # ---- the writer (driver thread) ---------------------------------------

    def writer(self) -> WalBatch:
        return WalBatch(self)

    def sync(self) -> None:
        """Make every written frame durable (``fdatasync`` of the current segment)."""
        if self.fsync and self._pending_at is not None:
            try:
                os.fdatasync(self._pending_at[0].fd)
            except OSError as e:
                raise StorageFault(f"journal sync failed: {e}") from e

    def publish(self) -> None:
        """Apply the written batch to the index (readers see it from now on),
        then delete segments nothing refers to any more.  After :meth:`sync`."""
        b, at = self._pending, self._pending_at
        self._pending = self._pending_at = None
        if b is None or at is None:
            return
        seg, base = at
        with self._lock:
            for op in b._ops:
                self._apply(op, seg, base)
        b.discard()
        self._collect()

    def close(self) -> None:
        """Seal the current segment and close every file (clean shutdown)."""
        with self._lock:
            segs, self._segments = self._segments, []
            self._by_seq = {}
        if segs and not segs[-1].sealed:
            try:
                self._seal(segs[-1], clean=True)
            except OSError as e:
                log.warning("could not seal journal segment %s: %s", segs[-1].path, e)
        for s in segs:
            os.close(s.fd)

    # ---- internals: writing -------------------------------------------------

    def _write_frame(self, b: WalBatch) -> None:
        if self._pending is not None:
            raise RuntimeError("the previous WAL batch was written but not published")
        body = b._body
        if len(body) > _MAX_FRAME:
            raise StorageFault(f"a journal batch of {len(body)} bytes is larger than a frame can hold")
        head = _FRAME.pack(_FRAME_MAGIC, len(body), zlib.crc32(body))
        seg = self._segments[-1]
        try:
            if seg.end + len(head) + len(body) > seg.size:
                self._seal(seg)
                seg = self._start_segment(len(head) + len(body))
            _pwrite_all(seg.fd, head + body, seg.end)
        except OSError as e:
            raise StorageFault(f"journal write failed: {e}; check the disk (space, errors) and restart the node") from e
        self._pending = b
        self._pending_at = (seg, seg.end + _FRAME.size)
        seg.end += len(head) + len(body)

    def _start_segment(self, need: int) -> _Segment:
        """Create, preallocate and (durably) name the next segment; it starts
        with a frame of every group's meta.  Created under a temporary name
        and renamed once complete, so a crash never leaves a segment without
        its header.  OSError if the disk refuses."""
        seq = self._segments[-1].seq + 1 if self._segments else 1
        path = os.path.join(self.dir, f"{seq:016x}.wal")
        meta = WalBatch(self)
        with self._lock:
            for gid, g in sorted(self._groups.items()):
                for name, value in g.meta.items():
                    meta.set_meta(gid, name, value)
        body = bytes(meta._body)
        first = _FRAME.pack(_FRAME_MAGIC, len(body), zlib.crc32(body)) + body if body else b""
        size = max(self.segment_bytes, _HEADER_LEN + len(first) + need + 4096)
        tmp = path + _TMP
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
            _pwrite_all(fd, _HEADER.pack(_MAGIC, seq, 0, 0) + first, 0)
            if self.fsync:
                os.fsync(fd)
            os.rename(tmp, path)
            if self.fsync:
                fsync_dir(self.dir)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        seg = _Segment(seq, path, fd, size, _HEADER_LEN + len(first), sealed=False)
        with self._lock:
            self._segments.append(seg)
            self._by_seq[seq] = seg
        return seg

    def _seal(self, seg: _Segment, clean: bool = False) -> None:
        _pwrite_all(seg.fd, _HEADER.pack(_MAGIC, seg.seq, seg.end, int(clean)), 0)
        if self.fsync:
            os.fdatasync(seg.fd)
        seg.sealed = True

    def _reopen(self, seg: _Segment) -> None:
        """Go on writing in ``seg``, which the previous run closed cleanly."""
        _pwrite_all(seg.fd, _HEADER.pack(_MAGIC, seg.seq, 0, 0), 0)
        if self.fsync:
            os.fdatasync(seg.fd)
        seg.sealed = False

    def _rewrites(self) -> WalBatch | None:
        """Copies of the oldest segment's live entries, when it is mostly
        dead and other segments wait behind it (see the module docstring);
        at most REWRITE_BYTES, checked every REWRITE_EVERY_S.  Only ever
        added to a batch that writes anyway, unless :attr:`thrifty`: an idle
        node's journal does not grow."""
        now = self._now()
        if now < self._next_rewrite:
            return None
        self._next_rewrite = now + REWRITE_EVERY_S
        if sum(1 for s in self._segments if s.sealed) < (1 if self.thrifty else 2):
            return None
        old = self._segments[0]
        if not old.sealed or old.entries == 0:
            return None
        if self.thrifty:
            cur = self._segments[-1]
            if old.live + min(THRIFTY_SLACK_BYTES, self.segment_bytes // 8) > cur.size - cur.end:
                return None  # the copy would start a new segment: disk the node is short of
        if old.live > self.segment_bytes // 4:
            total = sum(s.end for s in self._segments)
            live = sum(s.live for s in self._segments)
            if total <= 2 * live + 4 * self.segment_bytes:
                return None  # mostly live, and the log is not much larger than what it holds
        rw = WalBatch(self)
        budget = REWRITE_BYTES
        with self._lock:
            for gid in sorted(old.groups):
                g = self._groups.get(gid)
                if g is None:
                    continue
                for i in g.idxs:
                    loc = g.locs[i]
                    if loc[1] != old.seq:
                        continue
                    rw.append(gid, i, loc[0], self._read(loc))
                    budget -= loc[3]
                    self.rewritten_bytes += loc[3]
                    if budget <= 0:
                        return rw
        return rw if rw._body else None

    # ---- internals: the index (under self._lock) ----------------------------

    def _read(self, loc: Loc) -> bytes:
        seg = self._by_seq.get(loc[1])
        if seg is None:
            raise LookupError(f"journal segment {loc[1]} is gone")
        data = os.pread(seg.fd, loc[3], loc[2])
        if len(data) != loc[3]:
            raise StorageFault(f"journal segment {seg.path} is shorter than its index says")
        return data

    def _group(self, gid: int) -> _GroupLog:
        g = self._groups.get(gid)
        if g is None:
            g = self._groups[gid] = _GroupLog()
        return g

    def _drop(self, g: _GroupLog, idxs: Iterable[int]) -> None:
        for i in idxs:
            loc = g.locs.pop(i)
            seg = self._by_seq.get(loc[1])
            if seg is not None:
                seg.live -= loc[3]
                seg.entries -= 1

    def _apply(self, op: tuple[int, int, int, int, int, int, str, bytes], seg: _Segment, base: int) -> None:
        kind, gid, index, term, pos, size, name, value = op
        if kind == APPEND:
            ga = self._group(gid)
            idxs = ga.idxs
            if not idxs or index > idxs[-1]:
                idxs.append(index)
            elif index in ga.locs:
                self._drop(ga, (index,))
            else:
                bisect.insort(idxs, index)
            ga.locs[index] = (term, seg.seq, base + pos, size)
            seg.live += size
            seg.entries += 1
            seg.groups.add(gid)
            return
        g = self._groups.get(gid)
        if g is None:
            if kind == META:
                self._group(gid).meta[name] = value
            return
        if kind == DEL_FROM:
            k = bisect.bisect_left(g.idxs, index)
            self._drop(g, g.idxs[k:])
            del g.idxs[k:]
        elif kind == DEL_BEFORE:
            k = bisect.bisect_left(g.idxs, index)
            self._drop(g, g.idxs[:k])
            del g.idxs[:k]
        elif kind == CLEAR:
            self._drop(g, g.idxs)
            g.idxs = []
        elif kind == META:
            g.meta[name] = value
        elif kind == CLEAR_META:
            g.meta = {}
        if not g.idxs and not g.meta:
            del self._groups[gid]

    def _collect(self) -> None:
        """Delete the oldest segments while none of them holds a live entry."""
        while len(self._segments) > 1 and self._segments[0].sealed and self._segments[0].entries == 0:
            seg = self._segments[0]
            try:
                os.unlink(seg.path)
            except OSError as e:
                # Keep it, and everything newer: a newer segment may hold the
                # deletions of this one's entries.
                log.warning("could not delete journal segment %s (will retry): %s", seg.path, e)
                return
            with self._lock:
                self._segments.pop(0)
                del self._by_seq[seg.seq]
            os.close(seg.fd)
            self.deleted_segments += 1

    # ---- internals: recovery ------------------------------------------------

    def _recover(self) -> bool:
        """Replay every segment; True if the last one was closed cleanly
        (then this run goes on writing in it)."""
        for name in os.listdir(self.dir):
            if name.endswith(_TMP):  # a segment whose creation a crash cut short: it held nothing yet
                os.unlink(os.path.join(self.dir, name))
        names = sorted(n for n in os.listdir(self.dir) if _NAME.match(n))
        clean = False
        for name in names:
            path = os.path.join(self.dir, name)
            fd = os.open(path, os.O_RDWR)
            try:
                seg, clean = self._replay(fd, path, int(name[:16], 16))
            except BaseException:
                os.close(fd)
                raise
            self._segments.append(seg)
            self._by_seq[seg.seq] = seg
        for seg in self._segments[:-1]:
            if not seg.sealed:  # a crashed run's last segment (a later run started after it)
                self._seal(seg)
        if self._segments and not self._segments[-1].sealed:
            self._seal(self._segments[-1])  # the crashed run's: seal it at its valid end, start anew
            return False
        return clean and self._segments[-1].end < self._segments[-1].size

    def _replay(self, fd: int, path: str, seq: int) -> tuple[_Segment, bool]:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _HEADER_LEN, 0)
        if len(head) != _HEADER_LEN:
            raise StorageFault(f"journal segment {path} has no header ({size} bytes); the journal is damaged")
        magic, hseq, sealed_end, clean = _HEADER.unpack(head)
        if magic != _MAGIC or hseq != seq:
            raise StorageFault(f"{path} is not journal segment {seq} (bad header); the journal is damaged")
        seg = _Segment(seq, path, fd, size, _HEADER_LEN, sealed=sealed_end != 0)
        self._by_seq[seq] = seg
        limit = sealed_end if sealed_end else size
        data = _pread_all(fd, limit - _HEADER_LEN, _HEADER_LEN) if limit > _HEADER_LEN else b""
        pos = 0
        while pos + _FRAME.size <= len(data):
            fmagic, n, crc = _FRAME.unpack_from(data, pos)
            body_at = pos + _FRAME.size
            if fmagic == b"\0\0\0\0" and n == 0 and crc == 0 and not sealed_end:
                break  # the end of what was ever written
            if (
                fmagic != _FRAME_MAGIC or body_at + n > len(data)
                or zlib.crc32(memoryview(data)[body_at:body_at + n]) != crc
            ):
                if sealed_end or _valid_frame_after(data, pos):
                    raise StorageFault(
                        f"journal segment {path} is corrupt at byte {_HEADER_LEN + pos} (a frame fails its "
                        "checksum, and it was synced: entries may be lost), so the node will not start. "
                        "Remove this node's data directory and let it rejoin to rebuild it from its peers"
                    )
                self.torn_frames += 1
                log.warning(
                    "journal segment %s ends in a torn frame at byte %d (a crash during a write); "
                    "ignoring it: it was never acknowledged", path, _HEADER_LEN + pos,
                )
                break
            try:
                self._replay_body(data, body_at, n, seg)
            except (struct.error, ValueError, UnicodeDecodeError) as e:
                raise StorageFault(f"journal segment {path}: malformed frame at byte {_HEADER_LEN + pos}: {e}") from e
            pos = body_at + n
        seg.end = _HEADER_LEN + pos
        if sealed_end and seg.end != sealed_end:
            raise StorageFault(f"journal segment {path} ends at byte {seg.end}, its header says {sealed_end}")
        return seg, bool(clean)

    def _replay_body(self, data: bytes, at: int, n: int, seg: _Segment) -> None:
        end = at + n
        base = _HEADER_LEN  # positions below are relative to the segment's data after the header
        while at < end:
            kind = data[at]
            if kind == APPEND:
                _, gid, index, term, size = _APPEND.unpack_from(data, at)
                at += _APPEND.size
                if at + size > end:
                    raise ValueError("command runs past its frame")
                self._apply((APPEND, gid, index, term, at, size, "", b""), seg, base)
                at += size
            elif kind in (DEL_FROM, DEL_BEFORE):
                _, gid, index = _IDX.unpack_from(data, at)
                at += _IDX.size
                self._apply((kind, gid, index, 0, 0, 0, "", b""), seg, base)
            elif kind in (CLEAR, CLEAR_META):
                _, gid = _GROUP.unpack_from(data, at)
                at += _GROUP.size
                self._apply((kind, gid, 0, 0, 0, 0, "", b""), seg, base)
            elif kind == META:
                _, gid, nlen = _META.unpack_from(data, at)
                at += _META.size
                name = data[at:at + nlen].decode()
                at += nlen
                (vlen,) = _U32.unpack_from(data, at)
                at += 4
                if at + vlen > end:
                    raise ValueError("meta value runs past its frame")
                self._apply((META, gid, 0, 0, 0, 0, name, data[at:at + vlen]), seg, base)
                at += vlen
            else:
                raise ValueError(f"unknown record type {kind}")
