"""∞-Brush noise: the counter-based field, the smoothing operator A and the schedule."""
import math

import pytest
import torch

from models.infbrush.noise import Mollifier, gaussian_noise, gaussian_taps, philox4x32_10, reflect_index
from models.infbrush.schedule import CosineSchedule, ddim_update




# Random123 tests/kat_vectors, "philox4x32 10" lines: counter[4], key[2] → output[4]
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    out = philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in ctr], *key)
    assert tuple(int(o) for o in out) == expected


def test_noise_field_is_identical_under_any_chunking():
    H, W, seed = 37, 53, 2 ** 40 + 7
    rows, cols = torch.arange(H), torch.arange(W)
    whole = gaussian_noise(seed, 0, rows[:, None], cols[None, :])
    pieces = torch.empty_like(whole)
    for r0, r1, c0, c1 in [(0, 10, 0, 53), (10, 37, 0, 20), (10, 37, 20, 53)]:
        pieces[r0:r1, c0:c1] = gaussian_noise(seed, 0, rows[r0:r1, None], cols[None, c0:c1])
    assert torch.equal(whole, pieces)
    # scattered single pixels, in any order, give the same values
    rr = torch.tensor([36, 0, 17, 5]); cc = torch.tensor([52, 0, 3, 44])
    assert torch.equal(gaussian_noise(seed, 0, rr, cc), whole[rr, cc])
    # other seeds and streams are different fields
    assert not torch.equal(gaussian_noise(seed + 1, 0, rows[:, None], cols[None, :]), whole)
    assert not torch.equal(gaussian_noise(seed, 1, rows[:, None], cols[None, :]), whole)


def test_noise_field_statistics():
    z = gaussian_noise(3, 0, torch.arange(256)[:, None], torch.arange(256)[None, :]).reshape(-1, 3)
    assert z.shape == (65536, 3)
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1) < 0.01
    c = torch.corrcoef(z.T)
    assert (c - torch.eye(3)).abs().max() < 0.02
    # neighbouring pixels are uncorrelated (C = I on the lattice)
    zz = gaussian_noise(3, 0, torch.arange(256)[:, None], torch.arange(256)[None, :])[..., 0]
    assert abs(float((zz[:, 1:] * zz[:, :-1]).mean())) < 0.01


def test_smoothed_noise_window_is_chunk_invariant():
    moll = Mollifier.for_side(side=96, sigma=1.0, train_resolution=32)       # σ = 3 px, radius 6
    H, W = 70, 96
    whole = moll.noise_window(11, 0, 0, H, 0, W, H, W)
    parts = torch.cat([moll.noise_window(11, 0, r0, min(r0 + 13, H), 0, W, H, W) for r0 in range(0, H, 13)])
    assert torch.equal(whole, parts)
    tile = moll.noise_window(11, 0, 20, 31, 40, 77, H, W)
    assert torch.equal(tile, whole[20:31, 40:77])


def test_smoothing_operator_spectrum():
    for sigma_px in (1.0, 2.5):
        moll = Mollifier(sigma_px=sigma_px, taps=gaussian_taps(sigma_px), noise_mul=1.0)
        # a cosine of frequency f is an eigenfunction (interior, reflect boundary far away): gain = H(f)
        n, r = 512, moll.radius
        for f in (0.02, 0.08, 0.15, 0.3):
            x = torch.arange(n, dtype=torch.float64)
            img = torch.cos(2 * math.pi * f * x)[:, None, None].expand(n, 8, 1).contiguous()
            out = moll.apply_dense(img)[:, 0, 0].double()
            inner = slice(3 * r, n - 3 * r)
            gain = float(moll.frequency_response(torch.tensor([f]))[0])
            assert torch.allclose(out[inner], gain * torch.cos(2 * math.pi * f * x[inner]), atol=1e-5)
            # the truncated kernel stays close to the Gaussian's transfer function exp(-2π²σ²f²)
            assert abs(gain - math.exp(-2 * math.pi ** 2 * sigma_px ** 2 * f ** 2)) < 0.06
        # low-pass: monotone decay, DC gain 1
        fs = torch.linspace(0, 0.5, 50)
        resp = moll.frequency_response(fs)
        assert abs(float(resp[0]) - 1) < 1e-12
        assert float(resp[-1]) < 0.05


def test_smoothing_scales_with_resolution_and_keeps_noise_variance():
    # σ scales with side / train_resolution, so the cut-off in continuous coordinates is the same
    m1 = Mollifier.for_side(64, 1.0, 64)
    m4 = Mollifier.for_side(256, 1.0, 64)
    assert m1.sigma_px == 1.0 and m4.sigma_px == 4.0
    f_unit = 6.0                                                          # cycles per unit length
    g1 = float(m1.frequency_response(torch.tensor([f_unit / 64]))[0])
    g4 = float(m4.frequency_response(torch.tensor([f_unit / 256]))[0])
    assert abs(g1 - g4) < 0.03
    # per-pixel variance of noise_mul·A z is the training resolution's at every size
    var = []
    for side in (64, 256):
        m = Mollifier.for_side(side, 1.0, 64)
        var.append(float(m.noise_window(5, 0, 0, side, 0, side, side, side).var()))
    expected = float(gaussian_taps(1.0).pow(2).sum() ** 2)
    for v in var:
        assert abs(v - expected) / expected < 0.1


def test_values_at_points_equal_dense_operator():
    moll = Mollifier.for_side(40, 1.0, 20)                                # σ = 2 px
    H, W = 30, 40
    img = torch.randn(H, W, 3)
    dense = moll.apply_dense(img)
    rows = torch.tensor([0, 1, 29, 15, 7]); cols = torch.tensor([0, 39, 20, 2, 38])
    pts = moll.at_points(lambda rr, cc: img[rr, cc], rows, cols, H, W)
    assert torch.allclose(pts, dense[rows, cols], atol=1e-5)


def test_reflect_index():
    idx = torch.arange(-5, 10)
    assert reflect_index(idx, 4).tolist() == [1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3]


def test_cosine_schedule_and_ddim():
    s = CosineSchedule(1000)
    assert s.alpha_bar.shape == (1000,)
    assert torch.all(s.alpha_bar[1:] < s.alpha_bar[:-1])
    assert float(s.betas.max()) <= 0.999
    assert s.ddim_timesteps(50)[:3] == [999, 979, 959] and s.ddim_timesteps(50)[-1] == 19
    lam = s.lambda_weights()
    assert torch.isfinite(lam).all() and abs(float(lam.mean()) - 1) < 1e-5
    # a DDIM step with the true noise recovers x0 exactly (η = 0)
    x0 = torch.rand(4, 4, 3) * 2 - 1
    eps = torch.randn(4, 4, 3)
    ab = float(s.alpha_bar[500])
    xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    x_prev, x0_hat = ddim_update(xt, eps, ab, 1.0)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(x_prev, x0, atol=1e-5)
    with pytest.raises(ValueError):
        s.ddim_timesteps(0)
