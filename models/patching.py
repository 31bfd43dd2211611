"""Patch combination for large canvases: window plans, per-window weights, blending, and the coordinator interface.

A patch diffusion model sees a canvas through patch-sized windows; a *combiner* says where the windows lie and
how their per-window outputs make one canvas value per pixel:

``independent`` — a grid at stride = patch (no overlap): every pixel comes from one window. Seams.
``multidiffusion`` — MultiDiffusion (Bar-Tal et al. 2023): overlapping windows at ``stride`` (default patch/2),
uniform weights: the per-pixel mean of the covering windows' outputs.
``mixture`` — Mixture of Diffusers (Jiménez 2023): the same windows, each output weighted by a Gaussian
window centred on the patch with standard deviation ``sigma`` × patch (default 0.1, the reference code's
variance 0.01 on [0, 1] patch coordinates).
``dde`` — Diffusion Domain Expansion: the multidiffusion windows and uniform average, with a learned
:class:`PatchCoordinator`'s correction added to every window output first (no coordinator or a zero correction
= multidiffusion exactly).

Along each axis the windows start at 0, stride, 2·stride, … and the last one is clamped inward (start =
length − patch) so that every pixel is covered; an axis shorter than the patch is covered by one window as long
as the axis. All windows of a plan therefore have one shape, ``(min(patch, H), min(patch, W))``.

The canvas value is Σ_i w_i·out_i / Σ_i w_i per pixel. :func:`blend` computes it at once;
:class:`BlendAccumulator` adds windows one at a time in plan order (so results do not depend on how windows are
batched) and can be saved and restored between windows (resumable samplers).

Pure torch/numpy: imports nothing above ``models/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "COMBINERS", "DEFAULT_MIXTURE_SIGMA", "WindowPlan", "PatchCoordinator", "ZeroCoordinator", "axis_starts",
    "plan_windows", "window_weight", "blend", "BlendAccumulator", "combine", "corrected", "grid_kwargs",
    "overlap_count",
]

COMBINERS: tuple[str, ...] = ("independent", "multidiffusion", "mixture", "dde")
BLENDS: tuple[str, ...] = ("uniform", "mixture")  # the weights dde averages its corrected windows with
DEFAULT_MIXTURE_SIGMA = 0.1  # Mixture of Diffusers: variance 0.01 on [0, 1] patch coordinates → σ = 0.1·patch


def axis_starts(length: int, patch: int, stride: int) -> list[int]:
    """Window starts along one axis: 0, stride, 2·stride, … while the window fits, plus a last window clamped
    inward (start = length − patch) if the grid leaves pixels uncovered; ``[0]`` if length ≤ patch."""
    if length < 1 or patch < 1 or stride < 1:
        raise ValueError(f"length, patch and stride must be ≥ 1, got {length}, {patch}, {stride}")
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


@dataclass(frozen=True)
class WindowPlan:
    """Windows of one combiner over one canvas.

    ``origins``: (N, 2) int64 canvas (y, x) of each window's top-left corner, row-major; ``size``: (h, w) of
    every window (the patch, or the canvas side where it is smaller); ``weight``: (h, w) float32 weight shared
    by all windows; ``stride``: window spacing before the inward clamp of the last row/column.
    """

    combiner: str
    canvas: tuple[int, int]
    patch: int
    stride: int
    size: tuple[int, int]
    origins: np.ndarray
    weight: Tensor

    def __len__(self) -> int:
        return len(self.origins)

    def origins_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """``origins`` as a LongTensor (N, 2), for :meth:`PatchCoordinator.correction`."""
        return torch.as_tensor(self.origins, dtype=torch.long, device=device)

    def crops(self, x: Tensor, index: Sequence[int] | None = None) -> Tensor:
        """Windows cut from a canvas ``x`` (..., H, W) → (n, ..., h, w), for window indices ``index``
        (default all)."""
        h, w = self.size
        idx = range(len(self)) if index is None else index
        return torch.stack([x[..., int(self.origins[i, 0]):int(self.origins[i, 0]) + h,
                              int(self.origins[i, 1]):int(self.origins[i, 1]) + w] for i in idx])


def window_weight(combiner: str, size: tuple[int, int], patch: int,
                  sigma: float = DEFAULT_MIXTURE_SIGMA) -> Tensor:
    """(h, w) float32 weight of one window: ones, or for ``mixture`` a separable Gaussian centred on the window
    with standard deviation ``sigma``·patch."""
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    if combiner != "mixture":
        return torch.ones(size, dtype=torch.float32)
    if not sigma > 0:
        raise ValueError(f"mixture sigma must be > 0 (a fraction of the patch), got {sigma}")
    s = float(sigma) * patch

    def axis(n: int) -> Tensor:
        c = (n - 1) / 2.0
        return torch.exp(-((torch.arange(n, dtype=torch.float64) - c) ** 2) / (2.0 * s * s))

    # float64 then cast: the corner weights (≈ e^-25 at σ = 0.1) stay normal float32 numbers, never 0
    return (axis(size[0])[:, None] * axis(size[1])[None, :]).to(torch.float32)


def plan_windows(combiner: str, canvas: tuple[int, int], patch: int, stride: int | None = None,
                 sigma: float = DEFAULT_MIXTURE_SIGMA, *, blend: str = "uniform") -> WindowPlan:
    """The windows of ``combiner`` over a canvas (H, W) for a square ``patch``.

    ``stride``: spacing of overlapping windows (default patch // 2, at least 1); ignored by ``independent``
    (stride = patch). ``sigma``: Gaussian width of ``mixture`` as a fraction of the patch. ``blend``: the
    weights ``dde`` averages its corrected windows with (:func:`coordinator_blend`): ``uniform`` (the paper's,
    MultiDiffusion's) or ``mixture`` (Mixture of Diffusers' Gaussian at :data:`DEFAULT_MIXTURE_SIGMA`, the
    width coordinators are trained with, whatever ``sigma`` says); the other combiners ignore it.
    """
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    hh, ww = int(canvas[0]), int(canvas[1])
    if hh < 1 or ww < 1:
        raise ValueError(f"canvas must be at least 1×1, got {canvas}")
    if patch < 1:
        raise ValueError(f"patch must be ≥ 1, got {patch}")
    if combiner == "independent":
        stride = patch
    elif stride is None:
        stride = max(1, patch // 2)
    elif not 1 <= stride <= patch:
        raise ValueError(f"stride must be in [1, patch={patch}], got {stride}")
    ys, xs = axis_starts(hh, patch, stride), axis_starts(ww, patch, stride)
    origins = np.array([(y, x) for y in ys for x in xs], dtype=np.int64).reshape(-1, 2)
    size = (min(patch, hh), min(patch, ww))
    if combiner == "dde" and blend == "mixture":
        weight = window_weight("mixture", size, patch, DEFAULT_MIXTURE_SIGMA)
    else:
        weight = window_weight(combiner, size, patch, sigma)
    return WindowPlan(combiner, (hh, ww), int(patch), int(stride), size, origins, weight)


def coordinator_blend(coordinator: "PatchCoordinator | None") -> str:
    """The overlap weights a coordinator was trained to be averaged with (``config.blend``; ``uniform`` when it
    has none, as the paper's)."""
    return str(getattr(getattr(coordinator, "config", None), "blend", "uniform"))


@runtime_checkable
class PatchCoordinator(Protocol):
    """A learned coordinator of overlapping patch outputs (DDE): it sees all windows of one denoising step and
    returns a correction added to each window's output before the overlap average (uniform, the paper's; or
    Gaussian for a coordinator whose ``config.blend`` is ``mixture``, :func:`coordinator_blend`).

    Attributes: ``patch`` — window side (px of the canvas the base model runs on, e.g. latent px) it was trained
    with; ``stride`` — window spacing it was trained with. Optional: ``batches_canvases = True`` when
    ``correction`` also takes ``canvas=`` (N,), the canvas index of each window, to correct the windows of
    several canvases in one call (each canvas's windows apart); ``moves_grid = True`` when ``correction`` also
    takes ``grid=``, the offset ``grid_for_step(step)`` of its attention grid at each sampling step
    (:func:`grid_kwargs`).
    """

    patch: int
    stride: int

    def correction(self, outputs: Tensor, noisy: Tensor, origins: Tensor, cond: Tensor | None,
                   t: Tensor) -> Tensor:
        """Correction (N, C, P, P) to add to ``outputs`` (N, C, P, P), the base model's per-window outputs of
        one step, given ``noisy`` (N, C, P, P) the windows' inputs, ``origins`` (N, 2) long, the canvas (y, x)
        of each window's top-left corner, ``cond`` (N, Cc, P, P) or None, the windows' conditioning (e.g. the
        label crop, one-hot or ids), and ``t`` (N,) the noise level or timestep of each window. Must return
        zeros when untrained (the composite is then exactly the overlap average). Must not modify its inputs."""
        ...


class ZeroCoordinator:
    """An untrained coordinator: the correction is zero, so ``dde`` reproduces ``multidiffusion`` exactly."""

    def __init__(self, patch: int, stride: int):
        self.patch, self.stride = int(patch), int(stride)

    def correction(self, outputs: Tensor, noisy: Tensor, origins: Tensor, cond: Tensor | None,
                   t: Tensor) -> Tensor:
        return torch.zeros_like(outputs)


def _weights_for(weights: Tensor, n: int) -> Tensor:
    if weights.dim() == 2:
        return weights.expand(n, *weights.shape)
    if weights.dim() == 3 and weights.shape[0] == n:
        return weights
    raise ValueError(f"weights must be (h, w) or (N={n}, h, w), got {tuple(weights.shape)}")


class BlendAccumulator:
    """Running Σ w·out (``num``, (C, H, W)) and Σ w (``den``, (H, W)) over windows added in order.

    Sums are float32 (or float64 if asked) whatever the outputs' dtype; adding windows one by one in a fixed
    order makes the result independent of how they were batched. ``num``/``den`` are plain tensors: save them
    to resume a partly accumulated canvas bit-identically.
    """

    def __init__(self, channels: int, canvas: tuple[int, int], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        self.num = torch.zeros((channels, int(canvas[0]), int(canvas[1])), dtype=dtype, device=device)
        self.den = torch.zeros((int(canvas[0]), int(canvas[1])), dtype=dtype, device=device)

    @classmethod
    def restore(cls, num: Tensor, den: Tensor) -> "BlendAccumulator":
        """An accumulator continuing from saved sums."""
        acc = cls.__new__(cls)
        if num.dim() != 3 or den.shape != num.shape[1:]:
            raise ValueError(f"saved sums do not match: num {tuple(num.shape)}, den {tuple(den.shape)}")
        acc.num, acc.den = num, den
        return acc

    def add(self, outputs: Tensor, origins: Tensor | np.ndarray, weights: Tensor) -> None:
        """Add windows ``outputs`` (n, C, h, w) at ``origins`` (n, 2) with ``weights`` (h, w) or (n, h, w)."""
        n, _, h, w = outputs.shape
        org = origins.tolist() if isinstance(origins, (Tensor, np.ndarray)) else list(origins)
        if len(org) != n:
            raise ValueError(f"{n} outputs but {len(org)} origins")
        wts = _weights_for(weights.to(self.num.device, self.num.dtype), n)
        outs = outputs.to(self.num.dtype)
        for i in range(n):
            y, x = int(org[i][0]), int(org[i][1])
            self.num[:, y:y + h, x:x + w] += wts[i] * outs[i]
            self.den[y:y + h, x:x + w] += wts[i]

    def result(self) -> Tensor:
        """Σ w·out / Σ w per pixel (C, H, W); raises if a pixel has no weight."""
        if not bool((self.den > 0).all()):
            raise ValueError("some canvas pixels are covered by no window (zero total weight)")
        return self.num / self.den


def blend(outputs: Tensor, windows: Tensor | np.ndarray, weights: Tensor, canvas_shape: tuple[int, int]) -> Tensor:
    """Canvas (C, H, W) = Σ_i w_i·out_i / Σ_i w_i per pixel, from window outputs (N, C, h, w) at ``windows``
    (N, 2) canvas (y, x) origins with ``weights`` (h, w) shared or (N, h, w). float32 (float64 inputs stay
    float64); windows summed in the given order."""
    dtype = torch.float64 if outputs.dtype == torch.float64 else torch.float32
    acc = BlendAccumulator(outputs.shape[1], canvas_shape, dtype=dtype, device=outputs.device)
    acc.add(outputs, windows, weights)
    return acc.result()


def combine(plan: WindowPlan, outputs: Tensor, *, noisy: Tensor | None = None, cond: Tensor | None = None,
            t: Tensor | None = None, coordinator: PatchCoordinator | None = None) -> Tensor:
    """Canvas (C, H, W) from all window outputs (N, C, h, w) of one step under ``plan``; for ``dde`` the
    coordinator's correction (needs ``noisy`` and ``t``) is added to the outputs first."""
    outputs = corrected(plan, outputs, noisy=noisy, cond=cond, t=t, coordinator=coordinator)
    return blend(outputs, plan.origins, plan.weight, plan.canvas)


def corrected(plan: WindowPlan, outputs: Tensor, *, noisy: Tensor | None = None, cond: Tensor | None = None,
              t: Tensor | None = None, coordinator: PatchCoordinator | None = None, step: int | None = None) -> Tensor:
    """``outputs`` plus the coordinator's correction for a ``dde`` plan with a coordinator; else ``outputs``.
    ``step``: the sampling step, for a coordinator whose attention grid moves per step (``moves_grid``)."""
    if plan.combiner != "dde" or coordinator is None:
        return outputs
    return outputs + correction(plan, outputs, noisy=noisy, cond=cond, t=t, coordinator=coordinator, step=step)


def correction(plan: WindowPlan, outputs: Tensor, *, noisy: Tensor | None, cond: Tensor | None, t: Tensor | None,
               coordinator: PatchCoordinator, step: int | None = None) -> Tensor:
    """The coordinator's correction of the windows' ``outputs`` (their shape and dtype), for :func:`corrected`."""
    if noisy is None or t is None:
        raise ValueError("a dde coordinator needs the windows' inputs (noisy) and noise levels (t)")
    delta = coordinator.correction(outputs, noisy, plan.origins_tensor(outputs.device), cond, t,
                                   **grid_kwargs(coordinator, step))
    if delta.shape != outputs.shape:
        raise ValueError(f"coordinator correction has shape {tuple(delta.shape)}, outputs {tuple(outputs.shape)}")
    return delta.to(outputs.dtype)


def grid_kwargs(coordinator: PatchCoordinator, step: int | None) -> dict:
    """``{"grid": offset}`` for a coordinator whose attention grid moves per sampling step (``moves_grid``;
    ``grid_for_step(step)``), else nothing."""
    if not getattr(coordinator, "moves_grid", False):
        return {}
    if step is None:
        raise ValueError("this coordinator's attention grid moves per step: the sampling step is needed")
    return {"grid": coordinator.grid_for_step(int(step))}


def overlap_count(plan: WindowPlan) -> Tensor:
    """(H, W) number of windows covering each pixel (float32)."""
    acc = BlendAccumulator(1, plan.canvas)
    acc.add(torch.ones((len(plan), 1, *plan.size)), plan.origins, torch.ones(plan.size))
    return acc.den

