"""The multiplexed Raft transport over real loopback sockets."""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cachenode.raft.mux import MAGIC, RaftMux


class _Pwn:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class Loop:
    """Drives muxes on one background thread, like the node's driver loop."""

    def __init__(self) -> None:
        self.muxes: list[RaftMux] = []
        self.inbox: list[tuple[str, str, int, Any]] = []
        self.events: list[tuple[str, str, bool]] = []
        self._stop = threading.Event()
        self._calls: list[Callable[[], None]] = []
        self._t = threading.Thread(target=self._run, daemon=True)

    def add(self, node: str, secret: bytes) -> RaftMux:
        m = RaftMux(
            node, "127.0.0.1:0", secret,
            lambda frm, g, msg: self.inbox.append((node, frm, g, msg)),
            lambda peer, up: self.events.append((node, peer, up)),
        )
        self.muxes.append(m)
        return m

    def call(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)

    def _run(self) -> None:
        while not self._stop.is_set():
            while self._calls:
                self._calls.pop(0)()
            for m in self.muxes:
                m.poll(0.002)
                m.flush()

    def start(self) -> None:
        self._t.start()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)
        for m in self.muxes:
            m.close()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.stop()


def _link(loop: Loop, a: RaftMux, b: RaftMux) -> None:
    def setup() -> None:
        a.set_address(b.node_id, b.listen_address)
        b.set_address(a.node_id, a.listen_address)
        a.want_peer(b.node_id)
        b.want_peer(a.node_id)

    loop.call(setup)


def test_frames_reach_the_right_group_in_order(loop: Loop) -> None:
    a, b = loop.add("n1", b"s3cret"), loop.add("n2", b"s3cret")
    loop.start()
    _link(loop, a, b)
    wait_for(lambda: a.is_up("n2") and b.is_up("n1"), what="links up")
    for i in range(200):
        loop.call(lambda i=i: a.send("n2", i % 3, {"seq": i}))
    wait_for(lambda: len([m for m in loop.inbox if m[0] == "n2"]) == 200, what="200 frames")
    got = [m for m in loop.inbox if m[0] == "n2"]
    assert [m[3]["seq"] for m in got] == list(range(200))
    assert {m[2] for m in got} == {0, 1, 2}
    assert all(m[1] == "n1" for m in got)
    assert ("n1", "n2", True) in loop.events


def test_large_frame_crosses_intact(loop: Loop) -> None:
    a, b = loop.add("n1", b"k"), loop.add("n2", b"k")
    loop.start()
    _link(loop, a, b)
    wait_for(lambda: a.is_up("n2"), what="link up")
    blob = os.urandom(5 * 1024 * 1024)
    loop.call(lambda: a.send("n2", 7, blob))
    wait_for(lambda: any(m[2] == 7 for m in loop.inbox), what="big frame")
    assert [m[3] for m in loop.inbox if m[2] == 7][0] == blob


def test_wrong_secret_never_connects(loop: Loop) -> None:
    a, b = loop.add("n1", b"right"), loop.add("n2", b"wrong")
    loop.start()
    _link(loop, a, b)
    wait_for(lambda: a.rejected + b.rejected >= 2, what="handshake rejections")
    assert not a.is_up("n2") and not b.is_up("n1")
    assert loop.inbox == []


def test_unauthenticated_pickle_is_never_unpickled(loop: Loop, tmp_path: Any) -> None:
    m = loop.add("n1", b"secret")
    loop.start()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Pwn(str(marker)))
    host, port = m.listen_address.rsplit(":", 1)
    # 1) a pysyncobj-style frame straight away (no handshake)
    # 2) a valid-looking hello, then a frame instead of the proof
    attempts = [
        len(payload).to_bytes(4, "big") + payload,
        MAGIC + b"\x02n9\x02n1" + os.urandom(16) + os.urandom(32) + (len(payload) + 4).to_bytes(4, "big") + b"\0\0\0\0" + payload,
    ]
    for data in attempts:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(data)
        s.settimeout(5)
        closed = False
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    closed = True
                    break
        except ConnectionResetError:
            closed = True
        finally:
            s.close()
        assert closed, "the raft port kept an unauthenticated connection open"
    assert not marker.exists(), "an unauthenticated payload was unpickled"
    assert loop.inbox == []
    assert m.rejected >= 2


def test_blocked_peer_traffic_is_dropped(loop: Loop) -> None:
    a, b = loop.add("n1", b"k"), loop.add("n2", b"k")
    loop.start()
    _link(loop, a, b)
    wait_for(lambda: a.is_up("n2"), what="link up")
    sent: list[bool] = []

    def blocked_send() -> None:
        a.blocked = {"n2"}
        sent.append(a.send("n2", 1, "dropped"))
        a.blocked = set()
        sent.append(a.send("n2", 1, "delivered"))

    loop.call(blocked_send)
    wait_for(lambda: any(m[3] == "delivered" for m in loop.inbox), what="delivery after heal")
    assert sent == [False, True]
    assert not any(m[3] == "dropped" for m in loop.inbox)


def _dial_as(mux: RaftMux, me: str, secret: bytes) -> socket.socket:
    """A raw peer connection to ``mux``, authenticated as ``me`` (mux polled by the caller)."""
    from cachenode.raft.mux import _mac

    host, port = mux.listen_address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    nonce_c = os.urandom(16)
    to = mux.node_id.encode()
    s.sendall(MAGIC + bytes([len(me)]) + me.encode() + bytes([len(to)]) + to + nonce_c)
    challenge = b""
    deadline = time.monotonic() + 5
    s.setblocking(False)
    while len(challenge) < 48 and time.monotonic() < deadline:
        mux.poll(0.01)
        try:
            challenge += s.recv(48 - len(challenge))
        except BlockingIOError:
            pass
    assert len(challenge) == 48, "no challenge from the raft port"
    nonce_s = challenge[:16]
    assert challenge[16:] == _mac(secret, b"S", nonce_c, nonce_s, to)
    s.setblocking(True)
    s.sendall(_mac(secret, b"C", nonce_s, nonce_c, me.encode()))
    return s


def _frame(group: int, msg: Any) -> bytes:
    payload = pickle.dumps(msg)
    return (len(payload) + 4).to_bytes(4, "big") + group.to_bytes(4, "big") + payload


def test_a_newer_connection_from_a_peer_replaces_the_older(tmp_path: Any) -> None:
    """A peer reconnects only after giving up its old connection: anything
    still unread on that one is older than what the new one carries, and
    read after it would reorder the peer's messages (a snapshot piece of an
    abandoned transmission landing in the next one).  The old connection is
    closed unread, as a lost message would be."""
    got: list[Any] = []
    m = RaftMux("n2", "127.0.0.1:0", b"k", lambda frm, g, msg: got.append(msg), lambda peer, up: None)
    try:
        old = _dial_as(m, "n1", b"k")
        old.sendall(_frame(1, "from the old connection, read"))
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            m.poll(0.01)
        assert got == ["from the old connection, read"]
        new = _dial_as(m, "n1", b"k")
        new.sendall(_frame(1, "from the new connection"))
        old.sendall(_frame(1, "from the old connection, stale"))
        deadline = time.monotonic() + 5
        while "from the new connection" not in got and time.monotonic() < deadline:
            m.poll(0.01)
        for _ in range(20):
            m.poll(0.01)
        assert got == ["from the old connection, read", "from the new connection"]
        old.settimeout(5)
        try:  # closed by the raft port (reset: it left data unread)
            assert old.recv(1) == b""
        except ConnectionResetError:
            pass
        old.close()
        new.close()
    finally:
        m.close()


def test_queued_bytes_is_zero_once_everything_left(loop: Loop) -> None:
    """The handshake's bytes are counted as they are queued, so the count of
    unsent bytes (the transport's pacing) never goes below zero; it did by
    60 bytes, and a snapshot piece was 60 bytes over its budget."""
    a, b = loop.add("n1", b"k"), loop.add("n2", b"k")
    loop.start()
    _link(loop, a, b)
    wait_for(lambda: a.is_up("n2"), what="link up")
    loop.call(lambda: a.send("n2", 1, b"x" * 1000))
    wait_for(lambda: any(m[2] == 1 for m in loop.inbox), what="the frame")
    assert a.queued_bytes("n2") == 0
