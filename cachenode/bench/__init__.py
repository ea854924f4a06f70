"""Benchmark tooling: ``cachectl bench`` measures cachenode (and etcd, Redis) on this machine.

* :mod:`cachenode.bench.loadgen` -- the load-generator process and the workloads;
* :mod:`cachenode.bench.targets` -- one driver protocol, one driver per system;
* :mod:`cachenode.bench.systems` -- etcd and Redis as local processes, /proc readings;
* :mod:`cachenode.bench.runner` -- one measured phase: generators, CPU, peak RSS;
* :mod:`cachenode.bench.report` -- medians, ratios, goals, JSON, rich and Markdown tables.

The command itself (cluster lifecycle, rounds, failover, scaling) is
``cli/cachectl/bench.py``.  See docs/benchmarks.md for what every number means.
"""

from cachenode.bench.loadgen import WORKLOADS, LatencyHistogram, LoadResult, LoadSpec, Workload
from cachenode.bench.report import build_document, markdown, rich_tables, summarize
from cachenode.bench.runner import PhaseResult, run_phase, run_prefill
from cachenode.bench.systems import BenchError, EtcdCluster, RedisServer
from cachenode.bench.targets import Driver, TargetSpec

__all__ = [
    "WORKLOADS",
    "BenchError",
    "Driver",
    "EtcdCluster",
    "LatencyHistogram",
    "LoadResult",
    "LoadSpec",
    "PhaseResult",
    "RedisServer",
    "TargetSpec",
    "Workload",
    "build_document",
    "markdown",
    "rich_tables",
    "run_phase",
    "run_prefill",
    "summarize",
]
