"""`cachenode serve` refuses bad settings with one line and exit 2, before
it binds anything."""

from __future__ import annotations

import pytest

from cachenode.server.main import build_parser, load_config
from cachenode.server.main import main as serve_main

BASE = [
    "serve", "--node-id", "n1", "--listen", "127.0.0.1:0", "--raft-listen", "127.0.0.1:0",
    "--initial-cluster", "n1=127.0.0.1:7001/127.0.0.1:7002", "--data-dir", "/nonexistent/never-created",
]


def test_log_compaction_mb_reaches_the_raft_timing() -> None:
    args = build_parser().parse_args([*BASE, "--log-compaction-mb", "2.5"])
    cfg, *_ = load_config(args, {"CACHENODE_SECRET": "s"})
    assert cfg.timing.log_compaction_bytes == int(2.5 * 1024 * 1024)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_log_compaction_mb_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main([*BASE, "--log-compaction-mb", value], env={"CACHENODE_SECRET": "s"}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cachenode: error: --log-compaction-mb must be positive"]
