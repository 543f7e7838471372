"""Queries of the Hugging Face mirror: safetensors artifacts seen as repos and revisions.

A model ``vendor/name`` is a repo; each of its safetensors artifacts is a
revision (named by its version), and its ``artifact_files`` are the
revision's files. The server keeps the result in memory
(``server/hf/index.py``); these queries run at start, after a reconnection,
and for the models a change notification names.
"""

from __future__ import annotations

from .pool import Connection

_REVISION_FILES = """
    SELECT m.id AS model_id, m.vendor, m.name, v.version, a.id AS artifact_id, a.sha256, a.state,
           a.created_at, f.path, f.blob_digest, f.size_bytes
      FROM models m
      JOIN model_versions v ON v.model_id = m.id
      JOIN model_artifacts a ON a.model_version_id = v.id
      JOIN artifact_files f ON f.artifact_id = a.id
     WHERE a.artifact_type = 'safetensors'
"""

# newest version first, then newest artifact of a version; a revision's files in path order
_ORDER = " ORDER BY m.id, v.created_at DESC, v.id, a.created_at DESC, a.id, f.path"


async def revision_files(conn: Connection) -> list[dict]:
    """Every file of every safetensors artifact, whatever its state, one row per file."""
    cur = await conn.execute(_REVISION_FILES + _ORDER)
    return await cur.fetchall()


async def revision_files_holding(conn: Connection, digests: list[str]) -> list[dict]:
    """The rows of :func:`revision_files` for the models that have a safetensors artifact holding
    any of these blobs (a change to a blob, a file row or an artifact's state names its blobs)."""
    cur = await conn.execute(
        _REVISION_FILES
        + """
       AND m.id IN (SELECT v2.model_id
                      FROM artifact_files f2
                      JOIN model_artifacts a2 ON a2.id = f2.artifact_id
                      JOIN model_versions v2 ON v2.id = a2.model_version_id
                     WHERE f2.blob_digest = ANY(%s) AND a2.artifact_type = 'safetensors')
        """
        + _ORDER,
        (digests,),
    )
    return await cur.fetchall()
