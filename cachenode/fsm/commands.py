"""Commands that go into the Raft log, and the results of applying them.

Pure values (frozen, slotted dataclasses).  Every command carries ``now_ms``:
the leader's clock when it proposed the command; it is the only way time
enters the state machine.  Expiry times are absolute milliseconds on that
clock (0 = never).  A "version" is the Raft index of the command that wrote
a value.

Range rules (checked by :mod:`.codec` on encode and decode): keys are
1..MAX_KEY_BYTES bytes; times, versions and ``seq`` are u64; ``Incr.delta``
is i64; a request id's client id is 1..255 bytes.
"""

from __future__ import annotations

import dataclasses
import enum

from .._errors import ALL_KINDS, CacheError, Internal


@dataclasses.dataclass(frozen=True, slots=True)
class RequestId:
    """Identifies one logical client write so that retries apply exactly once."""

    client_id: bytes
    seq: int


class Condition(enum.IntEnum):
    ALWAYS = 0
    IF_ABSENT = 1  # NX
    IF_PRESENT = 2  # XX


# -- commands ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Set:
    key: bytes
    value: bytes
    expires_at_ms: int
    condition: int  # a Condition
    now_ms: int
    rid: RequestId | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    now_ms: int
    rid: RequestId | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class CompareAndSet:
    """Exactly one expectation: ``expected_value``, ``expected_version``
    (0 = must be absent), or ``expect_absent=True``."""

    key: bytes
    expected_value: bytes | None
    expected_version: int | None
    expect_absent: bool
    new_value: bytes
    expires_at_ms: int
    now_ms: int
    rid: RequestId | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Incr:
    """Add ``delta`` to the ASCII decimal integer at ``key`` (absent = 0);
    keeps the key's expiry."""

    key: bytes
    delta: int
    now_ms: int
    rid: RequestId | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class MSet:
    """Write every (key, value, expires_at_ms) in one entry: all or nothing."""

    items: tuple[tuple[bytes, bytes, int], ...]
    now_ms: int
    rid: RequestId | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Expire:
    """Proposed by the leader's active-expiry loop: delete each key whose
    record still has exactly that expires_at_ms and is due at the clock."""

    keys: tuple[tuple[bytes, int], ...]
    now_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class Barrier:
    """No data change; a linearizable read waits for it to apply."""

    now_ms: int


Command = Set | Delete | CompareAndSet | Incr | MSet | Expire | Barrier


# -- results -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SetResult:
    applied: bool
    version: int  # written, or (not applied) the current live version, 0 if absent


@dataclasses.dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted: bool
    version: int  # the index of the delete


@dataclasses.dataclass(frozen=True, slots=True)
class CasResult:
    """On success ``version`` is the new version and the ``current_*``
    fields are empty; on failure they describe the live record (if any)."""

    succeeded: bool
    version: int
    current_found: bool
    current_value: bytes | None
    current_version: int


@dataclasses.dataclass(frozen=True, slots=True)
class IncrResult:
    value: int
    version: int


@dataclasses.dataclass(frozen=True, slots=True)
class MSetResult:
    count: int
    version: int


@dataclasses.dataclass(frozen=True, slots=True)
class ExpireResult:
    deleted: int


@dataclasses.dataclass(frozen=True, slots=True)
class BarrierResult:
    index: int
    clock_ms: int  # judge the read with this clock


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorResult:
    """The command was applied as a no-op and failed; ``kind`` is an
    error kind of :mod:`cachenode._errors`."""

    kind: str
    message: str

    def to_error(self) -> CacheError:
        return ALL_KINDS.get(self.kind, Internal)(self.message)


@dataclasses.dataclass(frozen=True, slots=True)
class Replayed:
    """The index was applied before (journal replay after a restart); nothing changed."""

    index: int


Result = (
    SetResult
    | DeleteResult
    | CasResult
    | IncrResult
    | MSetResult
    | ExpireResult
    | BarrierResult
    | ErrorResult
    | Replayed
)
