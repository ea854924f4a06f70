"""The pysyncobj ``SyncObj`` subclass of one Raft group, kept interpreted:
pysyncobj's ``@replicated`` decorator reads function attributes that
compiled (mypyc) methods do not have."""

from __future__ import annotations

import pickle
import queue
import time
from collections.abc import Callable
from typing import Any

from pysyncobj import SyncObj, replicated
from pysyncobj import syncobj as _pysyncobj
from pysyncobj.config import FAIL_REASON
from pysyncobj.syncobj import _COMMAND_TYPE

_REGULAR = _COMMAND_TYPE.REGULAR


class _NoPoller:
    """Stands in for a group's pysyncobj poller: our transport has no
    sockets of its own (the host polls the one Raft port), so the poller
    every tick ends with watched nothing, yet cost a ``poll`` system call per
    group per tick (1,700 a second on an idle node of 16 shards)."""

    def subscribe(self, *args: Any) -> None:
        raise RuntimeError("a pysyncobj group here watches no socket (the host's RaftMux does)")

    def unsubscribe(self, *args: Any) -> None:
        pass

    def poll(self, timeout: float) -> None:
        pass


class GroupSyncObj(SyncObj):  # type: ignore[misc]
    def __init__(self, transfer_factory: Callable[[Any, str], Any], apply_fn: Callable[[bytes, int], bytes], *args: Any, **kwargs: Any) -> None:
        self._apply_fn = apply_fn
        self._apply_entry_id: int | None = None
        self._commands_queued = False
        # The leader's new stamp for a payload another replica forwarded
        # (RaftGroup's ``restamp``); None: appended as forwarded.
        self.restamp: Callable[[bytes], bytes] | None = None
        # Until this time.monotonic() instant the queue is not drained: a
        # leadership transfer under way (RaftGroup.transfer_leadership).
        self.hold_until = 0.0
        super().__init__(*args, **kwargs)
        conf = self._getConf()
        if conf.commandsWaitLeader:
            # pysyncobj's drain would stop while there is no leader, after
            # the flag was lowered (see _checkCommandsToApply).
            raise ValueError("GroupSyncObj needs commandsWaitLeader=False")
        self._drain_period_s = float(conf.appendEntriesPeriod)
        self._poller = _NoPoller()
        # The one pysyncobj internal replaced: see SnapshotTransfer (pinned by
        # tests/test_group_transport.py::test_pysyncobj_internals_we_lean_on).
        inner: Any = getattr(self, "_SyncObj__serializer")  # noqa: B009 - name-mangled
        self.transfer = transfer_factory(inner, self._getConf().fullDumpFile)
        self._SyncObj__serializer = self.transfer

    @replicated  # type: ignore[untyped-decorator]
    def apply_entry(self, payload: bytes) -> bytes:
        # pysyncobj raises raftLastApplied only after this returns, so the
        # index of the entry being applied is raftLastApplied + 1.
        return self._apply_fn(payload, self.raftLastApplied + 1)

    def propose_entry(self, payload: bytes, callback: Callable[[Any, int], None]) -> None:
        """What ``apply_entry(payload, callback=...)`` does, but the command
        pickled with protocol 5 instead of the decorator's protocol 2: any
        thread.

        Protocol 2 pickles ``bytes`` as a latin-1 *string* (``_codecs.encode``),
        so every payload byte over 127 became two in the log, on the wire
        and in the journal (random values: 1.5x), and took 8-9 us per 7 KiB
        to pickle and to unpickle again on every replica (protocol 5: 0.4 us,
        a copy).  pysyncobj unpickles whatever protocol it gets (its
        ``__doApplyCommand`` calls ``pickle.loads``) and dispatches by the
        method id exactly as for the decorator's commands."""
        self._applyCommand(pickle.dumps((self._entry_func_id(), (payload,)), protocol=5), callback, _REGULAR)

    def _entry_func_id(self) -> int:
        """The method id pysyncobj gave :meth:`apply_entry`."""
        func_id = self._apply_entry_id
        if func_id is None:
            func_id = self._apply_entry_id = self._methodToID[self._getFuncName("apply_entry")]
        return func_id

    def _applyCommand(self, command: bytes, callback: Any, commandType: int | None = None) -> None:  # noqa: N802, N803 - pysyncobj's names
        """Every command pysyncobj queues (ours, membership changes, a
        follower's forwarded ones) passes here: any thread.  The flag is
        raised only after the command is in the queue, and the driver lowers
        it before it drains (:meth:`_checkCommandsToApply`), so a command is
        never left queued with the flag down.

        pysyncobj passes no ``commandType`` only for a command another
        replica forwarded (an ``apply_command`` message, driver thread):
        its type byte is already on it, and its payload goes through
        :attr:`restamp` (:meth:`_restamped`).  Should that raise, the
        command is refused (the forwarder learns it was not applied) and
        the error goes on to the host, as any other in a driver step."""
        try:
            if commandType is None and self.restamp is not None:
                try:
                    command = self._restamped(command, self.restamp)
                except BaseException:
                    self._SyncObj__callErrCallback(FAIL_REASON.REQUEST_DENIED, callback)
                    raise
            super()._applyCommand(command, callback, commandType)
        finally:
            self._commands_queued = True

    def _restamped(self, command: bytes, restamp: Callable[[bytes], bytes]) -> bytes:
        """A forwarded command with ``restamp`` applied to its payload, when
        it is one of ours (:meth:`propose_entry`'s shape); anything else
        (membership changes, what does not unpickle) as it came."""
        if command[:1] != bytes((_REGULAR,)):
            return command
        try:
            func_id, args = pickle.loads(command[1:])
        except Exception:  # noqa: BLE001 - not our shape: pysyncobj judges it when it applies it
            return command
        if func_id != self._entry_func_id() or type(args) is not tuple or len(args) != 1 or type(args[0]) is not bytes:
            return command
        payload = restamp(args[0])
        if payload is args[0]:
            return command
        return bytes((_REGULAR,)) + pickle.dumps((func_id, (payload,)), protocol=5)

    def fail_queued(self) -> None:
        """Fail every command still in the queue with NOT_LEADER (it was
        never appended): a replica being removed is not ticked again.
        Driver thread.  A command another replica forwarded here gets no
        answer; its proposer's own deadline ends it."""
        q: Any = getattr(self, "_SyncObj__commandsQueue")  # noqa: B009 - name-mangled
        while True:
            try:
                _, callback = q.get_nowait()
            except queue.Empty:
                break
            if callback is not None and not isinstance(callback, tuple):
                callback(None, FAIL_REASON.NOT_LEADER)
        self._commands_queued = False

    def fail_skipped(self, last_index: int) -> int:
        """Fail, as outcome unknown, every command waiting on a log entry at
        or below ``last_index``; return how many.  Driver thread, once a
        received snapshot ending at ``last_index`` is installed: pysyncobj
        calls such a command back only when it applies the entry, and
        applies on from the snapshot's end, so the command would wait for
        ever.  (A leader cut off from its followers, then caught up by a
        snapshot, held its clients' writes until their deadlines.)  The
        entry may or may not have been committed into the snapshot: the
        caller retries with the same request id, which the dedup table
        answers either way."""
        waiting: Any = getattr(self, "_SyncObj__commandsWaitingCommit")  # noqa: B009 - name-mangled
        failed = 0
        for idx in [i for i in waiting if i <= last_index]:
            for _term, callback in waiting.pop(idx):
                callback(None, FAIL_REASON.UNKNOWN_OUTCOME)
                failed += 1
        return failed

    def _checkCommandsToApply(self) -> None:  # noqa: N802 - pysyncobj's name
        """pysyncobj drains its command queue at the end of every tick, by
        ``get_nowait`` until the queue raises ``Empty``, with a clock read
        per round: about 5 % of the nodes' Python time in `set` besides the
        appends it sends, mostly in ticks with nothing queued (a follower's
        periodic ticks, a leader's ticks for acks).  It now runs only when
        something was queued since the last drain (driver thread): an idle
        tick costs about a quarter less.

        While ``hold_until`` lies ahead nothing is drained (the flag stays
        up): a leader handing over leadership appends nothing its target
        lacks, and a replica that just stepped down forwards nothing before
        it knows the new leader."""
        if not self._commands_queued:
            return
        if self.hold_until:
            if time.monotonic() < self.hold_until:
                return
            self.hold_until = 0.0
        self._commands_queued = False
        clock = _pysyncobj.monotonicTime  # pysyncobj's own clock (CLOCK_MONOTONIC_RAW), read as it reads it
        started = clock()
        try:
            super()._checkCommandsToApply()
        except BaseException:
            # The host logs a failed tick and goes on: the next tick drains
            # what is left, as it did before.
            self._commands_queued = True
            raise
        if clock() - started >= 0.5 * self._drain_period_s:
            # pysyncobj stops draining after one append period (on the same
            # clock, started after ours): what is left waits for the next
            # tick, as it did before.  Half the period is margin: an extra
            # drain of an empty queue costs a few microseconds.
            self._commands_queued = True
