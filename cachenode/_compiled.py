"""Which modules run compiled (mypyc), and whether their builds are current.

Imported by ``cachenode/__init__.py`` (so by every process, main thread, at
import) to refuse extensions older than their source; the build itself is
:mod:`cachenode.native`."""

from __future__ import annotations

import importlib
import importlib.machinery
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
GROUP = "cachenode._native"
"""The shared library's module name: inside the package, so an editable
install finds it wherever the process's working directory is."""

COMPILED: tuple[str, ...] = (
    "cachenode._errors",
    "cachenode._value",
    "cachenode._types",
    "cachenode.storage.base",
    "cachenode.storage.wal",
    "cachenode.storage.lmdb_store",
    "cachenode.fsm.commands",
    "cachenode.fsm.codec",
    "cachenode.fsm.machine",
    "cachenode.raft.journal",
    "cachenode.raft.mux",
    "cachenode.raft.group",
    "cachenode.raft.host",
    "cachenode._clock",
    "cachenode.server.validation",
    "cachenode.server.status",
    "cachenode.server.cache_service",
    "cachenode.client._status",
    "cachenode.client._convert",
    "cachenode.client._results",
    "cachenode.client._call",
    "cachenode.client.route_table",
    "cachenode.client._coalesce",
    "cachenode.client._sync_coalesce",
)
"""Not the client's public classes (``client.sync_client``,
``client.async_client``) nor the request builders that validate what they
are given (``client._core``): compiled functions check argument types on
entry, and a caller's wrong type must reach the client's own validation,
which answers ``InvalidArgument`` saying what was wrong."""


def source(module: str) -> Path:
    return PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def shadowed(ext: Path) -> Path:
    """The ``.py`` that the extension file ``ext`` would shadow (any ABI suffix)."""
    return ext.with_name(ext.name.split(".", 1)[0] + ".py")


def built(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Every extension file in the package, of any build (listed or not)."""
    return sorted(
        {ext for suffix in importlib.machinery.EXTENSION_SUFFIXES for ext in package_dir.rglob("*" + suffix)}
    )


class StaleBuild(ImportError):
    """A compiled module is older than its source."""


def check_fresh(package_dir: Path = PACKAGE_DIR) -> None:
    """Raise :class:`StaleBuild` if any extension in the package is older
    than its ``.py``.  Called once per process, at ``import cachenode`` (main
    thread); lists the package's extensions and ``stat``s them."""
    stale = []
    for ext in built(package_dir):
        py = shadowed(ext)
        if py.exists() and py.stat().st_mtime > ext.stat().st_mtime:
            stale.append(str(py.relative_to(package_dir.parent)))
    if stale:
        raise StaleBuild(
            f"{', '.join(stale)} changed after it was compiled, so the old compiled code would run: "
            "run `make native` to recompile, or `make clean-native` to run interpreted"
        )


def status() -> dict[str, object]:
    """Which of :data:`COMPILED` this process runs compiled (imports them)."""
    compiled = []
    for module in COMPILED:
        origin = getattr(importlib.import_module(module), "__file__", "") or ""
        if not origin.endswith(".py"):
            compiled.append(module)
    return {"compiled": len(compiled), "of": len(COMPILED), "modules": compiled}


def clean() -> int:
    """Remove every extension in the package; return how many."""
    files = built()
    for ext in files:
        ext.unlink()
    return len(files)
