"""cachenode: a linearizable, durable, sharded cache on Raft (pysyncobj) and LMDB.

Public surface: :mod:`cachenode.client` (``CacheClient``, ``AsyncCacheClient``),
the generated stubs in :mod:`cachenode.v1`, and the ``cachenode``/``cachectl``
commands. Everything else is internal.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]

import os as _os

if _os.environ.get("CACHENODE_NATIVE_CHECK", "1") != "0":
    # Compiled extensions shadow their .py: refuse to run code older than its source.
    from ._compiled import check_fresh as _check_fresh

    _check_fresh()
