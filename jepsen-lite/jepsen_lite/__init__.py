"""jepsen-lite: a Jepsen-style linearizability harness for cachenode.

It treats the system under test as a black box: it only reads histories of
client operations (invoke/ok/fail/info events) and checks them against a
sequential model with the Wing–Gong–Lowe search.  Nothing here imports cachenode.

Public surface (the cluster runner builds on these):

* :mod:`jepsen_lite.history` -- :class:`Op`, JSONL :class:`HistoryWriter` /
  :func:`read_history`, :func:`pair_operations` (Jepsen's info/fail rules);
* :mod:`jepsen_lite.checker` -- :func:`check_history`, :class:`CheckResult`, models;
* :mod:`jepsen_lite.formats` -- parsers for our JSONL and Jepsen's etcd/EDN logs;
* :mod:`jepsen_lite.report` -- :func:`write_timeline` (self-contained HTML).
"""

from jepsen_lite.checker import (
    CheckResult,
    KeyResult,
    WorkerPool,
    check_history,
    check_operations,
)
from jepsen_lite.checker.models import get_model
from jepsen_lite.formats import FormatError, ParsedHistory, parse_file
from jepsen_lite.history import (
    History,
    HistoryError,
    HistoryWriter,
    Op,
    Operation,
    pair_operations,
    read_history,
)
from jepsen_lite.report import write_timeline

__version__ = "0.1.0"

__all__ = [
    "CheckResult",
    "FormatError",
    "History",
    "HistoryError",
    "HistoryWriter",
    "KeyResult",
    "Op",
    "Operation",
    "ParsedHistory",
    "WorkerPool",
    "__version__",
    "check_history",
    "check_operations",
    "get_model",
    "pair_operations",
    "parse_file",
    "read_history",
    "write_timeline",
]
