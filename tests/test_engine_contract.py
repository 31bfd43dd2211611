"""The engine contract and the layer rules (docs/architecture.md): a new engine is one module; the API process
imports no ML library; packages import only those below them; engine names are compared only by the registry."""
from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from pydantic import Field

from models.cards import ModelCard
from models.engine import (EngineBase, EngineOptions, SlideBands, Stage, register_engine, stage_progress,
                           unregister_engine)
from tests.conftest import REPO

# Who may import whom (top-level packages of the repository; anything not ours is free). Must be a DAG.
ALLOWED = {
    "procedural": set(),
    "writers": set(),
    "models": set(),
    "evaluation": {"models", "procedural"},
    "training": {"models", "procedural", "evaluation"},
    "core": {"models"},
    "service": {"core", "models"},
    "worker": {"core", "models", "writers", "evaluation"},
    "slidesynth": {"core", "service", "worker", "models", "writers", "evaluation", "procedural", "training"},
    "bench": {"core", "service", "worker", "models", "writers", "evaluation", "procedural", "training", "slidesynth"},
}


# --- a toy engine, written as a newcomer would: one class, registered -------------------------------------------

class ConstantOptions(EngineOptions):
    colour: list[int] = Field(default_factory=lambda: [200, 120, 160], min_length=3, max_length=3,
                              description="RGB of the slide")


class ConstantEngine(EngineBase):
    name: ClassVar[str] = "constant-colour"
    options_model = ConstantOptions
    conditioning = ("embedding",)
    default_steps: ClassVar[int] = 2
    default_eta: ClassVar[float] = 0.0
    untrained_name: ClassVar[str | None] = "constant-colour"

    def untrained_card(self) -> ModelCard:
        return ModelCard(name="constant-colour", engine=self.name, trained=False, conditioning=["embedding"],
                         max_width=4096, max_height=4096)

    def load(self, folder, device) -> Any:
        class Loaded:
            card = self.untrained_card()
        return Loaded()

    def generate(self, models, request, *, device, runtime, report, cancel, state=None, on_checkpoint=None):
        progress = stage_progress(report, Stage.sampling, request.steps)
        for step in range(request.steps):
            progress(step + 1, request.steps)
        colour = np.array(request.options.colour, np.uint8)

        def bands():
            for row in range(0, request.height, 64):
                yield np.broadcast_to(colour, (min(64, request.height - row), request.width, 3)).copy()

        return SlideBands(bands=bands())


@pytest.fixture
def constant_engine():
    register_engine(ConstantEngine())
    yield
    unregister_engine("constant-colour")


def test_a_new_engine_is_one_module_registered_and_runs_through_the_api(constant_engine, embedded_settings):
    import tifffile
    from fastapi.testclient import TestClient

    from service.app import create_app
    from worker.jobrunner import WorkerContext, run_job

    with TestClient(create_app(embedded_settings)) as client:
        models = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert models["constant-colour"]["engine"] == "constant-colour"
        assert "colour" in models["constant-colour"]["options"]["properties"]
        body = {"model": "constant-colour", "width": 96, "height": 80, "seed": 1,
                "conditioning": {"type": "embedding", "vector": [1.0] * 8}, "options": {"colour": [10, 20, 30]}}
        bad = client.post("/generate", json={**body, "options": {"sampler": "tiled"}})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "options", "sampler"]
        job_id = client.post("/generate", json=body).json()["id"]
        run_job(job_id, WorkerContext.from_settings(embedded_settings))
        job = client.get(f"/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job["error"]
        assert job["steps"] == 2 and job["progress"] == 1.0
        slide = client.get(job["links"]["slide"])
        path = embedded_settings.data_dir / "jobs" / job_id / "slide.tiff"
        assert slide.status_code == 200 and path.read_bytes() == slide.content
    pixels = tifffile.imread(path)
    assert pixels.shape == (80, 96, 3) and (pixels == [10, 20, 30]).all()


def test_a_job_of_an_engine_this_worker_lacks_fails_naming_it(embedded_settings):
    from core.jobs import FileJobStore, JobRecord, JobSpec, JobStatus
    from models.registry import ModelRegistry
    from worker.jobrunner import WorkerContext, run_job

    store = FileJobStore(embedded_settings.data_dir)
    spec = JobSpec(model="m", engine="retired-engine", conditioning="embedding", width=64, height=64, mpp=0.5,
                   seed=1, steps=2, guidance=1.0, embedding=[1.0])
    store.create(JobRecord(id="j1", spec=spec))
    ctx = WorkerContext(embedded_settings, store, ModelRegistry(embedded_settings.models_dir))
    assert run_job("j1", ctx) == JobStatus.failed
    error = store.get("j1").error
    assert error.startswith("UnknownEngine: no engine 'retired-engine'; registered: ") and "diffinfinite" in error


# --- layers ----------------------------------------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_packages_import_only_the_layers_below_them():
    broken = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for name in _imports(path) & set(ALLOWED) - {package} - allowed:
                broken.append(f"{path.relative_to(REPO)} imports {name}")
    assert not broken, "\n".join(broken)


def test_the_layer_table_has_no_cycle():
    seen: dict[str, int] = {}

    def visit(package: str, trail: tuple[str, ...]) -> None:
        assert package not in trail, f"import cycle: {' -> '.join(trail + (package,))}"
        for below in ALLOWED[package]:
            visit(below, trail + (package,))

    for package in ALLOWED:
        visit(package, ())


def test_the_api_process_imports_no_ml_library():
    code = ("import sys, service.app, service.routes.generate; "
            "heavy = sorted(m for m in ('torch', 'diffusers', 'cv2', 'triton') if m in sys.modules); "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import service.app imported {out.stdout.strip()}"


def test_engine_names_are_compared_only_in_the_registry():
    pattern = re.compile(r"""engine\s*[!=]=\s*["']|["']\s*[!=]=\s*\w*engine\b|engine\.name\s*[!=]=""")
    found = [f"{path.relative_to(REPO)}:{n}" for package in ("core", "service", "worker", "slidesynth", "models", "training")
             for path in sorted((REPO / package).rglob("*.py")) if path.name != "engine.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


def test_generate_slide_reads_top_to_bottom_in_at_most_40_lines():
    from worker.pipeline import generate_slide

    assert len(inspect.getsource(generate_slide).splitlines()) <= 40


def test_untrained_cards_are_those_of_the_built_models():
    from models.engine import engines

    for engine in engines().values():
        if engine.untrained_name is not None:
            assert engine.load(None, "cpu").card == engine.untrained_card(), engine.name


def test_job_records_of_earlier_versions_keep_their_options():
    from core.jobs import JobSpec

    old = {"model": "m", "engine": "diffinfinite", "conditioning": "mask", "width": 64, "height": 64, "mpp": 0.5,
           "seed": 1, "steps": 2, "guidance": 1.0, "sampler": "random", "decode_tile": 32, "decode_overlap": None}
    assert JobSpec.model_validate(old).options == {"sampler": "random", "decode_tile": 32}
    brush = {**old, "engine": "infinity-brush"}  # its flat fields were ignored then: dropped now
    assert JobSpec.model_validate(json.loads(json.dumps(brush))).options == {}
