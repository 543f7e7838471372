"""``POST /v1/imports``: a streamed upload, hashed while it is written, never held in memory."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ... import artifacts
from ...digest import Digest
from ...errors import InvalidInput
from ...imports import ImportRequest, import_stream
from .api import MANAGERS, Call, Query, endpoint
from ..keys import CATALOG, STORE
from .registry import ArtifactOut, artifact_out
from .types import ArtifactType, DigestText, FileName, ModelName, Version


class UploadQuery(Query):
    model: ModelName
    version: Version
    vendor: ModelName | None = None
    type: ArtifactType | None = Field(None, description="read from the content when absent")
    sha256: DigestText | None = Field(None, description="expected digest; a mismatch is a 422 and nothing is kept")
    filename: FileName | None = Field(None, description="the file's name, for the record")


@endpoint("POST", "/v1/imports", summary="Upload a file as an artifact (application/octet-stream body)",
          roles=MANAGERS, action="model_artifact.import", query=UploadQuery, response=ArtifactOut, status=201,
          streamed_body=True)
async def upload(call: Call) -> ArtifactOut:
    q: UploadQuery = call.query
    request = call.request
    if not request.body_exists:
        raise InvalidInput("the request has no body: send the file as application/octet-stream")
    name = q.filename or f"upload-{q.model}-{q.version}"
    req = ImportRequest.parse(Path(name), q.model, q.version, q.vendor, q.type, source_uri=f"upload:{name}")
    expected = Digest.parse(q.sha256) if q.sha256 else None
    result = await import_stream(call.db, request.app[STORE], req, request.content.iter_chunked(1 << 20),
                                 call.subject, expected)
    await request.app[CATALOG].changed(result.blob_digests)  # served by this server as it answers
    return artifact_out(await artifacts.load(call.db, str(result.artifact_id)))
