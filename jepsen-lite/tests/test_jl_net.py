"""Grudges are pure data: each shape's defining properties, plus the mechanisms."""

from __future__ import annotations

import random
import subprocess
import sys
from itertools import combinations

import pytest
from jepsen_lite import net
from jepsen_lite.net import (
    FilterNet,
    NetnsNet,
    bridge,
    complete_grudge,
    components_of,
    grudge_json,
    heal,
    isolate,
    isolate_leader,
    majorities_ring,
    random_halves,
)

NODES = ["n1", "n2", "n3", "n4", "n5"]


def hears(g: net.Grudge, a: str, b: str) -> bool:
    """a receives b's traffic."""
    return b not in g.get(a, frozenset())


def mutual(g: net.Grudge, a: str, b: str) -> bool:
    return hears(g, a, b) and hears(g, b, a)


def test_heal_is_empty() -> None:
    assert heal() == {}
    assert components_of(heal(), NODES) == [set(NODES)]


def test_complete_grudge_cuts_exactly_between_components() -> None:
    g = complete_grudge([["n1", "n2"], ["n3", "n4", "n5"]])
    for a, b in combinations(NODES, 2):
        same = {a, b} <= {"n1", "n2"} or {a, b} <= {"n3", "n4", "n5"}
        assert mutual(g, a, b) is same
    assert components_of(g, NODES) == [{"n1", "n2"}, {"n3", "n4", "n5"}]
    assert complete_grudge([NODES]) == {}
    with pytest.raises(ValueError):
        complete_grudge([["n1", "n2"], ["n2", "n3"]])


def test_isolate_cuts_one_node_both_ways() -> None:
    g = isolate("n3", NODES)
    assert g["n3"] == frozenset({"n1", "n2", "n4", "n5"})
    for other in ("n1", "n2", "n4", "n5"):
        assert g[other] == frozenset({"n3"})
    assert components_of(g, NODES) == [{"n1", "n2", "n4", "n5"}, {"n3"}]
    assert isolate_leader("n3", NODES) == g
    with pytest.raises(ValueError):
        isolate("n9", NODES)


@pytest.mark.parametrize("seed", range(20))
def test_random_halves_minority_and_majority(seed: int) -> None:
    g = random_halves(NODES, random.Random(seed))
    comps = sorted(components_of(g, NODES), key=len)
    assert [len(c) for c in comps] == [2, 3]
    assert set().union(*comps) == set(NODES)
    assert random_halves(NODES, random.Random(seed)) == g  # seeded


def test_random_halves_varies_with_the_seed() -> None:
    minorities = {
        frozenset(min(components_of(random_halves(NODES, random.Random(s)), NODES), key=len))
        for s in range(30)
    }
    assert len(minorities) > 3


@pytest.mark.parametrize("seed", range(20))
def test_bridge_node_hears_and_is_heard_by_all(seed: int) -> None:
    g = bridge(NODES, random.Random(seed))
    bridges = [n for n in NODES if all(mutual(g, n, o) for o in NODES if o != n)]
    assert len(bridges) == 1
    b = bridges[0]
    rest = [n for n in NODES if n != b]
    # Without the bridge, the rest split into two halves that cannot hear each other.
    sub = {n: g.get(n, frozenset()) for n in rest}
    comps = sorted(components_of(sub, rest), key=len)
    assert [len(c) for c in comps] == [2, 2]
    for a in comps[0]:
        for c in comps[1]:
            assert not hears(g, a, c) and not hears(g, c, a)
    # Both sides plus the bridge are majorities (3 of 5).
    assert all(len(c) + 1 >= 3 for c in comps)
    with pytest.raises(ValueError):
        bridge(["n1", "n2"], random.Random(0))


@pytest.mark.parametrize("n", [3, 5, 7])
@pytest.mark.parametrize("seed", range(10))
def test_majorities_ring_each_node_hears_a_distinct_majority(n: int, seed: int) -> None:
    nodes = [f"n{i}" for i in range(1, n + 1)]
    g = majorities_ring(nodes, random.Random(seed))
    m = n // 2 + 1
    views = []
    for a in nodes:
        view = frozenset(b for b in nodes if hears(g, a, b))
        assert a in view
        assert len(view) == m
        views.append(view)
    assert len(set(views)) == n  # every node sees a different majority
    if n == 5:
        for a, b in combinations(nodes, 2):
            assert hears(g, a, b) == hears(g, b, a)  # the 5-node ring is symmetric
        # No node can hear everybody, so no single majority holds for all.
        assert all(g.get(a) for a in nodes)


def test_grudge_json_is_sorted_plain_data() -> None:
    g = isolate("n2", ["n1", "n2", "n3"])
    assert grudge_json(g) == {"n1": ["n2"], "n2": ["n1", "n3"], "n3": ["n2"]}


def test_filter_net_applies_each_entry_and_skips_down_nodes() -> None:
    calls: list[tuple[str, list[str]]] = []

    def set_filter(node: str, blocked: list[str]) -> None:
        if node == "n4":
            raise ConnectionError("down")
        calls.append((node, blocked))

    f = FilterNet(NODES, set_filter)
    f.apply(isolate("n1", NODES))
    assert calls[0] == ("n1", ["n2", "n3", "n4", "n5"])
    assert ("n2", ["n1"]) in calls
    assert f.skipped == ["n4"]
    calls.clear()
    f.heal()
    assert calls == [(n, []) for n in NODES if n != "n4"]


_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 7999))
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""

_CLIENT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 7999), timeout=1.5).close()
except OSError:
    sys.exit(1)
"""


def _connects(ns: str | None, ip: str) -> bool:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, sys.executable, "-c", _CLIENT, ip]).returncode == 0


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.skipif(net.netns_available() is not None, reason="needs root + ip netns + iptables")
def test_netns_net_applies_iptables_drops_and_cleans_up() -> None:
    nodes = ["n1", "n2", "n3"]
    nn = NetnsNet(nodes)
    try:
        nn.setup()
        assert all(ns in _netns_list() for ns in nn.namespaces())
        nn.apply(isolate("n1", nodes))
        rules = subprocess.run(
            ["ip", "netns", "exec", nn.namespaces()[0], "iptables", "-S", "INPUT"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"-s {nn.host_of('n2')}/32 -j DROP" in rules
        assert f"-s {nn.host_of('n3')}/32 -j DROP" in rules
        # n1 can no longer be reached from n2's namespace; the host still reaches it.
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                nn.namespaces()[0],
                sys.executable,
                "-c",
                _SERVER,
                nn.host_of("n1"),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
            assert _connects(None, nn.host_of("n1"))
            assert not _connects(nn.namespaces()[1], nn.host_of("n1"))
            nn.heal()
            assert _connects(nn.namespaces()[1], nn.host_of("n1"))
        finally:
            server.kill()
            server.wait()
    finally:
        nn.close()
    assert not any(ns in _netns_list() for ns in nn.namespaces())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert nn.bridge_if not in links
