"""A download request's life: asked for, approved or rejected, cancelled; each change audited and logged.

States (the ``model_downloads`` CHECK)::

    pending_approval --approve--> queued --claimed--> running --> completed | failed
          |  \\--reject--> rejected                      |
          \\------cancel---------+----------cancel--------+--> cancelled

A request is checked against the policy when it is made and again when it is
approved and when its transfer starts (the preference may have changed
meanwhile); every refusal is audited with the rule that refused it. The
requester may not approve their own request.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from .. import eviction, preferences
from ..auth import Subject
from ..config import Settings
from ..db import Database, audit, downloads
from ..digest import Digest
from ..errors import Conflict, Forbidden, InvalidInput, ModelcacheError, NotFound
from ..formats import parse_artifact_type
from ..names import parse_model_name, parse_vendor, parse_version
from .policy import PolicyRefused, check_allowed
from .sources import MAX_REFERENCE, find_source

logger = logging.getLogger(__name__)

RESOURCE = "model_download"
PULL_THROUGH = "models.download.pull_through"
# a pull-through download that failed, or was rejected or cancelled, answers the misses of this long
# after it ended, so clients retrying against a failing upstream are told at once, not queued again
MISS_REMEMBERED_SECONDS = 30.0


@dataclass(frozen=True)
class DownloadRequest:
    source: str
    reference: str
    model: str
    version: str
    vendor: str | None = None
    artifact_type: str | None = None
    expected: Digest | None = None

    @classmethod
    def parse(cls, source: str, reference: str, model: str, version: str, vendor: str | None = None,
              artifact_type: str | None = None, sha256: str | None = None) -> "DownloadRequest":
        if not isinstance(reference, str) or not 1 <= len(reference) <= MAX_REFERENCE:
            raise InvalidInput(f"invalid reference: expected 1-{MAX_REFERENCE} characters")
        return cls(source, reference, parse_model_name(model), parse_version(version), parse_vendor(vendor),
                   parse_artifact_type(artifact_type) if artifact_type else None,
                   Digest.parse(sha256) if sha256 else None)


async def request(db: Database, settings: Settings, req: DownloadRequest, subject: Subject, *,
                  pull_through: bool = False) -> dict:
    """Record a request: queued, or pending approval when the policy asks for it. Refusals are audited.

    The reference is read as its source's kind expects (:meth:`~.sources.Source.parse`).
    ``pull_through``: asked by a ``/v2`` or ``/hf`` miss (``pull_through.py``), which the preference
    ``models.download.pull_through`` permits; the download already asked for the same source and
    reference (open, or ended in the last ``MISS_REMEMBERED_SECONDS``) is answered instead of a
    new one, under a lock per source and reference, so concurrent misses make one request."""
    where = f"{req.source}:{req.reference}"
    try:
        source = find_source(settings, req.source)
        source.parse(req.reference)
        prefs = await preferences.effective(db)
        if pull_through and not prefs[PULL_THROUGH]:
            raise PolicyRefused(PULL_THROUGH, "pull-through is off: a miss is answered 404 and asks no source")
        check_allowed(source, prefs["models.download.allowed_sources"])
        await eviction.admit(db, 0)  # a cache that is already full under policy 'none' takes nothing
    except ModelcacheError as exc:
        await _audit(db, subject, "request", None, decision="deny", outcome="refused", reason=exc.detail,
                     details={"source": req.source, "reference": req.reference})
        logger.warning("download of %s refused for %s: %s", where, subject, exc.detail)
        raise
    state = "pending_approval" if prefs["models.download.require_user_approval"] else "queued"
    async with db.transaction() as conn:
        if pull_through:
            await downloads.lock_miss(conn, req.source, req.reference)
            twin = await downloads.miss_twin(conn, req.source, req.reference, MISS_REMEMBERED_SECONDS)
            if twin is not None:
                return twin
        row = await downloads.insert_download(
            conn, source=req.source, reference=req.reference, model_name=req.model, model_vendor=req.vendor,
            version=req.version, artifact_type=req.artifact_type,
            expected_sha256=str(req.expected) if req.expected else None, requested_by=str(subject), state=state)
        await audit.audit(conn, subject, "model_download.request", RESOURCE, str(row["id"]), outcome=state,
                          details={**_details(row), **({"pull_through": True} if pull_through else {})})
        if state == "queued":
            await downloads.notify(conn, row["id"])
    logger.info("download %s requested by %s%s: %s as %s, %s", row["id"], subject,
                " (pull-through)" if pull_through else "", where, label(row), state)
    return row


async def approve(db: Database, download_id: uuid.UUID, subject: Subject, settings: Settings) -> dict:
    row = await get(db, download_id)
    if row["requested_by"] == str(subject):
        reason = f"{subject} requested download {download_id} and may not approve it too; another admin must"
        await _audit(db, subject, "approve", download_id, decision="deny", outcome="refused", reason=reason)
        raise Forbidden(reason)
    try:
        source = find_source(settings, row["source"])
        check_allowed(source, (await preferences.effective(db))["models.download.allowed_sources"])
    except (PolicyRefused, NotFound) as exc:
        await _audit(db, subject, "approve", download_id, decision="deny", outcome="refused", reason=exc.detail)
        raise
    return await _change(db, download_id, subject, "approve", ("pending_approval",), "queued",
                         approved_by=str(subject))


async def reject(db: Database, download_id: uuid.UUID, subject: Subject, reason: str) -> dict:
    return await _change(db, download_id, subject, "reject", ("pending_approval",), "rejected", reason=reason,
                         decided_by=str(subject))


async def cancel(db: Database, download_id: uuid.UUID, subject: Subject, reason: str | None) -> dict:
    """Cancel a request that has not ended; a running transfer stops within a second or so."""
    return await _change(db, download_id, subject, "cancel", ("pending_approval", "queued", "running"),
                         "cancelled", reason=reason, decided_by=str(subject))


async def get(db: Database, download_id: uuid.UUID) -> dict:
    async with db.connection() as conn:
        row = await downloads.get_download(conn, download_id)
    if row is None:
        raise NotFound(f"no download {download_id}")
    return row


async def _change(db: Database, download_id: uuid.UUID, subject: Subject, verb: str, from_states: tuple[str, ...],
                  to_state: str, **fields: object) -> dict:
    async with db.transaction() as conn:
        row = await downloads.update_download(conn, download_id, from_states, state=to_state,
                                              stamp="finished" if to_state in downloads.FINISHED else None,
                                              **fields)
        if row is None:
            current = await downloads.get_download(conn, download_id)
            if current is None:
                raise NotFound(f"no download {download_id}")
            reason = f"download {download_id} is {current['state']}; only a download that is " \
                     f"{' or '.join(from_states)} can be {_past(verb)}"
            await audit.audit(conn, subject, f"model_download.{verb}", RESOURCE, str(download_id),
                              decision="deny", outcome="refused", reason=reason)
            raise Conflict(reason)
        await audit.audit(conn, subject, f"model_download.{verb}", RESOURCE, str(download_id), outcome=to_state,
                          reason=fields.get("reason"), details=_details(row))  # type: ignore[arg-type]
        if to_state in ("queued", "cancelled"):
            await downloads.notify(conn, download_id)
    logger.info("download %s %s by %s: %s:%s%s", download_id, _past(verb), subject, row["source"],
                row["reference"], f" ({fields['reason']})" if fields.get("reason") else "")
    return row


async def _audit(db: Database, subject: Subject, verb: str, download_id: uuid.UUID | None, *, decision: str,
                 outcome: str, reason: str, details: dict | None = None) -> None:
    try:
        async with db.connection() as conn:
            await audit.audit(conn, subject, f"model_download.{verb}", RESOURCE,
                              str(download_id) if download_id else None, decision=decision, outcome=outcome,
                              reason=reason, details=details)
    except ModelcacheError as exc:
        logger.error("could not audit a refused download %s: %s", verb, exc.detail)


def _details(row: dict) -> dict:
    return {"source": row["source"], "reference": row["reference"], "model": label(row),
            "bytes": row["bytes_done"], "digest": row["sha256"], "state": row["state"],
            "seconds": _seconds(row)}


def _seconds(row: dict) -> float | None:
    if row["started_at"] is None or row["finished_at"] is None:
        return None
    return round((row["finished_at"] - row["started_at"]).total_seconds(), 3)


def _past(verb: str) -> str:
    return {"approve": "approved", "reject": "rejected", "cancel": "cancelled"}.get(verb, verb + "ed")


def requester(row: dict) -> Subject:
    """Who asked for a download, as the subject its artifact is registered by."""
    kind, _, ident = row["requested_by"].partition(":")
    return Subject(kind, ident or None)


def label(row: dict) -> str:
    name = f"{row['model_vendor']}/{row['model_name']}" if row["model_vendor"] else row["model_name"]
    return f"{name}:{row['version']}"


def eta_seconds(row: dict) -> float | None:
    """Seconds left at the recent rate, for a running transfer of known size."""
    rate, total = row["rate_bytes_per_second"], row["bytes_total"]
    if row["state"] != "running" or not rate or total is None:
        return None
    return round(max(total - row["bytes_done"], 0) / rate, 1)
