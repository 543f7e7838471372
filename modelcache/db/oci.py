"""Queries of the OCI pull API (``/v2/``): the rows its in-memory index loads, and the made manifests.

A repository ``<namespace>/<model>`` is a model whose lower-cased name is
``<model>`` and whose lower-cased vendor is ``<namespace>`` (``library`` for
none); its tags are the versions that have an ``ollama`` or ``gguf`` artifact.
The manifests made for those artifacts (``modelcache/manifests.py``) and
their blobs are the artifact's ``.ollama/...`` files (paths an import can
never produce: imports skip hidden names), written here, and only those.
The server keeps what these queries return in memory
(``server/oci/index.py``): they run at start, after a reconnection, and for
the models a change notification names, never per request.
"""

from __future__ import annotations

import uuid
from typing import Iterable

from ..formats import DOCKER_MANIFEST_V2
from ..formats.ollama import OCI_MANIFEST
from ..store import Blob
from . import blobs
from .pool import Connection

OCI_TYPES = ["ollama", "gguf"]
MANIFEST_TYPES = [DOCKER_MANIFEST_V2, OCI_MANIFEST]
SYNTHESISED_PREFIX = ".ollama/"
DOCKER_PATH = ".ollama/docker-manifest.json"  # a gguf artifact's; an ollama artifact's is its own file
OCI_PATH = ".ollama/oci-manifest.json"
SERVABLE = ["promoted", "staged"]


async def oci_artifact(conn: Connection, artifact_id: uuid.UUID) -> dict | None:
    """An artifact with its version's metadata (what its manifests are made from); None if gone."""
    cur = await conn.execute(
        """
        SELECT a.id, a.artifact_type, a.sha256, a.state, v.capabilities, v.default_parameters
          FROM model_artifacts a JOIN model_versions v ON v.id = a.model_version_id
         WHERE a.id = %s
        """,
        (artifact_id,),
    )
    return await cur.fetchone()


async def version_oci_artifacts(conn: Connection, version_id: uuid.UUID) -> list[uuid.UUID]:
    """A version's ollama and gguf artifacts, whose manifests its capabilities and parameters go into."""
    cur = await conn.execute(
        "SELECT id FROM model_artifacts WHERE model_version_id = %s AND artifact_type = ANY(%s) ORDER BY id",
        (version_id, OCI_TYPES),
    )
    return [r["id"] for r in await cur.fetchall()]


async def artifacts_lacking_manifests(conn: Connection) -> list[uuid.UUID]:
    """Servable ollama and gguf artifacts without their made manifests, or with a made blob not present
    (a database from before manifests were made at import, or one whose made blobs were evicted)."""
    cur = await conn.execute(
        """
        SELECT a.id FROM model_artifacts a
         WHERE a.artifact_type = ANY(%(types)s) AND a.state = ANY(%(servable)s)
           AND (NOT EXISTS (SELECT 1 FROM artifact_files f WHERE f.artifact_id = a.id AND f.path = %(oci)s)
                OR a.artifact_type = 'gguf'
                   AND NOT EXISTS (SELECT 1 FROM artifact_files f WHERE f.artifact_id = a.id AND f.path = %(docker)s)
                OR EXISTS (SELECT 1 FROM artifact_files f JOIN blobs b ON b.digest = f.blob_digest
                            WHERE f.artifact_id = a.id AND starts_with(f.path, %(prefix)s)
                              AND b.state <> 'present'))
         ORDER BY a.created_at, a.id
        """,
        {"types": OCI_TYPES, "servable": SERVABLE, "oci": OCI_PATH, "docker": DOCKER_PATH,
         "prefix": SYNTHESISED_PREFIX},
    )
    return [r["id"] for r in await cur.fetchall()]


_INDEX_ROWS = """
    SELECT m.id AS model_id, m.name, m.vendor, v.version, a.id AS artifact_id, a.artifact_type, a.sha256,
           a.state, a.created_at, d.blob_digest AS docker_digest, o.blob_digest AS oci_digest
      FROM models m
      JOIN model_versions v ON v.model_id = m.id
      JOIN model_artifacts a ON a.model_version_id = v.id
      LEFT JOIN artifact_files d ON d.artifact_id = a.id AND d.path = %(docker)s
      LEFT JOIN artifact_files o ON o.artifact_id = a.id AND o.path = %(oci)s
     WHERE a.artifact_type = ANY(%(types)s)
"""

# a model's artifacts together, newest first
_INDEX_ORDER = " ORDER BY m.id, a.created_at DESC, a.id"


async def index_rows(conn: Connection) -> list[dict]:
    """Every ollama and gguf artifact (any state), with its model, version and made manifests' digests."""
    cur = await conn.execute(_INDEX_ROWS + _INDEX_ORDER, {"docker": DOCKER_PATH, "oci": OCI_PATH, "types": OCI_TYPES})
    return await cur.fetchall()


async def index_rows_holding(conn: Connection, digests: list[str]) -> list[dict]:
    """The rows of :func:`index_rows` for the models with an ollama or gguf artifact holding any of these
    blobs (a change to a blob, a file row or an artifact's state names its blobs)."""
    cur = await conn.execute(
        _INDEX_ROWS
        + """
       AND m.id IN (SELECT v2.model_id
                      FROM artifact_files f2
                      JOIN model_artifacts a2 ON a2.id = f2.artifact_id
                      JOIN model_versions v2 ON v2.id = a2.model_version_id
                     WHERE f2.blob_digest = ANY(%(digests)s) AND a2.artifact_type = ANY(%(types)s))
        """
        + _INDEX_ORDER,
        {"docker": DOCKER_PATH, "oci": OCI_PATH, "types": OCI_TYPES, "digests": digests},
    )
    return await cur.fetchall()


async def artifact_files(conn: Connection, artifact_id: uuid.UUID) -> list[dict]:
    """The artifact's files, with the state of each one's blob."""
    cur = await conn.execute(
        """
        SELECT f.path, f.blob_digest, f.size_bytes, f.media_type, b.state AS blob_state
          FROM artifact_files f LEFT JOIN blobs b ON b.digest = f.blob_digest
         WHERE f.artifact_id = %s ORDER BY f.path
        """,
        (artifact_id,),
    )
    return await cur.fetchall()


async def lock_servable_artifact(conn: Connection, artifact_id: uuid.UUID) -> str | None:
    """Hold the artifact against eviction for this transaction; its state, or None if it is gone."""
    cur = await conn.execute("SELECT state FROM model_artifacts WHERE id = %s FOR SHARE", (artifact_id,))
    row = await cur.fetchone()
    return row["state"] if row else None


async def save_synthesised(conn: Connection, artifact_id: uuid.UUID,
                           files: Iterable[tuple[str, Blob, str]]) -> bool:
    """Make the artifact's ``.ollama/`` files exactly ``files`` (path, blob, media type); True if any changed.

    The blobs must be committed to the store already: a row never points at
    a missing file. A replaced blob stays in the store, held by nothing.
    """
    files = list(files)
    changed = False
    for path, blob, media_type in files:
        if not path.startswith(SYNTHESISED_PREFIX):
            raise ValueError(f"{path} is not a synthesised file")
        await blobs.record_blob(conn, blob.digest, blob.size, blob.xxh3)
        cur = await conn.execute(
            """
            INSERT INTO artifact_files (artifact_id, path, blob_digest, size_bytes, media_type)
            VALUES (%s, %s, %s, %s, %s)
            ON CONFLICT ON CONSTRAINT artifact_files_artifact_id_path_key DO UPDATE
               SET blob_digest = EXCLUDED.blob_digest, size_bytes = EXCLUDED.size_bytes,
                   media_type = EXCLUDED.media_type
             WHERE (artifact_files.blob_digest, artifact_files.media_type)
                   IS DISTINCT FROM (EXCLUDED.blob_digest, EXCLUDED.media_type)
            """,
            (artifact_id, path, str(blob.digest), blob.size, media_type),
        )
        changed |= cur.rowcount > 0
    cur = await conn.execute(
        """
        DELETE FROM artifact_files
         WHERE artifact_id = %s AND starts_with(path, %s) AND NOT path = ANY(%s)
        """,
        (artifact_id, SYNTHESISED_PREFIX, [path for path, _, _ in files]),
    )
    return changed or cur.rowcount > 0
