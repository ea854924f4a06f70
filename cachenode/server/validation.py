"""Request validation: every check that turns bad input into InvalidArgument.

Pure functions; no I/O.  Messages name the field, the limit and the fix.
"""

from __future__ import annotations

from .._errors import InvalidArgument
from ..fsm.commands import RequestId
from ..v1 import cache_pb2 as pb

MAX_TTL_MS = 1 << 40  # ~34 years
LINEARIZABLE = "linearizable"
STALE = "stale"


def check_key(key: bytes, max_key: int) -> bytes:
    if not key:
        raise InvalidArgument("key is empty; keys must be 1 byte or more")
    if len(key) > max_key:
        raise InvalidArgument(f"key is {len(key)} bytes; the limit is {max_key} bytes (--max-key-bytes)")
    return key


def check_value(value: bytes, max_value: int) -> bytes:
    if len(value) > max_value:
        raise InvalidArgument(
            f"value is {len(value)} bytes; the limit is {max_value} bytes (--max-value-bytes); split it or raise the limit"
        )
    return value


def check_ttl(ttl_ms: int) -> int:
    if ttl_ms > MAX_TTL_MS:
        raise InvalidArgument(f"ttl_ms {ttl_ms} is too large; the maximum is {MAX_TTL_MS}")
    return ttl_ms


def consistency(header: pb.RequestHeader) -> str:
    c = int(header.consistency)
    if c in (pb.CONSISTENCY_UNSPECIFIED, pb.LINEARIZABLE):
        return LINEARIZABLE
    if c == pb.STALE:
        return STALE
    raise InvalidArgument(f"unknown consistency level {c}; use LINEARIZABLE (1) or STALE (2)")


def request_id(header: pb.RequestHeader) -> RequestId | None:
    if not header.HasField("request_id"):
        return None
    rid = header.request_id
    if not 1 <= len(rid.client_id) <= 64:
        raise InvalidArgument(
            f"request_id.client_id is {len(rid.client_id)} bytes; it must be 1..64 bytes"
        )
    if rid.seq == 0:
        raise InvalidArgument("request_id.seq must be > 0")
    return RequestId(client_id=bytes(rid.client_id), seq=int(rid.seq))


def check_batch(n: int, max_keys: int) -> None:
    if n == 0:
        raise InvalidArgument("the request names no keys")
    if n > max_keys:
        raise InvalidArgument(f"the request names {n} keys; the limit is {max_keys} per call; split it")
