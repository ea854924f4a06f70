"""The ``jepsen-lite`` command line.

``main(argv, env)`` is the whole program: it never calls ``sys.exit`` and reads the
environment only from ``env``, so tests run the real entry point in-process.

Exit status (:class:`ExitStatus`), for one or many files, by precedence:

* 1 -- some history is not linearizable (a definite finding wins over everything);
* 3 -- harness error: unreadable/unparseable file, bad usage, internal error;
* 2 -- some history is unknown (a budget ran out);
* 0 -- every history is linearizable;
* 130 -- interrupted (Ctrl-C).

Environment: ``JEPSEN_LITE_WORKERS`` (default worker processes), ``NO_COLOR``,
``COLUMNS`` (table width), ``JEPSEN_LITE_DEBUG=1`` (re-raise internal errors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from time import perf_counter
from typing import IO, Any, NoReturn

from jepsen_lite import __version__
from jepsen_lite.checker import (
    DEFAULT_MAX_MEMO,
    DEFAULT_MAX_STEPS,
    CheckResult,
    KeyResult,
    WorkerPool,
    check_history,
)
from jepsen_lite.checker.models import MODELS, Model, ModelError, get_model
from jepsen_lite.formats import FORMATS, FormatError, parse_file
from jepsen_lite.history import HistoryError, Op
from jepsen_lite.report import write_timeline

__all__ = ["ExitStatus", "build_parser", "entrypoint", "main"]


class ExitStatus(IntEnum):
    VALID = 0
    VIOLATION = 1
    UNKNOWN = 2
    ERROR = 3
    INTERRUPTED = 130


class UsageError(Exception):
    """Bad command line; argparse would exit 2, which here means "unknown"."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


@dataclass(frozen=True)
class Context:
    """What a subcommand may touch besides its arguments."""

    env: Mapping[str, str]
    stdout: IO[str]
    stderr: IO[str]

    def error(self, message: str) -> None:
        """One line on stderr: harness errors never print tracebacks."""
        print(f"jepsen-lite: error: {message}", file=self.stderr)


Handler = Callable[[argparse.Namespace, Context], ExitStatus]


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser.  Each subcommand sets ``handler`` via ``set_defaults``."""
    parser = _Parser(
        prog="jepsen-lite",
        description="Linearizability testing for cachenode: run tests, check histories.",
    )
    parser.add_argument("--version", action="version", version=f"jepsen-lite {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_check(sub)
    _add_run(sub)
    _add_matrix(sub)
    return parser


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return x


def _add_run(sub: Any) -> None:
    from jepsen_lite.db import UNSAFE_SWITCHES
    from jepsen_lite.generator import WORKLOADS
    from jepsen_lite.nemesis import NEMESES, TARGETS
    from jepsen_lite.net import SHAPES

    p = sub.add_parser(
        "run",
        help="test a real local cluster under faults",
        description=(
            "Start a cachenode cluster, run a seeded workload against it while a "
            "nemesis injects faults, heal, check the history for linearizability. "
            "Exit: 0 linearizable, 1 violation, 2 unknown, 3 harness error."
        ),
    )
    p.add_argument("--workload", required=True, choices=WORKLOADS)
    p.add_argument("--nemesis", default="none", choices=NEMESES)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--nodes", type=_positive_int, default=5, help="nodes (default 5)")
    p.add_argument("--shards", type=_positive_int, default=4, help="shards (default 4)")
    p.add_argument(
        "--time",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="workload duration (default 30)",
    )
    p.add_argument(
        "--rate",
        type=_positive_float,
        default=50.0,
        metavar="OPS",
        help="total invocations per second (default 50)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for ops and faults (default 0)")
    p.add_argument(
        "--unsafe",
        action="append",
        default=[],
        choices=UNSAFE_SWITCHES,
        metavar="NAME",
        help=f"start the nodes with --unsafe-NAME ({', '.join(UNSAFE_SWITCHES)}); repeatable",
    )
    p.add_argument(
        "--net",
        default="auto",
        choices=("auto", "netns", "filter"),
        help="partition mechanism: namespaces (root) or the node fault filter (default auto)",
    )
    p.add_argument(
        "--partition-shape",
        choices=SHAPES,
        default=None,
        help="always use this grudge shape (default: seeded mix)",
    )
    p.add_argument(
        "--nemesis-target",
        choices=TARGETS,
        default=None,
        help="kill/pause/clock/disk target (default: seeded mix)",
    )
    p.add_argument(
        "--op-timeout",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="deadline of each operation (default 2)",
    )
    p.add_argument("--ops-per-key", type=_positive_int, default=None, metavar="N")
    p.add_argument("--workers-per-key", type=_positive_int, default=None, metavar="N")
    p.add_argument(
        "--keys",
        type=_positive_int,
        default=None,
        metavar="N",
        help="keys worked on concurrently (default depends on the workload)",
    )
    p.set_defaults(handler=_cmd_run)


def _add_matrix(sub: Any) -> None:
    p = sub.add_parser(
        "matrix",
        help="run every workload x nemesis and write a summary table",
        description=(
            "Run `jepsen-lite run` for every workload x nemesis, write a markdown table to --doc and "
            "print it.  Exit 1 on any violation, else 3 on a harness error, else 2 on "
            "an unknown verdict, else 0."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="one sub-directory per test")
    p.add_argument("--doc", required=True, metavar="FILE", help="markdown file to write")
    p.add_argument("--time", type=_positive_float, default=60.0, metavar="SECONDS")
    p.add_argument("--rate", type=_positive_float, default=50.0, metavar="OPS")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nodes", type=_positive_int, default=5)
    p.add_argument("--shards", type=_positive_int, default=4)
    p.add_argument("--net", default="auto", choices=("auto", "netns", "filter"))
    p.add_argument("--workloads", default=None, metavar="LIST", help="comma list (default all)")
    p.add_argument("--nemeses", default=None, metavar="LIST", help="comma list (default all)")
    p.set_defaults(handler=_cmd_matrix)


def _cmd_run(args: argparse.Namespace, ctx: Context) -> ExitStatus:
    from jepsen_lite.db import HarnessError
    from jepsen_lite.runner import Interrupted, RunConfig, run

    cfg = RunConfig(
        workload=args.workload,
        nemesis=args.nemesis,
        out=Path(args.out).resolve(),
        nodes=args.nodes,
        shards=args.shards,
        time_s=args.time,
        rate=args.rate,
        seed=args.seed,
        unsafe=list(dict.fromkeys(args.unsafe)),
        net=args.net,
        partition_shape=args.partition_shape,
        nemesis_target=args.nemesis_target,
        op_timeout_s=args.op_timeout,
        ops_per_key=args.ops_per_key,
        workers_per_key=args.workers_per_key,
        key_groups=args.keys,
    )

    def say(msg: str) -> None:
        print(f"jepsen-lite: {msg}", file=ctx.stderr, flush=True)

    try:
        outcome = run(cfg, say=say, console_file=ctx.stdout)
    except HarnessError as e:
        ctx.error(str(e).splitlines()[0] if str(e) else "harness error")
        return ExitStatus.ERROR
    except (Interrupted, KeyboardInterrupt):
        print("jepsen-lite: interrupted; every node was stopped", file=ctx.stderr)
        return ExitStatus.INTERRUPTED
    return ExitStatus(outcome.exit)


def _cmd_matrix(args: argparse.Namespace, ctx: Context) -> ExitStatus:
    from jepsen_lite.matrix import MatrixConfig, run_matrix

    def split(text: str | None) -> list[str] | None:
        return [x.strip() for x in text.split(",") if x.strip()] if text else None

    cfg = MatrixConfig(
        out=Path(args.out).resolve(),
        doc=Path(args.doc),
        time_s=args.time,
        rate=args.rate,
        seed=args.seed,
        nodes=args.nodes,
        shards=args.shards,
        net=args.net,
        workloads=split(args.workloads),
        nemeses=split(args.nemeses),
    )
    try:
        return ExitStatus(run_matrix(cfg, stdout=ctx.stdout, stderr=ctx.stderr))
    except ValueError as e:
        ctx.error(str(e))
        return ExitStatus.ERROR


def _add_check(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="check history files for linearizability",
        description="Check history files for linearizability (WGL search per key).",
    )
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="history file format")
    p.add_argument(
        "--model",
        choices=sorted(MODELS),
        help="model to check against (default: implied by the format / the history header)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON document instead of a table")
    p.add_argument(
        "--all-keys",
        action="store_true",
        help="check every key, not just up to the first violation",
    )
    p.add_argument(
        "--budget-steps",
        type=_positive_int,
        default=DEFAULT_MAX_STEPS,
        metavar="N",
        help=f"search steps per key before giving up as unknown (default {DEFAULT_MAX_STEPS:,})",
    )
    p.add_argument(
        "--budget-memo",
        type=_positive_int,
        default=DEFAULT_MAX_MEMO,
        metavar="N",
        help=f"memo entries per key before giving up as unknown (default {DEFAULT_MAX_MEMO:,})",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="worker processes for hard keys (default $JEPSEN_LITE_WORKERS or CPU count)",
    )
    p.add_argument(
        "--html",
        metavar="OUT",
        help="write a timeline.html (a directory of <file>.html when checking several files)",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(handler=_cmd_check)


# ---------------------------------------------------------------------------- check


def _jsonable_key(key: Hashable) -> Any:
    if isinstance(key, tuple):
        return [_jsonable_key(k) for k in key]
    return key


def _key_label(key: Hashable) -> str:
    return "(single)" if key is None else str(_jsonable_key(key))


def _key_json(kr: KeyResult) -> dict[str, Any]:
    return {
        "key": _jsonable_key(kr.key),
        "valid": kr.valid,
        "ops": kr.ops,
        "steps": kr.steps,
        "memo": kr.memo,
        "seconds": round(kr.seconds, 6),
        "reason": kr.reason,
    }


def _failure_json(kr: KeyResult, result: CheckResult, model: Model) -> dict[str, Any]:
    stuck = result.by_id.get(kr.stuck) if kr.stuck is not None else None
    return {
        "key": _jsonable_key(kr.key),
        "prefix": list(kr.prefix),
        "stuck": kr.stuck,
        "stuck_op": model.describe_op(stuck) if stuck is not None else None,
        "stuck_process": stuck.process if stuck is not None else None,
        "state": model.describe_state(kr.state),
        "steps": kr.steps,
    }


def _html_path(out: str, file: str, many: bool) -> Path:
    if not many and not os.path.isdir(out):
        return Path(out)
    os.makedirs(out, exist_ok=True)
    return Path(out) / (Path(file).name + ".html")


def _check_one(
    file: str, args: argparse.Namespace, pool: WorkerPool, ctx: Context
) -> dict[str, Any]:
    t0 = perf_counter()
    entry: dict[str, Any] = {"file": file, "format": args.format, "valid": None}
    try:
        parsed = parse_file(file, args.format)
        name = args.model or parsed.model
        params = parsed.model_params if name == parsed.model else {}
        model = get_model(name, **params)
        ops: list[Op] = parsed.ops
        if not any(not op.is_nemesis for op in ops):
            raise FormatError(f"{file}: no client operations in history")
        result = check_history(
            ops,
            model,
            all_keys=args.all_keys,
            max_steps=args.budget_steps,
            max_memo=args.budget_memo,
            pool=pool,
        )
        if args.html:
            path = _html_path(args.html, file, len(args.files) > 1)
            write_timeline(path, ops, result, f"jepsen-lite check: {Path(file).name}")
            entry["html"] = str(path)
    except OSError as e:
        msg = e.strerror or str(e)
        where = e.filename if e.filename is not None else file
        ctx.error(f"{where}: {msg}")
        entry.update(error=f"{where}: {msg}", seconds=round(perf_counter() - t0, 6))
        return entry
    except (FormatError, HistoryError, ModelError) as e:
        text = str(e) if str(e).startswith(file) else f"{file}: {e}"
        ctx.error(text)
        entry.update(error=text, seconds=round(perf_counter() - t0, 6))
        return entry
    entry.update(
        valid=result.valid,
        seconds=round(perf_counter() - t0, 6),
        model=result.model,
        ops=result.ops,
        events=len(ops),
        keys=len(result.keys),
        invalid_keys=[_jsonable_key(k.key) for k in result.failures],
        unknown_keys=[_jsonable_key(k.key) for k in result.unknowns if k.reason != "skipped"],
        skipped_keys=[_jsonable_key(k.key) for k in result.unknowns if k.reason == "skipped"],
        failures=[_failure_json(k, result, model) for k in result.failures],
        results=[_key_json(k) for k in result.keys],
    )
    return entry


def _status(entries: Sequence[dict[str, Any]]) -> ExitStatus:
    if any(e["valid"] is False for e in entries):
        return ExitStatus.VIOLATION
    if any("error" in e for e in entries):
        return ExitStatus.ERROR
    if any(e["valid"] is None for e in entries):
        return ExitStatus.UNKNOWN
    return ExitStatus.VALID


def _detail(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return str(entry["error"])
    if entry["failures"]:
        f = entry["failures"][0]
        key = "" if f["key"] is None else f"key {f['key']}: "
        return (
            f"{key}{f['stuck_op']} (process {f['stuck_process']}) cannot follow "
            f"{len(f['prefix'])} linearized ops, state {f['state']}"
        )
    unknown = [r for r in entry["results"] if r["valid"] is None and r["reason"] != "skipped"]
    if unknown:
        r = unknown[0]
        more = f" (+{len(unknown) - 1} more keys)" if len(unknown) > 1 else ""
        return f"key {_key_label(r['key'])}: {r['reason']} after {r['steps']:,} steps{more}"
    return ""


def _print_table(entries: Sequence[dict[str, Any]], seconds: float, ctx: Context) -> None:
    from rich.console import Console  # imported lazily: only the table needs it
    from rich.table import Table

    cols = ctx.env.get("COLUMNS")
    console = Console(
        file=ctx.stdout,
        no_color="NO_COLOR" in ctx.env,
        highlight=False,
        width=int(cols) if cols and cols.isdigit() else None,
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, justify in (
        ("file", "left"),
        ("verdict", "left"),
        ("ops", "right"),
        ("keys", "right"),
        ("s", "right"),
        ("detail", "left"),
    ):
        table.add_column(col, justify=justify, no_wrap=col != "detail")  # type: ignore[arg-type]
    names = [Path(e["file"]).name for e in entries]
    if len(set(names)) != len(names):  # basenames are ambiguous: show paths as given
        names = [e["file"] for e in entries]
    styles = {True: ("valid", "green"), False: ("INVALID", "bold red"), None: ("unknown", "yellow")}
    for e, name in zip(entries, names, strict=True):
        word, style = ("error", "bold magenta") if "error" in e else styles[e["valid"]]
        table.add_row(
            name,
            f"[{style}]{word}[/]",
            str(e.get("ops", "")),
            str(e.get("keys", "")),
            f"{e['seconds']:.3f}",
            _detail(e),
        )
    console.print(table)
    counts = {
        "valid": sum(e["valid"] is True for e in entries),
        "invalid": sum(e["valid"] is False for e in entries),
        "unknown": sum(e["valid"] is None and "error" not in e for e in entries),
        "errors": sum("error" in e for e in entries),
    }
    console.print(
        f"{len(entries)} files: "
        + ", ".join(f"{n} {k}" for k, n in counts.items())
        + f" in {seconds:.2f} s"
    )


def _cmd_check(args: argparse.Namespace, ctx: Context) -> ExitStatus:
    t0 = perf_counter()
    workers = args.workers
    if workers is None:
        env_workers = ctx.env.get("JEPSEN_LITE_WORKERS", "")
        workers = int(env_workers) if env_workers.isdigit() and int(env_workers) > 0 else None
    entries: list[dict[str, Any]] = []
    with WorkerPool(workers) as pool:
        for file in args.files:
            entries.append(_check_one(file, args, pool, ctx))
    status = _status(entries)
    seconds = perf_counter() - t0
    if args.json:
        doc = {
            "files": entries,
            "valid": {0: True, 1: False}.get(int(status)),
            "exit": int(status),
            "seconds": round(seconds, 6),
        }
        print(json.dumps(doc, indent=2, default=str), file=ctx.stdout)
    else:
        _print_table(entries, seconds, ctx)
    return status


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the command line ``argv`` (without the program name); return the exit status."""
    ctx = Context(env=os.environ if env is None else env, stdout=sys.stdout, stderr=sys.stderr)
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        handler: Handler = args.handler
        return int(handler(args, ctx))
    except UsageError as e:
        print(str(e), file=ctx.stderr)
        return int(ExitStatus.ERROR)
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("jepsen-lite: interrupted", file=ctx.stderr)
        return int(ExitStatus.INTERRUPTED)
    except Exception as e:
        if ctx.env.get("JEPSEN_LITE_DEBUG") == "1":
            raise
        # A traceback would exit 1, which means "violation" to CI.
        ctx.error(f"internal error: {type(e).__name__}: {e}")
        return int(ExitStatus.ERROR)


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    entrypoint()
