"""The node's and the client's hot modules, compiled to C with mypyc.

Who calls what:

* ``make install`` (so ``make run``, ``make test``, ``make bench``) runs
  ``python -m cachenode.native build``: mypyc turns every module in
  :data:`COMPILED` into a C extension placed beside its ``.py``, plus one
  shared library (``cachenode/_native__mypyc*.so``) holding their code.
  Python imports an extension before a ``.py`` of the same name.
* ``cachenode/__init__.py`` calls :func:`check_fresh` at import: a ``.py``
  edited after it was compiled would otherwise be silently ignored, so the
  import fails and says what to run.  ``CACHENODE_NATIVE_CHECK=0`` skips the
  check; the Makefile sets it to run this module's own commands.
* The benchmark records :func:`status` with its results.

Without a C compiler the build prints why and everything runs interpreted:
the same source, the same tests, about 10 % more CPU per write (see
``docs/benchmarks-history.md``, session 12).  ``python -m cachenode.native clean``
removes the extensions, ``... status`` lists what runs compiled.

The compiled modules are the per-request and per-entry paths: Raft driver,
transport, journal, storage, state machine, the gRPC handler, the client.
Compiled code checks annotated types at run time (a ``str`` passed where
``bytes`` is declared raises ``TypeError``) and compiled classes cannot be
monkeypatched; modules whose classes must subclass an untyped library class
(pysyncobj's ``SyncObj``: :mod:`cachenode.raft._syncobj`) stay interpreted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ._compiled import (
    COMPILED,
    GROUP,
    PACKAGE_DIR,
    built,
    check_fresh,
    clean,
    shadowed,
    source,
    status,
)


def build(build_dir: Path) -> None:
    """Compile :data:`COMPILED` in place (the caller's thread; minutes of CPU)."""
    from mypyc.build import mypycify
    from rich.console import Console
    from setuptools import Distribution

    console = Console(stderr=True)
    os.chdir(PACKAGE_DIR.parent)  # mypy reads pyproject.toml's [tool.mypy] from here
    paths = [str(source(m).relative_to(PACKAGE_DIR.parent)) for m in COMPILED]
    t0 = time.monotonic()
    with console.status(f"mypyc: type-checking and translating {len(paths)} modules to C"):
        extensions = mypycify(paths, group_name=GROUP, target_dir=str(build_dir / "c"))
    with console.status("mypyc: compiling the C code (about a minute on 2 cores)"):
        dist = Distribution({"name": "cachenode-native", "ext_modules": extensions})
        dist.verbose = 0  # gcc's command lines are noise here; its errors still show
        cmd = dist.get_command_obj("build_ext")
        cmd.inplace = True
        cmd.build_temp = str(build_dir / "obj")
        cmd.parallel = os.cpu_count() or 1
        dist.run_command("build_ext")
    # build_ext copies each extension with the time of its build-dir copy; a
    # shim whose C did not change keeps an old time, which check_fresh would
    # take for stale.  Every listed module was just compiled from its current
    # source; an extension of a module no longer listed keeps its time, so
    # check_fresh still refuses it once its source has changed.
    now = time.time()
    sources = {source(m) for m in COMPILED}
    for ext in built():
        if shadowed(ext) in sources:
            os.utime(ext, (now, now))
    console.print(f"mypyc: {len(paths)} modules compiled in {time.monotonic() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cachenode.native", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the hot modules with mypyc, in place")
    b.add_argument("--build-dir", type=Path, default=PACKAGE_DIR.parent / "build" / "native")
    sub.add_parser("clean", help="remove the compiled modules (run interpreted)")
    sub.add_parser("status", help="print which modules run compiled")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        clean()  # never leave a half-new set: old extensions of edited modules would be used
        build(args.build_dir)
        check_fresh()
    elif args.cmd == "clean":
        print(f"removed {clean()} compiled files; cachenode runs interpreted")
    else:
        print(status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
