"""`POST /embed`, `GET /encoders` and `slidesynth embed`: header checks before decoding, every bad input a 4xx
naming its field with nothing stored or sent, 503 when no worker answers, and round trips through a real
Celery worker process (embedded filesystem transport, and Redis)."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import REPO, png_bytes

SHIPPED = REPO / "weights" / "encoders" / "slidesynth-tile-v1"


def procedural_tile(label: int, size: int = 96, seed: int = 5) -> np.ndarray:
    from procedural.tissue import render_tile

    return render_tile(np.full((size, size), label, np.uint8), seed)


def encode(array: np.ndarray, fmt: str) -> bytes:
    if fmt == "tiff":
        import tifffile

        buf = io.BytesIO()
        tifffile.imwrite(buf, array, photometric="rgb" if array.ndim == 3 else "minisblack")
        return buf.getvalue()
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width × height RGB pixels and holds almost no data (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_models_dir(root):
    shutil.copytree(SHIPPED, root / "encoders" / "slidesynth-tile-v1")
    return root


@pytest.fixture
def client(embedded_settings):
    from service.app import create_app

    settings = embedded_settings.model_copy(update=dict(embed_timeout=0.5, max_tile_pixels=512 * 512,
                                                        max_embed_tiles=3))
    make_models_dir(settings.models_dir)
    with TestClient(create_app(settings)) as c:
        c.settings = settings
        yield c


def assert_nothing_sent_or_stored(client):
    data = client.settings.data_dir
    queue = data / "broker" / "queue"
    assert not queue.exists() or not any(queue.iterdir()), "a request was sent to the workers"
    for sub in ("replies", "jobs"):
        assert not (data / sub).exists() or not any((data / sub).iterdir())


def post_tiles(client, tiles, encoder=None, field="tiles"):
    files = [(field, (name, data, "application/octet-stream")) for name, data in tiles]
    return client.post("/embed", files=files, data={"encoder": encoder} if encoder else None)


# ------------------------------------------------------------------------------------------ tile headers
def test_tile_headers_are_read_without_decoding():
    from service.tiles import TileError, decode_tile, inspect_tile, read_tile

    tile = procedural_tile(1, 80)
    for fmt in ("png", "jpeg", "tiff"):
        info = inspect_tile(encode(tile, fmt), 10**6)
        assert (info.format, info.width, info.height) == (fmt, 80, 80)
    assert np.array_equal(read_tile(encode(tile, "png"), 10**6, 64), tile)
    assert np.array_equal(read_tile(encode(tile, "tiff"), 10**6, 64), tile)
    grey16 = (np.arange(80 * 90, dtype=np.uint16).reshape(80, 90) * 9)
    rgb = read_tile(encode(grey16, "tiff"), 10**6, 64)
    assert rgb.shape == (80, 90, 3) and rgb.dtype == np.uint8 and rgb[-1, -1, 0] == round(int(grey16[-1, -1]) * 255 / 65535)
    rgba = np.dstack([tile, np.full(tile.shape[:2], 7, np.uint8)])
    assert np.array_equal(read_tile(png_bytes(rgba), 10**6, 64), tile)              # alpha dropped
    with pytest.raises(TileError, match="declares 100000×100000 = 10000000000 pixels"):
        inspect_tile(png_header_only(100_000, 100_000), 10**6)                     # refused before decoding
    with pytest.raises(TileError, match="not a PNG, JPEG or TIFF"):
        inspect_tile(b"GIF89a....", 10**6)
    with pytest.raises(TileError, match="needs each side ≥ 64 px"):
        read_tile(encode(tile[:50], "jpeg"), 10**6, 64)
    truncated = encode(tile, "png")[:60]
    with pytest.raises(TileError, match="not a readable PNG"):
        decode_tile(truncated, inspect_tile(truncated, 10**6))


# ------------------------------------------------------------------------------------------ the API, no worker
def test_encoders_are_listed_from_their_cards(client):
    body = client.get("/encoders").json()
    assert body["default"] == "slidesynth-tile-v1"
    (enc,) = body["encoders"]
    assert (enc["id"], enc["dim"], enc["input_size"], enc["min_tile_side"], enc["mpp"]) == \
        ("slidesynth-tile-v1", 128, 64, 64, 0.5)
    assert "carcinoma" in enc["prototypes"] and enc["metrics"]["nearest_prototype_accuracy"] >= 0.95
    assert "NT-Xent" in enc["objective"]


def png_with_big_text_chunk(pixels: np.ndarray) -> bytes:
    """A valid PNG with a 2 MB zTXt chunk (over Pillow's 1 MB limit for decompressed text: a ValueError)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (2 << 20), zip=True)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_bad_inputs_are_4xx_naming_the_field_and_nothing_is_sent(client):
    good = encode(procedural_tile(1), "png")
    cases = [
        (post_tiles(client, [("a.png", good), ("notes.txt", b"hello, not an image")]), ["body", "tiles", 1],
         "'notes.txt' is not a PNG, JPEG or TIFF image"),
        (post_tiles(client, [("bomb.png", png_header_only(20_000, 20_000))]), ["body", "tiles", 0],
         "declares 20000×20000 = 400000000 pixels, more than the limit of 262144"),
        (post_tiles(client, [("small.jpg", encode(procedural_tile(2, 48), "jpeg"))]), ["body", "tiles", 0],
         "is 48×48 px; this encoder needs each side ≥ 64 px"),
        (post_tiles(client, [("cut.png", good[:80])]), ["body", "tiles", 0], "'cut.png' is not a readable PNG"),
        (post_tiles(client, [("ztxt.png", png_with_big_text_chunk(procedural_tile(1)))]), ["body", "tiles", 0],
         "is not a PNG this service reads (Decompressed data too large"),
        (post_tiles(client, [("a.png", good)], encoder="dino-v9"), ["body", "encoder"],
         "unknown encoder 'dino-v9'; installed: slidesynth-tile-v1"),
        (post_tiles(client, [("a.png", good)] * 4), ["body", "tiles"], "at most 3 tiles"),
        (post_tiles(client, [("a.png", good)], field="tile"), ["body", "tile"], "unknown part"),
        (client.post("/embed", files={"encoder": (None, "slidesynth-tile-v1")}), ["body", "tiles"],
         "one or more image files"),
        (client.post("/embed", files={"tiles": (None, "abc")}), ["body", "tiles", 0], "must be a file part"),
    ]
    for resp, loc, msg in cases:
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"]
        assert detail[0]["loc"] == loc and msg in detail[0]["msg"], detail
    # every bad tile of a request is named at once
    resp = post_tiles(client, [("x.txt", b"x"), ("a.png", good), ("y.bin", b"\0" * 10)])
    assert [d["loc"] for d in resp.json()["detail"]] == [["body", "tiles", 0], ["body", "tiles", 2]]
    assert client.post("/embed", json={"tiles": []}).status_code == 415
    assert_nothing_sent_or_stored(client)


def test_no_worker_is_a_503_saying_so(client):
    resp = post_tiles(client, [("a.png", encode(procedural_tile(3), "png"))])
    assert resp.status_code == 503 and resp.headers["retry-after"] == "30"
    assert "no worker answered within 0.5 s on queue 'gpu.embed'" in resp.json()["detail"]
    assert not any((client.settings.data_dir / "replies").glob("*"))


def test_embed_needs_an_api_key_when_the_service_has_keys(embedded_settings):
    from service.app import create_app

    settings = embedded_settings.model_copy(update=dict(api_keys="lab:s3cret"))
    with TestClient(create_app(settings)) as c:
        assert c.post("/embed", files=[("tiles", ("a.png", b"x"))]).status_code == 401
        assert c.get("/encoders").status_code == 200


# ------------------------------------------------------------------------------------------ the command
def test_embed_command_writes_npy_and_json(tmp_path, capsys, monkeypatch):
    from core.settings import get_settings
    from models.encoders import load_encoder
    from slidesynth.cli import main

    for key in list(os.environ):
        if key.startswith("SLIDESYNTH_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLIDESYNTH_MODELS_DIR", str(make_models_dir(tmp_path / "weights")))
    tiles = [procedural_tile(c, 64 + 16 * c) for c in (1, 2, 3)]
    paths = []
    for i, (tile, fmt) in enumerate(zip(tiles, ("png", "tiff", "png"))):
        paths.append(tmp_path / f"t{i}.{fmt}")
        paths[-1].write_bytes(encode(tile, fmt))
    get_settings.cache_clear()
    try:
        assert main(["embed", *map(str, paths), "--out", str(tmp_path / "e.npy")]) == 0
        assert main(["embed", *map(str, paths), "--out", str(tmp_path / "e.json"), "--encoder", "slidesynth-tile-v1"]) == 0
        capsys.readouterr()
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not an image")
        assert main(["embed", str(paths[0]), str(bad)]) == 2
        assert f"tile {bad} is not a PNG, JPEG or TIFF image" in capsys.readouterr().err
        assert main(["embed", str(paths[0]), "--encoder", "quilt-vit-b-32"]) == 2
        assert "quiltnet-b-32" in capsys.readouterr().err and not (tmp_path / "x.npy").exists()
    finally:
        get_settings.cache_clear()
    want = load_encoder("slidesynth-tile-v1", tmp_path / "weights").embed(tiles)
    got = np.load(tmp_path / "e.npy")
    assert got.shape == (3, 128) and got.dtype == np.float32 and np.allclose(got, want, atol=1e-6)
    body = json.loads((tmp_path / "e.json").read_text())
    assert body["encoder"] == "slidesynth-tile-v1" and body["dim"] == 128
    assert np.allclose(body["embeddings"], want, atol=1e-6) and body["tiles"][1]["width"] == 96


# ------------------------------------------------------------------------------------------ with a real worker
@pytest.fixture(params=["embedded", "redis"])
def served(request, tmp_path):
    """The API in-process and a real `slidesynth worker` process: filesystem transport, or Redis."""
    from core.settings import Settings
    from service.app import create_app

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    models = make_models_dir(tmp_path / "weights")
    broken = models / "encoders" / "broken-enc"               # an encoder whose weight file fails its hash
    shutil.copytree(models / "encoders" / "slidesynth-tile-v1", broken)
    card = json.loads((broken / "encoder_card.json").read_text())
    (broken / "encoder_card.json").write_text(json.dumps({**card, "id": "broken-enc"}))
    (broken / "encoder.safetensors").write_bytes((broken / "encoder.safetensors").read_bytes()[:-8] + b"\0" * 8)
    env.update(SLIDESYNTH_DATA_DIR=str(tmp_path / "data"), SLIDESYNTH_MODELS_DIR=str(models),
               SLIDESYNTH_DEVICE="cpu", PYTHONUNBUFFERED="1")
    prefix = None
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("key_prefix")
        env.update(SLIDESYNTH_BROKER_URL=redis_url, SLIDESYNTH_KEY_PREFIX=prefix, SLIDESYNTH_QUEUE=prefix)
    settings = Settings(**{k.removeprefix("SLIDESYNTH_").lower(): v for k, v in env.items()
                           if k.startswith("SLIDESYNTH_")}, embed_timeout=180)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "slidesynth.cli", "worker", "--log-level", "INFO"], cwd=REPO,
                              env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        with TestClient(create_app(settings)) as c:
            c.settings, c.log, c.mode = settings, log, request.param
            yield c
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        if prefix:
            import redis

            r = redis.Redis.from_url(settings.broker_url)
            for key in r.scan_iter(f"*{prefix}*"):
                r.delete(key)


@pytest.mark.integration
def test_embed_round_trip_through_a_worker(served):
    from models.encoders import load_encoder
    from service.tiles import read_tile

    tiles = [("carcinoma.png", encode(procedural_tile(1, 96), "png")),
             ("stroma.jpg", encode(procedural_tile(3, 64), "jpeg")),
             ("necrosis.tif", encode(procedural_tile(2, 128), "tiff"))]
    resp = post_tiles(served, tiles)
    assert resp.status_code == 200, resp.text + served.log.read_text()[-3000:]
    body = resp.json()
    assert (body["encoder"], body["dim"], body["input_size"], body["mpp"]) == ("slidesynth-tile-v1", 128, 64, 0.5)
    assert [(t["filename"], t["width"]) for t in body["tiles"]] == [("carcinoma.png", 96), ("stroma.jpg", 64),
                                                                     ("necrosis.tif", 128)]
    offline = load_encoder("slidesynth-tile-v1", served.settings.models_dir).embed(
        [read_tile(data, 10**6, 64) for _, data in tiles])
    assert np.allclose(body["embeddings"], offline, atol=1e-6)           # the same vectors as `slidesynth embed`
    # the worker's failure to load an encoder is answered at once, naming the file
    resp = post_tiles(served, tiles[:1], encoder="broken-enc")
    assert resp.status_code == 500 and "encoder.safetensors has sha256" in resp.json()["detail"]
    assert not any((served.settings.data_dir / "replies").glob("*"))     # replies are removed when read
    if served.mode == "redis":
        import redis

        r = redis.Redis.from_url(served.settings.broker_url)
        assert not list(r.scan_iter(f"{served.settings.key_prefix}:reply:*"))
