"""The composition root: builds one node's whole object graph from a config.

Every seam (clock, storage) is a constructor argument so tests can pass
their own; nothing else in the code base constructs these objects.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import grpc

from .._clock import SystemClock
from .._types import MAX_MESSAGE_BYTES
from ..pd.driver import PdConfig, PlacementDriver
from ..pd.planner import PlanConfig
from ..raft.host import GroupHost
from ..storage.base import Storage
from ..storage.lmdb_store import LmdbStorage, read_boot_id
from .admin_service import AdminService
from .cache_service import CacheService
from .config import NodeConfig
from .disk_space import DiskSpace
from .forwarding import Forwarder
from .handlers import add_service
from .pd_agent import PdAgent
from .replicas import MetaGroupStore, ReplicaManager

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


class NodeStartError(Exception):
    """The node could not start (data dir locked, an address it cannot listen on...)."""


class AddressInUse(NodeStartError):
    """An address the node listens on is held by another socket: the node
    exits with its own code (``cachenode serve``: 4), so that whoever chose
    the port can choose another without reading the node's log."""


IN_USE = "address already in use; stop what holds it, or choose another port with"


def _in_use(address: str) -> bool:
    """Does binding ``address`` (``host:port``) fail because another socket
    holds it?  Asked after gRPC could not listen there, as gRPC does not
    say why.  Binds as gRPC does (``SO_REUSEADDR``, so a closed
    connection's TIME_WAIT does not count).  Racy by nature: the holder may
    have let go since, and then the error is reported without the cause."""
    host, _, port = address.rpartition(":")
    try:
        found = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError):  # not host:port, or a name that does not resolve (validated long before)
        return False
    for family, kind, proto, _, sockaddr in found:  # "localhost" may be ::1 and 127.0.0.1
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
    return False


class Node:
    def __init__(
        self,
        cfg: NodeConfig,
        clock: SystemClock | None = None,
        storage: Storage | None = None,
        fault_injection: bool = False,
        disk: DiskSpace | None = None,
    ) -> None:
        self.cfg = cfg
        os.makedirs(cfg.data_dir, exist_ok=True)
        self._lock_fd = os.open(os.path.join(cfg.data_dir, "LOCK"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise NodeStartError(f"data directory {cfg.data_dir} is in use by another cachenode process") from None
        self.clock = clock or SystemClock()
        fsync = cfg.fsync and not cfg.unsafe.skip_fsync
        self.storage = storage or LmdbStorage(
            os.path.join(cfg.data_dir, "db"), map_size=cfg.map_size, fsync=fsync,
            writemap=cfg.lmdb_writemap,
            boot_id=lambda: read_boot_id(cfg.boot_id_file),
        )
        self.disk = disk or DiskSpace(cfg.data_dir, cfg.disk_reserve, cfg.node_id)
        try:
            self.host = GroupHost(
                cfg.node_id, self.storage, cfg.raft_listen, cfg.secret, cfg.data_dir,
                timing=cfg.timing, tick_interval=cfg.tick_interval_s,
                unsafe_lazy_commit_s=1.0 if cfg.unsafe.skip_fsync else 0.0,
                on_peer_news=self.disk.heard,
            )
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise AddressInUse(f"cannot listen for Raft peers on {cfg.raft_listen}: {IN_USE} --raft-listen") from None
            raise NodeStartError(f"cannot listen for Raft peers on {cfg.raft_listen}: {e.strerror or e}; check --raft-listen") from None
        self.replicas = ReplicaManager(cfg, self.host, self.storage, self.clock)
        self.pd = PlacementDriver(
            cfg.node_id, MetaGroupStore(self.replicas),
            PdConfig(heartbeat_s=cfg.heartbeat_s, down_after_s=cfg.down_after_s,
                     max_down_time_s=cfg.max_down_time_s, plan=PlanConfig(replication=cfg.replication)),
        )
        self.pd_agent = PdAgent(cfg, self.replicas, self.disk)
        self.forwarder = Forwarder(cfg.me().address)
        self.disk.tell = self.host.tell_peers  # the peers' leaders refuse writes while this disk is full
        self.disk.on_judged = self.host.set_short_of_disk  # ... and its groups compact their logs meanwhile
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=cfg.grpc_workers, thread_name_prefix="grpc"),
            options=GRPC_OPTIONS,
            maximum_concurrent_rpcs=cfg.grpc_workers * 16,
        )
        add_service(self.server, "Cache", CacheService(cfg, self.replicas, self.forwarder, self.clock, self.disk))
        add_service(self.server, "Admin", AdminService(cfg, self.replicas, self.clock, fault_injection, self.pd, self.disk))
        try:
            self.port = self.server.add_insecure_port(cfg.listen)
        except RuntimeError:
            self.port = 0
        if not self.port:
            self.host.mux.close()
            if _in_use(cfg.listen):
                raise AddressInUse(f"cannot listen for clients on {cfg.listen}: {IN_USE} --listen")
            raise NodeStartError(f"cannot listen for clients on {cfg.listen}; check --listen")

    def start(self) -> None:
        self.disk.start()
        self.server.start()
        self.host.start()
        self.replicas.start()
        self.pd.start()
        self.pd_agent.start()
        log.info("node %s serving clients on %s, raft on %s", self.cfg.node_id, self.cfg.listen, self.host.mux.listen_address)

    def stop(self) -> None:
        self.pd_agent.stop()
        self.pd.stop()
        self.server.stop(grace=1.0).wait(3)
        self.disk.stop()
        stopped = self.host.stop()
        self.forwarder.close()
        self.storage.close(clean=stopped)
        os.close(self._lock_fd)
