"""The OpenAPI 3.1 description of ``/v1/``, built from the endpoint declarations in ``api.py``."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter

from ... import __version__
from .api import ENDPOINTS, Endpoint
from ..keys import OPENAPI

_PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                   "detail": {"type": "string"}, "instance": {"type": "string"}},
}

_ERRORS = {
    "400": "malformed input (bad JSON, invalid digest or id)",
    "401": "no valid token",
    "403": "the token's role may not do this (audited)",
    "404": "not found",
    "409": "conflict (stale version, pinned, in use, already exists)",
    "413": "body too large",
    "422": "a field or parameter failed validation",
    "503": "database unavailable",
}

_PARAM = re.compile(r"{(\w+)}")


def build() -> dict[str, Any]:
    components: dict[str, Any] = {"Problem": _PROBLEM}
    paths: dict[str, Any] = {}
    for ep in ENDPOINTS:
        paths.setdefault(ep.path, {})[ep.method.lower()] = _operation(ep, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "modelcache management API", "version": __version__,
                 "description": "Model artifact cache: registry, artifact actions, uploads, policy, tokens, "
                                "audit. Errors are RFC 9457 application/problem+json."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }


def _schema(model: Any, components: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    components.update(schema.pop("$defs", {}))
    if isinstance(model, type) and issubclass(model, BaseModel):
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}
    return schema


def _operation(ep: Endpoint, components: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": ep.handler.__name__,
        "summary": ep.summary,
        "tags": ep.tags,
        "description": f"Roles: {', '.join(sorted(r.value for r in ep.roles))}. Audit action: `{ep.action}`.",
        "parameters": [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                       for name in _PARAM.findall(ep.path)],
        "responses": {str(ep.status): {"description": "success", "content": {
            "application/json": {"schema": _schema(ep.response, components)}}}},
    }
    for code, text in _ERRORS.items():
        content: dict[str, Any] = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        if code == "400":  # aiohttp answers requests it cannot parse (an over-long URL) in plain text
            content["text/plain"] = {"schema": {"type": "string"}}
        op["responses"][code] = {"description": text, "content": content}
    if ep.query is not None:
        schema = ep.query.model_json_schema()
        required = set(schema.get("required", []))
        for name, prop in schema["properties"].items():
            op["parameters"].append({"name": name, "in": "query", "required": name in required,
                                     "schema": _inline(prop, schema), "style": "form", "explode": True})
    if ep.body is not None:
        op["requestBody"] = {"required": not ep.body_optional, "content": {"application/json": {
            "schema": _schema_validation(ep.body, components)}}}
    elif ep.streamed_body:
        op["requestBody"] = {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}
    return op


def _schema_validation(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    name = f"{model.__name__}Input"
    components[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


def _inline(prop: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
    """Query parameter schemas must be self-contained."""
    ref = prop.get("$ref")
    if ref:
        return parent["$defs"][ref.rsplit("/", 1)[1]]
    return prop


async def serve_openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])
