"""``/v1/`` administration: preferences (policy), tokens and the audit log."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from pydantic import BaseModel, Field, StrictInt

from ... import preferences, tokens
from ...auth import Role
from ...db import audit
from ...db import preferences as preference_rows
from ..keys import CATALOG
from .api import ADMINS, ALL_ROLES, MANAGERS, Call, Strict, endpoint
from .types import Paging, TokenName

READERS = ALL_ROLES - {Role.NODE}


# -- preferences --------------------------------------------------------------


class PreferenceOut(BaseModel):
    key: str
    value: Any
    value_type: str
    version: int = Field(description="0 while the default is in force")
    default: bool
    updated_at: dt.datetime | None
    updated_by: str | None


class PreferenceList(BaseModel):
    preferences: list[PreferenceOut]


class PreferenceSet(Strict):
    value: Any = Field(description="typed per key: number, string, array or boolean")
    expected_version: StrictInt | None = Field(None, ge=0, description="the version you read; stale means 409")
    reason: str | None = Field(None, max_length=500)


@endpoint("GET", "/v1/preferences", summary="Effective policy values with their version, who and when",
          roles=READERS, action="preference.list", response=PreferenceList, tag="admin")
async def list_preferences(call: Call) -> PreferenceList:
    entries = await preferences.entries(call.db)
    return PreferenceList(preferences=[PreferenceOut(**e) for e in entries.values()])


@endpoint("PUT", "/v1/preferences/{key}", summary="Set a policy value (optimistic concurrency, audited)",
          roles=ADMINS, action="preference.update", body=PreferenceSet, response=PreferenceOut, tag="admin")
async def set_preference(call: Call) -> PreferenceOut:
    body: PreferenceSet = call.body
    entry = await preferences.set_preference(call.db, call.param("key"), body.value, call.subject,
                                             expected_version=body.expected_version, reason=body.reason)
    return PreferenceOut(**entry)


class PreferenceChange(BaseModel):
    key: str
    old_value: Any
    new_value: Any
    changed_at: dt.datetime
    changed_by: str
    reason: str | None


class PreferenceHistory(BaseModel):
    changes: list[PreferenceChange]
    next_cursor: str | None


@endpoint("GET", "/v1/preferences/history", summary="Changes of the policy values, newest first (who, when, why)",
          roles=MANAGERS, action="preference.history", query=Paging, response=PreferenceHistory, tag="admin")
async def preference_history(call: Call) -> PreferenceHistory:
    q: Paging = call.query
    async with call.db.connection() as conn:
        rows, cursor = await preference_rows.history(conn, limit=q.limit, cursor=q.cursor)
    return PreferenceHistory(changes=[PreferenceChange(**r) for r in rows], next_cursor=cursor)


# -- tokens -------------------------------------------------------------------


class TokenCreate(Strict):
    name: TokenName
    role: Role
    node_id: uuid.UUID | None = None
    expires_in: str | None = Field(None, pattern=r"^[0-9]{1,9}[smhdw]$", description="e.g. 12h, 30d")

    model_config = Strict.model_config | {"strict": False}  # role and node_id arrive as JSON strings


class TokenOut(BaseModel):
    id: uuid.UUID
    name: str
    role: Role
    node_id: uuid.UUID | None
    created_at: dt.datetime
    created_by: str
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="the secret; shown once, only its sha256 is stored")


class TokenPage(BaseModel):
    tokens: list[TokenOut]
    next_cursor: str | None


@endpoint("POST", "/v1/tokens", summary="Mint a token", roles=ADMINS, action="api_token.create",
          body=TokenCreate, response=TokenCreated, status=201, tag="admin")
async def create_token(call: Call) -> TokenCreated:
    body: TokenCreate = call.body
    lifetime = tokens.parse_duration(body.expires_in) if body.expires_in else None
    secret, row = await tokens.create_token(call.db, name=body.name, role=body.role, subject=call.subject,
                                            node_id=body.node_id, expires_in=lifetime)
    await call.request.app[CATALOG].tokens_changed()  # the token works as we answer
    return TokenCreated(token=secret, **row)


@endpoint("GET", "/v1/tokens", summary="List tokens, revoked ones too, oldest first (never their secrets)",
          roles=ADMINS, action="api_token.list", query=Paging, response=TokenPage, tag="admin")
async def list_tokens(call: Call) -> TokenPage:
    q: Paging = call.query
    rows, cursor = await tokens.list_tokens(call.db, limit=q.limit, cursor=q.cursor)
    return TokenPage(tokens=[TokenOut(**r) for r in rows], next_cursor=cursor)


@endpoint("DELETE", "/v1/tokens/{name}", summary="Revoke a token", roles=ADMINS, action="api_token.revoke",
          response=TokenOut, tag="admin")
async def revoke_token(call: Call) -> TokenOut:
    row = await tokens.revoke_token(call.db, call.param("name"), call.subject)
    await call.request.app[CATALOG].tokens_changed()  # refused by this server as we answer
    return TokenOut(**row)


# -- audit --------------------------------------------------------------------


class AuditQuery(Paging):
    action: str | None = Field(None, pattern=r"^[a-z_]+\.[a-z_]+$")
    subject: str | None = Field(None, max_length=200, description="token:<name>, local:<user>, or a name")
    resource: str | None = Field(None, max_length=500)
    decision: str | None = Field(None, pattern="^(allow|deny)$")
    since: dt.datetime | None = None
    until: dt.datetime | None = None


class AuditEvent(BaseModel):
    id: uuid.UUID
    created_at: dt.datetime
    subject_type: str
    subject_id: str | None
    action: str
    resource_type: str
    resource: str | None
    decision: str
    outcome: str | None
    reason: str | None
    details: dict[str, Any] | None


class AuditPage(BaseModel):
    events: list[AuditEvent]
    next_cursor: str | None


@endpoint("GET", "/v1/audit", summary="The audit log, newest first", roles=MANAGERS, action="audit.list",
          query=AuditQuery, response=AuditPage, tag="admin")
async def list_audit(call: Call) -> AuditPage:
    q: AuditQuery = call.query
    async with call.db.connection() as conn:
        rows, cursor = await audit.audit_page(conn, action=q.action, subject=q.subject, resource=q.resource,
                                                   decision=q.decision, since=q.since, until=q.until,
                                                   limit=q.limit, cursor=q.cursor)
    return AuditPage(events=[AuditEvent(**r) for r in rows], next_cursor=cursor)
