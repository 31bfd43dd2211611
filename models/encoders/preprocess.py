"""Tiles → the square the encoder sees; torch-free, so the API prepares tiles exactly as ``embed`` does.

The transform is OpenCLIP's: resize so the shorter side is ``input_size`` (the longer one ``int(size · long /
short)``), then cut the centred ``input_size`` square (top/left offset ``round((side − size) / 2)``).
``bicubic`` is PIL's bicubic (what OpenCLIP's torchvision pipeline runs on PIL images); ``area`` is PIL's box
filter, an exact mean for integer factors (the project's tile encoder is trained on windows reduced that way).
A tile already ``input_size`` square passes through unchanged, so a prepared tile prepared again is the same.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class TileSizeError(ValueError):
    """A tile the encoder cannot take; the message states the rule."""


def check_tile_size(width: int, height: int, input_size: int) -> None:
    """Each side must be at least the encoder's input size: a smaller tile would have to be magnified, and an
    embedding of interpolated detail at the wrong scale does not describe the tissue."""
    if min(width, height) < input_size:
        raise TileSizeError(f"is {width}×{height} px; this encoder needs each side ≥ {input_size} px (its input "
                            f"size; larger tiles are resized to it, smaller ones are not magnified)")


def prepare_tile(tile: np.ndarray, input_size: int, resize: str = "area") -> np.ndarray:
    """One RGB uint8 (H, W, 3) tile → uint8 (input_size, input_size, 3)."""
    tile = np.asarray(tile)
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise ValueError(f"a tile must be uint8 (H, W, 3) RGB, got {tile.dtype} {tile.shape}")
    h, w = tile.shape[:2]
    check_tile_size(w, h, input_size)
    if h == w == input_size:
        return tile
    from PIL import Image

    short, long = (h, w) if h <= w else (w, h)
    long_new = int(input_size * long / short)
    new_h, new_w = (input_size, long_new) if h <= w else (long_new, input_size)
    im = Image.fromarray(np.ascontiguousarray(tile), mode="RGB")
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.BOX if resize == "area" else Image.Resampling.BICUBIC)
    top = int(round((new_h - input_size) / 2.0))
    left = int(round((new_w - input_size) / 2.0))
    return np.asarray(im.crop((left, top, left + input_size, top + input_size)), dtype=np.uint8)


def prepare_tiles(tiles: np.ndarray | Sequence[np.ndarray], input_size: int, resize: str = "area") -> np.ndarray:
    """A (N, H, W, 3) uint8 array or a sequence of (H, W, 3) tiles of any sizes → uint8 (N, size, size, 3)."""
    if isinstance(tiles, np.ndarray):
        if tiles.ndim != 4:
            raise ValueError(f"tiles must be uint8 (N, H, W, 3), got shape {tiles.shape}")
        if tiles.shape[1] == tiles.shape[2] == input_size and tiles.shape[3] == 3 and tiles.dtype == np.uint8:
            return tiles
    out = [prepare_tile(t, input_size, resize) for t in tiles]
    if not out:
        return np.zeros((0, input_size, input_size, 3), np.uint8)
    return np.stack(out)
