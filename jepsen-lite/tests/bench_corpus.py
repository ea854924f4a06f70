"""Time the whole Porcupine corpus through the real CLI entry point.

Usage: (from the repository root) PYTHONPATH=jepsen-lite .venv/bin/python jepsen-lite/tests/bench_corpus.py

Prints one line per format and the total; the target is under 10 s on 2 cores.
(Not a pytest module: wall time depends on the machine.)
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from jepsen_lite.cli import main

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "porcupine"


def run(fmt: str, files: list[Path], *extra: str) -> tuple[float, dict[str, Any]]:
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        main(["check", "--format", fmt, "--json", *extra, *map(str, files)], env={})
    return time.perf_counter() - t0, json.loads(out.getvalue())


def main_() -> int:
    expected = {
        f"etcd_{int(n):03d}.log": v == "true"
        for n, v in (
            line.split() for line in (CORPUS / "etcd/expected.txt").read_text().splitlines()
        )
    }
    etcd = [CORPUS / "etcd" / name for name in sorted(expected)]
    kv = sorted((CORPUS / "kv").glob("*.txt"))
    t_etcd, doc_etcd = run("jepsen-etcd-log", etcd)
    t_kv, doc_kv = run("jepsen-edn-kv", kv)
    t_all, _ = run("jepsen-edn-kv", kv, "--all-keys")
    wrong = [f["file"] for f in doc_etcd["files"] if f["valid"] != expected[Path(f["file"]).name]]
    wrong += [f["file"] for f in doc_kv["files"] if f["valid"] != f["file"].endswith("-ok.txt")]
    print(f"etcd: {len(etcd)} histories in {t_etcd:.2f} s")
    print(f"kv:   {len(kv)} histories in {t_kv:.2f} s (with --all-keys: {t_all:.2f} s)")
    print(f"corpus total: {t_etcd + t_kv:.2f} s; verdict mismatches: {len(wrong)} {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main_())
