"""The replicated state machine of a shard: commands, their encoding, and apply.

Imports only :mod:`cachenode.storage.base` and :mod:`cachenode._errors`.
Deterministic: reads no clock, socket or randomness.
"""

from .codec import decode_command, decode_result, encode_command, encode_result
from .commands import (
    Barrier,
    BarrierResult,
    CasResult,
    Command,
    CompareAndSet,
    Condition,
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
)
from .machine import ShardStateMachine, read_get, ttl_remaining_ms

__all__ = [
    "Barrier",
    "BarrierResult",
    "CasResult",
    "Command",
    "CompareAndSet",
    "Condition",
    "Delete",
    "DeleteResult",
    "ErrorResult",
    "Expire",
    "ExpireResult",
    "Incr",
    "IncrResult",
    "MSet",
    "MSetResult",
    "Replayed",
    "RequestId",
    "Result",
    "Set",
    "SetResult",
    "ShardStateMachine",
    "decode_command",
    "decode_result",
    "encode_command",
    "encode_result",
    "read_get",
    "ttl_remaining_ms",
]
