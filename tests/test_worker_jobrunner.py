"""The job runner without a broker: the real pipeline on the untrained default model, tiny sizes."""
from __future__ import annotations

import numpy as np
import pytest

from core.jobs import FileJobStore, JobRecord, JobSpec, JobStatus
from tests.conftest import make_mask, png_bytes


class RecordingStore(FileJobStore):
    """The real file store, remembering every sampling step it was told about."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.steps_seen: list[int] = []
        self.stages_seen: list[str] = []

    def update(self, job_id, **fields):
        if "step" in fields:
            self.steps_seen.append(fields["step"])
        if "stage" in fields:
            self.stages_seen.append(fields["stage"].value)
        super().update(job_id, **fields)


@pytest.fixture
def ctx(embedded_settings):
    from models.registry import ModelRegistry
    from worker.jobrunner import WorkerContext

    store = RecordingStore(embedded_settings.data_dir)
    return WorkerContext(embedded_settings, store, ModelRegistry(embedded_settings.models_dir))


def submit(ctx, job_id="job1", steps=4, size=64, classes=(0, 1, 3), **spec_fields) -> JobRecord:
    spec = JobSpec(model="diffinfinite-untrained", engine="diffinfinite", conditioning="mask", width=size,
                   height=size, mpp=0.5, seed=3, steps=steps, guidance=2.0, mask_file="mask.png", **spec_fields)
    job_dir = ctx.store.job_dir(job_id)
    job_dir.mkdir(parents=True)
    (job_dir / "mask.png").write_bytes(png_bytes(make_mask(size, size, classes=classes)))
    job = JobRecord(id=job_id, spec=spec)
    ctx.store.create(job)
    return job


def test_success_records_outputs_and_every_step(ctx):
    from worker.jobrunner import run_job

    submit(ctx, outputs=["tiff", "zarr"], size=128, classes=(0, 1))
    assert run_job("job1", ctx) == JobStatus.succeeded
    job = ctx.store.get("job1")
    assert job.status == JobStatus.succeeded and job.progress == 1.0 and job.untrained
    assert job.started_at <= job.finished_at and job.error is None
    assert set(job.outputs) >= {"tiff", "zarr", "thumbnail", "mask"}
    # Conditioning fidelity is measured on every mask job (an untrained model scores near chance).
    assert 0.0 <= job.metrics["balanced_accuracy"] <= 1.0
    job_dir = ctx.store.job_dir("job1")
    for name in job.outputs.values():
        assert (job_dir / name).exists()
    assert not list(job_dir.glob("*.part*"))
    # Progress reached the store at least once per sampling step, in order.
    assert sorted(set(ctx.store.steps_seen)) == list(range(0, 5))
    assert ctx.store.stages_seen.index("sampling") < ctx.store.stages_seen.index("decoding")


def test_same_seed_same_slide(ctx):
    import tifffile

    from worker.jobrunner import run_job

    submit(ctx, "a1", outputs=["tiff"], compression="deflate")
    submit(ctx, "a2", outputs=["tiff"], compression="deflate")
    run_job("a1", ctx)
    run_job("a2", ctx)
    pix = [tifffile.imread(ctx.store.job_dir(j) / "slide.tiff", key=0) for j in ("a1", "a2")]
    assert pix[0].shape == (64, 64, 3) and np.array_equal(pix[0], pix[1])


def test_cancel_mid_sampling_removes_partial_files(ctx, monkeypatch):
    from worker.jobrunner import run_job

    submit(ctx, steps=20)
    real = ctx.store.cancel_requested
    calls = {"n": 0}

    def cancel_after_a_few(job_id):
        calls["n"] += 1
        if calls["n"] == 4:
            ctx.store.request_cancel(job_id)
        return real(job_id)

    monkeypatch.setattr(ctx.store, "cancel_requested", cancel_after_a_few)
    assert run_job("job1", ctx) == JobStatus.canceled
    job = ctx.store.get("job1")
    assert job.status == JobStatus.canceled and max(ctx.store.steps_seen) < 20
    remaining = {p.name for p in ctx.store.job_dir("job1").iterdir()}
    assert remaining <= {"mask.png", "job.json", "job.lock", "cancel"}


def test_canceled_while_queued_never_starts(ctx):
    from worker.jobrunner import run_job

    submit(ctx)
    ctx.store.request_cancel("job1")
    ctx.store.transition("job1", {JobStatus.queued}, status=JobStatus.canceled)
    assert run_job("job1", ctx) == JobStatus.canceled
    assert ctx.store.get("job1").started_at is None and ctx.store.steps_seen == []


def test_failure_is_recorded_with_message(ctx):
    from worker.jobrunner import run_job

    submit(ctx)
    (ctx.store.job_dir("job1") / "mask.png").write_bytes(b"not a png")
    assert run_job("job1", ctx) == JobStatus.failed
    job = ctx.store.get("job1")
    assert job.status == JobStatus.failed
    assert job.error.startswith("UnidentifiedImageError"), job.error


def test_redelivery_is_capped(ctx):
    from worker.jobrunner import run_job

    submit(ctx)
    ctx.store.update("job1", status=JobStatus.running, attempts=ctx.settings.max_attempts)
    assert run_job("job1", ctx) == JobStatus.failed
    assert "attempts" in ctx.store.get("job1").error


def test_infinity_brush_embedding_job(ctx):
    import openslide

    from worker.jobrunner import run_job

    vec = np.random.default_rng(0).normal(size=512)
    vec = (vec / np.linalg.norm(vec)).tolist()
    spec = JobSpec(model="infinity-brush-untrained", engine="infinity-brush", conditioning="embedding", width=136,
                   height=72, mpp=0.5, seed=2, steps=3, guidance=1.5, embedding=vec, encoder="quilt-vit-b-32")
    ctx.store.create(JobRecord(id="ib1", spec=spec))
    assert run_job("ib1", ctx) == JobStatus.succeeded, ctx.store.get("ib1").error
    job = ctx.store.get("ib1")
    assert "mask" not in job.outputs and job.untrained
    slide = openslide.OpenSlide(str(ctx.store.job_dir("ib1") / job.outputs["tiff"]))
    assert slide.dimensions == (136, 72)
    assert sorted(set(ctx.store.steps_seen)) == [0, 1, 2, 3]
    # no mask to agree with: the classifier's class shares over the slide's two 64² windows
    shares = {k: v for k, v in job.metrics.items() if k.startswith("class_share_")}
    assert set(shares) == {"class_share_unknown", "class_share_carcinoma", "class_share_necrosis",
                           "class_share_tumor_stroma", "class_share_others"}
    assert sum(shares.values()) == pytest.approx(1.0) and all(v in (0.0, 0.5, 1.0) for v in shares.values())


def test_infinity_brush_embedding_grid_job(ctx):
    import json

    import openslide

    from core.jobs import EmbeddingGrid
    from worker.jobrunner import run_job

    rng = np.random.default_rng(1)
    vectors = [(v / np.linalg.norm(v)).tolist() for v in rng.normal(size=(6, 512))]
    spec = JobSpec(model="infinity-brush-untrained", engine="infinity-brush", conditioning="embedding_grid",
                   width=64, height=40, mpp=0.5, seed=2, steps=2, guidance=1.5, encoder="quilt-vit-b-32",
                   embedding_grid=EmbeddingGrid.from_vectors(2, 3, vectors))
    ctx.store.create(JobRecord(id="grid1", spec=spec))
    assert run_job("grid1", ctx) == JobStatus.succeeded, ctx.store.get("grid1").error
    job = ctx.store.get("grid1")
    assert np.array_equal(job.spec.embedding_grid.array(), np.float32(vectors)) and job.untrained
    job_dir = ctx.store.job_dir("grid1")
    assert openslide.OpenSlide(str(job_dir / job.outputs["tiff"])).dimensions == (64, 40)
    # the slide's metadata names the grid's shape, not its 3072 numbers
    params = json.loads((job_dir / "metadata.json").read_text())["parameters"]
    assert params["embedding_grid"] == {"rows": 2, "cols": 3, "dim": 512}
    assert params["conditioning"] == "embedding_grid"
    # a grid the engine cannot use fails the job with the reason (the API refuses it before it gets here)
    zero = EmbeddingGrid.from_vectors(2, 3, vectors[:5] + [[0.0] * 512])
    bad = spec.model_copy(update={"embedding_grid": zero})
    ctx.store.create(JobRecord(id="grid2", spec=bad))
    assert run_job("grid2", ctx) == JobStatus.failed and "zero vector" in ctx.store.get("grid2").error


def test_job_records_from_before_grids_load():
    old = {"model": "infinity-brush-untrained", "engine": "infinity-brush", "conditioning": "embedding", "width": 48,
           "height": 40, "mpp": 0.5, "seed": 2, "steps": 3, "guidance": 1.5, "eta": 0.0, "embedding": [1.0] * 512,
           "encoder": "quilt-vit-b-32"}
    record = JobRecord.model_validate({"id": "old", "spec": old})
    assert record.spec.embedding_grid is None and record.spec.embedding == [1.0] * 512


@pytest.mark.parametrize("decoder", ["hann", "four-pass"])
def test_paper_decoders_are_selectable(ctx, decoder):
    import tifffile

    from worker.jobrunner import run_job

    submit(ctx, f"d{decoder[0]}", steps=2, size=64, decoder=decoder, compression="deflate")
    assert run_job(f"d{decoder[0]}", ctx) == JobStatus.succeeded, ctx.store.get(f"d{decoder[0]}").error
    assert tifffile.imread(ctx.store.job_dir(f"d{decoder[0]}") / "slide.tiff", key=0).shape == (64, 64, 3)


def test_cancel_during_decoding_removes_partial_outputs(ctx, monkeypatch):
    from worker.jobrunner import run_job

    submit(ctx, size=128, steps=2, outputs=["tiff", "zarr"])
    real = ctx.store.cancel_requested
    seen_partials = []

    def cancel_once_writing(job_id):
        if "decoding" in ctx.store.stages_seen:
            seen_partials.extend(p.name for p in ctx.store.job_dir(job_id).glob(".*.partial-*"))
            ctx.store.request_cancel(job_id)
        return real(job_id)

    monkeypatch.setattr(ctx.store, "cancel_requested", cancel_once_writing)
    assert run_job("job1", ctx) == JobStatus.canceled
    assert seen_partials, "the writers had temporary files open when the cancel came"
    remaining = {p.name for p in ctx.store.job_dir("job1").iterdir()}
    assert remaining <= {"mask.png", "job.json", "job.lock", "cancel"}


def test_lost_runs_are_requeued_and_fenced(ctx):
    import socket
    import subprocess
    import time as _time

    from worker.jobrunner import recover_orphans, run_job

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    ctx.hostname = host
    submit(ctx, "lost1")
    submit(ctx, "stale1")
    submit(ctx, "live1")
    ctx.store.update("lost1", status=JobStatus.running, worker=f"{host}/{dead.pid}", claim="old",
                     heartbeat_at=_time.time(), attempts=1)
    ctx.store.update("stale1", status=JobStatus.running, worker="elsewhere/1", claim="old2",
                     heartbeat_at=_time.time() - ctx.settings.lease_seconds - 5, attempts=1)
    ctx.store.update("live1", status=JobStatus.running, worker="elsewhere/2", claim="c", heartbeat_at=_time.time(),
                     attempts=1)
    sent: list[str] = []
    assert sorted(recover_orphans(ctx, lambda job: sent.append(job.id))) == ["lost1", "stale1"] == sorted(sent)
    assert ctx.store.get("lost1").status == JobStatus.queued and ctx.store.get("live1").status == JobStatus.running
    # The old run lost its claim: it cannot record a result any more.
    assert not ctx.store.transition("lost1", {JobStatus.queued, JobStatus.running}, expect={"claim": "old"},
                                    status=JobStatus.succeeded)
    assert run_job("lost1", ctx) == JobStatus.succeeded and ctx.store.get("lost1").attempts == 2


def test_hard_time_limit_failure_is_recorded(ctx):
    from worker.jobrunner import fail_job

    submit(ctx)
    ctx.store.update("job1", status=JobStatus.running)
    fail_job("job1", ctx, "TimeLimitExceeded: 86400")
    job = ctx.store.get("job1")
    assert job.status == JobStatus.failed and "TimeLimitExceeded" in job.error


def test_a_checkpoint_that_cannot_resume_this_job_is_ignored(ctx):
    """A redelivered job whose checkpoint came from another sampler setting or version starts over."""
    from models.diffinfinite.pipeline import DiffInfinitePipeline, SamplingOptions
    from worker.jobrunner import STATE_FILE, run_job

    job = submit(ctx, "old1", outputs=["tiff"])
    models = ctx.registry.load("diffinfinite-untrained", "cpu")
    labels = np.zeros((64, 64), np.uint8)
    stale = DiffInfinitePipeline(models).new_state(labels, SamplingOptions(steps=4, mode="tiled", seed=99))
    stale.save(ctx.store.job_dir("old1") / STATE_FILE)
    ctx.store.update("old1", attempts=1)  # this run is the second delivery: it looks for a checkpoint
    assert run_job("old1", ctx) == JobStatus.succeeded, ctx.store.get("old1").error
    assert job.spec.seed == 3


def test_a_slide_too_small_for_the_fidelity_classifier_succeeds_without_the_metric(ctx):
    """A side under the classifier's 64-px window: nothing to score, and no reason to fail the job."""
    from worker.jobrunner import run_job

    submit(ctx, "tiny", steps=2, size=32, outputs=["tiff"])
    assert run_job("tiny", ctx) == JobStatus.succeeded, ctx.store.get("tiny").error
    assert "balanced_accuracy" not in ctx.store.get("tiny").metrics


def test_both_decode_contexts_run_and_report_the_quilt_score(ctx):
    from worker.jobrunner import run_job

    for context in ("slide", "tile"):
        submit(ctx, f"c{context}", steps=2, size=640, classes=(1, 3), decode_context=context,
               compression="deflate")
        assert run_job(f"c{context}", ctx) == JobStatus.succeeded, ctx.store.get(f"c{context}").error
        metrics = ctx.store.get(f"c{context}").metrics
        # a 640-px slide holds one decode-tile ramp per axis, and the tiled sampler's last cells
        assert metrics["quilt_score"] == max(metrics["quilt_score_decode"], metrics["quilt_score_sampler"])
        assert metrics["quilt_score"] > 0
        # and the ridge score (thin lines centred on the same cuts), per kind and its largest
        assert metrics["ridge_score"] == max(metrics["ridge_score_decode"], metrics["ridge_score_sampler"])
        assert 0 < metrics["ridge_score"] < 5


def test_a_latent_with_nan_fails_before_any_output_file(ctx, monkeypatch):
    import torch

    from models.diffinfinite.pipeline import DiffInfinitePipeline
    from worker.jobrunner import run_job

    def nan_latents(self, labels, options=None, **kw):
        z = torch.zeros(1, 4, labels.shape[0] // 8, labels.shape[1] // 8)
        z[0, 2, 3, 1] = float("nan")
        return z

    monkeypatch.setattr(DiffInfinitePipeline, "sample_latents", nan_latents)
    submit(ctx, steps=2, outputs=["tiff", "zarr"])
    assert run_job("job1", ctx) == JobStatus.failed
    job = ctx.store.get("job1")
    assert "latent contains NaN" in job.error and "(3, 1)" in job.error, job.error
    remaining = {p.name for p in ctx.store.job_dir("job1").iterdir()}
    assert remaining <= {"mask.png", "job.json", "job.lock", "cancel"}, remaining


def test_a_duplicate_delivery_of_a_live_run_is_dropped_and_not_counted(ctx):
    """At most one live run per job: a delivery of a job whose run is alive (on another host with a fresh
    heartbeat, or on this host in a process that exists) does nothing and is not an attempt; a run recorded in a
    dead process, or in this very process, was lost: the delivery takes the job over and counts."""
    import os
    import socket
    import time as _time

    from worker.jobrunner import run_job

    host = socket.gethostname()
    ctx.hostname = host
    for job_id, worker in (("otherhost", "elsewhere/2"), ("samehost", f"{host}/{os.getppid()}")):
        submit(ctx, job_id)
        ctx.store.update(job_id, status=JobStatus.running, worker=worker, claim="live", heartbeat_at=_time.time(),
                         attempts=1, started_at=123.0)
        assert run_job(job_id, ctx) == JobStatus.running
        job = ctx.store.get(job_id)
        assert (job.attempts, job.claim, job.worker, job.started_at) == (1, "live", worker, 123.0)
    assert ctx.store.steps_seen == []
    submit(ctx, "mine")
    ctx.store.update("mine", status=JobStatus.running, worker=f"{host}/{os.getpid()}", claim="gone",
                     heartbeat_at=_time.time(), attempts=1)
    assert run_job("mine", ctx) == JobStatus.succeeded and ctx.store.get("mine").attempts == 2


def test_a_run_whose_job_was_taken_over_stops_and_leaves_the_record(ctx, monkeypatch):
    """A run presumed lost (its job re-queued and claimed by another run) notices within a step and stops
    without recording anything: the other run owns the job."""
    from worker import jobrunner

    monkeypatch.setattr(jobrunner, "CLAIM_CHECK_SECONDS", 0.0)
    submit(ctx, steps=20)
    real = ctx.store.cancel_requested
    calls = {"n": 0}

    def taken_over_after_a_few(job_id):
        calls["n"] += 1
        if calls["n"] == 4:
            ctx.store.update(job_id, claim="another-run", worker="elsewhere/9")
        return real(job_id)

    monkeypatch.setattr(ctx.store, "cancel_requested", taken_over_after_a_few)
    assert jobrunner.run_job("job1", ctx) == JobStatus.running
    job = ctx.store.get("job1")
    assert (job.status, job.claim, job.worker) == (JobStatus.running, "another-run", "elsewhere/9")
    assert max(ctx.store.steps_seen) < 10 and job.outputs == {}


def test_a_job_store_outage_during_sampling_does_not_fail_the_job(ctx, caplog):
    """Issue 21 (chaos): the job store unreachable for a few steps — a Redis restart: refused connections, then
    LOADING — used to fail the job with "ConnectionError" at the first progress write, though nothing was wrong with
    it (with one Redis for broker and store, Celery's SIGTERM on the broker loss usually ends the task first; with
    SLIDESYNTH_REDIS_URL apart from the broker nothing does). The run skips the writes it cannot make and goes on;
    the slide is the one an undisturbed run makes."""
    import logging

    import redis
    import tifffile

    from worker.jobrunner import run_job

    store = ctx.store
    store.unavailable = (redis.ConnectionError,)  # what the Redis store declares
    down = {"on": False}
    real_update, real_cancel, real_get = store.update, store.cancel_requested, store.get

    def update(job_id, **fields):
        if fields.get("step") == 3 and job_id == "hit":
            down["on"] = True  # Redis goes away as step 3 is written, and is back for step 6
        if fields.get("step") == 6:
            down["on"] = False
        if down["on"]:
            raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")
        return real_update(job_id, **fields)

    def refused(real):
        def call(job_id):
            if down["on"]:
                raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            return real(job_id)
        return call

    store.update, store.cancel_requested, store.get = update, refused(real_cancel), refused(real_get)
    submit(ctx, "hit", steps=8, compression="deflate")
    submit(ctx, "calm", steps=8, compression="deflate")
    with caplog.at_level(logging.INFO, logger="slidesynth.worker"):
        assert run_job("hit", ctx) == JobStatus.succeeded
    job = store.get("hit")
    assert job.status == JobStatus.succeeded and job.error is None and job.attempts == 1
    assert sorted(set(store.steps_seen)) == [0, 1, 2, 6, 7, 8]  # steps 3–5 never reached the record
    assert "the job store is unreachable" in caplog.text and "the job store is back" in caplog.text
    assert run_job("calm", ctx) == JobStatus.succeeded
    pixels = [tifffile.imread(store.job_dir(j) / "slide.tiff", key=0) for j in ("hit", "calm")]
    assert np.array_equal(pixels[0], pixels[1])
