"""Network faults: grudges as pure data, and the mechanisms that apply them.

A *grudge* (Jepsen's word) says who cannot hear whom: a mapping from a node to
the set of nodes whose traffic it drops.  ``{"n1": {"n2"}}`` means n1 ignores
everything n2 sends it.  The shapes below build grudges from node lists and a
seeded ``random.Random``; they never touch the network, so they are trivially
testable.  The empty grudge (:func:`heal`) means a fully connected network.

Mechanisms apply a grudge to a running cluster:

* :class:`NetnsNet` -- one network namespace per node, a veth pair from each into
  one bridge in the host namespace, and ``iptables -A INPUT -s <peer> -j DROP``
  inside each node's namespace (exactly Jepsen's ``net.clj``).  Needs root,
  ``ip netns`` and ``iptables``.  It cuts *all* traffic between the nodes (Raft
  and request forwarding); the harness itself talks to every node from the host
  namespace through the bridge, which no grudge ever blocks.
* :class:`FilterNet` -- the fallback: ``Admin.SetFaultFilter(blocked_nodes)`` on
  each node, which drops Raft traffic to and from the blocked nodes inside the
  node's transport.  Nodes stay on 127.0.0.1.  It blocks Raft only (a node may
  still forward a client request to a leader it cannot reach over Raft), and it
  is symmetric per node pair.

Both mechanisms take the same grudge data.  Every mechanism is a context manager
and :meth:`close` removes everything it created, on every exit path.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, Protocol

__all__ = [
    "FilterNet",
    "Grudge",
    "NetError",
    "NetnsNet",
    "NetMechanism",
    "bridge",
    "complete_grudge",
    "components_of",
    "grudge_json",
    "heal",
    "isolate",
    "isolate_leader",
    "majorities_ring",
    "netns_available",
    "random_halves",
    "SHAPES",
]

log = logging.getLogger(__name__)

Grudge = dict[str, frozenset[str]]
"""node -> the nodes whose traffic it drops (absent node: drops nothing)."""


class NetError(RuntimeError):
    """A network mechanism could not be set up or could not apply a grudge."""


# ------------------------------------------------------------------ grudges (pure)


def heal() -> Grudge:
    """The empty grudge: everybody hears everybody."""
    return {}


def complete_grudge(components: Iterable[Iterable[str]]) -> Grudge:
    """Every node drops traffic from every node outside its own component.

    Components must be disjoint; nodes in no component are unaffected.
    Nodes with nothing to drop are omitted, so a single component yields ``{}``.
    """
    comps = [frozenset(c) for c in components]
    seen: set[str] = set()
    for c in comps:
        if seen & c:
            raise ValueError(f"components overlap on {sorted(seen & c)}")
        seen |= c
    out: Grudge = {}
    for c in comps:
        others = frozenset(seen - c)
        if not others:
            continue
        for n in c:
            out[n] = others
    return out


def isolate(node: str, nodes: Sequence[str]) -> Grudge:
    """Cut ``node`` off from every other node (both directions)."""
    if node not in nodes:
        raise ValueError(f"{node} is not one of {list(nodes)}")
    return complete_grudge([[node], [n for n in nodes if n != node]])


def isolate_leader(leader: str, nodes: Sequence[str]) -> Grudge:
    """Isolate a shard's leader: the majority elects a new one while the old
    leader may still believe it leads (the stale-read scenario)."""
    return isolate(leader, nodes)


def _bisect(nodes: Sequence[str]) -> tuple[list[str], list[str]]:
    """Jepsen's ``bisect``: a smaller first half, a larger second half."""
    k = len(nodes) // 2
    return list(nodes[:k]), list(nodes[k:])


def random_halves(nodes: Sequence[str], rng: random.Random) -> Grudge:
    """Shuffle the nodes and cut them into a minority and a majority."""
    shuffled = list(nodes)
    rng.shuffle(shuffled)
    a, b = _bisect(shuffled)
    return complete_grudge([a, b])


def bridge(nodes: Sequence[str], rng: random.Random) -> Grudge:
    """Two halves that cannot hear each other, plus one *bridge* node (taken from
    the larger half) that hears and is heard by everybody."""
    if len(nodes) < 3:
        raise ValueError("a bridge needs at least 3 nodes")
    shuffled = list(nodes)
    rng.shuffle(shuffled)
    a, b = _bisect(shuffled)
    the_bridge = b[0]
    g = complete_grudge([a, b])
    g.pop(the_bridge, None)
    return {n: drops - {the_bridge} for n, drops in g.items()}


def majorities_ring(nodes: Sequence[str], rng: random.Random) -> Grudge:
    """Each node hears a different majority: the nodes are placed on a shuffled
    ring and each hears itself plus its ``m - 1`` nearest ring neighbours
    (``m = n // 2 + 1``), dropping everybody else.

    For 5 nodes every node hears its two ring neighbours; every pair of
    neighbours shares a majority, but no majority is shared by all.  (Jepsen uses
    this exact ring for up to 5 nodes and a stochastic variant above.)
    """
    n = len(nodes)
    if n < 3:
        raise ValueError("a majorities ring needs at least 3 nodes")
    ring = list(nodes)
    rng.shuffle(ring)
    m = n // 2 + 1
    before = (m - 1) // 2
    after = (m - 1) - before
    out: Grudge = {}
    for i, node in enumerate(ring):
        hears = {ring[(i + d) % n] for d in range(-before, after + 1)}
        drops = frozenset(x for x in ring if x not in hears)
        if drops:
            out[node] = drops
    return out


def components_of(grudge: Mapping[str, Iterable[str]], nodes: Sequence[str]) -> list[set[str]]:
    """Connected components of the *mutual-hearing* graph (an edge a-b exists when
    neither drops the other).  For a complete grudge these are its components."""
    drops = {n: set(grudge.get(n, ())) for n in nodes}
    left = set(nodes)
    comps: list[set[str]] = []
    while left:
        start = min(left)
        comp = {start}
        todo = [start]
        while todo:
            a = todo.pop()
            for b in list(left - comp):
                if b not in drops[a] and a not in drops[b]:
                    comp.add(b)
                    todo.append(b)
        left -= comp
        comps.append(comp)
    return comps


def grudge_json(grudge: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """The grudge as plain JSON (sorted lists), for histories and reports."""
    return {n: sorted(d) for n, d in sorted(grudge.items()) if d}


SHAPES: Final = ("isolate", "isolate-leader", "halves", "bridge", "ring")
"""Partition shapes the nemesis draws from."""


# ---------------------------------------------------------------------- mechanisms


class NetMechanism(Protocol):
    """Applies grudges.  ``apply`` replaces any previous grudge; ``heal`` removes it."""

    name: str

    def apply(self, grudge: Mapping[str, Iterable[str]]) -> None: ...

    def heal(self) -> None: ...

    def close(self) -> None: ...


def _run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 15.0) -> None:
    """Run a system command; raise NetError with its stderr on failure."""
    try:
        p = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetError(f"{' '.join(argv)}: {e}") from None
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise NetError(f"{' '.join(argv)}: {msg[-1] if msg else f'exit {p.returncode}'}")


def netns_available() -> str | None:
    """None when namespaces can be used here, else the reason they cannot.

    Requires root, the ``ip`` and ``iptables-restore`` binaries, and that
    ``ip netns add`` actually works (it is tried with a throwaway name).
    """
    if os.geteuid() != 0:
        return "not running as root"
    for tool in ("ip", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (install iproute2 and iptables)"
    probe = f"jlprobe{secrets.token_hex(3)}"
    try:
        _run(["ip", "netns", "add", probe])
    except NetError as e:
        return f"ip netns add failed: {e}"
    try:
        _run(["ip", "netns", "exec", probe, "iptables-restore"], stdin="*filter\nCOMMIT\n")
    except NetError as e:
        return f"iptables does not work inside a namespace: {e}"
    finally:
        with contextlib.suppress(NetError):
            _run(["ip", "netns", "del", probe])
    return None


def _pick_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no local interface uses yet."""
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if "inet" in parts:
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    rng = random.SystemRandom()
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{rng.randint(160, 250)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetError("no free 10.x.y.0/24 subnet for the test network")


class NetnsNet:
    """Namespaces + veth + one bridge + iptables INPUT drops (root only).

    Lifecycle: construct, :meth:`setup` (creates everything; on failure removes
    what it made and raises NetError), then :meth:`wrap` each node's argv so it
    runs inside its namespace and listens on :meth:`host_of`; :meth:`apply` /
    :meth:`heal` during the run; :meth:`close` deletes every namespace, veth and
    the bridge (idempotent, never raises).  All names carry a per-run token, so
    concurrent runs never collide.
    """

    name = "netns"

    def __init__(self, nodes: Sequence[str], token: str | None = None) -> None:
        self.nodes = list(nodes)
        self.token = token or secrets.token_hex(3)
        self.bridge_if = f"jlb{self.token}"
        self._ns = {n: f"jl-{self.token}-{n}" for n in self.nodes}
        self._veth_host = {n: f"jl{self.token}h{i}" for i, n in enumerate(self.nodes)}
        self._veth_peer = {n: f"jl{self.token}p{i}" for i, n in enumerate(self.nodes)}
        self._made_ns: list[str] = []
        self._made_links: list[str] = []
        self._ip: dict[str, str] = {}
        self.gateway = ""
        self.subnet = ""

    def setup(self) -> None:
        try:
            net = _pick_subnet()
            hosts = list(net.hosts())
            self.subnet = str(net)
            self.gateway = str(hosts[0])
            _run(["ip", "link", "add", self.bridge_if, "type", "bridge"])
            self._made_links.append(self.bridge_if)
            _run(["ip", "addr", "add", f"{self.gateway}/{net.prefixlen}", "dev", self.bridge_if])
            _run(["ip", "link", "set", self.bridge_if, "up"])
            for i, n in enumerate(self.nodes):
                ns, vh, vp = self._ns[n], self._veth_host[n], self._veth_peer[n]
                ip = str(hosts[10 + i])
                _run(["ip", "netns", "add", ns])
                self._made_ns.append(ns)
                _run(["ip", "link", "add", vh, "type", "veth", "peer", "name", vp])
                self._made_links.append(vh)
                _run(["ip", "link", "set", vp, "netns", ns])
                _run(["ip", "link", "set", vh, "master", self.bridge_if])
                _run(["ip", "link", "set", vh, "up"])
                _run(["ip", "-n", ns, "addr", "add", f"{ip}/{net.prefixlen}", "dev", vp])
                _run(["ip", "-n", ns, "link", "set", vp, "up"])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                self._ip[n] = ip
            self.heal()
        except BaseException:
            self.close()
            raise

    def namespaces(self) -> list[str]:
        """Names of the namespaces this run uses (one per node)."""
        return [self._ns[n] for n in self.nodes]

    def host_of(self, node: str) -> str:
        """The IP address ``node`` listens on (inside its namespace)."""
        return self._ip[node]

    def wrap(self, node: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``node``'s namespace.  ``ip netns exec`` execs the
        command in place, so the child's PID is the node's PID."""
        return ["ip", "netns", "exec", self._ns[node], *argv]

    def _restore(self, node: str, drops: Iterable[str]) -> None:
        rules = "".join(
            f"-A INPUT -s {self._ip[peer]} -j DROP\n" for peer in sorted(drops) if peer in self._ip
        )
        _run(
            ["ip", "netns", "exec", self._ns[node], "iptables-restore"],
            stdin=f"*filter\n:INPUT ACCEPT [0:0]\n{rules}COMMIT\n",
        )

    def apply(self, grudge: Mapping[str, Iterable[str]]) -> None:
        """Replace every node's INPUT rules with the grudge's drops."""
        for n in self.nodes:
            self._restore(n, grudge.get(n, ()))

    def heal(self) -> None:
        self.apply({})

    def close(self) -> None:
        for ns in reversed(self._made_ns):
            with contextlib.suppress(NetError):
                _run(["ip", "netns", "del", ns])
        self._made_ns.clear()
        for link in reversed(self._made_links):
            # The namespace's deletion already removed the veth pair; the bridge is ours.
            with contextlib.suppress(NetError):
                _run(["ip", "link", "del", link])
        self._made_links.clear()

    def __enter__(self) -> NetnsNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FilterNet:
    """The fallback: ``Admin.SetFaultFilter`` on every node with its grudge entry.

    ``set_filter(node, blocked)`` is the admin call (injected so this module needs
    no gRPC); it raises on failure.  A node that is down when a grudge is applied
    is skipped: it starts again with an empty filter, which :meth:`apply` notes.
    Raft traffic is dropped to *and* from the blocked nodes, so the effective
    grudge is the symmetric closure of the requested one.
    """

    name = "filter"

    def __init__(self, nodes: Sequence[str], set_filter: Callable[[str, list[str]], None]) -> None:
        self.nodes = list(nodes)
        self._set = set_filter
        self.skipped: list[str] = []

    def apply(self, grudge: Mapping[str, Iterable[str]]) -> None:
        self.skipped = []
        for n in self.nodes:
            try:
                self._set(n, sorted(grudge.get(n, ())))
            except Exception as e:  # a down node cannot be filtered; it comes back unfiltered
                log.info("fault filter on %s not applied: %s", n, e)
                self.skipped.append(n)

    def heal(self) -> None:
        self.apply({})

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.heal()
