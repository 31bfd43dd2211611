"""Request → job: the one preparation the API, the command line and the demo share.

Order: the model, then the mask's headers (size and format, before any pixel is decoded), the job spec (size,
conditioning, engine options, defaults), then the mask's pixels and classes. Every refusal is a
:class:`~service.validation.FieldError` naming the request field.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.jobs import JobSpec
from core.settings import Settings
from models.cards import ModelCard
from service.masks import MaskError, decode_mask, encode_png, inspect_mask
from service.schemas import EmbeddingConditioning, EmbeddingGridConditioning, GenerateParams, SubtypeConditioning
from service.validation import FieldError, build_spec, check_labels, resolve_model


@dataclass
class PreparedJob:
    spec: JobSpec
    card: ModelCard
    mask_png: bytes | None = None  # the accepted mask, canonical 8-bit PNG, to store as the job's mask.png


def prepare_job(params: GenerateParams, cards: dict[str, ModelCard], settings: Settings, *,
                conditioning: SubtypeConditioning | EmbeddingConditioning | EmbeddingGridConditioning | None = None,
                mask: bytes | None = None, tenant: str = "public") -> PreparedJob:
    """Validate a request (a mask file's bytes, or a conditioning) from ``tenant`` into a job spec; FieldError
    otherwise."""
    kind = "mask" if mask is not None else conditioning.type if conditioning is not None else None
    card = resolve_model(params.model, cards, settings, kind)
    if mask is None:
        return PreparedJob(build_spec(params, card, settings, conditioning=conditioning, tenant=tenant), card)
    if conditioning is not None:
        raise FieldError(("conditioning",), "give a mask or a conditioning, not both")
    try:
        info = inspect_mask(mask, settings.max_mask_pixels)
    except MaskError as exc:
        raise FieldError(("mask",), str(exc)) from exc
    spec = build_spec(params, card, settings, mask=info, tenant=tenant)
    try:
        labels = decode_mask(mask, info)
    except MaskError as exc:
        raise FieldError(("mask",), str(exc)) from exc
    check_labels(labels, card)
    return PreparedJob(spec, card, encode_png(labels))
