"""Sequential specifications for the checker: pure step functions.

A model turns each :class:`~jepsen_lite.history.Operation` into a compact hashable
*input* once (:meth:`Model.encode`), then the search calls :meth:`Model.step`
millions of times, so ``step`` is a small pure function:

    step(state, input) -> next_state | ILLEGAL

States must be hashable (they go into the WGL memo next to the linearized
bitset) and must never be mutated.  ``encode`` folds the op's outcome into the
input; an op whose output is unknown (it crashed) gets :data:`UNKNOWN` as output
and every output check accepts it.

Nondeterministic specifications (several possible next states, e.g. "the TTL may
or may not have expired by now") subclass :class:`NondeterministicModel`, whose
``step_all`` returns a collection of next states (empty = illegal); the checker
runs them through :class:`PowersetModel`, whose state is the frozenset of states
the system could be in (Porcupine's construction).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from jepsen_lite.history import Operation, freeze

__all__ = [
    "ILLEGAL",
    "MODELS",
    "UNKNOWN",
    "CounterModel",
    "KVModel",
    "Model",
    "ModelError",
    "NondeterministicModel",
    "PowersetModel",
    "RegisterModel",
    "SetFullSummary",
    "SetModel",
    "TTLRegisterModel",
    "as_model",
    "get_model",
    "set_full_summary",
]

INF: Final = float("inf")


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        # Pickle by reference so identity checks survive the trip to a worker process.
        return self._name


ILLEGAL: Final = _Sentinel("ILLEGAL")
"""Returned by :meth:`Model.step` when the op cannot happen in that state."""

UNKNOWN: Final = _Sentinel("UNKNOWN")
"""Output of an op whose completion was not observed; matches any actual output."""


class ModelError(ValueError):
    """An operation the model does not understand (wrong ``f`` or value shape)."""


class Model(ABC):
    """A deterministic sequential specification.  Instances must be picklable."""

    name: ClassVar[str] = "model"
    intern_states: ClassVar[bool] = False
    """Large states (sets, state sets): let the search keep one copy of each.
    Costs ~20% speed, so small states (ints, short strings) leave it off."""

    @abstractmethod
    def init(self) -> Hashable:
        """The state before any operation."""

    @abstractmethod
    def encode(self, op: Operation) -> Hashable:
        """The compact input for ``op``; raises ModelError for ops it cannot model."""

    @abstractmethod
    def step(self, state: Any, inp: Any) -> Any:
        """Next state after applying ``inp`` in ``state``, or ILLEGAL.  Must be pure."""

    def encode_all(self, ops: Sequence[Operation]) -> list[Hashable]:
        """Inputs for all ops of one key, in order.  Models whose encoding needs the
        whole key (e.g. numbering set elements) override this, not :meth:`encode`."""
        return [self.encode(op) for op in ops]

    def decode_state(self, state: Any, inputs: Sequence[Hashable]) -> Any:
        """Turn a search state back into the model's natural value for reports,
        given the key's inputs from :meth:`encode_all`.  Identity by default."""
        return state

    def describe_state(self, state: Any) -> str:
        return "nil" if state is None else repr(state)

    def describe_op(self, op: Operation) -> str:
        """Human description used by reports: ``f(value) -> output``."""
        out = "?" if op.crashed else _fmt(op.output)
        arg = "" if op.value is None else _fmt(op.value)
        return f"{op.f}({arg}) -> {out}"


def _fmt(v: Any) -> str:
    if v is None:
        return "nil"
    if isinstance(v, list | tuple):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    return repr(v) if isinstance(v, str) else str(v)


def _out(op: Operation) -> Hashable:
    return UNKNOWN if op.crashed else freeze(op.output)


# ---------------------------------------------------------------------------- register

_READ, _WRITE, _CAS = 0, 1, 2


@dataclass(frozen=True)
class RegisterModel(Model):
    """A single read/write/compare-and-set register (Knossos ``cas-register``).

    * ``read`` -> output is the current value (``None`` = nil, the initial value);
    * ``write v`` and ``delete`` (= write nil) always succeed;
    * ``cas [expected new]`` that completed ``ok`` requires state == expected and
      sets new; a ``cas`` that completed ``fail`` did not happen and never reaches
      the model; a crashed cas, if linearized at all, must have succeeded (a failed
      one is indistinguishable from not linearizing it).
    """

    name: ClassVar[str] = "register"
    initial: Hashable = None

    def init(self) -> Hashable:
        return self.initial

    def encode(self, op: Operation) -> Hashable:
        f = op.f
        if f in ("read", "get"):
            return (_READ, _out(op))
        if f in ("write", "put", "set"):
            return (_WRITE, freeze(op.value))
        if f == "delete":
            return (_WRITE, None)
        if f == "cas":
            v = op.value
            if not isinstance(v, list | tuple) or len(v) != 2:
                raise ModelError(f"op {op.id}: cas value must be [expected, new], got {v!r}")
            return (_CAS, freeze(v[0]), freeze(v[1]))
        raise ModelError(f"op {op.id}: register has no operation {f!r}")

    def step(self, state: Any, inp: Any) -> Any:
        tag = inp[0]
        if tag == _READ:
            out = inp[1]
            return state if (out == state or out is UNKNOWN) else ILLEGAL
        if tag == _WRITE:
            return inp[1]
        return inp[2] if state == inp[1] else ILLEGAL


# ----------------------------------------------------------------------------- counter


@dataclass(frozen=True)
class CounterModel(Model):
    """A counter starting at ``initial`` (0).

    * ``incr d`` (alias ``add``; ``d`` defaults to 1) adds ``d``; its ok output is the
      new value (``None`` = not reported, accepted);
    * ``read`` -> output is the current value.

    A duplicated increment (applied twice) shows up as a read or an incr result
    that no linearization can produce.
    """

    name: ClassVar[str] = "counter"
    initial: int = 0

    def init(self) -> Hashable:
        return self.initial

    def encode(self, op: Operation) -> Hashable:
        if op.f in ("read", "get"):
            return (_READ, _out(op))
        if op.f in ("incr", "add"):
            delta = 1 if op.value is None else op.value
            if not isinstance(delta, int):
                raise ModelError(f"op {op.id}: incr delta must be an int, got {delta!r}")
            out = _out(op)
            return (_WRITE, delta, UNKNOWN if out is None else out)
        raise ModelError(f"op {op.id}: counter has no operation {op.f!r}")

    def step(self, state: Any, inp: Any) -> Any:
        if inp[0] == _READ:
            out = inp[1]
            return state if (out == state or out is UNKNOWN) else ILLEGAL
        new = state + inp[1]
        out = inp[2]
        return new if (out is UNKNOWN or out == new) else ILLEGAL


# --------------------------------------------------------------------------------- set


@dataclass(frozen=True)
class SetModel(Model):
    """A grow-only set.

    * ``add e`` always succeeds;
    * ``read`` -> output is the full set (any JSON list; order ignored).

    For speed and memory the search state is an ``int`` bitmask over the key's
    elements (bit ``i`` = the ``i``-th distinct element seen by :meth:`encode_all`),
    not a frozenset: a union or a comparison is then one machine-word-ish operation
    and a memo entry costs bytes, not kilobytes.  :meth:`decode_state` turns a mask
    back into the frozenset of elements for reports.
    """

    name: ClassVar[str] = "set"

    def init(self) -> Hashable:
        return 0

    def encode(self, op: Operation) -> Hashable:
        return self.encode_all([op])[0]

    def encode_all(self, ops: Sequence[Operation]) -> list[Hashable]:
        bits: dict[Hashable, int] = {}

        def bit(e: Hashable) -> int:
            b = bits.get(e)
            if b is None:
                b = bits[e] = 1 << len(bits)
            return b

        out: list[Hashable] = []
        for op in ops:
            if op.f == "add":
                e = freeze(op.value)
                out.append((_WRITE, bit(e), e))
            elif op.f == "read":
                if op.crashed:
                    out.append((_READ, UNKNOWN))
                    continue
                seen = op.output if op.output is not None else []
                if not isinstance(seen, list | tuple | set | frozenset):
                    raise ModelError(f"op {op.id}: set read must return a list, got {seen!r}")
                mask = 0
                for x in seen:
                    mask |= bit(freeze(x))
                out.append((_READ, mask))
            else:
                raise ModelError(f"op {op.id}: set has no operation {op.f!r}")
        return out

    def step(self, state: Any, inp: Any) -> Any:
        if inp[0] == _READ:
            out = inp[1]
            return state if (out is UNKNOWN or out == state) else ILLEGAL
        return state | inp[1]

    def decode_state(self, state: Any, inputs: Sequence[Hashable]) -> Any:
        if not isinstance(state, int):
            return state
        elems = {inp[1]: inp[2] for inp in inputs if inp[0] == _WRITE}  # type: ignore[index]
        return frozenset(e for b, e in elems.items() if state & b)

    def describe_state(self, state: Any) -> str:
        if isinstance(state, int):
            return f"<mask {state:#x}>"
        return "#{" + " ".join(sorted(map(repr, state))) + "}"


@dataclass(frozen=True)
class SetFullSummary:
    """Jepsen ``set-full``-style outcome of a set workload (all times in ns).

    * ``lost``: added (acknowledged or observed), but the last read that began after
      it was known present does not contain it;
    * ``stale``: some read that began after the element was known present missed it,
      yet a later read saw it again (a stale read, not a loss);
    * ``never_read``: no read began after the element was known present (its add
      completed, or a read saw it), so nothing can be said of it; an element whose
      adds all crashed and that no read saw was maybe never added and is not counted;
    * ``valid``: False if anything was lost or stale, None if no element could be
      judged at all, else True.
    """

    valid: bool | None
    lost: list[Hashable] = field(default_factory=list)
    stale: list[Hashable] = field(default_factory=list)
    never_read: list[Hashable] = field(default_factory=list)
    stable: int = 0


def set_full_summary(ops: Sequence[Operation]) -> SetFullSummary:
    """Summarise a set workload the way Jepsen's ``set-full`` checker does.

    Crashed adds count only once some read observes their element.  Reads that did
    not complete are ignored.
    """
    reads = sorted(
        (
            (o.call, o.ret, frozenset(freeze(x) for x in (o.output or [])))
            for o in ops
            if o.f == "read" and o.ret is not None
        ),
        key=lambda r: r[0],
    )
    adds: dict[Hashable, int | float] = {}
    for o in ops:
        if o.f == "add":
            e = freeze(o.value)
            known = o.ret if o.ret is not None else INF
            adds[e] = min(adds.get(e, INF), known)
    # An element is also known present once a read containing it has completed.
    for _call, ret, seen in reads:
        for e in seen:
            if e in adds and ret < adds[e]:
                adds[e] = ret
    lost: list[Hashable] = []
    stale: list[Hashable] = []
    never: list[Hashable] = []
    stable = 0
    for e, known in adds.items():
        if known == INF:
            continue  # only crashed adds, and no read saw it: maybe never added, nothing to judge
        after = [seen for call, _ret, seen in reads if call > known]
        if not after:
            never.append(e)
        elif e not in after[-1]:
            lost.append(e)
        elif not all(e in seen for seen in after):
            stale.append(e)
        else:
            stable += 1
    valid: bool | None
    if lost or stale:
        valid = False
    elif stable == 0 and never:
        valid = None
    else:
        valid = True
    key = repr
    return SetFullSummary(
        valid, sorted(lost, key=key), sorted(stale, key=key), sorted(never, key=key), stable
    )


# -------------------------------------------------------------------------------- kv


@dataclass(frozen=True)
class KVModel(Model):
    """One key of a string key-value store (Porcupine's kv model; partition by key).

    * ``get`` -> output is the current string ("" if never written; nil reads as "");
    * ``put v`` sets it; ``append v`` concatenates.
    """

    name: ClassVar[str] = "kv"

    def init(self) -> Hashable:
        return ""

    def encode(self, op: Operation) -> Hashable:
        if op.f == "get":
            out = _out(op)
            return (_READ, "" if out is None else out)
        if op.f == "put":
            return (1, "" if op.value is None else str(op.value))
        if op.f == "append":
            return (2, "" if op.value is None else str(op.value))
        raise ModelError(f"op {op.id}: kv has no operation {op.f!r}")

    def step(self, state: Any, inp: Any) -> Any:
        tag = inp[0]
        if tag == _READ:
            out = inp[1]
            return state if (out == state or out is UNKNOWN) else ILLEGAL
        if tag == 1:
            return inp[1]
        return state + inp[1]


# ---------------------------------------------------------------- nondeterministic


class NondeterministicModel(ABC):
    """A specification whose step may lead to several states (or none = illegal)."""

    name: ClassVar[str] = "nondeterministic"

    @abstractmethod
    def init_states(self) -> Iterable[Hashable]: ...

    @abstractmethod
    def encode(self, op: Operation) -> Hashable: ...

    @abstractmethod
    def step_all(self, state: Any, inp: Any) -> Iterable[Hashable]:
        """Every state ``inp`` may lead to from ``state``; empty when illegal."""

    def describe_state(self, state: Any) -> str:
        return repr(state)

    def describe_op(self, op: Operation) -> str:
        out = "?" if op.crashed else _fmt(op.output)
        arg = "" if op.value is None else _fmt(op.value)
        return f"{op.f}({arg}) -> {out}"


@dataclass(frozen=True)
class PowersetModel(Model):
    """The deterministic model over sets of states of a nondeterministic one."""

    inner: NondeterministicModel
    intern_states: ClassVar[bool] = True

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    def init(self) -> Hashable:
        return frozenset(self.inner.init_states())

    def encode(self, op: Operation) -> Hashable:
        return self.inner.encode(op)

    def step(self, state: Any, inp: Any) -> Any:
        step_all = self.inner.step_all
        nxt: set[Hashable] = set()
        for s in state:
            nxt.update(step_all(s, inp))
        return frozenset(nxt) if nxt else ILLEGAL

    def describe_state(self, state: Any) -> str:
        parts = sorted(self.inner.describe_state(s) for s in state)
        return parts[0] if len(parts) == 1 else "one of {" + ", ".join(parts) + "}"

    def describe_op(self, op: Operation) -> str:
        return self.inner.describe_op(op)


_ABSENT: Final = (None, 0, 0)


@dataclass(frozen=True)
class TTLRegisterModel(NondeterministicModel):
    """A register whose writes may carry a time-to-live.

    Ops (times are the history's ns clock; ``call``/``ret`` of the op itself):

    * ``write`` with value ``{"value": v, "ttl_ms": T}`` or ``[v, T]`` (``T`` may be
      null = no expiry) or a bare ``v`` (no expiry);
    * ``read`` -> output is the value, or nil if absent/expired;
    * ``delete`` -> makes the key absent.

    State: ``(v, lo, hi)`` -- value ``v`` is present and will expire at some instant
    ``E`` with ``lo <= E <= hi`` (``lo = hi = inf`` for no TTL), or ``(None, 0, 0)``
    for absent.  A write linearized at some instant in ``[call, ret]`` gives
    ``lo = call + T - epsilon``, ``hi = ret + T + epsilon`` (``ret = inf`` if the write
    crashed); ``epsilon_ms`` absorbs clock skew between harness and servers, and
    ``late_ms`` (default 0) widens only the late side, ``hi = ret + T + epsilon +
    late_ms``, for systems whose expiry may lag (never precede) the nominal instant,
    e.g. by a couple of seconds across a leader change.

    The exact rule, for any op with interval ``[c, r]`` linearized while ``v`` is
    present with window ``[lo, hi]``: its instant ``t`` lies in ``[c, r]``, so

    * the value may still be present iff ``c < hi`` (some ``t`` before the latest
      possible expiry); the state is then ``(v, max(lo, c), hi)`` -- observing it
      alive at ``t >= c`` proves ``E > c``;
    * the value may already have expired iff ``r >= lo`` (some ``t`` at or after the
      earliest possible expiry); the state is then absent, for good.

    Both may hold: that is the nondeterministic branch.  A read returning ``v`` is
    legal iff the first holds, a read returning nil iff the second holds (or ``v``
    was deleted/never written).  Hence a read must not see the value once
    ``call > set_ret + ttl + epsilon`` and must see it while
    ``ret < set_call + ttl - epsilon``.  (Linearization instants are not forced to
    be monotone beyond this narrowing, which only makes the model more permissive.)
    """

    name: ClassVar[str] = "ttl"
    epsilon_ms: float = 0.0
    late_ms: float = 0.0
    origin_ns: int = 0
    """Reports only: when set (the history's start time), expiry windows are
    described in seconds since this origin instead of raw clock ns."""

    def init_states(self) -> Iterable[Hashable]:
        return (_ABSENT,)

    def encode(self, op: Operation) -> Hashable:
        c = op.call
        r: float = INF if op.ret is None else op.ret
        if op.f in ("read", "get"):
            return (_READ, _out(op), c, r)
        if op.f == "delete":
            return (2, None, c, r)
        if op.f in ("write", "put", "set"):
            v, ttl_ms = _ttl_value(op)
            if v is None:
                return (2, None, c, r)
            if ttl_ms is None:
                return (_WRITE, v, INF, INF)
            eps = self.epsilon_ms * 1_000_000
            ttl = ttl_ms * 1_000_000
            late = self.late_ms * 1_000_000
            return (_WRITE, v, c + ttl - eps, r + ttl + eps + late)
        raise ModelError(f"op {op.id}: ttl register has no operation {op.f!r}")

    def step_all(self, state: Any, inp: Any) -> Iterable[Hashable]:
        tag = inp[0]
        if tag == _WRITE:
            return ((inp[1], inp[2], inp[3]),)
        if tag == 2:
            return (_ABSENT,)
        out, c, r = inp[1], inp[2], inp[3]
        v, lo, hi = state
        if v is None:
            return (state,) if (out is None or out is UNKNOWN) else ()
        res: list[Hashable] = []
        if c < hi and (out is UNKNOWN or out == v):
            res.append((v, max(lo, c), hi))
        if r >= lo and (out is UNKNOWN or out is None):
            res.append(_ABSENT)
        return res

    def describe_state(self, state: Any) -> str:
        v, lo, hi = state
        if v is None:
            return "nil"
        if hi == INF and lo == INF:
            return _fmt(v)
        if self.origin_ns:

            def at(t: float) -> str:
                return "never" if t == INF else f"{(t - self.origin_ns) / 1e9:+.3f} s"

            return f"{_fmt(v)} (expires between {at(lo)} and {at(hi)})"
        return f"{_fmt(v)} (expires in [{lo:.0f}, {hi:.0f}] ns)"

    def describe_op(self, op: Operation) -> str:
        out = "?" if op.crashed else _fmt(op.output)
        if op.f in ("write", "put", "set"):
            v, ttl = _ttl_value(op)
            return f"{op.f}({_fmt(v)}, ttl={ttl}ms) -> {out}"
        return f"{op.f}() -> {out}"


def _ttl_value(op: Operation) -> tuple[Hashable, float | None]:
    raw = op.value
    if isinstance(raw, dict):
        v, ttl = raw.get("value"), raw.get("ttl_ms")
    elif isinstance(raw, list | tuple) and len(raw) == 2:
        v, ttl = raw[0], raw[1]
    else:
        v, ttl = raw, None
    if ttl is not None and not isinstance(ttl, int | float):
        raise ModelError(f"op {op.id}: ttl_ms must be a number, got {ttl!r}")
    return freeze(v), ttl


# ---------------------------------------------------------------------------- registry

MODELS: Final[dict[str, type[Model] | type[NondeterministicModel]]] = {
    "register": RegisterModel,
    "cas-register": RegisterModel,
    "counter": CounterModel,
    "set": SetModel,
    "ttl": TTLRegisterModel,
    "kv": KVModel,
}


def as_model(m: Model | NondeterministicModel) -> Model:
    """The deterministic model the search runs (wraps nondeterministic ones)."""
    return PowersetModel(m) if isinstance(m, NondeterministicModel) else m


def get_model(name: str, **params: Any) -> Model:
    """Instantiate a model by name (see MODELS) ready for the checker."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    try:
        return as_model(cls(**params))
    except TypeError as e:
        raise ModelError(f"bad parameters for model {name!r}: {e}") from None
