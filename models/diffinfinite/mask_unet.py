"""DiffInfinite mask denoiser: the subtype-conditioned UNet of the official release.

Official ``dm_masks.Unet`` (config ``mask_gen_sample{5,10}.yaml``): dim 64, dim_mults (1, 2, 4, 8), linear
attention at every level, full softmax attention in the mid block, class embedding of the cancer subtype
(0 = adenocarcinoma, 1 = squamous cell carcinoma) with a learned null embedding ``null_classes_emb`` used for
classifier-free guidance. Module names equal the official ones (see :mod:`models.diffinfinite.checkpoints`).

Difference from the official forward (reference §14 #2): condition dropout defaults to 0 here, so a plain
call is the conditional pass; training passes ``cond_drop_prob=0.5`` explicitly and the null pass of guidance
passes ``cond_drop_prob=1.0``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from models.diffinfinite.attention import Attention, LinearAttention
from models.diffinfinite.layers import SinusoidalPosEmb, embedding_mlp
from models.diffinfinite.unet import UNetConfigMethods, UNetSkeleton, check_label_values

SUBTYPES = {0: "adenocarcinoma", 1: "squamous cell carcinoma"}


@dataclass
class MaskUNetConfig(UNetConfigMethods):
    dim: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    channels: int = 4
    num_classes: int = 2
    resnet_block_groups: int = 2
    attn_heads: int = 4
    attn_dim_head: int = 32
    dropout: float = 0.05

    @classmethod
    def official(cls) -> "MaskUNetConfig":
        """The released mask model: 38.40 M parameters, 16×16 latents (128-px masks)."""
        return cls()

    @classmethod
    def tiny(cls) -> "MaskUNetConfig":
        return cls(dim=16, dim_mults=(1, 2, 2), attn_heads=4, attn_dim_head=8)



class MaskUNet(UNetSkeleton):
    """ε-prediction network ``forward(x [B,4,h,w], time [B], classes [B], cond_drop_prob) → [B,4,h,w]``.

    ``forward`` has no host synchronisation (it compiles to one ``torch.compile`` graph); the subtypes are
    checked by :meth:`check_labels`, which callers run once per job or new subtype.
    """

    def __init__(self, config: MaskUNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        dim = config.dim
        emb_dim = dim * 4
        self.init_conv = nn.Conv2d(config.channels, dim, 7, padding=3)
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), *embedding_mlp(dim, emb_dim))
        self.classes_emb = nn.Embedding(config.num_classes, dim)
        self.null_classes_emb = nn.Parameter(torch.randn(dim))
        self.classes_mlp = nn.Sequential(*embedding_mlp(dim, emb_dim))
        heads, dim_head = config.attn_heads, config.attn_dim_head
        self._build_levels(
            dim=dim,
            dim_mults=tuple(config.dim_mults),
            channels=config.channels,
            groups=config.resnet_block_groups,
            dropout=config.dropout,
            cond_dim=2 * emb_dim,
            level_attn=lambda d: LinearAttention(d, heads=heads, dim_head=dim_head),
            mid_attn=lambda d: Attention(d, heads=heads, dim_head=dim_head),
        )

    def check_labels(self, classes: Tensor | Iterable[int]) -> None:
        """Raise ``ValueError`` unless every subtype in ``classes`` (tensor or Python ints) is a class of this
        model. ``forward`` does not check (no host sync inside it): call this once per job / new subtype."""
        check_label_values(classes, self.config.num_classes, "classes (subtype)")

    def forward(self, x: Tensor, time: Tensor, classes: Tensor, cond_drop_prob: float = 0.0) -> Tensor:
        cfg = self.config
        self._check_latent(x, cfg.channels, cfg.downsample_factor)
        b = x.shape[0]
        classes = torch.as_tensor(classes, device=x.device)
        if classes.ndim == 0:
            classes = classes.expand(b)
        if classes.shape != (b,):
            raise ValueError(f"classes must be [B]={b}, got {tuple(classes.shape)}")
        if not 0.0 <= float(cond_drop_prob) <= 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1], got {cond_drop_prob}")
        if classes.dtype.is_floating_point or classes.dtype.is_complex:
            raise TypeError(f"classes (subtype) must be an integer (or bool) tensor, got {classes.dtype}")
        emb = self.classes_emb(classes.long())
        if cond_drop_prob >= 1.0:
            emb = self.null_classes_emb.to(emb.dtype).expand_as(emb)
        elif cond_drop_prob > 0.0:
            drop = torch.rand(b, device=x.device) < cond_drop_prob
            emb = torch.where(drop[:, None], self.null_classes_emb.to(emb.dtype).expand_as(emb), emb)
        t = self._time_embedding(time, b, x.device)
        cond = torch.cat((t, self.classes_mlp(emb)), dim=-1)
        return self._run(x, cond, lambda level: ())
