"""Random-patch large-canvas sampler of DiffInfinite (paper §4.1, §4.3, Algorithm 2), batched.

Two modes, selectable per job:

``"random"`` — paper-exact. Each denoising step draws crops until every latent pixel is covered: each crop is
centred on a pixel drawn uniformly among the pixels not yet covered at this step, clamped inward to the canvas
(the official selection rule), and every pixel takes the *first* value computed for it (Eq. 6; no blending).
The crop list depends only on coverage, never on the latents (the paper's state-independence), so it is drawn
up front for the whole step and all (crop, label) UNet passes of the step run in batches of ``batch_size``
(the official code runs one crop at a time). All crops read the same level-k canvas, which is what the
official per-pixel time tensor plus the replica of the previous level achieve: a pixel already moved to level
k+1 by an earlier crop is shown to later crops at its level-k value.

``"tiled"`` — faster. Each step is covered by a non-overlapping grid of ``patch``-sized cells whose origin is
shifted by a random offset per step (offsets per axis cycle through a random permutation of 0…patch-1, so the
seams move every step and every seam position is used equally often). Border cells narrower than a patch are
sampled in a window just wide enough for them and their context (``tile_edges="fit"``, ≥ half a patch) or in a
full patch clamped inward (``"full"``) and keep only their own pixels. Coverage is exactly 1 per step.

``"independent"``, ``"multidiffusion"``, ``"mixture"``, ``"dde"`` — overlapping windows (patch combiners,
:mod:`models.patching`): fixed patch-sized windows at ``window_stride`` (default patch/2; ``independent``: the
patch) with the last row/column clamped inward; each window's guided ε̃ is weighted (uniform, or a Gaussian
window for ``mixture``) and averaged per pixel in ε space (Σ w·ε̃ / Σ w), then the same per-pixel DDIM update.
``dde`` first adds a :class:`~models.patching.PatchCoordinator`'s correction to every window's ε̃ (no
coordinator = a zero correction = ``multidiffusion`` exactly); with a coordinator, a canvas side below the patch is
sampled at the patch (labels edge-replicated) and cropped back, since the coordinator reads whole windows. Windows are added to the running sums one at a
time in plan order, so the result does not depend on ``batch_size``; the sums (``dde``: the windows' ε̃) are
part of :class:`SamplerState`, so a run resumes bit-identically in the middle of a step. Memory of ``dde``: the
step keeps every window's ε̃, (P/stride)² × the latent canvas (4× at stride P/2: 4·4·4 B per latent px; a
100 k² px slide = 12.5 k² latents needs ≈ 10 GB), since its coordinator relates all windows of a step; the
coordinator's own pass is banded on large canvases (:meth:`models.dde.coordinator.DDECoordinator.bands`).

In every mode a crop only runs the label passes its *owned* pixels need (others would be discarded), the
unconditional pass is shared by the crop's labels, and the pixel-wise DDIM update runs once per step on the
whole canvas with per-pixel noise. All randomness is a pure function of (seed, stream, step, …): the initial
noise and the DDIM noise come from counter-keyed generators per 128×128 canvas block, the crop draw of a step
from a generator keyed by the step. Results therefore do not depend on ``batch_size`` (up to the network's own
batch-size numerics) or on where a run was interrupted, and :class:`SamplerState` (latents, per-pixel time
state, step, crop cursor, seed) restores a run bit-identically, between steps or in the middle of one.
"""
from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, get_args

import numpy as np
import torch

from models import patching
from models.runtime import CancelFn, ProgressFn, check_cancel

from .guidance import NULL, ConditionalDenoiser, cfg, combine, passes_for
from .scheduler import DDIMScheduler
from .solvers import SOLVERS, DPMSolverPP2M, Solver

__all__ = [
    "Crop", "SamplerState", "RandomPatchSampler", "plan_random", "plan_tiled", "tile_offset", "keyed_seed",
    "NOISE_BLOCK", "STATE_VERSION", "TILE_EDGES", "edge_buckets", "MODES", "WINDOW_MODES", "plan_windows",
]

Mode = Literal["random", "tiled", "independent", "multidiffusion", "mixture", "dde"]
WINDOW_MODES: tuple[str, ...] = patching.COMBINERS  # overlapping windows, blended in ε space
MODES: tuple[str, ...] = ("random", "tiled") + WINDOW_MODES
NullCondition = Literal["labels", "null", "shared"]  # dde under guidance: what the null windows are corrected with
NULL_CONDITIONS: tuple[str, ...] = get_args(NullCondition)
NOISE_BLOCK = 128  # canvas block (latent px) of the counter-keyed noise generators
STATE_VERSION = 2  # 2: + the window modes' partial sums (``weight``, ``windows``); version-1 states still load
READABLE_STATE_VERSIONS = (1, 2)

_TAG_INIT, _TAG_NOISE, _TAG_CROPS, _TAG_TILE = 1, 2, 3, 4


def keyed_seed(*parts: int) -> int:
    """A 63-bit seed derived from integer parts (SeedSequence hashing): independent streams per key."""
    words = np.random.SeedSequence([int(p) % (1 << 64) for p in parts]).generate_state(2, np.uint32)
    return (int(words[0]) | (int(words[1]) << 32)) & ((1 << 63) - 1)


def _np_rng(*parts: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(p) % (1 << 64) for p in parts])))


# ----------------------------------------------------------------------------------------------- crop plans
@dataclass(frozen=True)
class Crop:
    """One UNet window (y0, x0, h, w) of a step and the labels of the pixels it owns (keeps).

    ``cell`` = (y0, x0, h, w) of the owned rectangle (tiled mode); None = first come (random mode): the crop
    owns the pixels of its window that no earlier crop of the step owns.
    """

    y0: int
    x0: int
    h: int
    w: int
    labels: tuple[int, ...]
    n_owned: int
    cell: tuple[int, int, int, int] | None = None

    @property
    def window(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.h), slice(self.x0, self.x0 + self.w)


def _owned_labels(labels: np.ndarray, own: np.ndarray | None) -> tuple[int, ...]:
    vals = labels if own is None else labels[own]
    counts = np.bincount(vals.ravel(), minlength=1)
    return tuple(int(v) for v in np.flatnonzero(counts))


def plan_random(labels: np.ndarray, patch: tuple[int, int], rng: np.random.Generator) -> list[Crop]:
    """Paper-exact crop list of one step (official selection rule, first-come ownership).

    Repeat until covered: draw a pixel uniformly among the uncovered ones, centre a patch on it, clamp the
    window inward (a canvas side smaller than the patch gives a window of the canvas side); the crop owns the
    pixels of its window not covered by an earlier crop.
    """
    hh, ww = labels.shape
    ph, pw = min(patch[0], hh), min(patch[1], ww)
    covered = np.zeros((hh, ww), dtype=bool)
    flat = covered.ravel()
    remaining = hh * ww
    cand: np.ndarray | None = None  # a superset of the uncovered pixels (None: all pixels)
    crops: list[Crop] = []
    while remaining > 0:
        size = hh * ww if cand is None else cand.size
        if 4 * remaining < size:  # keep the rejection rate below 3/4
            cand = np.flatnonzero(~flat)
            if cand.size and cand[-1] < 2 ** 31:
                cand = cand.astype(np.int32)
            size = cand.size
        while True:  # uniform over the uncovered pixels: uniform over a superset, rejecting covered ones
            j = int(rng.integers(size))
            idx = j if cand is None else int(cand[j])
            if not flat[idx]:
                break
        r, c = divmod(idx, ww)
        y0 = min(max(r - patch[0] // 2, 0), hh - ph)
        x0 = min(max(c - patch[1] // 2, 0), ww - pw)
        win = covered[y0:y0 + ph, x0:x0 + pw]
        own = ~win
        n = int(own.sum())
        crops.append(Crop(y0, x0, ph, pw, _owned_labels(labels[y0:y0 + ph, x0:x0 + pw], own), n))
        win[...] = True
        remaining -= n
    return crops


def _axis_cells(size: int, patch: int, offset: int, cell: int, margin: int = 0, fit: bool = False,
                multiple: int = 1, min_window: int = 0,
                buckets: tuple[int, ...] | None = None) -> list[tuple[int, int, int, int]]:
    """(cell start, cell end, window start, window length) along one axis: grid lines at offset + j·cell.

    ``fit=False``: every cell is sampled in a ``patch``-wide window centred on it and clamped into the canvas.
    ``fit=True``: a window only as wide as the cell plus its ``margin`` of context on each side that lies in
    the canvas, at least ``min_window``, rounded up to ``multiple``, at most ``patch`` — interior cells get the
    full patch as before, the partial cells a random offset leaves at the canvas border get a narrower
    window instead of a full patch that mostly re-evaluates their neighbour. ``buckets`` (ascending, the
    last = ``patch``): a fitted length is rounded up to the smallest bucket that holds it, so that windows
    come in a few fixed shapes (one network call per shape and batch)."""
    if size <= patch:  # one window covers the axis: no seam at all
        return [(0, size, 0, size)]
    bounds = [0] + [b for b in range(offset % cell, size, cell) if b > 0] + [size]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        win = patch
        if fit:
            need = min(b + margin, size) - max(a - margin, 0)
            win = min(patch, -(-max(need, min_window) // multiple) * multiple)
            if buckets is not None:
                win = next(v for v in buckets if v >= win)
        mid = (a + b) // 2
        out.append((a, b, min(max(mid - win // 2, 0), size - win), win))
    return out


TileEdges = Literal["bucket", "fit", "full"]
TILE_EDGES: tuple[str, ...] = ("bucket", "fit", "full")


def edge_buckets(patch: int, multiple: int) -> tuple[int, ...]:
    """Window lengths of the ``bucket`` border policy along one axis: half a patch (rounded up to the
    network's divisor) and the patch."""
    half = min(patch, -(-(patch // 2) // multiple) * multiple)
    return (half, patch) if half < patch else (patch,)


def plan_tiled(labels: np.ndarray, patch: tuple[int, int], offset: tuple[int, int],
               margin: int | tuple[int, int] = 0, *, edges: TileEdges = "full", multiple: int = 1) -> list[Crop]:
    """Non-overlapping grid of cells (grid lines at offset + j·cell, cell = patch − 2·margin); each cell owns
    exactly itself and is sampled in a window centred on it (≥ ``margin`` px of context on every side away
    from the canvas border; border windows clamped inward).

    ``edges`` says how the partial cells a grid offset leaves at the canvas border are sampled: ``"full"``
    in full patches; ``"fit"`` in windows just wide enough for the cell and its context, at least half a patch
    (see :func:`_axis_cells`; ``multiple`` is the network's spatial divisor) — the fewest pixels, but up to
    nine window shapes per step; ``"bucket"`` as ``fit`` rounded up to half a patch or a patch per axis, and a
    corner window widened to the full patch along x, so a step holds at most three shapes — (P, P), (P/2, P),
    (P, P/2) — the same few in every step (one network call per shape and batch; fixed shapes for compiled and
    graph-captured GPU execution). Crops come grouped by window shape, largest first, so that batches mostly
    hold one shape."""
    if edges not in TILE_EDGES:
        raise ValueError(f"edges must be one of {TILE_EDGES}, got {edges!r}")
    hh, ww = labels.shape
    my, mx = (margin, margin) if isinstance(margin, int) else margin
    cy, cx = patch[0] - 2 * my, patch[1] - 2 * mx
    if cy < 1 or cx < 1:
        raise ValueError(f"tile margin {margin} leaves no cell inside a {patch} patch")
    fit = edges != "full"
    bucket = edges == "bucket"
    by = edge_buckets(patch[0], multiple) if bucket else None
    bx = edge_buckets(patch[1], multiple) if bucket else None
    crops: list[Crop] = []
    for (ya, yb, wy, ph) in _axis_cells(hh, patch[0], offset[0], cy, my, fit, multiple, patch[0] // 2, by):
        for (xa, xb, wx, pw) in _axis_cells(ww, patch[1], offset[1], cx, mx, fit, multiple, patch[1] // 2, bx):
            if bucket and ph < min(patch[0], hh) and pw < min(patch[1], ww):
                pw = min(patch[1], ww)  # a corner: one of the border shapes, not a fourth
                wx = min(max((xa + xb) // 2 - pw // 2, 0), ww - pw)
            labs = _owned_labels(labels[ya:yb, xa:xb], None)
            crops.append(Crop(wy, wx, ph, pw, labs, (yb - ya) * (xb - xa), (ya, xa, yb - ya, xb - xa)))
    crops.sort(key=lambda c: (-c.h * c.w, c.h, c.w))  # stable: row-major within a shape
    return crops


def plan_windows(labels: np.ndarray, plan: patching.WindowPlan) -> list[Crop]:
    """Crops of a window plan, in plan order: each window owns all its pixels (they are blended, not
    assigned) and runs the label passes of every label in it."""
    h, w = plan.size
    return [Crop(int(y), int(x), h, w, _owned_labels(labels[y:y + h, x:x + w], None), h * w)
            for y, x in plan.origins]


def _offset_sequence(seed: int, stream: int, axis: int, period: int, step: int) -> int:
    """Offset of ``step`` on one axis: cycles through random permutations of 0…period-1, never repeating the
    previous step's offset across a cycle boundary."""
    if period <= 1:
        return 0
    cycle, pos = divmod(step, period)
    prev_last = None
    perm = None
    for c in range(cycle + 1):
        perm = _np_rng(seed, stream, _TAG_TILE, axis, period, c).permutation(period)
        if prev_last is not None and perm[0] == prev_last:
            perm[[0, 1]] = perm[[1, 0]]
        prev_last = perm[-1]
    return int(perm[pos])


def tile_offset(seed: int, stream: int, period: tuple[int, int], step: int) -> tuple[int, int]:
    """Grid offset (y, x) of a step; ``period`` = the cell size per axis."""
    return (_offset_sequence(seed, stream, 0, period[0], step), _offset_sequence(seed, stream, 1, period[1], step))


# ----------------------------------------------------------------------------------------------- state
@dataclass
class SamplerState:
    """Everything a run needs to continue bit-identically.

    ``latents`` (1, C, H, W) float32 is the canvas at level ``step`` (steps completed); ``times`` (H, W) int16
    is the per-pixel time state: ``step`` for pixels not yet updated in the current step, ``step + 1`` for
    pixels whose guided ε̃ is already in ``eps`` (only non-None in the middle of a step); ``cursor`` counts the
    crops of the current step already done; ``x0_prev`` is the multistep solver's x̂0 canvas of the previous
    step (None for DDIM). Window modes in the middle of a step: ``eps`` holds Σ w·ε̃ and ``weight`` (H, W) Σ w
    of the windows done (``dde``: ``windows`` (N, C, h, w) holds each done window's ε̃ instead). The RNG state is (seed, stream, step, cursor): every random draw
    is keyed by them. H, W are the sampler's internal (padded) canvas; ``shape`` is the requested one.
    """

    mode: str
    seed: int
    stream: int
    steps: int
    stop_at: int
    patch: tuple[int, int]
    shape: tuple[int, int]
    guidance: float
    eta: float
    labels_crc: int
    latents: torch.Tensor
    times: torch.Tensor
    step: int = 0
    cursor: int = 0
    eps: torch.Tensor | None = None
    x0_prev: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    windows: torch.Tensor | None = None
    version: int = STATE_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.step >= self.stop_at

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (ints, floats, strings, lists, CPU tensors), loadable with ``torch.load(weights_only=True)``."""
        return {
            "version": self.version, "mode": self.mode, "seed": int(self.seed), "stream": int(self.stream),
            "steps": int(self.steps), "stop_at": int(self.stop_at), "patch": list(self.patch),
            "shape": list(self.shape), "guidance": float(self.guidance), "eta": float(self.eta),
            "labels_crc": int(self.labels_crc), "step": int(self.step), "cursor": int(self.cursor),
            "latents": self.latents.detach().to("cpu", copy=True),
            "times": self.times.detach().to("cpu", copy=True),
            "eps": None if self.eps is None else self.eps.detach().to("cpu", copy=True),
            "x0_prev": None if self.x0_prev is None else self.x0_prev.detach().to("cpu", copy=True),
            "weight": None if self.weight is None else self.weight.detach().to("cpu", copy=True),
            "windows": None if self.windows is None else self.windows.detach().to("cpu", copy=True),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device | str | None = None) -> "SamplerState":
        if int(d.get("version", -1)) not in READABLE_STATE_VERSIONS:
            raise ValueError(f"sampler state version {d.get('version')} is not one of {READABLE_STATE_VERSIONS}")
        dev = torch.device(device) if device is not None else d["latents"].device
        return cls(
            mode=str(d["mode"]), seed=int(d["seed"]), stream=int(d["stream"]), steps=int(d["steps"]),
            stop_at=int(d["stop_at"]), patch=(int(d["patch"][0]), int(d["patch"][1])),
            shape=(int(d["shape"][0]), int(d["shape"][1])), guidance=float(d["guidance"]), eta=float(d["eta"]),
            labels_crc=int(d["labels_crc"]), step=int(d["step"]), cursor=int(d["cursor"]),
            latents=d["latents"].to(dev, copy=True), times=d["times"].to(dev, copy=True),
            eps=None if d.get("eps") is None else d["eps"].to(dev, copy=True),
            x0_prev=None if d.get("x0_prev") is None else d["x0_prev"].to(dev, copy=True),
            weight=None if d.get("weight") is None else d["weight"].to(dev, copy=True),
            windows=None if d.get("windows") is None else d["windows"].to(dev, copy=True),
            extra=dict(d.get("extra") or {}),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic write (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(self.to_dict(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "SamplerState":
        d = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls.from_dict(d, device=device if device is not None else "cpu")


def labels_crc(labels: np.ndarray) -> int:
    arr = np.ascontiguousarray(labels, dtype=np.uint8)
    return zlib.crc32(arr.tobytes(), zlib.crc32(np.asarray(arr.shape, dtype=np.int64).tobytes()))


# ----------------------------------------------------------------------------------------------- sampler
@dataclass
class StepStats:
    crops: int = 0
    forwards: int = 0  # UNet passes (a crop with L labels to predict takes L, +1 for the null)
    crop_pixels: int = 0  # Σ window areas of the crops
    calls: int = 0  # network calls (one per window shape and batch)
    batches: int = 0


class RandomPatchSampler:
    """Batched random-patch DDIM sampler over a label map (latent resolution, uint8).

    Parameters: ``denoiser`` (see :mod:`.guidance`), ``patch`` (latent side, 64 for the image model, 16 for the
    mask model), ``mode`` (one of :data:`MODES`; the window modes need a square patch), ``window_stride``
    (window modes: spacing in latent px, default patch/2; ``independent`` uses the patch), ``mixture_sigma``
    (``mixture``: Gaussian σ as a fraction of the patch), ``coordinator`` (``dde``: a
    :class:`~models.patching.PatchCoordinator`; None = zero correction), ``null_condition`` (``dde`` under
    guidance: ``shared`` (default), one coordinator pass over the conditional windows, whose correction is added to
    the guided windows, so the guidance term ω·(ε(c) − ε(∅)) is left as the patch model made it; or DDE's Eq. 6,
    the null windows corrected apart with the mask's ``labels`` or the ``null`` map as the paper writes it), ``steps`` (DDIM steps, 250 in the paper), ``eta``, ``guidance``
    (ω), ``batch_size`` (UNet passes per forward call), ``multiple`` (the UNet's spatial divisor: a canvas side
    smaller than the patch is padded up to a multiple of it and cropped back), ``official_early_stop`` (stop
    one pair early like the official code, output x_3 instead of x̂0: bug #3, for comparison only), ``stream``
    (separates the random streams of different stages sharing a seed).
    """

    def __init__(self, denoiser: ConditionalDenoiser, *, patch: int | tuple[int, int] = 64, mode: Mode = "random",
                 steps: int = 250, eta: float = 1.0, guidance: float = 0.0, batch_size: int = 8,
                 multiple: int = 1, official_early_stop: bool = False, stream: int = 0,
                 scheduler: DDIMScheduler | None = None, tile_offsets: Literal["random", "fixed"] = "random",
                 tile_margin: int = 0, final_tile_margin: int = 0, final_tile_steps: int = 0,
                 tile_edges: TileEdges = "fit", solver: Solver = "ddim", window_stride: int | None = None,
                 mixture_sigma: float = patching.DEFAULT_MIXTURE_SIGMA,
                 coordinator: patching.PatchCoordinator | None = None,
                 null_condition: NullCondition = "shared"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
        if ph < 1 or pw < 1:
            raise ValueError(f"patch must be positive, got {patch}")
        if mode in WINDOW_MODES:
            if ph != pw:
                raise ValueError(f"the {mode} sampler needs a square patch, got {ph}×{pw}")
            if window_stride is not None and not 1 <= int(window_stride) <= ph:
                raise ValueError(f"window_stride must be in 1…{ph} (the patch), got {window_stride}")
            if mode == "mixture" and not mixture_sigma > 0:
                raise ValueError(f"mixture_sigma must be > 0, got {mixture_sigma}")
            if coordinator is not None and mode != "dde":
                raise ValueError(f"a coordinator is used by the dde sampler only, not {mode!r}")
        self.window_stride = None if window_stride is None else int(window_stride)
        self.mixture_sigma = float(mixture_sigma)
        if null_condition not in NULL_CONDITIONS:
            raise ValueError(f"null_condition must be one of {NULL_CONDITIONS}, got {null_condition!r}")
        self.coordinator = coordinator
        self.null_condition = null_condition
        self._window_plans: dict[tuple[int, int], patching.WindowPlan] = {}
        self._plan_weights: dict[tuple[int, int, str], torch.Tensor] = {}
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if multiple < 1 or ph % multiple or pw % multiple:
            raise ValueError(f"patch {ph}×{pw} must be a multiple of the network divisor {multiple}")
        if tile_offsets not in ("random", "fixed"):
            raise ValueError(f"tile_offsets must be 'random' or 'fixed', got {tile_offsets!r}")
        if tile_edges not in TILE_EDGES:
            raise ValueError(f"tile_edges must be one of {TILE_EDGES}, got {tile_edges!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.denoiser = denoiser
        self.patch = (ph, pw)
        self.mode = mode
        self.eta = float(eta)
        self.guidance = float(guidance)
        self.batch_size = int(batch_size)
        self.multiple = int(multiple)
        self.stream = int(stream)
        self.tile_offsets = tile_offsets
        self.tile_edges = tile_edges
        for name, m in (("tile_margin", tile_margin), ("final_tile_margin", final_tile_margin)):
            if m < 0 or 2 * m >= min(ph, pw):
                raise ValueError(f"{name} must be in 0…{(min(ph, pw) - 1) // 2}, got {m}")
        if final_tile_steps < 0:
            raise ValueError(f"final_tile_steps must be ≥ 0, got {final_tile_steps}")
        self.tile_margin = int(tile_margin)
        self.final_tile_margin = int(final_tile_margin)
        self.final_tile_steps = int(final_tile_steps)
        self.solver = solver
        self.scheduler = scheduler or DDIMScheduler(eta=self.eta)
        self.scheduler.set_timesteps(int(steps))
        self.multistep = None if solver == "ddim" else DPMSolverPP2M(self.scheduler, sde=solver == "dpmpp-2m-sde")
        self.steps = int(steps)
        self.stop_at = self.steps - 1 if official_early_stop and self.steps > 1 else self.steps
        self.stats: dict[int, StepStats] = {}  # per step: crops done, UNet passes, crop pixels
        self.batch_reductions: list[dict[str, int]] = []  # CUDA out-of-memory: {"step", "from", "to"}

    @property
    def _coordinated_guidance(self) -> bool:
        """``dde`` with a coordinator and ω ≠ 0 guides as DDE's Eq. 6: (1+ω)·C([ε(c)]) − ω·C([ε(∅)]) — the
        coordinator corrects the conditional and the null predictions apart (what it was trained on), and the
        guidance is applied to the two blended canvases. Each window then keeps both (2·C channels); with
        ``null_condition="shared"`` the conditional and the guided ε̃ instead."""
        return self.mode == "dde" and self.coordinator is not None and self.guidance != 0

    # -------------------------------------------------------------------------- canvas geometry
    def padded_shape(self, height: int, width: int) -> tuple[int, int]:
        # a coordinator reads whole patch-sized windows only (its tokens and positions are laid out for them):
        # a smaller canvas is sampled at the patch size (labels edge-replicated) and cropped back
        whole_windows = self.mode == "dde" and self.coordinator is not None

        def pad(s: int, p: int) -> int:
            if s >= p:
                return s
            if whole_windows:
                return p
            return -(-s // self.multiple) * self.multiple
        return pad(height, self.patch[0]), pad(width, self.patch[1])

    def _prepare_labels(self, labels: np.ndarray | torch.Tensor) -> np.ndarray:
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if lab.ndim != 2:
            raise ValueError(f"label map must be 2-D (H, W), got shape {lab.shape}")
        if lab.size == 0:
            raise ValueError("label map is empty")
        if lab.dtype != np.uint8:
            if not np.issubdtype(lab.dtype, np.integer):
                raise ValueError(f"label map must hold integers, got {lab.dtype}")
            if lab.min() < 0 or lab.max() > 255:
                raise ValueError(f"labels must be in 0…255, got {int(lab.min())}…{int(lab.max())}")
            lab = lab.astype(np.uint8)
        hp, wp = self.padded_shape(*lab.shape)
        if (hp, wp) != lab.shape:
            lab = np.pad(lab, ((0, hp - lab.shape[0]), (0, wp - lab.shape[1])), mode="edge")
        return np.ascontiguousarray(lab)

    # -------------------------------------------------------------------------- randomness
    def _block_noise(self, seed: int, tag: int, step: int, channels: int, rows: tuple[int, int], width: int,
                     device: torch.device) -> torch.Tensor:
        """Noise for canvas rows [r0, r1) (r0 block-aligned), assembled from per-block keyed generators."""
        r0, r1 = rows
        bi = r0 // NOISE_BLOCK
        parts = []
        for bj, c0 in enumerate(range(0, width, NOISE_BLOCK)):
            c1 = min(c0 + NOISE_BLOCK, width)
            g = torch.Generator(device=device)
            g.manual_seed(keyed_seed(seed, self.stream, tag, step, bi, bj))
            parts.append(torch.randn((channels, r1 - r0, c1 - c0), generator=g, device=device,
                                     dtype=torch.float32))
        return torch.cat(parts, dim=2)

    def plan(self, labels_padded: np.ndarray, seed: int, step: int) -> list[Crop]:
        """Crop list of one step (a pure function of the label map, seed, stream and step)."""
        if self.mode == "random":
            return plan_random(labels_padded, self.patch, _np_rng(seed, self.stream, _TAG_CROPS, step))
        if self.mode in WINDOW_MODES:
            return plan_windows(labels_padded, self.window_plan(labels_padded.shape))
        m = self.tile_margin_at(step)
        cells = (self.patch[0] - 2 * m, self.patch[1] - 2 * m)
        offset = (0, 0) if self.tile_offsets == "fixed" else tile_offset(seed, self.stream, cells, step)
        return plan_tiled(labels_padded, self.patch, offset, m, edges=self.tile_edges, multiple=self.multiple)

    def window_plan(self, canvas: tuple[int, int]) -> patching.WindowPlan:
        """The window modes' plan over a (padded) canvas: the same windows at every step."""
        key = (int(canvas[0]), int(canvas[1]))
        if key not in self._window_plans:
            self._window_plans[key] = patching.plan_windows(self.mode, key, self.patch[0], self.window_stride,
                                                            self.mixture_sigma,
                                                            blend=patching.coordinator_blend(self.coordinator))
        return self._window_plans[key]

    def _plan_weight(self, canvas: tuple[int, int], device: torch.device) -> torch.Tensor:
        key = (int(canvas[0]), int(canvas[1]), str(device))
        if key not in self._plan_weights:  # one copy per device, not a transfer per window
            self._plan_weights[key] = self.window_plan(canvas).weight.to(device)
        return self._plan_weights[key]

    def tile_margin_at(self, step: int) -> int:
        """Context margin of the tiled mode at ``step`` (the last ``final_tile_steps`` use ``final_tile_margin``)."""
        return self.final_tile_margin if step >= self.stop_at - self.final_tile_steps else self.tile_margin

    def passes(self, crop: Crop) -> list[int | None]:
        return passes_for(crop.labels, self.guidance, self.denoiser.null_label)

    # -------------------------------------------------------------------------- state
    def init_state(self, labels: np.ndarray | torch.Tensor, seed: int,
                   device: torch.device | str = "cpu") -> SamplerState:
        lab = self._prepare_labels(labels)
        device = torch.device(device)
        hp, wp = lab.shape
        c = int(getattr(self.denoiser, "out_channels", 4))
        latents = torch.empty((1, c, hp, wp), dtype=torch.float32, device=device)
        for r0 in range(0, hp, NOISE_BLOCK):
            r1 = min(r0 + NOISE_BLOCK, hp)
            latents[0, :, r0:r1] = self._block_noise(seed, _TAG_INIT, 0, c, (r0, r1), wp, device)
        shape = tuple(int(v) for v in labels.shape)
        return SamplerState(
            mode=self.mode, seed=int(seed), stream=self.stream, steps=self.steps, stop_at=self.stop_at,
            patch=self.patch, shape=(int(shape[0]), int(shape[1])), guidance=self.guidance, eta=self.eta,
            labels_crc=labels_crc(lab), latents=latents,
            times=torch.zeros((hp, wp), dtype=torch.int16, device=device),
            extra={"tiling": self._tiling(), "solver": self.solver},
        )

    def _tiling(self) -> list:
        if self.mode in WINDOW_MODES:
            stride = self.patch[0] if self.mode == "independent" else (self.window_stride or max(1, self.patch[0] // 2))
            return [stride, self.mixture_sigma if self.mode == "mixture" else None]
        if self.mode != "tiled":
            return []
        return [self.tile_offsets, self.tile_margin, self.final_tile_margin, self.final_tile_steps, self.tile_edges]

    def check_state(self, state: SamplerState, lab: np.ndarray) -> None:
        expect = {
            "mode": self.mode, "stream": self.stream, "steps": self.steps, "stop_at": self.stop_at,
            "patch": self.patch, "guidance": self.guidance, "eta": self.eta, "labels_crc": labels_crc(lab),
        }
        got = {
            "mode": state.mode, "stream": state.stream, "steps": state.steps, "stop_at": state.stop_at,
            "patch": tuple(state.patch), "guidance": state.guidance, "eta": state.eta,
            "labels_crc": state.labels_crc,
        }
        expect["tiling"], got["tiling"] = self._tiling(), list(state.extra.get("tiling", []))
        expect["solver"], got["solver"] = self.solver, state.extra.get("solver", "ddim")
        bad = [f"{k} (state {got[k]!r}, sampler {expect[k]!r})" for k in expect if got[k] != expect[k]]
        if tuple(state.latents.shape[2:]) != lab.shape:
            bad.append(f"canvas (state {tuple(state.latents.shape[2:])}, labels {lab.shape})")
        if bad:
            raise ValueError("sampler state does not match this job: " + "; ".join(bad))

    # -------------------------------------------------------------------------- run
    def sample(self, labels: np.ndarray | torch.Tensor, seed: int, device: torch.device | str = "cpu", *,
               progress: ProgressFn | None = None, cancel: CancelFn | None = None,
               on_step: Callable[[SamplerState], None] | None = None) -> torch.Tensor:
        state = self.init_state(labels, seed, device)
        return self.run(state, labels, progress=progress, cancel=cancel, on_step=on_step)

    def run(self, state: SamplerState, labels: np.ndarray | torch.Tensor, *, progress: ProgressFn | None = None,
            cancel: CancelFn | None = None, on_step: Callable[[SamplerState], None] | None = None,
            until: int | None = None) -> torch.Tensor:
        """Advance ``state`` (in place) to the end, or to ``until`` steps completed; returns the (1, C, H, W)
        latents cropped to ``state.shape``.

        ``cancel`` is checked before every step and every UNet batch; on :class:`~models.runtime.Canceled`
        the state is consistent (ends at the last finished crop) and can be saved and resumed.
        """
        lab = self._prepare_labels(labels)
        self.check_state(state, lab)
        device = state.latents.device
        lab_dev = torch.from_numpy(lab).to(device)
        stop = state.stop_at if until is None else min(int(until), state.stop_at)
        if "batch_size" in state.extra:  # an earlier out-of-memory halving sticks to the job
            self.batch_size = min(self.batch_size, int(state.extra["batch_size"]))
        while state.step < stop:
            check_cancel(cancel)
            k = state.step
            crops = self.plan(lab, state.seed, k)
            if state.eps is None:
                state.eps = torch.zeros_like(state.latents)
                state.cursor = 0
                if self.mode in WINDOW_MODES:
                    state.weight = torch.zeros(state.latents.shape[2:], dtype=torch.float32, device=device)
                    if self.mode == "dde":
                        h, w = self.window_plan(lab.shape).size
                        c = state.latents.shape[1] * (2 if self._coordinated_guidance else 1)
                        state.windows = torch.zeros((len(crops), c, h, w), dtype=torch.float32, device=device)
            self._eval_crops(state, crops, lab_dev, cancel)
            if bool((state.times != k + 1).any()):
                raise RuntimeError(f"step {k}: some latent pixels were not updated (coverage bug)")
            if self.mode in WINDOW_MODES:
                self._blend_windows(state, lab_dev)
            self._update_canvas(state)
            if progress is not None:
                progress(state.step, state.stop_at)
            if on_step is not None:
                on_step(state)
        h, w = state.shape
        return state.latents[:, :, :h, :w]

    def _eval_crops(self, state: SamplerState, crops: Sequence[Crop], lab_dev: torch.Tensor,
                    cancel: CancelFn | None) -> None:
        """Run the step's (crop, label) passes in batches of ``batch_size`` and write each crop's ε̃ into the
        pixels it owns (``times == step``), in crop order.

        The job list of a step is fixed, and batches are cut at fixed multiples of ``batch_size`` in it, also
        when resuming in the middle of a step (the batch holding the resumed crop's first pass is recomputed
        whole), so a resumed run feeds the network exactly the same batches as an uninterrupted one.
        """
        k = state.step
        t = self.scheduler.pairs[k][0]
        null_label = self.denoiser.null_label
        jobs: list[tuple[int, int | None]] = []
        first_job: list[int] = []
        for ci, crop in enumerate(crops):
            first_job.append(len(jobs))
            jobs.extend((ci, u) for u in self.passes(crop))
        needed = [0] * len(crops)
        for ci, _ in jobs:
            needed[ci] += 1
        if state.cursor >= len(crops):
            return
        stats = self.stats.setdefault(k, StepStats())
        pending: dict[int, dict[int | None, torch.Tensor]] = {}
        bs = self.batch_size
        b0 = (first_job[state.cursor] // bs) * bs
        while b0 < len(jobs):
            check_cancel(cancel)
            batch = jobs[b0:b0 + bs]
            try:
                eps = self._eval_batch(state, crops, batch, lab_dev, t, stats)
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise
                # halve and retry this batch: b0 is a multiple of the new size too, so the cut points stay
                # those of a run started with it (a resumed job continues with it: state.extra)
                self.batch_reductions.append({"step": k, "from": bs, "to": bs // 2})
                bs = self.batch_size = bs // 2
                state.extra["batch_size"] = bs
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            b0 += len(batch)
            stats.forwards += len(batch)
            stats.batches += 1
            for (ci, u), e in zip(batch, eps):
                if ci < state.cursor:  # finished before an interruption: recomputed only to keep batches aligned
                    continue
                pending.setdefault(ci, {})[u] = e
                if len(pending[ci]) == needed[ci]:
                    self._finalize(state, crops[ci], pending.pop(ci), lab_dev, null_label, ci)
                    state.cursor = ci + 1
                    stats.crops += 1
                    stats.crop_pixels += crops[ci].h * crops[ci].w

    def _eval_batch(self, state: SamplerState, crops: Sequence[Crop], batch: Sequence[tuple[int, int | None]],
                    lab_dev: torch.Tensor, t: int, stats: StepStats) -> list[torch.Tensor]:
        """ε of one batch of (crop, label) passes: one network call per window shape in the batch."""
        shapes: dict[tuple[int, int], list[int]] = {}
        for j, (ci, _) in enumerate(batch):
            shapes.setdefault((crops[ci].h, crops[ci].w), []).append(j)
        eps: list[torch.Tensor | None] = [None] * len(batch)
        for idx in shapes.values():
            xs_, ls_ = [], []
            for j in idx:
                ys, xs = crops[batch[j][0]].window
                xs_.append(state.latents[0, :, ys, xs])
                ls_.append(lab_dev[ys, xs])
            x = torch.stack(xs_)
            tt = torch.full((len(idx),), t, dtype=torch.long, device=x.device)
            out = self.denoiser(x, tt, torch.stack(ls_), [batch[j][1] for j in idx])
            stats.calls += 1
            for j, e in zip(idx, out):
                eps[j] = e
        return eps  # type: ignore[return-value]

    def _finalize(self, state: SamplerState, crop: Crop, preds: dict[int | None, torch.Tensor],
                  lab_dev: torch.Tensor, null_label: int | None, index: int = 0) -> None:
        k = state.step
        if self.mode in WINDOW_MODES:  # overlapping windows: ε̃ into the running weighted sums (dde: kept per window)
            ys, xs = crop.window
            if self._coordinated_guidance:  # DDE Eq. 6: the coordinator sees the conditional and the null ε apart
                other = (combine(lab_dev[ys, xs], preds, self.guidance, null_label) if self.null_condition == "shared"
                         else preds[NULL])
                state.windows[index] = torch.cat([combine(lab_dev[ys, xs], preds, 0.0, null_label).float(),
                                                  other.float()])
                state.times[ys, xs] = k + 1
                return
            comb = combine(lab_dev[ys, xs], preds, self.guidance, null_label).float()
            if self.mode == "dde":
                state.windows[index] = comb
            else:
                acc = patching.BlendAccumulator.restore(state.eps[0], state.weight)
                acc.add(comb[None], [(crop.y0, crop.x0)], self._plan_weight(state.weight.shape, comb.device))
            state.times[ys, xs] = k + 1
            return
        if crop.cell is not None:  # tiled: the crop owns exactly its cell (cells cover the canvas once per step)
            cy, cx, ch, cw = crop.cell
            ry, rx = slice(cy - crop.y0, cy - crop.y0 + ch), slice(cx - crop.x0, cx - crop.x0 + cw)
            state.eps[0, :, cy:cy + ch, cx:cx + cw] = combine(
                lab_dev[cy:cy + ch, cx:cx + cw], {u: p[:, ry, rx] for u, p in preds.items()}, self.guidance, null_label)
            state.times[cy:cy + ch, cx:cx + cw] = k + 1
            return
        ys, xs = crop.window
        comb = combine(lab_dev[ys, xs], preds, self.guidance, null_label)
        tw = state.times[ys, xs]
        own = tw == k  # first come: pixels no earlier crop of this step has updated
        ew = state.eps[0, :, ys, xs]
        ew.copy_(torch.where(own, comb, ew))
        tw.masked_fill_(own, k + 1)

    def _blend_windows(self, state: SamplerState, lab_dev: torch.Tensor) -> None:
        """ε̃ canvas of a window step: Σ w·ε̃ / Σ w; for ``dde`` the coordinator's correction is added to the
        windows' ε̃ first (its inputs: the windows' latents, label crops (N, 1, h, w) long, timesteps (N,))."""
        plan = self.window_plan(state.weight.shape)
        if self.mode == "dde":
            outs = state.windows
            if self.coordinator is not None:
                t = self.scheduler.pairs[state.step][0]
                n = len(plan)
                noisy = plan.crops(state.latents[0])
                cond = plan.crops(lab_dev.long())[:, None]
                tt = torch.full((n,), int(t), dtype=torch.long, device=outs.device)
                if self._coordinated_guidance and self.null_condition == "shared":
                    # the conditional windows' correction, added to the guided windows
                    plain, guided = outs.chunk(2, dim=1)
                    with torch.no_grad():
                        delta = patching.correction(plan, plain, noisy=noisy, cond=cond, t=tt,
                                                    coordinator=self.coordinator, step=state.step)
                    parts = [guided + delta]
                else:
                    parts, conds = (outs,), (cond,)
                    if self._coordinated_guidance:
                        parts = outs.chunk(2, dim=1)
                        # the paper's Eq. 6 gives C the null map [∅] with the null windows ("null"), or ("labels")
                        # the mask's labels, so the two corrections agree and the guidance does not amplify their
                        # difference (measured: the shipped demo coordinator, trained on 10 % null canvases, keeps
                        # balanced accuracy 0.785 at 2048² with the labels, as shared's 0.784, and falls to 0.599
                        # with [∅], README)
                        null = self.denoiser.null_label
                        null_cond = cond if self.null_condition == "labels" or null is None \
                            else torch.full_like(cond, int(null))
                        conds = (cond, null_cond)
                    with torch.no_grad():
                        parts = [patching.corrected(plan, part, noisy=noisy, cond=c, t=tt,
                                                    coordinator=self.coordinator, step=state.step)
                                 for part, c in zip(parts, conds)]
            canvases = []
            for part in parts if self.coordinator is not None else (outs,):
                acc = patching.BlendAccumulator(part.shape[1], plan.canvas, device=part.device)
                acc.add(part, plan.origins, plan.weight)
                canvases.append(acc.result())
            if len(canvases) == 2:  # (1+ω)·C([ε(c)]) − ω·C([ε(∅)]); null-label pixels: C([ε(∅)])
                cond_eps, null_eps = canvases
                guided = cfg(cond_eps, null_eps, self.guidance)
                null_px = (lab_dev == self.denoiser.null_label) if self.denoiser.null_label is not None else None
                canvases = [guided if null_px is None else torch.where(null_px, null_eps, guided)]
            state.eps = canvases[0][None].to(state.latents.dtype)
        else:
            state.eps = patching.BlendAccumulator.restore(state.eps[0], state.weight).result()[None]
        state.weight = None
        state.windows = None

    def _update_canvas(self, state: SamplerState) -> None:
        """Pixel-wise update of the whole canvas with the step's ε̃ (DDIM, or the multistep solver with the
        previous step's x̂0 canvas), band by band (no cancel inside)."""
        k = state.step
        t, t_next = self.scheduler.pairs[k]
        c, hp, wp = state.latents.shape[1:]
        if self.multistep is not None:
            noisy = self.multistep.noisy(t, t_next)
            t_prev = self.scheduler.pairs[k - 1][0] if k > 0 and state.x0_prev is not None else None
            x0_new = torch.empty_like(state.latents) if t_next >= 0 else None
        else:
            noisy = self.scheduler.coefficients(t, t_next, self.eta)[3] > 0
        for r0 in range(0, hp, NOISE_BLOCK):
            r1 = min(r0 + NOISE_BLOCK, hp)
            z = None
            if noisy:
                z = self._block_noise(state.seed, _TAG_NOISE, k, c, (r0, r1), wp, state.latents.device)[None]
            x = state.latents[:, :, r0:r1]
            if self.multistep is None:
                out = self.scheduler.step(state.eps[:, :, r0:r1], t, x, prev_timestep=t_next, noise=z, eta=self.eta)
            else:
                prev = None if t_prev is None else state.x0_prev[:, :, r0:r1]
                out = self.multistep.step(state.eps[:, :, r0:r1], t, x, t_next, x0_prev=prev, t_prev=t_prev, noise=z)
                if x0_new is not None:
                    x0_new[:, :, r0:r1] = out.pred_original_sample
            x.copy_(out.prev_sample)
        if self.multistep is not None:
            state.x0_prev = x0_new
        state.eps = None
        state.cursor = 0
        state.step = k + 1
