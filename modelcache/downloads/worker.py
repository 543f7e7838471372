"""The download jobs one process runs (``modelcache run`` or ``modelcache fetchd``).

Jobs are claimed from PostgreSQL (``db/downloads.py``: ``FOR UPDATE SKIP
LOCKED`` plus an advisory lock held on this worker's own connection while the
transfer runs, so two processes never run one job and a job whose process died
is taken over at once). Workers wake on ``NOTIFY modelcache_downloads`` and
look anyway every ``downloads.poll_seconds``.

The bytes go through the import road: :func:`~modelcache.imports.ingest_stream`
hashes them while writing a resumable partial file in ``tmp/downloads/``, then
:func:`~modelcache.imports.register` records the artifact (and enforces the
eviction policy). Progress and rate are written to the job's row once a second
by a loop beside the transfer, never per chunk, with why the upstream is being
asked again while it is (for the metadata lookup, the plan, too); that loop
also notices a cancel.
A stop (SIGTERM) leaves the job ``running`` and its partial file in place: the
next worker resumes it from the bytes on disk, checked against the upstream's
validator with ``If-Range``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from .. import eviction, preferences
from ..artifacts import remove_unregistered
from ..config import Settings
from ..db import Database, audit, downloads
from ..digest import Digest
from ..errors import ChecksumError, DatabaseUnavailable, ModelcacheError
from ..formats.ollama import DEFAULT_NAMESPACE, ModelName, ModelsDir
from ..hashing import CHUNK
from ..formats import folder_files
from ..imports import ImportRequest, Ingested, ingest_ollama, ingest_path, ingest_stream, register
from ..imports.ingest import folder_manifest
from ..store import BlobStore
from .plans import Plan, RemoteFile, resolve
from .policy import HopPolicy, check_allowed
from .requests import RESOURCE, label, requester
from .sources import Source, find_source
from .flight import may_start, shared_result
from .inflight import FLIGHTS, FlightFile, FlightJob, remove_stale_announcements
from .transfer import Transfer, fetch, open_session

logger = logging.getLogger(__name__)

PROGRESS_SECONDS = 1.0
AUTO_PROMOTE = "models.import.auto_promote"


class DownloadWorker:
    """Claims and runs download jobs until :meth:`stop`."""

    def __init__(self, settings: Settings, db: Database, store: BlobStore | None = None) -> None:
        self.settings = settings
        self.db = db
        self.store = store or BlobStore(settings.data_dir)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._jobs: dict[uuid.UUID, asyncio.Task] = {}
        self._transfers: dict[uuid.UUID, Transfer] = {}
        self._cancelled: set[uuid.UUID] = set()
        self._job_sources: dict[uuid.UUID, str] = {}  # the source of each job running here, for its cap
        self._lock: Any = None  # the connection holding this worker's job locks

    async def start(self) -> None:
        await asyncio.to_thread(self.store.downloads_dir.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(remove_stale_announcements, self.store)  # what a killed process left
        self._tasks = [
            asyncio.create_task(self.db.listen([downloads.CHANNEL], self._notified, self._reconnected, self._stop),
                                name="downloads-listen"),
            asyncio.create_task(self._claim_forever(), name="downloads-claim"),
        ]
        logger.info("downloads: up to %d at once, sources: %s", self.settings.downloads.workers,
                    ", ".join(f"{s.id} ({s.kind} {s.url})" for s in self.settings.sources.values()) or "none")

    async def stop(self) -> None:
        """Stop claiming, stop running transfers (they stay ``running``, resumable), close the connections."""
        self._stop.set()
        self._wake.set()
        # not cancelled at once: each loop sees the stop within a second and closes its own connection
        done, pending = await asyncio.wait(self._tasks, timeout=10)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _notified(self, channel: str, payload: str) -> None:
        self._wake.set()

    async def _reconnected(self) -> None:
        self._wake.set()  # look for what was queued while notifications were lost

    async def _claim_forever(self) -> None:
        while not self._stop.is_set():
            try:
                async with self.db.dedicated_connection() as lock:
                    self._lock = lock
                    while not self._stop.is_set():
                        while len(self._jobs) < self.settings.downloads.workers:
                            job = await self._claim()
                            if job is None:
                                break
                            self._jobs[job["id"]] = asyncio.create_task(self._supervise(job),
                                                                        name=f"download-{job['id']}")
                        await self._sleep()
                        await lock.execute("SELECT 1")  # the locks live as long as this connection
                    await self._stop_jobs()  # before the connection holding their locks closes
            except (DatabaseUnavailable, OSError) as exc:
                logger.warning("downloads: lost the database (%s); running transfers stop and resume later",
                               getattr(exc, "detail", exc))
            except asyncio.CancelledError:
                await self._stop_jobs()
                raise
            except Exception as exc:  # psycopg errors on the lock connection
                logger.warning("downloads: the job-lock connection failed (%s); transfers stop and resume later",
                               str(exc).strip() or type(exc).__name__)
            await self._stop_jobs()
            self._lock = None
            if not self._stop.is_set():
                await asyncio.sleep(1)

    async def _sleep(self) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), self.settings.downloads.poll_seconds)
        except TimeoutError:
            pass
        self._wake.clear()
        for job_id in [j for j, t in self._jobs.items() if t.done()]:
            del self._jobs[job_id]

    async def _stop_jobs(self) -> None:
        """Stop running transfers, leaving them ``running`` with their partial files for the next worker."""
        jobs = list(self._jobs.values())
        for task in jobs:
            task.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        self._jobs.clear()

    async def _claim(self) -> dict | None:
        async with self.db.transaction() as conn:
            for row in await downloads.claim_candidates(conn):
                if row["id"] in self._jobs or not await may_start(conn, self.settings, row,
                                                                  list(self._job_sources.values())):
                    continue  # ours already, its source busy, or a twin goes first (flight.py)
                if not await downloads.try_own(self._lock, row["id"]):
                    continue  # another process runs it
                self._job_sources[row["id"]] = row["source"]
                claimed = await downloads.update_download(
                    conn, row["id"], ("queued", "running"), state="running", attempts=row["attempts"] + 1,
                    error=None, stamp="started")
                return {**claimed, "resumed": row["state"] == "running" or row["attempts"] > 0}
        return None

    # -- one job ---------------------------------------------------------------

    async def _supervise(self, job: dict) -> None:
        """Run a job's transfer beside its progress loop; record how it ended."""
        job_id = job["id"]
        started = time.monotonic()
        task = asyncio.create_task(self._transfer(job), name=f"transfer-{job_id}")
        last_at, last_bytes, rate = started, None, None
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=PROGRESS_SECONDS)
                if done:
                    break
                transfer = self._transfers.get(job_id)
                if transfer is None:
                    continue
                now = time.monotonic()
                if last_bytes is not None and now > last_at:
                    rate = int(max(transfer.offset - last_bytes, 0) / (now - last_at))
                last_at, last_bytes = now, transfer.offset
                if not await self._progress(job_id, transfer.offset, transfer.total, rate,
                                            getattr(transfer, "retrying", None)):
                    self._cancelled.add(job_id)
                    task.cancel()
            result = task.result()
            # recorded while the job's lock is still held, so no other worker takes it up meanwhile
            if job_id in self._cancelled:
                await self._cancelled_by_user(job)
            else:
                await self._complete(job, result, started)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if job_id in self._cancelled:
                await self._cancelled_by_user(job)
                return
            logger.info("download %s stopped at byte %d; the next worker resumes it from %s", job_id,
                        self._transfers[job_id].offset if job_id in self._transfers else 0,
                        self.store.downloads_dir)
            raise
        except ModelcacheError as exc:
            await self._fail(job, exc.detail, started)
            return
        except Exception as exc:
            logger.exception("download %s failed with an unexpected error", job_id)
            await self._fail(job, f"unexpected error: {type(exc).__name__}: {exc}", started)
            return
        finally:
            self._transfers.pop(job_id, None)
            self._job_sources.pop(job_id, None)
            self._wake.set()  # a job waiting for this one's source or content may start
            await self._disown(job_id)

    async def _transfer(self, job: dict) -> Any:
        job_id = job["id"]
        source = find_source(self.settings, job["source"])
        allowed = (await preferences.effective(self.db))["models.download.allowed_sources"]
        check_allowed(source, allowed)  # the policy may have changed since the request
        shared = await shared_result(self.db, self.store, job)
        if shared is not None:  # a twin fetched the same content while this job waited (flight.py)
            return shared
        if source.kind != "http":
            return await self._transfer_artifact(job, source, allowed)
        url = source.url_for(job["reference"])
        req = ImportRequest.parse(PurePosixPath(job["reference"]).name, job["model_name"], job["version"],
                                  job["model_vendor"], job["artifact_type"], source_uri=url)
        expected = Digest.parse(job["expected_sha256"]) if job["expected_sha256"] else None
        policy = HopPolicy(source, allowed, self.settings.downloads.max_redirects)
        # with an expected sha256 and the upstream's size, the file is in flight like a declared one: a
        # blob GET by that digest streams it (inflight.py). Without one no client can name it before it ends.
        promoted = (await preferences.effective(self.db))[AUTO_PROMOTE] if expected is not None else False
        flights = contextlib.ExitStack()
        flight: FlightFile | None = None

        async def opened(transfer: Transfer, restarted: bool) -> None:
            nonlocal flight
            await eviction.admit(self.db, transfer.total or 0)  # refused (507) before the body is read
            await self._started(job, transfer, resumed=transfer.offset > 0 or job["resumed"] or restarted)
            if expected is None or transfer.total is None:
                return
            if flight is None:
                flight = flights.enter_context(FLIGHTS.job(self.store.root, job_id, [(expected, transfer.total)],
                                                           promoted)).file(expected)
            elif flight.size != transfer.total:  # the upstream's file changed size: not the one expected
                flight.fail(f"{url} is now {transfer.total} bytes, not {flight.size}")

        def on_disk(path: Path, available: int) -> None:
            if flight is not None:
                flight.started(path, available)

        with flights:
            async with open_session(policy, self.settings.downloads) as session:
                transfer = Transfer(session, policy, url, source.token(), settings=self.settings.downloads)
                self._transfers[job_id] = transfer  # its progress, and why it is retrying, reach the row
                temp = await fetch(transfer, self.store, str(job_id), on_open=opened,
                                   on_disk=on_disk if expected is not None else None)
            try:
                ingested = await ingest_stream(self.db, self.store, req, _no_chunks(), expected=expected,
                                               total=transfer.total, temp=temp)
            finally:
                temp.close()  # kept on disk unless committed: the next attempt resumes from it
            if flight is not None:
                flight.verify()  # committed, its sha256 matched: the answers streaming it may end
            return await register(self.db, self.store, req, ingested, requester(job))

    # -- a multi-file artifact (kinds modelcache, huggingface, ollama) ----------

    async def _transfer_artifact(self, job: dict, source: Source, allowed: list[str]) -> Any:
        """Resolve the reference, fetch each file verified into ``tmp/downloads/<job>/``, import them as one.

        The staging folder outlives a stop like the single file's partial does: files already
        verified are kept (``verified.json``), the one in flight resumes from its bytes on disk.
        """
        job_id = job["id"]
        policy = HopPolicy(source, allowed, self.settings.downloads.max_redirects)
        staging = Staging(self.store, str(job_id))
        async with open_session(policy, self.settings.downloads) as session:
            # while the metadata is asked for, why the upstream is asked again reaches the row too (a
            # pull-through miss answers 503 at once from it, pull_through.py); the bytes as the row has them
            lookup = FilesProgress(job.get("bytes_total"))
            lookup.done = job.get("bytes_done") or 0
            self._transfers[job_id] = lookup  # type: ignore[assignment]
            plan = await resolve(source, source.parse(job["reference"]), session, policy, job["artifact_type"],
                                 self.settings.downloads, watch=lookup)
            await eviction.admit(self.db, plan.total or 0)  # refused (507) before any byte moves
            promoted = (await preferences.effective(self.db))[AUTO_PROMOTE]  # as register() will make it
            declared = [(f.digest, f.size) for f in plan.files if f.digest is not None and f.size is not None]
            with FLIGHTS.job(self.store.root, job_id, declared, promoted,
                             plan.manifest if plan.layout == "ollama" else None,
                             {f.path: f.digest for f in plan.files if f.digest is not None}) as flight:
                return await self._fetch_plan(job, session, policy, plan, staging, flight)

    async def _fetch_plan(self, job: dict, session: Any, policy: HopPolicy, plan: Plan, staging: "Staging",
                          flight: FlightJob) -> Any:
        """Each file of the plan verified into the staging folder, then the import and registration (while
        the plan's files are in flight, so a blob GET streams them: ``inflight.py``)."""
        job_id = job["id"]
        verified = await asyncio.to_thread(staging.verified)
        progress = FilesProgress(plan.total)
        self._transfers[job_id] = progress  # type: ignore[assignment]
        await self._started(job, progress, resumed=bool(verified) or job["resumed"])  # type: ignore[arg-type]
        flight.artifact = foreseen_artifact(plan, verified)
        # the files the upstream declares no digest of first (the Hub's small git files, quick): then the
        # artifact's digest, the /hf commit id a client is told with a file still being fetched, is known
        order = sorted(range(len(plan.files)), key=lambda i: plan.files[i].digest is not None)
        for index in order:
            remote = plan.files[index]
            if verified.get(remote.path) and (remote.digest is None or verified[remote.path] == str(remote.digest)):
                progress.done += remote.size or 0
                if (done := flight.file(remote.digest)) is not None:  # verified by an earlier attempt
                    done.started(staging.files / remote.path, done.size)
                    done.verify()
                continue
            digest = await self._fetch_file(job_id, session, policy, plan, index, staging, progress,
                                            flight.file(remote.digest))
            progress.done += remote.size or 0
            progress.current = None
            verified[remote.path] = str(digest)
            await asyncio.to_thread(staging.write_verified, verified)
            flight.artifact = flight.artifact or foreseen_artifact(plan, verified)
        logger.info("download %s: %d files of %s:%s verified; importing them as %s", job_id, len(plan.files),
                    job["source"], job["reference"], label(job))
        wanted = [d for d in (plan.digest, Digest.parse(job["expected_sha256"]) if job["expected_sha256"] else None)
                  if d is not None]
        what = f"{job['source']}:{job['reference']}"
        # the artifact the verified files make, known before a blob is committed: a wrong declared (or
        # expected) digest keeps nothing, and leaves nothing for the start-up sweep
        made = await asyncio.to_thread(staging.artifact_digest, plan, verified)
        for want in wanted:
            if made is not None and made != want:
                raise ChecksumError(what, str(want), str(made))
        req, ingested = await self._ingest_staged(job, plan, staging)
        if flight.artifact is not None and ingested.manifest.digest != flight.artifact:
            logger.warning("download %s: the files make %s, not %s as foreseen (and told /hf clients as its commit "
                           "while it was fetched)", job_id, ingested.manifest.digest, flight.artifact)
        for want in wanted:
            if ingested.manifest.digest != want:  # not foreseen above: the blobs committed go at once
                removed = await remove_unregistered(self.db, self.store, [b.digest for _, b in ingested.files]
                                                    + [ingested.manifest.digest])
                logger.warning("download %s: the files make %s, not %s; removed %d blobs no artifact holds",
                               job_id, ingested.manifest.digest, want, len(removed))
                raise ChecksumError(what, str(want), str(ingested.manifest.digest))
        return await register(self.db, self.store, req, ingested, requester(job))

    async def _fetch_file(self, job_id: uuid.UUID, session: Any, policy: HopPolicy, plan: Plan, index: int,
                          staging: "Staging", progress: "FilesProgress", flight: FlightFile | None) -> Digest:
        """One file of a plan into the staging folder, resumed from its bytes on disk, checked against what
        the upstream declared; a mismatch keeps nothing of it. ``flight``: told how far the bytes on disk
        reach and how the file ended, for the blob GETs streaming it (``inflight.py``)."""
        remote = plan.files[index]
        # the single-file road (parallel ranged parts, the resume sidecar, retries, the budget) into
        # parts/<n>.partial; bytes a past attempt left of another file (the plan changed) are dropped first
        await asyncio.to_thread(staging.claim_part, index, remote)
        transfer = Transfer(session, policy, remote.url, plan.token, settings=self.settings.downloads, auth=plan.auth)
        progress.current = transfer
        temp = await fetch(transfer, self.store, staging.part_name(index),
                           on_disk=flight.started if flight is not None else None)
        try:
            await asyncio.to_thread(temp.finish)
            git_sha1 = await asyncio.to_thread(_git_blob_sha1, temp.path) if remote.git_sha1 else None
            try:
                remote.check(temp.hasher.size, temp.hasher.digest, git_sha1)
            except ChecksumError as exc:
                if flight is not None:
                    flight.fail(exc.detail)
                await asyncio.to_thread(staging.drop_part, index)
                raise
            await asyncio.to_thread(staging.keep, index, remote.path)
        finally:
            temp.close()  # kept on disk unless kept or dropped: the next attempt resumes from it
        if flight is not None:
            flight.moved(staging.files / remote.path)
            flight.verify()
        logger.info("download %s: %s verified (%s, %d bytes)", job_id, remote.path, temp.hasher.digest,
                    temp.hasher.size)
        return temp.hasher.digest

    async def _ingest_staged(self, job: dict, plan: Plan, staging: "Staging") -> tuple[ImportRequest, Ingested]:
        """The verified files through the import road, hard-linked (one set of content checks for every road)."""
        if plan.layout == "ollama":
            models = await asyncio.to_thread(staging.as_ollama_models, plan.manifest)
            req = ImportRequest.parse(models.manifest_path(STAGED_OLLAMA), job["model_name"], job["version"],
                                      job["model_vendor"], "ollama", source_uri=plan.source_uri)
            return req, await ingest_ollama(self.db, self.store, models, STAGED_OLLAMA, link=True)
        path = staging.files / plan.files[0].path if plan.layout == "file" else staging.files
        req = ImportRequest.parse(path, job["model_name"], job["version"], job["model_vendor"],
                                  job["artifact_type"] or plan.artifact_type, move=True, source_uri=plan.source_uri,
                                  inspect=True)
        return req, await ingest_path(self.db, self.store, req)

    async def _progress(self, job_id: uuid.UUID, done: int, total: int | None, rate: int | None,
                        error: str | None = None) -> bool:
        try:
            async with self.db.connection() as conn:
                return await downloads.record_progress(conn, job_id, done, total, rate, error)
        except DatabaseUnavailable as exc:
            logger.warning("download %s: progress not recorded: %s", job_id, exc.detail)
            return True

    async def _disown(self, job_id: uuid.UUID) -> None:
        if self._lock is None:
            return
        try:
            await downloads.disown(self._lock, job_id)
        except Exception as exc:  # a broken lock connection released it already
            logger.debug("download %s: unlock failed: %s", job_id, exc)

    # -- state changes, each audited and logged once ---------------------------

    async def _started(self, job: dict, transfer: Transfer, resumed: bool) -> None:
        verb = "resume" if resumed else "start"
        async with self.db.connection() as conn:
            await audit.audit(conn, requester(job), f"model_download.{verb}", RESOURCE, str(job["id"]),
                              outcome="running",
                              details={"source": job["source"], "reference": job["reference"],
                                       "from_byte": transfer.offset, "bytes_total": transfer.total,
                                       "attempt": job["attempts"]})
        logger.info("download %s %s: %s:%s as %s from byte %d of %s", job["id"],
                    "resumed" if resumed else "started", job["source"], job["reference"], label(job),
                    transfer.offset, transfer.total if transfer.total is not None else "unknown")

    async def _complete(self, job: dict, result: Any, started: float) -> None:
        seconds = time.monotonic() - started
        async with self.db.transaction() as conn:
            row = await downloads.update_download(
                conn, job["id"], ("running",), state="completed", sha256=str(result.digest), error=None,
                artifact_id=result.artifact_id, bytes_done=result.size, bytes_total=result.size,
                rate_bytes_per_second=int(result.size / seconds) if seconds > 0 else None, stamp="finished")
            if row is not None:
                await audit.audit(conn, requester(job), "model_download.complete", RESOURCE, str(job["id"]),
                                  outcome="completed",
                                  details={"source": job["source"], "reference": job["reference"],
                                           "bytes": result.size, "digest": str(result.digest),
                                           "seconds": round(seconds, 3), "artifact_id": str(result.artifact_id)})
        await asyncio.to_thread(self.store.drop_resumable, str(job["id"]))
        if row is None:  # cancelled in its last second: the cancel stands, the artifact stays registered
            logger.info("download %s was cancelled as it completed; %s stays registered", job["id"], result.digest)
            return
        logger.info("download %s completed: %s:%s as %s: %s, %d bytes in %.1fs", job["id"], job["source"],
                    job["reference"], label(job), result.digest, result.size, seconds)

    async def _fail(self, job: dict, reason: str, started: float) -> None:
        seconds = time.monotonic() - started
        transfer = self._transfers.get(job["id"])
        try:
            async with self.db.transaction() as conn:
                row = await downloads.update_download(conn, job["id"], ("running",), state="failed", error=reason,
                                                      stamp="finished")
                if row is not None:
                    await audit.audit(conn, requester(job), "model_download.fail", RESOURCE, str(job["id"]),
                                      outcome="failed", reason=reason,
                                      details={"source": job["source"], "reference": job["reference"],
                                               "bytes": transfer.offset if transfer else row["bytes_done"],
                                               "digest": None, "seconds": round(seconds, 3)})
        except DatabaseUnavailable as exc:
            logger.error("download %s failed (%s) and could not be recorded: %s", job["id"], reason, exc.detail)
            return  # still running in the registry: the next worker tries again
        await asyncio.to_thread(self.store.drop_resumable, str(job["id"]))
        logger.warning("download %s failed: %s:%s as %s: %s", job["id"], job["source"], job["reference"],
                       label(job), reason)

    async def _cancelled_by_user(self, job: dict) -> None:
        self._cancelled.discard(job["id"])
        await asyncio.to_thread(self.store.drop_resumable, str(job["id"]))
        logger.info("download %s cancelled while running: %s:%s; its partial file was removed", job["id"],
                    job["source"], job["reference"])


# an Ollama models dir made of a staging folder names its one model so
STAGED_OLLAMA = ModelName("download", DEFAULT_NAMESPACE, "model", "latest")


class FilesProgress:
    """The bytes of a multi-file download so far, read by the progress loop as a Transfer's are (before the
    plan is known: the row's, ``current`` the metadata GET in flight)."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.done = 0  # in the files verified so far
        self.current: Transfer | None = None

    @property
    def offset(self) -> int:
        return self.done + (self.current.offset if self.current is not None else 0)

    @property
    def retrying(self) -> str | None:
        """Why the upstream is being asked again for the file in flight, while it is (for the job's row)."""
        return self.current.retrying if self.current is not None else None


class Staging:
    """A multi-file download's folder, ``tmp/downloads/<job>/``, kept across restarts (blocking methods)::

        parts/<n>.partial   file n of the plan so far, fetched by transfer.fetch (resumable, in parallel
                            ranged parts when large); parts/<n>.json its sidecar, <n>.origin.json
                            the URL and digest it is of
        files/<path>        the verified files, laid out as the artifact names them
        verified.json       path -> digest of each verified file
    """

    def __init__(self, store: BlobStore, job: str) -> None:
        self.store = store
        self.root = store.downloads_dir / job
        self.parts = self.root / "parts"
        self.files = self.root / "files"

    def verified(self) -> dict[str, str]:
        found = _read_notes(self.root / "verified.json")
        # a file listed but gone (the import moved it, then the process stopped) is fetched again
        return {p: d for p, d in found.items() if (self.files / p).is_file()}

    def write_verified(self, verified: dict[str, str]) -> None:
        _write_notes(self.root / "verified.json", verified)

    def part_name(self, index: int) -> str:
        """File ``index``'s download name for :func:`~.transfer.fetch` (``BlobStore.partial_path``)."""
        return f"{self.root.name}/parts/{index}"

    def claim_part(self, index: int, remote: RemoteFile) -> None:
        """Make ``parts/<n>`` file ``remote``'s: what an earlier attempt left there of another file (the
        upstream's plan changed meanwhile) is dropped; ``<n>.origin.json`` says which file it holds."""
        self.parts.mkdir(parents=True, exist_ok=True)
        origin = {"url": remote.url, "digest": str(remote.digest)}
        if _read_notes(self.parts / f"{index}.origin.json") != origin:
            self.drop_part(index)
            _write_notes(self.parts / f"{index}.origin.json", origin)

    def keep(self, index: int, path: str) -> None:
        """A verified part becomes ``files/<path>`` (renamed: the bytes hashed are the bytes kept)."""
        target = self.files / path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.parts / f"{index}.partial", target)
        for suffix in (".json", ".origin.json"):
            (self.parts / f"{index}{suffix}").unlink(missing_ok=True)

    def drop_part(self, index: int) -> None:
        for suffix in (".partial", ".json", ".origin.json"):
            (self.parts / f"{index}{suffix}").unlink(missing_ok=True)

    def artifact_digest(self, plan: Plan, verified: dict[str, str]) -> Digest | None:
        """The digest of the artifact the verified files make, as the import road will make it (None:
        cannot tell before importing): the file's own, the Ollama manifest's, or the folder manifest's
        from the same listing and the digests already checked."""
        if plan.layout == "ollama":
            return Digest(hashlib.sha256(plan.manifest).hexdigest()) if plan.manifest is not None else None
        if plan.layout == "file":
            return Digest.parse(verified[plan.files[0].path])
        listing = folder_files(self.files)
        if any(f.rel not in verified for f in listing):
            return None
        return Digest(hashlib.sha256(folder_manifest(
            [(f.rel, Digest.parse(verified[f.rel]), f.path.stat().st_size) for f in listing])).hexdigest())

    def as_ollama_models(self, manifest: bytes | None) -> ModelsDir:
        """``files/`` as an Ollama models dir: its blobs are there; the manifest goes where Ollama keeps one."""
        models = ModelsDir(self.files)
        raw = manifest if manifest is not None else (self.files / "manifest").read_bytes()
        path = models.manifest_path(STAGED_OLLAMA)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        return models


def foreseen_artifact(plan: Plan, verified: dict[str, str]) -> Digest | None:
    """The digest the plan's files will make as an artifact, once every file's digest is known (declared,
    or in ``verified``), before they are all fetched: as :meth:`Staging.artifact_digest` makes it from
    the files on disk (a plan lists no hidden files, as the folder listing skips them). None: not yet."""
    if plan.layout == "ollama":
        return plan.digest
    known = []
    for f in plan.files:
        digest = f.digest or (Digest.parse(verified[f.path]) if f.path in verified else None)
        if digest is None or f.size is None:
            return None
        known.append((f.path, digest, f.size))
    if plan.layout == "file":
        return known[0][1]
    known.sort(key=lambda k: PurePosixPath(k[0]).parts)
    return Digest(hashlib.sha256(folder_manifest(known)).hexdigest())


def _git_blob_sha1(path: Path) -> str:
    """Git's blob id of a file (sha1 of ``blob <size>\\0`` and the bytes): what the Hub declares for a small file."""
    size = path.stat().st_size
    h = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


async def _no_chunks():
    """The body of a stream :func:`~.transfer.fetch` already wrote to the partial file."""
    return
    yield b""


def _read_notes(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_notes(path, notes: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(notes))
    tmp.replace(path)
