"""The real OpenSeadragon, in Debian's Chromium, views a job's slide through the Deep Zoom endpoints.

The viewer page is served from another origin than the API (CORS from ``SLIDESYNTH_CORS_ORIGINS``) and
sends ``X-API-Key`` with every request (``ajaxHeaders``), as a viewer hosted elsewhere would.
"""
from __future__ import annotations

import functools
import http.server
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import free_port, make_mask, png_bytes

BROWSER_DIR = Path(__file__).parent / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def static_origin():
    """tests/browser/ (the page and node_modules/openseadragon) over HTTP on its own port."""
    if not (BROWSER_DIR / "node_modules" / "openseadragon").is_dir():
        pytest.fail("tests/browser/node_modules is missing: run `make test` (it runs `npm ci` there)")
    port = free_port()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), functools.partial(_QuietHandler, directory=str(BROWSER_DIR)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def api_server(embedded_settings, static_origin):
    """The app under uvicorn (a real HTTP server) with API keys and CORS for the viewer's origin."""
    import uvicorn

    from service.app import create_app

    settings = embedded_settings.model_copy(update={"cors_origins": static_origin,
                                                    "api_keys": "viewer:key-viewer"})
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_openseadragon_in_chromium_shows_the_slide(api_server, static_origin):
    from core.jobs import JobStatus
    from tests.slide_helpers import he_like, write_slide_tiff

    assert CHROMIUM, "Debian's chromium is missing: run `make test` (it installs it)"
    app, api = api_server
    store = app.state.services.store
    with TestClient(app) as client:
        resp = client.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(64, 64)), "image/png")},
                           data={"params": "{}"}, headers={"X-API-Key": "key-viewer"})
        assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    width, height = 4100, 2300
    image = he_like(height, width, seed=41)
    write_slide_tiff(store.job_dir(job_id) / "slide.tiff", image)
    store.update(job_id, status=JobStatus.succeeded, outputs={"tiff": "slide.tiff"})

    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    url = f"{static_origin}/deepzoom.html?dzi={api}/jobs/{job_id}/slide.dzi&key=key-viewer"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 800, "height": 600})
            page.goto(url)
            try:
                page.wait_for_function("/^(loaded|failed)/.test(document.title)", timeout=60_000)
            except PlaywrightTimeout:
                pass  # the title says how far it got ("waiting N false": N tiles in, view not complete)
            title = page.title()
        finally:
            browser.close()
    m = re.fullmatch(r"loaded (\d+) (\d+) (\d+) (\d+)", title)
    assert m is not None, f"the viewer reported {title!r}"
    assert int(m.group(1)) >= 4  # the home view (whole slide, ~800 px wide) takes several 254-px tiles
    # the centre of the view is the centre of the slide: ~5 slide px per screen px at the home zoom
    shown = np.array([int(m.group(i)) for i in (2, 3, 4)], np.float64)
    cy, cx = height // 2, width // 2
    expected = image[cy - 50:cy + 50, cx - 50:cx + 50].reshape(-1, 3).mean(axis=0)
    assert np.abs(shown - expected).max() < 12, (shown, expected)
