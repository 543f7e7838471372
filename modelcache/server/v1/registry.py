"""``/v1/`` registry endpoints: models, versions (with the capability query), artifacts and their actions."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from pydantic import BaseModel, Field, StrictBool

from ... import artifacts, scrub
from ...auth import Role
from ...db import artifacts as artifact_rows, audit, models
from ...errors import NotFound
from .api import ALL_ROLES, MANAGERS, Call, Strict, endpoint
from .types import ArtifactType, DigestText, ModelName, Paging, Version
from ...manifests import derive_version
from ..keys import CATALOG, STORE

READERS = ALL_ROLES - {Role.NODE}
# A node resolves a name to a version and reads an artifact's file list to pull it (``modelcache pull``, the
# node agent); the bytes stay behind Subject.withheld, so this shows it no content it may not have.
PULLERS = ALL_ROLES



class ModelOut(BaseModel):
    id: uuid.UUID
    name: str
    vendor: str | None
    description: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    updated_by: str


class ModelPage(BaseModel):
    models: list[ModelOut]
    next_cursor: str | None


class VersionOut(BaseModel):
    id: uuid.UUID
    model_id: uuid.UUID
    model: str
    vendor: str | None
    version: str
    capabilities: dict[str, Any]
    default_parameters: dict[str, Any] | None
    created_at: dt.datetime
    updated_at: dt.datetime


class VersionPage(BaseModel):
    versions: list[VersionOut]
    next_cursor: str | None


class FileOut(BaseModel):
    path: str
    digest: str
    size_bytes: int
    media_type: str
    blob_state: str


class ArtifactOut(BaseModel):
    id: uuid.UUID
    digest: str
    model_version_id: uuid.UUID
    model: str
    vendor: str | None
    version: str
    artifact_type: str
    size_bytes: int
    cache_path: str
    source_uri: str | None
    state: str
    pinned: bool
    last_accessed_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    updated_by: str
    files: list[FileOut]


class ArtifactPage(BaseModel):
    artifacts: list[ArtifactOut]
    next_cursor: str | None


class BlobCheckOut(BaseModel):
    digest: str
    ok: bool
    reason: str | None


class VerifyOut(BaseModel):
    ok: bool
    artifact: ArtifactOut
    blobs: list[BlobCheckOut]


class EvictOut(BaseModel):
    artifact: ArtifactOut
    freed_bytes: int
    removed_blobs: list[str]


def version_out(row: dict) -> VersionOut:
    return VersionOut(model=row["model_name"], vendor=row["model_vendor"], **row)


def artifact_out(row: dict) -> ArtifactOut:
    files = [FileOut(digest=f["blob_digest"], **f) for f in row.get("files", [])]
    fields = {k: v for k, v in row.items() if k in ArtifactOut.model_fields and k != "files"}
    return ArtifactOut(digest=f"sha256:{row['sha256']}", model=row["model_name"], vendor=row["model_vendor"],
                       files=files, **fields)


def _uuid(call: Call, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(call.param(name))
    except ValueError:
        raise NotFound(f"no such {name.removesuffix('_id')}: {call.param(name)!r} is not an id") from None


# -- models -------------------------------------------------------------------


class ModelQuery(Paging):
    name: ModelName | None = None
    vendor: ModelName | None = None


@endpoint("GET", "/v1/models", summary="List models", roles=READERS, action="model.list", query=ModelQuery,
          response=ModelPage)
async def list_models(call: Call) -> ModelPage:
    q = call.query
    async with call.db.connection() as conn:
        rows, cursor = await models.list_models(conn, name=q.name, vendor=q.vendor, limit=q.limit,
                                                    cursor=q.cursor)
    return ModelPage(models=[ModelOut(**r) for r in rows], next_cursor=cursor)


@endpoint("GET", "/v1/models/{model_id}", summary="Get a model", roles=READERS, action="model.get",
          response=ModelOut)
async def get_model(call: Call) -> ModelOut:
    async with call.db.connection() as conn:
        row = await models.get_model(conn, _uuid(call, "model_id"))
    if row is None:
        raise NotFound(f"no model {call.param('model_id')}")
    return ModelOut(**row)


# -- versions -----------------------------------------------------------------


class VersionQuery(Paging):
    model_id: uuid.UUID | None = None
    model: ModelName | None = None
    vendor: ModelName | None = None
    version: Version | None = None
    min_context_length: int | None = Field(None, ge=0, description="capabilities.context_length at least this")
    tool_use: bool | None = None
    vision: bool | None = None
    json_mode: bool | None = None
    gpu_required: bool | None = Field(None, description="false also matches versions that do not say")
    language: list[str] | str | None = Field(None, description="every listed language must be supported")
    promoted_only: bool = Field(False, description="only versions with a promoted artifact")

    def requirements(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.min_context_length is not None:
            out["context_length"] = self.min_context_length
        for key in ("tool_use", "vision", "json_mode", "gpu_required"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.language:
            out["languages"] = [self.language] if isinstance(self.language, str) else self.language
        return out


@endpoint("GET", "/v1/versions", summary="Find model versions, by model or by capability requirements",
          roles=PULLERS, action="model_version.list", query=VersionQuery, response=VersionPage)
async def list_versions(call: Call) -> VersionPage:
    q = call.query
    async with call.db.connection() as conn:
        rows, cursor = await models.list_versions(
            conn, model_id=q.model_id, model=q.model, vendor=q.vendor, version=q.version,
            requires=q.requirements(), promoted_only=q.promoted_only, limit=q.limit, cursor=q.cursor)
    return VersionPage(versions=[version_out(r) for r in rows], next_cursor=cursor)


@endpoint("GET", "/v1/versions/{version_id}", summary="Get a model version", roles=READERS,
          action="model_version.get", response=VersionOut)
async def get_version(call: Call) -> VersionOut:
    async with call.db.connection() as conn:
        row = await models.get_version(conn, _uuid(call, "version_id"))
    if row is None:
        raise NotFound(f"no version {call.param('version_id')}")
    return version_out(row)


class VersionPatch(Strict):
    capabilities: dict[str, Any] | None = Field(
        None, description="keys to set (merged into the stored object); a key set to null is removed")
    default_parameters: dict[str, Any] | None = Field(None, description="merged the same way")
    clear_default_parameters: StrictBool = False
    reason: str | None = Field(None, max_length=500)


@endpoint("PATCH", "/v1/versions/{version_id}", summary="Edit a version's capabilities and default parameters",
          roles=MANAGERS, action="model_version.update", body=VersionPatch, response=VersionOut)
async def patch_version(call: Call) -> VersionOut:
    body: VersionPatch = call.body
    version_id = _uuid(call, "version_id")
    async with call.db.transaction() as conn:
        if await models.patch_version(conn, version_id, body.capabilities, body.default_parameters,
                                          body.clear_default_parameters) is None:
            raise NotFound(f"no version {version_id}")
        await audit.audit(conn, call.subject, "model_version.update", "model_version", str(version_id),
                             reason=body.reason, details=body.model_dump(exclude={"reason"}, exclude_none=True))
        row = await models.get_version(conn, version_id)
    # the version's Ollama manifests carry its capabilities and parameters: made again now, served as we answer
    derived = await derive_version(call.db, call.request.app[STORE], version_id)
    await call.request.app[CATALOG].changed([d for x in derived for d in x.digests])
    return version_out(row)


# -- artifacts ----------------------------------------------------------------


class ArtifactQuery(Paging):
    model: ModelName | None = None
    vendor: ModelName | None = None
    version: Version | None = None
    model_version_id: uuid.UUID | None = None
    type: ArtifactType | None = None
    state: str | None = Field(None, pattern="^(staged|promoted|evicted|quarantined)$")
    digest: DigestText | None = None
    pinned: bool | None = None


@endpoint("GET", "/v1/artifacts", summary="List artifacts", roles=PULLERS, action="model_artifact.list",
          query=ArtifactQuery, response=ArtifactPage)
async def list_artifacts(call: Call) -> ArtifactPage:
    q = call.query
    filters = {"model": q.model, "vendor": q.vendor, "version": q.version, "model_version_id": q.model_version_id,
               "artifact_type": q.type, "state": q.state, "sha256": q.digest[7:] if q.digest else None,
               "pinned": q.pinned}
    async with call.db.connection() as conn:
        rows, cursor = await artifact_rows.list_artifacts(conn, filters=filters, limit=q.limit, cursor=q.cursor)
        files = await artifact_rows.artifact_files(conn, [r["id"] for r in rows])
    for row in rows:
        row["files"] = files[row["id"]]
    return ArtifactPage(artifacts=[artifact_out(r) for r in rows], next_cursor=cursor)


@endpoint("GET", "/v1/artifacts/{artifact}", summary="Get an artifact by id or sha256:<hex>", roles=PULLERS,
          action="model_artifact.get", response=ArtifactOut)
async def get_artifact(call: Call) -> ArtifactOut:
    return artifact_out(await artifacts.load(call.db, call.param("artifact")))


@endpoint("POST", "/v1/artifacts/{artifact}/promote", summary="Promote: make an artifact visible to nodes",
          roles=MANAGERS, action="model_artifact.promote", response=ArtifactOut)
async def promote(call: Call) -> ArtifactOut:
    promoted = await artifacts.promote(call.db, call.request.app[STORE], call.param("artifact"), call.subject)
    await call.request.app[CATALOG].changed([f["blob_digest"] for f in promoted["files"]])  # served as we answer
    return artifact_out(promoted)


@endpoint("POST", "/v1/artifacts/{artifact}/pin", summary="Pin: never evict this artifact", roles=MANAGERS,
          action="model_artifact.pin", response=ArtifactOut)
async def pin(call: Call) -> ArtifactOut:
    return artifact_out(await artifacts.set_pinned(call.db, call.param("artifact"), True, call.subject))


@endpoint("POST", "/v1/artifacts/{artifact}/unpin", summary="Unpin an artifact", roles=MANAGERS,
          action="model_artifact.unpin", response=ArtifactOut)
async def unpin(call: Call) -> ArtifactOut:
    return artifact_out(await artifacts.set_pinned(call.db, call.param("artifact"), False, call.subject))


@endpoint("POST", "/v1/artifacts/{artifact}/evict", summary="Evict: remove the bytes, keep the registry row",
          roles=MANAGERS, action="model_artifact.evict", response=EvictOut)
async def evict(call: Call) -> EvictOut:
    done = await artifacts.evict(call.db, call.request.app[STORE], call.param("artifact"), call.subject,
                                 reason="requested")
    await call.request.app[CATALOG].changed(done.removed_blobs)  # no longer served as we answer
    return EvictOut(artifact=artifact_out(await artifacts.load(call.db, str(done.artifact_id))),
                    freed_bytes=done.freed_bytes, removed_blobs=done.removed_blobs)


@endpoint("POST", "/v1/artifacts/{artifact}/verify", summary="Verify: re-hash the blobs; quarantine mismatches",
          roles=MANAGERS, action="model_artifact.verify", response=VerifyOut)
async def verify(call: Call) -> VerifyOut:
    report = await artifacts.verify_artifact(call.db, call.request.app[STORE], call.param("artifact"),
                                             call.subject)
    await call.request.app[CATALOG].changed([b["digest"] for b in report["blobs"] if not b["ok"]])  # quarantined
    return VerifyOut(ok=report["ok"], artifact=artifact_out(report["artifact"]),
                     blobs=[BlobCheckOut(**b) for b in report["blobs"]])



class ScrubOut(BaseModel):
    ok: bool
    blobs: list[BlobCheckOut]


@endpoint("POST", "/v1/scrub", summary="Verify every blob now; mismatches are quarantined", roles=MANAGERS,
          action="blob.scrub", response=ScrubOut)
async def scrub_all(call: Call) -> ScrubOut:
    checks = await scrub.scrub(call.db, call.request.app[STORE], call.subject)
    return ScrubOut(ok=all(c.ok for c in checks),
                    blobs=[BlobCheckOut(digest=c.digest, ok=c.ok, reason=c.reason) for c in checks])
