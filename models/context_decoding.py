"""VAE decoding of latent tiles with slide-wide context, so that a slide does not depend on how it was tiled.

The KL autoencoder's decoder has two non-local operations. Decoded tile by tile, both see only the tile, and a
slide becomes a quilt of decode tiles (demo model, 2048²: 64-px block means up to 30 grey levels off an
untiled decode of the same latent, PSNR 30 dB):

* **GroupNorm** normalises by the statistics of its input — of the tile, when a tile is decoded. Here every
  GroupNorm of the decoder normalises with statistics of the whole slide, fixed before the first tile:

  - the norms before the mid-block attention (latent resolution, cheap) get *exact* statistics from streamed
    passes over the latent, one per norm (each runs the decoder up to that norm, earlier norms fixed, over
    bounded windows, summing the norm's input over each window's own region: windows partition the latent);
  - the norms after it get statistics *estimated* from a sample of small crops (``STATS_CROPS``, one per 4096
    latent px within 64–256, each 8² latent px counted inside 2 px of context, on a lattice that depends only
    on the latent's size, never on the decode tiling), decoded as one batch in which every norm pools its
    statistics over the crops' interiors: a self-consistent estimate (measured: 30 crops left 4.5 grey levels
    of error at 2048², 64 crops 1.3, 256 no better). Latents of at most 64² px (``EXACT_TOKENS``) are their own
    single crop: exact statistics.

* **Mid-block self-attention** runs at latent resolution over every position of its input. The decoder's
  attention is diffuse (demo model, 2048²: the median query spreads its weight over ~40 % of all keys), so a
  tile-sized context is far too small, yet exact attention over the slide is quadratic in its area. Here each
  query attends to a **hierarchy of levels**: the exact keys within 8 latent px; keys mean-pooled over 2×2
  blocks to 16 px, 4×4 to 48 px, 8×8 to 128 px, then pools and radii growing 4× a level until one covers
  the slide (:func:`attention_levels`). Each key's weight is split between levels by separable raised-cosine
  tapers of the query–key distance that sum to one, so the output is a continuous function of the query
  position and does not depend on any tiling. A pooled block stands for its keys with its mean key, its mean
  value and a log-partition correction for their spread (``λ = log mean exp(q̄·Δk·s + Σ σ²Δk²·s²/2)``, q̄ and
  σ² the slide's mean query and per-dimension query variance, exact from the streamed moments), which halves
  the error of plain pooling. Up to 64² latent px the attention is exact and global.

Measured on the demo model (tukey, tile 64 / overlap 6) against the untiled decode: 64-px block means within
0.9 grey levels (99th percentile 0.6), PSNR 52 dB at 2048²; two tilings agree within 0.2 grey levels.

The decode is split at the mid-block: **stage A** (``conv_in`` and the mid-block, latent resolution) is a pure
function of a latent rectangle, computed on the rectangle of a batch of tiles plus a margin covering its
convolutions and the exact and local (≤ 4×4-pooled, built from the window) attention levels; **stage B**
(up-blocks and output layers) decodes the tiles of stage A's features. Memory: the slide-wide pooled levels
(8×8 and coarser: about latent area × 2·C/64 × 4/3 floats, C = 128 on the demo model — 0.1 GB at 16384²),
one stage-A window, the sample's batch. Nothing of the decoded slide is held.

Only the diffusers ``AutoencoderKL`` modules are used: its GroupNorms are wrapped for the duration of a call
(:class:`SlideGroupNorm`), its mid-block attention gets an attention processor
(:class:`HierarchicalAttnProcessor`), and its blocks run through their own ``forward``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.decoding import check_finite
from models.runtime import CancelFn, ProgressFn, check_cancel

NEAR_RADIUS = 8        # latent px of exact attention around each query
NEAR_RAMP = 4
LEVEL_POOL = 4         # beyond the fixed first levels, each level pools 4× more per axis than the one before
LOCAL_POOL = 4         # levels pooling ≤ 4×4 px are built from each stage-A window; coarser ones once per slide
QUERY_BLOCK = 16       # queries per attention call (a computation grouping only: results do not depend on it)
SAMPLE_INTERIOR = 8    # latent px: side of each statistics crop's counted interior
SAMPLE_MARGIN = 2      # latent px decoded around it (stage B)
PASS_WINDOW = (64, 256)  # latent rows × columns per window of the streamed statistics passes
STATS_CROPS = (64, 256)  # the sample: one crop per 4096 latent px, within these bounds
EXACT_TOKENS = 64 * 64  # latents up to this many px get exact statistics and exact global attention


class _Collected(Exception):
    """Raised by a collecting GroupNorm to end a statistics pass once its input has been summed."""


# ----------------------------------------------------------------------------------------- statistics
@dataclass
class GroupMoments:
    """Running per-group count, sum and sum of squares (float64) of a GroupNorm's input."""

    count: Tensor   # [G]
    total: Tensor   # [G]
    squares: Tensor  # [G]

    @classmethod
    def zeros(cls, groups: int) -> "GroupMoments":
        z = torch.zeros(groups, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone())

    def add(self, x: Tensor, groups: int) -> None:
        """Add the elements of ``x`` [B, C, *spatial]."""
        b, c = x.shape[:2]
        xs = x.detach().float().reshape(b, groups, -1)
        self.count += float(xs.shape[0] * xs.shape[2])
        self.total += xs.sum(dim=(0, 2)).double().cpu()
        self.squares += (xs * xs).sum(dim=(0, 2)).double().cpu()

    def merge(self, other: "GroupMoments") -> "GroupMoments":
        return GroupMoments(self.count + other.count, self.total + other.total, self.squares + other.squares)

    def mean_var(self) -> tuple[Tensor, Tensor]:
        """Per-group mean and biased variance (GroupNorm's), float64."""
        if bool((self.count <= 0).any()):
            raise ValueError("no elements were collected for these statistics")
        mean = self.total / self.count
        return mean, (self.squares / self.count - mean * mean).clamp_min(0.0)


class SlideGroupNorm(nn.Module):
    """Stands in for an ``nn.GroupNorm`` (sharing its parameters) with slide-wide statistics.

    Modes: ``"fixed"`` normalises with :attr:`stats` (per-group mean and variance); ``"pooled"`` computes one
    set of statistics over the counted regions of the whole batch (:attr:`region`), records it in
    :attr:`stats` and normalises every element with it; ``"collect"`` adds its input's counted regions to
    :attr:`moments` and ends the forward (:class:`_Collected`); ``"native"`` is the wrapped GroupNorm.
    :attr:`region` maps the input to the part that counts (default: all of it), e.g. each crop's interior.
    """

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm
        self.groups = norm.num_groups
        self.mode = "native"
        self._stats: tuple[Tensor, Tensor] | None = None
        self._folded: tuple[Tensor, Tensor] | None = None
        self.moments: GroupMoments | None = None
        self.region: Callable[[Tensor], Tensor] | None = None
        self.on_collect: Callable[[Tensor], None] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "native":
            return self.norm(x)
        if self.mode in ("collect", "pooled"):
            counted = self.region(x) if self.region is not None else x
            moments = self.moments if self.mode == "collect" else GroupMoments.zeros(self.groups)
            moments.add(counted, self.groups)
            if self.mode == "collect":
                if self.on_collect is not None:
                    self.on_collect(counted)
                raise _Collected
            self.stats = moments.mean_var()
        if self.stats is None:
            raise RuntimeError("SlideGroupNorm in fixed mode has no statistics")
        return self.normalise(x)

    @property
    def stats(self) -> tuple[Tensor, Tensor] | None:
        """Per-group (mean, variance), float64."""
        return self._stats

    @stats.setter
    def stats(self, value: tuple[Tensor, Tensor] | None) -> None:
        self._stats, self._folded = value, None

    def folded(self) -> tuple[Tensor, Tensor]:
        """Per-channel (scale, shift), float64 on the CPU: y = x·scale + shift is the normalisation and the
        affine transform in one."""
        mean, var = self._per_channel()
        scale = torch.rsqrt(var + self.norm.eps)
        if self.norm.affine:
            scale = scale * self.norm.weight.detach().double().cpu()
        shift = -mean * scale
        if self.norm.affine:
            shift = shift + self.norm.bias.detach().double().cpu()
        return scale, shift

    def _per_channel(self) -> tuple[Tensor, Tensor]:
        mean, var = self._stats
        per = self.norm.num_channels // self.groups
        return mean.repeat_interleave(per), var.repeat_interleave(per)

    def normalise(self, x: Tensor) -> Tensor:
        # GroupNorm with fixed statistics is a per-channel affine map: batch norm's inference kernel, one pass
        if self._folded is None or self._folded[0].device != x.device or self._folded[0].dtype != x.dtype:
            mean, var = self._per_channel()
            self._folded = (mean.to(x.device, x.dtype), var.to(x.device, x.dtype))
        return F.batch_norm(x, self._folded[0], self._folded[1], self.norm.weight, self.norm.bias,
                            training=False, eps=self.norm.eps)


# ----------------------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class AttentionLevel:
    """One level of the hierarchy: keys pooled over ``pool``² blocks, weighted up to ``radius`` latent px
    (Chebyshev, per axis) from the query with a raised-cosine ramp of ``ramp`` px; ``radius=None``: the whole
    slide."""

    pool: int
    radius: int | None
    ramp: int


def attention_levels(height: int, width: int, near_radius: int = NEAR_RADIUS,
                     near_ramp: int = NEAR_RAMP) -> list[AttentionLevel]:
    """The hierarchy for an height × width latent: exact keys within ``near_radius``; keys pooled 2×2 to
    2·near_radius, 4×4 to 6·near_radius, 8×8 to 16·near_radius; then pools and radii growing 4× a level, until
    a level's flat part covers the slide (that level, or one whose block is the slide's size, covers
    everything). Every level's taper contains the previous one's, so each key's weights are non-negative
    and sum to one. Keys per query: ≈ 1024 exact + 3,500 pooled (+ ≤ 1,100 per further level at gigapixel)."""
    if near_radius < 1 or not 1 <= near_ramp <= near_radius:
        raise ValueError(f"near_radius must be ≥ 1 and near_ramp in [1, near_radius], got {near_radius}, {near_ramp}")
    side = max(int(height), int(width))
    if near_radius - near_ramp >= side:
        return [AttentionLevel(1, None, 0)]
    r = near_radius
    schedule = [(2, 2 * r, max(1, r // 2)), (4, 6 * r, 2 * r), (8, 16 * r, 4 * r)]
    levels = [AttentionLevel(1, near_radius, near_ramp)]
    k = 0
    while True:
        if k < len(schedule):
            pool, radius, ramp = schedule[k]
        else:
            pool, radius, ramp = pool * LEVEL_POOL, radius * LEVEL_POOL, ramp * LEVEL_POOL
        k += 1
        if radius - ramp >= side or pool >= side:
            levels.append(AttentionLevel(pool, None, 0))
            return levels
        levels.append(AttentionLevel(pool, radius, ramp))


def taper(distance: Tensor, radius: int | None, ramp: int) -> Tensor:
    """1 up to ``radius − ramp``, raised cosine down to 0 at ``radius`` (|distance|, latent px)."""
    d = distance.abs().float()
    if radius is None:
        return torch.ones_like(d)
    t = ((d - (radius - ramp)) / ramp).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


@dataclass
class PooledLevel:
    """A level's pooled keys and values [heads, Hp, Wp, d], the log-partition correction λ [heads, Hp, Wp]
    and the number of latent px in each block [Hp, Wp]; block (0, 0) starts at canvas px ``origin`` (a
    multiple of the pool) and the pooled px end at canvas rows/columns ``limit``."""

    level: AttentionLevel
    keys: Tensor
    values: Tensor
    correction: Tensor
    count: Tensor
    origin: tuple[int, int]
    limit: tuple[int, int]


def pool_keys(keys: Tensor, values: Tensor, origin: tuple[int, int], spec: AttentionLevel, q_mean: Tensor,
              q_var: Tensor, scale: float) -> PooledLevel:
    """One level from the keys and values [heads, h, w, d] of the px at canvas ``origin`` (a multiple of the
    pool): block means and λ = log mean exp(q̄·Δk·scale + Σ σ²Δk²·scale²/2) over each block's px."""
    p = spec.pool
    nh, h, w, d = keys.shape
    kk, vv = keys.permute(0, 3, 1, 2).float(), values.permute(0, 3, 1, 2).float()  # [heads, d, h, w]
    count = _pool_sum(torch.ones(h, w, device=keys.device), p)
    k_mean = _pool_sum(kk, p) / count
    v_mean = _pool_sum(vv, p) / count
    dk = kk - k_mean.repeat_interleave(p, 2).repeat_interleave(p, 3)[:, :, :h, :w]
    corr = _pool_logmeanexp(_spread_exponent(dk, q_mean, q_var, scale), p, count)
    return PooledLevel(spec, k_mean.permute(0, 2, 3, 1).contiguous(), v_mean.permute(0, 2, 3, 1).contiguous(),
                       corr, count, origin, (origin[0] + h, origin[1] + w))


def _pool_sum(x: Tensor, pool: int) -> Tensor:
    """Sum over pool × pool blocks of the last two axes (zero-padded at the far edges)."""
    h, w = x.shape[-2:]
    hp, wp = -(-h // pool), -(-w // pool)
    x = F.pad(x, (0, wp * pool - w, 0, hp * pool - h))
    return x.reshape(*x.shape[:-2], hp, pool, wp, pool).sum(dim=(-3, -1))


class HierarchicalAttnProcessor:
    """Attention processor for the decoder's mid-block ``Attention`` (diffusers' processor interface).

    For the query positions inside :attr:`query_box` of its input, it attends over the input's own keys:
    exactly within the near radius and pooled for the local levels (pool ≤ ``LOCAL_POOL``), and over the
    slide-wide pooled levels :attr:`stored` beyond. The input's canvas position is :attr:`origins` (one (y, x)
    per batch element, multiples of ``LOCAL_POOL``). Outside the query box the output is the input (the
    residual), which callers crop away. ``mode="maps"`` instead hands the normalised input to :attr:`on_keys`
    and ends the forward.
    """

    def __init__(self, canvas: tuple[int, int], levels: Sequence[AttentionLevel]):
        self.canvas = canvas
        self.level_specs = list(levels)
        self.local_specs = [lv for lv in self.level_specs[1:] if lv.pool <= LOCAL_POOL]
        self.stored: list[PooledLevel] = []
        self.q_mean: Tensor | None = None   # [heads, d] and [heads, d]: the slide's query moments, for λ
        self.q_var: Tensor | None = None
        self.origins: list[tuple[int, int]] = [(0, 0)]
        self.query_box: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1) in input coordinates
        self.mode = "attend"
        self.on_keys: Callable[[Any, Tensor], None] | None = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> Tensor:
        if hidden_states.dim() != 4 or encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the hierarchical attention processor takes 4-D self-attention inputs only")
        if not attn.residual_connection:
            raise ValueError("the decoder's mid-block attention is expected to have a residual connection")
        residual = hidden_states
        normed = attn.group_norm(hidden_states) if attn.group_norm is not None else hidden_states
        if self.mode == "maps":
            self.on_keys(attn, normed)
            raise _Collected
        b, c, h, w = normed.shape
        y0, y1, x0, x1 = self.query_box if self.query_box is not None else (0, h, 0, w)
        tokens = normed.permute(0, 2, 3, 1)  # [B, h, w, C]
        heads = attn.heads
        out = residual.clone()
        for i in range(b):
            keys = _heads(attn.to_k(tokens[i]), heads)      # [heads, h, w, d]
            values = _heads(attn.to_v(tokens[i]), heads)
            queries = _heads(attn.to_q(tokens[i, y0:y1, x0:x1]), heads)
            oy, ox = self.origins[i]
            local = [pool_keys(keys, values, (oy, ox), spec, self.q_mean, self.q_var, attn.scale)
                     for spec in self.local_specs]
            o = self._attend(attn, queries, keys, values, (oy, ox), (y0, x0), local + self.stored)
            o = attn.to_out[0](o.permute(1, 2, 0, 3).reshape(y1 - y0, x1 - x0, -1))
            o = attn.to_out[1](o)
            out[i, :, y0:y1, x0:x1] = (o.permute(2, 0, 1) + residual[i, :, y0:y1, x0:x1]).to(out.dtype)
        return out / attn.rescale_output_factor

    def _attend(self, attn, queries: Tensor, keys: Tensor, values: Tensor, origin: tuple[int, int],
                q_offset: tuple[int, int], pooled: Sequence[PooledLevel]) -> Tensor:
        """queries [heads, qh, qw, d] at input offset ``q_offset``; keys/values [heads, h, w, d] of the input,
        whose px (0, 0) is canvas px ``origin``; ``pooled``: the pooled levels, innermost first."""
        nh, qh, qw, d = queries.shape
        out = torch.empty_like(queries)
        oy, ox = origin
        _, kh, kw, _ = keys.shape
        dev = queries.device
        near = self.level_specs[0]
        r = near.radius
        for by in range(0, qh, QUERY_BLOCK):
            for bx in range(0, qw, QUERY_BLOCK):
                qy = torch.arange(by, min(by + QUERY_BLOCK, qh), device=dev) + q_offset[0]  # input coordinates
                qx = torch.arange(bx, min(bx + QUERY_BLOCK, qw), device=dev) + q_offset[1]
                # exact level: the input's own keys within the near radius
                ky0, ky1 = (0, kh) if r is None else (max(0, int(qy[0]) - r), min(kh, int(qy[-1]) + r + 1))
                kx0, kx1 = (0, kw) if r is None else (max(0, int(qx[0]) - r), min(kw, int(qx[-1]) + r + 1))
                ty = taper(qy[:, None] - torch.arange(ky0, ky1, device=dev)[None], near.radius, near.ramp)
                tx = taper(qx[:, None] - torch.arange(kx0, kx1, device=dev)[None], near.radius, near.ramp)
                w = ty[:, None, :, None] * tx[None, :, None, :]
                biases = [_log_weight(w.reshape(len(qy) * len(qx), -1))[None].expand(nh, -1, -1)]
                ks = [keys[:, ky0:ky1, kx0:kx1].reshape(nh, -1, d)]
                vs = [values[:, ky0:ky1, kx0:kx1].reshape(nh, -1, d)]
                cy, cx = qy + oy, qx + ox  # canvas coordinates
                inner = near
                for lvl in pooled:
                    bias, k, v = self._level_terms(lvl, inner, cy, cx)
                    biases.append(bias)
                    ks.append(k)
                    vs.append(v)
                    inner = lvl.level
                q = queries[:, by:by + len(qy), bx:bx + len(qx)].reshape(nh, -1, d)
                o = F.scaled_dot_product_attention(q[None], torch.cat(ks, 1)[None].to(q.dtype),
                                                   torch.cat(vs, 1)[None].to(q.dtype),
                                                   attn_mask=torch.cat(biases, 2)[None].to(q.dtype),
                                                   scale=attn.scale)[0]
                out[:, by:by + len(qy), bx:bx + len(qx)] = o.reshape(nh, len(qy), len(qx), d)
        return out

    @staticmethod
    def _level_terms(pooled: PooledLevel, inner: AttentionLevel, cy: Tensor, cx: Tensor):
        """Bias [heads, nq, nb], keys and values [heads, nb, d] of one pooled level for queries at canvas
        rows ``cy`` × columns ``cx``: block weight = Σ over its px of (this level's taper − the inner level's),
        separable in rows and columns, times exp(λ)."""
        lvl = pooled.level
        p = lvl.pool
        (oy, ox), (ly, lx) = pooled.origin, pooled.limit
        hp, wp = pooled.count.shape
        if lvl.radius is None:
            b0y, b1y, b0x, b1x = 0, hp, 0, wp
        else:
            b0y = max(0, (int(cy[0]) - lvl.radius - oy) // p)
            b1y = min(hp, (int(cy[-1]) + lvl.radius - oy) // p + 1)
            b0x = max(0, (int(cx[0]) - lvl.radius - ox) // p)
            b1x = min(wp, (int(cx[-1]) + lvl.radius - ox) // p + 1)
        dev = cy.device
        rows = torch.arange(oy + b0y * p, min(oy + b1y * p, ly), device=dev)
        cols = torch.arange(ox + b0x * p, min(ox + b1x * p, lx), device=dev)
        ny, nx = b1y - b0y, b1x - b0x

        def block_sums(q: Tensor, px: Tensor, level: AttentionLevel, n: int) -> Tensor:
            t = taper(q[:, None] - px[None], level.radius, level.ramp)
            t = F.pad(t, (0, n * p - t.shape[1]))
            return t.reshape(t.shape[0], n, p).sum(-1)

        outer = block_sums(cy, rows, lvl, ny)[:, None, :, None] * block_sums(cx, cols, lvl, nx)[None, :, None, :]
        inner_w = block_sums(cy, rows, inner, ny)[:, None, :, None] * block_sums(cx, cols, inner, nx)[None, :, None, :]
        w = (outer - inner_w).reshape(len(cy) * len(cx), ny * nx)
        corr = pooled.correction[:, b0y:b1y, b0x:b1x].reshape(pooled.correction.shape[0], 1, -1)
        bias = _log_weight(w)[None] + corr.to(w.dtype)
        nh, d = pooled.keys.shape[0], pooled.keys.shape[-1]
        return (bias, pooled.keys[:, b0y:b1y, b0x:b1x].reshape(nh, -1, d),
                pooled.values[:, b0y:b1y, b0x:b1x].reshape(nh, -1, d))


def _heads(x: Tensor, heads: int) -> Tensor:
    """[..., h, w, heads·d] → [heads, h, w, d]."""
    h, w, inner = x.shape
    return x.reshape(h, w, heads, inner // heads).permute(2, 0, 1, 3)


def _log_weight(w: Tensor) -> Tensor:
    """log of non-negative weights; weights ≤ 1e-6 of a px are left out (−inf)."""
    return torch.where(w > 1e-6, w.clamp_min(1e-30).log(), torch.full_like(w, float("-inf")))


# ----------------------------------------------------------------------------------------- the decoder
@dataclass(frozen=True)
class _Crop:
    """A statistics crop: the canvas region (y0, y1, x0, x1) whose attention output it takes (the stage-B
    crop and the convolutions after the attention around it), the stage-B crop's offset in that region, and
    the counted interior in region coordinates."""

    region: tuple[int, int, int, int]
    stage_b: tuple[int, int]
    interior: tuple[int, int, int, int]


class SlideContextDecoder:
    """Decodes latent tiles of one slide with slide-wide GroupNorm statistics and hierarchical attention.

    ``vae``: a diffusers ``AutoencoderKL``; ``input_scale``: what latents are multiplied by before
    ``post_quant_conv`` (a number or one per latent channel); ``output``: maps the decoder's output to the
    tile's pixels (e.g. ``clamp(0, 1)``). Use :meth:`prepare` once per latent (statistics, pooled keys), then
    :meth:`decode_tiles` for tiles at any positions; :class:`models.decoding.TiledDecoder` does both.
    """

    def __init__(self, vae, input_scale: float | Sequence[float], output: Callable[[Tensor], Tensor], *,
                 near_radius: int = NEAR_RADIUS, near_ramp: int = NEAR_RAMP,
                 stats_crops: tuple[int, int] = STATS_CROPS, sample_interior: int = SAMPLE_INTERIOR,
                 sample_margin: int = SAMPLE_MARGIN, pass_window: tuple[int, int] = PASS_WINDOW,
                 sample_context: int | None = None, exact_tokens: int = EXACT_TOKENS,
                 levels: Callable[[int, int], list[AttentionLevel]] | None = None):
        self.vae = vae
        self.decoder = vae.decoder
        self.latent_channels = int(vae.config.latent_channels)
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.input_scale = input_scale
        self.output = output
        self.near_radius, self.near_ramp = int(near_radius), int(near_ramp)
        self.stats_crops = stats_crops
        self.sample_interior, self.sample_margin = int(sample_interior), int(sample_margin)
        self.pass_window = pass_window
        self.exact_tokens = int(exact_tokens)
        self.levels_for = levels
        mid = self.decoder.mid_block
        attentions = [a for a in (getattr(mid, "attentions", None) or []) if a is not None]
        if len(attentions) > 1:
            raise NotImplementedError("decoders with more than one mid-block attention are not supported")
        self.attention = attentions[0] if attentions else None
        self.slots = _norm_slots(self.decoder)           # (module, attribute) of every GroupNorm, in forward order
        self.wrappers = [SlideGroupNorm(getattr(m, a)) for m, a in self.slots]
        self.prefix = self._prefix_count()                # norms with exact streamed statistics
        in_mid = {id(m) for m in mid.modules()}
        self.mid_norms = sum(1 for m, _ in self.slots if id(m) in in_mid)  # norms of stage A
        self.conv_margin = 1 + 2 * len(mid.resnets)      # conv_in and the mid-block resnets' convolutions
        self.after = 2 * (len(mid.resnets) - 1)          # convolutions after the attention
        # the sample's windows: the convolutions and the exact level (measured: a wider context for the local
        # levels changes its statistics by < 0.1 grey level of the result, and costs 4× the sample's time)
        self.sample_context = self.conv_margin + self.near_radius if sample_context is None else int(sample_context)
        self.processor: HierarchicalAttnProcessor | None = None
        self.canvas: tuple[int, int] | None = None
        self.tile_margin = self.conv_margin
        self.prepared_for: Tensor | None = None
        self.sample_size = 0

    # ------------------------------------------------------------------ structure
    def _prefix_count(self) -> int:
        """Norms run before (and including) the mid-block attention's own norm: the exact passes' norms."""
        if self.attention is None or self.attention.group_norm is None:
            first = self.decoder.mid_block.resnets[0]
            return sum(1 for m, _ in self.slots if m is first)
        for i, (m, a) in enumerate(self.slots):
            if m is self.attention and a == "group_norm":
                return i + 1
        raise RuntimeError("the mid-block attention's GroupNorm was not found among the decoder's norms")

    @contextmanager
    def _installed(self) -> Iterator[None]:
        """The wrappers and the attention processor in place of the decoder's GroupNorms and processor."""
        for (m, a), w in zip(self.slots, self.wrappers):
            setattr(m, a, w)
        old = None
        if self.attention is not None and self.processor is not None:
            old = self.attention.processor
            self.attention.set_processor(self.processor)
        try:
            yield
        finally:
            for (m, a), w in zip(self.slots, self.wrappers):
                setattr(m, a, w.norm)
            if old is not None:
                self.attention.set_processor(old)

    def _param(self) -> Tensor:
        return next(self.vae.parameters())

    def _scaled(self, z: Tensor) -> Tensor:
        p = self._param()
        s = torch.as_tensor(self.input_scale, dtype=torch.float32, device=z.device)
        s = s.reshape(1, -1, 1, 1) if s.dim() == 1 else s
        return (z.float() * s).to(p.device, p.dtype)

    # stage A = conv_in and the mid-block (UNetMidBlock2D.forward: resnet, then attention and resnet pairs)
    def _attention_input(self, z: Tensor) -> Tensor:
        h = self.decoder.conv_in(self.vae.post_quant_conv(z) if self.vae.post_quant_conv is not None else z)
        return self.decoder.mid_block.resnets[0](h, None)

    def _attend(self, h: Tensor) -> Tensor:
        return self.attention(h) if self.attention is not None else h

    def _after_attention(self, h: Tensor) -> Tensor:
        for resnet in self.decoder.mid_block.resnets[1:]:
            h = resnet(h, None)
        return h

    def _stage_a(self, z: Tensor) -> Tensor:
        return self._after_attention(self._attend(self._attention_input(z)))

    @staticmethod
    def _stage_b_layout(h: Tensor) -> Tensor:
        """oneDNN's convolutions run the up-blocks ≈1.5× faster in channels-last layout on the CPU (measured on
        the demo model; the stock decoder gets it by accident, from its attention's reshape)."""
        return h.contiguous(memory_format=torch.channels_last) if h.device.type == "cpu" else h

    def _stage_b(self, h: Tensor) -> Tensor:
        for block in self.decoder.up_blocks:
            h = block(h)
        h = self.decoder.conv_norm_out(h)
        h = self.decoder.conv_act(h)
        return self.decoder.conv_out(h)

    # ------------------------------------------------------------------ checks
    def check_latent(self, latent: Tensor) -> None:
        """ValueError naming the problem unless ``latent`` is a finite [1, C, h, w] float tensor with this
        VAE's channel count."""
        if not isinstance(latent, torch.Tensor):
            raise TypeError(f"latent must be a torch.Tensor, got {type(latent).__name__}")
        if latent.dim() != 4 or latent.shape[0] != 1:
            raise ValueError(f"latent must have shape [1, C, h, w], got {tuple(latent.shape)}")
        if latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent has {latent.shape[1]} channels; this VAE decodes {self.latent_channels}")
        if not latent.is_floating_point():
            raise ValueError(f"latent must be a floating-point tensor, got {latent.dtype}")
        check_finite(latent)

    # ------------------------------------------------------------------ preparation
    def sample_crop_count(self, h: int, w: int) -> int:
        lo, hi = self.stats_crops
        return int(min(hi, max(lo, round(h * w / 4096))))

    def _levels(self, h: int, w: int) -> list[AttentionLevel]:
        if h * w <= self.exact_tokens:
            return [AttentionLevel(1, None, 0)]
        if self.levels_for is not None:
            return self.levels_for(h, w)
        return attention_levels(h, w, self.near_radius, self.near_ramp)

    def prepare_cost(self, h: int, w: int, tile: int) -> int:
        """The preparation's work in decode-tile equivalents (for progress and ETA): the streamed passes ≈ 15 %
        of decoding every latent px once; the sample ≈ its crops' stage-B area plus a fifth of their windows."""
        if h * w <= self.exact_tokens or self._single_crop(h, w):
            return max(1, math.ceil(1.1 * h * w / (tile * tile)))
        s = self.sample_interior + 2 * self.sample_margin
        win = s + 2 * (self.after + self.sample_context)
        n = self.sample_crop_count(h, w)
        return max(1, math.ceil((0.15 * h * w + n * (s * s + 0.2 * win * win)) / (tile * tile)))

    @torch.no_grad()
    def prepare(self, latent: Tensor, cancel: CancelFn | None = None, progress: ProgressFn | None = None) -> None:
        """Statistics of every GroupNorm and the slide-wide pooled attention levels for ``latent`` [1, C, h, w]."""
        self.check_latent(latent)
        z = latent.to(self._param().device)
        h, w = z.shape[2:]
        self.canvas = (h, w)
        levels = self._levels(h, w)
        self.processor = HierarchicalAttnProcessor((h, w), levels)
        # each stage-A window holds the keys of the exact and local levels around its queries
        local = [levels[0]] + self.processor.local_specs
        reach = max(h, w) if any(lv.radius is None for lv in local) else max(lv.radius for lv in local)
        self.tile_margin = self.conv_margin + (reach if self.attention is not None else 0)
        windows = list(self._pass_windows(h, w))
        stored = [lv for lv in levels[1:] if lv.pool > LOCAL_POOL]
        passes = self.prefix + (1 if stored else 0)
        total = passes * len(windows) + 1
        done = 0

        def step() -> None:
            nonlocal done
            done += 1
            check_cancel(cancel)
            if progress is not None:
                progress(done, total)

        if progress is not None:
            progress(0, total)
        with self._installed():
            for wr in self.wrappers:
                wr.mode, wr.stats, wr.region = "native", None, None
            for k in range(self.prefix):
                self._exact_pass(z, k, windows, step)
            if self.attention is not None:
                self.processor.q_mean, self.processor.q_var = self._query_moments()
                if stored:
                    self._stored_levels(z, windows, stored, step)
            self._sample_pass(z)
            step()
            for wr in self.wrappers:
                wr.mode, wr.region = "fixed", None
        self.prepared_for = latent

    def _pass_windows(self, h: int, w: int) -> Iterator[tuple[int, int, int, int]]:
        """Regions (y0, y1, x0, x1) of the streamed passes; multiples of 64 px, so every stored level's blocks
        up to 64² lie within one region."""
        rh, rw = (max(64, r // 64 * 64) for r in self.pass_window)
        for y0 in range(0, h, rh):
            for x0 in range(0, w, rw):
                yield y0, min(h, y0 + rh), x0, min(w, x0 + rw)

    def _window(self, z: Tensor, region: tuple[int, int, int, int], margin: int, align: int = 1):
        """The latent window around ``region`` (its origin a multiple of ``align``, clipped to the canvas) and
        the region inside it."""
        y0, y1, x0, x1 = region
        h, w = z.shape[2:]
        wy0, wx0 = max(0, y0 - margin) // align * align, max(0, x0 - margin) // align * align
        wy1, wx1 = min(h, y1 + margin), min(w, x1 + margin)
        return z[:, :, wy0:wy1, wx0:wx1], (wy0, wx0), (y0 - wy0, y1 - wy0, x0 - wx0, x1 - wx0)

    @staticmethod
    def _boxes(boxes: Sequence[tuple[int, int, int, int]], size: tuple[int, int]) -> Callable[[Tensor], Tensor]:
        """A norm's counted region: each batch element's box (given at the resolution ``size``, scaled to the
        input's), the boxes of equal size stacked [B, C, bh, bw]."""
        def region(x: Tensor) -> Tensor:
            if x.dim() != 4:
                raise ValueError("counted regions need 4-D inputs")
            f = x.shape[2] // size[0]
            return torch.stack([x[i, :, y0 * f:y1 * f, x0 * f:x1 * f] for i, (y0, y1, x0, x1) in enumerate(boxes)])
        return region

    def _exact_pass(self, z: Tensor, k: int, windows, step) -> None:
        """Exact statistics of norm ``k`` (< prefix): the decoder run to it over every window, summing its input
        over the window's own region, with norms 0 … k−1 fixed."""
        norm = self.wrappers[k]
        norm.mode, norm.moments = "collect", GroupMoments.zeros(norm.groups)
        is_attention_norm = self.attention is not None and k == self.prefix - 1
        moments = _ChannelMoments() if is_attention_norm else None
        if moments is not None:
            norm.on_collect = moments.add
        self.processor.mode = "attend"
        for region in windows:
            zw, _, box = self._window(z, region, self.conv_margin)
            norm.region = self._boxes([box], zw.shape[2:])
            try:
                self._stage_a(self._scaled(zw))
            except _Collected:
                pass
            else:
                raise RuntimeError(f"decoder norm {k} was not reached by the mid-block")
            step()
        norm.mode, norm.stats, norm.on_collect, norm.region = "fixed", norm.moments.mean_var(), None, None
        if moments is not None:
            self._channel_moments = moments

    def _stored_levels(self, z: Tensor, windows, specs: Sequence[AttentionLevel], step) -> None:
        """Stream the attention's normalised input once more: the first stored level's pooled keys, values and
        λ from the px, then each coarser level from the one below."""
        attn = self.attention
        proc = self.processor
        p = specs[0].pool
        h, w = z.shape[2:]
        parts: list[PooledLevel] = []
        current: dict[str, Any] = {}

        def on_keys(attn_mod, normed: Tensor) -> None:
            y0, y1, x0, x1 = current["box"]
            tokens = normed[0, :, y0:y1, x0:x1].permute(1, 2, 0)
            keys = _heads(attn_mod.to_k(tokens), attn_mod.heads)
            values = _heads(attn_mod.to_v(tokens), attn_mod.heads)
            parts.append(pool_keys(keys, values, current["origin"], specs[0], proc.q_mean, proc.q_var,
                                   attn_mod.scale))

        proc.mode, proc.on_keys = "maps", on_keys
        try:
            for region in windows:
                zw, _, box = self._window(z, region, self.conv_margin)
                current["box"], current["origin"] = box, (region[0], region[2])
                try:
                    self._stage_a(self._scaled(zw))
                except _Collected:
                    pass
                step()
        finally:
            proc.mode, proc.on_keys = "attend", None
        first = _assemble(parts, specs[0], (h, w))
        levels = [first]
        for spec in specs[1:]:
            levels.append(_coarser(levels[-1], spec, proc.q_mean, proc.q_var, attn.scale))
        proc.stored = levels

    def _query_moments(self) -> tuple[Tensor, Tensor]:
        """Mean query and per-dimension query variance [heads, d] over the slide, from the exact moments of
        the attention's input (queries are affine in it)."""
        attn = self.attention
        mean, cov = self._channel_moments.mean_cov()
        a, b = self.wrappers[self.prefix - 1].folded()  # the attention's GroupNorm as x·a + b
        wq = attn.to_q.weight.detach().double().cpu()
        bq = attn.to_q.bias.detach().double().cpu() if attn.to_q.bias is not None \
            else torch.zeros(wq.shape[0], dtype=torch.float64)
        q_mean = wq @ (a * mean + b) + bq
        m = wq * a[None, :]
        q_var = ((m @ cov) * m).sum(1)
        heads = attn.heads
        dev = self._param().device
        return q_mean.reshape(heads, -1).float().to(dev), q_var.reshape(heads, -1).float().to(dev)

    def _single_crop(self, h: int, w: int) -> bool:
        side = self.sample_interior + 2 * self.sample_margin + 2 * self.after
        return h * w <= self.exact_tokens or h < side or w < side

    def _sample_crops(self, h: int, w: int) -> list[_Crop]:
        """The statistics sample: a lattice of crops over the latent (depends on its size only); a latent of
        at most ``exact_tokens`` px, or too small for a crop, is its own single crop (exact statistics)."""
        if self._single_crop(h, w):
            return [_Crop((0, h, 0, w), (0, 0), (0, h, 0, w))]
        n = self.sample_crop_count(h, w)
        s, m, a = self.sample_interior, self.sample_margin, self.after
        side = s + 2 * m
        ny = max(1, min(h, round(math.sqrt(n * h / w))))
        nx = max(1, min(w, round(n / ny)))
        crops = []
        for i in range(ny):
            for j in range(nx):
                cy, cx = (2 * i + 1) * h // (2 * ny), (2 * j + 1) * w // (2 * nx)
                by = min(max(a, cy - side // 2), h - side - a)  # the stage-B crop, `after` px inside the canvas
                bx = min(max(a, cx - side // 2), w - side - a)
                crops.append(_Crop((by - a, by + side + a, bx - a, bx + side + a), (a, a),
                                   (a + m, a + m + s, a + m, a + m + s)))
        return crops

    def _sample_pass(self, z: Tensor) -> None:
        """Statistics of the norms after the attention, pooled over the sample crops' interiors: each crop's
        attention output in its own window, then one batch through the rest of stage A (norms inside the
        mid-block) and stage B (the rest)."""
        h, w = z.shape[2:]
        crops = self._sample_crops(h, w)
        self.sample_size = len(crops)
        attended = []
        for c in crops:
            y0, y1, x0, x1 = c.region
            zw, origin, box = self._window(z, c.region, self.sample_context, LOCAL_POOL)
            if len(crops) == 1:
                zw, origin, box = z, (0, 0), c.region
            self.processor.origins = [origin]
            self.processor.query_box = box
            try:
                out = self._attend(self._attention_input(self._scaled(zw)))
            finally:
                self.processor.query_box = None
            attended.append(out[:, :, box[0]:box[1], box[2]:box[3]])
        batch = torch.cat(attended)
        ry, rx = batch.shape[2:]
        stage_a, stage_b = self.wrappers[self.prefix:self.mid_norms], self.wrappers[self.mid_norms:]
        for wr in stage_a:
            wr.mode, wr.region = "pooled", self._boxes([c.interior for c in crops], (ry, rx))
        feats = self._after_attention(batch)
        for wr in stage_a:
            wr.mode, wr.region = "fixed", None
        by, bx = crops[0].stage_b
        sb_h, sb_w = ry - 2 * by, rx - 2 * bx
        tiles = feats[:, :, by:by + sb_h, bx:bx + sb_w]
        inner = [(c.interior[0] - by, c.interior[1] - by, c.interior[2] - bx, c.interior[3] - bx) for c in crops]
        for wr in stage_b:
            wr.mode, wr.region = "pooled", self._boxes(inner, (sb_h, sb_w))
        self._stage_b(self._stage_b_layout(tiles))
        for wr in stage_b:
            wr.mode, wr.region = "fixed", None

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode_tiles(self, latent: Tensor, positions: Sequence[tuple[int, int]], tile: int) -> Tensor:
        """Tiles of side ``tile`` (latent px) at ``positions`` (y, x) → [B, out, tile·f, tile·f] pixels.

        Consecutive tiles of one row are decoded from one stage-A window."""
        if self.prepared_for is not latent:
            raise RuntimeError("prepare(latent) must be called for this latent before decode_tiles")
        z = latent.to(self._param().device)
        out = []
        with self._installed():
            for group in _row_runs(positions, tile):
                y = group[0][0]
                x0, x1 = group[0][1], group[-1][1] + tile
                zw, origin, box = self._window(z, (y, y + tile, x0, x1), self.tile_margin, LOCAL_POOL)
                a = self.after
                self.processor.origins = [origin]
                self.processor.query_box = (max(0, box[0] - a), min(zw.shape[2], box[1] + a),
                                            max(0, box[2] - a), min(zw.shape[3], box[3] + a))
                try:
                    feats = self._stage_a(self._scaled(zw))
                finally:
                    self.processor.query_box = None
                tiles = torch.cat([feats[:, :, box[0]:box[1], box[2] + (x - x0):box[2] + (x - x0) + tile]
                                   for _, x in group])
                out.append(self.output(self._stage_b(self._stage_b_layout(tiles)).float()))
        return torch.cat(out) if len(out) > 1 else out[0]


def _row_runs(positions: Sequence[tuple[int, int]], tile: int) -> list[list[tuple[int, int]]]:
    """Split positions into runs of one row whose windows can share one stage-A window (gaps ≤ a tile)."""
    runs: list[list[tuple[int, int]]] = []
    for y, x in positions:
        if runs and runs[-1][-1][0] == y and 0 <= x - runs[-1][-1][1] <= tile:
            runs[-1].append((int(y), int(x)))
        else:
            runs.append([(int(y), int(x))])
    return runs


class _ChannelMoments:
    """Per-channel sums and the channel cross-product matrix of an input (float64), for query moments."""

    def __init__(self) -> None:
        self.n = 0.0
        self.total: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, x: Tensor) -> None:
        c = x.shape[1]
        flat = x.detach().float().transpose(0, 1).reshape(c, -1).double()
        if self.total is None:
            self.total = torch.zeros(c, dtype=torch.float64)
            self.outer = torch.zeros(c, c, dtype=torch.float64)
        self.n += flat.shape[1]
        self.total += flat.sum(1).cpu()
        self.outer += (flat @ flat.T).cpu()

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        mean = self.total / self.n
        return mean, self.outer / self.n - torch.outer(mean, mean)


def _spread_exponent(dk: Tensor, q_mean: Tensor, q_var: Tensor, scale: float) -> Tensor:
    """q̄·Δk·scale + σ²‖Δk‖²·scale²/2 for key deviations Δk [heads, d, h, w] → [heads, h, w]: the log of the
    expected exp(q·Δk·scale) for queries with mean q̄ and per-dimension variance σ² (Gaussian)."""
    lin = torch.einsum("hdyx,hd->hyx", dk, q_mean) * scale
    return lin + 0.5 * torch.einsum("hdyx,hd->hyx", dk * dk, q_var) * scale * scale


def _pool_logmeanexp(e: Tensor, pool: int, count: Tensor) -> Tensor:
    """log of the mean of exp(e) over each pool × pool block's valid px (e [heads, h, w])."""
    h, w = e.shape[-2:]
    hp, wp = count.shape
    padded = F.pad(e, (0, wp * pool - w, 0, hp * pool - h), value=float("-inf"))
    blocks = padded.reshape(e.shape[0], hp, pool, wp, pool).permute(0, 1, 3, 2, 4).reshape(e.shape[0], hp, wp, -1)
    return torch.logsumexp(blocks, -1) - count.log()


def _coarser(fine: PooledLevel, spec: AttentionLevel, q_mean: Tensor, q_var: Tensor, scale: float) -> PooledLevel:
    """The next level from the one below: count-weighted means of 4×4 groups of blocks, and λ combining each
    sub-block's own λ with its mean key's deviation from the coarse mean."""
    f = spec.pool // fine.level.pool
    count = _pool_sum(fine.count, f)
    w = fine.count
    keys = _pool_sum((fine.keys * w[None, :, :, None]).permute(0, 3, 1, 2), f) / count
    values = _pool_sum((fine.values * w[None, :, :, None]).permute(0, 3, 1, 2), f) / count
    hp, wp = fine.count.shape
    up = keys.repeat_interleave(f, 2).repeat_interleave(f, 3)[:, :, :hp, :wp]
    dk = fine.keys.permute(0, 3, 1, 2) - up
    e = _spread_exponent(dk, q_mean, q_var, scale) + fine.correction + w.clamp_min(1e-30).log()[None]
    e = torch.where(w[None] > 0, e, torch.full_like(e, float("-inf")))
    corr = _pool_logmeanexp(e, f, torch.ones_like(count)) - count.log()
    return PooledLevel(spec, keys.permute(0, 2, 3, 1).contiguous(), values.permute(0, 2, 3, 1).contiguous(),
                       corr, count, fine.origin, fine.limit)


def _assemble(parts: Sequence[PooledLevel], spec: AttentionLevel, canvas: tuple[int, int]) -> PooledLevel:
    """One slide-wide level from the levels of the pass windows (each window a whole number of blocks)."""
    p = spec.pool
    hp, wp = -(-canvas[0] // p), -(-canvas[1] // p)
    first = parts[0]
    nh, d = first.keys.shape[0], first.keys.shape[-1]
    dev = first.keys.device
    keys = torch.zeros(nh, hp, wp, d, device=dev)
    values = torch.zeros(nh, hp, wp, d, device=dev)
    corr = torch.zeros(nh, hp, wp, device=dev)
    count = torch.zeros(hp, wp, device=dev)
    for part in parts:
        by, bx = part.origin[0] // p, part.origin[1] // p
        ny, nx = part.count.shape
        keys[:, by:by + ny, bx:bx + nx] = part.keys
        values[:, by:by + ny, bx:bx + nx] = part.values
        corr[:, by:by + ny, bx:bx + nx] = part.correction
        count[by:by + ny, bx:bx + nx] = part.count
    return PooledLevel(spec, keys, values, corr, count, (0, 0), canvas)


def _norm_slots(decoder: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every GroupNorm the decoder calls, in the order its forward calls them."""
    found: dict[int, tuple[nn.Module, str]] = {}
    for parent in decoder.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm):
                found[id(child)] = (parent, name)
    order: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: order.append(id(mod)))
             for m in decoder.modules() if isinstance(m, nn.GroupNorm)]
    try:
        channels = decoder.conv_in.in_channels
        p = next(decoder.parameters())
        with torch.no_grad():
            decoder(torch.zeros(1, channels, 4, 4, device=p.device, dtype=p.dtype))
    finally:
        for hk in hooks:
            hk.remove()
    seen, slots = set(), []
    for i in order:
        if i not in seen and i in found:
            seen.add(i)
            slots.append(found[i])
    if len(slots) != len(found):
        raise RuntimeError(f"{len(found) - len(slots)} of the decoder's GroupNorms were never called")
    return slots
