"""LatentCodec conventions (images in [0,1], /50; mask encoding and decoding) and VAE folder loading."""
from __future__ import annotations

import json

import pytest
import torch

from models.vae import (
    LatentCodec,
    build_vae,
    load_vae,
    official_mask_divisors,
    resolve_vae_folder,
    tiny_vae_config,
)




@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae"
    build_vae(tiny_vae_config(), seed=0).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def codec(vae_dir):
    return LatentCodec(load_vae(vae_dir), latent_scale=50.0, mask_divisors=(40.0, 36.0, 48.0, 32.0), num_classes=5)


def test_load_vae_round_trip(vae_dir):
    vae = load_vae(vae_dir)
    ref = build_vae(tiny_vae_config(), seed=0)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    for (k, a), (_, b) in zip(vae.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


def test_load_vae_accepts_a_pipeline_folder(tmp_path, vae_dir):
    import shutil

    shutil.copytree(vae_dir, tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert resolve_vae_folder(tmp_path / "pipe") == tmp_path / "pipe" / "vae"


def test_missing_vae_folder_is_named(tmp_path):
    missing = tmp_path / "no_such_vae"
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        load_vae(missing)


def test_folder_that_is_not_an_autoencoderkl(tmp_path):
    from diffusers import UNet2DModel

    UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(str(tmp_path / "unet"))
    with pytest.raises(ValueError, match="not an AutoencoderKL"):
        load_vae(tmp_path / "unet")


def test_vae_folder_without_weights(tmp_path, vae_dir):
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text((vae_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_vae(tmp_path / "cfg_only")


def test_vae_with_wrong_latent_channels(tmp_path, vae_dir):
    cfg = json.loads((vae_dir / "config.json").read_text())
    cfg["latent_channels"] = 8
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="latent_channels"):
        resolve_vae_folder(tmp_path / "v")


def test_image_latents_are_posterior_samples_over_50(codec):
    torch.manual_seed(0)
    img = torch.rand(2, 3, 32, 32)
    z = codec.encode_image(img, generator=torch.Generator().manual_seed(7))
    assert z.shape == (2, 4, 4, 4) and z.dtype == torch.float32 and codec.scale_factor == 8
    with torch.no_grad():
        post = codec.vae.encode(img).latent_dist
        ref = post.sample(generator=torch.Generator().manual_seed(7)) / 50.0
    torch.testing.assert_close(z, ref)
    assert not torch.allclose(z, post.mean / 50.0)  # a sample, not the mean
    out = codec.decode_image(z)
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(out, codec.vae.decode(z * 50.0).sample.clamp(0, 1))


def test_mask_latents_use_per_channel_divisors(codec):
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, :16] = 4
    labels[:, 16:, :8] = 2
    z = codec.encode_mask(labels, generator=torch.Generator().manual_seed(3))
    v = codec.mask_values(labels)
    assert v.shape == (1, 3, 32, 32) and v.min() == -1 and v.max() == 1 and (v == 0).any()  # 2l/(K-1) - 1
    with torch.no_grad():
        raw = codec.vae.encode(v).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    div = torch.tensor([40.0, 36.0, 48.0, 32.0])[None, :, None, None]
    torch.testing.assert_close(z, raw / div)
    values = codec.decode_mask_values(z)
    with torch.no_grad():
        y = codec.vae.decode(z * div).sample
    torch.testing.assert_close(values, ((y + 1) / 2).clamp(0, 1))


def test_quantize_mask():
    vae = build_vae(tiny_vae_config(), seed=0)
    codec = LatentCodec(vae, num_classes=5)
    labels = torch.tensor([[[0, 1, 2, 3, 4]]])
    x = (labels.float() / 4)[:, None].expand(-1, 3, -1, -1)
    assert torch.equal(codec.quantize_mask(x), labels)
    # channels voting: levels (1, 1, 2) → mean 1.33 → 1; (1, 2, 2) → 1.67 → 2; small noise is rounded away
    x = torch.tensor([[1, 1], [1, 2], [2, 2]], dtype=torch.float32).reshape(1, 3, 1, 2) / 4 + 0.05
    assert codec.quantize_mask(x).tolist() == [[[1, 2]]]


def test_bad_codec_inputs(codec):
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        codec.encode_mask(torch.full((1, 16, 16), 5))
    with pytest.raises(TypeError):
        codec.encode_mask(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode_image(torch.rand(1, 3, 20, 20))
    with pytest.raises(ValueError, match="4 values"):
        LatentCodec(codec.vae, mask_divisors=(1.0, 2.0))
    assert official_mask_divisors(10) == (46.0, 36.0, 55.0, 36.0)
    with pytest.raises(ValueError, match="K = 5 and K = 10"):
        official_mask_divisors(7)
