"""Batch: many independent single-key ops per call, each with its own outcome."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from _nodes import LocalCluster, local_cluster

from cachenode.v1 import cache_pb2 as pb

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path_factory.mktemp("batch") / "c", nodes=3, shards=4) as c:
        yield c


def test_mixed_batch_through_any_node(cluster: LocalCluster) -> None:
    ops = [pb.BatchOp(set=pb.SetRequest(key=b"b%d" % i, value=b"v%d" % i)) for i in range(40)]
    ops.append(pb.BatchOp(incr=pb.IncrRequest(key=b"bctr", delta=2)))
    ops.append(pb.BatchOp(set=pb.SetRequest(key=b"", value=b"x")))  # invalid: its own error only
    ops.append(pb.BatchOp())  # names no operation
    for nid in cluster.node_ids:
        r = cluster.cache(nid).Batch(pb.BatchRequest(ops=ops), timeout=10)
        assert len(r.results) == len(ops)
        assert all(x.WhichOneof("result") == "set" and x.set.applied for x in r.results[:40])
        assert r.results[40].incr.value > 0
        assert r.results[41].error.kind == "invalid_argument"
        assert r.results[41].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert r.results[42].error.kind == "invalid_argument"
    gets = [pb.BatchOp(get=pb.GetRequest(key=b"b%d" % i)) for i in range(40)]
    r = cluster.cache(cluster.node_ids[1]).Batch(pb.BatchRequest(ops=gets), timeout=10)
    assert [x.get.value for x in r.results] == [b"v%d" % i for i in range(40)]
    r = cluster.cache(cluster.node_ids[2]).Batch(pb.BatchRequest(ops=[pb.BatchOp(incr=pb.IncrRequest(key=b"bctr", delta=0))]), timeout=5)
    assert r.results[0].incr.value == 6  # three batches of +2, each applied once


def test_no_forward_ops_report_not_leader_with_hint(cluster: LocalCluster) -> None:
    leader = cluster.leader_of(0)
    other = next(n for n in cluster.node_ids if n != leader)
    key = next(b"h%d" % i for i in range(1000) if cluster.shard_of(b"h%d" % i) == 0)
    op = pb.BatchOp(set=pb.SetRequest(key=key, value=b"v", header=pb.RequestHeader(no_forward=True)))
    r = cluster.cache(other).Batch(pb.BatchRequest(ops=[op]), timeout=5)
    err = r.results[0].error
    assert err.kind == "not_leader" and err.leader == f"{leader}@{cluster.address(leader)}"  # type: ignore[arg-type]


def test_empty_batch_is_invalid(cluster: LocalCluster) -> None:
    with pytest.raises(grpc.RpcError) as e:
        cluster.cache(cluster.node_ids[0]).Batch(pb.BatchRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_mset_and_mget_ops_inside_a_batch(cluster: LocalCluster) -> None:
    one_shard = [k for k in (b"m%d" % i for i in range(400)) if cluster.shard_of(k) == 1][:10]
    spread = [b"s%d" % i for i in range(30)]  # several shards: the node splits them
    ops = [
        pb.BatchOp(mset=pb.MSetRequest(items=[pb.KeyValue(key=k, value=b"1" + k) for k in one_shard])),
        pb.BatchOp(mset=pb.MSetRequest(items=[pb.KeyValue(key=k, value=b"2" + k) for k in spread])),
        pb.BatchOp(set=pb.SetRequest(key=one_shard[0], value=b"plain")),
        # invalid: refused as a whole, nothing of it written
        pb.BatchOp(mset=pb.MSetRequest(items=[pb.KeyValue(key=b"ok-key", value=b"v"), pb.KeyValue(key=b"", value=b"v")])),
    ]
    for nid in cluster.node_ids:
        r = cluster.cache(nid).Batch(pb.BatchRequest(ops=ops), timeout=10)
        assert r.results[0].mset.count == 10 and len(r.results[0].mset.versions) == 1
        assert r.results[1].mset.count == 30 and len(r.results[1].mset.versions) == len({cluster.shard_of(k) for k in spread})
        assert r.results[2].set.applied
        assert r.results[3].error.kind == "invalid_argument"
        reads = [pb.BatchOp(mget=pb.MGetRequest(keys=one_shard[1:] + spread + [b"ok-key"]))]
        got = cluster.cache(nid).Batch(pb.BatchRequest(ops=reads), timeout=10).results[0].mget.items
        assert [it.key for it in got] == one_shard[1:] + spread + [b"ok-key"]
        assert [it.value for it in got[:9]] == [b"1" + k for k in one_shard[1:]]
        assert [it.value for it in got[9:39]] == [b"2" + k for k in spread]
        assert not got[39].found
        # one shard (the smart client's parts), with a repeated and an absent
        # key: answered in request order, through the leader or forwarded
        absent = next(k for k in (b"absent%d" % i for i in range(400)) if cluster.shard_of(k) == 1)
        keys = [one_shard[3], absent, one_shard[1], one_shard[3]]
        r = cluster.cache(nid).Batch(pb.BatchRequest(ops=[
            pb.BatchOp(mget=pb.MGetRequest(keys=keys)), pb.BatchOp(get=pb.GetRequest(key=one_shard[2])),
        ]), timeout=10)
        got = r.results[0].mget.items
        assert [(it.key, it.found, it.value) for it in got] == [
            (one_shard[3], True, b"1" + one_shard[3]), (absent, False, b""),
            (one_shard[1], True, b"1" + one_shard[1]), (one_shard[3], True, b"1" + one_shard[3])]
        assert r.results[1].get.value == b"1" + one_shard[2]
        unary = cluster.cache(nid).MGet(pb.MGetRequest(keys=keys), timeout=10)
        assert list(unary.items) == list(got)


def test_batch_key_limit_counts_the_keys_of_multi_key_ops(cluster: LocalCluster) -> None:
    big = pb.BatchOp(mget=pb.MGetRequest(keys=[b"k%d" % i for i in range(6000)]))
    with pytest.raises(grpc.RpcError) as e:
        cluster.cache(cluster.node_ids[0]).Batch(pb.BatchRequest(ops=[big, big]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12000 keys" in (e.value.details() or "")


def test_a_stale_shard_epoch_fails_a_multi_key_op_whole(cluster: LocalCluster) -> None:
    """An mset or mget naming an epoch that one of its shards does not have
    fails as a whole with EPOCH_MISMATCH, through every node, and the mset
    writes nothing (no shard's part went ahead)."""
    epochs = {s.epoch for s in cluster.admin(cluster.node_ids[0]).GetClusterMap(pb.ClusterMapRequest(), timeout=5).shards}
    assert len(epochs) == 1  # nothing in this module splits or merges shards
    epoch = epochs.pop()
    keys = [b"ep%d" % i for i in range(30)]  # several shards
    assert len({cluster.shard_of(k) for k in keys}) > 1
    stale = pb.RequestHeader(shard_epoch=epoch + 7)
    for nid in cluster.node_ids:
        for op in (pb.BatchOp(mset=pb.MSetRequest(header=stale, items=[pb.KeyValue(key=k, value=b"x") for k in keys])),
                   pb.BatchOp(mget=pb.MGetRequest(header=stale, keys=keys))):
            r = cluster.cache(nid).Batch(pb.BatchRequest(ops=[op]), timeout=5)
            err = r.results[0].error
            assert err.kind == "epoch_mismatch" and err.code == grpc.StatusCode.ABORTED.value[0], err
            assert "refresh the cluster map" in err.message
        with pytest.raises(grpc.RpcError) as e:
            cluster.cache(nid).MSet(pb.MSetRequest(header=stale, items=[pb.KeyValue(key=k, value=b"x") for k in keys]), timeout=5)
        assert e.value.code() == grpc.StatusCode.ABORTED
    r = cluster.cache(cluster.node_ids[1]).MGet(pb.MGetRequest(keys=keys), timeout=5)
    assert [it.key for it in r.items] == keys and not any(it.found for it in r.items)
    right = pb.RequestHeader(shard_epoch=epoch)
    r = cluster.cache(cluster.node_ids[2]).MGet(pb.MGetRequest(header=right, keys=keys), timeout=5)
    assert len(r.items) == len(keys)  # the current epoch is accepted
