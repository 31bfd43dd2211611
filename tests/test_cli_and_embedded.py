"""`slidesynth generate` in-process, and `slidesynth serve` in embedded mode (no broker server)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.conftest import REPO, free_port, make_mask, png_bytes


def _clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(SLIDESYNTH_DATA_DIR=str(tmp_path / "data"), SLIDESYNTH_MODELS_DIR=str(tmp_path / "weights"),
               SLIDESYNTH_DEVICE="cpu", PYTHONUNBUFFERED="1")
    return env


def test_generate_command_writes_a_slide(tmp_path, capsys, monkeypatch):
    import openslide

    from slidesynth.cli import main
    from core.settings import get_settings

    for key, value in _clean_env(tmp_path).items():
        if key.startswith("SLIDESYNTH_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    mask = tmp_path / "m.png"
    mask.write_bytes(png_bytes(make_mask(64, 64, classes=(0, 2, 4))))
    out = tmp_path / "out.tiff"
    try:
        rc = main(["generate", "--mask", str(mask), "--mask-mpp", "1.0", "--out", str(out), "--steps", "2",
                   "--seed", "5", "--zarr", str(tmp_path / "out.zarr")])
    finally:
        get_settings.cache_clear()
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["width"] == summary["height"] == 128 and summary["seed"] == 5
    slide = openslide.OpenSlide(str(out))
    assert slide.dimensions == (128, 128)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert (tmp_path / "out.zarr").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("slidesynth-")]  # temp dir cleaned


def test_generate_command_rejects_bad_mask(tmp_path, capsys):
    from slidesynth.cli import main

    bad = tmp_path / "rgb.png"
    bad.write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    assert main(["generate", "--mask", str(bad), "--out", str(tmp_path / "x.tiff")]) == 2
    assert "one channel" in capsys.readouterr().err
    assert not (tmp_path / "x.tiff").exists()


@pytest.mark.integration
def test_embedded_serve_runs_a_job_without_any_server(tmp_path):
    env = _clean_env(tmp_path)
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "slidesynth.cli", "serve", "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        deadline = time.time() + 60
        while True:
            try:
                health = client.get("/healthz")
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        assert health.json()["mode"] == "embedded"
        resp = client.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(64, 64)), "image/png")},
                           data={"params": json.dumps({"steps": 2, "seed": 1})})
        assert resp.status_code == 202, resp.text
        job_url = resp.json()["status_url"]
        deadline = time.time() + 180
        while (job := client.get(job_url).json())["status"] in ("queued", "running"):
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.2)
        assert job["status"] == "succeeded", job["error"]
        assert client.get(job["links"]["slide"]).content[:4] in (b"II+\x00", b"MM\x00+")
        assert (tmp_path / "data" / "broker" / "control").is_dir()  # the filesystem transport, kept in the data dir
        record = json.loads((tmp_path / "data" / "jobs" / job["id"] / "job.json").read_text())
        worker_pid = int(record["worker"].rsplit("/", 1)[1])
        # The worker `serve` started writes its metrics into the API's folder: one /metrics shows both
        from prometheus_client.parser import text_string_to_metric_families

        samples = [s for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples]
        found = {s.name: s.value for s in samples if not s.labels or s.labels.get("status") == "succeeded"}
        assert found["slidesynth_sampling_steps_total"] == 2 and found["slidesynth_job_duration_seconds_count"] == 1
        assert found["slidesynth_jobs"] == 1 and found["slidesynth_job_store_up"] == 1  # the file job store
        assert any(s.name == "slidesynth_http_requests_total" and s.labels["route"] == "/generate" for s in samples)
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    # Stopping `serve` stops the worker it started (uvicorn re-raises SIGTERM, so this needs pdeathsig).
    deadline = time.time() + 30
    while os.path.exists(f"/proc/{worker_pid}") and time.time() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{worker_pid}"), "the embedded worker outlived `slidesynth serve`"


def test_generate_cli_passes_engine_options_from_the_engines_options_models():
    from slidesynth.cli import _generate_params, build_parser

    args = build_parser().parse_args(["generate", "--subtype", "LUAD", "--width", "256", "--height", "256",
                                      "--out", "x.tiff", "--decode-tile", "32", "--decode-overlap", "4",
                                      "--sampler", "random", "--decode-context", "tile"])
    params = _generate_params(args)
    assert params.options == {"decode_tile": 32, "decode_overlap": 4, "sampler": "random", "decode_context": "tile"}
    defaults = _generate_params(build_parser().parse_args(["generate", "--subtype", "LUAD", "--width", "256",
                                                           "--height", "256", "--out", "x.tiff"]))
    assert defaults.options is None
    with pytest.raises(SystemExit):  # choices come from the options model's Literal
        build_parser().parse_args(["generate", "--subtype", "LUAD", "--out", "x.tiff", "--sampler", "fast"])
    with pytest.raises(SystemExit) as done:  # the options' descriptions are the flags' help
        build_parser().parse_args(["generate", "--help"])
    assert done.value.code == 0


def test_generate_cli_refuses_an_option_the_models_engine_does_not_take(tmp_path, capsys):
    from slidesynth.cli import main

    vector = tmp_path / "e.json"
    vector.write_text(json.dumps([1.0] * 512))
    code = main(["generate", "--embedding", str(vector), "--model", "infinity-brush-untrained", "--width", "64",
                 "--height", "64", "--out", str(tmp_path / "x.tiff"), "--sampler", "random"])
    assert code == 2 and "--sampler" in capsys.readouterr().err and not (tmp_path / "x.tiff").exists()
