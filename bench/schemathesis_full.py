"""Schemathesis against the real service: the committed contract (``openapi.yaml``) fuzzed against the app.

    python -m bench.schemathesis_full                      # embedded mode (file job store), 300 examples
    python -m bench.schemathesis_full --max-examples 1000 --redis

Schemathesis (https://schemathesis.readthedocs.io) reads ``openapi.yaml`` — the contract users see, not the
live app's ``/openapi.json`` — and runs every phase its command line runs: coverage (boundary and negative
values of every parameter and body field, missing and wrong API keys, undocumented methods), fuzzing (Hypothesis
data, positive and negative) and stateful sequences along the contract's links (``POST /generate`` → its job's
``GET``, ``DELETE`` and downloads). Each response goes through all of schemathesis's checks — no 5xx, the status
code, content type, headers and body as documented, invalid data refused, valid data accepted, the API key
enforced, the ``Allow`` of a 405 — but the ones :data:`CHECKS` and :data:`OPERATIONS_CONFIG` turn off or narrow,
each with its reason. Then passes on jobs a worker would have finished (:func:`seed_jobs`) fuzz the downloads
against real files: Range, Deep Zoom levels and tiles, Zarr paths.

The app is the real one (:func:`service.app.create_app`), called in process through schemathesis's ASGI
transport, with its real dependencies: the file job store and filesystem broker of the embedded mode under a
temporary data dir, or (``--redis``) Redis for job records and queues under a key prefix and queue names of its
own, removed afterwards. API keys are on (``SLIDESYNTH_API_KEYS=t1:k1``) and schemathesis sends ``X-API-Key`` as
the contract's security scheme says, so requests get past the 401. No worker runs: submitted jobs stay queued
(their folders, a few KB each, go with the temporary data dir). ``POST /embed`` with tiles a worker would
embed answers 503 after SLIDESYNTH_EMBED_TIMEOUT, set to 1 s here.

Besides schemathesis's own checks, a wrapper around the app counts every request by operation and status and
keeps the traceback of any exception the app raised, so a 5xx is counted even if no check ran on it.

``tests/test_schemathesis.py`` runs the same at a bounded size in ``make test``. The table lists, per
operation, the requests and their status classes, then the failures by check; the last line is one JSON object:
``ours`` = distinct failures found (check × operation × kind), ``reference`` = 0 (the contract's goal),
``ratio`` = failing responses ÷ requests.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import shutil
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONTRACT = REPO / "openapi.yaml"
TENANT, API_KEY = "t1", "k1"
SEED = 20260501

# Checks turned off or narrowed, each for a reason that makes it wrong for this API (everything else is on).
# positive_data_acceptance takes these answers to schema-valid requests as acceptance: schemathesis's default
# (2xx, 3xx, 401, 403, 404, 409, 429, 5xx — a 5xx fails not_a_server_error instead), and 410, which the
# downloads of an expired job answer: like a 404, it says the job's files are gone, not that the request was bad.
ACCEPTED = ["2xx", "3xx", 401, 403, 404, 409, 410, 429, "5xx"]
CHECKS: dict[str, dict] = {
    "positive_data_acceptance": {"expected-statuses": ACCEPTED},
    # use_after_free expects any resource a 2xx DELETE answered for to be gone (404). DELETE /jobs/{id} of a
    # queued or running job cancels it and keeps its record — 200 or 202 with the canceled job, as the contract
    # says — and only a finished job's DELETE (204) removes it; a canceled job's GET answering 200 is right.
    # (That a 204 leaves a 404 is tests/test_service_api.py::test_submit_mask_poll_list_cancel_delete.)
    "use_after_free": {"enabled": False},
}
OPERATIONS_CONFIG: list[dict] = [
    # positive_data_acceptance sends schema-valid bodies and expects them accepted. A submission or an embedding
    # request that the JSON schema allows can still be refused with a 422 naming the field, as the contract
    # documents: what is valid depends on the installed models and encoders (`GET /models`, `GET /encoders`: the
    # model's subtypes, classes, size limits and engine options, the encoder's id and tile size) and on the
    # uploaded image (a mask must decode as a one-channel PNG or TIFF, a tile as PNG, JPEG or TIFF), none of
    # which a static schema can say. For these two operations a 422 is an accepted answer to valid-looking data;
    # everything else (a 5xx, a 400, an undocumented status) still fails the check.
    {"include-operation-id": ["generate_generate_post", "embed_embed_post"],
     "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, 422]}}},
]


@dataclass
class Finding:
    check: str
    operation: str
    title: str
    message: str
    reproduce: str
    count: int = 1

    def __str__(self) -> str:
        return f"[{self.check}] {self.operation}: {self.title}\n{self.message}\n{self.reproduce}"


@dataclass
class Report:
    operations: list[str]
    requests: collections.Counter = field(default_factory=collections.Counter)  # (operation, status) → count
    findings: dict[tuple, Finding] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # schemathesis errors and the app's exceptions
    phases: dict[str, str] = field(default_factory=dict)  # phase → how it ended
    cases: collections.Counter = field(default_factory=collections.Counter)  # phase → cases schemathesis recorded
    failing_responses: int = 0
    seconds: float = 0.0

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def server_errors(self) -> int:
        return sum(n for (_, status), n in self.requests.items() if status >= 500)

    def by_check(self) -> collections.Counter:
        return collections.Counter(f.check for f in self.findings.values())

    def problems(self) -> list[str]:
        """Everything that should not be: each finding, error and 5xx, readable."""
        out = [str(f) for f in self.findings.values()] + self.errors
        if self.server_errors and not any(f.check == "not_a_server_error" for f in self.findings.values()):
            out.append(f"{self.server_errors} responses with a 5xx status: "
                       f"{[k for k in self.requests if k[1] >= 500]}")
        return out


def settings_for(data_dir: Path, redis_url: str | None = None, key_prefix: str | None = None):
    """The service's settings for the run: API keys on, a temporary data dir, the repository's models (read only),
    no worker behind the queues."""
    from core.settings import Settings

    extra = {}
    if redis_url:
        prefix = key_prefix or f"slidesynth-schemathesis-{uuid.uuid4().hex[:10]}"
        extra = dict(broker_url=redis_url, redis_url=redis_url, key_prefix=prefix, queue=prefix)
    return Settings(_env_file=None, data_dir=data_dir, api_keys=f"{TENANT}:{API_KEY}", embed_timeout=1.0,
                    **extra)


def installed(settings) -> dict[str, list[str]]:
    """The names of the models in the settings' models dir and their subtypes (the arguments of :func:`run`)."""
    from models.registry import ModelRegistry

    cards = ModelRegistry(settings.models_dir).cards()
    return {"models": sorted(cards), "subtypes": sorted({s for card in cards.values() for s in card.subtypes.values()}
                                                        | {"LUAD", "LUSC"})}


def seed_jobs(app) -> dict[str, str]:
    """Jobs of the test tenant in each state a worker would leave them in, so that the downloads answer more
    than 404 and 409: a succeeded job with every output (a pyramidal TIFF and an OME-Zarr written by the
    service's writers, the thumbnail and the mask), a failed one and an expired one. They are submitted through
    the API (a mask upload) and finished by writing their files and records as the worker does. Returns status →
    job id, for :func:`run`'s passes on them."""
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from core.contract import OUTPUT_FILES
    from core.jobs import JobStatus
    from writers.tiff import PyramidTiffWriter
    from writers.zarr import OmeZarrWriter

    labels = np.repeat(np.arange(1, 5, dtype=np.uint8), 8)[None].repeat(24, 0)  # 32 × 24, classes 1–4
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, format="PNG")
    store, ids = app.state.services.store, {}
    with TestClient(app) as client:
        for status in (JobStatus.succeeded, JobStatus.failed, JobStatus.expired):
            resp = client.post("/generate", headers={"X-API-Key": API_KEY},
                               files={"mask": ("mask.png", buf.getvalue(), "image/png")},
                               data={"params": json.dumps({"mask_mpp": 8.0, "seed": 1, "outputs": ["tiff", "zarr"],
                                                           "model": "diffinfinite-untrained"})})
            assert resp.status_code == 202, resp.text
            ids[status.value] = job_id = resp.json()["id"]
            job_dir, now = store.job_dir(job_id), time.time()
            if status == JobStatus.succeeded:
                spec = store.get(job_id).spec
                y, x = np.mgrid[:spec.height, :spec.width]
                image = np.stack([200 - y % 50, 150 + x % 60, 190 + (x + y) % 40], -1).astype(np.uint8)
                size = dict(width=spec.width, height=spec.height, mpp=spec.mpp)
                for writer in (PyramidTiffWriter(job_dir / OUTPUT_FILES["tiff"], **size),
                               OmeZarrWriter(job_dir / OUTPUT_FILES["zarr"], **size)):
                    with writer as w:
                        tile = w.cascade.tile
                        for ty in range(-(-spec.height // tile)):
                            for tx in range(-(-spec.width // tile)):
                                w.write_tile(ty, tx, image[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile])
                Image.fromarray(image[::4, ::4]).save(job_dir / OUTPUT_FILES["thumbnail"])
                Image.fromarray(labels).resize((spec.width, spec.height), Image.NEAREST).save(
                    job_dir / OUTPUT_FILES["mask"])
                store.update(job_id, status=status, stage=None, progress=1.0, started_at=now, finished_at=now,
                             outputs={kind: OUTPUT_FILES[kind] for kind in ("tiff", "zarr", "thumbnail", "mask")})
            elif status == JobStatus.failed:
                store.update(job_id, status=status, started_at=now, finished_at=now, error="seeded failure")
            else:
                store.update(job_id, status=status, started_at=now - 10, finished_at=now - 5, expired_at=now)
    return ids


def cleanup_redis(settings) -> None:
    """Remove the run's Redis keys: job records and indexes under its prefix, its queues and their bindings."""
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    for pattern in (f"{settings.key_prefix}*", f"_kombu.binding*{settings.queue}*"):
        for key in client.scan_iter(pattern):
            client.delete(key)


OTHER_METHODS = "(other methods on the contract's paths)"  # the unsupported_method check's probes: 405
OTHER_PATHS = "(paths not in the contract)"


class Recorder:
    """ASGI wrapper: counts requests by operation and status; an exception the app raised is kept (with its
    traceback) and answered as the 500 a server would send, so the run goes on and the checks see it."""

    def __init__(self, app, templates: list[tuple[str, str]]):
        self.app = app
        self.counts: collections.Counter = collections.Counter()
        self.exceptions: list[str] = []
        self._routes = [(method.upper(), re.compile("^" + re.sub(r"\\\{(\w+)\\\}", _param, re.escape(path)) + "$"),
                         f"{method.upper()} {path}")
                        for method, path in templates]

    def operation(self, method: str, path: str) -> str:
        """The contract's ``METHOD /template`` of a request; the others in two groups."""
        templates = [(m, label) for m, pattern, label in self._routes if pattern.match(path)]
        for m, label in templates:
            if m == method:
                return label
        return OTHER_METHODS if templates else OTHER_PATHS

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label = self.operation(scope["method"], scope["path"])
        state = {}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                self.counts[(label, message["status"])] += 1
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception:
            self.exceptions.append(f"{label} {scope['path']}: the app raised\n{traceback.format_exc()}")
            if "status" not in state:
                await recording_send({"type": "http.response.start", "status": 500,
                                      "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body", "body": b"Internal Server Error"})


def _param(match: re.Match) -> str:
    return ".*" if match.group(1) == "path" else "[^/]+"  # {path} of the Zarr route takes slashes


def operations_of(contract: dict) -> list[tuple[str, str]]:
    return [(method, path) for path, item in contract["paths"].items() for method in item
            if method in ("get", "put", "post", "delete", "patch", "head", "options")]


def schemathesis_config(max_examples: int, seed: int = SEED, workers: int = 1, parameters: dict | None = None):
    import schemathesis

    return schemathesis.Config.from_dict({
        "parameters": parameters or {},
        "seed": seed,
        "cache": {"enabled": False},  # nothing written beside the repository, nothing carried between runs
        "workers": workers,
        "continue-on-failure": True,  # an operation's first failure does not end its examples: every one is found
        "generation": {"max-examples": max_examples, "deterministic": True, "database": "none"},
        "auth": {"openapi": {"APIKeyHeader": {"api_key": API_KEY}}},
        "checks": CHECKS,
        "operations": OPERATIONS_CONFIG,
    })


def label_masks():
    """Hypothesis strategy: small label masks as files — PNG or TIFF, 8 or 16 bit, stripes of a few classes
    (some outside a model's classes), 1 to 64 px a side."""
    import io

    import numpy as np
    from hypothesis import strategies as st
    from PIL import Image

    @st.composite
    def masks(draw):
        height, width = draw(st.integers(1, 64)), draw(st.integers(1, 64))
        classes = draw(st.lists(st.integers(0, 7), min_size=1, max_size=5))
        labels = np.asarray(classes)[np.arange(width) * len(classes) // width][None].repeat(height, 0)
        kind = draw(st.sampled_from(["png8", "png16", "tiff8"]))
        image = Image.fromarray(labels.astype(np.uint16 if kind == "png16" else np.uint8))
        buf = io.BytesIO()
        image.save(buf, format="TIFF" if kind.startswith("tiff") else "PNG")
        return buf.getvalue()

    return masks()


def generate_params(models: list[str]):
    """Hypothesis strategy: the `params` part of a mask submission, JSON of GenerateParams' fields with values
    anywhere in their documented ranges (edges included) and the installed models' names."""
    from hypothesis import strategies as st

    options = st.fixed_dictionaries({}, optional={
        "sampler": st.sampled_from(["random", "tiled"]), "solver": st.sampled_from(["ddim", "dpmpp-2m", None]),
        "decoder": st.sampled_from(["tukey", "hann", "four-pass"]), "decode_tile": st.integers(8, 256),
        "decode_overlap": st.integers(0, 128), "decode_context": st.sampled_from(["slide", "tile"])})
    scale = st.floats(0.05, 100, allow_nan=False, allow_infinity=False)
    return st.fixed_dictionaries({}, optional={
        "model": st.sampled_from([None, *models]), "mask_mpp": scale, "mpp": scale,
        "seed": st.integers(0, 2 ** 63 - 1), "steps": st.integers(1, 2000), "guidance": st.floats(0, 20),
        "eta": st.floats(0, 1), "options": options, "priority": st.sampled_from(["low", "normal", "high"]),
        "outputs": st.lists(st.sampled_from(["tiff", "zarr"]), min_size=1, max_size=3),
        "compression": st.sampled_from(["jpeg", "deflate", "zstd"]), "quality": st.integers(1, 100),
        "zarr_version": st.sampled_from(["0.4", "0.5"])}).map(json.dumps)


def steer_submissions(schema, models: list[str], subtypes: list[str]) -> None:
    """Half of the schema-valid ``POST /generate`` cases that fuzzing and stateful testing draw get a mask that
    decodes and `params` that parse, or (JSON) a subtype and model the service has, so they pass the first
    semantic checks (a mask must be an image, a subtype one of the model's) and reach the rest — the size, the
    mask's classes, the engine's options, the job store. What the schema cannot say is what is steered; the
    values stay schema-valid, and negative cases are left as drawn."""
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.core.parameters import ParameterLocation

    masks, params = label_masks(), generate_params(models)
    json_steer = st.fixed_dictionaries({"model": st.sampled_from([None, *models]),
                                        "subtype": st.sampled_from(subtypes),
                                        "width": st.integers(8, 20000), "height": st.integers(8, 20000)})

    @schema.hook
    def flatmap_case(context, case):
        if context.operation is None or context.operation.label != "POST /generate" or \
                case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE or \
                not isinstance(case.body, dict):
            return st.just(case)

        def steered(values):
            meta = case.meta  # read before the edit: reading it after re-judges the body
            body = dict(case.body)
            if (case.media_type or "").startswith("multipart/"):
                mask, text = values
                body.update(mask=mask, params=text)
            else:
                body.update(model=values["model"], width=values["width"], height=values["height"])
                if isinstance(body.get("conditioning"), dict) and body["conditioning"].get("type") == "subtype":
                    body["conditioning"] = {**body["conditioning"], "subtype": values["subtype"]}
            case.body = body
            if case.headers and "Idempotency-Key" in case.headers:
                # fuzzing's short keys ("0") recur with other bodies: a 409 before the checks steered for
                case.headers = {k: v for k, v in case.headers.items() if k != "Idempotency-Key"}
            if multipart:
                # The body stays schema-valid, but schemathesis re-judges an edited body against the schema and
                # takes any one holding bytes (the mask) for invalid: the case would turn negative, and a 202 to
                # it read as "invalid data accepted". The case keeps the positive mode it was drawn with.
                meta.clear_dirty(ParameterLocation.BODY)
            return case

        multipart = (case.media_type or "").startswith("multipart/")
        values = st.tuples(masks, params) if multipart else json_steer
        return st.one_of(st.just(case), values.map(steered))


def run(app, max_examples: int, seed: int = SEED, contract_path: Path = CONTRACT, models: list[str] = (),
        subtypes: list[str] = (), jobs: dict[str, str] | None = None) -> Report:
    """Run every schemathesis phase of the contract at ``contract_path`` against the ASGI ``app``.

    With ``models`` and ``subtypes`` (the installed models' names and subtypes), half of the valid submissions are
    steered to them (:func:`steer_submissions`). With ``jobs`` (:func:`seed_jobs`), one more pass per job fuzzes
    its status and downloads with ``job_id`` set to it — the ids fuzzing draws never name a job, and stateful
    testing reaches only the jobs it submits, which stay queued — so the downloads answer from real files
    (200, 206, 416 on the succeeded job's TIFF, Zarr, Deep Zoom tiles) and a 410 for the expired one."""
    import schemathesis

    contract = yaml.safe_load(contract_path.read_text())
    templates = operations_of(contract)
    recorder = Recorder(app, templates)
    report = Report(operations=[f"{m.upper()} {p}" for m, p in templates])
    failing_cases: set[str] = set()
    started = time.perf_counter()

    # the jobs' passes first: the full pass learns their ids from GET /jobs and deletes them
    for status, job_id in (jobs or {}).items():
        pinned = schemathesis.openapi.from_path(
            contract_path, config=schemathesis_config(max_examples, seed, parameters={"job_id": job_id}))
        pinned.app = recorder
        # the job's own reads: its status and every download (not DELETE, which would remove it)
        # (excludes: schemathesis ORs an include with its own filter that takes every operation)
        reads = pinned.exclude(method=["POST", "DELETE"]).exclude(path=["/jobs", "/models", "/healthz", "/encoders"])
        _execute(reads, report, failing_cases, prefix=f"{status} job: ")
    schema = schemathesis.openapi.from_path(contract_path, config=schemathesis_config(max_examples, seed))
    # the event stream of a job lasts as long as the job, and no worker runs here: on the queued jobs this pass
    # makes it would never end (the pinned passes above fuzz it on finished jobs, whose stream ends at once)
    schema = schema.exclude(path=["/jobs/{job_id}/events"])
    schema.app = recorder
    if models:
        steer_submissions(schema, list(models), list(subtypes) or ["LUAD"])
    _execute(schema, report, failing_cases)

    report.seconds = time.perf_counter() - started
    report.requests = recorder.counts
    report.errors += recorder.exceptions
    report.failing_responses = len(failing_cases)
    return report


def _execute(schema, report: Report, failing_cases: set[str], prefix: str = "") -> None:
    """Run the engine on ``schema``; its failures (distinct by check, operation and kind) and errors go into
    ``report``."""
    from schemathesis.engine import events, from_schema

    for event in from_schema(schema).execute():
        if isinstance(event, events.PhaseFinished):
            reason = event.phase.skip_reason
            report.phases[prefix + event.phase.name.value] = event.status.value + (f" ({reason.value})" if reason
                                                                                    else "")
        if isinstance(event, (events.ScenarioFinished, events.FuzzScenarioFinished)):
            report.cases[prefix + str(getattr(event, "phase", "") and event.phase.value)] += len(event.recorder.cases)
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.failure_info is None:
                        continue
                    failing_cases.add(f"{prefix}{case_id}")
                    failure = check.failure_info.failure
                    key = (check.name, failure.operation, failure.title)
                    if key in report.findings:
                        report.findings[key].count += 1
                        continue
                    response = event.recorder.find_response(case_id=failure.case_id or case_id)
                    body = ""
                    if response is not None:
                        body = f"→ {response.status_code} {response.headers.get('content-type', [''])[0]} " \
                               f"{response.content[:300]!r}"
                    report.findings[key] = Finding(check.name, prefix + (failure.operation or "?"), failure.title,
                                                   failure.message, f"{check.failure_info.code_sample}\n{body}")
        elif isinstance(event, events.NonFatalError):
            report.errors.append(f"{prefix}schemathesis error ({event.label}): {event.info.title}: "
                                 f"{event.info.message}")
        elif isinstance(event, events.FatalError):
            report.errors.append(f"{prefix}schemathesis fatal error: {event.exception!r}")


def table(report: Report) -> str:
    """Requests per operation by status (401 apart: the answers without or with a wrong key), then the distinct
    failures per check."""
    columns = [("2xx", lambda s: s // 100 == 2), ("401", lambda s: s == 401),
               ("other 4xx", lambda s: s // 100 == 4 and s != 401), ("5xx", lambda s: s >= 500)]
    per_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (label, status), n in report.requests.items():
        per_op[label][status] += n
    per_op["all requests"] = sum(per_op.values(), collections.Counter())
    lines = [f"{'operation':<48} {'requests':>8}" + "".join(f" {name:>9}" for name, _ in columns)]
    for label in [*sorted(report.operations), *sorted(set(per_op) - set(report.operations) - {"all requests"}),
                  "all requests"]:
        c = per_op.get(label, collections.Counter())
        lines.append(f"{label:<48} {sum(c.values()):>8}" +
                     "".join(f" {sum(n for s, n in c.items() if test(s)):>9}" for _, test in columns))
    lines.append("")
    lines.append(f"{'check':<48} {'distinct failures':>17}")
    checks = report.by_check()
    for name in sorted(checks):
        lines.append(f"{name:<48} {checks[name]:>17}")
    lines.append(f"{'(none)' if not checks else 'all checks':<48} {sum(checks.values()):>17}")
    if report.errors:
        lines.append(f"{'errors (schemathesis, the app raised)':<48} {len(report.errors):>17}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=300, help="Hypothesis examples per operation and phase")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--redis", nargs="?", const="redis://127.0.0.1:6379/0", default=None, metavar="URL",
                        help="Redis job store and broker (default URL redis://127.0.0.1:6379/0) instead of the "
                             "embedded mode")
    args = parser.parse_args(argv)
    # python-multipart logs a warning for each malformed part header fuzzing sends (the answer is a 422)
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    for key in [k for k in os.environ if k.startswith("SLIDESYNTH_")]:  # the run's settings only
        del os.environ[key]

    from service.app import create_app

    data_dir = Path(tempfile.mkdtemp(prefix="slidesynth-schemathesis-"))
    settings = settings_for(data_dir / "data", args.redis)
    try:
        app = create_app(settings)
        jobs = seed_jobs(app)
        report = run(app, args.max_examples, args.seed, jobs=jobs, **installed(settings))
    finally:
        if args.redis:
            cleanup_redis(settings)
        shutil.rmtree(data_dir, ignore_errors=True)

    mode = f"Redis ({args.redis})" if args.redis else "embedded (file job store)"
    print(f"schemathesis against openapi.yaml, {mode}, max {args.max_examples} examples per operation and phase, "
          f"seed {args.seed}: {report.total_requests} requests in {report.seconds:.1f} s")
    print(table(report))
    for problem in report.problems():
        print("\n" + problem)
    ours = len(report.findings) + len(report.errors)
    print(json.dumps({
        "mode": "redis" if args.redis else "embedded", "max_examples": args.max_examples, "seed": args.seed,
        "operations": len(report.operations), "requests": report.total_requests, "seconds": round(report.seconds, 1),
        "server_errors": report.server_errors, "failures_by_check": dict(report.by_check()),
        "errors": len(report.errors), "failing_responses": report.failing_responses,
        "ours": ours, "reference": 0,
        "ratio": round(report.failing_responses / max(1, report.total_requests), 4),
    }))


if __name__ == "__main__":
    main()
