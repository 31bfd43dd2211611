"""Trace-class Gaussian noise priors N(0, Q) for ∞-Brush (Multilevel Diffusion, arXiv 2303.04772 §3), in µm.

A noise sample is η = Q^{1/2} w, where w is white noise on the plane. On a lattice of spacing h µm the pixel
(row, col) carries w = ξ/h with ξ = ``gaussian_noise(seed, stream, row, col)`` (the Philox field of noise.py: the
cell average of unit-intensity white noise), so every prior is a per-pixel function of the seed and the white
noise near the pixel, and the same physical prior is drawn at every µm/px.

Kinds (``Q^{1/2}`` as a Fourier multiplier m of the physical frequency, λ = |2πf|² in µm⁻²):

* ``white`` — today's noise: the mollifier A of noise.py on ξ (handled by :func:`noise_source`, bit-identical);
* ``bessel`` — m = (τ + λ)^−γ, τ = 1/ℓ² (ℓ = ``length_um``): positive definite, trace class for γ > ½;
* ``laplacian`` — m = λ^−γ with the mean (λ = 0) set to zero. Its kernel decays like r^(2γ−2): its variance grows
  with the canvas (infrared), so it is defined on the periodic canvas only (no chunked path), and it cannot carry a
  non-zero mean — unfit for H&E, whose channel means are far from 0; kept for the paper's comparison;
* ``fno`` — finite rank: a fixed random complex multiplier R (paper: Re 0.2 + 0.8·U, Im 0.8·U) on the low modes of
  a fixed physical frequency lattice (p/L, q/L), |p| < k1, 0 ≤ q < k2, L = ``fno_period_um``; the mode
  coefficients are keyed by (seed, stream, mode, channel). Evaluated exactly at any pixel (a sum of plane
  waves), so it is chunk- and canvas-invariant; the paper's FNO prior crops the modes of the canvas instead,
  which makes it depend on the canvas. No noise above the cut-off (degenerate);
* ``combined`` — √(1−s)·(bessel or laplacian) + √s·fno, s = ``fno_share`` (the base makes it non-degenerate).

``symbol``: ``continuous`` uses λ = (2π)²|f|² (f in cycles/µm) — depends on the physical frequency only, so the
prior is nested across resolutions exactly; ``discrete`` is the paper's 5-point Laplacian
(4/h²)·(sin²(πf_y h) + sin²(πf_x h)) (paper-exact, not nested).

Normalisation: pixel variance 1 at ``reference_mpp`` (the model's training µm/px), times ``scale``. At other
µm/px the same constant applies, so the pixel variance follows the physics (it levels off as h → 0; white
noise as a field, ξ/h, grows ∝ 1/h²).

Chunked path (:meth:`NoisePrior.noise_window`): Q^{1/2} as a convolution with the prior's kernel truncated to a
square of radius R pixels, R the smallest radius outside which at most ``truncation`` of the kernel's energy
lies (so the per-pixel RMS truncation error is ≤ √truncation of its standard deviation, 1 % by default); the
white noise of the window plus an R-pixel halo (beyond the canvas too: the field lives on the whole plane) is
convolved by FFT. A pixel's value depends on the seed and the white noise within R only: identical under any
chunking (to float rounding) and independent of the canvas size.

Whole-canvas path (:meth:`NoisePrior.sample_canvas`): the exact multiplier on the canvas's periodic FFT
(the paper's construction; tests and small canvases). It agrees with the chunked path in the interior up to the
truncation error.

Nestedness (what we chose): the coarse noise of a sample is the Fourier downsampling of its fine noise. With the
continuous symbol this is exact for the whole-canvas path when the coarse white noise is the Fourier
downsampling of the fine white noise (``sample_canvas(..., white=fourier_downsample(ξ_fine))`` equals
``fourier_downsample(η_fine)/factor``); coarse-to-fine training uses exactly that (coarse noise = downsampled
fine noise). A canvas sampled directly at a coarse µm/px draws its own per-pixel white noise: nested in
distribution (same spectrum on the shared frequencies), not sample by sample.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import Any

import torch

from models.infbrush.noise import MASK32, Mollifier, gaussian_noise, philox4x32_10

PRIOR_KINDS = ("white", "bessel", "laplacian", "fno", "combined")
SYMBOLS = ("continuous", "discrete")
_FNO_TAG = 0x464E4F  # counter word of the FNO coefficients ("FNO"): never a pixel's counter (c3 = 1 there)
_MAX_KERNEL_GRID = 4096


@dataclass(frozen=True)
class NoisePrior:
    """A noise prior with its parameters in physical units (recorded on the model card as :meth:`to_dict`)."""

    kind: str = "white"
    length_um: float = 16.0          # ℓ: correlation length of the Bessel prior, τ = 1/ℓ² µm⁻²
    gamma: float = 0.55              # Q^{1/2} = (τ − Δ)^−γ; spectrum slope −4γ; trace class for γ > ½
    scale: float = 1.0               # pixel standard deviation at reference_mpp
    reference_mpp: float = 0.5       # µm/px at which the pixel variance is scale² (the training µm/px)
    symbol: str = "continuous"       # Laplacian eigenvalues: continuous (nested) or discrete (paper's stencil)
    combined_base: str = "bessel"    # the non-degenerate part of `combined`: bessel or laplacian
    fno_modes: tuple[int, int] = (8, 4)   # (k1, k2): rows |p| < k1, columns 0 ≤ q < k2
    fno_period_um: float = 1024.0    # L: the FNO modes are the frequencies (p/L, q/L) cycles/µm
    fno_share: float = 0.2           # combined: share of the variance carried by the FNO part
    fno_basis_seed: int = 0          # seed of the fixed random multiplier R (part of the prior, not the sample)
    truncation: float = 1e-4         # kernel energy fraction dropped outside radius R (chunked path)

    # --- card round trip ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fno_modes"] = list(self.fno_modes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "NoisePrior":
        """The prior a card records (``None`` or ``{}``: white, the noise of models trained before priors)."""
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown noise prior keys: {', '.join(unknown)}")
        if "fno_modes" in d:
            d["fno_modes"] = tuple(int(v) for v in d["fno_modes"])
        prior = cls(**d)
        prior.validate()
        return prior

    def validate(self) -> "NoisePrior":
        if self.kind not in PRIOR_KINDS:
            raise ValueError(f"noise prior kind must be one of {', '.join(PRIOR_KINDS)}, not {self.kind!r}")
        if self.symbol not in SYMBOLS:
            raise ValueError(f"noise prior symbol must be one of {', '.join(SYMBOLS)}, not {self.symbol!r}")
        if self.combined_base not in ("bessel", "laplacian"):
            raise ValueError(f"combined_base must be bessel or laplacian, not {self.combined_base!r}")
        for name in ("length_um", "scale", "reference_mpp", "fno_period_um"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"noise prior {name} must be a positive number, got {v!r}")
        if not 0 < self.gamma <= 4:
            raise ValueError(f"noise prior gamma must be in (0, 4], got {self.gamma!r}")
        if self.kind in ("bessel", "laplacian", "combined") and self.gamma <= 0.5:
            raise ValueError(f"noise prior gamma must exceed 0.5 (trace class in 2-D), got {self.gamma!r}")
        if not 0 < self.fno_share < 1:
            raise ValueError(f"fno_share must be in (0, 1), got {self.fno_share!r}")
        if len(self.fno_modes) != 2 or min(self.fno_modes) < 1:
            raise ValueError(f"fno_modes must be two positive integers, got {self.fno_modes!r}")
        if not 0 < self.truncation < 0.1:
            raise ValueError(f"truncation must be in (0, 0.1), got {self.truncation!r}")
        return self

    def describe(self) -> str:
        if self.kind == "white":
            return "white (the mollified pixel noise A·ξ)"
        base = self.kind if self.kind != "combined" else f"fno + {self.combined_base}"
        return (f"{base}: ℓ = {self.length_um:g} µm (τ = 1/ℓ²), γ = {self.gamma:g}, pixel std {self.scale:g} at "
                f"{self.reference_mpp:g} µm/px, {self.symbol} Laplacian symbol")

    @property
    def tau(self) -> float:
        return 1.0 / self.length_um ** 2

    @property
    def chunkable(self) -> bool:
        """Whether the prior has a local kernel (a chunked path): not the Laplacian (infrared-divergent)."""
        return self.kind in ("white", "bessel", "fno") or (self.kind == "combined" and self.combined_base == "bessel")

    def _base_kind(self) -> str | None:
        return {"bessel": "bessel", "laplacian": "laplacian", "combined": self.combined_base}.get(self.kind)

    def _weights(self) -> tuple[float, float]:
        """(weight of the Bessel/Laplacian part, weight of the FNO part), each part of unit variance."""
        if self.kind == "combined":
            return math.sqrt(1 - self.fno_share), math.sqrt(self.fno_share)
        return (1.0, 0.0) if self.kind in ("bessel", "laplacian") else (0.0, 1.0)

    # --- spectra ------------------------------------------------------------------------------------------------
    def symbol_values(self, fy: torch.Tensor, fx: torch.Tensor, mpp: float) -> torch.Tensor:
        """Eigenvalues of −Δ (µm⁻²) at frequencies (fy, fx) in cycles per pixel, on a lattice of ``mpp`` µm."""
        fy, fx = fy.double(), fx.double()
        if self.symbol == "continuous":
            return (2 * math.pi) ** 2 * (fy ** 2 + fx ** 2) / mpp ** 2
        return 4.0 / mpp ** 2 * (torch.sin(math.pi * fy) ** 2 + torch.sin(math.pi * fx) ** 2)

    def base_multiplier(self, fy: torch.Tensor, fx: torch.Tensor, mpp: float) -> torch.Tensor:
        """m(f) of the Bessel/Laplacian part (unnormalised), acting on the white field w = ξ/h."""
        lam = self.symbol_values(fy, fx, mpp)
        if self._base_kind() == "bessel":
            return (self.tau + lam) ** (-self.gamma)
        m = torch.where(lam > 0, lam.clamp_min(1e-300) ** (-self.gamma), torch.zeros_like(lam))
        return m                                                         # the mean is not drawn

    # --- the local kernel (chunked path) --------------------------------------------------------------------------
    def kernel(self, mpp: float) -> torch.Tensor:
        """The truncated Bessel kernel at ``mpp`` on ξ (float64, (2R+1)², normalised: Σ k² = 1 at reference_mpp
        before the weights and ``scale``)."""
        if self._base_kind() != "bessel":
            raise ValueError(f"the {self.kind} prior has no local kernel")
        k, _ = _bessel_kernel(self.length_um, self.gamma, self.symbol, self.truncation, float(mpp))
        return k * self._bessel_norm()

    def radius(self, mpp: float) -> int:
        """Halo (px) of the chunked path at ``mpp``: the kernel radius R (0 without a kernel)."""
        if self._base_kind() != "bessel":
            return 0
        return (_bessel_kernel(self.length_um, self.gamma, self.symbol, self.truncation, float(mpp))[0].shape[0] - 1) // 2

    def _bessel_norm(self) -> float:
        """1/√(pixel variance at reference_mpp) of the untruncated kernel (on the grid :func:`_bessel_kernel`
        builds it on; the truncated kernel's variance is lower by at most ``truncation``)."""
        return 1.0 / math.sqrt(_bessel_energy(self.length_um, self.gamma, self.symbol, float(self.reference_mpp)))

    def truncation_error(self, mpp: float) -> float:
        """The kernel energy fraction outside radius R at ``mpp`` (≤ ``truncation``)."""
        return _bessel_kernel(self.length_um, self.gamma, self.symbol, self.truncation, float(mpp))[1]

    # --- the FNO part ---------------------------------------------------------------------------------------------
    def fno_modes_list(self) -> torch.Tensor:
        """(M, 2) integer mode indices (p, q): the upper half of the |p| < k1, 0 ≤ q < k2 block (no conjugates)."""
        k1, k2 = self.fno_modes
        modes = [(p, q) for p in range(-k1 + 1, k1) for q in range(k2) if q > 0 or p >= 0]
        return torch.tensor(modes, dtype=torch.int64)

    def fno_multiplier(self) -> torch.Tensor:
        """R (M,) complex128: the paper's fixed random weights Re 0.2 + 0.8·U, Im 0.8·U, normalised Σ|R|² = 1."""
        m = self.fno_modes_list().shape[0]
        idx = torch.arange(m, dtype=torch.int64)
        x0, x1, _, _ = philox4x32_10(idx, torch.zeros_like(idx) + 1, torch.zeros_like(idx), torch.ones_like(idx),
                                     self.fno_basis_seed & MASK32, (self.fno_basis_seed >> 32) & MASK32)
        u1, u2 = x0.double() / 2 ** 32, x1.double() / 2 ** 32
        r = torch.complex(0.2 + 0.8 * u1, 0.8 * u2)
        return r / torch.sqrt((r.abs() ** 2).sum())

    def fno_values(self, seed: int, stream: int, rows: torch.Tensor, cols: torch.Tensor, mpp: float,
                   channels: int = 3) -> torch.Tensor:
        """The unit-variance FNO field at pixel rows × cols (1-D int64 tensors) → (len(rows), len(cols), C) float64.

        η(x) = √2·Σ_k Re(R_k z_k e^{2πi(p·y + q·x)/L}), z_k = (a + ib)/√2 keyed by (seed, stream, k, channel),
        y = row·h, x = col·h (sample points at the pixel corners, so the coarse lattice's points are the fine one's
        even points). Separable: a matrix product per channel."""
        modes, r = self.fno_modes_list(), self.fno_multiplier()
        M = modes.shape[0]
        k = torch.arange(M, dtype=torch.int64)[:, None].expand(M, channels)
        ch = torch.arange(channels, dtype=torch.int64)[None, :].expand(M, channels)
        x0, x1, _, _ = philox4x32_10(k, ch, torch.zeros_like(k) + (stream & MASK32), torch.zeros_like(k) + _FNO_TAG,
                                     seed & MASK32, (seed >> 32) & MASK32)
        u1, v1 = (x0.double() + 1.0) / 2 ** 32, x1.double() / 2 ** 32
        rad = torch.sqrt(-2.0 * torch.log(u1))
        z = torch.complex(rad * torch.cos(2 * math.pi * v1), rad * torch.sin(2 * math.pi * v1)) / math.sqrt(2)
        coef = math.sqrt(2) * r[:, None] * z                             # (M, C)
        k1, k2 = self.fno_modes
        ps = torch.arange(-k1 + 1, k1, dtype=torch.float64)
        qs = torch.arange(k2, dtype=torch.float64)
        ey = torch.exp(2j * math.pi * rows.double()[:, None] * mpp * ps[None, :] / self.fno_period_um)
        ex = torch.exp(2j * math.pi * cols.double()[:, None] * mpp * qs[None, :] / self.fno_period_um)
        grid = torch.zeros(len(ps), len(qs), channels, dtype=torch.complex128)
        grid[modes[:, 0] + k1 - 1, modes[:, 1]] = coef
        out = torch.einsum("ip,pqc,jq->ijc", ey, grid, ex)
        return out.real

    # --- sampling -------------------------------------------------------------------------------------------------
    def noise_window(self, seed: int, stream: int, r0: int, r1: int, c0: int, c1: int, mpp: float,
                     device=None) -> torch.Tensor:
        """η at rows [r0, r1) × cols [c0, c1) as (r1−r0, c1−c0, 3) float32 — the chunked path."""
        if self.kind == "white":
            raise ValueError("the white prior's noise is the mollifier's (noise_source)")
        if not self.chunkable:
            raise ValueError(f"the {self.kind} prior (laplacian base) is defined on the periodic canvas only: its "
                             "kernel decays like r^(2γ−2), so no truncated kernel reproduces it; use sample_canvas")
        wb, wf = self._weights()
        h, w = r1 - r0, c1 - c0
        out = torch.zeros(h, w, 3, dtype=torch.float64)
        if wb:
            k = self.kernel(mpp)
            R = (k.shape[0] - 1) // 2
            rows = torch.arange(r0 - R, r1 + R)
            cols = torch.arange(c0 - R, c1 + R)
            xi = gaussian_noise(seed, stream, rows[:, None], cols[None, :]).double()
            out += wb * _conv_valid(xi, k)
        if wf:
            out += wf * self.fno_values(seed, stream, torch.arange(r0, r1), torch.arange(c0, c1), mpp)
        return (out * self.scale).float().to(device if device is not None else "cpu")

    def white_canvas(self, seed: int, stream: int, height: int, width: int) -> torch.Tensor:
        """ξ over a canvas (H, W, 3) float64 (the Philox field)."""
        return gaussian_noise(seed, stream, torch.arange(height)[:, None], torch.arange(width)[None, :]).double()

    def sample_canvas(self, seed: int, stream: int, height: int, width: int, mpp: float,
                      white: torch.Tensor | None = None) -> torch.Tensor:
        """η on the periodic canvas by the exact multiplier (the paper's FFT construction) → (H, W, 3) float64.

        ``white``: ξ to use instead of the seed's Philox field (e.g. the Fourier downsampling of a finer ξ)."""
        if self.kind == "white":
            raise ValueError("the white prior's noise is the mollifier's (noise_source)")
        xi = self.white_canvas(seed, stream, height, width) if white is None else white.double()
        H, W = xi.shape[:2]
        wb, wf = self._weights()
        out = torch.zeros(H, W, xi.shape[2], dtype=torch.float64)
        if wb:
            fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
            fx = torch.fft.rfftfreq(W, dtype=torch.float64)[None, :]
            m = self.base_multiplier(fy, fx, mpp) / mpp
            out += wb * self._base_norm(H, W, mpp) * torch.fft.irfft2(torch.fft.rfft2(xi, dim=(0, 1)) * m[..., None],
                                                                  s=(H, W), dim=(0, 1))
        if wf:
            out += wf * self.fno_values(seed, stream, torch.arange(H), torch.arange(W), mpp, xi.shape[2])
        return out * self.scale

    def _base_norm(self, height: int, width: int, mpp: float) -> float:
        if self._base_kind() == "bessel":
            return self._bessel_norm()
        # Laplacian: unit pixel variance at reference_mpp on a periodic canvas of this canvas's physical size
        # (infrared: no canvas-free constant exists; the same physical canvas at any µm/px gets the same constant)
        ny = max(1, round(height * mpp / self.reference_mpp))
        nx = max(1, round(width * mpp / self.reference_mpp))
        fy = torch.fft.fftfreq(ny, dtype=torch.float64)[:, None]
        fx = torch.fft.fftfreq(nx, dtype=torch.float64)[None, :]
        m = self.base_multiplier(fy, fx, self.reference_mpp) / self.reference_mpp
        return 1.0 / math.sqrt(float((m ** 2).mean()))

    def mode_variance(self, height: int, width: int, mpp: float) -> torch.Tensor:
        """Variance of every Fourier mode (ortho normalisation) of the canvas noise, (H, W) float64 — exact, no
        sampling (the FNO part counted on the canvas modes it lands on when its frequencies are canvas modes)."""
        wb, wf = self._weights()
        fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
        fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
        var = torch.zeros(height, width, dtype=torch.float64)
        if wb:
            var += (wb * self._base_norm(height, width, mpp) * self.base_multiplier(fy, fx, mpp) / mpp) ** 2
        if wf:
            r2 = self.fno_multiplier().abs() ** 2
            modes = self.fno_modes_list()
            step_y = height * mpp / self.fno_period_um              # canvas modes per FNO mode
            step_x = width * mpp / self.fno_period_um
            for (p, q), e in zip(modes.tolist(), r2.tolist()):
                iy, ix = round(p * step_y) % height, round(q * step_x) % width
                share = wf ** 2 * e * height * width                  # ortho: Σ_k var_k = N·pixel variance
                if q == 0 and p == 0:
                    var[iy, ix] += share
                else:                                                 # a real plane wave: half on k, half on −k
                    var[iy, ix] += share / 2
                    var[(-iy) % height, (-ix) % width] += share / 2
        return var * self.scale ** 2

    def pixel_variance(self, height: int, width: int, mpp: float) -> float:
        """Expected pixel variance of the canvas noise (exact, from the spectrum)."""
        return float(self.mode_variance(height, width, mpp).mean())

    # --- training: values at sampled pixels -----------------------------------------------------------------------
    def at_points(self, seed: int, stream: int, rows: torch.Tensor, cols: torch.Tensor, height: int, width: int,
                  mpp: float, block: int = 32) -> torch.Tensor:
        """η at pixels (rows, cols) (1-D int64) → (N, 3) float32: evaluated on the bounding box of each connected
        group of occupied block×block cells (dense patches of training points) with its halo, or on the whole image
        when that is cheaper (points spread uniformly)."""
        R = self.radius(mpp)
        nbc = (width + block - 1) // block
        flat = torch.div(rows, block, rounding_mode="floor") * nbc + torch.div(cols, block, rounding_mode="floor")
        groups = _cell_groups(sorted(set(flat.tolist())), nbc)
        boxes = []
        for cells in groups:
            cr = [c // nbc for c in cells]
            cc = [c % nbc for c in cells]
            boxes.append((min(cr) * block, min(height, (max(cr) + 1) * block),
                          min(cc) * block, min(width, (max(cc) + 1) * block), cells))
        cost = sum((r1 - r0 + 2 * R) * (c1 - c0 + 2 * R) for r0, r1, c0, c1, _ in boxes)
        if cost >= (height + 2 * R) * (width + 2 * R) or not self.chunkable:
            field = (self.noise_window(seed, stream, 0, height, 0, width, mpp) if self.chunkable else
                     self.sample_canvas(seed, stream, height, width, mpp).float())
            return field[rows, cols]
        out = torch.empty(rows.shape[0], 3)
        for r0, r1, c0, c1, cells in boxes:
            sel = torch.isin(flat, torch.tensor(cells, dtype=flat.dtype))
            win = self.noise_window(seed, stream, r0, r1, c0, c1, mpp)
            out[sel] = win[rows[sel] - r0, cols[sel] - c0]
        return out


def _cell_groups(cells: list[int], ncols: int) -> list[list[int]]:
    """Connected groups (8-neighbourhood) of occupied cells given as flat indices of a grid ncols wide."""
    todo, groups = set(cells), []
    while todo:
        stack, group = [todo.pop()], []
        while stack:
            c = stack.pop()
            group.append(c)
            r, q = divmod(c, ncols)
            for dr in (-1, 0, 1):
                for dq in (-1, 0, 1):
                    n = (r + dr) * ncols + (q + dq)
                    if 0 <= q + dq < ncols and n in todo:
                        todo.remove(n)
                        stack.append(n)
        groups.append(sorted(group))
    return groups


def _kernel_grid(length_um: float, mpp: float) -> int:
    """Side of the periodic grid the Bessel kernel is built on: ≥ 24 ℓ/h (the kernel decays like e^(−r/ℓ))."""
    P = 64
    while P < 24 * length_um / mpp and P < _MAX_KERNEL_GRID:
        P *= 2
    return P


@lru_cache(maxsize=32)
def _bessel_energy(length_um: float, gamma: float, symbol: str, mpp: float) -> float:
    """Σ k² of the untruncated Bessel kernel on ξ at ``mpp`` (= its pixel variance on a P×P periodic grid)."""
    prior = NoisePrior(kind="bessel", length_um=length_um, gamma=gamma, symbol=symbol)
    P = _kernel_grid(length_um, mpp)
    f = torch.fft.fftfreq(P, dtype=torch.float64)
    m = prior.base_multiplier(f[:, None], f[None, :], mpp) / mpp
    return float((m ** 2).mean())


@lru_cache(maxsize=32)
def _bessel_kernel(length_um: float, gamma: float, symbol: str, truncation: float,
                   mpp: float) -> tuple[torch.Tensor, float]:
    """(kernel on ξ, dropped energy fraction): m/h on a P×P periodic grid large enough for the kernel to decay
    (P ≥ 24ℓ/h), inverse FFT, cropped to the smallest square radius keeping 1 − ``truncation`` of Σ k²."""
    prior = NoisePrior(kind="bessel", length_um=length_um, gamma=gamma, symbol=symbol)
    P = _kernel_grid(length_um, mpp)
    fy = torch.fft.fftfreq(P, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(P, dtype=torch.float64)[None, :]
    m = prior.base_multiplier(fy, fx, mpp) / mpp
    k = torch.fft.fftshift(torch.fft.irfft2(m, s=(P, P)))            # centre at (P/2, P/2)
    c = P // 2
    e = k ** 2
    total = float(e.sum())
    yy = (torch.arange(P) - c).abs()
    cheb = torch.maximum(yy[:, None], yy[None, :])
    per_radius = torch.zeros(c + 1, dtype=torch.float64).index_add_(0, cheb.clamp_max(c).reshape(-1), e.reshape(-1))
    inside = torch.cumsum(per_radius, 0) / total
    ok = torch.nonzero(1 - inside <= truncation)
    if ok.numel() == 0 or int(ok[0]) >= c - 1:
        raise ValueError(f"the Bessel kernel of ℓ = {length_um:g} µm does not decay within {P // 2} px at "
                         f"{mpp:g} µm/px (truncation {truncation:g}): use a shorter length_um or a coarser µm/px")
    R = int(ok[0])
    return k[c - R:c + R + 1, c - R:c + R + 1].clone(), float(1 - inside[R])


def _conv_valid(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """'valid' 2-D correlation of (H+2R, W+2R, C) with a (2R+1)² symmetric kernel by FFT → (H, W, C) float64."""
    R = (k.shape[0] - 1) // 2
    Hp, Wp = x.shape[0], x.shape[1]
    kp = torch.zeros(Hp, Wp, dtype=torch.float64)
    kp[:2 * R + 1, :2 * R + 1] = k
    kf = torch.fft.rfft2(kp)
    y = torch.fft.irfft2(torch.fft.rfft2(x, dim=(0, 1)) * kf[..., None], s=(Hp, Wp), dim=(0, 1))
    return y[2 * R:, 2 * R:]                                         # circular wrap only in the discarded rim


def fourier_downsample(x: torch.Tensor, factor: int = 2, dims: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Energy-preserving (isometric) Fourier downsampling: keep the |k| < n/(2·factor) modes of the ortho FFT
    and invert with ortho normalisation on the coarse grid (the coarse Nyquist row/column is dropped so the result
    is real). Σ coarse² = Σ over the kept modes of |x̂|² (Parseval): all of Σ x² for a band-limited x. The coarse
    pixels are ``factor`` × the fine pixels' local means (divide by ``factor`` for values in the fine units)."""
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    if factor == 1:
        return x.clone()
    for d in dims:
        if x.shape[d] % factor:
            raise ValueError(f"dimension {d} of size {x.shape[d]} is not divisible by {factor}")
    dtype = x.dtype
    X = torch.fft.fftn(x.double(), dim=dims, norm="ortho")
    for d in dims:
        n, nc = X.shape[d], X.shape[d] // factor
        half = (nc - 1) // 2                                         # kept: −half … +half
        keep = torch.cat([torch.arange(0, half + 1), torch.arange(n - half, n)])
        Xd = X.index_select(d, keep)
        shape = list(Xd.shape)
        shape[d] = nc
        Y = torch.zeros(shape, dtype=X.dtype)
        Y.narrow(d, 0, half + 1).copy_(Xd.narrow(d, 0, half + 1))
        Y.narrow(d, nc - half, half).copy_(Xd.narrow(d, half + 1, half))
        X = Y
    return torch.fft.ifftn(X, dim=dims, norm="ortho").real.to(dtype if dtype.is_floating_point else torch.float64)


def radial_psd(x: torch.Tensor, mpp: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(radius in cycles per canvas, mean power per integer radius) of an (H, W[, C]) square field; power averaged
    over channels; r = 1 … n/2 − 1."""
    if x.dim() == 2:
        x = x[..., None]
    n = x.shape[0]
    P = (torch.fft.fft2(x.double(), dim=(0, 1), norm="ortho").abs() ** 2).mean(-1)
    f = torch.fft.fftfreq(n, d=1.0 / n)
    r = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2).round().long()
    rmax = n // 2
    sums = torch.zeros(rmax + 1, dtype=torch.float64).index_add_(0, r.clamp_max(rmax).reshape(-1), P.reshape(-1))
    counts = torch.zeros(rmax + 1, dtype=torch.float64).index_add_(0, r.clamp_max(rmax).reshape(-1),
                                                                    torch.ones_like(P).reshape(-1))
    radii = torch.arange(1, rmax, dtype=torch.float64)
    return radii, sums[1:rmax] / counts[1:rmax]


def psd_slope(x: torch.Tensor, r_lo: int = 4, r_hi: int | None = None) -> float:
    """Least-squares slope of log PSD against log radius over r_lo … r_hi (default n/4)."""
    radii, power = radial_psd(x)
    r_hi = r_hi or x.shape[0] // 4
    sel = (radii >= r_lo) & (radii <= r_hi)
    lx, ly = torch.log(radii[sel]), torch.log(power[sel])
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx ** 2).sum())


class NoiseSource:
    """The initial and per-step noise of one canvas under a prior: ``noise_window(seed, stream, r0, r1, c0, c1)``
    → (rows, cols, 3) float32. White: the mollifier of noise.py (today's noise, bit-identical)."""

    def __init__(self, prior: NoisePrior, height: int, width: int, mpp: float, mollify_sigma: float,
                 train_resolution: int):
        self.prior, self.H, self.W, self.mpp = prior, int(height), int(width), float(mpp)
        self.mollifier = (Mollifier.for_side(max(self.H, self.W), mollify_sigma, train_resolution)
                          if prior.kind == "white" else None)
        self._canvas: dict[tuple[int, int], torch.Tensor] = {}

    def noise_window(self, seed: int, stream: int, r0: int, r1: int, c0: int, c1: int, device=None) -> torch.Tensor:
        if self.mollifier is not None:
            return self.mollifier.noise_window(seed, stream, r0, r1, c0, c1, self.H, self.W, device=device)
        if self.prior.chunkable:
            return self.prior.noise_window(seed, stream, r0, r1, c0, c1, self.mpp, device=device)
        key = (seed, stream)                                          # canvas-only prior: one canvas FFT per stream
        if key not in self._canvas:
            self._canvas = {key: self.prior.sample_canvas(seed, stream, self.H, self.W, self.mpp).float()}
        return self._canvas[key][r0:r1, c0:c1].to(device if device is not None else "cpu")


def noise_source(prior: NoisePrior, height: int, width: int, mpp: float, mollify_sigma: float,
                 train_resolution: int) -> NoiseSource:
    return NoiseSource(prior, height, width, mpp, mollify_sigma, train_resolution)


def with_kind(prior: NoisePrior, kind: str) -> NoisePrior:
    return replace(prior, kind=kind).validate()
