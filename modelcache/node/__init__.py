"""The node side: the pull client (``pull.py``), the runtimes a node installs into (``runtimes.py``) and the
node agent that takes load requests from the cache (``agent.py``)."""
