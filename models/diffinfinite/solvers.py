"""Multistep solver for fewer sampling steps: DPM-Solver++(2M) on DiffInfinite's cosine schedule.

DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: fast solver for guided sampling of diffusion probabilistic
models") integrates the diffusion ODE in the data-prediction form. With α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t),
λ_t = log(α_t / σ_t), h = λ_next − λ_t and x̂0_t the (clipped) data prediction of step t:

* first order (the first step, no history):  x_next = (σ_next/σ_t)·x_t − α_next·(e^{−h} − 1)·x̂0_t
  — DDIM with η = 0;
* second order (2M): with r = (λ_t − λ_prev)/h, D = (1 + 1/(2r))·x̂0_t − 1/(2r)·x̂0_prev replaces x̂0_t;
* the SDE variant (``sde=True``, the "SDE-DPM-Solver++(2M)" of the same authors' code family):
  x_next = (σ_next/σ_t)·e^{−h}·x_t + α_next·(1 − e^{−2h})·D + σ_next·√(1 − e^{−2h})·z;
* the last pair (t_next < 0) returns x̂0_t, like the DDIM scheduler.

The solver needs x̂0 of the previous step at every pixel — a *level-synchronous* canvas. Both of our
samplers are: each step computes ε̃ for every pixel from the level-k canvas, then updates the whole canvas
at once (see :mod:`.sampler`), so the random and the tiled mode can use it. The paper's own loop is not:
it runs DDIM crop by crop on a per-pixel time tensor, so inside a step pixels sit at different levels and
a crop's neighbours are read from the replica; a multistep history there would have to be per pixel, with
a step size that differs between pixels — the paper-exact mode therefore stays DDIM (``solver="ddim"``).

Like :class:`.scheduler.DDIMScheduler`, the object is small and stateless between calls: the sampler
passes the previous x̂0 (kept in :class:`.sampler.SamplerState`, so a resumed job is bit-identical) and
the noise ``z`` (drawn per canvas pixel). Coefficients are float64 Python scalars.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from .scheduler import DDIMScheduler, DDIMStepOutput

__all__ = ["SOLVERS", "Solver", "DPMSolverPP2M"]

Solver = Literal["ddim", "dpmpp-2m", "dpmpp-2m-sde"]
SOLVERS: tuple[str, ...] = ("ddim", "dpmpp-2m", "dpmpp-2m-sde")


class DPMSolverPP2M:
    """DPM-Solver++(2M) (``sde=False``) or SDE-DPM-Solver++(2M) over the time pairs of ``scheduler``
    (its ᾱ, its x̂0 clipping, its pairs: the same time grid as DDIM at the same number of steps)."""

    def __init__(self, scheduler: DDIMScheduler, *, sde: bool = False) -> None:
        self.scheduler = scheduler
        self.sde = bool(sde)

    def _alpha_sigma_lambda(self, t: int) -> tuple[float, float, float]:
        a_bar = self.scheduler.alpha_bar(t)
        alpha, sigma = math.sqrt(a_bar), math.sqrt(max(1.0 - a_bar, 0.0))
        return alpha, sigma, math.log(alpha) - math.log(sigma)

    def noisy(self, t: int, t_next: int) -> bool:
        """Whether the step from ``t`` to ``t_next`` draws noise (the SDE variant, except the last pair)."""
        return self.sde and t_next >= 0

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, prev_timestep: int, *,
             x0_prev: torch.Tensor | None = None, t_prev: int | None = None,
             noise: torch.Tensor | None = None) -> DDIMStepOutput:
        """One update from ``timestep`` to ``prev_timestep`` with ε̂ = ``model_output``; ``x0_prev``/``t_prev``:
        the data prediction of the previous step and its time (None: first order). Returns the new sample
        and this step's x̂0 (the next step's history)."""
        t, t_next = int(timestep), int(prev_timestep)
        x0 = self.scheduler.predict_x0(model_output, t, sample)
        if t_next < 0:
            return DDIMStepOutput(prev_sample=x0, pred_original_sample=x0)
        _, sigma_t, lam_t = self._alpha_sigma_lambda(t)
        alpha_n, sigma_n, lam_n = self._alpha_sigma_lambda(t_next)
        h = lam_n - lam_t
        d = x0
        if x0_prev is not None and t_prev is not None:
            r = (lam_t - self._alpha_sigma_lambda(int(t_prev))[2]) / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        if not self.sde:
            prev = (sigma_n / sigma_t) * sample - alpha_n * math.expm1(-h) * d
            return DDIMStepOutput(prev_sample=prev, pred_original_sample=x0)
        if noise is None:
            raise ValueError("the SDE solver needs noise for every step but the last")
        prev = ((sigma_n / sigma_t) * math.exp(-h)) * sample - (alpha_n * math.expm1(-2.0 * h)) * d \
            + (sigma_n * math.sqrt(-math.expm1(-2.0 * h))) * noise
        return DDIMStepOutput(prev_sample=prev, pred_original_sample=x0)
