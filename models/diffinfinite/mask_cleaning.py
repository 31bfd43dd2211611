"""Label-mask post-processing of DiffInfinite's mask stage (paper App. F; reference notes §9).

CleanMask: (1) region boundaries → 0 ("unknown"): a pixel whose 4-neighbour carries another label is a
boundary pixel (the "thick" boundaries, two pixels wide across every interface); (2) a 6×6 min-pool, stride 1,
which — labels being ≥ 0 and boundaries 0 — erodes every labelled region and deletes regions thinner than
about 6 px. The official pool is unpadded, so the mask shrinks by 5 px and is then stretched back to the output
size (≈ 1 % misregistration, bug #11); here the pool is padded ("same" size, the canvas border does not
erode), so no resampling besides the exact integer upsampling follows.

Everything works on numpy uint8 arrays, in row bands, with a few temporary copies at most.
"""
from __future__ import annotations

import numpy as np

from models.labels import as_labels as _as_labels
from models.labels import resize_labels as resize_labels_nearest  # the one label resizer

__all__ = ["find_boundaries", "min_pool", "clean_mask", "upsample_labels", "resize_labels_nearest"]


def find_boundaries(labels: np.ndarray) -> np.ndarray:
    """Bool map of "thick" boundaries with 4-connectivity: pixels with a 4-neighbour of another label
    (neighbours outside the canvas are ignored)."""
    lab = _as_labels(labels)
    b = np.zeros(lab.shape, dtype=bool)
    dv = lab[1:, :] != lab[:-1, :]
    b[1:, :] |= dv
    b[:-1, :] |= dv
    dh = lab[:, 1:] != lab[:, :-1]
    b[:, 1:] |= dh
    b[:, :-1] |= dh
    return b


def _min_filter_1d(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Min over the window [i − (size−1)//2 … i + size//2] along ``axis``, window clipped to the array
    (edge replication, which for a minimum is the same as ignoring outside pixels)."""
    before, after = (size - 1) // 2, size // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (before, after)
    p = np.pad(a, pad, mode="edge")
    n = a.shape[axis]
    out = None
    for s in range(size):
        sl = [slice(None), slice(None)]
        sl[axis] = slice(s, s + n)
        v = p[tuple(sl)]
        out = v.copy() if out is None else np.minimum(out, v, out=out)
    return out


def min_pool(labels: np.ndarray, size: int = 6) -> np.ndarray:
    """Padded ``size``×``size`` min-pool, stride 1, same output shape (bug #11 of the official code fixed).

    For even ``size`` the window of output pixel i spans input pixels i − size/2 + 1 … i + size/2 (the
    official unpadded pool's output pixel j covers j … j + size − 1, i.e. i = j + size/2 − 1 here).
    """
    lab = _as_labels(labels)
    if size < 1:
        raise ValueError(f"min-pool size must be ≥ 1, got {size}")
    if size == 1 or lab.size == 0:
        return lab.copy()
    return _min_filter_1d(_min_filter_1d(lab, size, 0), size, 1)


def clean_mask(labels: np.ndarray, pool: int = 6, unknown: int = 0) -> np.ndarray:
    """CleanMask: boundaries → ``unknown`` (0), then a padded ``pool``×``pool`` min-pool. Same shape, uint8."""
    if unknown != 0:
        raise ValueError("the min-pool erosion relies on unknown = 0 being the smallest label")
    lab = _as_labels(labels).copy()
    lab[find_boundaries(lab)] = unknown
    return min_pool(lab, pool)


def upsample_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """Nearest upsampling by an integer factor (each label pixel → factor×factor block)."""
    lab = _as_labels(labels)
    if factor < 1:
        raise ValueError(f"factor must be ≥ 1, got {factor}")
    if factor == 1:
        return lab.copy()
    return np.repeat(np.repeat(lab, factor, axis=0), factor, axis=1)
