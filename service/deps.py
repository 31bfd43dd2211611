"""FastAPI dependencies: settings, job store, model registry, Celery producer, reply box, open slides, caller
identity."""
from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from celery import Celery
from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from core import logs
from models.registry import ModelRegistry
from service.deepzoom import DeepZoomSlides
from core.embedding import ReplyBox
from core.events import EventFeed, RenderedEvents
from core.idempotency import IdempotencyKeys
from core.jobs import JobStore
from core.settings import Settings
from core.webhooks import WebhookDispatcher

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="Needed when the service sets SLIDESYNTH_API_KEYS.")


@dataclass
class Services:
    settings: Settings
    store: JobStore
    registry: ModelRegistry
    celery: Celery
    replies: ReplyBox | None = None  # where workers answer embedding requests (core.embedding)
    idempotency: IdempotencyKeys | None = None  # Idempotency-Key → job of POST /generate (core.idempotency)
    slides: DeepZoomSlides = field(default_factory=DeepZoomSlides)  # open TIFFs behind the Deep Zoom routes
    events: EventFeed | None = None  # what GET /jobs/{id}/events follows (core.events)
    event_data: RenderedEvents | None = None  # each event's data, made once per process for all its streams
    webhooks: WebhookDispatcher | None = None  # `completed` webhooks of jobs the API itself cancels


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_tenant(key: str | None = Security(api_key_header), services: Services = Depends(get_services)) -> str:
    """The caller's tenant; ``public`` when the service has no API keys."""
    keys = services.settings.tenants_by_key
    if not keys:
        logs.set_context(tenant="public")
        return "public"
    if key:
        for known, tenant in keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                logs.set_context(tenant=tenant)  # on the request's log lines (its access line too)
                return tenant
    raise HTTPException(status_code=401, detail="missing or invalid X-API-Key", headers={"WWW-Authenticate": "APIKey"})
