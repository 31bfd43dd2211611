"""DiffInfinite sampler, overlapping-window modes (independent, multidiffusion, mixture, dde): ε̃ blended with
models/patching.py weights, deterministic, batch-size independent, resumable mid-step, dde with a zero
coordinator = multidiffusion bit for bit, independent windows leave seams that averaging removes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.diffinfinite.guidance import ImageDenoiser
from models.diffinfinite.scheduler import DDIMScheduler
from models.diffinfinite.sampler import STATE_VERSION, WINDOW_MODES, RandomPatchSampler, SamplerState
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig
from models.patching import ZeroCoordinator, plan_windows
from models.runtime import Canceled


@pytest.fixture(scope="module")
def image_unet() -> ImageUNet:
    torch.manual_seed(0)
    return ImageUNet(ImageUNetConfig.tiny(5)).eval().requires_grad_(False)


class PointwiseNet(torch.nn.Module):
    """A per-pixel 'network' (no spatial context, exactly batch-invariant) with the UNet's call signature."""

    def forward(self, x, t, y):
        return torch.tanh(x) * 0.5 + 0.1 * y.float() + 1e-4 * t.float().view(-1, 1, 1, 1)


def _labels(h: int, w: int) -> np.ndarray:
    lab = np.zeros((h, w), np.uint8)
    lab[h // 5: 3 * h // 5, w // 6: w // 2] = 1
    lab[h // 2:, 2 * w // 3:] = 3
    return lab


def _sampler(net, mode, steps=3, batch_size=4, patch=32, guidance=2.0, **kw) -> RandomPatchSampler:
    return RandomPatchSampler(ImageDenoiser(net), patch=patch, mode=mode, steps=steps, guidance=guidance,
                              batch_size=batch_size, multiple=4, **kw)


@pytest.mark.parametrize("mode", WINDOW_MODES)
def test_window_modes_sample_deterministically(image_unet, mode):
    lab = _labels(40, 72)
    seen = []

    def on_step(state):
        assert state.eps is None and state.weight is None and state.windows is None and state.cursor == 0
        assert bool((state.times == state.step).all())
        seen.append(state.step)

    s = _sampler(image_unet, mode)
    a = s.sample(lab, seed=1, on_step=on_step)
    assert seen == [1, 2, 3] and a.shape == (1, 4, 40, 72) and torch.isfinite(a).all()
    assert torch.equal(a, _sampler(image_unet, mode).sample(lab, seed=1))
    assert not torch.allclose(a, _sampler(image_unet, mode).sample(lab, seed=2))
    # stats: every window runs the null pass + one pass per label present in it; one window shape per call
    plan = s.window_plan((40, 72))
    passes = sum(1 + len([u for u in np.unique(lab[y:y + 32, x:x + 32]) if u]) for y, x in plan.origins)
    for st in s.stats.values():
        assert st.crops == len(plan) and st.forwards == passes and st.calls == st.batches == -(-passes // 4)
        assert st.crop_pixels == len(plan) * 32 * 32


def test_small_canvas(image_unet):
    out = _sampler(image_unet, "multidiffusion").sample(_labels(20, 12), seed=0)
    assert out.shape == (1, 4, 20, 12) and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["multidiffusion", "mixture", "dde"])
def test_batch_size_independence_is_exact(mode):
    """With a batch-invariant network the result does not depend on batch_size bit for bit (windows are added
    to the sums one at a time in plan order whatever the batching)."""
    net, lab = PointwiseNet(), _labels(40, 72)
    a = _sampler(net, mode, batch_size=1).sample(lab, seed=3)
    for bs in (3, 7, 64):
        assert torch.equal(a, _sampler(net, mode, batch_size=bs).sample(lab, seed=3))


@pytest.mark.parametrize("mode", ["multidiffusion", "dde"])
def test_resume_mid_step_bit_identical(image_unet, mode, tmp_path):
    lab = _labels(40, 72)
    full = _sampler(image_unet, mode).sample(lab, seed=9)
    s = _sampler(image_unet, mode)
    state = s.init_state(lab, seed=9)

    def cancel():
        return state.step == 1 and state.cursor >= 3

    with pytest.raises(Canceled):
        s.run(state, lab, cancel=cancel)
    assert state.step == 1 and 3 <= state.cursor < 8
    if mode == "dde":
        assert state.windows is not None and state.windows.shape == (8, 4, 32, 32)
    else:
        assert state.weight is not None and float(state.weight.max()) > 0
    restored = SamplerState.load(state.save(tmp_path / "state.pt"))
    assert restored.version == STATE_VERSION
    out = _sampler(image_unet, mode, batch_size=3).run(restored, lab)  # another batch grid
    assert torch.allclose(full, out, atol=1e-4)
    out_same = _sampler(image_unet, mode).run(SamplerState.load(tmp_path / "state.pt"), lab)
    assert torch.equal(full, out_same)


class RecordingCoordinator:
    def __init__(self, scale=0.0):
        self.patch, self.stride, self.scale, self.calls, self.outputs = 32, 16, scale, [], []

    def correction(self, outputs, noisy, origins, cond, t):
        self.calls.append((outputs.shape, noisy.shape, origins.clone(), cond.clone(), t.clone()))
        self.outputs.append(outputs.clone())
        return self.scale * outputs


class GridRecordingCoordinator(RecordingCoordinator):
    """A coordinator whose attention grid moves per sampling step: records the offsets it is given."""
    moves_grid = True

    def __init__(self):
        super().__init__(0.0)
        self.grids = []

    def grid_for_step(self, step):
        return torch.tensor([float(step), 0.0])

    def correction(self, outputs, noisy, origins, cond, t, grid=None):
        self.grids.append(grid)
        return super().correction(outputs, noisy, origins, cond, t)


def test_a_moving_grid_coordinator_gets_each_steps_offset(image_unet):
    lab = _labels(40, 72)
    rec = GridRecordingCoordinator()
    _sampler(image_unet, "dde", coordinator=rec).sample(lab, seed=5)  # 3 steps, guided, shared: one call a step
    assert [g.tolist() for g in rec.grids] == [[k, 0.0] for k in (0, 1, 2)]
    rec = GridRecordingCoordinator()
    _sampler(image_unet, "dde", coordinator=rec, null_condition="null").sample(lab, seed=5)  # Eq. 6: two a step
    assert [g.tolist() for g in rec.grids] == [[k, 0.0] for k in (0, 0, 1, 1, 2, 2)]


class MixtureBlendZero(ZeroCoordinator):
    """An untrained coordinator trained to be averaged with Mixture of Diffusers' Gaussian weights."""
    config = type("Config", (), {"blend": "mixture"})()


def test_zero_mixture_blend_coordinator_dde_is_mixture(image_unet):
    lab = _labels(40, 72)
    mix0 = _sampler(image_unet, "mixture", guidance=0.0).sample(lab, seed=5)
    dde0 = _sampler(image_unet, "dde", guidance=0.0, coordinator=MixtureBlendZero(32, 16)).sample(lab, seed=5)
    assert torch.equal(mix0, dde0)
    md0 = _sampler(image_unet, "multidiffusion", guidance=0.0).sample(lab, seed=5)
    assert not torch.equal(md0, dde0)


def test_zero_coordinator_dde_is_multidiffusion(image_unet):
    lab = _labels(40, 72)
    md = _sampler(image_unet, "multidiffusion").sample(lab, seed=5)
    assert torch.equal(md, _sampler(image_unet, "dde").sample(lab, seed=5))
    # unguided (ω = 0): one coordinator call per step on the windows' ε, bit for bit MultiDiffusion at zero
    md0 = _sampler(image_unet, "multidiffusion", guidance=0.0).sample(lab, seed=5)
    assert torch.equal(md0, _sampler(image_unet, "dde", guidance=0.0, coordinator=ZeroCoordinator(32, 16))
                       .sample(lab, seed=5))
    # guided (ω = 2): DDE's Eq. 6 — the conditional and the null predictions are corrected apart and blended,
    # then guided: (1+ω)·avg(ε(c)) − ω·avg(ε(∅)) equals MultiDiffusion's avg((1+ω)·ε(c) − ω·ε(∅)) up to rounding
    zero = _sampler(image_unet, "dde", coordinator=ZeroCoordinator(32, 16), null_condition="labels").sample(lab, seed=5)
    torch.testing.assert_close(zero, md, rtol=0, atol=1e-5)
    rec = RecordingCoordinator(0.0)
    torch.testing.assert_close(_sampler(image_unet, "dde", coordinator=rec, null_condition="labels").sample(lab, seed=5),
                               md, rtol=0, atol=1e-5)
    assert len(rec.calls) == 6  # two per step: the conditional windows, then the null windows
    assert not torch.equal(rec.outputs[0], rec.outputs[1])
    out_shape, noisy_shape, origins, cond, t = rec.calls[0]
    plan = plan_windows("dde", (40, 72), 32, 16)
    assert out_shape == noisy_shape == (len(plan), 4, 32, 32)
    assert origins.tolist() == plan.origins.tolist()
    assert cond.shape == (len(plan), 1, 32, 32) and cond.dtype == torch.long
    assert torch.equal(cond[1, 0], torch.from_numpy(_labels(40, 72)[0:32, 16:48]).long())
    # "labels": the null windows are corrected with the mask's labels too; DDE's Eq. 6 (null_condition="null")
    # gives them the null map
    assert torch.equal(rec.calls[1][3], cond)
    paper = RecordingCoordinator(0.0)
    _sampler(image_unet, "dde", coordinator=paper, null_condition="null").sample(lab, seed=5)
    null_cond = paper.calls[1][3]
    assert torch.equal(paper.calls[0][3], cond) and bool((cond != 0).any())
    assert null_cond.shape == cond.shape and bool((null_cond == 0).all())
    with pytest.raises(ValueError, match="null_condition must be one of"):
        _sampler(image_unet, "dde", null_condition="empty")
    assert t.shape == (len(plan),) and len(set(t.tolist())) == 1
    moved = _sampler(image_unet, "dde", coordinator=RecordingCoordinator(0.5)).sample(lab, seed=5)
    assert not torch.allclose(moved, md)


def test_shared_null_condition_adds_the_conditional_correction_to_the_guided_windows(image_unet):
    """``null_condition="shared"``: one coordinator pass per step over the conditional windows (with the labels);
    its correction δ is added to the guided windows, so the canvas is avg((1+ω)ε(c) − ωε(∅)) + avg(δ)."""
    lab = _labels(40, 72)
    md = _sampler(image_unet, "multidiffusion").sample(lab, seed=5)
    rec = RecordingCoordinator(0.0)
    zero = _sampler(image_unet, "dde", coordinator=rec).sample(lab, seed=5)  # shared: the default
    torch.testing.assert_close(zero, md, rtol=0, atol=1e-5)
    assert len(rec.calls) == 3  # one per step
    eq6 = RecordingCoordinator(0.0)
    _sampler(image_unet, "dde", coordinator=eq6, null_condition="labels").sample(lab, seed=5)
    assert torch.equal(rec.outputs[0], eq6.outputs[0])  # the conditional windows
    assert torch.equal(rec.calls[0][3], eq6.calls[0][3])  # with the mask's labels
    # one DDIM step to x̂0 (unclipped) is affine in ε̃: x̂0(ε̃ + avg(δ)) − x̂0(ε̃) = x̂0(ε(c) + δ) − x̂0(ε(c)) at
    # ω = 0, so with δ = s·ε(c) the shared canvas moves from MultiDiffusion's guided one by s × the unguided move
    # (from t = 999, x̂0 = (x − √(1−ᾱ)·ε̃)/√ᾱ reaches ≈ 1e5: float32 rounding, hence the relative tolerance)
    def one_step(guidance=2.0, **kw):
        return _sampler(image_unet, steps=1, guidance=guidance, scheduler=DDIMScheduler(clip_sample=False),
                        **kw).sample(lab, seed=5)

    guided, plain = one_step(mode="multidiffusion"), one_step(0.0, mode="multidiffusion")
    unguided_move = one_step(0.0, mode="dde", coordinator=RecordingCoordinator(1.0)) - plain
    assert unguided_move.abs().max() > 0.01
    for scale in (0.5, -1.0):
        shared = one_step(mode="dde", coordinator=RecordingCoordinator(scale), null_condition="shared")
        torch.testing.assert_close(shared - guided, scale * unguided_move, rtol=0,
                                   atol=1e-6 * float(guided.abs().max()))
    # the paper's Eq. 6 with the same coordinator moves it otherwise: the guidance multiplies the correction
    eq6_move = one_step(mode="dde", coordinator=RecordingCoordinator(0.5), null_condition="labels") - guided
    assert (eq6_move - 0.5 * unguided_move).abs().max() > 1e-2 * unguided_move.abs().max()


class WindowCornerNet(torch.nn.Module):
    """A network with window-wide context: ε = 0.9·x + half the window's corner pixel. Neighbouring windows
    have different corners, so whatever a window predicts jumps where its window ends."""

    def forward(self, x, t, y):
        return 0.9 * x + 0.5 * x[..., :1, :1]


def _line_seam(lat: torch.Tensor, line: int) -> float:
    lat = lat.double()
    jy = ((lat[..., 1:, :] - lat[..., :-1, :]) ** 2).mean(dim=(0, 1, 3))
    jx = ((lat[..., :, 1:] - lat[..., :, :-1]) ** 2).mean(dim=(0, 1, 2))
    j = 0.5 * (jy + jx)  # j[k]: between pixels k and k + 1
    return float(j[line - 1] / j.median())


def test_independent_windows_leave_seams_that_averaging_removes():
    """One DDIM step (the result is the x̂0 of the step's ε̃): independent windows jump at their common edge,
    multidiffusion at stride P/4 spreads the change over the overlap."""
    lab = np.zeros((96, 96), np.uint8)
    net = WindowCornerNet()
    ind = _sampler(net, "independent", steps=1, guidance=0.0).sample(lab, seed=0)
    md = _sampler(net, "multidiffusion", steps=1, guidance=0.0, window_stride=8).sample(lab, seed=0)
    s_ind, s_md = _line_seam(ind, 32), _line_seam(md, 32)
    assert s_ind > 5.0 and s_md < 2.0, (s_ind, s_md)


def test_state_v1_loads_and_unknown_versions_are_refused(image_unet):
    lab = _labels(40, 72)
    s = _sampler(image_unet, "tiled")
    d = s.init_state(lab, seed=0).to_dict()
    d.pop("weight"), d.pop("windows")
    d["version"] = 1
    st = SamplerState.from_dict(d)
    assert st.weight is None and st.windows is None
    s.run(st, lab)
    d["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        SamplerState.from_dict(d)


def test_window_settings_are_part_of_the_state(image_unet):
    lab = _labels(40, 72)
    st = _sampler(image_unet, "multidiffusion", window_stride=8).init_state(lab, seed=0)
    with pytest.raises(ValueError, match="tiling"):
        _sampler(image_unet, "multidiffusion").run(st, lab)


def test_bad_window_settings(image_unet):
    with pytest.raises(ValueError, match="window_stride"):
        _sampler(image_unet, "multidiffusion", window_stride=40)
    with pytest.raises(ValueError, match="square"):
        _sampler(image_unet, "mixture", patch=(32, 16))
    with pytest.raises(ValueError, match="coordinator"):
        _sampler(image_unet, "multidiffusion", coordinator=ZeroCoordinator(32, 16))

    class Bad(RecordingCoordinator):
        def correction(self, outputs, noisy, origins, cond, t):
            return outputs[:, :1]

    with pytest.raises(ValueError, match="correction has shape"):
        _sampler(image_unet, "dde", coordinator=Bad()).sample(_labels(40, 72), seed=0)
