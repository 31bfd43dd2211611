"""Shared fixtures: a real Redis (the machine's, or a private redis-server), settings, masks."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests use tiny tensors: one torch thread is faster than two on a 2-core machine and avoids
    oversubscription when worker subprocesses run beside the test process."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The Redis at 127.0.0.1:6379 when it answers; otherwise a private redis-server on a free port."""
    url = os.environ.get("SLIDESYNTH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _redis_answers(url):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("no Redis answers at 127.0.0.1:6379 and redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.time() + 20
    while not _redis_answers(url):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"could not start a private redis-server on port {port}")
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def key_prefix() -> str:
    """A unique Redis key prefix and queue name per test, so runs never see each other's jobs."""
    return f"slidesynth-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def embedded_settings(tmp_path, monkeypatch):
    """Settings for the embedded mode (no broker server), isolated in a temp data dir."""
    from core.settings import Settings

    for key in list(os.environ):
        if key.startswith("SLIDESYNTH_"):
            monkeypatch.delenv(key)
    return Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "weights", device="cpu",
                    max_width=4096, max_height=4096, max_mask_pixels=1_000_000)


@pytest.fixture
def client(embedded_settings):
    """A TestClient of the app on the embedded settings (the API in process, file job store, no worker), with
    ``settings`` and ``store`` at hand. A test module may define its own ``client`` instead."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(embedded_settings)
    with TestClient(app) as c:
        c.settings = embedded_settings
        c.store = app.state.services.store
        yield c


def make_mask(height: int = 64, width: int = 64, classes=(0, 1, 2, 3, 4)) -> np.ndarray:
    """Vertical stripes of the given classes (uint8)."""
    labels = np.zeros((height, width), np.uint8)
    bands = np.array_split(np.arange(width), len(classes))
    for cls, cols in zip(classes, bands):
        labels[:, cols] = cls
    return labels


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


REPO = Path(__file__).resolve().parents[1]
