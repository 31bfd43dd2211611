"""Quilt score (evaluation/quilt.py): block-mean jumps across the pipeline's cut lines against other lines."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.quilt import QuiltScorer, pair_zones, quilt_score, zones_from_lines
from models.decoding import TiledDecoder, rising_ramp

SIZE, TILE_PX, RAMP_PX = 1536, 512, 48


def texture(seed: int, size: int = SIZE) -> np.ndarray:
    """Band-limited RGB texture around mid grey, uint8: mostly cell-sized detail, weak at the block scale (32-px
    block means jump by ~1 grey level, as on the demo model's tissue)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.zeros((size, size, 3), np.float32)
    for sigma, amp in ((1, 25), (4, 6), (16, 1.5)):
        noise = rng.normal(size=(size, size, 3)).astype(np.float32)
        field = cv2.GaussianBlur(noise, (0, 0), sigma)
        out += amp * field / field.std()
    return np.clip(128 + out, 0, 255).astype(np.uint8)


def decode_cuts(size: int = SIZE):
    """The cut zones of a Tukey tiling with 512-px tiles and 48-px ramps (tile 64, overlap 6 latent px)."""
    dec = TiledDecoder(lambda z: z, scale=8, tile=TILE_PX // 8, overlap=RAMP_PX // 8, window="tukey")
    return {"decode": dec.cut_zones(size // 8, size // 8)}


def quilted(img: np.ndarray, offset: float, seed: int = 5) -> np.ndarray:
    """``img`` with a random per-tile brightness offset (± ``offset`` grey levels) cross-faded like the decoder."""
    dec = TiledDecoder(lambda z: z, scale=8, tile=TILE_PX // 8, overlap=RAMP_PX // 8, window="tukey")
    py, px = dec.plans(img.shape[0] // 8, img.shape[1] // 8)
    rng = np.random.default_rng(seed)
    shift = np.zeros(img.shape[:2], np.float32)
    for r, y in enumerate(py.starts):
        for c, x in enumerate(px.starts):
            w = np.outer(py.windows[r], px.windows[c])
            shift[y * 8:y * 8 + w.shape[0], x * 8:x * 8 + w.shape[1]] += w * rng.uniform(-offset, offset)
    return np.clip(img + shift[:, :, None], 0, 255).astype(np.uint8)


def test_separates_a_quilted_image_from_a_clean_one():
    clean = texture(1)
    s_clean = quilt_score(clean, decode_cuts())["quilt_score"]
    s_quilt = quilt_score(quilted(clean, 10.0), decode_cuts())["quilt_score"]
    assert 0.9 < s_clean < 1.1, s_clean
    assert s_quilt > 1.5, s_quilt


def test_a_region_border_on_a_cut_is_not_a_quilt():
    """Two tissues meeting exactly on a cut line: a jump, but between regions, not within one."""
    img = texture(2).astype(np.int16)
    labels = np.zeros((SIZE, SIZE), np.uint8)
    zone = decode_cuts()["decode"][1][0]  # the first vertical ramp
    mid = (zone[0] + zone[1]) // 2
    labels[:, mid:] = 1
    img[:, mid:] += 40
    img = np.clip(img, 0, 255).astype(np.uint8)
    assert quilt_score(img, decode_cuts())["quilt_score"] > 1.5  # blind to regions: flagged
    assert 0.9 < quilt_score(img, decode_cuts(), labels)["quilt_score"] < 1.1


def test_streaming_in_any_bands_equals_the_whole_image():
    img = quilted(texture(3), 3.0)
    whole = quilt_score(img, decode_cuts())
    scorer = QuiltScorer(SIZE, SIZE, decode_cuts())
    r = 0
    for rows in (1, 7, 300, 64, 1000, 164):
        scorer.add_band(img[r:r + rows])
        r += rows
    assert scorer.result() == whole


def test_several_kinds_and_hard_lines():
    img = quilted(texture(4), 10.0)
    cuts = decode_cuts()
    cuts["sampler"] = (zones_from_lines(range(384, SIZE, 384)), zones_from_lines(range(384, SIZE, 384)))
    result = quilt_score(img, cuts)
    assert set(result["by_kind"]) == {"decode", "sampler"}
    assert result["by_kind"]["decode"]["score"] > 1.5
    assert result["quilt_score"] == max(v["score"] for v in result["by_kind"].values())


def test_pair_zones_and_bad_input():
    assert pair_zones([10, 58, 474, 522]) == [(10, 58), (474, 522)]
    with pytest.raises(ValueError, match="pairs"):
        pair_zones([1, 2, 3])
    with pytest.raises(ValueError, match="ends before it starts"):
        QuiltScorer(100, 100, {"decode": ([(50, 40)], [])})
    with pytest.raises(ValueError, match="labels must be"):
        QuiltScorer(100, 100, {"decode": ([], [])}, labels=np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="reserved"):
        QuiltScorer(100, 100, {"control:0": ([], [])})
    scorer = QuiltScorer(100, 100, {"decode": ([(40, 40)], [])})
    with pytest.raises(ValueError, match="uint8"):
        scorer.add_band(np.zeros((10, 100, 3), np.float32))
    with pytest.raises(ValueError, match="rows were scored"):
        scorer.result()


def test_ramp_profile_is_the_decoders():
    # the synthetic quilt blends with the decoder's own raised-cosine ramps
    assert np.allclose(rising_ramp(4), np.sin(np.pi * np.arange(4) / 8) ** 2)


def test_ridge_score_sees_thin_lines_on_cuts_that_the_quilt_score_misses():
    from evaluation.quilt import quilt_score, ridge_score, zones_from_lines

    rng = np.random.default_rng(0)
    clean = np.clip(180 + rng.normal(0, 6, (512, 512, 3)), 0, 255)
    lines = [128, 256, 384]
    ridged = clean.copy()
    for p in lines:  # a 6-px bright line centred on each cut, both directions
        ridged[p - 3:p + 3] += 12
        ridged[:, p - 3:p + 3] += 12
    ridged = np.clip(ridged, 0, 255).astype(np.uint8)
    clean = clean.astype(np.uint8)
    plain = ridge_score(clean, lines, lines)
    lined = ridge_score(ridged, lines, lines)
    assert 0.8 < plain["score"] < 1.25 and plain["segments"] == 2 * 3 * 8 and plain["controls"] > 0
    assert lined["score"] > 4 and lined["cut_grey"] > 8
    # the block means on both sides of each cut agree: the quilt score calls the ridged image clean
    zones = zones_from_lines(lines)
    assert quilt_score(ridged, {"sampler": (zones, zones)})["quilt_score"] < 1.3
    # a step (one side brighter) is a quilt, not a ridge
    step = clean.astype(np.float64)
    step[256:] += 15
    assert ridge_score(np.clip(step, 0, 255).astype(np.uint8), [256], [])["score"] < 1.3
    # only segments inside one label region count
    labels = np.zeros((512, 512), np.uint8)
    labels[:, 250:] = 1
    assert ridge_score(ridged, lines, [], labels)["segments"] == 3 * 8 - 3  # the segment over x = 250 is dropped
    assert ridge_score(clean, [], [])["score"] is None


def test_ridge_scorer_streams_and_scores_every_kind_of_cut():
    from evaluation.quilt import RidgeScorer, RidgeScorers, ridge_score

    rng = np.random.default_rng(3)
    img = np.clip(150 + rng.normal(0, 8, (600, 700, 3)), 0, 255)
    for p in (200, 400):  # bright lines on the sampler's rows only; the decode ramps' centres stay clean
        img[p - 3:p + 3] += 12
    img = img.astype(np.uint8)
    whole = ridge_score(img, [200, 400], [256], max_controls=40)
    scorer = RidgeScorer(600, 700, [200, 400], [256], max_controls=40)
    r = 0
    for k in (1, 77, 5, 300, 217):  # any banding gives the same sums
        scorer.add_band(img[r:r + k])
        r += k
    assert scorer.result() == whole and whole["score"] > 3
    assert ridge_score(img, [200, 400], [256])["controls"] > whole["controls"]  # max_controls thins them
    cuts = {"sampler": ([(200, 200), (400, 400)], []), "decode": ([(88, 136)], [(300, 348)])}  # ramp centres 112, 324
    set_ = RidgeScorers(600, 700, cuts)
    for r in range(0, 600, 128):
        set_.add_band(img[r:r + 128])
    res = set_.result()
    every = ([200, 400, 112], [324])  # each kind's controls stay clear of the other kind's lines too
    assert res["by_kind"]["sampler"] == ridge_score(img, [200, 400], [], max_controls=256, avoid=every)
    assert res["by_kind"]["decode"] == ridge_score(img, [112], [324], max_controls=256, avoid=every)
    assert res["by_kind"]["decode"]["controls"] < ridge_score(img, [112], [324], max_controls=256)["controls"]
    assert res["by_kind"]["decode"]["score"] < 1.5 and res["ridge_score"] == res["by_kind"]["sampler"]["score"]
    with pytest.raises(ValueError, match="only 0 of the slide's 600 rows"):
        RidgeScorer(600, 700, [200], []).result()
    with pytest.raises(ValueError, match="uint8"):
        RidgeScorer(600, 700, [200], []).add_band(img[:10].astype(np.float32))
    with pytest.raises(ValueError, match=r"bands must be \(rows, 700"):
        set_.add_band(img[:10, :500])
    with pytest.raises(ValueError, match="labels must be"):
        RidgeScorer(600, 700, [200], [], labels=np.zeros((60, 70), np.uint8))
