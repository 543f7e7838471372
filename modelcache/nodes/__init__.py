"""The node load workflow, server side (spec "Node Load Workflow", issue 11).

    registry.py    registration (a node token bound to the node id), heartbeats, availability reports,
                   load requests and their states, the loading timeout
    selection.py   which version, artifact and node a task should use, and whether it must load first
    placements.py  which versions a labelled group of nodes should hold, kept true by reconciling
    bell.py        wakes the long-polls of nodes waiting for load requests (one LISTEN per process)

A node is *ready* while it has been heard from (registration or heartbeat) within
``nodes.heartbeat_timeout``, else *stale*. Its availability per model version is what it
reported last: ``available``, ``loading``, ``failed`` or ``evicted``. A load request moves
``pending`` → ``loading`` (the node acknowledged it, or reported ``loading``) → ``available`` or
``failed`` (from the node's reports, or when it stays silent past ``nodes.loading_timeout``).
"""
