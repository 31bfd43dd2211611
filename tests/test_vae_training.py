"""`slidesynth train vae`: a tiny AutoencoderKL trains on procedural tiles, its loss falls, the folder loads."""
from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models.vae import LatentCodec, load_vae
from training.cli import add_vae_train_parsers
from training.vae import VAETileDataset, VAETrainConfig, train_vae


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    from procedural.tissue import make_dataset

    return make_dataset(tmp_path_factory.mktemp("vae_tiles") / "tiles", 6, 64, seed=3)


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slidesynth")
    add_vae_train_parsers(parser.add_subparsers(dest="kind", required=True))
    args = parser.parse_args(["vae", *argv])
    return args.func(args)


def _losses(folder) -> list[float]:
    with open(folder / "vae_loss_log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_tiny_vae_trains_and_loads(tiles, tmp_path):
    out = tmp_path / "vae"
    assert _train(["--tiles", str(tiles), "--out", str(out), "--config", "tiny", "--crop", "32", "--batch-size", "4",
                   "--steps", "40", "--lr", "2e-3", "--warmup", "5", "--stats-samples", "8", "--fp16", "--quiet",
                   "--device", "cpu"]) == 0
    losses = _losses(out)
    assert len(losses) == 40
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.7 * first, f"loss did not fall: first 8 steps {first:.4f}, last 8 steps {last:.4f}"

    # the saved folder is a diffusers AutoencoderKL folder in fp16 that load_vae reads (strict key match)
    sd = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in sd.values())
    vae = load_vae(out)
    assert set(vae.state_dict()) == set(sd)
    info = json.loads((out / "vae_training.json").read_text())
    stats = info["stats"]
    assert info["steps_done"] == 40 and info["parameters"] == sum(p.numel() for p in vae.parameters())
    assert stats["latent_scale"] > 0 and len(stats["mask_divisors"]) == 4 and min(stats["mask_divisors"]) > 0

    # the codec works with the trained VAE and its statistics
    codec = LatentCodec(vae, latent_scale=stats["latent_scale"], mask_divisors=stats["mask_divisors"], num_classes=5)
    img = torch.from_numpy(np.array(Image.open(next(tiles.glob("tile_*[0-9].png"))).convert("RGB"))).permute(2, 0, 1)
    z = codec.encode_image(img[None].float() / 255.0, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 8, 8)
    assert codec.decode_image(z).shape == (1, 3, 64, 64)


def test_resume_is_bit_identical(tiles, tmp_path):
    common = ["--tiles", str(tiles), "--config", "tiny", "--crop", "16", "--batch-size", "2", "--steps", "6",
              "--warmup", "2", "--stats-samples", "2", "--quiet", "--device", "cpu", "--save-every", "0"]
    assert _train([*common, "--out", str(tmp_path / "a")]) == 0
    assert _train([*common, "--out", str(tmp_path / "b"), "--stop-after", "3"]) == 0
    with pytest.raises(FileExistsError, match="--resume"):
        _train([*common, "--out", str(tmp_path / "b")])
    assert _train([*common, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_file(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_dataset_mixes_images_and_label_maps(tiles):
    ds = VAETileDataset(tiles, crop=32, num_classes=5, mask_fraction=0.5, seed=0)
    items = [ds[i] for i in range(40)]
    masks = [it["x"] for it in items if it["is_mask"]]
    images = [it["x"] for it in items if not it["is_mask"]]
    assert masks and images
    for m in masks:  # 2l/(K-1) - 1 for l in 0..4, three equal channels
        assert torch.equal(m[0], m[1]) and torch.equal(m[0], m[2])
        assert set(torch.unique(m).tolist()) <= {-1.0, -0.5, 0.0, 0.5, 1.0}
    for x in images:
        assert x.shape == (3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    again = ds[7]
    assert torch.equal(again["x"], items[7]["x"])  # a pure function of (seed, index)


def test_bad_configuration_is_named(tiles, tmp_path):
    with pytest.raises(ValueError, match="crop must be a positive multiple of 8"):
        train_vae(VAETrainConfig(tiles=tiles, out_dir=tmp_path / "x", crop=30), progress=False)
    with pytest.raises(ValueError, match="mask_fraction"):
        train_vae(VAETrainConfig(tiles=tiles, out_dir=tmp_path / "x", mask_fraction=1.5), progress=False)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(unlabelled / "a.png")
    with pytest.raises(ValueError, match="holds no \\*_mask.png label maps"):
        train_vae(VAETrainConfig(tiles=unlabelled, out_dir=tmp_path / "y", crop=16), progress=False)


def test_latent_normalisation_is_an_exact_reparametrisation(tiles):
    import copy

    from models.vae import build_vae, tiny_vae_config
    from training.vae import normalize_latents

    ds = VAETileDataset(tiles, crop=32, num_classes=5, mask_fraction=0.0, seed=0)
    vae = build_vae(tiny_vae_config(), seed=1)
    norm = copy.deepcopy(vae)
    info = normalize_latents(norm, ds, n=24, target=50.0)
    x = torch.stack([ds[i]["x"] for i in range(4)])
    with torch.no_grad():
        p0, p1 = vae.encode(x).latent_dist, norm.encode(x).latent_dist
        gain = torch.tensor(info["gain"])[None, :, None, None]
        shift = torch.tensor(info["shift"])[None, :, None, None]
        torch.testing.assert_close(p1.mean, gain * (p0.mean - shift), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(p1.std, gain * p0.std, rtol=1e-4, atol=1e-5)
        y0, y1 = vae.decode(p0.mean).sample, norm.decode(p1.mean).sample
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4)
    # on the measured crops every channel is centred with its 99.9th percentile |z| at the target
    with torch.no_grad():
        z = norm.encode(torch.stack([ds[(1 << 39) + i]["x"] for i in range(24)])).latent_dist.mean
    z = z.transpose(0, 1).reshape(4, -1)
    assert z.mean(1).abs().max() < 1e-2 * 50
    q = torch.quantile(z.abs(), 0.999, dim=1)
    assert torch.all((q > 0.8 * 50) & (q < 1.2 * 50)), q
