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


def _operations(spec):
    return [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]


def test_error_answers_are_documented_with_their_body():
    """Every error an operation answers is in the contract with its body: 422 the field list, 416 nothing,
    /healthz's 503 the health, the others `{"detail": "…"}` (ErrorDetail); every secured operation documents its
    401 (schemathesis found the 401s of the job routes undocumented)."""
    spec = yaml.safe_load((REPO / "openapi.yaml").read_text())
    expected = {"422": ("#/components/schemas/ValidationErrors", "#/components/schemas/HTTPValidationError")}
    for path, method, op in _operations(spec):
        for status, response in op["responses"].items():
            if int(status) < 400 or status == "416" or (path, status) == ("/healthz", "503"):
                continue
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            assert schema.get("$ref") in expected.get(status, ("#/components/schemas/ErrorDetail",)), \
                (method, path, status)
        if op.get("security"):
            assert "401" in op["responses"] and "WWW-Authenticate" in op["responses"]["401"]["headers"], (method, path)


def test_links_from_a_submission_lead_to_the_jobs_operations():
    """POST /generate's 200 and 202 name the job's operations (OpenAPI links, which schemathesis's stateful tests
    follow) and its Location header; each link's operation exists and takes the parameters the link fills."""
    spec = yaml.safe_load((REPO / "openapi.yaml").read_text())
    by_id = {op["operationId"]: op for _, _, op in _operations(spec)}
    responses = spec["paths"]["/generate"]["post"]["responses"]
    for status in ("200", "202"):
        assert responses[status]["headers"]["Location"]["required"] is True
        links = responses[status]["links"]
        assert {"GetJob", "CancelOrDeleteJob", "DownloadSlide"} <= set(links)
        for name, link in links.items():
            target = by_id[link["operationId"]]
            names = {p["name"] for p in target["parameters"] if p["in"] == "path"}
            assert set(link["parameters"]) == names == {"job_id"}, name
            assert link["parameters"]["job_id"] == "$response.body#/id"


def test_downloads_document_range():
    """The file downloads honour Range: the header, its 206 and 416 are in the contract."""
    spec = yaml.safe_load((REPO / "openapi.yaml").read_text())
    for path in ("/jobs/{job_id}/slide.tiff", "/jobs/{job_id}/thumbnail.png", "/jobs/{job_id}/mask.png",
                 "/jobs/{job_id}/slide.zarr/{path}"):
        op = spec["paths"][path]["get"]
        assert any(p["name"] == "Range" and p["in"] == "header" for p in op["parameters"]), path
        assert {"200", "206", "416"} <= set(op["responses"]), path


def test_the_options_schema_lists_the_engines_registered_when_it_is_made():
    """Made when a schema is generated, not when service.schemas is imported: an engine registered later (a plugin,
    or another test's) appears, and is gone once unregistered."""
    from models.engine import register_engine, unregister_engine
    from service.openapi import render
    from tests.test_engine_contract import ConstantEngine

    before = render()
    register_engine(ConstantEngine())
    try:
        assert "constant-colour options" in render()
    finally:
        unregister_engine("constant-colour")
    assert render() == before
