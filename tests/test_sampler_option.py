"""The `sampler` job option's patch combiners: options, the 422 for a `dde` request without a trained
coordinator (naming options.sampler and the model), the lazy coordinator hook, and a job through the engine."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from models.diffinfinite.engine import (COORDINATOR_CARD, COORDINATOR_DIR, DEFAULT_DDE_GUIDANCE, DiffInfiniteEngine,
                                        DiffInfiniteOptions, has_coordinator, model_folder)
from models.engine import OptionError, Runtime, SlideRequest
from models.patching import ZeroCoordinator
from tests.conftest import REPO, make_mask, png_bytes

UNTRAINED_CARD = REPO / "models" / "diffinfinite" / "untrained_card.json"


@pytest.mark.parametrize("sampler", ["independent", "multidiffusion", "mixture", "dde"])
def test_window_samplers_default_to_the_fast_solver(sampler):
    opts = DiffInfiniteOptions(sampler=sampler).resolved()
    assert opts.solver == "dpmpp-2m-sde" and opts.sampler_stride is None
    assert DiffInfiniteOptions(sampler="random").resolved().solver == "ddim"


def test_sampler_stride_only_for_overlapping_samplers():
    assert DiffInfiniteOptions(sampler="mixture", sampler_stride=16).resolved().sampler_stride == 16
    for sampler in ("tiled", "random", "independent"):
        with pytest.raises(OptionError) as exc:
            DiffInfiniteOptions(sampler=sampler, sampler_stride=16).resolved()
        assert exc.value.field == "sampler_stride"
    with pytest.raises(ValueError):
        DiffInfiniteOptions(sampler="multidiffusion", sampler_stride=65)


def test_dde_guidance_only_for_dde_and_resolved_to_the_default():
    assert DiffInfiniteOptions(sampler="dde").resolved().dde_guidance == DEFAULT_DDE_GUIDANCE
    assert DiffInfiniteOptions(sampler="dde", dde_guidance="null").resolved().dde_guidance == "null"
    assert DiffInfiniteOptions(sampler="mixture").resolved().dde_guidance is None
    for sampler in ("tiled", "random", "mixture"):
        with pytest.raises(OptionError) as exc:
            DiffInfiniteOptions(sampler=sampler, dde_guidance="shared").resolved()
        assert exc.value.field == "dde_guidance"
    with pytest.raises(ValueError):
        DiffInfiniteOptions(sampler="dde", dde_guidance="both")
    # the option's choices (written out: the API process must not import the torch sampler) are the sampler's
    from typing import get_args

    from models.diffinfinite.sampler import NULL_CONDITIONS

    annotation = DiffInfiniteOptions.model_fields["dde_guidance"].annotation
    assert set(get_args(get_args(annotation)[0])) == set(NULL_CONDITIONS) and DEFAULT_DDE_GUIDANCE in NULL_CONDITIONS


def _model_with(models_dir, name: str, coordinator: bool):
    folder = models_dir / f"folder-of-{name}"
    folder.mkdir(parents=True)
    card = json.loads(UNTRAINED_CARD.read_text())
    card["name"] = name
    (folder / "model_card.json").write_text(json.dumps(card))
    if coordinator:
        (folder / COORDINATOR_DIR).mkdir()
        (folder / COORDINATOR_DIR / COORDINATOR_CARD).write_text("{}")
    return folder


def test_model_folder_and_coordinator_presence(tmp_path):
    with_c = _model_with(tmp_path, "m-with", True)
    _model_with(tmp_path, "m-without", False)
    assert model_folder("m-with", tmp_path) == with_c and has_coordinator(with_c)
    assert not has_coordinator(model_folder("m-without", tmp_path))
    assert model_folder("nope", tmp_path) is None and not has_coordinator(None)


def test_dde_without_a_coordinator_is_a_422_naming_the_field_and_the_model(embedded_settings):
    _model_with(embedded_settings.models_dir, "demo-with-dde", True)
    _model_with(embedded_settings.models_dir, "demo-plain", False)
    from service.app import create_app

    app = create_app(embedded_settings)
    with TestClient(app) as client:
        body = {"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 256, "height": 256,
                "options": {"sampler": "dde"}}
        for model in ("diffinfinite-untrained", "demo-plain"):
            resp = client.post("/generate", json={**body, "model": model})
            assert resp.status_code == 422, resp.text
            assert [d["loc"] for d in resp.json()["detail"]] == [["body", "options", "sampler"]]
            assert model in resp.text and "coordinator" in resp.text
            resp = client.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(16, 16)), "image/png")},
                               data={"params": json.dumps({"model": model, "options": {"sampler": "dde"}})})
            assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "params", "options", "sampler"]
        assert app.state.services.store.list("public", 0, 100)[1] == 0
        ok = client.post("/generate", json={**body, "model": "demo-with-dde"})
        assert ok.status_code == 202, ok.text
        spec = app.state.services.store.get(ok.json()["id"]).spec
        assert spec.options["sampler"] == "dde" and spec.options["solver"] == "dpmpp-2m-sde"
        bad = client.post("/generate", json={**body, "model": "demo-with-dde",
                                             "options": {"sampler": "mixture", "dde_guidance": "shared"}})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "options", "dde_guidance"]
        assert "dde" in bad.text
        md = client.post("/generate", json={**body, "options": {"sampler": "multidiffusion", "sampler_stride": 16}})
        assert md.status_code == 202, md.text
        assert app.state.services.store.get(md.json()["id"]).spec.options["sampler_stride"] == 16


class CountingZeroCoordinator(ZeroCoordinator):
    passes = 0

    def correction(self, outputs, noisy, origins, cond, t):
        CountingZeroCoordinator.passes += 1
        return super().correction(outputs, noisy, origins, cond, t)


@pytest.fixture
def fake_dde(monkeypatch):
    """A stand-in for models.dde (the DDE engineer's package): records how the hook calls it."""
    calls = []
    mod = types.ModuleType("models.dde")

    def load_coordinator(folder, device):
        calls.append((folder, device))
        return CountingZeroCoordinator(64, 16)

    mod.load_coordinator = load_coordinator
    monkeypatch.setitem(sys.modules, "models.dde", mod)
    return calls


def _generate(models, options, labels):
    req = SlideRequest(width=labels.shape[1], height=labels.shape[0], mpp=0.5, seed=3, steps=2, guidance=1.0, eta=1.0,
                       conditioning="mask", options=DiffInfiniteOptions(**options).resolved(), labels=labels)
    slide = DiffInfiniteEngine().generate(models, req, device=torch.device("cpu"), runtime=Runtime(batch_size=4),
                                          report=lambda *a: None, cancel=lambda: False)
    return np.concatenate(list(slide.bands)), slide


def test_engine_runs_window_samplers_and_dde_through_the_hook(tmp_path, fake_dde):
    from models.diffinfinite.loading import untrained_diffinfinite

    models = untrained_diffinfinite(seed=0)
    lab = make_mask(512, 896, classes=(0, 1, 2))  # 64×112 latents: windows at x = 0, 16, 32, 48 at stride 16
    models.folder = None
    with pytest.raises(ValueError, match="options.sampler.*no trained DDE coordinator"):
        _generate(models, {"sampler": "dde"}, lab)
    models.folder = _model_with(tmp_path, "x", True)
    dde, slide = _generate(models, {"sampler": "dde"}, lab)
    assert fake_dde == [(models.folder, torch.device("cpu"))]
    # the stride comes from the coordinator (16), and a zero correction is multidiffusion at that stride (guided
    # as DDE's Eq. 6, (1+ω)·avg ε(c) − ω·avg ε(∅) vs avg((1+ω)·ε(c) − ω·ε(∅)): equal up to float rounding, which
    # may move a pixel by one 8-bit level)
    md, md_slide = _generate(models, {"sampler": "multidiffusion", "sampler_stride": 16}, lab)
    assert np.abs(dde.astype(np.int16) - md.astype(np.int16)).max() <= 1
    assert slide.notes["sampler_passes"] == md_slide.notes["sampler_passes"] > 0
    assert "sampler" in slide.cut_lines
    # the job's dde_guidance reaches the sampler: Eq. 6 corrects the conditional and the null windows (two
    # coordinator passes a step, 2 steps), `shared` the conditional ones only
    for how, passes in (("labels", 4), ("null", 4), ("shared", 2)):
        CountingZeroCoordinator.passes = 0
        out, _ = _generate(models, {"sampler": "dde", "dde_guidance": how}, lab)
        assert CountingZeroCoordinator.passes == passes, how
        assert np.abs(out.astype(np.int16) - md.astype(np.int16)).max() <= 1
    md32, md32_slide = _generate(models, {"sampler": "multidiffusion"}, lab)  # default stride 32: other windows
    assert not np.array_equal(md32, md) and md32_slide.notes["sampler_passes"] < md_slide.notes["sampler_passes"]


def test_a_dde_job_with_the_shipped_coordinator_even_on_a_canvas_smaller_than_its_window(tmp_path):
    """The demo model's trained coordinator through the whole CLI path. On a 512² slide (one 64² latent window)
    its correction is not zero: the slide differs from multidiffusion's. A 128 × 96 slide (16 × 12 latents, below
    the coordinator's window) is sampled at the window size and cropped back instead of failing."""
    import subprocess

    import tifffile

    def generate(width: int, height: int, *sampler: str) -> np.ndarray:
        out = tmp_path / f"{sampler[1]}-{width}x{height}.tiff"
        run = subprocess.run([sys.executable, "-m", "slidesynth.cli", "generate", "--subtype", "adenocarcinoma",
                              "--width", str(width), "--height", str(height), "--steps", "2", "--seed", "5",
                              *sampler, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return tifffile.imread(out, level=0)

    dde = generate(512, 512, "--sampler", "dde")
    md = generate(512, 512, "--sampler", "multidiffusion", "--sampler-stride", "32")
    assert dde.shape == md.shape == (512, 512, 3)
    assert np.abs(dde.astype(np.int16) - md.astype(np.int16)).max() > 8
    small = generate(128, 96, "--sampler", "dde")
    assert small.shape == (96, 128, 3) and small.std() > 1
