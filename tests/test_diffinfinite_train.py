"""Training (Algorithm 1) and conversion driven through the CLI parsers, on tiny generated data."""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from models.diffinfinite.checkpoints import official_layout_checkpoint
from models.diffinfinite.loading import load_diffinfinite
from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig
from models.vae import build_vae, tiny_vae_config
from training.cli import add_convert_parsers, add_train_parsers
from training.diffinfinite_data import DataSpec, PairDataset, scan_slides, scan_tiles, split_holdout




def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slidesynth")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parsers(sub.add_parser("train").add_subparsers(dest="kind", required=True))
    add_convert_parsers(sub.add_parser("convert").add_subparsers(dest="kind", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("di_train")
    build_vae(tiny_vae_config(), seed=0).save_pretrained(str(root / "vae"), safe_serialization=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(8):
        sub = root / "tiles" / ("adenocarcinoma" if i % 2 == 0 else "squamous")
        sub.mkdir(parents=True, exist_ok=True)
        img = np.stack([128 + 100 * np.sin(xx / (5 + i) + c + yy / (7 + c)) for c in range(3)], -1)
        Image.fromarray((img + rng.normal(0, 5, img.shape)).clip(0, 255).astype(np.uint8)).save(sub / f"t{i}.png")
        if i < 6:  # 6 labelled tiles, 2 unlabelled
            m = np.zeros((64, 64), np.uint8)
            m[:32] = 1 + i % 4
            m[40:, 20:] = 1 + (i + 1) % 4
            Image.fromarray(m).save(sub / f"t{i}_mask.png")
    return root


def _losses(path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader(open(path))]


def _train_args(data, out, kind="diffinfinite", extra=()):
    return [
        "train", kind, "--tiles", str(data / "tiles"), "--vae", str(data / "vae"), "--out", str(out),
        "--network", "tiny", "--batch-size", "4", "--tile-size", "64", "--mask-downsample", "2",
        "--ema-after", "0", "--ema-every", "1", "--save-every", "0", "--device", "cpu", "--quiet", *extra,
    ]


def test_train_image_model_loss_falls_and_resumes(data, tmp_path):
    out = tmp_path / "full"
    assert _run(_train_args(data, out, extra=["--steps", "30", "--lr", "5e-3"])) == 0
    losses = _losses(out / "image_loss_log.csv")
    assert len(losses) == 30
    assert np.mean(losses[-8:]) < 0.75 * np.mean(losses[:8])
    models = load_diffinfinite(out)
    assert models.card.trained and models.card.config["image_unet"] == ImageUNetConfig.tiny().to_dict()
    assert models.card.training["image_unet"]["steps_done"] == 30
    assert "6 labelled" in models.card.training_data
    assert models.mask_unet is None

    # the same run in two halves (stop, then --resume) gives bit-identical weights
    half = tmp_path / "half"
    _run(_train_args(data, half, extra=["--steps", "30", "--lr", "5e-3", "--stop-after", "15"]))
    assert len(_losses(half / "image_loss_log.csv")) == 15
    with pytest.raises(FileExistsError, match="--resume"):
        _run(_train_args(data, half, extra=["--steps", "30", "--lr", "5e-3"]))
    _run(_train_args(data, half, extra=["--steps", "30", "--lr", "5e-3", "--resume"]))
    assert _losses(half / "image_loss_log.csv") == losses
    resumed = load_diffinfinite(half)
    for k, v in models.image_unet.state_dict().items():
        assert torch.equal(resumed.image_unet.state_dict()[k], v), k


def test_train_mask_model_loss_falls(data, tmp_path):
    out = tmp_path / "mask"
    assert _run(_train_args(data, out, "diffinfinite-mask", ["--steps", "30", "--lr", "1e-2"])) == 0
    losses = _losses(out / "mask_loss_log.csv")
    assert len(losses) == 30
    assert np.mean(losses[-8:]) < 0.75 * np.mean(losses[:8])
    card = json.loads((out / "model_card.json").read_text())
    assert card["config"]["mask_unet"] == MaskUNetConfig.tiny().to_dict()
    assert "subtype" in card["conditioning"]


def test_semi_supervised_sampling(data):
    tiles = scan_tiles(data / "tiles", 5)
    assert sum(t.mask is not None for t in tiles) == 6 and {t.subtype for t in tiles} == {0, 1}
    ds = PairDataset(tiles, [], DataSpec(num_classes=5, tile_size=64, p_unc=0.5, seed=3))
    items = [ds[i] for i in range(200)]
    uncond = [it for it in items if it["labels"].max() == 0]
    assert 70 < len(uncond) < 130  # p_unc = 0.5
    for it in items:  # conditional samples: a single class, binary support
        assert it["image"].shape == (3, 64, 64) and 0 <= it["image"].min() and it["image"].max() <= 1
        assert len(set(it["labels"].unique().tolist()) - {0}) <= 1
    classes = [int(it["labels"].max()) for it in items if it["labels"].max() > 0]
    assert set(classes) == {1, 2, 3, 4}  # class-balanced buckets
    assert torch.equal(ds[17]["image"], ds[17]["image"])  # index-deterministic
    (train, _), (hold, _) = split_holdout(tiles, [], 0.5, seed=0)
    assert {t.group for t in train}.isdisjoint({t.group for t in hold})


def test_relabel_gives_a_stored_class_its_own_label(data):
    """--relabel 0:5: the stored 0 (e.g. glass) becomes a condition of its own; the null stays all-zero."""
    from training.diffinfinite_data import DataError, parse_relabel

    relabel = parse_relabel("0:5")
    assert relabel == ((0, 5),) and parse_relabel("1:2,2:1") == ((1, 2), (2, 1)) and parse_relabel(None) == ()
    with pytest.raises(DataError, match="FROM:TO"):
        parse_relabel("0-5")
    with pytest.raises(DataError, match="twice"):
        parse_relabel("0:5,0:4")
    with pytest.raises(DataError, match="after relabelling"):
        scan_tiles(data / "tiles", 5, relabel)  # 5 is outside a 5-class model's 0..4
    tiles = scan_tiles(data / "tiles", 6, relabel)
    plain = scan_tiles(data / "tiles", 5)
    labelled = [(t, p) for t, p in zip(tiles, plain) if t.mask is not None]
    assert labelled and all(0 not in t.classes for t, _ in labelled)
    assert any(5 in t.classes for t, _ in labelled)  # every labelled tile with stored 0 pixels now holds 5
    assert all(set(t.classes) - {5} == set(p.classes) for t, p in labelled)
    ds = PairDataset(tiles, [], DataSpec(num_classes=6, tile_size=64, p_unc=0.3, seed=3, relabel=relabel))
    items = [ds[i] for i in range(120)]
    classes = {int(it["labels"].max()) for it in items}
    assert 5 in classes and 0 in classes  # glass conditions and unconditional (all-zero) samples both occur


def test_whole_slide_source(data, tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(1)
    slide = (rng.random((512, 768, 3)) * 80 + 120).astype(np.uint8)
    slide[:, :200] = 255  # glass
    folder = tmp_path / "slides"
    folder.mkdir()
    with tifffile.TiffWriter(folder / "s1.tif") as tif:
        tif.write(slide, tile=(128, 128), photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
        tif.write(slide[::2, ::2].copy(), tile=(128, 128), photometric="rgb", subfiletype=1)
    m = np.zeros((128, 192), np.uint8)
    m[64:, 120:] = 3
    Image.fromarray(m).save(folder / "s1_mask.png")
    slides = scan_slides(folder, 5)
    assert slides[0].classes == (3,)
    ds = PairDataset([], slides, DataSpec(num_classes=5, tile_size=64, p_unc=0.0, seed=0))  # MPP from the file
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and (item["labels"] == 3).any()
    assert set(item["labels"].unique().tolist()) <= {0, 3}
    out = tmp_path / "from_slides"
    args = _train_args(data, out, extra=["--steps", "2"])
    args[args.index("--tiles") : args.index("--tiles") + 2] = ["--slides", str(folder)]
    assert _run(args) == 0
    assert len(_losses(out / "image_loss_log.csv")) == 2
    assert "1 slides" in json.loads((out / "model_card.json").read_text())["training_data"]


def test_convert_official_image_and_mask_into_one_folder(data, tmp_path):
    torch.manual_seed(0)
    image = ImageUNet(ImageUNetConfig.tiny(10)).eval()
    mask = MaskUNet(MaskUNetConfig.tiny()).eval()
    extra = {"scheduler": {"anneal_func": functools.partial(math.cos)}}
    torch.save(official_layout_checkpoint(image.state_dict(), step=250_000, extra=extra), tmp_path / "image.pt")
    torch.save(official_layout_checkpoint(mask.state_dict(), step=100_000), tmp_path / "mask.pt")
    out = tmp_path / "converted"
    with pytest.warns(UserWarning, match="allowlisting"):
        assert _run(["convert", "diffinfinite-official", str(tmp_path / "image.pt"), str(out), "--vae", str(data / "vae")]) == 0
    assert _run(["convert", "diffinfinite-official", str(tmp_path / "mask.pt"), str(out), "--name", "di-test"]) == 0
    models = load_diffinfinite(out)
    assert models.card.name == "di-test" and models.codec.num_classes == 10
    assert models.card.classes[4] == "Carcinoma" and models.codec.mask_divisors == (46.0, 36.0, 55.0, 36.0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([9])
    lab = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    lab[..., 4:12, 4:12] = 7
    with torch.no_grad():
        assert torch.equal(models.image_unet(x, t, lab), image(x, t, lab))
        assert torch.equal(models.mask_unet(x, t, torch.tensor([1])), mask(x, t, torch.tensor([1])))
    # mask first (K defaults to 5), then a 10-class image model: the pairing is refused, with the fix named
    _run(["convert", "diffinfinite-official", str(tmp_path / "mask.pt"), str(tmp_path / "o3")])
    with pytest.raises(ValueError, match="--num-labels 10"), pytest.warns(UserWarning):
        _run(["convert", "diffinfinite-official", str(tmp_path / "image.pt"), str(tmp_path / "o3")])
    with pytest.raises(SystemExit):
        _parser().parse_args(["convert", "diffinfinite-official", str(tmp_path / "image.pt")])  # OUT_DIR missing
    with pytest.raises(ValueError, match="not an AutoencoderKL"):
        (tmp_path / "notvae").mkdir()
        (tmp_path / "notvae" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
        _run(["convert", "diffinfinite-official", str(tmp_path / "image.pt"), str(tmp_path / "o2"), "--vae", str(tmp_path / "notvae")])
