"""cachectl: the command-line tool of cachenode (entry point: :func:`cachectl.main.main`).

One module per noun: :mod:`cachectl.kv` (get/set/del/cas/incr/ttl/mget/mset),
:mod:`cachectl.cluster` (status), :mod:`cachectl.local` (a cluster on this
machine), :mod:`cachectl.output` (tables, JSON, the one-line errors).  It talks
to the cluster only through the public client, :mod:`cachenode.client`.
"""
