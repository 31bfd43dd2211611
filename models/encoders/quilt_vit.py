"""``openclip-vit``: QuiltNet ViT-B/32's image tower from a local OpenCLIP folder, with our own code.

``open_clip`` cannot be imported here (it imports torchvision, which would pull a CUDA torch), so this rebuilds
OpenCLIP's ``VisionTransformer`` under the same parameter names (``visual.conv1.weight``,
``visual.class_embedding``, ``visual.positional_embedding``, ``visual.ln_pre``,
``visual.transformer.resblocks.N.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj}``, ``visual.ln_post``, ``visual.proj``)
and loads the folder's weights strictly: patch embedding (a stride-``patch`` convolution without bias), class
token, learned positional embedding, pre-LN, pre-norm residual attention blocks (GELU, or QuickGELU when the
config says ``quick_gelu``), LayerNorm after the blocks, the class token's features (``pool_type`` ``tok``; or
the mean of the patch tokens for ``avg``) times the projection. Options this code does not implement
(LayerScale, attentional pooling, timm backbones, …) are refused by name rather than silently ignored.

Folder: ``open_clip_config.json`` + weights (the first of :data:`WEIGHT_NAMES` present), the layout the ∞-Brush
text tower reads. Preprocessing is OpenCLIP's (bicubic resize of the shorter side, centre crop, the config's
mean/std; :mod:`models.encoders.preprocess`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.encoders.base import TileEncoder, load_strict, read_state, verify_files
from models.clip_transformer import Transformer
from models.encoders.cards import EncoderCard

WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin")


# vision_cfg keys and the values this implementation supports (anything else is refused, naming the key)
_SUPPORTED = {
    "ls_init_value": lambda v: v is None, "patch_dropout": lambda v: True,  # dropout only acts in training
    "attentional_pool": lambda v: not v, "attn_pooler_queries": lambda v: True, "attn_pooler_heads": lambda v: True,
    "pos_embed_type": lambda v: v in (None, "learnable"), "no_ln_pre": lambda v: not v,
    "pool_type": lambda v: v in ("tok", "avg"), "final_ln_after_pool": lambda v: True,
    "output_tokens": lambda v: not v, "timm_model_name": lambda v: not v, "input_patchnorm": lambda v: not v,
    "global_average_pool": lambda v: True, "act_kwargs": lambda v: not v, "norm_kwargs": lambda v: not v,
    "block_type": lambda v: v in (None, "default"),
}
_KNOWN = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"} | set(_SUPPORTED)
_TIMM = ("timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path", "timm_model_pretrained")


class VisionTransformer(nn.Module):
    """OpenCLIP's ``VisionTransformer`` at inference (float (B, 3, S, S) normalised → (B, embed_dim))."""

    def __init__(self, embed_dim: int, vision_cfg: dict, quick_gelu: bool = False):
        super().__init__()
        bad = [f"{k}={v!r}" for k, v in vision_cfg.items() if k in _SUPPORTED and not _SUPPORTED[k](v)]
        bad += [f"{k}={vision_cfg[k]!r}" for k in sorted(set(vision_cfg) - _KNOWN - set(_TIMM))
                if vision_cfg[k] not in (None, False, 0, {}, "")]   # timm_* settings act only with a timm model
        if isinstance(vision_cfg.get("layers"), (list, tuple)):
            bad.append(f"layers={vision_cfg['layers']!r} (a ResNet tower)")
        if bad:
            raise ValueError("the built-in QuiltNet image tower does not support vision_cfg " + ", ".join(bad))
        width, layers = int(vision_cfg.get("width", 768)), int(vision_cfg.get("layers", 12))
        patch = int(vision_cfg.get("patch_size", 16))
        size = vision_cfg.get("image_size", 224)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        if size % patch:
            raise ValueError(f"vision_cfg image_size {size} is not a multiple of patch_size {patch}")
        heads = width // int(vision_cfg.get("head_width", 64))
        if pool := vision_cfg.get("pool_type"):
            self.pool_type = pool
        else:  # older configs: global_average_pool
            self.pool_type = "avg" if vision_cfg.get("global_average_pool") else "tok"
        self.final_ln_after_pool = bool(vision_cfg.get("final_ln_after_pool", False))
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, float(vision_cfg.get("mlp_ratio", 4.0)), quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:].mean(1) if self.pool_type == "avg" else x[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)                                   # (B, width, g, g)
        x = x.flatten(2).transpose(1, 2)                    # (B, g², width), row-major patches
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        pooled = self.ln_post(self._pool(x)) if self.final_ln_after_pool else self._pool(self.ln_post(x))
        return pooled @ self.proj


class QuiltImageTower(nn.Module):
    """Holds the tower as ``visual`` so state-dict names are OpenCLIP's ``visual.*``."""

    def __init__(self, model_cfg: dict):
        super().__init__()
        self.visual = VisionTransformer(int(model_cfg.get("embed_dim", 512)), dict(model_cfg.get("vision_cfg", {})),
                                        bool(model_cfg.get("quick_gelu", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def find_weights(folder: Path, card: EncoderCard) -> Path:
    if card.weights:
        return folder / card.weights
    found = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"encoder {card.id!r}: {folder} has no OpenCLIP weights (one of "
                                f"{', '.join(WEIGHT_NAMES)})")
    return found


class QuiltImageEncoder(TileEncoder):
    @classmethod
    def from_folder(cls, folder: Path, card: EncoderCard, device: str | torch.device = "cpu") -> "QuiltImageEncoder":
        folder = Path(folder)
        weights = find_weights(folder, card)
        digests = verify_files(folder, card, [weights.name], require_pins=False)
        net = QuiltImageTower(card.config["model_cfg"])
        state = read_state(weights)
        visual = {k: v for k, v in state.items() if k.startswith("visual.")}
        if not visual:
            raise ValueError(f"weight file {weights} holds no image tower (no 'visual.*' tensors)")
        load_strict(net, visual, str(weights))
        return cls(card, net, device, digests)
