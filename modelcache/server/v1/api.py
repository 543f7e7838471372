"""The ``/v1/`` management API's one road: declare an endpoint once, get routing, auth, parsing and OpenAPI.

Each endpoint names the roles allowed to call it and the audit action it
performs. The wrapper authenticates, checks the role (a denial is audited and
answered 403), parses the query and JSON body into pydantic models (unknown
fields, wrong types and bad values are 422 naming the field; malformed JSON is
400; oversized bodies 413), calls the handler and serialises its answer.
The same declarations build the OpenAPI document (``openapi.py``), so the
description cannot drift from the code.

After authentication everything runs through :func:`invoke`, which the
dashboard (``server/ui``) calls too, with a signed-in session's subject: a
button on a page runs the very code ``POST /v1/...`` runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from ... import jsonvalue
from ...auth import Role, Subject
from ...db import audit
from ...errors import DatabaseUnavailable, Forbidden, InvalidInput, ModelcacheError, Unauthorized
from ...logs import printable
from ..auth import authenticate
from ..keys import DATABASE

logger = logging.getLogger(__name__)

ALL_ROLES = frozenset(Role)
MANAGERS = frozenset({Role.ADMIN, Role.OPERATOR})
ADMINS = frozenset({Role.ADMIN})


class Strict(BaseModel):
    """Request models: unknown fields are errors, nothing is coerced silently."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Query(BaseModel):
    """Query-string models: values arrive as strings and are parsed; unknown parameters are errors."""

    model_config = ConfigDict(extra="forbid")


class ValidationProblem(ModelcacheError):
    status = 422
    title = "Validation failed"


@dataclass
class Call:
    """What a handler gets: the request, who is calling, and the parsed inputs."""

    request: web.Request
    subject: Subject
    body: Any = None
    query: Any = None
    params: Mapping[str, str] | None = None  # the path's parameters; None: the request's own (match_info)

    @property
    def db(self):
        return self.request.app[DATABASE]

    def param(self, name: str) -> str:
        return (self.params if self.params is not None else self.request.match_info)[name]


Handler = Callable[[Call], Awaitable[Any]]


@dataclass
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    roles: frozenset[Role]
    action: str  # noun.verb, as audited
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: Any = None  # a pydantic model (or list[...]) describing the answer
    status: int = 200
    streamed_body: bool = False  # the handler reads request.content itself
    tags: list[str] = field(default_factory=list)
    body_optional: bool = False  # no body at all is the body model's defaults


ENDPOINTS: list[Endpoint] = []


def endpoint(method: str, path: str, *, summary: str, roles: frozenset[Role], action: str,
             body: type[BaseModel] | None = None, query: type[BaseModel] | None = None, response: Any = None,
             status: int = 200, streamed_body: bool = False, tag: str = "registry",
             body_optional: bool = False) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        ENDPOINTS.append(Endpoint(method, path, handler, summary, roles, action, body, query, response, status,
                                  streamed_body, [tag], body_optional))
        return handler

    return register


def add_routes(app: web.Application) -> None:
    for ep in ENDPOINTS:
        app.router.add_route(ep.method, ep.path, _wrap(ep))


def endpoint_for(handler: Handler) -> Endpoint:
    """The declaration of ``handler`` (e.g. ``registry.promote``): how the dashboard finds what it invokes."""
    for ep in ENDPOINTS:
        if ep.handler is handler:
            return ep
    raise LookupError(f"{handler.__qualname__} is not a declared /v1 endpoint")


def allows(ep: Endpoint, subject: Subject) -> bool:
    """Whether ``subject``'s role may call ``ep`` (the dashboard offers only the actions this allows)."""
    return subject.role in ep.roles


async def invoke(ep: Endpoint, request: web.Request, subject: Subject, *,
                 body: Any | Callable[[], Awaitable[Any]] = None, query: Mapping[str, Any] | None = None,
                 params: Mapping[str, str] | None = None) -> Any:
    """Run ``ep`` for an authenticated ``subject``: the one road of every ``/v1`` action, whether the API, the
    CLI (through the API) or the dashboard asks.

    The role is checked (a denial is audited and raised as Forbidden, 403), ``query`` and ``body`` are
    parsed into the endpoint's models (ValidationProblem, 422, naming the field) and the handler's result
    is returned as it made it. ``body`` may be a coroutine function giving the decoded JSON: it is awaited
    only once the role check passed, so a caller who may not call never has their body read. ``params``
    are the path's parameters (default: the request's own).
    """
    if not allows(ep, subject):
        await _audit_denial(request, subject, ep, f"role {subject.role.value if subject.role else 'none'} "
                            f"may not {ep.action}")
        raise Forbidden(f"{ep.action} needs role {' or '.join(sorted(r.value for r in ep.roles))}; "
                        f"{subject} has {subject.role.value if subject.role else 'none'}")
    call = Call(request, subject, params=params)
    if ep.query is not None:
        call.query = _parse(ep.query, dict(query or {}), "query parameter")
    elif query:
        raise ValidationProblem(f"unknown query parameter {next(iter(query))!r}")
    if callable(body):
        body = await body()
    if ep.body is not None and body is None and ep.body_optional:
        call.body = ep.body()
    elif ep.body is not None:
        call.body = _parse(ep.body, body, "field")
    return await ep.handler(call)


def _wrap(ep: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            subject = authenticate(request)
        except Unauthorized as exc:
            await _audit_denial(request, Subject("anonymous", request.remote), ep, exc.detail)
            raise

        async def body() -> Any:
            if ep.body is None or (ep.body_optional and not request.can_read_body):
                return None
            return await _json_body(request)

        result = await invoke(ep, request, subject, body=body, query=_query_dict(request))
        if isinstance(result, web.StreamResponse):
            return result
        return web.json_response(_dump(result), status=ep.status, dumps=_dumps)

    handle.__name__ = ep.handler.__name__
    return handle


def _query_dict(request: web.Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in request.query:
        values = request.query.getall(key)
        out[key] = values[0] if len(values) == 1 else values
    return out


async def _json_body(request: web.Request) -> Any:
    if not request.can_read_body:
        raise InvalidInput("a JSON body is required")
    raw = await request.read()  # bounded by the app's client_max_size: larger is a 413
    try:
        return jsonvalue.loads(raw, max_bytes=len(raw))
    except ValueError as exc:
        raise InvalidInput(f"the body is {exc}") from None


def _parse(model: type[BaseModel], data: Any, what: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationProblem(describe_validation(exc, what)) from None


def describe_validation(exc: ValidationError, what: str = "field") -> str:
    """One sentence naming each field at fault, e.g. ``field 'role': Input should be 'admin' or ...``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = f"unknown {what}"
        parts.append(f"{what} {loc!r}: {message}")
    return "; ".join(parts)


def _dump(result: Any) -> Any:
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    if isinstance(result, list):
        return [_dump(item) for item in result]
    if isinstance(result, dict):
        return {key: _dump(value) for key, value in result.items()}
    return result


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


async def _audit_denial(request: web.Request, subject: Subject, ep: Endpoint, reason: str) -> None:
    try:
        async with request.app[DATABASE].connection() as conn:
            # the path as the client wrote it may hold NUL, which PostgreSQL text cannot: escaped
            await audit.audit(conn, subject, ep.action, ep.tags[0], printable(request.path), decision="deny",
                                 outcome="denied", reason=reason)
    except DatabaseUnavailable as exc:
        logger.error("could not audit a denied %s by %s: %s", ep.action, subject, exc.detail)
    logger.warning("denied %s %s to %s: needs %s", request.method, request.path, subject,
                   "/".join(sorted(r.value for r in ep.roles)))
