"""The parts of the ∞-Brush demo recipe: mosaic layouts, dense-patch training pixels, regions embedded as the mean
of native tiles by an installed encoder, subtypes from an encoder's class prototypes, and the default model for
embedding requests."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.infbrush.config import tiny_config
from models.infbrush.pipeline import InfBrushModels, InfBrushPipeline, make_card, untrained_infbrush
from procedural.tissue import random_layout
from training.infbrush import EncodedRegions, make_batch, region_native_tiles, sample_patches, sample_pixels

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"


def test_mosaic_layouts_are_cells_of_one_class():
    seen_grids = set()
    for seed in range(40):
        lab = random_layout(256, 256, seed, "mosaic")
        assert lab.shape == (256, 256) and lab.dtype == np.uint8 and lab.max() < 5
        assert np.array_equal(lab, random_layout(256, 256, seed, "mosaic"))           # seeded
        # each quadrant's centre region is dominated by one class (cells + ≤ 12 % inclusions)
        for r0 in (0, 128):
            for c0 in (0, 128):
                core = lab[r0 + 40:r0 + 88, c0 + 40:c0 + 88]
                assert np.bincount(core.ravel(), minlength=5).max() / core.size > 0.5
        quads = {int(np.bincount(lab[r:r + 128, c:c + 128].ravel()).argmax()) for r in (0, 128) for c in (0, 128)}
        seen_grids.add(len(quads) > 1)
    assert seen_grids == {True, False}          # single-class images and images of several cells both occur
    with pytest.raises(ValueError, match="mosaic"):
        random_layout(8, 8, 0, "mosaics")


def test_sample_patches_are_disjoint_dense_squares():
    g = torch.Generator().manual_seed(0)
    flat = sample_patches(1000, 100, 120, 16, g)
    assert flat.numel() == 1000 and flat.unique().numel() == 1000
    rows, cols = flat // 120, flat % 120
    assert rows.max() < 100 and cols.max() < 120
    first = flat[:256]                                         # one whole 16 × 16 square
    r, c = first // 120, first % 120
    assert (r.max() - r.min(), c.max() - c.min()) == (15, 15) and set((r * 1000 + c).tolist()) == {
        (int(r.min()) + i) * 1000 + int(c.min()) + j for i in range(16) for j in range(16)}
    # different draws differ; the same generator state gives the same pixels
    assert not torch.equal(flat, sample_patches(1000, 100, 120, 16, g))
    assert torch.equal(sample_patches(1000, 100, 120, 16, torch.Generator().manual_seed(0)), flat)
    with pytest.raises(ValueError, match="disjoint 16² patches"):
        sample_patches(40 * 256, 100, 120, 16, torch.Generator())
    assert sample_pixels(10, 50, g).unique().numel() == 10


def test_make_batch_takes_patches_and_refuses_unknown_layouts():
    cfg = tiny_config(n_points=512, embedding_dim=8)
    img = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    items = [(img, torch.ones(1, 1, 8))] * 2
    from models.infbrush.schedule import CosineSchedule

    b = make_batch(items, cfg, CosineSchedule(), torch.Generator().manual_seed(1), "cpu", points="patches",
                   patch_px=16)
    px = b["px"][0]
    assert px.shape == (512, 2)
    # every point has its 4 lattice neighbours in the batch except on its square's border
    keys = set((px[:, 0] * 64 + px[:, 1]).long().tolist())
    inner = sum(all(int(p[0] + dy) * 64 + int(p[1] + dx) in keys for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)))
                for p in px)
    assert inner >= 2 * 14 * 14
    with pytest.raises(ValueError, match="uniform, patches"):
        make_batch(items, cfg, CosineSchedule(), torch.Generator(), "cpu", points="grid")


def test_regions_as_the_mean_of_native_tiles():
    img = torch.zeros(3, 256, 256, dtype=torch.uint8)
    img[:, :128, 128:] = 200
    tiles = region_native_tiles(img, 2, 2, 64)
    assert tiles.shape == (4, 16, 64, 64, 3)                   # 128-px regions hold 2 × 2 tiles, repeated to 16
    assert [int(t.mean()) for t in tiles] == [0, 200, 0, 0]
    assert region_native_tiles(img, 1, 1, 64).shape == (1, 16, 64, 64, 3)
    with pytest.raises(ValueError, match="smaller than the encoder's 64-px"):
        region_native_tiles(img, 8, 8, 64)

    class Images:
        def __len__(self):
            return 1

        def item(self, i):
            return img, None

    seen = []

    def embed(t):                      # a region's vector: the normalised mean of its tiles' unit vectors
        seen.append(t.shape)
        v = np.zeros((len(t), 3), np.float32)
        v[:, 0] = 1.0
        v[t.reshape(len(t), -1).mean(1) > 100, 1] = 1.0
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    ds = EncodedRegions(Images(), embed, 3, layouts=((2, 2),), tile_px=64, regions="tiles")
    grid = ds.item(0, (2, 2))[1]
    assert seen == [(64, 64, 64, 3)] and grid.shape == (2, 2, 3)
    assert torch.allclose(grid[0, 1], torch.tensor([0.70710677, 0.70710677, 0.0]))
    assert torch.allclose(grid[1, 0], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="resize, tiles"):
        EncodedRegions(Images(), embed, 3, regions="crop")


def test_single_tile_conditions_mix_one_tile_with_the_region_mean():
    # one region (1 × 1) whose 16 native tiles alternate between two colours: the mean lies between them, a
    # single-tile condition is one of them; the draws follow the generator given, so a resumed run repeats them
    img = torch.zeros(3, 256, 256, dtype=torch.uint8)
    for k, (y, x) in enumerate((y, x) for y in range(0, 256, 64) for x in range(0, 256, 64)):
        img[:, y:y + 64, x:x + 64] = 200 * (k % 2)

    class Images:
        def __len__(self):
            return 1

        def item(self, i):
            return img, None

    def embed(t):
        bright = t.reshape(len(t), -1).mean(1) > 100
        return np.stack([~bright, bright], 1).astype(np.float32)

    mean = torch.tensor([0.70710677, 0.70710677])
    always = EncodedRegions(Images(), embed, 2, layouts=((1, 1),), tile_px=64, regions="tiles", single_tile_p=1.0)
    assert torch.allclose(always.item(0)[1][0, 0], mean)            # no generator: the region's mean
    draws = [tuple(always.item(0, (1, 1), torch.Generator().manual_seed(s))[1][0, 0].tolist()) for s in range(16)]
    assert set(draws) == {(1.0, 0.0), (0.0, 1.0)}                     # always one tile, both kinds drawn
    half = EncodedRegions(Images(), embed, 2, layouts=((1, 1),), tile_px=64, regions="tiles", single_tile_p=0.5)
    g = torch.Generator().manual_seed(3)
    picks = [half.item(0, None, g)[1][0, 0] for _ in range(200)]
    share = sum(not torch.allclose(v, mean) for v in picks) / len(picks)
    assert 0.35 < share < 0.65
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert all(torch.equal(half.item(0, None, g1)[1], half.item(0, None, g2)[1]) for _ in range(10))
    with pytest.raises(ValueError, match="single_tile_p needs regions='tiles'"):
        EncodedRegions(Images(), embed, 2, regions="resize", single_tile_p=0.5)
    with pytest.raises(ValueError, match=r"single_tile_p must be in \[0, 1\]"):
        EncodedRegions(Images(), embed, 2, regions="tiles", single_tile_p=1.5)


def test_subtypes_from_an_encoders_class_prototypes(tmp_path):
    from models.encoders import class_prototypes
    from models.infbrush.engine import InfBrushEngine

    protos = class_prototypes("slidesynth-tile-v1", WEIGHTS)
    cfg = tiny_config(embedding_dim=128, embedding_encoder="slidesynth-tile-v1")
    card = make_card(cfg, name="t", trained=True, prototype_classes=list(protos))
    assert list(card.subtypes.values()) == list(protos) and "subtype" in card.conditioning
    assert card.config["subtypes_from"] == "prototypes:slidesynth-tile-v1"
    torch.manual_seed(0)
    from models.infbrush.denoiser import InfBrushDenoiser

    pipe = InfBrushPipeline(InfBrushModels(card=card, denoiser=InfBrushDenoiser(cfg).eval()), "cpu",
                            models_dir=WEIGHTS)
    assert np.allclose(pipe.embed_subtype("carcinoma").numpy(), protos["carcinoma"])
    with pytest.raises(ValueError, match="unknown subtype 'LUAD'.*carcinoma"):
        pipe.embed_subtype("LUAD")
    engine = InfBrushEngine()
    assert engine.serves(card, "subtype", WEIGHTS) is None
    why = engine.serves(card, "subtype", tmp_path)
    assert "slidesynth-tile-v1" in why and "send an embedding" in why
    # another encoder without prototypes: no subtypes offered at all (QuiltNet's prompts live in another space)
    bare = make_card(tiny_config(embedding_dim=64, embedding_encoder="mine"), name="b", trained=True)
    assert bare.subtypes == {} and "subtype" not in bare.conditioning
    # a QuiltNet-conditioned model keeps the prompt set's codes
    assert "LUAD" in untrained_infbrush().card.subtypes.values()


def test_cli_trains_on_an_installed_encoders_tile_means_with_patches(tmp_path):
    """`--embed slidesynth-tile-v1 --regions tiles --point-layout patches`: the card records the encoder, the
    layouts and the prototypes' subtypes; the state records the options."""
    from procedural.tissue import make_dataset

    make_dataset(tmp_path / "data", 2, size=128, seed=3, kind="mosaic")
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "slidesynth.cli", "train", "infinity-brush", "--data", str(tmp_path / "data"),
           "--embed", "slidesynth-tile-v1", "--regions", "tiles", "--tile-px", "64", "--grids", "1x1,2x2",
           "--config", "demo", "--points", "512", "--point-layout", "patches", "--patch-px", "16",
           "--train-resolution", "128", "--steps", "2", "--batch-size", "2", "--threads", "1", "--no-progress",
           "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads((out / "model_card.json").read_text())
    assert card["embedding_encoder"] == "slidesynth-tile-v1" and card["embedding_dim"] == 128
    assert "embedding_grid" in card["conditioning"] and "subtype" in card["conditioning"]
    assert "carcinoma" in card["subtypes"].values()
    assert card["training"]["point_layout"] == "patches" and card["training"]["region_embedding"] == "tiles"
    assert "encoder slidesynth-tile-v1" in card["training_data"] and "native 64²" in card["training_data"]
    state = json.loads((out / "train_state" / "state.json").read_text())
    assert state["options"]["embed"] == "encoder slidesynth-tile-v1" and state["options"]["points"] == "patches"
    bad_cmd = list(cmd)
    bad_cmd[cmd.index("--embed") + 1], bad_cmd[-1] = "no-such-encoder", str(tmp_path / "m2")
    bad = subprocess.run(bad_cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no-such-encoder" in bad.stderr and "not installed" in bad.stderr


def test_requests_without_a_model_get_the_default_model_for_their_conditioning(tmp_path):
    from core.settings import Settings
    from models.registry import ModelRegistry
    from service.validation import resolve_model

    settings = Settings(models_dir=tmp_path, data_dir=tmp_path / "d")
    assert (settings.default_model, settings.default_embedding_model) == ("diffinfinite-untrained",
                                                                          "infinity-brush-untrained")
    cards = ModelRegistry(tmp_path).cards()
    assert resolve_model(None, cards, settings, "mask").name == "diffinfinite-untrained"
    assert resolve_model(None, cards, settings, "subtype").name == "diffinfinite-untrained"
    assert resolve_model(None, cards, settings, "embedding").name == "infinity-brush-untrained"
    assert resolve_model(None, cards, settings, "embedding_grid").name == "infinity-brush-untrained"
    assert resolve_model("diffinfinite-untrained", cards, settings, "embedding").name == "diffinfinite-untrained"
    shipped = Settings(models_dir=WEIGHTS, data_dir=tmp_path / "d")
    assert shipped.default_embedding_model == "infinity-brush-bessel-demo"
    (tmp_path / "w").mkdir()
    shutil.copytree(WEIGHTS / "infinity-brush-demo", tmp_path / "w" / "infinity-brush-demo")
    assert Settings(models_dir=tmp_path / "w", data_dir=tmp_path / "d").default_embedding_model == "infinity-brush-demo"
