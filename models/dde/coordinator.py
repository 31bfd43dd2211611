"""The DDE coordinator (Lifar, Savkin et al., "Diffusion Domain Expansion"): a small transformer over the
outputs of all overlapping windows of one denoising step, trained while the patch model stays frozen.

What it computes: a *correction* per window, added to that window's patch output before the per-pixel average
over overlapping windows (MultiDiffusion). The output projection is zero-initialised, so an untrained
coordinator returns exactly 0 and the combined result is exactly averaging (reference §4, P2 "residual
parametrisation"; the paper's code instead starts from c_skip·x, see reference §2.5).

Tokens: each window's patch output, its noisy input and its condition crop are cut into ``token``×``token`` px
cells and embedded (the three embeddings are summed into one token per cell). Every token carries the canvas
position of its cell, origin + offset inside the window, in token units: tokens of two windows covering the same
canvas pixel get the same position (the paper's "positions in the large image"; the paper's code tiled
positions by window instead, reference §2.2).

Attention is windowed over the *canvas*: a token attends to the tokens of every window whose canvas position
falls in the same ``attn_window``×``attn_window`` px square of a grid anchored at canvas (0, 0); odd blocks shift
the grid by half a square (Swin-style) so information crosses square borders. A square holds at most
(attn_window/token)² × (windows covering a pixel) tokens, so the cost is linear in canvas area. Positions enter
attention only through 2-D rotary embeddings (first half of each head's channels rotated by the row, second half
by the column), so translating the whole canvas by a multiple of ``attn_window`` changes nothing.

Noise level: adaLN-Zero modulation (DiT) from a sinusoidal embedding of the DDPM timestep (``noise_input =
"timestep"``) or of ln σ (``"sigma"``, EDM; the noisy input is then scaled by c_in = 1/√(σ² + σ_data²) and the correction by
c_out = σ·σ_data/√(σ² + σ_data²), Karras et al.'s preconditioning).

Disagreement units (``scale="disagreement"``; off in the first shipped coordinators, whose cards load
unchanged): each window's deviation from the overlap average, divided by the RMS deviation over its canvas, is
a further embedded input, and the correction is returned in units of that RMS instead of c_out
(:func:`window_deviations`: the exact correction's size follows that unit at every noise level, while c_out misses
it by an order of magnitude). On the Gaussian oracle it is what makes a coordinator learn at all (README, DDE
coordinator).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.patching import BLENDS, BlendAccumulator

__all__ = ["CoordinatorConfig", "DDECoordinator", "canvas_token_positions", "attention_groups", "window_deviations",
           "ATTN_GRIDS", "ATTENTIONS", "step_grid_offset", "neighbourhood_groups"]

MAX_TOKENS = 1 << 20
# a neighbourhood pass over canvases of at most this many tokens each, laid out alike, attends densely with a mask
# instead of gathering every block's keys: the same attention (each query's key set is unchanged) in about as
# many multiply-adds (T² against T·(keys per query) ≈ T·800), without the gathered keys' copies and their
# gradients. Measured (CPU, forward + backward, hidden 64): 0.34 against 0.50 s at T = 1,024 (2 × 2-cell blocks),
# 0.28 against 1.17 s (per-token blocks); about even at T ≈ 2,000 (2 × 2) to 3,000 (per token)
DENSE_MAX_TOKENS = 2048

NoiseInput = Literal["timestep", "sigma"]
CondKind = Literal["none", "labels", "channels"]
Scale = Literal["none", "disagreement"]
ATTN_GRIDS = ("fixed", "moving")
ATTENTIONS = ("squares", "neighbourhood")
SCALES = get_args(Scale)


@dataclass
class CoordinatorConfig:
    """Architecture of a coordinator (stored in its card as ``architecture``)."""

    channels: int = 4  # C of the patch outputs and noisy inputs
    patch: int = 64  # window side P (px of the canvas the patch model runs on)
    stride: int = 32  # window stride s of the plans it is trained for
    token: int = 4  # token cell side (px)
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    attn_window: int = 32  # side of the canvas squares attention is restricted to (px)
    cond: CondKind = "none"
    cond_channels: int = 0  # classes (``labels``: class ids → one-hot) or channels (``channels``)
    noise_input: NoiseInput = "timestep"
    sigma_data: float = 0.5  # EDM σ_data (``noise_input="sigma"``)
    rope_base: float = 10000.0
    # "disagreement": the windows' deviations from their uniform overlap average, divided by their RMS over the
    # canvas, are an input, and the correction is scaled back by that RMS (see :func:`window_deviations`);
    # "none": the first shipped coordinators
    scale: Scale = "none"
    # the overlap weights its corrected windows are averaged with: "uniform" (the paper's: an untrained
    # coordinator is MultiDiffusion) or "mixture" (Gaussian, Mixture of Diffusers': it starts from that)
    blend: str = "uniform"
    # where the attention squares lie: "fixed" (anchored at canvas (0, 0): the first coordinators) or "moving"
    # (shifted by a whole number of tokens, at random per training canvas and by a low-discrepancy sequence per
    # sampling step): a square's border, where a token sees context on one side only, then lies at another
    # place every step instead of leaving a seam at the same canvas line
    attn_grid: str = "fixed"
    # which tokens a token attends to: "squares" (those in its square of the grid above, every other block shifted
    # by half a square: the first coordinators) or "neighbourhood" (those in the attn_window square centred on its
    # block of attn_window/4: every token sees ≥ 3/8 attn_window of context on all sides, so no square border is a
    # line where tokens see one side only; the same keys per query as squares of attn_window)
    attention: str = "squares"
    # neighbourhood queries are grouped in blocks of attn_block × attn_block cells, each block attending to the
    # attn_window square around it; 0: attn_window/(4·token) cells (2 at the defaults). Block borders are lines
    # where the key set jumps by a block; 1 = every token its own neighbourhood (smoothest, most gathering)
    attn_block: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        positive = ("channels", "patch", "stride", "token", "hidden", "depth", "heads", "attn_window")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.patch % self.token or self.stride % self.token:
            raise ValueError(f"token {self.token} must divide patch {self.patch} and stride {self.stride}")
        if self.attn_window % (2 * self.token):
            raise ValueError(f"attn_window {self.attn_window} must be a multiple of 2·token = {2 * self.token}")
        head_dim, rem = divmod(self.hidden, self.heads)
        if rem or head_dim % 4:
            raise ValueError(f"hidden {self.hidden} must be heads {self.heads} × a multiple of 4 (2-D RoPE pairs)")
        if self.cond not in ("none", "labels", "channels"):
            raise ValueError(f"cond must be none, labels or channels, got {self.cond!r}")
        if self.cond != "none" and self.cond_channels <= 0:
            raise ValueError(f"cond_channels must be > 0 with cond={self.cond!r}")
        check_choices(self)
        if self.noise_input not in ("timestep", "sigma"):
            raise ValueError(f"noise_input must be timestep or sigma, got {self.noise_input!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CoordinatorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown coordinator architecture fields: {unknown}")
        cfg = cls(**data)
        cfg.validate()
        return cfg


def check_choices(settings: Any) -> None:
    """Raise ``ValueError`` naming the first inconsistent choice among ``settings``' scale, blend, attn_grid,
    attention and attn_block (with its attn_window and token): a :class:`CoordinatorConfig` or a training run's
    settings, which carry the same fields."""
    for name, allowed in (("scale", SCALES), ("blend", BLENDS), ("attn_grid", ATTN_GRIDS), ("attention", ATTENTIONS)):
        value = getattr(settings, name)
        if value not in allowed:
            raise ValueError(f"{name} must be {' or '.join(allowed)}, got {value!r}")
    cells = settings.attn_window // settings.token
    if not 0 <= int(settings.attn_block) <= cells:
        raise ValueError(f"attn_block must be 0 (auto) … attn_window/token = {cells} cells, got {settings.attn_block}")
    if settings.attention == "neighbourhood" and settings.attn_grid != "fixed":
        raise ValueError("attn_grid must be fixed with attention neighbourhood (a neighbourhood has no grid to move)")


# ------------------------------------------------------------------------------------------ positions
_R2 = (0.7548776662466927, 0.5698402909980532)  # 1/g, 1/g², g the plastic number: Roberts' R2 sequence


def step_grid_offset(config: CoordinatorConfig, step: int) -> Tensor:
    """(2,) float64 (y, x) offset in tokens of the attention grid at sampling step ``step``: zeros for a
    ``fixed`` grid; for a ``moving`` one the R2 low-discrepancy sequence scaled to the square, so consecutive
    steps put the square borders far apart and every offset comes round equally often."""
    if config.attn_grid == "fixed":
        return torch.zeros(2, dtype=torch.float64)
    side = config.attn_window // config.token
    return torch.tensor([math.floor(((0.5 + int(step) * a) % 1.0) * side) for a in _R2], dtype=torch.float64)


def canvas_token_positions(origins: Tensor, patch: int, token: int) -> Tensor:
    """(N·T, 2) float64 canvas positions in token units of every token (origin/token + offset in the window),
    windows in order, tokens row-major in each.

    ``origins``: (N, 2) canvas (y, x) in px of each window. Origins need not be multiples of ``token`` (plans
    clamp their last window inward): positions are then fractional, still equal for tokens at the same pixel.
    """
    if origins.ndim != 2 or origins.shape[1] != 2:
        raise ValueError(f"origins must be (N, 2) canvas (y, x), got shape {tuple(origins.shape)}")
    if origins.dtype.is_floating_point:
        raise ValueError(f"origins must be integer canvas pixels, got {origins.dtype}")
    side = patch // token
    offs = torch.arange(side, device=origins.device, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(offs, offs, indexing="ij"), dim=-1).reshape(-1, 2)  # (T, 2)
    return (origins.double()[:, None, :] / token + grid[None]).reshape(-1, 2)


def window_deviations(outputs: Tensor, origins: Tensor, canvas: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """How much overlapping windows disagree: ``(dev, scale)``.

    ``dev`` (N, C, P, P): each window's output minus the uniform average of all windows at its pixels (what
    MultiDiffusion keeps); ``scale`` (N,): the RMS of ``dev`` over all windows of the window's canvas (``canvas``
    (N,) canvas index, default one canvas), floored at 1e-6 × the outputs' RMS so a canvas of one window (no
    overlap) gives a finite scale. Linear in the outputs: scaling them scales both.

    Why it is the coordinator's natural unit (measured on the Gaussian oracle, B = 16, stride 4): the exact
    correction's RMS is 0.65–0.78 × this scale at every σ from 0.005 to 5 (and 1–2 × above), while the EDM output
    scale c_out tracks it only within 0.04–0.26 — a network whose output is in units of ``scale`` learns one
    map for all noise levels instead of one whose size spans orders of magnitude."""
    n, c, p, _ = outputs.shape
    canvas = torch.zeros(n, dtype=torch.long, device=outputs.device) if canvas is None else canvas.long()
    dtype = torch.float64 if outputs.dtype == torch.float64 else torch.float32
    outs = outputs.to(dtype)
    dev = torch.empty_like(outs)
    scale = outs.new_empty(n)
    ones = outs.new_ones(p, p)
    # window by window in a fixed order (BlendAccumulator): the same bits on every device and batching, which
    # resumed and repeated jobs need (a scatter-add on the GPU sums in a racy order)
    for k in torch.unique(canvas).tolist():
        idx = torch.nonzero(canvas == k).flatten()
        org = origins[idx].long().tolist()
        h, w = max(y for y, _ in org) + p, max(x for _, x in org) + p
        acc = BlendAccumulator(c, (h, w), dtype=dtype, device=outputs.device)
        acc.add(outs[idx], org, ones)
        mean = acc.num / acc.den.clamp_min(1)
        d = outs[idx] - torch.stack([mean[:, y:y + p, x:x + p] for y, x in org])
        dev[idx] = d
        rms = d.pow(2).mean().sqrt()
        scale[idx] = torch.maximum(rms, 1e-6 * outs[idx].pow(2).mean().sqrt()).clamp_min(1e-30)
    return dev.to(outputs.dtype), scale.to(outputs.dtype)


@dataclass
class AttentionGroups:
    """Tokens grouped for attention: ``index`` (G, L) the queries of each group, token indices (padding → the
    extra index ``num_tokens``), ``valid`` (G, L) bool; ``keys`` / ``keys_valid`` (G, Lk) the tokens they attend
    to, when these are not the queries themselves (neighbourhoods; None for squares)."""

    index: Tensor
    valid: Tensor
    keys: Tensor | None = None
    keys_valid: Tensor | None = None


def _pack(group: Tensor, groups: int, num_tokens: int, members: Tensor) -> tuple[Tensor, Tensor]:
    """(G, L) index of ``members`` by ``group`` (in the order given within a group), padding → ``num_tokens``."""
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=group.device) - starts[group[order]]
    index = torch.full((groups, int(counts.max())), num_tokens, dtype=torch.long, device=group.device)
    index[group[order], rank] = members[order]
    return index, index < num_tokens


def attention_groups(pos: Tensor, canvas: Tensor, window_tokens: int, shift: int) -> AttentionGroups:
    """Group tokens whose positions fall in the same ``window_tokens``-square of the grid shifted by ``shift``
    tokens (and belong to the same canvas). Deterministic: groups and members in ascending key / token order."""
    sq = torch.floor((pos + shift) / window_tokens).long()
    key = torch.stack((canvas.long(), sq[:, 0], sq[:, 1]), dim=1)
    _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    n = pos.shape[0]
    index, valid = _pack(inverse, int(counts.numel()), n, torch.arange(n, device=pos.device))
    return AttentionGroups(index=index, valid=valid)


def _within_radius(first: Tensor, cell: Tensor, block: int, radius: int) -> Tensor:
    """Whether ``cell`` (..., 2) lies within ``radius`` cells of the block of cells [first, first + block − 1]
    (..., 2) along both axes: the neighbourhood relation, for the gathered and the dense path alike."""
    gap = (first - cell).clamp_min(0) + (cell - (first + block - 1)).clamp_min(0)
    return (gap <= radius).all(-1)


def neighbourhood_groups(pos: Tensor, canvas: Tensor, radius: int, block: int = 1) -> AttentionGroups:
    """Neighbourhood attention by blocks: the tokens of one ``block``×``block``-cell block of the canvas (cells:
    the floor of the positions; a cell holds the tokens of every window overlapping there) are one group of
    queries, attending to every token of the same canvas whose cell is at most ``radius`` cells outside the block
    along each axis. ``block=1``: each token's own neighbourhood; a larger block shares one gather of keys among
    more queries (cheaper), every query still seeing ≥ ``radius`` cells of context on all sides. Deterministic:
    groups in ascending (canvas, block row, block column), queries and keys in ascending token order."""
    n = pos.shape[0]
    cell = torch.floor(pos).long()
    blk = torch.div(cell, block, rounding_mode="floor")
    canvas = canvas.long()
    key = torch.stack((canvas, blk[:, 0], blk[:, 1]), dim=1)
    uniq, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    g = int(counts.numel())
    tokens = torch.arange(n, device=pos.device)
    index, valid = _pack(inverse, g, n, tokens)
    # a key token joins every block within radius of its cell: blocks floor((cell - radius)/block) … floor((cell +
    # radius)/block) along each axis; a mixed-radix code of (canvas, row, column) sorts as torch.unique's rows do
    reach = -(-radius // block)
    lo = blk.min(0).values - reach
    span = blk.max(0).values + reach - lo + 1

    def code(c: Tensor, y: Tensor, x: Tensor) -> Tensor:
        return (c * span[0] + (y - lo[0])) * span[1] + (x - lo[1])

    ucode = code(uniq[:, 0], uniq[:, 1], uniq[:, 2])
    d = torch.arange(-reach, reach + 1, device=pos.device)
    dy, dx = (t.reshape(-1) for t in torch.meshgrid(d, d, indexing="ij"))
    cand = blk[:, None, :] + torch.stack((dy, dx), dim=1)  # (n, K, 2) candidate blocks, token-major
    near = _within_radius(cand * block, cell[:, None, :], block, radius)
    want = code(canvas[:, None], cand[..., 0], cand[..., 1]).reshape(-1)
    hit_group = torch.searchsorted(ucode, want).clamp_max(g - 1)
    hit = (ucode[hit_group] == want) & near.reshape(-1)
    keys, keys_valid = _pack(hit_group[hit], g, n, tokens.repeat_interleave(dy.numel())[hit])
    return AttentionGroups(index=index, valid=valid, keys=keys, keys_valid=keys_valid)


@dataclass
class DenseNeighbourhood:
    """Neighbourhood attention without gathers: ``canvases`` canvases of T tokens each, contiguous and laid out
    alike (the same windows in the same order), and ``mask`` (T, T) bool, query × key: the key's cell is within the
    query block's neighbourhood (exactly :func:`neighbourhood_groups`' relation)."""

    mask: Tensor
    canvases: int


def dense_neighbourhood(pos: Tensor, canvases: int, radius: int, block: int = 1) -> DenseNeighbourhood:
    """:class:`DenseNeighbourhood` of ``canvases`` canvases whose T tokens each sit at ``pos`` (T, 2) (one canvas's
    positions; every canvas alike)."""
    cell = torch.floor(pos).long()
    first = torch.div(cell, block, rounding_mode="floor") * block  # (T, 2) the first cell of each query's block
    return DenseNeighbourhood(mask=_within_radius(first[:, None, :], cell[None, :, :], block, radius),
                              canvases=int(canvases))


def rope_tables(pos: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (N, head_dim/2) for 2-D RoPE: the first head_dim/4 pairs rotate by the row, the rest by the
    column. Angles in float64 so large canvas positions keep their precision."""
    quarter = head_dim // 4
    inv = base ** (-torch.arange(quarter, dtype=torch.float64, device=pos.device) / quarter)
    ang = torch.cat((pos[:, :1].double() * inv, pos[:, 1:].double() * inv), dim=1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of ``x`` (..., head_dim) by the tables (..., head_dim/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


# ------------------------------------------------------------------------------------------ layers
def timestep_embedding(v: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=v.device) / half)
    args = v.float()[:, None] * freqs[None]
    return torch.cat((args.cos(), args.sin()), dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class WindowAttention(nn.Module):
    """Multi-head self-attention within canvas squares, with 2-D RoPE on queries and keys."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, groups: AttentionGroups | DenseNeighbourhood, cos: Tensor, sin: Tensor) -> Tensor:
        n, d = x.shape
        h = self.heads
        qkv = self.qkv(x).reshape(n, 3, h, d // h)
        q, k, v = qkv.unbind(1)
        q = apply_rope(q, cos[:, None], sin[:, None])
        k = apply_rope(k, cos[:, None], sin[:, None])
        if isinstance(groups, DenseNeighbourhood):
            s = groups.canvases
            q, k, v = (t.reshape(s, n // s, h, d // h).transpose(1, 2) for t in (q, k, v))  # (S, h, T, dh)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=groups.mask)
            return self.proj(out.transpose(1, 2).reshape(n, d))
        pad = x.new_zeros(1, h, d // h)
        keys = groups.index if groups.keys is None else groups.keys
        keys_valid = groups.valid if groups.keys_valid is None else groups.keys_valid
        q = torch.cat((q, pad))[groups.index].transpose(1, 2)  # (G, h, L, dh)
        k, v = (torch.cat((t, pad))[keys].transpose(1, 2) for t in (k, v))  # (G, h, Lk, dh)
        mask = keys_valid[:, None, None, :]  # keys: padding excluded
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (G, h, L, dh)
        out = out.transpose(1, 2).reshape(-1, d)
        flat = groups.index.reshape(-1)
        keep = groups.valid.reshape(-1)
        res = x.new_empty(n, d)
        res[flat[keep]] = out[keep]
        return self.proj(res)


class CoordinatorBlock(nn.Module):
    """DiT block with adaLN-Zero: gates start at 0, so each block starts as the identity."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = WindowAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor, groups: AttentionGroups, cos: Tensor, sin: Tensor) -> Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1 * self.attn(modulate(self.norm1(x), s1, sc1), groups, cos, sin)
        return x + g2 * self.mlp(modulate(self.norm2(x), s2, sc2))


def _alike_canvases(origins: Tensor, canvas: Tensor, per: int) -> int:
    """S when the windows are S canvases of ≤ :data:`DENSE_MAX_TOKENS` tokens each, canvas-major, every canvas
    with the same origins in the same order (a training batch, the oracle's sampled canvases); else 0."""
    n = canvas.numel()
    s = int(canvas[-1]) + 1 if n else 0
    if not n or n % s or (n // s) * per > DENSE_MAX_TOKENS:
        return 0
    nw = n // s
    if not torch.equal(canvas, torch.arange(s, device=canvas.device).repeat_interleave(nw)):
        return 0
    o = origins.reshape(s, nw, -1)
    return s if bool((o == o[:1]).all()) else 0


# ------------------------------------------------------------------------------------------ the network
class DDECoordinator(nn.Module):
    """``correction(outputs, noisy, origins, cond, t) → (N, C, P, P)``: added to each window's patch output
    before averaging over overlaps. Zero at initialisation (exactly averaging)."""

    batches_canvases = True  # correction(..., canvas=) takes windows of several canvases (PatchCoordinator)

    @property
    def moves_grid(self) -> bool:
        """Whether :meth:`correction` wants the attention grid's offset (``grid=``, :meth:`grid_for_step`)."""
        return self.config.attn_grid == "moving"

    def grid_for_step(self, step: int) -> Tensor:
        """The attention grid's offset (tokens) at sampling step ``step`` (:func:`step_grid_offset`)."""
        return step_grid_offset(self.config, step)

    def __init__(self, config: CoordinatorConfig):
        super().__init__()
        config.validate()
        self.config = config
        c, d, k = config.channels, config.hidden, config.token
        self.patch, self.stride = config.patch, config.stride
        self.embed_out = nn.Conv2d(c, d, k, stride=k)
        self.embed_noisy = nn.Conv2d(c, d, k, stride=k)
        self.embed_cond = nn.Conv2d(config.cond_channels, d, k, stride=k) if config.cond != "none" else None
        self.embed_dev = nn.Conv2d(c, d, k, stride=k) if config.scale == "disagreement" else None
        self.noise_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(CoordinatorBlock(d, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, k * k * c)
        for m in (self.ada_out[1], self.out):  # zero output ⇒ correction exactly 0 at init
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        # tokens per pass before a canvas is corrected in bands (not architecture: no effect on the weights);
        # 2^20 tokens ≈ 16k² px slides at P = 64 latent px, stride 32
        self.max_tokens: int = MAX_TOKENS

    # ---------------------------------------------------------------- inputs
    def _cond_channels(self, cond: Tensor, n: int) -> Tensor:
        cfg = self.config
        p = cfg.patch
        if cond.shape[0] != n or cond.ndim != 4:
            raise ValueError(f"cond must be (N={n}, Cc, H, W), got shape {tuple(cond.shape)}")
        if cfg.cond == "labels":
            if cond.shape[1] != 1 or cond.dtype.is_floating_point:
                raise ValueError(f"cond must be integer class ids (N, 1, H, W), got {cond.dtype} {tuple(cond.shape)}")
            ids = cond[:, 0].long()
            if bool(((ids < 0) | (ids >= cfg.cond_channels)).any()):
                raise ValueError(f"cond class ids must be in 0…{cfg.cond_channels - 1}")
            x = F.one_hot(ids, cfg.cond_channels).permute(0, 3, 1, 2).float()
        else:
            if cond.shape[1] != cfg.cond_channels:
                raise ValueError(f"cond must have {cfg.cond_channels} channels, got {cond.shape[1]}")
            x = cond.float()
        h, w = x.shape[-2:]
        if h != w or h % p:
            raise ValueError(f"cond crops must be square multiples of the patch {p}, got {h}×{w}")
        if h != p:  # label masks at a finer resolution: class fractions per patch pixel
            x = F.avg_pool2d(x, h // p)
        return x

    def _noise_value(self, t: Tensor) -> Tensor:
        if self.config.noise_input == "sigma":
            return 250.0 * torch.log(t.float().clamp_min(1e-12))  # ¼·ln σ on the DDPM-like 0…1000 scale
        return t.float()

    # ---------------------------------------------------------------- bands
    @property
    def neighbourhood(self) -> tuple[int, int]:
        """``attention="neighbourhood"``: (block, radius) in cells: queries in blocks of ``attn_block`` cells
        (default attn_window/4) attend to the ≈ attn_window square around their block (as many keys per query as
        squares; ≥ (attn_window − block)/2 of context on every side)."""
        wt = self.config.attn_window // self.config.token
        block = int(self.config.attn_block) or max(1, wt // 4)
        return block, (wt - block) // 2

    @property
    def band_tokens(self) -> int:
        """Tokens per band pass: :attr:`max_tokens`, divided for neighbourhoods by how many times each token is
        gathered as a key ((block + 2·radius)² / block², 16 at the defaults), so a pass's attention inputs stay
        within what a squares pass of :attr:`max_tokens` tokens holds."""
        if self.config.attention != "neighbourhood" or not self.max_tokens:
            return self.max_tokens
        block, radius = self.neighbourhood
        return max(1, self.max_tokens * block * block // (block + 2 * radius) ** 2)

    @property
    def reach_px(self) -> int:
        """How far (canvas px) information travels between tokens in one forward pass: each block mixes tokens of
        one ``attn_window`` square only (or of a neighbourhood: < block + radius cells apart), so after
        ``depth`` blocks a token depends on tokens < depth·attn_window px away and on nothing beyond."""
        if self.config.attention == "neighbourhood":
            return self.config.depth * sum(self.neighbourhood) * self.config.token
        return self.config.depth * self.config.attn_window

    def bands(self, origins: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Split one canvas's windows into bands of window rows for :meth:`correction`: ``(own, context)`` index
        tensors per band. A band's windows (``own``) get exact corrections from a pass over ``context``: every
        window whose origin row is within patch + :attr:`reach_px` of a row of the band (a window further away
        has no token within reach of the band's tokens, so leaving it out changes nothing the band keeps).
        Bands are the largest whose context holds ≤ :attr:`band_tokens` tokens (at least one window row each); a
        pure function of the origins, so a canvas always splits the same way."""
        per = (self.config.patch // self.config.token) ** 2
        rows = origins[:, 0].long()
        values, counts = torch.unique(rows, sorted=True, return_counts=True)
        values, counts = values.tolist(), counts.tolist()
        cum = [0]
        for c in counts:
            cum.append(cum[-1] + c)

        def windows_between(lo: int, hi: int) -> int:  # windows with lo < row < hi
            return cum[bisect.bisect_left(values, hi)] - cum[bisect.bisect_right(values, lo)]

        halo = self.config.patch + self.reach_px
        out, i = [], 0
        while i < len(values):
            j = i
            while j + 1 < len(values) and \
                    per * windows_between(values[i] - halo, values[j + 1] + halo) <= self.band_tokens:
                j += 1
            own = torch.nonzero((rows >= values[i]) & (rows <= values[j])).flatten()
            context = torch.nonzero((rows > values[i] - halo) & (rows < values[j] + halo)).flatten()
            out.append((own, context))
            i = j + 1
        return out

    # ---------------------------------------------------------------- forward
    def correction(self, outputs: Tensor, noisy: Tensor, origins: Tensor, cond: Tensor | None, t: Tensor, *,
                   canvas: Tensor | None = None, deviations: tuple[Tensor, Tensor] | None = None,
                   grid: Tensor | None = None) -> Tensor:
        """Per-window corrections (N, C, P, P).

        ``outputs`` / ``noisy``: (N, C, P, P) patch outputs and their noisy inputs; ``origins``: (N, 2) canvas
        (y, x) of each window; ``cond``: (N, Cc, P·r, P·r) condition crops or None;
        ``t``: (N,) timestep or σ; ``canvas``: (N,) index of the canvas each window belongs to (training batches
        of several canvases; default all one canvas); ``deviations``: :func:`window_deviations` of these
        outputs, origins and canvases when the caller has them already (the training loss weights by them too);
        ``grid``: the attention grid's (y, x) offset in tokens, (2,) for all windows or (S, 2) per canvas index
        (default none: the grid anchored at canvas (0, 0)); it moves the squares only, not the positions RoPE sees.

        One canvas of more than :attr:`band_tokens` tokens is corrected band by band (:meth:`bands`), so the
        memory of a pass is bounded whatever the slide's size; the result equals the one-pass result up to
        float rounding (the bands' passes have other batch shapes).
        """
        n = outputs.shape[0]
        per = (self.config.patch // self.config.token) ** 2
        dev = scale = None
        if self.config.scale == "disagreement" and n:  # over the whole canvas, before any band split
            if origins.ndim != 2 or origins.shape != (n, 2):
                raise ValueError(f"origins must be (N={n}, 2) canvas (y, x), got shape {tuple(origins.shape)}")
            dev, scale = deviations if deviations is not None else \
                window_deviations(outputs, origins.to(outputs.device), canvas)
        if canvas is None and self.max_tokens and n * per > self.band_tokens and origins.ndim == 2 and n:
            bands = self.bands(origins)
            if len(bands) > 1:
                out = torch.empty_like(outputs)
                for own, context in bands:
                    y = self._correction(outputs[context], noisy[context], origins[context],
                                         None if cond is None else cond[context], t[context],
                                         dev=None if dev is None else dev[context],
                                         dev_scale=None if scale is None else scale[context], grid=grid)
                    keep = torch.searchsorted(context, own)      # own ⊂ context, both ascending
                    out[own] = y[keep]
                return out
        return self._correction(outputs, noisy, origins, cond, t, canvas=canvas, dev=dev, dev_scale=scale, grid=grid)

    def _correction(self, outputs: Tensor, noisy: Tensor, origins: Tensor, cond: Tensor | None, t: Tensor, *,
                    canvas: Tensor | None = None, dev: Tensor | None = None, dev_scale: Tensor | None = None,
                    grid: Tensor | None = None) -> Tensor:
        cfg = self.config
        n, c, p = outputs.shape[0], cfg.channels, cfg.patch
        if outputs.shape != (n, c, p, p) or noisy.shape != outputs.shape:
            raise ValueError(f"outputs and noisy must be (N, {c}, {p}, {p}), got {tuple(outputs.shape)} and "
                             f"{tuple(noisy.shape)}")
        if t.shape != (n,):
            raise ValueError(f"t must be (N={n},), got {tuple(t.shape)}")
        if (cond is None) != (cfg.cond == "none"):
            raise ValueError("cond is required" if cond is None else "this coordinator takes no cond")
        dtype = self.out.weight.dtype
        x_in = noisy.to(dtype)
        if cfg.noise_input == "sigma":
            x_in = x_in / torch.sqrt(t.to(dtype) ** 2 + cfg.sigma_data ** 2)[:, None, None, None]
        tok = self.embed_out(outputs.to(dtype)) + self.embed_noisy(x_in)
        if self.embed_cond is not None:
            tok = tok + self.embed_cond(self._cond_channels(cond, n).to(dtype))
        if self.embed_dev is not None:
            tok = tok + self.embed_dev((dev / dev_scale[:, None, None, None]).to(dtype))
        side = p // cfg.token
        per = side * side
        x = tok.flatten(2).transpose(1, 2).reshape(n * per, cfg.hidden)

        pos = canvas_token_positions(origins.to(outputs.device), p, cfg.token)
        canvas = torch.zeros(n, dtype=torch.long, device=outputs.device) if canvas is None else canvas.long()
        canvas_tok = canvas.to(outputs.device).repeat_interleave(per)
        wt = cfg.attn_window // cfg.token
        square_pos = pos
        if grid is not None:
            off = grid.to(device=pos.device, dtype=torch.float64)
            square_pos = pos + (off if off.ndim == 1 else off[canvas_tok])
        if cfg.attention == "neighbourhood":
            block, radius = self.neighbourhood
            alike = _alike_canvases(origins, canvas, per)
            if alike:
                groups = [dense_neighbourhood(pos[:n // alike * per], alike, radius, block)] * 2
            else:
                groups = [neighbourhood_groups(pos, canvas_tok, radius, block)] * 2
        else:
            groups = [attention_groups(square_pos, canvas_tok, wt, 0),
                      attention_groups(square_pos, canvas_tok, wt, wt // 2)]
        cos, sin = rope_tables(pos, cfg.hidden // cfg.heads, cfg.rope_base, dtype)

        emb = self.noise_mlp(timestep_embedding(self._noise_value(t), cfg.hidden).to(dtype))
        c_tok = emb.repeat_interleave(per, dim=0)
        for i, block in enumerate(self.blocks):
            x = block(x, c_tok, groups[i % 2], cos, sin)
        shift, scale = self.ada_out(c_tok).chunk(2, dim=1)
        y = self.out(modulate(self.norm_out(x), shift, scale))  # (N·T, k·k·C)
        k = cfg.token
        y = y.reshape(n, side, side, k, k, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, p, p)
        if dev_scale is not None:  # in units of the windows' disagreement (replaces c_out)
            y = y * dev_scale.to(dtype)[:, None, None, None]
        elif cfg.noise_input == "sigma":  # EDM c_out: unit-scale network output whatever σ (D's error shrinks with σ)
            sig = t.to(dtype)
            y = y * (sig * cfg.sigma_data / torch.sqrt(sig ** 2 + cfg.sigma_data ** 2))[:, None, None, None]
        return y.to(outputs.dtype)

    forward = correction

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
