"""Job status, listing, cancel/delete and downloads."""
from __future__ import annotations

import os
import re
import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import openslide
from fastapi import APIRouter, Depends, Header, HTTPException, Path as PathParam, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.responses import MalformedRangeHeader

from service import deepzoom
from service.deps import Services, get_services, get_tenant
from service.errors import STORE_UNAVAILABLE, UNAUTHORIZED, problem
from service.schemas import Job, JobList
from service.views import expires_at, job_view
from core.contract import OUTPUT_FILES
from core.events import JobEventStream, sse_message
from core.jobs import JobRecord, JobStatus, iso

router = APIRouter(tags=["jobs"], responses={**UNAUTHORIZED, **STORE_UNAVAILABLE})

NOT_FOUND = {404: problem("No such job (for this caller)")}
NOT_READY = {409: problem("The job has not succeeded (yet)")}
GONE = {410: problem("The job expired: its files were removed after SLIDESYNTH_RETENTION_HOURS (the detail says "
                     "when)")}


def _own_job(job_id: str, tenant: str, services: Services) -> JobRecord:
    job = services.store.get(job_id) if job_id.isalnum() else None
    if job is None or job.tenant != tenant:  # other tenants' jobs are 404, not 403
        raise HTTPException(404, detail=f"job {job_id} not found")
    return job


@router.get("/jobs/{job_id}", response_model=Job, responses=NOT_FOUND, summary="Job status")
def get_job(job_id: str, tenant: str = Depends(get_tenant), services: Services = Depends(get_services)) -> Job:
    return job_view(_own_job(job_id, tenant, services), services.settings.retention_hours)


EVENTS_DESCRIPTION = (
    "`text/event-stream`. Each event is `event: job`, `id: <integer, increasing per job>`, `data: <the JSON of GET "
    "/jobs/{id}>`, sent whenever what that shows changes (status, stage, step, progress, eta_seconds, …); the first "
    "is the current state; the stream ends after the event with a terminal status (succeeded, failed, canceled, "
    "expired). "
    "`: ping` comments keep a quiet stream open (SLIDESYNTH_EVENTS_PING_SECONDS). With `Last-Event-ID` (a "
    "reconnect) the events after that id come first, or the current state when they are no longer known.")


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    # the schema describes one event of the stream (the server-sent events convention of OpenAPI 3.2's itemSchema;
    # schemathesis checks each event against it)
    responses={200: {"content": {"text/event-stream": {"schema": {
                         "type": "object", "required": ["event", "id", "data"],
                         "properties": {"event": {"const": "job"},
                                        "id": {"type": "string", "pattern": "^[0-9]+$"},
                                        "data": {"type": "string", "contentMediaType": "application/json",
                                                 "contentSchema": {"$ref": "#/components/schemas/Job"}}}}}},
                     "description": EVENTS_DESCRIPTION},
               204: {"description": "`Last-Event-ID` names the job's terminal event: nothing more will come (a "
                                    "browser's EventSource stops reconnecting)"},
               **NOT_FOUND},
    summary="Live job events (server-sent events)",
)
async def job_events(job_id: str, last_event_id: str | None = Header(
                         None, description="The id of the last event received, to resume after it."),
                     tenant: str = Depends(get_tenant), services: Services = Depends(get_services)):
    job = await run_in_threadpool(_own_job, job_id, tenant, services)
    stream = JobEventStream(services.events, job, services.event_data, services.settings.events_ping_seconds)
    after = last_event_id.strip() if last_event_id else ""
    known = after.isascii() and after.isdigit() and len(after) < 19  # another id is one the stream does not know
    if not await stream.open(int(after) if known else None):
        return Response(status_code=204)

    async def body():
        async for event in stream.events():
            yield sse_message(event)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/jobs", response_model=JobList, summary="The caller's jobs, newest first")
def list_jobs(offset: int = Query(0, ge=0, le=10 ** 9), limit: int = Query(20, ge=1, le=100),
              tenant: str = Depends(get_tenant), services: Services = Depends(get_services)) -> JobList:
    jobs, total = services.store.list(tenant, offset, limit)
    retention = services.settings.retention_hours
    return JobList(items=[job_view(j, retention) for j in jobs], total=total, offset=offset, limit=limit)


@router.delete(
    "/jobs/{job_id}",
    responses={
        200: {"model": Job, "description": "Queued job canceled: it never starts"},
        202: {"model": Job, "description": "Running job: cancel requested; it stops within one sampling step"},
        204: {"description": "Finished (or expired) job: its record and files deleted"},
        **NOT_FOUND,
    },
    summary="Cancel a queued or running job, or delete a finished or expired one",
)
def delete_job(job_id: str, response: Response, tenant: str = Depends(get_tenant),
               services: Services = Depends(get_services)):
    store = services.store
    job = _own_job(job_id, tenant, services)
    if job.status.terminal:
        store.delete(job_id)
        services.slides.forget(store.job_dir(job_id))
        shutil.rmtree(store.job_dir(job_id), ignore_errors=True)
        return Response(status_code=204)
    store.request_cancel(job_id)
    settings = services.settings
    lost = job.status == JobStatus.running and job.heartbeat_at is not None and \
        time.time() - job.heartbeat_at > settings.lease_seconds
    if lost and store.transition(job_id, {JobStatus.running}, expect={"claim": job.claim},
                                 status=JobStatus.canceled, finished_at=time.time()):
        # Its worker is gone (no progress for a whole lease): nobody else will ever finish it.
        response.status_code = 200
        services.webhooks.completed(job)
        return job_view(store.get(job_id) or job, settings.retention_hours)
    # A queued job becomes canceled now; its message stays queued and the worker drops it on delivery
    # (the record is terminal), which also works with transports that have no broadcast for revoke().
    if store.transition(job_id, {JobStatus.queued}, status=JobStatus.canceled, finished_at=time.time()):
        response.status_code = 200
        services.webhooks.completed(job)  # now, not when a worker reaches the message
    else:
        response.status_code = 202
    return job_view(store.get(job_id) or job, settings.retention_hours)


class DownloadResponse(FileResponse):
    """A file with HTTP Range support that ignores a malformed Range header and sends the whole file, as RFC 9110
    §14.2 allows (Starlette answers it with a plain-text 400).

    The file is opened when the response is made, before any header is sent: a file that is gone raises
    FileNotFoundError there (the route answers 404 or 410), and one removed afterwards — the retention sweep
    expiring the job — is still sent whole from the open file (Starlette would stat, send the headers, then open
    the path and break off the response)."""

    def __init__(self, path: Path | str, **kwargs):
        self._file = open(path, "rb")
        try:
            super().__init__(path, stat_result=os.fstat(self._file.fileno()), **kwargs)
        except BaseException:
            self._file.close()
            raise

    async def __call__(self, scope, receive, send) -> None:
        extensions = scope.get("extensions") or {}
        if "http.response.pathsend" in extensions:  # a server that would open the path itself
            scope = {**scope, "extensions": {k: v for k, v in extensions.items() if k != "http.response.pathsend"}}
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._file.close()

    @asynccontextmanager
    async def _open_file(self):
        # Starlette's (private) hook for opening self.path; test_download_of_a_file_removed_after_the_response_was_made
        # notices if it stops being used.
        file = anyio.wrap_file(os.fdopen(os.dup(self._file.fileno()), "rb"))
        try:
            await file.seek(0)
            yield file
        finally:
            await file.aclose()

    def _parse_range_header(self, http_range: str, file_size: int) -> list[tuple[int, int]]:
        # Starlette's own (private) parsing hook; test_slide_head_bad_range_and_zarr_listing notices if it changes.
        # The grammar is checked here first: Starlette parses each number with int(), which takes "+1" and "1_0".
        match = _RANGE_HEADER.fullmatch(http_range)
        if match is None or any(first and last and int(last) < int(first)
                                for first, last in _RANGE_SPEC.findall(match.group(1))):
            return []  # a malformed Range header is ignored: the whole file, 200
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []


# RFC 9110 §14.1.2: ranges-specifier = "bytes=" 1#( first-pos "-" [ last-pos ] / "-" suffix-length ), DIGITs only
_RANGE_SPEC = re.compile(r"[ \t]*(\d*)-(\d*)[ \t]*")
_RANGE_HEADER = re.compile(r"(?i:bytes)=((?:[ \t]*(?:\d+-\d*|-\d+)[ \t]*)(?:,(?:[ \t]*(?:\d+-\d*|-\d+)[ \t]*))*)")


def range_header(range_: str = Header(  # optional: None when absent
        None, alias="Range", description="A byte range of the file, `bytes=first-last`, `bytes=first-` or "
        "`bytes=-suffix` (several, comma-separated, answer multipart/byteranges): 206 with those bytes, 416 when "
        "none is in the file. A malformed one is ignored (RFC 9110 §14.2): the whole file, 200.",
        examples=["bytes=0-1023", "bytes=-512", "bytes=0-0,100-199"])) -> None:
    """Documents the Range header the file downloads honour (Starlette's FileResponse reads it itself)."""


def ranged(media_type: str | None, description: str) -> dict:
    """The 200, 206 and 416 of a file download that honours Range."""
    ok = {"description": description}
    partial = {"description": "The requested byte range (Range header); several ranges as multipart/byteranges"}
    if media_type:  # else the file's own type (a Zarr's files), or none (HEAD)
        ok["content"], partial["content"] = {media_type: {}}, {media_type: {}, "multipart/byteranges": {}}
    return {200: ok, 206: partial,
            416: {"description": "Range not satisfiable (empty body, `Content-Range: bytes */size`)"}}


def _expired(job: JobRecord) -> HTTPException:
    return HTTPException(410, detail=f"job {job.id} expired at {iso(job.expired_at)}: its files were removed "
                                     f"(SLIDESYNTH_RETENTION_HOURS after it finished, at {iso(job.finished_at)})")


def _vanished(job_id: str, tenant: str, services: Services) -> HTTPException:
    """The answer when an output the record listed is not there: the retention sweep (or a DELETE) removed it
    between the record read and the open. 410 when the job has expired or is due to, else 404."""
    job = services.store.get(job_id)
    if job is None or job.tenant != tenant:
        return HTTPException(404, detail=f"job {job_id} not found")
    if job.status == JobStatus.expired:
        return _expired(job)
    due = expires_at(job, services.settings.retention_hours)
    if due is not None and due <= time.time():
        return HTTPException(410, detail=f"job {job_id} expired at {iso(due)}: its files are being removed "
                                         f"(SLIDESYNTH_RETENTION_HOURS after it finished, at {iso(job.finished_at)})")
    return HTTPException(404, detail=f"an output file of job {job_id} is missing")


def _download(job_id: str, kind: str, tenant: str, services: Services, **kwargs) -> DownloadResponse:
    path = _output(job_id, kind, tenant, services)
    try:
        return DownloadResponse(path, **kwargs)
    except (FileNotFoundError, NotADirectoryError):
        raise _vanished(job_id, tenant, services) from None


def _slide(job_id: str, tenant: str, services: Services):
    """The Deep Zoom generator of the job's TIFF, and its path."""
    path = _output(job_id, "tiff", tenant, services)
    try:
        return services.slides.generator(path), path
    except (OSError, openslide.OpenSlideError):
        if path.exists():
            raise
        raise _vanished(job_id, tenant, services) from None


def _output(job_id: str, kind: str, tenant: str, services: Services):
    job = _own_job(job_id, tenant, services)
    if job.status == JobStatus.expired:
        raise _expired(job)
    if job.status != JobStatus.succeeded:
        raise HTTPException(409, detail=f"job {job_id} is {job.status.value}; outputs exist once it has succeeded")
    if kind not in job.outputs:
        raise HTTPException(404, detail=f"job {job_id} has no {kind} output (requested outputs: {job.spec.outputs})")
    return services.store.job_dir(job_id) / job.outputs[kind]


@router.get("/jobs/{job_id}/slide.tiff", response_class=FileResponse,
            responses={**NOT_FOUND, **NOT_READY, **GONE,
                       **ranged("image/tiff", "Pyramidal BigTIFF; HTTP Range supported (HEAD: headers only)")},
            summary="Download the pyramidal TIFF")
def download_slide(job_id: str, tenant: str = Depends(get_tenant), services: Services = Depends(get_services),
                   _range: None = Depends(range_header)):
    return _download(job_id, "tiff", tenant, services, media_type="image/tiff", filename=f"slidesynth-{job_id}.tiff")


# HEAD: the size and Accept-Ranges before ranged reads (GDAL, HTTP range readers); the same handler, headers only
router.add_api_route("/jobs/{job_id}/slide.tiff", download_slide, methods=["HEAD"], response_class=FileResponse,
                     operation_id="head_slide", summary="Headers of the pyramidal TIFF (size, Accept-Ranges)",
                     responses={**NOT_FOUND, **NOT_READY, **GONE, **ranged(None, "The TIFF's headers, no body")})


DEEPZOOM_CACHE = "private, max-age=86400"  # a job's slide never changes; deleting the job removes it


@router.get("/jobs/{job_id}/slide.dzi", response_class=Response, responses={**NOT_FOUND, **NOT_READY, **GONE,
            200: {"content": {"application/xml": {}},
                  "description": "Deep Zoom descriptor (254-px JPEG tiles, 1-px overlap) for OpenSeadragon"}},
            summary="Deep Zoom (DZI) descriptor of the slide")
def deepzoom_descriptor(job_id: str, tenant: str = Depends(get_tenant), services: Services = Depends(get_services)):
    gen, _ = _slide(job_id, tenant, services)
    return Response(deepzoom.descriptor(gen), media_type="application/xml",
                    headers={"Cache-Control": DEEPZOOM_CACHE})


@router.get("/jobs/{job_id}/slide_files/{level}/{tile}", response_class=Response,
            responses={404: problem("No such job, or no such tile (the detail names the field)"),
                       **NOT_READY, **GONE, 200: {"content": {"image/jpeg": {}}, "description": "Deep Zoom tile"}},
            summary="Deep Zoom tile: `{level}/{col}_{row}.jpeg`")
def deepzoom_tile(job_id: str,
                  level: int = PathParam(description="Deep Zoom level: 0 is 1 × 1 px, each next one twice the "
                                         "size, the last the full slide (`Size` in the descriptor)", examples=[0, 9]),
                  tile: str = PathParam(description="`{col}_{row}.jpeg`", examples=["0_0.jpeg"]),
                  tenant: str = Depends(get_tenant), services: Services = Depends(get_services)):
    gen, path = _slide(job_id, tenant, services)
    try:
        col, row = deepzoom.parse_tile_name(tile)
        data = deepzoom.tile_jpeg(gen, level, col, row)
    except deepzoom.TileNotFound as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except (OSError, openslide.OpenSlideError):
        if path.exists():
            raise
        raise _vanished(job_id, tenant, services) from None  # OpenSlide reopens the file per read
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": DEEPZOOM_CACHE})


@router.get("/jobs/{job_id}/thumbnail.png", response_class=FileResponse, responses={**NOT_FOUND, **NOT_READY, **GONE,
            **ranged("image/png", "Thumbnail, longest side ≤ 1024 px")},
            summary="Slide thumbnail")
def download_thumbnail(job_id: str, tenant: str = Depends(get_tenant), services: Services = Depends(get_services),
                       _range: None = Depends(range_header)):
    return _download(job_id, "thumbnail", tenant, services, media_type="image/png")


@router.get("/jobs/{job_id}/mask.png", response_class=FileResponse, responses={**NOT_FOUND, **NOT_READY, **GONE,
            **ranged("image/png", "Label mask the slide was generated from")},
            summary="Label mask at output resolution")
def download_mask(job_id: str, tenant: str = Depends(get_tenant), services: Services = Depends(get_services),
                  _range: None = Depends(range_header)):
    return _download(job_id, "mask", tenant, services, media_type="image/png")


@router.get("/jobs/{job_id}/slide.zarr/{path:path}", response_class=FileResponse,
            responses={**NOT_FOUND, **NOT_READY, **GONE,
                       **ranged(None, "A file of the OME-Zarr (metadata or chunk), or for a folder (e.g. the root, "
                                      "`slide.zarr/`) a JSON listing of its entries")},
            summary="OME-Zarr files (metadata and chunks)")
def download_zarr(job_id: str,
                  path: str = PathParam(description="A file or folder under the Zarr's root",
                                        examples=[".zattrs", "0/.zarray", "0"]),
                  tenant: str = Depends(get_tenant), services: Services = Depends(get_services),
                  _range: None = Depends(range_header)):
    root = _output(job_id, "zarr", tenant, services).resolve()
    # a path the filesystem cannot hold (NUL byte, a name over 255 bytes, over PATH_MAX) names no file: 404, not
    # the OSError/ValueError that resolving it raises
    if "\0" in path or len(path.encode()) > 4096 or any(len(part.encode()) > 255 for part in path.split("/")):
        raise HTTPException(404, detail="no such file in the Zarr output")
    try:
        target = (root / path).resolve()
        is_dir, is_file = target.is_dir(), target.is_file()
    except (OSError, ValueError):
        raise HTTPException(404, detail="no such file in the Zarr output") from None
    if not root.is_dir():  # the sweep removed it after the record was read
        raise _vanished(job_id, tenant, services)
    try:
        if target.is_relative_to(root) and is_dir:  # what is under the link the job gives, and below
            entries = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir())
            return JSONResponse({"path": path, "entries": entries})
        if not target.is_relative_to(root) or not is_file:
            raise HTTPException(404, detail=f"no file {path!r} in the Zarr output")
        return DownloadResponse(target)
    except (FileNotFoundError, NotADirectoryError):
        if root.is_dir():
            raise HTTPException(404, detail=f"no file {path!r} in the Zarr output") from None
        raise _vanished(job_id, tenant, services) from None


assert set(OUTPUT_FILES) >= {"tiff", "zarr", "thumbnail", "mask"}
