"""Behaviour pinned across refactors: three fixed small jobs, submitted through the HTTP API and run by the
worker's job runner, must produce exactly the pixels they produced before (issue 19's refactor into engines).

The record (``tests/data/golden_slides.json``) holds, per machine, the sha256 of every pyramid level's decoded
pixels of each job — not of the file bytes, whose ImageDescription carries the software version and the job
record's layout. Float results are those of one CPU model, torch and numpy build (two CPUs with the same
instruction set, e.g. an Intel and an AMD with AVX-512, take different oneDNN/MKL kernels and differ in the last
bits): each record names its machine, and a machine with none is skipped (with the reason), not failed.
``SLIDESYNTH_RECORD_GOLDEN=1`` records this machine (replacing its earlier record, keeping the others'); record
on a commit known to be right, since the record is what later commits are held to.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from tests.conftest import REPO, make_mask, png_bytes

RECORD = REPO / "tests" / "data" / "golden_slides.json"
RECORDING = os.environ.get("SLIDESYNTH_RECORD_GOLDEN") == "1"  # read at import: fixtures clear SLIDESYNTH_*

MASK_PARAMS = {"model": "diffinfinite-demo", "seed": 11, "steps": 4, "guidance": 1.5, "compression": "deflate",
               "mask_mpp": 6.0}  # a 48 × 64 mask at 6 µm/px: a 576 × 768 slide, latent 72 × 96 (several patches)
JOBS = {
    "mask-tiled": {"mask": True, "params": {**MASK_PARAMS, "options": {"sampler": "tiled"}}},
    "mask-random": {"mask": True, "params": {**MASK_PARAMS, "options": {"sampler": "random"}}},
    "infbrush-embedding": {"mask": False, "params": {
        "model": "infinity-brush-untrained", "width": 64, "height": 48, "seed": 5, "steps": 3,
        "compression": "deflate",
        "conditioning": {"type": "embedding", "encoder": "quilt-vit-b-32",
                         # exact binary fractions: no libm or SIMD math whose last bit varies between builds
                         "vector": [((37 * i) % 101) / 64.0 - 0.75 for i in range(512)]}}},
}


def _machine() -> dict:
    import torch

    # numpy too: its SIMD maths (masks, resizing) may change the last bit between releases
    return {"torch": torch.__version__, "numpy": np.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": _cpu_model()}


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pixels_sha256(path) -> list[str]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return [hashlib.sha256(np.ascontiguousarray(level.asarray()).tobytes()).hexdigest()
                for level in tif.series[0].levels]


def _run(name: str, settings) -> list[str]:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from worker.jobrunner import WorkerContext, run_job

    job = JOBS[name]
    with TestClient(create_app(settings)) as client:
        if job["mask"]:
            mask = make_mask(48, 64, classes=(0, 1, 3, 5))
            answer = client.post("/generate", files={"mask": ("m.png", png_bytes(mask), "image/png")},
                                 data={"params": json.dumps(job["params"])})
        else:
            answer = client.post("/generate", json=job["params"])
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        run_job(job_id, WorkerContext.from_settings(settings))
        record = client.get(f"/jobs/{job_id}").json()
    assert record["status"] == "succeeded", record["error"]
    return _pixels_sha256(settings.data_dir / "jobs" / job_id / "slide.tiff")


@pytest.fixture
def golden_settings(embedded_settings):
    return embedded_settings.model_copy(update={"models_dir": REPO / "weights"})


@pytest.mark.parametrize("name", sorted(JOBS))
def test_fixed_jobs_make_the_recorded_pixels(name, golden_settings):
    records = json.loads(RECORD.read_text())["records"] if RECORD.exists() else []
    machine = _machine()
    mine = next((r for r in records if r["machine"] == machine), None)
    if not RECORDING:
        if mine is None:
            pytest.skip(f"no record for this machine ({machine}); recorded: {[r['machine'] for r in records]}")
        assert name in mine["jobs"], f"{RECORD} has no record of {name}; run with SLIDESYNTH_RECORD_GOLDEN=1"
    hashes = _run(name, golden_settings)
    if RECORDING:
        if mine is None:
            mine = {"machine": machine, "jobs": {}}
            records.append(mine)
        mine["jobs"][name] = hashes
        RECORD.write_text(json.dumps({"records": records}, indent=2, sort_keys=True) + "\n")
        return
    assert hashes == mine["jobs"][name]
