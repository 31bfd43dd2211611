"""Function-space noise: a counter-based Gaussian field and the smoothing operator A.

* :func:`philox4x32_10` — Philox4x32-10 (Salmon et al., SC'11) in plain int64 torch arithmetic (no overflow: every
  32×32-bit product is split into 16-bit halves), so it runs identically on any device.
* :func:`gaussian_noise` — N(0, 1)³ at integer pixel coordinates: counter = (col, row, stream, 0), key = seed,
  Box–Muller in float64. The value of a pixel depends only on (seed, stream, row, col): any chunking of a canvas
  draws exactly the same field.
* :class:`Mollifier` — the truncated Gaussian kernel A (separable, reflect boundary) at a given canvas size, with σ
  scaled by the ratio of the canvas to the training resolution (∞-Diff) and the matching noise multiplier.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_TWO32 = 4294967296.0


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a·b for a in [0, 2³²) (int64 tensor) and a 32-bit constant b, without overflow."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p0 = a * b_lo                                  # < 2⁴⁸
    p1 = a * b_hi                                  # < 2⁴⁸
    mid = p0 + ((p1 & 0xFFFF) << 16)               # < 2⁴⁹
    lo = mid & MASK32
    hi = ((p1 >> 16) + (mid >> 32)) & MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32 with 10 rounds on int64 tensors holding uint32 values; returns four int64 tensors."""
    c0, c1, c2, c3 = (torch.as_tensor(c) & MASK32 for c in (c0, c1, c2, c3))
    k0, k1 = int(k0) & MASK32, int(k1) & MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & MASK32, (k1 + _W1) & MASK32
    return c0, c1, c2, c3


def gaussian_noise(seed: int, stream: int, rows: torch.Tensor, cols: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Standard normal values at integer pixel coordinates: shape ``broadcast(rows, cols).shape + (channels,)``.

    ``rows``/``cols`` are int64 tensors (any non-negative integers < 2³²); ``stream`` separates independent fields
    of the same seed (0 = the initial noise, s + 1 = the fresh noise of DDIM step s when η > 0).
    """
    if channels > 4:
        raise ValueError("gaussian_noise gives at most 4 channels per pixel")
    if seed < 0 or stream < 0:
        raise ValueError("seed and stream must be non-negative")
    rows, cols = torch.broadcast_tensors(rows.to(torch.int64), cols.to(torch.int64))
    zero = torch.zeros_like(rows)
    x0, x1, x2, x3 = philox4x32_10(cols, rows, zero + (stream & MASK32), zero, seed & MASK32, (seed >> 32) & MASK32)
    # uniforms: u ∈ (0, 1] for the radius (never log 0), v ∈ [0, 1) for the angle
    u1 = (x0.double() + 1.0) / _TWO32
    v1 = x1.double() / _TWO32
    u2 = (x2.double() + 1.0) / _TWO32
    v2 = x3.double() / _TWO32
    r1 = torch.sqrt(-2.0 * torch.log(u1))
    r2 = torch.sqrt(-2.0 * torch.log(u2))
    outs = [r1 * torch.cos(2 * math.pi * v1), r1 * torch.sin(2 * math.pi * v1),
            r2 * torch.cos(2 * math.pi * v2), r2 * torch.sin(2 * math.pi * v2)]
    return torch.stack(outs[:channels], dim=-1).float()


def reflect_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect integer indices into [0, n) without repeating the edge (… 2 1 | 0 1 2 … n-1 | n-2 …), any distance."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    m = torch.remainder(idx, period)
    return torch.where(m < n, m, period - m)


def gaussian_taps(sigma_px: float) -> torch.Tensor:
    """Normalised 1-D truncated Gaussian (float64), size ceil(4σ + 1) made odd (∞-Diff's 'conv' mollifier)."""
    if sigma_px <= 0:
        return torch.ones(1, dtype=torch.float64)
    size = math.ceil(4 * sigma_px + 1)
    if size % 2 == 0:
        size += 1
    r = size // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma_px) ** 2)
    return g / g.sum()


@dataclass(frozen=True)
class Mollifier:
    """The smoothing operator A for a canvas whose longer side is ``side`` pixels."""

    sigma_px: float
    taps: torch.Tensor          # float64, odd length
    noise_mul: float

    @property
    def radius(self) -> int:
        return (self.taps.numel() - 1) // 2

    @classmethod
    def for_side(cls, side: int, sigma: float, train_resolution: int) -> "Mollifier":
        sigma_px = sigma * side / train_resolution
        taps = gaussian_taps(sigma_px)
        ref = gaussian_taps(sigma)
        # ‖k‖₂ of the separable 2-D kernel is (‖k₁‖₂)²; keep Var(A·noise) per pixel equal to the training resolution's
        mul = float((ref.pow(2).sum() / taps.pow(2).sum()).item())
        return cls(sigma_px=sigma_px, taps=taps, noise_mul=mul)

    def frequency_response(self, f: torch.Tensor) -> torch.Tensor:
        """1-D response H(f) = Σ_k g_k cos(2π f k) (f in cycles per pixel); the 2-D response is H(fy)·H(fx)."""
        k = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        return (self.taps[None, :] * torch.cos(2 * math.pi * f.double()[:, None] * k[None, :])).sum(-1)

    # -- dense windows -----------------------------------------------------------------------------------------
    def noise_window(self, seed: int, stream: int, r0: int, r1: int, c0: int, c1: int, height: int, width: int,
                     device=None) -> torch.Tensor:
        """noise_mul · (A z)[r0:r1, c0:c1] as (r1-r0, c1-c0, 3) float32, z = gaussian_noise(seed, stream, ·)."""
        r = self.radius
        rows = reflect_index(torch.arange(r0 - r, r1 + r, device=device), height)
        cols = reflect_index(torch.arange(c0 - r, c1 + r, device=device), width)
        z = gaussian_noise(seed, stream, rows[:, None], cols[None, :])
        return (self.blur_valid(z) * self.noise_mul).float()

    def blur_valid(self, x: torch.Tensor) -> torch.Tensor:
        """Separable blur of an (h + 2r, w + 2r, C) window → (h, w, C); fixed summation order (chunk-invariant)."""
        r = self.radius
        taps = self.taps.to(device=x.device, dtype=torch.float32)
        h, w = x.shape[0] - 2 * r, x.shape[1] - 2 * r
        acc = torch.zeros((h + 2 * r, w) + tuple(x.shape[2:]), dtype=torch.float32, device=x.device)
        for k in range(2 * r + 1):
            acc += taps[k] * x[:, k:k + w]
        out = torch.zeros((h, w) + tuple(x.shape[2:]), dtype=torch.float32, device=x.device)
        for k in range(2 * r + 1):
            out += taps[k] * acc[k:k + h]
        return out

    def apply_dense(self, img: torch.Tensor) -> torch.Tensor:
        """A applied to a whole (H, W, C) array with reflect boundaries (reference path; tests, small images)."""
        r = self.radius
        H, W = img.shape[:2]
        rows = reflect_index(torch.arange(-r, H + r, device=img.device), H)
        cols = reflect_index(torch.arange(-r, W + r, device=img.device), W)
        return self.blur_valid(img[rows][:, cols].float())

    # -- values at sampled pixels (training) -------------------------------------------------------------------
    def at_points(self, getter, rows: torch.Tensor, cols: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(A f) at pixels (rows, cols) where ``getter(rr, cc)`` returns f at integer coordinates (…, C).

        Only the (2r+1)² neighbourhood of each pixel is read: training on 65,536 pixels of a 4096² image never
        touches the rest of the image or its noise.
        """
        r = self.radius
        taps = self.taps.to(device=rows.device, dtype=torch.float32)
        off = torch.arange(-r, r + 1, device=rows.device)
        rr = reflect_index(rows[..., None, None] + off[:, None], height)      # (..., 2r+1, 1)
        cc = reflect_index(cols[..., None, None] + off[None, :], width)       # (..., 1, 2r+1)
        vals = getter(rr.expand(*rows.shape, 2 * r + 1, 2 * r + 1), cc.expand(*cols.shape, 2 * r + 1, 2 * r + 1))
        w = (taps[:, None] * taps[None, :])[..., None]
        return (vals * w).sum(dim=(-3, -2))
