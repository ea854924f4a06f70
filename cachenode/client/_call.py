"""What one client call is and where its attempt goes: :class:`Op` and
:class:`Target`, built on every call and every attempt.  Compiled value
classes (:mod:`cachenode._value`): a NamedTuple built through an
interpreted constructor.  Pure values; any thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from .._types import NodeId
from .._value import Value
from ._coalesce import BATCH_FIELD
from ._convert import show_key


class Target(Value):
    """Where one attempt goes."""

    __slots__ = ("address", "node_id", "no_forward")
    FIELDS = ("address", "node_id", "no_forward")

    def __init__(self, address: str, node_id: NodeId | None, no_forward: bool) -> None:
        self.address: Final[str] = address
        self.node_id: Final[NodeId | None] = node_id
        self.no_forward: Final[bool] = no_forward

    def describe(self) -> str:
        return (
            f"node {self.node_id} at {self.address}" if self.node_id else f"endpoint {self.address}"
        )


class Op(Value):
    """One single-shard RPC: what to call, how to build it, how to route it."""

    __slots__ = ("method", "keys", "build", "write", "stale")
    FIELDS = ("method", "keys", "build", "write", "stale")

    def __init__(
        self,
        method: str,
        keys: tuple[bytes, ...],
        build: Callable[[], Any],
        write: bool,
        stale: bool = False,
    ) -> None:
        self.method: Final[str] = method  # stub attribute: "Set"
        self.keys: Final[tuple[bytes, ...]] = keys  # all on one shard; the first routes the call
        self.build: Final[Callable[[], Any]] = build  # the request, header not filled in (CallState.request does)
        self.write: Final[bool] = write
        self.stale: Final[bool] = stale

    @property
    def display(self) -> str:
        """The op for messages: ``set 'k'``, ``mget of 3 key(s) starting at 'a'``.
        Made only when a message needs it (rendering the key on every call
        cost a few microseconds)."""
        verb = BATCH_FIELD.get(self.method, self.method)  # an op's Batch field is its verb
        if self.method in ("MGet", "MSet"):
            return f"{verb} of {len(self.keys)} key(s) starting at {show_key(self.keys[0])}"
        return f"{verb} {show_key(self.keys[0])}"
