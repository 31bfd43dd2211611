"""Tiled VAE decoding of latents of any size, streamed as row-major pixel bands.

Modes (``window=``):

* ``"hann"``  — periodic Hann window at exactly 50 % overlap (``overlap == tile / 2``).
* ``"tukey"`` — flat top with raised-cosine ramps exactly as long as the overlap (any ``0 <= overlap <= tile/2``;
  ``overlap = 0`` gives hard tiles).  Hann at 50 % is the special case ``overlap == tile / 2``.
* ``"four-pass"`` — DiffInfinite's paper scheme (serving/diffinfinite reference §10): four decodes of
  non-overlapping tiles (base grid, half-tile shifts in x, y and both) blended sequentially with a
  symmetric Hann of the tile length; ``overlap`` is ignored.

Overlap-add windows form an exact partition of unity over the whole canvas (edge-aware: the half of a
border tile that faces the canvas edge has weight 1), so no weight buffer or division is needed and a
constant decode reproduces a constant image.  Tiles sit on a uniform stride ``tile - overlap`` except the
last tile of each axis, which is placed flush with the canvas border (no padded junk is decoded); its
rising ramp stays where a uniform grid would put it, with zero weight before it.  Latents smaller than one
tile are edge-replicated up to the tile size and the output is cropped.

Memory (overlap modes): the decoded image never exists whole, nor does a full tile row in float32.  What
exists at a time is one band (the rows a tile row finalises, uint8, output width), a float32 carry of the
rows two tile rows share (at most ``overlap * scale`` rows of the output width) and a float32 window of one
batch of tiles.  At 100000 px wide with the production geometry (tile 64, overlap 6) that is about
140 + 58 + 16 MB; a full-width float32 tile row would be 614 MB.  The paper's four-pass mode is streamed
the same way except for what its shifted grid forces: the lower halves of passes H and X (half a tile high,
full width, float32) are carried to the next tile row, and a tile row yields two uint8 half-tile bands.  At
100000 px wide with tile 64 that is 2 × 307 + 2 × 77 MB (about 1 GB peak measured; keeping a full strip of
every pass, as before, peaked at 4.9 GB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from models.kernels.overlap_add import overlap_add
from models.runtime import CancelFn, ProgressFn, check_cancel

DecodeFn = Callable[[torch.Tensor], torch.Tensor]
WINDOWS = ("hann", "tukey", "four-pass")


@runtime_checkable
class TileDecoder(Protocol):
    """What :class:`TiledDecoder` decodes tiles with when a tile's pixels depend on more than its own latent
    (e.g. :class:`models.context_decoding.SlideContextDecoder`). ``prepare`` runs once per latent, before the
    first tile; ``prepare_cost`` is its work in tiles (for progress); ``decode_tiles`` returns the pixels
    [B, C, tile·scale, tile·scale] of the tiles of side ``tile`` at latent ``positions`` (y, x)."""

    latent_channels: int

    def check_latent(self, latent: torch.Tensor) -> None: ...

    def prepare_cost(self, h: int, w: int, tile: int) -> int: ...

    def prepare(self, latent: torch.Tensor, cancel: CancelFn | None = None,
                progress: ProgressFn | None = None) -> None: ...

    def decode_tiles(self, latent: torch.Tensor, positions: Sequence[tuple[int, int]], tile: int) -> torch.Tensor: ...


class FunctionTileDecoder:
    """A :class:`TileDecoder` from a plain ``decode_fn`` of latent tiles [B, C, t, t] → pixels: each tile is
    decoded from its own latent alone (no preparation)."""

    def __init__(self, decode_fn: DecodeFn, latent_channels: int | None = None):
        self.decode_fn = decode_fn
        self.latent_channels = latent_channels

    def check_latent(self, latent: torch.Tensor) -> None:
        if self.latent_channels is not None and latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent has {latent.shape[1]} channels; this decoder decodes {self.latent_channels}")

    def prepare_cost(self, h: int, w: int, tile: int) -> int:
        return 0

    def prepare(self, latent, cancel=None, progress=None) -> None:
        return None

    def decode_tiles(self, latent: torch.Tensor, positions: Sequence[tuple[int, int]], tile: int) -> torch.Tensor:
        return self.decode_fn(torch.stack([latent[0, :, y:y + tile, x:x + tile] for y, x in positions]))


def check_finite(latent: torch.Tensor) -> None:
    """ValueError naming NaN / Inf values of a latent [1, C, h, w] and where the first one is."""
    bad = ~torch.isfinite(latent)
    if bool(bad.any()):
        kinds = " and ".join(n for n, t in (("NaN", torch.isnan(latent)), ("Inf", torch.isinf(latent)))
                             if bool(t.any()))
        y, x = (int(v) for v in torch.nonzero(bad[0].any(0))[0])
        raise ValueError(f"latent contains {kinds} ({int(bad.sum())} values, first at latent (y, x) = "
                         f"({y}, {x})); refusing to decode it")


def rising_ramp(length: int) -> np.ndarray:
    """Raised-cosine rise ``sin²(π j / 2L)``, j = 0 … L−1 (the first half of a periodic Hann of 2L)."""
    j = np.arange(length, dtype=np.float64)
    return np.sin(np.pi * j / (2 * length)) ** 2 if length > 0 else np.zeros(0)


@dataclass(frozen=True)
class AxisPlan:
    """Tile placement along one axis (latent units) and each tile's 1-D pixel window."""

    length: int              # latent length actually tiled (≥ tile; padded when the input was shorter)
    tile: int
    overlap: int
    scale: int
    starts: tuple[int, ...]  # latent start of every tile
    windows: np.ndarray      # float32 [n, tile*scale]

    @property
    def count(self) -> int:
        return len(self.starts)

    def active(self, k: int) -> tuple[int, int]:
        """Tile-local pixel range where tile ``k``'s window is non-zero."""
        nz = np.flatnonzero(self.windows[k])
        return (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)


def plan_axis(length: int, tile: int, overlap: int, scale: int, margin_px: int = 0) -> AxisPlan:
    """Place tiles over ``length`` latent px (uniform stride, last tile flush) and build their windows.

    Within each overlap of ``overlap·scale`` px the cross-fade is a raised-cosine ramp of
    ``overlap·scale − 2·margin_px`` px centred in the overlap; the outer ``margin_px`` px of each tile on
    that side get weight 0 (a context crop that discards the decoder's border artefacts; ``margin_px = 0``
    — the default — makes the ramp exactly as long as the overlap).  Canvas borders keep weight 1.
    The windows sum to exactly one (up to float32 rounding) at every output pixel of the axis.
    """
    if length < 1:
        raise ValueError(f"axis length must be ≥ 1, got {length}")
    if not 0 <= overlap <= tile // 2:
        raise ValueError(f"overlap must be in [0, tile/2] = [0, {tile // 2}], got {overlap}")
    if not 0 <= 2 * margin_px <= overlap * scale:
        raise ValueError(f"margin_px must be in [0, overlap·scale/2] = [0, {overlap * scale // 2}], got {margin_px}")
    n_len = max(length, tile)
    stride = tile - overlap
    n = 1 if n_len <= tile else math.ceil((n_len - overlap) / stride)
    starts = [k * stride for k in range(n - 1)] + [n_len - tile]
    tp = tile * scale
    lp = overlap * scale - 2 * margin_px  # ramp length
    ramp = rising_ramp(lp)
    windows = np.ones((n, tp), np.float64)
    for k in range(n):
        if k < n - 1:  # falling ramp near the end of tile k (where the uniform grid puts it), then zeros
            a = tp - margin_px - lp  # tile-local ramp start
            windows[k, a:a + lp] = 1.0 - ramp
            windows[k, a + lp:] = 0.0
        if k > 0:  # rising ramp matching the previous tile's falling ramp; zeros before it
            a = starts[k - 1] * scale + tp - margin_px - lp  # canvas px
            loc = a - starts[k] * scale
            windows[k, :loc] = 0.0
            windows[k, loc:loc + lp] = ramp
    return AxisPlan(n_len, tile, overlap, scale, tuple(starts), windows.astype(np.float32))


def paper_hann(length: int) -> np.ndarray:
    """DiffInfinite's symmetric Hann: ``0.5 (1 − cos(2π i / (L − 1)))``, i = 0 … L−1."""
    i = np.arange(length, dtype=np.float64)
    return 0.5 * (1.0 - np.cos(2.0 * np.pi * i / (length - 1)))


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] → uint8 tensor of the same shape, round-half-up (clamped first)."""
    return x.clamp(0.0, 1.0).mul_(255.0).add_(0.5).floor_().to(torch.uint8)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3, rows, cols] float in [0, 1] → C-contiguous uint8 (rows, cols, 3), round-half-up."""
    return np.ascontiguousarray(quantise(x).permute(1, 2, 0).cpu().numpy())


class TiledDecoder:
    """Decode a latent [1, C, h, w] tile by tile into row-major bands of the (scale·h) × (scale·w) image.

    ``decode_fn`` maps a batch of latent tiles [B, C, t, t] to images [B, 3, scale·t, scale·t] with values in
    [0, 1], or is a :class:`TileDecoder` (prepared once per latent, given the tiles' positions).
    ``tile``/``overlap`` are in latent px.  ``batch_size`` tiles go through one ``decode_fn`` call
    (tiles of one tile row).  ``backend`` selects the overlap-add implementation (``auto``: Triton kernel on
    CUDA when importable, torch otherwise).
    """

    def __init__(self, decode_fn: DecodeFn, scale: int = 8, tile: int = 64, overlap: int = 32,
                 window: str = "hann", batch_size: int = 4, backend: str = "auto", out_channels: int = 3,
                 margin_px: int = 0):
        if window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}; choose one of {', '.join(WINDOWS)}")
        if scale < 1 or tile < 1 or batch_size < 1:
            raise ValueError(f"scale, tile and batch_size must be ≥ 1 (got {scale}, {tile}, {batch_size})")
        if window == "hann" and 2 * overlap != tile:
            raise ValueError(f"window 'hann' is a partition of unity only at 50 % overlap: overlap must be "
                             f"tile/2 = {tile / 2:g}, got {overlap} (use window='tukey' for other overlaps)")
        if window == "tukey" and not 0 <= overlap <= tile // 2:
            raise ValueError(f"window 'tukey' needs 0 ≤ overlap ≤ tile/2 = {tile // 2}, got {overlap}")
        if window == "four-pass" and (tile * scale) % 2:
            raise ValueError(f"four-pass decoding needs an even pixel tile, got {tile * scale}")
        if window == "four-pass" and tile % 2:
            raise ValueError(f"four-pass decoding shifts by tile/2 latent px: tile must be even, got {tile}")
        if window != "four-pass" and not 0 <= 2 * margin_px <= overlap * scale:
            raise ValueError(f"margin_px must be in [0, overlap·scale/2] = [0, {overlap * scale // 2}], "
                             f"got {margin_px}")
        self.margin_px = margin_px if window != "four-pass" else 0
        self.decode_fn = decode_fn
        self.tiles: TileDecoder = decode_fn if isinstance(decode_fn, TileDecoder) else FunctionTileDecoder(decode_fn)
        self.scale = scale
        self.tile = tile
        self.overlap = tile // 2 if window == "four-pass" else overlap
        self.window = window
        self.batch_size = batch_size
        self.backend = backend
        self.out_channels = out_channels
        self.decoder_calls = 0      # tiles decoded by the last run
        self.decode_fn_calls = 0    # decode_fn invocations by the last run
        self.backend_used: str | None = None

    # ------------------------------------------------------------------ planning
    def boundary_lines(self, h: int, w: int) -> tuple[list[int], list[int]]:
        """Output-pixel rows and columns where the blend of an h × w latent changes between tiles: the start
        and the end of every cross-fade ramp (overlap modes), or the tile edges of both shifted grids
        (four-pass), canvas borders left out. Where a seam would show."""
        def axis(n: int) -> list[int]:
            if self.window == "four-pass":
                half = self.tile * self.scale // 2
                return list(range(half, n * self.scale, half))
            plan = plan_axis(n, self.tile, self.overlap, self.scale, self.margin_px)
            tp, lp = self.tile * self.scale, self.overlap * self.scale - 2 * self.margin_px
            lines = set()
            for k in range(1, plan.count):  # as plan_axis places the ramp between tiles k − 1 and k
                a = plan.starts[k - 1] * self.scale + tp - self.margin_px - lp
                lines.update((a, a + lp))
            return sorted(p for p in lines if 0 < p < n * self.scale)
        return axis(h), axis(w)

    def cut_zones(self, h: int, w: int, width_px: int = 64) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Output-pixel zones [a, b) of rows and columns where one tile hands over to the next, for the quilt
        score (:mod:`evaluation.quilt`): each cross-fade ramp, or its central ``width_px`` when it is longer
        (Hann at 50 % fades everywhere); the four-pass mode's tile edges as zero-width zones."""
        if self.window == "four-pass":
            rows, cols = self.boundary_lines(h, w)
            return [(p, p) for p in rows], [(p, p) for p in cols]
        lp = self.overlap * self.scale - 2 * self.margin_px
        zone = min(lp, width_px)

        def axis(n: int) -> list[tuple[int, int]]:
            plan = plan_axis(n, self.tile, self.overlap, self.scale, self.margin_px)
            tp = self.tile * self.scale
            out = []
            for k in range(1, plan.count):
                a = plan.starts[k - 1] * self.scale + tp - self.margin_px - lp
                c0 = a + (lp - zone) // 2
                if 0 < c0 and c0 + zone < n * self.scale:
                    out.append((c0, c0 + zone))
            return out
        return axis(h), axis(w)

    def plans(self, h: int, w: int) -> tuple[AxisPlan, AxisPlan]:
        """Row and column tile plans for an h × w latent (overlap modes)."""
        return (plan_axis(h, self.tile, self.overlap, self.scale, self.margin_px),
                plan_axis(w, self.tile, self.overlap, self.scale, self.margin_px))

    def count_tiles(self, h: int, w: int) -> int:
        """Tiles a run over an h × w latent decodes."""
        if self.window == "four-pass":
            ny, nx = math.ceil(max(h, self.tile) / self.tile), math.ceil(max(w, self.tile) / self.tile)
            return (2 * ny - 1) * (2 * nx - 1)
        py, px = self.plans(h, w)
        return py.count * px.count

    def count_work(self, h: int, w: int) -> int:
        """Progress units of a run over an h × w latent: the tile decoder's preparation (in tiles) and the tiles."""
        if self.window == "four-pass":
            hp, wp = math.ceil(max(h, self.tile) / self.tile) * self.tile, math.ceil(max(w, self.tile) / self.tile) * self.tile
        else:
            hp, wp = max(h, self.tile), max(w, self.tile)
        return self.tiles.prepare_cost(hp, wp, self.tile) + self.count_tiles(h, w)

    def _prepare(self, lat: torch.Tensor, cancel, progress) -> int:
        """Prepare the tile decoder for the (padded) latent; returns the progress units it took."""
        cost = self.tiles.prepare_cost(lat.shape[2], lat.shape[3], self.tile)
        total = cost + self.count_tiles(*self._latent_hw)

        def sub(done: int, of: int) -> None:
            if progress is not None:
                progress(cost * done // max(of, 1), total)

        if progress is not None:
            progress(0, total)
        self.tiles.prepare(lat, cancel=cancel, progress=sub)
        return cost

    def overhead(self, h: int, w: int) -> float:
        """Decoded tiles ÷ non-overlapping tile count ceil(h/t)·ceil(w/t)."""
        return self.count_tiles(h, w) / (math.ceil(h / self.tile) * math.ceil(w / self.tile))

    # ------------------------------------------------------------------ decoding
    def _check_latent(self, latent: torch.Tensor) -> None:
        if not isinstance(latent, torch.Tensor):
            raise TypeError(f"latent must be a torch.Tensor, got {type(latent).__name__}")
        if latent.dim() != 4 or latent.shape[0] != 1 or latent.shape[2] < 1 or latent.shape[3] < 1:
            raise ValueError(f"latent must have shape [1, C, h, w] with h, w ≥ 1, got {tuple(latent.shape)}")
        if not latent.is_floating_point():
            raise ValueError(f"latent must be a floating-point tensor, got {latent.dtype}")
        self.tiles.check_latent(latent)
        check_finite(latent)

    def _decode(self, lat: torch.Tensor, where: list[tuple[int, int]], label: str) -> torch.Tensor:
        out = self.tiles.decode_tiles(lat, where, self.tile)
        tp = self.tile * self.scale
        expected = (len(where), self.out_channels, tp, tp)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"decode_fn returned {got} for {label} tiles at latent (y, x) {where}; "
                             f"expected {expected}")
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"decode_fn returned non-finite values for {label} tiles at latent (y, x) {where}")
        self.decoder_calls += len(where)
        self.decode_fn_calls += 1
        return out

    def iter_bands(self, latent: torch.Tensor, cancel: CancelFn | None = None,
                   progress: ProgressFn | None = None, output: str = "uint8",
                   crop: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """Yield consecutive row-major bands of the decoded image.

        ``output="uint8"``: C-contiguous uint8 (rows, scale·w, 3).  ``output="float32"``: float32 bands of
        the same shape, unclamped (for tests and measurements).  ``crop=(height, width)`` keeps only the
        top-left height × width pixels (for slide sizes that are not multiples of ``scale``); the bands then
        cover exactly ``height`` rows of ``width`` pixels.

        The latent and the arguments are checked when this is called (a ValueError names what is wrong), the
        decoding happens as the bands are taken; a :class:`TileDecoder`'s preparation comes first and counts
        in ``progress``.
        """
        self._check_latent(latent)
        if output not in ("uint8", "float32"):
            raise ValueError(f"output must be 'uint8' or 'float32', got {output!r}")
        full_h, full_w = latent.shape[2] * self.scale, latent.shape[3] * self.scale
        if crop is not None:
            ch, cw = int(crop[0]), int(crop[1])
            if not (1 <= ch <= full_h and 1 <= cw <= full_w):
                raise ValueError(f"crop {crop} must lie within the decoded {full_h} x {full_w} px image")
        else:
            ch, cw = full_h, full_w
        return self._bands(latent, cancel, progress, output, (ch, cw), (full_h, full_w))

    def _bands(self, latent, cancel, progress, output, crop, full) -> Iterator[np.ndarray]:
        (ch, cw), (full_h, full_w) = crop, full
        self.decoder_calls = 0
        self.decode_fn_calls = 0
        bands = (self._iter_four_pass(latent, cancel, progress, output) if self.window == "four-pass"
                 else self._iter_ola(latent, cancel, progress, output))
        if (ch, cw) == (full_h, full_w):
            yield from bands
            return
        rows = 0
        for band in bands:
            take = min(band.shape[0], ch - rows)
            if take > 0:
                yield np.ascontiguousarray(band[:take, :cw])
                rows += take
            if rows >= ch:
                bands.close()  # stop decoding: the rest would be cropped away
                if progress is not None:
                    total = self.count_work(latent.shape[2], latent.shape[3])
                    progress(total, total)
                return

    def decode(self, latent: torch.Tensor, **kw) -> np.ndarray:
        """Whole image at once (small latents only: concatenates :meth:`iter_bands`)."""
        return np.concatenate(list(self.iter_bands(latent, **kw)), axis=0)

    @staticmethod
    def _pixels(x: torch.Tensor, output: str) -> np.ndarray:
        """[C, rows, cols] float → (rows, cols, C) numpy array of the output dtype (not necessarily contiguous)."""
        q = quantise(x) if output == "uint8" else x.to(torch.float32)
        return q.permute(1, 2, 0).cpu().numpy()

    @classmethod
    def _emit(cls, x: torch.Tensor, output: str) -> np.ndarray:
        return np.ascontiguousarray(cls._pixels(x, output))

    def _padded(self, latent: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        h, w = latent.shape[2], latent.shape[3]
        if (hp, wp) == (h, w):
            return latent
        return F.pad(latent, (0, wp - w, 0, hp - h), mode="replicate")

    def _iter_ola(self, latent, cancel, progress, output) -> Iterator[np.ndarray]:
        # Streaming in both axes.  Tile row r's window is non-zero on canvas rows [A_r, Z_r); once row r is
        # added, rows [A_r, A_{r+1}) are final (row r+1 adds nothing above A_{r+1}, and row r−1 nothing below
        # A_{r+1}, as at most two tile rows overlap) and form the band yielded for row r, while rows
        # [A_{r+1}, Z_r) — one ramp, at most overlap·scale rows — are carried into row r+1 in float32.
        # Within a row the same holds for columns: batches of tiles are added into a float window that
        # starts where the previous batch left columns unfinished, and each batch finalises the columns up
        # to where the next tile's window begins.  Float memory is the carry (ramp × width) plus one window
        # (tile rows × a batch of tiles); the row's band is uint8 (or float32 for output="float32").
        s, t = self.scale, self.tile
        h, w = latent.shape[2], latent.shape[3]
        py, px = self.plans(h, w)
        lat = self._padded(latent, py.length, px.length)
        self._latent_hw = (h, w)
        prepared = self._prepare(lat, cancel, progress)
        out_h, out_w = h * s, w * s
        row_act = [py.active(k) for k in range(py.count)]  # tile-local non-zero ranges of the windows
        col_act = [px.active(k) for k in range(px.count)]
        rows = [(y * s + lo, y * s + hi) for y, (lo, hi) in zip(py.starts, row_act)]  # the same on the canvas
        cols = [(x * s + lo, x * s + hi) for x, (lo, hi) in zip(px.starts, col_act)]
        carry_h = max([rows[r][1] - rows[r + 1][0] for r in range(py.count - 1)], default=0)
        total = prepared + py.count * px.count
        wx_all = torch.from_numpy(px.windows)
        carry: torch.Tensor | None = None  # [C, carry_h, width]: rows below the last band, from the row above
        held = 0                           # rows of ``carry`` holding data for the current tile row
        done = prepared
        for r, y in enumerate(py.starts):
            top, bottom = rows[r]
            split = rows[r + 1][0] if r + 1 < py.count else bottom  # rows [top, split) are final after row r
            band_rows = max(0, min(split, out_h) - top)
            band = np.empty((band_rows, out_w, self.out_channels), np.uint8 if output == "uint8" else np.float32)
            wy_row = torch.from_numpy(py.windows[r])
            win: torch.Tensor | None = None   # float window over canvas columns [left, left + width)
            left = 0
            for c0 in range(0, px.count, self.batch_size):
                check_cancel(cancel)
                batch_cols = list(range(c0, min(c0 + self.batch_size, px.count)))
                where = [(y, px.starts[c]) for c in batch_cols]
                tiles = self._decode(lat, where, f"row {r}")
                if carry is None and carry_h:
                    carry = torch.empty(self.out_channels, carry_h, px.length * s, dtype=torch.float32,
                                        device=tiles.device)
                right = cols[batch_cols[-1]][1]
                win = self._extend_window(win, left, right, bottom - top, carry, held, tiles.device)
                wy = wy_row.to(win.device).expand(len(batch_cols), t * s)
                wx = wx_all[batch_cols].to(win.device)
                active = [(*row_act[r], *col_act[c]) for c in batch_cols]
                self.backend_used = overlap_add(win, tiles, wy, wx, [y * s - top] * len(batch_cols),
                                                [px.starts[c] * s - left for c in batch_cols], active,
                                                backend=self.backend)
                done += len(batch_cols)
                if progress is not None:
                    progress(done, total)
                last = batch_cols[-1] + 1 == px.count
                finish = right if last else cols[batch_cols[-1] + 1][0]  # columns [left, finish) are final
                if finish > left:
                    self._finalise(win[:, :, :finish - left], left, split - top, band, carry, output, out_w)
                    win = win[:, :, finish - left:]
                    left = finish
            held = bottom - split
            if band_rows:
                yield band

    def _extend_window(self, win: torch.Tensor | None, left: int, right: int, height: int,
                       carry: torch.Tensor | None, held: int, device) -> torch.Tensor:
        """The float window over canvas columns [left, right): the unfinished columns of ``win`` (which
        starts at ``left``), then new columns starting from the carried rows of the tile row above."""
        have = 0 if win is None else win.shape[2]
        new = torch.zeros(self.out_channels, height, right - left, dtype=torch.float32, device=device)
        if have:
            new[:, :, :have] = win
        if held:
            new[:, :held, have:] = carry[:, :held, left + have:right]
        return new

    def _finalise(self, part: torch.Tensor, left: int, split: int, band: np.ndarray, carry: torch.Tensor | None,
                  output: str, out_w: int) -> None:
        """Final columns of the window: rows [0, split) into the row's band (cropped to the image), rows
        below into the carry for the next tile row (the same columns of the carry were already read)."""
        if part.shape[1] > split:
            carry[:, :part.shape[1] - split, left:left + part.shape[2]] = part[:, split:]
        x1 = min(left + part.shape[2], out_w)
        if band.shape[0] and x1 > left:
            band[:, left:x1] = self._pixels(part[:, :band.shape[0], :x1 - left], output)  # one copy, into the band

    # ------------------------------------------------------------------ DiffInfinite four-pass
    def _iter_four_pass(self, latent, cancel, progress, output) -> Iterator[np.ndarray]:
        # Passes: A (base grid), V (shifted half a tile in x), H (in y), X (in both).  Output half-row k blends
        # A and V of tile row k // 2 and, on inner rows, H and X of tile row (k − 1) // 2.  Tile row a thus
        # finalises its own rows [a·tp, (a+1)·tp) — half-rows 2a and 2a+1 — given the lower halves of H and X
        # row a − 1, which are the only full-width float buffers (carried, half a tile high).  Within a row
        # each pass is decoded in batches of ``batch_size`` tiles from left to right; a batch finalises its
        # A tiles' columns, and the shifted passes keep their last tile for the next batch's left columns.
        # Per pixel the arithmetic is the paper's, in the paper's order (tests: test_four_pass_*).
        s, t = self.scale, self.tile
        tp, half_t = t * s, t // 2
        half = tp // 2
        h, w = latent.shape[2], latent.shape[3]
        ny, nx = math.ceil(max(h, t) / t), math.ceil(max(w, t) / t)
        lat = self._padded(latent, ny * t, nx * t)
        self._latent_hw = (h, w)
        prepared = self._prepare(lat, cancel, progress)
        out_h, out_w = h * s, w * s
        wp = nx * tp
        total = prepared + (2 * ny - 1) * (2 * nx - 1)
        done = prepared
        c, dev = self.out_channels, lat.device
        hann = torch.from_numpy(paper_hann(tp).astype(np.float32)).to(dev)
        wx = hann.repeat(nx - 1)  # over the inner columns [half, wp − half)
        wy_halves = (hann[half:, None], hann[:half, None])  # rows of half-row 2a (H row a − 1) and 2a + 1 (H row a)
        carry_h = torch.zeros(c, half, out_w, device=dev) if ny > 1 else None
        carry_x = torch.zeros_like(carry_h) if ny > 1 and nx > 1 else None

        def decode(name: str, row: int, y: int, j0: int, j1: int, shift: int) -> list[torch.Tensor]:
            nonlocal done
            if j1 <= j0:
                return []
            check_cancel(cancel)
            where = [(y, j * t + shift) for j in range(j0, j1)]
            out = self._decode(lat, where, f"pass {name} row {row}").to(dev, torch.float32)
            done += j1 - j0
            if progress is not None:
                progress(done, total)
            return list(out.unbind(0))

        for a in range(ny):
            ya, yh = a * t, a * t + half_t
            has_h = a < ny - 1
            halves = [k * half for k in (2 * a, 2 * a + 1) if k * half < out_h]
            bands = [np.empty((min(half, out_h - y0), out_w, c), np.uint8 if output == "uint8" else np.float32)
                     for y0 in halves]
            last_v: list[torch.Tensor] = []
            last_x: list[torch.Tensor] = []
            for j0 in range(0, nx, self.batch_size):
                j1 = min(j0 + self.batch_size, nx)
                a_seg = torch.cat(decode("A", a, ya, j0, j1, 0), dim=2)
                v_new = decode("V", a, ya, j0, min(j1, nx - 1), half_t)
                h_seg = torch.cat(decode("H", a, yh, j0, j1, 0), dim=2) if has_h else None
                x_new = decode("X", a, yh, j0, min(j1, nx - 1), half_t) if has_h else []
                # output columns: this batch [c0, e1); its inner part [lo, hi), which is `inner` of the batch,
                # `shifted` of the V and X segments (they start at column v0) and `wxs` of the weights
                c0, e1 = j0 * tp, min(j1 * tp, out_w)
                lo, hi = max(c0, half), min(e1, wp - half)
                v0 = (j0 - 1) * tp + half if j0 else half
                inner, shifted, wxs = slice(lo - c0, hi - c0), slice(lo - v0, hi - v0), wx[lo - half:hi - half]
                v_seg = torch.cat(last_v + v_new, dim=2) if nx > 1 else None
                x_seg = torch.cat(last_x + x_new, dim=2) if nx > 1 and has_h else None
                for off, band in enumerate(bands):
                    k = 2 * a + off
                    img = a_seg[:, off * half:(off + 1) * half, :e1 - c0].clone()
                    if hi > lo:
                        v = v_seg[:, off * half:(off + 1) * half, shifted]
                        img[:, :, inner] = (1 - wxs) * img[:, :, inner] + wxs * v
                    if 1 <= k <= 2 * ny - 2:
                        wy = wy_halves[off]
                        hh = carry_h[:, :, c0:e1] if off == 0 else h_seg[:, :half, :e1 - c0]
                        img = (1 - wy) * img + wy * hh
                        if hi > lo:
                            xx = carry_x[:, :, lo:hi] if off == 0 else x_seg[:, :half, shifted]
                            wc = wy * wxs[None, :]
                            img[:, :, inner] = (1 - wc) * img[:, :, inner] + wc * xx
                    band[:, c0:e1] = self._pixels(img[:, :band.shape[0]], output)
                if has_h:  # H and X row a's lower halves: read by half-row 2a + 2 (these columns were read above)
                    carry_h[:, :, c0:e1] = h_seg[:, half:, :e1 - c0]
                    if hi > lo:
                        carry_x[:, :, lo:hi] = x_seg[:, half:, shifted]
                last_v, last_x = (v_new or last_v)[-1:], (x_new or last_x)[-1:]
            yield from bands
            del bands  # before the next row allocates its own
        self.backend_used = "torch"
