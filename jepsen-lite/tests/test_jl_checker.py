"""The WGL checker and the models, on hand-written and generated histories."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jepsen_lite.checker import check_history, check_operations
from jepsen_lite.checker.models import (
    ILLEGAL,
    CounterModel,
    KVModel,
    ModelError,
    NondeterministicModel,
    RegisterModel,
    SetModel,
    TTLRegisterModel,
    get_model,
    set_full_summary,
)
from jepsen_lite.checker.wgl import check_key
from jepsen_lite.history import Op, Operation, pair_operations
from jl_helpers import hist, timed

MS = 1_000_000

# ------------------------------------------------------------------------- register


def test_sequential_register_is_valid() -> None:
    h = hist(
        (0, "invoke", "write", 1),
        (0, "ok", "write", 1),
        (0, "invoke", "read", None),
        (0, "ok", "read", 1),
        (1, "invoke", "cas", [1, 2]),
        (1, "ok", "cas", [1, 2]),
        (1, "invoke", "read", None),
        (1, "ok", "read", 2),
    )
    r = check_history(h, "register")
    assert r.valid is True
    assert r.keys[0].valid is True and r.keys[0].ops == 4


def test_initial_nil_read_matches_none() -> None:
    h = hist((0, "invoke", "read", None), (0, "ok", "read", None))
    assert check_history(h, "register").valid is True


def test_stale_read_is_invalid_with_prefix_stuck_op_and_state() -> None:
    h = hist(
        (0, "invoke", "write", 1),
        (0, "ok", "write", 1),  # op 0
        (0, "invoke", "write", 2),
        (0, "ok", "write", 2),  # op 2
        (1, "invoke", "read", None),
        (1, "ok", "read", 1),  # op 4: stale
    )
    r = check_history(h, "register")
    assert r.valid is False
    (kr,) = r.failures
    assert kr.prefix == (0, 2)
    assert kr.stuck == 4
    assert kr.state == 2
    assert r.by_id[4].output == 1


def test_concurrent_read_may_see_old_or_new_value() -> None:
    for seen in (None, 1):
        h = hist(
            (0, "invoke", "write", 1),
            (1, "invoke", "read", None),
            (1, "ok", "read", seen),
            (0, "ok", "write", 1),
        )
        assert check_history(h, "register").valid is True


def test_read_of_a_value_never_written_is_invalid() -> None:
    h = hist(
        (0, "invoke", "write", 1),
        (0, "ok", "write", 1),
        (1, "invoke", "read", None),
        (1, "ok", "read", 3),
    )
    assert check_history(h, "register").valid is False


def test_crashed_write_may_or_may_not_take_effect_later() -> None:
    base = [(0, "invoke", "write", 1), (0, "info", "write", 1)]
    for seen in (None, 1):
        h = hist(*base, (1, "invoke", "read", None), (1, "ok", "read", seen))
        assert check_history(h, "register").valid is True
    # ...but once observed it cannot un-happen.
    h = hist(
        *base,
        (1, "invoke", "read", None),
        (1, "ok", "read", 1),
        (1, "invoke", "read", None),
        (1, "ok", "read", None),
    )
    assert check_history(h, "register").valid is False


def test_uncompleted_invocation_counts_as_crashed() -> None:
    h = hist((0, "invoke", "write", 7), (1, "invoke", "read", None), (1, "ok", "read", 7))
    assert check_history(h, "register").valid is True


def test_failed_cas_did_not_happen_and_ok_cas_must_match() -> None:
    h = hist(
        (0, "invoke", "cas", [None, 1]),
        (0, "fail", "cas", [None, 1]),
        (1, "invoke", "read", None),
        (1, "ok", "read", None),
    )
    assert check_history(h, "register").valid is True
    h = hist((0, "invoke", "cas", [5, 1]), (0, "ok", "cas", [5, 1]))
    assert check_history(h, "register").valid is False


def test_crashed_read_is_dropped() -> None:
    h = hist((0, "invoke", "read", None), (0, "info", "read", None))
    assert pair_operations(h) == []
    assert check_history(h, "register").valid is True


def test_register_rejects_malformed_cas() -> None:
    with pytest.raises(ModelError):
        check_history(hist((0, "invoke", "cas", 3), (0, "ok", "cas", 3)), "register")
    with pytest.raises(ModelError):
        check_history(hist((0, "invoke", "frob", 3), (0, "ok", "frob", 3)), "register")


def test_keys_are_checked_independently_and_first_violation_stops() -> None:
    good = [
        (0, "invoke", "write", 1, "a"),
        (0, "ok", "write", 1, "a"),
        (0, "invoke", "read", None, "a"),
        (0, "ok", "read", 1, "a"),
    ]
    bad = [
        (1, "invoke", "write", 1, "b"),
        (1, "ok", "write", 1, "b"),
        (1, "invoke", "read", None, "b"),
        (1, "ok", "read", 2, "b"),
    ]
    big_good = [
        (2, "invoke", "write", i, "c") if j == 0 else (2, "ok", "write", i, "c")
        for i in range(5)
        for j in range(2)
    ]
    h = hist(*good, *bad, *big_good)
    r = check_history(h, "register")
    assert r.valid is False
    assert [k.key for k in r.failures] == ["b"]
    skipped = [k for k in r.keys if k.reason == "skipped"]
    assert [k.key for k in skipped] == ["c"]  # bigger than "b", so never searched
    r = check_history(h, "register", all_keys=True)
    assert {k.key: k.valid for k in r.keys} == {"a": True, "b": False, "c": True}


# -------------------------------------------------------------------------- counter


def test_counter_valid_concurrent_incrs() -> None:
    h = hist(
        (0, "invoke", "incr", 1),
        (1, "invoke", "incr", 1),
        (1, "ok", "incr", 1),
        (0, "ok", "incr", 2),
        (2, "invoke", "read", None),
        (2, "ok", "read", 2),
    )
    assert check_history(h, "counter").valid is True


def test_counter_duplicated_incr_is_invalid() -> None:
    h = hist(
        (0, "invoke", "incr", 1),
        (0, "ok", "incr", 1),
        (0, "invoke", "incr", 1),
        (0, "ok", "incr", 3),  # applied twice
    )
    assert check_history(h, "counter").valid is False
    h = hist(
        (0, "invoke", "incr", 2),
        (0, "ok", "incr", 2),
        (1, "invoke", "read", None),
        (1, "ok", "read", 4),
    )
    assert check_history(h, "counter").valid is False


def test_counter_crashed_incr_is_optional() -> None:
    for seen in (0, 5):
        h = hist(
            (0, "invoke", "incr", 5),
            (0, "info", "incr", None),
            (1, "invoke", "read", None),
            (1, "ok", "read", seen),
        )
        assert check_history(h, "counter").valid is True
    h = hist(
        (0, "invoke", "incr", 5),
        (0, "info", "incr", None),
        (1, "invoke", "read", None),
        (1, "ok", "read", 4),
    )
    assert check_history(h, "counter").valid is False


# ------------------------------------------------------------------------------ set


def test_set_valid_and_lost_element() -> None:
    ok = hist(
        (0, "invoke", "add", 1),
        (0, "ok", "add", 1),
        (1, "invoke", "add", 2),
        (2, "invoke", "read", None),
        (2, "ok", "read", [1]),
        (1, "ok", "add", 2),  # concurrent add may be missed
        (2, "invoke", "read", None),
        (2, "ok", "read", [2, 1]),
    )
    assert check_history(ok, "set").valid is True
    bad = hist(
        (0, "invoke", "add", 1),
        (0, "ok", "add", 1),
        (0, "invoke", "add", 2),
        (0, "ok", "add", 2),
        (1, "invoke", "read", None),
        (1, "ok", "read", [2]),
    )
    r = check_history(bad, "set")
    assert r.valid is False
    assert r.failures[0].state == frozenset({1, 2})


def test_set_full_summary() -> None:
    h = hist(
        (0, "invoke", "add", "lost"),
        (0, "ok", "add", "lost"),
        (0, "invoke", "add", "stale"),
        (0, "ok", "add", "stale"),
        (0, "invoke", "add", "fine"),
        (0, "ok", "add", "fine"),
        (1, "invoke", "read", None),
        (1, "ok", "read", ["lost", "fine"]),
        (1, "invoke", "read", None),
        (1, "ok", "read", ["stale", "fine"]),
        (0, "invoke", "add", "late"),
        (0, "ok", "add", "late"),
    )
    s = set_full_summary(pair_operations(h))
    assert s.valid is False
    assert s.lost == ["lost"]
    assert s.stale == ["stale"]
    assert s.never_read == ["late"]
    assert s.stable == 1
    only_late = hist((0, "invoke", "add", 1), (0, "ok", "add", 1))
    assert set_full_summary(pair_operations(only_late)).valid is None


def test_set_full_ignores_crashed_adds_no_read_saw() -> None:
    # Every add of the key crashed (its nodes were killed) and the final read
    # saw none of them: maybe none was added, nothing was lost, nothing to judge.
    crashed = hist(
        (0, "invoke", "add", 1),
        (0, "info", "add", 1),
        (1, "invoke", "add", 2),
        (1, "info", "add", 2),
        (2, "invoke", "read", None),
        (2, "ok", "read", []),
    )
    s = set_full_summary(pair_operations(crashed))
    assert (s.valid, s.never_read, s.stable, s.lost) == (True, [], 0, [])
    # A crashed add that a read did see counts from that read on.
    seen = hist(
        (0, "invoke", "add", 1),
        (0, "info", "add", 1),
        (2, "invoke", "read", None),
        (2, "ok", "read", [1]),
        (2, "invoke", "read", None),
        (2, "ok", "read", []),
    )
    assert set_full_summary(pair_operations(seen)).lost == [1]


# ------------------------------------------------------------------------------ ttl


def _ttl_write(t0: int, t1: int, ttl_ms: int | None = 100, v: Any = "v") -> list[tuple[Any, ...]]:
    return [
        (t0, 0, "invoke", "write", {"value": v, "ttl_ms": ttl_ms}),
        (t1, 0, "ok", "write", {"value": v, "ttl_ms": ttl_ms}),
    ]


def _read(t0: int, t1: int, seen: Any, p: int = 1) -> list[tuple[Any, ...]]:
    return [(t0, p, "invoke", "read", None), (t1, p, "ok", "read", seen)]


@pytest.mark.parametrize(
    ("call", "ret", "seen", "valid"),
    [
        (50 * MS, 51 * MS, "v", True),  # certainly alive
        (50 * MS, 51 * MS, None, False),  # expired too early
        (200 * MS, 201 * MS, "v", False),  # certainly expired: stale
        (200 * MS, 201 * MS, None, True),
        (100 * MS, 101 * MS, "v", True),  # inside the expiry window: either
        (100 * MS, 101 * MS, None, True),
    ],
)
def test_ttl_read_rules(call: int, ret: int, seen: Any, valid: bool) -> None:
    h = timed(*_ttl_write(0, 1 * MS), *_read(call, ret, seen))
    assert check_history(h, "ttl").valid is valid


def test_ttl_expiry_is_permanent() -> None:
    h = timed(
        *_ttl_write(0, 1 * MS),
        *_read(int(100.2 * MS), int(100.3 * MS), None),
        *_read(int(100.6 * MS), int(100.7 * MS), "v", p=2),
    )
    assert check_history(h, "ttl").valid is False


def test_ttl_epsilon_and_no_ttl_and_crashed_write() -> None:
    late = timed(*_ttl_write(0, 1 * MS), *_read(103 * MS, 104 * MS, "v"))
    assert check_history(late, "ttl").valid is False
    assert check_history(late, TTLRegisterModel(epsilon_ms=5)).valid is True
    forever = timed(*_ttl_write(0, 1 * MS, ttl_ms=None), *_read(10_000 * MS, 10_001 * MS, "v"))
    assert check_history(forever, "ttl").valid is True
    crashed = [(0, 0, "invoke", "write", ["v", 100]), (1 * MS, 0, "info", "write", ["v", 100])]
    # A crashed write may apply at any later time, so a late read may still see it.
    assert check_history(timed(*crashed, *_read(5_000 * MS, 5_001 * MS, "v")), "ttl").valid is True


def test_ttl_overwrite_and_delete() -> None:
    h = timed(
        *_ttl_write(0, 1 * MS),
        *_ttl_write(2 * MS, 3 * MS, ttl_ms=None, v="w"),
        *_read(500 * MS, 501 * MS, "w"),
        (600 * MS, 0, "invoke", "delete", None),
        (601 * MS, 0, "ok", "delete", None),
        *_read(700 * MS, 701 * MS, None),
    )
    assert check_history(h, "ttl").valid is True


# ------------------------------------------------------------------------------- kv


def test_kv_model() -> None:
    h = hist(
        (0, "invoke", "put", "a", "k"),
        (0, "ok", "put", "a", "k"),
        (0, "invoke", "append", "b", "k"),
        (0, "ok", "append", "b", "k"),
        (1, "invoke", "get", None, "k"),
        (1, "ok", "get", "ab", "k"),
        (1, "invoke", "get", None, "j"),
        (1, "ok", "get", "", "j"),
    )
    assert check_history(h, KVModel()).valid is True
    bad = hist(
        *[
            (e[0], e[1], e[2], e[3], "k")
            for e in [
                (0, "invoke", "append", "x"),
                (0, "ok", "append", "x"),
                (1, "invoke", "get", None),
                (1, "ok", "get", "xx"),
            ]
        ]
    )
    assert check_history(bad, "kv").valid is False


# ----------------------------------------------------------------- nondeterminism


@dataclass(frozen=True)
class MaybeIncr(NondeterministicModel):
    """'bump' adds 0 or 1; 'read' returns the value."""

    name: ClassVar[str] = "maybe-incr"

    def init_states(self) -> Iterable[Hashable]:
        return (0,)

    def encode(self, op: Operation) -> Hashable:
        return (op.f, op.output)

    def step_all(self, state: Any, inp: Any) -> Iterable[Hashable]:
        if inp[0] == "bump":
            return (state, state + 1)
        return (state,) if inp[1] == state else ()


def test_nondeterministic_model_via_powerset() -> None:
    bumps = [(0, "invoke", "bump", None), (0, "ok", "bump", None)] * 2
    for seen, valid in ((0, True), (1, True), (2, True), (3, False)):
        h = hist(*bumps, (1, "invoke", "read", None), (1, "ok", "read", seen))
        assert check_history(h, MaybeIncr()).valid is valid
    # Reading 1 then 0 is impossible: the state set narrows after the first read.
    h = hist(
        *bumps,
        (1, "invoke", "read", None),
        (1, "ok", "read", 1),
        (1, "invoke", "read", None),
        (1, "ok", "read", 0),
    )
    assert check_history(h, MaybeIncr()).valid is False


# -------------------------------------------------------------------------- budget


def _explosive(n: int = 18) -> list[Op]:
    """n concurrent crashed writes and a read nobody wrote: exponential to refute."""
    evs: list[tuple[Any, ...]] = []
    for p in range(n):
        evs.append((p, "invoke", "write", p))
    for p in range(n):
        evs.append((p, "info", "write", p))
    evs += [(99, "invoke", "read", None), (99, "ok", "read", 12345)]
    return hist(*evs)


def test_step_budget_gives_unknown() -> None:
    r = check_history(_explosive(), "register", max_steps=20_000)
    assert r.valid is None
    assert r.keys[0].reason == "budget-steps"
    assert r.keys[0].steps == 20_001


def test_memo_budget_gives_unknown() -> None:
    r = check_history(_explosive(), "register", max_memo=5_000)
    assert r.valid is None
    assert r.keys[0].reason == "budget-memo"
    assert r.keys[0].memo <= 5_001


def test_cancellation_gives_unknown() -> None:
    m = RegisterModel()
    ops = [(o.id, o.call, o.ret, m.encode(o)) for o in pair_operations(_explosive())]
    r = check_key(m, ops, cancelled=lambda: True)
    assert r.valid is None and r.reason == "cancelled"


def test_model_step_functions_are_pure_and_use_illegal() -> None:
    m = RegisterModel()
    inp = (0, 3)
    assert m.step(None, inp) is ILLEGAL
    assert m.step(3, inp) == 3
    assert CounterModel().step(1, (1, 1, 2)) == 2
    assert SetModel().step(0, (1, 0b10, "x")) == 0b10
    assert get_model("ttl").name == "ttl"
    with pytest.raises(ModelError):
        get_model("nope")


# ------------------------------------------------------------------- process pool


def _multi_key_history(n_keys: int, bad_key: int | None) -> list[Op]:
    evs: list[tuple[Any, ...]] = []
    for k in range(n_keys):
        key = f"k{k}"
        for v in range(3):
            evs += [
                (k * 10, "invoke", "write", v, key),
                (k * 10 + 1, "invoke", "read", None, key),
                (k * 10, "ok", "write", v, key),
                (k * 10 + 1, "ok", "read", v, key),
            ]
        if k == bad_key:
            evs += [(k * 10 + 2, "invoke", "read", None, key), (k * 10 + 2, "ok", "read", 42, key)]
    return hist(*evs)


def test_pool_path_agrees_with_serial_path() -> None:
    h = _multi_key_history(6, bad_key=None)
    serial = check_history(h, "register", workers=1, quick_steps=1)
    pooled = check_history(h, "register", workers=2, quick_steps=1)
    assert serial.valid is pooled.valid is True
    assert sorted(str(k.key) for k in pooled.keys) == [f"k{i}" for i in range(6)]
    h = _multi_key_history(6, bad_key=3)
    pooled = check_history(h, "register", workers=2, quick_steps=1, all_keys=True)
    assert pooled.valid is False
    assert [k.key for k in pooled.failures] == ["k3"]
    first = check_history(h, "register", workers=2, quick_steps=1)
    assert first.valid is False and len(first.keys) == 6


# ------------------------------------------------------------ generated histories


@st.composite
def sequential_register_history(draw: st.DrawFn) -> list[Op]:
    """A real execution: each op takes effect at an instant inside its interval."""
    n = draw(st.integers(1, 25))
    state: Any = None
    events: list[tuple[int, int, int, str, str, Any]] = []  # (time, tiebreak, proc, type, f, value)
    for i in range(n):
        point = 100 * (i + 1)
        call = point - draw(st.integers(0, 150))
        ret = point + draw(st.integers(0, 150))
        kind = draw(st.sampled_from(["read", "write", "cas"]))
        crashed = draw(st.integers(0, 9)) == 0
        if kind == "read":
            out: Any = state
            events += [(call, 0, i, "invoke", "read", None), (ret, 1, i, "ok", "read", out)]
            continue
        if kind == "write":
            v = draw(st.integers(0, 3))
            happens = not crashed or draw(st.booleans())
            if happens:
                state = v
            events += [
                (call, 0, i, "invoke", "write", v),
                (ret, 1, i, "info" if crashed else "ok", "write", v),
            ]
            continue
        exp, new = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        ok = state == exp
        if ok and (not crashed or draw(st.booleans())):
            state = new
        typ = "info" if crashed else ("ok" if ok else "fail")
        events += [(call, 0, i, "invoke", "cas", [exp, new]), (ret, 1, i, typ, "cas", [exp, new])]
    events.sort(key=lambda e: (e[0], e[1]))
    return [
        Op(j, t, p, typ, f, None, v)  # type: ignore[arg-type]
        for j, (t, _tb, p, typ, f, v) in enumerate(events)
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequential_register_history())
def test_generated_executions_are_linearizable(h: list[Op]) -> None:
    assert check_history(h, "register").valid is True


@settings(max_examples=100, deadline=None)
@given(sequential_register_history(), st.integers(0, 10_000))
def test_injected_impossible_read_is_not_linearizable(h: list[Op], at: int) -> None:
    t = h[at % len(h)].time
    extra = [
        Op(len(h), t, 999, "invoke", "read", None, None),
        Op(len(h) + 1, t + 1, 999, "ok", "read", None, 77),
    ]
    h2 = sorted(h + extra, key=lambda o: (o.time, o.type != "invoke"))
    assert check_history(h2, "register").valid is False


def _brute_force(ops: list[Operation]) -> bool:
    """Linearizable iff some order of completed ops plus any subset of crashed ones
    respects real time and the register spec."""
    m = RegisterModel()
    done = [o for o in ops if not o.crashed]
    crashed = [o for o in ops if o.crashed]
    for k in range(len(crashed) + 1):
        for extra in itertools.combinations(crashed, k):
            chosen = done + list(extra)
            for perm in itertools.permutations(chosen):
                if any(
                    b.ret is not None and b.ret < a.call
                    for i, a in enumerate(perm)
                    for b in perm[i + 1 :]
                ):
                    continue
                s: Any = m.init()
                for o in perm:
                    s = m.step(s, m.encode(o))
                    if s is ILLEGAL:
                        break
                else:
                    return True
    return False


@st.composite
def random_small_history(draw: st.DrawFn) -> list[Operation]:
    n = draw(st.integers(1, 5))
    out = []
    for i in range(n):
        call = draw(st.integers(0, 20))
        ret = None if draw(st.integers(0, 5)) == 0 else call + draw(st.integers(0, 10))
        f = draw(st.sampled_from(["read", "write", "cas"]))
        if f == "read":
            if ret is None:
                continue  # crashed reads are dropped before checking
            out.append(
                Operation(i, i, "read", None, None, draw(st.sampled_from([None, 0, 1])), call, ret)
            )
        elif f == "write":
            out.append(Operation(i, i, "write", None, draw(st.integers(0, 1)), None, call, ret))
        else:
            v = [draw(st.sampled_from([None, 0, 1])), draw(st.integers(0, 1))]
            out.append(Operation(i, i, "cas", None, v, v, call, ret))
    return out


@settings(max_examples=400, deadline=None)
@given(random_small_history())
def test_wgl_agrees_with_brute_force(ops: list[Operation]) -> None:
    assert check_operations(ops, "register").valid is _brute_force(ops)


def test_set_read_of_element_never_added_is_invalid() -> None:
    h = hist(
        (0, "invoke", "add", 1),
        (0, "ok", "add", 1),
        (1, "invoke", "read", None),
        (1, "ok", "read", [1, 99]),
    )
    r = check_history(h, "set")
    assert r.valid is False
    assert r.failures[0].state == frozenset({1})
    assert SetModel().describe_state(r.failures[0].state) == "#{1}"


@pytest.mark.parametrize("name", ["register", "counter", "set", "ttl", "kv"])
def test_models_survive_pickling_for_the_pool(name: str) -> None:
    import pickle

    m = get_model(name)
    assert pickle.loads(pickle.dumps(m)) == m
    assert pickle.loads(pickle.dumps(ILLEGAL)) is ILLEGAL


def test_ttl_keys_in_the_pool() -> None:
    evs: list[Op] = []
    for k in range(4):
        key = f"t{k}"
        base = len(evs)
        seen = "v" if k != 2 else None  # key t2 expires too early
        for i, (t, p, typ, f, v) in enumerate(
            [
                (0, k, "invoke", "write", ["v", 100]),
                (1 * MS, k, "ok", "write", ["v", 100]),
                (50 * MS, 10 + k, "invoke", "read", None),
                (51 * MS, 10 + k, "ok", "read", seen),
            ]
        ):
            evs.append(Op(base + i, t, p, typ, f, key, v))  # type: ignore[arg-type]
    evs.sort(key=lambda o: (o.time, o.index))
    r = check_history(evs, "ttl", workers=2, quick_steps=1, all_keys=True)
    assert r.valid is False
    assert [k.key for k in r.failures] == ["t2"]
    assert r.failures[0].state == frozenset({("v", 0 + 100 * MS, 1 * MS + 100 * MS)})


def test_broken_pool_falls_back_to_serial(monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures.process import BrokenProcessPool

    from jepsen_lite.checker import WorkerPool

    def broken(*_a: Any, **_k: Any) -> list[Any]:
        raise BrokenProcessPool("workers died")

    monkeypatch.setattr(WorkerPool, "run", broken)
    h = _multi_key_history(4, bad_key=2)
    r = check_history(h, "register", workers=2, quick_steps=1, all_keys=True)
    assert r.valid is False and [k.key for k in r.failures] == ["k2"]
    assert all(k.valid is not None for k in r.keys)
