"""The ∞-Brush conditional denoiser ξ_θ(u_t, e, t) → predicted smoothed noise Aξ at the same points.

Sparse level (points): lift → down sparse blocks (kernel integrals over k-NN) → cross-attention neural operator
(timestep, condition, coordinate sources) → self-attention neural operator. Grid level: k-NN transfer to a G×G grid
→ UNO (FiLM on t, bottleneck cross-attention to the condition) → bilinear back to the points. Up sparse blocks with
skips → 3 channels.

The forward pass is split into stages so the canvas sampler can run them chunk by chunk (see sampler.py); the
points-mode :meth:`InfBrushDenoiser.forward` (training) chains the same stages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.infbrush.config import InfBrushConfig
from models.infbrush.geometry import GridPairs, PointGeometry, Stencil, canvas_offsets, scatter_to_grid
from models.infbrush.layers import (CANOBlock, CondEncoder, CoordEmbedding, LinearAttentionNO, LocalCondition, SABlock,
                                    SparseBlock, TimeEmbedding, UNO)


def token_positions(gh: int, gw: int, height: int, width: int) -> torch.Tensor:
    """Centres of a gh×gw condition grid laid over the canvas window, (gh·gw, 2) in (y, x) unit coordinates."""
    side, oy, ox = canvas_offsets(height, width)
    ys = (oy + (torch.arange(gh, dtype=torch.float64) + 0.5) * height / gh) / side
    xs = (ox + (torch.arange(gw, dtype=torch.float64) + 0.5) * width / gw) / side
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(gh * gw, 2).float()


def canvas_window(height: int, width: int) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1): the canvas in unit coordinates — the rectangle a condition grid's cells tile."""
    side, oy, ox = canvas_offsets(height, width)
    return oy / side, ox / side, (oy + height) / side, (ox + width) / side


@dataclass
class StepContext:
    """Everything about one network evaluation that is independent of the points."""

    temb: torch.Tensor                 # (B, time_dim)
    time_stats: tuple                  # CANO source sums of the timestep token
    cond_stats: tuple                  # CANO source sums of the condition tokens
    uno_ctx: torch.Tensor              # (B, T, ctx_dim)
    cells: torch.Tensor | None = None  # LocalCondition cell features (B, C, rows, cols) when cfg.cond_field
    window: torch.Tensor | None = None  # (B, 4) the canvas in unit coordinates, for a grid of several cells


class InfBrushDenoiser(nn.Module):
    def __init__(self, cfg: InfBrushConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, td = cfg.channels, cfg.time_dim
        self.stencil = Stencil(cfg.knn_k)
        if cfg.up_blocks > cfg.down_blocks + 1:
            raise ValueError("up_blocks may exceed down_blocks by at most one (one skip per down block + the lift)")
        self.time_embed = TimeEmbedding(cfg.time_freq_dim, td, cfg.timesteps)
        self.time_token = nn.Linear(td, C)
        self.coord_embed = CoordEmbedding(cfg.coord_freqs, cfg.coord_max_freq, C)
        self.cond = CondEncoder(cfg.embedding_dim, C, cfg.uno_ctx_dim, cfg.coord_freqs, cfg.coord_max_freq)
        self.lift = nn.Linear(3, C)
        self.down = nn.ModuleList(SparseBlock(C, td, cfg.kernel_hidden, cfg.mlp_mult) for _ in range(cfg.down_blocks))
        self.cano = CANOBlock(C, cfg.heads, cfg.mlp_mult)
        self.sa = SABlock(C, cfg.heads, cfg.mlp_mult)
        self.to_grid = nn.Linear(C, cfg.grid_channels)
        self.uno = UNO(cfg.grid_channels, cfg.uno_width, cfg.uno_mults, cfg.uno_blocks, cfg.uno_attn_res,
                       cfg.uno_head_dim, cfg.uno_dropout, cfg.grid_size, td, cfg.uno_ctx_dim)
        self.from_grid = nn.Linear(cfg.grid_channels, C)
        self.up = nn.ModuleList(SparseBlock(C, td, cfg.kernel_hidden, cfg.mlp_mult, skip=True)
                                for _ in range(cfg.up_blocks))
        self.out_norm = nn.LayerNorm(C)
        self.out = nn.Linear(C, 3)
        # created last: a configuration without it draws the same initial weights as before it existed
        self.local = LocalCondition(cfg.embedding_dim, C) if cfg.cond_field else None

    # ------------------------------------------------------------------------------------------------------------
    @property
    def halo_down(self) -> int:
        return self.stencil.radius * self.cfg.down_blocks

    @property
    def halo_up(self) -> int:
        return self.stencil.radius * self.cfg.up_blocks

    @property
    def cano_attn(self) -> LinearAttentionNO:
        return self.cano.attn

    def context(self, t: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor, drop: torch.Tensor,
                grid: tuple[int, int] | None = None, window=None) -> StepContext:
        """t (B,) timestep indices, emb (B, T, 512), pos (B, T, 2), drop (B,) bool (True → null condition).

        grid (rows, cols) with rows·cols = T and window (the canvas's :func:`canvas_window`, (4,) or (B, 4)):
        the layout of a T > 1 condition, needed only by a model with a local condition (``cfg.cond_field``)."""
        temb = self.time_embed(t)
        attn = self.cano_attn
        time_stats = attn.stats(self.time_token(temb)[:, None, :])
        tok, ctx = self.cond(emb, pos, drop)
        cond_stats = attn.stats(tok)
        cells = win = None
        if self.local is not None:
            T = emb.shape[1]
            rows, cols = (1, 1) if T == 1 else (grid or (0, 0))
            if rows * cols != T or (T > 1 and window is None):
                raise ValueError(f"a local condition of {T} tokens needs its grid (rows, cols) and canvas window")
            cells = self.local.cells(emb, drop, rows, cols)
            if window is not None:
                win = torch.as_tensor(window, dtype=torch.float32, device=emb.device).reshape(-1, 4)
                win = win.expand(emb.shape[0], 4)
        return StepContext(temb=temb, time_stats=time_stats, cond_stats=cond_stats, uno_ctx=ctx, cells=cells,
                           window=win)

    def local_condition(self, ctx: StepContext, xy: torch.Tensor) -> torch.Tensor | None:
        """The local condition at unit coordinates xy (B or 1, …, 2) → (B, …, C); None without one."""
        if ctx.cells is None:
            return None
        return LocalCondition.at(ctx.cells, ctx.window, xy)

    # --- stages (shared by training, the one-shot lattice forward and the chunked sampler) -----------------------
    def sparse_down(self, u: torch.Tensor, temb: torch.Tensor, geo,
                    local: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """local: :meth:`local_condition` at the same points (None: no local condition)."""
        h = self.lift(u)
        if local is not None:
            h = h + local
        skips = [h]
        for blk in self.down:
            h = blk(h, temb, geo)
            skips.append(h)
        return h, skips

    def coord_stats(self, cemb: torch.Tensor, mask: torch.Tensor | None = None, dtype: torch.dtype | None = None):
        return self.cano_attn.stats(cemb, mask, dtype)

    def sparse_mid(self, h: torch.Tensor, cemb: torch.Tensor, ctx: StepContext, coord_stats) -> torch.Tensor:
        return self.cano(h, cemb, [ctx.time_stats, ctx.cond_stats, coord_stats])

    def sa_stats(self, h: torch.Tensor, mask: torch.Tensor | None = None, dtype: torch.dtype | None = None):
        return self.sa.source(h, mask, dtype)

    def sa_apply(self, h: torch.Tensor, stats) -> torch.Tensor:
        return self.sa(h, stats)

    def grid_level(self, grid: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.uno(grid, ctx.temb, ctx.uno_ctx)

    def sample_grid(self, grid_out: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """Bilinear interpolation of the grid (B, Cg, G, G) at unit coordinates xy (B, …, 2) → (B, …, Cg)."""
        B = grid_out.shape[0]
        g = torch.stack([xy[..., 1], xy[..., 0]], dim=-1) * 2 - 1                 # grid_sample wants (x, y) in [-1, 1]
        flat = g.reshape(B, -1, 1, 2)
        s = F.grid_sample(grid_out, flat, mode="bilinear", padding_mode="border", align_corners=False)
        return s[..., 0].transpose(1, 2).reshape(*xy.shape[:-1], -1)

    def sparse_up(self, h: torch.Tensor, skips: list[torch.Tensor], sampled: torch.Tensor, temb: torch.Tensor,
                  geo) -> torch.Tensor:
        h = h + self.from_grid(sampled)
        for j, blk in enumerate(self.up):
            h = blk(h, temb, geo, skip=skips[-(j + 1)])
        return self.out(self.out_norm(h))

    # --- training forward on sampled points ----------------------------------------------------------------------
    def forward(self, u: torch.Tensor, xy: torch.Tensor, ctx: StepContext, geo: PointGeometry,
                grid_pairs: GridPairs) -> torch.Tensor:
        """u (B, N, 3) noisy smoothed values at points with unit coordinates xy (B, N, 2) → predicted Aξ (B, N, 3)."""
        h, skips = self.sparse_down(u, ctx.temb, geo, self.local_condition(ctx, xy))
        cemb = self.coord_embed(xy)
        h = self.sparse_mid(h, cemb, ctx, self.coord_stats(cemb))
        h = self.sa_apply(h, self.sa_stats(h))
        grid = scatter_to_grid(self.to_grid(h), grid_pairs, self.cfg.grid_size)
        grid_out = self.grid_level(grid, ctx)
        return self.sparse_up(h, skips, self.sample_grid(grid_out, xy), ctx.temb, geo)

