"""Request and response bodies of the HTTP API (pydantic models; the OpenAPI contract is built from them)."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field

from models.engine import engines


class _Strict(BaseModel):
    # unknown fields refused, and JSON types as the contract declares them: "256" or true for an integer is a
    # 422, not coerced (an integer is still a valid number)
    model_config = ConfigDict(extra="forbid", strict=True)


class SubtypeConditioning(_Strict):
    type: Literal["subtype"]
    subtype: str = Field(description="Cancer subtype, e.g. `LUAD`/`adenocarcinoma` or `LUSC`/`squamous cell carcinoma`.")


class EmbeddingConditioning(_Strict):
    type: Literal["embedding"]
    vector: list[float] = Field(max_length=65536, description="Image embedding (512 numbers for QuiltNet ViT-B/32).")
    encoder: str = Field("quilt-vit-b-32", description="Id of the encoder that produced the vector.")


MAX_GRID_SIDE = 64  # rows and columns of an embedding grid (a model may take fewer: GET /models, its engine)


class EmbeddingGridConditioning(_Strict):
    """Different regions of the slide like different tiles: the slide is cut into rows × cols equal cells and
    vectors[r·cols + c] describes cell (r, c), placed at its centre (the paper's spatial control)."""

    type: Literal["embedding_grid"]
    encoder: str = Field("quilt-vit-b-32", description="Id of the encoder that produced the vectors.")
    rows: int = Field(ge=1, le=MAX_GRID_SIDE, description="Cells from top to bottom.")
    cols: int = Field(ge=1, le=MAX_GRID_SIDE, description="Cells from left to right.")
    vectors: list[Annotated[list[float], Field(max_length=65536)]] = Field(
        max_length=MAX_GRID_SIDE ** 2,
        description="rows·cols image embeddings in row-major order (top row left to right, then the next), each "
                    "of the model's `embedding_dim`.")


CONDITIONING_KINDS = (SubtypeConditioning, EmbeddingConditioning, EmbeddingGridConditioning)
Conditioning = Annotated[Union[CONDITIONING_KINDS], Field(discriminator="type")]
# the tags pydantic puts into error locations after a tagged union: each kind's `type` literal
UNION_TAGS = {"conditioning": {get_args(kind.model_fields["type"].annotation)[0] for kind in CONDITIONING_KINDS}}


def _engine_options_schema() -> dict[str, Any]:
    """`options` in the contract: the options model of each registered engine (one is declared per engine, in
    its module; the request is validated against the one of the requested model's engine)."""
    kinds = []
    for name, engine in sorted(engines().items()):
        schema = engine.options_model.model_json_schema()
        schema["title"] = f"{name} options"
        kinds.append(schema)
    return {"oneOf": kinds, "title": "Engine options",
            "description": "Options of the requested model's engine (`engine` in `GET /models`): "
                           + "; ".join(f"`{name}`: {e.options_model.__name__}" for name, e in sorted(engines().items()))
                           + ". An option the engine does not take is a 422 naming it."}


class _EngineOptionsSchema:
    """Makes the `options` schema when a schema is generated (not when this module is imported), so it lists the
    engines registered then."""

    def __get_pydantic_json_schema__(self, core_schema, handler) -> dict[str, Any]:
        return _engine_options_schema()


EngineOptionsField = Annotated[dict[str, Any] | None, _EngineOptionsSchema()]


class GenerateParams(_Strict):
    """Parameters common to every request. With a mask, they travel as the `params` JSON part."""

    model: str | None = Field(None, description="Model id from `GET /models`; default: the service's default model.")
    width: int | None = Field(None, ge=8, description="Output width in pixels (not with a mask: taken from the mask).")
    height: int | None = Field(None, ge=8, description="Output height in pixels (not with a mask).")
    mpp: float | None = Field(None, ge=0.05, le=100, allow_inf_nan=False, description="Output µm per pixel; default: the model's native µm/px.")
    mask_mpp: float | None = Field(
        None, ge=0.05, le=100, allow_inf_nan=False, description="µm per pixel of the uploaded mask; default: its TIFF resolution tags, else `mpp`."
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Random seed; default: drawn and recorded in the job.")
    steps: int | None = Field(None, ge=1, description="Sampling steps; default: the model's default.")
    guidance: float | None = Field(
        None, ge=0, le=20, allow_inf_nan=False,
        description="Classifier-free guidance weight ω in (1+ω)·ε(c) − ω·ε(∅); default: the model card's, else 3.",
    )
    eta: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False,
        description="DDIM η (1 = stochastic, 0 = deterministic); default: the model card's `default_eta` "
        "(`GET /models`), else the engine's paper value (1 for DiffInfinite, 0 for ∞-Brush).",
    )
    options: EngineOptionsField = None
    outputs: list[Literal["tiff", "zarr"]] = Field(default_factory=lambda: ["tiff"], min_length=1)
    compression: Literal["jpeg", "deflate", "zstd"] = Field("jpeg", description="TIFF tile compression.")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality.")
    zarr_version: Literal["0.4", "0.5"] = Field("0.4", description="OME-NGFF version of the Zarr output.")
    priority: Literal["low", "normal", "high"] = Field(
        "normal", description="Which job queue the job waits in: workers take `high` jobs first, then `normal`, "
        "then `low` (a running job is never interrupted).")
    webhook: str | None = Field(
        None, max_length=2048,
        description="http(s) URL the job's events are POSTed to, signed per Standard Webhooks with the tenant's "
        "secret (SLIDESYNTH_WEBHOOK_SECRETS; a tenant without one is refused). No credentials in the URL; "
        "private, loopback and link-local addresses only with SLIDESYNTH_WEBHOOK_ALLOW_PRIVATE.")
    webhook_events: list[Literal["start", "progress", "completed"]] | None = Field(
        None, min_length=1, max_length=3,
        description="Which events to send: `start` (the job starts running), `progress` (at most one a second "
        "while it runs), `completed` (succeeded, failed or canceled). Default: `[\"completed\"]`. Only with "
        "`webhook`.")


class GenerateRequest(GenerateParams):
    """`application/json` body of `POST /generate`: conditioning without a mask."""

    # without a mask nothing gives the size: required here (optional in GenerateParams, where a mask may give it)
    width: int = Field(ge=8, description="Output width in pixels.")
    height: int = Field(ge=8, description="Output height in pixels.")
    conditioning: Conditioning


class MultipartGenerate(BaseModel):
    """`multipart/form-data` body of `POST /generate`: a label mask and its parameters."""

    mask: bytes = Field(
        json_schema_extra={"format": "binary"},
        description="PNG or TIFF, one channel; pixel value = class index of the model (0 = unknown).",
    )
    params: str = Field("{}", description="JSON object with the fields of GenerateParams.")


class JobLinks(BaseModel):
    self: str
    slide: str | None = None
    deepzoom: str | None = None
    thumbnail: str | None = None
    zarr: str | None = None
    mask: str | None = None


class JobWebhook(BaseModel):
    url: str
    events: list[Literal["start", "progress", "completed"]]
    deliveries: int = Field(description="Events delivered (answered 2xx).")
    failures: int = Field(description="Delivery attempts that failed (each retry counts).")
    last_error: str | None = Field(description="What the last failed attempt got, e.g. `job.completed: HTTP 500`.")


class JobCreated(BaseModel):
    id: str
    status: str = Field(description="`queued` for a new job; a replayed `Idempotency-Key` gets the job's status now.")
    status_url: str
    untrained: bool


class Job(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled", "expired"] = Field(
        description="`expired`: the job had finished (`error` says whether it failed) and its files were removed "
                    "after SLIDESYNTH_RETENTION_HOURS; its downloads answer 410.")
    priority: Literal["low", "normal", "high"] = Field(description="The queue the job waits (or waited) in.")
    stage: Literal["mask", "sampling", "decoding", "writing"] | None
    progress: float = Field(description="Fraction done, 0 to 1.")
    eta_seconds: float | None = Field(description="Estimated seconds left, once known.")
    created_at: str
    started_at: str | None
    finished_at: str | None
    expires_at: str | None = Field(
        description="When the finished job's files are removed (SLIDESYNTH_RETENTION_HOURS after `finished_at`; "
                    "the sweep runs every few minutes) or, once `expired`, when they were; null while the job is "
                    "queued or running, or when files are kept forever.")
    error: str | None
    model: str
    untrained: bool = Field(description="True when the model has random weights: the slide is not tissue.")
    cancel_requested: bool
    width: int
    height: int
    mpp: float
    seed: int
    steps: int
    step: int | None = Field(description="Sampling steps done.")
    metrics: dict[str, float]
    links: JobLinks
    webhook: JobWebhook | None = Field(description="The job's webhook and its delivery counts; null without one.")


class JobList(BaseModel):
    items: list[Job]
    total: int
    offset: int
    limit: int


class CoordinatorInfo(BaseModel):
    combiner: str = Field("dde", description="The patch combiner (`sampler`) this coordinator serves.")
    patch: int = Field(description="Window side it was trained for (latent px).")
    stride: int = Field(description="Window stride it was trained for (latent px).")
    parameters: int = Field(description="Trainable parameters.")
    blend: Literal["uniform", "mixture"] = Field(
        "uniform", description="Overlap weights its corrected windows are averaged with: `uniform` (the paper's; "
                               "untrained = MultiDiffusion) or `mixture` (Gaussian; untrained = Mixture of Diffusers).")
    base_model: str = Field(description="Base model it was trained against (its weights' sha256 matches).")
    evaluation: dict[str, Any] = Field(
        description="Held-out figures from its card: composite loss of averaging (with its blend, uncorrected) "
                    "vs the coordinator.")
    card: dict[str, Any] = Field(description="The coordinator's card (architecture, base, training recipe, hashes).")


class ModelInfo(BaseModel):
    name: str
    engine: str
    trained: bool
    description: str
    classes: dict[int, str]
    fidelity_classes: dict[int, int] = Field(
        default_factory=dict,
        description="Label id → fidelity-classifier class (0 glass, 1 carcinoma, 2 necrosis, 3 tumour stroma, "
                    "4 others) behind the `balanced_accuracy` metric; empty: labels 0–4 are those classes.")
    subtypes: dict[int, str]
    conditioning: list[str]
    native_mpp: float
    max_width: int
    max_height: int
    default_steps: int
    default_guidance: float
    default_eta: float = Field(description="DDIM η a request that names none gets (the card's, else the engine's).")
    options: dict[str, Any] = Field(description="JSON schema of the `options` this model's engine takes.")
    embedding_encoder: str | None
    embedding_dim: int | None
    training_data: str
    coordinators: list[CoordinatorInfo] = Field(
        default_factory=list, description="Trained DDE coordinators shipped with this model (`dde-coordinator/`).")


class ModelList(BaseModel):
    default: str = Field(description="The model a request that names none gets.")
    default_embedding: str = Field(
        description="The model a request that names none gets when the default model does not take its "
                    "conditioning (an `embedding` or `embedding_grid`): the default ∞-Brush model.")
    models: list[ModelInfo]


class EncoderInfo(BaseModel):
    id: str = Field(description="Encoder id for `POST /embed` (`encoder`) and for embedding conditioning.")
    kind: str = Field(description="Network family: `tile-cnn` (the project's) or `openclip-vit` (QuiltNet).")
    dim: int = Field(description="Length of an embedding.")
    input_size: int = Field(description="Side in px of the square the encoder sees: a tile's shorter side is "
                                        "resized to it, then the centred square is cut.")
    min_tile_side: int = Field(description="Smallest tile side accepted, px (tiles are not magnified).")
    mpp: float | None = Field(description="µm per pixel of its training tiles at input_size; null: mixed "
                                          "magnifications.")
    description: str
    objective: str = Field(description="How it was trained (the card's training objective or recipe).")
    prototypes: list[str] = Field(description="Classes with a shipped prototype (mean embedding).")
    metrics: dict[str, Any] = Field(description="Held-out figures from its card.")


class EncoderList(BaseModel):
    default: str | None = Field(description="Encoder `POST /embed` uses when the request names none; null when "
                                            "it is not installed.")
    encoders: list[EncoderInfo]


class EmbeddedTile(BaseModel):
    filename: str | None
    width: int
    height: int


class Embeddings(BaseModel):
    encoder: str
    dim: int
    input_size: int
    mpp: float | None
    embeddings: list[list[float]] = Field(description="One unit-length vector per tile, in the order sent.")
    tiles: list[EmbeddedTile] = Field(description="The tiles as received (before the resize to input_size).")


class MultipartEmbed(BaseModel):
    """`multipart/form-data` body of `POST /embed`."""

    tiles: list[bytes] = Field(
        json_schema_extra={"items": {"type": "string", "format": "binary"}},
        description="One or more PNG, JPEG or TIFF tiles (a `tiles` part each; RGB, RGBA or greyscale, 8 or 16 "
                    "bit). Each side must be ≥ the encoder's `min_tile_side`; at most SLIDESYNTH_MAX_TILE_PIXELS "
                    "pixels (judged from the header) and SLIDESYNTH_MAX_EMBED_TILES tiles.")
    encoder: str | None = Field(None, description="Encoder id from `GET /encoders`; default: `slidesynth-tile-v1`.")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    store: bool
    mode: Literal["embedded", "redis"]


class ErrorDetail(BaseModel):
    """Body of every 4xx and 5xx but a 422 (and a 416, which has none): what went wrong, in words."""

    detail: str


class FieldProblem(BaseModel):
    loc: list[str | int] = Field(description="Where: `body`, then the field path (e.g. `params`, `width`).")
    msg: str
    type: str


class ValidationErrors(BaseModel):
    """422 body: one entry per invalid field."""

    detail: list[FieldProblem]
