"""Turn a request (parameters, conditioning, optional mask) into a validated :class:`JobSpec`.

Every refusal is a :class:`FieldError` naming the request field, so the API answers 422 with a
``loc`` the client can act on, and the CLI prints the same message.
"""
from __future__ import annotations

import math
import secrets

import numpy as np

from pydantic import ValidationError

from core.jobs import EmbeddingGrid, JobSpec
from core.settings import Settings
from core.webhooks import DEFAULT_EVENTS, check_url
from models.cards import ModelCard
from models.engine import EngineOptions, OptionError, get_engine, steps_default
from service.masks import MaskInfo
from service.schemas import EmbeddingConditioning, EmbeddingGridConditioning, GenerateParams, SubtypeConditioning

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


def resolve_model(name: str | None, cards: dict[str, ModelCard], settings: Settings,
                  conditioning: str | None = None) -> ModelCard:
    """The named model, else the default one for the request's conditioning type (``mask``, ``embedding``, …):
    the default model when it takes that type, else the default embedding model."""
    if not name:
        name = settings.default_model
        card = cards.get(name)
        if conditioning is not None and (card is None or conditioning not in card.conditioning):
            name = settings.default_embedding_model
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


def usable_conditioning(card: ModelCard, settings: Settings) -> list[str]:
    """The conditioning kinds this deployment can serve for ``card`` (what ``GET /models`` lists)."""
    engine = get_engine(card.engine)
    return [c for c in card.conditioning if engine.serves(card, c, settings.models_dir) is None]


def _require_served(card: ModelCard, kind: str, settings: Settings) -> None:
    why = get_engine(card.engine).serves(card, kind, settings.models_dir)
    if why is not None:
        raise FieldError(("mask",) if kind == "mask" else ("conditioning", "type"), why)


def _check_encoder(encoder: str, card: ModelCard, kind: str) -> None:
    if kind not in card.conditioning:
        raise FieldError(("conditioning", "type"), f"model {card.name} does not take {kind} conditioning")
    if card.embedding_encoder and encoder != card.embedding_encoder:
        raise FieldError(
            ("conditioning", "encoder"),
            f"{card.name} expects embeddings from {card.embedding_encoder!r} "
            f"({card.embedding_dim} numbers), not {encoder!r}",
        )


def _check_vector(vector: list[float], card: ModelCard, loc: tuple[str | int, ...]) -> list[float]:
    if card.embedding_dim and len(vector) != card.embedding_dim:
        raise FieldError(
            loc, f"{card.name} expects {card.embedding_dim} numbers from {card.embedding_encoder!r}, got {len(vector)}",
        )
    if not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in vector):
        raise FieldError(loc, "contains non-finite values (NaN or infinity) or values "
                         f"beyond float32 (|v| > {FLOAT32_MAX:.4g})")
    if float(np.linalg.norm(np.asarray(vector, np.float32))) < 1e-8:  # as the engine measures it
        raise FieldError(loc, "is a zero vector: it has no direction to condition on")
    return list(map(float, vector))


def check_embedding(cond: EmbeddingConditioning, card: ModelCard) -> list[float]:
    _check_encoder(cond.encoder, card, "embedding")
    return _check_vector(cond.vector, card, ("conditioning", "vector"))


def check_embedding_grid(cond: EmbeddingGridConditioning, card: ModelCard) -> EmbeddingGrid:
    """The grid's shape against the model's limit, then each vector as :func:`check_embedding` checks one
    (the first bad one named by its index, ``conditioning.vectors.<i>``)."""
    _check_encoder(cond.encoder, card, "embedding_grid")
    limit = get_engine(card.engine).max_embedding_grid(card)
    for name in ("rows", "cols"):
        if limit is not None and getattr(cond, name) > limit:
            raise FieldError(("conditioning", name), f"{getattr(cond, name)} is over the maximum of {limit} "
                                                     f"for {card.name}")
    cells = cond.rows * cond.cols
    if len(cond.vectors) != cells:
        raise FieldError(("conditioning", "vectors"), f"{cond.rows} rows × {cond.cols} cols need {cells} vectors "
                                                      f"(row-major), got {len(cond.vectors)}")
    vectors = [_check_vector(v, card, ("conditioning", "vectors", i)) for i, v in enumerate(cond.vectors)]
    return EmbeddingGrid.from_vectors(cond.rows, cond.cols, vectors)


def check_labels(labels: np.ndarray, card: ModelCard) -> None:
    present = {int(v) for v in np.unique(labels)}
    unknown = sorted(present - {int(k) for k in card.classes})
    if unknown:
        names = ", ".join(f"{k}={v}" for k, v in sorted(card.classes.items()))
        raise FieldError(("mask",), f"class values {unknown} are not classes of {card.name} ({names})")


def engine_options(params: GenerateParams, card: ModelCard) -> EngineOptions:
    """The request's ``options`` validated by the options model of the card's engine, defaults resolved."""
    engine = get_engine(card.engine)
    try:
        options = engine.options_model.model_validate(params.options or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        msg = (f"{engine.name} (the engine of {card.name}) takes no option {loc[-1]!r}; it takes: "
               f"{', '.join(engine.options_model.model_fields) or 'none'}" if err["type"] == "extra_forbidden"
               else err["msg"])
        raise FieldError(("options", *loc), msg) from None
    try:
        return options.resolved()
    except OptionError as exc:
        raise FieldError(("options", exc.field), exc.msg) from None


def check_webhook(params: GenerateParams, settings: Settings, tenant: str) -> dict:
    """``webhook`` and ``webhook_events`` of the spec: an http(s) URL without credentials (and, unless the setting
    allows them, not to a private or loopback address), events only with a URL, and a tenant with a secret."""
    if params.webhook is None:
        if params.webhook_events is not None:
            raise FieldError(("webhook_events",), "needs a `webhook` URL to send them to")
        return {}
    try:
        url = check_url(params.webhook, settings.webhook_allow_private)
    except ValueError as exc:
        raise FieldError(("webhook",), str(exc)) from None
    if tenant not in settings.webhook_secret_map:
        raise FieldError(("webhook",), f"this service has no webhook signing secret for tenant {tenant!r} "
                                       f"(SLIDESYNTH_WEBHOOK_SECRETS): it sends no unsigned webhooks")
    events = list(dict.fromkeys(params.webhook_events or DEFAULT_EVENTS))
    return dict(webhook=url, webhook_events=events)


def build_spec(
    params: GenerateParams,
    card: ModelCard,
    settings: Settings,
    *,
    conditioning: SubtypeConditioning | EmbeddingConditioning | EmbeddingGridConditioning | None = None,
    mask: MaskInfo | None = None,
    tenant: str = "public",
) -> JobSpec:
    """Validate everything but the mask's pixel values (see :func:`check_labels`)."""
    engine = get_engine(card.engine)
    webhook = check_webhook(params, settings, tenant)
    mpp = params.mpp or card.native_mpp
    options = engine_options(params, card)
    try:  # options that need something from the model's folder (e.g. the dde sampler's coordinator)
        engine.check_options(card, options, settings.models_dir)
    except OptionError as exc:
        raise FieldError(("options", exc.field), exc.msg) from None
    steps = params.steps or steps_default(card, options)
    if steps > settings.max_steps:
        raise FieldError(("steps",), f"{steps} is over the maximum of {settings.max_steps}")
    extra: dict = {}
    if mask is not None:
        _require_served(card, "mask", settings)
        mask_mpp = params.mask_mpp or mask.mpp or mpp
        scale = mask_mpp / mpp
        # exactly the size the mask implies: the slide and its mask align pixel for pixel
        width = max(8, int(round(mask.width * scale)))
        height = max(8, int(round(mask.height * scale)))
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
            _require_served(card, "subtype", settings)
            extra = dict(conditioning="subtype", subtype=name, subtype_id=idx)
        elif isinstance(conditioning, EmbeddingGridConditioning):
            extra = dict(conditioning="embedding_grid", embedding_grid=check_embedding_grid(conditioning, card),
                         encoder=conditioning.encoder)
        else:
            extra = dict(conditioning="embedding", embedding=check_embedding(conditioning, card),
                         encoder=conditioning.encoder)
    seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
    return JobSpec(
        model=card.name, engine=card.engine, width=width, height=height, mpp=mpp, seed=seed, steps=steps,
        guidance=params.guidance if params.guidance is not None else (
            card.default_guidance if card.default_guidance is not None else DEFAULT_GUIDANCE),
        eta=params.eta if params.eta is not None else (
            card.default_eta if card.default_eta is not None else engine.default_eta),
        options=options.model_dump(mode="json"), outputs=list(dict.fromkeys(params.outputs)),
        compression=params.compression, quality=params.quality, zarr_version=params.zarr_version, **extra,
        **webhook,
    )
