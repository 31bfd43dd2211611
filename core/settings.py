"""All settings, read from ``SLIDESYNTH_*`` environment variables through one pydantic-settings class."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.quotas import Quota, parse_limits

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = "diffinfinite-demo"  # the small models trained on procedural tissue, shipped in weights/
UNTRAINED_MODEL = "diffinfinite-untrained"
# ∞-Brush models trained on procedural tissue, shipped in weights/: the first present is the default for embeddings
# (the Bessel-prior one meets the 2 × 2 grid goal, the white one does not: README, "Noise priors")
DEMO_EMBEDDING_MODELS = ("infinity-brush-bessel-demo", "infinity-brush-demo")
UNTRAINED_EMBEDDING_MODEL = "infinity-brush-untrained"


def comma_items(value: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated setting."""
    return [item.strip() for item in value.split(",") if item.strip()]


def tenant_pairs(value: str, what: str = "value") -> list[tuple[str, str]]:
    """The ``tenant:<what>`` pairs of a comma-separated setting, stripped, in the order given; ValueError when an
    item lacks the tenant, the colon or the value."""
    pairs = []
    for item in comma_items(value):
        tenant, sep, rest = item.partition(":")
        tenant, rest = tenant.strip(), rest.strip()
        if not sep or not tenant or not rest:
            raise ValueError(f"must be comma-separated tenant:{what} pairs")
        pairs.append((tenant, rest))
    return pairs


class Settings(BaseSettings):
    """Every field maps to ``SLIDESYNTH_<FIELD NAME IN CAPITALS>``; the README lists them all."""

    model_config = SettingsConfigDict(env_prefix="SLIDESYNTH_", extra="ignore")

    broker_url: str | None = Field(
        None,
        description="Celery broker. Unset: embedded mode (filesystem transport under the data dir, "
        "file job store, `serve` also starts a worker). `redis://…`: Redis broker and Redis job store.",
    )
    redis_url: str | None = Field(
        None, description="Redis for job records; defaults to the broker URL when that is Redis."
    )
    data_dir: Path = Field(Path("data"), description="Where jobs, uploads and outputs live.")
    models_dir: Path = Field(REPO_ROOT / "weights", description="Model folders (weights + model_card.json).")
    default_model: str = Field(
        "",
        description="Model used when a request names none; default: `diffinfinite-demo` when that folder is "
        "in the models dir, else `diffinfinite-untrained`.",
    )
    default_embedding_model: str = Field(
        "",
        description="Model used when a request with an `embedding`, `embedding_grid` or `subtype` conditioning "
        "names none and the default model does not take that conditioning; default: the first of "
        "`infinity-brush-bessel-demo`, `infinity-brush-demo` whose folder is in the models dir, else "
        "`infinity-brush-untrained`.",
    )
    queue: str = Field(
        "gpu", description="Celery queue of normal-priority jobs; `high` ones go to `<queue>.high`, `low` ones to "
        "`<queue>.low`, and `slidesynth worker` consumes them high first.")
    embed_queue: str = Field(
        "", description="Celery queue of embedding requests (`POST /embed`); empty: `<queue>.embed`. Every "
        "`slidesynth worker` consumes it beside the job queue unless given `--queues`.")
    embed_timeout: float = Field(
        60.0, gt=0, le=3600,
        description="Seconds `POST /embed` waits for a worker's answer before a 503 (the request then expires "
        "unrun).")
    device: str = Field("auto", description="Worker torch device: auto, cpu, cuda, cuda:N.")
    batch_size: int | None = Field(
        None, ge=0,
        description="Patches per denoiser call in the DiffInfinite sampler. Unset or 0: chosen when the worker "
        "starts — 8 on CPU; on CUDA the largest power of two ≤ 256 whose projected memory use stays within 60 % "
        "of the free memory, measured with a trial forward of the default model's image network.")
    precision: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$",
                           description="Sampling precision: auto = bfloat16 on CUDA (float16 where the GPU has no "
                           "bfloat16), float32 on CPU.")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the networks: auto = on for CUDA (when Triton imports), off for CPU.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode when compiling.")
    fused_kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Fused Triton kernels: auto = on for CUDA when Triton imports; on needs both.")
    cudnn_benchmark: bool = Field(True, description="Let cuDNN pick the fastest convolution algorithms (CUDA).")
    torch_threads: int = Field(0, ge=0, description="CPU threads per worker process for torch (0: torch's default).")
    key_prefix: str = Field("slidesynth", description="Prefix of the service's own Redis keys.")

    max_width: int = Field(16384, ge=8, description="Largest output width in pixels.")
    max_height: int = Field(16384, ge=8, description="Largest output height in pixels.")
    max_mask_pixels: int = Field(64_000_000, ge=1, description="Largest mask (from its header) accepted.")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    max_tile_pixels: int = Field(16_777_216, ge=1, description="Largest tile for `POST /embed` (from its header).")
    max_embed_tiles: int = Field(64, ge=1, le=4096, description="Most tiles in one `POST /embed` request.")
    max_steps: int = Field(1000, ge=1, description="Largest number of sampling steps accepted.")
    api_keys: str = Field(
        "",
        description="Comma-separated `tenant:key` pairs. Empty: no authentication, every caller is `public`.",
    )

    cors_origins: str = Field(
        "",
        description="Comma-separated origins (e.g. `https://viewer.example.org`) whose pages may call the API "
        "from a browser — an OpenSeadragon viewer hosted elsewhere reading the Deep Zoom endpoints. "
        "Empty: no CORS headers; `*`: any origin.",
    )

    events_ping_seconds: float = Field(
        15.0, gt=0, le=300,
        description="Seconds between keep-alive comments (`: ping`) on a quiet `GET /jobs/{id}/events` stream, so "
        "proxies do not drop it.")
    webhook_secrets: str = Field(
        "",
        description="Comma-separated `tenant:whsec_…` pairs: each tenant's Standard Webhooks signing secret "
        "(`whsec_` + base64 of 24–64 random bytes; tenant `public` when there are no API keys). A tenant listed "
        "twice gets both signatures (rotation). A request with a `webhook` from a tenant without a secret is a 422.")
    webhook_allow_private: bool = Field(
        False,
        description="Let webhooks go to loopback, private, link-local and other non-public addresses (off: such a "
        "URL is a 422, and a host that resolves to one is refused at delivery).")
    webhook_timeout: float = Field(15.0, gt=0, le=120, description="Seconds one webhook delivery attempt may take.")
    webhook_max_attempts: int = Field(
        5, ge=1, le=20, description="Delivery attempts per webhook event (the first and its retries).")
    webhook_retry_seconds: float = Field(
        4.0, gt=0, le=3600,
        description="Wait before a webhook's first retry; it doubles for each next one (4, 8, 16, 32 s: five "
        "attempts within a minute), longer when the receiver sends Retry-After (up to 60 s).")

    task_time_limit: int = Field(24 * 3600, ge=60, description="Hard time limit of one job, seconds.")
    checkpoint_every: int = Field(10, ge=0, description="Save the sampler state every N steps (0: never).")
    lease_seconds: int = Field(
        900, ge=30,
        description="A running job whose progress has not moved for this long is taken as lost: a starting "
        "worker re-queues it, and DELETE cancels it at once.",
    )
    idempotency_hours: float = Field(
        24.0, gt=0, le=24 * 365,
        description="How long an `Idempotency-Key` of `POST /generate` is remembered after the job it made was "
        "created: within it, the same key and body answer that job, and the same key with another body a 409.")
    max_attempts: int = Field(3, ge=1, description="Runs of one job before it is failed (a run lost with its "
                              "worker counts; a duplicate delivery while a run is alive does not).")
    recovery_seconds: float = Field(
        60.0, gt=0, le=86400,
        description="How often a running worker looks for jobs left running by a process that is gone (a dead "
        "pid on its host, or no progress for the lease) and re-queues them, as it does when it starts: after a "
        "broker restart ends a task, its job resumes from the checkpoint instead of waiting for a worker restart.")
    worker_concurrency: int = Field(1, ge=1, description="Worker processes (one per GPU).")

    retention_hours: float = Field(
        168.0, ge=0,
        description="Hours after a job finished (succeeded, failed or canceled) that its files — slide, Zarr, "
        "thumbnail, masks, checkpoint — are removed and its status becomes `expired` (the record stays; its "
        "downloads answer 410). 0: files are kept forever.")
    record_retention_hours: float = Field(
        0.0, ge=0,
        description="Hours after a job finished that the record of an expired job is deleted too (then "
        "`GET /jobs/{id}` answers 404); 0: expired records stay. At least SLIDESYNTH_RETENTION_HOURS.")
    retention_sweep_seconds: float = Field(
        300.0, gt=0, le=86400,
        description="How often each worker looks for finished jobs past SLIDESYNTH_RETENTION_HOURS (and expired "
        "records past SLIDESYNTH_RECORD_RETENTION_HOURS) and removes them.")
    quota_running: str = Field(
        "0",
        description="Running jobs a tenant may have when it submits: with that many running, `POST /generate` "
        "answers 429. `N` for every tenant, and/or `tenant:N` pairs (comma-separated) for some; 0: unlimited.")
    quota_queued: str = Field(
        "0",
        description="Queued jobs a tenant may have: with that many waiting, `POST /generate` answers 429. `N` "
        "and/or `tenant:N` pairs; 0: unlimited.")
    quota_pixels_per_day: str = Field(
        "0",
        description="Output pixels (width × height) a tenant may submit in any 24 hours (a sliding window); a "
        "job that would go over answers 429 with Retry-After = seconds until enough is freed. Jobs canceled "
        "before they started do not count. `N` and/or `tenant:N` pairs; 0: unlimited.")

    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines of `slidesynth serve` and `slidesynth worker`: `text` (human-readable) or `json` "
        "(one object per line: time, level, logger, message, and `job_id` and `tenant` on every line logged "
        "while a job is handled). Credentials in URLs and the API keys are redacted in both.")
    metrics_dir: Path | None = Field(
        None,
        description="prometheus_client's multiprocess folder (PROMETHEUS_MULTIPROC_DIR) of one `slidesynth serve` "
        "or `slidesynth worker` and its processes; emptied when it starts. Unset: a private temporary folder, "
        "removed at exit. Never share one folder between two of them.")
    metrics_port: int = Field(
        9100, ge=0, le=65535,
        description="Port on which `slidesynth worker` serves its Prometheus metrics (`/metrics`, every pool "
        "process aggregated); 0: none. A worker started by `slidesynth serve` (embedded mode) serves none: the "
        "API's `/metrics` includes its figures.")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _auto_batch(cls, value):
        # an empty variable (``SLIDESYNTH_BATCH_SIZE=``) or ``auto`` reads as unset: chosen per device
        return None if isinstance(value, str) and value.strip().lower() in ("", "auto") else value

    @field_validator("compile", "fused_kernels", mode="before")
    @classmethod
    def _switch(cls, value):
        # accept the boolean spellings pydantic accepts for flags, so `=true`/`=0` mean on/off
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            lowered = value.strip().lower()
            return {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(lowered, lowered)
        return value

    @field_validator("data_dir", "models_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _default_model(self) -> "Settings":
        if not self.default_model:
            demo = self.models_dir / DEMO_MODEL / "model_card.json"
            self.default_model = DEMO_MODEL if demo.is_file() else UNTRAINED_MODEL
        if not self.default_embedding_model:
            shipped = [m for m in DEMO_EMBEDDING_MODELS if (self.models_dir / m / "model_card.json").is_file()]
            self.default_embedding_model = shipped[0] if shipped else UNTRAINED_EMBEDDING_MODEL
        return self

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: filesystem transport and file job store."""
        return not self.broker_url

    @property
    def embed_queue_name(self) -> str:
        """The queue embedding requests go to: the setting, else the job queue's name + ``.embed``."""
        return self.embed_queue or f"{self.queue}.embed"

    @property
    def job_store_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return self.broker_url
        return None

    @field_validator("api_keys")
    @classmethod
    def _key_pairs(cls, value: str) -> str:
        tenant_pairs(value, "key")
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _webhook_secrets(cls, value: str) -> str:
        from core.webhooks import decode_secret

        for _, secret in tenant_pairs(value, "whsec_…"):
            decode_secret(secret)  # a ValueError naming what is wrong
        return value

    @property
    def webhook_secret_map(self) -> dict[str, list[bytes]]:
        """Tenant → its signing keys (the secrets' decoded bytes), in the order given."""
        from core.webhooks import decode_secret

        out: dict[str, list[bytes]] = {}
        for tenant, secret in tenant_pairs(self.webhook_secrets):
            out.setdefault(tenant, []).append(decode_secret(secret))
        return out

    @field_validator("quota_running", "quota_queued", "quota_pixels_per_day", mode="before")
    @classmethod
    def _limits(cls, value) -> str:
        value = str(value)
        parse_limits(value)  # ValueError naming the bad item
        return value

    @model_validator(mode="after")
    def _record_retention(self) -> "Settings":
        if self.record_retention_hours and self.retention_hours and self.record_retention_hours < self.retention_hours:
            raise ValueError("SLIDESYNTH_RECORD_RETENTION_HOURS must be 0 or at least SLIDESYNTH_RETENTION_HOURS")
        return self

    def quota_for(self, tenant: str) -> Quota:
        """The tenant's limits: its own `tenant:N` where given, else the setting's `N` (0 = unlimited)."""
        limits = []
        for value in (self.quota_running, self.quota_queued, self.quota_pixels_per_day):
            default, overrides = parse_limits(value)
            limits.append(overrides.get(tenant, default))
        return Quota(*limits)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in comma_items(value):
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"origin {origin!r} must be '*' or start with http:// or https://")
        return value

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.rstrip("/") for origin in comma_items(self.cors_origins)]

    @property
    def tenants_by_key(self) -> dict[str, str]:
        return {key: tenant for tenant, key in tenant_pairs(self.api_keys)}


@lru_cache
def get_settings() -> Settings:
    return Settings()
