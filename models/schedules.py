"""The cosine noise schedule (Nichol & Dhariwal), shared by both engines and their training code.

f(u) = cos²(((u/T) + s)/(1 + s) · π/2) on u = 0 … T (float64); β_t = 1 − f(t+1)/f(t), clipped to [0, max_beta];
ᾱ_t = Π_{i ≤ t} (1 − β_i).

``normalize`` divides f by f(0) first, as the official DiffInfinite code does (``alphas_cumprod / alphas_cumprod[0]``).
Mathematically a no-op, it changes the last bit of some float64 values (≤ 2.2e-16), so each caller keeps its own
convention: the DiffInfinite sampler and the official checkpoint buffers normalise; DiffInfinite training (which
casts to float32, where both agree) and ∞-Brush (which reads float64 ᾱ) do not.
"""
from __future__ import annotations

import math

import torch

__all__ = ["cosine_alphas_cumprod", "cosine_betas"]


def cosine_betas(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999, *,
                 normalize: bool = True) -> torch.Tensor:
    """β_t for t = 0 … T−1 (float64) of the cosine schedule."""
    if timesteps < 1:
        raise ValueError(f"num_train_timesteps must be ≥ 1, got {timesteps}")
    u = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((u / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    if normalize:
        f = f / f[0]
    return (1.0 - f[1:] / f[:-1]).clamp(0.0, max_beta)


def cosine_alphas_cumprod(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999, *,
                          normalize: bool = True) -> torch.Tensor:
    """ᾱ_t for t = 0 … T−1 (float64) of the cosine schedule."""
    return torch.cumprod(1.0 - cosine_betas(timesteps, s, max_beta, normalize=normalize), dim=0)
