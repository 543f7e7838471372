"""User-directed downloads: fill the cache from configured upstream sources, under policy and audit.

    sources.py   the configured sources (``[sources.<id>]``): where a reference points, their credentials
    policy.py    what may be fetched: allowed sources, every redirect hop, no internal addresses (SSRF)
    requests.py  the request's life: ask, approve, reject, cancel; each state change audited and logged
    transfer.py  one HTTP transfer: redirects followed by hand, resumed with Range + If-Range
    worker.py    the jobs a process runs: claimed from PostgreSQL, streamed through the import road

This version knows the ``http`` kind; ``huggingface``, ``ollama`` and ``modelcache`` come later.
"""
