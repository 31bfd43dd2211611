"""A slide is exactly the size asked for or implied by its mask (issue 21, defect 7): the sampler covers it with
whole latent pixels and the decoded bands are cropped, so the slide and its mask align pixel for pixel."""
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import png_bytes


def test_the_job_spec_keeps_the_masks_exact_size(client):
    mask = np.zeros((750, 1001), np.uint8)       # was rounded to 1000 × 752
    mask[:, 500:] = 1
    resp = client.post("/generate", files={"mask": ("m.png", png_bytes(mask), "image/png")},
                       data={"params": json.dumps({"mask_mpp": 0.5, "mpp": 0.5, "seed": 1})})
    assert resp.status_code == 202, resp.text
    spec = client.store.get(resp.json()["id"]).spec
    assert (spec.width, spec.height) == (1001, 750)
    scaled = client.post("/generate", files={"mask": ("m.png", png_bytes(mask[:301, :203]), "image/png")},
                         data={"params": json.dumps({"mask_mpp": 1.0, "mpp": 0.5})})
    assert (client.store.get(scaled.json()["id"]).spec.width, client.store.get(scaled.json()["id"]).spec.height) == (
        406, 602)
    sized = client.post("/generate", json={"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 203,
                                           "height": 150})
    assert sized.status_code == 202, sized.text


@pytest.mark.parametrize("how", ["mask", "subtype"])
def test_a_slide_of_any_size_is_that_size_and_its_mask_aligns(tmp_path, how):
    import openslide

    from slidesynth.cli import main

    mask = np.full((150, 203), 3, np.uint8)
    mask[:, :101] = 1
    Image.fromarray(mask).save(tmp_path / "m.png")
    src = ["--mask", str(tmp_path / "m.png"), "--mask-mpp", "0.5"] if how == "mask" else \
        ["--subtype", "LUAD", "--width", "203", "--height", "150"]
    out = tmp_path / "s.tiff"
    assert main(["generate", *src, "--out", str(out), "--zarr", str(tmp_path / "s.zarr"), "--steps", "2",
                 "--model", "diffinfinite-untrained", "--seed", "1"]) == 0
    assert openslide.OpenSlide(str(out)).dimensions == (203, 150)
    import zarr

    assert zarr.open(str(tmp_path / "s.zarr"), mode="r")["0"].shape == (3, 150, 203)
