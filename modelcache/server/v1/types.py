"""The field types of ``/v1`` requests, built from the parsers every other edge uses.

A name, version, digest or artifact type given to the API is checked by the
same function as one given to the CLI, the import folder or ``/v2`` and
``/hf`` (``names.py``, ``digest.py``, ``formats``), so the rules cannot drift;
a value at fault is a 422 naming the field, and the OpenAPI document shows
the rule as a pattern.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

from ... import names
from ...auth import TOKEN_NAME_PATTERN, parse_token_name
from ...digest import SHA256_PATTERN, Digest
from ...errors import InvalidInput
from ...formats import ARTIFACT_TYPES, parse_artifact_type
from ..paging import parse_count
from .api import Query

MAX_LIMIT = 200


def _checked(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A pydantic validator from one of our parsers: InvalidInput becomes a 422 naming the field."""

    def check(value: Any) -> Any:
        try:
            return parse(value)
        except InvalidInput as exc:
            raise ValueError(exc.detail) from None

    return check


def _file_name(text: str) -> str:
    """A file's name as the uploader gives it, for the record and the log: no path, no control character."""
    if not 1 <= len(text) <= 255 or "/" in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise InvalidInput(f"invalid filename {text[:100]!r}: 1-255 characters, no '/' and no control character")
    return text


def _limit(value: Any) -> Any:
    return parse_count(value, "limit", 1, MAX_LIMIT) if isinstance(value, str) else value


ModelName = Annotated[str, AfterValidator(_checked(names.parse_model_name)),
                      WithJsonSchema({"type": "string", "pattern": names.MODEL_PATTERN})]
Version = Annotated[str, AfterValidator(_checked(names.parse_version)),
                    WithJsonSchema({"type": "string", "pattern": names.VERSION_PATTERN})]
DigestText = Annotated[str, AfterValidator(_checked(lambda text: str(Digest.parse(text)))),
                       WithJsonSchema({"type": "string", "pattern": SHA256_PATTERN})]
ArtifactType = Annotated[str, AfterValidator(_checked(parse_artifact_type)),
                         WithJsonSchema({"type": "string", "enum": list(ARTIFACT_TYPES)})]
FileName = Annotated[str, AfterValidator(_checked(_file_name)),
                     WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 255})]
TokenName = Annotated[str, AfterValidator(_checked(parse_token_name)),
                      WithJsonSchema({"type": "string", "pattern": TOKEN_NAME_PATTERN})]
Limit = Annotated[int, BeforeValidator(_checked(_limit)),
                  WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50})]


class Paging(Query):
    """A list's query: how many per page, and the cursor of the next page."""

    limit: Limit = 50
    cursor: str | None = Field(None, max_length=200)
