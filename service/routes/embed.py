"""``GET /encoders`` and ``POST /embed``: tile embeddings from the installed encoders.

The encoder runs in a worker (:mod:`core.embedding` says why and how): this process checks the request —
encoder id, tile count, each tile's header (format, pixel limit, the encoder's minimum side) — decodes and
resizes the tiles to the encoder's input size, sends them and waits for the vectors. Every refusal happens
before anything is sent, and nothing of the request is stored.
"""
from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.embedding import EmbedFailed, NoWorkerAnswer, request_embeddings
from models.encoders import DEFAULT_ENCODER, EncoderCard, installed_encoders
from models.encoders.preprocess import prepare_tile
from service.deps import Services, get_services, get_tenant
from service.errors import RETRY_AFTER, UNAUTHORIZED, problem, unprocessable
from service.schemas import EmbeddedTile, Embeddings, EncoderInfo, EncoderList, ValidationErrors
from service.tiles import TileError, read_tile

router = APIRouter()

REQUEST_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {"$ref": "#/components/schemas/MultipartEmbed"}}},
}
FIELDS = ("tiles", "encoder")


def _info(card: EncoderCard) -> EncoderInfo:
    objective = card.training.get("objective") or card.training.get("recipe") or ""
    protos = list((card.model_extra or {}).get("class_names", {}).values()) if card.prototypes else []
    return EncoderInfo(id=card.id, kind=card.kind, dim=card.dim, input_size=card.input_size,
                       min_tile_side=card.min_tile_side(), mpp=card.mpp, description=card.description,
                       objective=str(objective), prototypes=protos, metrics=card.metrics)


@router.get("/encoders", response_model=EncoderList, tags=["models"], summary="Installed tile encoders")
def list_encoders(services: Services = Depends(get_services)) -> EncoderList:
    cards = installed_encoders(services.settings.models_dir)  # card files only: no network is built
    return EncoderList(default=DEFAULT_ENCODER if DEFAULT_ENCODER in cards else None,
                       encoders=[_info(card) for card in cards.values()])


def _read_tiles(uploads: list[tuple[str | None, bytes]], card: EncoderCard, max_pixels: int):
    """Check, decode and resize every tile (all refusals at once, each naming its part) → the tiles' sizes and
    uint8 (N, S, S, 3). One tile is decoded at a time and only its resized copy kept, so the API's memory is
    bounded by one tile of SLIDESYNTH_MAX_TILE_PIXELS, not by the number of tiles."""
    sizes, prepared, problems = [], [], []
    for i, (name, data) in enumerate(uploads):
        try:
            tile = read_tile(data, max_pixels, card.min_tile_side())
        except TileError as exc:
            label = f"tile {name!r}" if name else "tile"
            problems.append({"loc": ["body", "tiles", i], "msg": f"{label} {exc}", "type": "value_error"})
            continue
        sizes.append((tile.shape[1], tile.shape[0]))
        prepared.append(prepare_tile(tile, card.input_size, card.resize))
    if problems:
        raise HTTPException(422, detail=problems)
    return sizes, np.stack(prepared)


@router.post(
    "/embed", response_model=Embeddings, tags=["models"], summary="Embed image tiles with an encoder",
    description="`multipart/form-data`: one or more `tiles` parts (PNG, JPEG or TIFF) and an optional `encoder` "
    "field. Answers the unit-length embedding of each tile, in order, computed by a worker.",
    openapi_extra={"requestBody": REQUEST_BODY},
    responses={
        **UNAUTHORIZED,
        413: problem("Request body over SLIDESYNTH_MAX_UPLOAD_BYTES"),
        415: problem("Not multipart/form-data"),
        422: {"model": ValidationErrors, "description": "A field is invalid; `loc` names it (`tiles`, i for the "
                                                         "i-th tile, or `encoder`)"},
        500: problem("The worker could not embed the tiles (e.g. its weight file fails its hash check)"),
        503: problem("No worker answered within SLIDESYNTH_EMBED_TIMEOUT, or the queue is unavailable", RETRY_AFTER),
    },
)
async def embed(request: Request, tenant: str = Depends(get_tenant),
                services: Services = Depends(get_services)) -> Embeddings:
    settings = services.settings
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPException(415, detail="send multipart/form-data with `tiles` files and an optional `encoder`")
    try:
        form = await request.form(max_files=settings.max_embed_tiles, max_fields=len(FIELDS),
                                  max_part_size=1024)
    except StarletteHTTPException as exc:  # Starlette's multipart limits: a 422 naming the part, not a 400
        field = "tiles" if "files" in str(exc.detail) else "encoder"
        raise unprocessable((field,), f"multipart body refused: {exc.detail} (at most "
                                      f"{settings.max_embed_tiles} tiles and one encoder field)") from None
    unknown = sorted({key for key in form.keys() if key not in FIELDS})
    if unknown:
        raise unprocessable((unknown[0],), f"unknown part; send {' and '.join(FIELDS)}")
    encoder_id = form.get("encoder")
    if isinstance(encoder_id, UploadFile):
        raise unprocessable(("encoder",), "must be a text field, not a file")
    encoder_id = (encoder_id or DEFAULT_ENCODER).strip()
    cards = await run_in_threadpool(installed_encoders, settings.models_dir)
    if encoder_id not in cards:
        have = ", ".join(cards) if cards else f"none (put encoder folders under {settings.models_dir}/encoders/)"
        raise unprocessable(("encoder",), f"unknown encoder {encoder_id!r}; installed: {have}")
    card = cards[encoder_id]
    parts = form.getlist("tiles")
    if not parts:
        raise unprocessable(("tiles",), "send one or more image files as `tiles` parts")
    uploads = []
    for i, part in enumerate(parts):
        if not isinstance(part, UploadFile):
            raise unprocessable(("tiles", i), "must be a file part (PNG, JPEG or TIFF), not a text field")
        uploads.append((part.filename, await part.read()))
    sizes, prepared = await run_in_threadpool(_read_tiles, uploads, card, settings.max_tile_pixels)
    try:
        vectors = await run_in_threadpool(request_embeddings, services.celery, services.replies, settings,
                                          encoder_id, prepared)
    except NoWorkerAnswer as exc:
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": "30"}) from None
    except EmbedFailed as exc:
        if exc.field:
            raise unprocessable((exc.field,), str(exc)) from None
        raise HTTPException(500, detail=f"the worker could not embed the tiles: {exc}") from None
    except Exception as exc:  # broker down
        raise HTTPException(503, detail=f"embedding queue unavailable: {exc}", headers={"Retry-After": "30"}) from None
    if vectors.shape != (len(sizes), card.dim):
        raise HTTPException(500, detail=f"the worker answered {vectors.shape} embeddings for {len(sizes)} tiles "
                                        f"of dimension {card.dim}")
    return Embeddings(encoder=encoder_id, dim=card.dim, input_size=card.input_size, mpp=card.mpp,
                      embeddings=vectors.tolist(),
                      tiles=[EmbeddedTile(filename=name, width=w, height=h) for (name, _), (w, h) in zip(uploads, sizes)])
