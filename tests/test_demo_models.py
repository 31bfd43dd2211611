"""The shipped demo models (weights/diffinfinite-demo): strict loading, hashes, and conditioning fidelity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.cards import ModelCard
from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "weights" / "diffinfinite-demo"
BALANCED_ACCURACY_GOAL = 0.8


@pytest.fixture(scope="module")
def card() -> ModelCard:
    assert (DEMO / "model_card.json").is_file(), f"{DEMO} is missing: run `python -m slidesynth.demo_models all`"
    return ModelCard.load(DEMO)


def test_card_describes_trained_demo_models(card):
    assert card.name == "diffinfinite-demo" and card.engine == "diffinfinite" and card.trained
    assert set(card.classes) == {0, 1, 2, 3, 4, 5} and set(card.subtypes) == {0, 1}
    assert card.fidelity_classes == {1: 1, 2: 2, 3: 3, 4: 4, 5: 0}  # glass is label 5; 0 = unknown (null)
    assert card.training["device"] == "cpu" and card.training["commands"]
    assert all("slidesynth train" in c or "-m procedural" in c for c in card.training["commands"])
    assert all("--relabel 0:5" in c for c in card.training["commands"] if "slidesynth train" in c)
    assert set(card.files) == {"image_unet.safetensors", "mask_unet.safetensors", "vae/config.json",
                               "vae/diffusion_pytorch_model.safetensors"}
    total = sum((DEMO / f).stat().st_size for f in card.files)
    assert total <= 30 * 2**20, f"demo weights take {total / 2**20:.1f} MiB, the limit is 30 MiB"


def test_hashes_match_the_card(card):
    from slidesynth.demo_models import verify_files

    assert verify_files(DEMO) == card.files


def test_checkpoints_load_strictly_as_fp16(card):
    from diffusers import AutoencoderKL

    nets = {
        "image_unet.safetensors": ImageUNet(ImageUNetConfig.from_dict(card.config["image_unet"])),
        "mask_unet.safetensors": MaskUNet(MaskUNetConfig.from_dict(card.config["mask_unet"])),
    }
    vae_cfg = json.loads((DEMO / "vae" / "config.json").read_text())
    nets["vae/diffusion_pytorch_model.safetensors"] = AutoencoderKL.from_config(vae_cfg)
    counts = {}
    for name, net in nets.items():
        sd = load_file(str(DEMO / name))
        assert all(v.dtype == torch.float16 for v in sd.values()), f"{name} is not stored as fp16"
        net.load_state_dict(sd, strict=True)  # raises on any missing / unexpected / mis-shaped key
        counts[name] = sum(p.numel() for p in net.parameters())
    for name, n in counts.items():
        assert 1_000_000 <= n <= 10_000_000, f"{name}: {n} parameters, expected a few million"


def test_demo_is_the_default_model(tmp_path):
    from core.settings import Settings

    assert Settings(models_dir=REPO / "weights", data_dir=tmp_path).default_model == "diffinfinite-demo"


@pytest.fixture(scope="module")
def unseen_generation(card):
    """End to end (the worker's sampling + Hann-tiled decoding path) on a slide layout none of the models saw
    (procedural seed outside every training set) with the card's default steps… reduced to TEST_STEPS, its
    default guidance and η = 1; scored by the fidelity classifier. 640² px holds one former tile boundary
    (512 px) per axis for the seam ratio."""
    from evaluation.fidelity import score_slide
    from models.diffinfinite.loading import load_diffinfinite
    from procedural.tissue import random_layout
    from slidesynth.demo_models import generate_image, to_model_labels

    classes = random_layout(TEST_SIZE, TEST_SIZE, 31337, "slide", mpp=0.5)  # procedural classes, 0 = glass
    assert len(np.unique(classes)) >= 4
    models = load_diffinfinite(DEMO)
    img, seams = generate_image(models, to_model_labels(classes), steps=TEST_STEPS, seed=0, with_seams=True)
    assert img.shape == (TEST_SIZE, TEST_SIZE, 3) and img.dtype == np.uint8
    assert seams[0] and seams[1]  # the decoder's blend edges: the former tile boundaries
    return score_slide(img, classes, boundaries=seams), score_slide(img, classes, ignore=(0,), boundaries=seams)


@pytest.mark.slow
def test_tissue_regions_follow_an_unseen_mask(unseen_generation):
    """Carcinoma, stroma and fat/vessel regions of the mask are painted as such."""
    _, tissue = unseen_generation
    assert len(tissue["recall"]) >= 3
    assert tissue["balanced_accuracy"] >= BALANCED_ACCURACY_GOAL, (
        f"balanced accuracy over the tissue classes {tissue['balanced_accuracy']:.3f} < {BALANCED_ACCURACY_GOAL} "
        f"on an unseen {TEST_SIZE}² layout (recall {tissue['recall']}, {TEST_STEPS} steps)")


@pytest.mark.slow
def test_fidelity_goal_on_an_unseen_mask(unseen_generation):
    """Issue 6's goal: balanced accuracy ≥ 0.8 over every requested class, glass included. The seam ratio at
    this size holds two lines per axis and varies ±10 % with content alone (the procedural render of this
    layout scores 0.95 on the same lines), so here it only has to stay clear of a visible seam (a hard
    12-level step scores 1.5–2.0); its ≤ 1.05 figure is measured at 2048² by the recipe's evaluate step."""
    r, _ = unseen_generation
    assert r["balanced_accuracy"] >= BALANCED_ACCURACY_GOAL, (
        f"balanced accuracy {r['balanced_accuracy']:.3f} < {BALANCED_ACCURACY_GOAL} on an unseen {TEST_SIZE}² layout "
        f"(recall per class {r['recall']}, {r['windows_scored']} windows, {TEST_STEPS} steps)")
    assert r["recall"]["unknown"] >= 0.8, f"glass is not painted as glass: recall {r['recall']}"
    assert r["seam_ratio"] is not None and r["seam_ratio"] <= VISIBLE_SEAM, (
        f"seam ratio {r['seam_ratio']} > {VISIBLE_SEAM} on the decoder's blend edges")


VISIBLE_SEAM = 1.3
TEST_SIZE = 640
TEST_STEPS = 25
