"""models/patching.py: window plans cover every pixel, blending is the weighted mean, zero coordinator = averaging."""
import numpy as np
import pytest
import torch

from models.patching import (BlendAccumulator, PatchCoordinator, ZeroCoordinator, axis_starts, blend, combine,
                             overlap_count, plan_windows)


@pytest.mark.parametrize("length,patch,stride,want", [
    (64, 32, 16, [0, 16, 32]), (70, 32, 16, [0, 16, 32, 38]), (64, 32, 32, [0, 32]), (50, 32, 32, [0, 18]),
    (20, 32, 16, [0]), (32, 32, 8, [0])])
def test_axis_starts_clamp_last_window_inward(length, patch, stride, want):
    assert axis_starts(length, patch, stride) == want


@pytest.mark.parametrize("combiner", ["independent", "multidiffusion", "mixture", "dde"])
@pytest.mark.parametrize("canvas", [(70, 45), (20, 13), (32, 100)])
def test_plans_cover_every_pixel(combiner, canvas):
    plan = plan_windows(combiner, canvas, 32)
    h, w = plan.size
    assert (h, w) == (min(32, canvas[0]), min(32, canvas[1]))
    assert (plan.origins[:, 0] + h <= canvas[0]).all() and (plan.origins[:, 1] + w <= canvas[1]).all()
    cnt = overlap_count(plan)
    assert bool((cnt >= 1).all())
    if combiner == "independent" and canvas == (32, 100):
        assert cnt.max() == 2  # only the clamped last window overlaps


def test_blend_is_weighted_mean_and_order_of_batches_irrelevant():
    g = torch.Generator().manual_seed(0)
    plan = plan_windows("mixture", (50, 41), 16, stride=6, sigma=0.2)
    out = torch.randn(len(plan), 3, 16, 16, generator=g)
    canvas = blend(out, plan.origins, plan.weight, plan.canvas)
    # reference: explicit per-pixel weighted mean in float64
    num = np.zeros((3, 50, 41)); den = np.zeros((50, 41))
    for (y, x), o in zip(plan.origins, out.double().numpy()):
        num[:, y:y + 16, x:x + 16] += plan.weight.double().numpy() * o
        den[y:y + 16, x:x + 16] += plan.weight.double().numpy()
    np.testing.assert_allclose(canvas.numpy(), num / den, rtol=1e-4, atol=1e-5)
    acc = BlendAccumulator(3, plan.canvas)
    for a in range(0, len(plan), 5):  # batches of 5, saved and restored between them
        acc = BlendAccumulator.restore(acc.num.clone(), acc.den.clone())
        acc.add(out[a:a + 5], plan.origins[a:a + 5], plan.weight)
    assert torch.equal(acc.result(), canvas)


def test_independent_blend_is_a_copy_and_constant_is_preserved():
    plan = plan_windows("independent", (64, 64), 32)
    x = torch.randn(2, 64, 64)
    assert torch.equal(blend(plan.crops(x), plan.origins, plan.weight, plan.canvas), x)
    for comb in ("multidiffusion", "mixture"):
        p = plan_windows(comb, (70, 53), 32, stride=8)
        c = blend(torch.full((len(p), 1, 32, 32), 0.7), p.origins, p.weight, p.canvas)
        torch.testing.assert_close(c, torch.full_like(c, 0.7))


def test_zero_coordinator_is_multidiffusion_bit_for_bit():
    zc = ZeroCoordinator(16, 8)
    assert isinstance(zc, PatchCoordinator)
    dde = plan_windows("dde", (40, 40), 16, stride=8)
    md = plan_windows("multidiffusion", (40, 40), 16, stride=8)
    out = torch.randn(len(dde), 4, 16, 16)
    a = combine(dde, out, noisy=out, t=torch.ones(len(dde)), coordinator=zc)
    b = combine(md, out)
    assert torch.equal(a, b)


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match="combiner"):
        plan_windows("quilt", (10, 10), 4)
    with pytest.raises(ValueError, match="stride"):
        plan_windows("multidiffusion", (10, 10), 4, stride=5)
    with pytest.raises(ValueError, match="sigma"):
        plan_windows("mixture", (10, 10), 4, sigma=0)
