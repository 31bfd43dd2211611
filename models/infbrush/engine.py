"""The ∞-Brush engine: conditional diffusion in function space, sampled chunk by chunk straight to pixels (no
VAE, so no decoder options); see :mod:`models.engine` for the contract. Imports no ML library at import time."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import Field

from models.cards import ModelCard
from models.engine import (CancelFn, EngineBase, EngineOptions, OptionError, ReportFn, Runtime, SlideBands,
                           SlideRequest, Stage, register_engine, stage_progress)
from models.infbrush.config import TEXT_ENCODER_DIRNAME, prototype_encoder, text_encoder_dir


NOISE_PRIORS = ("white", "bessel", "laplacian", "fno", "combined")  # models/infbrush/priors.py (imports torch)


def card_prior_kind(card: ModelCard) -> str:
    """The kind of noise prior a card's model was trained with (``config.noise_prior.kind``; absent: white)."""
    prior = card.config.get("noise_prior") if isinstance(card.config, dict) else None
    return str(prior.get("kind", "white")) if isinstance(prior, dict) else "white"


class InfBrushOptions(EngineOptions):
    """Options of the ∞-Brush engine (`options` of a request for an ∞-Brush model)."""

    noise_prior: Literal["white", "bessel", "laplacian", "fno", "combined"] | None = Field(
        None,
        description="The noise prior to sample with; default (and the only one accepted): the prior the model was "
        "trained with, recorded on its card (`white`: the mollified pixel noise; `bessel`, `laplacian`, `fno`, "
        "`combined`: trace-class priors in µm, drawn at the request's µm/px). A prior the model was not trained "
        "with is refused, naming both.")
    solver: Literal["ddim", "euler-maruyama"] = Field(
        "ddim",
        description="`ddim`: DDIM on trailing timesteps (η from the request); `euler-maruyama`: the multilevel "
        "paper's reverse-SDE sampler on the same timesteps, its diffusion term the prior's noise (η ignored).")


class InfBrushEngine(EngineBase):
    name: ClassVar[str] = "infinity-brush"
    options_model: ClassVar[type[EngineOptions]] = InfBrushOptions
    conditioning = ("embedding", "embedding_grid", "subtype")
    default_steps: ClassVar[int] = 50  # the paper's DDIM steps
    default_eta: ClassVar[float] = 0.0
    untrained_name: ClassVar[str | None] = "infinity-brush-untrained"
    untrained_card_file: ClassVar[Path | None] = Path(__file__).with_name("untrained_card.json")

    def load(self, folder: Path | None, device: Any) -> Any:
        from models.infbrush.pipeline import load_infbrush, untrained_infbrush

        return untrained_infbrush(seed=0, device=device) if folder is None else load_infbrush(folder, device=device)

    def serves(self, card: ModelCard, conditioning, models_dir: Path) -> str | None:
        why = super().serves(card, conditioning, models_dir)
        encoder = prototype_encoder(card.config)
        if why is None and conditioning == "subtype" and encoder is not None:
            from models.encoders import class_prototypes

            try:
                class_prototypes(encoder, models_dir)
            except (OSError, ValueError) as exc:  # EncoderNotInstalled is a LookupError: named below
                return f"subtype prompts of {card.name} are its encoder's class prototypes, which are unusable: {exc}"
            except LookupError:
                return (f"subtype prompts of {card.name} are the class prototypes of encoder {encoder!r}, which "
                        "this deployment lacks; send an embedding instead")
            return None
        if why is None and conditioning == "subtype" and not text_encoder_dir(models_dir).joinpath(
                "open_clip_config.json").is_file():
            # the folder relative to the models dir: no server paths in answers
            return (f"subtype prompts for ∞-Brush need the QuiltNet text encoder (an OpenCLIP local-dir folder "
                    f"{TEXT_ENCODER_DIRNAME}/ in SLIDESYNTH_MODELS_DIR), which this deployment lacks; send an "
                    "embedding instead")
        return why

    def check_options(self, card: ModelCard, options: EngineOptions, models_dir: Path | None = None) -> None:
        """A noise prior other than the card's → :class:`OptionError` naming both."""
        asked = getattr(options, "noise_prior", None)
        trained = card_prior_kind(card)
        if asked is not None and asked != trained:
            raise OptionError("noise_prior", f"{asked!r} was asked for, but model {card.name} was trained with the "
                                             f"{trained!r} prior (the prior is part of the model; omit noise_prior to "
                                             f"use it)")

    def max_embedding_grid(self, card: ModelCard) -> int | None:
        limit = card.config.get("network", {}).get("max_cond_grid") if isinstance(card.config, dict) else None
        return int(limit) if isinstance(limit, int) else None

    def generate(self, models: Any, request: SlideRequest, *, device: Any, runtime: Runtime, report: ReportFn,
                 cancel: CancelFn, state: Any = None,
                 on_checkpoint: Callable[[Any], None] | None = None) -> SlideBands:
        from models.infbrush.pipeline import InfBrushPipeline

        pipe = InfBrushPipeline(models, device, text_encoder_dir=text_encoder_dir(runtime.models_dir),
                                models_dir=runtime.models_dir)
        if request.embedding_grid is not None:
            import numpy as np

            rows, cols, vectors = request.embedding_grid
            embedding = np.asarray(vectors, dtype=np.float64).reshape(rows, cols, -1)  # row-major cells
        elif request.embedding is not None:
            embedding = request.embedding
        else:
            embedding = pipe.embed_subtype(request.subtype)
        opts = request.options if isinstance(request.options, InfBrushOptions) else InfBrushOptions()
        self.check_options(models.card, opts)
        report(Stage.sampling, 0.0, 0)
        # The API's guidance is ω in (1+ω)·ε(c) − ω·ε(∅) for every engine; ∞-Brush takes the scale s = 1+ω.
        bands = pipe.sample_bands(height=request.height, width=request.width, embedding=embedding, seed=request.seed,
                                  steps=request.steps, guidance=1.0 + request.guidance, eta=request.eta,
                                  progress=stage_progress(report, Stage.sampling, request.steps), cancel=cancel,
                                  mpp=request.mpp, solver=opts.solver, noise_prior=opts.noise_prior)
        return SlideBands(bands=bands)


register_engine(InfBrushEngine())
