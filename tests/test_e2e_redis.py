"""End to end on the Redis path: real Redis, a real Celery worker process, the API served by uvicorn,
HTTP requests, and OpenSlide reading the TIFF that comes back. No eager mode."""
from __future__ import annotations

import io
import json
import os
import subprocess
import time

import numpy as np
import pytest

from tests.conftest import make_mask, png_bytes
from tests.services import running_stack, wait_for as _wait

pytestmark = pytest.mark.integration


@pytest.fixture
def service(redis_url, key_prefix, tmp_path):
    with running_stack(redis_url, key_prefix, tmp_path, checkpoint_every="5", recovery_seconds="2") as stack:
        client = stack.client
        client.logs, client.redis_url, client.key_prefix = stack.logs, redis_url, key_prefix
        yield client


def _job(client, job_id):
    return client.get(f"/jobs/{job_id}").json()


def test_mask_to_pyramidal_tiff_through_redis_and_celery(service, tmp_path):
    import openslide

    # 256² mask at 2 µm/px → 1024² output at 0.5 µm/px: large enough for two pyramid levels.
    labels = make_mask(256, 256, classes=(0, 1, 2, 3, 4))
    resp = service.post("/generate", files={"mask": ("mask.png", png_bytes(labels), "image/png")},
                        data={"params": json.dumps({"mask_mpp": 2.0, "seed": 11, "steps": 3, "guidance": 1.0})})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert resp.headers["location"] == f"/jobs/{job_id}"

    seen = set()

    def finished():
        job = _job(service, job_id)
        seen.add((job["status"], job["stage"]))
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    try:
        job = _wait(finished, 400, "the job to finish", interval=0.1)
    except AssertionError:
        print((service.logs / "worker.log").read_text()[-5000:])
        raise
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and job["untrained"] and job["step"] == 3
    assert job["width"] == job["height"] == 1024 and job["mpp"] == 0.5
    assert ("running", "sampling") in seen and ("running", "decoding") in seen

    resp = service.get(job["links"]["slide"])
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/tiff"
    path = tmp_path / "slide.tiff"
    path.write_bytes(resp.content)
    slide = openslide.OpenSlide(str(path))
    assert slide.level_count > 1
    assert slide.dimensions == (1024, 1024)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
    assert "SYNTHETIC" in slide.properties["tiff.ImageDescription"]
    assert "untrained" in slide.properties["tiff.ImageDescription"].lower()
    # the description's JSON line records what made the slide: model, seed and the request's parameters
    recorded = json.loads(slide.properties["tiff.ImageDescription"].splitlines()[-1])
    assert recorded["synthetic"] is True and recorded["seed"] == 11 and recorded["model"] == job["model"]
    assert recorded["parameters"]["steps"] == 3 and recorded["parameters"]["guidance"] == 1.0
    assert recorded["parameters"]["mask_mpp"] == 2.0
    region = np.asarray(slide.read_region((0, 0), slide.level_count - 1, slide.level_dimensions[-1]))
    assert region.shape[2] == 4 and region[..., 3].min() == 255

    # HTTP Range on the TIFF.
    part = service.get(job["links"]["slide"], headers={"Range": "bytes=0-15"})
    assert part.status_code == 206 and part.content == resp.content[:16]
    assert service.get(job["links"]["thumbnail"]).headers["content-type"] == "image/png"
    # OpenSeadragon's view: the Deep Zoom descriptor and a tile of the job's TIFF (1024² → levels 0..10)
    dzi = service.get(job["links"]["deepzoom"])
    assert dzi.status_code == 200 and 'Width="1024"' in dzi.text and 'TileSize="254"' in dzi.text
    tile = service.get(f"/jobs/{job_id}/slide_files/10/1_1.jpeg")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    from PIL import Image

    got = np.asarray(Image.open(io.BytesIO(tile.content)).convert("RGB"), np.float64)
    want = np.asarray(slide.read_region((253, 253), 0, (256, 256)).convert("RGB"), np.float64)
    # the pixels at that place (up to one more JPEG pass over the untrained model's noisy texture)
    assert got.shape == want.shape and np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9
    listing = service.get("/jobs").json()
    assert listing["items"][0]["id"] == job_id


def test_cancel_queued_and_running_jobs(service):
    resp = service.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(256, 256)), "image/png")},
                        data={"params": json.dumps({"steps": 400, "seed": 1})})
    assert resp.status_code == 202, resp.text
    long_job = resp.json()["id"]
    resp = service.post("/generate", json={"conditioning": {"type": "subtype", "subtype": "LUAD"},
                                           "width": 256, "height": 256, "steps": 3, "seed": 1})
    assert resp.status_code == 202, resp.text
    queued_job = resp.json()["id"]
    _wait(lambda: (_job(service, long_job)["step"] or 0) >= 1, 120, "the first job to start sampling")
    # The second job waits behind it (one worker process, prefetch 1): cancel it while queued.
    assert _job(service, queued_job)["status"] == "queued"
    resp = service.delete(f"/jobs/{queued_job}")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    # Cancel the running one: it stops within a sampling step.
    step_at_cancel = _job(service, long_job)["step"]
    resp = service.delete(f"/jobs/{long_job}")
    assert resp.status_code == 202 and resp.json()["cancel_requested"]
    job = _wait(lambda: (j := _job(service, long_job))["status"] == "canceled" and j, 60, "the running job to stop")
    assert job["step"] < 400 and job["step"] <= step_at_cancel + 20
    assert service.get(f"/jobs/{long_job}/slide.tiff").status_code == 409
    # The worker then receives the canceled queued job's message and must drop it unstarted.
    import redis

    r = redis.Redis.from_url(service.redis_url)
    _wait(lambda: r.llen(service.key_prefix) == 0, 60, "the worker to take the canceled job's message")
    time.sleep(2)
    assert _job(service, queued_job)["started_at"] is None and _job(service, queued_job)["status"] == "canceled"


def test_worker_loss_resumes_from_checkpoint_bit_identically(service):
    """SIGKILL the worker's child process mid-sampling: Celery re-queues the task (late ack, reject on
    worker lost), a fresh child resumes from the last sampler checkpoint, and the slide equals an
    uninterrupted run of the same request."""
    import signal

    import tifffile

    params = {"steps": 40, "seed": 23, "compression": "deflate", "mask_mpp": 0.5}

    def submit():
        resp = service.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(128, 128)), "image/png")},
                            data={"params": json.dumps(params)})
        assert resp.status_code == 202, resp.text
        return resp.json()["id"]

    def wait_done(job_id):
        return _wait(lambda: (j := _job(service, job_id))["status"] in ("succeeded", "failed", "canceled") and j,
                     300, f"job {job_id} to finish")

    reference = submit()
    assert wait_done(reference)["status"] == "succeeded"

    victim = submit()
    _wait(lambda: (_job(service, victim)["step"] or 0) >= 6, 120, "the job to pass its first checkpoint")
    record = service.get(f"/jobs/{victim}").json()
    assert record["status"] == "running"
    pid = int(_worker_field(service, victim).rsplit("/", 1)[1])
    os.kill(pid, signal.SIGKILL)
    job = wait_done(victim)
    assert job["status"] == "succeeded", job["error"]
    assert _attempts(service, victim) == 2
    # resumed, not restarted, from the checkpoint's step (a multiple of SLIDESYNTH_CHECKPOINT_EVERY), not the last one
    resumed = job["metrics"]["resumed_from_step"]
    assert 5 <= resumed < 40 and resumed % 5 == 0, resumed
    pixels = []
    for job_id in (reference, victim):
        resp = service.get(f"/jobs/{job_id}/slide.tiff")
        pixels.append(tifffile.imread(__import__("io").BytesIO(resp.content), key=0))
    assert np.array_equal(pixels[0], pixels[1])


def _record(service, job_id) -> dict:
    import redis

    r = redis.Redis.from_url(service.redis_url)
    raw = r.hgetall(f"{service.key_prefix}:job:{job_id}")
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def _worker_field(service, job_id) -> str:
    return _record(service, job_id)["worker"]


def _attempts(service, job_id) -> int:
    return _record(service, job_id)["attempts"]


def test_a_running_worker_recovers_a_job_left_running_by_a_dead_process(service):
    """What a broker restart leaves (issue 21, defect 1): a job recorded as running in a process that is gone and
    no message to run it (the task was ended; its message waits in the broker's unacked set for the visibility
    timeout). The running worker — not only a starting one — re-queues it within SLIDESYNTH_RECOVERY_SECONDS and
    the job finishes; nobody restarts anything."""
    import socket

    import redis

    resp = service.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(64, 64)), "image/png")},
                        data={"params": json.dumps({"steps": 4, "seed": 5})})
    job_id = resp.json()["id"]
    _wait(lambda: _job(service, job_id)["status"] == "succeeded", 300, "the job to finish")
    dead = subprocess.Popen(["true"])
    dead.wait()
    r = redis.Redis.from_url(service.redis_url)
    stuck = {"status": "running", "worker": f"{socket.gethostname()}/{dead.pid}", "claim": "lost-run",
             "heartbeat_at": time.time(), "finished_at": None, "outputs": {}, "progress": 0.3}
    r.hset(f"{service.key_prefix}:job:{job_id}", mapping={k: json.dumps(v) for k, v in stuck.items()})
    assert _job(service, job_id)["status"] == "running"
    job = _wait(lambda: (j := _job(service, job_id))["status"] in ("succeeded", "failed") and j, 120,
                "the running worker to recover the job")
    assert job["status"] == "succeeded", job["error"]
    assert _record(service, job_id)["claim"] != "lost-run"
