"""∞-Brush model folders, cards and request validation (the worker-facing API)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.cards import ModelCard
from models.infbrush import InfBrushPipeline, load_infbrush, save_infbrush, untrained_infbrush
from models.infbrush.config import InfBrushConfig, paper_config, tiny_config
from models.infbrush.pipeline import WEIGHTS_FILE, parameter_count




def test_untrained_default_card():
    m = untrained_infbrush(seed=0)
    c = m.card
    assert c.name == "infinity-brush-untrained" and c.engine == "infinity-brush" and c.trained is False
    assert c.embedding_encoder == "quilt-vit-b-32" and c.embedding_dim == 512
    assert c.max_width == c.max_height == 8192
    assert set(c.conditioning) == {"embedding", "embedding_grid", "subtype"}
    assert InfBrushConfig.from_dict(c.config["network"]) == tiny_config()
    assert "∞-Diff" in c.description and "Philox" in c.description
    # seeded: same seed → same weights, another seed → others
    a, b = untrained_infbrush(seed=0).denoiser.state_dict(), untrained_infbrush(seed=1).denoiser.state_dict()
    assert all(torch.equal(a[k], m.denoiser.state_dict()[k]) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_registry_builds_the_untrained_model(tmp_path):
    from models.registry import ModelRegistry

    registry = ModelRegistry(tmp_path)
    models = registry.load("infinity-brush-untrained", "cpu")
    # the card GET /models shows (read from the engine's JSON, no network built) is the built model's card
    assert models.card == registry.card("infinity-brush-untrained") and models.card.engine == "infinity-brush"


def test_validate_embedding_names_expected_encoder_and_dimension():
    pipe = InfBrushPipeline(untrained_infbrush(), "cpu")
    v = pipe.validate_embedding(list(np.linspace(-1, 1, 512)), encoder="quilt-vit-b-32")
    assert v.shape == (1, 1, 512) and v.dtype == torch.float32
    assert pipe.validate_embedding(np.ones((3, 4, 512))).shape == (3, 4, 512)
    for bad, kw in [(np.ones(512), {"encoder": "uni-vit-l-16"}), (np.ones(384), {}), (np.ones((2, 2, 768)), {}),
                    (np.ones((2, 512)), {})]:
        with pytest.raises(ValueError, match=r"'quilt-vit-b-32' with dimension 512"):
            pipe.validate_embedding(bad, **kw)
    with pytest.raises(ValueError, match="non-finite"):
        pipe.validate_embedding(np.r_[np.ones(511), np.nan])
    with pytest.raises(ValueError, match="zero"):
        pipe.validate_embedding(np.zeros(512))
    with pytest.raises(ValueError, match="exceeds"):
        pipe.validate_embedding(np.ones((65, 1, 512)))
    with pytest.raises(ValueError, match="not numeric"):
        pipe.validate_embedding(["a"] * 512)


def test_size_limits():
    pipe = InfBrushPipeline(untrained_infbrush(), "cpu")
    with pytest.raises(ValueError, match="8192"):
        pipe.sample_bands(height=8193, width=64, embedding=np.ones(512), steps=1)
    with pytest.raises(ValueError, match="outside"):
        pipe.sample_bands(height=4, width=64, embedding=np.ones(512), steps=1)
    with pytest.raises(ValueError, match="quilt-vit-b-32"):
        pipe.sample_bands(height=16, width=16, embedding=np.ones(100), steps=1)


def test_save_load_roundtrip_and_mismatches(tmp_path):
    m = untrained_infbrush(seed=2)
    folder = save_infbrush(m, tmp_path / "ib")
    card = ModelCard.load(folder)
    assert len(card.files[WEIGHTS_FILE]) == 64
    loaded = load_infbrush(folder)
    sd, ref = loaded.denoiser.state_dict(), m.denoiser.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    a = InfBrushPipeline(m, "cpu").sample_array(16, 24, embedding=np.ones(512), steps=2, seed=1)
    b = InfBrushPipeline(loaded, "cpu").sample_array(16, 24, embedding=np.ones(512), steps=2, seed=1)
    assert np.array_equal(a, b)

    # a configuration that does not match the weights → every mismatched key is listed
    d = json.loads((folder / "model_card.json").read_text())
    d["config"]["network"]["channels"] = 24
    d["config"]["network"]["heads"] = 2
    d["files"] = {}
    (folder / "model_card.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"shape mismatches \(\d+\): .*lift\.weight: file \(16, 3\) vs network \(24, 3\)"):
        load_infbrush(folder)

    # missing and unexpected keys
    folder2 = save_infbrush(untrained_infbrush(seed=2), tmp_path / "ib2")
    w = load_file(str(folder2 / WEIGHTS_FILE))
    w.pop("out.bias")
    w["extra.weight"] = torch.zeros(2)
    save_file(w, str(folder2 / WEIGHTS_FILE))
    d = json.loads((folder2 / "model_card.json").read_text())
    with pytest.raises(ValueError, match="sha256"):
        load_infbrush(folder2)
    d["files"] = {}
    (folder2 / "model_card.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"missing keys \(1\): out\.bias; unexpected keys \(1\): extra\.weight"):
        load_infbrush(folder2)

    # wrong engine, missing weights, unknown config keys
    d["config"]["network"]["bogus"] = 1
    (folder2 / "model_card.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="bogus"):
        load_infbrush(folder2)
    (folder2 / WEIGHTS_FILE).unlink()
    d["config"]["network"].pop("bogus")
    (folder2 / "model_card.json").write_text(json.dumps(d))
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_infbrush(folder2)


def test_paper_configuration_size():
    """The paper reports 450 M parameters; our paper preset is within 5 %."""
    with torch.device("meta"):
        from models.infbrush.denoiser import InfBrushDenoiser

        n = parameter_count(InfBrushDenoiser(paper_config()))
    assert 0.95 * 450e6 < n < 1.05 * 450e6
