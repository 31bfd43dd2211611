"""``GET /``: the web page (submit, follow, view and download jobs), and its static assets.

The page is static: everything it shows comes from the public API, called from the browser with the user's
``X-API-Key``. It is not part of the API contract (``include_in_schema=False``). Its files are
``service/web/static/`` at ``/web/``; OpenSeadragon, installed from the npm registry by ``make web``, is at
``/web/openseadragon/``. Without OpenSeadragon the page still answers, saying how to install it.
"""
from __future__ import annotations

import html
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from service.web import INSTALL_HINT, OPENSEADRAGON_DIR, STATIC_DIR, openseadragon_installed

router = APIRouter(include_in_schema=False)

# Only this origin's scripts, styles, API and the images the page makes itself (blob: downloads, data: masks):
# nothing can come from a CDN. OpenSeadragon sets inline styles on its elements.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer"}
NOTICE_SLOT = "<!-- assets notice -->"


@router.get("/", response_class=HTMLResponse)
def page() -> HTMLResponse:
    index = STATIC_DIR / "index.html"
    try:
        text = index.read_text(encoding="utf-8")
    except OSError:
        text = (f"<!doctype html><html lang=en><meta charset=utf-8><title>slidesynth</title><h1>slidesynth</h1>"
                f"<p role=alert>The page's files are missing from this installation ({html.escape(str(index))}); "
                f"the API works: see <a href=docs>/docs</a>.</p></html>")
        return HTMLResponse(text, status_code=200, headers=PAGE_HEADERS)
    if not openseadragon_installed():
        text = text.replace(NOTICE_SLOT, f'<p class="notice" role="alert" id="assets-missing">'
                                         f'{html.escape(INSTALL_HINT)}</p>')
    return HTMLResponse(text, headers=PAGE_HEADERS)


class Assets(StaticFiles):
    """Static files from a folder that may be missing (npm packages not installed yet): a 404 that says how to
    install them, instead of StaticFiles' 500 (RuntimeError) on its first request."""

    def __init__(self, directory: Path, missing: str):
        super().__init__(directory=directory, check_dir=False)
        self.missing = missing

    async def check_config(self) -> None:
        pass  # checked per request in get_response

    async def get_response(self, path: str, scope: Scope):
        if not Path(self.directory).is_dir():
            return JSONResponse({"detail": self.missing}, status_code=404)
        response = await super().get_response(path, scope)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response


def mounts() -> list[tuple[str, Assets, str]]:
    """(path, app, name) of the page's asset folders, the more specific first."""
    return [("/web/openseadragon", Assets(OPENSEADRAGON_DIR, INSTALL_HINT), "openseadragon"),
            ("/web", Assets(STATIC_DIR, "the page's files are missing from this installation"), "web")]
