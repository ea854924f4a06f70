"""The disk a node keeps free, and the writes it refuses to keep it so.

A node whose data directory runs out of space stops itself: a journal write
that fails is a ``StorageFault``, and LMDB, which writes through its memory
map, is killed by SIGBUS.  The replicas of a shard fill their disks
together, so a cluster that runs full would lose every node at once and
could not start again until space was freed.  ``DiskSpace`` keeps a reserve
free instead.  While less than the reserve (``--disk-reserve``: a share of
the filesystem, 5 % by default, or a size) is free, the shard leaders on
this node refuse the writes that add data (set, mset, incr,
compare-and-set) with ``disk_full`` (``RESOURCE_EXHAUSTED``), before they
are proposed, so nothing of them is applied.  Deletes, reads and the Raft
traffic of every shard (followers appending, snapshots, the placement
driver's map) go on.  Writes are taken again once the free space is back
above the reserve plus a twentieth of it, so a disk at the edge does not
flap.

A follower's disk counts too.  A node tells its Raft peers whether it is
below its reserve (``GroupHost.tell_peers``: when that changes, when a link
comes up, and every second), and a leader refuses those writes for every
shard with a replica on a node that said so (:meth:`DiskSpace.refusal_for`).
Without that, a follower on a smaller or fuller disk than its leader's
would take entries until its disk filled and it stopped.  A peer whose link
is down counts as having room: it takes no entries meanwhile, and when the
link comes back it is asked at once how its disk is (one round trip on the
Raft port, while the first entries may already be on their way).

The reserve must hold what arrives while the leaders refuse: entries
already proposed, what arrives before a peer's news does, and the snapshot
a log compaction writes (about the size of the shard replica).  A node
whose disk fills completely still stops.

Threads: :meth:`DiskSpace.start` looks once, then one daemon thread
(``disk-space``) looks every ``interval`` seconds, ten times as often once
less than twice the reserve is free (a disk that fills at 100 MB/s takes
5 MB between looks then).  The Raft driver thread hands in the peers' news
(:meth:`DiskSpace.heard`), and a gRPC thread may inject a fault
(:meth:`DiskSpace.force`).  They write :attr:`DiskSpace.blocked` and
:attr:`DiskSpace.full_peers` under a lock; gRPC worker threads read them,
any number at once (one attribute each, replaced whole: no lock).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any

from .._errors import DiskFull
from .._sizes import show_size

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}
_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[a-z]*)\s*$")
MAX_SHARE = 50.0
"""A reserve above half the filesystem is almost surely a typo for a size."""


@dataclasses.dataclass(frozen=True, slots=True)
class DiskReserve:
    """How much disk to keep free: ``percent`` of the filesystem's size, or
    ``size`` bytes (one of them; both 0: no reserve)."""

    percent: float = 5.0
    size: int = 0

    def of(self, capacity: int) -> int:
        """The reserve in bytes on a filesystem of ``capacity`` bytes."""
        return self.size if self.size else int(capacity * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else show_size(self.size)


def parse_reserve(text: str) -> DiskReserve:
    """``5%``, ``0``, ``512MiB``, ``2G``, ``1073741824`` -> a reserve (sizes
    are binary: K, M, G, T with or without ``iB``).  ValueError says why."""
    m = _SPEC.match(str(text).lower())
    if m is None or m.group(2) not in _UNITS and m.group(2) != "%":
        raise ValueError(f"{text!r} is neither a share of the disk (e.g. 5%) nor a size (e.g. 512MiB, 2GiB, 0)")
    number = float(m.group(1))
    if m.group(2) == "%":
        if number > MAX_SHARE:
            raise ValueError(f"{text!r} keeps more than half the disk free; give at most {MAX_SHARE:g}%, or a size")
        return DiskReserve(percent=number, size=0)
    size = int(number * _UNITS[m.group(2)])
    if number and not size:
        raise ValueError(f"{text!r} is less than a byte; give 0 to keep no reserve")
    return DiskReserve(percent=0.0, size=size)


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    """One look at the filesystem."""

    free: int
    capacity: int
    reserve: int


class DiskSpace:
    """Whether this node's disk is below its reserve.

    ``statvfs`` (a seam: tests pass their own) is asked about ``path``, the
    data directory, by :meth:`check`: at :meth:`start` and then every
    ``interval`` seconds on the ``disk-space`` thread.  A filesystem that
    cannot be read counts as having room (the journal reports a disk that
    fails)."""

    def __init__(self, path: str, reserve: DiskReserve, node_id: str,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs, interval: float = 0.5,
                 tell: Callable[[dict[str, Any]], None] | None = None,
                 on_judged: Callable[[bool, int], None] | None = None) -> None:
        """``tell``: says this node's disk state to its peers (the node
        passes ``GroupHost.tell_peers``; None: they are not told).
        ``on_judged``: called with :attr:`full` and the free bytes (0: not
        known) after every look and every fault injected or lifted (the node
        passes ``GroupHost.set_short_of_disk``: its groups compact their logs
        while the disk is below the reserve, each only while the free space
        holds its snapshot)."""
        self.path = path
        self.reserve = reserve
        self.node_id = node_id
        self._statvfs = statvfs
        self._interval = interval
        self.tell = tell
        self.on_judged = on_judged
        self.full = False
        """True while the free space is below the reserve, or a fault says
        so (written by :meth:`check` and :meth:`force`, one at a time)."""
        self.full_peers: dict[str, Reading] = {}
        """The peers that said they are below their reserve, with what they
        said (replaced whole by :meth:`heard`)."""
        self.blocked = False
        """``full`` or a peer is: the one attribute a write reads first."""
        self._lock = threading.Lock()
        self._told: bool | None = None
        self._forced = False  # fault injection: below the reserve whatever the disk says (force)
        self._judging = threading.RLock()  # one check or force at a time
        self.last: Reading | None = None
        self._unreadable = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def look(self) -> Reading:
        """One look at the filesystem (any thread; changes nothing).
        OSError when it cannot be read, or says it has no size (some FUSE
        filesystems)."""
        st = self._statvfs(self.path)
        unit = st.f_frsize or st.f_bsize
        capacity, free = st.f_blocks * unit, st.f_bavail * unit
        if not capacity:
            raise OSError(f"statvfs reports a size of 0 for {self.path}")
        return Reading(free, capacity, self.reserve.of(capacity))

    def check(self) -> bool:
        """Look at the filesystem once and update :attr:`full`; returns it.
        Called by :meth:`start` and the ``disk-space`` thread (one at a time)."""
        with self._judging:
            full = self._check()
            self._judged()
            return full

    def _judged(self) -> None:
        if self.on_judged is not None:
            r = self.last
            self.on_judged(self.full, r.free if r is not None and not self._unreadable else 0)

    def _check(self) -> bool:
        if self._forced:
            return True
        try:
            reading = self.look()
        except OSError as e:
            if not self._unreadable:
                log.warning("cannot read the free space of %s (%s); writes are taken as if it had room", self.path, e)
            self._unreadable = True
            self._set_full(False, None)
            return False
        self._unreadable = False
        self.last = reading
        free, reserve = reading.free, reading.reserve
        if not self.full and free < reserve:
            self._set_full(True, reading)
            log.warning("%s; the shards with a replica here refuse writes that add data until %s is free "
                        "(deletes, reads and replication go on)", self._state(reading), show_size(resume_at(reserve)))
        elif self.full and free >= resume_at(reserve):
            self._set_full(False, reading)
            log.info("node %s has %s free on %s again (reserve %s): its shards take writes again",
                     self.node_id, show_size(free), self.path, show_size(reserve))
        elif self._told is None:
            self._set_full(self.full, reading)
        return self.full

    def force(self, below: bool) -> None:
        """Fault injection (``Admin.SetDiskFault``, jepsen-lite's ``disk``
        nemesis): count the disk as below the reserve whatever it says
        (True), or as measured again (False).  Any thread; the check that
        runs at the same time on the ``disk-space`` thread sees the flag
        before it decides, or is undone by the look below."""
        with self._judging:
            if below:
                self._forced = True
                self._set_full(True, None)  # the peers are told no figures: they would contradict the refusal
                log.warning("node %s counts its disk as below its reserve (fault injection): the shards with a "
                            "replica here refuse writes that add data", self.node_id)
            elif self._forced:
                self._forced = False
                with self._lock:
                    self.full = False  # judged afresh, as measured; blocked stays set until then
                if not self._check():
                    self._set_full(False, self.last)
                log.warning("node %s judges its disk as measured again (fault injection ended)", self.node_id)
            self._judged()

    def _set_full(self, full: bool, reading: Reading | None) -> None:
        with self._lock:
            self.full = full
            self.blocked = full or bool(self.full_peers)
        if self.tell is not None and self._told is not full:
            self._told = full
            said = None if reading is None else (reading.free, reading.capacity, reading.reserve)
            self.tell({"disk": {"full": full, "reading": said}})

    def heard(self, node: str, news: dict[str, Any] | None) -> None:
        """``node`` said ``news`` (``GroupHost``'s ``on_peer_news``: driver
        thread); None: the link to it is down.  Anything malformed counts as
        room: a peer's news only ever refuses writes."""
        disk = news.get("disk") if news is not None else None
        reading = None
        if isinstance(disk, dict) and disk.get("full") is True:
            said = disk.get("reading")
            if isinstance(said, tuple) and len(said) == 3 and all(type(x) is int for x in said):
                reading = Reading(*said)
            else:
                reading = Reading(0, 0, 0)
        with self._lock:
            was = node in self.full_peers
            if reading is None and not was:
                return
            peers = dict(self.full_peers)
            if reading is None:
                del peers[node]
            else:
                peers[node] = reading
            self.full_peers = peers
            self.blocked = self.full or bool(peers)
        if reading is not None and not was:
            log.warning("node %s is below its disk reserve%s: the shards with a replica on it refuse writes that "
                        "add data", node, _said(reading))
        elif reading is None:
            log.info("node %s is no longer below its disk reserve (%s): its shards take writes again", node,
                     "its link is down" if news is None else "it has room again")

    def refusal_for(self, shard: int, members: tuple[str, ...]) -> DiskFull | None:
        """The error for a write that adds data to ``shard``, whose replicas
        are on ``members``: this node is below its reserve, or one of them
        said it is; None: all have room (any thread)."""
        if self.full:
            return self.refusal()
        peers = self.full_peers
        for node in members:
            reading = peers.get(node)
            if reading is not None:
                resume = f" (writes resume once {show_size(resume_at(reading.reserve))} is free there)" \
                    if reading.capacity else ""
                return DiskFull(
                    f"shard {shard} has a replica on node {node}, which is below its disk reserve{_said(reading)}, "
                    f"so the shard takes no writes that add data; nothing was applied. Delete keys (deletes are "
                    f"taken, and the node compacts its logs to give their space back), free disk space on "
                    f"{node}{resume}, give it a larger disk, lower its --disk-reserve, or move the replica to a "
                    f"node with room (cachectl operator add move-replica --shard {shard} --from {node} --to NODE); "
                    f"reads still work"
                )
        return None

    def refusal(self) -> DiskFull:
        """The error for a write refused while :attr:`full` (any thread)."""
        reading = self.last
        if self._forced:
            return DiskFull(
                f"{self._state(reading)}, so it takes no writes that add data; nothing was applied. Writes resume "
                f"once the fault is lifted (Admin.SetDiskFault below_reserve=false); deletes and reads still work")
        state = self._state(reading) if reading is not None else f"node {self.node_id} is low on disk space"
        resume = show_size(resume_at(reading.reserve)) if reading is not None else "its reserve"
        return DiskFull(
            f"{state}, so it takes no writes that add data; nothing was applied. Delete keys (deletes are "
            f"taken, and the node compacts its logs to give their space back), free disk space on "
            f"{self.node_id} (writes resume once {resume} is free), give it a larger disk, or lower "
            f"--disk-reserve; reads still work"
        )

    def _state(self, r: Reading | None) -> str:
        if self._forced or r is None:
            return f"node {self.node_id} counts its disk as below its reserve (fault injection: Admin.SetDiskFault)"
        return (f"node {self.node_id} has {show_size(r.free)} free of {show_size(r.capacity)} on {self.path}, "
                f"below its reserve of {show_size(r.reserve)} (--disk-reserve {self.reserve})")

    def start(self) -> None:
        """Look once (so a node that starts on a full disk refuses at once)
        and start the thread.  A reserve of 0 needs neither."""
        if not self.reserve.of(1 << 62):
            log.info("no disk reserve (--disk-reserve 0): a full disk stops this node")
            return
        self.check()
        if self.last is not None:
            log.info("disk reserve %s (--disk-reserve %s): %s free of %s on %s", show_size(self.last.reserve),
                     self.reserve, show_size(self.last.free), show_size(self.last.capacity), self.path)
        self._thread = threading.Thread(target=self._run, name="disk-space", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def next_look(self) -> float:
        """Seconds until the next look: ``interval``, or a tenth of it once
        less than twice the reserve is free."""
        r = self.last
        near = r is not None and r.free < 2 * r.reserve
        return self._interval / 10 if near else self._interval

    def _run(self) -> None:
        while not self._stop.wait(self.next_look()):
            try:
                self.check()
            except Exception:  # a bug here must not end the checks (and leave `full` stuck)
                log.exception("disk space check failed")


def _said(r: Reading) -> str:
    if not r.capacity:
        return ""
    return f" ({show_size(r.free)} free of {show_size(r.capacity)}, reserve {show_size(r.reserve)})"


def resume_at(reserve: int) -> int:
    """Free bytes at which a full node takes writes again."""
    return reserve + reserve // 20
