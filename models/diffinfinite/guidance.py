"""Classifier-free guidance with one guided prediction per label, combined through the label mask.

DiffInfinite (paper Eq. 2, Fig. 2b; reference notes §5):

* guided noise ε̃ = (1 + ω)·ε(z, c) − ω·ε(z, ∅)  (the API takes ω; ω = 0 → the conditional prediction alone);
* a crop whose label map holds labels U gets one conditional prediction per label u ∈ U \\ {null}; every pixel
  of label u takes ε̃_u; pixels of the null label (image model: 0 = "unknown") take the unconditional ε(∅);
* the unconditional pass is computed once per crop and shared by all its labels (the official code runs a
  separate null pass per label: 2·L forwards instead of L + 1).

Only the labels of the pixels a crop actually *owns* need a prediction (the random-patch sampler keeps the
first value computed per pixel, so predictions for pixels owned by an earlier crop would be thrown away);
:func:`passes_for` takes that label set.

Because the DDIM update is pixel-wise, composing per-label DDIM steps through the mask (official code) equals
one DDIM step on the per-pixel combined ε̃ with per-pixel noise — which is what the sampler does.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Mapping, Protocol, Sequence

import torch
from torch import nn

__all__ = [
    "NULL", "cfg", "passes_for", "combine", "ConditionalDenoiser", "ImageDenoiser", "MaskDenoiser",
    "guided_eps",
]

#: Key of the unconditional prediction in the per-crop prediction dict.
NULL = None


def cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor | None, omega: float) -> torch.Tensor:
    """(1 + ω)·ε(c) − ω·ε(∅); with ω = 0 returns ε(c) (no unconditional pass needed)."""
    if omega == 0:
        return eps_cond
    if eps_uncond is None:
        raise ValueError("guidance ω ≠ 0 needs the unconditional prediction")
    return (1.0 + omega) * eps_cond - omega * eps_uncond


def passes_for(labels: Iterable[int], omega: float, null_label: int | None) -> list[int | None]:
    """Forward passes a crop needs for the given (owned) labels: ``None`` = the shared unconditional pass,
    then one conditional pass per non-null label, ascending."""
    labels = sorted({int(u) for u in labels})
    cond = [u for u in labels if u != null_label]
    need_null = (null_label is not None and null_label in labels) or (omega != 0 and bool(cond))
    return ([NULL] if need_null else []) + cond


def combine(label_window: torch.Tensor, preds: Mapping[int | None, torch.Tensor], omega: float,
            null_label: int | None) -> torch.Tensor:
    """Per-pixel guided ε̃ for one crop.

    ``label_window``: (h, w) integer labels (0…255); ``preds``: {label or NULL: (C, h, w)}. A pixel of label u
    takes ``cfg(preds[u], preds[NULL], ω)``; a pixel of ``null_label`` takes ``preds[NULL]``. Pixels whose label
    has no prediction are NaN (the sampler never keeps them: they belong to another crop).

    One gather over the stacked candidates instead of a select per label: a fixed handful of kernels per crop
    whatever its label count (on a GPU each is a launch, and a 50000² step finalises ~10⁴ crops). The
    arithmetic is that of :func:`cfg`, elementwise, so the result is bit-identical to selecting per label.
    """
    any_pred = next(iter(preds.values()))
    uncond = preds.get(NULL)
    conds = [u for u in preds if u is not NULL and u != null_label]
    slabs: list[torch.Tensor] = []
    lut = [-1] * 256  # label → slab index; -1 → the NaN slab
    if uncond is not None and null_label is not None:
        lut[int(null_label)] = 0
        slabs.append(uncond[None])
    if conds:
        offset = len(slabs)  # after the unconditional slab when there is one
        slabs.append(cfg(torch.stack([preds[u] for u in conds]), uncond, omega))
        for i, u in enumerate(conds):
            lut[int(u)] = offset + i
    n = sum(t.shape[0] for t in slabs)
    slabs.append(torch.full_like(any_pred, float("nan"))[None])
    table = torch.tensor([n if v < 0 else v for v in lut], dtype=torch.long, device=any_pred.device)
    idx = table[label_window.to(any_pred.device).long()]
    cand = torch.cat(slabs)
    return torch.gather(cand, 0, idx[None, None].expand(1, *any_pred.shape))[0]


class ConditionalDenoiser(Protocol):
    """What the sampler calls: ε for a batch of crops, each with its label window and the label to condition
    on (``None`` = unconditional)."""

    null_label: int | None
    out_channels: int

    def __call__(self, x: torch.Tensor, t: torch.Tensor, label_windows: torch.Tensor,
                 labels: Sequence[int | None]) -> torch.Tensor:  # pragma: no cover - protocol
        ...


class _LabelCheck:
    """Checks each label against the network's classes the first time an adapter sees it.

    The networks' ``forward`` does not range-check labels (a host sync there would stall the GPU and break
    ``torch.compile`` graphs); the adapters' labels are Python ints, so checking them here costs nothing on the
    device, and only new labels reach the network's ``check_labels``.
    """

    unet: nn.Module
    _checked_labels: set[int]

    def check_labels(self, labels: Iterable[int | None]) -> None:
        """Raise ``ValueError`` if a label (``None`` = the unconditional pass, always valid) is not a class of
        the network; each label is checked once per adapter."""
        new = {int(u) for u in labels if u is not None} - self._checked_labels
        if not new:
            return
        check = getattr(self.unet, "check_labels", None)  # a torch.compile wrapper forwards the attribute
        if check is not None:
            check(sorted(new))
        self._checked_labels.update(new)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def batch_bucket(n: int) -> int:
    """The batch a padded network call runs: the next power of two ≥ ``n`` (at least 8)."""
    return max(8, 1 << (max(n, 1) - 1).bit_length())


def _call_padded(fn, pad: bool, *tensors: torch.Tensor, **kwargs) -> torch.Tensor:
    """``fn(*tensors, **kwargs)``; with ``pad`` the batch is padded to :func:`batch_bucket` with copies of the
    first item and the padding dropped from the output — CUDA graphs are recorded per input shape, so a few
    batch sizes keep their number (and memory) small whatever a step's remainder batch holds."""
    n = tensors[0].shape[0]
    if not pad or batch_bucket(n) == n:
        return fn(*tensors, **kwargs)
    extra = batch_bucket(n) - n
    padded = [torch.cat((v, v[:1].expand(extra, *v.shape[1:]))) for v in tensors]
    return fn(*padded, **kwargs)[:n]


class ImageDenoiser(_LabelCheck):
    """Adapter for the mask-conditioned image UNet ``unet(x, time, mask)``.

    The conditional pass for label u gets ``mask = (labels == u)·u`` (binary mask times the label; the network
    takes class = max of the mask); the unconditional pass gets an all-zero mask, i.e. label 0, which is both
    the null condition and "unknown".
    """

    null_label: int | None = 0

    def __init__(self, unet: nn.Module, *, out_channels: int = 4, autocast_dtype: torch.dtype | None = None,
                 pad_batches: bool = False):
        self.unet = unet
        self.out_channels = out_channels
        self.autocast_dtype = autocast_dtype
        self.pad_batches = pad_batches  # network calls at a few fixed batch sizes (CUDA graphs)
        self._checked_labels = set()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, label_windows: torch.Tensor,
                 labels: Sequence[int | None]) -> torch.Tensor:
        self.check_labels(labels)
        lab = torch.tensor([0 if u is None else int(u) for u in labels], dtype=torch.long, device=x.device)
        lab = lab.view(-1, 1, 1)
        mask = (label_windows.to(x.device).long() == lab).long() * lab  # zero everywhere for the null pass
        with _autocast(x.device, self.autocast_dtype):
            eps = _call_padded(self.unet, self.pad_batches, x, t, mask.unsqueeze(1))
        return eps.float()


class MaskDenoiser(_LabelCheck):
    """Adapter for the subtype-conditioned mask UNet ``unet(x, time, classes, cond_drop_prob)``.

    The conditional pass forces ``cond_drop_prob = 0`` (the official sampler leaves the training dropout on and
    loses the subtype for half the samples: bug #2); the unconditional pass uses ``cond_drop_prob = 1`` (the
    learned null embedding). The mask model has no null *label*: every subtype is a condition.
    """

    null_label: int | None = None

    def __init__(self, unet: nn.Module, *, out_channels: int = 4, autocast_dtype: torch.dtype | None = None,
                 pad_batches: bool = False):
        self.unet = unet
        self.out_channels = out_channels
        self.autocast_dtype = autocast_dtype
        self.pad_batches = pad_batches  # network calls at a few fixed batch sizes (CUDA graphs)
        self._checked_labels = set()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, label_windows: torch.Tensor,
                 labels: Sequence[int | None]) -> torch.Tensor:
        self.check_labels(labels)
        out = torch.empty(x.shape[0], self.out_channels, *x.shape[2:], dtype=torch.float32, device=x.device)
        cond = [i for i, u in enumerate(labels) if u is not None]
        null = [i for i, u in enumerate(labels) if u is None]
        with _autocast(x.device, self.autocast_dtype):
            if cond:
                idx = torch.tensor(cond, device=x.device)
                classes = torch.tensor([int(labels[i]) for i in cond], dtype=torch.long, device=x.device)
                out[idx] = _call_padded(self.unet, self.pad_batches, x[idx], t[idx], classes,
                                        cond_drop_prob=0.0).float()
            if null:
                idx = torch.tensor(null, device=x.device)
                classes = torch.zeros(len(null), dtype=torch.long, device=x.device)
                out[idx] = _call_padded(self.unet, self.pad_batches, x[idx], t[idx], classes,
                                        cond_drop_prob=1.0).float()
        return out


def guided_eps(denoiser: ConditionalDenoiser, x: torch.Tensor, t: int | torch.Tensor, label_windows: torch.Tensor,
               omega: float, owned: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Guided ε̃ for a batch of crops ``x`` (B, C, h, w) with label windows (B, h, w), all passes in one batch.

    ``owned`` (B, h, w) bool restricts which pixels need a prediction (default: all). Returns (ε̃, forwards);
    pixels outside ``owned`` may be NaN.
    """
    b = x.shape[0]
    jobs: list[tuple[int, int | None]] = []
    for i in range(b):
        lw = label_windows[i]
        labs = torch.unique(lw if owned is None else lw[owned[i]]).tolist()
        jobs.extend((i, u) for u in passes_for(labs, omega, denoiser.null_label))
    idx = torch.tensor([i for i, _ in jobs], device=x.device)
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        tt = t.to(x.device).long()
    else:
        tt = torch.full((b,), int(t), dtype=torch.long, device=x.device)
    eps = denoiser(x[idx], tt[idx], label_windows[idx], [u for _, u in jobs])
    out = []
    for i in range(b):
        preds = {u: eps[j] for j, (k, u) in enumerate(jobs) if k == i}
        out.append(combine(label_windows[i], preds, omega, denoiser.null_label))
    return torch.stack(out), len(jobs)
