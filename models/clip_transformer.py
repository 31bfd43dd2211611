"""The pre-norm residual attention transformer of OpenCLIP, with its state-dict names, shared by our QuiltNet
text tower (:mod:`models.infbrush.text`) and image tower (:mod:`models.encoders.quilt_vit`): both load
OpenCLIP checkpoints strictly, so a block is ``ln_1``, ``attn`` (``nn.MultiheadAttention``), ``ln_2`` and
``mlp.{c_fc, gelu, c_proj}`` in both."""
from __future__ import annotations

import torch
from torch import nn


class QuickGELU(nn.Module):
    """x·σ(1.702x): the activation of OpenAI-CLIP-derived configs (``quick_gelu``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """``resblocks.N`` blocks applied in order (``mask``: an additive attention mask, e.g. causal for text)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu)
                                       for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x, mask)
        return x
