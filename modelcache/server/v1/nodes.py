"""``/v1`` for the node load workflow: registration, heartbeats, availability, load requests (with a
long-poll), selection and placements. A node token acts only for the node it is bound to."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic import Strict as StrictField

from ...auth import Role
from ...db import audit
from ...db import nodes as node_rows
from ...errors import Forbidden, InvalidInput, NotFound
from ...names import MODEL_PATTERN, parse_model_name
from ...nodes import placements, registry, selection
from ..keys import CATALOG, NODE_BELL, SETTINGS
from .api import ALL_ROLES, MANAGERS, Call, Query, Strict, endpoint
from .registry import VersionQuery
from .types import Paging, Version

logger = logging.getLogger(__name__)

READERS = ALL_ROLES - {Role.NODE}
LOAD_STATES = ("pending", "loading", "available", "failed", "cancelled")  # node_load_requests.state
SELF = MANAGERS | {Role.NODE}  # managers, and a node token for its own node (checked in the handler)

_NAME = MODEL_PATTERN[1:-1]  # a model or vendor name, unanchored
UuidText = Annotated[uuid.UUID, StrictField(False)]  # JSON carries a uuid as a string
NodeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")]
LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._/-]{0,63}$")]
Runtime = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=64)]


class Facts(BaseModel):
    """What a node runs with; more keys may be sent and are kept as given."""

    model_config = ConfigDict(extra="allow", strict=True)
    runtimes: list[Runtime] = Field(default_factory=list, max_length=16,
                                    description="ollama, hf, files (what the node agent installs into)")
    gpu_memory_bytes: int | None = Field(None, ge=0)
    free_disk_bytes: int | None = Field(None, ge=0)


class NodeRegister(Strict):
    id: UuidText | None = Field(None, description="generated when absent; an existing id registers again")
    name: NodeName
    labels: Labels = Field(default_factory=dict)
    facts: Facts = Field(default_factory=Facts)


class Heartbeat(Strict):
    facts: Facts | None = Field(None, description="replaces the stored facts when given")


class NodeOut(BaseModel):
    id: uuid.UUID
    name: str
    labels: dict[str, str]
    facts: dict[str, Any]
    status: Literal["ready", "stale"]
    last_seen_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    available_models: int


class PullSettings(BaseModel):
    parallel_parts: int
    part_bytes: int


class NodeConfig(BaseModel):
    cache_url: str
    node_id: uuid.UUID
    token: str = Field(description="the node token's secret: shown once")
    token_name: str
    pull: PullSettings
    runtime_env: dict[str, str] = Field(description=(
        "environment for the node's model runtimes, so that what they fetch by themselves (huggingface_hub, "
        "hf download, llama.cpp -hf) comes from this cache and not from the public internet"))


def runtime_env(public_url: str, secret: str) -> dict[str, str]:
    """What points a node's runtimes at the cache: the Hugging Face mirror and the token it takes.
    Ollama has no such setting: its models come through the agent (and --ollama-alias)."""
    return {"HF_ENDPOINT": f"{public_url}/hf", "HF_TOKEN": secret}


class NodeRegistered(BaseModel):
    node: NodeOut
    config: NodeConfig


class NodePage(BaseModel):
    nodes: list[NodeOut]
    next_cursor: str | None


class AvailabilityDetails(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    runtime: str | None = Field(None, max_length=64)
    bytes_done: int | None = Field(None, ge=0)
    error: str | None = Field(None, max_length=2000)


class AvailabilityIn(Strict):
    model_version_id: UuidText
    status: Literal["available", "loading", "failed", "evicted"]
    details: AvailabilityDetails = Field(default_factory=AvailabilityDetails)


class AvailabilityOut(BaseModel):
    node_id: uuid.UUID
    node_name: str
    model_version_id: uuid.UUID
    model: str
    vendor: str | None
    version: str
    status: str
    last_checked_at: dt.datetime
    details: dict[str, Any] | None


class AvailabilityPage(BaseModel):
    availability: list[AvailabilityOut]
    next_cursor: str | None


class NodeDetail(NodeOut):
    availability: list[AvailabilityOut]


class ArtifactRef(BaseModel):
    id: uuid.UUID
    digest: str
    size_bytes: int
    artifact_type: str


class LoadOut(BaseModel):
    id: uuid.UUID
    node_id: uuid.UUID
    model_version_id: uuid.UUID
    model: str
    vendor: str | None
    version: str
    state: str
    artifact: ArtifactRef | None
    requested_by: str
    placement_id: uuid.UUID | None
    created_at: dt.datetime
    updated_at: dt.datetime
    error: str | None


class LoadList(BaseModel):
    loads: list[LoadOut]


class LoadPage(BaseModel):
    loads: list[LoadOut]
    next_cursor: str | None


class LoadsQuery(Paging):
    state: str | None = Field(None, pattern=f"^({'|'.join(LOAD_STATES)})$")
    node_id: uuid.UUID | None = None


class LoadQuery(Query):
    wait: int = Field(0, ge=0, le=60, description="seconds to wait for a request when none is open")


class LoadCreate(Strict):
    model_version_id: UuidText


class Requirements(Strict):
    """The capability query of ``GET /v1/versions``, as a JSON object."""

    min_context_length: int | None = Field(None, ge=0)
    tool_use: bool | None = None
    vision: bool | None = None
    json_mode: bool | None = None
    gpu_required: bool | None = None
    language: list[str] | str | None = None

    def capabilities(self) -> dict[str, Any]:
        # one rule: the version query's own translation into capability keys
        return VersionQuery.model_validate(self.model_dump(exclude_none=True)).requirements()


class SelectIn(Strict):
    requirements: Requirements = Field(default_factory=Requirements)
    model: str | None = Field(None, pattern=f"^({_NAME}/)?{_NAME}$", description="[vendor/]name")
    version: Version | None = None
    nodes: list[UuidText] | None = Field(None, max_length=1000, description="candidate node ids; all when absent")


class VersionRef(BaseModel):
    id: uuid.UUID
    model: str
    vendor: str | None
    version: str


class NodeRef(BaseModel):
    id: uuid.UUID
    name: str


class HfPull(BaseModel):
    endpoint: str
    repo: str
    revision: str


class PullOut(BaseModel):
    curl: str
    ollama: str | None
    hf: HfPull | None


class SelectOut(BaseModel):
    version: VersionRef
    artifact: ArtifactRef
    node: NodeRef
    action: Literal["use", "load"]
    load_request: LoadOut | None
    pull: PullOut
    reasons: list[str]


class PlacementIn(Strict):
    selector: Labels = Field(description="labels a node must all carry; {} matches every node")
    model_version_ids: list[UuidText] | None = Field(None, max_length=100)
    requirements: Requirements | None = Field(None, description="instead of ids: the newest promoted version "
                                                                "meeting these")


class PlacementOut(BaseModel):
    id: uuid.UUID
    selector: dict[str, str]
    model_version_ids: list[uuid.UUID]
    requirements: dict[str, Any] | None = Field(description="as capability keys (context_length, tool_use, ...)")
    resolved_version_ids: list[uuid.UUID]
    nodes_matching: int
    nodes_ready: int
    nodes_stale: int
    created_at: dt.datetime
    created_by: str


class PlacementCreated(PlacementOut):
    load_requests: list[LoadOut]


class PlacementPage(BaseModel):
    placements: list[PlacementOut]
    next_cursor: str | None


# -- shaping answers ------------------------------------------------------------------


def node_out(call: Call, row: dict) -> NodeOut:
    fields = {k: v for k, v in row.items() if k in NodeOut.model_fields}
    return NodeOut(status=registry.status_of(row, call.request.app[SETTINGS]), **fields)


def availability_out(row: dict) -> AvailabilityOut:
    return AvailabilityOut(model=row["model_name"], vendor=row["model_vendor"], **{
        k: v for k, v in row.items() if k in AvailabilityOut.model_fields and k not in ("model", "vendor")})


def load_out(row: dict) -> LoadOut:
    artifact = None
    if row["artifact_id"] is not None:
        artifact = ArtifactRef(id=row["artifact_id"], digest=f"sha256:{row['artifact_sha256']}",
                               size_bytes=row["artifact_size_bytes"], artifact_type=row["artifact_type"])
    fields = {k: v for k, v in row.items() if k in LoadOut.model_fields and k not in ("artifact", "model", "vendor")}
    return LoadOut(model=row["model_name"], vendor=row["model_vendor"], artifact=artifact, **fields)


def _uuid(call: Call, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(call.param(name))
    except ValueError:
        raise NotFound(f"no such {name.removesuffix('_id')}: {call.param(name)!r} is not an id") from None


async def _node_id(call: Call, action: str) -> uuid.UUID:
    """The node of the path; a node token may act for its own node only (a denial is audited)."""
    node_id = _uuid(call, "node_id")
    subject = call.subject
    if subject.role is Role.NODE and subject.node_id != str(node_id):
        reason = (f"node token {subject.id} is bound to node {subject.node_id or 'none'}, "
                  f"not {node_id}")
        async with call.db.connection() as conn:
            await audit.audit(conn, subject, action, "node", str(node_id), decision="deny", outcome="denied",
                              reason=reason)
        logger.warning("denied %s %s to %s: %s", call.request.method, call.request.path, subject, reason)
        raise Forbidden(f"{action} for node {node_id}: {reason}")
    return node_id


def _ring(call: Call, loads: list[dict]) -> None:
    for load in loads:
        call.request.app[NODE_BELL].ring(str(load["node_id"]))


async def _reconcile(call: Call, node_id: uuid.UUID) -> None:
    made = await placements.reconcile_node(call.db, call.request.app[SETTINGS], node_id, call.subject)
    _ring(call, made)


# -- nodes ------------------------------------------------------------------------------


@endpoint("POST", "/v1/nodes", summary="Register a node (again): answers its config with a new node token",
          roles=MANAGERS, action="node.register", body=NodeRegister, response=NodeRegistered, status=201,
          tag="nodes")
async def register_node(call: Call) -> NodeRegistered:
    b: NodeRegister = call.body
    settings = call.request.app[SETTINGS]
    done = await registry.register(call.db, b.id or uuid.uuid4(), b.name, b.labels, b.facts.model_dump(),
                                   call.subject)
    await call.request.app[CATALOG].tokens_changed()  # the token works as we answer
    await _reconcile(call, done.node["id"])
    config = NodeConfig(cache_url=settings.public_url, node_id=done.node["id"], token=done.secret,
                        token_name=done.token_name,
                        pull=PullSettings(parallel_parts=settings.nodes.pull_parallel_parts,
                                          part_bytes=settings.nodes.pull_part_bytes),
                        runtime_env=runtime_env(settings.public_url, done.secret))
    return NodeRegistered(node=node_out(call, done.node), config=config)


@endpoint("GET", "/v1/nodes", summary="List nodes, with their status (ready or stale)", roles=READERS,
          action="node.list", query=Paging, response=NodePage, tag="nodes")
async def list_nodes(call: Call) -> NodePage:
    q: Paging = call.query
    async with call.db.connection() as conn:
        rows, cursor = await node_rows.list_nodes(conn, limit=q.limit, cursor=q.cursor)
    return NodePage(nodes=[node_out(call, r) for r in rows], next_cursor=cursor)


@endpoint("GET", "/v1/nodes/{node_id}", summary="A node, with what it holds", roles=READERS | {Role.NODE},
          action="node.get", response=NodeDetail, tag="nodes")
async def get_node(call: Call) -> NodeDetail:
    node_id = await _node_id(call, "node.get")
    node = await registry.get(call.db, node_id)
    held = await registry.availability(call.db, node_id=node_id)
    return NodeDetail(**node_out(call, node).model_dump(), availability=[availability_out(a) for a in held])


@endpoint("DELETE", "/v1/nodes/{node_id}", summary="Remove a node: revokes its tokens, cancels its open load "
          "requests, forgets what it held", roles=MANAGERS, action="node.delete", response=NodeOut, tag="nodes")
async def delete_node(call: Call) -> NodeOut:
    node = await registry.delete(call.db, _uuid(call, "node_id"), call.subject)
    await call.request.app[CATALOG].tokens_changed()
    return node_out(call, {**node, "available_models": 0})


@endpoint("POST", "/v1/nodes/{node_id}/heartbeat", summary="A node is alive (and its facts, when sent)",
          roles=SELF, action="node.heartbeat", body=Heartbeat, body_optional=True, response=NodeOut, tag="nodes")
async def heartbeat(call: Call) -> NodeOut:
    node_id = await _node_id(call, "node.heartbeat")
    facts = call.body.facts.model_dump() if call.body.facts is not None else None
    node = await registry.heartbeat(call.db, call.request.app[SETTINGS], node_id, facts, call.subject)
    await _reconcile(call, node_id)
    return node_out(call, node)


# -- availability -----------------------------------------------------------------------


@endpoint("POST", "/v1/nodes/{node_id}/availability", summary="Report a model version's status on the node",
          roles=SELF, action="node_availability.report", body=AvailabilityIn, response=AvailabilityOut, tag="nodes")
async def report_availability(call: Call) -> AvailabilityOut:
    node_id = await _node_id(call, "node_availability.report")
    b: AvailabilityIn = call.body
    row, _ = await registry.report(call.db, node_id, b.model_version_id, b.status,
                                   b.details.model_dump(exclude_none=True), call.subject)
    if b.status == "evicted":  # a placement may want it back
        await _reconcile(call, node_id)
    return availability_out(row)


async def _availability_page(call: Call, **of: uuid.UUID) -> AvailabilityPage:
    q: Paging = call.query
    held, cursor = await registry.list_availability(call.db, limit=q.limit, cursor=q.cursor, **of)
    return AvailabilityPage(availability=[availability_out(a) for a in held], next_cursor=cursor)


@endpoint("GET", "/v1/nodes/{node_id}/availability", summary="What a node holds, by model version",
          roles=READERS | {Role.NODE}, action="node_availability.list", query=Paging, response=AvailabilityPage,
          tag="nodes")
async def node_availability(call: Call) -> AvailabilityPage:
    return await _availability_page(call, node_id=await _node_id(call, "node_availability.list"))


@endpoint("GET", "/v1/versions/{version_id}/nodes", summary="Which nodes hold a model version, and how",
          roles=READERS, action="node_availability.list", query=Paging, response=AvailabilityPage, tag="nodes")
async def version_availability(call: Call) -> AvailabilityPage:
    return await _availability_page(call, version_id=_uuid(call, "version_id"))


@endpoint("GET", "/v1/availability", summary="What every node holds, by model version (the nodes x versions "
          "grid), by node in the order they registered", roles=READERS, action="node_availability.list",
          query=Paging, response=AvailabilityPage, tag="nodes")
async def all_availability(call: Call) -> AvailabilityPage:
    return await _availability_page(call)


# -- load requests ----------------------------------------------------------------------


@endpoint("GET", "/v1/nodes/{node_id}/loads", summary="The node's open load requests; ?wait=N long-polls "
          "up to N seconds for one", roles=SELF, action="node_load.list", query=LoadQuery, response=LoadList,
          tag="nodes")
async def list_loads(call: Call) -> LoadList:
    node_id = await _node_id(call, "node_load.list")
    loads = await registry.wait_for_loads(call.db, call.request.app[NODE_BELL], node_id, call.query.wait)
    return LoadList(loads=[load_out(r) for r in loads])


@endpoint("GET", "/v1/loads", summary="Load requests of every node (or one), open and ended, newest first",
          roles=READERS, action="node_load.list", query=LoadsQuery, response=LoadPage, tag="nodes")
async def list_all_loads(call: Call) -> LoadPage:
    q: LoadsQuery = call.query
    async with call.db.connection() as conn:
        rows, cursor = await node_rows.list_loads(conn, state=q.state, node_id=q.node_id, limit=q.limit,
                                                  cursor=q.cursor)
    return LoadPage(loads=[load_out(r) for r in rows], next_cursor=cursor)


@endpoint("POST", "/v1/nodes/{node_id}/loads", summary="Ask a node to load a model version (an open request "
          "for it is answered instead of a new one)", roles=MANAGERS, action="node_load.request", body=LoadCreate,
          response=LoadOut, status=201, tag="nodes")
async def create_load(call: Call) -> LoadOut:
    load, _ = await registry.create_load(call.db, _uuid(call, "node_id"), call.body.model_version_id, call.subject)
    _ring(call, [load])
    return load_out(load)


@endpoint("POST", "/v1/nodes/{node_id}/loads/{load_id}/ack", summary="The node took a load request up "
          "(state loading)", roles=SELF, action="node_load.ack", response=LoadOut, tag="nodes")
async def ack_load(call: Call) -> LoadOut:
    node_id = await _node_id(call, "node_load.ack")
    return load_out(await registry.ack(call.db, node_id, _uuid(call, "load_id"), call.subject))


# -- selection --------------------------------------------------------------------------


def _model(text: str | None) -> tuple[str | None, str | None]:
    if text is None:
        return None, None
    vendor, _, name = text.rpartition("/")
    try:
        return (parse_model_name(vendor, "vendor") if vendor else None), parse_model_name(name)
    except InvalidInput as exc:
        raise InvalidInput(f"field 'model': {exc.detail}") from None


@endpoint("POST", "/v1/select", summary="Choose a model version, artifact and node for capability "
          "requirements: use (the node has it) or load (a load request is made)", roles=MANAGERS,
          action="model_version.select", body=SelectIn, response=SelectOut, tag="nodes")
async def select(call: Call) -> SelectOut:
    b: SelectIn = call.body
    vendor, model = _model(b.model)
    req = selection.Request(b.requirements.capabilities(), model, vendor, b.version,
                            list(dict.fromkeys(b.nodes)) if b.nodes is not None else None)
    settings = call.request.app[SETTINGS]
    decision = await selection.select(call.db, settings, req, call.subject)
    if decision.load is not None:
        _ring(call, [decision.load])
    v, a = decision.version, decision.artifact
    return SelectOut(
        version=VersionRef(id=v["id"], model=v["model_name"], vendor=v["model_vendor"], version=v["version"]),
        artifact=ArtifactRef(id=a["id"], digest=f"sha256:{a['sha256']}", size_bytes=a["size_bytes"],
                             artifact_type=a["artifact_type"]),
        node=NodeRef(id=decision.node["id"], name=decision.node["name"]), action=decision.action,
        load_request=load_out(decision.load) if decision.load else None,
        pull=PullOut(**selection.pull_instructions(decision, settings.public_url)), reasons=decision.reasons)


# -- placements -------------------------------------------------------------------------


def placement_out(row: dict, model: type[PlacementOut] = PlacementOut, **extra: Any) -> PlacementOut:
    return model(**{k: v for k, v in row.items() if k in model.model_fields}, **extra)


@endpoint("POST", "/v1/placements", summary="Declare that nodes with these labels hold these versions: load "
          "requests are made for every matching node, now and as nodes join", roles=MANAGERS,
          action="placement.create", body=PlacementIn, response=PlacementCreated, status=201, tag="nodes")
async def create_placement(call: Call) -> PlacementCreated:
    b: PlacementIn = call.body
    if (b.model_version_ids is None) == (b.requirements is None):
        raise InvalidInput("give model_version_ids or requirements (one of them)")
    if b.requirements is not None and not b.requirements.capabilities():
        raise InvalidInput("requirements name no capability: give at least one, or model_version_ids")
    settings = call.request.app[SETTINGS]
    placement, made = await placements.create(
        call.db, settings, b.selector, list(dict.fromkeys(b.model_version_ids or [])),
        b.requirements.capabilities() if b.requirements is not None else None, call.subject)
    _ring(call, made)
    counted = await placements.with_counts(call.db, settings, placement["id"])
    return placement_out(counted, PlacementCreated, load_requests=[load_out(m) for m in made])


@endpoint("GET", "/v1/placements", summary="Placements, oldest first, with how many matching nodes are ready",
          roles=READERS, action="placement.list", query=Paging, response=PlacementPage, tag="nodes")
async def list_placements(call: Call) -> PlacementPage:
    q: Paging = call.query
    rows, cursor = await placements.list_with_counts(call.db, call.request.app[SETTINGS], limit=q.limit,
                                                     cursor=q.cursor)
    return PlacementPage(placements=[placement_out(r) for r in rows], next_cursor=cursor)


@endpoint("DELETE", "/v1/placements/{placement_id}", summary="Forget a placement (its load requests stay)",
          roles=MANAGERS, action="placement.delete", response=PlacementOut, tag="nodes")
async def delete_placement(call: Call) -> PlacementOut:
    row = await placements.delete(call.db, _uuid(call, "placement_id"), call.subject)
    return placement_out({**row, "resolved_version_ids": [], "nodes_matching": 0, "nodes_ready": 0,
                          "nodes_stale": 0})
