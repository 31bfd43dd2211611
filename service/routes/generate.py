"""``POST /generate``: validate, store the job, enqueue it on its priority's queue, answer 202 (200 for a replayed
``Idempotency-Key``)."""
from __future__ import annotations

import json
import shutil
import time

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import logs
from service.deps import Services, get_services, get_tenant
from service.errors import RETRY_AFTER, UNAUTHORIZED, from_field_error, from_validation_error, problem, unprocessable
from core.jobs import JobRecord, JobStatus, Priority, new_job_id
from core.queue import enqueue_job
from core.quotas import QuotaExceeded
from service import idempotency
from service.preparation import prepare_job
from service.schemas import GenerateParams, GenerateRequest, JobCreated, ValidationErrors
from service.validation import FieldError

router = APIRouter(tags=["jobs"])

REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {"$ref": "#/components/schemas/GenerateRequest"},
            "examples": {
                "subtype": {"summary": "A 1024² slide of lung adenocarcinoma (DiffInfinite draws the mask first)",
                            "value": {"conditioning": {"type": "subtype", "subtype": "LUAD"},
                                      "width": 1024, "height": 1024, "seed": 7}},
            },
        },
        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/MultipartGenerate"}},
    },
}

LOCATION = {"Location": {"description": "The job's status URL, `/jobs/{id}`", "required": True,
                         "schema": {"type": "string"}}}

# Where the answer leads (OpenAPI links: what clients, and schemathesis's stateful tests, call next with its id).
# The ids are the operations' in openapi.yaml; tests/test_openapi_contract.py checks that each one exists.
JOB_LINKS = {
    name: {"operationId": operation, "parameters": {"job_id": "$response.body#/id"}, "description": text}
    for name, operation, text in [
        ("GetJob", "get_job_jobs__job_id__get", "Poll the job (`status_url`, `Location`)"),
        ("CancelOrDeleteJob", "delete_job_jobs__job_id__delete", "Cancel the job, or delete it once finished"),
        ("DownloadSlide", "download_slide_jobs__job_id__slide_tiff_get", "The pyramidal TIFF, once succeeded"),
        ("SlideHeaders", "head_slide", "The TIFF's size and Accept-Ranges, once succeeded"),
        ("DeepZoomDescriptor", "deepzoom_descriptor_jobs__job_id__slide_dzi_get", "The slide's DZI, once succeeded"),
        ("Thumbnail", "download_thumbnail_jobs__job_id__thumbnail_png_get", "The thumbnail, once succeeded"),
        ("Mask", "download_mask_jobs__job_id__mask_png_get", "The label mask, once succeeded"),
    ]
}


def _prefix_params(err: FieldError) -> FieldError:
    if err.loc and err.loc[0] in ("mask", "params"):
        return err
    return FieldError(("params", *err.loc), err.msg)


def _store_and_enqueue(services: Services, record: JobRecord, mask_png: bytes | None) -> None:
    """Write the job's folder and record (checking and reserving the tenant's quota in the same atomic step), then
    enqueue; on any failure nothing is left behind."""
    store = services.store
    job_dir = store.job_dir(record.id)
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        if mask_png is not None:
            (job_dir / "mask.png").write_bytes(mask_png)
        store.create(record, quota=services.settings.quota_for(record.tenant))
        enqueue_job(services.celery, services.settings, record.id, record.priority)
    except QuotaExceeded as exc:
        shutil.rmtree(job_dir, ignore_errors=True)
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        raise HTTPException(429, detail=exc.detail, headers=headers) from None
    except Exception as exc:  # job store or broker down
        try:
            store.delete(record.id)
        except Exception:
            pass
        shutil.rmtree(job_dir, ignore_errors=True)
        raise HTTPException(503, detail=f"job queue unavailable: {exc}", headers={"Retry-After": "30"}) from None


@router.post(
    "/generate",
    status_code=202,
    response_model=JobCreated,
    summary="Submit a slide synthesis job",
    description="`multipart/form-data` with a `mask` file and a `params` JSON part, or `application/json` "
    "with `conditioning` (subtype or embedding). Answers 202 with the job id; poll `Location`. With an "
    "`Idempotency-Key`, a repeat of the request (same key and body, within SLIDESYNTH_IDEMPOTENCY_HOURS) answers "
    "200 with the job the first one made, and creates and enqueues nothing.",
    openapi_extra={"requestBody": REQUEST_BODY},
    responses={
        200: {"model": JobCreated, "description": "Idempotency-Key seen before with the same body: the job that "
              "request made (`Location` names it); no new job", "headers": LOCATION, "links": JOB_LINKS},
        202: {"description": "Job created and queued; poll `Location`", "headers": LOCATION, "links": JOB_LINKS},
        **UNAUTHORIZED,
        409: problem("Idempotency-Key seen before with a different body, or a concurrent request with it is still "
                     "storing its job (Retry-After)", RETRY_AFTER),
        413: problem("Request body over SLIDESYNTH_MAX_UPLOAD_BYTES"),
        415: problem("Neither JSON nor multipart"),
        422: {"model": ValidationErrors, "description": "A field is invalid; `loc` names it"},
        429: problem("Over one of the tenant's quotas; `detail` names it (SLIDESYNTH_QUOTA_RUNNING, "
                     "SLIDESYNTH_QUOTA_QUEUED, SLIDESYNTH_QUOTA_PIXELS_PER_DAY). `Retry-After`: seconds until it may "
                     "be accepted (absent for a job larger than the whole daily pixel budget)", RETRY_AFTER),
        503: problem("Job store or queue unavailable", RETRY_AFTER),
    },
)
async def generate(request: Request, response: Response, tenant: str = Depends(get_tenant),
                   services: Services = Depends(get_services),
                   idempotency_key: str = Header(  # optional: None when absent
                       None, alias=idempotency.HEADER,
                       description="A client's id for this request (1–255 printable ASCII characters): sent again "
                       "with the same body within SLIDESYNTH_IDEMPOTENCY_HOURS, it answers 200 with the same job "
                       "instead of making another; with another body, 409. Per tenant.",
                       json_schema_extra={"minLength": 1, "maxLength": idempotency.MAX_KEY_LENGTH,
                                          "pattern": idempotency.KEY_PATTERN})) -> JobCreated:
    settings = services.settings
    key = idempotency.check_key(idempotency_key)
    ctype = request.headers.get("content-type", "").lower()  # media types are case-insensitive
    try:
        if ctype.startswith("application/json"):
            try:
                body = GenerateRequest.model_validate_json(await request.body())
            except ValidationError as exc:
                raise from_validation_error(exc) from None
            cards = await run_in_threadpool(services.registry.cards)  # the first call reads the cards' files
            job = prepare_job(body, cards, settings, conditioning=body.conditioning, tenant=tenant)
            params, mask = body, None
        elif ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=2, max_fields=4, max_part_size=1024 * 1024)
            except StarletteHTTPException as exc:  # Starlette's multipart limits: a 422 naming the part, not a 400
                raise unprocessable(("mask",) if "files" in str(exc.detail) else ("params",),
                                    f"multipart body refused: {exc.detail} (one mask file and one params part "
                                    f"of at most 1 MiB)") from None
            if len(form.getlist("mask")) > 1 or len(form.getlist("params")) > 1:
                part = "mask" if len(form.getlist("mask")) > 1 else "params"
                raise unprocessable((part,), f"send one {part} part, not {len(form.getlist(part))}")
            upload = form.get("mask")
            if not isinstance(upload, UploadFile):
                raise unprocessable(("mask",), "a mask file part is required")
            raw_params = form.get("params") or "{}"
            if isinstance(raw_params, UploadFile):
                raw_params = (await raw_params.read()).decode("utf-8", "replace")
            try:
                params = GenerateParams.model_validate(json.loads(raw_params))
            except json.JSONDecodeError as exc:
                raise unprocessable(("params",), f"is not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise unprocessable(("params",), "is nested too deeply") from None
            except ValidationError as exc:
                raise from_validation_error(exc, ("params",)) from None
            except ValueError as exc:  # e.g. an integer over Python's 4,300-digit conversion limit
                raise unprocessable(("params",), f"is not JSON this service reads ({exc})") from None
            mask = await upload.read()
            try:  # mask decoding is CPU work: in a thread
                job = await run_in_threadpool(prepare_job, params, services.registry.cards(), settings, mask=mask,
                                              tenant=tenant)
            except FieldError as exc:
                raise from_field_error(_prefix_params(exc)) from None
        else:
            raise HTTPException(415, detail="send application/json or multipart/form-data")
    except FieldError as exc:
        raise from_field_error(exc) from None

    card = job.card
    record = JobRecord(id=new_job_id(), tenant=tenant, priority=Priority(params.priority), spec=job.spec,
                       untrained=not card.trained, created_at=time.time())

    def create() -> None:
        _store_and_enqueue(services, record, job.mask_png)

    if key is None:
        await run_in_threadpool(create)
        created, new = record, True
    else:
        body_fingerprint = await run_in_threadpool(idempotency.fingerprint, params, mask)  # a grid is MBs of JSON
        created, new = await run_in_threadpool(
            idempotency.submit_once, services.idempotency, services.store, tenant, key, body_fingerprint, record,
            create, settings.idempotency_hours * 3600)
    logs.set_context(job_id=created.id)  # the request's access line names the job it made (or replayed)
    location = f"/jobs/{created.id}"
    response.headers["Location"] = location
    if not new:
        response.status_code = 200
    return JobCreated(id=created.id, status=created.status.value, status_url=location, untrained=created.untrained)
