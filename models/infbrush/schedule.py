"""Cosine noise schedule (T = 1000, ∞-Diff) and DDIM steps for the smoothed process of paper Eq. 9.

Index convention: arrays have length T and index i ↔ diffusion step t = i + 1; ``alpha_bar[i]`` = ᾱ_{i+1}.
"""
from __future__ import annotations

import math

import torch

from models.schedules import cosine_betas


class CosineSchedule:
    def __init__(self, timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        self.T = int(timesteps)
        betas = cosine_betas(self.T, s, max_beta, normalize=False)  # f not divided by f(0) (float64 ᾱ is read)
        self.betas = betas
        self.alpha_bar = torch.cumprod(1 - betas, dim=0)

    def ab(self, i: int) -> float:
        """ᾱ at index i; index −1 means t = 0 (ᾱ = 1)."""
        return 1.0 if i < 0 else float(self.alpha_bar[i])

    def lambda_weights(self) -> torch.Tensor:
        """Paper Eq. 14: λ_t = β_t² / (2 β̃_t (1 − β_t)(1 − ᾱ_t)), β̃_t = (1 − ᾱ_{t−1}) β_t / (1 − ᾱ_t).

        β̃_1 = 0 makes λ_1 infinite; we use λ_2 there. Normalised to mean 1 so the loss scale stays comparable.
        """
        ab = self.alpha_bar
        ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
        beta_tilde = (1 - ab_prev) * self.betas / (1 - ab)
        lam = self.betas ** 2 / (2 * beta_tilde.clamp_min(1e-30) * (1 - self.betas) * (1 - ab))
        lam[0] = lam[1]
        return (lam / lam.mean()).float()

    def ddim_timesteps(self, steps: int) -> list[int]:
        """Trailing spacing: T−1, T−1−T/S, …; every index in [0, T)."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in [1, {self.T}], got {steps}")
        return [int(math.floor((steps - j) * self.T / steps)) - 1 for j in range(steps)]


def ddim_update(x: torch.Tensor, eps: torch.Tensor, ab_t: float, ab_prev: float, eta: float = 0.0,
                noise: torch.Tensor | None = None, clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step on the smoothed state; returns (x_prev, x̂₀). ``noise`` is A·z (already smoothed) when η > 0."""
    x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    if clip:
        x0 = x0.clamp(-1, 1)
    sigma = 0.0
    if eta > 0 and ab_prev < 1.0:
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_prev)
    dir_coef = math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0))
    x_prev = math.sqrt(ab_prev) * x0 + dir_coef * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("eta > 0 needs the step's smoothed noise")
        x_prev = x_prev + sigma * noise
    return x_prev, x0
