"""cachenode: a linearizable, durable, sharded cache on Raft (pysyncobj) and LMDB.

Public surface: :mod:`cachenode.client` (``CacheClient``, ``AsyncCacheClient``),
the generated stubs in :mod:`cachenode.v1`, and the ``cachenode``/``cachectl``
commands. Everything else is internal.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
