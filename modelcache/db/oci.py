"""Queries of the OCI pull API (``/v2/``): repositories, tags, manifests, and the blobs made for them.

A repository ``<namespace>/<model>`` is a model whose lower-cased name is
``<model>`` and whose lower-cased vendor is ``<namespace>`` (``library`` for
none); its tags are the versions that have an ``ollama`` or ``gguf`` artifact.
Files an artifact gains when its Ollama manifest is made (``.ollama/...``
paths, which an import can never produce: imports skip hidden names) are
written here, and only those.
"""

from __future__ import annotations

import uuid
from typing import Iterable

from ..digest import Digest
from ..formats import DOCKER_MANIFEST_V2
from ..formats.ollama import OCI_MANIFEST
from ..store import Blob
from . import blobs
from .pool import Connection

OCI_TYPES = ["ollama", "gguf"]
MANIFEST_TYPES = [DOCKER_MANIFEST_V2, OCI_MANIFEST]
SYNTHESISED_PREFIX = ".ollama/"


async def repository_models(conn: Connection, namespace: str, model: str) -> list[dict]:
    """The models a repository name matches: one, none, or (names differing in case only) several."""
    cur = await conn.execute(
        """
        SELECT id, name, vendor FROM models
         WHERE lower(name) = %s AND coalesce(lower(vendor), 'library') = %s
         ORDER BY created_at, id
        """,
        (model, namespace),
    )
    return await cur.fetchall()


async def version_artifacts(conn: Connection, model_id: uuid.UUID, version: str) -> list[dict]:
    """A version's ollama and gguf artifacts (any state), with the version's metadata."""
    cur = await conn.execute(
        """
        SELECT a.id, a.artifact_type, a.sha256, a.size_bytes, a.state, a.created_at,
               v.version, v.capabilities, v.default_parameters
          FROM model_artifacts a JOIN model_versions v ON v.id = a.model_version_id
         WHERE v.model_id = %s AND v.version = %s AND a.artifact_type = ANY(%s)
         ORDER BY a.created_at DESC, a.id
        """,
        (model_id, version, OCI_TYPES),
    )
    return await cur.fetchall()


async def manifest_artifacts(conn: Connection, model_id: uuid.UUID, digest: Digest) -> list[dict]:
    """The model's artifacts holding a manifest (stored, or made for them) of ``digest``, with its media type.

    An ``ollama`` artifact's own digest is its Docker v2 manifest's, whatever
    its file is typed as (a manifest imported alone is ``application/json``).
    """
    cur = await conn.execute(
        """
        SELECT a.id, a.artifact_type, a.sha256, a.size_bytes, a.state, a.created_at,
               v.version, v.capabilities, v.default_parameters,
               CASE WHEN f.media_type = ANY(%(types)s) THEN f.media_type ELSE %(docker)s END AS media_type
          FROM model_artifacts a
          JOIN model_versions v ON v.id = a.model_version_id
          JOIN artifact_files f ON f.artifact_id = a.id AND f.blob_digest = %(digest)s
         WHERE v.model_id = %(model)s AND a.artifact_type = ANY(%(oci_types)s)
           AND (f.media_type = ANY(%(types)s) OR a.artifact_type = 'ollama' AND a.sha256 = %(hex)s)
         ORDER BY a.created_at DESC, a.id
        """,
        {"types": MANIFEST_TYPES, "docker": DOCKER_MANIFEST_V2, "digest": str(digest), "model": model_id,
         "oci_types": OCI_TYPES, "hex": digest.hex},
    )
    return await cur.fetchall()


async def artifact_files(conn: Connection, artifact_id: uuid.UUID) -> list[dict]:
    cur = await conn.execute(
        """
        SELECT path, blob_digest, size_bytes, media_type FROM artifact_files
         WHERE artifact_id = %s ORDER BY path
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


async def tags(conn: Connection, model_id: uuid.UUID, states: list[str]) -> list[str]:
    """Versions of the model with an ollama or gguf artifact in one of ``states``."""
    cur = await conn.execute(
        """
        SELECT DISTINCT v.version FROM model_versions v JOIN model_artifacts a ON a.model_version_id = v.id
         WHERE v.model_id = %s AND a.artifact_type = ANY(%s) AND a.state = ANY(%s)
        """,
        (model_id, OCI_TYPES, states),
    )
    return [r["version"] for r in await cur.fetchall()]


async def repositories(conn: Connection, states: list[str]) -> list[dict]:
    """Models with an ollama or gguf artifact in one of ``states``: their name and vendor."""
    cur = await conn.execute(
        """
        SELECT DISTINCT m.name, m.vendor FROM models m
          JOIN model_versions v ON v.model_id = m.id
          JOIN model_artifacts a ON a.model_version_id = v.id
         WHERE a.artifact_type = ANY(%s) AND a.state = ANY(%s)
        """,
        (OCI_TYPES, states),
    )
    return await cur.fetchall()
