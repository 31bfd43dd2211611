"""Tiled decoder: partition of unity, exact reconstruction, no seams, four-pass = paper formula, contracts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.decoding import TiledDecoder, paper_hann, plan_axis
from models.metrics import seam_ratio, seam_ratios
from models.runtime import Canceled

S = 8  # VAE scale factor




def ones_decoder(x):
    return torch.ones(x.shape[0], 3, x.shape[2] * S, x.shape[3] * S)


def nearest_decoder(x):
    """Local (pointwise) decoder: tiling must reproduce the untiled output exactly."""
    return F.interpolate(x[:, :3], scale_factor=S, mode="nearest")


def make_linear_decoder(seed=0):
    """Linear stand-in for a VAE decoder: 1×1 conv then bilinear ×8 upsampling (affine in the latent)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 4, 1, 1, generator=g) * 0.1
    bias = torch.rand(3, generator=g) * 0.5 + 0.25

    def decode(x):
        return F.interpolate(F.conv2d(x, weight, bias), scale_factor=S, mode="bilinear", align_corners=False)
    return decode


def drifting_decoder(x):
    """Per-tile colour drift like a VAE's GroupNorm statistics: gain/offset depend on the tile's own mean."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    up = F.interpolate(x[:, :3], scale_factor=S, mode="bilinear", align_corners=False)
    return 0.5 + 0.2 * up * (1.0 + 0.5 * m) + 0.05 * m


CONFIGS = [("hann", 16, 8), ("tukey", 16, 3), ("tukey", 16, 0), ("four-pass", 16, 0), ("tukey-m", 16, 4)]


def make_decoder(decode_fn, window, tile, overlap, **kw):
    if window == "tukey-m":  # Tukey with a context crop of 8 px on each inner tile edge
        return TiledDecoder(decode_fn, scale=S, tile=tile, overlap=overlap, window="tukey", margin_px=8, **kw)
    return TiledDecoder(decode_fn, scale=S, tile=tile, overlap=overlap, window=window, **kw)


@pytest.mark.parametrize("length,tile,overlap,margin", [
    (1, 8, 4, 0), (7, 8, 4, 0), (8, 8, 4, 0), (9, 8, 4, 0), (100, 16, 8, 0), (101, 16, 2, 0), (50, 16, 0, 0),
    (33, 16, 3, 0), (257, 64, 8, 0), (101, 16, 4, 8), (257, 64, 8, 32), (70, 16, 6, 5)])
def test_axis_windows_partition_of_unity(length, tile, overlap, margin):
    plan = plan_axis(length, tile, overlap, scale=S, margin_px=margin)
    total = np.zeros(plan.length * S)
    for start, w in zip(plan.starts, plan.windows):
        total[start * S:start * S + tile * S] += w
    assert np.abs(total - 1).max() <= 1e-6
    assert plan.starts[0] == 0 and plan.starts[-1] + tile == plan.length  # last tile flush with the border
    assert (plan.windows[0][:overlap * S] == 1).all() and (plan.windows[-1][-1] == 1)  # edge-aware
    if margin and plan.count > 1:  # context crop: the outer margin of every inner tile edge is unused
        assert (plan.windows[0][-margin:] == 0).all() and (plan.windows[1][:margin] == 0).all()


@pytest.mark.parametrize("window,tile,overlap", CONFIGS)
@pytest.mark.parametrize("h,w", [(37, 29), (5, 40), (1, 1)])
def test_canvas_weights_sum_to_one(window, tile, overlap, h, w):
    dec = make_decoder(ones_decoder, window, tile, overlap, batch_size=3)
    img = dec.decode(torch.zeros(1, 4, h, w), output="float32")
    assert img.shape == (h * S, w * S, 3)
    assert np.abs(img - 1).max() <= 1e-6


@pytest.mark.parametrize("window,tile,overlap", CONFIGS)
def test_local_decoder_reconstructs_exactly(window, tile, overlap):
    g = torch.Generator().manual_seed(1)
    latent = torch.rand(1, 4, 37, 53, generator=g)
    dec = make_decoder(nearest_decoder, window, tile, overlap, batch_size=4)
    want = nearest_decoder(latent)[0].permute(1, 2, 0).numpy()
    got = dec.decode(latent, output="float32")
    assert np.abs(got - want).max() <= 1e-6
    u8 = dec.decode(latent)
    assert u8.dtype == np.uint8 and np.array_equal(u8, np.floor(np.clip(want, 0, 1) * 255 + 0.5).astype(np.uint8))


@pytest.mark.parametrize("window,tile,overlap", CONFIGS)
def test_constant_latent_gives_constant_image(window, tile, overlap):
    dec = make_decoder(make_linear_decoder(), window, tile, overlap)
    latent = torch.full((1, 4, 29, 45), 0.7)
    img = dec.decode(latent, output="float32")
    assert np.abs(img - img[0, 0]).max() <= 1e-6
    u8 = dec.decode(latent)
    assert (u8 == u8[0, 0]).all()


def test_bands_are_row_major_uint8_and_cover_the_image():
    g = torch.Generator().manual_seed(2)
    latent = torch.rand(1, 4, 70, 45, generator=g)
    dec = TiledDecoder(make_linear_decoder(), scale=S, tile=16, overlap=4, window="tukey", batch_size=2)
    bands = list(dec.iter_bands(latent))
    assert len(bands) == plan_axis(70, 16, 4, S).count > 1
    assert all(b.dtype == np.uint8 and b.flags.c_contiguous and b.shape[1:] == (45 * S, 3) for b in bands)
    assert sum(b.shape[0] for b in bands) == 70 * S
    assert dec.decoder_calls == dec.count_tiles(70, 45) == 6 * 4
    assert dec.decode_fn_calls == 6 * 2  # 4 tiles per row in batches of 2
    whole = TiledDecoder(make_linear_decoder(), scale=S, tile=16, overlap=4, window="tukey", batch_size=7)
    assert np.array_equal(np.concatenate(bands), whole.decode(latent))  # batching does not change pixels


def smooth_latent(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 4, h // 8 + 2, w // 8 + 2, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)


def test_blending_removes_seams_that_hard_tiles_show():
    """Seam ratios of tiled decodes relative to the untiled decode on the same lines (removes content noise)."""
    latent = smooth_latent(64, 64, seed=3)  # 64 = 5·12 + 4 and 4·16: regular Tukey, Hann and four-pass grids

    def rel(window, tile, overlap, period, offsets):
        truth = TiledDecoder(drifting_decoder, scale=S, tile=64, overlap=0, window="tukey").decode(latent)
        img = TiledDecoder(drifting_decoder, scale=S, tile=tile, overlap=overlap, window=window).decode(latent)
        a, b = seam_ratios(img, period * S, offsets, match_mod=S), seam_ratios(truth, period * S, offsets, match_mod=S)
        return {k: a[k] / b[k] for k in a}

    hard = rel("tukey", 16, 0, 16, (0,))
    assert min(hard.values()) > 3.0, hard
    for window, overlap, period in (("tukey", 4, 12), ("hann", 8, 8)):
        r = rel(window, 16, overlap, period, (0, overlap * S // 2, overlap * S))  # ramp start, middle, end
        assert max(r.values()) < 1.1, (window, r)
    # DiffInfinite's sequential blend hides every horizontal seam, but the y-shifted pass keeps its own
    # vertical seams on the base grid with weight wy·(1 − wy) ≤ 1/4: vertical seams shrink, not vanish.
    four = rel("four-pass", 16, 0, 16, (0,))
    assert four["y@0"] < 1.1 and four["x@0"] < hard["x@0"] / 3, four


def paper_four_pass(latent, decode_fn, t):
    """Direct, whole-image implementation of DiffInfinite's four-pass Hann blend (reference §10)."""
    def grid(lat):
        h, w = lat.shape[2] // t, lat.shape[3] // t
        rows = [torch.cat([decode_fn(lat[:, :, i * t:(i + 1) * t, j * t:(j + 1) * t])[0] for j in range(w)], dim=2)
                for i in range(h)]
        return torch.cat(rows, dim=1)
    h = t // 2
    a = grid(latent)
    v = grid(latent[:, :, :, h:-h])
    hh = grid(latent[:, :, h:-h, :])
    x = grid(latent[:, :, h:-h, h:-h])
    tp, hp = t * S, t * S // 2
    big_h, big_w = a.shape[1], a.shape[2]
    win = torch.from_numpy(paper_hann(tp).astype(np.float32))
    wx = win.repeat((big_w - tp) // tp)
    wy = win.repeat((big_h - tp) // tp)[:, None]
    img = a.clone()
    img[:, :, hp:big_w - hp] = (1 - wx) * img[:, :, hp:big_w - hp] + wx * v
    img[:, hp:big_h - hp, :] = (1 - wy) * img[:, hp:big_h - hp, :] + wy * hh
    wc = wy * wx
    img[:, hp:big_h - hp, hp:big_w - hp] = (1 - wc) * img[:, hp:big_h - hp, hp:big_w - hp] + wc * x
    return img.permute(1, 2, 0).numpy()


def test_four_pass_matches_the_paper_formula():
    latent = smooth_latent(48, 64, seed=4)
    want = paper_four_pass(latent, drifting_decoder, 16)
    dec = TiledDecoder(drifting_decoder, scale=S, tile=16, window="four-pass", batch_size=3)
    got = dec.decode(latent, output="float32")
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5
    assert dec.decoder_calls == (2 * 3 - 1) * (2 * 4 - 1)
    assert paper_hann(512)[0] == 0 and paper_hann(512)[-1] == pytest.approx(0)


def test_cancel_and_progress():
    latent = torch.zeros(1, 4, 40, 40)
    seen = []
    dec = TiledDecoder(ones_decoder, scale=S, tile=16, overlap=8, window="hann", batch_size=2)
    list(dec.iter_bands(latent, progress=lambda d, t: seen.append((d, t))))
    total = dec.count_tiles(40, 40)
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    n = {"k": 0}

    def cancel():
        n["k"] += 1
        return n["k"] > 3

    with pytest.raises(Canceled):
        list(dec.iter_bands(latent, cancel=cancel))
    assert dec.decoder_calls == 3 * 2


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="tukey"):
        TiledDecoder(ones_decoder, tile=64, overlap=8, window="hann")
    with pytest.raises(ValueError, match="unknown window"):
        TiledDecoder(ones_decoder, window="gauss")
    with pytest.raises(ValueError, match="overlap"):
        TiledDecoder(ones_decoder, tile=16, overlap=9, window="tukey")
    dec = TiledDecoder(ones_decoder, scale=S, tile=16, overlap=8)
    with pytest.raises(ValueError, match=r"\[1, C, h, w\]"):
        list(dec.iter_bands(torch.zeros(4, 20, 20)))
    bad = TiledDecoder(lambda x: torch.zeros(x.shape[0], 3, 64, 64), scale=S, tile=16, overlap=8)
    with pytest.raises(ValueError, match=r"row 0 tiles at latent \(y, x\) \[\(0, 0\)"):
        list(bad.iter_bands(torch.zeros(1, 4, 20, 20)))
    nan = TiledDecoder(lambda x: torch.full((x.shape[0], 3, 128, 128), float("nan")), scale=S, tile=16, overlap=8)
    with pytest.raises(ValueError, match="non-finite"):
        list(nan.iter_bands(torch.zeros(1, 4, 20, 20)))


def test_overhead_and_seam_metric_basics():
    dec = TiledDecoder(ones_decoder, scale=S, tile=64, overlap=8, window="tukey")
    assert dec.overhead(512, 512) == pytest.approx(81 / 64)
    assert TiledDecoder(ones_decoder, scale=S, tile=64, overlap=32).overhead(512, 512) == pytest.approx(225 / 64)
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, :] = (np.arange(64) % 7 * 10)[None, :, None]
    assert seam_ratio(img, 16) == pytest.approx(seam_ratio(img.transpose(1, 0, 2), 16))
    stepped = np.tile(np.linspace(0, 50, 64)[None, :, None], (64, 1, 3))
    stepped[:, 32:] += 20  # one step at x = 32
    assert seam_ratio(stepped, 32) > 10


def test_crop_to_a_slide_size_that_is_not_a_multiple_of_8():
    latent = smooth_latent(40, 24, seed=6)
    dec = TiledDecoder(make_linear_decoder(), scale=S, tile=16, overlap=4, window="tukey")
    full = dec.decode(latent)
    bands = list(dec.iter_bands(latent, crop=(301, 187)))
    assert sum(b.shape[0] for b in bands) == 301 and all(b.shape[1:] == (187, 3) and b.flags.c_contiguous
                                                         for b in bands)
    assert np.array_equal(np.concatenate(bands), full[:301, :187])
    with pytest.raises(ValueError, match="crop"):
        list(dec.iter_bands(latent, crop=(321, 10)))


def test_boundary_lines_are_the_blend_edges():
    from models.decoding import TiledDecoder, plan_axis

    dec = TiledDecoder(lambda z: z, scale=8, tile=64, overlap=6, window="tukey")
    rows, cols = dec.boundary_lines(128, 200)
    plan = plan_axis(200, 64, 6, 8)
    weights = plan.windows
    full = np.zeros((len(plan.starts), 200 * 8))
    for k, s in enumerate(plan.starts):
        full[k, s * 8:s * 8 + 512] = weights[k]
    mixed = (full > 0).sum(0) > 1  # pixels blended from two tiles
    edges = [p for p in range(1, 1600) if mixed[p] != mixed[p - 1]]
    assert len(cols) == 2 * (plan.count - 1) and all(min(abs(p - e) for e in edges) <= 1 for p in cols)
    assert rows == sorted(set(rows)) and all(0 < p < 1024 for p in rows) and len(cols) == 2 * (plan.count - 1)
    four = TiledDecoder(lambda z: z, scale=8, tile=64, window="four-pass").boundary_lines(128, 128)
    assert four == ([256, 512, 768], [256, 512, 768])


@pytest.mark.parametrize("tile,overlap,margin,batch", [(16, 3, 0, 1), (16, 8, 0, 3), (16, 6, 4, 2), (8, 4, 0, 5),
                                                       (16, 5, 10, 4), (16, 0, 0, 2)])
def test_streamed_overlap_add_equals_the_direct_canvas_sum(tile, overlap, margin, batch):
    """Bands, carried ramps and column windows give what summing every weighted tile on one canvas gives."""
    latent = smooth_latent(45, 61, seed=7) * 2 - 0.5
    window = "hann" if 2 * overlap == tile else "tukey"
    dec = TiledDecoder(drifting_decoder, scale=S, tile=tile, overlap=overlap, window=window, batch_size=batch,
                       margin_px=margin)
    py, px = dec.plans(45, 61)
    canvas = torch.zeros(3, py.length * S, px.length * S, dtype=torch.float64)
    for r, y in enumerate(py.starts):
        for c, x in enumerate(px.starts):
            tile_img = drifting_decoder(latent[:, :, y:y + tile, x:x + tile])[0].double()
            w = torch.from_numpy(py.windows[r]).double()[:, None] * torch.from_numpy(px.windows[c]).double()[None]
            canvas[:, y * S:(y + tile) * S, x * S:(x + tile) * S] += w * tile_img
    want = canvas[:, :45 * S, :61 * S].permute(1, 2, 0).numpy()
    bands = list(dec.iter_bands(latent, output="float32"))
    assert len(bands) == py.count and all(b.shape[1:] == (61 * S, 3) for b in bands)
    assert np.abs(np.concatenate(bands) - want).max() <= 1e-5


@pytest.mark.parametrize("window,tile,overlap,limit_mb", [
    # a float32 tile row of that width alone is 307 MB (and converting it to uint8 in one piece took three
    # times that again): bands ≤ 2 × 58 MB alive (the caller's and the next), ramp carry 77 MB, a window
    ("tukey", 32, 8, 300),
    # the paper's scheme held a full-width strip of every pass (1.1–1.2 GB measured): now two uint8 half-tile
    # bands (2 × 19 MB, and the caller's) and the lower halves of passes H and X (2 × 77 MB float32)
    ("four-pass", 16, 8, 400)])
def test_a_wide_strip_decodes_without_a_full_width_float_tile_row(window, tile, overlap, limit_mb):
    """A 320 × 100000 px strip decodes within a bound that a full-width float tile row would break."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = r'''
import json, sys, torch, torch.nn.functional as F
from bench.memory import peak_rss_mb, rss_mb
from models.decoding import TiledDecoder

def decode(z):
    return torch.sigmoid(F.interpolate(z[:, :3], scale_factor=8, mode="nearest"))

latent = torch.rand(1, 4, 40, 12500, generator=torch.Generator().manual_seed(0))
window, tile, overlap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dec = TiledDecoder(decode, scale=8, tile=tile, overlap=overlap, window=window, batch_size=4)
base, rows, corner = rss_mb(), 0, None
for band in dec.iter_bands(latent):
    rows += band.shape[0]
    corner = band[-1, -1].tolist()
print(json.dumps({"growth_mb": peak_rss_mb() - base, "rows": rows, "corner": corner}))
'''
    res = subprocess.run([sys.executable, "-c", code, window, str(tile), str(overlap)], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rows"] == 320
    assert out["growth_mb"] < limit_mb, out
