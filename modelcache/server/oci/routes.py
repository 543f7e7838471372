"""``/v2/``: the pull side of the OCI distribution API, for Ollama, skopeo, oras and containerd.

Endpoints (``GET`` and ``HEAD``; anything else is 405 ``UNSUPPORTED``, this registry is pull-only):

    /v2/                               200 once authenticated: the API is here
    /v2/<ns>/<model>/manifests/<ref>   a tag (a version): Accept picks Docker v2 or OCI; a digest: those bytes
    /v2/<ns>/<model>/blobs/<digest>    the blob, as /v1/blobs serves it, plus Ollama's Location
    /v2/<ns>/<model>/tags/list         ?n=&last= paging with Link
    /v2/_catalog                       the repositories, paged the same way
    /v2/token                          the Bearer realm: the token given as Basic password, back as a token

Manifests, tags and the catalog are answered from memory (``index.py``): a
GET writes nothing and waits on no database.

Errors are OCI error bodies, ``{"errors": [{"code", "message", "detail"}]}`` (this module's renderer on the one
error middleware, ``server/errors.py``).

Auth is /v1's (a Bearer token, or an anonymous client on a trusted network)
plus HTTP Basic with the token as password. A 401 offers two challenges,
first ``Bearer realm="<this host>/v2/token",service="modelcache"``, then
``Basic``. Registry clients take the first they support: containers/image
(skopeo, podman), containerd, oras and docker fetch the realm with the
credentials they were given as Basic auth and get the same token back to
send as Bearer; clients that only speak Basic send it on every request.
The realm is what Ollama, too, follows on a 401; it signs that request with
its own ed25519 key, which maps to no modelcache token, so the realm answers
it with the one way Ollama can pull: from a network in
``server.trusted_networks``. (With a ``Basic`` challenge alone, Ollama would
fail with ``realm host "" does not match original host``.)

Ollama's blob download (protocols.md §2.3): HEAD for the size, one GET without
Range whose answer must carry a ``Location`` (else "no Location header in
response"), then up to 16 ranged GETs of that URL *without* Authorization,
whose status it never checks. So a whole-body GET answers 200 with
``Location``: the blob's own URL for an anonymous client of a trusted
network, and a URL signed for the token (``signing.py``) for a token holder,
which the blob route accepts without credentials. A single satisfiable range
is always a 206 of exactly that range.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import uuid
from typing import AsyncIterator, Callable

from aiohttp import web
from yarl import URL

from ...auth import Subject
from ...digest import Digest
from ...downloads.inflight import FLIGHTS
from ...downloads.pull_through import Miss, serve_miss
from ...errors import DatabaseUnavailable, Forbidden, InvalidInput, ModelcacheError, NotFound, Unauthorized
from ...formats import DOCKER_MANIFEST_V2
from ...formats.ollama import OCI_MANIFEST
from ...manifests import derive_missing
from ..auth import authenticate, basic_password, token_subject
from ..blobs import denials
from ..blobs.serve import send_blob, servable_blob
from ..blobs.signing import UrlSigner
from ..errors import Renderer, mount
from ..keys import CATALOG, DATABASE, DIGEST, OCI_INDEX, SETTINGS, SIGNER, STORE
from ..paging import page_after, parse_count
from ..urls import public_base
from .index import ManifestUnknown, NameUnknown, OciIndex, Repository, ServedManifest, is_tag

logger = logging.getLogger(__name__)


API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
SERVICE = "modelcache"
TOKEN_SECONDS = 3600
MAX_PAGE = 1000


class BlobUnknown(NotFound):
    code = "BLOB_UNKNOWN"


class BlobUploadUnknown(NotFound):
    code = "BLOB_UPLOAD_UNKNOWN"


class DigestInvalid(InvalidInput):
    code = "DIGEST_INVALID"


class Unsupported(ModelcacheError):
    status = 405
    title = "Unsupported"
    code = "UNSUPPORTED"


class BadParameter(InvalidInput):
    code = "UNSUPPORTED"


class UnknownEndpoint(NotFound):
    code = "UNSUPPORTED"


def setup(app: web.Application) -> None:
    """Route ``/v2`` and everything under it here; load the URL-signing key and the index at start."""
    app[SIGNER] = UrlSigner(app[SETTINGS].data_dir)
    app[OCI_INDEX] = OciIndex(app[DATABASE], app[STORE])
    app.cleanup_ctx.append(_signer_ctx)
    app.cleanup_ctx.append(_index_ctx)
    mount(app, "/v2", RENDERER)
    app.router.add_route("*", "/v2", handle)
    app.router.add_route("*", "/v2/{tail:.*}", handle)


async def _signer_ctx(app: web.Application) -> AsyncIterator[None]:
    await asyncio.to_thread(app[SIGNER].load)
    yield


async def _index_ctx(app: web.Application) -> AsyncIterator[None]:
    """Make the manifests a database from before lacks (cheap when none do), then load the index."""
    await derive_missing(app[DATABASE], app[STORE])
    await app[OCI_INDEX].reload()
    app[CATALOG].follow(app[OCI_INDEX].update)
    logger.info("oci registry: %d models with Ollama or GGUF artifacts under /v2", len(app[OCI_INDEX].repos))
    yield


# -- errors -------------------------------------------------------------------------


def _code(exc: ModelcacheError) -> str:
    code = getattr(exc, "code", None)
    if code:
        return code
    if isinstance(exc, Unauthorized):
        return "UNAUTHORIZED"
    if isinstance(exc, Forbidden):
        return "DENIED"
    if isinstance(exc, DatabaseUnavailable):
        return "UNAVAILABLE"
    if isinstance(exc, InvalidInput):
        return "UNSUPPORTED"
    return "UNKNOWN"


def _error(request: web.Request, exc: ModelcacheError) -> web.Response:
    """An OCI error body, ``{"errors": [{"code", "message", "detail"}]}``."""
    body = {"errors": [{"code": _code(exc), "message": exc.title, "detail": exc.detail}]}
    return web.Response(status=exc.status, text=json.dumps(body), content_type="application/json",
                        headers=API_VERSION)


def _challenges(request: web.Request) -> list[str]:
    """What registry clients answer a 401 with: the Bearer realm first (Ollama, containers/image,
    containerd, oras fetch it), then Basic (clients that only speak Basic)."""
    realm = f"{public_base(request)}/v2/token"
    return [f'Bearer realm="{realm}",service="{SERVICE}"', f'Basic realm="{SERVICE}", charset="UTF-8"']


RENDERER = Renderer(_error, _challenges)


# -- routing ------------------------------------------------------------------------


async def handle(request: web.Request) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        raise Unsupported(f"{request.method} {request.path}: this registry is pull-only; "
                          "import models with modelcache import or the import folder")
    return await _route(request, request.match_info.get("tail", ""))


async def _route(request: web.Request, tail: str) -> web.StreamResponse:
    if tail == "":
        authenticate(request, basic=True)
        return web.json_response({}, headers=API_VERSION)
    if tail == "_catalog":
        return await _catalog(request)
    if tail == "token":
        return _token(request)
    if tail.endswith("/tags/list"):
        return await _tags(request, Repository.parse(tail[: -len("/tags/list")]))
    cut = max(tail.rfind("/manifests/"), tail.rfind("/blobs/"))
    if cut > 0:
        repo = Repository.parse(tail[:cut])
        kind, _, reference = tail[cut + 1:].partition("/")
        if kind == "manifests":
            return await _manifest(request, repo, reference)
        if reference.startswith("uploads"):
            raise BlobUploadUnknown(f"no blob upload {reference}: this registry is pull-only")
        return await _blob(request, reference)
    raise UnknownEndpoint(f"no endpoint /v2/{tail[:200]}: this registry serves /v2/<name>/manifests/<reference>, "
                          "/v2/<name>/blobs/<digest>, /v2/<name>/tags/list and /v2/_catalog")


def _token(request: web.Request) -> web.Response:
    """The Bearer realm (distribution's token auth, minimal): the credentials' token, handed back.

    Tokens are not scoped per repository, so the one a client holds is the
    one it gets; a client that holds none (Ollama's key-signed request) is
    told how it can pull instead.
    """
    header = request.headers.get("Authorization", "")
    if header and header.partition(" ")[0].lower() not in ("basic", "bearer"):
        raise Unauthorized("this is not a modelcache token (Ollama signs with its own key, which modelcache does "
                           "not know): pull from a network listed in server.trusted_networks, which needs no token")
    subject = authenticate(request, basic=True)
    if subject.type != "token":
        raise Unauthorized("no token to hand out: from a trusted network, pull without one")
    scheme, _, credentials = header.partition(" ")
    secret = credentials.strip() if scheme.lower() == "bearer" else basic_password(credentials)
    now = dt.datetime.now(dt.timezone.utc)
    body = {"token": secret, "access_token": secret, "expires_in": TOKEN_SECONDS,
            "issued_at": now.isoformat(timespec="seconds").replace("+00:00", "Z")}
    return web.json_response(body, headers={**API_VERSION, "Cache-Control": "no-store"})


def _parse_digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidInput as exc:
        raise DigestInvalid(exc.detail) from None


# -- manifests ------------------------------------------------------------------------


async def _manifest(request: web.Request, repo: Repository, reference: str) -> web.Response:
    if ":" in reference:
        digest = _parse_digest(reference)
        request[DIGEST] = digest
        subject = authenticate(request, basic=True)
        served = request.app[OCI_INDEX].by_digest(repo, digest, subject)  # those bytes, whatever Accept says
    else:
        if not is_tag(reference):
            raise ManifestUnknown(f"invalid tag {reference[:200]!r}: tags match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")
        subject = authenticate(request, basic=True)
        served = await _by_tag(request, repo, reference, subject)
        request[DIGEST] = served.digest
    headers = {**API_VERSION, "Content-Type": served.media_type, "Docker-Content-Digest": str(served.digest),
               "ETag": f'"{served.digest}"'}
    return web.Response(body=served.data, headers=headers)


async def _by_tag(request: web.Request, repo: Repository, tag: str, subject: Subject) -> ServedManifest:
    """The manifest of ``repo:tag`` from the index; a miss goes through pull-through (its module says when)."""
    index, choose = request.app[OCI_INDEX], _chooser(request)
    try:
        return index.by_tag(repo, tag, subject, choose)
    except (NameUnknown, ManifestUnknown) as exc:
        miss = None if index.knows(repo, tag) else Miss.of_v2(repo.namespace, repo.model, tag)
        if miss is None:
            raise
        return await serve_miss(request.app[DATABASE], request.app[SETTINGS], miss, subject,
                                lambda: index.by_tag(repo, tag, subject, choose), exc,
                                early=lambda job_id: _manifest_in_flight(job_id, subject, choose))


def _manifest_in_flight(job_id: uuid.UUID, subject: Subject,
                        choose: Callable[[list[str]], str | None]) -> ServedManifest | None:
    """The registry's manifest of a download this process is running (an ``ollama`` source's, which the
    cache will serve byte for byte once imported), so the client goes on to its blobs, which stream while
    they are fetched (``downloads/inflight.py``). None until the plan is known, or when not for this subject."""
    job = FLIGHTS.job_of(job_id)
    if job is None or job.manifest is None or subject.withheld("promoted" if job.promoted else "staged"):
        return None
    if choose([DOCKER_MANIFEST_V2]) is None:
        return None
    return ServedManifest(DOCKER_MANIFEST_V2, job.manifest, Digest(hashlib.sha256(job.manifest).hexdigest()))


def _chooser(request: web.Request) -> Callable[[list[str]], str | None]:
    """Accept negotiation over the representations a manifest has, Docker v2 first, then OCI.

    A client that names the OCI type gets OCI unless it rates Docker v2
    higher; any other gets the first acceptable one (Ollama asks for Docker v2
    alone; no Accept header accepts anything); None when none is acceptable.
    """
    ranges = _accept_ranges(request.headers.getall("Accept", []))

    def quality(media_type: str) -> tuple[float, bool]:
        """The q of the most specific range matching, and whether the type was named exactly."""
        if not ranges:
            return 1.0, False
        best: tuple[int, float] | None = None
        for pattern, q in ranges:
            kind, _, sub = pattern.partition("/")
            if pattern == media_type:
                specificity = 2
            elif sub == "*" and media_type.startswith(f"{kind}/"):
                specificity = 1
            elif pattern == "*/*":
                specificity = 0
            else:
                continue
            if best is None or specificity > best[0]:
                best = (specificity, q)
        return (best[1], best[0] == 2) if best is not None else (0.0, False)

    def choose(available: list[str]) -> str | None:
        rated = {m: quality(m) for m in available}
        top = max(q for q, _ in rated.values())
        oci_q, oci_named = rated.get(OCI_MANIFEST, (0.0, False))
        if oci_named and oci_q > 0 and oci_q >= top:
            return OCI_MANIFEST
        return next((m for m in available if rated[m][0] > 0), None)

    return choose


def _accept_ranges(values: list[str]) -> list[tuple[str, float]]:
    ranges = []
    for value in values:
        for item in value.split(","):
            media_type, *params = (p.strip() for p in item.split(";"))
            if not media_type:
                continue
            q = 1.0
            for param in params:
                key, _, val = param.partition("=")
                if key.strip().lower() == "q":
                    try:
                        q = min(max(float(val), 0.0), 1.0)
                    except ValueError:
                        q = 0.0
            ranges.append((media_type.lower(), q))
    return ranges


# -- blobs ----------------------------------------------------------------------------


@denials.pull
async def _blob(request: web.Request, reference: str) -> web.StreamResponse:
    """A blob by digest. As /v1/blobs, the name does not scope access (tokens are not per model)."""
    digest = _parse_digest(reference)
    request[DIGEST] = digest
    subject = _blob_subject(request, digest)
    try:
        entry = await servable_blob(request, digest, subject)
    except NotFound as exc:
        raise BlobUnknown(exc.detail) from None
    headers = dict(API_VERSION)
    if request.method == "GET" and "Range" not in request.headers:
        headers["Location"] = _direct_url(request, digest, subject)
    try:
        return await send_blob(request, digest, entry.size, headers)
    except NotFound as exc:
        raise BlobUnknown(exc.detail) from None


def _blob_subject(request: web.Request, digest: Digest) -> Subject:
    """A signed URL's token holder, or whoever the request authenticates as."""
    if "Authorization" in request.headers or "signature" not in request.query:
        return authenticate(request, basic=True)
    try:
        issued_to = request.app[SIGNER].verify(digest, request.query)
    except Unauthorized:
        try:  # an anonymous client of a trusted network needs no signature
            return authenticate(request, basic=True)
        except Unauthorized:
            pass
        raise
    return token_subject(request, issued_to)


def _direct_url(request: web.Request, digest: Digest, subject: Subject) -> str:
    """Where Ollama fetches the parts from, without credentials: this URL, signed for a token holder."""
    url = URL(public_base(request) + request.rel_url.raw_path, encoded=True)
    if subject.type == "token" and subject.id:
        url = url.with_query(request.app[SIGNER].sign(digest, subject.id))
    return str(url)


# -- lists --------------------------------------------------------------------------------


async def _tags(request: web.Request, repo: Repository) -> web.Response:
    subject = authenticate(request, basic=True)
    n, last = _paging(request)
    found = request.app[OCI_INDEX].tags(repo, subject)
    page, more = _page(found, n, last)
    headers = dict(API_VERSION)
    if more:
        headers["Link"] = f'<{URL(f"/v2/{repo}/tags/list").with_query(n=n, last=page[-1])}>; rel="next"'
    return web.json_response({"name": str(repo), "tags": page}, headers=headers)


async def _catalog(request: web.Request) -> web.Response:
    subject = authenticate(request, basic=True)
    n, last = _paging(request)
    page, more = _page(request.app[OCI_INDEX].repositories(subject), n, last)
    headers = dict(API_VERSION)
    if more:
        headers["Link"] = f'<{URL("/v2/_catalog").with_query(n=n, last=page[-1])}>; rel="next"'
    return web.json_response({"repositories": page}, headers=headers)


def _paging(request: web.Request) -> tuple[int | None, str | None]:
    unknown = sorted(set(request.query) - {"n", "last"})
    if unknown:
        raise BadParameter(f"unknown query parameter {unknown[0]!r}: lists take n and last")
    n = request.query.get("n")
    try:  # a larger n is answered with at most MAX_PAGE, as the spec allows
        count = min(parse_count(n, "n", 0, 999_999_999), MAX_PAGE) if n is not None else None
    except InvalidInput as exc:
        raise BadParameter(exc.detail) from None
    return count, request.query.get("last")


def _page(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """Sorted ``items`` after ``last`` (exclusive), at most ``n``; and whether more follow."""
    page, more = page_after(items, str, last, n)
    return page, more and n != 0
