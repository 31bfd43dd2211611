"""Training ∞-Brush on pixel subsets of images of any size (paper §5.2; ∞-Diff where the paper is silent).

Per image and iteration: ``n_points`` pixels drawn uniformly without replacement; A·u₀ and A·ξ are evaluated only at
those pixels from their (2r+1)² neighbourhoods (ξ from the counter-based field, keyed by a per-item seed, so shared
neighbours see the same noise); u_t = √ᾱ_t·A u₀ + √(1−ᾱ_t)·A ξ·noise_mul; the network predicts A ξ·noise_mul (MSE).
Adam (lr 5e-5, β 0.9/0.99), EMA 0.995 (updated every ``ema_every`` steps, ∞-Diff), gradient clipping 1.0 (∞-Diff),
condition dropped with p = cond_drop for classifier-free guidance.

Conditions come from the data (a sidecar .npy per image: a vector or a (rows, cols, D) grid) or are computed from
each image's pixels by a caller's encoder (:class:`EncodedRegions`: the image cut into rows × cols regions, each
region's embedding in its cell — the global vector is the 1 × 1 layout); a run may mix layouts (``grids``), one
layout per step, so one model learns to follow a global vector and grids.

Folder layout written by :func:`train_infbrush` (``--out``)::

    model_card.json, denoiser.safetensors    the EMA weights: a model folder load_infbrush() reads
    train_state/model.safetensors            raw weights
    train_state/optimizer.pt                 optimizer + RNG state (torch.load(weights_only=True))
    train_state/state.json                   step, configuration, options
    train_log.jsonl                          one line per logged step
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.infbrush.config import InfBrushConfig
from models.infbrush.denoiser import InfBrushDenoiser, canvas_window, token_positions
from models.infbrush.geometry import pixel_to_unit, point_geometry, points_grid_pairs
from models.infbrush.noise import Mollifier, gaussian_noise
from models.infbrush.priors import NoisePrior, fourier_downsample
from models.infbrush.pipeline import InfBrushModels, check_state_dict, make_card, save_infbrush
from models.infbrush.schedule import CosineSchedule

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
class ImageFolderDataset:
    """Images of any size with a sidecar embedding each: ``a.png`` + ``a.npy`` ((D,) or (rows, cols, D)).
    Files named ``*_mask.*`` (the label maps of a procedural tile folder) are skipped.

    embeddings=False: images only (``item`` gives None for the embedding), for conditions computed from pixels.

    Decoded images are kept in memory up to ``cache_mb`` MiB (the first ones drawn; the rest are decoded on every
    draw): a training step draws a few images from a small folder thousands of times, and decoding a 1024² PNG
    costs ≈ 30 ms. A cached image is returned as the same tensor each time, so callers must not write into it."""

    def __init__(self, folder: str | Path, embedding_dim: int, embeddings: bool = True, cache_mb: float = 2048):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"training data folder not found: {self.folder}")
        # a tile folder's label maps (<stem>_mask.png, procedural datasets) are not training images
        self.files = sorted(p for p in self.folder.iterdir()
                            if p.suffix.lower() in IMAGE_EXTS and not p.stem.endswith("_mask"))
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {self.folder}")
        self.embeddings: list = [None] * len(self.files)
        self._decoded: dict[int, torch.Tensor] = {}
        self._cache_left = int(cache_mb * 2 ** 20)
        if embeddings:
            self._load_embeddings(embedding_dim)

    def _load_embeddings(self, embedding_dim: int) -> None:
        missing = [p.name for p in self.files if not p.with_suffix(".npy").is_file()]
        if missing:
            raise ValueError(f"{len(missing)} images have no embedding .npy next to them, e.g. {', '.join(missing[:5])}")
        self.embeddings = []
        for p in self.files:
            e = np.load(p.with_suffix(".npy")).astype(np.float32)
            if e.ndim == 1:
                e = e[None, None]
            if e.ndim != 3 or e.shape[-1] != embedding_dim:
                raise ValueError(f"{p.with_suffix('.npy')} has shape {e.shape}; expected ({embedding_dim},) or "
                                 f"(rows, cols, {embedding_dim})")
            self.embeddings.append(torch.from_numpy(e))
        shapes = {tuple(e.shape) for e in self.embeddings}
        if len(shapes) > 1:
            raise ValueError(f"all embeddings must have the same shape, found {sorted(shapes)}")

    def __len__(self) -> int:
        return len(self.files)

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self._decoded.get(i)
        if img is None:
            img = self._decode(i)
            if img.numel() <= self._cache_left:
                self._decoded[i] = img
                self._cache_left -= img.numel()
        return img, self.embeddings[i]

    def _decode(self, i: int) -> torch.Tensor:
        p = self.files[i]
        if p.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(p)
        else:
            from PIL import Image

            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] < 3:
            raise ValueError(f"{p}: expected an RGB image, got shape {arr.shape}")
        return torch.from_numpy(np.array(arr[..., :3], dtype=np.uint8, copy=True)).permute(2, 0, 1)


class SyntheticFunctions:
    """Smooth random RGB functions whose structure depends on a class; embedding = the class's fixed unit vector.

    Class c has its own colour and spatial frequency band; image sizes cycle through ``sizes`` (any size).
    mosaic (rows, cols) > (1, 1): each image is cut into rows × cols equal cells of random classes (regions that
    look different, for grid conditioning); its embedding is then the (rows, cols, D) grid of the cells' classes.
    """

    def __init__(self, n: int, sizes=((64, 64),), classes: int = 2, seed: int = 0, embedding_dim: int = 512,
                 mosaic: tuple[int, int] = (1, 1)):
        g = torch.Generator().manual_seed(seed)
        self.n, self.sizes, self.classes = n, [tuple(s) for s in sizes], classes
        self.mosaic = (int(mosaic[0]), int(mosaic[1]))
        self.class_vec = torch.nn.functional.normalize(torch.randn(classes, embedding_dim, generator=g), dim=-1)
        self.colours = torch.rand(classes, 3, generator=g) * 1.2 - 0.6
        self.seeds = torch.randint(0, 2 ** 31 - 1, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return self.n

    def _paint(self, c: int, y: torch.Tensor, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        f = torch.zeros(3, *torch.broadcast_shapes(y.shape, x.shape))
        for _ in range(4):
            freq = (1.0 + 2.0 * c) + torch.rand(2, generator=g) * 2.0
            phase = torch.rand(1, generator=g) * 2 * math.pi
            amp = torch.rand(3, 1, 1, generator=g) * 0.25
            f += amp * torch.sin(2 * math.pi * (freq[0] * y + freq[1] * x) + phase)
        return f + self.colours[c][:, None, None]

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        H, W = self.sizes[i % len(self.sizes)]
        g = torch.Generator().manual_seed(self.seeds[i])
        side = max(H, W)
        y = (torch.arange(H, dtype=torch.float32)[:, None] + 0.5 + (side - H) / 2) / side
        x = (torch.arange(W, dtype=torch.float32)[None, :] + 0.5 + (side - W) / 2) / side
        if self.mosaic == (1, 1):
            c = i % self.classes
            f, emb = self._paint(c, y, x, g), self.class_vec[c][None, None]
        else:
            R, C = self.mosaic
            cls = torch.randint(0, self.classes, (R * C,), generator=g)
            f = torch.zeros(3, H, W)
            for k, ((r0, r1), (c0, c1)) in enumerate(region_bounds(H, W, R, C)):
                f[:, r0:r1, c0:c1] = self._paint(int(cls[k]), y[r0:r1], x[:, c0:c1], g)
            emb = self.class_vec[cls].reshape(R, C, -1)
        img = ((f.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img, emb

    def colour_encoder(self):
        """A stand-in image encoder for smoke runs and tests: each tile's mean colour → the class whose colour is
        nearest → that class's vector (no learnt encoder needed to train on grids of these functions)."""
        colours = self.colours

        def embed(tiles: np.ndarray) -> np.ndarray:
            mean = torch.as_tensor(np.asarray(tiles), dtype=torch.float32).mean(dim=(1, 2)) / 127.5 - 1
            nearest = torch.cdist(mean, colours).argmin(dim=1)
            return self.class_vec[nearest].numpy()

        return embed


def region_bounds(height: int, width: int, rows: int, cols: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """((r0, r1), (c0, c1)) of the rows × cols regions of an image, row-major: the cells of an embedding grid,
    as the sampler lays them over a canvas (token_positions: cell centres at (i + ½)·H/rows)."""
    rb = [round(r * height / rows) for r in range(rows + 1)]
    cb = [round(c * width / cols) for c in range(cols + 1)]
    return [((rb[r], rb[r + 1]), (cb[c], cb[c + 1])) for r in range(rows) for c in range(cols)]


def region_tiles(img: torch.Tensor, rows: int, cols: int, tile_px: int) -> np.ndarray:
    """uint8 image (3, H, W) → its rows × cols regions, each resized to tile_px² (antialiased), as the encoder
    input (rows·cols, tile_px, tile_px, 3) uint8, row-major. Resizing the whole region follows the paper, which
    embeds each 4096² training image resized to 256² (one vector per image = the 1 × 1 layout)."""
    _, H, W = img.shape
    if rows > H or cols > W:
        raise ValueError(f"a {H}×{W} image cannot be cut into {rows}×{cols} regions")
    out = []
    for (r0, r1), (c0, c1) in region_bounds(H, W, rows, cols):
        region = img[None, :, r0:r1, c0:c1].float()
        t = torch.nn.functional.interpolate(region, size=(tile_px, tile_px), mode="bilinear", antialias=True,
                                            align_corners=False)
        out.append(t[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0))
    return torch.stack(out).numpy()


def region_native_tiles(img: torch.Tensor, rows: int, cols: int, tile_px: int, per_side: int = 4) -> np.ndarray:
    """uint8 image (3, H, W) → up to per_side² tile_px² tiles at the image's own resolution, evenly spread over
    each of its rows × cols regions: (rows·cols, n, tile_px, tile_px, 3) uint8, regions row-major.

    For an encoder with a fixed µm/px (a tile encoder trained at the data's scale): a region seen as the tiles a
    user would send to POST /embed, not shrunk to a scale the encoder never saw."""
    _, H, W = img.shape
    out = []
    for (r0, r1), (c0, c1) in region_bounds(H, W, rows, cols):
        if r1 - r0 < tile_px or c1 - c0 < tile_px:
            raise ValueError(f"a {H}×{W} image's {rows}×{cols} regions are smaller than the encoder's {tile_px}-px "
                             "tiles")
        ny = min(per_side, (r1 - r0) // tile_px)
        nx = min(per_side, (c1 - c0) // tile_px)
        ys = np.linspace(r0, r1 - tile_px, ny).round().astype(int)
        xs = np.linspace(c0, c1 - tile_px, nx).round().astype(int)
        n = per_side * per_side
        tiles = [img[:, y:y + tile_px, x:x + tile_px].permute(1, 2, 0) for y in ys for x in xs]
        tiles = (tiles * (n // len(tiles) + 1))[:n]       # equal counts per region (a batch stacks them)
        out.append(torch.stack(tiles))
    return torch.stack(out).numpy()


class EncodedRegions:
    """A dataset whose conditions are computed from its images' pixels by an encoder, for several grid layouts.

    ``embed(tiles uint8 (N, H, W, 3)) → (N, D)`` is the caller's image encoder (the one whose embeddings the
    model will be conditioned on at inference, e.g. a tile encoder's ``embed``). ``item(i, (rows, cols))`` gives
    the image and the (rows, cols, D) grid of its regions' embeddings; results are cached, so each region is
    embedded once per run. ``regions``: how a region becomes a vector — ``"resize"`` (the paper: the region
    resized to tile_px², :func:`region_tiles`) or ``"tiles"`` (the normalised mean of the embeddings of up to
    16 native tile_px² tiles spread over it, :func:`region_native_tiles`, re-normalised).

    ``single_tile_p`` (``"tiles"`` only): with this probability, drawn per region from the ``gen`` given to
    :meth:`item`, a region's vector is instead the embedding of one of its native tiles chosen at random. Users
    condition on the embedding of one tile ("a slide like this tile"), and one tile can be far from its
    region's mean (a vessel inside fat: cosine ≈ 0.63 to the mean of its region), so the model must learn both.
    """

    REGION_MODES = ("resize", "tiles")

    def __init__(self, images, embed, embedding_dim: int, layouts=((1, 1),), tile_px: int = 224,
                 regions: str = "resize", single_tile_p: float = 0.0):
        self.images, self.embed, self.dim, self.tile_px = images, embed, int(embedding_dim), int(tile_px)
        self.layouts = [(int(r), int(c)) for r, c in layouts]
        if not self.layouts or any(r < 1 or c < 1 for r, c in self.layouts):
            raise ValueError(f"grid layouts must be (rows ≥ 1, cols ≥ 1), got {layouts}")
        if regions not in self.REGION_MODES:
            raise ValueError(f"regions must be one of {', '.join(self.REGION_MODES)}, not {regions!r}")
        self.regions = regions
        if not 0.0 <= single_tile_p <= 1.0:
            raise ValueError(f"single_tile_p must be in [0, 1], got {single_tile_p}")
        if single_tile_p > 0 and regions != "tiles":
            raise ValueError("single_tile_p needs regions='tiles' (a region's native tiles)")
        self.single_tile_p = float(single_tile_p)
        self._cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.images)

    def item(self, i: int, layout: tuple[int, int] | None = None,
             gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image uint8 (3, H, W), (rows, cols, D) conditions). ``gen`` draws the single-tile choices
        (``single_tile_p``); without it every region gets its mean vector."""
        rows, cols = layout or self.layouts[0]
        img = self.images.item(i)[0]
        key = (i, rows, cols)
        if key not in self._cache:
            if self.regions == "tiles":
                tiles = region_native_tiles(img, rows, cols, self.tile_px)
                per_region = tiles.shape[1]
                tiles = tiles.reshape(-1, *tiles.shape[2:])
            else:
                tiles, per_region = region_tiles(img, rows, cols, self.tile_px), 1
            emb = torch.as_tensor(np.asarray(self.embed(tiles), dtype=np.float32))
            if emb.shape != (len(tiles), self.dim):
                raise ValueError(f"the encoder gave shape {tuple(emb.shape)} for {len(tiles)} tiles; the model "
                                 f"expects ({len(tiles)}, {self.dim})")
            if not torch.isfinite(emb).all():
                raise ValueError(f"the encoder gave non-finite embeddings for image {i}")
            if per_region > 1:  # unit vectors; a region's vector is their normalised mean
                emb = torch.nn.functional.normalize(emb, dim=-1)
            per_tile = emb.reshape(rows * cols, per_region, self.dim)
            mean = per_tile[:, 0] if per_region == 1 else torch.nn.functional.normalize(per_tile.mean(1), dim=-1)
            self._cache[key] = (per_tile, mean.reshape(rows, cols, self.dim))
        per_tile, grid = self._cache[key]
        if self.single_tile_p > 0 and gen is not None:
            pick = torch.rand(rows * cols, generator=gen) < self.single_tile_p
            which = torch.randint(0, per_tile.shape[1], (rows * cols,), generator=gen)
            one = per_tile[torch.arange(rows * cols), which].reshape(rows, cols, self.dim)
            grid = torch.where(pick.reshape(rows, cols, 1), one, grid)
        return img, grid


# ---------------------------------------------------------------------------------------------------------------
# One training batch
# ---------------------------------------------------------------------------------------------------------------
def sample_pixels(n: int, total: int, gen: torch.Generator) -> torch.Tensor:
    """n distinct flat pixel indices, uniformly without replacement, in random order; O(n) for n ≪ total (a
    randperm of a 4096² image would cost 16.7 M draws per image)."""
    if n * 4 >= total:
        return torch.randperm(total, generator=gen)[:n]
    have = torch.empty(0, dtype=torch.long)
    while have.numel() < n:
        extra = n - have.numel()
        draw = torch.randint(0, total, (extra + extra // 8 + 64,), generator=gen)
        have = torch.unique(torch.cat([have, draw]))
    return have[torch.randperm(have.numel(), generator=gen)[:n]]


def sample_patches(n: int, height: int, width: int, patch: int, gen: torch.Generator) -> torch.Tensor:
    """n flat pixel indices forming ⌈n / patch²⌉ disjoint dense patch × patch squares at random places (the last
    one partly used): cells of a patch-aligned grid with a random offset, chosen without replacement.

    Sampling draws every pixel, so the sparse operators meet dense neighbourhoods there; uniform points at a few
    % density show them neighbours several pixels away, a different input distribution (reference §4.4)."""
    oy = int(torch.randint(0, min(patch, height - patch + 1), (1,), generator=gen))
    ox = int(torch.randint(0, min(patch, width - patch + 1), (1,), generator=gen))
    gy, gx = (height - oy) // patch, (width - ox) // patch
    need = -(-n // (patch * patch))
    if gy * gx < need:
        raise ValueError(f"a {height}×{width} image holds {gy * gx} disjoint {patch}² patches, fewer than the "
                         f"{need} that {n} points need")
    cells = torch.randperm(gy * gx, generator=gen)[:need]
    r0 = oy + torch.div(cells, gx, rounding_mode="floor") * patch
    c0 = ox + (cells % gx) * patch
    d = torch.arange(patch)
    rows = (r0[:, None, None] + d[None, :, None]).expand(-1, patch, patch)
    cols = (c0[:, None, None] + d[None, None, :]).expand(-1, patch, patch)
    return (rows * width + cols).reshape(-1)[:n]


POINT_LAYOUTS = ("uniform", "patches")


def make_batch(items, cfg: InfBrushConfig, sched: CosineSchedule, gen: torch.Generator, device,
               t: list[int] | None = None, drop: list[bool] | None = None, points: str = "uniform",
               patch_px: int = 32, prior: NoisePrior | None = None, mpp: float = 0.5, level: int = 1) -> dict:
    """Noisy smoothed values at sampled pixels and their targets for a list of (image uint8 (3,H,W), embedding).

    points: "uniform" (the paper: pixels uniformly without replacement) or "patches" (:func:`sample_patches`).
    prior: the noise prior (None or white: A ξ and A u₀ as before); any other prior replaces A ξ by Q^{1/2} ξ drawn
    at the image's µm/px ``mpp`` and the data is not mollified (Q already makes the noise trace class).
    level: 2 (or 4, …) trains on the images Fourier-downsampled by that factor (values kept: the isometric
    downsampling / factor) at mpp × level, with the prior's noise drawn at that µm/px (multilevel training)."""
    if points not in POINT_LAYOUTS:
        raise ValueError(f"points must be one of {', '.join(POINT_LAYOUTS)}, not {points!r}")
    N = cfg.n_points
    u_t, target, px, xy, ts, embs, poss, sizes, windows = [], [], [], [], [], [], [], [], []
    for b, (img, emb) in enumerate(items):
        img = img.to(device).float() / 127.5 - 1
        if level > 1:
            img = (fourier_downsample(img.cpu(), level, dims=(1, 2)) / level).float().to(device)
        _, H, W = img.shape
        if H * W < N:
            raise ValueError(f"image {b} of the batch has {H}×{W} = {H * W} pixels"
                             f"{f' at level {level}' if level > 1 else ''}, fewer than n_points = {N}")
        flat = (sample_pixels(N, H * W, gen) if points == "uniform" else
                sample_patches(N, H, W, patch_px, gen)).to(device)
        rows, cols = torch.div(flat, W, rounding_mode="floor"), flat % W
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
        if prior is None or prior.kind == "white":
            moll = Mollifier.for_side(max(H, W), cfg.mollify_sigma, cfg.train_resolution)
            a_u0 = moll.at_points(lambda rr, cc: img[:, rr, cc].movedim(0, -1), rows, cols, H, W)
            a_xi = moll.at_points(lambda rr, cc: gaussian_noise(seed, 0, rr, cc), rows, cols, H, W) * moll.noise_mul
        else:
            a_u0 = img[:, rows, cols].movedim(0, -1)
            a_xi = prior.at_points(seed, 0, rows.cpu(), cols.cpu(), H, W, mpp * level).to(device)
        ti = int(torch.randint(0, cfg.timesteps, (1,), generator=gen)) if t is None else int(t[b])
        ab = float(sched.alpha_bar[ti])
        u_t.append(math.sqrt(ab) * a_u0 + math.sqrt(1 - ab) * a_xi)
        target.append(a_xi)
        px.append(torch.stack([rows, cols], dim=-1).float())
        xy.append(pixel_to_unit(rows, cols, H, W))
        ts.append(ti)
        gh, gw = emb.shape[:2]
        embs.append(emb.reshape(gh * gw, -1))
        poss.append(token_positions(gh, gw, H, W))
        windows.append(canvas_window(H, W))
        sizes.append((H, W))
    if len({e.shape for e in embs}) > 1:
        raise ValueError("all embeddings of a batch must have the same shape")
    B = len(items)
    dflags = (torch.rand(B, generator=gen) < cfg.cond_drop) if drop is None else torch.tensor(drop)
    return dict(u_t=torch.stack(u_t), target=torch.stack(target), px=torch.stack(px), xy=torch.stack(xy).to(device),
                t=torch.tensor(ts, device=device), emb=torch.stack(embs).to(device),
                pos=torch.stack(poss).to(device), drop=dflags.to(device), sizes=sizes, grid=(gh, gw),
                window=torch.tensor(windows, dtype=torch.float32, device=device))


def batch_loss(model: InfBrushDenoiser, batch: dict, cfg: InfBrushConfig, lam: torch.Tensor | None = None):
    hs, ws = [s[0] for s in batch["sizes"]], [s[1] for s in batch["sizes"]]
    geo = point_geometry(batch["px"], cfg.knn_k, hs, ws)
    pairs = points_grid_pairs(batch["px"], hs, ws, cfg.grid_size, cfg.grid_knn)
    ctx = model.context(batch["t"], batch["emb"], batch["pos"], batch["drop"], grid=batch["grid"],
                        window=batch["window"])
    pred = model(batch["u_t"], batch["xy"], ctx, geo, pairs)
    per_item = ((pred.float() - batch["target"]) ** 2).mean(dim=(1, 2))
    if lam is not None:
        per_item = per_item * lam.to(per_item.device)[batch["t"]]
    return per_item.mean()


@torch.no_grad()
def evaluate_loss(model: InfBrushDenoiser, dataset, cfg: InfBrushConfig, n: int = 8, seed: int = 1234,
                  device="cpu", layout: tuple[int, int] | None = None, points: str = "uniform",
                  patch_px: int = 32, prior: NoisePrior | None = None, mpp: float = 0.5, level: int = 1) -> float:
    """Deterministic held-out loss: fixed items, points, noise and evenly spread timesteps, condition kept.
    layout: the grid layout of a dataset with several (:class:`EncodedRegions`)."""
    was = model.training
    model.eval()
    sched = CosineSchedule(cfg.timesteps)
    gen = torch.Generator().manual_seed(seed)
    items = [_item(dataset, i % len(dataset), layout) for i in range(n)]
    ts = [int((j + 0.5) * cfg.timesteps / n) for j in range(n)]
    batch = make_batch(items, cfg, sched, gen, device, t=ts, drop=[False] * n, points=points, patch_px=patch_px,
                       prior=prior, mpp=mpp, level=level)
    loss = float(batch_loss(model, batch, cfg))
    model.train(was)
    return loss


def _item(dataset, i: int, layout: tuple[int, int] | None, gen: torch.Generator | None = None):
    if isinstance(dataset, EncodedRegions):
        return dataset.item(i, layout, gen)
    return dataset.item(i) if layout is None else dataset.item(i, layout)


# ---------------------------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainOptions:
    out: Path
    config: InfBrushConfig
    data: Path | None = None
    synthetic: int = 0
    synthetic_sizes: tuple = ((64, 64), (48, 80))
    synthetic_mosaic: tuple = (1, 1)   # cells of random classes per synthetic image (regions for grids)
    embed: Callable | None = None      # encoder embed(tiles uint8 (N, H, W, 3)) → (N, D): conditions from pixels
    grids: tuple = ((1, 1),)           # layouts of those conditions, one drawn per step ((1, 1): a global vector)
    tile_px: int = 224                 # side each region is resized to for the encoder
    regions: str = "resize"            # a region's vector: "resize" (paper) or "tiles" (mean of native tiles)
    single_tile_p: float = 0.0         # "tiles": chance that a region's vector is one random tile's instead
    image_cache_mb: float = 2048       # decoded images of a --data folder kept in memory (ImageFolderDataset)
    points: str = "uniform"            # training pixels: "uniform" (paper) or "patches" (dense squares)
    patch_px: int = 32                 # side of those squares
    prototype_classes: tuple = ()      # subtype names = the encoder's class prototypes (not QuiltNet's prompts)
    name: str = "infinity-brush"
    steps: int = 1000
    batch_size: int = 4
    lr: float = 5e-5
    betas: tuple = (0.9, 0.99)
    ema: float = 0.995
    ema_every: int = 10
    grad_clip: float = 1.0
    save_every: int = 1000
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    amp: str | None = None
    progress: bool = True
    native_mpp: float = 0.5
    command: str = ""
    extra: dict = field(default_factory=dict)
    noise_prior: NoisePrior | None = None   # None: white (A ξ); its reference_mpp is set to native_mpp
    levels: int = 1                    # 2: multilevel — the first coarse_fraction of the steps at half resolution
    coarse_fraction: float = 0.5       # the paper's warm start: half the epochs at the coarse level
    init: Path | None = None           # warm start: an ∞-Brush model folder with the same configuration


def _dataset(opts: TrainOptions):
    """(dataset, description, layouts it was trained on) — the conditions from sidecar files or the synthetic
    classes, or computed from pixels by ``opts.embed`` in every layout of ``opts.grids``."""
    cfg = opts.config
    grids = tuple((int(r), int(c)) for r, c in opts.grids)
    encode = opts.embed is not None or grids != ((1, 1),)
    if opts.data is not None:
        if encode and opts.embed is None:
            raise ValueError("grids of conditions computed from pixels need an encoder (--embed); a folder's own "
                             "grids are its (rows, cols, D) .npy files")
        base = ImageFolderDataset(opts.data, cfg.embedding_dim, embeddings=not encode, cache_mb=opts.image_cache_mb)
        desc = str(opts.data)
    elif opts.synthetic > 0:
        base = SyntheticFunctions(opts.synthetic, sizes=opts.synthetic_sizes, seed=opts.seed,
                                  embedding_dim=cfg.embedding_dim, mosaic=tuple(opts.synthetic_mosaic))
        desc = f"synthetic functions (n={opts.synthetic}, sizes={list(opts.synthetic_sizes)}"
        desc += f", mosaic {opts.synthetic_mosaic[0]}×{opts.synthetic_mosaic[1]})" if base.mosaic != (1, 1) else ")"
    else:
        raise ValueError("give --data FOLDER (images + .npy embeddings) or --synthetic N")
    if not encode:
        layouts = {tuple(base.item(0)[1].shape[:2])} if isinstance(base, SyntheticFunctions) else \
            {tuple(e.shape[:2]) for e in base.embeddings}
        return base, desc, sorted(layouts)
    embed = opts.embed if opts.embed is not None else base.colour_encoder() if isinstance(
        base, SyntheticFunctions) else None
    ds = EncodedRegions(base, embed, cfg.embedding_dim, layouts=grids, tile_px=opts.tile_px, regions=opts.regions,
                        single_tile_p=opts.single_tile_p)
    name = getattr(opts.embed, "__qualname__", "the synthetic colour encoder") if opts.embed else \
        "the synthetic colour encoder"
    how = f"regions resized to {opts.tile_px}²" if opts.regions == "resize" else \
        f"the normalised mean over up to 16 native {opts.tile_px}² tiles of each region"
    if opts.single_tile_p > 0:
        how += f" (or, with p = {opts.single_tile_p:g} per region, one of those tiles)"
    desc += f"; conditions: {name} on {how}, layouts " + ", ".join(f"{r}×{c}" for r, c in ds.layouts)
    return ds, desc, ds.layouts


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def train_infbrush(opts: TrainOptions) -> dict:
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    cfg, out, device = opts.config, Path(opts.out), torch.device(opts.device)
    state_dir = out / "train_state"
    prior = None
    if opts.noise_prior is not None and opts.noise_prior.kind != "white":
        prior = replace(opts.noise_prior, reference_mpp=float(opts.native_mpp)).validate()
    prior_dict = prior.to_dict() if prior is not None else NoisePrior().to_dict()
    if opts.levels not in (1, 2):
        raise ValueError(f"levels must be 1 or 2, got {opts.levels}")
    if not 0 < opts.coarse_fraction < 1:
        raise ValueError(f"coarse_fraction must be in (0, 1), got {opts.coarse_fraction}")
    coarse_steps = int(round(opts.coarse_fraction * opts.steps)) if opts.levels == 2 else 0
    dataset, data_desc, layouts = _dataset(opts)
    # a model that never saw a grid has no reason to follow one: its card offers grids only when it did
    conditioning = ["embedding", "embedding_grid", "subtype"] if any(r * c > 1 for r, c in layouts) else \
        ["embedding", "subtype"]
    torch.manual_seed(opts.seed)
    model = InfBrushDenoiser(cfg).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=opts.lr, betas=tuple(opts.betas))
    gen = torch.Generator().manual_seed(opts.seed)
    step, elapsed = 0, 0.0
    init_info = None
    if opts.init is not None and not state_dir.exists():
        from models.infbrush.pipeline import load_infbrush

        base = load_infbrush(opts.init)
        if base.config.to_dict() != cfg.to_dict():
            diff = sorted(k for k, v in cfg.to_dict().items() if base.config.to_dict().get(k) != v)
            raise ValueError(f"--init {opts.init}: its configuration differs in {', '.join(diff)}")
        sd = base.denoiser.state_dict()
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        ema.load_state_dict({k: v.float() for k, v in sd.items()})
        init_info = {"model": base.card.name, "files": dict(base.card.files),
                     "noise_prior": base.card.config.get("noise_prior", NoisePrior().to_dict())}
    if state_dir.exists():
        if not opts.resume:
            raise FileExistsError(f"{out} already holds a training run; pass --resume or choose another --out")
        saved = json.loads((state_dir / "state.json").read_text())
        saved_prior = saved.get("options", {}).get("noise_prior") or NoisePrior().to_dict()
        if saved_prior != prior_dict:
            raise ValueError(f"--resume with a different noise prior: the run in {out} was started with "
                             f"{saved_prior}, not {prior_dict}")
        init_info = saved.get("options", {}).get("init_model")
        if saved["config"] != cfg.to_dict():
            diff = sorted(k for k in set(saved["config"]) | set(cfg.to_dict())
                          if saved["config"].get(k) != cfg.to_dict().get(k))
            raise ValueError(f"--resume with a different configuration (keys {', '.join(diff)}); "
                             f"the run in {out} was started with its own config")
        raw = load_file(str(state_dir / "model.safetensors"))
        check_state_dict(model.state_dict(), raw, str(state_dir / "model.safetensors"))
        model.load_state_dict(raw)
        ema_sd = load_file(str(out / "denoiser.safetensors"))
        check_state_dict(ema.state_dict(), ema_sd, str(out / "denoiser.safetensors"))
        ema.load_state_dict(ema_sd)
        aux = torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(aux["optimizer"])
        gen.set_state(aux["generator"])
        step, elapsed = int(saved["step"]), float(saved.get("elapsed_s", 0.0))
    elif opts.resume:
        raise FileNotFoundError(f"--resume: no training state in {state_dir}")

    sched = CosineSchedule(cfg.timesteps)
    lam = sched.lambda_weights() if cfg.loss_weighting == "lambda" else None
    log_path = out / "train_log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []

    def save():
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / "model.safetensors.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, state_dir / "model.safetensors")
        torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state()}, state_dir / "optimizer.pt.tmp")
        os.replace(state_dir / "optimizer.pt.tmp", state_dir / "optimizer.pt")
        training = {"command": opts.command, "device": str(device), "steps": step, "batch_size": opts.batch_size,
                    "points_per_image": cfg.n_points, "point_layout": opts.points,
                    "patch_px": opts.patch_px if opts.points == "patches" else None,
                    "region_embedding": opts.regions,
                    "single_tile_p": opts.single_tile_p, "lr": opts.lr, "betas": list(opts.betas), "ema": opts.ema,
                    "ema_every": opts.ema_every, "grad_clip": opts.grad_clip, "seed": opts.seed,
                    "duration_s": round(elapsed, 1), "last_loss": losses[-1] if losses else None,
                    "noise_prior": prior_dict, "levels": opts.levels,
                    "coarse_steps": coarse_steps, "coarse_mpp": opts.native_mpp * 2 if coarse_steps else None}
        if init_info is not None:
            training["init"] = init_info
        card = make_card(cfg, name=opts.name, trained=True, training=training, training_data=data_desc,
                         native_mpp=opts.native_mpp, conditioning=conditioning,
                         prototype_classes=list(opts.prototype_classes) or None, noise_prior=prior)
        save_infbrush(InfBrushModels(card=card, denoiser=ema), out)
        # not asdict(): it would deep-copy the encoder behind opts.embed
        opt_dict = {f.name: (list(v) if isinstance(v, tuple) else v) for f in fields(opts)
                    if f.name not in ("config", "out", "data", "embed", "noise_prior", "init")
                    for v in (getattr(opts, f.name),)}
        opt_dict["embed"] = getattr(opts.embed, "__qualname__", None) if opts.embed is not None else None
        opt_dict["noise_prior"] = prior_dict
        opt_dict["init"] = str(opts.init) if opts.init is not None else None
        opt_dict["init_model"] = init_info
        _write_json_atomic(state_dir / "state.json", {"step": step, "elapsed_s": elapsed, "config": cfg.to_dict(),
                                                      "options": json.loads(json.dumps(opt_dict, default=str))})

    model.train()
    bar = tqdm(total=opts.steps, initial=step, disable=not opts.progress, desc="train infinity-brush", unit="step")
    use_amp = opts.amp is not None and device.type == "cuda"
    while step < opts.steps:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(dataset), (opts.batch_size,), generator=gen).tolist()
        layout = None  # one layout per step: a batch stacks its conditions
        if isinstance(dataset, EncodedRegions):
            layout = dataset.layouts[int(torch.randint(0, len(dataset.layouts), (1,), generator=gen))]
        batch = make_batch([_item(dataset, i, layout, gen) for i in idx], cfg, sched, gen, device, points=opts.points,
                           patch_px=opts.patch_px, prior=prior, mpp=opts.native_mpp,
                           level=2 if step < coarse_steps else 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = batch_loss(model, batch, cfg, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        opt.step()
        step += 1
        if step % opts.ema_every == 0:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - opts.ema)
        losses.append(float(loss.detach()))
        elapsed += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % opts.log_every == 0 or step == opts.steps:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": losses[-1], "elapsed_s": round(elapsed, 2),
                                    "level": 2 if step <= coarse_steps else 1}) + "\n")
        if step % opts.save_every == 0 and step < opts.steps:
            save()
    bar.close()
    save()
    return {"steps": step, "losses": losses, "out": str(out), "model": model, "ema": ema, "dataset": dataset}
