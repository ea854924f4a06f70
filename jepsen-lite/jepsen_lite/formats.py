"""History file formats, all parsed to a list of :class:`~jepsen_lite.history.Op`.

* ``jepsen-lite``     -- our JSONL (see :mod:`jepsen_lite.history`); the model is the
  header's ``workload`` (register|counter|set|ttl|kv, default register), with
  optional ``model_params``; keys come from each event's ``key``.
* ``jepsen-etcd-log`` -- Jepsen's log of a single cas register, lines like
  ``INFO  jepsen.util - 3	:invoke	:cas	[1 4]``.  A ``:fail`` carrying
  ``:timed-out`` is indeterminate and becomes ``info``; an ``:info`` completion's
  value (``:timed-out``) is kept as its error.  Other log lines are skipped.
  Model: register, one key.
* ``jepsen-edn-kv``   -- one EDN map per line, e.g.
  ``{:process 0, :type :invoke, :f :append, :key "0", :value "x 0 0 y"}``.
  Model: kv, partitioned by key.

Neither Jepsen format carries timestamps, so an event's time is its ordinal: the
file order *is* the real-time order Jepsen observed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from jepsen_lite.history import OP_TYPES, HistoryError, Op, parse_history_lines

__all__ = ["FORMATS", "FormatError", "ParsedHistory", "parse_edn", "parse_file", "parse_lines"]


class FormatError(ValueError):
    """The file is not a valid history in the requested format."""


@dataclass(frozen=True)
class ParsedHistory:
    """Events of one file plus the model (name and parameters) it should be checked with."""

    ops: list[Op]
    model: str
    model_params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------- jepsen-lite

WORKLOAD_MODELS: Final = {
    "register": "register",
    "cas-register": "register",
    "counter": "counter",
    "set": "set",
    "ttl": "ttl",
    "kv": "kv",
}


def _parse_jepsen_lite(lines: Iterable[str], name: str) -> ParsedHistory:
    try:
        hist = parse_history_lines(lines, name)
    except HistoryError as e:
        raise FormatError(str(e)) from None
    workload = hist.workload or "register"
    model = WORKLOAD_MODELS.get(workload)
    if model is None:
        raise FormatError(f"{name}: unknown workload {workload!r}")
    params = hist.meta.get("model_params") or {}
    if not isinstance(params, dict):
        raise FormatError(f"{name}: header 'model_params' must be an object")
    return ParsedHistory(hist.ops, model, params, hist.meta)


# ------------------------------------------------------------------- jepsen-etcd-log

_ETCD_PREFIX = re.compile(r"jepsen\.util\s+-\s+(\d+)\s+:")
_ETCD_LINE = re.compile(
    r"jepsen\.util\s+-\s+(?P<proc>\d+)\s+:(?P<type>invoke|ok|fail|info)\s+"
    r":(?P<f>[\w-]+)\s+(?P<value>.*?)\s*$"
)
_ETCD_VECTOR = re.compile(r"^\[\s*(-?\d+|nil)\s+(-?\d+|nil)\s*\]$")


def _etcd_value(text: str) -> tuple[Any, str | None]:
    """(value, error keyword) of an etcd log value field."""
    if text == "nil":
        return None, None
    if text.startswith(":"):
        return None, text[1:]
    if re.fullmatch(r"-?\d+", text):
        return int(text), None
    m = _ETCD_VECTOR.match(text)
    if m:
        return [None if g == "nil" else int(g) for g in m.groups()], None
    raise ValueError(f"unrecognised value {text!r}")


def _parse_etcd(lines: Iterable[str], name: str) -> ParsedHistory:
    ops: list[Op] = []
    for lineno, line in enumerate(lines, 1):
        if not _ETCD_PREFIX.search(line):
            continue  # ordinary log output around the history
        m = _ETCD_LINE.search(line)
        try:
            if m is None:
                raise ValueError("not a Jepsen operation line")
            value, error = _etcd_value(m["value"])
        except ValueError as e:
            raise FormatError(f"{name}:{lineno}: {e}: {line.strip()!r}") from None
        typ = m["type"]
        if typ == "fail" and error == "timed-out":
            typ = "info"  # a timed-out op may still have happened
        n = len(ops)
        ops.append(Op(n, n, int(m["proc"]), typ, m["f"], None, value, None, error))  # type: ignore[arg-type]
    if not ops:
        raise FormatError(f"{name}: no Jepsen operation lines found")
    return ParsedHistory(ops, "register")


# --------------------------------------------------------------------- jepsen-edn-kv


class _EdnReader:
    """Just enough EDN for flat maps: nil, booleans, numbers, strings, keywords
    (returned as their name without the colon), vectors and lists (as lists)."""

    _DELIMS: Final = frozenset(' \t\r\n,{}[]()"')

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def _ws(self) -> None:
        s, i = self.s, self.i
        while i < len(s) and s[i] in " \t\r\n,":
            i += 1
        self.i = i

    def value(self) -> Any:
        self._ws()
        if self.i >= len(self.s):
            raise ValueError("unexpected end of input")
        c = self.s[self.i]
        if c == "{":
            return self._map()
        if c in "[(":
            return self._seq("]" if c == "[" else ")")
        if c == '"':
            return self._string()
        return self._atom()

    def _map(self) -> dict[Any, Any]:
        self.i += 1
        out: dict[Any, Any] = {}
        while True:
            self._ws()
            if self.i >= len(self.s):
                raise ValueError("unterminated map")
            if self.s[self.i] == "}":
                self.i += 1
                return out
            k = self.value()
            if isinstance(k, list):
                raise ValueError("map key must be atomic")
            out[k] = self.value()

    def _seq(self, close: str) -> list[Any]:
        self.i += 1
        out: list[Any] = []
        while True:
            self._ws()
            if self.i >= len(self.s):
                raise ValueError("unterminated vector")
            if self.s[self.i] == close:
                self.i += 1
                return out
            out.append(self.value())

    _ESC: Final = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}

    def _string(self) -> str:
        s, i = self.s, self.i + 1
        buf: list[str] = []
        while i < len(s):
            c = s[i]
            if c == '"':
                self.i = i + 1
                return "".join(buf)
            if c == "\\":
                i += 1
                if i >= len(s) or s[i] not in self._ESC:
                    raise ValueError("bad string escape")
                buf.append(self._ESC[s[i]])
            else:
                buf.append(c)
            i += 1
        raise ValueError("unterminated string")

    def _atom(self) -> Any:
        s, i = self.s, self.i
        j = i
        while j < len(s) and s[j] not in self._DELIMS:
            j += 1
        tok = s[i:j]
        self.i = j
        if not tok:
            raise ValueError(f"unexpected character {s[i]!r}")
        if tok == "nil":
            return None
        if tok in ("true", "false"):
            return tok == "true"
        if tok.startswith(":") and len(tok) > 1:
            return tok[1:]
        try:
            return int(tok)
        except ValueError:
            pass
        try:
            return float(tok)
        except ValueError:
            raise ValueError(f"unsupported token {tok!r}") from None

    def done(self) -> None:
        self._ws()
        if self.i != len(self.s):
            raise ValueError(f"trailing text at column {self.i + 1}")


def parse_edn(text: str) -> Any:
    """Parse one EDN value of the restricted shape described in :class:`_EdnReader`."""
    r = _EdnReader(text)
    v = r.value()
    r.done()
    return v


def _parse_edn_kv(lines: Iterable[str], name: str) -> ParsedHistory:
    ops: list[Op] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = parse_edn(line)
            if not isinstance(d, dict):
                raise ValueError("expected a map")
            proc, typ, f = d["process"], d["type"], d["f"]
            if typ not in OP_TYPES:
                raise ValueError(f"bad :type {typ!r}")
            if not isinstance(proc, int) and proc != "nemesis":
                raise ValueError(f"bad :process {proc!r}")
        except (ValueError, KeyError) as e:
            raise FormatError(f"{name}:{lineno}: {e}") from None
        n = len(ops)
        ops.append(Op(n, n, proc, typ, str(f), d.get("key"), d.get("value"), None, d.get("error")))
    if not ops:
        raise FormatError(f"{name}: no operations found")
    return ParsedHistory(ops, "kv")


# ------------------------------------------------------------------------- registry

FORMATS: Final[dict[str, Callable[[Iterable[str], str], ParsedHistory]]] = {
    "jepsen-lite": _parse_jepsen_lite,
    "jepsen-etcd-log": _parse_etcd,
    "jepsen-edn-kv": _parse_edn_kv,
}


def parse_lines(lines: Iterable[str], fmt: str, name: str = "<input>") -> ParsedHistory:
    """Parse lines of text in format ``fmt``.  Raises FormatError."""
    try:
        parser = FORMATS[fmt]
    except KeyError:
        raise FormatError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}") from None
    return parser(lines, name)


def parse_file(path: str | os.PathLike[str], fmt: str) -> ParsedHistory:
    """Read and parse a history file.  Raises OSError or FormatError."""
    with open(path, encoding="utf-8") as fh:
        try:
            return parse_lines(fh, fmt, str(path))
        except UnicodeDecodeError as e:
            raise FormatError(f"{path}: not UTF-8 text ({e.reason})") from None
