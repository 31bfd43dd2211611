"""The README documents every setting, endpoint and CLI command the code has."""
from __future__ import annotations

import argparse

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_setting_is_documented():
    from core.settings import Settings

    missing = [f"SLIDESYNTH_{name.upper()}" for name in Settings.model_fields
               if f"SLIDESYNTH_{name.upper()}" not in README]
    assert not missing, f"README lacks settings: {missing}"


def _http_routes(routes):
    """Every (path, methods) route of the app, through FastAPI's included routers (which newer FastAPI keeps as
    nested objects, not flattened into app.routes) — static mounts have no methods and are skipped."""
    for route in routes:
        if getattr(route, "methods", None) and getattr(route, "path", None):
            yield route
        elif hasattr(route, "effective_candidates"):
            yield from _http_routes(route.effective_candidates())


def test_every_endpoint_is_documented():
    from service.app import create_app
    from core.settings import Settings

    app = create_app(Settings(data_dir="/tmp/slidesynth-readme-test"))
    routes = list(_http_routes(app.routes))
    paths = {route.path for route in routes}
    # the walk must see the API's routes, or this test checks nothing
    assert {"/generate", "/jobs/{job_id}", "/jobs/{job_id}/events", "/models", "/embed", "/"} <= paths, paths
    missing = []
    for route in routes:
        for method in route.methods - {"HEAD", "OPTIONS"}:
            if route.path.startswith(("/docs", "/redoc", "/openapi")):
                continue
            documented = route.path.replace("{job_id}", "{id}").replace("{path:path}", "{path}")
            if f"`{method} {documented}" not in README:
                missing.append(f"{method} {route.path}")
    assert not missing, f"README lacks endpoints: {missing}"


def test_every_cli_command_is_documented():
    from slidesynth.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, child in sub.choices.items():
        nested = [a for a in child._actions if isinstance(a, argparse._SubParsersAction)]
        names = [f"slidesynth {name} {n}" for n in nested[0].choices] if nested else [f"slidesynth {name}"]
        missing += [n for n in names if f"`{n}" not in README]
    assert not missing, f"README lacks commands: {missing}"
