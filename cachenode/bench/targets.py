"""Drivers: one small protocol, one implementation per system under test.

* :class:`CachenodeDriver` -- the smart client :class:`~cachenode.client.AsyncCacheClient`
  (straight to each shard's leader).
* :class:`EtcdDriver` -- etcd's v3 gRPC KV API (Range/Put/Txn) through stubs
  generated at run time from ``etcd_kv.proto`` beside this file; requests go
  round-robin over the members, as etcd's own client balancer does.
* :class:`RedisDriver` -- redis-py's asyncio client, one connection pool.

Every driver maps the benchmark operations onto the system's natural API:

=========  =============================  ==================================  ============
operation  cachenode                      etcd                                Redis
=========  =============================  ==================================  ============
set        Set                            Put                                 SET
get        Get (linearizable or stale)    Range (serializable=false / true)   GET
incr       Incr                           Range, then Txn(mod_revision ==)     INCR
                                          put, retried until it applies
mset       MSet (one call per shard)      one Txn of N puts                   MSET
mget       MGet (one call per shard)      one Txn of N ranges                 MGET
=========  =============================  ==================================  ============

Contract: a driver is opened, used and closed on ONE asyncio event loop;
any number of tasks on that loop may call it concurrently.  Each call is one
logical request bounded by :data:`REQUEST_TIMEOUT_S`; failures raise (any
exception type: the load generator counts them by type name).  Returned
values are owned by the caller.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

__all__ = [
    "ETCD_PROTO",
    "REQUEST_TIMEOUT_S",
    "CachenodeDriver",
    "Driver",
    "EtcdDriver",
    "RedisDriver",
    "TargetSpec",
    "load_etcd_pb2",
    "open_driver",
]

REQUEST_TIMEOUT_S = 10.0
ETCD_PROTO = Path(__file__).with_name("etcd_kv.proto")
_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]


@dataclasses.dataclass(frozen=True, slots=True)
class TargetSpec:
    """How a load generator reaches one system; crosses process boundaries as JSON.

    ``kind`` is ``cachenode``, ``etcd`` or ``redis``; ``label`` names the
    system in results (``redis-always`` ...); ``options`` carries
    kind-specific strings (etcd: ``pb2_dir``, where the generated stubs live).
    """

    kind: str
    label: str
    endpoints: tuple[str, ...]
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "label": self.label,
            "endpoints": list(self.endpoints),
            "options": dict(self.options),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TargetSpec:
        return cls(
            kind=str(doc["kind"]),
            label=str(doc["label"]),
            endpoints=tuple(str(e) for e in doc["endpoints"]),
            options={str(k): str(v) for k, v in dict(doc.get("options", {})).items()},
        )


class Driver(Protocol):
    """The benchmark operations on one system (contract in the module docstring)."""

    async def set(self, key: bytes, value: bytes) -> None: ...

    async def get(self, key: bytes, *, linearizable: bool) -> bytes | None: ...

    async def incr(self, key: bytes) -> int: ...

    async def mset(self, items: Sequence[tuple[bytes, bytes]]) -> None: ...

    async def mget(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    async def close(self) -> None: ...


async def open_driver(spec: TargetSpec) -> Driver:
    """A connected driver for ``spec`` (no request is sent yet)."""
    if spec.kind == "cachenode":
        return CachenodeDriver(spec.endpoints)
    if spec.kind == "etcd":
        return EtcdDriver(spec.endpoints, load_etcd_pb2(Path(spec.options["pb2_dir"])))
    if spec.kind == "redis":
        return RedisDriver(spec.endpoints[0])
    raise ValueError(f"unknown target kind {spec.kind!r} (cachenode, etcd or redis)")


# ---- cachenode ---------------------------------------------------------------


class CachenodeDriver:
    """cachenode through :class:`~cachenode.client.AsyncCacheClient` (smart routing)."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        from cachenode.client import AsyncCacheClient

        self._client = AsyncCacheClient(list(endpoints), timeout=REQUEST_TIMEOUT_S)

    async def set(self, key: bytes, value: bytes) -> None:
        await self._client.set(key, value)

    async def get(self, key: bytes, *, linearizable: bool) -> bytes | None:
        found = await self._client.get(key, consistency="linearizable" if linearizable else "stale")
        return None if found is None else found.value

    async def incr(self, key: bytes) -> int:
        return await self._client.incr(key)

    async def mset(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        await self._client.mset(list(items))

    async def mget(self, keys: Sequence[bytes]) -> list[bytes | None]:
        found = await self._client.mget(list(keys))
        return [None if (r := found.get(k)) is None else r.value for k in keys]

    async def close(self) -> None:
        await self._client.close()


# ---- etcd --------------------------------------------------------------------


def load_etcd_pb2(directory: Path) -> ModuleType:
    """The message classes of ``etcd_kv.proto``, generated into ``directory`` once.

    The generated file's name carries a hash of the .proto, so an edited
    .proto is regenerated.  Safe to call from several processes at once: the
    file is written to a temporary name and renamed into place.
    """
    digest = hashlib.sha256(ETCD_PROTO.read_bytes()).hexdigest()[:12]
    name = f"etcd_kv_{digest}_pb2"
    path = directory / f"{name}.py"
    if name in sys.modules:
        return sys.modules[name]
    if not path.exists():
        _generate_etcd_pb2(directory, name, path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import the generated etcd stubs at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _generate_etcd_pb2(directory: Path, name: str, path: Path) -> None:
    import os
    import tempfile

    from grpc_tools import protoc  # type: ignore[import-untyped]

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        # protoc names the module after the file: copy the proto under the wanted name.
        proto_name = f"{name[: -len('_pb2')]}.proto"
        (src / proto_name).write_bytes(ETCD_PROTO.read_bytes())
        code = protoc.main(["protoc", f"-I{src}", f"--python_out={tmp}", proto_name])
        if code != 0:
            raise RuntimeError(
                f"protoc failed ({code}) on {ETCD_PROTO}; is grpcio-tools installed?"
            )
        os.replace(Path(tmp) / f"{name}.py", path)


class EtcdDriver:
    """etcd v3 through its gRPC KV service; linearizable ranges unless told otherwise."""

    def __init__(self, endpoints: Sequence[str], pb2: ModuleType) -> None:
        import grpc.aio

        self._pb = pb2
        self._channels = [grpc.aio.insecure_channel(e, options=_GRPC_OPTIONS) for e in endpoints]
        self._stubs = [
            (
                ch.unary_unary(
                    "/etcdserverpb.KV/Range",
                    request_serializer=pb2.RangeRequest.SerializeToString,
                    response_deserializer=pb2.RangeResponse.FromString,
                ),
                ch.unary_unary(
                    "/etcdserverpb.KV/Put",
                    request_serializer=pb2.PutRequest.SerializeToString,
                    response_deserializer=pb2.PutResponse.FromString,
                ),
                ch.unary_unary(
                    "/etcdserverpb.KV/Txn",
                    request_serializer=pb2.TxnRequest.SerializeToString,
                    response_deserializer=pb2.TxnResponse.FromString,
                ),
            )
            for ch in self._channels
        ]
        self._next = 0

    def _pick(self) -> tuple[Any, Any, Any]:
        self._next = (self._next + 1) % len(self._stubs)
        return self._stubs[self._next]

    async def set(self, key: bytes, value: bytes) -> None:
        _, put, _ = self._pick()
        await put(self._pb.PutRequest(key=key, value=value), timeout=REQUEST_TIMEOUT_S)

    async def get(self, key: bytes, *, linearizable: bool) -> bytes | None:
        range_, _, _ = self._pick()
        resp = await range_(
            self._pb.RangeRequest(key=key, serializable=not linearizable), timeout=REQUEST_TIMEOUT_S
        )
        return bytes(resp.kvs[0].value) if resp.kvs else None

    async def incr(self, key: bytes) -> int:
        pb = self._pb
        range_, _, txn = self._pick()
        current = await range_(pb.RangeRequest(key=key), timeout=REQUEST_TIMEOUT_S)
        while True:
            kv = current.kvs[0] if current.kvs else None
            value = int(kv.value) if kv is not None else 0
            # A missing key compares as mod_revision 0, so this also creates it.
            compare = pb.Compare(
                result=pb.Compare.EQUAL,
                target=pb.Compare.MOD,
                key=key,
                mod_revision=kv.mod_revision if kv is not None else 0,
            )
            resp = await txn(
                pb.TxnRequest(
                    compare=[compare],
                    success=[
                        pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"%d" % (value + 1)))
                    ],
                    failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key))],
                ),
                timeout=REQUEST_TIMEOUT_S,
            )
            if resp.succeeded:
                return value + 1
            current = resp.responses[0].response_range

    async def mset(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        pb = self._pb
        _, _, txn = self._pick()
        ops = [pb.RequestOp(request_put=pb.PutRequest(key=k, value=v)) for k, v in items]
        await txn(pb.TxnRequest(success=ops), timeout=REQUEST_TIMEOUT_S)

    async def mget(self, keys: Sequence[bytes]) -> list[bytes | None]:
        pb = self._pb
        _, _, txn = self._pick()
        ops = [pb.RequestOp(request_range=pb.RangeRequest(key=k)) for k in keys]
        resp = await txn(pb.TxnRequest(success=ops), timeout=REQUEST_TIMEOUT_S)
        out: list[bytes | None] = []
        for r in resp.responses:
            kvs = r.response_range.kvs
            out.append(bytes(kvs[0].value) if kvs else None)
        return out

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close(None)


# ---- Redis -------------------------------------------------------------------


class RedisDriver:
    """Redis through redis-py's asyncio client (``pip install redis``)."""

    def __init__(self, endpoint: str) -> None:
        try:
            aioredis = importlib.import_module("redis.asyncio")
        except ImportError:
            raise RuntimeError(
                "the Python package 'redis' is missing; run `.venv/bin/pip install redis`"
            ) from None
        host, _, port = endpoint.rpartition(":")
        self._r: Any = aioredis.Redis(
            host=host, port=int(port), socket_timeout=REQUEST_TIMEOUT_S, decode_responses=False
        )

    async def set(self, key: bytes, value: bytes) -> None:
        await self._r.set(key, value)

    async def get(self, key: bytes, *, linearizable: bool) -> bytes | None:
        # One Redis server: every read sees every acknowledged write.
        value = await self._r.get(key)
        return None if value is None else bytes(value)

    async def incr(self, key: bytes) -> int:
        return int(await self._r.incr(key))

    async def mset(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        await self._r.mset(dict(items))

    async def mget(self, keys: Sequence[bytes]) -> list[bytes | None]:
        values = await self._r.mget(list(keys))
        return [None if v is None else bytes(v) for v in values]

    async def close(self) -> None:
        await self._r.aclose()
