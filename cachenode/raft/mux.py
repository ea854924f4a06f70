"""One Raft port per node: an authenticated, multiplexed peer transport.

Every Raft group hosted by a node (all shard replicas and the metadata group)
shares one listening socket and one outbound TCP connection per peer node.
Frames carry the group id, so a message reaches its group directly.

Wire protocol (all integers big-endian)::

    handshake (raw bytes, never unpickled):
      C->S  HELLO     b"CNRAFT1\\0" | u8 len | from_node | u8 len | to_node | 16B nonce_c
      S->C  CHALLENGE 16B nonce_s | 32B HMAC(secret, b"S" nonce_c nonce_s to_node)
      C->S  PROOF     32B HMAC(secret, b"C" nonce_s nonce_c from_node)
    then, C->S only:
      frame  u32 length | u32 group | pickled message     (length covers group+payload)

The server side verifies PROOF before it reads a single frame, so nothing an
unauthenticated peer sends is ever unpickled; a connection that fails the
handshake, is too slow (``HANDSHAKE_TIMEOUT``) or sends an oversized frame is
closed and logged.  The client side checks the server's HMAC too, so a node
never sends Raft traffic to an impostor.  Authentication, not encryption: use
a private network (or add TLS) where traffic must be confidential.

Each outbound connection carries this node's traffic to one peer; messages
from that peer arrive on the peer's own outbound connection (our inbound).
A peer counts as *connected* for Raft once our outbound connection to it is
authenticated.

Threading: every method runs on the Raft driver thread (see ``host.py``),
except :meth:`wake`, which any thread may call.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import pickle
import selectors
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .._types import NodeId

log = logging.getLogger(__name__)

MAGIC = b"CNRAFT1\0"
HANDSHAKE_TIMEOUT = 5.0
MAX_FRAME = 1024 * 1024 * 1024  # a catch-up append may carry ~300 MiB of entries plus one large entry
RECONNECT_INTERVAL = 0.25
_U32 = struct.Struct(">I")
_HDR = struct.Struct(">II")

DeliverFn = Callable[[NodeId, int, Any], None]
PeerEventFn = Callable[[NodeId, bool], None]


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


class _Conn:
    """One socket plus its buffers and handshake state."""

    __slots__ = (
        "sock", "outbound", "peer", "state", "rbuf", "wbuf", "wbytes", "nonce_c",
        "nonce_s", "deadline", "addr", "want_write",
    )

    def __init__(self, sock: socket.socket, outbound: bool, peer: NodeId | None, addr: str) -> None:
        self.sock = sock
        self.outbound = outbound
        self.peer = peer
        # outbound: connecting -> hello_sent -> up ; inbound: hello -> proof -> up
        self.state = "connecting" if outbound else "hello"
        self.rbuf = bytearray()
        self.wbuf: deque[memoryview] = deque()
        self.wbytes = 0
        self.nonce_c = b""
        self.nonce_s = b""
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        self.addr = addr
        self.want_write = False


class RaftMux:
    """The node's Raft endpoint: listener, peer connections, framing, auth.

    ``deliver(from_node, group, message)`` is called for every inbound frame;
    ``peer_event(node, up)`` when an outbound connection becomes usable or is
    lost.  Both run on the driver thread inside :meth:`poll`.
    """

    def __init__(
        self,
        node_id: NodeId,
        listen: str,
        secret: bytes,
        deliver: DeliverFn,
        peer_event: PeerEventFn,
    ) -> None:
        if not secret:
            raise ValueError("a cluster secret is required for the Raft port")
        self.node_id = node_id
        self._secret = secret
        self._deliver = deliver
        self._peer_event = peer_event
        self._sel = selectors.DefaultSelector()
        host, port = listen.rsplit(":", 1)
        self._listener = socket.create_server((host, int(port)), reuse_port=False, backlog=128)
        self._listener.setblocking(False)
        self.listen_address = f"{host}:{self._listener.getsockname()[1]}"
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._woken = False
        self._addresses: dict[NodeId, str] = {}
        self._wanted: set[NodeId] = set()
        self._out: dict[NodeId, _Conn] = {}
        self._last_attempt: dict[NodeId, float] = {}
        self._inbound: set[_Conn] = set()
        self._dirty: set[_Conn] = set()
        self.blocked: set[NodeId] = set()
        """Fault filter (testing): traffic to and from these nodes is dropped."""
        self.tap: Callable[[NodeId, int, Any], None] | None = None
        """Observer (testing): called with every message :meth:`send` queues,
        on the sending thread, before it is pickled."""
        self._rbuf = bytearray(1 << 20)
        self._rview = memoryview(self._rbuf)
        self.frames_in = 0
        self.frames_out = 0
        self.rejected = 0

    # ---- configuration (driver thread) ------------------------------------

    def set_address(self, node: NodeId, raft_address: str) -> None:
        old = self._addresses.get(node)
        self._addresses[node] = raft_address
        if old is not None and old != raft_address and node in self._out:
            self._close(self._out[node], "peer address changed")

    def want_peer(self, node: NodeId) -> None:
        """Keep an outbound connection to ``node`` open from now on."""
        if node != self.node_id:
            self._wanted.add(node)

    def unwant_peer(self, node: NodeId) -> None:
        self._wanted.discard(node)
        conn = self._out.get(node)
        if conn is not None:
            self._close(conn, "peer no longer needed")

    def is_up(self, node: NodeId) -> bool:
        c = self._out.get(node)
        return c is not None and c.state == "up" and node not in self.blocked

    def peers_up(self) -> list[NodeId]:
        """The peers whose outbound link is up (blocked or not)."""
        return [node for node, c in self._out.items() if c.state == "up"]

    def link_up(self, node: NodeId) -> bool:
        """The link to ``node`` is up, blocked or not: a block (fault
        injection) drops messages like a lossy network and fires no link
        event, so Raft must go on treating the peer as connected."""
        c = self._out.get(node)
        return c is not None and c.state == "up"

    # ---- sending ----------------------------------------------------------

    def send(self, node: NodeId, group: int, message: Any) -> bool:
        """Queue ``message`` for ``group`` on ``node``; flushed by :meth:`flush`.

        Returns False when the peer is not connected (the message is dropped,
        as Raft expects from a lossy network)."""
        conn = self._out.get(node)
        if conn is None or conn.state != "up" or node in self.blocked:
            return False
        if self.tap is not None:
            self.tap(node, group, message)
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        conn.wbuf.append(memoryview(_HDR.pack(len(payload) + 4, group)))
        conn.wbuf.append(memoryview(payload))
        conn.wbytes += len(payload) + 8
        self._dirty.add(conn)
        self.frames_out += 1
        return True

    def queued_bytes(self, node: NodeId) -> int:
        """Bytes queued for ``node`` and not yet written to its socket."""
        conn = self._out.get(node)
        return conn.wbytes if conn is not None else 0  # every byte queued is counted, handshake too

    def flush(self) -> None:
        """Write queued bytes to every socket that has some, without blocking."""
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            self._write(conn)

    def _write(self, conn: _Conn) -> None:
        while conn.wbuf:
            try:
                sent = conn.sock.sendmsg(list(conn.wbuf)[:512])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._close(conn, f"send failed: {e}")
                return
            conn.wbytes -= sent
            while sent:
                head = conn.wbuf[0]
                if len(head) <= sent:
                    sent -= len(head)
                    conn.wbuf.popleft()
                else:
                    conn.wbuf[0] = head[sent:]
                    sent = 0
        want = bool(conn.wbuf) or conn.state == "connecting"
        if want != conn.want_write:
            conn.want_write = want
            ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            try:
                self._sel.modify(conn.sock, ev, conn)
            except (KeyError, ValueError):
                pass

    # ---- the loop body ----------------------------------------------------

    def wake(self) -> None:
        """Interrupt a blocking :meth:`poll` (any thread)."""
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` for I/O and handle it (driver thread)."""
        self._maintain()
        for key, mask in self._sel.select(timeout):
            data = key.data
            if data is None:
                self._accept()
            elif data == "wake":
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                self._woken = False
            else:
                conn: _Conn = data
                if mask & selectors.EVENT_WRITE:
                    if conn.state == "connecting":
                        self._on_connected(conn)
                    else:
                        self._write(conn)
                if mask & selectors.EVENT_READ and conn.sock.fileno() != -1:
                    self._read(conn)

    def _maintain(self) -> None:
        now = time.monotonic()
        for node in self._wanted:
            if node in self._out or node not in self._addresses:
                continue
            if now - self._last_attempt.get(node, 0.0) < RECONNECT_INTERVAL:
                continue
            self._last_attempt[node] = now
            self._connect(node)
        for conn in list(self._inbound) + list(self._out.values()):
            if conn.state != "up" and now > conn.deadline:
                self._close(conn, "handshake timed out")

    def _connect(self, node: NodeId) -> None:
        addr = self._addresses[node]
        host, port = addr.rsplit(":", 1)
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((host, int(port)))
        except OSError as e:
            log.debug("connect to %s (%s) failed: %s", node, addr, e)
            return
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            return
        conn = _Conn(sock, True, node, addr)
        conn.want_write = True
        self._out[node] = conn
        self._sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _on_connected(self, conn: _Conn) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._close(conn, f"connect failed: {os.strerror(err)}", quiet=True)
            return
        assert conn.peer is not None
        conn.nonce_c = os.urandom(16)
        me, peer = self.node_id.encode(), conn.peer.encode()
        hello = MAGIC + bytes([len(me)]) + me + bytes([len(peer)]) + peer + conn.nonce_c
        conn.state = "hello_sent"
        conn.wbuf.append(memoryview(hello))
        conn.wbytes += len(hello)
        self._write(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, False, None, f"{addr[0]}:{addr[1]}")
            self._inbound.add(conn)
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        # recv_into one reusable buffer: recv(1 MiB) would allocate (mmap)
        # and free a fresh 1 MiB object on every read, however small.
        try:
            n = conn.sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._close(conn, f"recv failed: {e}")
            return
        if not n:
            self._close(conn, "closed by peer", quiet=True)
            return
        conn.rbuf += self._rview[:n]
        if conn.outbound:
            self._read_outbound(conn)
        else:
            self._read_inbound(conn)

    def _read_outbound(self, conn: _Conn) -> None:
        # The server only ever sends its 48-byte CHALLENGE.
        if conn.state != "hello_sent" or len(conn.rbuf) < 48:
            if len(conn.rbuf) > 48 or conn.state == "up" and conn.rbuf:
                self._close(conn, "unexpected bytes from peer")
            return
        nonce_s, mac_s = bytes(conn.rbuf[:16]), bytes(conn.rbuf[16:48])
        del conn.rbuf[:48]
        assert conn.peer is not None
        if not hmac.compare_digest(mac_s, _mac(self._secret, b"S", conn.nonce_c, nonce_s, conn.peer.encode())):
            self.rejected += 1
            self._close(conn, "peer failed authentication (wrong cluster secret?)")
            return
        proof = _mac(self._secret, b"C", nonce_s, conn.nonce_c, self.node_id.encode())
        conn.wbuf.append(memoryview(proof))
        conn.wbytes += len(proof)
        conn.state = "up"
        self._write(conn)
        log.info("raft link to %s (%s) up", conn.peer, conn.addr)
        self._peer_event(conn.peer, True)

    def _read_inbound(self, conn: _Conn) -> None:
        buf = conn.rbuf
        if conn.state == "hello":
            if len(buf) > 512:
                self._reject(conn, "oversized handshake")
                return
            if len(buf) < len(MAGIC) + 1:
                return
            if bytes(buf[: len(MAGIC)]) != MAGIC:
                self._reject(conn, "not a cachenode raft peer (bad magic)")
                return
            p = len(MAGIC)
            n1 = buf[p]
            if len(buf) < p + 1 + n1 + 1:
                return
            frm = bytes(buf[p + 1 : p + 1 + n1])
            p += 1 + n1
            n2 = buf[p]
            if len(buf) < p + 1 + n2 + 16:
                return
            to = bytes(buf[p + 1 : p + 1 + n2])
            p += 1 + n2
            conn.nonce_c = bytes(buf[p : p + 16])
            del buf[: p + 16]
            if to != self.node_id.encode():
                self._reject(conn, f"peer asked for node {to!r}, this is {self.node_id}")
                return
            try:
                conn.peer = frm.decode()
            except UnicodeDecodeError:
                self._reject(conn, "bad node id in handshake")
                return
            conn.nonce_s = os.urandom(16)
            challenge = conn.nonce_s + _mac(self._secret, b"S", conn.nonce_c, conn.nonce_s, to)
            conn.wbuf.append(memoryview(challenge))
            conn.wbytes += len(challenge)
            conn.state = "proof"
            self._write(conn)
        if conn.state == "proof":
            if len(buf) < 32:
                return
            proof = bytes(buf[:32])
            del buf[:32]
            assert conn.peer is not None
            if not hmac.compare_digest(proof, _mac(self._secret, b"C", conn.nonce_s, conn.nonce_c, conn.peer.encode())):
                self._reject(conn, "failed authentication (wrong or missing cluster secret)")
                return
            conn.state = "up"
            # A peer dials again only after giving up its old connection:
            # what is still unread there is older than anything on this one
            # and, read later, would reorder the peer's messages.  Drop it,
            # as a lossy network would.
            for other in list(self._inbound):
                if other is not conn and other.peer == conn.peer:
                    self._close(other, "replaced by a newer connection from the same peer", quiet=True)
        if conn.state != "up":
            return
        # Authenticated: parse frames.
        pos = 0
        n = len(buf)
        mv = memoryview(buf)
        try:
            while n - pos >= 8:
                length, group = _HDR.unpack_from(mv, pos)
                if length > MAX_FRAME or length < 4:
                    self._reject(conn, f"frame of {length} bytes refused")
                    return
                if n - pos < 4 + length:
                    break
                start = pos + 8
                pos += 4 + length
                peer = conn.peer
                if peer in self.blocked:
                    continue
                with mv[start:pos] as payload:
                    try:
                        msg = pickle.loads(payload)
                    except Exception as e:  # an authenticated peer sent garbage: drop the link
                        self._reject(conn, f"undecodable frame: {e}")
                        return
                self.frames_in += 1
                assert peer is not None
                self._deliver(peer, group, msg)
        finally:
            mv.release()
        if pos:
            del buf[:pos]

    def _reject(self, conn: _Conn, why: str) -> None:
        self.rejected += 1
        log.warning("raft port: closing connection from %s: %s", conn.addr, why)
        self._close(conn, why, quiet=True)

    def _close(self, conn: _Conn, why: str, quiet: bool = False) -> None:
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self._dirty.discard(conn)
        if conn.outbound:
            assert conn.peer is not None
            if self._out.get(conn.peer) is conn:
                del self._out[conn.peer]
                was_up = conn.state == "up"
                conn.state = "closed"
                if was_up:
                    log.info("raft link to %s lost: %s", conn.peer, why)
                    self._peer_event(conn.peer, False)
        else:
            self._inbound.discard(conn)
        if not quiet:
            log.debug("connection %s closed: %s", conn.addr, why)

    def close(self) -> None:
        for conn in list(self._out.values()) + list(self._inbound):
            self._close(conn, "shutting down", quiet=True)
        try:
            self._sel.unregister(self._listener)
        except (KeyError, ValueError):
            pass
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._sel.close()
