"""Bounded-memory pyramid cascade shared by the TIFF and OME-Zarr writers.

Level geometry: ``W_l = W_{l-1} // 2``, ``H_l = H_{l-1} // 2`` (floor, like libvips) while the previous
level's longest side is ≥ ``min_size`` (1024): 16384² → 6 levels, 100000² → 8 levels.  Every reduced pixel
is the exact rounded 2×2 mean ``(a + b + c + d + 2) >> 2`` of the level above (OpenCV INTER_AREA at an
exact factor 2), computed from the original full-resolution pixels — never from re-decoded tiles.  A side
that has reached 1 px stays 1 px (a 4 × 16384 slide goes on to 1 × 2048, 1 × 1024, 1 × 512): it is averaged
along the other axis only, ``(a + b + 1) >> 1``.

:class:`PyramidCascade` takes level-0 tiles in row-major order and emits every tile of every level through
``on_tile(level, ty, tx, tile)`` as soon as it is complete.  It keeps, per reduced level, only the upper
half of one tile row plus one tile (≈ 1.5 · tile · width · 3 bytes over all levels: 77 MB at 100k² with
512-px tiles).  :class:`BandTiler` cuts full-width row bands of any height into level-0 tiles (one tile row
of buffer).  :class:`PyramidLayout` is the geometry a sink (:mod:`writers.writer`) is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

OnTile = Callable[[int, int, int, np.ndarray], None]


def pyramid_levels(width: int, height: int, min_size: int = 1024) -> list[tuple[int, int]]:
    """(width, height) of every level: halve (floor; a 1-px side stays 1) while the longest side is ≥ ``min_size``."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be ≥ 1 × 1, got {width} × {height}")
    levels = [(int(width), int(height))]
    while max(levels[-1]) >= min_size:
        w, h = levels[-1]
        levels.append((max(1, w // 2), max(1, h // 2)))
    return levels


def level_downsamples(levels: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(x, y) level-0 pixels per pixel of every level of :func:`pyramid_levels`: doubles per level, except
    along a side that had already reached 1 px (it is not halved, so its factor stops growing)."""
    factors = [(1, 1)] if levels else []
    for (pw, ph), _ in zip(levels, levels[1:]):
        fx, fy = factors[-1]
        factors.append((fx * 2 if pw > 1 else fx, fy * 2 if ph > 1 else fy))
    return factors


@dataclass(frozen=True)
class PyramidLayout:
    """The pyramid a sink receives: ``levels``, (width, height) of every level, level 0 first (see
    :func:`pyramid_levels`); ``tile``, the side of every (square) tile; ``mpp``, µm per level-0 pixel."""

    levels: list[tuple[int, int]]
    tile: int
    mpp: float

    @property
    def grid(self) -> list[tuple[int, int]]:
        """(tile rows, tile columns) of every level."""
        return [(math.ceil(h / self.tile), math.ceil(w / self.tile)) for (w, h) in self.levels]

    @property
    def downsamples(self) -> list[tuple[int, int]]:
        """(x, y) level-0 pixels per pixel of every level (:func:`level_downsamples`)."""
        return level_downsamples(self.levels)


def tile_size_for(width: int, height: int, tile: int = 512) -> int:
    """The tile side a slide of ``width`` × ``height`` px is written with: ``tile``, except for slides so small
    that libvips would refuse the file — it rejects tiles longer than twice the longest side rounded up to
    256 (tiff2vips.c's sanity limit), so a slide of at most 128 px gets 256-px tiles.  The smaller tile still
    holds the whole slide, so what callers feed does not change."""
    if not all(isinstance(v, (int, np.integer)) and v >= 1 for v in (width, height, tile)) or tile % 16:
        return tile  # invalid: PyramidCascade says what is wrong
    return min(int(tile), -(-2 * max(int(width), int(height)) // 256) * 256)


def downsample2x(img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Exact rounded 2×2 mean of a uint8 (h, w, c) array; odd last row/column dropped (floor).

    With ``out`` (an (h // 2, w // 2, c) uint8 array or view, e.g. a slice of a row buffer) the result is
    written there and ``out`` is returned.
    """
    h, w = img.shape[0] // 2, img.shape[1] // 2
    shape = (h, w) + img.shape[2:]
    if out is not None and out.shape != shape:
        raise ValueError(f"downsample2x: out has shape {out.shape}, expected {shape}")
    if h == 0 or w == 0:
        return np.zeros(shape, img.dtype) if out is None else out
    src = img[:2 * h, :2 * w]
    res = cv2.resize(src, (w, h), dst=out, interpolation=cv2.INTER_AREA)
    if out is None:
        return res.reshape(shape)
    if res is not out:  # a layout OpenCV could not write into (e.g. a 1-channel 3-D view): copy its result
        out[...] = res.reshape(shape)
    return out


def pad_tile(tile: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """C-contiguous (size, size, c) copy of ``tile``, edge tiles padded by edge replication.

    Written into ``out`` (a C-contiguous (size, size, c) array of the tile's dtype) when given, else into a
    new array; returns it.
    """
    th, tw = tile.shape[:2]
    if out is None:
        out = np.empty((size, size) + tile.shape[2:], tile.dtype)
    out[:th, :tw] = tile
    if tw < size:
        out[:th, tw:] = tile[:, tw - 1:tw]
    if th < size:
        out[th:] = out[th - 1:th]
    return out


class _Level:
    """Geometry and tile-assembly buffers of one reduced level."""

    def __init__(self, width: int, height: int, src_width: int, src_height: int, tile: int, channels: int):
        half = tile // 2
        self.width, self.height, self.tile = width, height, tile
        # a 1-px source side is not halved: its pixels are repeated once so the 2×2 mean averages the other axis
        self.repeat = (2 if src_height == 1 else 1, 2 if src_width == 1 else 1)
        self.rows = math.ceil(height / tile)
        self.cols = math.ceil(width / tile)
        # source tile rows/columns that contribute at least one pixel to this level
        self.src_rows = math.ceil(height / half) if height else 0
        self.src_cols = math.ceil(width / half) if width else 0
        self.upper = np.zeros((half, self.cols * tile, channels), np.uint8)  # upper half of the current tile row
        self.assembly = np.zeros((tile, tile, channels), np.uint8)
        self.emitted = 0

    def last_src_row(self, k: int) -> int:
        return min(2 * k + 1, self.src_rows - 1)

    def last_src_col(self, m: int) -> int:
        return min(2 * m + 1, self.src_cols - 1)


class PyramidCascade:
    """Row-major level-0 tiles in, every level's tiles out (each level in row-major order).

    ``on_tile(level, ty, tx, tile)`` receives a (th, tw, c) uint8 view that is only valid during the call
    (copy it to keep it).  ``push_tile`` validates shape, dtype and order and raises ``ValueError`` naming
    the tile otherwise.
    """

    def __init__(self, width: int, height: int, on_tile: OnTile, tile: int = 512, min_size: int = 1024,
                 channels: int = 3, keep_smallest: bool = True):
        if tile < 16 or tile % 16:
            raise ValueError(f"tile size must be a positive multiple of 16, got {tile}")
        self.levels = pyramid_levels(width, height, min_size)
        self.width, self.height, self.tile, self.channels = int(width), int(height), tile, channels
        self.on_tile = on_tile
        self.grid = [(math.ceil(h / tile), math.ceil(w / tile)) for (w, h) in self.levels]
        self._reduced = [None] + [
            _Level(w, h, *self.levels[i - 1], tile, channels) for i, (w, h) in enumerate(self.levels) if i > 0]
        self._next = (0, 0)
        self.tiles_in = 0
        sw, sh = self.levels[-1]
        self.smallest = np.zeros((sh, sw, channels), np.uint8) if keep_smallest else None

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def done(self) -> bool:
        return self._next is None

    def expected_shape(self, ty: int, tx: int) -> tuple[int, int, int]:
        t = self.tile
        return (min(t, self.height - ty * t), min(t, self.width - tx * t), self.channels)

    def push_tile(self, ty: int, tx: int, tile: np.ndarray) -> None:
        """Feed level-0 tile (ty, tx); tiles must arrive in row-major order."""
        if self._next is None:
            raise ValueError(f"tile ({ty}, {tx}): all {self.grid[0][0] * self.grid[0][1]} tiles were already written")
        if (ty, tx) != self._next:
            raise ValueError(f"tile ({ty}, {tx}) out of order: expected tile {self._next} (row-major order)")
        if not isinstance(tile, np.ndarray):
            raise ValueError(f"tile ({ty}, {tx}): expected a numpy array, got {type(tile).__name__}")
        if tile.dtype != np.uint8:
            raise ValueError(f"tile ({ty}, {tx}): dtype {tile.dtype}, expected uint8")
        exp = self.expected_shape(ty, tx)
        if tile.shape != exp:
            raise ValueError(f"tile ({ty}, {tx}): shape {tile.shape}, expected {exp} "
                             f"(image {self.width} x {self.height}, tile {self.tile})")
        rows, cols = self.grid[0]
        self._next = (ty, tx + 1) if tx + 1 < cols else ((ty + 1, 0) if ty + 1 < rows else None)
        self.tiles_in += 1
        self._emit(0, ty, tx, tile)

    def _emit(self, level: int, ty: int, tx: int, tile: np.ndarray) -> None:
        self.on_tile(level, ty, tx, tile)
        if level == len(self.levels) - 1:
            if self.smallest is not None:
                t = self.tile
                self.smallest[ty * t:ty * t + tile.shape[0], tx * t:tx * t + tile.shape[1]] = tile
            return
        self._feed(level + 1, ty, tx, tile)

    def _feed(self, level: int, r: int, c: int, src: np.ndarray) -> None:
        lv = self._reduced[level]
        if r >= lv.src_rows or c >= lv.src_cols:
            return  # a 1-px sliver of the level above: dropped by the floor halving
        half = self.tile // 2
        k, hr = divmod(r, 2)
        m, hc = divmod(c, 2)
        if lv.repeat != (1, 1):
            src = np.repeat(np.repeat(src, lv.repeat[0], axis=0), lv.repeat[1], axis=1)
        dh, dw = src.shape[0] // 2, src.shape[1] // 2
        # downsampled straight into the level's buffers: no temporary per tile
        if hr == 0:
            downsample2x(src, out=lv.upper[:dh, c * half:c * half + dw])
        else:
            downsample2x(src, out=lv.assembly[half:half + dh, hc * half:hc * half + dw])
        if r == lv.last_src_row(k) and c == lv.last_src_col(m):
            t = self.tile
            th, tw = min(t, lv.height - k * t), min(t, lv.width - m * t)
            lv.assembly[:min(half, th), :tw] = lv.upper[:min(half, th), m * t:m * t + tw]
            lv.emitted += 1
            self._emit(level, k, m, lv.assembly[:th, :tw])

    def check_complete(self) -> None:
        """Raise ``ValueError`` unless every level-0 tile (and so every tile of every level) was emitted."""
        rows, cols = self.grid[0]
        if self._next is not None:
            raise ValueError(f"slide incomplete: {self.tiles_in} of {rows * cols} level-0 tiles written, "
                             f"next expected tile {self._next}")
        for i in range(1, len(self.levels)):
            r, c = self.grid[i]
            if self._reduced[i].emitted != r * c:  # pragma: no cover - internal consistency
                raise RuntimeError(f"level {i}: emitted {self._reduced[i].emitted} of {r * c} tiles")


class BandTiler:
    """Full-width row bands of any height in → level-0 tiles out (row-major) via ``push(ty, tx, tile)``.

    Holds one tile row (tile × width × c bytes).  Validates dtype/shape/overflow with clear errors.
    """

    def __init__(self, width: int, height: int, push: Callable[[int, int, np.ndarray], None], tile: int = 512,
                 channels: int = 3):
        self.width, self.height, self.tile, self.channels = int(width), int(height), tile, channels
        self.push = push
        self.rows_done = 0
        self._buf = np.empty((min(tile, height), width, channels), np.uint8)
        self._fill = 0
        self._ty = 0

    def write_band(self, band: np.ndarray) -> None:
        if not isinstance(band, np.ndarray):
            raise ValueError(f"band at row {self.rows_done}: expected a numpy array, got {type(band).__name__}")
        if band.dtype != np.uint8:
            raise ValueError(f"band at row {self.rows_done}: dtype {band.dtype}, expected uint8")
        if band.ndim != 3 or band.shape[1] != self.width or band.shape[2] != self.channels:
            raise ValueError(f"band at row {self.rows_done}: shape {band.shape}, expected (rows, {self.width}, "
                             f"{self.channels})")
        if self.rows_done + band.shape[0] > self.height:
            raise ValueError(f"band at row {self.rows_done} with {band.shape[0]} rows overflows the image height "
                             f"{self.height}")
        pos = 0
        while pos < band.shape[0]:
            t = self.tile
            row_h = min(t, self.height - self._ty * t)
            n = min(row_h - self._fill, band.shape[0] - pos)
            self._buf[self._fill:self._fill + n] = band[pos:pos + n]
            self._fill += n
            pos += n
            self.rows_done += n
            if self._fill == row_h:
                for tx in range(math.ceil(self.width / t)):
                    self.push(self._ty, tx, self._buf[:row_h, tx * t:(tx + 1) * t])
                self._ty += 1
                self._fill = 0

    @property
    def complete(self) -> bool:
        return self.rows_done == self.height
