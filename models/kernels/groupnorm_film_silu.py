"""GroupNorm → optional FiLM → SiLU in one read and one write of an NCHW activation.

Why: in the DiffInfinite UNets every ``Block`` runs GroupNorm, the FiLM scale-shift and SiLU as separate
elementwise passes (≈75 % of the image UNet's GPU time is elementwise), each reading and writing the whole
activation. Here a statistics kernel reads it once and an apply kernel reads it once more and writes the
result once.

Maths (both backends), per sample ``b``, channel ``c`` of group ``g``, in float32 whatever the input dtype::

    mean, var = mean and biased variance of x[b, group g]              (as nn.GroupNorm)
    y = (x − mean) · rsqrt(var + eps) · γ_c + β_c                     (γ = 1, β = 0 without affine)
    y = y · (scale[b, c] + 1) + shift[b, c]                           (FiLM, optional)
    out = silu(y), rounded once to the output dtype (the input's or float32)

Statistics are stable without an ``E[x²] − E[x]²`` cancellation: each group (Cg·H·W contiguous elements in
NCHW) is cut into chunks; a program reduces its chunk block by block to (count, mean, M2 = Σ(x − mean)²),
merging blocks with the pairwise update of Chan et al.; the apply kernel merges the chunks the same way.

Backends: Triton kernels (GPU; on CPU tensors under ``TRITON_INTERPRET=1`` for tests) and a plain-torch
fallback of the same maths (CPU, or without Triton). The call is the torch op
``slidesynth::groupnorm_film_silu`` (``torch.library.custom_op`` with a fake implementation), so it stays one
opaque node inside ``torch.compile(fullgraph=True)`` graphs instead of breaking them. Inference only: it has
no autograd formula.

Triton is imported lazily: importing this module never needs it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from models.kernels.overlap_add import _interpret_mode, triton_available

__all__ = ["groupnorm_film_silu", "groupnorm_film_silu_reference", "triton_importable", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")

_KERNELS: dict[bool, tuple[object, object]] = {}

_STATS_BLOCK_MAX = 1024  # elements per reduction step of the statistics kernel
_APPLY_BLOCK_MAX = 1024  # elements per apply program
_MAX_CHUNKS = 64  # chunks per group (bounds the apply kernel's merge vector)
_BLOCK_MIN = 32  # no block narrower than a warp (masked lanes cost less than degenerate 1-wide blocks)


def _get_kernels():
    """Build (once per interpret mode) the two Triton kernels; Triton reads TRITON_INTERPRET at decoration."""
    mode = _interpret_mode()
    if mode in _KERNELS:
        return _KERNELS[mode]
    import triton
    import triton.language as tl

    # Sums are tl.reduce(·, 0, tl.standard._sum_combine) — what tl.sum expands to — because tl.sum itself is a
    # library @jit helper built when triton is first imported, which Triton's interpreter cannot call when
    # TRITON_INTERPRET was set only afterwards (tests); the interpreter recognises _sum_combine and sums in numpy.
    @triton.jit
    def _gn_stats_kernel(x_ptr, mean_ptr, m2_ptr, group_size, n_chunks,
                         BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr):
        # one program per (sample·group, chunk); the group is contiguous in NCHW
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        base = x_ptr + row.to(tl.int64) * group_size
        start = chunk * (BLOCK * BLOCKS_PER_CHUNK)
        cnt = tl.full([], 0.0, tl.float32)
        mean = tl.full([], 0.0, tl.float32)
        m2 = tl.full([], 0.0, tl.float32)
        for i in range(BLOCKS_PER_CHUNK):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            msk = offs < group_size
            v = tl.load(base + offs, mask=msk, other=0.0).to(tl.float32)
            n_b = tl.reduce(msk.to(tl.float32), 0, tl.standard._sum_combine)
            mean_b = tl.reduce(v, 0, tl.standard._sum_combine) / tl.maximum(n_b, 1.0)
            d = tl.where(msk, v - mean_b, 0.0)
            m2_b = tl.reduce(d * d, 0, tl.standard._sum_combine)
            n = cnt + n_b
            delta = mean_b - mean
            frac = n_b / tl.maximum(n, 1.0)
            mean = mean + delta * frac
            m2 = m2 + m2_b + delta * delta * cnt * frac
            cnt = n
        out = row * n_chunks + chunk
        tl.store(mean_ptr + out, mean)
        tl.store(m2_ptr + out, m2)

    @triton.jit
    def _gn_apply_kernel(x_ptr, y_ptr, mean_ptr, m2_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                         C, HW, group_size, n_chunks, channels_per_group, inv_n, eps,
                         CHUNK: tl.constexpr, NCHUNK_P2: tl.constexpr, BLOCK: tl.constexpr,
                         HAS_AFFINE: tl.constexpr, HAS_FILM: tl.constexpr):
        # one program per (sample·channel, block of H·W); scale/shift are [B, C] contiguous: index = row
        row = tl.program_id(0)
        blk = tl.program_id(1)
        grp = row // channels_per_group  # = b·G + g because C = G·channels_per_group
        k = tl.arange(0, NCHUNK_P2)
        kmask = k < n_chunks
        p_mean = tl.load(mean_ptr + grp * n_chunks + k, mask=kmask, other=0.0)
        p_m2 = tl.load(m2_ptr + grp * n_chunks + k, mask=kmask, other=0.0)
        p_n = tl.where(kmask, tl.minimum(group_size - k * CHUNK, CHUNK), 0).to(tl.float32)
        mean = tl.reduce(p_n * p_mean, 0, tl.standard._sum_combine) * inv_n
        dev = p_mean - mean
        var = (tl.reduce(p_m2, 0, tl.standard._sum_combine)
               + tl.reduce(p_n * dev * dev, 0, tl.standard._sum_combine)) * inv_n
        a = 1.0 / tl.sqrt(var + eps)
        bias = tl.full([], 0.0, tl.float32)
        if HAS_AFFINE:
            c = row % C
            a = a * tl.load(w_ptr + c).to(tl.float32)
            bias = tl.load(b_ptr + c).to(tl.float32)
        if HAS_FILM:
            s1 = tl.load(scale_ptr + row).to(tl.float32) + 1.0
            a = a * s1
            bias = bias * s1 + tl.load(shift_ptr + row).to(tl.float32)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        msk = offs < HW
        base = row.to(tl.int64) * HW
        v = tl.load(x_ptr + base + offs, mask=msk, other=0.0).to(tl.float32)
        y = (v - mean) * a + bias
        # silu without overflow: e = exp(−|y|) ≤ 1 (tl.sigmoid is a library @jit helper: see the sums)
        e = tl.exp(-tl.abs(y))
        y = y * (tl.where(y >= 0, 1.0, e) / (1.0 + e))
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=msk)

    _KERNELS[mode] = (_gn_stats_kernel, _gn_apply_kernel)
    return _KERNELS[mode]


_TRITON_OK: bool | None = None


@torch.compiler.assume_constant_result  # a constant to torch.compile: no import traced into a graph
def triton_importable() -> bool:
    """:func:`triton_available`, asked once per process (``backend="auto"`` is resolved on every call)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        _TRITON_OK = triton_available()
    return _TRITON_OK


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _triton_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                 shift: Optional[Tensor], num_groups: int, eps: float, float32_out: bool) -> Tensor:
    if not x.is_cuda and not _interpret_mode():
        raise RuntimeError("the Triton groupnorm backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if x.is_cuda:
        with torch.cuda.device(x.device):  # Triton launches on the current device
            return _launch(x, weight, bias, scale, shift, num_groups, eps, float32_out)
    return _launch(x, weight, bias, scale, shift, num_groups, eps, float32_out)


def _launch(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
            shift: Optional[Tensor], num_groups: int, eps: float, float32_out: bool) -> Tensor:
    stats_kernel, apply_kernel = _get_kernels()
    b, c = x.shape[0], x.shape[1]
    hw = x.numel() // max(b * c, 1)
    y = torch.empty(x.shape, dtype=torch.float32 if float32_out else x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    group_size = (c // num_groups) * hw
    block = min(max(_next_pow2(group_size), _BLOCK_MIN), _STATS_BLOCK_MAX)
    blocks_per_chunk = _next_pow2(math.ceil(group_size / (block * _MAX_CHUNKS)))
    chunk = block * blocks_per_chunk
    n_chunks = math.ceil(group_size / chunk)
    mean = torch.empty(b * num_groups * n_chunks, dtype=torch.float32, device=x.device)
    m2 = torch.empty_like(mean)
    stats_kernel[(b * num_groups, n_chunks)](x, mean, m2, group_size, n_chunks,
                                            BLOCK=block, BLOCKS_PER_CHUNK=blocks_per_chunk)
    has_affine = weight is not None
    has_film = scale is not None
    apply_block = min(max(_next_pow2(hw), _BLOCK_MIN), _APPLY_BLOCK_MAX)
    dummy = mean  # never read when the matching flag is off
    apply_kernel[(b * c, math.ceil(hw / apply_block))](
        x, y, mean, m2,
        weight if has_affine else dummy, bias if has_affine else dummy,
        scale if has_film else dummy, shift if has_film else dummy,
        c, hw, group_size, n_chunks, c // num_groups, 1.0 / group_size, float(eps),
        CHUNK=chunk, NCHUNK_P2=max(_next_pow2(n_chunks), 2), BLOCK=apply_block,
        HAS_AFFINE=has_affine, HAS_FILM=has_film)
    return y


def _torch_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                shift: Optional[Tensor], num_groups: int, eps: float, float32_out: bool) -> Tensor:
    b, c = x.shape[0], x.shape[1]
    xf = x.float().reshape(b, num_groups, -1)
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)  # [b, G, 1]
    a = rstd.repeat_interleave(c // num_groups, dim=1)  # [b, C, 1]
    mean_c = mean.repeat_interleave(c // num_groups, dim=1)
    off = torch.zeros((), dtype=torch.float32, device=x.device)
    if weight is not None:
        a = a * weight.float()[None, :, None]
        off = bias.float()[None, :, None]
    if scale is not None:
        s1 = scale.float()[:, :, None] + 1.0
        a = a * s1
        off = off * s1 + shift.float()[:, :, None]
    y = (x.float().reshape(b, c, -1) - mean_c) * a + off
    y = torch.nn.functional.silu(y)
    return y.reshape(x.shape).to(torch.float32 if float32_out else x.dtype)


@torch.library.custom_op("slidesynth::groupnorm_film_silu", mutates_args=())
def _groupnorm_film_silu_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                            shift: Optional[Tensor], num_groups: int, eps: float, float32_out: bool,
                            backend: str) -> Tensor:
    if backend == "auto":
        backend = "triton" if x.is_cuda and triton_importable() else "torch"
    if backend == "torch":
        return _torch_impl(x, weight, bias, scale, shift, num_groups, eps, float32_out)
    return _triton_impl(x, weight, bias, scale, shift, num_groups, eps, float32_out)


@_groupnorm_film_silu_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, float32_out, backend):
    return torch.empty(x.shape, dtype=torch.float32 if float32_out else x.dtype, device=x.device)


def groupnorm_film_silu(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                        eps: float = 1e-5, scale: Tensor | None = None, shift: Tensor | None = None, *,
                        out_dtype: torch.dtype | None = None, backend: str = "auto") -> Tensor:
    """``silu(film(group_norm(x)))`` for an NCHW ``x`` [B, C, H, W] (any trailing spatial dims), no autograd.

    ``weight``/``bias`` [C]: the GroupNorm affine (both or neither); ``scale``/``shift``: the FiLM terms, [B, C]
    (or anything reshapeable to it, e.g. [B, C, 1, 1]; both or neither), applied as ``y·(scale + 1) + shift``.
    ``out_dtype``: ``None``/``x.dtype`` or ``torch.float32``. ``backend``: ``"auto"`` (Triton for CUDA tensors
    when importable, else torch), ``"triton"`` or ``"torch"``. Raises when a gradient would be needed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown groupnorm backend {backend!r} ({', '.join(BACKENDS)})")
    if x.dim() < 3:
        raise ValueError(f"x must be [B, C, *spatial], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    b, c = x.shape[0], x.shape[1]
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"{c} channels cannot be split into {num_groups} groups")
    if out_dtype is None:
        out_dtype = x.dtype
    if out_dtype not in (x.dtype, torch.float32):
        raise ValueError(f"out_dtype must be the input's ({x.dtype}) or torch.float32, got {out_dtype}")
    if (weight is None) != (bias is None) or (scale is None) != (shift is None):
        raise ValueError("weight and bias, and scale and shift, come in pairs")
    if weight is not None and (weight.shape != (c,) or bias.shape != (c,)):
        raise ValueError(f"weight and bias must be [{c}], got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if scale is not None:
        if scale.numel() != b * c or shift.numel() != b * c:
            raise ValueError(f"scale and shift must hold [B, C] = [{b}, {c}] values, "
                             f"got {tuple(scale.shape)} and {tuple(shift.shape)}")
        scale = scale.reshape(b, c).contiguous()
        shift = shift.reshape(b, c).contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, scale, shift)):
        raise RuntimeError("groupnorm_film_silu is inference-only (no autograd formula); "
                           "call it under torch.no_grad()/inference_mode or with tensors that need no grad")
    if backend == "triton" and not triton_importable():
        raise RuntimeError("groupnorm backend 'triton' requested but triton is not importable")
    return _groupnorm_film_silu_op(x.contiguous(), weight, bias, scale, shift, int(num_groups), float(eps),
                                   out_dtype == torch.float32 and x.dtype != torch.float32, backend)


def groupnorm_film_silu_reference(x: Tensor, num_groups: int, weight: Tensor | None = None,
                                  bias: Tensor | None = None, eps: float = 1e-5, scale: Tensor | None = None,
                                  shift: Tensor | None = None) -> Tensor:
    """The unfused float32 computation (``F.group_norm`` → FiLM → ``F.silu``) the kernels are tested against."""
    y = torch.nn.functional.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    if scale is not None:
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        y = y * (scale.float().reshape(shape) + 1) + shift.float().reshape(shape)
    return torch.nn.functional.silu(y)
