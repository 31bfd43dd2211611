"""The web page at ``/``: its own files (``static/``) and OpenSeadragon from the npm registry.

OpenSeadragon is not vendored into the repository and never loaded from a CDN: ``package.json`` and
``package-lock.json`` here pin it, and ``make web`` (a prerequisite of ``make serve`` and ``make test``) runs
``npm ci`` into ``node_modules/`` (git-ignored). The GPU image does the same in a Node build stage.
"""
from __future__ import annotations

import json
from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent
STATIC_DIR = WEB_DIR / "static"  # index.html, app.js, png.js, style.css
OPENSEADRAGON_VERSION = json.loads((WEB_DIR / "package.json").read_text())["dependencies"]["openseadragon"]
OPENSEADRAGON_DIR = WEB_DIR / "node_modules" / "openseadragon" / "build" / "openseadragon"
OPENSEADRAGON_SCRIPT = OPENSEADRAGON_DIR / "openseadragon.min.js"
INSTALL_HINT = (f"OpenSeadragon {OPENSEADRAGON_VERSION}, the slide viewer of this page, is not installed: run "
                "`make web` in the repository (it runs `npm ci` in service/web/, which fetches it from the npm "
                "registry into service/web/node_modules/), then reload the page. Submitting jobs, progress and "
                "downloads work without it.")


def openseadragon_installed() -> bool:
    return OPENSEADRAGON_SCRIPT.is_file()
