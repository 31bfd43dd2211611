"""Sampling ∞-Brush on a full pixel canvas of any size, chunk by chunk, in time and memory linear in the pixels.

Why chunking is exact. The denoiser mixes points in four ways; each is made chunk-invariant:

1. kernel integrals (local, stencil radius r per block): tiles are evaluated with a halo of r·(down + up) pixels
   beyond which nothing can reach; masks and neighbour counts come from the canvas, never from the tile;
2. the coordinate source of the cross-attention operator (a sum over all canvas pixels, independent of the state):
   accumulated once per canvas;
3. the self-attention operator (sums over all points of the post-CANO features): pass A accumulates them over
   every tile before any output is formed;
4. the k-NN transfer to the fixed G×G grid: only the K nearest pixels of each node feed the grid, found once per
   canvas (exact integer distances); pass B evaluates the sparse level on small patches around those pixels only.

Pass C then evaluates the full network per tile, using the global sums and the grid output, and applies the DDIM
update. The condition is the same for a pixel whatever tile it falls in: the condition tokens sit at their cell
centres in canvas coordinates (one set of source sums per step), and a local condition (``cfg.cond_field``) is
a function of the pixel's canvas coordinate, evaluated on every region, halo included. The state (H×W×3 float32)
is updated band by band with a one-band delay, so no band reads a neighbour's already-updated rows. The initial
noise is noise_mul·A z with z from the counter-based field (noise.py).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from models.infbrush.denoiser import InfBrushDenoiser, StepContext
from models.infbrush.geometry import (LatticeGeometry, crop_lattice, lattice_grid_pairs, pixel_to_unit,
                                      scatter_to_grid)


def _expand(stats, B: int):
    S, s = stats
    return S.expand(B, *S.shape[1:]), s.expand(B, *s.shape[1:])


class Canvas:
    """Tiling, the grid transfer and the global reductions of one H×W canvas."""

    def __init__(self, model: InfBrushDenoiser, height: int, width: int, chunk_pixels: int = 65536,
                 device: torch.device | str = "cpu"):
        if height < 1 or width < 1:
            raise ValueError("canvas must be at least 1×1")
        self.model, self.H, self.W = model, int(height), int(width)
        self.device = torch.device(device)
        self.cfg = model.cfg
        self.stencil = model.stencil
        self.hd, self.hu = model.halo_down, model.halo_up
        side = max(4, math.isqrt(max(int(chunk_pixels), 1)))
        self.th = min(self.H, max(side, self.hd + self.hu))
        self.tw = min(self.W, side)
        self.chunk_pixels = int(chunk_pixels)
        gp = lattice_grid_pairs(self.H, self.W, self.cfg.grid_size, self.cfg.grid_knn)
        self.grid_pixels = gp.pixels.to(self.device)
        self.grid_pairs = type(gp.pairs)(node=gp.pairs.node.to(self.device), source=gp.pairs.source.to(self.device),
                                         weight=gp.pairs.weight.to(self.device))
        self._coord_stats = None

    # --- tiling ---------------------------------------------------------------------------------------------------
    def bands(self) -> list[tuple[int, int]]:
        return [(r0, min(r0 + self.th, self.H)) for r0 in range(0, self.H, self.th)]

    def cols(self) -> list[tuple[int, int]]:
        return [(c0, min(c0 + self.tw, self.W)) for c0 in range(0, self.W, self.tw)]

    @property
    def n_tiles(self) -> int:
        return len(self.bands()) * len(self.cols())

    def region(self, x: torch.Tensor, r0: int, r1: int, c0: int, c1: int, m: int, B: int):
        rows = torch.arange(r0 - m, r1 + m, device=self.device)
        cols = torch.arange(c0 - m, c1 + m, device=self.device)
        geo = LatticeGeometry.build(self.stencil, rows[None], cols[None], self.H, self.W)
        u = x[rows.clamp(0, self.H - 1)][:, cols.clamp(0, self.W - 1)] * geo.mask[0]
        return u[None, None].expand(B, 1, *u.shape), geo

    def _local(self, geo: LatticeGeometry, ctx: StepContext) -> torch.Tensor | None:
        """The local condition on a region (B, n, h, w, C), or None for a model without one."""
        if ctx.cells is None:
            return None
        return self.model.local_condition(ctx, geo.unit_coords().to(self.device)[None])

    def _cemb(self, geo: LatticeGeometry, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        xy = geo.unit_coords().to(self.device)[None]                     # (1, n, h, w, 2)
        cemb = self.model.coord_embed(xy)
        return xy.expand(B, *xy.shape[1:]), cemb.expand(B, *cemb.shape[1:])

    # --- global reductions ----------------------------------------------------------------------------------------
    def coord_stats(self):
        """CANO coordinate-source sums over every canvas pixel (depends on the weights and the canvas only)."""
        if self._coord_stats is None:
            S = s = None
            rows_per = max(1, self.chunk_pixels // self.W)
            cols = torch.arange(self.W, device=self.device)
            for r0 in range(0, self.H, rows_per):
                rows = torch.arange(r0, min(r0 + rows_per, self.H), device=self.device)
                cemb = self.model.coord_embed(pixel_to_unit(rows[:, None], cols[None, :], self.H, self.W)[None])
                dS, ds = self.model.coord_stats(cemb, dtype=torch.float64)
                S = dS if S is None else S + dS
                s = ds if s is None else s + ds
            self._coord_stats = (S.float(), s.float())
        return self._coord_stats

    def sa_stats(self, x, ctx: StepContext, B: int, cstats, tick: Callable[[], None]):
        """Pass A: self-attention sums over all pixels."""
        m = self.model
        S = s = None
        for r0, r1 in self.bands():
            for c0, c1 in self.cols():
                u, geo = self.region(x, r0, r1, c0, c1, self.hd, B)
                h, _ = m.sparse_down(u, ctx.temb, geo, self._local(geo, ctx))
                h, g = crop_lattice(h, self.hd), geo.crop(self.hd)
                _, cemb = self._cemb(g, B)
                h = m.sparse_mid(h, cemb, ctx, cstats)
                dS, ds = m.sa_stats(h, g.mask[None, ..., 0], dtype=torch.float64)
                S = dS if S is None else S + dS
                s = ds if s is None else s + ds
                tick()
        return S.float(), s.float()

    def grid_input(self, x, ctx: StepContext, B: int, cstats, sstats) -> torch.Tensor:
        """Pass B: post-self-attention features at the pixels that feed the grid (patches of radius halo_down)."""
        m, mm = self.model, self.hd
        pix = self.grid_pixels
        U = pix.shape[0]
        per = max(1, self.chunk_pixels // (2 * mm + 1) ** 2)
        off = torch.arange(-mm, mm + 1, device=self.device)
        feats = None
        for p0 in range(0, U, per):
            pr, pc = pix[p0:p0 + per, 0], pix[p0:p0 + per, 1]
            rows, cols = pr[:, None] + off[None], pc[:, None] + off[None]
            geo = LatticeGeometry.build(self.stencil, rows, cols, self.H, self.W)
            u = x[rows.clamp(0, self.H - 1)[:, :, None], cols.clamp(0, self.W - 1)[:, None, :]] * geo.mask
            h, _ = m.sparse_down(u[None].expand(B, *u.shape), ctx.temb, geo, self._local(geo, ctx))
            h, g = crop_lattice(h, mm), geo.crop(mm)
            _, cemb = self._cemb(g, B)
            h = m.sa_apply(m.sparse_mid(h, cemb, ctx, cstats), sstats)
            f = m.to_grid(h)[:, :, 0, 0]
            if feats is None:
                feats = f.new_empty(B, U, f.shape[-1])
            feats[:, p0:p0 + per] = f
        return scatter_to_grid(feats, self.grid_pairs, self.cfg.grid_size)

    def eps_bands(self, x, ctx: StepContext, B: int, cstats, sstats, grid_out,
                  tick: Callable[[], None]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Pass C: the network output ε̂ (B, rows, W, 3) band by band."""
        m = self.model
        halo = self.hd + self.hu
        for r0, r1 in self.bands():
            band = None
            for c0, c1 in self.cols():
                u, geo = self.region(x, r0, r1, c0, c1, halo, B)
                h, skips = m.sparse_down(u, ctx.temb, geo, self._local(geo, ctx))
                h, g = crop_lattice(h, self.hd), geo.crop(self.hd)
                skips = [crop_lattice(sk, self.hd) for sk in skips]
                xy, cemb = self._cemb(g, B)
                h = m.sa_apply(m.sparse_mid(h, cemb, ctx, cstats), sstats)
                e = m.sparse_up(h, skips, m.sample_grid(grid_out, xy), ctx.temb, g)
                e = crop_lattice(e, self.hu)[:, 0]
                if band is None:
                    band = e.new_empty(B, r1 - r0, self.W, 3)
                band[:, :, c0:c1] = e
                tick()
            yield r0, r1, band

    def predict_eps(self, x: torch.Tensor, ctx: StepContext, B: int) -> torch.Tensor:
        """ε̂ over the whole canvas through the chunked passes (B, H, W, 3) — for tests and benchmarks."""
        cs = _expand(self.coord_stats(), B)
        ss = self.sa_stats(x, ctx, B, cs, lambda: None)
        grid_out = self.model.grid_level(self.grid_input(x, ctx, B, cs, ss), ctx)
        out = x.new_empty(B, self.H, self.W, 3)
        for r0, r1, e in self.eps_bands(x, ctx, B, cs, ss, grid_out, lambda: None):
            out[:, r0:r1] = e
        return out


def evaluate_full(model: InfBrushDenoiser, x: torch.Tensor, ctx: StepContext, B: int) -> torch.Tensor:
    """One-shot reference: the same network over the whole canvas at once (memory ∝ pixels × channels)."""
    H, W = x.shape[:2]
    stencil = model.stencil
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    geo = LatticeGeometry.build(stencil, rows[None], cols[None], H, W)
    u = x[None, None].expand(B, 1, H, W, 3)
    xy = geo.unit_coords().to(x.device)[None]
    h, skips = model.sparse_down(u, ctx.temb, geo, model.local_condition(ctx, xy))
    cemb = model.coord_embed(xy)
    cs = _expand(tuple(a.float() for a in model.coord_stats(cemb, dtype=torch.float64)), B)
    xy, cemb = xy.expand(B, *xy.shape[1:]), cemb.expand(B, *cemb.shape[1:])
    h = model.sparse_mid(h, cemb, ctx, cs)
    h = model.sa_apply(h, tuple(a.float() for a in model.sa_stats(h, dtype=torch.float64)))
    gp = lattice_grid_pairs(H, W, model.cfg.grid_size, model.cfg.grid_knn)
    f = model.to_grid(h).reshape(B, H * W, -1)
    sel = (gp.pixels[:, 0] * W + gp.pixels[:, 1]).to(x.device)
    pairs = type(gp.pairs)(node=gp.pairs.node.to(x.device), source=gp.pairs.source.to(x.device),
                           weight=gp.pairs.weight.to(x.device))
    grid_out = model.grid_level(scatter_to_grid(f[:, sel], pairs, model.cfg.grid_size), ctx)
    e = model.sparse_up(h, skips, model.sample_grid(grid_out, xy), ctx.temb, geo)
    return e[:, 0]
