"""Image-quality metrics for stitched outputs.

``seam_ratio`` (serving reference §3.3): mean absolute gradient across the former tile boundaries divided by
the mean absolute gradient everywhere else.  ≈ 1 for a seamless image; hard-stitched tiles with per-tile
colour drift give 2–4.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def gradient_profiles(image: np.ndarray, chunk_rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mean |∂| profiles: ``gy[i]`` = mean over columns/channels of |I[i] − I[i−1]| (i ≥ 1, gy[0] = nan),
    ``gx[j]`` likewise across columns.  Computed in row chunks (bounded memory)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"image must be (H ≥ 2, W ≥ 2[, C]), got shape {img.shape}")
    h, w, c = img.shape
    gx = np.zeros(w, np.float64)
    gy = np.full(h, np.nan, np.float64)
    prev_last = None
    for r0 in range(0, h, chunk_rows):
        block = img[r0:r0 + chunk_rows].astype(np.float32)
        gx[1:] += np.abs(np.diff(block, axis=1)).sum(axis=(0, 2), dtype=np.float64)
        if block.shape[0] > 1:
            gy[r0 + 1:r0 + block.shape[0]] = np.abs(np.diff(block, axis=0)).mean(axis=(1, 2), dtype=np.float64)
        if prev_last is not None:
            gy[r0] = np.abs(block[0] - prev_last).mean(dtype=np.float64)
        prev_last = block[-1]
    gx[1:] /= h * c
    gx[0] = np.nan
    return gy, gx


def profile_ratio(profile: np.ndarray, period: int, offset: int, match_mod: int | None = None) -> float:
    """Seam ratio along one axis from its gradient profile (``gradient_profiles``; index p = the gradient
    between lines p − 1 and p): mean on lines ≡ offset (mod period) ÷ mean on the other lines (of the
    same phase modulo ``match_mod`` when given). NaN when either set is empty."""
    idx = np.arange(profile.size)
    valid = idx >= 1
    on = valid & (idx % period == offset % period)
    off = valid & ~on
    if match_mod:
        off &= idx % match_mod == offset % match_mod
    if not on.any() or not off.any():
        return float("nan")
    denom = profile[off].mean()
    return float(profile[on].mean() / denom) if denom > 0 else float("inf")


def lines_ratio(profile: np.ndarray, lines: Iterable[int], match_mod: int | None = None,
                neighbourhood: int | None = None) -> float:
    """Seam ratio along one axis for explicit boundary ``lines`` (profile indices, as in
    :func:`profile_ratio`): mean on the lines ÷ mean on the other lines of the same phase modulo
    ``match_mod`` as a boundary line and within ``neighbourhood`` of it (all lines when None: a local
    reference keeps content — tissue here, glass there — alike on both sides of the ratio). NaN when either
    set is empty."""
    idx = np.arange(profile.size)
    on = np.zeros(profile.size, bool)
    ref = np.zeros(profile.size, bool)
    for p in lines:
        if not 1 <= int(p) < profile.size:
            continue
        on[int(p)] = True
        near = np.ones(profile.size, bool) if neighbourhood is None else np.abs(idx - int(p)) <= neighbourhood
        if match_mod:
            near &= idx % match_mod == int(p) % match_mod
        ref |= near
    ref &= ~on & (idx >= 1)
    if not on.any() or not ref.any():
        return float("nan")
    denom = profile[ref].mean()
    return float(profile[on].mean() / denom) if denom > 0 else float("inf")


def seam_ratios(image_hw3: np.ndarray, period_px: int, offsets_px: Iterable[int] = (0,),
                match_mod: int | None = None) -> dict[str, float]:
    """Per-axis, per-offset seam ratios: keys ``"y@<offset>"`` (horizontal seams) and ``"x@<offset>"``."""
    if period_px < 2:
        raise ValueError(f"period_px must be ≥ 2, got {period_px}")
    gy, gx = gradient_profiles(image_hw3)
    out: dict[str, float] = {}
    for off in offsets_px:
        out[f"y@{off}"] = profile_ratio(gy, period_px, off, match_mod)
        out[f"x@{off}"] = profile_ratio(gx, period_px, off, match_mod)
    return out


def seam_ratio(image_hw3: np.ndarray, period_px: int, offsets_px: Iterable[int] = (0,),
               match_mod: int | None = None) -> float:
    """Gradient energy on former tile boundaries ÷ gradient energy in the interior.

    Boundary lines are the pixel rows/columns ``p`` with ``p ≡ offset (mod period_px)`` (the gradient
    between ``p − 1`` and ``p``), for every offset in ``offsets_px`` (e.g. tile starts and tile ends /
    ramp ends when tiles overlap).  The interior is every other line — or, with ``match_mod`` (e.g. the
    VAE's upsampling factor 8), only the lines with the same phase modulo ``match_mod``, so periodic
    decoder texture does not bias the ratio.  Returns the maximum over both axes and all offsets
    (NaN-free axes only; an image with no boundary line on either axis raises ``ValueError``).
    """
    vals = [v for v in seam_ratios(image_hw3, period_px, offsets_px, match_mod).values() if not np.isnan(v)]
    if not vals:
        raise ValueError(f"no tile boundary of period {period_px} px lies inside a {np.shape(image_hw3)[:2]} image")
    return max(vals)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical inputs)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))
