"""The base of the small immutable values built on the hot paths (log
commands, their results, stored records).

Those used to be frozen dataclasses or NamedTuples.  Compiled (mypyc), a
class with a hand-written ``__init__`` and ``Final`` attributes is built in
0.03 us; a frozen dataclass took 0.4-0.6 us and a NamedTuple 0.2 us, because
their generated constructors run interpreted.  Every write builds several
per replica (an MSet one per key), about 5 % of a node's CPU in 100-key
msets.  ``Final`` keeps them immutable: mypy refuses an assignment, and the
compiled attribute is read-only.

Subclasses list their fields in ``FIELDS`` (in constructor order); equality,
hashing, ``repr``, :meth:`replace`, pickling and ``copy`` follow it, as
a dataclass's would.  Pure; any thread."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

V = TypeVar("V", bound="Value")


class Value:
    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def astuple(self) -> tuple[object, ...]:
        """The fields' values in ``FIELDS`` order."""
        return tuple([getattr(self, f) for f in self.FIELDS])

    def replace(self: V, **changes: Any) -> V:
        """A copy with ``changes`` (field name -> value), as ``dataclasses.replace``."""
        unknown = set(changes) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        fields = dict(zip(self.FIELDS, self.astuple(), strict=True))
        fields.update(changes)
        return type(self)(**fields)

    def __reduce__(self) -> tuple[type[Value], tuple[object, ...]]:
        """Pickling and ``copy``: rebuilt through the constructor (a
        compiled class has no other way to set its read-only fields)."""
        return type(self), self.astuple()

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and isinstance(other, Value)
            and self.astuple() == other.astuple()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.astuple()))

    def __repr__(self) -> str:
        inner = ", ".join([f"{f}={getattr(self, f)!r}" for f in self.FIELDS])
        return f"{type(self).__name__}({inner})"
