"""Tile encoders: the registry, hash checks and strict loads, the shipped slidesynth-tile-v1 and its figures,
and QuiltNet's image tower read from random weights saved in the OpenCLIP local-dir layout."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.encoders import (EncoderNotInstalled, class_prototypes, encoder_card, installed_encoders,
                             load_encoder)
from models.encoders.preprocess import TileSizeError, prepare_tile, prepare_tiles
from tests.conftest import REPO

SHIPPED = REPO / "weights" / "encoders" / "slidesynth-tile-v1"


@pytest.fixture
def models_dir(tmp_path):
    """A models dir holding a copy of the shipped tile encoder (tests may damage it)."""
    root = tmp_path / "weights"
    shutil.copytree(SHIPPED, root / "encoders" / "slidesynth-tile-v1")
    return root


def held_out_tiles(seed: int = 7, n_images: int = 24):
    from training.tile_encoder import procedural_tiles

    return procedural_tiles(n_images, seed, per_image=12, window_sizes=(64,))


# ------------------------------------------------------------------------------------------ registry, loading
def test_registry_lists_installed_encoders_from_their_cards(models_dir, tmp_path):
    cards = installed_encoders(models_dir)
    assert list(cards) == ["slidesynth-tile-v1"]
    card = cards["slidesynth-tile-v1"]
    assert (card.dim, card.input_size, card.mpp, card.kind) == (128, 64, 0.5, "tile-cnn")
    assert installed_encoders(tmp_path / "nowhere") == {}
    with pytest.raises(EncoderNotInstalled, match=r"'nope'.*encoders/nope.*installed: slidesynth-tile-v1"):
        load_encoder("nope", models_dir)
    with pytest.raises(EncoderNotInstalled, match="quiltnet-b-32"):   # QuiltNet's folder, named
        load_encoder("quilt-vit-b-32", models_dir)
    with pytest.raises(EncoderNotInstalled):
        encoder_card("../slidesynth-tile-v1", models_dir)


def test_shipped_encoder_card_pins_its_files_and_states_its_recipe():
    card = json.loads((SHIPPED / "encoder_card.json").read_text())
    from models.hashing import sha256_file

    for name, digest in card["files"].items():
        assert sha256_file(SHIPPED / name) == digest
    assert set(card["files"]) == {"encoder.safetensors", "prototypes.json"}
    assert card["training"]["command"].startswith("slidesynth train tile-encoder ")
    assert "--seed" in card["training"]["command"] and "NT-Xent" in card["training"]["objective"]
    assert card["size_bytes"] < 4_000_000 and card["metrics"]["nearest_prototype_accuracy"] >= 0.95


def test_corrupted_weight_file_is_refused_naming_it(models_dir):
    folder = models_dir / "encoders" / "slidesynth-tile-v1"
    data = bytearray((folder / "encoder.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (folder / "encoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"encoder\.safetensors has sha256 .*but its card says"):
        load_encoder("slidesynth-tile-v1", models_dir)
    (folder / "encoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"encoder\.safetensors is missing"):
        load_encoder("slidesynth-tile-v1", models_dir)


def test_prototype_file_is_hash_checked_too(models_dir):
    folder = models_dir / "encoders" / "slidesynth-tile-v1"
    (folder / "prototypes.json").write_text((folder / "prototypes.json").read_text().replace("0.", "0.1", 1))
    with pytest.raises(ValueError, match="prototypes.json has sha256"):
        class_prototypes("slidesynth-tile-v1", models_dir)
    with pytest.raises(ValueError, match="prototypes.json has sha256"):
        load_encoder("slidesynth-tile-v1", models_dir)


def test_state_dict_must_match_exactly(models_dir):
    """A weight file with a missing or an extra tensor is refused even when the card pins its hash."""
    from safetensors.torch import load_file

    from models.hashing import sha256_file

    folder = models_dir / "encoders" / "slidesynth-tile-v1"
    state = load_file(str(folder / "encoder.safetensors"))
    card = json.loads((folder / "encoder_card.json").read_text())
    for broken, pattern in (({k: v for k, v in state.items() if not k.startswith("head.2")},
                             r"missing keys \(2\): head\.2\.bias, head\.2\.weight"),
                            ({**state, "extra.weight": torch.zeros(3)}, r"unexpected keys \(1\): extra\.weight")):
        save_file(broken, str(folder / "encoder.safetensors"))
        card["files"]["encoder.safetensors"] = sha256_file(folder / "encoder.safetensors")
        (folder / "encoder_card.json").write_text(json.dumps(card))
        with pytest.raises(ValueError, match=pattern) as err:
            load_encoder("slidesynth-tile-v1", models_dir)
        assert "encoder.safetensors" in str(err.value)


def test_an_unpinned_weight_file_is_refused(models_dir):
    folder = models_dir / "encoders" / "slidesynth-tile-v1"
    card = json.loads((folder / "encoder_card.json").read_text())
    del card["files"]["encoder.safetensors"]
    (folder / "encoder_card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="pins no sha256 for encoder.safetensors"):
        load_encoder("slidesynth-tile-v1", models_dir)


# ------------------------------------------------------------------------------------------ the shipped encoder
def test_embeddings_are_unit_length_resized_and_separate_the_classes(models_dir):
    enc = load_encoder("slidesynth-tile-v1", models_dir)
    assert (enc.id, enc.dim, enc.input_size, enc.mpp) == ("slidesynth-tile-v1", 128, 64, 0.5)
    X, Y = held_out_tiles()
    e = enc.embed(X)
    assert e.dtype == np.float32 and e.shape == (len(X), 128)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    protos = class_prototypes("slidesynth-tile-v1", models_dir)
    names = ["unknown", "carcinoma", "necrosis", "tumor stroma", "others"]
    assert list(protos) == names
    P = np.stack([protos[n] for n in names])
    acc = float((np.argmax(e @ P.T, 1) == Y).mean())
    assert acc >= 0.9, acc
    # a list of tiles of other sizes is resized as preprocess says, one at a time or batched
    big = np.repeat(np.repeat(X[:3], 2, axis=1), 2, axis=2)          # 128² tiles
    assert np.allclose(enc.embed(list(big)), enc.embed(prepare_tiles(big, 64, "area")), atol=1e-6)
    assert np.allclose(enc.embed(big), enc.embed(X[:3]), atol=1e-5)   # 2× nearest-upsampled → box → the same
    assert np.allclose(enc.embed(X[:5], batch_size=2), e[:5], atol=1e-5)


def test_preprocess_follows_openclip_and_refuses_small_tiles():
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (100, 160, 3), np.uint8)
    out = prepare_tile(tile, 64, "bicubic")
    from PIL import Image

    ref = Image.fromarray(tile).resize((102, 64), Image.Resampling.BICUBIC).crop((19, 0, 83, 64))
    assert np.array_equal(out, np.asarray(ref))
    square = rng.integers(0, 256, (64, 64, 3), np.uint8)
    assert prepare_tile(square, 64) is square
    with pytest.raises(TileSizeError, match=r"63×80 px; this encoder needs each side ≥ 64 px"):
        prepare_tile(rng.integers(0, 256, (80, 63, 3), np.uint8), 64)


def test_training_is_deterministic_and_writes_a_loadable_folder(tmp_path):
    from training.tile_encoder import train_tile_encoder

    kw = dict(steps=4, batch=16, n_images=24, per_image=8, held_out_images=12, seed=3, threads=1, log=lambda _: None)
    a = train_tile_encoder(tmp_path / "a" / "encoders" / "tiny-enc", encoder_id="tiny-enc", **kw)
    b = train_tile_encoder(tmp_path / "b" / "encoders" / "tiny-enc", encoder_id="tiny-enc", **kw)
    assert a["files"] == b["files"]                                      # bit-identical weights and prototypes
    enc = load_encoder("tiny-enc", tmp_path / "a")
    assert enc.embed(held_out_tiles(n_images=2)[0]).shape[1] == 128
    assert "--seed 3" in a["training"]["command"] and a["metrics"]["test_windows"] > 0


# ------------------------------------------------------------------------------------------ QuiltNet image tower
VISION = {"image_size": 64, "layers": 2, "width": 48, "head_width": 16, "patch_size": 16}


def make_openclip_folder(path, *, embed_dim=32, quick_gelu=False, vision=VISION, seed=0,
                         weights="open_clip_model.safetensors"):
    """An OpenCLIP local-dir folder with random weights under OpenCLIP's names (image and a stub text tower)."""
    from models.encoders.quilt_vit import QuiltImageTower

    path.mkdir(parents=True, exist_ok=True)
    model_cfg = {"embed_dim": embed_dim, "quick_gelu": quick_gelu, "vision_cfg": vision,
                 "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    (path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}))
    torch.manual_seed(seed)
    tower = QuiltImageTower(model_cfg)
    for p in tower.parameters():
        torch.nn.init.normal_(p, std=0.2)
    sd = {k: v.contiguous() for k, v in tower.state_dict().items()}
    sd.update({"token_embedding.weight": torch.zeros(100, 32), "logit_scale": torch.tensor(4.6)})
    if weights.endswith(".safetensors"):
        save_file(sd, str(path / weights))
    else:
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path / weights)
    return path, sd


def reference_vit(sd, x, *, width, heads, quick_gelu, patch):
    """CLIP's ViT written out with functional ops, from the state dict alone (no module of ours)."""
    p = lambda k: sd["visual." + k]
    b = x.shape[0]
    t = F.conv2d(x, p("conv1.weight"), stride=patch).reshape(b, width, -1).permute(0, 2, 1)
    t = torch.cat([p("class_embedding").expand(b, 1, width), t], 1) + p("positional_embedding")
    t = F.layer_norm(t, (width,), p("ln_pre.weight"), p("ln_pre.bias"))
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        q = lambda k: p(f"transformer.resblocks.{i}.{k}")
        y = F.layer_norm(t, (width,), q("ln_1.weight"), q("ln_1.bias"))
        qkv = y @ q("attn.in_proj_weight").T + q("attn.in_proj_bias")
        qq, kk, vv = (z.reshape(b, -1, heads, width // heads).transpose(1, 2) for z in qkv.chunk(3, -1))
        att = torch.softmax(qq @ kk.transpose(-1, -2) / (width // heads) ** 0.5, -1) @ vv
        t = t + att.transpose(1, 2).reshape(b, -1, width) @ q("attn.out_proj.weight").T + q("attn.out_proj.bias")
        y = F.layer_norm(t, (width,), q("ln_2.weight"), q("ln_2.bias"))
        h = y @ q("mlp.c_fc.weight").T + q("mlp.c_fc.bias")
        h = h * torch.sigmoid(1.702 * h) if quick_gelu else F.gelu(h)
        t = t + h @ q("mlp.c_proj.weight").T + q("mlp.c_proj.bias")
        i += 1
    t = F.layer_norm(t, (width,), p("ln_post.weight"), p("ln_post.bias"))
    return t[:, 0] @ p("proj")


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_quilt_image_tower_loads_openclip_layout_and_matches_a_reference(tmp_path, quick_gelu):
    folder, sd = make_openclip_folder(tmp_path / "weights" / "quiltnet-b-32", quick_gelu=quick_gelu)
    cards = installed_encoders(tmp_path / "weights")
    assert list(cards) == ["quilt-vit-b-32"]
    assert (cards["quilt-vit-b-32"].dim, cards["quilt-vit-b-32"].input_size, cards["quilt-vit-b-32"].mpp) == (32, 64, None)
    enc = load_encoder("quilt-vit-b-32", tmp_path / "weights")
    assert enc.digests["open_clip_model.safetensors"]           # hashed (a published folder pins nothing)
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, (3, 80, 96, 3), np.uint8)
    e = enc.embed(tiles)
    assert e.shape == (3, 32) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    x = torch.from_numpy(prepare_tiles(tiles, 64, "bicubic")).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1)) / torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = F.normalize(reference_vit(sd, x, width=48, heads=3, quick_gelu=quick_gelu, patch=16), dim=-1)
    assert np.allclose(e, ref.numpy(), atol=1e-5)
    # the .bin layout of training checkpoints ('state_dict', 'module.' prefixes) loads the same weights
    folder2, _ = make_openclip_folder(tmp_path / "w2" / "quiltnet-b-32", quick_gelu=quick_gelu,
                                      weights="open_clip_pytorch_model.bin")
    assert np.allclose(load_encoder("quilt-vit-b-32", tmp_path / "w2").embed(tiles), e, atol=1e-6)


def test_quilt_folder_problems_are_named(tmp_path):
    root = tmp_path / "weights"
    folder, sd = make_openclip_folder(root / "quiltnet-b-32")
    # a pinning card beside the folder makes the hash checked
    (folder / "encoder_card.json").write_text(json.dumps({"files": {"open_clip_model.safetensors": "0" * 64},
                                                          "mpp": 0.5}))
    assert encoder_card("quilt-vit-b-32", root).mpp == 0.5
    with pytest.raises(ValueError, match="open_clip_model.safetensors has sha256"):
        load_encoder("quilt-vit-b-32", root)
    (folder / "encoder_card.json").unlink()
    save_file({k: v for k, v in sd.items() if k != "visual.ln_post.bias"}, str(folder / "open_clip_model.safetensors"))
    with pytest.raises(ValueError, match=r"open_clip_model\.safetensors does not fit.*missing keys.*ln_post\.bias"):
        load_encoder("quilt-vit-b-32", root)
    (folder / "open_clip_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read weight file .*open_clip_model.safetensors"):
        load_encoder("quilt-vit-b-32", root)
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no OpenCLIP weights"):
        load_encoder("quilt-vit-b-32", root)
    make_openclip_folder(root / "quiltnet-b-32")
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["ls_init_value"] = 0.1                 # LayerScale: not implemented
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not support vision_cfg ls_init_value=0.1"):
        load_encoder("quilt-vit-b-32", root)


def test_quilt_folder_is_the_one_the_text_tower_reads(tmp_path):
    from models.encoders.registry import QUILT_DIRNAME, encoder_folder
    from models.infbrush.config import TEXT_ENCODER_DIRNAME, text_encoder_dir

    assert QUILT_DIRNAME == TEXT_ENCODER_DIRNAME
    assert encoder_folder("quilt-vit-b-32", tmp_path) == text_encoder_dir(tmp_path)
