"""Key-value commands: get, set, del, cas, incr, ttl, mget, mset.

Text output is plain and scriptable: ``get`` prints the value alone (or
``(nil)``), ``mget`` one value per line in argument order, ``ttl`` the
milliseconds left (``-1``: never expires; ``(nil)``: absent).  ``--json`` prints
one document: ``get`` -> ``{"key", "value", "version", "ttl_ms"}`` (value,
version and ttl_ms null when the key is absent; ttl_ms null when it never
expires; a value that is not UTF-8 is base64 with ``"encoding": "base64"``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from cachectl import argtypes
from cachectl.output import CliError, ExitStatus, json_value, text_of

if TYPE_CHECKING:
    from cachectl.main import Context
    from cachenode.client import GetResult

NIL = "(nil)"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("get", parents=[common], help="read a key")
    p.add_argument("key")
    p.add_argument("--stale", action="store_true", help="allow a stale read from any replica")
    p.set_defaults(handler=cmd_get)

    p = sub.add_parser("set", parents=[common], help="write a key")
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("--ttl", metavar="MS", type=_positive_int, help="expire after MS milliseconds")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--nx", action="store_true", help="only if the key is absent")
    cond.add_argument("--xx", action="store_true", help="only if the key exists")
    p.set_defaults(handler=cmd_set)

    p = sub.add_parser("del", parents=[common], help="delete a key")
    p.add_argument("key")
    p.set_defaults(handler=cmd_del)

    p = sub.add_parser("cas", parents=[common], help="compare-and-set a key")
    p.add_argument("key")
    p.add_argument("new")
    exp = p.add_mutually_exclusive_group(required=True)
    exp.add_argument("--expected", metavar="VALUE", help="swap only if the key holds VALUE")
    exp.add_argument(
        "--expected-version", metavar="N", type=argtypes.whole, help="swap only at version N"
    )
    exp.add_argument("--absent", action="store_true", help="swap only if the key is absent")
    p.add_argument("--ttl", metavar="MS", type=_positive_int, help="expire after MS milliseconds")
    p.set_defaults(handler=cmd_cas)

    p = sub.add_parser("incr", parents=[common], help="add DELTA (default 1) to an integer key")
    p.add_argument("key")
    p.add_argument("delta", nargs="?", type=_int, default=1)
    p.set_defaults(handler=cmd_incr)

    p = sub.add_parser("ttl", parents=[common], help="remaining time to live of a key, in ms")
    p.add_argument("key")
    p.set_defaults(handler=cmd_ttl)

    p = sub.add_parser("mget", parents=[common], help="read several keys")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.set_defaults(handler=cmd_mget)

    p = sub.add_parser("mset", parents=[common], help="write several keys (atomic per shard only)")
    p.add_argument("pairs", nargs="+", metavar="K V")
    p.add_argument("--ttl", metavar="MS", type=_positive_int, help="expire after MS milliseconds")
    p.set_defaults(handler=cmd_mset)


# ---- argument types -------------------------------------------------------


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# ---- commands -------------------------------------------------------------


def _get_doc(key: str, r: GetResult | None) -> dict[str, Any]:
    if r is None:
        return {"key": key, "value": None, "version": None, "ttl_ms": None}
    return {"key": key, **json_value(r.value), "version": r.version, "ttl_ms": r.ttl_ms}


def cmd_get(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        r = c.get(a.key, consistency="stale" if a.stale else "linearizable")
    if ctx.json:
        doc = _get_doc(a.key, r)
        if r is not None and a.stale:
            doc.update(served_by=r.served_by, applied_index=r.applied_index)
        ctx.out.json(doc)
    else:
        ctx.out.line(NIL if r is None else text_of(r.value))
    return ExitStatus.OK


def cmd_set(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        applied = c.set(a.key, a.value, ttl_ms=a.ttl, if_absent=a.nx, if_present=a.xx)
    if ctx.json:
        ctx.out.json({"key": a.key, "applied": applied})
    elif applied:
        ctx.out.line("OK")
    else:
        ctx.out.line("(not set: the key exists)" if a.nx else "(not set: the key is absent)")
    return ExitStatus.OK if applied else ExitStatus.FAILED


def cmd_del(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        deleted = c.delete(a.key)
    if ctx.json:
        ctx.out.json({"key": a.key, "deleted": deleted})
    else:
        ctx.out.line("deleted" if deleted else "(not found)")
    return ExitStatus.OK


def cmd_cas(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        r = c.cas(
            a.key,
            a.new,
            expected=a.expected,
            expected_version=a.expected_version,
            absent=a.absent,
            ttl_ms=a.ttl,
        )
    if ctx.json:
        current = None
        if not r.succeeded:
            current = (
                {**json_value(r.current_value), "version": r.current_version}
                if r.current_value is not None
                else None
            )
        ctx.out.json(
            {
                "key": a.key,
                "succeeded": r.succeeded,
                "version": r.version or None,
                "current": current,
            }
        )
    elif r.succeeded:
        ctx.out.line(f"OK (version {r.version})")
    elif r.current_value is None:
        ctx.out.line("(not swapped: the key is absent)")
    else:
        ctx.out.line(
            f"(not swapped: the key holds {text_of(r.current_value)!r} at version {r.current_version})"
        )
    return ExitStatus.OK if r.succeeded else ExitStatus.FAILED


def cmd_incr(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        value = c.incr(a.key, a.delta)
    if ctx.json:
        ctx.out.json({"key": a.key, "value": value})
    else:
        ctx.out.line(str(value))
    return ExitStatus.OK


def cmd_ttl(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        ttl = c.ttl(a.key)
    if ctx.json:
        ctx.out.json(
            {
                "key": a.key,
                "found": ttl is not None,
                "ttl_ms": ttl if ttl is not None and ttl >= 0 else None,
            }
        )
    elif ttl is None:
        ctx.out.line(NIL)
    else:
        ctx.out.line(str(ttl))  # -1: never expires
    return ExitStatus.OK


def cmd_mget(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        found = c.mget(a.keys)
    if ctx.json:
        ctx.out.json([_get_doc(k, found.get(k)) for k in a.keys])
    else:
        for k in a.keys:
            r = found.get(k)
            ctx.out.line(NIL if r is None else text_of(r.value))
    return ExitStatus.OK


def cmd_mset(ctx: Context) -> int:
    a = ctx.args
    if len(a.pairs) % 2:
        raise CliError(
            f"mset takes KEY VALUE pairs, got {len(a.pairs)} arguments (the last key has no value)",
            ExitStatus.USAGE,
        )
    pairs = list(zip(a.pairs[::2], a.pairs[1::2], strict=True))
    with ctx.client() as c:
        count = c.mset(pairs, ttl_ms=a.ttl)
    if ctx.json:
        ctx.out.json({"count": count})
    else:
        ctx.out.line(f"OK ({count} key{'s' if count != 1 else ''})")
    return ExitStatus.OK
