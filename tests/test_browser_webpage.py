"""The web page at ``/``: in Debian's Chromium (Playwright), against ``slidesynth serve`` in the embedded mode (a
real uvicorn server and a real worker) with API keys, on the shipped demo model.

One browser session does what a user does: enters the key, picks the model, uploads a mask (its preview is
coloured by the model's classes), sees a 422 next to the field it names, submits, follows the job to
``succeeded``, views the slide in OpenSeadragon (not blank, tissue colours, a µm scale bar), toggles the mask
overlay and downloads the TIFF. The page's OpenSeadragon comes from npm (`make web`); when it is missing the
tests fail, saying so.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import REPO, free_port, png_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "key-web"


def _require_assets() -> None:
    from service.web import INSTALL_HINT, openseadragon_installed

    if not openseadragon_installed():
        pytest.fail(f"service/web/node_modules is missing: run `make test` (it runs `make web`). {INSTALL_HINT}")


def test_page_and_its_assets_are_served(embedded_settings):
    from service.app import create_app

    _require_assets()
    app = create_app(embedded_settings.model_copy(update={"api_keys": f"web:{KEY}"}))
    with TestClient(app) as client:
        page = client.get("/")  # open: the page itself holds nothing of anyone's
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp  # nothing from a CDN can load
        scripts = re.findall(r'<script[^>]*src="([^"]+)"', page.text)
        assert scripts == ["web/openseadragon/openseadragon.min.js", "web/app.js"]
        assert "assets-missing" not in page.text
        for path in scripts + ["web/png.js", "web/events.js", "web/style.css", "web/openseadragon/images/home_rest.png"]:
            asset = client.get("/" + path)
            assert asset.status_code == 200, path
        assert "javascript" in client.get("/web/app.js").headers["content-type"]
        assert client.get("/web/nothing.js").status_code == 404
        assert client.get("/web/openseadragon/../../__init__.py").status_code == 404
        schema = client.get("/openapi.json").json()
        assert "/" not in schema["paths"] and not any(p.startswith("/web") for p in schema["paths"])


def test_page_without_openseadragon_says_how_to_install(embedded_settings, tmp_path, monkeypatch):
    from service.app import create_app
    from service.routes import web

    monkeypatch.setattr(web, "OPENSEADRAGON_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(web, "openseadragon_installed", lambda: False)
    with TestClient(create_app(embedded_settings)) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert 'id="assets-missing"' in page.text and "make web" in page.text and "npm ci" in page.text
        script = client.get("/web/openseadragon/openseadragon.min.js")
        assert script.status_code == 404 and "make web" in script.json()["detail"]
        assert client.get("/web/app.js").status_code == 200  # the page's own files are there


# ---------------------------------------------------------------------------------------------- in Chromium

@pytest.fixture
def served(tmp_path):
    """`slidesynth serve` (uvicorn + the embedded worker) on a free port, with an API key and the shipped models."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(SLIDESYNTH_DATA_DIR=str(tmp_path / "data"), SLIDESYNTH_MODELS_DIR=str(REPO / "weights"),
               SLIDESYNTH_DEVICE="cpu", SLIDESYNTH_API_KEYS=f"web:{KEY}", SLIDESYNTH_TORCH_THREADS="1",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port = free_port()
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "slidesynth.cli", "serve", "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield base, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _image(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)


def _centre(img: np.ndarray, frac: float = 0.3) -> np.ndarray:
    h, w = img.shape[:2]
    dh, dw = int(h * frac / 2), int(w * frac / 2)
    return img[h // 2 - dh:h // 2 + dh, w // 2 - dw:w // 2 + dw]


# answers the page expects and handles: 401 before the key is entered, 422 of the bad request, 404 from a service
# without the job event stream (the page then polls)
EXPECTED_FAILURES = re.compile(r"Failed to load resource: the server responded with a status of (401|404|422)")

WATCH_STATUSES = """() => {
  window.seenStatuses = [];
  const record = () => document.querySelectorAll("#jobs tbody tr").forEach((row) => {
    const text = row.querySelector(".status").textContent, last = window.seenStatuses.at(-1);
    if (text && text !== last) window.seenStatuses.push(text);
  });
  new MutationObserver(record).observe(document.querySelector("#jobs"), {subtree: true, childList: true,
                                                                          characterData: true});
}"""


@pytest.mark.slow
def test_web_page_generates_follows_views_and_downloads_a_slide(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    _require_assets()
    assert CHROMIUM, "Debian's chromium is missing: run `make test` (it installs it)"
    base, log_path = served
    labels = np.full((128, 128), 3, np.uint8)  # tumour stroma with a carcinoma half
    labels[:, :64] = 1
    mask_png = png_bytes(labels)
    problems: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000}, accept_downloads=True)
            page.set_default_timeout(30_000)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(f"console: {msg.text}")
                    if msg.type == "error" and not EXPECTED_FAILURES.match(msg.text) else None)
            page.goto(f"{base}/")
            expect(page.locator("body")).to_have_attribute("data-ready", "models")

            # without the key, the jobs list says the key is needed, next to the key field
            expect(page.locator("#api-key-error")).to_contain_text("X-API-Key")
            page.fill("#api-key", KEY)
            page.click("#api-key-use")
            expect(page.locator("#api-key-error")).to_be_empty()
            assert page.evaluate("localStorage.getItem('slidesynth.apiKey')") == KEY
            page.select_option("#model", "diffinfinite-demo")

            # the preview: the mask's class ids in the model's class colours (the legend's swatches)
            page.set_input_files("#mask", files=[{"name": "mask.png", "mimeType": "image/png", "buffer": mask_png}])
            expect(page.locator("#mask-preview")).to_be_visible()
            preview = page.evaluate("""() => {
              const c = document.getElementById("mask-preview"), ctx = c.getContext("2d");
              const at = (x, y) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3));
              const swatch = (id) => [...document.querySelectorAll("#class-legend li")]
                .find((li) => li.textContent.startsWith(id + " ")).querySelector(".swatch").style.background;
              return {size: [c.width, c.height], left: at(10, 64), right: at(100, 64), one: swatch(1),
                      three: swatch(3), classes: c.dataset.classes};
            }""")
            assert preview["size"] == [128, 128] and preview["classes"] == "1,3"
            assert preview["one"] == "rgb({}, {}, {})".format(*preview["left"]), preview
            assert preview["three"] == "rgb({}, {}, {})".format(*preview["right"]), preview
            assert preview["left"] != preview["right"]

            # a 422 shows next to the field its loc names
            page.fill("#steps", "0")
            page.click("#submit")
            expect(page.locator("#steps-error")).to_contain_text("greater than or equal to 1")
            expect(page.locator("#steps")).to_have_attribute("aria-invalid", "true")
            assert page.locator("#jobs tbody tr").count() == 0

            # a small slide: 128 px of mask at 1 µm/px → 256 × 256 px at 0.5 µm/px, few steps
            page.fill("#width", "256")
            page.locator("#width").dispatch_event("change")
            expect(page.locator("#height")).to_have_value("256")
            assert page.input_value("#mask-mpp") == "1"
            page.fill("#steps", "4")
            page.fill("#seed", "7")
            page.evaluate(WATCH_STATUSES)
            page.click("#submit")
            expect(page.locator("#steps-error")).to_be_empty()
            expect(page.locator("#form-status")).to_contain_text("queued")
            job_id = page.locator("#form-status").get_attribute("data-job")
            row = page.locator(f"#jobs tbody tr[data-job='{job_id}']")
            expect(row).to_have_attribute("data-status", "succeeded", timeout=240_000)
            seen = page.evaluate("window.seenStatuses")
            assert seen and not seen[0].startswith("succeeded"), seen  # followed live, not found finished
            running = [s for s in seen if s.startswith("running")]
            assert all(re.search(r"\d+ %", s) for s in running), seen
            assert row.locator("progress").evaluate("p => p.value") == 1
            expect(row.locator(".size")).to_contain_text("256 × 256 px, 0.5 µm/px, seed 7, 4 steps")

            # the viewer: the slide, not blank, in H&E-like colours
            row.locator("button.view").click()
            viewer = page.locator("#viewer")
            expect(viewer).to_have_attribute("data-state", "loaded", timeout=60_000)
            expect(viewer).to_have_attribute("data-mask", "hidden", timeout=30_000)
            page.wait_for_timeout(500)
            plain = _image(viewer.screenshot())
            centre = _centre(plain)
            mean = centre.reshape(-1, 3).mean(axis=0)
            assert centre.std(axis=(0, 1)).max() > 8, f"the slide looks blank: mean {mean}"
            assert mean.min() > 60, f"the slide looks dark, not tissue: mean {mean}"
            assert mean[1] < mean[0] and mean[1] < mean[2], f"not H&E-like (green should be lowest): {mean}"

            # the scale bar, in µm or mm
            label = page.locator("#scale-bar .label").text_content()
            assert re.fullmatch(r"\d+(\.\d+)? (µm|mm)", label), label
            width = page.locator("#scale-bar .bar").evaluate("e => e.getBoundingClientRect().width")
            assert 10 < width <= 151, width

            # the mask overlay changes the pixels; off again, they are back
            page.check("#mask-toggle")
            expect(viewer).to_have_attribute("data-mask", "shown")
            page.wait_for_timeout(300)
            overlaid = _image(viewer.screenshot())
            assert np.abs(_centre(overlaid) - centre).mean() > 10
            page.uncheck("#mask-toggle")
            expect(viewer).to_have_attribute("data-mask", "hidden")
            page.wait_for_timeout(300)
            assert np.abs(_centre(_image(viewer.screenshot())) - centre).mean() < 3

            # downloads send the key (fetch + blob URL): the TIFF arrives
            kinds = page.locator("#downloads a").evaluate_all("links => links.map((a) => a.dataset.kind)")
            assert {"slide", "thumbnail", "mask"} <= set(kinds), kinds
            with page.expect_download() as info:
                page.click("#downloads a[data-kind=slide]")
            download = info.value
            head = open(download.path(), "rb").read(4)
            assert head in (b"II*\x00", b"II+\x00"), head
            assert download.suggested_filename.endswith(".tiff")
        finally:
            browser.close()
    assert not problems, problems + [log_path.read_text()[-2000:]]


@pytest.fixture
def events_server(embedded_settings):
    """The app under uvicorn with an API key and, where the service has none yet, a stand-in for
    ``GET /jobs/{id}/events`` that follows its contract: ``event: job``, ``id: <seq>``, ``data: <GET /jobs/{id}>``
    for each change, ending after a terminal status (with a comment line, which readers must skip)."""
    import asyncio
    import threading

    import uvicorn
    from fastapi import Depends
    from fastapi.responses import StreamingResponse

    from service.app import create_app
    from service.deps import get_services, get_tenant
    from service.views import job_view

    app = create_app(embedded_settings.model_copy(update={"api_keys": f"web:{KEY}"}))
    if not any(getattr(r, "path", "") == "/jobs/{job_id}/events" for r in app.routes):
        def events(job_id: str, tenant: str = Depends(get_tenant), services=Depends(get_services)):
            async def stream():
                seq, last = 0, None
                yield ": the stand-in's event stream\n\n"
                while True:
                    job = services.store.get(job_id)
                    view = job_view(job).model_dump_json()
                    if view != last:
                        seq, last = seq + 1, view
                        yield f"event: job\nid: {seq}\ndata: {view}\n\n"
                        if job.status.terminal:
                            return
                    await asyncio.sleep(0.1)
            return StreamingResponse(stream(), media_type="text/event-stream")

        app.add_api_route("/jobs/{job_id}/events", events, methods=["GET"])
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


def test_web_page_follows_a_job_through_its_event_stream(events_server):
    """With ``GET /jobs/{id}/events`` the page reads the stream (fetch, with the key) and does not poll."""
    from playwright.sync_api import expect, sync_playwright

    from core.jobs import JobStatus
    from models.engine import Stage
    from tests.conftest import make_mask

    _require_assets()
    assert CHROMIUM, "Debian's chromium is missing: run `make test` (it installs it)"
    app, base = events_server
    store = app.state.services.store
    with TestClient(app) as client:  # queued; no worker runs in this test: the store is moved by hand
        resp = client.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(64, 64)), "image/png")},
                           data={"params": json.dumps({"steps": 3})}, headers={"X-API-Key": KEY})
        assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.add_init_script(f"localStorage.setItem('slidesynth.apiKey', '{KEY}')")  # a returning user
            page.goto(f"{base}/")
            row = page.locator(f"#jobs tbody tr[data-job='{job_id}']")
            expect(row).to_have_attribute("data-status", "queued")
            store.update(job_id, status=JobStatus.running, stage=Stage.sampling, progress=0.42, step=1,
                         eta_seconds=75.0)
            expect(row.locator(".status")).to_have_text("running · sampling 1/3 · 42 % · ETA 1 min 15 s")
            assert row.locator("progress").evaluate("p => p.value") == pytest.approx(0.42)
            store.update(job_id, status=JobStatus.failed, error="out of patience", finished_at=time.time())
            expect(row).to_have_attribute("data-status", "failed")
            expect(row.locator(".status")).to_have_text("failed · out of patience")
        finally:
            browser.close()
    assert any(url.endswith(f"/jobs/{job_id}/events") for url in requests), requests
    assert not any(url.endswith(f"/jobs/{job_id}") for url in requests), requests  # no polling


def _png(array: np.ndarray, mode: str, **save) -> bytes:
    """A PNG by Pillow: greyscale `L`, `1`, `I;16`, or palette `P` (ids are the indices; `bits=` 1, 2 or 4)."""
    from PIL import Image

    if mode == "P":
        image = Image.fromarray(array, mode="P")
        image.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 11) % 256)])
    elif mode == "1":
        image = Image.fromarray(array.astype(bool))
    else:
        image = Image.fromarray(array.astype(np.uint16) if mode == "I;16" else array)
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def _png_every_filter(array: np.ndarray) -> bytes:
    """A greyscale PNG (8 or 16 bit) whose row r uses scanline filter r mod 5 (Pillow picks its own filters)."""
    import struct
    import zlib

    depth = 16 if array.dtype == np.uint16 else 8
    bpp = depth // 8
    rows = array.astype(">u2").view(np.uint8) if depth == 16 else array
    rows = rows.reshape(array.shape[0], -1).astype(np.int64)
    out, prev = bytearray(), np.zeros(rows.shape[1], np.int64)
    for r, cur in enumerate(rows):
        a = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
        c = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        p = a + prev - c
        pa, pb, pc = np.abs(p - a), np.abs(p - prev), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, prev, c))
        kind = r % 5
        predicted = [0, a, prev, (a + prev) // 2, paeth][kind]
        out += bytes([kind]) + ((cur - predicted) % 256).astype(np.uint8).tobytes()
        prev = cur

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", array.shape[1], array.shape[0], depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(out))) + \
        chunk(b"IEND", b"")


def test_the_page_reads_class_ids_from_every_kind_of_label_png(events_server):
    """The page decodes masks itself (a browser's decoding gives a palette PNG's colours and 16 bits as 8): ids as
    the service reads them, for greyscale 1/8/16-bit and palette 2/4/8-bit PNGs, odd sizes, every scanline filter,
    and sampled down (nearest) for previews and overlays."""
    from playwright.sync_api import sync_playwright

    _require_assets()
    assert CHROMIUM, "Debian's chromium is missing: run `make test` (it installs it)"
    _, base = events_server
    rng = np.random.default_rng(3)
    smooth = (np.add.outer(np.arange(41), np.arange(67)) // 9).astype(np.uint8)  # gradients: Sub/Up/Avg/Paeth
    noisy = rng.integers(0, 6, (41, 67)).astype(np.uint8)
    cases = {
        "L 8-bit": (smooth % 6, "L", {}),
        "8-bit, every filter": (noisy * 40, None, {}),
        "16-bit, every filter": (smooth.astype(np.uint16) * 257 + noisy, None, {}),
        "L 8-bit noisy": (noisy, "L", {}),
        "1-bit": (noisy % 2, "1", {}),
        "16-bit": (smooth.astype(np.uint16) * 300, "I;16", {}),
        "palette 8-bit": (noisy, "P", {}),
        "palette 4-bit": (smooth % 16, "P", {"bits": 4}),
        "palette 2-bit": (noisy % 4, "P", {"bits": 2}),
    }
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(f"{base}/")
            decode = """async ([bytes, maxSide]) => {
              const {decodeLabelPng} = await import("./web/png.js");
              const d = await decodeLabelPng(new Uint8Array(bytes).buffer, maxSide);
              return {size: [d.width, d.height, d.outWidth, d.outHeight], ids: Array.from(d.ids),
                      counts: Object.fromEntries(d.counts)};
            }"""
            for name, (ids, mode, save) in cases.items():
                data = _png(ids, mode, **save) if mode else _png_every_filter(ids)
                got = page.evaluate(decode, [list(data), 1000])
                assert got["size"] == [67, 41, 67, 41], name
                np.testing.assert_array_equal(np.array(got["ids"]).reshape(41, 67), ids, err_msg=name)
                values, counts = np.unique(ids, return_counts=True)
                assert got["counts"] == {str(v): int(c) for v, c in zip(values, counts)}, name
            big = rng.integers(0, 6, (300, 500)).astype(np.uint8)
            got = page.evaluate(decode, [list(_png(big, "L")), 100])
            assert got["size"] == [500, 300, 100, 60]
            rows = np.minimum(299, ((np.arange(60) + 0.5) * 300 / 60).astype(int))
            cols = np.minimum(499, ((np.arange(100) + 0.5) * 500 / 100).astype(int))
            np.testing.assert_array_equal(np.array(got["ids"]).reshape(60, 100), big[np.ix_(rows, cols)])
            refused = page.evaluate("""async (bytes) => {
              const {decodeLabelPng} = await import("./web/png.js");
              try { await decodeLabelPng(new Uint8Array(bytes).buffer); return null; } catch (e) { return e.message; }
            }""", list(png_bytes(np.zeros((8, 8, 3), np.uint8))))
            assert refused == "must have one channel (class ids); this PNG has 3"
        finally:
            browser.close()


def test_a_subtype_request_goes_as_json_and_its_422_names_the_field(events_server):
    from playwright.sync_api import expect, sync_playwright

    _require_assets()
    assert CHROMIUM, "Debian's chromium is missing: run `make test` (it installs it)"
    _, base = events_server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.add_init_script(f"localStorage.setItem('slidesynth.apiKey', '{KEY}')")
            page.goto(f"{base}/")
            expect(page.locator("body")).to_have_attribute("data-ready", "models")
            page.select_option("#model", "diffinfinite-untrained")
            page.check("#cond-subtype")
            expect(page.locator("#mask-group")).to_be_hidden()
            assert page.locator("#subtype option").all_text_contents() == ["adenocarcinoma", "squamous cell carcinoma"]
            page.select_option("#subtype", "squamous cell carcinoma")
            page.fill("#width", "99999")
            page.fill("#height", "64")
            with page.expect_request(lambda r: r.url.endswith("/generate")) as sent:
                page.click("#submit")
            request = sent.value
            assert request.headers["content-type"] == "application/json"
            assert request.headers["x-api-key"] == KEY
            assert json.loads(request.post_data) == {"model": "diffinfinite-untrained", "width": 99999, "height": 64,
                                                     "conditioning": {"type": "subtype",
                                                                      "subtype": "squamous cell carcinoma"}}
            expect(page.locator("#width-error")).to_contain_text("over the maximum")
            expect(page.locator("#height-error")).to_be_empty()
            page.fill("#width", "64")
            page.click("#submit")
            expect(page.locator("#width-error")).to_be_empty()
            expect(page.locator("#jobs tbody tr").first.locator(".size")).to_contain_text("64 × 64 px")
        finally:
            browser.close()


def test_the_page_reads_server_sent_events_however_the_stream_is_cut(events_server):
    """The page's event-stream reader (fetch has no EventSource parser): CRLF, CR or LF line ends, comments, multi-line
    data, ids, an unfinished event at the end (dropped), and the same events whichever byte the chunks are cut at."""
    from playwright.sync_api import sync_playwright

    _require_assets()
    assert CHROMIUM, "Debian's chromium is missing: run `make test` (it installs it)"
    _, base = events_server
    text = (": hello\r\nevent: job\r\nid: 1\r\ndata: {\"a\": \"µm\"}\r\n\r\n"
            "event: job\nid: 2\ndata: line one\ndata: line two\n\n"
            "data:no space\rid\r\r"
            "event: job\nid: 3\ndata: unfinished")
    expected = [{"event": "job", "data": '{"a": "µm"}', "id": "1"},
                {"event": "job", "data": "line one\nline two", "id": "2"},
                {"event": "message", "data": "no space", "id": ""}]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(f"{base}/")
            results = page.evaluate("""async (text) => {
              const {readEvents} = await import("./web/events.js");
              const bytes = new TextEncoder().encode(text), out = [];
              for (let cut = 0; cut <= bytes.length; cut++) {
                const body = new ReadableStream({start(c) {
                  if (cut > 0) c.enqueue(bytes.slice(0, cut));
                  c.enqueue(bytes.slice(cut)); c.close(); }});
                const events = [];
                for await (const e of readEvents(body, new AbortController().signal)) events.push(e);
                out.push(events);
              }
              return out;
            }""", text)
        finally:
            browser.close()
    assert len(results) == len(text.encode()) + 1
    for cut, events in enumerate(results):
        assert events == expected, (cut, events)
