"""The node's request path leaves no reference cycles behind.

A compiled (mypyc) nested function holds its enclosing function's whole
environment, and that environment keeps every nested function another
nested function refers to, and every variable a nested function uses.  So
a closure that calls a sibling closure, or that closes over a list of
thunks which reach the environment again, is a reference cycle.
Reference counting never frees it; only the cyclic collector does, when
its youngest generation fills up.  Before the fix each shard part of an
mset or mget (and each unary write) left about a dozen such objects, the
request's protobuf message among them: in 100-key msets the collector
took 7-8 % of a node's CPU, in pauses of 10-50 ms that held the GIL
(docs/benchmarks-history.md, *Session 21*).

The test runs a real one-node cluster in this process (real gRPC port,
real LMDB files, the compiled modules when built) and counts the node's
objects and functions the cyclic collector finds after the requests, with
the collector off while they run.  The compiled build (what ``make test``
runs) is where such cycles came from; interpreted, the same check covers
the plain closures.  Forwarding needs a second node and is not covered.
"""

from __future__ import annotations

import collections
import gc
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from _nodes import wait_for

from cachenode._errors import CacheError
from cachenode._types import NodeInfo
from cachenode.bench.systems import free_ports
from cachenode.client import CacheClient
from cachenode.server.app import Node
from cachenode.server.config import NodeConfig
from cachenode.v1 import cache_pb2 as pb
from cachenode.v1 import cache_pb2_grpc as rpc

SHARDS = 16


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    client_port, raft_port = free_ports(2)
    me = NodeInfo("n1", f"127.0.0.1:{client_port}", f"127.0.0.1:{raft_port}")
    cfg = NodeConfig(
        node_id="n1", data_dir=str(tmp_path / "n1"), listen=me.address, raft_listen=me.raft_address,
        initial_cluster=(me,), secret=os.urandom(16), shards=SHARDS, replication=1,
        grpc_workers=8, fsync=False,
    )
    n = Node(cfg)
    try:
        n.start()
        wait_for(lambda: all(_leads(n, s) for s in range(SHARDS)), timeout=30, what="every shard led")
        yield n
    finally:
        n.stop()


def _leads(n: Node, shard_id: int) -> bool:
    g = n.replicas.local_group(shard_id)
    return g is not None and g.is_leader


NODE_MODULES = (
    "cachenode.server.", "cachenode.raft.", "cachenode.fsm.", "cachenode.storage.", "cachenode.pd.",
    "cachenode._types", "cachenode._value", "cachenode._clock",
)
"""The node's side: its objects, and its functions (an interpreted closure in
a cycle is a plain function object).  Not ``cachenode._errors``, whose
exceptions the client raises too: the client's error path leaves a cycle
per failed call (the exception's traceback holds the frames that hold the
call's state), as ``pytest.raises`` does with this test's own frame;
neither is the node's."""


def _module_and_name(o: object) -> tuple[str, str]:
    """A function by its own module and name (an interpreted closure in a
    cycle is a plain function object), anything else by its type's."""
    if isinstance(o, types.FunctionType):
        return str(o.__module__), f"function {o.__module__}.{o.__qualname__}"
    t = type(o)
    return t.__module__, f"{t.__module__}.{t.__qualname__}"


def node_garbage(run: Callable[[], None]) -> collections.Counter[str]:
    """What the cyclic collector finds after ``run()``, by type, for the node's own types."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        gc.collect()
        named = (_module_and_name(o) for o in gc.garbage)
        return collections.Counter(name for module, name in named if module.startswith(NODE_MODULES))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_requests_leave_no_reference_cycles_in_the_node(node: Node) -> None:
    """Every kind of request, through the smart client's stream (Batch
    messages) and as unary calls; ttl and errors included."""
    keys = [b"g:%d" % i for i in range(100)]
    channel = grpc.insecure_channel(node.cfg.listen)
    stub = rpc.CacheStub(channel)
    with CacheClient([node.cfg.listen], timeout=10) as c, channel:
        c.mset([(k, b"v" * 100) for k in keys])  # warm: stream open, map known
        c.set(b"text", b"not a number")
        stub.Get(pb.GetRequest(key=b"g:0"), timeout=10)

        def requests() -> None:
            for i in range(20):
                v = b"%d" % i
                assert c.mset([(k, v) for k in keys], ttl_ms=60_000) == 100
                assert all(r is not None and r.value == v for r in c.mget(keys).values())
                assert c.set(b"s", v) and c.get(b"s") is not None
                assert c.get(b"s", consistency="stale") is not None
                assert c.incr(b"n") == i + 1
                assert c.cas(b"s", v + b"x", expected=v).succeeded
                assert c.ttl(keys[0]) is not None
                assert c.delete(b"s")
                with pytest.raises(CacheError):
                    c.incr(b"text")  # an error result from the state machine
                items = [pb.KeyValue(key=k, value=v) for k in keys]
                assert stub.MSet(pb.MSetRequest(items=items), timeout=10).count == 100
                assert len(stub.MGet(pb.MGetRequest(keys=keys), timeout=10).items) == 100
                assert stub.Set(pb.SetRequest(key=b"u", value=v), timeout=10).applied
                assert stub.Get(pb.GetRequest(key=b"u"), timeout=10).found
                with pytest.raises(grpc.RpcError):
                    stub.Set(pb.SetRequest(key=b"", value=v), timeout=10)  # INVALID_ARGUMENT

        found = node_garbage(requests)
    assert not found, f"reference cycles left by 20 rounds of every request kind: {found.most_common(8)}"
