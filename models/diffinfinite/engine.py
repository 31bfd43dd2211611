"""The DiffInfinite engine: mask-then-image latent diffusion with random-patch (or offset-tiled) sampling and a
tiled VAE decode with slide-wide context (see :mod:`models.engine` for the contract).

Its options (:class:`DiffInfiniteOptions`) are declared here once: the HTTP schema, the job record and the
command line are built from them. Importing this module imports no ML library.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import Field

from models.engine import (CancelFn, EngineBase, EngineOptions, OptionError, ReportFn, Runtime, SlideBands, SlideRequest,
                           Stage, register_engine, stage_progress)

DECODE_TILE = 64  # latent px: the image model's patch
MULTISTEP_STEPS = 25  # default steps of the multistep solvers (bench.solver measures them against DDIM)
TUKEY_OVERLAP = 6  # latent px: cosine ramps that sum to one like Hann at 50 % but need ≈1.2× the decodes, not ≈4×
IMAGE_PATCH = 64  # latent px: the image model's sampler window
WINDOW_SAMPLERS = ("independent", "multidiffusion", "mixture", "dde")  # = models.patching.COMBINERS (no torch here)
COORDINATOR_DIR = "dde-coordinator"  # a model folder's trained DDE coordinator (written by `slidesynth train dde-coordinator`)
COORDINATOR_CARD = "coordinator_card.json"
# how a dde job's coordinator meets guidance when the job names none: measured as good as Eq. 6 with the labels
# on both demo coordinators (README) at one coordinator pass a step instead of two
DEFAULT_DDE_GUIDANCE = "shared"


def has_coordinator(folder: Path | None) -> bool:
    """Whether a model folder holds a trained DDE coordinator (``dde-coordinator/coordinator_card.json``)."""
    return folder is not None and (Path(folder) / COORDINATOR_DIR / COORDINATOR_CARD).is_file()


def model_folder(card_name: str, models_dir: Path | None) -> Path | None:
    """The folder under ``models_dir`` whose ``model_card.json`` names ``card_name`` (None: a built-in model)."""
    if models_dir is None or not Path(models_dir).is_dir():
        return None
    import json

    from models.cards import CARD_FILENAME

    direct = Path(models_dir) / card_name
    for path in [direct / CARD_FILENAME, *sorted(Path(models_dir).glob(f"*/{CARD_FILENAME}"))]:
        try:
            if path.is_file() and json.loads(path.read_text()).get("name") == card_name:
                return path.parent
        except (OSError, ValueError):
            continue
    return None


def default_decode_overlap(window: str, tile: int) -> int:
    """Overlap (latent px) of decode tiles when a job names none: Tukey's 6 (at most tile/2, the most its
    ramps allow), else tile/2 — the only overlap at which Hann windows sum to one, and the half-tile shift of
    DiffInfinite's four-pass scheme."""
    return min(TUKEY_OVERLAP, tile // 2) if window == "tukey" else tile // 2


class DiffInfiniteOptions(EngineOptions):
    """Options of the DiffInfinite engine (`options` of a request for a DiffInfinite model)."""

    sampler: Literal["random", "tiled", "independent", "multidiffusion", "mixture", "dde"] = Field(
        "tiled",
        description="`random`: the paper's random-patch sampler (Algorithm 2); `tiled`: randomly offset "
        "non-overlapping tiling per step (about a quarter of the official cost). Overlapping patch combiners "
        "(fixed 64-latent-px windows at `sampler_stride`, guided ε averaged per pixel): `independent` (no overlap: "
        "seams, for comparison), `multidiffusion` (uniform average), `mixture` (Gaussian-weighted average, σ = "
        "0.1 patch), `dde` (average plus the model's trained DDE coordinator; only for models that have one).")
    sampler_stride: int | None = Field(
        None, ge=8, le=IMAGE_PATCH,
        description="Window spacing in latent px of `multidiffusion`, `mixture` and `dde` (default 32, half the "
        "64-px patch; `dde`: the stride its coordinator was trained with). Smaller = more overlap, more network "
        "passes (≈ (64/stride)² per latent px).")
    dde_guidance: Literal["labels", "null", "shared"] | None = Field(
        None,
        description="`dde` under classifier-free guidance (guidance ≠ 0), how the coordinator meets it: `null` — "
        "DDE's Eq. 6, (1+ω)·C([ε(c)], [c]) − ω·C([ε(∅)], [∅]), the conditional and the null windows corrected "
        "apart (two coordinator passes a step); `labels` — Eq. 6 with the mask's labels for the null windows too; "
        "`shared` — one pass over the conditional windows, its correction added to the guided windows, so the "
        "guidance term ω·(ε(c) − ε(∅)) stays as the patch model made it, and the coordinator sees only the kind of "
        "windows it was trained on. Default `shared`.")
    solver: Literal["ddim", "dpmpp-2m", "dpmpp-2m-sde"] | None = Field(
        None,
        description="`ddim`: the paper's DDIM (η from the request; default 250 steps, or the card's); `dpmpp-2m`: "
        "DPM-Solver++(2M), deterministic; `dpmpp-2m-sde`: its stochastic variant, which holds the quality of DDIM 50 "
        f"at {MULTISTEP_STEPS} steps on the demo model (bench.solver). The multistep solvers default to "
        f"{MULTISTEP_STEPS} steps (the card's when fewer); η applies to `ddim` only. Default: `ddim` with the `random` "
        "sampler (the paper's configuration), `dpmpp-2m-sde` with every other.")
    decoder: Literal["tukey", "hann", "four-pass"] = Field(
        "tukey",
        description="Tiled VAE decoding: `tukey` (cosine ramps, ≈1.2× decodes), `hann` (50 % overlap, ≈4×) or "
        "`four-pass` (the paper's scheme).")
    decode_tile: int | None = Field(
        None, ge=8, le=256,
        description=f"Tiled VAE decoding: tile side in latent px (× the autoencoder's factor 8 in pixels); "
        f"default {DECODE_TILE}.")
    decode_overlap: int | None = Field(
        None, ge=0, le=128,
        description=f"Overlap of neighbouring decode tiles in latent px; default {TUKEY_OVERLAP} (at most tile/2) "
        "for `tukey` (0 … tile/2), tile/2 for `hann` (the only value at which Hann windows sum to one) and "
        "`four-pass` (which shifts by tile/2).")
    decode_context: Literal["slide", "tile"] = Field(
        "slide",
        description="Tiled VAE decoding: what the decoder's GroupNorms and mid-block attention see. `slide`: "
        "statistics of the whole slide and attention over a hierarchy of pooled keys spanning it, so the slide "
        "does not depend on how it was tiled; `tile`: each tile on its own, as the paper's code decodes (a "
        "visible quilt of decode tiles).")

    def resolved(self) -> "DiffInfiniteOptions":
        """These options with the solver and the decode geometry filled in; :class:`OptionError` for pairs the
        window can't blend."""
        solver = self.solver or ("ddim" if self.sampler == "random" else "dpmpp-2m-sde")
        if self.sampler_stride is not None and self.sampler not in ("multidiffusion", "mixture", "dde"):
            raise OptionError("sampler_stride", f"applies to the multidiffusion, mixture and dde samplers, not "
                                                f"{self.sampler!r}")
        if self.dde_guidance is not None and self.sampler != "dde":
            raise OptionError("dde_guidance", f"applies to the dde sampler only, not {self.sampler!r}")
        tile = self.decode_tile if self.decode_tile is not None else DECODE_TILE
        overlap = self.decode_overlap
        if self.decoder == "tukey":
            overlap = default_decode_overlap("tukey", tile) if overlap is None else overlap
            if overlap > tile // 2:
                raise OptionError("decode_overlap", f"tukey windows need an overlap of at most decode_tile/2 = "
                                                    f"{tile // 2} latent px, got {overlap}")
        else:
            if tile % 2:
                raise OptionError("decode_tile", f"{self.decoder} decoding needs an even decode_tile, got {tile}")
            if overlap is not None and overlap != tile // 2:
                why = ("Hann windows sum to one only at 50 % overlap" if self.decoder == "hann"
                       else "four-pass decoding shifts its passes by half a tile")
                raise OptionError("decode_overlap", f"must be decode_tile/2 = {tile // 2} for {self.decoder} "
                                                    f"({why}), got {overlap}")
            overlap = tile // 2
        dde_guidance = self.dde_guidance or (DEFAULT_DDE_GUIDANCE if self.sampler == "dde" else None)
        return self.model_copy(update={"solver": solver, "decode_tile": tile, "decode_overlap": overlap,
                                       "dde_guidance": dde_guidance})


def slide_decoder(decode_fn, scale: int = 8, options: DiffInfiniteOptions | None = None):
    """The tiled decoder slides are decoded with (its geometry also places the seam-ratio and quilt lines);
    ``decode_fn``: a tile function or a :class:`models.decoding.TileDecoder` (e.g. the codec's
    ``tile_decoder``)."""
    from models.decoding import TiledDecoder

    opts = (options or DiffInfiniteOptions()).resolved()
    return TiledDecoder(decode_fn, scale=scale, tile=opts.decode_tile, overlap=opts.decode_overlap,
                        window=opts.decoder)


class DiffInfiniteEngine(EngineBase):
    name: ClassVar[str] = "diffinfinite"
    options_model: ClassVar[type[EngineOptions]] = DiffInfiniteOptions
    conditioning = ("mask", "subtype")
    default_steps: ClassVar[int] = 250  # the paper's
    default_eta: ClassVar[float] = 1.0
    untrained_name: ClassVar[str | None] = "diffinfinite-untrained"
    untrained_card_file: ClassVar[Path | None] = Path(__file__).with_name("untrained_card.json")

    def __init__(self, coordinator_dir: Path | str | None = None):
        # a coordinator folder outside the model folder (a candidate measured before it is shipped);
        # None: the model folder's own dde-coordinator/
        self.coordinator_dir = Path(coordinator_dir) if coordinator_dir is not None else None

    def load(self, folder: Path | None, device: Any) -> Any:
        from models.diffinfinite.loading import load_diffinfinite, untrained_diffinfinite

        models = untrained_diffinfinite(seed=0, device=device) if folder is None else load_diffinfinite(folder, device)
        models.folder = folder  # where a dde job finds the coordinator
        return models

    def check_options(self, card: Any, options: DiffInfiniteOptions, models_dir: Path | None = None) -> None:
        """:class:`OptionError` for options this deployment's copy of the model cannot serve: ``dde`` needs the
        model folder's trained coordinator (``dde-coordinator/coordinator_card.json``); without ``models_dir``
        the folder is not checked."""
        if models_dir is None:
            return
        if options.sampler == "dde" and not has_coordinator(model_folder(card.name, models_dir)):
            raise OptionError("sampler", f"model {card.name} has no trained DDE coordinator "
                                         f"({COORDINATOR_DIR}/{COORDINATOR_CARD} in its folder): choose another sampler "
                                         f"(e.g. multidiffusion) or train one (slidesynth train dde-coordinator)")

    def coordinator(self, models: Any, options: DiffInfiniteOptions, device: Any) -> Any:
        """The trained coordinator of a ``dde`` job (``models.dde.load_coordinator``, imported here only): the
        model folder's, or the engine's ``coordinator_dir`` checked against the model folder's base weights;
        None for other samplers. ValueError when the model has none."""
        if options.sampler != "dde":
            return None
        folder = getattr(models, "folder", None)
        name = getattr(getattr(models, "card", None), "name", "?")
        if self.coordinator_dir is None and not has_coordinator(folder):
            raise ValueError(f"options.sampler: model {name} has no trained DDE coordinator "
                             f"({COORDINATOR_DIR}/{COORDINATOR_CARD})")
        if self.coordinator_dir is not None and folder is None:
            raise ValueError(f"options.sampler: model {name} has no folder holding the base weights that the "
                             f"coordinator {self.coordinator_dir} must be checked against")
        import importlib

        load = importlib.import_module("models.dde").load_coordinator
        coord = (load(folder, device) if self.coordinator_dir is None else
                 load(self.coordinator_dir, device, base_folder=folder))
        if int(coord.patch) != IMAGE_PATCH:
            raise ValueError(f"options.sampler: the DDE coordinator of {name} was trained on {coord.patch}-px windows, "
                             f"the sampler's are {IMAGE_PATCH}")
        arch = getattr(coord, "config", None)  # a DDECoordinator's architecture (other PatchCoordinators have none)
        if arch is not None:
            unet = getattr(getattr(models, "image_unet", None), "config", None)
            channels = int(getattr(unet, "channels", arch.channels))
            if arch.cond != "labels" or arch.channels != channels:
                raise ValueError(f"options.sampler: the DDE coordinator of {name} takes {arch.channels}-channel "
                                 f"windows conditioned on {arch.cond!r}; the image model's are {channels}-channel, "
                                 f"on labels")
        return coord

    def stages(self, conditioning) -> tuple[Stage, ...]:
        head = (Stage.mask,) if conditioning == "subtype" else ()  # a subtype job samples its mask first
        return head + (Stage.sampling, Stage.decoding, Stage.writing)

    def steps_for(self, card, options) -> int:
        if options is not None and options.resolved().solver != "ddim":  # the card's steps when fewer (quick cards)
            return min(MULTISTEP_STEPS, card.default_steps or MULTISTEP_STEPS)
        return card.default_steps or self.default_steps

    def load_state(self, path: Path) -> Any:
        if not path.exists():
            return None
        try:
            from models.diffinfinite.sampler import SamplerState

            return SamplerState.load(path)
        except Exception:  # a torn or stale checkpoint: start over rather than fail
            return None

    def probe_batch(self, models: Any, device: Any, batch: int, precision: str) -> bool:
        """One image-UNet forward on ``batch`` sampler windows (the default patch, 64×64 latents) as the
        sampler calls it: under ``precision``'s autocast, without autograd."""
        import torch

        from models.diffinfinite.guidance import ImageDenoiser
        from models.diffinfinite.pipeline import SamplingOptions, _cfg_attr

        opts = SamplingOptions(precision=precision)
        unet = models.image_unet.to(device).eval()
        channels = int(_cfg_attr(unet, "channels", 4))
        denoiser = ImageDenoiser(unet, out_channels=channels, autocast_dtype=opts.autocast_dtype)
        side = opts.image_patch
        x = torch.randn(batch, channels, side, side, device=device)
        t = torch.full((batch,), 999, dtype=torch.long, device=device)
        labels = torch.zeros(batch, side, side, dtype=torch.long, device=device)
        denoiser(x, t, labels, [None] * batch)  # the unconditional pass: the same network cost as a conditional one
        return True

    def generate(self, models: Any, request: SlideRequest, *, device: Any, runtime: Runtime, report: ReportFn,
                 cancel: CancelFn, state: Any = None,
                 on_checkpoint: Callable[[Any], None] | None = None) -> SlideBands:
        from models.diffinfinite.pipeline import DiffInfinitePipeline, SamplingOptions

        t0 = time.perf_counter()
        options: DiffInfiniteOptions = request.options
        if options.solver is None:  # requests are stored resolved: a job recorded before solvers existed
            options = options.model_copy(update={"solver": "ddim"})
        options = options.resolved()
        from models.diffinfinite.layers import set_fused_kernels

        set_fused_kernels(runtime.fused_kernels)  # process-wide, before any compiled graph is traced
        coordinator = self.coordinator(models, options, device)  # before any work: a missing one fails the job now
        pipe = DiffInfinitePipeline(models, device=device, compile_mode=runtime.compile_mode if runtime.compile else None,
                                    coordinator=coordinator)
        precision = runtime.precision
        if precision == "auto":
            precision = "bfloat16" if getattr(device, "type", str(device)) == "cuda" else "float32"
        stride = options.sampler_stride
        if stride is None and coordinator is not None:
            stride = int(coordinator.stride)  # the windows it was trained on
        opts = SamplingOptions(steps=request.steps, guidance=request.guidance, eta=request.eta, mode=options.sampler,
                               solver=options.solver, seed=request.seed, batch_size=runtime.batch_size,
                               precision=precision, window_stride=stride,
                               dde_guidance=options.dde_guidance or DEFAULT_DDE_GUIDANCE)
        # A slide of any size: sample the latent grid that covers it (sides rounded up to the VAE's factor) and
        # crop the decoded bands; a mask is extended by edge replication over the few extra rows and columns.
        f = models.codec.scale_factor
        cover_h, cover_w = -(-request.height // f) * f, -(-request.width // f) * f
        if request.labels is not None:
            labels = request.labels
        else:
            report(Stage.mask, 0.0, None)
            labels = pipe.sample_mask(subtype=request.subtype_id, height=cover_h, width=cover_w,
                                      options=opts, progress=stage_progress(report, Stage.mask, request.steps),
                                      cancel=cancel, decode_context=options.decode_context)
        import numpy as np

        labels = pipe.validate_labels(labels)
        slide_labels = np.ascontiguousarray(labels[:request.height, :request.width])
        if labels.shape != (cover_h, cover_w):
            labels = np.pad(slide_labels, ((0, cover_h - request.height), (0, cover_w - request.width)), mode="edge")
        if state is not None and pipe.state_mismatch(state, labels, opts) is not None:
            state = None  # a checkpoint of another sampler version or setting: start over, don't fail
        report(Stage.sampling, 0.0, 0)
        latent = pipe.sample_latents(labels, options=opts, progress=stage_progress(report, Stage.sampling, request.steps),
                                     cancel=cancel, state=state, on_step=on_checkpoint)
        seconds_sampling = time.perf_counter() - t0
        sampler = pipe.last_sampler
        stats = list(sampler.stats.values()) if sampler is not None else []
        notes: dict[str, Any] = {
            "sampler_passes": sum(st.forwards for st in stats),
            "sampler_network_calls": sum(st.calls for st in stats),
        }
        if runtime.compile:  # compilation paid by this job (the first of its worker process, or a new shape)
            notes["seconds_compile_warmup"] = round(pipe.warmup_seconds(), 3)
        if sampler is not None and sampler.batch_reductions:  # CUDA ran out of memory: the batch was halved and the job went on
            notes["batch_size_reductions"] = len(sampler.batch_reductions)
            notes["batch_size"] = sampler.batch_size
        decoder = slide_decoder(models.codec.tile_decoder("image", options.decode_context),
                                models.codec.scale_factor, options)
        # checks the latent (channels, NaN/Inf) now, before any output file exists
        bands = decoder.iter_bands(latent, cancel=cancel, progress=stage_progress(report, Stage.decoding, request.steps),
                                   crop=(request.height, request.width))
        rows, cols = decoder.boundary_lines(latent.shape[2], latent.shape[3])
        cuts = {"decode": decoder.cut_zones(latent.shape[2], latent.shape[3])}
        sampler_cuts = pipe.sampler_cut_lines(labels, opts)
        if sampler_cuts is not None:
            cuts["sampler"] = sampler_cuts
        return SlideBands(bands=bands, labels=slide_labels, cut_lines=cuts,
                          seam_lines=([p for p in rows if p < request.height], [p for p in cols if p < request.width]),
                          seconds={"sampling": seconds_sampling}, notes=notes)


register_engine(DiffInfiniteEngine())
