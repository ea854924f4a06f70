"""The Admin gRPC service: cluster map, node and shard status, test faults."""

from __future__ import annotations

import time

import grpc

from .. import __version__
from .._clock import SystemClock
from .._errors import CacheError, FailedPrecondition, NotFound, NotLeader
from .._types import META_GROUP_ID
from ..raft.group import RaftGroup
from ..v1 import cache_pb2 as pb
from ..v1 import cache_pb2_grpc
from .config import NodeConfig
from .replicas import ReplicaManager
from .status import abort


def replica_status(shard_id: int, g: RaftGroup, r: ReplicaManager) -> pb.ReplicaStatus:
    st = g.status
    reader = r.reader(shard_id)
    return pb.ReplicaStatus(
        shard_id=shard_id, role=st.role, leader=st.leader or "", term=st.term,
        commit_index=st.commit_index, applied_index=reader.applied_index(),
        size_bytes=reader.size_bytes(), keys=reader.count(),
    )


class AdminService(cache_pb2_grpc.AdminServicer):
    def __init__(self, cfg: NodeConfig, replicas: ReplicaManager, clock: SystemClock, fault_injection: bool) -> None:
        self.cfg = cfg
        self.r = replicas
        self.clock = clock
        self.fault_injection = fault_injection
        self.started = time.monotonic()

    def GetClusterMap(self, req: pb.ClusterMapRequest, ctx: grpc.ServicerContext) -> pb.ClusterMap:
        try:
            m = self.r.cluster_map()
        except CacheError as e:
            abort(ctx, e)
        leaders = {}
        for gid, g in self.r.host.groups().items():
            if gid != META_GROUP_ID and g.status.leader:
                leaders[gid] = g.status.leader
        return pb.ClusterMap(
            version=m.version,
            nodes=[pb.NodeInfo(id=n.id, address=n.address, raft_address=n.raft_address) for n in m.nodes],
            shards=[pb.ShardDescriptor(id=s.id, range_start=s.range_start, range_end=s.range_end, epoch=s.epoch, replicas=list(s.replicas)) for s in m.shards],
            leaders=leaders,
        )

    def GetNodeStatus(self, req: pb.NodeStatusRequest, ctx: grpc.ServicerContext) -> pb.NodeStatus:
        me = self.cfg.me()
        reps = [replica_status(gid, g, self.r) for gid, g in sorted(self.r.host.groups().items()) if gid != META_GROUP_ID]
        return pb.NodeStatus(
            node=pb.NodeInfo(id=me.id, address=me.address, raft_address=me.raft_address),
            replicas=reps, uptime_s=time.monotonic() - self.started, version=__version__,
            fsync="always" if self.cfg.fsync else "never",
        )

    def GetShardStatus(self, req: pb.ShardStatusRequest, ctx: grpc.ServicerContext) -> pb.ShardStatus:
        try:
            s = self.r.descriptor(req.shard_id)
            g = self.r.local_group(s.id)
            desc = pb.ShardDescriptor(id=s.id, range_start=s.range_start, range_end=s.range_end, epoch=s.epoch, replicas=list(s.replicas))
            if g is None:
                leader, addr = self.r.leader_hint(s.id)
                raise NotLeader(f"node {self.cfg.node_id} holds no replica of shard {s.id}; ask one of {', '.join(s.replicas)}", leader, addr)
            rs = replica_status(s.id, g, self.r)
            return pb.ShardStatus(
                shard=desc, leader=rs.leader, term=rs.term, commit_index=rs.commit_index,
                applied_index=rs.applied_index, size_bytes=rs.size_bytes, replicas=[rs],
            )
        except CacheError as e:
            abort(ctx, e)

    def TransferLeader(self, req: pb.TransferLeaderRequest, ctx: grpc.ServicerContext) -> pb.TransferLeaderResponse:
        try:
            g = self.r.leader_group(req.shard_id)
            done: list[CacheError | None] = []
            self.r.host.call(lambda: g.transfer_leadership(req.to_node or None, done.append)).result(5)
            if done and done[0] is not None:
                raise done[0]
            return pb.TransferLeaderResponse()
        except CacheError as e:
            abort(ctx, e)

    def _check_faults(self) -> None:
        if not self.fault_injection:
            raise FailedPrecondition("fault injection is disabled on this node; start it with --enable-fault-injection (testing only)")

    def SetClockOffset(self, req: pb.ClockOffsetRequest, ctx: grpc.ServicerContext) -> pb.ClockOffsetResponse:
        try:
            self._check_faults()
            self.clock.set_offset_ms(int(req.offset_ms))
            return pb.ClockOffsetResponse(offset_ms=self.clock.offset_ms)
        except CacheError as e:
            abort(ctx, e)

    def SetFaultFilter(self, req: pb.FaultFilterRequest, ctx: grpc.ServicerContext) -> pb.FaultFilterResponse:
        try:
            self._check_faults()
            blocked = set(req.blocked_nodes)
            unknown = blocked - {n.id for n in self.r.cluster_map().nodes}
            if unknown:
                raise NotFound(f"unknown nodes: {', '.join(sorted(unknown))}")

            def apply() -> None:
                self.r.host.mux.blocked = blocked

            self.r.host.call(apply).result(5)
            return pb.FaultFilterResponse(blocked_nodes=sorted(blocked))
        except CacheError as e:
            abort(ctx, e)
