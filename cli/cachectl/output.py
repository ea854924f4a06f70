"""Everything cachectl prints goes through :class:`Output`.

* results go to stdout: plain lines, rich tables, or (``--json``) one JSON
  document per command on one line;
* errors go to stderr as exactly one line, ``cachectl: error: <what> ...``;
* progress (rich) goes to stderr and only when stderr is a terminal.
"""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table


class ExitStatus(enum.IntEnum):
    """Exit statuses of cachectl (see the ``cachectl.main`` docstring)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    TIMEOUT = 4
    INTERRUPTED = 130


class CliError(Exception):
    """An error cachectl reports itself: one line, one exit status."""

    def __init__(self, message: str, status: ExitStatus = ExitStatus.FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def text_of(value: bytes) -> str:
    """A value for a terminal: UTF-8 when it is, with ``\\xNN`` escapes for other bytes."""
    return value.decode("utf-8", errors="backslashreplace")


def json_value(value: bytes | None) -> dict[str, Any]:
    """``{"value": ...}`` for JSON: the text when UTF-8, else base64 plus ``"encoding"``."""
    if value is None:
        return {"value": None}
    try:
        return {"value": value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"value": base64.b64encode(value).decode("ascii"), "encoding": "base64"}


class Output:
    """Where and how cachectl writes.  Not thread-safe: one command at a time."""

    def __init__(self, stdout: TextIO, stderr: TextIO, env: Mapping[str, str]) -> None:
        self.stdout = stdout
        self.stderr = stderr
        no_color = "NO_COLOR" in env
        width = _int(env.get("COLUMNS"))
        self.console = Console(
            file=stdout,
            no_color=no_color,
            highlight=False,
            width=width if width else (None if _isatty(stdout) else 160),
        )
        self.err_console = Console(file=stderr, no_color=no_color, highlight=False)

    def line(self, text: str = "") -> None:
        """One plain line on stdout (no markup interpretation)."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def json(self, doc: Any) -> None:
        self.stdout.write(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.stdout.flush()

    def table(self, table: Table) -> None:
        self.console.print(table)

    def note(self, text: str) -> None:
        """A one-line remark for humans on stderr (never part of the result)."""
        self.stderr.write(one_line(text) + "\n")
        self.stderr.flush()

    def raw_err(self, text: str) -> None:
        """Verbatim text on stderr (log tails, tracebacks in debug mode)."""
        self.stderr.write(text if text.endswith("\n") else text + "\n")
        self.stderr.flush()

    def error(self, message: str) -> None:
        """The one error line: ``cachectl: error: ...``."""
        self.stderr.write(f"cachectl: error: {one_line(message)}\n")
        self.stderr.flush()

    @property
    def interactive(self) -> bool:
        return _isatty(self.stderr)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None
