"""cachectl: talk to a cachenode cluster, and run one on this machine.

    cachectl [--endpoints H:P,...] [--timeout S] [--forward] COMMAND ...

    get KEY [--stale]                     set KEY VALUE [--ttl MS] [--nx|--xx]
    del KEY                               cas KEY NEW (--expected V|--expected-version N|--absent)
    incr KEY [DELTA]                      ttl KEY
    mget KEY...                           mset K V [K V ...] [--ttl MS]
    status                                local up|down|stop-node|start-node ...

Endpoints come from ``--endpoints``, else ``CACHECTL_ENDPOINTS``, else
127.0.0.1:7001.  Requests go straight to each shard's leader (the smart
client); ``--forward`` instead sends them to the first reachable endpoint and
lets that node forward (with ``get --stale`` that reads that node's replica).
Global options may also follow the command.  Every command accepts
``--json``: one JSON document on one line on stdout.  Keys and values on the
command line are UTF-8 text; use ``--`` before a value that starts with ``-``.

Exit statuses:

    0    done.  Reading a missing key is done too: ``get``/``ttl`` print
         ``(nil)`` (``--json``: ``"value": null``) and exit 0, with or without --json.
    1    the operation was refused: a conditional write whose condition did not
         hold (``set --nx/--xx``, ``cas``), incr on a non-integer, unknown
         node/shard, an internal error, or a local-cluster command that failed.
    2    usage: bad command line, or an argument the cluster rejected.
    3    unavailable: could not reach the cluster, no leader, overloaded.
         Nothing was changed.
    4    timeout: no answer before the deadline.  A write may or may not have
         been applied (never twice); read the key to find out.
    130  interrupted (Ctrl-C).

Errors are one line on stderr: ``cachectl: error: ...``.  Set
``CACHECTL_DEBUG=1`` to get a traceback for unexpected errors.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TextIO

from cachectl.output import CliError, ExitStatus, Output

DEFAULT_ENDPOINT = "127.0.0.1:7001"
DEFAULT_TIMEOUT_S = 5.0

Handler = Callable[["Context"], int]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


class Context:
    """What a command handler gets: parsed args, environment, output, client factory."""

    def __init__(self, args: argparse.Namespace, env: Mapping[str, str], out: Output) -> None:
        self.args = args
        self.env = env
        self.out = out
        self.json: bool = bool(getattr(args, "json", False))
        self.timeout: float = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT_S
        self.forward: bool = bool(getattr(args, "forward", False))
        if args.endpoints:
            self.endpoints_text, self.endpoints_source = args.endpoints, "--endpoints"
        elif env.get("CACHECTL_ENDPOINTS"):
            self.endpoints_text, self.endpoints_source = (
                env["CACHECTL_ENDPOINTS"],
                "CACHECTL_ENDPOINTS",
            )
        else:
            self.endpoints_text, self.endpoints_source = DEFAULT_ENDPOINT, "default"

    def client(self) -> Any:
        """A :class:`cachenode.client.CacheClient` for the chosen endpoints (caller closes it)."""
        from cachenode.client import CacheClient, InvalidArgument

        try:
            return CacheClient(
                self.endpoints_text,
                timeout=self.timeout,
                max_attempts=5,
                routing="proxy" if self.forward else "smart",
            )
        except InvalidArgument as err:
            raise CliError(
                f"{err.message} (from {self.endpoints_source})", ExitStatus.USAGE
            ) from None

    def endpoints_hint(self) -> str:
        if self.endpoints_source == "default":
            return (
                f"no --endpoints or CACHECTL_ENDPOINTS given, so the default {DEFAULT_ENDPOINT} "
                "was tried; pass --endpoints HOST:PORT,..."
            )
        return f"endpoints from {self.endpoints_source}"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options accepted before and after the command.

    On sub-parsers the defaults are suppressed so a value given before the
    command is not overwritten by the sub-parser's default.
    """
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--endpoints",
        metavar="HOST:PORT,...",
        default=default,
        help=f"cluster client addresses (env CACHECTL_ENDPOINTS; default {DEFAULT_ENDPOINT})",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=default,
        help=f"deadline for the whole command's request (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--forward",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="send requests to the first reachable endpoint and let it forward them",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print the result as one JSON document",
    )


def build_parser() -> argparse.ArgumentParser:
    from cachectl import bench, cluster, kv, local, placement

    parser = _Parser(
        prog="cachectl",
        description="Talk to a cachenode cluster, and run one on this machine.",
        epilog="Exit statuses: 0 done, 1 refused/condition false, 2 usage, 3 unavailable, "
        "4 timeout (a write may or may not have applied), 130 interrupted.",
    )
    _global_options(parser, suppress=False)
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    kv.register(sub, common)
    cluster.register(sub, common)
    placement.register(sub, common)
    local.register(sub, common)
    bench.register(sub, common)
    return parser


def _status_for(err: Exception) -> ExitStatus:
    from cachenode._errors import (
        EpochMismatch,
        InvalidArgument,
        NotLeader,
        OutcomeUnknown,
        Overloaded,
        Unavailable,
    )

    if isinstance(err, InvalidArgument):
        return ExitStatus.USAGE
    if isinstance(err, Unavailable | NotLeader | Overloaded | EpochMismatch):
        return ExitStatus.UNAVAILABLE
    if isinstance(err, OutcomeUnknown):
        return ExitStatus.TIMEOUT
    return ExitStatus.FAILED


def main(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one cachectl command; returns its exit status.  Never raises, never exits."""
    env = os.environ if env is None else env
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Output(stdout or sys.stdout, stderr or sys.stderr, env)
    ctx: Context | None = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except _UsageError as err:
            out.error(str(err))
            return ExitStatus.USAGE
        except SystemExit as exit_:  # --help / --version
            code = exit_.code
            return code if isinstance(code, int) else (0 if code is None else ExitStatus.USAGE)
        ctx = Context(args, env, out)
        handler: Handler = args.handler
        return int(handler(ctx))
    except KeyboardInterrupt:
        out.error("interrupted")
        return ExitStatus.INTERRUPTED
    except CliError as err:
        out.error(err.message)
        return err.status
    except Exception as err:
        from cachenode._errors import CacheError

        if isinstance(err, CacheError):
            message = err.message
            status = _status_for(err)
            if ctx is not None and status is ExitStatus.UNAVAILABLE and "cluster map" in message:
                message += f" [{ctx.endpoints_hint()}]"
            out.error(message)
            return status
        if env.get("CACHECTL_DEBUG"):
            out.raw_err(traceback.format_exc())
        out.error(
            f"internal error: {type(err).__name__}: {err} "
            "(this is a bug in cachectl; set CACHECTL_DEBUG=1 for a traceback)"
        )
        return ExitStatus.FAILED


def entrypoint() -> NoReturn:
    """Console-script entry point: ``cachectl ...``."""
    sys.exit(main(sys.argv[1:], os.environ))


if __name__ == "__main__":
    entrypoint()
