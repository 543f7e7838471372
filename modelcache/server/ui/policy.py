"""Policy: the preferences with their history; admins edit them through ``PUT /v1/preferences/{key}``
with the version they read, so a stale edit is refused (409) and the page shows the value now in force."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy

from ... import preferences
from ...errors import Conflict, InvalidInput
from ..v1 import admin
from ..v1.api import ValidationProblem
from .pages import Ui, form, page, render, see_other

HISTORY_SHOWN = 100


async def _context(request: web.Request, ui: Ui) -> dict[str, Any]:
    listed: admin.PreferenceList = await ui.invoke(admin.list_preferences)
    history = None  # who changed what is the audit's: shown to the roles /v1 shows it to
    if ui.may(admin.preference_history):
        history = (await ui.invoke(admin.preference_history, query={"limit": str(HISTORY_SHOWN)})).changes
    return {"preferences": listed.preferences, "history": history, "editable": ui.may(admin.set_preference),
            "descriptions": {key: spec.description for key, spec in preferences.KEYS.items()},
            "shown": shown, "as_text": as_text, "refusal": None, "refused_key": None}


def shown(value: Any) -> str:
    """A value as JSON, the way the API and the CLI show it."""
    return json.dumps(value)


def as_text(value: Any, value_type: str) -> str:
    """A value as the edit form holds it: arrays one item per line, the rest as written."""
    if value_type == "array":
        return "\n".join(str(v) for v in value)
    if value_type == "boolean":
        return "true" if value else "false"
    return str(value)


def parse_text(text: str, value_type: str) -> Any:
    """The edit form's text as a value of ``value_type``; the key's own check (in /v1) does the rest."""
    text = text.strip()
    if value_type == "number":
        try:
            return int(text)
        except ValueError:
            raise InvalidInput(f"expected a whole number, got {text!r}") from None
    if value_type == "boolean":
        if text not in ("true", "false"):
            raise InvalidInput(f"expected true or false, got {text!r}")
        return text == "true"
    if value_type == "array":
        return [line.strip() for line in text.splitlines() if line.strip()]
    return text


@page("/ui/policy", "policy.html")
async def policy(request: web.Request, ui: Ui) -> dict[str, Any]:
    return await _context(request, ui)


@form("/ui/policy/{key}")
async def edit(request: web.Request, ui: Ui, data: MultiDictProxy) -> web.StreamResponse:
    """Set one preference through /v1 (admins only: anyone else is refused there, 403, and audited)."""
    key = request.match_info["key"]

    async def body() -> dict[str, Any]:  # read only once /v1 let this role edit (a forged form is a 403 first)
        spec = preferences.parse_key(key)
        version = data.get("expected_version", "")
        return {"value": parse_text(str(data.get("value", "")), spec.value_type),
                "expected_version": int(version) if isinstance(version, str) and version.isdigit() else None,
                "reason": str(data.get("reason", "")).strip() or None}

    try:
        done: admin.PreferenceOut = await ui.invoke(admin.set_preference, params={"key": key}, body=body)
    except (Conflict, InvalidInput, ValidationProblem) as exc:
        context = await _context(request, ui)
        refusal = exc.detail
        if isinstance(exc, Conflict):
            current = next((p for p in context["preferences"] if p.key == key), None)
            if current is not None:
                refusal += (f". It is now {shown(current.value)} (version {current.version}, set by "
                            f"{current.updated_by or 'default'}); your edit was not saved.")
        context.update(refusal=refusal, refused_key=key)
        return render(request, "policy.html", {**ui.context(), **context}, status=exc.status)
    ui.tell(f"{key} is now {shown(done.value)} (version {done.version}).")
    return see_other("/ui/policy")
