"""One error shape for every 4xx: FastAPI's ``{"detail": [{"loc", "msg", "type"}]}`` for 422s."""
from __future__ import annotations

from fastapi import HTTPException
from pydantic import ValidationError

from models.engine import engines

from service.schemas import UNION_TAGS, ErrorDetail
from service.validation import FieldError


def problem(description: str, headers: dict[str, str] | None = None) -> dict:
    """An error response in the contract: ``{"detail": "…"}`` and its documented headers (name → description)."""
    response = {"model": ErrorDetail, "description": description}
    if headers:
        response["headers"] = {name: {"description": text, "schema": {"type": "integer" if name == "Retry-After"
                                                                      else "string"}}
                               for name, text in headers.items()}
    return response


RETRY_AFTER = {"Retry-After": "Seconds to wait before retrying"}
# every route that takes X-API-Key (service.deps.get_tenant)
UNAUTHORIZED = {401: problem("Missing or invalid X-API-Key (when the service sets SLIDESYNTH_API_KEYS)",
                             {"WWW-Authenticate": "`APIKey`"})}
STORE_UNAVAILABLE = {503: problem("Job store unavailable", RETRY_AFTER)}


def unprocessable(loc: tuple, msg: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"loc": ["body", *loc], "msg": msg, "type": "value_error"}])


def from_field_error(err: FieldError, prefix: tuple = ()) -> HTTPException:
    return unprocessable(prefix + tuple(err.loc), err.msg)


def json_path(loc: tuple) -> tuple:
    """pydantic's ``loc`` without the tag it inserts after a tagged union (``conditioning.subtype.subtype``
    → ``conditioning.subtype``): the field's path in the JSON the client sent."""
    if len(loc) > 2 and loc[1] in UNION_TAGS.get(loc[0], ()):
        return (loc[0], *loc[2:])
    return tuple(loc)


def from_validation_error(err: ValidationError, prefix: tuple = ()) -> HTTPException:
    detail = [
        {"loc": ["body", *prefix, *json_path(e["loc"])], "msg": _hint(e), "type": e["type"]}
        for e in err.errors(include_url=False, include_context=False, include_input=False)
    ]
    return HTTPException(status_code=422, detail=detail)


def _hint(error: dict) -> str:
    """The message, pointing an unknown top-level field that is an engine option at `options`."""
    if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
        takers = sorted(name for name, engine in engines().items() if error["loc"][0] in engine.options_model.model_fields)
        if takers:
            return f"{error['msg']}: an option of the {', '.join(takers)} engine; send it in `options`"
    return error["msg"]
