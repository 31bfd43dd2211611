"""Label maps (one class index per pixel, uint8): the one resizer every path uses."""
from __future__ import annotations

import numpy as np


def as_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """``labels`` as a uint8 2-D label map; ValueError naming ``name`` for another shape, dtype or range."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label map, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"{name} must lie in 0…255, got {int(arr.min())}…{int(arr.max())}")
    return arr.astype(np.uint8, copy=False)


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D integer label map to ``height`` × ``width`` (labels are never
    interpolated). Output pixel i takes source pixel floor((i + ½)·H/h) — pixel centres, so an n-fold
    downsample takes the middle of each block and no resize shifts the map by half a pixel. uint8 out."""
    lab = as_labels(labels)
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}×{width}")
    if lab.shape == (height, width):
        return np.ascontiguousarray(lab)
    rows = np.minimum(((np.arange(height) + 0.5) * lab.shape[0] / height).astype(np.int64), lab.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * lab.shape[1] / width).astype(np.int64), lab.shape[1] - 1)
    return np.ascontiguousarray(lab[rows][:, cols])
