"""QuiltNet (OpenCLIP ViT-B/32) text tower from a local folder, without open_clip's torchvision dependency.

``open_clip`` imports torchvision at package import (open_clip/transform.py), and installing torchvision here would pull a
CUDA torch. So the default backend reads the OpenCLIP ``local-dir:`` layout itself:

    <folder>/open_clip_config.json                      {"model_cfg": {"embed_dim", "quick_gelu", "text_cfg": {…}}}
    <folder>/open_clip_model.safetensors | open_clip_pytorch_model.bin | …   (OpenCLIP state-dict names)
    BPE merges: <folder>/bpe_simple_vocab_16e6.txt.gz | <folder>/merges.txt | the file bundled in an installed
    open_clip package (found without importing it)

and rebuilds the CLIP text transformer (token + positional embedding, pre-LN residual attention blocks with a causal
mask, final LayerNorm, features at the end-of-text token, text projection) and the CLIP byte-level BPE tokenizer
(lower-cased, whitespace-collapsed, HTML-unescaped; ftfy.fix_text when ftfy is installed). With ``backend="open_clip"``
(or ``"auto"`` when ``import open_clip`` works) the real open_clip loads the same folder via ``local-dir:``.
Nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.clip_transformer import Transformer
from models.infbrush.config import TEXT_ENCODER_DIRNAME as DEFAULT_DIRNAME
from models.infbrush.config import text_encoder_dir as default_encoder_dir
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin")
N_MERGES = 49152 - 256 - 2           # CLIP's BPE uses the first 48,894 merges of the vocabulary file
SOT, EOT = "<start_of_text>", "<end_of_text>"


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
def byte_alphabet() -> list[tuple[int, str]]:
    """CLIP/GPT-2 reversible byte → printable character table, in vocabulary order."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table = [(b, chr(b)) for b in keep]
    extra = 0
    for b in range(256):
        if b not in keep:
            table.append((b, chr(256 + extra)))
            extra += 1
    return table


def read_merges(path: Path) -> list[tuple[str, str]]:
    raw = gzip.open(path).read().decode("utf-8") if path.suffix == ".gz" else path.read_text(encoding="utf-8")
    lines = raw.split("\n")[1:N_MERGES + 1]             # first line is a header / version line
    merges = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    if not merges:
        raise ValueError(f"{path} holds no BPE merges")
    return merges


class ClipTokenizer:
    def __init__(self, merges: list[tuple[str, str]], context_length: int = 77):
        import regex

        self.context_length = context_length
        table = byte_alphabet()
        self.byte_to_char = dict(table)
        chars = [c for _, c in table]
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(vocab)
        self._cache: dict[str, list[str]] = {}
        self._pat = regex.compile(
            r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE)

    @staticmethod
    def clean(text: str) -> str:
        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:
            pass
        text = html.unescape(html.unescape(text)).strip()
        return " ".join(text.split()).strip().lower()

    def _bpe(self, word: str) -> list[str]:
        if word in (SOT, EOT):
            return [word]
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = self.ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self._pat.findall(self.clean(text)):
            word = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(word))
        return ids

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[:self.context_length]
                ids[-1] = self.eot_id
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def find_bpe_file(folder: Path) -> Path:
    for name in ("bpe_simple_vocab_16e6.txt.gz", "merges.txt"):
        if (folder / name).is_file():
            return folder / name
    spec = importlib.util.find_spec("open_clip")          # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"no CLIP BPE vocabulary for the text encoder in {folder}: put bpe_simple_vocab_16e6.txt.gz (bundled with "
        f"open_clip) or merges.txt there")


# ---------------------------------------------------------------------------------------------------------------
# Text transformer (OpenCLIP state-dict names)
# ---------------------------------------------------------------------------------------------------------------
SUPPORTED_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id",
                       "pool_type", "proj_type", "proj_bias", "ls_init_value", "embed_cls", "no_causal_mask",
                       "final_ln_after_pool", "output_tokens", "hf_tokenizer_name", "tokenizer_kwargs", "norm_kwargs",
                       "act_kwargs", "eos_id"}


class ClipTextTower(nn.Module):
    def __init__(self, embed_dim: int, text_cfg: dict, quick_gelu: bool = False):
        super().__init__()
        unsupported = []
        for key, ok in (("hf_model_name", lambda v: not v), ("hf_tokenizer_name", lambda v: not v),
                        ("ls_init_value", lambda v: v is None), ("embed_cls", lambda v: not v),
                        ("no_causal_mask", lambda v: not v), ("final_ln_after_pool", lambda v: not v),
                        ("pool_type", lambda v: v == "argmax"), ("proj_type", lambda v: v == "linear"),
                        ("proj_bias", lambda v: not v), ("norm_kwargs", lambda v: not v), ("act_kwargs", lambda v: not v),
                        ("block_type", lambda v: v in (None, "default"))):
            if key in text_cfg and not ok(text_cfg[key]):
                unsupported.append(f"{key}={text_cfg[key]!r}")
        unsupported += [f"{k}=True" for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                                              "scale_attn", "scale_fc") if text_cfg.get(k)]
        if unsupported:
            raise ValueError("the built-in text tower does not support text_cfg " + ", ".join(unsupported) +
                             " (install open_clip with torchvision and use backend='open_clip')")
        self.context_length = int(text_cfg.get("context_length", 77))
        self.vocab_size = int(text_cfg.get("vocab_size", 49408))
        width, heads, layers = int(text_cfg.get("width", 512)), int(text_cfg.get("heads", 8)), int(text_cfg.get("layers", 12))
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, width))
        self.transformer = Transformer(width, layers, heads, float(text_cfg.get("mlp_ratio", 4.0)), quick_gelu)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        mask = torch.full((self.context_length, self.context_length), float("-inf")).triu(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.embed_dim = embed_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask))
        x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
        return x @ self.text_projection


TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def _load_state(path: Path) -> dict:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if any(k.startswith("text.") for k in sd):           # CustomTextCLIP layout
        sd = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    return {k: v for k, v in sd.items() if k.startswith(TEXT_PREFIXES)}


class QuiltTextEncoder:
    """Text → 512-d QuiltNet text embedding (not normalised) from a local OpenCLIP folder."""

    def __init__(self, folder: str | Path, backend: str = "auto", device: str = "cpu"):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"QuiltNet text encoder folder not found: {folder} (expected an OpenCLIP local-dir "
                                    f"with open_clip_config.json and weights; set SLIDESYNTH_MODELS_DIR or pass the path)")
        cfg_path = folder / "open_clip_config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder} has no open_clip_config.json")
        self.folder, self.device = folder, torch.device(device)
        model_cfg = json.loads(cfg_path.read_text()).get("model_cfg")
        if not isinstance(model_cfg, dict):
            raise ValueError(f"{cfg_path} has no model_cfg section")
        self.embed_dim = int(model_cfg.get("embed_dim", 512))
        if backend == "auto":
            backend = "open_clip" if _open_clip_importable() else "builtin"
        self.backend = backend
        if backend == "open_clip":
            import open_clip

            model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
            self._oc_model = model.to(self.device).eval()
            self.tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
            return
        if backend != "builtin":
            raise ValueError(f"unknown text encoder backend {backend!r}")
        weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{folder} has no OpenCLIP weights (one of {', '.join(WEIGHT_NAMES)})")
        text_cfg = dict(model_cfg.get("text_cfg", {}))
        self.tower = ClipTextTower(self.embed_dim, text_cfg, bool(model_cfg.get("quick_gelu", False)))
        state = _load_state(weights)
        from models.infbrush.pipeline import check_state_dict

        check_state_dict(self.tower.state_dict(), state, str(weights))
        self.tower.load_state_dict(state)
        self.tower.to(self.device).eval()
        self.tokenizer = ClipTokenizer(read_merges(find_bpe_file(folder)), self.tower.context_length)
        if self.tokenizer.vocab_size != self.tower.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the text tower expects "
                             f"{self.tower.vocab_size}")

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        if self.backend == "open_clip":
            return self._oc_model.encode_text(tokens).float().cpu()
        return self.tower(tokens).float().cpu()

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Mean of L2-normalised prompt embeddings, re-normalised (prompt ensembling)."""
        e = F.normalize(self.encode(prompts), dim=-1)
        return F.normalize(e.mean(0), dim=-1)


def _open_clip_importable() -> bool:
    if importlib.util.find_spec("open_clip") is None:
        return False
    try:
        import open_clip  # noqa: F401
    except Exception:
        return False
    return True


@lru_cache(maxsize=4)
def get_encoder(folder: str, backend: str = "auto") -> QuiltTextEncoder:
    return QuiltTextEncoder(folder, backend=backend)


def embed_subtype(subtype: str, folder: str | Path | None = None, version: str | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Subtype code or synonym → 512-d unit vector from the versioned prompt set."""
    from models.infbrush.prompts import DEFAULT_VERSION, load_prompt_set

    prompts = load_prompt_set(version or DEFAULT_VERSION)
    texts = prompts.prompts(subtype)                       # ValueError for unknown subtypes before any loading
    key = (str(Path(folder) if folder else default_encoder_dir()), prompts.resolve(subtype), prompts.version, backend)
    if key not in _SUBTYPE_CACHE:
        _SUBTYPE_CACHE[key] = get_encoder(key[0], backend).embed_prompts(texts)
    return _SUBTYPE_CACHE[key].clone()


_SUBTYPE_CACHE: dict[tuple, torch.Tensor] = {}
