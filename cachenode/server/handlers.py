"""gRPC registration that answers a malformed request with INVALID_ARGUMENT.

grpcio's generated ``add_*Servicer_to_server`` deserialize requests before
our code runs and answer an undecodable one with INTERNAL ("Exception
deserializing request!"), which blames the server for the caller's bytes.
These handlers receive raw bytes, parse them, and say precisely what was
wrong (for a bidirectional stream: message by message).  Same services, same methods, same servicer objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.protobuf import message_factory

from .._errors import InvalidArgument
from ..v1 import cache_pb2
from .status import abort


def _wrap(method: Callable[[Any, grpc.ServicerContext], Any], req_cls: Any, name: str) -> Callable[[bytes, grpc.ServicerContext], Any]:
    def handler(raw: bytes, ctx: grpc.ServicerContext) -> Any:
        try:
            req = req_cls.FromString(raw)
        except (pb_message.DecodeError, ValueError) as e:
            abort(ctx, InvalidArgument(f"malformed {name} request ({len(raw)} bytes): {e}; send a {req_cls.DESCRIPTOR.full_name}"))
        return method(req, ctx)

    return handler


def _wrap_stream(
    method: Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]], req_cls: Any, name: str,
) -> Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[Any]]:
    """A request stream's messages are parsed one by one; a malformed one
    ends the stream with INVALID_ARGUMENT (the requests before it were answered)."""

    def parsed(raws: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[Any]:
        for raw in raws:
            try:
                yield req_cls.FromString(raw)
            except (pb_message.DecodeError, ValueError) as e:
                abort(ctx, InvalidArgument(f"malformed {name} message ({len(raw)} bytes): {e}; send {req_cls.DESCRIPTOR.full_name} messages"))

    def handler(raws: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[Any]:
        return method(parsed(raws, ctx), ctx)

    return handler


def add_service(server: grpc.Server, service_name: str, servicer: Any) -> None:
    """Register every method of ``cachenode.v1.<service_name>`` on ``servicer``."""
    svc = cache_pb2.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for m in svc.methods:
        req_cls = message_factory.GetMessageClass(m.input_type)
        if m.client_streaming and m.server_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                _wrap_stream(getattr(servicer, m.name), req_cls, m.name),
                request_deserializer=None,
                response_serializer=lambda r: r.SerializeToString(),
            )
            continue
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            _wrap(getattr(servicer, m.name), req_cls, m.name),
            request_deserializer=None,
            response_serializer=lambda r: r.SerializeToString(),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(svc.full_name, handlers),))
