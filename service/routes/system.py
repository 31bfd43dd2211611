"""Models, health and metrics."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from core.metrics import render

from service.deps import Services, get_services
from service.schemas import CoordinatorInfo, Health, ModelInfo, ModelList
from models.engine import get_engine, steps_default
from service.validation import DEFAULT_GUIDANCE, usable_conditioning

router = APIRouter()


@router.get("/models", response_model=ModelList, tags=["models"], summary="Available models and their limits")
def list_models(services: Services = Depends(get_services)) -> ModelList:
    settings = services.settings
    infos = []
    for card in services.registry.cards().values():
        infos.append(ModelInfo(
            name=card.name, engine=card.engine, trained=card.trained, description=card.description,
            classes=card.classes, fidelity_classes=card.fidelity_classes, subtypes=card.subtypes,
            conditioning=usable_conditioning(card, settings),
            native_mpp=card.native_mpp, max_width=min(card.max_width, settings.max_width),
            max_height=min(card.max_height, settings.max_height), default_steps=steps_default(card),
            default_guidance=card.default_guidance if card.default_guidance is not None else DEFAULT_GUIDANCE,
            default_eta=card.default_eta if card.default_eta is not None else get_engine(card.engine).default_eta,
            embedding_encoder=card.embedding_encoder, embedding_dim=card.embedding_dim,
            training_data=card.training_data,
            options=get_engine(card.engine).options_model.model_json_schema(),
            coordinators=[_coordinator_info(c) for c in services.registry.coordinators(card.name)],
        ))
    return ModelList(default=settings.default_model, default_embedding=settings.default_embedding_model,
                     models=infos)


def _coordinator_info(card: dict) -> CoordinatorInfo:
    return CoordinatorInfo(patch=int(card["patch"]), stride=int(card["stride"]),
                           parameters=int(card.get("parameters", 0)), base_model=str(card["base"].get("model")),
                           blend=str((card.get("architecture") or {}).get("blend", "uniform")),
                           evaluation=dict(card.get("evaluation") or {}), card=card)


@router.get("/healthz", response_model=Health, tags=["system"], summary="Liveness and job-store reachability",
            responses={503: {"model": Health, "description": "The job store is unreachable (status degraded)"}})
def healthz(response: Response, services: Services = Depends(get_services)) -> Health:
    ok = services.store.ping()
    if not ok:
        response.status_code = 503
    return Health(status="ok" if ok else "degraded", store=ok,
                  mode="embedded" if services.settings.embedded else "redis")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition: every HTTP process's metrics of this server (core/metrics.py) and the job store's
    figures read now (jobs by status, queue lengths; each Redis read bounded to 1 s, so a Redis outage leaves
    /metrics answering)."""
    body, content_type = await run_in_threadpool(render, request.app.state.store_metrics)
    return Response(body, media_type=content_type)
