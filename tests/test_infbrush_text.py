"""QuiltNet text tower loading (OpenCLIP local-dir layout, tiny random weights) and subtype prompt embeddings."""
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.infbrush import InfBrushPipeline, untrained_infbrush
from models.infbrush.prompts import load_prompt_set
from models.infbrush.text import ClipTextTower, QuiltTextEncoder, default_encoder_dir, embed_subtype



MERGES = ["t h", "th e</w>", "a n", "an d</w>", "c a", "ca r", "car c", "carc i", "n o", "m a</w>", "l u", "n g</w>",
          "i n", "in g</w>", "o f</w>", "a </w>", "i m", "im a", "ima g", "imag e</w>"]


def make_clip_folder(path, *, weights="open_clip_model.safetensors", quick_gelu=False, seed=0, embed_dim=512):
    """A real OpenCLIP local-dir folder, tiny: config, merges.txt and random weights (with a vision tower's keys)."""
    path.mkdir(parents=True, exist_ok=True)
    text_cfg = {"context_length": 16, "vocab_size": 256 * 2 + len(MERGES) + 2, "width": 32, "heads": 2, "layers": 2}
    cfg = {"model_cfg": {"embed_dim": embed_dim, "quick_gelu": quick_gelu, "text_cfg": text_cfg,
                         "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}},
           "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES))
    torch.manual_seed(seed)
    tower = ClipTextTower(embed_dim, text_cfg, quick_gelu)
    for p in tower.parameters():
        torch.nn.init.normal_(p, std=0.2)
    sd = {k: v.contiguous() for k, v in tower.state_dict().items()}
    sd["visual.conv1.weight"] = torch.zeros(8, 3, 4, 4)
    sd["logit_scale"] = torch.tensor(4.6)
    if weights.endswith(".safetensors"):
        save_file(sd, str(path / weights))
    else:
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path / weights)
    return path, tower


def test_tokenizer_applies_bpe_and_clip_conventions(tmp_path):
    folder, _ = make_clip_folder(tmp_path / "q")
    enc = QuiltTextEncoder(folder, backend="builtin")
    tok = enc.tokenizer
    assert tok.vocab_size == 512 + len(MERGES) + 2 and tok.eot_id == tok.vocab_size - 1
    ids = tok("  The   CARCINOMA  image of a lung ")
    assert ids.shape == (1, 16)
    row = ids[0].tolist()
    assert row[0] == tok.sot_id
    assert tok.encoder["the</w>"] in row and tok.encoder["image</w>"] in row      # merged words, lower-cased
    assert row[row.index(tok.eot_id) + 1:] == [0] * (15 - row.index(tok.eot_id))  # zero padding after EOT
    long = tok("a " * 40)[0]
    assert long[-1] == tok.eot_id and (long != 0).all()                           # truncated, EOT kept
    assert tok("x&amp;y")[0].tolist() == tok("x&y")[0].tolist()                   # HTML unescaped


def test_text_tower_loads_from_local_dir_and_matches_the_module(tmp_path):
    folder, tower = make_clip_folder(tmp_path / "q")
    enc = QuiltTextEncoder(folder, backend="builtin")
    texts = ["an image of lung carcinoma", "the and", "image"]
    e = enc.encode(texts)
    assert e.shape == (3, 512) and torch.isfinite(e).all()
    with torch.no_grad():
        ref = tower.eval()(enc.tokenizer(texts))
    assert torch.allclose(e, ref, atol=1e-6)
    assert not torch.allclose(e[0], e[1])
    # the .bin layout of training checkpoints ('state_dict', 'module.' prefixes) loads the same weights
    folder2, _ = make_clip_folder(tmp_path / "q2", weights="open_clip_pytorch_model.bin")
    assert torch.allclose(QuiltTextEncoder(folder2, backend="builtin").encode(texts), e, atol=1e-6)
    # QuickGELU configs build the QuickGELU activation
    folder3, tower3 = make_clip_folder(tmp_path / "q3", quick_gelu=True)
    with torch.no_grad():
        ref3 = tower3.eval()(enc.tokenizer(texts))
    assert torch.allclose(QuiltTextEncoder(folder3, backend="builtin").encode(texts), ref3, atol=1e-6)


def test_missing_or_broken_folders_are_named(tmp_path):
    missing = tmp_path / "nowhere" / "quiltnet-b-32"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        QuiltTextEncoder(missing, backend="builtin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        QuiltTextEncoder(tmp_path / "empty", backend="builtin")
    folder, _ = make_clip_folder(tmp_path / "q")
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights"):
        QuiltTextEncoder(folder, backend="builtin")
    folder, tower = make_clip_folder(tmp_path / "q4")
    sd = {k: v for k, v in tower.state_dict().items() if not k.startswith("ln_final")}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "open_clip_model.safetensors"))
    with pytest.raises(ValueError, match="missing keys.*ln_final.weight"):
        QuiltTextEncoder(folder, backend="builtin")
    folder, _ = make_clip_folder(tmp_path / "q5")
    (folder / "merges.txt").unlink()
    if importlib.util.find_spec("open_clip") is None:
        with pytest.raises(FileNotFoundError, match="BPE"):
            QuiltTextEncoder(folder, backend="builtin")


def test_subtype_embedding_is_the_normalised_prompt_ensemble(tmp_path):
    folder, _ = make_clip_folder(tmp_path / "q")
    prompts = load_prompt_set()
    e = embed_subtype("LUAD", folder, backend="builtin")
    texts = prompts.prompts("LUAD")
    assert len(texts) == len(prompts.templates) * len(prompts.subtypes["LUAD"]["synonyms"])
    enc = QuiltTextEncoder(folder, backend="builtin")
    manual = F.normalize(F.normalize(enc.encode(texts), dim=-1).mean(0), dim=-1)
    assert torch.allclose(e, manual, atol=1e-6) and abs(float(e.norm()) - 1) < 1e-5
    assert torch.equal(embed_subtype("lung adenocarcinoma", folder, backend="builtin"), e)   # synonym → same class
    assert not torch.allclose(embed_subtype("LUSC", folder, backend="builtin"), e)
    with pytest.raises(ValueError, match="unknown subtype 'GBM'.*LUAD"):
        embed_subtype("GBM", folder, backend="builtin")
    # through the pipeline (the worker's call)
    pipe = InfBrushPipeline(untrained_infbrush(), "cpu", text_encoder_dir=folder)
    emb = pipe.embed_subtype("brca_idc")
    assert emb.shape == (512,)
    pipe.validate_embedding(emb, encoder="quilt-vit-b-32")


def test_folder_comes_from_the_models_dir_passed_in(tmp_path, monkeypatch):
    # models/ reads no environment: the folder is the one the service's settings pass in
    monkeypatch.setenv("SLIDESYNTH_MODELS_DIR", str(tmp_path / "elsewhere"))
    assert default_encoder_dir(tmp_path / "weights") == tmp_path / "weights" / "quiltnet-b-32"
    assert default_encoder_dir().parent.name == "weights" and "elsewhere" not in str(default_encoder_dir())
    with pytest.raises(FileNotFoundError, match="quiltnet-b-32"):
        embed_subtype("LUAD", default_encoder_dir(tmp_path / "weights"), backend="builtin")
    make_clip_folder(tmp_path / "weights" / "quiltnet-b-32")
    pipe = InfBrushPipeline(untrained_infbrush(), "cpu", text_encoder_dir=default_encoder_dir(tmp_path / "weights"))
    assert pipe.embed_subtype("LUSC").shape == (512,)


def test_prompt_set_is_versioned_and_matches_the_card():
    ps = load_prompt_set("subtypes_v1")
    assert ps.version == "subtypes_v1" and len(ps.templates) >= 10
    assert {"LUAD", "LUSC", "BRCA_IDC", "BRCA_ILC", "KIRC"} <= set(ps.codes)
    card = untrained_infbrush().card
    assert list(card.subtypes.values()) == ps.codes and card.config["prompt_set"] == "subtypes_v1"
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompt_set("subtypes_v99")


def test_unsupported_text_configs_are_refused():
    with pytest.raises(ValueError, match="hf_model_name"):
        ClipTextTower(512, {"hf_model_name": "bert-base-uncased"})
    with pytest.raises(ValueError, match="pool_type"):
        ClipTextTower(512, {"pool_type": "last"})


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip (needs torchvision) not installed")
def test_builtin_matches_open_clip(tmp_path):  # pragma: no cover - runs where open_clip imports
    try:
        import open_clip
    except Exception as exc:
        pytest.skip(f"open_clip does not import: {exc}")
    import shutil
    from pathlib import Path

    cfg = {"model_cfg": {"embed_dim": 24, "quick_gelu": False,
                         "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    model = open_clip.CLIP(**cfg["model_cfg"])
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    shutil.copy(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", tmp_path)
    texts = ["a histopathology image of lung adenocarcinoma.", "An H&E stained image of IDC!!"]
    ours = QuiltTextEncoder(tmp_path, backend="builtin")
    theirs = QuiltTextEncoder(tmp_path, backend="open_clip")
    assert torch.equal(ours.tokenizer(texts), theirs.tokenizer(texts))
    assert torch.allclose(ours.encode(texts), theirs.encode(texts), atol=1e-5)
