"""OME-Zarr writer: NGFF 0.4 / Zarr v2 and 0.5 / Zarr v3, validated and read back by ome-zarr-py and zarr."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from ome_zarr.axes import Axes
from ome_zarr.format import format_from_version
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader

from tests.slide_helpers import he_like, iter_tiles, listing, reference_pyramid
from writers.zarr import OmeZarrWriter

W, H = 2100, 1301  # 3 levels (2100, 1050, 525), odd height, edge chunks on both axes


@pytest.fixture(scope="module")
def image():
    return he_like(H, W, seed=11)


def write(path, img, copy=True, **kw):
    with OmeZarrWriter(path, img.shape[1], img.shape[0], mpp=0.5, metadata={"seed": 9}, **kw) as w:
        for ty, tx, t in iter_tiles(img, w.cascade.tile):
            w.write_tile(ty, tx, t, copy=copy)
    return w


def validate_and_read(path, version):
    """ome-zarr-py's reader (which raises on invalid axes) + explicit transform validation; returns arrays."""
    nodes = list(Reader(parse_url(str(path)))())
    assert nodes, "ome-zarr-py found no image"
    node = nodes[0]
    assert node.load(Multiscales) is not None
    fmt = format_from_version(version)
    axes = node.metadata["axes"]
    Axes(axes, fmt=fmt).validate()
    assert [a["name"] for a in axes] == ["c", "y", "x"]
    assert [a["type"] for a in axes] == ["channel", "space", "space"]
    transforms = node.metadata["coordinateTransformations"]
    fmt.validate_coordinate_transformations(3, len(node.data), transforms)
    return [np.asarray(d) for d in node.data], transforms


def test_lent_tiles_write_the_same_pixels(tmp_path, image):
    """write_tile(copy=False): level-0 chunks are encoded straight from the caller's views."""
    write(tmp_path / "lent.zarr", image, copy=False)
    arrays, _ = validate_and_read(tmp_path / "lent.zarr", "0.4")
    for lvl, (arr, r) in enumerate(zip(arrays, reference_pyramid(image))):
        assert np.array_equal(arr.transpose(1, 2, 0), r), f"level {lvl} differs"


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ngff_valid_and_pixels_exact(tmp_path, image, version):
    path = tmp_path / f"slide-{version}.zarr"
    write(path, image, version=version)
    ref = reference_pyramid(image)
    arrays, transforms = validate_and_read(path, version)
    assert len(arrays) == len(ref) == 3
    for lvl, (arr, r) in enumerate(zip(arrays, ref)):
        assert arr.shape == (3, r.shape[0], r.shape[1])
        assert np.array_equal(arr.transpose(1, 2, 0), r), f"level {lvl} differs"
        assert transforms[lvl] == [{"type": "scale", "scale": [1.0, 0.5 * 2 ** lvl, 0.5 * 2 ** lvl]}]
    group = zarr.open_group(str(path), mode="r")
    a0 = group["0"]
    assert a0.chunks == (3, 512, 512) and a0.dtype == np.uint8
    if version == "0.4":
        assert a0.metadata.zarr_format == 2
        zarray = json.loads((path / "0" / ".zarray").read_text())
        assert zarray["compressor"]["id"] == "blosc" and zarray["compressor"]["cname"] == "zstd"
        assert zarray["dimension_separator"] == "/"
        zattrs = json.loads((path / ".zattrs").read_text())
        assert zattrs["multiscales"][0]["version"] == "0.4"
        assert zattrs["slidesynth"]["synthetic"] is True and zattrs["slidesynth"]["seed"] == 9
        assert (path / "0" / "0" / "2" / "4").is_file()  # nested "/" chunk keys c/y/x
    else:
        meta = json.loads((path / "zarr.json").read_text())
        assert meta["zarr_format"] == 3 and meta["attributes"]["ome"]["version"] == "0.5"
        assert "version" not in meta["attributes"]["ome"]["multiscales"][0]
        arr_meta = json.loads((path / "0" / "zarr.json").read_text())
        assert arr_meta["dimension_names"] == ["c", "y", "x"]
        assert [c["name"] for c in arr_meta["codecs"]] == ["bytes", "blosc"]
        assert arr_meta["codecs"][1]["configuration"]["cname"] == "zstd"
        np.testing.assert_array_equal(np.asarray(group["1"][:, 100:200, 300:400]).transpose(1, 2, 0),
                                      ref[1][100:200, 300:400])


def test_bad_version_and_failures_leave_nothing(tmp_path, image):
    with pytest.raises(ValueError, match="zarr_version|0.4"):
        OmeZarrWriter(tmp_path / "v.zarr", 10, 10, mpp=0.5, version="0.3")
    assert listing(tmp_path) == []
    w = OmeZarrWriter(tmp_path / "bad.zarr", W, H, mpp=0.5)
    w.write_tile(0, 0, image[:512, :512])
    with pytest.raises(ValueError, match=r"tile \(0, 2\) out of order"):
        w.write_tile(0, 2, image[:512, 1024:1536])
    assert listing(tmp_path) == []
    for tile, match in [(image[:512, :500], r"tile \(0, 0\): shape \(512, 500, 3\), expected \(512, 512, 3\)"),
                        (image[:512, :512].astype(np.float32), r"tile \(0, 0\): dtype float32, expected uint8")]:
        w = OmeZarrWriter(tmp_path / "bad.zarr", W, H, mpp=0.5)
        with pytest.raises(ValueError, match=match):
            w.write_tile(0, 0, tile)
        assert listing(tmp_path) == []
