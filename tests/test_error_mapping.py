"""pysyncobj failure codes -> our errors -> gRPC statuses: one table, pinned."""

from __future__ import annotations

import grpc
import pytest
from pysyncobj.config import FAIL_REASON

from cachenode._errors import ALL_KINDS, CacheError, NotLeader
from cachenode.raft.group import fail_reason_error
from cachenode.server.status import GRPC_STATUS, error_metadata, status_code

CASES = [
    (FAIL_REASON.QUEUE_FULL, "overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FAIL_REASON.MISSING_LEADER, "unavailable", grpc.StatusCode.UNAVAILABLE),
    (FAIL_REASON.NOT_LEADER, "unavailable", grpc.StatusCode.UNAVAILABLE),
    (FAIL_REASON.DISCARDED, "unavailable", grpc.StatusCode.UNAVAILABLE),
    (FAIL_REASON.REQUEST_DENIED, "unavailable", grpc.StatusCode.UNAVAILABLE),
    (FAIL_REASON.LEADER_CHANGED, "outcome_unknown", grpc.StatusCode.DEADLINE_EXCEEDED),
    (FAIL_REASON.UNKNOWN_OUTCOME, "outcome_unknown", grpc.StatusCode.DEADLINE_EXCEEDED),
]


@pytest.mark.parametrize("reason,kind,code", CASES)
def test_raft_failure_reaches_the_wire_as(reason: int, kind: str, code: grpc.StatusCode) -> None:
    err = fail_reason_error(reason)
    assert err.kind == kind
    assert status_code(err) == code
    assert dict(error_metadata(err))["cachenode-error"] == kind
    assert err.message  # says what happened and what to do


@pytest.mark.parametrize("reason", [c[0] for c in CASES if c[1] != "overloaded"])
def test_a_read_barrier_that_fails_is_a_definite_failure_worded_for_a_read(reason: int) -> None:
    # A barrier writes nothing the client asked for: a read that did not
    # return has no outcome to doubt.
    err = fail_reason_error(reason, read=True)
    assert err.kind == "unavailable"
    assert "read" in err.message and "write" not in err.message and "request id" not in err.message


def test_every_error_kind_has_exactly_one_status() -> None:
    assert set(GRPC_STATUS) == set(ALL_KINDS.values())
    assert all(issubclass(c, CacheError) for c in GRPC_STATUS)


def test_not_leader_metadata_carries_the_hint() -> None:
    md = dict(error_metadata(NotLeader("x", "n2", "127.0.0.1:7002")))
    assert md == {"cachenode-error": "not_leader", "cachenode-leader": "n2@127.0.0.1:7002"}
