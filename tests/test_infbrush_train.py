"""∞-Brush training on pixel subsets: the loss falls, checkpoints resume, the CLI parser, dataset checks."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.infbrush import InfBrushPipeline, load_infbrush
from models.infbrush.config import tiny_config
from models.infbrush.denoiser import InfBrushDenoiser
from models.infbrush.schedule import CosineSchedule
from training.cli import add_train_parsers
from training.infbrush import (ImageFolderDataset, SyntheticFunctions, TrainOptions, evaluate_loss, make_batch,
                               train_infbrush)

SIZES = ((32, 32), (24, 40))




def _opts(out, **kw):
    base = dict(out=out, config=tiny_config(n_points=256), synthetic=8, synthetic_sizes=SIZES, steps=30,
                batch_size=4, lr=3e-3, progress=False, save_every=20, seed=0)
    base.update(kw)
    return TrainOptions(**base)


def test_tiny_model_loss_falls_on_synthetic_functions(tmp_path):
    cfg = tiny_config(n_points=256)
    ds = SyntheticFunctions(8, sizes=SIZES)
    torch.manual_seed(0)
    before = evaluate_loss(InfBrushDenoiser(cfg), ds, cfg)
    res = train_infbrush(_opts(tmp_path / "run"))
    after = evaluate_loss(res["model"], ds, cfg)
    # the trivial predictor (zero) scores E[(Aξ)²] on the same held-out batch
    batch = make_batch([ds.item(i % 8) for i in range(8)], cfg, CosineSchedule(), torch.Generator().manual_seed(1234),
                       "cpu", t=[int((j + 0.5) * 1000 / 8) for j in range(8)], drop=[False] * 8)
    zero = float(batch["target"].square().mean())
    assert after < 0.5 * before, (before, after)
    assert after < 0.7 * zero, (zero, after)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30


def test_checkpoint_loads_and_resumes(tmp_path):
    out = tmp_path / "run"
    train_infbrush(_opts(out, steps=4, save_every=2))
    m = load_infbrush(out)
    assert m.card.trained and m.card.training["steps"] == 4 and m.card.name == "infinity-brush"
    assert InfBrushPipeline(m, "cpu").sample_array(16, 16, embedding=np.ones(512), steps=1).shape == (16, 16, 3)
    with pytest.raises(FileExistsError, match="--resume"):
        train_infbrush(_opts(out, steps=6))
    res = train_infbrush(_opts(out, steps=6, resume=True))
    assert res["steps"] == 6 and len(res["losses"]) == 2
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 6
    # resuming is the same as not stopping
    straight = train_infbrush(_opts(tmp_path / "straight", steps=6, save_every=2))
    for k, v in straight["model"].state_dict().items():
        assert torch.allclose(v, res["model"].state_dict()[k], atol=1e-6), k
    with pytest.raises(ValueError, match="different configuration.*channels"):
        train_infbrush(_opts(out, steps=8, resume=True, config=tiny_config(n_points=256, channels=24, heads=2)))
    with pytest.raises(FileNotFoundError):
        train_infbrush(_opts(tmp_path / "none", resume=True))


def test_cli_parser_and_run(tmp_path):
    parser = argparse.ArgumentParser(prog="slidesynth")
    sub = parser.add_subparsers(dest="cmd")
    train = sub.add_parser("train").add_subparsers(dest="engine")
    add_train_parsers(train)
    args = parser.parse_args(["train", "infinity-brush", "--synthetic", "4", "--synthetic-sizes", "32x32",
                              "--points", "256", "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "cli"),
                              "--no-progress"])
    assert callable(args.func) and args.lr == 5e-5 and args.ema == 0.995 and (args.beta1, args.beta2) == (0.9, 0.99)
    assert args.func(args) == 0
    card = load_infbrush(tmp_path / "cli").card
    assert card.config["network"]["n_points"] == 256 and card.training["lr"] == 5e-5


def test_image_folder_dataset_and_bad_input(tmp_path):
    rng = np.random.RandomState(0)
    for i, (h, w) in enumerate([(20, 30), (40, 16)]):
        Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        np.save(tmp_path / f"im{i}.npy", rng.randn(512).astype(np.float32))
    ds = ImageFolderDataset(tmp_path, 512)
    img, emb = ds.item(1)
    assert img.shape == (3, 40, 16) and img.dtype == torch.uint8 and emb.shape == (1, 1, 512)
    # decoded once and kept (within the budget); with no budget decoded again on every draw, same pixels
    assert ds.item(1)[0] is img
    small = ImageFolderDataset(tmp_path, 512, cache_mb=(3 * 20 * 30 + 1) / 2 ** 20)   # room for im0 only
    first0, first1 = small.item(0)[0], small.item(1)[0]
    assert small.item(0)[0] is first0 and small.item(1)[0] is not first1
    assert torch.equal(small.item(1)[0], img)
    cfg = tiny_config(n_points=256)
    batch = make_batch([ds.item(0), ds.item(1)], cfg, CosineSchedule(), torch.Generator().manual_seed(0), "cpu")
    assert batch["u_t"].shape == (2, 256, 3) and batch["xy"].shape == (2, 256, 2)
    with pytest.raises(ValueError, match="fewer than n_points"):
        make_batch([ds.item(0)], tiny_config(n_points=1000), CosineSchedule(), torch.Generator(), "cpu")
    np.save(tmp_path / "im1.npy", rng.randn(384).astype(np.float32))
    with pytest.raises(ValueError, match="im1.npy has shape"):
        ImageFolderDataset(tmp_path, 512)
    (tmp_path / "im1.npy").unlink()
    with pytest.raises(ValueError, match="im1.png"):
        ImageFolderDataset(tmp_path, 512)


def test_paper_lambda_weighting_trains(tmp_path):
    res = train_infbrush(_opts(tmp_path / "lam", steps=3, config=tiny_config(n_points=256, loss_weighting="lambda")))
    assert len(res["losses"]) == 3 and all(np.isfinite(res["losses"]))
