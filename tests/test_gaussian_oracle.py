"""Gaussian-field oracle (evaluation/gaussian_oracle.py): the exact reference is right, independent tiles show
seams, averaging removes most of them, a zero coordinator is MultiDiffusion bit for bit. Small: N=48, B=16."""
import math

import numpy as np
import pytest
import torch

from evaluation.gaussian_oracle import (GaussianOracle, MaternField, field_metrics, karras_sigmas, line_profile,
                                        single_patch_check)
from models.patching import ZeroCoordinator

N, B, S, STEPS = 48, 16, 32, 16


@pytest.fixture(scope="module")
def oracle():
    return GaussianOracle(N, B)


def _bessel_k1(z: float) -> float:
    # K1(z) = ∫_0^∞ exp(−z cosh t) cosh t dt (trapezoid; smooth, decays fast)
    t = np.linspace(0.0, 12.0, 200001)
    f = np.exp(-z * np.cosh(t)) * np.cosh(t)
    return float(np.sum((f[1:] + f[:-1]) * 0.5 * (t[1] - t[0])))


def test_field_is_matern_nu1_with_the_reference_parameters():
    f = MaternField()
    assert f.cov[0, 0] == pytest.approx(0.25, rel=1e-9)
    for d in (8, 16, 32):  # Matérn ν=1: (r/ℓ)·K1(r/ℓ)
        want = (d / 16) * _bessel_k1(d / 16)
        assert f.cov[0, d] / f.cov[0, 0] == pytest.approx(want, abs=0.02), d
    x = f.sample_windows(64, 64, np.random.default_rng(0))
    m = field_metrics(x, 32)
    assert m["var"] == pytest.approx(0.25, rel=0.1)
    assert m["corr_8"] == pytest.approx(0.828, abs=0.04)
    assert m["seam_b"] == pytest.approx(1.0, abs=0.15)


def test_denoiser_is_the_bayes_estimator(oracle):
    d = oracle.denoiser
    sig = 0.3
    m = d.matrix(sig).double().numpy()
    cov = oracle.field.patch_covariance(B)
    want = cov @ np.linalg.inv(cov + sig * sig * np.eye(B * B))
    np.testing.assert_allclose(m, want.T, atol=2e-5)
    x = torch.randn(5, 1, B, B)
    torch.testing.assert_close(d(x, sig), d(x, torch.full((5,), sig)), atol=1e-4, rtol=1e-4)


def test_karras_sigmas():
    s = karras_sigmas(48)
    assert len(s) == 49 and s[0] == pytest.approx(80) and s[-2] == pytest.approx(0.002) and s[-1] == 0
    assert all(a > b for a, b in zip(s, s[1:]))


def test_single_patch_sampling_matches_exact(oracle):
    # one window = the exact global ODE: only the Heun discretisation (+4 % variance at 24 steps) and
    # sampling noise separate it from the field (analytic variance and correlation)
    r = single_patch_check(oracle, 256, steps=24)
    assert r["var"] == pytest.approx(0.25, rel=0.08)
    f = oracle.field
    assert r["corr_8"] == pytest.approx(f.cov[0, 8] / f.cov[0, 0], abs=0.03)


def test_independent_tiles_show_seams_and_averaging_removes_them(oracle):
    ind = field_metrics(oracle.sample("independent", S, 0, steps=STEPS), B)
    md = field_metrics(oracle.sample("multidiffusion", S, 0, steps=STEPS, stride=B // 4), B)
    assert ind["seam_b"] > 10
    assert md["seam_b"] <= 2.5 and md["seam_max"] <= 2.5
    assert md["var"] < 0.9 * 0.25  # averaging over-smooths (the loss a coordinator should win back)
    for comb in ("random", "offset", "mixture"):
        m = field_metrics(oracle.sample(comb, 8, 0, steps=8), B)
        assert math.isfinite(m["var"]) and 0.05 < m["var"] < 0.4, comb


def test_sampling_is_deterministic_and_batch_independent(oracle):
    a = oracle.sample("offset", 6, 3, steps=4, batch=6)
    b = oracle.sample("offset", 6, 3, steps=4, batch=4)
    assert torch.equal(a, b)


def test_zero_coordinator_is_multidiffusion_bit_for_bit(oracle):
    zc = ZeroCoordinator(B, B // 4)
    a = oracle.sample("dde", 4, 1, steps=6, stride=B // 4, coordinator=zc)
    b = oracle.sample("multidiffusion", 4, 1, steps=6, stride=B // 4)
    assert torch.equal(a, b)


def test_untrained_mixture_blend_coordinator_is_mixture_of_diffusers(oracle):
    """blend = mixture: the corrected windows are averaged with Gaussian weights, so at zero correction ``dde``
    is Mixture of Diffusers (and excess_by_sigma measures against it)."""
    from evaluation.gaussian_oracle import excess_by_sigma
    from models.dde.coordinator import CoordinatorConfig, DDECoordinator

    cfg = CoordinatorConfig(channels=1, patch=B, stride=B // 4, token=4, hidden=16, depth=1, heads=2,
                            attn_window=8, noise_input="sigma", scale="disagreement", blend="mixture")
    net = DDECoordinator(cfg).double()
    a = oracle.sample("dde", 3, 1, steps=4, stride=B // 4, coordinator=net)
    b = oracle.sample("mixture", 3, 1, steps=4, stride=B // 4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.allclose(b, oracle.sample("multidiffusion", 3, 1, steps=4, stride=B // 4))
    rows = excess_by_sigma(oracle, net, B // 4, sigmas=(0.5,), canvases=2)
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="blend must be uniform or mixture"):
        CoordinatorConfig(blend="gaussian").validate()


class _ScaleCoordinator(torch.nn.Module):
    """A one-parameter coordinator (correction = a·(output − noisy)) to check the plumbing and gradients."""

    def __init__(self):
        super().__init__()
        self.patch, self.stride = B, B // 2
        self.a = torch.nn.Parameter(torch.tensor(0.0))
        self.seen = []

    def correction(self, outputs, noisy, origins, cond, t):
        self.seen.append((outputs.shape, origins.clone(), t.clone()))
        return self.a * (outputs - noisy)


def test_excess_by_sigma_is_one_for_averaging_and_zero_for_the_exact_correction(oracle):
    from evaluation.gaussian_oracle import excess_by_sigma
    from models.patching import ZeroCoordinator

    rows = excess_by_sigma(oracle, ZeroCoordinator(B, B // 2), B // 2, sigmas=(0.1, 3.0), canvases=2)
    assert [r["sigma"] for r in rows] == [0.1, 3.0]
    assert all(r["excess_averaging"] > 0 and r["ratio"] == 1.0 for r in rows)

    class Exact:  # a correction that lands every window's output on the exact canvas denoiser's crop
        patch, stride = B, B // 2
        batches_canvases = True  # takes canvas=: the oracle corrects both canvases in one call

        def correction(self, outputs, noisy, origins, cond, t, *, canvas=None):
            out = torch.empty_like(outputs)
            for i in range(int(canvas.max()) + 1):
                sel = canvas == i
                x = torch.zeros(1, 1, N, N, dtype=outputs.dtype)
                for o, z in zip(origins[sel].tolist(), noisy[sel]):
                    x[0, :, o[0]:o[0] + B, o[1]:o[1] + B] = z
                ex = oracle.composite(x, t[sel][0], "exact")[0, 0]
                out[sel] = torch.stack([ex[o[0]:o[0] + B, o[1]:o[1] + B] for o in origins[sel].tolist()])[:, None]
            return out - outputs

    rows = excess_by_sigma(oracle, Exact(), B // 2, sigmas=(0.3,), canvases=2)
    assert rows[0]["ratio"] < 1e-20


def test_composite_backprops_through_a_coordinator(oracle):
    clean, noisy, sig = oracle.training_pairs(3, seed=5)
    c2, n2, s2 = oracle.training_pairs(3, seed=5)
    assert torch.equal(noisy, n2) and torch.equal(sig, s2) and (sig > 0).all()
    coord = _ScaleCoordinator()
    out = oracle.composite(noisy, sig, "dde", coord, stride=B // 2)
    assert out.shape == clean.shape
    shape, origins, t = coord.seen[0]
    assert shape == (25, 1, B, B) and origins.tolist()[:2] == [[0, 0], [0, 8]]
    assert torch.allclose(t, sig[0].expand(25))
    loss = ((out - clean) ** 2).mean()
    loss.backward()
    assert coord.a.grad is not None and coord.a.grad.abs() > 0
    with torch.no_grad():
        coord.a.fill_(0.5)
        moved = oracle.composite(noisy, sig, "dde", coord, stride=B // 2)
        plain = oracle.composite(noisy, sig, "multidiffusion", stride=B // 2)
    assert not torch.allclose(moved, plain)


def test_exact_combiner_is_the_whole_canvas_bayes_denoiser_and_a_paired_reference(oracle):
    from evaluation.gaussian_oracle import PatchBayesDenoiser

    x = torch.randn(3, 1, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = oracle.composite(x, 0.7, "exact")
    want = PatchBayesDenoiser(oracle.field, N)(x, 0.7)  # the cached-matrix path: same map
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # sampled from the combiners' initial noise: no seams, and averaging's variance shortfall shows against it
    ex = field_metrics(oracle.sample("exact", S, 0, steps=STEPS), B)
    md = field_metrics(oracle.sample("multidiffusion", S, 0, steps=STEPS, stride=B // 4), B)
    assert ex["seam_max"] < 1.5 and md["var"] < 0.8 * ex["var"]
    with pytest.raises(ValueError, match="square canvases"):
        oracle.composite(x[..., :40], 0.7, "exact")


def test_line_profile_finds_a_seam_line_by_line():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 24, 24)).cumsum(-1).cumsum(-2) * 0.1  # smooth-ish field
    flat = line_profile(x)
    x[..., :, 10:] += 3.0  # a step between columns 9 and 10: line 10
    seamed = line_profile(x)
    assert flat.shape == seamed.shape == (23,)
    assert int(np.argmax(seamed)) == 9 and seamed[9] > 5 * flat[9]
    assert np.median(seamed) == pytest.approx(1.0)
