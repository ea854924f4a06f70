"""The mypyc build of the hot modules: what runs compiled, and the guard
that refuses a compiled module older than its source."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachenode import _compiled
from cachenode._compiled import COMPILED, StaleBuild, built, check_fresh, status

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def fake_package(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for name in ("a", "sub/b"):
        (pkg / f"{name}.py").write_text("x = 1\n")
        (pkg / f"{name}{SUFFIX}").write_bytes(b"\x7fELF not really")
    return pkg


def test_a_build_newer_than_its_sources_passes(tmp_path: Path) -> None:
    pkg = fake_package(tmp_path)
    for ext in built(pkg):
        os.utime(ext, (ext.stat().st_mtime + 10,) * 2)
    check_fresh(pkg)


def test_a_source_edited_after_the_build_is_refused_and_named(tmp_path: Path) -> None:
    pkg = fake_package(tmp_path)
    b = pkg / "sub" / "b.py"
    ext = pkg / "sub" / f"b{SUFFIX}"
    os.utime(b, (ext.stat().st_mtime + 10,) * 2)
    with pytest.raises(StaleBuild, match=r"pkg/sub/b\.py changed after it was compiled.*make native"):
        check_fresh(pkg)


def test_an_extension_without_a_source_is_not_a_stale_build(tmp_path: Path) -> None:
    """The shared library (``_native__mypyc...so``) has no ``.py``."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / f"_native__mypyc{SUFFIX}").write_bytes(b"")
    check_fresh(pkg)
    assert [p.name for p in built(pkg)] == [f"_native__mypyc{SUFFIX}"]


def test_importing_cachenode_with_a_stale_build_fails_with_what_to_run(tmp_path: Path) -> None:
    """In a copy of the package (never the real one: other processes import it)."""
    import shutil

    copy = tmp_path / "cachenode"
    shutil.copytree(_compiled.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (copy / "raft" / f"host{SUFFIX}").write_bytes(b"")
    os.utime(copy / "raft" / f"host{SUFFIX}", (1, 1))  # older than host.py
    out = subprocess.run(
        [sys.executable, "-c", "import cachenode"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60,
    )
    assert out.returncode != 0
    assert "cachenode/raft/host.py changed after it was compiled" in out.stderr
    again = subprocess.run(
        [sys.executable, "-c", "import cachenode"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "CACHENODE_NATIVE_CHECK": "0"}, timeout=60,
    )
    assert again.returncode == 0, again.stderr


@pytest.mark.skipif(
    os.environ.get("CACHENODE_EXPECT_NATIVE") != "compiled",
    reason="only where the build compiled (make test sets CACHENODE_EXPECT_NATIVE)",
)
def test_every_hot_module_runs_compiled_where_the_build_compiled() -> None:
    """``make test`` says whether its build compiled; if it did, every
    module in COMPILED must load as an extension, in a fresh process too."""
    assert status() == {"compiled": len(COMPILED), "of": len(COMPILED), "modules": list(COMPILED)}
    out = subprocess.run(
        [sys.executable, "-m", "cachenode.native", "status"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and f"'compiled': {len(COMPILED)}" in out.stdout, out.stderr
