"""Commands that go into the Raft log, and the results of applying them.

Pure values (immutable: :class:`cachenode._value.Value`).  Every command carries ``now_ms``:
the leader's clock when it proposed the command; it is the only way time
enters the state machine.  Expiry times are absolute milliseconds on that
clock (0 = never).  A "version" is the Raft index of the command that wrote
a value.

Range rules (checked by :mod:`.codec` on encode and decode): keys are
1..MAX_KEY_BYTES bytes; times, versions and ``seq`` are u64; ``Incr.delta``
is i64; a request id's client id is 1..255 bytes.
"""

from __future__ import annotations

import enum
from typing import Final

from .._errors import ALL_KINDS, CacheError, Internal
from .._value import Value


class RequestId(Value):
    """Identifies one logical client write so that retries apply exactly once."""

    __slots__ = ("client_id", "seq")
    FIELDS = ("client_id", "seq")

    def __init__(self, client_id: bytes, seq: int) -> None:
        self.client_id: Final[bytes] = client_id
        self.seq: Final[int] = seq


class Condition(enum.IntEnum):
    ALWAYS = 0
    IF_ABSENT = 1  # NX
    IF_PRESENT = 2  # XX


# -- commands ----------------------------------------------------------------


class Set(Value):
    __slots__ = ("key", "value", "expires_at_ms", "condition", "now_ms", "rid")
    FIELDS = ("key", "value", "expires_at_ms", "condition", "now_ms", "rid")

    def __init__(
        self,
        key: bytes,
        value: bytes,
        expires_at_ms: int,
        condition: int,
        now_ms: int,
        rid: RequestId | None = None,
    ) -> None:
        self.key: Final[bytes] = key
        self.value: Final[bytes] = value
        self.expires_at_ms: Final[int] = expires_at_ms
        self.condition: Final[int] = condition  # a Condition
        self.now_ms: Final[int] = now_ms
        self.rid: Final[RequestId | None] = rid


class Delete(Value):
    __slots__ = ("key", "now_ms", "rid")
    FIELDS = ("key", "now_ms", "rid")

    def __init__(self, key: bytes, now_ms: int, rid: RequestId | None = None) -> None:
        self.key: Final[bytes] = key
        self.now_ms: Final[int] = now_ms
        self.rid: Final[RequestId | None] = rid


class CompareAndSet(Value):
    """Exactly one expectation: ``expected_value``, ``expected_version``
    (0 = must be absent), or ``expect_absent=True``."""

    __slots__ = (
        "key",
        "expected_value",
        "expected_version",
        "expect_absent",
        "new_value",
        "expires_at_ms",
        "now_ms",
        "rid",
    )
    FIELDS = (
        "key",
        "expected_value",
        "expected_version",
        "expect_absent",
        "new_value",
        "expires_at_ms",
        "now_ms",
        "rid",
    )

    def __init__(
        self,
        key: bytes,
        expected_value: bytes | None,
        expected_version: int | None,
        expect_absent: bool,
        new_value: bytes,
        expires_at_ms: int,
        now_ms: int,
        rid: RequestId | None = None,
    ) -> None:
        self.key: Final[bytes] = key
        self.expected_value: Final[bytes | None] = expected_value
        self.expected_version: Final[int | None] = expected_version
        self.expect_absent: Final[bool] = expect_absent
        self.new_value: Final[bytes] = new_value
        self.expires_at_ms: Final[int] = expires_at_ms
        self.now_ms: Final[int] = now_ms
        self.rid: Final[RequestId | None] = rid


class Incr(Value):
    """Add ``delta`` to the ASCII decimal integer at ``key`` (absent = 0);
    keeps the key's expiry."""

    __slots__ = ("key", "delta", "now_ms", "rid")
    FIELDS = ("key", "delta", "now_ms", "rid")

    def __init__(self, key: bytes, delta: int, now_ms: int, rid: RequestId | None = None) -> None:
        self.key: Final[bytes] = key
        self.delta: Final[int] = delta
        self.now_ms: Final[int] = now_ms
        self.rid: Final[RequestId | None] = rid


class MSet(Value):
    """Write every (key, value, expires_at_ms) in one entry: all or nothing."""

    __slots__ = ("items", "now_ms", "rid")
    FIELDS = ("items", "now_ms", "rid")

    def __init__(
        self, items: tuple[tuple[bytes, bytes, int], ...], now_ms: int, rid: RequestId | None = None
    ) -> None:
        self.items: Final[tuple[tuple[bytes, bytes, int], ...]] = items
        self.now_ms: Final[int] = now_ms
        self.rid: Final[RequestId | None] = rid


class Expire(Value):
    """Proposed by the leader's active-expiry loop: delete each key whose
    record still has exactly that expires_at_ms and is due at the clock."""

    __slots__ = ("keys", "now_ms")
    FIELDS = ("keys", "now_ms")

    def __init__(self, keys: tuple[tuple[bytes, int], ...], now_ms: int) -> None:
        self.keys: Final[tuple[tuple[bytes, int], ...]] = keys
        self.now_ms: Final[int] = now_ms


class Barrier(Value):
    """No data change; a linearizable read waits for it to apply."""

    __slots__ = ("now_ms",)
    FIELDS = ("now_ms",)

    def __init__(self, now_ms: int) -> None:
        self.now_ms: Final[int] = now_ms


Command = Set | Delete | CompareAndSet | Incr | MSet | Expire | Barrier


_U64_MAX: Final = (1 << 64) - 1


def _moved(expires_at_ms: int, shift: int) -> int:
    """An expiry moved by ``shift`` ms; 0 (never) stays 0, one that would
    reach 0 or below is 1 (long past), never "never", and none passes the
    u64 range the codec allows."""
    return min(_U64_MAX, max(1, expires_at_ms + shift)) if expires_at_ms else 0


def restamped(cmd: Command, now_ms: int) -> Command:
    """``cmd`` stamped ``now_ms`` instead, with every expiry it sets moved
    by the same amount, so that each TTL still runs its full length from
    the stamp.  A leader calls it for a command another replica stamped and
    forwarded to it: the stamp must be from the chain of the leader that
    appends it (see ``server/cluster_clock.py``).  ``Expire``'s keys name
    records as they are and do not move.  Pure; any thread."""
    shift = now_ms - cmd.now_ms
    if isinstance(cmd, Set):
        return Set(cmd.key, cmd.value, _moved(cmd.expires_at_ms, shift), cmd.condition, now_ms, cmd.rid)
    if isinstance(cmd, CompareAndSet):
        return CompareAndSet(cmd.key, cmd.expected_value, cmd.expected_version, cmd.expect_absent,
                             cmd.new_value, _moved(cmd.expires_at_ms, shift), now_ms, cmd.rid)
    if isinstance(cmd, MSet):
        return MSet(tuple([(k, v, _moved(e, shift)) for k, v, e in cmd.items]), now_ms, cmd.rid)
    if isinstance(cmd, Delete):
        return Delete(cmd.key, now_ms, cmd.rid)
    if isinstance(cmd, Incr):
        return Incr(cmd.key, cmd.delta, now_ms, cmd.rid)
    if isinstance(cmd, Expire):
        return Expire(cmd.keys, now_ms)
    return Barrier(now_ms)


# -- results -----------------------------------------------------------------


class SetResult(Value):
    __slots__ = ("applied", "version")
    FIELDS = ("applied", "version")

    def __init__(self, applied: bool, version: int) -> None:
        self.applied: Final[bool] = applied
        self.version: Final[int] = (
            version  # written, or (not applied) the current live version, 0 if absent
        )


class DeleteResult(Value):
    __slots__ = ("deleted", "version")
    FIELDS = ("deleted", "version")

    def __init__(self, deleted: bool, version: int) -> None:
        self.deleted: Final[bool] = deleted
        self.version: Final[int] = version  # the index of the delete


class CasResult(Value):
    """On success ``version`` is the new version and the ``current_*``
    fields are empty; on failure they describe the live record (if any)."""

    __slots__ = ("succeeded", "version", "current_found", "current_value", "current_version")
    FIELDS = ("succeeded", "version", "current_found", "current_value", "current_version")

    def __init__(
        self,
        succeeded: bool,
        version: int,
        current_found: bool,
        current_value: bytes | None,
        current_version: int,
    ) -> None:
        self.succeeded: Final[bool] = succeeded
        self.version: Final[int] = version
        self.current_found: Final[bool] = current_found
        self.current_value: Final[bytes | None] = current_value
        self.current_version: Final[int] = current_version


class IncrResult(Value):
    __slots__ = ("value", "version")
    FIELDS = ("value", "version")

    def __init__(self, value: int, version: int) -> None:
        self.value: Final[int] = value
        self.version: Final[int] = version


class MSetResult(Value):
    __slots__ = ("count", "version")
    FIELDS = ("count", "version")

    def __init__(self, count: int, version: int) -> None:
        self.count: Final[int] = count
        self.version: Final[int] = version


class ExpireResult(Value):
    __slots__ = ("deleted",)
    FIELDS = ("deleted",)

    def __init__(self, deleted: int) -> None:
        self.deleted: Final[int] = deleted


class BarrierResult(Value):
    __slots__ = ("index", "clock_ms")
    FIELDS = ("index", "clock_ms")

    def __init__(self, index: int, clock_ms: int) -> None:
        self.index: Final[int] = index
        self.clock_ms: Final[int] = clock_ms  # judge the read with this clock


class ErrorResult(Value):
    """The command was applied as a no-op and failed; ``kind`` is an
    error kind of :mod:`cachenode._errors`."""

    __slots__ = ("kind", "message")
    FIELDS = ("kind", "message")

    def __init__(self, kind: str, message: str) -> None:
        self.kind: Final[str] = kind
        self.message: Final[str] = message

    def to_error(self) -> CacheError:
        return ALL_KINDS.get(self.kind, Internal)(self.message)


class Replayed(Value):
    """The index was applied before (journal replay after a restart); nothing changed."""

    __slots__ = ("index",)
    FIELDS = ("index",)

    def __init__(self, index: int) -> None:
        self.index: Final[int] = index


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
