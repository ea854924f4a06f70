"""The Admin gRPC service: cluster map, node and shard status, test faults."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from .. import __version__
from .._clock import SystemClock
from .._errors import CacheError, FailedPrecondition, NotFound, NotLeader, Unavailable
from .._types import META_GROUP_ID, ClusterMap, NodeInfo
from ..pd.driver import PlacementDriver
from ..pd.model import ReplicaReport, StoreStats
from ..pd.operator import Operator
from ..raft.group import RaftGroup
from ..v1 import cache_pb2 as pb
from ..v1 import cache_pb2_grpc
from .config import NodeConfig
from .disk_space import DiskSpace
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


def _stats_pb(s: StoreStats) -> pb.StoreStats:
    return pb.StoreStats(
        capacity_bytes=s.capacity_bytes, available_bytes=s.available_bytes, used_bytes=s.used_bytes,
        read_rate=s.read_rate, write_rate=s.write_rate, reserve_bytes=s.reserve_bytes, below_reserve=s.below_reserve,
    )


def operator_pb(op: Operator) -> pb.OperatorInfo:
    return pb.OperatorInfo(
        id=op.id, kind=op.kind, shard_id=op.shard, status=op.status.value, step=op.step,
        steps=[st.describe() for st in op.steps], reason=op.reason, detail=op.detail, source=op.source,
    )


def _map_json(m: ClusterMap) -> bytes:
    return json.dumps(m.to_dict()).encode()


class AdminService(cache_pb2_grpc.AdminServicer):
    def __init__(
        self, cfg: NodeConfig, replicas: ReplicaManager, clock: SystemClock, fault_injection: bool,
        pd: PlacementDriver, disk: DiskSpace,
    ) -> None:
        self.cfg = cfg
        self.disk = disk
        self.r = replicas
        self.pd = pd
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
            nodes=[pb.NodeInfo(id=n.id, address=n.address, raft_address=n.raft_address, state=n.state) for n in m.nodes],
            shards=[pb.ShardDescriptor(id=s.id, range_start=s.range_start, range_end=s.range_end, epoch=s.epoch, replicas=list(s.replicas)) for s in m.shards],
            leaders=leaders,
        )

    def GetNodeStatus(self, req: pb.NodeStatusRequest, ctx: grpc.ServicerContext) -> pb.NodeStatus:
        me = self.cfg.me()
        reps = [replica_status(gid, g, self.r) for gid, g in sorted(self.r.host.groups().items()) if gid != META_GROUP_ID]
        meta = self.r.host.group(META_GROUP_ID)
        return pb.NodeStatus(
            node=pb.NodeInfo(id=me.id, address=me.address, raft_address=me.raft_address),
            replicas=reps, uptime_s=time.monotonic() - self.started, version=__version__,
            fsync="always" if self.cfg.fsync else "never",
            leader_balancing=self.r.leader_balancing(), leader_balance_rounds=self.r.leader_balance_rounds,
            metadata_role=meta.status.role if meta is not None else "",
            disk=self._disk(),
        )

    def _disk(self) -> pb.DiskStatus:
        """A fresh look, and whether the disk-space thread found it full."""
        try:
            r = self.disk.look()
        except OSError:
            return pb.DiskStatus(full=self.disk.full)
        return pb.DiskStatus(free_bytes=r.free, capacity_bytes=r.capacity, reserve_bytes=r.reserve, full=self.disk.full)

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
            done: Future[CacheError | None] = Future()
            self.r.host.call(lambda: g.transfer_leadership(req.to_node or None, done.set_result)).result(5)
            try:
                err = done.result(5)  # the group gives up within an election timeout
            except FutureTimeout:
                raise Unavailable(f"the transfer of shard {req.shard_id}'s leadership did not finish in 5 s; check the shard's status and retry") from None
            if err is not None:
                raise err
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

    def SetDiskFault(self, req: pb.DiskFaultRequest, ctx: grpc.ServicerContext) -> pb.DiskFaultResponse:
        try:
            self._check_faults()
            self.disk.force(req.below_reserve)
            return pb.DiskFaultResponse(below_reserve=self.disk.full)
        except CacheError as e:
            abort(ctx, e)

    # ---- placement driver (answered by the metadata leader) -----------------

    def Heartbeat(self, req: pb.HeartbeatRequest, ctx: grpc.ServicerContext) -> pb.HeartbeatResponse:
        try:
            node = NodeInfo(req.node.id, req.node.address, req.node.raft_address)
            st = req.stats
            stats = StoreStats(st.capacity_bytes, st.available_bytes, st.used_bytes, st.read_rate, st.write_rate,
                               st.reserve_bytes, st.below_reserve)
            reps = tuple(
                ReplicaReport(
                    r.shard_id, r.role, r.leader or None, r.term, r.commit_index, r.applied_index,
                    tuple(r.members), dict(r.match), r.size_bytes,
                )
                for r in req.replicas
            )
            reply = self.pd.heartbeat(node, req.map_version, stats, reps)
            return pb.HeartbeatResponse(
                pd_node=self.cfg.node_id,
                cluster_map_json=_map_json(reply.map) if reply.map is not None else b"",
                instructions=[
                    pb.Instruction(operator_id=i.op_id, shard_id=i.shard, action=i.action, target=i.target)
                    for i in reply.instructions
                ],
                paused_schedulers=reply.paused,
                next_heartbeat_s=reply.next_heartbeat_s,
            )
        except CacheError as e:
            abort(ctx, e)

    def JoinCluster(self, req: pb.JoinRequest, ctx: grpc.ServicerContext) -> pb.JoinResponse:
        try:
            m = self.pd.join(NodeInfo(req.node.id, req.node.address, req.node.raft_address))
            return pb.JoinResponse(cluster_map_json=_map_json(m))
        except CacheError as e:
            abort(ctx, e)

    def GetPdStatus(self, req: pb.PdStatusRequest, ctx: grpc.ServicerContext) -> pb.PdStatus:
        try:
            view, ops, active, paused = self.pd.status()
            m = view.map
            nodes = []
            for n in m.nodes:
                nv = view.nodes[n.id]
                reps = view.replica_count(n.id)
                nodes.append(pb.NodeSummary(
                    id=n.id, address=n.address, state=n.state, liveness=nv.liveness.value,
                    replicas=reps, leaders=view.leader_count(n.id),
                    preferred_leaders=view.preferred_leader_count(n.id), down_for_s=nv.down_for_s,
                    stats=_stats_pb(nv.stats), removable=n.state != "serving" and reps == 0 and n.id not in m.meta,
                    meta=n.id in m.meta,
                ))
            return pb.PdStatus(
                pd_node=self.cfg.node_id, map_version=m.version, nodes=nodes,
                operators=[operator_pb(o) for o in ops], paused=paused,
                shards=len(m.shards), active_for_s=active,
            )
        except CacheError as e:
            abort(ctx, e)

    def SetNodeState(self, req: pb.NodeStateRequest, ctx: grpc.ServicerContext) -> pb.NodeStateResponse:
        try:
            return pb.NodeStateResponse(message=self.pd.set_node_state(req.node_id, req.action))
        except CacheError as e:
            abort(ctx, e)

    def AddOperator(self, req: pb.AddOperatorRequest, ctx: grpc.ServicerContext) -> pb.OperatorInfo:
        try:
            return operator_pb(self.pd.add_operator(req.kind, req.shard_id, req.from_node, req.to_node))
        except CacheError as e:
            abort(ctx, e)

    def CancelOperator(self, req: pb.CancelOperatorRequest, ctx: grpc.ServicerContext) -> pb.OperatorInfo:
        try:
            return operator_pb(self.pd.cancel_operator(req.id))
        except CacheError as e:
            abort(ctx, e)

    def SetScheduler(self, req: pb.SchedulerRequest, ctx: grpc.ServicerContext) -> pb.SchedulerResponse:
        try:
            return pb.SchedulerResponse(paused=self.pd.set_scheduler(req.name, req.paused))
        except CacheError as e:
            abort(ctx, e)

    def PlanRebalance(self, req: pb.RebalanceRequest, ctx: grpc.ServicerContext) -> pb.RebalancePlan:
        try:
            p = self.pd.dry_run()
            return pb.RebalancePlan(operators=[operator_pb(o) for o in p.operators], notes=p.notes)
        except CacheError as e:
            abort(ctx, e)
