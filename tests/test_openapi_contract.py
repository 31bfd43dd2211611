"""openapi.yaml at the repository root is the contract: it must equal the app's schema."""
from __future__ import annotations

import yaml

from tests.conftest import REPO


def test_openapi_yaml_matches_app():
    from service.openapi import render

    current = yaml.safe_load(render())
    committed = yaml.safe_load((REPO / "openapi.yaml").read_text())
    assert committed == current, "openapi.yaml is stale: run `make openapi` and commit it"


def test_contract_covers_every_endpoint():
    spec = yaml.safe_load((REPO / "openapi.yaml").read_text())
    paths = spec["paths"]
    for path, method in [("/generate", "post"), ("/jobs/{job_id}", "get"), ("/jobs/{job_id}", "delete"),
                         ("/jobs", "get"), ("/jobs/{job_id}/slide.tiff", "get"),
                         ("/jobs/{job_id}/thumbnail.png", "get"), ("/models", "get"), ("/healthz", "get")]:
        assert method in paths[path], (path, method)
    body = paths["/generate"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
