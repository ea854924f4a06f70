"""Benchmark tooling: ``cachectl bench`` measures cachenode (and etcd, Redis) on this machine.

* :mod:`cachenode.bench.loadgen` -- the load-generator process and the workloads;
* :mod:`cachenode.bench.targets` -- one driver protocol, one driver per system;
* :mod:`cachenode.bench.systems` -- etcd and Redis as local processes, /proc readings;
* :mod:`cachenode.bench.runner` -- one measured phase: generators, CPU, peak RSS;
* :mod:`cachenode.bench.move` -- the replica-move phase (fill a shard, move it to a new node);
* :mod:`cachenode.bench.report` -- medians, ratios, goals, JSON, rich and Markdown tables.

The command itself (cluster lifecycle, rounds, failover, replica move, scaling) is
``cli/cachectl/bench.py``.  See docs/benchmarks.md for what every number means.
"""

from __future__ import annotations

import importlib
from typing import Any

# Exported lazily: ``python -m cachenode.bench.loadgen`` imports this package
# first, and must not find its own module already imported (runpy warns).
_EXPORTS = {
    "WORKLOADS": "loadgen",
    "LatencyHistogram": "loadgen",
    "LoadResult": "loadgen",
    "LoadSpec": "loadgen",
    "Workload": "loadgen",
    "build_document": "report",
    "markdown": "report",
    "rich_tables": "report",
    "summarize": "report",
    "PhaseResult": "runner",
    "run_phase": "runner",
    "run_prefill": "runner",
    "BenchError": "systems",
    "EtcdCluster": "systems",
    "RedisServer": "systems",
    "Driver": "targets",
    "TargetSpec": "targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cachenode.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cachenode.bench.{module}"), name)
