"""One Raft group replica: a pysyncobj ``SyncObj`` driven by the node's host.

``RaftGroup`` is the only place that touches pysyncobj objects; nothing of
pysyncobj (types, FAIL_REASON codes) leaks above this package.

Threads:
* ``propose``, ``read_barrier``, ``read_index``, ``status`` and the properties: any thread.
* everything else (``tick``, ``deliver``, ``flush_reads``, the pysyncobj
  callbacks, the snapshot hooks): the driver thread of :class:`GroupHost`.
* the snapshot writer (:meth:`RaftGroup._dump_snapshot`): its own thread,
  one at a time per host (``GroupHost.snapshot_lock``), reading committed
  state only.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import pickle
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Final, Protocol

from pysyncobj import SyncObjConf
from pysyncobj.config import FAIL_REASON, SERIALIZER_STATE
from pysyncobj.node import Node

from .._errors import CacheError, NotLeader, OutcomeUnknown, Overloaded, Unavailable
from .._types import NodeId
from .._value import Value
from ..storage.base import StorageFault
from ..storage.lmdb_store import DumpReader
from ..storage.wal import fsync_dir
from ._syncobj import GroupSyncObj
from .journal import StorageJournal, materialize

if TYPE_CHECKING:
    from .host import GroupHost

log = logging.getLogger(__name__)


class PeerLinks(Protocol):
    """What a :class:`GroupTransport` uses of the node's Raft port
    (:class:`~cachenode.raft.mux.RaftMux`; tests pass fakes)."""

    def is_up(self, node: NodeId) -> bool: ...

    def link_up(self, node: NodeId) -> bool: ...

    def send(self, node: NodeId, group: int, message: Any) -> bool: ...

    def queued_bytes(self, node: NodeId) -> int: ...


class TransportHost(Protocol):
    """What a :class:`GroupTransport` uses of its host (:class:`GroupHost`;
    tests pass fakes).  Called on the driver thread only."""

    @property
    def mux(self) -> PeerLinks: ...

    def want_peer(self, node: NodeId) -> None: ...

    def unwant_peer(self, node: NodeId) -> None: ...

    def mark_unflushed(self, transport: Any) -> None: ...

ApplyFn = Callable[[bytes, int], bytes]
"""(payload, raft index) -> encoded result; runs on the driver thread inside the batch."""

_SNAP_MAGIC = b"CNSNAP1\0"
APPEND_BATCH_BYTES = 300 * 1024 * 1024
"""Larger than any entry can be (requests are capped at 256 MiB), so
pysyncobj never uses its chunked transmission (buggy in 0.3.17)."""
BULK_FLUSH_BYTES = 4 * 1024 * 1024
"""Bulk data (log entries, snapshot chunks) one group hands the mux for one
peer per flush (two per driver iteration: before and after the storage
commit), and the most a link may hold unsent before more bulk data joins
it.  A follower far behind (a new replica catching up, one back from an
outage) is fed in pieces.  Without this, pysyncobj (whose batches, like its
in-memory log, are larger than any backlog) sent a whole backlog as one
append: the leader pickled it, and the follower unpickled, journaled and
applied hundreds of MiB in one driver iteration, stalling every group on
both nodes for seconds (3.6 s for 250 MiB)."""
BULK_STARVE_S = 0.2
"""A group whose bulk data found no room on a busy link for this long sends
one piece anyway (at least one entry), so several groups catching up one
follower all make progress, and each follower keeps hearing from its leader
(heartbeats merge into the held append) well within an election timeout."""
SMALL_MESSAGE_BYTES = 32 * 1024
"""Messages up to this size (less than one 64 KiB snapshot chunk) are never
held back, so ordinary replication and other groups' heartbeats do not wait
behind one group's catch-up."""
QUIET_S = 0.025
"""An append that carries no entry (pysyncobj sends one to every follower
after each commit, only to announce the new commit index, and as its
heartbeat) waits up to this long when the follower heard from the leader
less than this long ago: the next append carries the commit index anyway.
See GroupTransport.send."""
HELD_RELEASE_BYTES = 8 * 1024 * 1024
"""What a replica thawed after a snapshot install takes, per driver
iteration, of the messages that waited meanwhile (see GroupTransport.release_held)."""
INSTALL_CLEAR_RECORDS = 50_000
"""Records of a replica's old state deleted per driver iteration before a
received snapshot is loaded over it."""
SNAPSHOT_PIECE_MIN = 64 * 1024
"""The smallest piece of a snapshot file sent at once (pysyncobj's chunk),
also when a starved group sends one piece anyway."""
_U32 = struct.Struct(">I")
SNAPSHOT_HOLD_WAIT_S = 120.0
"""How long a snapshot writer waits, before it starts, for bulk data held
for a lagging follower to leave (see :meth:`RaftGroup._dump_snapshot`)."""
SNAPSHOT_COMMIT_WAIT_S = 30.0
"""How long a snapshot writer waits for the applies it must include to be
committed (they are, within the host's ``apply_commit_delay_s``)."""
SHORT_OF_DISK_GAIN_BYTES = 1024 * 1024
"""While the node is below its disk reserve (``GroupHost.short_of_disk``), a
group compacts its log as soon as that gives disk back: once its log and
its snapshot file together exceed the snapshot it would write by this much
and by an eighth of that snapshot (so a dump costs at most eight times what
it frees), and the disk has room for that snapshot plus this much (it is
written before the old one and the log's journal segments go).  So
deleting keys gives disk space back, and the node takes writes again,
without waiting for ``log_compaction_bytes``."""
COMPACT_CHECK_S = 1.0
"""A compaction check that said "not yet" is repeated after this long even
if the log has not changed (the state it weighs is committed a little
after the entries that change it)."""
COMPACT_RETRY_S = 10.0
"""After a snapshot that failed to be written, no compaction for disk space
is asked for this long (a full disk fails each dump)."""


class _SnapshotStarted(Exception):
    """Raised by the serializer hook once the snapshot writer thread runs.

    pysyncobj renames ``<file>.tmp`` onto the snapshot file as soon as a
    custom serializer returns; raising makes it skip that and ask the
    ``serializeChecker`` instead, which reports SERIALIZING until the
    writer is done (pysyncobj's documented route for an asynchronous
    serializer; see ../shared/reference/pysyncobj.md)."""


@dataclasses.dataclass(frozen=True, slots=True)
class RaftTiming:
    """Raft timing knobs.  Defaults keep an isolated leader's step-down and a
    new election each within about 2 s on a busy 2-core machine."""

    heartbeat_s: float = 0.05
    election_min_s: float = 0.8
    election_max_s: float = 1.6
    leader_fallback_s: float = 1.5
    pre_vote: bool = True
    """Stand for election only after a majority said it hears no leader
    either (Raft thesis 9.6, "PreVote"; see RaftGroup._election_gate).
    Without it a replica that alone stops hearing its leader (a one-way
    link, or the load of catching up after a restart) raises its term, and
    its vote request deposes a leader the others still follow."""
    log_compaction_entries: int = 20000
    log_compaction_bytes: int = 16 * 1024 * 1024
    """Also compact once the journal holds this many bytes of commands, or
    the state's size if larger (so a snapshot, which writes the whole state,
    costs at most as much again as the log it replaces).  pysyncobj keeps
    the journal in memory: without this, 20,000 entries of 1 MiB would."""
    log_memory_bytes: int = 8 * 1024 * 1024
    """The newest commands of a group's journal kept in memory; older ones
    are read back from the storage when needed (see raft/journal.py)."""
    snapshot_install_chunk_bytes: int = 16 * 1024 * 1024
    """How much of a received snapshot one driver iteration loads (and then
    commits) on a follower: the longest a snapshot install holds the node's
    other groups up is about one such commit, not the whole snapshot's."""
    log_compaction_s: float = 600.0
    snapshot_follower_wait_s: float = 2.0
    """How long a leader whose snapshot is written keeps the log it covers
    for a connected follower that has not yet acknowledged up to it.
    pysyncobj drops those entries as soon as it hears the snapshot is in,
    and a follower whose next index then falls at or below the log's first
    entry (an acknowledgement still on its way pulls it back there) is sent
    the whole snapshot instead of the few entries it lacks: under 10 KiB
    writes the bench saw 7 whole shards sent to a follower that was only
    slow.  After this long a follower still behind is sent the snapshot."""
    queue_size: int = 20000


class GroupStatus(Value):
    """A replica's Raft status as of its last tick (rebuilt every tick of
    every group, so a compiled value class: see :mod:`cachenode._value`)."""

    __slots__ = ("role", "leader", "term", "commit_index", "applied_index", "members", "has_quorum")
    FIELDS = ("role", "leader", "term", "commit_index", "applied_index", "members", "has_quorum")

    def __init__(
        self,
        role: str,
        leader: NodeId | None,
        term: int,
        commit_index: int,
        applied_index: int,
        members: tuple[NodeId, ...],
        has_quorum: bool,
    ) -> None:
        self.role: Final[str] = role  # leader | follower | candidate
        self.leader: Final[NodeId | None] = leader
        self.term: Final[int] = term
        self.commit_index: Final[int] = commit_index
        self.applied_index: Final[int] = applied_index
        self.members: Final[tuple[NodeId, ...]] = members
        self.has_quorum: Final[bool] = has_quorum


_ROLES = {0: "follower", 1: "candidate", 2: "leader"}


def fail_reason_error(err: int, read: bool = False) -> CacheError:
    """Map a pysyncobj FAIL_REASON to our error hierarchy.

    Definite failures (the command was never appended, or was overwritten)
    are Unavailable/Overloaded; everything else is OutcomeUnknown.  For a
    ``read`` (a read barrier) every failure is definite: a barrier writes
    nothing the client asked for (it may still commit and stamp the cluster
    clock), so a read that did not return has no outcome to doubt."""
    if err == FAIL_REASON.QUEUE_FULL:
        return Overloaded("the shard's command queue is full; retry with backoff")
    if read:
        return Unavailable("leadership changed before the read could be served; nothing was read, retry")
    if err in (FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER):
        return Unavailable("the shard has no leader right now (election in progress); the write was not applied, retry")
    if err == FAIL_REASON.DISCARDED:
        return Unavailable("leadership changed and the entry was discarded; the write was not applied, retry")
    if err == FAIL_REASON.REQUEST_DENIED:
        return Unavailable("the request was denied by the Raft group; retry")
    return OutcomeUnknown("leadership changed while the write was in flight: its outcome is unknown; retry with the same request id")


class SnapshotFile:
    """A snapshot transmission's file, read by the transport as room allows.

    pysyncobj's leader reads the snapshot it sends in 64 KiB chunks, as many
    as it can in one heartbeat period, every heartbeat: far faster than a
    link carries them.  Paced, the chunks piled up in the transport (the
    whole snapshot in memory on the leader, and up to half the driver's time
    spent reading).  :class:`SnapshotTransfer` hands the transport this open
    file instead, and the transport reads it piece by piece at flush time
    (:func:`_split_bulk`), only as fast as the link takes it.

    Driver thread only.  The open file keeps the snapshot it was opened on,
    even once a newer snapshot is renamed over the path."""

    __slots__ = ("_f", "pos", "size")

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed when sent or dropped
        self.pos = 0
        self.size = os.fstat(self._f.fileno()).st_size

    @property
    def closed(self) -> bool:
        return self._f.closed

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end); closes the file at the end."""
        data = os.pread(self._f.fileno(), min(n, self.remaining), self.pos)
        if len(data) < min(n, self.remaining):
            raise OSError(f"snapshot file shrank while being sent ({self.pos + len(data)} of {self.size} bytes)")
        self.pos += len(data)
        if not self.remaining:
            self._f.close()
        return data

    def drop(self) -> None:
        """The transport dropped the transmission before its end."""
        self._f.close()


class _Installed:
    """Type of :data:`_INSTALLED`, a sentinel compared by identity."""


_INSTALLED = _Installed()
"""What the transport hands pysyncobj's serializer as the last piece of a
snapshot this replica already loaded (see :meth:`RaftGroup._on_snapshot_piece`).
An instance, not a constant tuple: compiled code rebuilds a tuple constant
where it is used, so ``is`` would never match."""


class SnapshotTransfer:
    """Wraps pysyncobj's ``Serializer`` (``SyncObj._SyncObj__serializer``):
    how a snapshot leaves a leader and how it lands on a follower.

    Sending: pysyncobj's leader loop asks ``getTransmissionData(node)`` for
    the next ``(data, isFirst, isLast)`` until ``isLast``; it then points
    the follower's nextIndex after the snapshot and queues the entries that
    follow it.  Here one call returns the whole transmission: the open file
    (:class:`SnapshotFile`), ``isFirst`` and ``isLast``.  The transport
    sends the file's bytes in pieces, in order, the first marked ``isFirst``
    and only the last ``isLast`` (:func:`_split_bulk`).  A transmission
    dropped part way (reset, new term, lost link) never delivers ``isLast``,
    and the next one starts over with ``isFirst``: no state is kept between
    calls, so no end can ever be sent for bytes that were not.

    Receiving: the follower's transport writes the pieces itself and loads
    the snapshot in steps (:meth:`RaftGroup._on_snapshot_piece`); pysyncobj
    then gets :data:`_INSTALLED` as the data of the last piece, and
    ``setTransmissionData`` moves the received file into place
    (``on_installed``) and says "complete", so pysyncobj installs it (its
    log, applied index and members), calling the deserializer, which finds
    the state already loaded.  Everything else is the wrapped serializer's.
    Driver thread only."""

    def __init__(self, inner: Any, path: str) -> None:
        self._inner = inner
        self._path = path
        self.on_installed: Callable[[], None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def getTransmissionData(self, node: Node) -> tuple[Any, bool, bool] | None:  # noqa: N802 - pysyncobj's name
        try:
            return SnapshotFile(self._path), True, True
        except OSError as e:
            log.warning("cannot send snapshot %s: %s", self._path, e)
            return None

    def setTransmissionData(self, data: Any) -> bool:  # noqa: N802 - pysyncobj's name
        if data is _INSTALLED and self.on_installed is not None:
            self.on_installed()
            return True
        return bool(self._inner.setTransmissionData(data))


def _bulk_size(m: dict[str, Any]) -> int:
    """Bytes of log entries or snapshot data that message ``m`` carries."""
    if "serialized" in m:
        data = m["serialized"]
        if data and isinstance(data[0], SnapshotFile):
            return data[0].remaining
        return len(data[0]) if data and data[0] else 0
    entries = m.get("entries")
    if entries:
        return sum(len(e[0]) for e in entries)
    return len(m.get("data") or b"")  # pysyncobj's chunked transmission of one entry (unused)


def _is_file(m: dict[str, Any]) -> bool:
    ser = m.get("serialized")
    return ser is not None and isinstance(ser[0], SnapshotFile)


def _ready(m: dict[str, Any], limit: int | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What of ``m`` leaves now, as it goes on the wire, and the rest: split
    after ``limit`` bytes of bulk data (None: whole), commands that left
    memory read back (journal.materialize).  OSError if a snapshot file
    cannot be read, LookupError if an entry is gone."""
    rest = None
    if limit is not None:
        m, rest = _split_bulk(m, limit)
    ents = m.get("entries")
    if ents:
        loaded = materialize(ents)
        if loaded is not ents:
            m = dict(m, entries=loaded)
    return m, rest


def _split_bulk(m: dict[str, Any], room: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split ``m`` after ``room`` bytes of its bulk data: (head to send now,
    rest or None).  A :class:`SnapshotFile` message yields a piece of the
    file read now (at most ``room`` bytes, at least SNAPSHOT_PIECE_MIN;
    ``isFirst`` on the first, ``isLast`` on the last) and itself, further
    on, as the rest; log entries split as in :func:`_split_append`.
    OSError if the file cannot be read."""
    ser = m.get("serialized")
    if ser and isinstance(ser[0], SnapshotFile):
        src, first = ser[0], ser[1]
        data = src.read(max(room, SNAPSHOT_PIECE_MIN))
        last = not src.remaining
        head = dict(m, serialized=(data, first, last))
        return head, (None if last else dict(m, serialized=(src, False, True)))
    return _split_append(m, room)


def _split_append(m: dict[str, Any], room: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split append ``m`` after the entries that fit in ``room`` bytes (at
    least one): (head to send now, rest or None).  The rest continues the
    head (prevLogIdx/prevLogTerm of the head's last entry); the follower
    commits at most up to the last entry it holds, as Raft says.  A message
    that cannot be split (a snapshot chunk) is returned whole."""
    entries = m.get("entries")
    if not entries or "prevLogIdx" not in m or "transmission" in m:
        return m, None
    total = 0
    k = 0
    while k < len(entries):
        total += len(entries[k][0])
        if total > room and k > 0:
            break
        k += 1
    if k >= len(entries):
        return m, None
    last = entries[k - 1]
    head = dict(m, entries=list(entries[:k]))
    rest = dict(m, entries=list(entries[k:]), prevLogIdx=last[1], prevLogTerm=last[2])
    return head, rest


class GroupTransport:
    """pysyncobj transport for one group, multiplexed over the node's RaftMux.

    It implements the interface of ``pysyncobj.transport.Transport`` (the
    transport seam: the ``set...Callback`` setters, ``addNode``, ``dropNode``,
    ``send``, ``ready``, ``destroy``) without inheriting it, so that it
    compiles to a native class."""

    def __init__(
        self, host: TransportHost, group: int, members: list[NodeId],
        hold: bool = False, on_release: Callable[[], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic, gated: bool = False,
    ) -> None:
        """``monotonic``: the clock of :data:`BULK_STARVE_S` and of the
        leader-contact times (tests pass a fake).

        ``hold``: a replica just added to an existing group.  It reports no
        peer as connected (so pysyncobj never starts an election) until a
        leader's append reaches it: an empty replica cannot win, and its
        growing term would only depose the leader that is adding it.

        ``gated``: the election gate starts closed (see :meth:`open_gate`)."""
        self._on_message: Callable[[Node, Any], None] | None = None
        self._on_connected: Callable[[Node], None] | None = None
        self._on_disconnected: Callable[[Node], None] | None = None
        self._utility: dict[str, Callable[..., Any]] = {}
        self._host = host
        self._group = group
        self.hold = hold
        self.gated = gated
        """The election gate is closed: pysyncobj is told no peer is
        connected, which is what keeps it from starting an election.  Its
        other uses of that knowledge are a leader's (sends, the choice of a
        transfer target) and ``hasQuorum`` (so a gated replica's
        ``status.has_quorum`` is False; only a leader's is read).  RaftGroup
        opens it after a won pre-vote, for a leadership transfer, and for a
        leader (driver thread)."""
        self.opened_at = -1.0  # when the gate last opened
        self.heard_term = -1
        """The highest term of an append received, and when the latest of
        that term came (``heard_at``): when this replica last heard a
        leader pysyncobj would follow."""
        self.heard_at = monotonic()
        self.heard_from: NodeId | None = None  # who sent that append
        self.on_prevote: Callable[[NodeId, dict[str, Any]], None] | None = None
        """Takes the pre-vote messages (``pre_vote``, ``pre_vote_ack``): they are ours, not pysyncobj's."""
        self._on_release = on_release
        self._nodes: dict[NodeId, Node] = {}
        self._sent: dict[NodeId, tuple[int, int, int]] = {}  # node -> (term, last index sent, its term)
        self._queue: dict[NodeId, list[dict[str, Any]]] = {}
        self.holding = False
        """Bulk data waits in this transport for room (set by the full flush,
        driver thread; read by the snapshot writer thread)."""
        self._now = monotonic
        self._bulk_at: dict[NodeId, float] = {}  # peer -> when bulk data last left for it
        self._alive_at: dict[NodeId, float] = {}  # installing peer -> last keep-alive
        self._installing_peers: set[NodeId] = set()
        """Peers sent a whole snapshot that have not answered since: they are
        loading it, frozen, and would only hold what we send meanwhile in
        memory; entries for them wait here (lazily read from the journal)."""
        self.frozen = False
        """While a received snapshot is loaded (driver thread): every message
        for this replica waits in ``held_in`` (see RaftGroup._on_snapshot_piece)."""
        self.held_in: collections.deque[tuple[NodeId, Any]] = collections.deque()
        self.receiver: Callable[[NodeId, dict[str, Any]], dict[str, Any]] | None = None
        """Takes each snapshot piece a leader sends; returns what pysyncobj gets instead."""
        self.trimmed = 0
        self.members_epoch = 0
        """Bumped by every membership change pysyncobj makes (addNode/dropNode)."""
        self.links_epoch = 0
        """Bumped by every link event handed to pysyncobj (a peer connected or
        disconnected): with ``members_epoch``, when its quorum view changes."""
        self._last_out: dict[NodeId, float] = {}  # peer -> when a message for it was last queued
        self._quiet: dict[NodeId, dict[str, Any]] = {}  # peer -> the entry-less append waiting (see send)
        self.quieted = 0
        for m in members:
            self.addNode(Node(m))

    # ---- the pysyncobj transport interface -----------------------------

    def setOnMessageReceivedCallback(self, callback: Callable[[Node, Any], None] | None) -> None:
        self._on_message = callback

    def setOnNodeConnectedCallback(self, callback: Callable[[Node], None] | None) -> None:
        self._on_connected = callback

    def setOnNodeDisconnectedCallback(self, callback: Callable[[Node], None] | None) -> None:
        self._on_disconnected = callback

    def setOnReadonlyNodeConnectedCallback(self, callback: Any) -> None:
        pass  # no read-only nodes here

    def setOnReadonlyNodeDisconnectedCallback(self, callback: Any) -> None:
        pass

    def setOnUtilityMessageCallback(self, message: str, callback: Callable[..., Any] | None) -> None:
        if callback is not None:
            self._utility[message] = callback
        else:
            self._utility.pop(message, None)

    def tryGetReady(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    def waitReady(self) -> None:
        pass

    def _onMessageReceived(self, node: Node, message: Any) -> None:
        if self._on_message is not None:
            self._on_message(node, message)

    def _onNodeConnected(self, node: Node) -> None:
        self.links_epoch += 1
        if self._on_connected is not None:
            self._on_connected(node)

    def _onNodeDisconnected(self, node: Node) -> None:
        self.links_epoch += 1
        if self._on_disconnected is not None:
            self._on_disconnected(node)

    def addNode(self, node: Node) -> None:
        if node.id in self._nodes:
            return
        self.members_epoch += 1
        self._nodes[node.id] = node
        self._host.want_peer(node.id)
        # A member added at run time whose link is already up would never
        # hear "connected" (the link event came before it was a member), and
        # pysyncobj's leader sends nothing to a node it thinks unreachable.
        if not (self.hold or self.gated) and self._host.mux.link_up(node.id):
            self._onNodeConnected(node)

    def dropNode(self, node: Node) -> None:
        if self._nodes.pop(node.id, None) is not None:
            self.members_epoch += 1
            self._host.unwant_peer(node.id)
        self._drop_queue(node.id)  # also the quiet append waiting for it
        self._sent.pop(node.id, None)

    def _drop_queue(self, nid: NodeId) -> None:
        """Forget what waits for ``nid`` (as a lossy network would)."""
        self._installing_peers.discard(nid)
        self._quiet.pop(nid, None)
        for m in self._queue.pop(nid, ()):
            if _is_file(m):
                m["serialized"][0].drop()
        self._bulk_at.pop(nid, None)

    def send(self, node: Node, message: Any) -> bool:
        """Queue ``message`` for ``node``; :meth:`flush` hands it to the mux.

        Messages wait in the transport until the end of the driver iteration
        anyway (they may leave only after the storage commit), so consecutive
        appends to one follower are merged into one message there: the
        batching of pysyncobj's batch mode without its up-to-one-period delay.

        An append with no entries (pysyncobj sends one to every follower
        after each commit, only to announce the commit index, and as its
        heartbeat) to a follower that was sent something less than
        :data:`QUIET_S` ago waits (the newest one only) instead of leaving:
        the next append carries its commit index, or :meth:`release_quiet`
        (every tick, at least every 25 ms) sends it once it is QUIET_S
        old.  Under load that removes about half the Raft frames and acks
        per write; a follower learns a commit up to ~50 ms later when its
        group goes idle, which only stale reads on it can see, and still
        hears from its leader far more often than its election timeout."""
        nid = node.id
        if not self._host.mux.is_up(nid):
            self._sent.pop(nid, None)
            self._quiet.pop(nid, None)
            return False
        q = self._queue.get(nid)
        if q and self.holding and message.get("term", 0) > q[0].get("term", 0):
            # A new term: what an old term left held for this peer (bulk
            # data waiting for room) would only delay votes and the new
            # leader's appends; the peer ignores it anyway.
            self._drop_queue(nid)
            self._sent.pop(nid, None)
        now = self._now()
        if message.get("type") != "append_entries":
            self._quiet.pop(nid, None)  # nothing overtakes it: its commit index comes with the next append
        else:
            message = self._trim_resend(nid, message)
            quiet = self._quiet.pop(nid, None)
            q = self._queue.get(nid)
            if quiet is not None and message["term"] == quiet["term"]:
                message["commit_index"] = max(message["commit_index"], quiet["commit_index"])
            if q and self._merge(q[-1], message):
                return True
            if (
                not message.get("entries") and "prevLogIdx" in message and "transmission" not in message
                and (quiet is None or quiet["term"] == message["term"])
                and now - self._last_out.get(nid, -QUIET_S) < QUIET_S
            ):
                self._quiet[nid] = message
                self.quieted += 1
                return True
        self._last_out[nid] = now
        self._queue.setdefault(nid, []).append(message)
        self._host.mark_unflushed(self)
        return True

    def release_quiet(self) -> None:
        """Queue the entry-less appends that waited :data:`QUIET_S` (driver
        thread, every tick of the group)."""
        if not self._quiet:
            return
        now = self._now()
        for nid in [n for n in self._quiet if now - self._last_out.get(n, -QUIET_S) >= QUIET_S]:
            m = self._quiet.pop(nid)
            if self._host.mux.is_up(nid) and nid in self._nodes:
                self._last_out[nid] = now
                self._queue.setdefault(nid, []).append(m)
                self._host.mark_unflushed(self)

    @staticmethod
    def _merge(prev: dict[str, Any], m: dict[str, Any]) -> bool:
        """Fold append ``m`` into the queued append ``prev`` when it simply continues it."""
        if prev.get("type") != "append_entries" or prev["term"] != m["term"]:
            return False
        if "prevLogIdx" not in prev or "prevLogIdx" not in m or "transmission" in prev or "transmission" in m:
            return False
        pe = prev.get("entries") or []
        last = pe[-1][1] if pe else prev["prevLogIdx"]
        if m["prevLogIdx"] != last:
            return False
        me = m.get("entries") or []
        if me:
            prev["entries"] = list(pe) + list(me)
        prev["commit_index"] = max(prev["commit_index"], m["commit_index"])
        return True

    def flush(self, appends_only: bool = False) -> None:
        """Hand queued messages to the mux (driver thread, end of iteration).

        ``appends_only``: send only the leading append_entries of each
        peer's queue (what may leave before the storage commit).

        Bulk data is paced (:data:`BULK_FLUSH_BYTES`): a large append is
        split at an entry boundary (the rest keeps its place at the head of
        the queue, chained by prevLogIdx/prevLogTerm), and what does not fit
        waits for the next iteration, in order; the transport then stays
        marked unflushed.  Everything queued leaves unless the link drops
        (then the peer's queue is dropped, as a lossy network would)."""
        mux = self._host.mux
        held = False
        for nid in list(self._queue):
            if nid not in self._nodes:
                self._drop_queue(nid)
                continue
            msgs = self._queue[nid]
            room: int | None = None  # looked up at the first bulk message (rare)
            n = 0
            while n < len(msgs):
                m = msgs[n]
                if appends_only and m.get("type") != "append_entries":
                    break
                size = _bulk_size(m)
                if size > SMALL_MESSAGE_BYTES:
                    if room is None:
                        room = BULK_FLUSH_BYTES - mux.queued_bytes(nid)
                        now = self._now()
                        if nid in self._installing_peers:
                            room = 0  # it is loading a snapshot: no bulk data until it answers
                            self._keep_alive(nid, m, now)
                        elif room <= 0 and now - self._bulk_at.get(nid, now) >= BULK_STARVE_S:
                            room = 1  # starved: one piece (at least one entry) anyway
                    if room <= 0:
                        break
                    limit: int | None = room if size > room or _is_file(m) else None
                else:
                    limit = size if _is_file(m) else None
                try:
                    m, rest = _ready(m, limit)
                except (OSError, LookupError) as e:  # a snapshot read failed; an entry compacted since
                    self._abandon(nid, e)
                    msgs, n = [], 0
                    break
                if size > SMALL_MESSAGE_BYTES:
                    assert room is not None
                    room -= _bulk_size(m)
                    self._bulk_at[nid] = self._now()
                elif room is not None and room > 0:
                    room = max(0, room - size)
                if not mux.send(nid, self._group, m):
                    self._sent.pop(nid, None)
                    self._drop_queue(nid)  # link down: as a lossy network would
                    msgs = []
                    n = 0
                    break
                if rest is not None:
                    msgs[n] = rest
                    break
                if _is_file(msgs[n]):  # that was the snapshot's last piece
                    self._installing_peers.add(nid)
                    room = 0
                n += 1
            del msgs[:n]
            if msgs:
                held = True
                self._bulk_at.setdefault(nid, self._now())  # waiting since
            else:  # all sent (what an installing peer was sent stays noted)
                self._queue.pop(nid, None)
                self._bulk_at.pop(nid, None)
        if not appends_only:
            self.holding = held
            if held:
                self._host.mark_unflushed(self)

    def _keep_alive(self, nid: NodeId, head: dict[str, Any], now: float) -> None:
        """An empty append for a peer loading a snapshot, every BULK_STARVE_S:
        the entries held for it (``head`` first) continue after the
        snapshot, so it can answer this one as soon as it has installed,
        and hears from its leader then (its election timer) even if it
        rejected the file.  Without it the peer got nothing, and a rejected
        install ended in an election."""
        if "prevLogIdx" not in head or "transmission" in head:
            return
        if now - self._alive_at.get(nid, 0.0) < BULK_STARVE_S:
            return
        self._alive_at[nid] = now
        self._host.mux.send(nid, self._group, {
            "type": "append_entries", "term": head["term"], "commit_index": head["commit_index"],
            "entries": [], "prevLogIdx": head["prevLogIdx"], "prevLogTerm": head["prevLogTerm"],
        })

    def _abandon(self, nid: NodeId, why: Exception) -> None:
        """Drop what waits for ``nid`` because part of it cannot be read (a
        journal entry compacted since it was queued, a snapshot file that
        fails to read): as a lossy network would; the follower asks again.
        One group's peer, never the node."""
        level = logging.DEBUG if isinstance(why, LookupError) else logging.WARNING
        log.log(level, "group %s: dropping what waits for %s: %s", self._group, nid, why)
        self._sent.pop(nid, None)
        self._drop_queue(nid)

    def _trim_resend(self, nid: NodeId, m: dict[str, Any]) -> dict[str, Any]:
        """Drop entries this connection already carried to ``nid``.

        pysyncobj's leader sets nextIndex from every successful ack, so with
        pipelined appends a lagging ack moves nextIndex *back* and the next
        append resends entries the follower already has; the follower then
        truncates and re-appends acknowledged entries (a window in which an
        acknowledged entry is missing from its durable log).  Our links are
        ordered, so an entry sent once in this term on a live link reaches the
        follower before anything sent later: we send only what is new, with
        prevLogIdx/prevLogTerm of the last entry sent.  Safe by Raft's own
        check: a follower that did not keep that entry rejects the append
        and asks for a reset, which clears this record (see ``deliver``)."""
        term = m["term"]
        if "prevLogIdx" not in m or "transmission" in m:
            self._sent.pop(nid, None)
            return m
        sent = self._sent.get(nid)
        entries = m.get("entries") or []
        if sent is not None and sent[0] == term and m["prevLogIdx"] < sent[1]:
            last_idx, last_term = sent[1], sent[2]
            keep = [e for e in entries if e[1] > last_idx]
            if not keep or keep[0][1] == last_idx + 1:
                m = dict(m)
                m["entries"] = keep
                m["prevLogIdx"] = last_idx
                m["prevLogTerm"] = last_term
                entries = keep
                self.trimmed += 1
            else:
                sent = None
        if entries:
            self._sent[nid] = (term, entries[-1][1], entries[-1][2])
        elif sent is None or sent[0] != term or m["prevLogIdx"] > sent[1]:
            self._sent[nid] = (term, m["prevLogIdx"], m["prevLogTerm"])
        return m

    def announce_connected(self) -> None:
        if self.hold or self.gated:
            return
        for nid, node in self._nodes.items():
            if self._host.mux.link_up(nid):
                self._onNodeConnected(node)

    def open_gate(self) -> None:
        """Let pysyncobj see its connected peers again, so it may stand for
        election when its own timer says so (driver thread)."""
        if self.gated:
            self.gated = False
            self.opened_at = self._now()
            self.announce_connected()

    def close_gate(self) -> None:
        """Tell pysyncobj no peer is connected: it starts no election until
        :meth:`open_gate` (driver thread; never on a leader, which sends
        only to peers it believes connected)."""
        if not self.gated:
            self.gated = True
            for node in self._nodes.values():
                self._onNodeDisconnected(node)

    def member_ids(self) -> list[NodeId]:
        """The other members of the group (driver thread)."""
        return list(self._nodes)

    def peer_event(self, node_id: NodeId, up: bool) -> None:
        self._sent.pop(node_id, None)
        self._drop_queue(node_id)
        node = self._nodes.get(node_id)
        if node is not None and not (up and (self.hold or self.gated)):
            (self._onNodeConnected if up else self._onNodeDisconnected)(node)

    def deliver(self, node_id: NodeId, message: Any) -> None:
        if node_id not in self._nodes:
            return  # not a member (removed, or not yet added): ignore, as Raft must
        if self.frozen or self.held_in:
            self.held_in.append((node_id, message))  # behind what already waits, in order
            return
        self._deliver_now(node_id, message)

    @property
    def installing_peers(self) -> set[NodeId]:
        """Peers sent a whole snapshot that have not answered since (driver thread)."""
        return self._installing_peers

    def release_held(self, budget: int) -> bool:
        """Deliver what waited while the replica was frozen, in order, about
        ``budget`` bytes of entries or snapshot data (at least one message)
        per call: a leader kept sending meanwhile, and all of it at once
        would be journaled and applied in one driver iteration.  True if
        more waits.  Driver thread (RaftGroup.tick)."""
        n = 0
        while self.held_in and not self.frozen:
            node_id, m = self.held_in.popleft()
            n += _bulk_size(m) if isinstance(m, dict) else 0
            if node_id in self._nodes:
                self._deliver_now(node_id, m)
            if n >= budget:
                break
        return bool(self.held_in) and not self.frozen

    def say_receiving(self, nid: NodeId) -> bool:
        """Queue, for the leader ``nid``, the answer of a replica that is
        receiving or loading its snapshot (see RaftGroup._say_receiving)."""
        return self.send_to(nid, {
            "type": "next_node_idx", "next_node_idx": 0, "reset": False, "success": False, "receiving": True,
        })

    def send_to(self, nid: NodeId, message: dict[str, Any]) -> bool:
        """:meth:`send` to the member ``nid``; False if it is not one (driver thread)."""
        node = self._nodes.get(nid)
        return node is not None and self.send(node, message)

    def _deliver_now(self, node_id: NodeId, message: Any) -> None:
        node = self._nodes[node_id]
        mtype = message.get("type")
        if mtype == "append_entries":
            term = message.get("term", 0)
            if term >= self.heard_term:
                self.heard_term = term
                self.heard_at = self._now()
                self.heard_from = node_id
        elif mtype == "pre_vote" or mtype == "pre_vote_ack":
            if self.on_prevote is not None:
                self.on_prevote(node_id, message)
            return
        elif mtype == "timeout_now" and node_id == self.heard_from and message.get("term", -1) >= self.heard_term:
            # The leader it follows hands over leadership (pysyncobj's
            # transfer): stand at once, as asked, without a pre-vote (Raft
            # thesis 3.10).  pysyncobj checks the same (its leader, a term no
            # lower than its own); should it still ignore the request, the
            # gate closes again at the next append (RaftGroup._election_gate).
            self.open_gate()
        if self._installing_peers and node_id in self._installing_peers and not message.get("receiving"):
            self._installing_peers.discard(node_id)  # it answers: the snapshot is in
            self._host.mark_unflushed(self)
        if (
            self.receiver is not None and mtype == "append_entries"
            and isinstance(message.get("serialized"), tuple)
        ):
            message = self.receiver(node_id, message)
        if mtype == "next_node_idx" and message.get("reset"):
            # The follower wants a resend from an earlier point.  Appends
            # still held for it continue a chain it rejected: drop them (as a
            # lossy network would), or each would cause another reset and
            # another full resend.
            self._sent.pop(node_id, None)
            self._drop_queue(node_id)
        self._onMessageReceived(node, message)
        if self.hold and mtype == "append_entries":
            self.hold = False
            self.announce_connected()
            if self._on_release is not None:
                self._on_release()

    def pass_on(self, node_id: NodeId, message: dict[str, Any]) -> None:
        """Hand ``message`` to pysyncobj as if it came from ``node_id`` now."""
        node = self._nodes.get(node_id)
        if node is not None:
            self._onMessageReceived(node, message)

    def destroy(self) -> None:
        for node in list(self._nodes.values()):
            self.dropNode(node)
        self.held_in.clear()


class RaftGroup:
    def __init__(
        self,
        host: GroupHost,
        group_id: int,
        self_id: NodeId,
        members: list[NodeId],
        apply_fn: ApplyFn,
        barrier_payload: Callable[[], bytes],
        snapshot_dir: str,
        timing: RaftTiming,
        hold: bool = False,
        on_release: Callable[[], None] | None = None,
        on_installed: Callable[[int, int], None] | None = None,
        restamp: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """Driver thread only (builds pysyncobj state and touches the batch).
        ``hold``/``on_release``: see :class:`GroupTransport`.
        ``on_installed(index, term)``: called on the driver thread right
        after pysyncobj took a snapshot received from the leader, with its
        last entry's index and term; the state holds the snapshot then (in
        the open batch), and no entry after it was applied yet.  It stands
        in for the applies the snapshot replaced (the cluster clock).
        ``restamp(payload)``: called on the driver thread for each payload
        another replica forwarded here (proposals it held or queued while
        leadership moved), before it is queued; what it returns is appended
        instead (the cluster clock's stamp of the leader appending it)."""
        self.host = host
        self._on_installed = on_installed
        self.group_id = group_id
        self.self_id = self_id
        self._barrier_payload = barrier_payload
        self._timing = timing
        self._reads: list[Future[bytes]] = []
        self._ri_next: Future[None] | None = None  # shared by the reads of the next round
        self._probe_seq = 0
        self._acked: dict[NodeId, int] = {}  # follower -> highest probe it answered
        # Rounds waiting: (term, echo needed, read index or -1, when asked, the round's future).
        self._ri_wait: list[tuple[int, int, int, float, Future[None]]] = []
        self._reads_lock = threading.Lock()
        self._role = 0
        self._transfer: _Transfer | None = None  # a leadership transfer under way (leader only)
        self._transfer_backoff: dict[NodeId, tuple[float, float]] = {}  # target -> (refused until, last delay)
        self.destroyed = False
        os.makedirs(snapshot_dir, exist_ok=True)
        self._snapshot_file = os.path.join(snapshot_dir, "snapshot.bin")
        self._incoming = self._snapshot_file + ".incoming"
        for leftover in (self._snapshot_file + ".part", self._incoming):  # a writer or a transfer cut short
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        self._rx: tuple[NodeId, int, Any] | None = None  # receiving: (leader, term, open incoming file)
        self._install: _Install | None = None
        self._installed: tuple[Any, Any, Any] | None = None  # loaded, for the deserializer to return
        self.install_steps = 0
        self._receiving_said_at = -1.0  # when this replica last told its leader it receives (see _say_receiving)
        self.receiving_said = 0
        if host.storage.reader(group_id).installing():
            # The node stopped while loading a snapshot from a leader: the
            # state is part old, part new.  Start from nothing; pysyncobj
            # rebuilds it from this replica's own snapshot and journal,
            # neither of which the install had touched yet.
            log.warning("group %s: a snapshot install was cut short; rebuilding the replica", group_id)
            host.durable_batch().state(group_id).clear()
        # The snapshot writer running, and how many snapshots had been installed when it started.
        self._snap: tuple[Future[int], int] | None = None
        self._snap_done_at: float | None = None  # when the writer's dump was first seen done
        self._snap_installs = 0  # snapshots loaded; a writer older than one is void
        self._compact_checked: tuple[int, bool] = (-1, False)  # (log size, short of disk) at the last check
        self._compact_check_at = 0.0  # when that check may be repeated with the log unchanged
        self._compact_after = 0.0  # no compaction for disk space before this (a dump failed)
        self._snap_ratio = 1.0  # snapshot file bytes per state byte, at the last snapshot written
        self.journal = StorageJournal(
            group_id, host.storage, host.batch, host.durable_batch, memory_bytes=timing.log_memory_bytes
        )
        others = [m for m in members if m != self_id]
        self.transport = GroupTransport(host, group_id, others, hold, on_release, gated=timing.pre_vote)
        self.transport.on_prevote = self._on_prevote
        # The pre-vote round under way: (the term it asks for, who granted it).
        self._pv_round: tuple[int, set[NodeId]] | None = None
        self._pv_next_at = 0.0  # no new round before this (rounds are rate-limited)
        self._pv_base_at = time.monotonic()  # "heard a leader" floor: start, stepping down, a new term
        self._pv_term = -1  # the term _pv_base_at last saw
        self.prevotes_started = 0
        self.prevotes_won = 0
        self.prevotes_granted = 0
        self.prevotes_refused = 0
        conf = SyncObjConf(
            autoTick=False,
            journalFile=self.journal,
            appendEntriesUseBatch=False,
            commandsWaitLeader=False,
            dynamicMembershipChange=True,
            appendEntriesPeriod=timing.heartbeat_s,
            raftMinTimeout=timing.election_min_s,
            raftMaxTimeout=timing.election_max_s,
            leaderFallbackTimeout=timing.leader_fallback_s,
            connectionTimeout=max(timing.election_max_s, 2.0),
            # pysyncobj cuts an entry of >= this many bytes into chunks and
            # mis-marks the last one (0.3.17): the follower then unpickles a
            # truncated entry.  Our transport frames messages of any size, so
            # no entry is ever chunked: the bound is above gRPC's 256 MiB cap.
            appendEntriesBatchSizeBytes=APPEND_BATCH_BYTES,
            logCompactionMinEntries=timing.log_compaction_entries,
            logCompactionMinTime=timing.log_compaction_s,
            logCompactionSplit=False,
            commandsQueueSize=timing.queue_size,
            fullDumpFile=self._snapshot_file,
            serializer=self._start_snapshot,
            serializeChecker=self._snapshot_state,
            deserializer=self._read_snapshot_or_fail,
            useFork=False,
            onStateChanged=self._on_state_changed,
        )
        self.sync = GroupSyncObj(SnapshotTransfer,
            apply_fn, Node(self_id), [Node(m) for m in others], conf,
            transport=self.transport, nodeClass=Node,
        )
        self.sync.restamp = restamp
        self.sync.transfer.on_installed = self._move_incoming_into_place
        self.transport.receiver = self._on_snapshot_piece
        if not timing.pre_vote:
            self.transport.announce_connected()
        self.snapshots_written = 0
        self.snapshots_installed = 0
        self._members_epoch = -1
        self._members: tuple[NodeId, ...] = ()
        self._quorum_epoch = -1
        self._has_quorum = False
        self.status = self._read_status()

    # ---- any thread -------------------------------------------------------

    def propose(self, payload: bytes) -> Future[bytes]:
        """Append ``payload`` through Raft.  The future resolves (after the
        host's commit) to the apply result, or to a CacheError."""
        fut: Future[bytes] = Future()
        if self.destroyed:
            fut.set_exception(Unavailable("this replica is being removed; retry"))
            return fut
        self.sync.propose_entry(payload, lambda res, err: self.host.complete(fut, res, err))
        self.host.wake(self)
        return fut

    def read_barrier(self) -> Future[bytes]:
        """Join the next read barrier.  Resolves to the barrier's apply result
        once an entry proposed *after* this call has been applied here."""
        fut: Future[bytes] = Future()
        with self._reads_lock:
            self._reads.append(fut)
        self.host.wake(self)
        return fut

    def read_index(self) -> Future[None]:
        """Join the next ReadIndex round (Raft thesis 6.4, no log entry).

        Resolves, after the host's storage commit, once this replica (the
        leader) has (1) an entry of its current term committed, (2) a
        majority answering a term probe sent after this call with a term no
        higher than its own (see :meth:`on_probe_ack`),
        and (3) applied everything that was committed when the round began:
        the committed local state then holds every write acknowledged
        before this call.  Fails with NotLeader when leadership moves first.
        No clock is involved, so a paused or skewed leader cannot serve a
        stale read.  Every read joining the same round gets the same future
        (one resolution per round, not per read): wait on it, never cancel it."""
        with self._reads_lock:
            fut = self._ri_next
            if fut is None:
                fut = self._ri_next = Future()
        self.host.wake_reads(self)
        return fut

    @property
    def is_leader(self) -> bool:
        return self.status.role == "leader"

    # ---- driver thread ----------------------------------------------------

    @property
    def leads_now(self) -> bool:
        """pysyncobj's role right now (driver thread): unlike :attr:`status`,
        refreshed by each tick, this already knows a step-down that a
        message handled earlier in this driver iteration caused."""
        return self._role == 2

    def read_tick(self) -> None:
        """ReadIndex work only, no pysyncobj tick: start the waiting round,
        resolve the proven ones (driver thread, see ``GroupHost.wake_reads``)."""
        if self._ri_next is not None:
            self._start_round()
        if self._ri_wait:
            self._finish_rounds()

    def flush_reads(self) -> None:
        if self._ri_next is not None:
            self._start_round()
        if not self._reads:
            return
        with self._reads_lock:
            reads, self._reads = self._reads, []
        if self.status.role != "leader" or self.destroyed:
            err = NotLeader("not the leader of this shard", self.status.leader)
            for f in reads:
                f.set_exception(err)
            return

        def done(res: Any, err: int) -> None:
            for f in reads:
                self.host.complete(f, res, err, read=True)

        self.sync.propose_entry(self._barrier_payload(), done)

    def _start_round(self) -> None:
        with self._reads_lock:
            fut, self._ri_next = self._ri_next, None
        if fut is None:
            return
        sync = self.sync
        if self._role != 2 or self.destroyed:
            fut.set_exception(NotLeader("not the leader of this shard", self.status.leader))
            return
        need = self._probe()
        # The read index: the commit index now, once it covers this term's
        # first entry (before that, -1: fixed when the term commits).
        index = sync.raftCommitIndex if self._term_committed() else -1
        self._ri_wait.append((sync.raftCurrentTerm, need, index, time.monotonic(), fut))

    def _finish_rounds(self) -> None:
        """After a tick: resolve the rounds that are proven (driver thread)."""
        sync = self.sync
        term = sync.raftCurrentTerm
        if self._role != 2 or self.destroyed:
            err = NotLeader("leadership moved during the read; retry", self.status.leader)
            for *_, fut in self._ri_wait:
                fut.set_exception(err)
            self._ri_wait = []
            return
        others = [n.id for n in sync.otherNodes]
        majority = (len(others) + 1) // 2 + 1
        acked = self._acked
        applied = sync.raftLastApplied
        term_committed = self._term_committed()
        keep = []
        now = time.monotonic()
        for item in self._ri_wait:
            t, need, index, asked, fut = item
            if t != term:
                fut.set_exception(NotLeader("leadership moved during the read; retry", self.status.leader))
                continue
            if index < 0 and term_committed:
                index = sync.raftCommitIndex
                item = (t, need, index, asked, fut)
            votes = 1 + sum(1 for nid in others if acked.get(nid, 0) >= need)
            if votes >= majority and index >= 0 and applied >= index:
                self.host.complete(fut, None, FAIL_REASON.SUCCESS, read=True)
                continue
            if votes < majority and now - asked > self.host.timing.heartbeat_s:
                # Lost or not yet sent (no link record): ask again.
                self._probe()
                item = (t, need, index, now, fut)
            keep.append(item)
        self._ri_wait = keep

    def _probe(self) -> int:
        """Ask every follower for its term (one host-level probe frame per
        peer per iteration, no pysyncobj message); returns the probe's number."""
        self._probe_seq += 1
        for n in self.sync.otherNodes:
            self.host.probe(n.id, self.group_id, self._probe_seq)
        return self._probe_seq

    def current_term(self) -> int:
        """This replica's Raft term, for a peer's probe (driver thread)."""
        return int(self.sync.raftCurrentTerm)

    def on_probe_ack(self, node_id: NodeId, seq: int, term: int) -> None:
        """A follower answered probe ``seq`` with its term (driver thread).

        A term no higher than ours proves that, when it answered (after the
        probe left, so after every read that asked for it), that follower
        had not helped elect a newer leader: a majority of such answers
        means no newer leader existed yet."""
        if self._role == 2 and term <= self.sync.raftCurrentTerm and seq > self._acked.get(node_id, 0):
            self._acked[node_id] = seq

    def _maybe_compact(self, short_of_disk: bool) -> None:
        """Ask pysyncobj for a snapshot when it is due (driver thread, after
        ``doTick``): the log outgrew its bound (``tick`` checks that) and the
        state; or, ``short_of_disk``, when a snapshot gives disk back (see
        SHORT_OF_DISK_GAIN_BYTES).  Not while one is being written: the log
        is still long then, and pysyncobj keeps the request until the next
        tick with no snapshot in progress, so asking again would dump the
        whole shard a second time right after the first is in.  A check is
        repeated once the log changed, or after COMPACT_CHECK_S: a shard
        whose state outweighs its log is not looked up every tick, and a
        request pysyncobj does not act on (nothing applied since its last
        snapshot) is not repeated every tick either."""
        if self._snap is not None:
            return
        size = self.journal.bytes
        now = time.monotonic()
        if (size, short_of_disk) == self._compact_checked and now < self._compact_check_at:
            return
        self._compact_checked = (size, short_of_disk)
        self._compact_check_at = now + COMPACT_CHECK_S
        state = self.host.storage.reader(self.group_id).size_bytes()
        if not short_of_disk:
            if size > state:
                self.sync.forceLogCompaction()
            return
        if now < self._compact_after:
            return
        new = int(state * self._snap_ratio)
        held = size + self._snapshot_bytes()
        gives_back = held - new > max(SHORT_OF_DISK_GAIN_BYTES, new // 8)
        if gives_back and new + SHORT_OF_DISK_GAIN_BYTES <= self.host.disk_free:
            log.info("group %s: compacting its log to give disk back (log and snapshot %s B, a new snapshot about "
                     "%s B, %s B free)", self.group_id, held, new, self.host.disk_free)
            self.sync.forceLogCompaction()

    def _snapshot_bytes(self) -> int:
        try:
            return os.stat(self._snapshot_file).st_size
        except OSError:
            return 0

    def term_at(self, index: int) -> int | None:
        """The term of this replica's log entry ``index`` (driver thread: the
        log changes only there), or ``None`` when the log does not hold it:
        compacted into a snapshot, or not appended yet."""
        j = self.journal
        n = len(j)
        pos = index - j[0][1] if n else -1
        return int(j[pos][2]) if 0 <= pos < n else None

    def _term_committed(self) -> bool:
        """True once an entry of the current term is committed (the no-op a
        new pysyncobj leader appends): only then does the commit index cover
        every entry earlier leaders committed."""
        return self.term_at(int(self.sync.raftCommitIndex)) == int(self.sync.raftCurrentTerm)

    def tick(self) -> None:
        inst = self._install
        if inst is not None:
            self._install_step()
            if self._install is inst:  # still loading (not done, not rejected)
                self._say_receiving(inst.node)
            return
        rx = self._rx
        if rx is not None and rx[1] == self.sync.raftCurrentTerm and self.status.leader == rx[0]:
            self._say_receiving(rx[0])  # between pieces too: they may come slower than the fallback
        if self.transport.held_in and self.transport.release_held(HELD_RELEASE_BYTES):
            self.host.wake(self)
        if self._transfer is not None:
            self._step_transfer()
        self.sync.doTick(0.0)
        self.transport.release_quiet()
        self.status = self._read_status()
        if self.sync.hold_until and self._role != 2 and self.status.leader:
            self._release_hold()  # stepped down and heard the new leader: forward to it what waited
        if self._timing.pre_vote and self._role != 2:
            self._election_gate()
        if self._role == 2 and len(self._members) == 1:
            self._commit_alone()
        if not self.destroyed:
            if self.host.short_of_disk:
                self._maybe_compact(True)
            elif self.journal.bytes > self._timing.log_compaction_bytes:
                self._maybe_compact(False)
        if self._ri_wait:
            self._finish_rounds()

    def _commit_alone(self) -> None:
        """A lone leader (replication 1) is its own majority, and no
        follower's acknowledgement wakes it: pysyncobj counts the entries a
        tick appended only in a later tick, which was the periodic one, so
        every write waited up to ``tick_interval`` (25 ms).  Its next tick
        is now the next iteration's, after this iteration's journal commit
        has made those entries durable (the order every leader keeps).  It
        ends: a leader's last entry is of its own term (pysyncobj appends a
        no-op when it is elected), so that tick commits up to it."""
        j = self.journal
        if len(j) and j[-1][1] > self.status.commit_index:
            self.host.wake(self)

    def match_index(self) -> dict[NodeId, int]:
        """Followers' match indexes as the leader sees them (driver thread)."""
        if self._role != 2:
            return {}
        prefix = "match_idx_server_"
        return {k[len(prefix):]: v for k, v in self.sync.getStatus().items() if k.startswith(prefix)}

    def _read_status(self) -> GroupStatus:
        s = self.sync
        leader = s._getLeader()
        t = self.transport
        if t.members_epoch != self._members_epoch:  # the transport hears every membership change
            self._members_epoch = t.members_epoch
            self._members = tuple(sorted([self.self_id] + [n.id for n in s.otherNodes]))
        # pysyncobj's hasQuorum intersects two sets of its Node objects
        # (interpreted hashing and equality) and was about 3 % of a node's
        # Python time in `set`; its inputs change only through this
        # transport's link and membership events.
        quorum_epoch = t.members_epoch + t.links_epoch
        if quorum_epoch != self._quorum_epoch:
            self._quorum_epoch = quorum_epoch
            self._has_quorum = bool(s.hasQuorum)
        return GroupStatus(
            _ROLES.get(self._role, "follower"),
            leader.id if leader is not None else None,
            s.raftCurrentTerm,
            s.raftCommitIndex,
            s.raftLastApplied,
            self._members,
            self._has_quorum,
        )

    def _on_state_changed(self, old: int, new: int) -> None:
        self._role = new
        tr = self._transfer
        if tr is not None and new != 2:
            self._transfer = None
            if tr.sent:  # the target's vote request: a fresh window to hear it lead (tick releases the hold then)
                self._transfer_backoff.pop(tr.target, None)
                self._hold(time.monotonic())
            tr.finish(None if tr.sent else fail_reason_error(FAIL_REASON.NOT_LEADER))
        t = self.transport
        if new == 2:
            t.open_gate()  # a leader sends only to peers pysyncobj believes connected
            if hasattr(self, "sync"):
                self._release_hold()  # led again before a transfer's hold ran out
        elif old == 2 and self._timing.pre_vote:
            # Stepping down: no election before a pre-vote, and no pre-vote
            # before an election timeout without a leader from now on.
            t.close_gate()
            self._pv_base_at = time.monotonic()
        log.info("group %s: %s -> %s (term %s)", self.group_id, _ROLES.get(old), _ROLES.get(new), self.sync.raftCurrentTerm if hasattr(self, "sync") else "?")

    # ---- pre-vote (driver thread) -----------------------------------------

    def _prevote_wait(self) -> float:
        """How long without a leader before a replica asks for, or grants, a
        pre-vote: 3/4 of the minimum election timeout."""
        return 0.75 * self._timing.election_min_s

    def _last_log(self) -> tuple[int, int]:
        """(index, term) of the last entry of this replica's log; (0, 0) when empty."""
        j = self.journal
        if not len(j):
            return 0, 0
        last = j[-1]
        return last[1], last[2]

    def _leader_heard_at(self, term: int, now: float) -> float:
        """When this replica last heard a leader of its current term
        ``term``, or started, stepped down or entered that term (by a vote,
        say), whichever is latest: an election timeout is counted from
        there, as pysyncobj counts its own."""
        if term != self._pv_term:
            self._pv_term = term
            self._pv_base_at = now
        t = self.transport
        if t.heard_term >= term and t.heard_at > self._pv_base_at:
            return t.heard_at
        return self._pv_base_at

    def _election_gate(self) -> None:
        """Open or close the election gate (end of a non-leader's tick).

        Closed, pysyncobj cannot stand for election (see GroupTransport.gated).
        A replica that has heard no leader of its term for 3/4 of the
        minimum election timeout (counted from its start, its step-down or
        its entering the term too) asks its peers, every two heartbeats,
        for a pre-vote: the term it would stand in and its last log entry,
        which changes nothing on either side.  Once a majority (itself
        included) answers yes, the gate opens, still before pysyncobj's own
        randomized election timer (at least the minimum) runs out, so
        elections keep their random spread.  The gate closes again once a
        leader of its term is heard after it opened; as soon as the replica
        is a candidate and the gate has been open for that 3/4 timeout
        (usually in the tick it stands: one election per opening, so a
        candidate cut off from the others stops raising its term); and once
        it has been open for the maximum election timeout without the
        replica standing (pysyncobj sees no peer then, and would stand at
        once, unasked, when one came back).

        A replica whose term is above the leader it hears (its own election
        failed, or it voted in one that did), and that has heard no leader
        of its own term for that 3/4 timeout, opens the gate without a
        pre-vote: pysyncobj ignores appends of a lower term, so without an
        election it would stay out of the group; its vote request deposes
        that leader once, as in etcd.  So does a replica a peer refused
        because the peer's term is at least the one asked for (see
        :meth:`_on_prevote`)."""
        t = self.transport
        now = time.monotonic()
        term = self.sync.raftCurrentTerm
        wait = self._prevote_wait()
        heard = self._leader_heard_at(term, now)
        if not t.gated:
            if self._role == 0 and t.heard_term >= term and t.heard_at > t.opened_at:
                t.close_gate()  # a leader of its term is back
                self._pv_round = None
            elif self._role == 1 and now - t.opened_at >= wait:
                t.close_gate()  # no winner: ask again before the next try
                self._pv_round = None
            elif self._role == 0 and now - t.opened_at >= self._timing.election_max_s:
                t.close_gate()  # never stood: ask again first
                self._pv_round = None
            return
        if t.hold or self._install is not None:
            return
        if now - heard < wait:
            return
        if 0 <= t.heard_term < term and now - t.heard_at < wait:
            log.info("group %s: term %s is above that of the leader it hears (%s): standing for election",
                     self.group_id, term, t.heard_term)
            t.open_gate()
            return
        if now < self._pv_next_at:
            return
        others = t.member_ids()
        if not others:
            t.open_gate()
            return
        self._pv_next_at = now + 2 * self._timing.heartbeat_s
        idx, lterm = self._last_log()
        ask = {"type": "pre_vote", "next_term": term + 1, "last_log_index": idx, "last_log_term": lterm}
        self._pv_round = (term + 1, set())
        self.prevotes_started += 1
        for nid in others:
            t.send_to(nid, dict(ask))

    def _on_prevote(self, node_id: NodeId, m: dict[str, Any]) -> None:
        """A peer's pre-vote request or answer (driver thread, from the transport)."""
        if m.get("type") == "pre_vote_ack":
            r = self._pv_round
            if r is None or m.get("next_term") != r[0] or not self.transport.gated:
                return
            if not m.get("granted"):
                peer_term = m.get("term")
                if isinstance(peer_term, int) and peer_term >= r[0]:
                    # The peer is in the term asked for or later, so it can
                    # never grant this replica's rounds until this replica
                    # catches up in term: one election does that, and its
                    # vote request raises no term above the peer's.  (Two
                    # replicas left, one a term ahead with the shorter log,
                    # would otherwise refuse each other for good.)
                    self._pv_round = None
                    log.info("group %s: %s is in term %s, ahead of this replica's: standing for election to catch up",
                             self.group_id, node_id, peer_term)
                    self.transport.open_gate()
                    self.host.wake(self)
                return
            r[1].add(node_id)
            if 1 + len(r[1]) > (1 + len(self.transport.member_ids())) / 2:
                self._pv_round = None
                self.prevotes_won += 1
                log.debug("group %s: pre-vote for term %s won (%s): standing for election",
                         self.group_id, r[0], ", ".join(sorted(r[1])))
                self.transport.open_gate()
                self.host.wake(self)
            return
        next_term = m.get("next_term")
        lli = m.get("last_log_index")
        llt = m.get("last_log_term")
        if not isinstance(next_term, int) or not isinstance(lli, int) or not isinstance(llt, int):
            return
        granted = self._grants_prevote(next_term, lli, llt)
        if granted:
            self.prevotes_granted += 1
        else:
            self.prevotes_refused += 1
        self.transport.send_to(node_id, {
            "type": "pre_vote_ack", "next_term": next_term, "granted": granted, "term": self.sync.raftCurrentTerm,
        })

    def _grants_prevote(self, next_term: int, last_log_index: int, last_log_term: int) -> bool:
        """Would this replica vote for a candidate standing in ``next_term``
        with that last log entry, were an election held now?  No while it
        leads or loads a snapshot; no while it hears a leader of its term,
        or started, stepped down or entered its term, within 3/4 of the
        minimum election timeout (the wait before it would ask itself: a
        stall of the leader shorter than that deposes no one); no to its
        own term or a lower one; no to a log less up to date than its own
        (Raft's vote rule)."""
        if self._role == 2 or self._install is not None:
            return False
        term = self.sync.raftCurrentTerm
        if next_term <= term:
            return False  # it may have voted in its own term (pysyncobj keeps that to itself)
        now = time.monotonic()
        if now - self._leader_heard_at(term, now) < self._prevote_wait():
            return False
        idx, lterm = self._last_log()
        return last_log_term > lterm or (last_log_term == lterm and last_log_index >= idx)

    def add_member(self, node_id: NodeId, callback: Callable[[CacheError | None], None]) -> None:
        def cb(res: Any, err: int) -> None:
            callback(None if err == FAIL_REASON.SUCCESS else fail_reason_error(err))
        self.sync.addNodeToCluster(Node(node_id), callback=cb)

    def remove_member(self, node_id: NodeId, callback: Callable[[CacheError | None], None]) -> None:
        def cb(res: Any, err: int) -> None:
            callback(None if err == FAIL_REASON.SUCCESS else fail_reason_error(err))
        self.sync.removeNodeFromCluster(Node(node_id), callback=cb)

    # ---- leadership transfer (driver thread) ------------------------------

    def transfer_leadership(self, node_id: NodeId | None, callback: Callable[[CacheError | None], None]) -> None:
        """Hand leadership to ``node_id`` (None: the follower furthest
        along among those connected), as in the Raft thesis (3.10): the
        leader stops appending, waits until the target holds its whole log,
        then sends it ``timeout_now`` (pysyncobj's ``transferLeadership``),
        so the target stands in the next term with a log no voter's is
        longer than, and wins.  pysyncobj's leader instead kept appending
        after its check, and under load the target's log was often shorter
        than a voter's by the time it asked for votes: it lost, and the
        group needed two more elections.

        Driver thread.  ``callback(None)`` once ``timeout_now`` is sent (not
        once leadership has moved: watch the group's leader for that),
        ``callback(error)`` when the transfer is refused (not the leader,
        not a member, a target behind the commit index or backed off after
        it last failed to take over: ask again later) or given up (the
        target did not catch up within ``election_min_s``).  A call for the
        target of the transfer under way joins it.

        Meanwhile proposals wait in pysyncobj's queue (:meth:`_hold`), each
        phase at most ``election_min_s``: until the target has caught up,
        then until it stands (the leader steps down on its vote request),
        then until the old leader hears the new one, to which pysyncobj
        then forwards them.  Past a window the leader gives up and leads on,
        or, stepped down with no leader heard, fails them as pysyncobj does
        (no leader: not applied)."""
        if self._role != 2:
            callback(fail_reason_error(FAIL_REASON.NOT_LEADER))
            return
        target = node_id if node_id else self._transfer_candidate()
        if target is None or target == self.self_id or target not in self._members:
            callback(Unavailable(f"no member to hand shard leadership to ({target or 'none connected'}); check the shard's replicas"))
            return
        t = self._transfer
        if t is not None:
            if t.target != target:
                callback(Unavailable(f"leadership is already being handed to {t.target}; retry once that is done"))
            elif t.sent:
                callback(None)  # timeout_now is already on its way
            else:
                t.callbacks.append(callback)
            return
        now = time.monotonic()
        until = self._transfer_backoff.get(target, (0.0, 0.0))[0]
        if now < until:
            callback(Unavailable(f"{target} did not take over when last asked; retry the transfer in {until - now:.1f} s"))
            return
        if self.match_index().get(target, 0) < self.status.commit_index:
            callback(Unavailable(f"{target} is still catching up with the leader's log; retry the transfer in a moment"))
            return
        self._transfer = _Transfer(target, self._hold(now), callback)
        self._step_transfer()

    def _transfer_candidate(self) -> NodeId | None:
        match = self.match_index()
        up = [(match.get(m, 0), m) for m in self._members if m != self.self_id and self.host.mux.link_up(m)]
        return max(up)[1] if up else None

    def _step_transfer(self) -> None:
        """Before each of the leader's ticks while a transfer is under way:
        send ``timeout_now`` once the target holds the whole log, or give
        up when the phase's window has passed."""
        t = self._transfer
        assert t is not None
        now = time.monotonic()
        if now >= t.deadline:
            self._transfer = None
            self._release_hold()
            self._back_off(t.target, now)
            if t.sent:
                log.info("group %s: %s did not stand after timeout_now; leading on", self.group_id, t.target)
            else:
                log.info("group %s: gave up handing leadership to %s: it did not catch up", self.group_id, t.target)
                t.finish(Unavailable(f"{t.target} did not catch up with the leader's log within "
                                     f"{self._timing.election_min_s:g} s; retry the transfer"))
            return
        j = self.journal
        if t.sent or not len(j) or self.match_index().get(t.target, 0) != j[-1][1]:
            return

        def sent(res: Any, err: int) -> None:
            if err == FAIL_REASON.SUCCESS:
                t.sent = True
                t.deadline = self._hold(time.monotonic())  # a whole window for the target to stand
                log.info("group %s: handing leadership to %s", self.group_id, t.target)
                t.finish(None)
            else:
                self._transfer = None
                self._release_hold()
                t.finish(fail_reason_error(err))
        self.sync.transferLeadership(Node(t.target), callback=sent)

    def _hold(self, now: float) -> float:
        """Leave pysyncobj's command queue undrained for one window
        (``election_min_s``) from ``now``; returns the window's end."""
        until = now + self._timing.election_min_s
        self.sync.hold_until = until
        return until

    def _release_hold(self) -> None:
        if self.sync.hold_until:
            self.sync.hold_until = 0.0
            self.host.wake(self)  # what waited is drained in the next tick

    def _back_off(self, target: NodeId, now: float) -> None:
        """``target`` failed to take over: refuse transfers to it for a
        while, doubling from 4 s up to 60 s, so that a target that keeps
        failing (its driver stalled, say) does not hold the shard's writes
        at every attempt of the preferred-leader moves."""
        delay = min(2 * self._transfer_backoff.get(target, (0.0, 2.0))[1], 60.0)
        self._transfer_backoff[target] = (now + delay, delay)

    def force_compaction(self) -> None:
        self.sync.forceLogCompaction()

    def destroy(self) -> None:
        self.destroyed = True
        tr, self._transfer = self._transfer, None
        if tr is not None:
            tr.finish(Unavailable("the replica was removed during a leadership transfer; retry"))
        self.sync.fail_queued()  # never ticked again: what waits in the queue was never appended
        self._close_rx()
        if self._install is not None:
            self._install.close()
            self._install = None
        with self._reads_lock:
            reads, self._reads = self._reads, []
        for f in reads:
            f.set_exception(Unavailable("replica removed"))
        self.journal.flush_meta()
        self.transport.destroy()
        self.sync._doDestroy()

    # ---- snapshots (pysyncobj serializer hooks, driver thread) -----------

    def _start_snapshot(self, tmp_file: str, data: tuple[Any, Any, Any]) -> None:
        """pysyncobj's serializer hook (driver thread): start writing a snapshot.

        The state is streamed by a thread of its own from a read transaction
        (committed state), so a large shard no longer stalls the node's
        driver (every group's heartbeats, votes and commits) for as long as
        its dump takes.  The dump must hold every apply done so far: the
        writer first waits until the committed applied index reaches the
        one in the batch now.  It may hold later applies too; a replica
        that installs it skips re-applying those (apply is idempotent by
        index).  Always raises (see :class:`_SnapshotStarted`)."""
        fut: Future[int] = Future()
        self._snap = (fut, self._snap_installs)
        self._snap_done_at = None
        try:
            last, prev, cluster = data
            header = pickle.dumps((last, prev, sorted(n.id for n in cluster)))
            need = self.host.batch().state(self.group_id).applied_index()
            threading.Thread(
                target=self._dump_snapshot, args=(fut, header, need, int(last[1])),
                name=f"snapshot-{self.group_id}", daemon=True,
            ).start()
        except Exception as e:  # reported through _snapshot_state as FAILED
            fut.set_exception(e)
        raise _SnapshotStarted

    def _dump_snapshot(self, fut: Future[int], header: bytes, need: int, index: int) -> None:
        """Snapshot writer thread: ``<file>.part`` with header, state, CRC, fsynced.

        Renaming it onto the snapshot file is left to the driver thread
        (:meth:`_snapshot_state`), where pysyncobj also installs snapshots
        received from a leader: the two never interleave."""
        try:
            # While a lagging follower is still fed its backlog, pysyncobj's
            # nextIndex for it falls back with each piece's ack; compacting
            # the log then would make pysyncobj start sending it a snapshot
            # (the whole state, again) instead of the entries already on
            # their way.  So compaction waits until the backlog has left.
            hold_deadline = time.monotonic() + SNAPSHOT_HOLD_WAIT_S
            while self.transport.holding and time.monotonic() < hold_deadline and not self.destroyed:
                time.sleep(0.01)
            with self.host.snapshot_lock:
                reader = self.host.storage.reader(self.group_id)
                deadline = time.monotonic() + SNAPSHOT_COMMIT_WAIT_S
                while reader.applied_index() < need:
                    if self.destroyed:
                        raise Unavailable("replica removed")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"applies up to index {need} not committed within {SNAPSHOT_COMMIT_WAIT_S:g}s")
                    time.sleep(0.005)
                with open(self._snapshot_file + ".part", "wb") as f:
                    w = _CrcWriter(f)
                    w.write(_SNAP_MAGIC + _U32.pack(len(header)) + header)
                    reader.dump(w)  # type: ignore[arg-type]
                    f.write(_U32.pack(w.crc))
                    f.flush()
                    os.fsync(f.fileno())
            fut.set_result(index)
        except BaseException as e:  # noqa: BLE001 - reported on the driver thread
            fut.set_exception(e)

    def _a_follower_lacks(self, first_kept: int) -> bool:
        """True while this leader's snapshot may not be reported yet: a
        connected follower has not acknowledged entry ``first_kept`` (the
        first one pysyncobj keeps once it hears the snapshot is in) and the
        dump has been done for less than ``snapshot_follower_wait_s`` (see
        there).  Not waited for: a follower whose link is down (it cannot
        answer meanwhile) and one sent a whole snapshot that has not
        answered since.  Driver thread."""
        if self._role != 2:
            return False
        now = time.monotonic()
        if self._snap_done_at is None:
            self._snap_done_at = now
        if now - self._snap_done_at >= self._timing.snapshot_follower_wait_s:
            return False
        match = self.match_index()
        installing = self.transport.installing_peers
        sync = self.sync
        return any(
            match.get(n.id, 0) < first_kept and n.id not in installing and sync.isNodeConnected(n)
            for n in sync.otherNodes
        )

    def _snapshot_state(self) -> int:
        """pysyncobj's serializeChecker (driver thread, every tick).  A
        written snapshot is reported (and pysyncobj then drops the log it
        covers) only once :meth:`_a_follower_lacks` allows it."""
        if self._snap is None:
            return int(SERIALIZER_STATE.NOT_SERIALIZING)
        fut, installs = self._snap
        if not fut.done():
            return int(SERIALIZER_STATE.SERIALIZING)
        if fut.exception() is None and self._snap_installs == installs and self._a_follower_lacks(fut.result() - 1):
            return int(SERIALIZER_STATE.SERIALIZING)
        self._snap = None
        part = self._snapshot_file + ".part"
        err = fut.exception()
        if err is None and self._snap_installs != installs:
            err = RuntimeError("a snapshot from the leader was installed meanwhile")
        if err is None:
            try:
                os.replace(part, self._snapshot_file)
                fsync_dir(os.path.dirname(self._snapshot_file))
            except OSError as e:
                err = e
        if err is not None:
            with contextlib.suppress(OSError):
                os.unlink(part)
            if not self.destroyed:
                log.warning("group %s: snapshot not written (log kept): %s", self.group_id, err)
            self._compact_after = time.monotonic() + COMPACT_RETRY_S
            return int(SERIALIZER_STATE.FAILED)
        state = self.host.storage.reader(self.group_id).size_bytes()
        if state:
            self._snap_ratio = max(1.0, self._snapshot_bytes() / state)
        self.snapshots_written += 1
        log.info("group %s: snapshot at index %s written", self.group_id, fut.result())
        return int(SERIALIZER_STATE.SUCCESS)

    # ---- receiving a snapshot (follower; transport and driver thread) ------

    def _on_snapshot_piece(self, node_id: NodeId, message: dict[str, Any]) -> dict[str, Any]:
        """The transport's receiver: one piece of a snapshot a leader sends.

        Written to ``<snapshot>.incoming`` here, not by pysyncobj, whose
        install would load the whole snapshot in one storage batch: one
        commit of it all on the driver (3 s in a 2,000 MiB move, every group
        of the node waiting) and all its pages in memory.  pysyncobj gets the
        message without its data, so it still hears from its leader (term,
        election timer), and with commit index 0: pysyncobj would otherwise
        raise its commit index on a snapshot piece without checking its log
        against the leader's.  A piece counts only if it belongs to the
        transmission this replica is receiving (same leader and term, begun
        with ``isFirst``).  The last piece starts the install."""
        data, first, last = message["serialized"]
        term = message.get("term", 0)
        passed = dict(message, serialized=None, commit_index=0)
        if term < self.sync.raftCurrentTerm or not isinstance(data, bytes | bytearray):
            return passed  # an old leader's: pysyncobj ignores the message too
        if first:
            self._close_rx()
            self._rx = (node_id, term, open(self._incoming, "wb"))  # noqa: SIM115 - closed at the last piece
        rx = self._rx
        if rx is None or rx[0] != node_id or rx[1] != term:
            return passed  # a piece of a transmission this replica is not receiving
        rx[2].write(data)
        if last:
            self._rx = None
            rx[2].close()
            self._begin_install(node_id, message)
        self._say_receiving(node_id)
        return passed

    def _say_receiving(self, leader: NodeId) -> None:
        """Tell ``leader`` that this replica hears it while it receives or
        loads the leader's snapshot (driver thread: at each piece, and at
        each tick while a transmission of the current leader and term is
        open or the snapshot loads; at most once a heartbeat).

        pysyncobj's follower answers no snapshot piece, and a replica that
        loads one is frozen and answers nothing, so its leader heard nothing
        from it for the whole transfer and install.  When that replica was
        the leader's only live follower (one node down, another catching up
        after a restart), the leader gave up leading after
        ``leader_fallback_s``, was elected again, and began the snapshot
        anew if it fell back during the transfer (a new term drops what it
        was sending), or cost an election if during the load (seen once in
        a 16-shard reproduction: 39 fallbacks, shards unwritable for up to
        13 s); a snapshot too large to send within the fallback would never
        get through.
        The answer has the form of pysyncobj's follower's answer to each
        chunk of a large entry (``next_node_idx``, neither success nor
        reset; the index, which that leaves unread, is 0): the leader's
        pysyncobj only notes that the follower answered.  The
        ``receiving`` mark tells the leader's transport that the snapshot is
        not in yet (:meth:`GroupTransport._deliver_now`)."""
        now = time.monotonic()
        if now - self._receiving_said_at < self._timing.heartbeat_s:
            return
        self._receiving_said_at = now
        if self.transport.say_receiving(leader):
            self.receiving_said += 1

    def _close_rx(self) -> None:
        if self._rx is not None:
            self._rx[2].close()
            self._rx = None

    def _begin_install(self, node_id: NodeId, message: dict[str, Any]) -> None:
        """Freeze the replica (no tick, every message held) and verify the
        received file on a thread of its own; :meth:`_install_step` goes on."""
        self.transport.frozen = True
        inst = self._install = _Install(node_id, message)
        threading.Thread(
            target=self._verify_incoming, args=(inst.verified,),
            name=f"install-{self.group_id}", daemon=True,
        ).start()
        log.info("group %s: snapshot received from %s; verifying it", self.group_id, node_id)

    def _verify_incoming(self, fut: Future[tuple[tuple[Any, Any, Any], int]]) -> None:
        """Install thread: CRC over the whole file, fsync it, read its header."""
        try:
            with open(self._incoming, "rb") as f:
                header, _ = _checked_snapshot(f, self._incoming)
                os.fsync(f.fileno())
                fut.set_result((header, f.tell()))
        except BaseException as e:  # noqa: BLE001 - reported on the driver thread
            fut.set_exception(e)
        self.host.wake(self)

    def _install_step(self) -> None:
        """Driver thread, instead of pysyncobj's tick while installing: one
        step, then wake for the next.  Steps: wait for the verification;
        mark the state installing (readers refuse it) and delete the old
        state, INSTALL_CLEAR_RECORDS at a time; load
        ``snapshot_install_chunk_bytes`` of records at a time; then the meta, and hand pysyncobj the install
        (:meth:`_finish_install`), all in the host's storage batches."""
        inst = self._install
        assert inst is not None
        self.install_steps += 1
        if inst.records is None:
            if not inst.verified.done():
                return  # the verifier wakes us
            err = inst.verified.exception()
            if err is not None:
                log.warning("group %s: received snapshot rejected (%s); the leader will send it again",
                            self.group_id, err)
                self._install = None
                inst.close()
                with contextlib.suppress(OSError):
                    os.unlink(self._incoming)
                self._thaw()
                return
            (last, prev, cluster), offset = inst.verified.result()
            inst.header = (last, prev, cluster)
            state = self.host.durable_batch().state(self.group_id)
            if last[1] <= state.applied_index():
                self._finish_install()  # this replica's state is already as new
                return
            try:
                inst.open(self._incoming, offset)
            except (OSError, ValueError) as e:
                log.warning("group %s: received snapshot unreadable (%s); the leader will send it again",
                            self.group_id, e)
                self._install = None
                inst.close()
                self._thaw()
                return
            state.begin_install()
            log.info("group %s: installing the snapshot at index %s (%.1f MiB) in steps",
                     self.group_id, last[1], inst.size / (1 << 20))
        else:
            state = self.host.durable_batch().state(self.group_id)
            try:
                if inst.clearing:
                    inst.clearing = not state.clear_some(INSTALL_CLEAR_RECORDS)
                    done = False
                else:
                    done = inst.load_into(state, self._timing.snapshot_install_chunk_bytes)
            except StorageFault:
                raise
            except Exception as err:
                # Half the state is replaced and cannot be resumed or undone
                # here (the file passed its CRC: the disk failed).  Stop; at
                # restart the mark makes the node rebuild the replica.
                raise StorageFault(
                    f"group {self.group_id}: installing a snapshot failed half way ({type(err).__name__}: {err}); "
                    "the node stops, and rebuilds the replica when restarted"
                ) from err
            if done:
                self._finish_install()
                return
        self.host.wake(self)

    def _installed_taken(self) -> bool:
        """Whether pysyncobj's deserializer took ``_installed``.  A method,
        not an inline test: right after the assignment, the type checker
        (and so the compiled code, which trusts it) takes the attribute for
        the tuple just stored, though the call in between may reset it."""
        return self._installed is None

    def _finish_install(self) -> None:
        """The state is loaded (in the current batch): pysyncobj installs
        the snapshot now (log, applied index, members) as if its last piece
        had just arrived; what waited meanwhile follows from the next tick
        on, in order, a part per iteration."""
        inst = self._install
        assert inst is not None and inst.header is not None
        self._install = None
        inst.close()
        self._installed = inst.header
        self.transport.frozen = False
        self.transport.pass_on(inst.node, dict(inst.message, serialized=_INSTALLED))
        if not self._installed_taken():  # pysyncobj did not take it (a newer term meanwhile?)
            self._installed = None
            log.warning("group %s: pysyncobj did not install the received snapshot", self.group_id)
        else:
            self.snapshots_installed += 1
            last = inst.header[0]
            log.info("group %s: installed snapshot at index %s", self.group_id, last[1])
            skipped = self.sync.fail_skipped(int(last[1]))
            if skipped:
                log.info("group %s: %d proposals whose entries the snapshot covers end as outcome unknown",
                         self.group_id, skipped)
            if self._on_installed is not None:
                self._on_installed(int(last[1]), int(last[2]))
        self.status = self._read_status()
        self.host.wake(self)  # what waited meanwhile follows, a part per iteration (tick)

    def _thaw(self) -> None:
        self.transport.frozen = False
        self.host.wake(self)

    def _move_incoming_into_place(self) -> None:
        """SnapshotTransfer.on_installed (driver thread, inside pysyncobj's
        install): the received, verified and loaded file becomes this
        replica's snapshot."""
        try:
            os.replace(self._incoming, self._snapshot_file)
            fsync_dir(os.path.dirname(self._snapshot_file))
        except OSError as e:  # the state is loaded, pysyncobj not told: stop, restart rebuilds
            raise StorageFault(f"group {self.group_id}: cannot put the installed snapshot in place: {e}") from e

    def _read_snapshot_or_fail(self, filename: str) -> tuple[Any, Any, Any]:
        """The deserializer pysyncobj calls.  pysyncobj logs and swallows any
        exception from it, so a StorageFault (the state may be half-loaded
        in the open batch) is also handed to the host, which stops the
        driver before that batch can commit."""
        try:
            return self._read_snapshot(filename)
        except StorageFault as e:
            self.host.fail(e)
            raise

    def _read_snapshot(self, filename: str) -> tuple[Any, Any, Any]:
        """Load a snapshot (local restart, or one received from the leader).

        Replaces the LMDB state only when the snapshot is newer than what LMDB
        already holds; verifies the CRC over the whole file first, so a torn
        or corrupt file never leaves a half-loaded state."""
        if self._installed is not None:
            # Received from the leader and already loaded, piece by piece
            # (_install_step); the file was verified before that.
            last, prev, cluster = self._installed
            self._installed = None
            self._snap_installs += 1
            self.journal.align_to(prev)
            return last, prev, [Node(i) for i in cluster]
        with open(filename, "rb") as f:
            (last, prev, cluster), size = _checked_snapshot(f, filename)
            self._snap_installs += 1
            state = self.host.durable_batch().state(self.group_id)
            if last[1] > state.applied_index():
                state.load(_LimitedReader(f, size - 4 - f.tell()))  # type: ignore[arg-type]
                self.snapshots_installed += 1
                log.info("group %s: installed snapshot at index %s", self.group_id, last[1])
        self.journal.align_to(prev)
        # As Node objects: pysyncobj drops its own node from this list by
        # comparing with its self Node, which never equals a plain id; with
        # ids, a replica that loaded a snapshot counted ITSELF as a fourth
        # member, needed 3 votes of 4 and could not elect a leader (or stay
        # one) with one peer down.
        return last, prev, [Node(i) for i in cluster]


def _checked_snapshot(f: Any, name: str) -> tuple[tuple[Any, Any, Any], int]:
    """Verify the CRC over the whole snapshot file ``f`` (a torn or corrupt
    file must never leave a half-loaded state), then read its header:
    ((last entry, previous entry, member ids), file size), ``f`` left at
    the start of the dump.  ValueError if it is not a sound snapshot."""
    size = os.fstat(f.fileno()).st_size
    crc = 0
    remaining = size - 4
    while remaining > 0:
        chunk = f.read(min(remaining, 1 << 20))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        remaining -= len(chunk)
    tail = f.read(4)
    if len(tail) != 4 or _U32.unpack(tail)[0] != crc:
        raise ValueError(f"snapshot {name} is corrupt (crc mismatch)")
    f.seek(0)
    if f.read(len(_SNAP_MAGIC)) != _SNAP_MAGIC:
        raise ValueError(f"{name} is not a cachenode snapshot")
    (hlen,) = _U32.unpack(f.read(4))
    return pickle.loads(f.read(hlen)), size


class _Transfer:
    """A leadership transfer under way (driver thread)."""

    def __init__(self, target: NodeId, deadline: float, callback: Callable[[CacheError | None], None]) -> None:
        self.target = target
        self.deadline = deadline
        self.callbacks = [callback]
        self.sent = False  # timeout_now is on its way

    def finish(self, err: CacheError | None) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for cb in callbacks:
            cb(err)


class _Install:
    """A snapshot received from a leader, being loaded (driver thread, but
    ``verified``, which the install thread resolves)."""

    def __init__(self, node: NodeId, message: dict[str, Any]) -> None:
        self.node = node
        self.message = message  # the last piece, handed to pysyncobj at the end
        self.verified: Future[tuple[tuple[Any, Any, Any], int]] = Future()
        self.header: tuple[Any, Any, Any] | None = None
        self.records: Iterator[tuple[int, bytes, bytes]] | None = None
        self.clearing = True
        self.size = 0
        self._f: Any = None
        self._dump: DumpReader | None = None

    def open(self, path: str, offset: int) -> None:
        self.size = os.path.getsize(path)
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._f.seek(offset)
        self._dump = DumpReader(_LimitedReader(self._f, self.size - 4 - offset))  # type: ignore[arg-type]
        self.records = self._dump.records()

    def load_into(self, state: Any, budget: int) -> bool:
        """Write about ``budget`` bytes of records; True (meta written) once all are."""
        assert self.records is not None and self._dump is not None
        chunk = []
        n = 0
        for rec in self.records:
            chunk.append(rec)
            n += len(rec[1]) + len(rec[2])
            if n >= budget:
                state.install_records(chunk)
                return False
        state.install_records(chunk)
        d = self._dump
        state.end_install(d.applied_index, d.clock_ms, d.count, d.size_bytes)
        return True

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class _CrcWriter:
    def __init__(self, f: Any) -> None:
        self._f = f
        self.crc = 0

    def write(self, b: bytes) -> int:
        self.crc = zlib.crc32(b, self.crc)
        return int(self._f.write(b))

    def flush(self) -> None:
        self._f.flush()


class _LimitedReader:
    def __init__(self, f: Any, limit: int) -> None:
        self._f = f
        self._left = limit

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        b = bytes(self._f.read(n))
        self._left -= len(b)
        return b

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    # Seekable within the limit (LmdbStorage's load reads a dump twice).
    def seekable(self) -> bool:
        return bool(self._f.seekable())

    def tell(self) -> int:
        return int(self._f.tell())

    def seek(self, pos: int) -> int:
        self._left += self._f.tell() - pos
        return int(self._f.seek(pos))
