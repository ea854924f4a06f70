"""The generated stubs are never stale: regenerating them gives identical files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "proto"),
         f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         f"--mypy_out={tmp_path}", f"--mypy_grpc_out={tmp_path}",
         str(ROOT / "proto/cachenode/v1/cache.proto")],
        capture_output=True, text=True, env=env,
    )
    assert r.returncode == 0, r.stderr
    for name in ("cache_pb2.py", "cache_pb2_grpc.py", "cache_pb2.pyi", "cache_pb2_grpc.pyi"):
        fresh = (tmp_path / "cachenode/v1" / name).read_text()
        current = (ROOT / "cachenode/v1" / name).read_text()
        assert fresh == current, f"cachenode/v1/{name} is stale: run `make proto`"


def test_public_services_exist() -> None:
    from cachenode.v1 import cache_pb2_grpc

    for svc in ("CacheStub", "AdminStub", "CacheServicer", "AdminServicer"):
        assert hasattr(cache_pb2_grpc, svc)
