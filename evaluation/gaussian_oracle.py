"""Gaussian-field oracle: patch combiners measured where the exact patch denoiser is known (no network, no GPU).

Setup (``../shared/reference/dde_multilevel.md`` §5.1): the data are windows of a stationary Matérn field
(ν = 1, correlation length ℓ = 16 px — correlation (r/ℓ)·K₁(r/ℓ) —, pixel variance 0.25) cut from a larger
periodic torus, so a canvas is *not* periodic. The "pretrained patch model" is the exact Bayes denoiser of a
B × B patch, D(x, σ) = Σ_B (Σ_B + σ²I)⁻¹ x (from the eigendecomposition of the B² × B² patch covariance).
A canvas of N × N is sampled with the EDM Heun probability-flow ODE (Karras σ's, 80 → 0.002, ρ = 7) whose
denoiser is the *composite* of the patch denoiser under a combiner:

* ``independent``, ``multidiffusion``, ``mixture``, ``dde`` — :mod:`models.patching` plans; the per-window
  D's are blended (D-space averaging ≡ score/ε-space averaging: affine); ``dde`` adds a
  :class:`~models.patching.PatchCoordinator`'s correction first.
* ``random`` — DiffInfinite's random patches: centred on a random uncovered pixel, clamped inward, first
  come (:func:`models.diffinfinite.sampler.plan_random`), one draw per ODE step and sample.
* ``offset`` — our offset tiling: a non-overlapping patch grid shifted per step
  (:func:`~models.diffinfinite.sampler.tile_offset`, :func:`~models.diffinfinite.sampler.plan_tiled`).
* ``exact`` — no patches: the exact denoiser of the whole canvas. Sampled from the same initial noise as the
  combiners, it is a *paired* reference: the same ODE discretisation and the same draws, so ratios against it
  are free of the ≈ 10 % sampling noise of exact field samples at 64 canvases (ℓ = 16 px: few independent
  patches per canvas).

Metrics (:func:`field_metrics`): pixel variance; seam jump = mean squared jump across the lines at multiples
of B (and at odd multiples of B/2) ÷ the median squared jump over all lines (≈ 1 without seams), and the
largest such ratio over all lines (a seam wherever it is); correlation at d = 8 and d = B; low-frequency
power (|k| ≤ N/B cycles per canvas, DC included) — compared with exact field samples.

For a coordinator's training: :meth:`GaussianOracle.training_pairs` (exact samples, noise at σ) and
:meth:`GaussianOracle.composite` (differentiable through the coordinator).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from models.patching import (COMBINERS, DEFAULT_MIXTURE_SIGMA, PatchCoordinator, blend, coordinator_blend, corrected,
                             grid_kwargs, plan_windows)

__all__ = [
    "ORACLE_COMBINERS", "MaternField", "PatchBayesDenoiser", "GaussianOracle", "karras_sigmas", "field_metrics",
    "line_profile",
    "compare", "single_patch_check",
]

ORACLE_COMBINERS: tuple[str, ...] = COMBINERS + ("random", "offset", "exact")


class MaternField:
    """Stationary Matérn field (ν = 1) on a ``torus`` × ``torus`` periodic grid: spectrum ∝ (κ² + ω²)^-(ν+1),
    κ = 1/``length``, scaled to pixel variance ``variance``."""

    def __init__(self, torus: int = 256, length: float = 16.0, variance: float = 0.25, nu: float = 1.0):
        if torus < 4 or length <= 0 or variance <= 0 or nu <= 0:
            raise ValueError(f"bad field parameters: torus={torus}, length={length}, variance={variance}, nu={nu}")
        self.torus, self.length, self.variance, self.nu = int(torus), float(length), float(variance), float(nu)
        w = 2 * np.pi * np.fft.fftfreq(self.torus)
        spec = (1.0 / self.length ** 2 + w[:, None] ** 2 + w[None, :] ** 2) ** (-(self.nu + 1.0))
        cov = np.real(np.fft.ifft2(spec))
        scale = self.variance / cov[0, 0]
        self.cov = cov * scale  # cov[dy, dx] (periodic)
        self.power = np.clip(np.real(np.fft.fft2(self.cov)), 0.0, None)  # eigenvalues of the circulant covariance

    def covariance(self, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        """Covariance of two pixels (dy, dx) apart (integer arrays, periodic)."""
        return self.cov[np.asarray(dy) % self.torus, np.asarray(dx) % self.torus]

    def patch_covariance(self, size: int) -> np.ndarray:
        """(size², size²) covariance of a size × size window, row-major pixels."""
        yy, xx = np.divmod(np.arange(size * size), size)
        return self.covariance(yy[:, None] - yy[None, :], xx[:, None] - xx[None, :])

    def sample_torus(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` independent samples of the whole torus, float64 (n, T, T)."""
        white = rng.standard_normal((n, self.torus, self.torus))
        return np.real(np.fft.ifft2(np.sqrt(self.power) * np.fft.fft2(white)))

    def sample_windows(self, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` exact non-periodic size × size windows (n, 1, size, size) float64: cut from tori, up to four
        per torus at half-torus spacing (correlation there ≈ 0 for a torus ≫ ℓ)."""
        if size > self.torus:
            raise ValueError(f"window {size} larger than the torus {self.torus}")
        half = self.torus // 2
        spots = [(0, 0), (0, half), (half, 0), (half, half)] if size <= half else [(0, 0)]
        out = []
        while len(out) < n:
            t = self.sample_torus(1, rng)[0]
            for y, x in spots:
                if len(out) < n:
                    out.append(t[y:y + size, x:x + size])
        return np.stack(out)[:, None]


class PatchBayesDenoiser:
    """Exact MMSE denoiser of a B × B window of the field: D(x, σ) = Σ_B (Σ_B + σ²I)⁻¹ x = V diag(λ/(λ + σ²)) Vᵀ x.

    Call with windows (M, 1, B, B) and σ a float (a cached B² × B² matrix per σ) or a tensor (M,)
    (per-window σ, through the eigenbasis; differentiable in x)."""

    def __init__(self, field: MaternField, patch: int, dtype: torch.dtype = torch.float64):
        self.patch, self.dtype = int(patch), dtype
        lam, vec = np.linalg.eigh(field.patch_covariance(self.patch))
        self.lam = np.clip(lam, 0.0, None)
        self._vec64 = vec
        self._cache: dict[tuple[float, str], Tensor] = {}
        # eigenvectors and eigenvalues in the denoiser's dtype, per device (the CPU copy made here)
        self._basis: dict[str, tuple[Tensor, Tensor]] = {
            "cpu": (torch.from_numpy(vec).to(dtype), torch.from_numpy(self.lam).to(dtype))}

    def matrix(self, sigma: float, device: torch.device | str = "cpu") -> Tensor:
        """B² × B² matrix of D at σ (float64 product, cast to the denoiser's dtype) on ``device``."""
        key = (float(sigma), str(device))
        m = self._cache.get(key)
        if m is None:
            f = self.lam / (self.lam + key[0] * key[0])
            m = torch.from_numpy((self._vec64 * f) @ self._vec64.T).to(device=device, dtype=self.dtype)
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = m
        return m

    def basis(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """The eigenvectors and eigenvalues on ``device`` (copied once per device)."""
        key = str(device)
        if key not in self._basis:
            vec, lam = self._basis["cpu"]
            self._basis[key] = (vec.to(device), lam.to(device))
        return self._basis[key]

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Runs on ``x``'s device (the matrices are copied there once)."""
        m, b = x.shape[0], self.patch
        flat = x.reshape(m, -1).to(self.dtype)
        if flat.shape[1] != b * b:
            raise ValueError(f"windows must be (M, 1, {b}, {b}), got {tuple(x.shape)}")
        if isinstance(sigma, Tensor) and sigma.dim() > 0:
            vec, lam = self.basis(flat.device)
            s2 = sigma.to(flat.device, self.dtype).reshape(-1, 1) ** 2
            coef = (flat @ vec) * (lam / (lam + s2))
            out = coef @ vec.T
        else:
            out = flat @ self.matrix(float(sigma), flat.device)  # symmetric
        return out.reshape(x.shape)


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """EDM noise levels σ_0 > … > σ_{steps−1} and a final 0 (steps + 1 values)."""
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if steps == 1:
        return [float(sigma_max), 0.0]
    i = np.arange(steps)
    s = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [float(v) for v in s] + [0.0]


@dataclass
class _Draw:
    """Windows of one random/offset step for one sample: origins and the owned pixels of each window."""

    origins: list[tuple[int, int]]
    # offset: (canvas ys, xs, window ys, xs) of the cell kept; random: (B, B) bool mask of the pixels kept
    owned: list


class GaussianOracle:
    """N × N canvases of the field, a B × B exact patch denoiser, and samplers for every combiner.

    ``canvas`` = N, ``patch`` = B; ``field`` defaults to the reference field (256² torus, ℓ = 16, var 0.25).
    float64 by default: in float32 the ODE's (x − D(x))/σ at σ → 0.002 loses enough digits to inflate the
    variance of a sampled 32² patch by ≈ 25 % (measured); float64 costs the same on CPU.
    """

    def __init__(self, canvas: int = 64, patch: int = 32, field: MaternField | None = None,
                 dtype: torch.dtype = torch.float64):
        if patch < 2 or canvas < 2:
            raise ValueError(f"canvas and patch must be ≥ 2, got {canvas}, {patch}")
        self.n, self.b = int(canvas), int(patch)
        self.field = field or MaternField()
        self.dtype = dtype
        self.denoiser = PatchBayesDenoiser(self.field, self.b, dtype)
        self._canvas_denoisers: dict[int, PatchBayesDenoiser] = {}

    # ------------------------------------------------------------------ data
    def exact_samples(self, n: int, seed: int = 0, size: int | None = None) -> Tensor:
        """``n`` exact field windows (n, 1, N, N) (or ``size``²)."""
        rng = np.random.default_rng([int(seed), 0xF1E1D])
        return torch.from_numpy(self.field.sample_windows(n, size or self.n, rng)).to(self.dtype)

    def training_pairs(self, n: int, sigma: float | Tensor | None = None, seed: int = 0, size: int | None = None,
                       p_mean: float = -1.0, p_std: float = 1.6) -> tuple[Tensor, Tensor, Tensor]:
        """Training data for a coordinator: ``(clean, noisy, sigma)`` — ``n`` exact windows (n, 1, S, S)
        (S = ``size`` or N), ``clean + sigma·ε``, and σ (n,): the given value(s), or drawn from
        LogNormal(``p_mean``, ``p_std``) (DDE's maps setting) when None. Deterministic in ``seed``."""
        clean = self.exact_samples(n, seed, size)
        g = torch.Generator().manual_seed(int(seed) * 2 + 1)
        if sigma is None:
            sig = torch.exp(p_mean + p_std * torch.randn(n, generator=g, dtype=torch.float64)).to(self.dtype)
        else:
            sig = torch.as_tensor(sigma, dtype=self.dtype).expand(n).clone()
        noisy = clean + sig.view(-1, 1, 1, 1) * torch.randn(clean.shape, generator=g, dtype=self.dtype)
        return clean, noisy, sig

    # ------------------------------------------------------------------ composite denoisers
    def composite(self, x: Tensor, sigma: float | Tensor, combiner: str, coordinator: PatchCoordinator | None = None,
                  *, stride: int | None = None, mixture_sigma: float = DEFAULT_MIXTURE_SIGMA,
                  step: int = 0, seed: int = 0, first_sample: int = 0) -> Tensor:
        """Composite denoiser of canvases ``x`` (S, 1, H, W) at σ (float or (S,)): per-window exact D under
        ``combiner``. For ``dde`` the coordinator (if given) sees each canvas's windows — outputs, noisy
        inputs, origins, ``cond`` None, t = σ — and its correction is added before the overlap average (its
        blend's weights, :func:`models.patching.coordinator_blend`; ``mixture_sigma`` is ``mixture``'s only);
        gradients flow through it. ``random``/``offset`` draw their windows from (``seed``, sample index =
        ``first_sample`` + row of ``x``, ``step``). ``exact`` is the whole canvas's exact denoiser (no windows)."""
        if combiner not in ORACLE_COMBINERS:
            raise ValueError(f"combiner must be one of {ORACLE_COMBINERS}, got {combiner!r}")
        s, _, hh, ww = x.shape
        sig = sigma if isinstance(sigma, Tensor) and sigma.dim() > 0 else None
        if combiner == "exact":
            if hh != ww:
                raise ValueError(f"exact: square canvases only, got {hh}×{ww}")
            if hh not in self._canvas_denoisers:
                self._canvas_denoisers[hh] = PatchBayesDenoiser(self.field, hh, self.dtype)
            # per-canvas σ through the eigenbasis: no N² × N² matrix cached per σ
            per = sig if sig is not None else torch.full((s,), float(sigma), dtype=self.dtype, device=x.device)
            return self._canvas_denoisers[hh](x, per).to(x.dtype)
        if combiner in ("random", "offset"):
            return self._composite_drawn(x, sigma, combiner, step, seed, first_sample)
        plan = plan_windows(combiner, (hh, ww), self.b, stride, mixture_sigma, blend=coordinator_blend(coordinator))
        if plan.size != (self.b, self.b):
            raise ValueError(f"canvas {hh}×{ww} smaller than the patch {self.b}")
        nw = len(plan)
        crops = plan.crops(x[:, 0])  # (nw, S, B, B)
        flat = crops.reshape(nw * s, 1, self.b, self.b)
        wsig = sig.repeat(nw) if sig is not None else float(sigma)
        outs = self.denoiser(flat, wsig).reshape(nw, s, self.b, self.b)
        if combiner == "dde" and coordinator is not None:
            t_all = (sig if sig is not None else torch.full((s,), float(sigma), dtype=self.dtype, device=x.device))
            if getattr(coordinator, "batches_canvases", False):  # all canvases in one pass, each apart
                o = outs.transpose(0, 1).reshape(s * nw, 1, self.b, self.b)
                z = crops.transpose(0, 1).reshape(s * nw, 1, self.b, self.b)
                origins = plan.origins_tensor(x.device).repeat(s, 1)
                canvas = torch.arange(s, device=x.device).repeat_interleave(nw)
                delta = coordinator.correction(o, z, origins, None, t_all.repeat_interleave(nw), canvas=canvas,
                                               **grid_kwargs(coordinator, step))
                outs = (o + delta.to(o.dtype)).reshape(s, nw, self.b, self.b).transpose(0, 1)
            else:
                per = []
                for i in range(s):  # one canvas at a time: a coordinator relates the windows of one canvas
                    per.append(corrected(plan, outs[:, i:i + 1], noisy=crops[:, i:i + 1],
                                         t=t_all[i].expand(nw), coordinator=coordinator, step=step)[:, 0])
                outs = torch.stack(per, 1)
        return blend(outs, plan.origins, plan.weight, plan.canvas).unsqueeze(1).to(x.dtype)

    def _draw(self, combiner: str, canvas: tuple[int, int], sample: int, step: int, seed: int) -> _Draw:
        from models.diffinfinite.sampler import plan_random, plan_tiled, tile_offset

        labels = np.zeros(canvas, np.uint8)
        b = self.b
        if combiner == "random":
            crops = plan_random(labels, (b, b), np.random.default_rng([int(seed), int(sample), int(step), 0xD1F]))
            covered = np.zeros(canvas, bool)
            origins, owned = [], []
            for c in crops:
                win = covered[c.y0:c.y0 + c.h, c.x0:c.x0 + c.w]
                own = ~win
                origins.append((c.y0, c.x0))
                owned.append(own.copy())
                win[...] = True
            return _Draw(origins, owned)
        off = tile_offset(int(seed), int(sample), (b, b), int(step))
        crops = plan_tiled(labels, (b, b), off, 0, edges="full")
        origins, owned = [], []
        for c in crops:
            cy, cx, ch, cw = c.cell
            origins.append((c.y0, c.x0))
            owned.append((slice(cy, cy + ch), slice(cx, cx + cw), slice(cy - c.y0, cy - c.y0 + ch),
                          slice(cx - c.x0, cx - c.x0 + cw)))
        return _Draw(origins, owned)

    def _composite_drawn(self, x: Tensor, sigma: float | Tensor, combiner: str, step: int, seed: int,
                         first_sample: int) -> Tensor:
        s, _, hh, ww = x.shape
        b = self.b
        if hh < b or ww < b:
            raise ValueError(f"canvas {hh}×{ww} smaller than the patch {b}")
        draws = [self._draw(combiner, (hh, ww), first_sample + i, step, seed) for i in range(s)]
        wins, wsig = [], []
        for i, d in enumerate(draws):
            for (y, xx) in d.origins:
                wins.append(x[i, :, y:y + b, xx:xx + b])
                if isinstance(sigma, Tensor) and sigma.dim() > 0:
                    wsig.append(sigma[i])
        outs = self.denoiser(torch.stack(wins), torch.stack(wsig) if wsig else float(sigma))
        out = torch.empty_like(x)
        j = 0
        for i, d in enumerate(draws):
            for (y, xx), own in zip(d.origins, d.owned):
                o = outs[j]
                j += 1
                if isinstance(own, np.ndarray):  # first come: the window's pixels no earlier window took
                    m = torch.from_numpy(own).to(x.device)
                    view = out[i, :, y:y + b, xx:xx + b]
                    view.copy_(torch.where(m, o, view))
                else:
                    cy, cx, wy, wx = own
                    out[i, :, cy, cx] = o[:, wy, wx]
        return out

    # ------------------------------------------------------------------ sampling
    def sample(self, combiner: str, n: int, seed: int = 0, *, steps: int = 48, stride: int | None = None,
               coordinator: PatchCoordinator | None = None, mixture_sigma: float = DEFAULT_MIXTURE_SIGMA,
               canvas: int | None = None, batch: int = 64, sigma_min: float = 0.002,
               sigma_max: float = 80.0, device: torch.device | str = "cpu") -> Tensor:
        """``n`` canvases (n, 1, N, N) (or ``canvas``²) by the EDM Heun probability-flow ODE with the composite
        denoiser of ``combiner``, on ``device`` (returned on the CPU); deterministic in ``seed`` (independent
        of ``batch``; the initial noise is drawn on the CPU, so it is the same on every device)."""
        size = int(canvas or self.n)
        sig = karras_sigmas(steps, sigma_min, sigma_max)
        out = []
        with torch.no_grad():
            for a in range(0, n, batch):
                m = min(batch, n - a)
                x = torch.cat([torch.randn((1, 1, size, size), dtype=self.dtype,
                                           generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + a + i))
                               for i in range(m)]).to(device) * sig[0]

                def den(z: Tensor, s: float, k: int) -> Tensor:
                    return self.composite(z, s, combiner, coordinator, stride=stride, mixture_sigma=mixture_sigma,
                                          step=k, seed=seed, first_sample=a)

                for k in range(steps):
                    s0, s1 = sig[k], sig[k + 1]
                    d = (x - den(x, s0, k)) / s0
                    xn = x + (s1 - s0) * d
                    if s1 > 0:
                        d2 = (xn - den(xn, s1, k)) / s1
                        xn = x + (s1 - s0) * 0.5 * (d + d2)
                    x = xn
                out.append(x.cpu())
        return torch.cat(out)


def _line_jumps(x: np.ndarray) -> np.ndarray:
    """Mean squared jump across each interior line j = 1 … N−1, columns and rows pooled: (N−1,)."""
    dx = np.mean((x[..., :, 1:] - x[..., :, :-1]) ** 2, axis=tuple(i for i in range(x.ndim) if i != x.ndim - 1))
    dy = np.mean((x[..., 1:, :] - x[..., :-1, :]) ** 2, axis=tuple(i for i in range(x.ndim) if i != x.ndim - 2))
    return 0.5 * (dx + dy)


def _corr(x: np.ndarray, d: int) -> float:
    var = float(np.mean(x * x))
    if d >= x.shape[-1]:
        return float("nan")
    c = 0.5 * (np.mean(x[..., :, d:] * x[..., :, :-d]) + np.mean(x[..., d:, :] * x[..., :-d, :]))
    return float(c / var)


def field_metrics(samples: Tensor | np.ndarray, patch: int) -> dict[str, float]:
    """Metrics of canvases (S, 1, N, N): ``var`` (mean pixel², the field has mean 0), ``seam_b`` and
    ``seam_b2`` (mean squared jump across the lines at multiples of B / at odd multiples of B/2, ÷ the median
    over all lines), ``seam_max`` (the largest line ÷ median), ``corr_8``, ``corr_b`` (correlation at d = 8,
    d = B), ``lf_power`` (mean |FFT|²/N² over |k| ≤ N/B cycles per canvas, DC included)."""
    x = samples.detach().double().cpu().numpy() if isinstance(samples, Tensor) else np.asarray(samples, np.float64)
    n = x.shape[-1]
    jumps = _line_jumps(x)  # index j-1 ↔ line between pixels j-1 and j
    med = float(np.median(jumps))
    lines = np.arange(1, n)
    at_b = lines % patch == 0
    at_b2 = (lines % patch) == patch // 2
    spec = np.abs(np.fft.fft2(x[:, 0])) ** 2 / (n * n)
    k = np.fft.fftfreq(n) * n
    low = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2) <= n / patch
    return {
        "var": float(np.mean(x * x)),
        "seam_b": float(jumps[at_b].mean() / med) if at_b.any() else float("nan"),
        "seam_b2": float(jumps[at_b2].mean() / med) if at_b2.any() else float("nan"),
        "seam_max": float(jumps.max() / med),
        "corr_8": _corr(x, 8),
        "corr_b": _corr(x, patch),
        "lf_power": float(spec[:, low].mean()),
    }


def line_profile(samples: Tensor | np.ndarray) -> np.ndarray:
    """Mean squared jump across each interior line j = 1 … N−1 of canvases (S, 1, N, N), columns and rows pooled,
    ÷ the median over lines: (N−1,) float64. Where a seam is, line by line (``seam_b`` pools the lines at
    multiples of B only); divide by another method's profile from the same noise to take out the field's own."""
    x = samples.detach().double().cpu().numpy() if isinstance(samples, Tensor) else np.asarray(samples, np.float64)
    jumps = _line_jumps(x)
    return jumps / float(np.median(jumps))


@dataclass
class Row:
    name: str
    metrics: dict[str, float]
    lines: np.ndarray | None = None  # :func:`line_profile` of the row's samples


def compare(oracle: GaussianOracle, methods: Iterable[tuple[str, str, dict]], samples: int, seed: int = 0,
            steps: int = 48, reference: Tensor | None = None, device: torch.device | str = "cpu"
            ) -> tuple[dict[str, float], list[Row]]:
    """Reference metrics of exact samples and one :class:`Row` per (name, combiner, sample kwargs), sampled on
    ``device``; each row's metrics gain ``var_ratio`` and ``lf_ratio`` against the reference."""
    ref = field_metrics(reference if reference is not None else oracle.exact_samples(samples, seed + 7), oracle.b)
    rows = []
    for name, combiner, kw in methods:
        x = oracle.sample(combiner, samples, seed, steps=steps, device=device, **kw)
        m = field_metrics(x, oracle.b)
        m["var_ratio"] = m["var"] / ref["var"]
        m["lf_ratio"] = m["lf_power"] / ref["lf_power"]
        rows.append(Row(name, m, line_profile(x)))
    return ref, rows


EXCESS_SIGMAS = (0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


@torch.no_grad()
def excess_by_sigma(oracle: GaussianOracle, coordinator: PatchCoordinator, stride: int,
                    sigmas: Iterable[float] = EXCESS_SIGMAS, canvases: int = 16, seed: int = 123
                    ) -> list[dict[str, float]]:
    """Where in σ a coordinator falls short: per σ, the mean squared distance of the averaged composite (the
    coordinator's own blend uncorrected: MultiDiffusion, or Mixture of Diffusers for a ``mixture``-blend one)
    and of the corrected (``dde``) composite to the exact whole-canvas denoiser, on ``canvases`` noisy N × N
    fields (true marginals, the same for both), and their ratio (1 = no better than averaging, 0 = exact).
    Variance and low-frequency power are made at σ ≳ 0.5, seams at σ ≲ 0.5."""
    averaging = "mixture" if coordinator_blend(coordinator) == "mixture" else "multidiffusion"
    rows = []
    for s in sigmas:
        _, noisy, sig = oracle.training_pairs(canvases, sigma=float(s), seed=seed)
        exact = oracle.composite(noisy, sig, "exact")
        avg = float(((oracle.composite(noisy, sig, averaging, stride=stride) - exact) ** 2).mean())
        dde = float(((oracle.composite(noisy, sig, "dde", coordinator, stride=stride) - exact) ** 2).mean())
        rows.append({"sigma": float(s), "excess_averaging": avg, "excess_dde": dde,
                     "ratio": dde / avg if avg > 0 else float("nan")})
    return rows


def single_patch_check(oracle: GaussianOracle, samples: int, seed: int = 0, steps: int = 48,
                       device: torch.device | str = "cpu") -> dict[str, float]:
    """Sampling a B × B canvas with the exact patch denoiser (one window: the exact global ODE) against exact
    B × B windows: relative errors of the variance and of the correlations at d = 8 and d = B/2."""
    got = oracle.sample("independent", samples, seed, steps=steps, canvas=oracle.b, device=device).double().numpy()
    ref = oracle.exact_samples(samples, seed + 11, size=oracle.b).double().numpy()
    out = {"var": float(np.mean(got * got)), "var_ref": float(np.mean(ref * ref))}
    for d in (8, oracle.b // 2):
        out[f"corr_{d}"], out[f"corr_{d}_ref"] = _corr(got, d), _corr(ref, d)
    return out

