"""Windowed overlap-add of decoded tiles into a float32 accumulator.

``acc[c, y0 + i, x0 + j] += wy[b, i] * wx[b, j] * tiles[b, c, i, j]`` for every tile ``b`` and every
(i, j) inside the tile's active rectangle (where its window is non-zero).

Two implementations with the same arithmetic order:

* a Triton kernel (GPU; runs on CPU tensors under ``TRITON_INTERPRET=1`` for tests), and
* a plain-torch fallback (CPU, or when Triton is not installed).

Tiles of one batch overlap each other (neighbours share the overlap strip).  To stay race-free *and*
deterministic without atomics, the batch is split into *phases* of pairwise-disjoint active rectangles
(:func:`plan_phases`); phases run one after another, in the same order in both implementations.

Triton is imported lazily: importing this module never needs it.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

Rect = tuple[int, int, int, int]  # (row_lo, row_hi, col_lo, col_hi), tile-local, half-open

_KERNELS: dict[bool, object] = {}


def triton_available() -> bool:
    """True when ``import triton`` works (it is never imported at module import time)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "on", "yes"}


def _get_kernel():
    """Build (once per interpret mode) the Triton kernel; Triton reads TRITON_INTERPRET at decoration time."""
    mode = _interpret_mode()
    if mode in _KERNELS:
        return _KERNELS[mode]
    import triton
    import triton.language as tl

    @triton.jit
    def _ola_kernel(acc_ptr, tile_ptr, wy_ptr, wx_ptr, meta_ptr, TH, TW, AW, acc_plane, tile_plane,
                    C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        # acc_plane = AH·AW and tile_plane = TH·TW are passed from Python (64-bit when large); scalar
        # arguments are only ever multiplied with int64 tensors, never converted (Triton may specialise
        # a scalar equal to 1 into a constant).
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        bw = tl.program_id(2)
        m = meta_ptr + pid * 7
        b = tl.load(m)
        y0 = tl.load(m + 1)
        x0 = tl.load(m + 2)
        rlo = tl.load(m + 3)
        rhi = tl.load(m + 4)
        clo = tl.load(m + 5)
        chi = tl.load(m + 6)
        rows = bh * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = bw * BLOCK_W + tl.arange(0, BLOCK_W)
        rmask = (rows >= rlo) & (rows < rhi)
        cmask = (cols >= clo) & (cols < chi)
        wyv = tl.load(wy_ptr + b * TH + rows, mask=rmask, other=0.0)
        wxv = tl.load(wx_ptr + b * TW + cols, mask=cmask, other=0.0)
        w = wyv[:, None] * wxv[None, :]
        mask = rmask[:, None] & cmask[None, :]
        acc_off = (y0 + rows).to(tl.int64)[:, None] * AW + (x0 + cols).to(tl.int64)[None, :]
        tile_off = rows.to(tl.int64)[:, None] * TW + cols.to(tl.int64)[None, :]
        bb = b.to(tl.int64)
        for c in tl.static_range(C):
            v = tl.load(tile_ptr + (bb * C + c) * tile_plane + tile_off, mask=mask, other=0.0)
            a = tl.load(acc_ptr + c * acc_plane + acc_off, mask=mask, other=0.0)
            tl.store(acc_ptr + c * acc_plane + acc_off, a + w * v, mask=mask)

    _KERNELS[mode] = _ola_kernel
    return _ola_kernel


def plan_phases(rects: Sequence[Rect]) -> list[list[int]]:
    """Greedy split of rectangles (in accumulator coordinates) into groups of pairwise-disjoint ones.

    Deterministic: tile ``i`` goes to the first phase none of whose members it intersects.
    """
    phases: list[list[int]] = []
    for i, (r0, r1, c0, c1) in enumerate(rects):
        for phase in phases:
            if all(r1 <= rects[j][0] or rects[j][1] <= r0 or c1 <= rects[j][2] or rects[j][3] <= c0 for j in phase):
                phase.append(i)
                break
        else:
            phases.append([i])
    return phases


def _active(w: torch.Tensor) -> tuple[int, int]:
    nz = torch.nonzero(w).flatten()
    if nz.numel() == 0:
        return 0, 0
    return int(nz[0]), int(nz[-1]) + 1


def overlap_add(acc: torch.Tensor, tiles: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor,
                y0: Sequence[int], x0: Sequence[int], active: Sequence[Rect] | None = None,
                backend: str = "auto") -> str:
    """Accumulate window-weighted ``tiles`` [B, C, TH, TW] into ``acc`` [C, AH, AW] in place.

    ``wy`` [B, TH] and ``wx`` [B, TW] are each tile's separable 1-D windows; ``y0``/``x0`` its top-left
    corner in ``acc``; ``active`` its tile-local rectangle where the window is non-zero (computed from
    the windows when omitted).  ``backend``: ``"auto"`` (Triton on CUDA when importable, else torch),
    ``"triton"`` or ``"torch"``.  Returns the backend used.
    """
    if acc.dim() != 3 or acc.dtype != torch.float32:
        raise ValueError(f"acc must be a float32 [C, H, W] tensor, got {tuple(acc.shape)} {acc.dtype}")
    if tiles.dim() != 4 or tiles.shape[1] != acc.shape[0]:
        raise ValueError(f"tiles must be [B, {acc.shape[0]}, TH, TW], got {tuple(tiles.shape)}")
    b, c, th, tw = tiles.shape
    if tuple(wy.shape) != (b, th) or tuple(wx.shape) != (b, tw):
        raise ValueError(f"windows must be [B, TH] and [B, TW] = [{b}, {th}] and [{b}, {tw}], "
                         f"got {tuple(wy.shape)} and {tuple(wx.shape)}")
    if len(y0) != b or len(x0) != b:
        raise ValueError(f"need {b} tile offsets, got {len(y0)} and {len(x0)}")
    if active is None:
        active = []
        for i in range(b):
            r = _active(wy[i])
            q = _active(wx[i])
            active.append((r[0], r[1], q[0], q[1]))
    ah, aw = acc.shape[1], acc.shape[2]
    rects = []
    for i, (r0, r1, c0, c1) in enumerate(active):
        if not (0 <= r0 <= r1 <= th and 0 <= c0 <= c1 <= tw):
            raise ValueError(f"tile {i}: active rectangle {(r0, r1, c0, c1)} outside the {th}x{tw} tile")
        if r1 > r0 and c1 > c0 and (y0[i] + r0 < 0 or y0[i] + r1 > ah or x0[i] + c0 < 0 or x0[i] + c1 > aw):
            raise ValueError(f"tile {i} at ({y0[i]}, {x0[i]}): active area leaves the {ah}x{aw} accumulator")
        rects.append((y0[i] + r0, y0[i] + r1, x0[i] + c0, x0[i] + c1))
    order = [[i for i in phase if rects[i][1] > rects[i][0] and rects[i][3] > rects[i][2]]
             for phase in plan_phases(rects)]
    order = [p for p in order if p]

    if backend == "auto":
        backend = "triton" if acc.is_cuda and triton_available() else "torch"
    if backend == "torch":
        tiles_f = tiles.to(torch.float32)
        wy_f = wy.to(acc.device, torch.float32)
        wx_f = wx.to(acc.device, torch.float32)
        for phase in order:
            for i in phase:
                r0, r1, c0, c1 = active[i]
                w = wy_f[i, r0:r1, None] * wx_f[i, None, c0:c1]
                view = acc[:, y0[i] + r0:y0[i] + r1, x0[i] + c0:x0[i] + c1]
                view.add_(w * tiles_f[i, :, r0:r1, c0:c1])
        return "torch"
    if backend != "triton":
        raise ValueError(f"unknown overlap-add backend {backend!r} (auto, triton, torch)")
    if not triton_available():
        raise RuntimeError("overlap-add backend 'triton' requested but triton is not importable")
    if not acc.is_contiguous():
        raise ValueError("acc must be contiguous for the Triton kernel")
    import triton

    kernel = _get_kernel()
    tiles_f = tiles.to(torch.float32).contiguous()
    wy_f = wy.to(acc.device, torch.float32).contiguous()
    wx_f = wx.to(acc.device, torch.float32).contiguous()
    block_h, block_w = 16, 64
    for phase in order:
        meta = torch.tensor([[i, y0[i], x0[i], *active[i]] for i in phase], dtype=torch.int32).to(acc.device)
        grid = (len(phase), triton.cdiv(th, block_h), triton.cdiv(tw, block_w))
        # no FMA contraction: a + (w·v) rounds like the torch fallback (bit-identical on the same data)
        kernel[grid](acc, tiles_f, wy_f, wx_f, meta, th, tw, aw, ah * aw, th * tw,
                     C=c, BLOCK_H=block_h, BLOCK_W=block_w, enable_fp_fusion=False)
    return "triton"
