"""DDIM scheduler for DiffInfinite (cosine schedule, ε-prediction, x̂0 clipping).

Conventions follow the DiffInfinite paper (Eq. 1, Table 6) and reference notes §5:

* cosine ᾱ schedule (s = 0.008, β ≤ 0.999), T = 1000 training steps;
* sampling time pairs are the integers of ``linspace(-1, T-1, N+1)`` (float32, truncated), reversed:
  N = 250 gives (999, 995), (995, 991), …, (7, 3), (3, -1);
* per step: x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, clipped to [−1, 1];
  σ = η·√((1−ᾱ_next)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_next);
  x_next = √ᾱ_next·x̂0 + √(1−ᾱ_next−σ²)·ε̂ + σ·z; when t_next < 0 the step returns x̂0.

The object is deliberately small and diffusers-like (``set_timesteps`` then ``step``) but it also takes the
noise ``z`` explicitly, because the random-patch sampler draws its noise per canvas pixel, not per crop.
All coefficients are computed in float64 and applied as Python scalars; ᾱ comes from
:func:`models.schedules.cosine_alphas_cumprod` (f normalised by f(0), as the release does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.schedules import cosine_alphas_cumprod

__all__ = ["DDIMScheduler", "DDIMStepOutput", "cosine_alphas_cumprod", "ddim_time_pairs"]


def ddim_time_pairs(num_steps: int, num_train_timesteps: int = 1000) -> list[tuple[int, int]]:
    """(t, t_next) pairs: integers (truncated) of float32 ``linspace(-1, T-1, N+1)``, reversed."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1…{num_train_timesteps}, got {num_steps}")
    times = torch.linspace(-1, num_train_timesteps - 1, steps=num_steps + 1, dtype=torch.float32)
    times = list(reversed(times.int().tolist()))
    return list(zip(times[:-1], times[1:]))


@dataclass
class DDIMStepOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class DDIMScheduler:
    """DDIM with η configurable (η = 1 in the paper), x̂0 clipping, final pair returning x̂0."""

    def __init__(self, num_train_timesteps: int = 1000, *, cosine_s: float = 0.008, max_beta: float = 0.999,
                 eta: float = 1.0, clip_sample: bool = True, clip_range: float = 1.0) -> None:
        if eta < 0:
            raise ValueError(f"eta must be ≥ 0, got {eta}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.eta = float(eta)
        self.clip_sample = bool(clip_sample)
        self.clip_range = float(clip_range)
        self.alphas_cumprod = cosine_alphas_cumprod(num_train_timesteps, cosine_s, max_beta)
        self.pairs: list[tuple[int, int]] = []
        self.timesteps = torch.empty(0, dtype=torch.long)
        self.prev_timesteps = torch.empty(0, dtype=torch.long)

    # ------------------------------------------------------------------ set-up
    def set_timesteps(self, num_inference_steps: int) -> None:
        self.pairs = ddim_time_pairs(num_inference_steps, self.num_train_timesteps)
        self.timesteps = torch.tensor([p[0] for p in self.pairs], dtype=torch.long)
        self.prev_timesteps = torch.tensor([p[1] for p in self.pairs], dtype=torch.long)

    @property
    def num_inference_steps(self) -> int:
        return len(self.pairs)

    def alpha_bar(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def coefficients(self, t: int, t_next: int, eta: float | None = None) -> tuple[float, float, float, float]:
        """(ᾱ_t, ᾱ_next, √(1−ᾱ_next−σ²), σ) for one pair; for t_next < 0: (ᾱ_t, 1, 0, 0) (the step returns x̂0)."""
        eta = self.eta if eta is None else float(eta)
        a_t = self.alpha_bar(t)
        if t_next < 0:
            return a_t, 1.0, 0.0, 0.0
        a_n = self.alpha_bar(t_next)
        sigma = eta * math.sqrt(max((1.0 - a_n) / (1.0 - a_t), 0.0)) * math.sqrt(max(1.0 - a_t / a_n, 0.0))
        c_dir = math.sqrt(max(1.0 - a_n - sigma * sigma, 0.0))
        return a_t, a_n, c_dir, sigma

    # ------------------------------------------------------------------ core
    def predict_x0(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        a_t = self.alpha_bar(t)
        x0 = (sample - math.sqrt(1.0 - a_t) * model_output) / math.sqrt(a_t)
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, *,
             prev_timestep: int | None = None, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, eta: float | None = None) -> DDIMStepOutput:
        """One DDIM update from ``timestep`` to ``prev_timestep`` (looked up in the pairs when omitted).

        ``noise`` (same shape as ``sample``) is used when σ > 0; when it is None it is drawn with ``generator``.
        """
        t = int(timestep)
        if prev_timestep is None:
            lookup = dict(self.pairs)
            if t not in lookup:
                raise ValueError(f"timestep {t} is not in the schedule; call set_timesteps() or pass prev_timestep")
            prev_timestep = lookup[t]
        t_next = int(prev_timestep)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep {t} outside 0…{self.num_train_timesteps - 1}")
        x0 = self.predict_x0(model_output, t, sample)
        if t_next < 0:
            return DDIMStepOutput(prev_sample=x0, pred_original_sample=x0)
        _, a_n, c_dir, sigma = self.coefficients(t, t_next, eta)
        prev = math.sqrt(a_n) * x0 + c_dir * model_output
        if sigma > 0:
            if noise is None:
                noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype,
                                    device=generator.device if generator is not None else sample.device)
                noise = noise.to(sample.device)
            prev = prev + sigma * noise
        return DDIMStepOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """q(x_t | x_0) sample: √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
        a_t = self.alpha_bar(int(t))
        return math.sqrt(a_t) * original + math.sqrt(1.0 - a_t) * noise
