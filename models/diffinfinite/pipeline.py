"""DiffInfinite mask-then-image pipeline (paper Fig. 2; reference notes §1, §9).

1. subtype → label canvas at 1/4 of the output resolution → mask UNet with the random-patch sampler
   (16×16 latent crops = 128 mask px), conditional pass with dropout forced off (bug #2 fixed);
2. Hann-window tiled decode of the mask latent with the codec's mask path (inverse per-channel divisors, then
   (y + 1)/2 — the label-range bug #1 of the official large-mask path is not copied) → quantise to K labels;
3. CleanMask (boundaries → unknown, padded 6×6 min-pool) → nearest ×4 upsample to the output size;
4. image UNet with the random-patch sampler on the latent canvas (64×64 crops = 512 px), conditioned on the
   label map at latent resolution (the network's own nearest downsampling: one mask path, bug #10).

The engine (``models.diffinfinite.engine``) decodes the image latents with ``models.decoding.TiledDecoder``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch

from models.decoding import TiledDecoder
from models.runtime import CancelFn, ProgressFn, check_cancel

from .guidance import ImageDenoiser, MaskDenoiser
from .mask_cleaning import clean_mask, resize_labels_nearest, upsample_labels
from .sampler import (MODES, NULL_CONDITIONS, TILE_EDGES, WINDOW_MODES, NullCondition, RandomPatchSampler,
                      SamplerState)
from .solvers import SOLVERS
from .unet import downsample_label_mask

__all__ = ["SamplingOptions", "DiffInfinitePipeline", "IMAGE_STREAM", "MASK_STREAM", "MASK_SCALE"]

IMAGE_STREAM, MASK_STREAM = 0, 1
MASK_SCALE = 4  # the mask is generated at 1/4 of the output resolution

_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SamplingOptions:
    """Sampling knobs of one job (defaults: the paper's settings, our fast paths off).

    ``guidance`` is ω of the image model (ε̃ = (1+ω)ε(c) − ωε(∅)); ``mask_guidance`` ω of the mask model
    (0 in the official large-image pipeline). ``mode``: "random" (paper-exact random patches), "tiled"
    (randomly offset non-overlapping tiling) or an overlapping-window combiner — "independent",
    "multidiffusion", "mixture", "dde" (:mod:`.sampler`, :mod:`models.patching`) — for the image stage;
    ``window_stride`` (latent px, window modes; default image_patch/2) and ``mixture_sigma`` (fraction of the
    patch) shape the windows; ``mask_mode`` for the mask stage (default "random", as in the paper: the mask
    UNet is cheap; not "dde"); ``mask_steps`` defaults to ``steps``.
    ``official_early_stop`` reproduces the official loop that never runs the last DDIM pair (comparison only).
    ``precision``: the UNets' autocast dtype ("bfloat16" on GPU is the fast path).
    ``tile_margin`` (latent px, image stage, tiled mode): cells of ``image_patch − 2·margin`` px sampled in
    full patch windows, so every cell edge has that much context (costs (P/(P−2m))² more crops);
    ``final_tile_margin`` (default ``image_patch // 8``) applies to the last ``final_tile_steps`` steps (default
    10): the final steps leave the seams no later step smooths, so they get context on every cell edge
    (≈ +2 % crops over 250 steps; bench/sampler.py measures the seam ratio with and without).
    ``tile_edges`` (tiled mode): how the partial cells a random grid offset leaves at the canvas border are
    sampled: "bucket" (default) in windows of half a patch or a patch per axis — at most three window shapes
    per step, the same in every step, so a step is a few full-batch network calls of fixed shapes; "fit" in
    windows just wide enough for them and their context (≥ half a patch; fewest pixels, up to nine shapes);
    "full" in full patches (one shape). See :func:`.sampler.plan_tiled`.
    ``solver``: "ddim" (the paper's) or the multistep "dpmpp-2m" / "dpmpp-2m-sde" (:mod:`.solvers`), for
    both stages; ``steps`` counts its steps (one network evaluation per pass and step either way).
    ``dde_guidance`` ("dde" under guidance): how the coordinator meets classifier-free guidance — the sampler's
    ``null_condition`` (:class:`.sampler.RandomPatchSampler`).
    """

    steps: int = 250
    guidance: float = 3.0
    eta: float = 1.0
    mode: Literal["random", "tiled", "independent", "multidiffusion", "mixture", "dde"] = "random"
    batch_size: int = 8
    seed: int = 0
    mask_steps: int | None = None
    mask_guidance: float = 0.0
    mask_mode: Literal["random", "tiled", "independent", "multidiffusion", "mixture"] | None = None
    mask_batch_size: int = 64
    image_patch: int = 64
    mask_patch: int = 16
    mask_pool: int = 6
    official_early_stop: bool = False
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    decode_batch_size: int = 8
    tile_margin: int = 0
    final_tile_margin: int | None = None
    final_tile_steps: int = 10
    tile_edges: Literal["bucket", "fit", "full"] = "bucket"
    solver: Literal["ddim", "dpmpp-2m", "dpmpp-2m-sde"] = "ddim"
    window_stride: int | None = None
    mixture_sigma: float = 0.1
    dde_guidance: NullCondition = "shared"

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= int(self.steps) <= 1000:
            problems.append(f"steps must be in 1…1000, got {self.steps}")
        if self.mask_steps is not None and not 1 <= int(self.mask_steps) <= 1000:
            problems.append(f"mask_steps must be in 1…1000, got {self.mask_steps}")
        for name in ("guidance", "mask_guidance", "eta"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                problems.append(f"{name} must be a finite number ≥ 0, got {getattr(self, name)}")
        for name, allowed in (("mode", MODES), ("mask_mode", tuple(m for m in MODES if m != "dde"))):
            v = getattr(self, name)
            if v is not None and v not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {v!r}")
        if self.window_stride is not None and not 1 <= int(self.window_stride) <= int(self.image_patch):
            problems.append(f"window_stride must be in 1…image_patch ({self.image_patch}), got {self.window_stride}")
        if self.dde_guidance not in NULL_CONDITIONS:
            problems.append(f"dde_guidance must be one of {NULL_CONDITIONS}, got {self.dde_guidance!r}")
        if not (math.isfinite(float(self.mixture_sigma)) and float(self.mixture_sigma) > 0):
            problems.append(f"mixture_sigma must be a finite number > 0, got {self.mixture_sigma}")
        for name in ("batch_size", "mask_batch_size", "image_patch", "mask_patch", "mask_pool", "decode_batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.final_tile_margin is None:
            self.final_tile_margin = int(self.image_patch) // 8
        for name in ("tile_margin", "final_tile_margin", "final_tile_steps"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("tile_margin", "final_tile_margin"):
            if 2 * int(getattr(self, name)) >= int(self.image_patch):
                problems.append(f"{name} must be < image_patch/2 = {int(self.image_patch) / 2:g}, got {getattr(self, name)}")
        if self.tile_edges not in TILE_EDGES:
            problems.append(f"tile_edges must be one of {TILE_EDGES}, got {self.tile_edges!r}")
        if self.solver not in SOLVERS:
            problems.append(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.precision not in _PRECISIONS:
            problems.append(f"precision must be one of {sorted(_PRECISIONS)}, got {self.precision!r}")
        if problems:
            raise ValueError("invalid sampling options: " + "; ".join(problems))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _PRECISIONS[self.precision]


def _cfg_attr(module: Any, name: str, default: Any) -> Any:
    cfg = getattr(module, "config", None)
    return getattr(cfg, name, default) if cfg is not None else default


class DiffInfinitePipeline:
    """Runs the DiffInfinite stages on one device. ``models`` carries ``image_unet``, ``mask_unet`` (or None),
    ``codec`` (:class:`models.vae.LatentCodec`) and ``card`` (:class:`models.cards.ModelCard`)."""

    def __init__(self, models: Any, device: torch.device | str = torch.device("cpu"), *,
                 compile_mode: str | None = None, coordinator: Any = None) -> None:
        """``compile_mode``: None runs the networks eagerly; a mode of :data:`models.acceleration.MODES` runs
        them through :func:`models.acceleration.inference_network` (compiled once per process and module).
        ``coordinator``: the :class:`models.patching.PatchCoordinator` of the image stage's ``dde`` mode (None:
        a zero correction, i.e. multidiffusion)."""
        self.models = models
        self.coordinator = coordinator
        self.device = torch.device(device)
        self.compile_mode = compile_mode
        # CUDA graphs record one graph per input shape: pad network calls to a few batch sizes
        self.pad_batches = compile_mode == "reduce-overhead"
        self.networks: list[tuple[Any, float]] = []  # compiled networks used, with their warm-up seconds before
        self.last_sampler: RandomPatchSampler | None = None  # the image sampler of the last sample_latents
        models.image_unet.to(self.device).eval()
        if getattr(models, "mask_unet", None) is not None:
            models.mask_unet.to(self.device).eval()
        vae = getattr(models.codec, "vae", None)
        if vae is not None:
            vae.to(self.device).eval()

    # ------------------------------------------------------------------ label sets
    @property
    def scale_factor(self) -> int:
        return int(getattr(self.models.codec, "scale_factor", 8))

    @property
    def classes(self) -> list[int]:
        """Label ids the image model accepts (card classes ∩ the network's class range; 0 = unknown)."""
        n = int(_cfg_attr(self.models.image_unet, "num_classes", 0)) or None
        card_classes = getattr(getattr(self.models, "card", None), "classes", None) or {}
        ids = sorted(int(k) for k in card_classes) if card_classes else list(range(n or 0))
        if n is not None:
            ids = [i for i in ids if 0 <= i < n]
        if 0 not in ids:
            ids = [0, *ids]
        return ids

    @property
    def subtypes(self) -> list[int]:
        mask_unet = getattr(self.models, "mask_unet", None)
        n = int(_cfg_attr(mask_unet, "num_classes", 0)) if mask_unet is not None else 0
        card_sub = getattr(getattr(self.models, "card", None), "subtypes", None) or {}
        ids = sorted(int(k) for k in card_sub) if card_sub else list(range(n))
        return [i for i in ids if 0 <= i < n] if n else ids

    def _class_names(self) -> str:
        card_classes = getattr(getattr(self.models, "card", None), "classes", None) or {}
        return ", ".join(f"{i}={card_classes.get(i, '?')}" if card_classes else str(i) for i in self.classes)

    def validate_labels(self, labels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Check a label mask (H, W); returns it as C-contiguous uint8. ValueError names offending labels."""
        arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if arr.ndim != 2:
            raise ValueError(f"label mask must be 2-D (H, W), got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError("label mask is empty")
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise ValueError(f"label mask must hold integer labels, got dtype {arr.dtype}")
        allowed = np.zeros(256, dtype=bool)
        allowed[self.classes] = True
        if arr.dtype == np.uint8:
            present = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
        else:
            present = np.unique(arr)
        bad = [int(v) for v in present if not (0 <= v < 256 and allowed[int(v)])]
        if bad:
            raise ValueError(f"label mask contains labels {bad} outside the model's classes ({self._class_names()})")
        return np.ascontiguousarray(arr, dtype=np.uint8)

    def _check_size(self, height: int, width: int, what: str) -> None:
        f = self.scale_factor
        if int(height) < f or int(width) < f or int(height) % f or int(width) % f:
            raise ValueError(f"{what} {height}×{width} px: height and width must be positive multiples of {f}")

    # ------------------------------------------------------------------ samplers
    def network(self, module: torch.nn.Module) -> Any:
        """What the samplers call for ``module``: itself, or its compiled network (see ``compile_mode``)."""
        if self.compile_mode is None:
            return module
        from models.acceleration import inference_network

        net = inference_network(module, mode=self.compile_mode, device=self.device)
        if all(n is not net for n, _ in self.networks):
            self.networks.append((net, net.stats.warmup_s))
        return net

    def warmup_seconds(self) -> float:
        """Seconds of first calls (compilation) this pipeline paid: a worker process compiles once per network
        and input shape, so only its first jobs pay."""
        return float(sum(n.stats.warmup_s - before for n, before in self.networks))

    def image_sampler(self, options: SamplingOptions) -> RandomPatchSampler:
        unet = self.models.image_unet
        return RandomPatchSampler(
            ImageDenoiser(self.network(unet), out_channels=int(_cfg_attr(unet, "channels", 4)),
                          autocast_dtype=options.autocast_dtype, pad_batches=self.pad_batches),
            patch=options.image_patch, mode=options.mode, steps=options.steps, eta=options.eta,
            guidance=options.guidance, batch_size=options.batch_size,
            multiple=int(_cfg_attr(unet, "downsample_factor", 1)),
            official_early_stop=options.official_early_stop, stream=IMAGE_STREAM,
            tile_margin=options.tile_margin, final_tile_margin=options.final_tile_margin,
            final_tile_steps=options.final_tile_steps, tile_edges=options.tile_edges, solver=options.solver,
            window_stride=options.window_stride if options.mode in WINDOW_MODES else None,
            mixture_sigma=options.mixture_sigma, coordinator=self.coordinator if options.mode == "dde" else None,
            null_condition=options.dde_guidance,
        )

    def mask_sampler(self, options: SamplingOptions) -> RandomPatchSampler:
        unet = self.models.mask_unet
        if unet is None:
            raise ValueError("this model has no mask model: pass a label mask instead of a subtype")
        return RandomPatchSampler(
            MaskDenoiser(self.network(unet), out_channels=int(_cfg_attr(unet, "channels", 4)),
                         autocast_dtype=options.autocast_dtype, pad_batches=self.pad_batches),
            patch=options.mask_patch, mode=options.mask_mode or "random",
            steps=options.mask_steps or options.steps, eta=options.eta, guidance=options.mask_guidance,
            batch_size=options.mask_batch_size, multiple=int(_cfg_attr(unet, "downsample_factor", 1)),
            official_early_stop=options.official_early_stop, stream=MASK_STREAM, tile_edges=options.tile_edges,
            solver=options.solver,
        )

    # ------------------------------------------------------------------ mask stage
    def subtype_canvas(self, subtype: int | np.ndarray, height: int, width: int) -> np.ndarray:
        """Subtype label canvas at the mask-latent resolution (ceil(H/4/8) × ceil(W/4/8)).

        ``subtype``: one id, or a 2-D map of ids at any resolution (nearest-resized; may vary spatially)."""
        f = self.scale_factor
        hl = -(-(int(height) // MASK_SCALE) // f)
        wl = -(-(int(width) // MASK_SCALE) // f)
        allowed = self.subtypes
        if isinstance(subtype, (int, np.integer)):
            if int(subtype) not in allowed:
                raise ValueError(f"subtype {int(subtype)} is not one of the mask model's subtypes {allowed}")
            return np.full((hl, wl), int(subtype), dtype=np.uint8)
        arr = np.asarray(subtype)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"subtype must be an int or a 2-D integer map, got {arr.dtype} {arr.shape}")
        bad = sorted(set(int(v) for v in np.unique(arr)) - set(allowed))
        if bad:
            raise ValueError(f"subtype map contains subtypes {bad} outside the mask model's subtypes {allowed}")
        return resize_labels_nearest(arr.astype(np.uint8), hl, wl)

    def sample_mask_latents(self, subtype: int | np.ndarray, height: int, width: int, options: SamplingOptions,
                            progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> torch.Tensor:
        """Mask latent [1, 4, ceil(H/32), ceil(W/32)] from the random-patch sampler."""
        self._check_size(height, width, "output")
        canvas = self.subtype_canvas(subtype, height, width)
        sampler = self.mask_sampler(options)
        return sampler.sample(canvas, options.seed, self.device, progress=progress, cancel=cancel)

    def decode_mask_latents(self, latent: torch.Tensor, height: int, width: int, options: SamplingOptions,
                            cancel: CancelFn | None = None, decode_context: str = "slide") -> np.ndarray:
        """Hann-tiled decode of a mask latent and quantisation → raw labels at mask resolution (H/4, W/4).
        ``decode_context``: the decoder's GroupNorm statistics and attention of the whole mask latent
        (``"slide"``) or of each tile (``"tile"``, the official code)."""
        codec = self.models.codec
        f = self.scale_factor
        hm, wm = int(height) // MASK_SCALE, int(width) // MASK_SCALE
        tile = options.mask_patch
        dec = TiledDecoder(codec.tile_decoder("mask", decode_context), scale=f, tile=tile, overlap=tile // 2,
                           window="hann", batch_size=options.decode_batch_size)
        out = np.empty((latent.shape[2] * f, latent.shape[3] * f), dtype=np.uint8)
        r = 0
        for band in dec.iter_bands(latent.to(codec.device), cancel=cancel, output="float32"):
            x = torch.from_numpy(band).permute(2, 0, 1)[None]
            out[r:r + band.shape[0]] = codec.quantize_mask(x)[0].cpu().numpy().astype(np.uint8)
            r += band.shape[0]
        return out[:hm, :wm]

    def sample_mask(self, subtype: int | np.ndarray = 0, height: int = 2048, width: int = 2048,
                    options: SamplingOptions | None = None, progress: ProgressFn | None = None,
                    cancel: CancelFn | None = None, decode_context: str = "slide") -> np.ndarray:
        """Generate a label mask (H, W) uint8 at output resolution (mask model at H/4 × W/4, cleaned, ×4)."""
        options = options or SamplingOptions()
        self._check_size(height, width, "output")
        steps = options.mask_steps or options.steps
        total = steps + 1

        def sub_progress(done: int, _total: int) -> None:
            if progress is not None:
                progress(done, total)

        latent = self.sample_mask_latents(subtype, height, width, options, sub_progress, cancel)
        check_cancel(cancel)
        raw = self.decode_mask_latents(latent, height, width, options, cancel, decode_context)
        cleaned = clean_mask(raw, options.mask_pool)
        labels = upsample_labels(cleaned, MASK_SCALE)
        if progress is not None:
            progress(total, total)
        return labels

    # ------------------------------------------------------------------ image stage
    def latent_labels(self, labels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Validated label mask (H, W) → uint8 label map at latent resolution (H/8, W/8), by the network's own
        nearest downsampling (the top-left pixel of each 8×8 block)."""
        lab = self.validate_labels(labels)
        self._check_size(*lab.shape, "label mask")
        f = self.scale_factor
        t = downsample_label_mask(torch.from_numpy(lab)[None, None], (lab.shape[0] // f, lab.shape[1] // f))
        return np.ascontiguousarray(t[0, 0].numpy())

    def sampler_cut_lines(self, labels: np.ndarray | torch.Tensor,
                          options: SamplingOptions) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
        """Output-pixel rows and columns where the image sampler's last step cut the canvas into cells, as
        zero-width zones for the quilt score; None in ``random`` mode (its crops leave no straight lines). Window
        modes: the window edges (where a window's contribution starts or ends)."""
        if options.mode not in ("tiled",) + WINDOW_MODES:
            return None
        sampler = self.image_sampler(options)
        lab = sampler._prepare_labels(self.latent_labels(labels))
        if options.mode in WINDOW_MODES:
            plan = sampler.window_plan(lab.shape)
            f = self.scale_factor
            (h, w), (ph, pw) = lab.shape, plan.size
            rows = sorted({int(y) for y in plan.origins[:, 0]} | {int(y) + ph for y in plan.origins[:, 0]})
            cols = sorted({int(x) for x in plan.origins[:, 1]} | {int(x) + pw for x in plan.origins[:, 1]})
            return ([(r * f, r * f) for r in rows if 0 < r < h], [(c * f, c * f) for c in cols if 0 < c < w])
        crops = sampler.plan(lab, options.seed, sampler.stop_at - 1)
        f = self.scale_factor
        h, w = lab.shape
        rows = sorted({c.cell[0] for c in crops if c.cell is not None} - {0})
        cols = sorted({c.cell[1] for c in crops if c.cell is not None} - {0})
        return [(r * f, r * f) for r in rows if r < h], [(c * f, c * f) for c in cols if c < w]

    def new_state(self, labels: np.ndarray | torch.Tensor, options: SamplingOptions) -> SamplerState:
        return self.image_sampler(options).init_state(self.latent_labels(labels), options.seed, self.device)

    def state_mismatch(self, state: SamplerState, labels: np.ndarray | torch.Tensor,
                       options: SamplingOptions) -> str | None:
        """Why ``state`` cannot resume this job (labels, options, sampler version), or None if it can."""
        if state.seed != options.seed:
            return f"sampler state was made with seed {state.seed}, options say {options.seed}"
        sampler = self.image_sampler(options)
        try:
            sampler.check_state(state, sampler._prepare_labels(self.latent_labels(labels)))
        except ValueError as exc:
            return str(exc)
        return None

    def sample_latents(self, labels: np.ndarray | torch.Tensor, options: SamplingOptions | None = None,
                       progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                       state: SamplerState | None = None,
                       on_step: Callable[[SamplerState], None] | None = None) -> torch.Tensor:
        """Image latents [1, 4, H/8, W/8] for a label mask (H, W). ``state`` resumes a saved run (it must come
        from the same labels and options); ``on_step(state)`` is called after every step (checkpointing)."""
        options = options or SamplingOptions()
        lat = self.latent_labels(labels)
        sampler = self.image_sampler(options)
        if state is None:
            state = sampler.init_state(lat, options.seed, self.device)
        else:
            if state.seed != options.seed:
                raise ValueError(f"sampler state was made with seed {state.seed}, options say {options.seed}")
            if state.latents.device != self.device:
                state = SamplerState.from_dict(state.to_dict(), device=self.device)
        self.last_sampler = sampler
        return sampler.run(state, lat, progress=progress, cancel=cancel, on_step=on_step)
