"""Wire encoding of commands (Raft log entries) and results.

Layout: ``FORMAT_VERSION`` (1 byte) + type tag (1 byte) + a msgpack array of
the fields in declaration order.  A request id is two trailing fields
(client_id, seq), present only when the command has one.  Compact (a small
Set with a request id costs ~20 bytes of overhead) and cheap to dispatch.

Both directions validate ranges and types (see :mod:`.commands`), so a
leader cannot propose a command the state machine will reject as malformed,
and a follower treats anything malformed, whatever produced it, as
``ValueError``.  Decoding never raises anything else.

Pure functions; any thread.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import xxhash

from ..storage.base import MAX_KEY_BYTES
from .commands import (
    Barrier,
    BarrierResult,
    CasResult,
    Command,
    CompareAndSet,
    Delete,
    DeleteResult,
    ErrorResult,
    Expire,
    ExpireResult,
    Incr,
    IncrResult,
    MSet,
    MSetResult,
    Replayed,
    RequestId,
    Result,
    Set,
    SetResult,
    restamped,
)

__all__ = [
    "FORMAT_VERSION", "encode_command", "decode_command", "restamp_command", "fingerprint",
    "encode_result", "decode_result",
]

FORMAT_VERSION = 1
_U64_MAX = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1


_packers = threading.local()
PACKER_KEEP_BYTES = 1 << 20
"""A thread's packer is dropped after an encoding larger than this: its
buffer grows to the largest thing it packed and never shrinks, and the
node's 64 gRPC worker threads each encode commands (an MSet may carry
hundreds of MiB)."""


def _packb(obj: object) -> bytes:
    # One packer per thread: a msgpack.Packer is not thread-safe, and commands
    # are encoded on server threads while results are encoded on the driver
    # thread.  ``msgpack.packb`` builds a new Packer (and its buffer) on every
    # call: 0.59 us against 0.23 us for a small command.
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    out: bytes = packer.pack(obj)
    if len(out) > PACKER_KEEP_BYTES:
        del _packers.packer
    return out


# -- field checks (shared by encode and decode) ------------------------------


# Each check starts with a fast path for the common, valid case: decoding
# runs on every replica for every log entry.


def _int(x: object, name: str, lo: int = 0, hi: int = _U64_MAX) -> int:
    if type(x) is int and lo <= x <= hi:
        return x
    if not isinstance(x, int) or isinstance(x, bool):
        raise ValueError(f"{name} must be an int, got {type(x).__name__}")
    if not lo <= x <= hi:
        raise ValueError(f"{name} {x} out of range [{lo}, {hi}]")
    return x


def _bytes(x: object, name: str) -> bytes:
    if type(x) is bytes:
        return x
    if not isinstance(x, bytes):
        raise ValueError(f"{name} must be bytes, got {type(x).__name__}")
    return x


def _key(x: object) -> bytes:
    if type(x) is bytes and 0 < len(x) <= MAX_KEY_BYTES:
        return x
    k = _bytes(x, "key")
    if not 0 < len(k) <= MAX_KEY_BYTES:
        raise ValueError(f"key must be 1..{MAX_KEY_BYTES} bytes, got {len(k)}")
    return k


def _mset_items(items: tuple[Any, ...] | list[Any], kind: Any) -> tuple[tuple[bytes, bytes, int], ...]:
    """Check MSet items (each a ``kind``, tuple or list, of key, value,
    expires_at_ms) and return them as tuples.  One tight loop: every replica
    runs it for every key of every MSet."""
    out: list[tuple[bytes, bytes, int]] = []
    append = out.append
    it: Any
    k: Any
    v: Any
    e: Any
    for it in items:
        if it.__class__ is kind and len(it) == 3:
            k, v, e = it
            if (
                type(k) is bytes and 0 < len(k) <= MAX_KEY_BYTES and type(v) is bytes
                and type(e) is int and 0 <= e <= _U64_MAX
            ):
                append((k, v, e))
                continue
            _key(k)
            _bytes(v, "value")
            _int(e, "expires_at_ms")
        raise ValueError("MSet items must be (key, value, expires_at_ms)")
    return tuple(out)


def _bool(x: object, name: str) -> bool:
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def _rid(rid: object) -> None:
    if rid is None:
        return
    if not isinstance(rid, RequestId):
        raise ValueError("rid must be a RequestId or None")
    cid = _bytes(rid.client_id, "client_id")
    if not 0 < len(cid) <= 255:
        raise ValueError(f"client_id must be 1..255 bytes, got {len(cid)}")
    _int(rid.seq, "seq")


def _check_cas(c: CompareAndSet) -> None:
    n = (
        (c.expected_value is not None)
        + (c.expected_version is not None)
        + _bool(c.expect_absent, "expect_absent")
    )
    if n != 1:
        raise ValueError(
            "CompareAndSet needs exactly one of expected_value, expected_version, expect_absent"
        )
    if c.expected_value is not None:
        _bytes(c.expected_value, "expected_value")
    if c.expected_version is not None:
        _int(c.expected_version, "expected_version")


def validate_command(cmd: object) -> None:
    """Raise ``ValueError`` unless ``cmd`` is a well-formed command."""
    if isinstance(cmd, Set):
        _key(cmd.key)
        _bytes(cmd.value, "value")
        _int(cmd.expires_at_ms, "expires_at_ms")
        _int(cmd.condition, "condition", 0, 2)
    elif isinstance(cmd, Delete):
        _key(cmd.key)
    elif isinstance(cmd, CompareAndSet):
        _key(cmd.key)
        _check_cas(cmd)
        _bytes(cmd.new_value, "new_value")
        _int(cmd.expires_at_ms, "expires_at_ms")
    elif isinstance(cmd, Incr):
        _key(cmd.key)
        _int(cmd.delta, "delta", _I64_MIN, _I64_MAX)
    elif isinstance(cmd, MSet):
        if not isinstance(cmd.items, tuple):
            raise ValueError("MSet.items must be a tuple")
        _mset_items(cmd.items, tuple)
    elif isinstance(cmd, Expire):
        if not isinstance(cmd.keys, tuple):
            raise ValueError("Expire.keys must be a tuple")
        for item in cmd.keys:
            if not isinstance(item, tuple) or len(item) != 2:
                raise ValueError("Expire keys must be (key, expires_at_ms)")
            _key(item[0])
            _int(item[1], "expires_at_ms")
    elif not isinstance(cmd, Barrier):
        raise ValueError(f"not a command: {type(cmd).__name__}")
    _int(cmd.now_ms, "now_ms")
    _rid(getattr(cmd, "rid", None))


# -- commands ----------------------------------------------------------------

_T_SET, _T_DELETE, _T_CAS, _T_INCR, _T_MSET, _T_EXPIRE, _T_BARRIER = range(1, 8)


def _with_rid(fields: list[Any], rid: RequestId | None) -> list[Any]:
    if rid is not None:
        fields.append(rid.client_id)
        fields.append(rid.seq)
    return fields


def _fields(cmd: Command) -> tuple[int, list[Any]]:
    if isinstance(cmd, Set):
        return _T_SET, _with_rid(
            [cmd.key, cmd.value, cmd.expires_at_ms, int(cmd.condition), cmd.now_ms], cmd.rid
        )
    if isinstance(cmd, Delete):
        return _T_DELETE, _with_rid([cmd.key, cmd.now_ms], cmd.rid)
    if isinstance(cmd, CompareAndSet):
        return _T_CAS, _with_rid(
            [
                cmd.key,
                cmd.expected_value,
                cmd.expected_version,
                cmd.expect_absent,
                cmd.new_value,
                cmd.expires_at_ms,
                cmd.now_ms,
            ],
            cmd.rid,
        )
    if isinstance(cmd, Incr):
        return _T_INCR, _with_rid([cmd.key, cmd.delta, cmd.now_ms], cmd.rid)
    if isinstance(cmd, MSet):
        return _T_MSET, _with_rid([cmd.items, cmd.now_ms], cmd.rid)
    if isinstance(cmd, Expire):
        return _T_EXPIRE, [cmd.keys, cmd.now_ms]
    return _T_BARRIER, [cmd.now_ms]


_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")


def fingerprint(cmd: Command) -> int:
    """A u64 digest of what the client's request asked for: the command's
    type and its keys, values, condition, expectations or delta.  Not its
    stamp, its expiries (they move with the stamp, so two attempts of one
    request differ there) nor its request id.  Every attempt of one request
    has the same fingerprint, on every replica and platform; a request id
    reused for another request almost surely has another (the state machine
    keeps it with the id's result to tell the two apart).  A TTL change
    alone is not seen.  Pure; any thread.

    Each field is hashed on its own, seeded with the digest so far: no
    copy of the values (an MSet may carry hundreds of MiB), and no two
    ways of splitting the same bytes into fields hash alike."""
    h = xxhash.xxh3_64_intdigest
    if isinstance(cmd, Set):
        return int(h(cmd.value, h(cmd.key, _T_SET << 8 | int(cmd.condition))))
    if isinstance(cmd, MSet):
        d = _T_MSET
        for key, value, _ in cmd.items:
            d = h(value, h(key, d))
        return int(d)
    if isinstance(cmd, Delete):
        return int(h(cmd.key, _T_DELETE))
    if isinstance(cmd, Incr):
        return int(h(_I64.pack(cmd.delta), h(cmd.key, _T_INCR)))
    if isinstance(cmd, CompareAndSet):
        ev, ever = cmd.expected_value, cmd.expected_version
        d = h(cmd.key, _T_CAS << 8 | (ev is None) << 2 | (ever is None) << 1 | cmd.expect_absent)
        d = h(_U64.pack(ever or 0), h(ev or b"", d))
        return int(h(cmd.new_value, d))
    raise ValueError(f"{type(cmd).__name__} carries no request id to fingerprint")


def encode_command(cmd: Command) -> bytes:
    """Encode a command for the Raft log; ``ValueError`` if it is malformed."""
    validate_command(cmd)
    tag, fields = _fields(cmd)
    return bytes((FORMAT_VERSION, tag)) + _packb(fields)


def _split_rid(f: list[Any], n: int) -> RequestId | None:
    """``f`` has ``n`` fields, or ``n`` + 2 with a trailing request id."""
    if len(f) == n:
        return None
    if len(f) == n + 2:
        return RequestId(f[n], f[n + 1])
    raise ValueError(f"expected {n} or {n + 2} fields, got {len(f)}")


def _d_set(f: list[Any]) -> Command:
    rid = _split_rid(f, 5)
    # The range check makes it a Condition's value; building the IntEnum
    # itself runs interpreted enum code (about 0.5 % of a node's CPU in `set`).
    return Set(f[0], f[1], f[2], _int(f[3], "condition", 0, 2), f[4], rid)


def _d_delete(f: list[Any]) -> Command:
    return Delete(f[0], f[1], _split_rid(f, 2))


def _d_cas(f: list[Any]) -> Command:
    rid = _split_rid(f, 7)
    return CompareAndSet(f[0], f[1], f[2], f[3], f[4], f[5], f[6], rid)


def _d_incr(f: list[Any]) -> Command:
    return Incr(f[0], f[1], f[2], _split_rid(f, 3))


def _tuples(x: object, width: int, name: str) -> tuple[Any, ...]:
    if not isinstance(x, list):
        raise ValueError(f"{name} must be an array")
    out = []
    for item in x:
        if not isinstance(item, list) or len(item) != width:
            raise ValueError(f"{name} entries must have {width} fields")
        out.append(tuple(item))
    return tuple(out)


def _d_mset(f: list[Any]) -> Command:
    rid = _split_rid(f, 2)
    if not isinstance(f[0], list):
        raise ValueError("MSet items must be an array")
    return MSet(_mset_items(f[0], list), f[1], rid)


def _d_expire(f: list[Any]) -> Command:
    if len(f) != 2:
        raise ValueError("Expire has 2 fields")
    return Expire(_tuples(f[0], 2, "Expire keys"), f[1])


def _d_barrier(f: list[Any]) -> Command:
    if len(f) != 1:
        raise ValueError("Barrier has 1 field")
    return Barrier(f[0])


_COMMAND_DECODERS: dict[int, Callable[[list[Any]], Command]] = {
    _T_SET: _d_set,
    _T_DELETE: _d_delete,
    _T_CAS: _d_cas,
    _T_INCR: _d_incr,
    _T_MSET: _d_mset,
    _T_EXPIRE: _d_expire,
    _T_BARRIER: _d_barrier,
}


def _unpack(b: bytes, what: str) -> tuple[int, list[Any]]:
    if len(b) < 3:
        raise ValueError(f"{what} too short ({len(b)} bytes)")
    if b[0] != FORMAT_VERSION:
        raise ValueError(f"unsupported {what} format version {b[0]}")
    try:
        fields = msgpack.unpackb(b[2:], raw=False, use_list=True, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"{what} is not valid msgpack: {e}") from None
    if not isinstance(fields, list):
        raise ValueError(f"{what} body must be an array")
    return b[1], fields


def decode_command(b: bytes) -> Command:
    """Decode and validate a log entry; ``ValueError`` on anything malformed."""
    try:
        tag, fields = _unpack(b, "command")
        dec = _COMMAND_DECODERS.get(tag)
        if dec is None:
            raise ValueError(f"unknown command tag {tag}")
        cmd = dec(fields)
        if tag == _T_MSET:  # its items were checked while decoding (_mset_items)
            _int(cmd.now_ms, "now_ms")
            _rid(cmd.rid)  # type: ignore[union-attr]
        else:
            validate_command(cmd)
        return cmd
    except ValueError:
        raise
    except Exception as e:  # e.g. TypeError for a non-bytes payload
        raise ValueError(f"malformed command: {type(e).__name__}: {e}") from None


# -- results -----------------------------------------------------------------

_R_SET, _R_DELETE, _R_CAS, _R_INCR, _R_MSET, _R_EXPIRE, _R_BARRIER, _R_ERROR, _R_REPLAYED = range(
    1, 10
)


def encode_result(r: Result) -> bytes:
    tag: int
    f: list[Any]
    if isinstance(r, SetResult):
        tag, f = _R_SET, [r.applied, r.version]
    elif isinstance(r, DeleteResult):
        tag, f = _R_DELETE, [r.deleted, r.version]
    elif isinstance(r, CasResult):
        tag, f = (
            _R_CAS,
            [r.succeeded, r.version, r.current_found, r.current_value, r.current_version],
        )
    elif isinstance(r, IncrResult):
        tag, f = _R_INCR, [r.value, r.version]
    elif isinstance(r, MSetResult):
        tag, f = _R_MSET, [r.count, r.version]
    elif isinstance(r, ExpireResult):
        tag, f = _R_EXPIRE, [r.deleted]
    elif isinstance(r, BarrierResult):
        tag, f = _R_BARRIER, [r.index, r.clock_ms]
    elif isinstance(r, ErrorResult):
        tag, f = _R_ERROR, [r.kind, r.message]
    elif isinstance(r, Replayed):
        tag, f = _R_REPLAYED, [r.index]
    else:
        raise ValueError(f"not a result: {type(r).__name__}")
    return bytes((FORMAT_VERSION, tag)) + _packb(f)


def _n(f: list[Any], n: int) -> list[Any]:
    if len(f) != n:
        raise ValueError(f"expected {n} fields, got {len(f)}")
    return f


def _opt_bytes(x: object, name: str) -> bytes | None:
    return None if x is None else _bytes(x, name)


def _str(x: object, name: str) -> str:
    if not isinstance(x, str):
        raise ValueError(f"{name} must be a string")
    return x


_RESULT_DECODERS: dict[int, Callable[[list[Any]], Result]] = {
    _R_SET: lambda f: SetResult(_bool(_n(f, 2)[0], "applied"), _int(f[1], "version")),
    _R_DELETE: lambda f: DeleteResult(_bool(_n(f, 2)[0], "deleted"), _int(f[1], "version")),
    _R_CAS: lambda f: CasResult(
        _bool(_n(f, 5)[0], "succeeded"),
        _int(f[1], "version"),
        _bool(f[2], "current_found"),
        _opt_bytes(f[3], "current_value"),
        _int(f[4], "current_version"),
    ),
    _R_INCR: lambda f: IncrResult(
        _int(_n(f, 2)[0], "value", _I64_MIN, _I64_MAX), _int(f[1], "version")
    ),
    _R_MSET: lambda f: MSetResult(_int(_n(f, 2)[0], "count"), _int(f[1], "version")),
    _R_EXPIRE: lambda f: ExpireResult(_int(_n(f, 1)[0], "deleted")),
    _R_BARRIER: lambda f: BarrierResult(_int(_n(f, 2)[0], "index"), _int(f[1], "clock_ms")),
    _R_ERROR: lambda f: ErrorResult(_str(_n(f, 2)[0], "kind"), _str(f[1], "message")),
    _R_REPLAYED: lambda f: Replayed(_int(_n(f, 1)[0], "index")),
}


def decode_result(b: bytes) -> Result:
    """Decode a result; ``ValueError`` on anything malformed."""
    try:
        tag, fields = _unpack(b, "result")
        dec = _RESULT_DECODERS.get(tag)
        if dec is None:
            raise ValueError(f"unknown result tag {tag}")
        return dec(fields)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"malformed result: {type(e).__name__}: {e}") from None


# -- multi-command entries ---------------------------------------------------

MULTI_TAG = 0xC1
"""First byte of a multi-command entry (and of its result).  0xC1 is never
a valid msgpack byte, and single commands start with FORMAT_VERSION."""

MAX_MULTI = 10_000


def encode_multi(payloads: list[bytes]) -> bytes:
    """One Raft entry carrying several independently applied commands."""
    if not 1 <= len(payloads) <= MAX_MULTI:
        raise ValueError(f"a multi entry holds 1..{MAX_MULTI} commands, got {len(payloads)}")
    return bytes((MULTI_TAG,)) + _packb(list(payloads))


def is_multi(b: bytes) -> bool:
    return b[:1] == b"\xc1"


def decode_multi(b: bytes) -> list[bytes]:
    """The encoded commands of a multi entry (``is_multi(b)``); ValueError if malformed."""
    try:
        items = msgpack.unpackb(b[1:], raw=False, use_list=True)
    except Exception as e:
        raise ValueError(f"undecodable multi entry: {e}") from None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_MULTI or not all(isinstance(x, bytes) for x in items):
        raise ValueError("a multi entry must be a list of 1..10000 encoded commands")
    return items


def restamp_command(b: bytes, now_ms: int) -> bytes:
    """The encoded entry ``b`` stamped ``now_ms`` instead (see
    :func:`.commands.restamped`): one command, or each command of a multi
    entry.  ``b`` itself when nothing changes; a command that is malformed
    (every replica's apply rejects it, on its own) is left as it is."""
    if not is_multi(b):
        return _restamp_one(b, now_ms)
    try:
        parts = decode_multi(b)
    except ValueError:
        return b
    moved = [_restamp_one(p, now_ms) for p in parts]
    if all(m is p for m, p in zip(moved, parts, strict=True)):
        return b
    return encode_multi(moved)


def _restamp_one(b: bytes, now_ms: int) -> bytes:
    try:
        cmd = decode_command(b)
    except ValueError:
        return b
    return b if cmd.now_ms == now_ms else encode_command(restamped(cmd, now_ms))


def encode_multi_result(results: list[bytes]) -> bytes:
    return bytes((MULTI_TAG,)) + _packb(results)


def split_multi_result(b: bytes, n: int) -> list[bytes]:
    """Per-command encoded results of a multi entry's result.

    A non-multi result (the whole entry was replayed or undecodable) stands
    for every command."""
    if not is_multi(b):
        return [b] * n
    items = msgpack.unpackb(b[1:], raw=False, use_list=True)
    if not isinstance(items, list) or len(items) != n:
        raise ValueError(f"multi result holds {len(items) if isinstance(items, list) else '?'} results, expected {n}")
    return [bytes(x) for x in items]
