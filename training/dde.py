"""``slidesynth train dde-coordinator``: train a DDE coordinator over a frozen patch model (DDE paper Eq. 5).

Per step: a canvas side L is drawn from {P + s, P + 2s, …, P + max_extra·s} (the number of windows per batch
varies, as in the paper's music runs), ``batch_size`` canvases of L×L are cut, noised, split into the windows of
the ``dde`` plan (:func:`models.patching.plan_windows`), the frozen base runs on every window, the coordinator
adds its correction, the corrected outputs are averaged over overlaps (:func:`models.patching.blend`) and the
loss is the base's own denoising loss on the composite. Only the coordinator is trained (Adam, gradient
clipping, EMA of the weights); the EMA weights are shipped.

Bases:

* ``oracle`` — the exact Bayes patch denoiser of a stationary Gaussian field (:mod:`evaluation.gaussian_oracle`),
  EDM: σ ~ LogNormal(P_mean, P_std), loss λ(σ)·‖D̃(X + σε) − X‖², λ = (σ² + σ_d²)/(σ·σ_d)²; the coordinator sees σ.
* a DiffInfinite model folder — its frozen image UNet (ε-prediction, cosine DDPM schedule as trained,
  t ~ U{0…T−1}) on VAE latents of procedural slides (:mod:`procedural.tissue`), conditioned per window exactly as
  the sampler does at guidance 0 (one pass per label of the window, combined through the label crop,
  :func:`models.diffinfinite.guidance.guided_eps`); the coordinator sees the latent label crop; a fraction
  ``p_null`` of canvases is trained with the null (all-unknown) condition, which classifier-free guidance asks
  for at sampling; loss ‖ε̃ − ε‖² on the composite ε̃.

Loss options (all keep the minimiser, the conditional expectation): ``loss_weight="disagreement"`` divides each
canvas's loss by the RMS² of its windows' deviations from their overlap average (instead of the oracle's λ(σ);
every noise level counts alike), ``loss_levels`` adds the error's block averages (:func:`multiscale_mse`); with
``scale="disagreement"`` the coordinator itself works in those units (:func:`models.dde.coordinator.
window_deviations`).

Determinism and resumption: all randomness of step k is drawn from generators keyed by (seed, k), so a run's
result depends only on the seed and the step count; the checkpoint (``<out>/checkpoints/dde-last.pt``: network,
EMA, optimiser, step, losses) therefore resumes bit-identically. The folder written is the format of
:mod:`models.dde.loading` (weights, card with the base's sha256 and the recipe, held-out evaluation: composite
loss of averaging vs the coordinator on fixed crops).
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from models.dde.coordinator import CoordinatorConfig, DDECoordinator, check_choices, window_deviations
from models.dde.loading import COORDINATOR_DIR, save_coordinator
from models.hashing import sha256_file
from models.patching import blend, plan_windows

__all__ = ["DDETrainConfig", "DDETrainResult", "train_dde_coordinator", "build_base", "evaluate_composite",
           "lr_factor"]

CHECKPOINT = "checkpoints/dde-last.pt"
DATA_CACHE = "checkpoints/dde-data.pt"


@dataclass
class DDETrainConfig:
    base: str = "weights/diffinfinite-demo"  # "oracle" or a DiffInfinite model folder
    out: Path | None = None  # coordinator folder (default <base>/dde-coordinator; required for the oracle)
    steps: int = 1000
    stop_after: int | None = None  # stop after this many steps in this run (resume later)
    batch_size: int = 2  # canvases per step
    min_extra: int = 1  # canvas sides P + k·s, k uniform in min_extra…max_extra
    max_extra: int = 2
    patch: int | None = None  # window side (default: 64 latent px for DiffInfinite, the oracle's patch)
    stride: int | None = None  # default patch/2 (DiffInfinite), patch/4 (oracle)
    lr: float = 3e-4
    warmup: int = 50
    # the last lr_decay·steps steps lower the lr linearly to 0 (0 = constant after the warm-up); on the oracle
    # it reaches the constant lr's plateau in fewer steps, not below it (README)
    lr_decay: float = 0.0
    grad_clip: float = 1.0
    ema_beta: float = 0.995
    ema_after: int = 50
    save_every: int = 100
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    token: int = 4
    attn_window: int = 32
    # DiffInfinite base
    p_null: float = 0.1
    slides: int = 16  # procedural slides for training (latents cached in the checkpoint folder)
    holdout_slides: int = 4
    slide_px: int = 1024
    # oracle base
    p_mean: float = -1.0  # EDM log-normal σ (DDE maps setting)
    p_std: float = 1.6
    target: str = "clean"  # oracle: "clean" (the paper's loss) or "bayes" (the exact canvas denoiser: same minimiser)
    scale: str = "none"  # coordinator architecture: "disagreement" = in/output in units of the windows' disagreement
    loss_weight: str = "base"  # "base" (EDM λ / plain ε) or "disagreement": each canvas ÷ its disagreement scale²
    blend: str = "uniform"  # coordinator architecture: overlap weights after the correction (uniform = the paper's)
    attn_grid: str = "fixed"  # coordinator architecture: "moving" = attention squares shifted at random per canvas
    attention: str = "squares"  # coordinator architecture: "neighbourhood" = each token attends to the cells around it
    attn_block: int = 0  # coordinator architecture: neighbourhood query blocks (cells; 0 = attn_window/(4·token))
    loss_levels: int = 0  # multiscale loss: also the error pooled by 2 … 2^loss_levels (0 = the paper's plain MSE)
    init: Path | None = None  # warm start: a coordinator folder of the same architecture over the same base
    # evaluation
    eval_crops: int = 16
    data_cache: Path | None = None  # DiffInfinite latents cache (default <out>/checkpoints/dde-data.pt)
    resume: bool = False
    overwrite: bool = False
    command: str | None = None  # the command line recorded on the card

    def validate(self) -> None:
        for name in ("steps", "batch_size", "save_every", "eval_crops"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 <= self.min_extra <= self.max_extra:
            raise ValueError(f"need 0 ≤ min_extra ≤ max_extra, got {self.min_extra}, {self.max_extra}")
        if not 0.0 <= self.p_null < 1.0:
            raise ValueError(f"p_null must be in [0, 1), got {self.p_null}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be ≥ 1, got {self.stop_after}")
        if not 0.0 <= float(self.lr_decay) <= 1.0:
            raise ValueError(f"lr_decay must be in [0, 1] (a fraction of the steps), got {self.lr_decay}")
        if not 0 <= int(self.loss_levels) <= 8:
            raise ValueError(f"loss_levels must be in 0…8, got {self.loss_levels}")
        check_choices(self)
        if self.loss_weight not in ("base", "disagreement"):
            raise ValueError(f"loss_weight must be base or disagreement, got {self.loss_weight!r}")
        if self.target not in ("clean", "bayes"):
            raise ValueError(f"target must be clean or bayes, got {self.target!r}")
        if self.target == "bayes" and self.base != "oracle":
            raise ValueError("target: bayes needs the oracle base (its exact canvas denoiser is known)")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")


@dataclass
class DDETrainResult:
    out: Path
    steps_done: int
    losses: list[float] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    clean: torch.Tensor  # (B, C, L, L)
    noise: torch.Tensor  # (B, C, L, L) unit Gaussian
    level: torch.Tensor  # (B,) timestep (DiffInfinite) or σ (oracle), float
    cond: torch.Tensor | None  # (B, 1, L, L) latent label ids, or None
    grid: torch.Tensor | None = None  # (B, 2) attention-grid offsets (tokens) of a moving-grid coordinator


def _generator(*parts: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) % (1 << 63) for p in parts])


def multiscale_mse(err: torch.Tensor, levels: int) -> torch.Tensor:
    """Per-item (B,) mean squared error of ``err`` (B, C, H, W), plus, for f = 2, 4, …, 2^``levels``, the mean
    square of the error average-pooled over f×f blocks times f² (levels whose blocks exceed the canvas are
    skipped).

    A spatially white error counts about the same at every level, an error constant over a block of side ≥ f
    f² times as much: what decides a sample's low-frequency power and its seams — a shortfall at the window scale
    and above, tied to the stride lines — weighs as much as the fine detail that dominates the plain MSE (on the
    Gaussian oracle the averaged composite's excess over the exact canvas denoiser is a few % of the plain loss,
    yet it costs 20–30 % of the sampled variance). Every term is a positive quadratic form of the error, so the
    minimiser is the same as the plain MSE's (the conditional expectation); ``levels`` 0 is the plain MSE."""
    out = err.pow(2).flatten(1).mean(1)
    f = 2
    for _ in range(int(levels)):
        if min(err.shape[-2:]) < f:
            break
        pooled = torch.nn.functional.avg_pool2d(err, f, ceil_mode=True)
        out = out + (f * f) * pooled.pow(2).flatten(1).mean(1)
        f *= 2
    return out


# ------------------------------------------------------------------------------------------ bases
class DiffInfiniteBase:
    """The frozen image UNet of a DiffInfinite model folder on latent crops of procedural slides."""

    kind = "diffinfinite"

    def __init__(self, folder: str | Path, cfg: DDETrainConfig, device: torch.device, cache: Path | None,
                 log: Callable[[str], None] = print):
        from models.diffinfinite.checkpoints import IMAGE_WEIGHTS
        from models.diffinfinite.guidance import ImageDenoiser
        from models.diffinfinite.loading import load_diffinfinite
        from models.schedules import cosine_alphas_cumprod

        self.folder = Path(folder)
        self.models = load_diffinfinite(self.folder, device)
        self.unet = self.models.image_unet.eval().requires_grad_(False)
        self.denoiser = ImageDenoiser(self.unet)
        self.channels = int(self.unet.config.channels)
        self.num_classes = int(self.unet.config.num_classes)
        self.patch = int(cfg.patch or 64)
        self.stride = int(cfg.stride or self.patch // 2)
        self.device = device
        self.p_null = float(cfg.p_null)
        self.timesteps = 1000
        # training's schedule (float32 ᾱ, not normalised): the distribution the UNet was trained on
        self.alphas_cumprod = cosine_alphas_cumprod(self.timesteps, normalize=False).float()
        self.weights_file = IMAGE_WEIGHTS
        self.identity = {"model": self.models.card.name, "file": IMAGE_WEIGHTS,
                         "sha256": sha256_file(self.folder / IMAGE_WEIGHTS)}
        self.train_data, self.holdout_data = self._data(cfg, cache, log)
        self.loss_levels = int(cfg.loss_levels)
        self.loss_weight = cfg.loss_weight
        self.blend = cfg.blend  # the weights the composite averages the corrected windows with

    def coordinator_config(self, cfg: DDETrainConfig) -> CoordinatorConfig:
        return CoordinatorConfig(channels=self.channels, patch=self.patch, stride=self.stride, token=cfg.token,
                                 hidden=cfg.hidden, depth=cfg.depth, heads=cfg.heads, attn_window=cfg.attn_window,
                                 cond="labels", cond_channels=self.num_classes, noise_input="timestep",
                                 scale=cfg.scale, blend=cfg.blend, attn_grid=cfg.attn_grid,
                                 attention=cfg.attention, attn_block=cfg.attn_block)

    def _data(self, cfg: DDETrainConfig, cache: Path | None, log):
        from models.diffinfinite.unet import downsample_label_mask
        from procedural.tissue import item_seed, random_layout, render_tile

        recipe = {"slides": cfg.slides, "holdout": cfg.holdout_slides, "px": cfg.slide_px, "seed": cfg.seed,
                  "kinds": "slide,tile alternating",
                  "glass_label": 5 if self.num_classes > 5 else 0, "base_sha256": self.identity["sha256"]}
        if cache is not None and cache.is_file():
            data = torch.load(cache, weights_only=True)
            if data.get("recipe") == json.dumps(recipe, sort_keys=True):
                return (data["train_latents"], data["train_labels"]), (data["hold_latents"], data["hold_labels"])
        f = int(self.models.card.vae_scale_factor)
        if cfg.slide_px % f or cfg.slide_px // f < self.patch + cfg.max_extra * self.stride:
            raise ValueError(f"slide_px {cfg.slide_px} must be a multiple of {f} and hold the largest canvas "
                             f"({self.patch + cfg.max_extra * self.stride} latent px)")
        # procedural glass (class 0) is label 5 for models with a glass label (the demo's --relabel 0:5),
        # else 0 = unknown
        glass = 5 if self.num_classes > 5 else 0
        lat, labs = [], []
        t0 = time.perf_counter()
        n = cfg.slides + cfg.holdout_slides
        for i in range(n):
            s = item_seed(cfg.seed + 0xDDE, i)
            layout = random_layout(cfg.slide_px, cfg.slide_px, s, kind="slide" if i % 2 == 0 else "tile")
            img = torch.from_numpy(render_tile(layout, s)).permute(2, 0, 1)[None].float() / 255.0
            layout = np.where(layout == 0, glass, layout).astype(np.uint8)
            z = self.models.codec.encode_image(img.to(self.device), generator=_generator(cfg.seed, 0xDA7A, i))
            lab = downsample_label_mask(torch.from_numpy(layout)[None, None].long(), tuple(z.shape[-2:]))
            lat.append(z[0].cpu())
            labs.append(lab[0, 0].to(torch.uint8).cpu())
            log(f"data: slide {i + 1}/{n} encoded ({time.perf_counter() - t0:.0f} s)")
        bad = {int(v) for v in torch.unique(torch.stack(labs))} - set(range(self.num_classes))
        if bad:
            raise ValueError(f"procedural labels {sorted(bad)} are not classes of the model ({self.num_classes})")
        train = (torch.stack(lat[:cfg.slides]), torch.stack(labs[:cfg.slides]))
        hold = (torch.stack(lat[cfg.slides:]), torch.stack(labs[cfg.slides:]))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"recipe": json.dumps(recipe, sort_keys=True), "train_latents": train[0],
                        "train_labels": train[1], "hold_latents": hold[0], "hold_labels": hold[1]}, cache)
        return train, hold

    def draw(self, rng: np.random.Generator, gen: torch.Generator, batch: int, side: int, holdout: bool = False
             ) -> Batch:
        latents, labels = self.holdout_data if holdout else self.train_data
        n, _, h, w = latents.shape
        idx = rng.integers(0, n, size=batch)
        ys = rng.integers(0, h - side + 1, size=batch)
        xs = rng.integers(0, w - side + 1, size=batch)
        null = rng.random(size=batch) < self.p_null
        clean = torch.stack([latents[i, :, y:y + side, x:x + side] for i, y, x in zip(idx, ys, xs)])
        lab = torch.stack([labels[i, y:y + side, x:x + side] for i, y, x in zip(idx, ys, xs)]).long()
        lab[torch.from_numpy(null)] = 0
        t = torch.randint(0, self.timesteps, (batch,), generator=gen).float()
        noise = torch.randn(clean.shape, generator=gen)
        return Batch(clean.to(self.device), noise.to(self.device), t.to(self.device), lab[:, None].to(self.device))

    def noisy(self, b: Batch) -> torch.Tensor:
        ab = self.alphas_cumprod.to(b.clean.device)[b.level.long()][:, None, None, None]
        return ab.sqrt() * b.clean + (1 - ab).sqrt() * b.noise

    def patch_outputs(self, xw: torch.Tensor, level: torch.Tensor, condw: torch.Tensor | None) -> torch.Tensor:
        from models.diffinfinite.guidance import guided_eps

        eps, _ = guided_eps(self.denoiser, xw, level.long(), condw[:, 0], omega=0.0)
        return eps.clone()  # out of inference mode: autograd may save it

    def coordinator_input(self, xw: torch.Tensor) -> torch.Tensor:
        return xw

    def loss(self, composite: torch.Tensor, b: Batch) -> torch.Tensor:
        return multiscale_mse(composite - b.noise, self.loss_levels)

    def plain_loss(self, composite: torch.Tensor, b: Batch) -> torch.Tensor:
        """The paper's loss (plain ε MSE): what the card's held-out figures are."""
        return multiscale_mse(composite - b.noise, 0)


class OracleBase:
    """The exact Bayes patch denoiser of the Gaussian-field oracle (:class:`evaluation.gaussian_oracle.
    GaussianOracle`: reference field, float64), EDM; the coordinator sees σ."""

    kind = "oracle"

    def __init__(self, cfg: DDETrainConfig, device: torch.device):
        from evaluation.gaussian_oracle import GaussianOracle

        self.patch = int(cfg.patch or 32)
        self.stride = int(cfg.stride or max(1, self.patch // 4))
        self.oracle = GaussianOracle(canvas=self.patch + cfg.max_extra * self.stride, patch=self.patch)
        self.field = self.oracle.field
        self.channels = 1
        self.device = device
        self.sigma_data = float(math.sqrt(self.field.variance))
        self.p_mean, self.p_std = cfg.p_mean, cfg.p_std
        self.identity = {"model": "gaussian-oracle", "file": None, "sha256": oracle_sha256(self.oracle),
                         "field": oracle_description(self.oracle)}
        self._full: dict[int, Any] = {}  # exact whole-canvas denoisers, per side
        self.target = cfg.target
        self.loss_levels = int(cfg.loss_levels)
        self.loss_weight = cfg.loss_weight
        self.blend = cfg.blend  # the weights the composite averages the corrected windows with

    def coordinator_config(self, cfg: DDETrainConfig) -> CoordinatorConfig:
        return CoordinatorConfig(channels=1, patch=self.patch, stride=self.stride, token=cfg.token, hidden=cfg.hidden,
                                 depth=cfg.depth, heads=cfg.heads, attn_window=cfg.attn_window, cond="none",
                                 noise_input="sigma", sigma_data=self.sigma_data, scale=cfg.scale,
                                 blend=cfg.blend, attn_grid=cfg.attn_grid,
                                 attention=cfg.attention, attn_block=cfg.attn_block)

    def draw(self, rng: np.random.Generator, gen: torch.Generator, batch: int, side: int, holdout: bool = False
             ) -> Batch:
        clean = torch.from_numpy(self.field.sample_windows(batch, side, rng))  # float64 (B, 1, L, L)
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(batch, generator=gen, dtype=torch.float64))
        noise = torch.randn(clean.shape, generator=gen, dtype=torch.float64)
        return Batch(clean.to(self.device), noise.to(self.device), sigma.to(self.device), None)

    def noisy(self, b: Batch) -> torch.Tensor:
        return b.clean + b.level[:, None, None, None] * b.noise

    def patch_outputs(self, xw: torch.Tensor, level: torch.Tensor, condw) -> torch.Tensor:
        return self.oracle.denoiser(xw, level)

    def coordinator_input(self, xw: torch.Tensor) -> torch.Tensor:
        return xw

    def loss(self, composite: torch.Tensor, b: Batch) -> torch.Tensor:
        """EDM-weighted MSE to the clean canvas (the paper's), or with ``target="bayes"`` to the exact canvas
        denoiser E[X | x]: the same expected minimiser (the two differ by a term free of the coordinator) without
        the irreducible noise of X around it, which at high σ hides the small combination error."""
        goal = self.bayes_denoise(b) if self.target == "bayes" else b.clean
        if self.loss_weight == "disagreement":  # compose() divides by the disagreement scale² instead of λ(σ)
            return multiscale_mse(composite - goal, self.loss_levels)
        return self._weighted(composite, goal, b, self.loss_levels)

    def _weighted(self, composite: torch.Tensor, goal: torch.Tensor, b: Batch, levels: int = 0) -> torch.Tensor:
        s, sd = b.level, self.sigma_data
        lam = (s ** 2 + sd ** 2) / (s * sd) ** 2
        return lam * multiscale_mse(composite - goal, levels)

    def bayes_denoise(self, b: Batch) -> torch.Tensor:
        """The exact denoiser of the whole canvas, E[X | X + σε]."""
        from evaluation.gaussian_oracle import PatchBayesDenoiser

        side = b.clean.shape[-1]
        if side not in self._full:
            self._full[side] = PatchBayesDenoiser(self.field, side)
        return self._full[side](self.noisy(b), b.level)

    def bayes_loss(self, b: Batch) -> torch.Tensor:
        """The paper's loss of the exact canvas denoiser (the floor no combiner can beat)."""
        return self._weighted(self.bayes_denoise(b), b.clean, b)

    def excess_loss(self, composite: torch.Tensor, b: Batch) -> torch.Tensor:
        """EDM-weighted distance of a composite to the exact canvas denoiser."""
        return self._weighted(composite, self.bayes_denoise(b), b)


def oracle_description(oracle) -> dict[str, Any]:
    """The oracle's field and patch: what a coordinator trained on it depends on."""
    f = oracle.field
    return {"torus": f.torus, "length": f.length, "variance": f.variance, "nu": f.nu, "patch": oracle.b}


def oracle_sha256(oracle) -> str:
    """sha256 of :func:`oracle_description` (canonical JSON): the oracle base's identity on a card."""
    import hashlib

    return hashlib.sha256(json.dumps(oracle_description(oracle), sort_keys=True).encode()).hexdigest()


def build_base(cfg: DDETrainConfig, device: torch.device, cache: Path | None, log=print):
    if cfg.base == "oracle":
        return OracleBase(cfg, device)
    folder = Path(cfg.base)
    if not folder.is_dir():
        raise ValueError(f"base: {cfg.base!r} is neither 'oracle' nor a model folder")
    return DiffInfiniteBase(folder, cfg, device, cache, log)


# ------------------------------------------------------------------------------------------ composite
def window_outputs(base, b: Batch, side: int):
    """The frozen base on the ``dde`` plan's windows of every canvas of ``b``: (plan, noisy windows (B·n, C, P, P),
    base outputs, per-window levels, condition windows or None), canvas-major."""
    plan = plan_windows("dde", (side, side), base.patch, base.stride, blend=base.blend)
    x = base.noisy(b)
    bsz = x.shape[0]
    xw = torch.cat([plan.crops(x[i]) for i in range(bsz)])
    level = b.level.repeat_interleave(len(plan))
    condw = None if b.cond is None else torch.cat([plan.crops(b.cond[i]) for i in range(bsz)])
    with torch.no_grad():
        out = base.patch_outputs(xw, level, condw)
    return plan, xw, out, level, condw


def compose(base, net: DDECoordinator | None, b: Batch, windows, loss=None) -> torch.Tensor:
    """Per-canvas loss (B,) of the composite: the base outputs plus the coordinator's correction (None = plain
    averaging), averaged over overlaps; ``loss`` maps (composite, b) → (B,); by default the base's training loss,
    divided by each canvas's disagreement scale² with ``loss_weight="disagreement"``."""
    plan, xw, out, level, condw = windows
    nw, bsz = len(plan), b.level.shape[0]
    origins = plan.origins_tensor(xw.device).repeat(bsz, 1)
    canvas = torch.arange(bsz, device=xw.device).repeat_interleave(nw)
    weighted = loss is None and base.loss_weight == "disagreement"
    # computed once for both users: the coordinator's unit (scale="disagreement") and the loss weight
    deviations = window_deviations(out, origins, canvas) \
        if weighted or (net is not None and net.config.scale == "disagreement") else None
    if net is not None:
        out = out + net.correction(out, base.coordinator_input(xw), origins, condw, level, canvas=canvas,
                                   deviations=deviations, grid=b.grid if net.moves_grid else None)
    comp = torch.stack([blend(out[i * nw:(i + 1) * nw], plan.origins, plan.weight, plan.canvas) for i in range(bsz)])
    if loss is not None:
        return loss(comp, b)
    per_canvas = base.loss(comp, b)
    if weighted:  # a function of the noisy canvas only: the minimiser is unchanged
        _, scale = deviations
        per_canvas = per_canvas / scale[::nw].to(per_canvas.dtype).pow(2)
    return per_canvas


def draw_grid(net: DDECoordinator, b: Batch, rng: np.random.Generator) -> None:
    """A moving-grid coordinator's attention-grid offset per canvas of ``b`` (whole tokens, uniform over the
    square), drawn after the batch so that a fixed-grid run draws exactly what it always did."""
    if net.moves_grid:
        side = net.config.attn_window // net.config.token
        b.grid = torch.from_numpy(rng.integers(0, side, size=(b.level.shape[0], 2))).double()


def composite_loss(base, net: DDECoordinator | None, b: Batch, side: int) -> torch.Tensor:
    """Per-canvas loss (B,) of the composite denoiser on batch ``b`` of ``side``² canvases."""
    return compose(base, net, b, window_outputs(base, b, side))


@torch.no_grad()
def evaluate_composite(base, net: DDECoordinator, cfg: DDETrainConfig, crops: int | None = None,
                       with_bayes: bool = True) -> dict[str, Any]:
    """Composite loss of averaging vs the coordinator on fixed held-out draws (same crops, levels, noise); for the
    oracle also the exact whole-canvas denoiser's (``bayes``) and the share of the gap closed."""
    crops = int(crops or cfg.eval_crops)
    rows = []
    for k in range(cfg.min_extra, cfg.max_extra + 1):
        side = base.patch + k * base.stride
        avg, coord, bayes, ex_avg, ex_coord = [], [], [], [], []
        paper = getattr(base, "_weighted", None)
        to_clean = (lambda comp, b: paper(comp, b.clean, b)) if paper is not None else base.plain_loss
        for i in range(crops):
            rng = _rng(cfg.seed, 0xE7A1, k, i)
            b = base.draw(rng, _generator(cfg.seed, 0xE7A1, k, i), 1, side, holdout=True)
            draw_grid(net, b, rng)
            windows = window_outputs(base, b, side)
            avg.append(float(compose(base, None, b, windows, to_clean)[0]))
            coord.append(float(compose(base, net, b, windows, to_clean)[0]))
            if with_bayes and hasattr(base, "bayes_loss"):
                bayes.append(float(base.bayes_loss(b)[0]))
                ex_avg.append(float(compose(base, None, b, windows, base.excess_loss)[0]))
                ex_coord.append(float(compose(base, net, b, windows, base.excess_loss)[0]))
        row = {"canvas": side, "windows": len(plan_windows("dde", (side, side), base.patch, base.stride)),
               "averaging": float(np.mean(avg)), "coordinator": float(np.mean(coord)),
               "ratio": float(np.mean(coord) / np.mean(avg))}
        if bayes:  # exact whole-canvas denoiser: its loss, and each composite's distance to it
            row["bayes"] = float(np.mean(bayes))
            row["excess_averaging"] = float(np.mean(ex_avg))
            row["excess_coordinator"] = float(np.mean(ex_coord))
            row["excess_ratio"] = row["excess_coordinator"] / row["excess_averaging"]
        rows.append(row)
    avg = float(np.mean([r["averaging"] for r in rows]))
    coord = float(np.mean([r["coordinator"] for r in rows]))
    return {"held_out_crops_per_canvas": crops, "loss": "composite ε MSE" if base.kind == "diffinfinite"
            else "EDM-weighted composite D MSE", "averaging": avg, "coordinator": coord, "ratio": coord / avg,
            "per_canvas": rows}


# ------------------------------------------------------------------------------------------ training
def _out_folder(cfg: DDETrainConfig) -> Path:
    if cfg.out is not None:
        return Path(cfg.out)
    if cfg.base == "oracle":
        raise ValueError("out: required with --base oracle")
    return Path(cfg.base) / COORDINATOR_DIR


def train_dde_coordinator(cfg: DDETrainConfig, log: Callable[[str], None] = print) -> DDETrainResult:
    """Train (or resume) a coordinator; write the coordinator folder; return the losses and evaluation."""
    from training.diffinfinite import EMA

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = torch.device(cfg.device)
    if cfg.base != "oracle" and not Path(cfg.base).is_dir():
        raise ValueError(f"base: {cfg.base!r} is neither 'oracle' nor a model folder")
    out = _out_folder(cfg)
    ckpt_path = out / CHECKPOINT
    state = None
    if ckpt_path.is_file() and not cfg.overwrite:
        if not cfg.resume:
            raise ValueError(f"{ckpt_path} exists: pass resume to continue or overwrite to start over")
        state = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        if _OLD_DEFAULTS | state["config"] != _run_key(cfg):  # states from before the scale/loss options
            raise ValueError(f"resume: {ckpt_path} was made with another configuration: {state['config']}")
    base = build_base(cfg, device, Path(cfg.data_cache) if cfg.data_cache else out / DATA_CACHE, log)
    torch.manual_seed(cfg.seed)  # initial weights of the coordinator
    net = DDECoordinator(base.coordinator_config(cfg)).to(device)
    init_info = None
    if cfg.init is not None and state is None:  # a resumed run has its weights in the state
        init_info = _warm_start(net, Path(cfg.init), base, device)
        log(f"warm start from {cfg.init}")
    ema = EMA(net, beta=cfg.ema_beta, update_every=1, update_after_step=cfg.ema_after)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(cfg, k))
    step, losses, elapsed = 0, [], 0.0
    if state is not None:
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, losses, elapsed = int(state["step"]), list(state["losses"]), float(state["elapsed"])
        init_info = state.get("init")
        log(f"resumed at step {step}")
    net.train()
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + cfg.stop_after)
    t0 = time.perf_counter()

    def save_state() -> None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"config": _run_key(cfg), "net": net.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step, "losses": losses,
                    "elapsed": elapsed + time.perf_counter() - t0, "init": init_info}, tmp)
        tmp.replace(ckpt_path)

    while step < stop:
        rng, gen = _rng(cfg.seed, step), _generator(cfg.seed, step)
        side = base.patch + int(rng.integers(cfg.min_extra, cfg.max_extra + 1)) * base.stride
        b = base.draw(rng, gen, cfg.batch_size, side)
        draw_grid(net, b, rng)
        loss = composite_loss(base, net, b, side).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update()
        step += 1
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == stop:
            recent = losses[-10:]
            log(f"step {step}/{cfg.steps} loss {np.mean(recent):.5f} ({time.perf_counter() - t0:.0f} s)")
        if step % cfg.save_every == 0 or step == stop:
            save_state()
    wall = elapsed + time.perf_counter() - t0
    shipped = ema.ema_model.eval()
    evaluation = evaluate_composite(base, shipped, cfg) if step >= cfg.steps else {}
    if evaluation:
        log(f"held-out composite loss: averaging {evaluation['averaging']:.5f}, coordinator "
            f"{evaluation['coordinator']:.5f} (ratio {evaluation['ratio']:.3f})")
    training = {
        "command": cfg.command or "",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                   if k not in ("resume", "overwrite", "command", "stop_after", "data_cache")},
        "steps_done": step,
        "complete": step >= cfg.steps,
        "final_loss_mean_last_50": float(np.mean(losses[-50:])) if losses else None,
        "device": str(device),
        "hardware": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_time_s": round(wall, 1),
        "loss": "composite ε MSE (averaged after correction) vs the true noise" if base.kind == "diffinfinite"
                else "EDM λ(σ)-weighted composite D MSE vs the clean field",
    }
    if cfg.init is not None:
        training["init"] = init_info
    save_coordinator(shipped, out, base=base.identity, training=training, evaluation=evaluation)
    return DDETrainResult(out=out, steps_done=step, losses=losses, evaluation=evaluation)


def evaluate_trained(cfg: DDETrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-run the held-out evaluation of the coordinator in ``cfg.out`` (e.g. with more ``eval_crops``) and record
    it on its card (the weights and their hash are unchanged)."""
    from models.dde.loading import COORDINATOR_CARD, load_coordinator

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = _out_folder(cfg)
    device = torch.device(cfg.device)
    base = build_base(cfg, device, Path(cfg.data_cache) if cfg.data_cache else out / DATA_CACHE, log)
    net = load_coordinator(out, device, base_sha256=base.identity["sha256"])
    if (net.patch, net.stride) != (base.patch, base.stride):
        raise ValueError(f"patch/stride: the coordinator has {net.patch}/{net.stride}, the run {base.patch}/{base.stride}")
    base.blend = net.config.blend  # evaluated as it was trained and is sampled, whatever --blend says
    evaluation = evaluate_composite(base, net, cfg)
    path = out / COORDINATOR_CARD
    card = json.loads(path.read_text())
    card["evaluation"] = evaluation
    path.write_text(json.dumps(card, indent=2) + "\n")
    log(f"held-out composite loss ({evaluation['held_out_crops_per_canvas']} crops per canvas size): averaging "
        f"{evaluation['averaging']:.5f}, coordinator {evaluation['coordinator']:.5f} (ratio {evaluation['ratio']:.3f})")
    return evaluation


# settings added after the first checkpoints were written, at the values those runs had
_OLD_DEFAULTS = {"loss_levels": 0, "scale": "none", "loss_weight": "base", "init": None, "blend": "uniform",
                 "lr_decay": 0.0, "attn_grid": "fixed", "attention": "squares",
                 "attn_block": 0}


def lr_factor(cfg: DDETrainConfig, k: int) -> float:
    """The lr of step ``k`` (0-based) as a fraction of ``cfg.lr``: a linear warm-up over ``warmup`` steps, then 1,
    then over the last ``lr_decay``·``steps`` steps a linear fall that reaches 0 after the last step."""
    factor = min(1.0, (k + 1) / max(1, cfg.warmup))
    decay = int(round(cfg.lr_decay * cfg.steps))
    if decay > 0:
        factor *= min(1.0, max(0.0, (cfg.steps - k) / decay))
    return factor


def _warm_start(net: DDECoordinator, folder: Path, base, device) -> dict[str, Any]:
    """Load the weights of the coordinator in ``folder`` into ``net`` (same architecture; trained over the same
    base, checked by hash like any coordinator); returns what the card records of it."""
    from models.dde import load_coordinator
    from models.dde.loading import read_coordinator_card

    src = load_coordinator(folder, device, base_sha256=base.identity["sha256"])
    # the blend and the attention pattern change no weight: e.g. a mixture-blend run may start from a uniform one's
    weightless = ("blend", "attn_grid", "attention", "attn_block")
    theirs, ours = ({k: v for k, v in c.to_dict().items() if k not in weightless}
                    for c in (src.config, net.config))
    if theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ValueError(f"init: the coordinator in {folder} has another architecture (differs in {', '.join(diff)})")
    net.load_state_dict(src.state_dict())
    card = read_coordinator_card(folder)
    return {"folder": str(folder), "weights_sha256": card.get("weights_sha256"),
            "steps": card.get("training", {}).get("steps_done"), "blend": src.config.blend,
            "attn_grid": src.config.attn_grid, "attention": src.config.attention}


def _run_key(cfg: DDETrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues."""
    skip = ("resume", "overwrite", "stop_after", "save_every", "command", "threads", "out", "data_cache")
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in skip}
