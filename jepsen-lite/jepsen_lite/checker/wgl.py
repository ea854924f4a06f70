"""Wing–Gong–Lowe linearizability search for one partition (key) of a history.

This is Porcupine's ``checkSingle`` (and Knossos's ``wgl``) in Python:

* every op contributes a *call* entry and, unless it crashed, a *return* entry;
  entries are sorted by time with calls before returns on equal times, so
  intervals are closed (touching ops count as concurrent);
* the entries form a doubly linked list (two int lists, "dancing links") from which
  a linearized op's call and return are lifted and later restored;
* the set of linearized ops is an ``int`` bitset; ``(bitset, state)`` pairs already
  explored go into a memo ``set`` (Lowe's memoisation), so states must be hashable
  (models with large states set ``intern_states``: each distinct state is then
  kept once and the memo holds a small int for it);
* a crashed op has no return entry: it is concurrent with everything after its
  call and is never *forced* into the linearization.  Hence scanning off the end of
  the list means every completed op was linearized: success (Knossos's rule of
  moving ``:info`` completions to +infinity).

The search is exponential in the worst case, so it takes a step budget and a memo
budget and returns ``valid=None`` ("unknown") when either runs out, instead of
running for hours or exhausting memory.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Final

from jepsen_lite.checker.models import ILLEGAL, Model

__all__ = [
    "DEFAULT_MAX_MEMO",
    "DEFAULT_MAX_STEPS",
    "EncodedOp",
    "KeyResult",
    "check_key",
]

DEFAULT_MAX_STEPS: Final = 5_000_000
"""About 2 s of search on one core; enough for any valid Jepsen-sized key."""

DEFAULT_MAX_MEMO: Final = 1_000_000
"""Memo entries (bitset, state); roughly 150-300 MB for keys of a few hundred ops."""

CANCEL_POLL_MASK: Final = 0xFFFF  # poll the cancel flag every 65,536 steps

EncodedOp = tuple[int, int, int | None, Hashable]
"""``(op id, call time, return time or None if crashed, model input)``."""


@dataclass(frozen=True, slots=True)
class KeyResult:
    """The verdict for one key.

    ``valid``: True (linearizable), False (not), None (unknown: see ``reason``, one of
    ``"budget-steps"``, ``"budget-memo"``, ``"cancelled"``, ``"skipped"``).
    For ``valid is False``: ``prefix`` is the longest linearizable prefix found (op
    ids in linearization order), ``stuck`` the op that could not be linearized after
    it (its return came before it could be placed), and ``state`` the model state
    after the prefix.
    """

    key: Hashable
    valid: bool | None
    ops: int
    steps: int = 0
    memo: int = 0
    seconds: float = 0.0
    reason: str | None = None
    prefix: tuple[int, ...] = ()
    stuck: int | None = None
    state: Any = None


def check_key(
    model: Model,
    ops: Sequence[EncodedOp],
    *,
    key: Hashable = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_memo: int = DEFAULT_MAX_MEMO,
    cancelled: Callable[[], bool] | None = None,
) -> KeyResult:
    """Decide whether ``ops`` (one partition, already encoded) are linearizable.

    ``cancelled`` is polled every 65,536 steps; when it returns True the search stops
    with ``valid=None, reason="cancelled"``.  Pure apart from that: same input, same
    result.
    """
    t0 = perf_counter()
    n = len(ops)
    events: list[tuple[int, int, int]] = []
    for i, (_oid, call, ret, _inp) in enumerate(ops):
        events.append((call, 0, i))  # 0 sorts calls before returns at equal times
        if ret is not None:
            if ret < call:
                raise ValueError(f"op {ops[i][0]} returns before it is called")
            events.append((ret, 1, i))
    events.sort()

    # Node 0 is the head sentinel, nodes 1..E the entries, E+1 the end sentinel.
    size = len(events) + 2
    end = size - 1
    nxt = list(range(1, size + 1))
    prv = list(range(-1, size - 1))
    is_call = [False] * size
    op_of = [0] * size
    bit = [0] * size
    inp: list[Any] = [None] * size
    match = [0] * size  # call node -> its return node (0: crashed, none)
    call_node = [0] * n
    for node, (_t, kind, i) in enumerate(events, 1):
        op_of[node] = i
        if kind == 0:
            is_call[node] = True
            bit[node] = 1 << i
            inp[node] = ops[i][3]
            call_node[i] = node
        else:
            match[call_node[i]] = node

    step = model.step
    state: Any = model.init()
    lin = 0
    memo: set[tuple[int, Any]] = set()
    intern = model.intern_states
    state_ids: dict[Any, int] = {}
    stack: list[tuple[int, Any]] = []
    best_len = -1
    best_prefix: list[int] = []
    best_stuck = -1
    best_state: Any = None
    steps = 0
    entry = nxt[0]

    def unknown(reason: str) -> KeyResult:
        return KeyResult(key, None, n, steps, len(memo), perf_counter() - t0, reason)

    while entry != end:
        steps += 1
        if steps > max_steps:
            return unknown("budget-steps")
        if cancelled is not None and not steps & CANCEL_POLL_MASK and cancelled():
            return unknown("cancelled")
        if is_call[entry]:
            new_state = step(state, inp[entry])
            if new_state is not ILLEGAL:
                new_lin = lin | bit[entry]
                if intern:
                    # Store each distinct (large) state once, as a small int, however
                    # many bitsets it is paired with.
                    sid = state_ids.get(new_state)
                    if sid is None:
                        sid = state_ids[new_state] = len(state_ids)
                    key_state: Any = sid
                else:
                    key_state = new_state
                before = len(memo)
                memo.add((new_lin, key_state))
                if len(memo) != before:  # not explored yet: linearize this call here
                    if before >= max_memo:
                        return unknown("budget-memo")
                    stack.append((entry, state))
                    state = new_state
                    lin = new_lin
                    p, q = prv[entry], nxt[entry]
                    nxt[p] = q
                    prv[q] = p
                    m = match[entry]
                    if m:
                        p, q = prv[m], nxt[m]
                        nxt[p] = q
                        prv[q] = p
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
        else:
            # A return whose call is not linearized yet: this branch is dead.
            if len(stack) > best_len:
                best_len = len(stack)
                best_prefix = [ops[op_of[c]][0] for c, _s in stack]
                best_stuck = ops[op_of[entry]][0]
                best_state = state
            if not stack:
                return KeyResult(
                    key=key,
                    valid=False,
                    ops=n,
                    steps=steps,
                    memo=len(memo),
                    seconds=perf_counter() - t0,
                    prefix=tuple(best_prefix),
                    stuck=best_stuck,
                    state=best_state,
                )
            entry, state = stack.pop()
            lin ^= bit[entry]
            m = match[entry]
            if m:
                p, q = prv[m], nxt[m]
                nxt[p] = m
                prv[q] = m
            p, q = prv[entry], nxt[entry]
            nxt[p] = entry
            prv[q] = entry
            entry = nxt[entry]
    return KeyResult(key, True, n, steps, len(memo), perf_counter() - t0)
