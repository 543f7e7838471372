"""``/v1/downloads``: ask for a download from a configured source, follow it, approve, reject or cancel it."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel, Field

from ...downloads import requests
from ...db import downloads as download_rows
from ...errors import NotFound
from ..keys import SETTINGS
from .api import ADMINS, MANAGERS, Call, Strict, endpoint
from .types import ArtifactType, DigestText, ModelName, Paging, Version

STATES = ("pending_approval", "queued", "running", "completed", "failed", "rejected", "cancelled")


class DownloadCreate(Strict):
    source: str = Field(min_length=1, max_length=63, description="a configured source id ([sources.<id>])")
    reference: str = Field(min_length=1, max_length=1000,
                           description="by the source's kind: http, a path relative to the source's URL; "
                                       "modelcache, sha256:<hex> or [vendor/]model:version; huggingface, "
                                       "org/name[@revision][?include=PATTERN[,PATTERN...]]; ollama, "
                                       "[namespace/]model[:tag]")
    model: ModelName
    version: Version
    vendor: ModelName | None = None
    artifact_type: ArtifactType | None = Field(None, description="read from the content when absent")
    sha256: DigestText | None = Field(None, description="expected digest; a mismatch keeps nothing")


class DownloadOut(BaseModel):
    id: uuid.UUID
    source: str
    reference: str
    model: str
    vendor: str | None
    version: str
    artifact_type: str | None
    expected_sha256: str | None
    state: str
    bytes_done: int
    bytes_total: int | None
    rate_bytes_per_second: int | None
    eta_seconds: float | None
    attempts: int
    error: str | None
    reason: str | None = Field(description="why it was rejected or cancelled")
    digest: str | None = Field(description="sha256 of what was fetched, once completed")
    artifact_id: uuid.UUID | None
    requested_by: str
    approved_by: str | None
    decided_by: str | None = Field(description="who rejected or cancelled it")
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class DownloadPage(BaseModel):
    downloads: list[DownloadOut]
    next_cursor: str | None


class DownloadQuery(Paging):
    state: str | None = Field(None, pattern=f"^({'|'.join(STATES)})$")
    source: str | None = Field(None, max_length=63)


class Rejection(Strict):
    reason: str = Field(min_length=1, max_length=500)


def download_out(row: dict) -> DownloadOut:
    fields = {k: v for k, v in row.items() if k in DownloadOut.model_fields}
    return DownloadOut(model=row["model_name"], vendor=row["model_vendor"], digest=row["sha256"],
                       eta_seconds=requests.eta_seconds(row), **fields)


def _id(call: Call) -> uuid.UUID:
    try:
        return uuid.UUID(call.param("download_id"))
    except ValueError:
        raise NotFound(f"no such download: {call.param('download_id')!r} is not an id") from None


@endpoint("POST", "/v1/downloads", summary="Ask for a download from a configured source (202: poll the resource)",
          roles=MANAGERS, action="model_download.request", body=DownloadCreate, response=DownloadOut, status=202,
          tag="downloads")
async def create_download(call: Call) -> DownloadOut:
    b: DownloadCreate = call.body
    req = requests.DownloadRequest.parse(b.source, b.reference, b.model, b.version, b.vendor, b.artifact_type,
                                         b.sha256)
    row = await requests.request(call.db, call.request.app[SETTINGS], req, call.subject)
    return download_out(row)


@endpoint("GET", "/v1/downloads", summary="List downloads, newest first", roles=MANAGERS,
          action="model_download.list", query=DownloadQuery, response=DownloadPage, tag="downloads")
async def list_downloads(call: Call) -> DownloadPage:
    q: DownloadQuery = call.query
    async with call.db.connection() as conn:
        rows, cursor = await download_rows.list_downloads(conn, state=q.state, source=q.source, limit=q.limit,
                                                          cursor=q.cursor)
    return DownloadPage(downloads=[download_out(r) for r in rows], next_cursor=cursor)


@endpoint("GET", "/v1/downloads/{download_id}", summary="A download: state, progress, rate, ETA, error",
          roles=MANAGERS, action="model_download.get", response=DownloadOut, tag="downloads")
async def get_download(call: Call) -> DownloadOut:
    return download_out(await requests.get(call.db, _id(call)))


@endpoint("POST", "/v1/downloads/{download_id}/approve", summary="Approve a pending download (not your own)",
          roles=ADMINS, action="model_download.approve", response=DownloadOut, tag="downloads")
async def approve_download(call: Call) -> DownloadOut:
    return download_out(await requests.approve(call.db, _id(call), call.subject, call.request.app[SETTINGS]))


@endpoint("POST", "/v1/downloads/{download_id}/reject", summary="Reject a pending download, with a reason",
          roles=ADMINS, action="model_download.reject", body=Rejection, response=DownloadOut, tag="downloads")
async def reject_download(call: Call) -> DownloadOut:
    return download_out(await requests.reject(call.db, _id(call), call.subject, call.body.reason))


@endpoint("POST", "/v1/downloads/{download_id}/cancel", summary="Cancel a download that has not ended",
          roles=MANAGERS, action="model_download.cancel", response=DownloadOut, tag="downloads")
async def cancel_download(call: Call) -> DownloadOut:
    return download_out(await requests.cancel(call.db, _id(call), call.subject, None))
