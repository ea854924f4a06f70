"""The guard of ReplicaManager's periodic proposals (active expiry, the
clock tick): one in flight per shard, but never waited on for good."""

from __future__ import annotations

from concurrent.futures import Future

from cachenode.server.replicas import IN_FLIGHT_MAX_S, _in_flight


def test_a_pending_proposal_blocks_the_next_until_it_is_done_or_too_old() -> None:
    fut: Future[bytes] = Future()
    assert not _in_flight(None, 100.0, IN_FLIGHT_MAX_S)  # nothing proposed yet
    assert _in_flight((fut, 100.0), 100.0 + IN_FLIGHT_MAX_S - 0.1, IN_FLIGHT_MAX_S)
    # pysyncobj never resolves a proposal a snapshot install skipped over:
    # after IN_FLIGHT_MAX_S the next one goes out anyway.
    assert not _in_flight((fut, 100.0), 100.0 + IN_FLIGHT_MAX_S, IN_FLIGHT_MAX_S)
    fut.set_result(b"")
    assert not _in_flight((fut, 100.0), 100.5, IN_FLIGHT_MAX_S)
