"""``GET /models`` lists the trained DDE coordinators of each model folder (read from the JSON card; only those
trained against the folder's base weights), and listing them imports no ML library."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.dde.loading import COORDINATOR_DIR, save_coordinator
from models.hashing import sha256_file

REPO = Path(__file__).resolve().parents[1]


def _model_folder(models_dir: Path, name: str, *, coordinator: bool, base_matches: bool = True) -> Path:
    """A DiffInfinite model folder (card + base weight bytes) with an optional coordinator."""
    import torch

    from models.dde.coordinator import CoordinatorConfig, DDECoordinator

    folder = models_dir / name
    folder.mkdir(parents=True)
    (folder / "model_card.json").write_text(json.dumps({"name": name, "engine": "diffinfinite", "trained": True}))
    base = folder / "image_unet.safetensors"
    base.write_bytes(b"base weights of " + name.encode())
    if coordinator:
        torch.manual_seed(0)
        net = DDECoordinator(CoordinatorConfig(channels=4, patch=64, stride=32, hidden=32, depth=2, heads=2,
                                               cond="labels", cond_channels=6))
        sha = sha256_file(base) if base_matches else "0" * 64
        save_coordinator(net, folder / COORDINATOR_DIR, base={"model": name, "file": base.name, "sha256": sha},
                         training={"command": "slidesynth train dde-coordinator …"},
                         evaluation={"averaging": 0.2, "coordinator": 0.18, "ratio": 0.9})
    return folder


@pytest.fixture
def client(embedded_settings):
    from service.app import create_app

    models_dir = Path(embedded_settings.models_dir)
    _model_folder(models_dir, "with-coordinator", coordinator=True)
    _model_folder(models_dir, "stale-coordinator", coordinator=True, base_matches=False)
    _model_folder(models_dir, "plain", coordinator=False)
    with TestClient(create_app(embedded_settings)) as c:
        yield c


def test_models_list_trained_coordinators(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    listed = models["with-coordinator"]["coordinators"]
    assert len(listed) == 1
    c = listed[0]
    assert (c["combiner"], c["patch"], c["stride"], c["base_model"]) == ("dde", 64, 32, "with-coordinator")
    assert c["evaluation"]["ratio"] == 0.9 and c["parameters"] > 0
    assert c["card"]["architecture"]["cond"] == "labels" and len(c["card"]["weights_sha256"]) == 64
    assert models["stale-coordinator"]["coordinators"] == []  # trained against other base weights
    assert models["plain"]["coordinators"] == []
    assert models["diffinfinite-untrained"]["coordinators"] == []


def test_listing_coordinators_imports_no_ml_library(tmp_path):
    _model_folder(tmp_path, "m", coordinator=True)
    code = ("import sys; from models.registry import ModelRegistry; "
            f"r = ModelRegistry({str(tmp_path)!r}); c = r.coordinators('m'); assert len(c) == 1, c; "
            "print(','.join(sorted(m for m in ('torch', 'diffusers', 'safetensors') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
