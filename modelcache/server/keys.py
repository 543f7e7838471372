"""Typed application keys: everything the handlers share, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..auth import Subject
from ..config import Settings
from ..digest import Digest
from ..db import Database
from ..store import BlobStore
from .catalog import Catalog
from .blobs.ranges import ByteRange

if TYPE_CHECKING:  # these modules use the keys themselves
    from .hf.index import HfIndex
    from .oci.index import OciIndex
    from .metrics import Metrics
    from .blobs.signing import UrlSigner
    from ..nodes.bell import LoadBell
    from ..downloads.inflight import AnnouncedFile, FlightFile

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
STORE = web.AppKey("store", BlobStore)
CATALOG = web.AppKey("catalog", Catalog)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
OPENAPI = web.AppKey("openapi", dict)
HF_INDEX: web.AppKey[HfIndex] = web.AppKey("hf_index")
OCI_INDEX: web.AppKey[OciIndex] = web.AppKey("oci_index")
SIGNER: web.AppKey[UrlSigner] = web.AppKey("url_signer")
NODE_BELL: web.AppKey[LoadBell] = web.AppKey("node_bell")

# per request, for the access log
SUBJECT = web.RequestKey("subject", Subject)
DIGEST = web.RequestKey("digest", Digest)
RANGE = web.RequestKey("range", ByteRange)
SENT = web.RequestKey("sent", int)
IN_FLIGHT: web.RequestKey[FlightFile | AnnouncedFile] = web.RequestKey("in_flight")  # a blob answered while it is fetched
