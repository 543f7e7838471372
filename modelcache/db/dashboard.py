"""What the dashboard's overview counts: bytes by what holds them, blobs by state, downloads by hour."""

from __future__ import annotations

import datetime as dt

from .pool import Connection
from .rows import all_rows


async def usage_by_class(conn: Connection) -> dict[str, int]:
    """Bytes of present blobs by what holds them: ``pinned`` (a pinned staged or promoted artifact),
    else ``promoted``, else ``staged``, else ``other`` (derived manifests, blobs no artifact holds).
    A blob several artifacts share is counted once, in the first class that applies."""
    rows = await all_rows(
        conn,
        """
        WITH held AS (
            SELECT b.digest, b.size_bytes,
                   coalesce(bool_or(a.pinned AND a.state IN ('staged', 'promoted')), false) AS pinned,
                   coalesce(bool_or(a.state = 'promoted'), false) AS promoted,
                   coalesce(bool_or(a.state = 'staged'), false) AS staged
              FROM blobs b
              LEFT JOIN artifact_files f ON f.blob_digest = b.digest
              LEFT JOIN model_artifacts a ON a.id = f.artifact_id
             WHERE b.state = 'present'
             GROUP BY b.digest, b.size_bytes)
        SELECT CASE WHEN pinned THEN 'pinned' WHEN promoted THEN 'promoted' WHEN staged THEN 'staged'
                    ELSE 'other' END AS class,
               sum(size_bytes)::bigint AS bytes
          FROM held GROUP BY 1
        """)
    return {r["class"]: r["bytes"] for r in rows}


async def blob_counts_by_state(conn: Connection) -> dict[str, int]:
    rows = await all_rows(conn, "SELECT state, count(*) AS n FROM blobs GROUP BY state")
    return {r["state"]: r["n"] for r in rows}


async def downloaded_by_hour(conn: Connection, since: dt.datetime) -> dict[dt.datetime, int]:
    """Bytes of downloads that completed since ``since``, by the hour they completed in."""
    rows = await all_rows(
        conn,
        """
        SELECT date_trunc('hour', finished_at AT TIME ZONE 'UTC') AS hour, sum(bytes_done)::bigint AS bytes
          FROM model_downloads WHERE state = 'completed' AND finished_at >= %s GROUP BY 1
        """, (since,))
    return {r["hour"].replace(tzinfo=dt.timezone.utc): r["bytes"] for r in rows}
