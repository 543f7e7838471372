"""User-directed downloads: fill the cache from configured upstream sources, under policy and audit.

    sources.py   the configured sources (``[sources.<id>]``): a reference read by kind, their credentials
    plans.py     what a reference of kind modelcache, huggingface or ollama resolves to: files, digests, shape
    policy.py    what may be fetched: allowed sources, every redirect hop, no internal addresses (SSRF)
    requests.py  the request's life: ask, approve, reject, cancel; each state change audited and logged
    transfer.py  one HTTP transfer: redirects followed by hand, resumed with Range + If-Range
    worker.py    the jobs a process runs: claimed from PostgreSQL, streamed through the import road
    pull_through.py  a /v2 or /hf miss made a request (models.download.pull_through), answered once filled

Kinds: ``http`` (one file), ``modelcache``, ``huggingface`` and ``ollama`` (multi-file artifacts, staged
in ``tmp/downloads/<job>/`` and imported as one).
"""
