"""The replica-move phase of ``cachectl bench``: how long moving one shard replica takes.

:class:`ReplicaMove` runs on a fresh cluster the caller started (and stops):

1. pauses the ``balance-replica`` and ``balance-leader`` schedulers, so the
   only data the placement driver (PD) moves is ours, and waits until every
   node reports its own preferred-leader moves paused;
2. fills ONE shard with ``mb`` MiB of 64 KiB random values: keys are picked
   with the client's own route table, written with ``MSet`` (8 values, one
   Raft entry, per call; 4 calls in flight) through the smart client;
3. starts a new node that joins (``cluster.add_node()``) and waits until the
   PD reports it up;
4. adds a ``move-replica`` operator for that shard from a node holding a
   FOLLOWER replica to the new node, and times it from the ``AddOperator``
   call to the operator's ``success`` in ``GetPdStatus`` (polled every
   0.1 s); on the way it records when each operator step was seen done and
   when the new replica's applied index reached the leader's applied index
   as of the call (the data transfer proper);
5. verifies: the map lists the new node and not the source, the new
   replica holds exactly the keys written, a sample read with ``stale``
   consistency on the new node is served by it with the right bytes, and
   every key reads back right through the smart client.  Anything wrong
   raises :class:`~cachenode.bench.systems.BenchError`; ``verified`` is true
   only when all of it held.

:attr:`ReplicaMove.doc` is the result (``move_replica`` in the bench
document, fields in docs/benchmarks.md); it is filled as the phase goes, so
it says how far a failed phase got.  Blocking; call from one thread.
Starts and stops no process itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from rich.progress import Progress

from cachenode._errors import CacheError
from cachenode.bench.loadgen import bench_key
from cachenode.bench.systems import BenchError, anon_rss_bytes
from cachenode.client import CacheClient, NodeStatus
from cachenode.pd.operator import STEP_TIMEOUT_S
from cachenode.v1 import cache_pb2 as pb

__all__ = ["MIB", "VALUE_BYTES", "MoveCluster", "ReplicaMove"]

MIB = 1 << 20
VALUE_BYTES = 64 * 1024
FILL_BATCH = 8
"""Values per MSet: 512 KiB, one Raft entry."""
FILL_INFLIGHT = 4
PAUSED = ("balance-replica", "balance-leader")
PD_READY_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 60.0
MOVE_TIMEOUT_S = sum(STEP_TIMEOUT_S.values()) + 30.0
"""Past every step's own PD timeout: the operator has ended by then."""
CATCH_UP_GRACE_S = 30.0
MAP_SETTLE_S = 10.0
"""How long after the operator's success every node may take to serve the new map."""
POLL_S = 0.1
STALE_SAMPLE = 64
READ_BATCH = 16
METHOD = (
    "fresh 3-node cluster, balance-replica and balance-leader paused; one shard filled with "
    "MSet of 64 KiB random values through the smart client; a 4th node joins; seconds = from the "
    "AddOperator(move-replica, follower -> new node) call to the operator's success in "
    "GetPdStatus, polled every 0.1 s (includes the PD's heartbeat-paced steps); caught_up_s = "
    "until the new replica's applied index reached the leader's applied index as of the call"
)


class MoveCluster(Protocol):
    """What the phase needs of the cluster the caller runs."""

    def endpoints(self) -> tuple[str, ...]: ...

    def add_node(self) -> tuple[str, str]:
        """Start a node that joins; returns its id and client address once it answers."""
        ...

    def node_log(self, node_id: str) -> Path | None: ...

    def pids(self) -> dict[str, int]:
        """Node id -> pid of every node running (the memory samples)."""
        ...


class _HeapWatch:
    """Anonymous resident memory (``RssAnon``) of some nodes, sampled at
    every poll of the move: what each held at the start and at most."""

    def __init__(self, nodes: dict[str, str], pids: dict[str, int]) -> None:
        self._pids = {role: (node, pids.get(node)) for role, node in nodes.items()}
        self._start: dict[str, int] = {}
        self._peak: dict[str, int] = {}
        self.sample()

    def sample(self) -> None:
        for role, (_, pid) in self._pids.items():
            b = anon_rss_bytes(pid) if pid else None
            if b is not None:
                self._start.setdefault(role, b)
                self._peak[role] = max(self._peak.get(role, 0), b)

    def doc(self) -> dict[str, Any]:
        return {
            role: {
                "node": node,
                "rss_anon_start_bytes": self._start.get(role),
                "rss_anon_peak_bytes": self._peak.get(role),
            }
            for role, (node, _) in self._pids.items()
        }


def _wait_until(check: Callable[[], bool | None], end: float, failure: Callable[[], str]) -> None:
    """Poll ``check`` every ``POLL_S`` until it returns True; at monotonic
    time ``end`` raise BenchError with ``failure()`` (evaluated then, so it
    can name what was last seen)."""
    while not check():
        if time.monotonic() >= end:
            raise BenchError(f"replica move: {failure()}")
        time.sleep(POLL_S)


def _digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16).digest()


class ReplicaMove:
    """One replica move of ``mb`` MiB on ``cluster`` (see the module docstring)."""

    def __init__(
        self,
        cluster: MoveCluster,
        mb: int,
        *,
        progress: Progress,
        note: Callable[[str], None],
    ) -> None:
        if mb < 1:
            raise ValueError(f"mb must be >= 1, got {mb}")
        self.cluster = cluster
        self.mb = mb
        self.progress = progress
        self.note = note
        self.keys = -(-mb * MIB // VALUE_BYTES)
        self.doc: dict[str, Any] = {
            "mb": mb,
            "bytes": self.keys * VALUE_BYTES,
            "keys": self.keys,
            "value_bytes": VALUE_BYTES,
            "seconds": None,
            "mb_per_s": None,
            "verified": False,
            "method": METHOD,
        }
        self._stage = "starting"

    # -- the phase --

    def run(self) -> dict[str, Any]:
        """Run every step; returns :attr:`doc`.  Raises BenchError naming the step that failed."""
        try:
            with CacheClient(self.cluster.endpoints(), timeout=30.0, max_attempts=10) as client:
                self._stage = "pausing the schedulers"
                self._pause(client)
                self._stage = "filling the shard"
                shard, keys, digests = self._fill(client)
                self._stage = "adding the new node"
                new_id, new_address = self._join(client)
                self._stage = "moving the replica"
                source, applied0 = self._move(client, shard, new_id, new_address)
                self._stage = "verifying"
                self._verify(client, shard, source, new_id, new_address, applied0, keys, digests)
        except CacheError as err:
            raise BenchError(f"replica move, {self._stage}: {err}") from None
        return self.doc

    def _pause(self, client: CacheClient) -> None:
        """Pause the schedulers that would move replicas or leaders beside our operator."""
        end = time.monotonic() + PD_READY_TIMEOUT_S
        for name in PAUSED:
            while True:
                try:
                    resp = client.placement_driver(
                        "SetScheduler", pb.SchedulerRequest(name=name, paused=True), f"pause {name}"
                    )
                    break
                except CacheError as err:  # the PD may still be taking over after start-up
                    if time.monotonic() >= end:
                        raise BenchError(
                            f"replica move: could not pause {name} within {PD_READY_TIMEOUT_S:g}s ({err})"
                        ) from None
                    time.sleep(0.25)
            if name not in resp.paused:
                raise BenchError(
                    f"replica move: {name} is not paused after pausing it ({resp.paused})"
                )
        # Nodes hear of the pause in their next heartbeat reply; until then
        # one could still hand a leader to its preferred replica mid-fill.
        modes: dict[str, str] = {}

        def all_paused() -> bool | None:
            modes.clear()
            for n in client.cluster_map(refresh=True).nodes:
                try:
                    modes[n.id] = client.node_status(n.address).leader_balancing
                except CacheError as err:
                    modes[n.id] = str(err)
            return True if all(m in ("paused", "off") for m in modes.values()) else None

        _wait_until(all_paused, end, lambda: f"leader balancing not paused on every node within {PD_READY_TIMEOUT_S:g}s: {modes}")
        self.doc["paused"] = list(PAUSED)

    def _fill(self, client: CacheClient) -> tuple[int, list[bytes], list[bytes]]:
        """Write ``keys`` values into the first shard; returns (shard, keys, their digests)."""
        cmap = client.cluster_map(refresh=True)
        table = client.route_table
        assert table is not None
        shard = min(s.id for s in cmap.shards)
        keys: list[bytes] = []
        i = 0
        while len(keys) < self.keys:
            key = bench_key("mv:", i)
            if table.shard_for_key(key).id == shard:  # the client's own routing
                keys.append(key)
            i += 1
        self.doc["shard"] = shard
        digests: list[bytes] = [b""] * len(keys)
        task = self.progress.add_task(
            f"replica move: writing {self.mb} MiB into shard {shard}", total=len(keys)
        )
        self.note(
            f"replica move: writing {self.mb} MiB ({len(keys)} values of 64 KiB) into shard {shard}"
        )
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(FILL_INFLIGHT) as pool:
            pending: set[concurrent.futures.Future[int]] = set()

            def settle(done: set[concurrent.futures.Future[int]]) -> None:
                for fut in done:
                    self.progress.advance(task, fut.result())  # raises the write's error

            for start in range(0, len(keys), FILL_BATCH):
                items = []
                for j in range(start, min(start + FILL_BATCH, len(keys))):
                    value = os.urandom(VALUE_BYTES)
                    digests[j] = _digest(value)
                    items.append((keys[j], value))
                pending.add(pool.submit(self._mset, client, items))
                if len(pending) >= FILL_INFLIGHT:
                    done, pending = concurrent.futures.wait(
                        pending, return_when=concurrent.futures.FIRST_COMPLETED
                    )
                    settle(done)
            settle(set(concurrent.futures.wait(pending).done))
        fill_s = time.monotonic() - started
        self.progress.remove_task(task)
        self.doc["fill_s"] = round(fill_s, 3)
        self.doc["fill_mb_per_s"] = round(self.doc["bytes"] / MIB / fill_s, 2)
        return shard, keys, digests

    @staticmethod
    def _mset(client: CacheClient, items: list[tuple[bytes, bytes]]) -> int:
        written = client.mset(items)
        if written != len(items):
            raise BenchError(f"replica move: an MSet of {len(items)} values wrote {written}")
        return written

    def _pd_status(self, client: CacheClient) -> pb.PdStatus:
        status: pb.PdStatus = client.placement_driver(
            "GetPdStatus", pb.PdStatusRequest(), "placement driver status"
        )
        return status

    def _join(self, client: CacheClient) -> tuple[str, str]:
        """Start the new node; wait until the PD counts it as up and serving."""
        self.note("replica move: starting a new node that joins")
        started = time.monotonic()
        new_id, address = self.cluster.add_node()
        self.doc["to"] = new_id
        def up() -> bool | None:
            with contextlib.suppress(CacheError):
                node = next((n for n in self._pd_status(client).nodes if n.id == new_id), None)
                if node is not None and node.liveness == "up" and node.state == "serving":
                    return True
            return None

        _wait_until(
            up, time.monotonic() + JOIN_TIMEOUT_S,
            lambda: f"the placement driver did not report {new_id} up within {JOIN_TIMEOUT_S:g}s of its start",
        )
        self.doc["join_s"] = round(time.monotonic() - started, 3)
        return new_id, address

    def _replica(self, client: CacheClient, address: str, shard: int) -> Any:
        """The ReplicaStatus of ``shard`` on the node at ``address``, or None."""
        st: NodeStatus = client.node_status(address)
        return next((r for r in st.replicas if r.shard_id == shard), None)

    def _leader(self, client: CacheClient, shard: int) -> tuple[str, int]:
        """(leader node id, its applied index) of ``shard``, asked of the replicas' nodes.

        The applied index, not the commit index: it counts only the entries
        the state machine applied (data), while the commit index also counts
        Raft's own entries (a new leader's no-op, membership changes), which
        never move a replica's applied index.  Comparing a replica's applied
        index with a commit index that ends on such an entry waits forever."""
        cmap = client.cluster_map(refresh=True)
        desc = cmap.shard(shard)
        assert desc is not None
        best: tuple[int, str, int] | None = None
        for node_id in desc.replicas:
            info = cmap.node(node_id)
            if info is None:
                continue
            with contextlib.suppress(CacheError):
                rep = self._replica(client, info.address, shard)
                if (
                    rep is not None
                    and rep.role == "leader"
                    and (best is None or rep.term > best[0])
                ):
                    best = (rep.term, node_id, rep.applied_index)
        if best is None:
            raise BenchError(f"replica move: no replica of shard {shard} reports itself leader")
        return best[1], best[2]

    def _wait_idle(self, client: CacheClient) -> None:
        """Until no operator runs: ours must be the only one moving anything."""
        running: list[Any] = []

        def idle() -> bool | None:
            running[:] = [o for o in self._pd_status(client).operators if o.status == "running"]
            return None if running else True

        _wait_until(
            idle, time.monotonic() + IDLE_TIMEOUT_S,
            lambda: f"operators still running after {IDLE_TIMEOUT_S:g}s: "
            + ", ".join(f"{o.id} {o.kind} on shard {o.shard_id}" for o in running),
        )

    def _move(
        self, client: CacheClient, shard: int, new_id: str, new_address: str
    ) -> tuple[str, int]:
        """Add the operator and follow it to its end; returns (source node, the leader's applied index at the call)."""
        self._wait_idle(client)
        leader, applied0 = self._leader(client, shard)
        desc = client.cluster_map(refresh=True).shard(shard)
        assert desc is not None
        followers = [r for r in desc.replicas if r != leader]
        # Not the preferred leader either: that would add a leader transfer to the move.
        source = next((r for r in followers if r != desc.replicas[0]), followers[0])
        self.doc.update({"from": source, "leader": leader, "leader_applied_index": applied0})
        self.note(f"replica move: shard {shard} from {source} (a follower) to {new_id}")
        heap = _HeapWatch({"leader": leader, "new_node": new_id}, self.cluster.pids())
        started = time.monotonic()
        op: pb.OperatorInfo = client.placement_driver(
            "AddOperator",
            pb.AddOperatorRequest(
                kind="move-replica", shard_id=shard, from_node=source, to_node=new_id
            ),
            f"move-replica of shard {shard}",
        )
        steps = list(op.steps)
        seen: list[float | None] = [None] * len(steps)
        caught_up: float | None = None
        replica_bytes = 0
        task = self.progress.add_task(f"replica move: {steps[0]}", total=len(steps))
        end = started + MOVE_TIMEOUT_S
        status, detail, step = "running", "", 0
        seen_at = started
        while time.monotonic() < end:
            now_s = time.monotonic() - started
            heap.sample()
            if caught_up is None:
                with contextlib.suppress(CacheError):
                    rep = self._replica(client, new_address, shard)
                    if rep is not None:
                        replica_bytes = max(replica_bytes, rep.size_bytes)
                        if rep.applied_index >= applied0:
                            caught_up = now_s
            with contextlib.suppress(CacheError):
                operators = self._pd_status(client).operators
                seen_at = time.monotonic()
                info = next((o for o in operators if o.id == op.id), None)
                if info is None:
                    raise BenchError(f"replica move: operator {op.id} vanished from the PD status")
                status, detail, step = info.status, info.detail, info.step
                for k in range(min(step, len(steps))):
                    if seen[k] is None:
                        seen[k] = now_s
                self.progress.update(
                    task,
                    completed=step,
                    description=f"replica move: step {min(step + 1, len(steps))}/{len(steps)} "
                    + (steps[step] if step < len(steps) else "done"),
                )
                if status != "running":
                    break
            time.sleep(POLL_S)
        seconds = seen_at - started
        self.progress.remove_task(task)
        self.doc["memory"] = heap.doc()
        self.doc["operator"] = {
            "id": op.id,
            "status": status,
            "detail": detail,
            "steps": [
                {"step": s, "done_s": None if t is None else round(t, 3)}
                for s, t in zip(steps, seen, strict=True)
            ],
        }
        if status != "success":
            where = f"step {step + 1}/{len(steps)} ({steps[step] if step < len(steps) else 'end'})"
            if status == "running":
                raise BenchError(
                    f"replica move: operator {op.id} still running after {MOVE_TIMEOUT_S:g}s, at {where}"
                )
            raise BenchError(
                f"replica move: operator {op.id} ended {status} at {where}"
                + (f": {detail}" if detail else "")
            )
        self.doc["seconds"] = round(seconds, 3)
        self.doc["mb_per_s"] = round(self.doc["bytes"] / MIB / seconds, 2)
        # The data is in before the operator's last steps; if the poll missed it, ask again.
        end = time.monotonic() + CATCH_UP_GRACE_S
        while caught_up is None and time.monotonic() < end:
            with contextlib.suppress(CacheError):
                rep = self._replica(client, new_address, shard)
                if rep is not None and rep.applied_index >= applied0:
                    caught_up = time.monotonic() - started
                    replica_bytes = max(replica_bytes, rep.size_bytes)
            time.sleep(POLL_S)
        self.doc["caught_up_s"] = None if caught_up is None else round(caught_up, 3)
        self.doc["catch_up_mb_per_s"] = (
            round(self.doc["bytes"] / MIB / caught_up, 2) if caught_up else None
        )
        self.doc["replica_bytes"] = replica_bytes or None
        self.doc["transfer"] = self._transfer_kind(new_id, shard)
        return source, applied0

    def _transfer_kind(self, node_id: str, shard: int) -> str | None:
        """How the data reached the new replica, from its node's log (None: log unreadable)."""
        log = self.cluster.node_log(node_id)
        if log is None:
            return None
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return None
        return "snapshot" if f"group {shard}: installed snapshot" in text else "log entries"

    def _verify(
        self,
        client: CacheClient,
        shard: int,
        source: str,
        new_id: str,
        new_address: str,
        applied0: int,
        keys: list[bytes],
        digests: list[bytes],
    ) -> None:
        """The new replica holds the data, and every key reads back right (see the module docstring)."""
        problems: list[str] = []
        # The PD reports success with the new map committed; the node the
        # client asks may adopt it a heartbeat later, so give it MAP_SETTLE_S.
        end = time.monotonic() + MAP_SETTLE_S
        while True:
            desc = client.cluster_map(refresh=True).shard(shard)
            assert desc is not None
            moved = new_id in desc.replicas and source not in desc.replicas
            if moved or time.monotonic() >= end:
                break
            time.sleep(POLL_S)
        if not moved:
            problems.append(f"the map lists shard {shard} on {', '.join(desc.replicas)}")
        rep = self._replica(client, new_address, shard)
        if rep is None:
            problems.append(f"{new_id} reports no replica of shard {shard}")
        else:
            self.doc["replica_keys"] = rep.keys
            if rep.keys != len(keys):
                problems.append(f"{new_id}'s replica holds {rep.keys} keys, not {len(keys)}")
            if rep.applied_index < applied0:
                problems.append(
                    f"{new_id}'s replica applied index {rep.applied_index} < {applied0}, the leader's before the move"
                )
        step = max(1, len(keys) // STALE_SAMPLE)
        sample = list(range(0, len(keys), step))[:STALE_SAMPLE]
        wrong_stale = 0
        with CacheClient([new_address], timeout=10.0, routing="proxy") as local:
            for j in sample:
                got = local.get(keys[j], consistency="stale")
                if got is None or got.served_by != new_id or _digest(got.value) != digests[j]:
                    wrong_stale += 1
                    if wrong_stale == 1:
                        who = "absent" if got is None else f"served by {got.served_by or '?'}"
                        problems.append(
                            f"stale read of {keys[j]!r} on {new_id}: {who} or wrong bytes"
                        )
        if wrong_stale > 1:
            problems.append(f"{wrong_stale} of {len(sample)} stale reads on {new_id} were wrong")
        wrong = 0
        for chunk_start in range(0, len(keys), READ_BATCH):
            chunk = keys[chunk_start : chunk_start + READ_BATCH]
            got_all = client.mget(chunk)
            for j, key in enumerate(chunk, chunk_start):
                got = got_all.get(key)
                if got is None or _digest(got.value) != digests[j]:
                    wrong += 1
        if wrong:
            problems.append(f"{wrong} of {len(keys)} keys read back missing or wrong")
        self.doc["verify"] = {
            "stale_reads_on_new_node": len(sample),
            "stale_reads_wrong": wrong_stale,
            "keys_read_back": len(keys),
            "keys_wrong": wrong,
        }
        if problems:
            raise BenchError("replica move verification failed: " + "; ".join(problems))
        self.doc["verified"] = True
