"""Procedural tissue: tiles follow their masks, classes look as designed, renders are seeded and seamless."""
from __future__ import annotations

import numpy as np
import pytest

from procedural.tissue import (
    CLASS_NAMES, HALO, NUM_CLASSES, STAIN_MATRIX, iter_bands, make_dataset, random_layout, render_region,
    render_tile,
)


def _stains(pixels: np.ndarray) -> np.ndarray:
    """Colour deconvolution (Beer–Lambert OD, least squares on the H and E vectors): (N, 2) [h, e]."""
    od = -np.log((pixels.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
    return np.linalg.lstsq(STAIN_MATRIX.T.astype(np.float64), od.T, rcond=None)[0].T


def _interior(mask: np.ndarray, margin: int) -> np.ndarray:
    """Pixels of ``mask`` whose whole (2·margin+1)² neighbourhood lies in ``mask`` (and inside the image)."""
    import cv2

    k = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    return cv2.erode(mask.astype(np.uint8), k, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def test_tile_pixels_follow_the_mask_exactly():
    """Away from region borders (the blur's reach), a mixed tile is, pixel for pixel, the render of the class
    its mask names there; and every class occurs."""
    labels = np.zeros((192, 240), np.uint8)
    labels[:, 48:96] = 1
    labels[:, 96:144] = 2
    labels[:, 144:192] = 3
    labels[:, 192:] = 4
    labels[60:120, 20:220] = 3  # a stroma band across the others
    labels[80:100, 110:130] = 1  # a carcinoma nest inside it
    img = render_tile(labels, seed=21)
    for c in range(NUM_CLASSES):
        alone = render_tile(np.full(labels.shape, c, np.uint8), seed=21)
        inner = _interior(labels == c, HALO)
        assert inner.sum() > 300, CLASS_NAMES[c]
        assert np.array_equal(img[inner], alone[inner]), f"{CLASS_NAMES[c]} pixels differ from the class render"
        # and the class render is not what the other classes look like there
        others = [render_tile(np.full(labels.shape, k, np.uint8), seed=21) for k in range(NUM_CLASSES) if k != c]
        assert all(np.abs(img[inner].astype(int) - o[inner]).mean() > 4 for o in others), CLASS_NAMES[c]


@pytest.mark.parametrize("seed", [0, 7])
def test_class_colour_statistics_differ_as_designed(seed):
    stats = {}
    for c in range(NUM_CLASSES):
        he = _stains(render_tile(np.full((160, 160), c, np.uint8), seed))
        stats[c] = {"h": he[:, 0].mean(), "e": he[:, 1].mean(), "sd_e": he[:, 1].std(), "od": he.sum(1).mean()}
    unknown, carcinoma, necrosis, stroma, others = (stats[c] for c in range(5))
    # glass: nearly stain-free and flat
    assert unknown["od"] < 0.1 and all(unknown["od"] < 0.5 * stats[c]["od"] for c in range(1, 5))
    # carcinoma: hematoxylin-dark nuclei in sheets (the most hematoxylin by far)
    assert all(carcinoma["h"] > 2.5 * stats[c]["h"] for c in (0, 2, 3, 4))
    # stroma: eosin fibres (most eosin, eosin-dominated, strongly textured in eosin)
    assert stroma["e"] > necrosis["e"] and stroma["e"] > carcinoma["e"]
    assert stroma["e"] / stroma["h"] > 3.0
    assert stroma["sd_e"] > 2.0 * necrosis["sd_e"]
    # necrosis: paler pink than stroma, with more hematoxylin (nuclear debris) than stroma
    assert necrosis["h"] > 1.3 * stroma["h"] and necrosis["e"] / necrosis["h"] < stroma["e"] / stroma["h"]
    # others (fat): mostly empty, but membranes make it far more textured than glass
    assert others["od"] < 0.5 * necrosis["od"] and others["sd_e"] > 3.0 * unknown["sd_e"]


def test_rendering_in_pieces_equals_rendering_whole():
    labels = random_layout(300, 410, seed=11, kind="slide", mpp=1.0)
    assert len(np.unique(labels)) >= 4
    whole = render_tile(labels, seed=5)
    out = np.zeros_like(whole)
    for r0, r1 in [(0, 37), (37, 200), (200, 300)]:
        for c0, c1 in [(0, 129), (129, 131), (131, 410)]:
            out[r0:r1, c0:c1] = render_region(labels, 5, (r0, r1), (c0, c1))
    assert np.array_equal(out, whole)
    assert np.array_equal(np.concatenate(list(iter_bands(labels, 5, band_rows=77))), whole)


def test_seeded_and_reproducible():
    a = random_layout(128, 128, seed=3, kind="tile")
    assert np.array_equal(a, random_layout(128, 128, seed=3, kind="tile"))
    assert not np.array_equal(random_layout(256, 256, seed=1, kind="slide", mpp=2.0),
                              random_layout(256, 256, seed=2, kind="slide", mpp=2.0))
    labels = random_layout(128, 128, seed=4, kind="slide", mpp=2.0)
    img = render_tile(labels, seed=9)
    assert img.dtype == np.uint8 and img.shape == (128, 128, 3)
    assert np.array_equal(img, render_tile(labels, seed=9))
    assert np.abs(img.astype(int) - render_tile(labels, seed=10)).mean() > 3


@pytest.mark.parametrize("subtype", [0, 1])
def test_slide_layouts_are_organised_like_tissue(subtype):
    import cv2

    mpp = 1.0
    labels = random_layout(512, 512, seed=40 + subtype, kind="slide", mpp=mpp, subtype=subtype)
    frac = np.bincount(labels.ravel(), minlength=5) / labels.size
    assert frac[0] > 0.15 and frac[3] > 0.1 and frac[1] > 0.03  # glass, stroma, tumour
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    assert np.all(border == 0), "a glass margin surrounds the section"
    # necrosis only inside tumour islands: never next to stroma, fat or glass
    nec = (labels == 2).astype(np.uint8)
    if nec.any():
        ring = cv2.dilate(nec, np.ones((3, 3), np.uint8)).astype(bool) & (labels != 2)
        assert np.all(labels[ring] == 1)
    # fat/vessel regions keep ≥ 25 µm from the tumour
    not_tumour = (labels != 1).astype(np.uint8)
    dist = cv2.distanceTransform(not_tumour, cv2.DIST_L2, 5)
    if (labels == 4).any():
        assert dist[labels == 4].min() >= 25 / mpp - 1


def test_layout_subtypes_differ():
    def necrosis_share(st):
        return np.mean([(random_layout(256, 256, s, "slide", mpp=2.0, subtype=st) == 2).mean() for s in range(6)])

    assert necrosis_share(1) > 2 * necrosis_share(0)


def test_dataset_is_read_by_the_diffinfinite_data_loader(tmp_path):
    from training.diffinfinite_data import scan_tiles

    make_dataset(tmp_path / "tiles", 3, size=64, seed=1)
    make_dataset(tmp_path / "slides", 2, size=96, seed=2, kind="slide", mpp=4.0)
    tiles = scan_tiles(tmp_path / "tiles", NUM_CLASSES)
    assert [t.image.name for t in tiles] == ["tile_00000.png", "tile_00001.png", "tile_00002.png"]
    from PIL import Image

    for t in tiles:
        assert t.mask is not None and t.subtype is None
        labels = np.asarray(Image.open(t.mask))
        assert tuple(int(c) for c in np.unique(labels) if c > 0) == t.classes
        assert np.array_equal(labels, random_layout(64, 64, _item_seed(1, tiles.index(t)), "tile"))
        assert np.asarray(Image.open(t.image)).shape == (64, 64, 3)
    slides = scan_tiles(tmp_path / "slides", NUM_CLASSES)
    assert all(s.subtype in (0, 1) for s in slides)


def _item_seed(seed, i):
    from procedural.tissue import item_seed

    return item_seed(seed, i)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="outside 0..4"):
        render_tile(np.full((8, 8), 7, np.uint8), 0)
    with pytest.raises(ValueError, match="2-D"):
        render_tile(np.zeros((8, 8, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="integer"):
        render_tile(np.zeros((8, 8), np.float32), 0)
    with pytest.raises(ValueError, match="outside the 8×8"):
        render_region(np.zeros((8, 8), np.uint8), 0, (0, 9), (0, 8))
    with pytest.raises(ValueError, match="kind"):
        random_layout(8, 8, 0, kind="blob")
    with pytest.raises(ValueError, match="subtype"):
        random_layout(64, 64, 0, kind="slide", subtype=3)
