"""The client commands (`slidesynth submit|status|wait|download|cancel|jobs|models`) as subprocesses against a real
service: `slidesynth serve` in embedded mode (its own worker, no Redis) with API keys, on a free port."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import REPO, free_port, make_mask, png_bytes

KEY = "k1"
LONG_JOB = ["--subtype", "LUAD", "--size", "512", "--steps", "400", "--seed", "1"]  # a minute or more here


# --- without a server ------------------------------------------------------------------------------------------

def test_the_client_imports_no_server_code_or_ml_library():
    code = ("import sys, slidesynth.client, slidesynth.client_cli; "
            "bad = ('torch', 'numpy', 'pydantic', 'celery', 'fastapi', 'service', 'worker', 'models', 'core.settings',"
            " 'core.jobs'); print(','.join(sorted(m for m in bad if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the client imported {out.stdout.strip()}"


def test_detail_is_told_as_fields_and_flags():
    from slidesynth.client import describe_detail
    from slidesynth.client_cli import _flag_of

    detail = [{"loc": ["body", "params", "steps"], "msg": "Input should be greater than or equal to 1", "type": "x"},
              {"loc": ["body", "options", "sampler"], "msg": "bad", "type": "x"},
              {"loc": ["body", "conditioning", "vectors", 3], "msg": "wrong length", "type": "x"}]
    assert describe_detail(detail, _flag_of).splitlines() == [
        "params.steps (--steps): Input should be greater than or equal to 1",
        "options.sampler (--option sampler=…): bad",
        "conditioning.vectors.3 (--embedding): wrong length"]
    assert describe_detail("job x not found") == "job x not found"


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.float32),
    np.asfortranarray(np.arange(24, dtype=">f8").reshape(2, 3, 4)),
    np.arange(60, dtype=np.float16).reshape(3, 4, 5) / 7,
    np.arange(5, dtype=np.int64)])
def test_npy_files_are_read_without_numpy(tmp_path, array):
    from slidesynth.client import read_npy

    np.save(tmp_path / "a.npy", array)
    shape, values = read_npy(tmp_path / "a.npy")
    assert shape == array.shape
    np.testing.assert_array_equal(np.array(values).reshape(shape), array.astype(float))


def test_embedding_files_become_the_apis_conditioning(tmp_path):
    from slidesynth.client import embedding_conditioning

    np.save(tmp_path / "grid.npy", np.arange(12, dtype=np.float32).reshape(2, 1, 6))
    assert embedding_conditioning(tmp_path / "grid.npy", "slidesynth-tile-v1") == {
        "type": "embedding_grid", "rows": 2, "cols": 1, "encoder": "slidesynth-tile-v1",
        "vectors": [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]}
    (tmp_path / "v.json").write_text("[0.5, 1]")
    assert embedding_conditioning(tmp_path / "v.json") == {"type": "embedding", "vector": [0.5, 1]}
    (tmp_path / "g.json").write_text('{"rows": 1, "cols": 1, "vectors": [[1]]}')
    assert embedding_conditioning(tmp_path / "g.json")["type"] == "embedding_grid"


def test_submit_flags_make_the_request():
    from slidesynth.cli import build_parser
    from slidesynth.client_cli import _request_body

    args = build_parser().parse_args([
        "submit", "--subtype", "LUAD", "--size", "300x200", "--steps", "3", "--outputs", "tiff,zarr",
        "--option", "sampler=random", "--param", "options.decode_tile=32", "--param", "seed=9", "--model", "m"])
    params, conditioning = _request_body(args)
    assert conditioning == {"type": "subtype", "subtype": "LUAD"}
    assert params == {"width": 300, "height": 200, "steps": 3, "outputs": ["tiff", "zarr"], "model": "m", "seed": 9,
                      "options": {"sampler": "random", "decode_tile": 32}}


def test_readme_documents_the_client_settings_and_exit_codes():
    import re

    from slidesynth.client import CLIENT_SETTINGS, ExitCode

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Client CLI"):]
    section = section[:section.index("\n## ", 1)]
    for name, (default, _) in CLIENT_SETTINGS.items():
        assert re.search(rf"\| `{name}` \| ({re.escape(f'`{default}`')}|empty) \|", section), name
    for code in ExitCode:
        assert re.search(rf"^\| {int(code)} \| ", section, re.M), code


# --- against a running service ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """`slidesynth serve` in embedded mode with the API key t1:k1, and a model whose weights are missing (its jobs
    pass the API's checks and fail in the worker)."""
    root = tmp_path_factory.mktemp("client-cli")
    card = json.loads((REPO / "weights" / "diffinfinite-demo" / "model_card.json").read_text())
    (root / "weights" / "weightless").mkdir(parents=True)
    (root / "weights" / "weightless" / "model_card.json").write_text(json.dumps({**card, "name": "weightless"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(SLIDESYNTH_DATA_DIR=str(root / "data"), SLIDESYNTH_MODELS_DIR=str(root / "weights"),
               SLIDESYNTH_DEVICE="cpu", SLIDESYNTH_API_KEYS=f"t1:{KEY}",
               SLIDESYNTH_DEFAULT_MODEL="diffinfinite-untrained", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    port = free_port()
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "slidesynth.cli", "serve", "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, (root / "serve.log").read_text()
            time.sleep(0.2)
        yield {"url": url, "root": root, "log": root / "serve.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _run(service, *args, key: str | None = KEY, cwd: Path | None = None, timeout: float = 240):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(SLIDESYNTH_SERVER=service["url"], PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if key is not None:
        env["SLIDESYNTH_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "slidesynth.cli", *map(str, args)], cwd=cwd or service["root"],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _mask(tmp_path) -> Path:
    path = tmp_path / "mask.png"
    path.write_bytes(png_bytes(make_mask(256, 256, classes=(0, 2, 4))))
    return path


@pytest.mark.integration
def test_submit_wait_download_a_mask_job(service, tmp_path):
    import openslide

    done = _run(service, "submit", "--mask", _mask(tmp_path), "--steps", 2, "--seed", 7, "--outputs", "tiff,zarr")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert len(job_id) == 32 and "UNTRAINED" in done.stderr

    waited = _run(service, "wait", job_id)
    assert waited.returncode == 0, waited.stderr + service["log"].read_text()[-3000:]
    assert waited.stdout.startswith(f"{job_id}  succeeded") and "256x256 px" in waited.stdout
    assert "\r" not in waited.stderr  # no progress bar when stderr is not a terminal

    got = _run(service, "download", job_id, "--json", cwd=tmp_path)  # default folder: ./ID
    assert got.returncode == 0, got.stderr
    files = json.loads(got.stdout)["files"]
    assert set(files) == {"slide.tiff", "thumbnail.png", "mask.png", "slide.zarr"}
    slide = Path(files["slide.tiff"])
    assert slide == (tmp_path / job_id / "slide.tiff").resolve()
    with openslide.OpenSlide(str(slide)) as opened:
        assert opened.dimensions == (256, 256)
    assert (Path(files["slide.zarr"]) / ".zattrs").is_file() and (Path(files["slide.zarr"]) / "0").is_dir()
    assert not list((tmp_path / job_id).glob("*.part"))

    status = _run(service, "status", job_id, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded"
    assert json.loads(status.stdout)["seed"] == 7
    listed = _run(service, "jobs")
    assert listed.returncode == 0
    assert any(line.startswith(f"{job_id}  succeeded") for line in listed.stdout.splitlines())
    listed = _run(service, "jobs", "--json", "--limit", 100)
    assert job_id in [j["id"] for j in json.loads(listed.stdout)["items"]]

    # An interrupted download resumes its .part with a Range request: a .part of 1000 zero bytes stays the first
    # 1000 bytes (a fresh download would have replaced them), the rest comes from the server.
    again = tmp_path / "again"
    again.mkdir()
    (again / "slide.tiff.part").write_bytes(bytes(1000))
    resumed = _run(service, "download", job_id, "--out", again, "--what", "tiff")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == str(again / "slide.tiff")
    whole = slide.read_bytes()
    assert (again / "slide.tiff").read_bytes() == bytes(1000) + whole[1000:]
    (again / "slide.tiff.part").write_bytes(whole)  # a complete .part: only the rename was left (416)
    assert _run(service, "download", job_id, "--out", again, "--what", "slide.tiff").returncode == 0
    assert (again / "slide.tiff").read_bytes() == whole and not (again / "slide.tiff.part").exists()


@pytest.mark.integration
def test_submit_with_wait_and_download_in_one_command(service, tmp_path):
    vector = tmp_path / "v.npy"
    np.save(vector, np.random.default_rng(0).standard_normal(512).astype(np.float32))
    done = _run(service, "submit", "--embedding", vector, "--model", "infinity-brush-untrained", "--size", "128x96",
                "--steps", 2, "--download", tmp_path / "out", "--what", "tiff,thumbnail", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded" and (result["width"], result["height"]) == (128, 96)
    assert set(result["files"]) == {"slide.tiff", "thumbnail.png"}
    assert Path(result["files"]["slide.tiff"]).read_bytes()[:4] in (b"II+\x00", b"MM\x00+")


@pytest.mark.integration
def test_models_lists_the_services_models(service):
    listed = _run(service, "models", "--json")
    assert listed.returncode == 0, listed.stderr
    models = json.loads(listed.stdout)
    assert {"diffinfinite-untrained", "infinity-brush-untrained", "weightless"} <= {m["name"] for m in models["models"]}
    table = _run(service, "models")
    assert table.returncode == 0 and "diffinfinite-untrained*" in table.stdout


@pytest.mark.integration
def test_timeout_cancel_and_canceled_wait(service, tmp_path):
    created = _run(service, "submit", *LONG_JOB, "--json")
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]

    waited = _run(service, "wait", job_id, "--timeout", "1", "--json")
    assert waited.returncode == 4, waited.stderr
    assert json.loads(waited.stdout)["status"] in ("queued", "running") and "timed out" in waited.stderr

    early = _run(service, "download", job_id)
    assert early.returncode == 7 and f"slidesynth wait {job_id}" in early.stderr

    canceled = _run(service, "cancel", job_id)
    assert canceled.returncode == 0, canceled.stderr
    assert canceled.stdout.startswith(f"{job_id}  cancel")
    waited = _run(service, "wait", job_id, timeout=120)
    assert waited.returncode == 3, waited.stdout + waited.stderr
    assert waited.stdout.startswith(f"{job_id}  canceled")
    assert json.loads(_run(service, "status", job_id, "--json").stdout)["status"] == "canceled"
    assert _run(service, "cancel", job_id).returncode == 0  # already canceled: nothing to do
    assert _run(service, "download", job_id).returncode == 3


@pytest.mark.integration
def test_a_failed_job_exits_1_and_a_finished_one_is_not_canceled(service, tmp_path):
    done = _run(service, "submit", "--mask", _mask(tmp_path), "--model", "weightless", "--steps", 2, "--wait")
    assert done.returncode == 1, done.stderr
    job_id = done.stdout.strip()
    assert f"{job_id}  failed" in done.stderr
    assert _run(service, "download", job_id).returncode == 1
    kept = _run(service, "cancel", job_id)
    assert kept.returncode == 7 and "--delete" in kept.stderr
    assert _run(service, "status", job_id).returncode == 0  # still there
    deleted = _run(service, "cancel", job_id, "--delete")
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    assert _run(service, "status", job_id).returncode == 6


@pytest.mark.integration
def test_refusals_name_the_field_and_have_their_exit_codes(service, tmp_path):
    mask = _mask(tmp_path)
    bad = _run(service, "submit", "--mask", mask, "--steps", 0)
    assert bad.returncode == 7 and "params.steps (--steps)" in bad.stderr and "greater than or equal to 1" in bad.stderr
    bad = _run(service, "submit", "--subtype", "LUAD", "--size", 256, "--guidance", 99, "--json")
    assert bad.returncode == 7
    error = json.loads(bad.stdout)
    assert error["status"] == 422 and error["exit_code"] == 7 and error["detail"][0]["loc"] == ["body", "guidance"]
    assert "guidance (--guidance)" in bad.stderr

    for command in (["status", "0" * 32], ["wait", "nope"], ["download", "nope"], ["cancel", "0" * 32]):
        missing = _run(service, *command)
        assert missing.returncode == 6, (command, missing.stderr)
        assert "not found" in missing.stderr

    for key in ("wrong", None):
        refused = _run(service, "jobs", key=key)
        assert refused.returncode == 7 and "401" in refused.stderr and "X-API-Key" in refused.stderr
    assert _run(service, "submit", "--subtype", "LUAD", "--api-key", "wrong").returncode == 7  # the flag wins

    dead = f"http://127.0.0.1:{free_port()}"
    for command in (["status", "x"], ["wait", "x"], ["models"], ["submit", "--mask", mask]):
        unreachable = _run(service, *command, "--server", dead)
        assert unreachable.returncode == 5 and "cannot reach" in unreachable.stderr, command

    assert _run(service, "submit", "--steps", 2).returncode == 2  # no conditioning
    assert _run(service, "submit", "--mask", tmp_path / "absent.png").returncode == 2
    assert _run(service, "wait").returncode == 2  # argparse: no id
    assert _run(service, "download", "x", "--what", "slide.jpeg").returncode == 2


def test_an_expired_job_and_a_410_have_their_own_exit_code(tmp_path):
    # retention (SLIDESYNTH_RETENTION_HOURS) removes a finished job's outputs: status `expired`, downloads 410
    import httpx

    from slidesynth.client import TERMINAL, Client, ExitCode, Expired, error_for

    assert "expired" in TERMINAL                      # `wait` stops on it instead of polling forever
    gone = httpx.Response(410, json={"detail": "job abc expired at 2026-12-01T00:00:00Z"})
    err = error_for(gone, "download slide.tiff")
    assert isinstance(err, Expired) and err.exit_code == ExitCode.EXPIRED == 8
    assert "expired at 2026-12-01" in str(err)
    with Client("http://127.0.0.1:9") as client, pytest.raises(Expired) as info:
        client.download({"id": "abc", "status": "expired", "links": {}}, tmp_path)
    assert info.value.exit_code == 8


@pytest.mark.integration
def test_priority_and_idempotency_key_reach_the_service(service, tmp_path):
    # the same key twice: one job (the second answer is the first job); --priority shows in its record
    mask = _mask(tmp_path)
    argv = ["submit", "--mask", str(mask), "--steps", "2", "--priority", "high",
            "--idempotency-key", "client-test-key-1", "--json"]
    first, second = _run(service, *argv), _run(service, *argv)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["id"] == b["id"]
    job = json.loads(_run(service, "status", a["id"], "--json").stdout)
    assert job["priority"] == "high"
    other = _run(service, "submit", "--mask", str(mask), "--steps", "3",
                "--idempotency-key", "client-test-key-1")
    assert other.returncode == 7 and "409" in other.stderr
    bad = _run(service, "submit", "--mask", str(mask), "--idempotency-key", "bad\tkey")
    assert bad.returncode == 7 and "--idempotency-key" in bad.stderr
    assert _run(service, "wait", a["id"], "--timeout", "120").returncode == 0
