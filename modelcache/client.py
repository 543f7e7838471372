"""A small client of the ``/v1/`` API for the admin verbs of the CLI (standard library HTTP)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import (
    Conflict,
    DatabaseUnavailable,
    Forbidden,
    InvalidInput,
    ModelcacheError,
    NotFound,
    Unauthorized,
)

DEFAULT_URL = "http://127.0.0.1:12085"
_PAGE = 200  # the most a /v1 list answers at once

_BY_STATUS: dict[int, type[ModelcacheError]] = {
    400: InvalidInput, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 422: InvalidInput,
    503: DatabaseUnavailable,
}


class Client:
    def __init__(self, url: str | None, token: str | None) -> None:
        self.url = (url or os.environ.get("MODELCACHE_URL") or DEFAULT_URL).rstrip("/")
        self.token = token or os.environ.get("MODELCACHE_TOKEN")
        if not self.token:
            raise InvalidInput("no token: pass --token or set MODELCACHE_TOKEN (mint one with "
                               "`modelcache token create --role admin --name NAME`)")

    def call(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        return self._send(method, path, query, data, headers)

    def every(self, path: str, key: str, query: dict[str, Any] | None = None) -> dict[str, Any]:
        """A ``/v1`` list whole: its pages followed to the last, as one answer (``next_cursor`` null)."""
        rows: list[Any] = []
        cursor = None
        while True:
            body = self.call("GET", path, query={**(query or {}), "limit": _PAGE, "cursor": cursor})
            rows += body[key]
            if (cursor := body["next_cursor"]) is None:
                return {key: rows, "next_cursor": None}

    def upload(self, path: Path, query: dict[str, Any], progress: Callable[[int], None]) -> Any:
        size = path.stat().st_size
        with open(path, "rb") as f:
            reader = _Progress(f, progress)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            return self._send("POST", "/v1/imports", query, reader, headers)

    def _send(self, method: str, path: str, query: dict[str, Any] | None, data: Any,
              headers: dict[str, str]) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None}, doseq=True)
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={**headers, "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=3600) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                problem = json.loads(exc.read())
                detail = problem.get("detail", exc.reason)
                # a problem's reasons (e.g. why selection found no node) belong in the one error line
                if isinstance(problem.get("reasons"), list) and len(problem["reasons"]) > 1:
                    detail += " (" + "; ".join(map(str, problem["reasons"][1:])) + ")"
            except (ValueError, AttributeError):
                detail = exc.reason
            raise _BY_STATUS.get(exc.code, ModelcacheError)(f"{method} {path}: {exc.code} {detail}") from None
        except urllib.error.URLError as exc:
            raise ModelcacheError(f"cannot reach modelcache at {self.url}: {exc.reason}") from None


class _Progress:
    """A file wrapper that reports bytes read, so urllib streams the body and the CLI shows progress."""

    def __init__(self, f: BinaryIO, progress: Callable[[int], None]) -> None:
        self._f = f
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        chunk = self._f.read(1 << 20 if size is None or size < 0 else size)
        self._progress(len(chunk))
        return chunk
