"""Test helpers for the slide writers: deterministic H&E-like images and an in-memory reference pyramid."""
from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np


def he_like(height: int, width: int, seed: int = 0, grain: float = 2.0, feature_px: int = 64) -> np.ndarray:
    """Smooth pink/purple texture (structures of ~feature_px and 4·feature_px) with mild grain (uint8 RGB).

    Structures stay several pixels wide down to the 1/8 level, so JPEG Q90 4:2:0 keeps PSNR > 40 dB at
    every level (like tissue, whose detail is mostly above the 8-px scale at 0.5 µm/px).  Built at quarter
    resolution in float, upscaled in uint8, grain from a tiled 256² patch: cheap on a busy machine."""
    rng = np.random.default_rng(seed)
    hs, ws = height // 4 + 1, width // 4 + 1
    f = max(1, feature_px // 4)
    low = rng.normal(size=(hs // (4 * f) + 2, ws // (4 * f) + 2, 3)).astype(np.float32)
    mid = rng.normal(size=(hs // f + 2, ws // f + 2, 1)).astype(np.float32)
    tex = cv2.resize(low, (ws, hs), interpolation=cv2.INTER_CUBIC) * 25
    tex += cv2.resize(mid, (ws, hs), interpolation=cv2.INTER_CUBIC)[..., None] * 18
    small = np.clip(np.array([225.0, 160.0, 200.0], np.float32) + tex * np.array([0.6, 1.0, 0.7], np.float32),
                    8, 247).astype(np.uint8)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    if grain:
        noise = np.round(grain * rng.standard_normal((256, 256, 1))).repeat(3, axis=2)
        reps = (height // 256 + 1, width // 256 + 1, 1)
        pos = np.tile(np.clip(noise, 0, 255).astype(np.uint8), reps)[:height, :width]
        neg = np.tile(np.clip(-noise, 0, 255).astype(np.uint8), reps)[:height, :width]
        img = cv2.subtract(cv2.add(img, pos), neg)  # signed grain with saturating uint8 ops
    return np.ascontiguousarray(img)


def reference_pyramid(img: np.ndarray, min_size: int = 1024) -> list[np.ndarray]:
    """Levels by floor halving with the rounded 2×2 mean (a+b+c+d+2)>>2 while the longest side ≥ min_size; a
    1-px side stays 1 px (the mean then pairs each pixel with itself along that side)."""
    levels = [img]
    while max(levels[-1].shape[:2]) >= min_size:
        a = levels[-1]
        a = np.repeat(np.repeat(a, 2 if a.shape[0] == 1 else 1, axis=0), 2 if a.shape[1] == 1 else 1, axis=1)
        h, w = a.shape[0] // 2, a.shape[1] // 2
        b = a[:2 * h, :2 * w].astype(np.uint16)
        levels.append(((b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2] + 2) >> 2).astype(np.uint8))
    return levels


def iter_tiles(img: np.ndarray, tile: int = 512):
    """(ty, tx, view) of ``img`` in row-major order."""
    h, w = img.shape[:2]
    for ty in range(math.ceil(h / tile)):
        for tx in range(math.ceil(w / tile)):
            yield ty, tx, img[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def listing(folder: Path) -> list[str]:
    """Every entry under ``folder`` (recursive, relative), for 'nothing left behind' checks."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


def write_slide_tiff(path, image: np.ndarray, mpp: float = 0.5) -> None:
    """Write ``image`` as a pyramidal TIFF with our writer (JPEG Q90 4:2:0, 512² tiles)."""
    from writers.tiff import PyramidTiffWriter

    with PyramidTiffWriter(path, image.shape[1], image.shape[0], mpp=mpp) as w:
        for ty, tx, tile in iter_tiles(image, w.cascade.tile):
            w.write_tile(ty, tx, tile)
