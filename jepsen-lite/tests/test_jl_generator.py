"""The seeded generator and the nemesis schedule: determinism and shape."""

from __future__ import annotations

from collections import Counter

import pytest
from jepsen_lite.generator import Generator, OpSpec, WorkloadShape
from jepsen_lite.nemesis import FAULT_KINDS, build_schedule


def _drive(gen: Generator, rounds: int) -> list[OpSpec]:
    """Ask every worker in turn, ``rounds`` times (a fixed interleaving)."""
    return [gen.next_op(w) for _ in range(rounds) for w in range(gen.n_workers)]


@pytest.mark.parametrize("workload", ["register", "counter", "set"])
def test_same_seed_same_ops(workload: str) -> None:
    a = _drive(Generator.for_workload(workload, 42), 100)
    b = _drive(Generator.for_workload(workload, 42), 100)
    c = _drive(Generator.for_workload(workload, 43), 100)
    assert a == b
    assert a != c


def test_worker_stream_does_not_depend_on_interleaving() -> None:
    """A worker's choices come from its own RNG: other workers' calls don't shift them."""
    g1 = Generator("register", 7, WorkloadShape(1, 3, 10_000))
    g2 = Generator("register", 7, WorkloadShape(1, 3, 10_000))
    only0 = [g1.next_op(0) for _ in range(50)]
    mixed = []
    for _ in range(50):
        g2.next_op(1)
        mixed.append(g2.next_op(0))
        g2.next_op(2)
    assert [(o.f, o.value) for o in only0] == [(o.f, o.value) for o in mixed]


def test_independent_keys_rotate_after_ops_per_key() -> None:
    gen = Generator("register", 1, WorkloadShape(key_groups=2, workers_per_key=3, ops_per_key=10))
    assert gen.n_workers == 6
    ops = _drive(gen, 20)  # 120 ops, 60 per group
    per_key = Counter(o.key for o in ops)
    assert all(n == 10 for n in per_key.values())
    group0 = {o.key for i, o in enumerate(ops) if i % 6 < 3}
    group1 = {o.key for i, o in enumerate(ops) if i % 6 >= 3}
    assert group0 == {f"r/{k}" for k in range(0, 12, 2)}
    assert group1 == {f"r/{k}" for k in range(1, 12, 2)}
    assert gen.keys()[:2] == ["r/0", "r/1"]


def test_register_ops_and_values() -> None:
    ops = _drive(Generator.for_workload("register", 3), 200)
    fs = Counter(o.f for o in ops)
    assert set(fs) == {"read", "write", "cas"}
    for o in ops:
        if o.f == "write":
            assert o.value in range(5)
        if o.f == "cas":
            assert len(o.value) == 2 and all(v in range(5) for v in o.value)


def test_register_sends_a_seeded_share_of_writes_as_mset() -> None:
    ops = _drive(Generator.for_workload("register", 3), 400)
    writes = [o for o in ops if o.f == "write"]
    share = sum(o.mset for o in writes) / len(writes)
    assert 0.35 < share < 0.65
    assert not any(o.mset for o in ops if o.f != "write")
    assert not any(o.mset for o in _drive(Generator.for_workload("ttl", 3), 50))


def test_counter_incr_deltas_and_dup_fraction() -> None:
    ops = _drive(Generator.for_workload("counter", 5), 400)
    incrs = [o for o in ops if o.f == "incr"]
    assert all(1 <= o.value <= 5 for o in incrs)
    dup = sum(o.dup for o in incrs) / len(incrs)
    assert 0.12 < dup < 0.28
    assert not any(o.dup for o in ops if o.f == "read")


def test_set_elements_are_unique_and_tracked() -> None:
    gen = Generator.for_workload("set", 9)
    ops = _drive(gen, 100)
    adds = [(o.key, o.value) for o in ops if o.f == "add"]
    assert len(adds) == len(set(adds))
    for key in gen.keys():
        assert gen.elements(key) == [v for k, v in adds if k == key]


def test_ttl_writes_when_due_and_reads_in_between() -> None:
    now = [0.0]
    gen = Generator("ttl", 1, WorkloadShape(1, 2, 10_000), clock=lambda: now[0])
    first = gen.next_op(0)
    assert first.f == "write" and 1000 <= first.value["ttl_ms"] <= 3000
    assert gen.next_op(1).f == "read"  # not due yet
    now[0] += 10.0
    assert gen.next_op(1).f == "write"


def test_unknown_workload_is_rejected() -> None:
    with pytest.raises(ValueError):
        Generator("bank", 1, WorkloadShape(1, 1, 1))


# ------------------------------------------------------------------ nemesis schedule


@pytest.mark.parametrize("nemesis", ["partition", "kill", "pause", "clock", "mixed", "disk"])
def test_schedule_is_seeded_and_well_formed(nemesis: str) -> None:
    a = build_schedule(nemesis, 5, 120.0)
    assert a == build_schedule(nemesis, 5, 120.0)
    assert a != build_schedule(nemesis, 6, 120.0)
    prev_end = 0.0
    for p in a:
        quiet = p.start_s - prev_end
        assert 3.0 <= quiet <= 6.0 + 1e-9
        assert p.duration_s <= 10.0 + 1e-9
        assert p.start_s + p.duration_s <= 120.0 + 1e-9
        prev_end = p.start_s + p.duration_s
        assert p.kind in (*FAULT_KINDS, "disk")
        if nemesis != "mixed":
            assert p.kind == nemesis
        if p.kind == "clock":
            assert 5_000 <= abs(p.offset_ms) <= 60_000
    assert len(a) >= 7


def test_mixed_uses_every_kind_and_pins_apply() -> None:
    kinds = {p.kind for p in build_schedule("mixed", 1, 600.0)}
    assert kinds == set(FAULT_KINDS)  # not disk: earlier seeds keep their schedules
    assert {p.target for p in build_schedule("disk", 1, 600.0)} == {"leader", "one", "minority"}
    assert {p.shape for p in build_schedule("partition", 1, 100.0, shape="bridge")} == {"bridge"}
    assert {p.target for p in build_schedule("kill", 1, 100.0, target="all")} == {"all"}


def test_none_has_no_faults_and_membership_draws_placement_actions() -> None:
    assert build_schedule("none", 1, 60.0) == []
    plans = build_schedule("membership", 1, 120.0)
    assert plans and {p.kind for p in plans} == {"membership"}
    assert {p.target for p in plans} <= {"move-replica", "move-leader-replica", "transfer-leader", "drain-pd-node"}
    assert len({p.target for p in build_schedule("membership", 1, 600.0)}) == 4
    with pytest.raises(ValueError):
        build_schedule("bogus", 1, 60.0)
