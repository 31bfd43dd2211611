"""Checkpoints: strict loading of official-layout files built from the manifests, our safetensors, model folders."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

from models.diffinfinite.checkpoints import (
    CheckpointError,
    CheckpointKeyError,
    OFFICIAL_EMA_PREFIX,
    convert_official_checkpoint,
    detect_kind,
    load_network,
    load_torch_file,
    official_layout_checkpoint,
    read_checkpoint,
    save_network,
)
from models.diffinfinite.loading import load_diffinfinite, save_diffinfinite, untrained_diffinfinite
from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig
from models.vae import build_vae, tiny_vae_config

MANIFESTS = Path(__file__).resolve().parent / "data" / "checkpoints"  # copies of shared/reference/checkpoints
CASES = [
    ("diffinfinite_image_unet_5cls.json", "image", ImageUNetConfig.official(5)),
    ("diffinfinite_image_unet_10cls.json", "image", ImageUNetConfig.official(10)),
    ("diffinfinite_mask_unet_5cls.json", "mask", MaskUNetConfig.official()),
]




def _manifest(name: str) -> dict:
    path = MANIFESTS / name
    if not path.is_file():
        pytest.fail(f"reference manifest {path} missing")
    return json.loads(path.read_text())


def _random_state_dict(manifest: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under the official keys and shapes; each a distinct window of one shared storage so the
    saved file stays small (torch.save stores a storage once) while every tensor holds different values."""
    shapes = [(k, tuple(s)) for k, s, _ in manifest["state_dict"]]
    biggest = max(math.prod(s) for _, s in shapes)
    pool = torch.randn(biggest + 65_536, generator=torch.Generator().manual_seed(seed))
    out = {}
    for i, (k, s) in enumerate(shapes):
        start = (i * 7919) % 65_536
        out[k] = pool[start : start + math.prod(s)].view(s)
    return out


@pytest.mark.parametrize("name,kind,config", CASES, ids=["image5", "image10", "mask"])
def test_official_checkpoint_loads_strictly(tmp_path, name, kind, config):
    manifest = _manifest(name)
    sd = _random_state_dict(manifest, seed=len(name))
    extra = {"version": "1.0"} if kind == "mask" else {}
    # an object the weights-only unpickler refuses (as the torch-2.0 OneCycleLR entry of real files)
    extra["scheduler"] = {"anneal_func": functools.partial(math.cos)}
    ckpt = official_layout_checkpoint(sd, step=250_000, extra=extra)
    assert set(ckpt) >= set(manifest["checkpoint"]["top_level_keys"])
    assert len(ckpt["ema"]) == manifest["checkpoint"]["ema_entry"]["num_tensors"]
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    with pytest.warns(UserWarning, match="functools.partial"):
        loaded = load_torch_file(path)  # allowlisting fallback: tensors intact, the partial replaced
    assert "Opaque" in type(loaded["scheduler"]["anneal_func"]).__name__

    with pytest.warns(UserWarning, match="allowlisting"):
        found, state, info = read_checkpoint(path)
    assert found == kind and info["step"] == 250_000 and info["format"] == "official"
    with pytest.warns(UserWarning):
        net = load_network(path)
    assert net.config == config
    assert sum(p.numel() for p in net.parameters()) == manifest["num_parameters"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # storage is the network's own (no aliasing of the file's shared pool)
    ptrs = {p.untyped_storage().data_ptr() for p in net.parameters()}
    assert len(ptrs) == len(list(net.parameters()))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    torch.manual_seed(0)
    sd = ImageUNet(ImageUNetConfig.tiny()).state_dict()
    sd.pop("mid_attn.fn.fn.to_q.weight")
    sd["mid_attn.fn.fn.to_q.bias"] = torch.zeros(16)
    sd["ups.0.0.block1.proj.bias"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(official_layout_checkpoint(sd), path)
    with pytest.raises(CheckpointKeyError) as err:
        load_network(path, ImageUNetConfig.tiny())
    msg = str(err.value)
    assert "missing keys (1): mid_attn.fn.fn.to_q.weight" in msg
    assert "unexpected keys (1): mid_attn.fn.fn.to_q.bias" in msg
    assert "ups.0.0.block1.proj.bias: file (3,) vs network" in msg
    assert err.value.missing == ["mid_attn.fn.fn.to_q.weight"]


def test_files_that_are_not_diffinfinite(tmp_path):
    torch.save({"ema": {"ema_model.model.foo": torch.zeros(1)}}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="neither a DiffInfinite image UNet"):
        read_checkpoint(tmp_path / "a.pt")
    torch.save({"step": 3}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="no 'ema' entry"):
        read_checkpoint(tmp_path / "b.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError):
        detect_kind({"x": torch.zeros(1)})


def test_safetensors_round_trip_and_online_weights(tmp_path):
    torch.manual_seed(1)
    net = MaskUNet(MaskUNetConfig(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=4))
    save_network(net, tmp_path / "m.safetensors")
    kind, sd, info = read_checkpoint(tmp_path / "m.safetensors")
    assert kind == "mask" and info["config"]["attn_heads"] == 2
    back = load_network(tmp_path / "m.safetensors")
    assert back.config == net.config
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    ckpt = official_layout_checkpoint({k: torch.zeros_like(v) for k, v in net.state_dict().items()})
    ckpt["model"] = {**{f"model.{k}": v for k, v in net.state_dict().items()}}
    torch.save(ckpt, tmp_path / "o.pt")
    online = load_network(tmp_path / "o.pt", net.config, weights="online")
    ema = load_network(tmp_path / "o.pt", net.config)
    assert torch.equal(online.null_classes_emb, net.null_classes_emb)
    assert torch.count_nonzero(ema.null_classes_emb) == 0


def test_convert_full_size_mask_model(tmp_path):
    manifest = _manifest("diffinfinite_mask_unet_5cls.json")
    sd = _random_state_dict(manifest, seed=3)
    torch.save(official_layout_checkpoint(sd, step=100_000), tmp_path / "model-5.pt")
    vae_dir = tmp_path / "vae_src"
    build_vae(tiny_vae_config(), seed=0).save_pretrained(str(vae_dir), safe_serialization=True)
    out = convert_official_checkpoint(tmp_path / "model-5.pt", tmp_path / "di", vae=vae_dir, num_labels=10)
    card = json.loads((out / "model_card.json").read_text())
    assert card["config"]["mask_unet"] == MaskUNetConfig.official().to_dict()
    assert card["config"]["mask_divisors"] == [46.0, 36.0, 55.0, 36.0]
    assert card["classes"]["4"] == "Carcinoma" and card["subtypes"]["1"] == "squamous cell carcinoma"
    assert card["training"]["mask_unet"]["step"] == 100_000
    assert set(card["files"]) == {"mask_unet.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    net = load_network(out / "mask_unet.safetensors")
    assert torch.equal(net.state_dict()["ups.0.0.block1.proj.weight"], sd["ups.0.0.block1.proj.weight"])
    with pytest.raises(FileNotFoundError, match="image_unet.safetensors"):
        load_diffinfinite(out)  # a mask model alone is not servable


def test_untrained_default_is_seeded_and_round_trips(tmp_path):
    a, b, c = untrained_diffinfinite(0), untrained_diffinfinite(0), untrained_diffinfinite(1)
    for part in ("image_unet", "mask_unet"):
        sa, sb, sc = (getattr(m, part).state_dict() for m in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    va, vb = a.codec.vae.state_dict(), b.codec.vae.state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)
    card = a.card
    assert card.name == "diffinfinite-untrained" and card.trained is False and card.native_mpp == 0.5
    assert card.classes == {0: "Unknown", 1: "Carcinoma", 2: "Necrosis", 3: "Tumor stroma", 4: "Others"}
    assert a.codec.scale_factor == 8 and a.codec.latent_scale == 50.0

    save_diffinfinite(a, tmp_path / "m")
    loaded = load_diffinfinite(tmp_path / "m")
    assert loaded.card.files.keys() >= {"image_unet.safetensors", "mask_unet.safetensors", "vae/config.json"}
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([7])
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    mask[..., :8, :] = 2
    with torch.no_grad():
        assert torch.equal(loaded.image_unet(x, t, mask), a.image_unet(x, t, mask))
        assert torch.equal(loaded.mask_unet(x, t, torch.tensor([1])), a.mask_unet(x, t, torch.tensor([1])))
        z = torch.randn(1, 4, 4, 4) * 0.1
        assert torch.equal(loaded.codec.decode_image(z), a.codec.decode_image(z))
    bad = tmp_path / "m" / "model_card.json"
    bad.write_text(bad.read_text().replace('"4": "Others"', '"7": "Others"'))
    with pytest.raises(ValueError, match=r"class ids \[7\]"):
        load_diffinfinite(tmp_path / "m")


def test_prefix_constant_matches_manifest():
    assert _manifest("diffinfinite_image_unet_5cls.json")["checkpoint_prefix"] == OFFICIAL_EMA_PREFIX
