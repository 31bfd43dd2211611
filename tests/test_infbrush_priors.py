"""Trace-class noise priors (models/infbrush/priors.py): the properties of reference dde_multilevel.md §5.2."""
import math

import pytest
import torch

from models.infbrush.priors import NoisePrior, fourier_downsample, psd_slope

BESSEL = NoisePrior(kind="bessel", length_um=8.0, gamma=0.55)


def test_spectrum_slope_is_minus_four_gamma():
    for gamma in (0.55, 0.8):
        # ℓ far above the canvas: the fit band (4 … n/4 cycles per canvas) sees the power law, not τ
        prior = NoisePrior(kind="bessel", length_um=2000.0, gamma=gamma, reference_mpp=16.0)
        slopes = [psd_slope(prior.sample_canvas(seed, 0, 128, 128, 16.0)) for seed in range(3)]
        assert abs(sum(slopes) / 3 + 4 * gamma) < 0.15, (gamma, slopes)
    white_like = NoisePrior(kind="bessel", length_um=0.01, gamma=0.55, reference_mpp=1.0)  # τ ≫ every λ: flat
    assert abs(psd_slope(white_like.sample_canvas(0, 0, 128, 128, 1.0))) < 0.15


def test_energy_over_a_fixed_area_levels_off_while_white_grows_as_n_squared():
    area_um = 128.0
    bessel = [BESSEL.pixel_variance(n, n, area_um / n) for n in (32, 64, 128, 256)]
    # white noise as a field (ξ/h): pixel variance 1/h², so Σ over the area grows ∝ n²
    white = [(n / area_um) ** 2 for n in (32, 64, 128, 256)]
    assert white[-1] / white[0] == pytest.approx(64.0)
    steps = [b / a for a, b in zip(bessel, bessel[1:])]
    # grows ever more slowly (γ = 0.55 is barely trace class: the tail shrinks like h^(4γ−2)); white: × 4
    assert all(1.0 < s < 1.3 for s in steps) and steps[0] > steps[1] > steps[2], steps
    assert BESSEL.pixel_variance(256, 256, 0.5) == pytest.approx(1.0, abs=0.02)   # 1 at the reference µm/px


def test_no_mode_has_zero_variance_except_where_documented():
    for prior in (BESSEL, NoisePrior(kind="combined", fno_period_um=64.0)):
        var = prior.mode_variance(64, 64, 0.5)
        assert float(var.min()) > 0 and float(var[0, 0]) > 0
    lap = NoisePrior(kind="laplacian").mode_variance(64, 64, 0.5)
    assert float(lap[0, 0]) == 0.0 and float(lap.flatten()[1:].min()) > 0    # the mean is never drawn
    fno = NoisePrior(kind="fno", fno_period_um=32.0).mode_variance(64, 64, 0.5)
    assert float((fno > 0).float().mean()) < 0.1                          # finite rank


@pytest.mark.parametrize("prior", [BESSEL, NoisePrior(kind="fno"), NoisePrior(kind="combined")])
def test_identical_noise_under_different_chunkings(prior):
    whole = prior.noise_window(11, 2, 0, 80, 0, 72, 0.5)
    pieces = torch.cat([torch.cat([prior.noise_window(11, 2, r0, r1, c0, c1, 0.5) for c0, c1 in ((0, 30), (30, 72))],
                                  dim=1) for r0, r1 in ((0, 17), (17, 80))], dim=0)
    assert torch.allclose(whole, pieces, atol=1e-5)
    # a window does not depend on the canvas around it: an offset window is the crop of the whole
    assert torch.allclose(prior.noise_window(11, 2, 20, 40, 10, 50, 0.5), whole[20:40, 10:50], atol=1e-5)
    assert not torch.allclose(prior.noise_window(12, 2, 0, 80, 0, 72, 0.5), whole)


def test_no_psd_bump_at_the_tile_period():
    tile = 16
    tiled = torch.cat([torch.cat([BESSEL.noise_window(3, 0, r, r + tile, c, c + tile, 0.5) for c in range(0, 128, tile)],
                                 dim=1) for r in range(0, 128, tile)], dim=0)
    whole = BESSEL.noise_window(3, 0, 0, 128, 0, 128, 0.5)
    assert float((tiled - whole).abs().max()) < 1e-5


def test_chunked_kernel_path_agrees_with_the_whole_canvas_fft_in_the_interior():
    n = 192
    canvas = BESSEL.sample_canvas(5, 0, n, n, 0.5)
    chunked = BESSEL.noise_window(5, 0, 0, n, 0, n, 0.5).double()
    R = BESSEL.radius(0.5)
    d = (canvas - chunked)[R:n - R, R:n - R]
    rel = float(d.pow(2).mean().sqrt() / canvas[R:n - R, R:n - R].pow(2).mean().sqrt())
    # the truncation error is ≤ √truncation of the pixel std (1 %)
    assert rel < 1.5 * math.sqrt(BESSEL.truncation), rel
    assert BESSEL.truncation_error(0.5) <= BESSEL.truncation


def test_pixel_variance_is_one_at_the_reference_resolution():
    assert float(BESSEL.kernel(0.5).pow(2).sum()) == pytest.approx(1.0, abs=BESSEL.truncation)
    assert float(BESSEL.kernel(1.0).pow(2).sum()) < 0.95                 # coarser: less of the spectrum is drawn
    x = torch.stack([BESSEL.noise_window(seed, 0, 0, 192, 0, 192, 0.5) for seed in range(4)])
    assert float(x.var()) == pytest.approx(1.0, abs=0.1)
    assert float(NoisePrior(kind="fno").noise_window(1, 0, 0, 8, 0, 8, 0.5).shape[0]) == 8


def test_coarse_noise_is_the_fourier_downsampled_fine_noise():
    for prior in (BESSEL, NoisePrior(kind="combined", fno_period_um=64.0)):
        xi = prior.white_canvas(5, 0, 128, 128)
        fine = prior.sample_canvas(5, 0, 128, 128, 0.5, white=xi)
        coarse = prior.sample_canvas(5, 0, 64, 64, 1.0, white=fourier_downsample(xi))
        assert float((fourier_downsample(fine) / 2 - coarse).abs().max()) < 1e-9 * float(coarse.std())
    # the paper's discrete 5-point symbol is not nested: the check fails for it
    disc = NoisePrior(kind="bessel", length_um=8.0, symbol="discrete")
    xi = disc.white_canvas(5, 0, 128, 128)
    diff = fourier_downsample(disc.sample_canvas(5, 0, 128, 128, 0.5, white=xi)) / 2 - \
        disc.sample_canvas(5, 0, 64, 64, 1.0, white=fourier_downsample(xi))
    assert float(diff.abs().max()) > 0.05


def test_fourier_downsampling_is_isometric():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, 3, generator=g, dtype=torch.float64)
    X = torch.fft.fft2(x, dim=(0, 1), norm="ortho")
    ky = torch.fft.fftfreq(64, d=1 / 64).abs() < 16
    kx = torch.fft.fftfreq(48, d=1 / 48).abs() < 12
    kept = (X.abs() ** 2)[ky][:, kx].sum()
    y = fourier_downsample(x)
    assert y.shape == (32, 24, 3)
    assert float(abs(y.pow(2).sum() - kept) / kept) < 1e-6
    # a band-limited field keeps all of Σ x²
    band = torch.fft.ifft2(X * (ky[:, None] & kx[None, :])[..., None], dim=(0, 1), norm="ortho").real
    assert float(abs(fourier_downsample(band).pow(2).sum() / band.pow(2).sum() - 1)) < 1e-6
    # a constant becomes factor × itself (coarse pixels = 2 × the fine means)
    assert torch.allclose(fourier_downsample(torch.ones(8, 8)), torch.full((4, 4), 2.0), atol=1e-6)
    with pytest.raises(ValueError, match="not divisible"):
        fourier_downsample(torch.ones(9, 8))


def test_laplacian_has_no_chunked_path_and_bad_parameters_are_named():
    with pytest.raises(ValueError, match="periodic canvas only"):
        NoisePrior(kind="laplacian").noise_window(0, 0, 0, 8, 0, 8, 0.5)
    with pytest.raises(ValueError, match="gamma"):
        NoisePrior(kind="bessel", gamma=0.5).validate()
    with pytest.raises(ValueError, match="length_um"):
        NoisePrior(kind="bessel", length_um=-1.0).validate()
    with pytest.raises(ValueError, match="kind"):
        NoisePrior.from_dict({"kind": "pink"})
    with pytest.raises(ValueError, match="unknown noise prior keys: tau"):
        NoisePrior.from_dict({"kind": "bessel", "tau": 3})
    p = NoisePrior(kind="combined", length_um=12.0, fno_modes=(4, 3))
    assert NoisePrior.from_dict(p.to_dict()) == p
    assert NoisePrior.from_dict(None).kind == "white"


def test_values_at_points_equal_the_dense_field():
    prior = NoisePrior(kind="combined", length_um=4.0)
    H, W = 96, 80
    dense = prior.noise_window(9, 0, 0, H, 0, W, 0.5)
    g = torch.Generator().manual_seed(1)
    # two dense patches (the training layout) and a few stray points
    rr = torch.cat([torch.arange(10, 18).repeat_interleave(8), torch.arange(60, 68).repeat_interleave(8),
                    torch.randint(0, H, (5,), generator=g)])
    cc = torch.cat([torch.arange(40, 48).repeat(8), torch.arange(3, 11).repeat(8), torch.randint(0, W, (5,), generator=g)])
    assert torch.allclose(prior.at_points(9, 0, rr, cc, H, W, 0.5, block=8), dense[rr, cc], atol=1e-5)
    assert torch.allclose(prior.at_points(9, 0, rr, cc, H, W, 0.5, block=64), dense[rr, cc], atol=1e-5)
