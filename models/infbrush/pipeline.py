"""Loading ∞-Brush models and sampling slides from them (the API the worker calls)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from models.cards import ModelCard
from models.engine import is_model_of
from models.hashing import sha256_file as _sha256
from models.infbrush.config import (DESIGN_NOTES, ENCODER_ID, PROTOTYPES_SOURCE, InfBrushConfig, prototype_encoder,
                                    tiny_config)
from models.infbrush.denoiser import InfBrushDenoiser, canvas_window, token_positions
from models.infbrush.priors import NoisePrior, noise_source
from models.infbrush.sampler import Canvas, _expand
from models.infbrush.schedule import CosineSchedule, ddim_update, em_update
from models.runtime import check_cancel
from models.state_dicts import compare_state_dicts, mismatch_message

WEIGHTS_FILE = "denoiser.safetensors"
MIN_SIDE = 8
SOLVERS = ("ddim", "euler-maruyama")


def card_prior(card: ModelCard) -> NoisePrior:
    """The noise prior a card's model was trained with (``config.noise_prior``; absent: white)."""
    return NoisePrior.from_dict(card.config.get("noise_prior") if isinstance(card.config, dict) else None)


@dataclass
class InfBrushModels:
    card: ModelCard
    denoiser: InfBrushDenoiser
    folder: Path | None = None

    @property
    def config(self) -> InfBrushConfig:
        return self.denoiser.cfg


CONDITIONING = ["embedding", "embedding_grid", "subtype"]


def make_card(cfg: InfBrushConfig, *, name: str, trained: bool, description: str = "", training: dict | None = None,
              training_data: str = "", native_mpp: float = 0.5, files: dict | None = None,
              conditioning: list[str] | None = None, prototype_classes: list[str] | None = None,
              noise_prior=None) -> ModelCard:
    """conditioning: what the card offers (default all three; a model trained on global vectors only should
    not offer ``embedding_grid``, which it never learnt to follow).

    Subtypes: a model conditioned on QuiltNet embeddings takes the prompt set's subtype codes (the text tower
    embeds them); a model conditioned on another encoder takes ``prototype_classes`` — class names of that
    encoder's class prototypes (the mean embedding of a class's tiles, ``prototypes.json`` in its folder) — and
    offers no subtype without them (text embeddings live in another space).

    noise_prior: the :class:`models.infbrush.priors.NoisePrior` the model was trained with (None: white), recorded
    as ``config.noise_prior`` with all its parameters; sampling draws that prior."""
    from models.infbrush.priors import NoisePrior
    from models.infbrush.prompts import load_prompt_set

    prompts = load_prompt_set()
    if prototype_classes:
        subtypes, source = dict(enumerate(prototype_classes)), PROTOTYPES_SOURCE + cfg.embedding_encoder
    elif cfg.embedding_encoder == ENCODER_ID:
        subtypes, source = dict(enumerate(prompts.codes)), "text:" + prompts.version
    else:
        subtypes, source = {}, None
    offered = list(conditioning or CONDITIONING)
    if not subtypes and "subtype" in offered:
        offered.remove("subtype")
    intro = ("∞-Brush (Le et al., ECCV 2024): conditional diffusion in function space with the cross-attention neural "
             "operator, sampled at any resolution in linear time. Where the paper is silent we follow ∞-Diff; choices: ")
    config_extra = {}
    if noise_prior is not None and noise_prior.kind != "white":   # absent = white (cards from before priors)
        config_extra["noise_prior"] = noise_prior.to_dict()
        config_extra["noise_prior_description"] = noise_prior.describe()
    return ModelCard(
        name=name, engine="infinity-brush", trained=trained,
        description=(description + " " if description else "") + intro + " ".join(DESIGN_NOTES),
        subtypes=subtypes,
        native_mpp=native_mpp, max_width=cfg.max_side, max_height=cfg.max_side, default_steps=50,
        conditioning=offered, embedding_encoder=cfg.embedding_encoder,
        embedding_dim=cfg.embedding_dim, training_data=training_data, training=training or {}, files=files or {},
        config={"network": cfg.to_dict(), "weights": WEIGHTS_FILE, "prompt_set": prompts.version,
                "subtypes_from": source,
                "min_side": MIN_SIDE, "default_steps": 50, "sampler": "DDIM (eta 0), trailing timesteps",
                "memory": "sampling state H×W×3 float32 held across steps (805 MB at 8192²); "
                          "network working set bounded by chunk_pixels", **config_extra},
    )


def untrained_infbrush(seed: int = 0, device: str | torch.device = "cpu",
                       config: InfBrushConfig | None = None) -> InfBrushModels:
    """The tiny architecture with seeded random weights (outputs are not tissue)."""
    cfg = config or tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InfBrushDenoiser(cfg)
    model.to(device).eval()
    card = make_card(cfg, name="infinity-brush-untrained", trained=False,
                     description=f"Untrained: seeded random weights (seed {seed}); the output is not tissue.")
    return InfBrushModels(card=card, denoiser=model)


def save_infbrush(models: InfBrushModels, folder: str | Path, state_dict: dict | None = None) -> Path:
    """Write ``denoiser.safetensors`` (+ its sha256 in the card) and ``model_card.json`` atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else models.denoiser.state_dict()
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp))
    os.replace(tmp, folder / WEIGHTS_FILE)
    card = models.card.model_copy(update={"files": {WEIGHTS_FILE: _sha256(folder / WEIGHTS_FILE)}})
    models.card = card
    card_tmp = folder / "model_card.json.tmp"
    card_tmp.write_text(card.model_dump_json(indent=2) + "\n")
    os.replace(card_tmp, folder / "model_card.json")
    return folder


def check_state_dict(expected: dict, got: dict, source: str) -> None:
    """Raise ValueError listing every missing, unexpected and mis-shaped key."""
    mismatch = compare_state_dicts(expected, got)
    if mismatch:
        raise ValueError(mismatch_message(f"checkpoint {source}", "the model configuration", mismatch))


def load_infbrush(folder: str | Path, device: str | torch.device = "cpu") -> InfBrushModels:
    """Our format: ``model_card.json`` (engine infinity-brush, config.network) + ``denoiser.safetensors``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    card = ModelCard.load(folder)
    if not is_model_of(card, "infinity-brush"):
        raise ValueError(f"{folder} holds a {card.engine!r} model, not infinity-brush")
    net = card.config.get("network")
    if not isinstance(net, dict):
        raise ValueError(f"{folder}/model_card.json has no config.network section")
    cfg = InfBrushConfig.from_dict(net)
    name = card.config.get("weights", WEIGHTS_FILE)
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"model folder {folder} has no weights file {name}")
    want = card.files.get(name)
    if want and _sha256(path) != want:
        raise ValueError(f"{path} does not match the sha256 recorded in its model card")
    state = load_file(str(path))
    model = InfBrushDenoiser(cfg)
    check_state_dict(model.state_dict(), state, str(path))
    model.load_state_dict(state)
    model.to(device).eval()
    return InfBrushModels(card=card, denoiser=model, folder=folder)


class InfBrushPipeline:
    """Validate requests, turn subtypes into embeddings and stream sampled bands."""

    def __init__(self, models: InfBrushModels, device: str | torch.device = "cpu",
                 text_encoder_dir: str | Path | None = None, models_dir: str | Path | None = None):
        """models_dir: where the encoder of a prototype-subtype model lives (default the repository's weights/)."""
        self.models = models
        self.models_dir = Path(models_dir) if models_dir is not None else Path(__file__).resolve().parents[2] / "weights"
        self.device = torch.device(device)
        self.model = models.denoiser.to(self.device).eval()
        self.cfg = models.config
        self.schedule = CosineSchedule(self.cfg.timesteps)
        self.text_encoder_dir = text_encoder_dir
        self.prior = card_prior(models.card)

    @property
    def card(self) -> ModelCard:
        return self.models.card

    # --- validation -------------------------------------------------------------------------------------------
    def validate_embedding(self, embedding, encoder: str | None = None) -> torch.Tensor:
        """A vector (D,) or a grid (gh, gw, D) from the card's encoder → float32 tensor (gh, gw, D)."""
        want_enc, want_dim = self.card.embedding_encoder or self.cfg.embedding_encoder, self.cfg.embedding_dim
        expect = f"expected embeddings from {want_enc!r} with dimension {want_dim}"
        if encoder is not None and encoder != want_enc:
            raise ValueError(f"embedding encoder {encoder!r} does not match model {self.card.name}: {expect}")
        try:
            arr = torch.as_tensor(np.asarray(embedding, dtype=np.float64)).float()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"embedding is not numeric: {exc}; {expect}") from None
        if arr.dim() == 1:
            arr = arr[None, None]
        if arr.dim() != 3 or arr.shape[-1] != want_dim:
            raise ValueError(f"embedding has shape {tuple(np.shape(embedding))}: {expect}, as a vector ({want_dim},) "
                             f"or a grid (rows, cols, {want_dim})")
        if max(arr.shape[0], arr.shape[1]) > self.cfg.max_cond_grid:
            raise ValueError(f"embedding grid {arr.shape[0]}×{arr.shape[1]} exceeds "
                             f"{self.cfg.max_cond_grid}×{self.cfg.max_cond_grid}")
        if not torch.isfinite(arr).all():
            raise ValueError(f"embedding has non-finite values; {expect}")
        if (arr.norm(dim=-1) < 1e-8).any():
            raise ValueError(f"embedding has a zero vector; {expect}")
        return arr

    def validate_size(self, height: int, width: int) -> None:
        mh, mw = self.card.max_height, self.card.max_width
        if not (MIN_SIDE <= height <= mh and MIN_SIDE <= width <= mw):
            raise ValueError(f"size {width}×{height} is outside this model's limits: width and height must be in "
                             f"[{MIN_SIDE}, {mw}] × [{MIN_SIDE}, {mh}] (the sampling state is held in memory)")

    # --- subtype prompts --------------------------------------------------------------------------------------
    def embed_subtype(self, subtype: str) -> torch.Tensor:
        """Class embedding of a subtype: for a QuiltNet-conditioned model the mean of normalised prompt
        embeddings (QuiltNet text tower), re-normalised; for a model whose card takes subtypes from class
        prototypes, that class's prototype in the encoder's folder."""
        encoder = prototype_encoder(self.card.config)
        if encoder is not None:
            from models.encoders import class_prototypes

            known = list(self.card.subtypes.values())
            if subtype not in known:
                raise ValueError(f"unknown subtype {subtype!r} for {self.card.name}; known: {', '.join(known)}")
            protos = class_prototypes(encoder, self.models_dir)
            if subtype not in protos:
                raise ValueError(f"encoder {encoder!r} has no prototype for {subtype!r}")
            return torch.from_numpy(protos[subtype].copy())
        from models.infbrush.text import embed_subtype

        emb = embed_subtype(subtype, self.text_encoder_dir)
        if emb.shape[-1] != self.cfg.embedding_dim:
            raise ValueError(f"text encoder gives {emb.shape[-1]}-d embeddings; model expects {self.cfg.embedding_dim}")
        return emb

    # --- sampling ---------------------------------------------------------------------------------------------
    def run(self, height: int, width: int, embedding=None, seed: int = 0, steps: int = 50, guidance: float = 1.0,
            eta: float = 0.0, chunk_pixels: int = 65536, progress: Callable[[int, int], None] | None = None,
            cancel: Callable[[], bool] | None = None, encoder: str | None = None, *, mpp: float | None = None,
            solver: str = "ddim", noise_prior: str | None = None) -> "SamplingRun":
        """A validated sampling run (state not yet allocated); see :class:`SamplingRun`.

        mpp: the slide's µm/px (default the card's): the grid spacing of a noise prior. solver: ``ddim`` or
        ``euler-maruyama`` (the multilevel paper's reverse SDE). noise_prior: the prior kind the request asks
        for; ValueError naming both when the model was trained with another."""
        if noise_prior is not None and noise_prior != self.prior.kind:
            raise ValueError(f"noise_prior {noise_prior!r} was asked for, but model {self.card.name} was trained with "
                             f"the {self.prior.kind!r} prior")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, not {solver!r}")
        mpp = float(mpp if mpp is not None else (self.card.native_mpp or self.prior.reference_mpp))
        if not mpp > 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        return SamplingRun(self, height, width, embedding, seed, steps, guidance, eta, chunk_pixels, progress, cancel,
                           encoder, mpp=mpp, solver=solver)

    def sample_float_bands(self, height: int, width: int, embedding=None, seed: int = 0, steps: int = 50,
                           guidance: float = 1.0, eta: float = 0.0, chunk_pixels: int = 65536,
                           progress: Callable[[int, int], None] | None = None, cancel: Callable[[], bool] | None = None,
                           encoder: str | None = None, **kw) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(row0, row1, x̂₀ band (rows, W, 3) in [−1, 1]) in row order; the last DDIM step streams out.

        The request is validated now (ValueError before any work); sampling happens as the iterator is consumed."""
        run = self.run(height, width, embedding, seed, steps, guidance, eta, chunk_pixels, progress, cancel, encoder,
                       **kw)
        return run.bands()

    def sample_bands(self, height: int, width: int, embedding=None, seed: int = 0, steps: int = 50,
                     guidance: float = 1.0, eta: float = 0.0, chunk_pixels: int = 65536,
                     progress: Callable[[int, int], None] | None = None, cancel: Callable[[], bool] | None = None,
                     encoder: str | None = None, **kw) -> Iterator[np.ndarray]:
        """np.uint8 (rows, W, 3) bands in row order covering the canvas (validated on call, sampled lazily);
        ``kw``: mpp, solver, noise_prior of :meth:`run`."""
        bands = self.sample_float_bands(height, width, embedding, seed, steps, guidance, eta, chunk_pixels, progress,
                                        cancel, encoder, **kw)
        return (to_uint8(band) for _, _, band in bands)

    def sample_array(self, height: int, width: int, **kw) -> np.ndarray:
        return np.concatenate(list(self.sample_bands(height, width, **kw)), axis=0)


class SamplingRun:
    """One sampling of an H×W canvas (DDIM or Euler–Maruyama): the state, the canvas tiling and the per-step
    passes. The noise (initial, DDIM's η > 0 and EM's diffusion term) is the card's prior at ``mpp``: stream 0 for
    the initial noise, s + 1 for step s, each a per-pixel function of the seed (chunk-exact)."""

    def __init__(self, pipe: InfBrushPipeline, height: int, width: int, embedding, seed: int, steps: int,
                 guidance: float, eta: float, chunk_pixels: int, progress, cancel, encoder, *, mpp: float = 0.5,
                 solver: str = "ddim"):
        pipe.validate_size(height, width)
        if seed < 0:
            raise ValueError("seed must be non-negative")
        self.pipe, self.H, self.W, self.seed = pipe, int(height), int(width), int(seed)
        self.guidance, self.eta, self.progress, self.cancel = float(guidance), float(eta), progress, cancel
        cfg, dev = pipe.cfg, pipe.device
        self.ts = pipe.schedule.ddim_timesteps(int(steps))
        if embedding is None:
            B, drop_flags, grid = 1, [True], torch.ones(1, 1, cfg.embedding_dim)
        else:
            grid = pipe.validate_embedding(embedding, encoder)
            if self.guidance == 1.0:
                B, drop_flags = 1, [False]
            elif self.guidance == 0.0:
                B, drop_flags = 1, [True]
            else:
                B, drop_flags = 2, [False, True]
        gh, gw = grid.shape[:2]
        self.B, self.grid = B, (gh, gw)
        self.emb = grid.reshape(1, gh * gw, -1).expand(B, -1, -1).to(dev)
        # the grid's cells tile the whole canvas: positions (and a local condition's window) in canvas coordinates,
        # the same for every chunk
        self.pos = token_positions(gh, gw, self.H, self.W)[None].expand(B, -1, -1).to(dev)
        self.window = canvas_window(self.H, self.W)
        self.drop = torch.tensor(drop_flags, device=dev)
        self.canvas = Canvas(pipe.model, self.H, self.W, chunk_pixels, dev)
        self.solver, self.mpp = solver, float(mpp)
        self.noise = noise_source(pipe.prior, self.H, self.W, self.mpp, cfg.mollify_sigma, cfg.train_resolution)
        self.total, self.done = len(self.ts) * 2 * self.canvas.n_tiles, 0
        self.x: torch.Tensor | None = None
        self.cstats = None

    def _tick(self):
        check_cancel(self.cancel)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    @torch.inference_mode()
    def init_state(self) -> None:
        """x_T = the prior's noise (white: noise_mul · A z) over the canvas (band by band) and the canvas's
        coordinate sums."""
        dev, H, W = self.pipe.device, self.H, self.W
        self.x = torch.empty(H, W, 3, device=dev)
        for r0, r1 in self.canvas.bands():
            self.x[r0:r1] = self.noise.noise_window(self.seed, 0, r0, r1, 0, W, device=dev)
        self.cstats = _expand(self.canvas.coord_stats(), self.B)

    @torch.inference_mode()
    def step(self, s: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """DDIM step s: updates the state in place; the last step yields x̂₀ bands instead."""
        model, canvas, x, B, dev = self.pipe.model, self.canvas, self.x, self.B, self.pipe.device
        sched, ts = self.pipe.schedule, self.ts
        check_cancel(self.cancel)
        last = s == len(ts) - 1
        ab_t, ab_p = sched.ab(ts[s]), sched.ab(ts[s + 1] if not last else -1)
        ctx = model.context(torch.full((B,), ts[s], device=dev, dtype=torch.long), self.emb, self.pos, self.drop,
                            grid=self.grid, window=self.window)
        sstats = canvas.sa_stats(x, ctx, B, self.cstats, self._tick)
        grid_out = model.grid_level(canvas.grid_input(x, ctx, B, self.cstats, sstats), ctx)
        pending = None
        for r0, r1, e in canvas.eps_bands(x, ctx, B, self.cstats, sstats, grid_out, self._tick):
            eps = e[0] if B == 1 else e[1] + self.guidance * (e[0] - e[1])
            noise = None
            if (self.eta > 0 or self.solver == "euler-maruyama") and not last:
                noise = self.noise.noise_window(self.seed, s + 1, r0, r1, 0, self.W, device=dev)
            if self.solver == "euler-maruyama":
                x_prev, x0 = em_update(x[r0:r1], eps, ab_t, ab_p, noise=noise)
            else:
                x_prev, x0 = ddim_update(x[r0:r1], eps, ab_t, ab_p, eta=self.eta, noise=noise)
            if last:
                yield r0, r1, x0
                continue
            if pending is not None:                       # one-band delay: the next band's halo reads old rows
                x[pending[0]:pending[1]] = pending[2]
            pending = (r0, r1, x_prev)
        if pending is not None:
            x[pending[0]:pending[1]] = pending[2]

    def bands(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        self.init_state()
        for s in range(len(self.ts)):
            yield from self.step(s)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["InfBrushModels", "InfBrushPipeline", "SamplingRun", "load_infbrush", "untrained_infbrush", "save_infbrush", "make_card",
           "check_state_dict", "to_uint8", "parameter_count"]
