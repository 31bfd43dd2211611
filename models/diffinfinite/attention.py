"""Attention layers of the DiffInfinite denoisers (official parameter names).

Mask cross-attention (image UNet)
---------------------------------
The official layer builds its query from the *binary* mask repeated to C channels, ``q = W_q · (m·1_C)``,
so every query is either ``q₁ = W_q·1_C`` (mask pixels) or 0 (elsewhere). Softmax attention with the
query 0 is the uniform average, so the layer's output takes only two values per sample and head:

* on mask pixels: ``Σ_j softmax_j(s·q₁ᵀk_j) v_j`` — one attention-pooled vector;
* elsewhere: ``mean_j v_j``.

Because ``k_j = W_k x_j`` and ``v_j = W_v x_j`` are linear in the features, the query folds into a
per-head row ``a_h = W_k,hᵀ (s·q₁,h)`` and the pooling commutes with ``W_v``:
``Σ_j α_j W_v x_j = W_v Σ_j α_j x_j``. :func:`mask_cross_attention_linear` therefore computes one logit row
per head (C·heads·N multiply-adds), pools the *features* (again C·heads·N), and applies ``W_v`` and
``to_out`` to two vectors per sample — O(N) time and memory instead of the N×N attention matrix
(4096² at a 64² latent). :func:`mask_cross_attention_quadratic` is the literal official computation, kept as
the paper-exact reference (``MaskCrossAttention.impl = "quadratic"``) and for tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.diffinfinite.layers import ChannelLayerNorm

ATTENTION_IMPLS = ("linear", "quadratic")


class MaskCrossAttention(nn.Module):
    """Keys/values from the (pre-normalised) features, query from a binary mask at the feature resolution.

    Parameters: ``to_kv`` (1×1, no bias, k then v), ``to_q`` (1×1 on the C-channel mask, no bias), ``to_out``.
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        hidden = heads * dim_head
        self.to_kv = nn.Conv2d(dim, hidden * 2, 1, bias=False)
        self.to_q = nn.Conv2d(dim, hidden, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)
        self.impl = "linear"

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [B, C, h, w]; mask [B, 1, h, w] (bool or 0/1) at the feature resolution."""
        if self.impl == "linear":
            return mask_cross_attention_linear(self, x, mask)
        if self.impl == "quadratic":
            return mask_cross_attention_quadratic(self, x, mask)
        raise ValueError(f"unknown attention impl {self.impl!r}; expected one of {ATTENTION_IMPLS}")


def mask_cross_attention_quadratic(attn: MaskCrossAttention, x: Tensor, mask: Tensor) -> Tensor:
    """The official computation: full N×N softmax attention with the mask-derived query."""
    b, c, h, w = x.shape
    heads, d = attn.heads, attn.dim_head
    m = (mask > 0).to(x.dtype).expand(b, c, h, w)
    k, v = attn.to_kv(x).chunk(2, dim=1)
    q = attn.to_q(m)
    q, k, v = (t.reshape(b, heads, d, h * w) for t in (q, k, v))
    sim = torch.einsum("bhdi,bhdj->bhij", q * attn.scale, k)
    weights = sim.softmax(dim=-1)
    out = torch.einsum("bhij,bhdj->bhid", weights, v)  # [b, heads, N, d]
    out = out.permute(0, 1, 3, 2).reshape(b, heads * d, h, w)
    return attn.to_out(out)


def mask_cross_attention_linear(attn: MaskCrossAttention, x: Tensor, mask: Tensor) -> Tensor:
    """Exact O(N) form of :func:`mask_cross_attention_quadratic` (see the module docstring)."""
    b, c, h, w = x.shape
    heads, d = attn.heads, attn.dim_head
    hidden = heads * d
    xf = x.reshape(b, c, h * w)
    w_kv = attn.to_kv.weight.reshape(2 * hidden, c).to(x.dtype)
    w_k = w_kv[:hidden].reshape(heads, d, c)
    w_v = w_kv[hidden:]
    q1 = attn.to_q.weight.reshape(hidden, c).to(x.dtype).sum(dim=1).reshape(heads, d) * attn.scale
    a = torch.einsum("hd,hdc->hc", q1, w_k)  # folded query row per head
    logits = torch.einsum("hc,bcn->bhn", a, xf)
    alpha = logits.softmax(dim=-1).to(x.dtype)
    pooled = torch.einsum("bhn,bcn->bhc", alpha, xf)  # attention-pooled features per head
    v_masked = torch.einsum("hdc,bhc->bhd", w_v.reshape(heads, d, c), pooled).reshape(b, hidden)
    v_mean = xf.mean(dim=-1) @ w_v.t()  # [b, hidden]
    w_out = attn.to_out.weight.reshape(c, hidden).to(x.dtype)
    bias = attn.to_out.bias.to(x.dtype)
    out_masked = torch.addmm(bias, v_masked, w_out.t())  # [b, c]
    out_other = torch.addmm(bias, v_mean, w_out.t())
    sel = (mask > 0).expand(b, 1, h, w)
    return torch.where(sel, out_masked[:, :, None, None], out_other[:, :, None, None])


class LinearAttention(nn.Module):
    """Linear attention: softmax over channels for q, over positions for k; ``to_out`` = conv + LayerNorm."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), ChannelLayerNorm(dim))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = h * w
        q, k, v = (t.reshape(b, self.heads, self.dim_head, n) for t in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / n
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w))


class Attention(nn.Module):
    """Full softmax self-attention (mask UNet mid block)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = (
            t.reshape(b, self.heads, self.dim_head, h * w).transpose(-1, -2)
            for t in self.to_qkv(x).chunk(3, dim=1)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # scale = dim_head ** -0.5, as the official
        out = out.transpose(-1, -2).reshape(b, self.heads * self.dim_head, h, w)
        return self.to_out(out)
