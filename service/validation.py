"""Turn a request (parameters, conditioning, optional mask) into a validated :class:`JobSpec`.

Every refusal is a :class:`FieldError` naming the request field, so the API answers 422 with a
``loc`` the client can act on, and the CLI prints the same message.
"""
from __future__ import annotations

import math
import secrets

import numpy as np

from models.cards import ModelCard
from service.masks import MaskInfo
from service.schemas import EmbeddingConditioning, GenerateParams, SubtypeConditioning
from slidesynth.jobs import DECODE_TILE, JobSpec, default_decode_overlap
from slidesynth.settings import Settings

# Common names of the DiffInfinite mask model's two subtypes (TCGA codes and short forms).
SUBTYPE_ALIASES = {
    "luad": "adenocarcinoma",
    "lung adenocarcinoma": "adenocarcinoma",
    "adeno": "adenocarcinoma",
    "lusc": "squamous cell carcinoma",
    "squamous": "squamous cell carcinoma",
    "lung squamous cell carcinoma": "squamous cell carcinoma",
}


DEFAULT_GUIDANCE = 3.0  # DiffInfinite's notebook default ω, for cards that name none
FLOAT32_MAX = float(np.finfo(np.float32).max)  # embeddings are float32 in the engines


class FieldError(ValueError):
    """A request field that cannot be accepted."""

    def __init__(self, loc: tuple[str | int, ...], msg: str):
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")
        self.loc = loc
        self.msg = msg


def resolve_model(name: str | None, cards: dict[str, ModelCard], settings: Settings) -> ModelCard:
    name = name or settings.default_model
    if name not in cards:
        raise FieldError(("model",), f"unknown model {name!r}; available: {', '.join(sorted(cards))}")
    return cards[name]


def _check_size(width: int, height: int, card: ModelCard, settings: Settings, loc_prefix: tuple = ()) -> None:
    max_w = min(settings.max_width, card.max_width)
    max_h = min(settings.max_height, card.max_height)
    if width > max_w:
        raise FieldError(loc_prefix + ("width",), f"{width} px is over the maximum of {max_w} px for {card.name}")
    if height > max_h:
        raise FieldError(loc_prefix + ("height",), f"{height} px is over the maximum of {max_h} px for {card.name}")
    if width % 8 or height % 8:
        raise FieldError(loc_prefix + ("width" if width % 8 else "height",), "must be a multiple of 8")


def resolve_subtype(name: str, card: ModelCard) -> tuple[str, int]:
    if "subtype" not in card.conditioning or not card.subtypes:
        raise FieldError(("conditioning", "type"), f"model {card.name} does not take subtype conditioning")
    wanted = name.strip().lower()
    for candidate in (wanted, SUBTYPE_ALIASES.get(wanted)):
        for idx, sub in card.subtypes.items():
            if sub.lower() == candidate:
                return sub, int(idx)
    known = ", ".join(card.subtypes.values())
    raise FieldError(("conditioning", "subtype"), f"unknown subtype {name!r} for {card.name}; known: {known}")


def text_encoder_available(settings: Settings) -> bool:
    """∞-Brush turns subtypes into embeddings with QuiltNet's text tower, loaded from a local folder."""
    from models.infbrush.text import DEFAULT_DIRNAME

    return (settings.models_dir / DEFAULT_DIRNAME / "open_clip_config.json").is_file()


def usable_conditioning(card: ModelCard, settings: Settings) -> list[str]:
    """The conditioning kinds this deployment can serve for ``card`` (what ``GET /models`` lists)."""
    return [c for c in card.conditioning
            if not (c == "subtype" and card.engine == "infinity-brush" and not text_encoder_available(settings))]


def _require_text_encoder(settings: Settings) -> None:
    from models.infbrush.text import DEFAULT_DIRNAME

    if not text_encoder_available(settings):  # the folder relative to the models dir: no server paths in answers
        raise FieldError(("conditioning", "type"),
                         f"subtype prompts for ∞-Brush need the QuiltNet text encoder (an OpenCLIP local-dir folder "
                         f"{DEFAULT_DIRNAME}/ in SLIDESYNTH_MODELS_DIR), which this deployment lacks; send an "
                         "embedding instead")


def check_embedding(cond: EmbeddingConditioning, card: ModelCard) -> list[float]:
    if "embedding" not in card.conditioning:
        raise FieldError(("conditioning", "type"), f"model {card.name} does not take embedding conditioning")
    if card.embedding_encoder and cond.encoder != card.embedding_encoder:
        raise FieldError(
            ("conditioning", "encoder"),
            f"{card.name} expects embeddings from {card.embedding_encoder!r} "
            f"({card.embedding_dim} numbers), not {cond.encoder!r}",
        )
    if card.embedding_dim and len(cond.vector) != card.embedding_dim:
        raise FieldError(
            ("conditioning", "vector"),
            f"{card.name} expects {card.embedding_dim} numbers from {card.embedding_encoder!r}, got {len(cond.vector)}",
        )
    if not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in cond.vector):
        raise FieldError(("conditioning", "vector"), "contains non-finite values (NaN or infinity) or values "
                         f"beyond float32 (|v| > {FLOAT32_MAX:.4g})")
    if float(np.linalg.norm(np.asarray(cond.vector, np.float32))) < 1e-8:  # as the engine measures it
        raise FieldError(("conditioning", "vector"), "is a zero vector: it has no direction to condition on")
    return list(map(float, cond.vector))


def check_labels(labels: np.ndarray, card: ModelCard) -> None:
    present = {int(v) for v in np.unique(labels)}
    unknown = sorted(present - {int(k) for k in card.classes})
    if unknown:
        names = ", ".join(f"{k}={v}" for k, v in sorted(card.classes.items()))
        raise FieldError(("mask",), f"class values {unknown} are not classes of {card.name} ({names})")


def decode_geometry(params: GenerateParams) -> dict[str, int]:
    """Tile and overlap (latent px) of the tiled VAE decoder; ``FieldError`` for pairs the window can't blend."""
    tile = params.decode_tile if params.decode_tile is not None else DECODE_TILE
    overlap = params.decode_overlap
    if params.decoder == "tukey":
        overlap = default_decode_overlap("tukey", tile) if overlap is None else overlap
        if overlap > tile // 2:
            raise FieldError(("decode_overlap",), f"tukey windows need an overlap of at most decode_tile/2 = "
                                                  f"{tile // 2} latent px, got {overlap}")
        return {"decode_tile": tile, "decode_overlap": overlap}
    if tile % 2:
        raise FieldError(("decode_tile",), f"{params.decoder} decoding needs an even decode_tile, got {tile}")
    if overlap is not None and overlap != tile // 2:
        why = ("Hann windows sum to one only at 50 % overlap" if params.decoder == "hann"
               else "four-pass decoding shifts its passes by half a tile")
        raise FieldError(("decode_overlap",), f"must be decode_tile/2 = {tile // 2} for {params.decoder} ({why}), "
                                              f"got {overlap}")
    return {"decode_tile": tile, "decode_overlap": default_decode_overlap(params.decoder, tile)}


def build_spec(
    params: GenerateParams,
    card: ModelCard,
    settings: Settings,
    *,
    conditioning: SubtypeConditioning | EmbeddingConditioning | None = None,
    mask: MaskInfo | None = None,
) -> JobSpec:
    """Validate everything but the mask's pixel values (see :func:`check_labels`)."""
    mpp = params.mpp or card.native_mpp
    steps = params.steps or card.steps_default
    if steps > settings.max_steps:
        raise FieldError(("steps",), f"{steps} is over the maximum of {settings.max_steps}")
    extra: dict = {}
    if mask is not None:
        if "mask" not in card.conditioning:
            raise FieldError(("mask",), f"model {card.name} does not take a mask")
        mask_mpp = params.mask_mpp or mask.mpp or mpp
        scale = mask_mpp / mpp
        width = max(8, int(round(mask.width * scale / 8)) * 8)
        height = max(8, int(round(mask.height * scale / 8)) * 8)
        for name, given, derived in (("width", params.width, width), ("height", params.height, height)):
            if given is not None and given != derived:
                raise FieldError(
                    ("params", name),
                    f"{given} disagrees with the mask: {mask.width}×{mask.height} px at {mask_mpp} µm/px "
                    f"gives {width}×{height} px at {mpp} µm/px (omit width/height with a mask)",
                )
        _check_size(width, height, card, settings, ("params",))
        extra = dict(conditioning="mask", mask_file="mask.png", mask_width=mask.width, mask_height=mask.height,
                     mask_mpp=mask_mpp)
    else:
        if conditioning is None:
            raise FieldError(("conditioning",), "required without a mask")
        if params.width is None or params.height is None:
            raise FieldError(("width" if params.width is None else "height",), "required without a mask")
        width, height = params.width, params.height
        _check_size(width, height, card, settings)
        if isinstance(conditioning, SubtypeConditioning):
            name, idx = resolve_subtype(conditioning.subtype, card)
            if card.engine == "infinity-brush":
                _require_text_encoder(settings)
            extra = dict(conditioning="subtype", subtype=name, subtype_id=idx)
        else:
            extra = dict(conditioning="embedding", embedding=check_embedding(conditioning, card),
                         encoder=conditioning.encoder)
    seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
    return JobSpec(
        model=card.name, engine=card.engine, width=width, height=height, mpp=mpp, seed=seed, steps=steps,
        guidance=params.guidance if params.guidance is not None else (
            card.default_guidance if card.default_guidance is not None else DEFAULT_GUIDANCE),
        eta=params.eta if params.eta is not None else (1.0 if card.engine == "diffinfinite" else 0.0),
        sampler=params.sampler, decoder=params.decoder, decode_context=params.decode_context,
        **decode_geometry(params), outputs=list(dict.fromkeys(params.outputs)),
        compression=params.compression, quality=params.quality, zarr_version=params.zarr_version, **extra,
    )
