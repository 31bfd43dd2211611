"""HTTP API against the embedded configuration: real app, real file job store, real filesystem broker."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_mask, png_bytes


def post_mask(client, data: bytes, params: dict | None = None, filename="mask.png"):
    return client.post("/generate", files={"mask": (filename, data, "application/octet-stream")},
                       data={"params": json.dumps(params or {})})


def assert_nothing_created(client):
    jobs, total = client.store.list("public", 0, 100)
    assert total == 0 and jobs == []
    jobs_dir = client.settings.data_dir / "jobs"
    assert not jobs_dir.exists() or not any(jobs_dir.iterdir())


def error_locs(resp) -> list[list]:
    return [d["loc"] for d in resp.json()["detail"]]


def test_submit_mask_poll_list_cancel_delete(client):
    resp = post_mask(client, png_bytes(make_mask(64, 96)), {"seed": 7, "steps": 3, "mask_mpp": 1.0})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert resp.headers["Location"] == f"/jobs/{body['id']}" == body["status_url"]
    assert body["untrained"] is True

    job = client.get(body["status_url"]).json()
    assert job["status"] == "queued" and job["progress"] == 0.0 and job["seed"] == 7
    # 64×96 mask at 1 µm/px → output at the model's native 0.5 µm/px is twice as large.
    assert (job["width"], job["height"], job["mpp"]) == (192, 128, 0.5)
    assert job["links"]["slide"] is None

    second = post_mask(client, png_bytes(make_mask(32, 32)), {"seed": 8}).json()
    listing = client.get("/jobs", params={"limit": 1}).json()
    assert listing["total"] == 2 and [j["id"] for j in listing["items"]] == [second["id"]]
    assert client.get("/jobs", params={"offset": 1}).json()["items"][0]["id"] == body["id"]

    # Outputs of an unfinished job: 409.
    assert client.get(f"/jobs/{body['id']}/slide.tiff").status_code == 409
    assert client.get(f"/jobs/{body['id']}/thumbnail.png").status_code == 409

    # Cancel while queued: the job is canceled at once and will never start.
    resp = client.delete(f"/jobs/{body['id']}")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    # Deleting a finished (canceled) job removes it.
    assert client.delete(f"/jobs/{body['id']}").status_code == 204
    assert client.get(f"/jobs/{body['id']}").status_code == 404


def test_json_subtype_job(client):
    resp = client.post("/generate", json={"conditioning": {"type": "subtype", "subtype": "LUSC"},
                                          "width": 256, "height": 128, "seed": 1})
    assert resp.status_code == 202, resp.text
    job = client.get(resp.json()["status_url"]).json()
    assert (job["width"], job["height"]) == (256, 128)
    record = client.store.get(job["id"])
    assert record.spec.subtype == "squamous cell carcinoma" and record.spec.subtype_id == 1
    assert record.spec.guidance == 3.0 and record.spec.steps == 20  # the card's defaults (untrained: ω unset → 3)


def test_models_and_health(client):
    models = client.get("/models").json()
    names = {m["name"]: m for m in models["models"]}
    assert models["default"] == "diffinfinite-untrained"
    card = names["diffinfinite-untrained"]
    assert card["trained"] is False and card["native_mpp"] == 0.5
    assert set(map(int, card["classes"])) == {0, 1, 2, 3, 4}
    assert card["max_width"] == 4096
    assert client.get("/healthz").json() == {"status": "ok", "store": True, "mode": "embedded"}


@pytest.mark.parametrize(
    "data, filename, fragment",
    [
        (b"GIF89a" + b"\0" * 64, "mask.gif", "PNG or TIFF"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 64, "mask.jpg", "PNG or TIFF"),
    ],
)
def test_mask_not_png_or_tiff(client, data, filename, fragment):
    resp = post_mask(client, data, filename=filename)
    assert resp.status_code == 422 and error_locs(resp) == [["body", "mask"]]
    assert fragment in resp.text
    assert_nothing_created(client)


def test_mask_with_an_oversized_compressed_text_chunk_is_a_422(client):
    """Pillow refuses a zTXt/iCCP chunk that decompresses to more than 1 MB with a ValueError: a 422, not a 500."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (2 << 20), zip=True)
    buf = io.BytesIO()
    Image.fromarray(make_mask(16, 16)).save(buf, format="PNG", pnginfo=info)
    resp = post_mask(client, buf.getvalue())
    assert resp.status_code == 422 and error_locs(resp) == [["body", "mask"]]
    assert "Decompressed data too large" in resp.text
    assert_nothing_created(client)


def test_huge_integers_and_repeated_parts_are_422s(client):
    resp = client.post(
        "/generate", files={"mask": ("m.png", png_bytes(make_mask(16, 16)), "image/png")},
        data={"params": '{"seed": ' + "9" * 5000 + "}"})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "params"]] and "4300" in resp.text
    two = client.post("/generate", files=[("mask", ("a.png", png_bytes(make_mask(16, 16)), "image/png")),
                                          ("mask", ("b.png", png_bytes(make_mask(16, 16)), "image/png"))])
    assert two.status_code == 422 and error_locs(two) == [["body", "mask"]] and "one mask part, not 2" in two.text
    assert_nothing_created(client)


def test_multichannel_masks(client):
    rgb = np.zeros((16, 16, 3), np.uint8)
    resp = post_mask(client, png_bytes(rgb))
    assert resp.status_code == 422 and "one channel" in resp.text and error_locs(resp) == [["body", "mask"]]
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb, photometric="rgb")
    resp = post_mask(client, buf.getvalue(), filename="mask.tif")
    assert resp.status_code == 422 and "one channel" in resp.text
    assert_nothing_created(client)


def test_unknown_class_values(client):
    labels = make_mask(32, 32, classes=(0, 1, 7, 9))
    resp = post_mask(client, png_bytes(labels))
    assert resp.status_code == 422 and error_locs(resp) == [["body", "mask"]]
    assert "[7, 9]" in resp.json()["detail"][0]["msg"]
    assert_nothing_created(client)


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    # A tiny IDAT that would inflate to far more than the limit if anyone decoded it.
    idat = zlib.compress(b"\0" * 1024)
    chunk += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_decompression_bomb_rejected_from_header(client):
    resp = post_mask(client, _png_header_only(200_000, 200_000))
    assert resp.status_code == 422 and "more than the limit" in resp.text
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, shape=(2000, 1000), dtype=np.uint8)  # header declares 2 Mpx > 1 Mpx limit
    resp = post_mask(client, buf.getvalue(), filename="m.tif")
    assert resp.status_code == 422 and "more than the limit" in resp.text
    assert_nothing_created(client)


def test_size_over_maximum(client):
    resp = client.post("/generate", json={"conditioning": {"type": "subtype", "subtype": "LUAD"},
                                          "width": 8192, "height": 512})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "width"]]
    big_mask = np.zeros((512, 600), np.uint8)  # at 4 µm/px → 4800 px wide at 0.5, over 4096
    resp = post_mask(client, png_bytes(big_mask), {"mask_mpp": 4.0})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "params", "width"]]
    assert_nothing_created(client)


def test_unknown_subtype_model_and_bad_params(client):
    resp = client.post("/generate", json={"conditioning": {"type": "subtype", "subtype": "BRCA_IDC"},
                                          "width": 256, "height": 256})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "conditioning", "subtype"]]
    resp = client.post("/generate", json={"model": "nope", "conditioning": {"type": "subtype", "subtype": "LUAD"},
                                          "width": 256, "height": 256})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "model"]] and "nope" in resp.text
    resp = post_mask(client, png_bytes(make_mask(16, 16)), {"model": "nope"})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "params", "model"]]
    resp = post_mask(client, png_bytes(make_mask(16, 16)), {"guidance": 99})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "params", "guidance"]]
    resp = client.post("/generate", json={"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 256,
                                          "height": 256, "colour": "blue"})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "colour"]]
    assert client.post("/generate", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert_nothing_created(client)


def test_embedding_refused_by_mask_model_and_checked(client):
    vec = [0.01] * 512
    models = client.get("/models").json()
    resp = client.post("/generate", json={"conditioning": {"type": "embedding", "vector": vec},
                                          "width": 256, "height": 256, "model": models["default"]})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "conditioning", "type"]]
    assert_nothing_created(client)


def test_embedding_without_a_model_goes_to_the_default_embedding_model(client):
    models = client.get("/models").json()
    card = next(m for m in models["models"] if m["name"] == models["default_embedding"])
    assert card["engine"] == "infinity-brush" and "embedding" in card["conditioning"]
    vec = [0.1] * card["embedding_dim"]
    resp = client.post("/generate", json={"conditioning": {"type": "embedding", "vector": vec,
                                                           "encoder": card["embedding_encoder"]},
                                          "width": 256, "height": 256})
    assert resp.status_code == 202, resp.text
    assert client.store.get(resp.json()["id"]).spec.model == card["name"]
    client.delete(resp.json()["status_url"])


def test_unknown_job_is_404(client):
    assert client.get("/jobs/0123456789abcdef").status_code == 404
    assert client.delete("/jobs/0123456789abcdef").status_code == 404
    assert client.get("/jobs/0123456789abcdef/slide.tiff").status_code == 404
    assert client.get("/jobs/..%2F..%2Fetc/slide.tiff").status_code == 404


def test_body_limit(embedded_settings):
    from service.app import create_app

    embedded_settings.max_upload_bytes = 4096
    with TestClient(create_app(embedded_settings)) as c:
        resp = post_mask(c, b"\x89PNG\r\n\x1a\n" + b"\0" * 10_000)
        assert resp.status_code == 413

        def chunks():  # no Content-Length: the limit counts what arrives
            for _ in range(10):
                yield b"x" * 1024

        resp = c.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert resp.status_code == 413
        assert not (embedded_settings.data_dir / "jobs").exists()


def test_api_keys_scope_jobs_to_tenants(embedded_settings):
    from service.app import create_app

    embedded_settings.api_keys = "lab-a:key-a,lab-b:key-b"
    with TestClient(create_app(embedded_settings)) as c:
        assert c.get("/jobs").status_code == 401
        resp = c.post("/generate", headers={"X-API-Key": "key-a"},
                      json={"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 64, "height": 64})
        assert resp.status_code == 202
        job_url = resp.json()["status_url"]
        assert c.get(job_url, headers={"X-API-Key": "key-a"}).status_code == 200
        assert c.get(job_url, headers={"X-API-Key": "key-b"}).status_code == 404
        assert c.get(job_url + "/slide.tiff", headers={"X-API-Key": "key-b"}).status_code == 404
        assert c.get(job_url + "/slide.zarr/.zattrs", headers={"X-API-Key": "key-b"}).status_code == 404
        assert c.delete(job_url, headers={"X-API-Key": "key-b"}).status_code == 404
        assert c.get(job_url, headers={"X-API-Key": "key-a"}).json()["status"] == "queued"
        assert c.get("/jobs", headers={"X-API-Key": "key-b"}).json()["total"] == 0
        assert c.get("/jobs", headers={"X-API-Key": "wrong"}).status_code == 401


def test_infinity_brush_embedding_checks(client):
    base = {"model": "infinity-brush-untrained", "width": 256, "height": 256}
    ok = client.post("/generate", json={**base, "conditioning": {"type": "embedding", "vector": [0.04] * 512,
                                                                 "encoder": "quilt-vit-b-32"}})
    assert ok.status_code == 202, ok.text
    assert client.store.get(ok.json()["id"]).spec.embedding == [0.04] * 512
    client.delete(ok.json()["status_url"])
    client.delete(ok.json()["status_url"])

    short = client.post("/generate", json={**base, "conditioning": {"type": "embedding", "vector": [0.1] * 100}})
    assert short.status_code == 422 and error_locs(short) == [["body", "conditioning", "vector"]]
    assert "512" in short.text and "quilt-vit-b-32" in short.text
    other = client.post("/generate", json={**base, "conditioning": {"type": "embedding", "vector": [0.1] * 512,
                                                                    "encoder": "uni-vit-l"}})
    assert other.status_code == 422 and error_locs(other) == [["body", "conditioning", "encoder"]]
    assert "quilt-vit-b-32" in other.text and "512" in other.text
    body = json.dumps({**base, "conditioning": {"type": "embedding", "vector": [0.1] * 511 + [float("nan")]}})
    nan = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert nan.status_code == 422 and "non-finite" in nan.text
    huge = client.post("/generate", content=body.replace("NaN", "1e999"), headers={"content-type": "application/json"})
    assert huge.status_code == 422 and "non-finite" in huge.text
    big = client.post("/generate", json={**base, "width": 8200, "conditioning": {"type": "subtype", "subtype": "LUAD"}})
    assert big.status_code == 422 and error_locs(big) == [["body", "width"]]
    # Subtype prompts need QuiltNet's text tower, which this test deployment lacks: refused up front.
    sub = client.post("/generate", json={**base, "conditioning": {"type": "subtype", "subtype": "luad"}})
    assert sub.status_code == 422 and "quiltnet-b-32" in sub.text
    assert str(client.settings.models_dir) not in sub.text  # no server paths in answers
    # ... and /models does not offer what would be refused
    card = {m["name"]: m for m in client.get("/models").json()["models"]}["infinity-brush-untrained"]
    assert card["conditioning"] == ["embedding", "embedding_grid"]


def test_infinity_brush_embedding_grid_checks(client):
    base = {"model": "infinity-brush-untrained", "width": 256, "height": 128}
    vectors = [[0.05 * (i + 1)] * 512 for i in range(6)]
    grid = {"type": "embedding_grid", "encoder": "quilt-vit-b-32", "rows": 2, "cols": 3, "vectors": vectors}
    ok = client.post("/generate", json={**base, "conditioning": grid})
    assert ok.status_code == 202, ok.text
    spec = client.store.get(ok.json()["id"]).spec
    assert spec.conditioning == "embedding_grid" and spec.encoder == "quilt-vit-b-32"
    assert (spec.embedding_grid.rows, spec.embedding_grid.cols, spec.embedding_grid.dim) == (2, 3, 512)
    assert np.array_equal(spec.embedding_grid.array(), np.asarray(vectors, np.float32))  # row-major, float32
    assert spec.embedding is None
    client.delete(ok.json()["status_url"])
    client.delete(ok.json()["status_url"])
    assert_nothing_created(client)

    def refused(cond, loc, *words, raw=False):
        body = {**base, "conditioning": {**grid, **cond}}
        resp = (client.post("/generate", content=json.dumps(body), headers={"content-type": "application/json"})
                if raw else client.post("/generate", json=body))
        assert resp.status_code == 422 and error_locs(resp) == [["body", "conditioning", *loc]], resp.text
        assert all(w in resp.text for w in words), resp.text
        assert_nothing_created(client)

    refused({"rows": 0}, ["rows"])
    refused({"cols": 65}, ["cols"], "64")
    refused({"rows": "2"}, ["rows"])
    refused({"vectors": vectors[:5]}, ["vectors"], "6 vectors", "row-major")
    refused({"vectors": vectors[:3] + [[0.1] * 511] + vectors[4:]}, ["vectors", 3], "512", "quilt-vit-b-32")
    refused({"vectors": vectors[:1] + [[0.1] * 511 + [float("nan")]] + vectors[2:]}, ["vectors", 1], "non-finite",
            raw=True)
    refused({"vectors": vectors[:5] + [[0.0] * 512]}, ["vectors", 5], "zero vector")
    refused({"vectors": vectors[:2] + [[0.1] * 511 + ["a"]] + vectors[3:]}, ["vectors", 2, 511])
    refused({"encoder": "uni-vit-l"}, ["encoder"], "quilt-vit-b-32")
    refused({"vector": vectors[0]}, ["vector"])                                  # an unknown field
    # a model whose engine takes no grids (the DiffInfinite mask model) says so at conditioning.type
    mask_model = client.post("/generate", json={"width": 64, "height": 64, "conditioning": grid,
                                                "model": client.get("/models").json()["default"]})
    assert mask_model.status_code == 422 and error_locs(mask_model) == [["body", "conditioning", "type"]]
    assert "embedding_grid" in mask_model.text
    assert_nothing_created(client)


def test_embedding_grid_limit_of_the_model(embedded_settings):
    """A model may take fewer rows or columns than the API's 64 (its engine reads the limit from the card)."""
    from models.engine import get_engine
    from service.schemas import EmbeddingGridConditioning
    from service.validation import FieldError, check_embedding_grid

    card = get_engine("infinity-brush").untrained_card()
    assert get_engine("infinity-brush").max_embedding_grid(card) == 64
    small = card.model_copy(update={"config": {**card.config, "network": {**card.config["network"],
                                                                           "max_cond_grid": 4}}})
    cond = EmbeddingGridConditioning(type="embedding_grid", rows=2, cols=5, vectors=[[1.0] * 512] * 10)
    assert check_embedding_grid(cond, card).cols == 5
    with pytest.raises(FieldError) as err:
        check_embedding_grid(cond, small)
    assert err.value.loc == ("conditioning", "cols") and "maximum of 4" in err.value.msg


def test_lost_running_job_is_canceled_at_once(client):
    import time

    from core.jobs import JobStatus

    job_id = post_mask(client, png_bytes(make_mask(16, 16))).json()["id"]
    client.store.update(job_id, status=JobStatus.running, claim="c1",
                        heartbeat_at=time.time() - client.settings.lease_seconds - 1)
    resp = client.delete(f"/jobs/{job_id}")
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"


def test_corrupt_tiff_and_png_data_are_422(client):
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((64, 64), np.uint8), compression="zlib")
    data = bytearray(buf.getvalue())
    data[8:40] = b"\xff" * 32  # break the compressed strip
    resp = post_mask(client, bytes(data), filename="m.tif")
    assert resp.status_code == 422 and error_locs(resp) == [["body", "mask"]]
    png = bytearray(png_bytes(make_mask(32, 32)))
    png[40:60] = b"\0" * 20
    resp = post_mask(client, bytes(png))
    assert resp.status_code == 422 and error_locs(resp) == [["body", "mask"]]
    resp = post_mask(client, png_bytes(make_mask(16, 16)), {"mpp": 1e-300, "mask_mpp": 100})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "params", "mpp"]]
    assert_nothing_created(client)


@pytest.mark.parametrize("options,loc,fragment", [
    ({"decode_overlap": 40}, "decode_overlap", "at most decode_tile/2 = 32"),
    ({"decoder": "hann", "decode_overlap": 6}, "decode_overlap", "must be decode_tile/2 = 32 for hann"),
    ({"decoder": "four-pass", "decode_tile": 33}, "decode_tile", "even decode_tile"),
    ({"decode_tile": 4}, "decode_tile", "greater than or equal to 8"),
    ({"decode_tile": "64"}, "decode_tile", "valid integer"),
    ({"sampler": "fast"}, "sampler", "'random', 'tiled', 'independent', 'multidiffusion', 'mixture' or 'dde'"),
    ({"solver": "euler"}, "solver", "'ddim', 'dpmpp-2m' or 'dpmpp-2m-sde'"),
    ({"steps_per_tile": 3}, "steps_per_tile", "takes no option 'steps_per_tile'"),
])
def test_engine_options_refused_with_the_field_named(client, options, loc, fragment):
    body = {"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 256, "height": 256, "options": options}
    resp = client.post("/generate", json=body)
    assert resp.status_code == 422 and error_locs(resp) == [["body", "options", loc]] and fragment in resp.text, \
        resp.text
    resp = post_mask(client, png_bytes(make_mask(16, 16)), {"options": options})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "params", "options", loc]], resp.text
    assert_nothing_created(client)


def test_an_option_of_another_engine_is_refused_naming_it(client):
    body = {"model": "infinity-brush-untrained", "width": 64, "height": 64, "options": {"sampler": "random"},
            "conditioning": {"type": "embedding", "vector": [1.0] * 512}}
    resp = client.post("/generate", json=body)
    assert resp.status_code == 422 and error_locs(resp) == [["body", "options", "sampler"]], resp.text
    assert "infinity-brush" in resp.text and "takes no option 'sampler'" in resp.text
    # the flat fields of earlier versions are refused, pointing at `options`
    resp = client.post("/generate", json={**body, "options": None, "sampler": "random"})
    assert resp.status_code == 422 and error_locs(resp) == [["body", "sampler"]], resp.text
    assert "options" in resp.text
    assert_nothing_created(client)


@pytest.mark.parametrize("options,expected", [
    ({}, ("tukey", 64, 6)),
    ({"decode_tile": 32, "decode_overlap": 4}, ("tukey", 32, 4)),
    ({"decode_tile": 8}, ("tukey", 8, 4)),  # the default overlap shrinks to what an 8-px tile's ramps allow
    ({"decoder": "hann", "decode_tile": 48}, ("hann", 48, 24)),
    ({"decoder": "four-pass"}, ("four-pass", 64, 32)),
])
def test_decode_geometry_reaches_the_job_and_its_decoder(client, options, expected):
    from models.diffinfinite.engine import DiffInfiniteOptions, slide_decoder

    body = {"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 256, "height": 256, "options": options}
    resp = client.post("/generate", json=body)
    assert resp.status_code == 202, resp.text
    spec = client.store.get(resp.json()["id"]).spec
    assert (spec.options["decoder"], spec.options["decode_tile"], spec.options["decode_overlap"]) == expected
    dec = slide_decoder(lambda z: z, 8, DiffInfiniteOptions.model_validate(spec.options))
    assert (dec.window, dec.tile, dec.overlap) == expected


@pytest.mark.parametrize("options,steps,expected", [
    ({}, None, ("dpmpp-2m-sde", 20)),  # the tiled sampler's default solver; the untrained card's 20 steps < 25
    ({"sampler": "random"}, None, ("ddim", 20)),  # the paper's configuration: the (untrained) card's steps
    ({"solver": "dpmpp-2m"}, None, ("dpmpp-2m", 20)),
    ({"solver": "dpmpp-2m-sde"}, 30, ("dpmpp-2m-sde", 30)),
])
def test_solver_and_its_default_steps_reach_the_job(client, options, steps, expected):
    body = {"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 256, "height": 256, "options": options}
    if steps is not None:
        body["steps"] = steps
    resp = client.post("/generate", json=body)
    assert resp.status_code == 202, resp.text
    spec = client.store.get(resp.json()["id"]).spec
    assert (spec.options["solver"], spec.steps) == expected


def test_default_steps_per_solver():
    from models.diffinfinite.engine import MULTISTEP_STEPS, DiffInfiniteEngine, DiffInfiniteOptions

    engine = DiffInfiniteEngine()
    card = engine.untrained_card()
    tiled, paper = DiffInfiniteOptions(), DiffInfiniteOptions(sampler="random")
    for default_steps, want_tiled, want_paper in ((None, MULTISTEP_STEPS, 250), (50, MULTISTEP_STEPS, 50),
                                                  (20, 20, 20)):
        c = card.model_copy(update={"default_steps": default_steps})
        assert (engine.steps_for(c, tiled), engine.steps_for(c, paper)) == (want_tiled, want_paper)


@pytest.fixture
def finished_job(client):
    """A succeeded job whose TIFF (odd size, 3 TIFF levels) was written by our writer."""
    from core.jobs import JobStatus
    from tests.slide_helpers import he_like, write_slide_tiff

    job_id = post_mask(client, png_bytes(make_mask(64, 64)), {"seed": 3}).json()["id"]
    image = he_like(2300, 4100, seed=31)
    write_slide_tiff(client.store.job_dir(job_id) / "slide.tiff", image)
    client.store.update(job_id, status=JobStatus.succeeded, outputs={"tiff": "slide.tiff"})
    return job_id, image


def test_deepzoom_descriptor_and_tiles_for_openseadragon(client, finished_job):
    import xml.etree.ElementTree as ET

    import openslide
    from openslide.deepzoom import DeepZoomGenerator
    from PIL import Image

    job_id, image = finished_job
    links = client.get(f"/jobs/{job_id}").json()["links"]
    assert links["deepzoom"] == f"/jobs/{job_id}/slide.dzi"
    resp = client.get(links["deepzoom"])
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(resp.text)
    ns = "{http://schemas.microsoft.com/deepzoom/2008}"
    assert root.tag == f"{ns}Image" and root.get("Format") == "jpeg"
    assert (root.get("TileSize"), root.get("Overlap")) == ("254", "1")
    size = root.find(f"{ns}Size")
    assert (size.get("Width"), size.get("Height")) == ("4100", "2300")

    # OpenSeadragon's URLs: slide.dzi → slide_files/{level}/{col}_{row}.jpeg; levels up to ceil(log2(4100)) = 13
    top = 13
    base = f"/jobs/{job_id}/slide_files"
    full = client.get(f"{base}/{top}/3_2.jpeg")  # an interior tile at full resolution
    assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
    got = np.asarray(Image.open(io.BytesIO(full.content)).convert("RGB")).astype(np.float64)
    x0, y0 = 3 * 254 - 1, 2 * 254 - 1  # 1-px overlap on each side
    want = image[y0:y0 + 256, x0:x0 + 256].astype(np.float64)
    assert got.shape == want.shape == (256, 256, 3)
    assert 10 * np.log10(255 ** 2 / np.mean((got - want) ** 2)) > 35  # TIFF JPEG, then the tile's JPEG
    edge = Image.open(io.BytesIO(client.get(f"{base}/{top}/16_9.jpeg").content))  # last column and row
    assert edge.size == (4100 - 16 * 254 + 1, 2300 - 9 * 254 + 1)
    single = Image.open(io.BytesIO(client.get(f"{base}/0/0_0.jpeg").content))
    assert single.size == (1, 1)
    # the same tiles OpenSlide's own Deep Zoom generator cuts from the file
    with openslide.OpenSlide(str(client.store.job_dir(job_id) / "slide.tiff")) as slide:
        gen = DeepZoomGenerator(slide, tile_size=254, overlap=1)
        assert gen.level_count == top + 1
        mid = client.get(f"{base}/10/1_0.jpeg").content
        ref = np.asarray(gen.get_tile(10, (1, 0)), np.float64)
        assert np.abs(np.asarray(Image.open(io.BytesIO(mid)), np.float64) - ref).mean() < 2.0

    for url, fragment in ((f"{base}/14/0_0.jpeg", "level 14 is outside 0..13"),
                          (f"{base}/{top}/17_0.jpeg", "col 17 is outside 0..16"),
                          (f"{base}/{top}/0_10.jpeg", "row 10 is outside 0..9"),
                          (f"{base}/{top}/0_0.png", "tile format 'png'"),
                          (f"{base}/{top}/x.jpeg", "is not '{col}_{row}.jpeg'")):
        resp = client.get(url)
        assert resp.status_code == 404 and fragment in resp.json()["detail"], (url, resp.text)
    resp = client.get(f"{base}/top/0_0.jpeg")
    assert resp.status_code == 422 and error_locs(resp) == [["path", "level"]]


def test_deepzoom_needs_a_finished_job_of_the_caller(client, finished_job):
    job_id, _ = finished_job
    queued = post_mask(client, png_bytes(make_mask(64, 64)), {"seed": 4}).json()["id"]
    assert client.get(f"/jobs/{queued}/slide.dzi").status_code == 409
    assert client.get(f"/jobs/{queued}/slide_files/0/0_0.jpeg").status_code == 409
    assert client.get("/jobs/0123456789abcdef/slide.dzi").status_code == 404
    # deleting the job drops its cached slide and removes the file
    assert client.get(f"/jobs/{job_id}/slide.dzi").status_code == 200
    slides = client.app.state.services.slides
    assert len(slides) == 1
    assert client.delete(f"/jobs/{job_id}").status_code == 204
    assert len(slides) == 0
    assert client.get(f"/jobs/{job_id}/slide.dzi").status_code == 404
    assert not client.store.job_dir(job_id).exists()


def test_cors_lets_a_viewer_on_another_origin_read_the_deep_zoom_endpoints(embedded_settings):
    from pydantic import ValidationError

    from service.app import create_app

    viewer = "https://viewer.example.org"
    settings = embedded_settings.model_copy(update={"cors_origins": f"{viewer}, http://localhost:9000"})
    with TestClient(create_app(settings)) as c:
        ok = c.get("/models", headers={"Origin": viewer})
        assert ok.headers["access-control-allow-origin"] == viewer
        preflight = c.options("/jobs/0123456789abcdef/slide.dzi", headers={
            "Origin": viewer, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "X-API-Key"})
        assert preflight.status_code == 200 and "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
        other = c.get("/models", headers={"Origin": "https://elsewhere.example.com"})
        assert "access-control-allow-origin" not in other.headers
    with TestClient(create_app(embedded_settings)) as c:  # default: no CORS headers at all
        assert "access-control-allow-origin" not in c.get("/models", headers={"Origin": viewer}).headers
    with pytest.raises(ValidationError, match="cors_origins"):
        type(embedded_settings)(cors_origins="viewer.example.org")


def test_review_edge_cases_get_4xx_or_work(client):
    """Inputs a black-box review found mishandled: each now gets a 4xx naming the field, or works."""
    big = client.get("/jobs", params={"offset": 10 ** 20})
    assert big.status_code == 422 and error_locs(big) == [["query", "offset"]]
    body = {"conditioning": {"type": "subtype", "subtype": "LUSC"}, "width": 256, "height": 128, "seed": 1}
    mixed = client.post("/generate", content=json.dumps(body), headers={"content-type": "Application/JSON"})
    assert mixed.status_code == 202, mixed.text  # media types are case-insensitive
    base = {"model": "infinity-brush-untrained", "width": 256, "height": 256}
    for vector in ([0.0] * 512, [1e308] * 512, [1e-30] * 512):
        bad = client.post("/generate", json={**base, "conditioning": {"type": "embedding", "vector": vector}})
        assert bad.status_code == 422 and error_locs(bad) == [["body", "conditioning", "vector"]], vector[0]
    one_row = post_mask(client, png_bytes(make_mask(1, 64)), {"mask_mpp": 8.0})  # 16 × 1024 px at 0.5 µm/px
    assert one_row.status_code == 202, one_row.text
    assert client.store.get(one_row.json()["id"]).spec.height == 16
    files = [("mask", ("m.png", png_bytes(make_mask(64, 64)), "image/png"))] * 3
    three = client.post("/generate", files=files, data={"params": "{}"})
    assert three.status_code == 422 and error_locs(three) == [["body", "mask"]]


def test_store_down_answers_503_with_retry_after(embedded_settings):
    from service.app import create_app

    settings = embedded_settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})  # nothing listens
    with TestClient(create_app(settings)) as c:
        for path in ("/jobs", "/jobs/abc123"):
            resp = c.get(path)
            assert resp.status_code == 503 and resp.headers["retry-after"] == "30", (path, resp.text)
            assert resp.json()["detail"].startswith("job store unavailable")
        assert c.get("/healthz").status_code == 503


def test_slide_head_bad_range_and_zarr_listing(client, finished_job):
    from writers.zarr import OmeZarrWriter
    from core.jobs import JobStatus
    from tests.slide_helpers import iter_tiles

    job_id, image = finished_job
    tiff = client.store.job_dir(job_id) / "slide.tiff"
    head = client.head(f"/jobs/{job_id}/slide.tiff")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == tiff.stat().st_size and head.headers["accept-ranges"] == "bytes"
    # malformed (RFC 9110 §14.1.2: DIGITs only, last ≥ first): ignored, the whole file
    junks = ("garbage", "bytes=5-1", "bytes=--1", "bytes=+1-2", "bytes=1_0-20", "bytes= 0x1-2", "bytes=1-2,",
             "bytes=-", "bytes=1-2,3")
    for junk in junks:
        whole = client.get(f"/jobs/{job_id}/slide.tiff", headers={"Range": junk})
        assert whole.status_code == 200 and whole.content == tiff.read_bytes(), junk
    part = client.get(f"/jobs/{job_id}/slide.tiff", headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == tiff.read_bytes()[:10]
    suffix = client.get(f"/jobs/{job_id}/slide.tiff", headers={"Range": "BYTES=-4"})
    assert suffix.status_code == 206 and suffix.content == tiff.read_bytes()[-4:]
    far = client.get(f"/jobs/{job_id}/slide.tiff", headers={"Range": f"bytes={tiff.stat().st_size}-"})
    assert far.status_code == 416
    # the thumbnail and the mask download the same way (a malformed Range was a plain-text 400 there)
    png = png_bytes(make_mask(8, 8))
    for name in ("thumbnail.png", "mask.png"):
        (client.store.job_dir(job_id) / name).write_bytes(png)
    client.store.update(job_id, outputs={"tiff": "slide.tiff", "thumbnail": "thumbnail.png", "mask": "mask.png"})
    for name in ("thumbnail.png", "mask.png"):
        for junk in junks:
            resp = client.get(f"/jobs/{job_id}/{name}", headers={"Range": junk})
            assert resp.status_code == 200 and resp.content == png, (name, junk)
        assert client.get(f"/jobs/{job_id}/{name}", headers={"Range": "bytes=1-3"}).content == png[1:4]

    small = image[:600, :700]
    with OmeZarrWriter(client.store.job_dir(job_id) / "slide.zarr", 700, 600, mpp=0.5) as w:
        for ty, tx, t in iter_tiles(small):
            w.write_tile(ty, tx, t)
    client.store.update(job_id, status=JobStatus.succeeded, outputs={"tiff": "slide.tiff", "zarr": "slide.zarr"})
    link = client.get(f"/jobs/{job_id}").json()["links"]["zarr"]
    root = client.get(link)
    assert root.status_code == 200 and root.json()["path"] == "" and "0/" in root.json()["entries"]
    assert ".zattrs" in root.json()["entries"]
    attrs = client.get(f"/jobs/{job_id}/slide.zarr/.zattrs")
    assert attrs.status_code == 200 and "multiscales" in attrs.json()
    assert client.get(f"/jobs/{job_id}/slide.zarr/nope").status_code == 404
    # paths no filesystem holds are 404s too, not 500s: a NUL byte, a 256-byte name, a path over 4,096 bytes
    for bad in ("a%00b", "x" * 256, "/".join(["y" * 200] * 25), "0/" + "z" * 300 + "/.zarray"):
        resp = client.get(f"/jobs/{job_id}/slide.zarr/{bad}")
        assert resp.status_code == 404 and resp.json()["detail"], (bad[:20], resp.status_code)


def test_types_are_the_contracts_and_locations_are_json_paths(client):
    """No coercion of strings or booleans into numbers; a 422's loc is the path in the JSON that was sent
    (no pydantic union tag in it), the same path the service's own checks use."""
    base = {"conditioning": {"type": "subtype", "subtype": "LUSC"}, "width": 256, "height": 128}
    for field, value in (("width", "256"), ("width", True), ("steps", "2"), ("seed", "3"), ("mpp", "0.5")):
        resp = client.post("/generate", json={**base, field: value})
        assert resp.status_code == 422 and error_locs(resp) == [["body", field]], (field, value, resp.text)
    missing = client.post("/generate", json={**base, "conditioning": {"type": "subtype"}})
    assert missing.status_code == 422 and error_locs(missing) == [["body", "conditioning", "subtype"]]
    extra = client.post("/generate", json={**base, "conditioning": {"type": "subtype", "subtype": "LUSC", "x": 1}})
    assert error_locs(extra) == [["body", "conditioning", "x"]]
    text = client.post("/generate", json={**base, "model": "infinity-brush-untrained",
                                          "conditioning": {"type": "embedding", "vector": "0.1"}})
    short = client.post("/generate", json={**base, "model": "infinity-brush-untrained",
                                           "conditioning": {"type": "embedding", "vector": [0.1]}})
    assert error_locs(text) == error_locs(short) == [["body", "conditioning", "vector"]]
    params = post_mask(client, png_bytes(make_mask(64, 64)), {"steps": "2"})
    assert params.status_code == 422 and error_locs(params) == [["body", "params", "steps"]]
    assert_nothing_created(client)


def test_metrics_count_the_status_the_client_got(embedded_settings):
    """An unhandled error is counted as the 500 the client receives (it was counted as 413), a body refused by
    its Content-Length as 413."""
    from fastapi import APIRouter

    from service.app import create_app

    embedded_settings.max_upload_bytes = 4096
    app = create_app(embedded_settings)
    boom = APIRouter()

    @boom.get("/boom-for-test")
    def _boom():
        raise RuntimeError("boom")

    app.include_router(boom)

    def count(status: str) -> float:
        text = c.get("/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("slidesynth_http_requests_total{") and f'status="{status}"' in line)

    with TestClient(app, raise_server_exceptions=False) as c:
        before500, before413 = count("500"), count("413")
        assert c.get("/boom-for-test").status_code == 500
        assert count("500") == before500 + 1 and count("413") == before413
        big = c.post("/generate", content=b"x" * 10_000, headers={"content-type": "application/json"})
        assert big.status_code == 413 and count("413") == before413 + 1


def test_non_finite_numbers_are_refused_as_such(client):
    for field in ("guidance", "eta", "mpp", "mask_mpp"):
        for value in ("NaN", "Infinity", "-Infinity"):
            resp = client.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(16, 16)), "image/png")},
                               data={"params": '{"%s": %s}' % (field, value)})
            assert resp.status_code == 422 and error_locs(resp) == [["body", "params", field]], (field, value)
            assert "finite number" in resp.text, resp.text
    assert_nothing_created(client)


# --- found by schemathesis (tests/test_schemathesis.py) ---------------------------------------------------------


def test_every_operation_that_takes_the_key_answers_401_as_the_contract_documents(embedded_settings):
    """With API keys, each secured operation answers a request without (or with a wrong) X-API-Key with the
    401 openapi.yaml documents for it: `{"detail": …}` and WWW-Authenticate (the job routes had no 401 in the
    contract)."""
    import yaml

    from service.app import create_app
    from tests.conftest import REPO

    spec = yaml.safe_load((REPO / "openapi.yaml").read_text())
    client = TestClient(create_app(embedded_settings.model_copy(update={"api_keys": "t1:k1"})))
    secured = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()
               if op.get("security")]
    assert len(secured) >= 12
    for path, method, op in secured:
        assert "401" in op["responses"], (method, path)
        url = path.replace("{job_id}", "0" * 32).replace("{level}", "0").replace("{tile}", "0_0.jpeg") \
            .replace("{path}", ".zattrs")
        for headers in ({}, {"X-API-Key": "wrong"}):
            resp = client.request(method.upper(), url, headers=headers)
            assert resp.status_code == 401, (method, path, resp.status_code)
            assert resp.headers["www-authenticate"] == "APIKey"
            if method != "head":
                assert resp.json() == {"detail": "missing or invalid X-API-Key"}


def test_a_405_allows_every_method_of_the_path(client):
    """Allow lists what the resource supports (RFC 9110 §15.5.6), not only the first route's methods: GET and
    DELETE on /jobs/{id} (it said GET alone)."""
    cases = {("OPTIONS", "/jobs/abc"): "GET, DELETE", ("PUT", "/jobs/abc"): "GET, DELETE",
             ("PUT", "/jobs/abc/slide.tiff"): "GET, HEAD", ("PATCH", "/generate"): "POST", ("POST", "/jobs"): "GET",
             ("DELETE", "/embed"): "POST", ("POST", "/jobs/abc/slide.zarr/0/.zarray"): "GET"}
    for (method, path), allow in cases.items():
        resp = client.request(method, path)
        assert resp.status_code == 405 and resp.headers["allow"] == allow, (method, path, resp.headers.get("allow"))
        assert resp.json() == {"detail": "Method Not Allowed"}


def test_a_json_submission_without_its_size_is_refused_as_the_contract_says(client):
    """openapi.yaml made width and height optional in the JSON body, which the service refused without them: they
    are required there now (with a mask, in `params`, they stay optional)."""
    import yaml

    from tests.conftest import REPO

    schema = yaml.safe_load((REPO / "openapi.yaml").read_text())["components"]["schemas"]["GenerateRequest"]
    assert {"width", "height", "conditioning"} <= set(schema["required"])
    base = {"conditioning": {"type": "subtype", "subtype": "LUSC"}, "width": 64, "height": 64}
    for field in ("width", "height"):
        for body in ({k: v for k, v in base.items() if k != field}, {**base, field: None}):
            resp = client.post("/generate", json=body)
            assert resp.status_code == 422 and error_locs(resp) == [["body", field]], resp.text
    assert_nothing_created(client)
    assert post_mask(client, png_bytes(make_mask(16, 16)), {"mask_mpp": 1.0}).status_code == 202
