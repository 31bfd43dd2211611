"""Building blocks shared by the DiffInfinite image and mask denoisers.

Module and parameter names follow the official release (marcoaversa/diffinfinite @ 4d23096) so that its
EMA state dicts load with ``strict=True`` after the prefix strip documented in
:mod:`models.diffinfinite.checkpoints`:

* ``Residual(PreNorm(dim, attention))`` gives the keys ``<i>.fn.norm.g`` and ``<i>.fn.fn.<attention keys>``;
* ``ResnetBlock`` gives ``mlp.1.*`` (FiLM projection), ``block{1,2}.proj.*`` (weight-standardised 3×3 conv),
  ``block{1,2}.norm.*`` (GroupNorm) and ``res_conv.*`` when the channel count changes.

Weight standardisation is recomputed on every call while training (the weights change every step) and
cached in eval / no-grad mode: the standardised kernel is a pure function of the weight tensor, so the cache is
keyed by the weight's storage, version counter, dtype and device and is invalidated by any in-place update
(``load_state_dict``, ``copy_``, optimiser steps) or by replacing / moving the parameter (reference §16: the
official code re-standardises on every forward, ≈30 % of a batch-1 image-UNet forward). Under
``torch.compile`` the kernel is standardised inside the graph instead (no cache, no guards on it).

In inference, ``Block``'s GroupNorm → FiLM → SiLU runs as one fused kernel
(:mod:`models.kernels.groupnorm_film_silu`) when :func:`set_fused_kernels` allows it — by default for CUDA
tensors when Triton imports: these elementwise passes dominate the image UNet's GPU time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.kernels.groupnorm_film_silu import BACKENDS as FUSED_BACKENDS
from models.kernels.groupnorm_film_silu import groupnorm_film_silu, triton_importable


def _norm_eps(dtype: torch.dtype) -> float:
    """The official eps: 1e-5 for float32 activations, 1e-3 for reduced precision."""
    return 1e-5 if dtype == torch.float32 else 1e-3


class Residual(nn.Module):
    """``fn(x, *args) + x``."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, *args) -> Tensor:
        return self.fn(x, *args) + x


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor, gain only (parameter ``g`` [1, C, 1, 1])."""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        eps = _norm_eps(x.dtype)
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=1, unbiased=False, keepdim=True)
        return ((xf - mean) * torch.rsqrt(var + eps)).to(x.dtype) * self.g.to(x.dtype)


class PreNorm(nn.Module):
    """``fn(norm(x), *args)``: the norm sees only the features (a mask argument passes through)."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = ChannelLayerNorm(dim)

    def forward(self, x: Tensor, *args) -> Tensor:
        return self.fn(self.norm(x), *args)


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (zero mean, unit variance) before use.

    The standardised kernel is cached when no gradient is needed (eval mode or ``torch.no_grad``/inference
    mode); see the module docstring for the invalidation rule. Under ``torch.compile`` it is computed in the
    graph on every call (no cache).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ws_cache: tuple[tuple, Tensor] | None = None

    def standardized_weight(self, eps: float) -> Tensor:
        w = self.weight
        wf = w.float()
        var, mean = torch.var_mean(wf, dim=(1, 2, 3), unbiased=False, keepdim=True)
        return ((wf - mean) * torch.rsqrt(var + eps)).to(w.dtype)

    def _cache_key(self, eps: float) -> tuple:
        w = self.weight
        return (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape), eps)

    def forward(self, x: Tensor) -> Tensor:
        eps = _norm_eps(x.dtype)
        if torch.compiler.is_compiling():
            # in-graph: a Python-side cache keyed by data_ptr/_version would add guards that fail on every
            # module (recompiles per ResBlock) and a side effect that breaks the graph; the compiler fuses the
            # few small reductions instead
            weight = self.standardized_weight(eps)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        can_cache = not (torch.is_grad_enabled() and self.weight.requires_grad) and not self.training
        if can_cache:
            key = self._cache_key(eps)
            if self._ws_cache is not None and self._ws_cache[0] == key:
                weight = self._ws_cache[1]
            else:
                with torch.no_grad():
                    weight = self.standardized_weight(eps)
                self._ws_cache = (key, weight)
        else:
            self._ws_cache = None
            weight = self.standardized_weight(eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/.half(): drop the cache with the old tensor
        self._ws_cache = None
        return super()._apply(fn, *args, **kwargs)


_FUSED_ENABLED: bool | None = None  # None: on for CUDA tensors when Triton imports
_FUSED_BACKEND = "auto"


def set_fused_kernels(enabled: bool | None, *, backend: str = "auto") -> None:
    """Switch the fused GroupNorm → FiLM → SiLU kernel of :class:`Block` (inference only) for this process.

    ``None`` (the default): on for CUDA tensors when Triton imports, off otherwise; ``True``: on for every
    device (CPU tensors take the kernel's torch fallback unless ``backend="triton"`` under
    ``TRITON_INTERPRET=1``); ``False``: off. ``backend`` is passed to
    :func:`models.kernels.groupnorm_film_silu.groupnorm_film_silu`. Set it before ``torch.compile``: compiled
    graphs guard on it and recompile when it changes.
    """
    global _FUSED_ENABLED, _FUSED_BACKEND
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"unknown fused-kernel backend {backend!r} ({', '.join(FUSED_BACKENDS)})")
    _FUSED_ENABLED, _FUSED_BACKEND = enabled, backend


def fused_kernels_enabled(device: torch.device) -> bool:
    """Whether :class:`Block` fuses GroupNorm → FiLM → SiLU for tensors on ``device`` (see set_fused_kernels)."""
    if _FUSED_ENABLED is None:
        return device.type == "cuda" and triton_importable()
    return _FUSED_ENABLED


def _unfused_dtype(h: Tensor, scale_shift: tuple[Tensor, Tensor] | None) -> torch.dtype | None:
    """The dtype the unfused GroupNorm → FiLM → SiLU returns (None: a case the fused kernel does not cover).

    CUDA autocast runs ``group_norm`` in float32 (the FiLM terms then promote to float32 too); CPU autocast
    leaves it in the input dtype; other devices' autocast policies are not assumed.
    """
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        if dev == "cuda":
            out = torch.float32
        elif dev == "cpu":
            out = h.dtype
        else:
            return None
    else:
        out = h.dtype
    if scale_shift is not None:
        out = torch.promote_types(torch.promote_types(out, scale_shift[0].dtype), scale_shift[1].dtype)
    return out if out in (h.dtype, torch.float32) else None


class Block(nn.Module):
    """WS-conv 3×3 → GroupNorm → optional FiLM → SiLU → Dropout.

    In eval mode with no gradient needed and fused kernels on (:func:`set_fused_kernels`), GroupNorm → FiLM →
    SiLU is one fused kernel (statistics in float32, output in the dtype the unfused modules give).
    """

    def __init__(self, dim: int, dim_out: int, groups: int, dropout: float):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = self.proj(x)
        if self._can_fuse(x, scale_shift):
            out_dtype = _unfused_dtype(x, scale_shift)
            if out_dtype is not None:
                scale, shift = scale_shift if scale_shift is not None else (None, None)
                return groupnorm_film_silu(x, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps,
                                           scale, shift, out_dtype=out_dtype, backend=_FUSED_BACKEND)
        x = self.norm(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.dropout(self.act(x))

    def _can_fuse(self, h: Tensor, scale_shift: tuple[Tensor, Tensor] | None) -> bool:
        if self.training or (self.dropout.training and self.dropout.p > 0) or h.dim() != 4:
            return False
        if not fused_kernels_enabled(h.device):
            return False
        if torch.is_grad_enabled():  # the kernel has no backward: only when nothing needs a gradient
            tensors = (h, self.norm.weight, self.norm.bias, *(scale_shift or ()))
            if any(t is not None and t.requires_grad for t in tensors):
                return False
        return True


class ResnetBlock(nn.Module):
    """Two Blocks with FiLM conditioning (from concat(time, class) embeddings) on the first, plus a skip."""

    def __init__(self, dim: int, dim_out: int, *, cond_dim: int, groups: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups, dropout)
        self.block2 = Block(dim_out, dim_out, groups, dropout)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """``cond`` = concat(time_emb, class_emb) [B, cond_dim]."""
        scale_shift = self.mlp(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.block1(x, scale_shift=scale_shift)
        h = self.block2(h)
        return h + self.res_conv(x)


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """[B] → [B, dim]: (sin, cos) of t·10000^(−i/(dim/2 − 1)), i < dim/2 (the official frequencies)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat((args.sin(), args.cos()), dim=-1)


class SinusoidalPosEmb(nn.Module):
    """Parameter-free time embedding (index 0 of ``time_mlp``)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"sinusoidal embedding dim must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        return sinusoidal_embedding(t, self.dim)


def Downsample(dim: int, dim_out: int) -> nn.Module:
    """4×4 stride-2 conv (halves h, w)."""
    return nn.Conv2d(dim, dim_out, 4, 2, 1)


def Upsample(dim: int, dim_out: int) -> nn.Module:
    """Nearest ×2 then 3×3 conv (keys ``.1.weight``/``.1.bias``)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))


def embedding_mlp(dim_in: int, dim: int) -> list[nn.Module]:
    """Linear → GELU → Linear (the time and class MLPs)."""
    return [nn.Linear(dim_in, dim), nn.GELU(), nn.Linear(dim, dim)]
