"""Label maps (one class index per pixel, uint8): the one resizer every path uses."""
from __future__ import annotations

import numpy as np


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D integer label map to ``height`` × ``width`` (labels are never
    interpolated). Output pixel i takes source pixel floor((i + ½)·H/h) — pixel centres, so an n-fold
    downsample takes the middle of each block and no resize shifts the map by half a pixel. uint8 out."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be a 2-D label map, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must hold integer labels, got {lab.dtype}")
    if lab.size and (lab.min() < 0 or lab.max() > 255):
        raise ValueError(f"labels must lie in 0…255, got {int(lab.min())}…{int(lab.max())}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}×{width}")
    lab = lab.astype(np.uint8, copy=False)
    if lab.shape == (height, width):
        return np.ascontiguousarray(lab)
    rows = np.minimum(((np.arange(height) + 0.5) * lab.shape[0] / height).astype(np.int64), lab.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * lab.shape[1] / width).astype(np.int64), lab.shape[1] - 1)
    return np.ascontiguousarray(lab[rows][:, cols])
