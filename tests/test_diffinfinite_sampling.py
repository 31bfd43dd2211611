"""DiffInfinite sampling: DDIM schedule, per-label CFG, random-patch / tiled sampler, resumable state."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.diffinfinite.guidance import NULL, ImageDenoiser, MaskDenoiser, cfg, combine, guided_eps, passes_for
from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig
from models.diffinfinite.sampler import (
    RandomPatchSampler,
    SamplerState,
    plan_random,
    plan_tiled,
    tile_offset,
    _np_rng,
)
from models.diffinfinite.scheduler import DDIMScheduler, cosine_alphas_cumprod, ddim_time_pairs
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig
from models.runtime import Canceled




@pytest.fixture(scope="module")
def image_unet() -> ImageUNet:
    torch.manual_seed(0)
    return ImageUNet(ImageUNetConfig.tiny(5)).eval().requires_grad_(False)


def _labels(h: int, w: int) -> np.ndarray:
    """Unknown background, a carcinoma block, a stroma block touching the border."""
    lab = np.zeros((h, w), np.uint8)
    lab[h // 5: 3 * h // 5, w // 6: w // 2] = 1
    lab[h // 2:, 2 * w // 3:] = 3
    return lab


def _sampler(unet, mode="random", steps=3, guidance=2.0, batch_size=4, patch=32, **kw) -> RandomPatchSampler:
    return RandomPatchSampler(ImageDenoiser(unet), patch=patch, mode=mode, steps=steps, guidance=guidance,
                              batch_size=batch_size, multiple=unet.config.downsample_factor, **kw)


# ------------------------------------------------------------------------------------------------ scheduler
def test_cosine_schedule_and_time_pairs():
    a = cosine_alphas_cumprod()
    assert a.shape == (1000,)
    assert a[999].item() == pytest.approx(2.43e-9, rel=0.01)
    assert a[3].item() == pytest.approx(0.999806, abs=2e-6)
    assert bool((a[1:] < a[:-1]).all())
    pairs = ddim_time_pairs(250)
    assert len(pairs) == 250 and pairs[0] == (999, 995) and pairs[1] == (995, 991)
    assert pairs[-2:] == [(7, 3), (3, -1)]
    assert all(t > tn for t, tn in pairs)
    assert ddim_time_pairs(1) == [(999, -1)]
    with pytest.raises(ValueError):
        ddim_time_pairs(0)


def test_ddim_step_formula_clipping_and_final_pair():
    s = DDIMScheduler(eta=0.7)
    s.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(2, 4, 5, 5, generator=g) for _ in range(3))
    t, tn = s.pairs[10]
    a, an = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[tn])
    x0 = ((x.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)).clamp(-1, 1)
    sigma = 0.7 * math.sqrt((1 - an) / (1 - a)) * math.sqrt(1 - a / an)
    want = math.sqrt(an) * x0 + math.sqrt(1 - an - sigma ** 2) * eps.double() + sigma * z.double()
    out = s.step(eps, t, x, noise=z)
    assert torch.allclose(out.prev_sample.double(), want, atol=1e-5)
    assert float(out.pred_original_sample.abs().max()) <= 1.0
    # η = 0: deterministic, noise ignored
    s0 = DDIMScheduler(eta=0.0)
    s0.set_timesteps(50)
    assert torch.equal(s0.step(eps, t, x, noise=z).prev_sample, s0.step(eps, t, x, noise=-z).prev_sample)
    # the last pair (t_next = -1) returns the clipped x̂0
    t_last, tn_last = s.pairs[-1]
    assert tn_last == -1
    last = s.step(eps, t_last, x, noise=z)
    assert torch.equal(last.prev_sample, last.pred_original_sample)


# ------------------------------------------------------------------------------------------------ guidance
def test_cfg_formula_and_passes():
    ec, eu = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.25, 1.0, -1.0])
    assert torch.allclose(cfg(ec, eu, 3.0), 4.0 * ec - 3.0 * eu)
    assert torch.allclose(cfg(ec, eu, 3.0), eu + 4.0 * (ec - eu))
    assert torch.equal(cfg(ec, None, 0.0), ec)
    with pytest.raises(ValueError):
        cfg(ec, None, 1.0)
    # image model: label 0 = null / unknown; one shared null pass per crop
    assert passes_for({0, 3, 2}, 3.0, 0) == [NULL, 2, 3]
    assert passes_for({2}, 3.0, 0) == [NULL, 2]
    assert passes_for({2}, 0.0, 0) == [2]
    assert passes_for({0, 2}, 0.0, 0) == [NULL, 2]
    assert passes_for({0}, 5.0, 0) == [NULL]
    # mask model: no null label, every subtype is a condition
    assert passes_for({0, 1}, 0.0, None) == [0, 1]
    assert passes_for({1}, 2.0, None) == [NULL, 1]
    lw = torch.tensor([[0, 2], [3, 2]])
    preds = {NULL: torch.full((1, 2, 2), -1.0), 2: torch.full((1, 2, 2), 2.0), 3: torch.full((1, 2, 2), 3.0)}
    out = combine(lw, preds, 1.0, 0)
    assert out.tolist() == [[[-1.0, 5.0], [7.0, 5.0]]]  # 0 → ε(∅); u → 2ε(u) − ε(∅)


def test_per_label_guided_prediction_matches_direct_calls(image_unet):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 32, 32, generator=g)
    lw = torch.zeros(2, 32, 32, dtype=torch.uint8)
    lw[0, 4:20, 6:30] = 1
    lw[0, 22:, :10] = 3
    lw[1] = 2
    t = torch.tensor([700, 700])
    omega = 2.5
    eps, forwards = guided_eps(ImageDenoiser(image_unet), x, t, lw, omega)
    assert forwards == 3 + 2  # crop 0: null + 1 + 3 ; crop 1: null + 2 (official: 5 + 2)
    with torch.inference_mode():
        null = image_unet(x, t, torch.zeros(2, 1, 32, 32, dtype=torch.long))
        want = null.clone()
        for b, u in ((0, 1), (0, 3), (1, 2)):
            m = (lw[b:b + 1, None].long() == u).long() * u
            e_u = image_unet(x[b:b + 1], t[b:b + 1], m)[0]
            sel = lw[b] == u
            want[b][:, sel] = ((1 + omega) * e_u - omega * null[b])[:, sel]
    assert torch.allclose(eps, want, atol=1e-5)


def test_mask_denoiser_forces_condition_and_uses_null():
    torch.manual_seed(0)
    unet = MaskUNet(MaskUNetConfig.tiny()).eval()
    d = MaskDenoiser(unet)
    x = torch.randn(3, 4, 16, 16)
    t = torch.tensor([500, 500, 500])
    out = d(x, t, torch.zeros(3, 16, 16, dtype=torch.uint8), [0, 1, NULL])
    with torch.inference_mode():
        c = unet(x[:2], t[:2], torch.tensor([0, 1]), cond_drop_prob=0.0)
        n = unet(x[2:], t[2:], torch.tensor([0]), cond_drop_prob=1.0)
    assert torch.allclose(out[:2], c, atol=1e-5) and torch.allclose(out[2:], n, atol=1e-5)
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # the subtype changes the prediction


# ------------------------------------------------------------------------------------------------ plans
@pytest.mark.parametrize("fit", [False, True])
@pytest.mark.parametrize("shape,patch,margin", [((150, 230), (64, 64), 0), ((40, 100), (64, 64), 0),
                                                ((37, 53), (16, 16), 0), ((150, 230), (64, 64), 8)])
def test_plans_cover_every_pixel_exactly_once(shape, patch, margin, fit):
    lab = _labels(*shape)
    cells = (patch[0] - 2 * margin, patch[1] - 2 * margin)
    for step in range(3):
        for crops in (plan_random(lab, patch, _np_rng(7, 0, 3, step)),
                      plan_tiled(lab, patch, tile_offset(7, 0, cells, step), margin, edges="fit" if fit else "full",
                                 multiple=8)):
            owner = np.full(shape, -1)
            for i, c in enumerate(crops):
                full = (min(patch[0], shape[0]), min(patch[1], shape[1]))
                if c.cell is None or not fit:
                    assert (c.h, c.w) == full
                else:  # fitted windows: multiples of 8 (or the whole axis), ≥ half a patch, ≤ a patch
                    for n, p_, size in ((c.h, patch[0], shape[0]), (c.w, patch[1], shape[1])):
                        assert n == size if size <= p_ else (n % 8 == 0 and p_ // 2 <= n <= p_)
                assert 0 <= c.y0 <= shape[0] - c.h and 0 <= c.x0 <= shape[1] - c.w
                win = owner[c.y0:c.y0 + c.h, c.x0:c.x0 + c.w]
                if c.cell is None:  # first come: the uncovered part of the window
                    own = win == -1
                else:
                    cy, cx, ch, cw = c.cell
                    own = np.zeros_like(win, dtype=bool)
                    own[cy - c.y0:cy - c.y0 + ch, cx - c.x0:cx - c.x0 + cw] = True
                    assert (win[own] == -1).all()  # cells never overlap
                    assert ch <= cells[0] and cw <= cells[1]
                    assert c.y0 <= cy and cy + ch <= c.y0 + c.h and c.x0 <= cx and cx + cw <= c.x0 + c.w
                    if margin:  # context on both sides, away from the canvas border
                        assert cy - c.y0 >= min(margin, cy) and c.y0 + c.h - (cy + ch) >= min(margin, shape[0] - cy - ch)
                        assert cx - c.x0 >= min(margin, cx) and c.x0 + c.w - (cx + cw) >= min(margin, shape[1] - cx - cw)
                assert own.sum() == c.n_owned >= 1
                assert set(c.labels) == set(np.unique(lab[c.y0:c.y0 + c.h, c.x0:c.x0 + c.w][own]).tolist())
                win[own] = i
            assert (owner >= 0).all()


def test_fitted_edge_windows_cut_the_tiled_work():
    lab = np.zeros((256, 256), np.uint8)  # a 2048² output
    full = fit = 0
    for k in range(16):
        off = tile_offset(3, 0, (64, 64), k)
        full += sum(c.h * c.w for c in plan_tiled(lab, (64, 64), off))
        fit += sum(c.h * c.w for c in plan_tiled(lab, (64, 64), off, edges="fit", multiple=8))
    assert fit < 0.8 * full and fit >= 16 * lab.size  # less work, still at least the canvas per step


def test_random_plan_reproduces_official_crop_count():
    lab = np.zeros((256, 256), np.uint8)  # a 2048² output, 512-px crops
    counts = [len(plan_random(lab, (64, 64), _np_rng(11, 0, 3, k))) for k in range(12)]
    assert 31 <= np.mean(counts) <= 40  # official selection rule: 35.5 ± 2.3 crops per level


def test_tiled_offsets_move_every_step():
    offs = [tile_offset(5, 0, (16, 16), k) for k in range(64)]
    assert all(a != b for a, b in zip(offs[:-1], offs[1:]))
    for c in range(4):  # each cycle of 16 steps uses every offset once per axis
        assert sorted(o[0] for o in offs[16 * c:16 * c + 16]) == list(range(16))
        assert sorted(o[1] for o in offs[16 * c:16 * c + 16]) == list(range(16))
    assert offs == [tile_offset(5, 0, (16, 16), k) for k in range(64)]


# ------------------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("mode", ["random", "tiled"])
def test_determinism_coverage_and_batch_size(image_unet, mode):
    lab = _labels(40, 72)
    seen = []

    def on_step(state: SamplerState) -> None:  # every pixel advanced exactly one level per step
        assert state.eps is None and state.cursor == 0
        assert bool((state.times == state.step).all())
        seen.append(state.step)

    a = _sampler(image_unet, mode).sample(lab, seed=1, on_step=on_step)
    assert seen == [1, 2, 3]
    b = _sampler(image_unet, mode).sample(lab, seed=1)
    assert a.shape == (1, 4, 40, 72) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, _sampler(image_unet, mode).sample(lab, seed=2))
    c = _sampler(image_unet, mode, batch_size=1).sample(lab, seed=1)
    assert torch.allclose(a, c, atol=1e-4)  # same noise and crops; only the network's batch numerics differ


def test_every_pixel_takes_its_own_label_prediction(image_unet):
    """One DDIM step (999 → −1, no clipping) exposes ε̃ per pixel; rebuild it crop by crop, first come."""
    lab = _labels(32, 56)
    omega = 1.5
    sched = DDIMScheduler(clip_sample=False)
    sampler = RandomPatchSampler(ImageDenoiser(image_unet), patch=32, mode="random", steps=1, guidance=omega,
                                 batch_size=3, multiple=4, scheduler=sched)
    state = sampler.init_state(lab, seed=4)
    x_t = state.latents.clone()
    out = sampler.run(state, lab)
    a = float(sched.alphas_cumprod[999])
    eps = (x_t.double() - math.sqrt(a) * out.double()) / math.sqrt(1 - a)

    want = torch.full_like(x_t, float("nan"))
    lab_t = torch.from_numpy(lab)
    with torch.inference_mode():
        for crop in sampler.plan(lab, 4, 0):
            ys, xs = crop.window
            xc, lw = x_t[:, :, ys, xs], lab_t[ys, xs]
            t = torch.tensor([999])
            null = image_unet(xc, t, torch.zeros(1, 1, *lw.shape, dtype=torch.long))[0]
            pred = null.clone()
            for u in np.unique(lw.numpy()):
                if u == 0:
                    continue
                e_u = image_unet(xc, t, ((lw == u).long() * int(u))[None, None])[0]
                pred[:, lw == int(u)] = ((1 + omega) * e_u - omega * null)[:, lw == int(u)]
            win = want[0, :, ys, xs]
            first = torch.isnan(win[0])
            win[:, first] = pred[:, first]
    assert not torch.isnan(want).any()
    assert torch.allclose(eps.float(), want, atol=1e-4)


@pytest.mark.parametrize("mode", ["random", "tiled"])
def test_save_restore_between_and_within_steps(image_unet, mode, tmp_path):
    lab = _labels(40, 72)
    saved = {}

    def on_step(state):
        if state.step == 1:
            saved["d"] = state.to_dict()

    full = _sampler(image_unet, mode, steps=3).sample(lab, seed=9, on_step=on_step)
    resumed = _sampler(image_unet, mode, steps=3).run(SamplerState.from_dict(saved["d"]), lab)
    assert torch.equal(full, resumed)

    # interrupt in the middle of step 1, checkpoint to disk, resume in a fresh sampler with another batch grid
    s = _sampler(image_unet, mode, steps=3)
    state = s.init_state(lab, seed=9)

    def cancel():  # checked before every step and every UNet batch
        return state.step == 1 and state.cursor >= 2

    with pytest.raises(Canceled):
        s.run(state, lab, cancel=cancel)
    assert state.step == 1 and state.eps is not None and 0 < state.cursor
    assert bool(((state.times == 1) | (state.times == 2)).all()) and bool((state.times == 2).any())
    path = state.save(tmp_path / "state.pt")
    restored = SamplerState.load(path)
    out = _sampler(image_unet, mode, steps=3).run(restored, lab)
    assert torch.equal(full, out)


def test_final_steps_use_the_context_margin(image_unet):
    lab = _labels(70, 90)
    s = _sampler(image_unet, "tiled", steps=3, final_tile_margin=6, final_tile_steps=1)
    assert [s.tile_margin_at(k) for k in range(3)] == [0, 0, 6]
    for k, cell in ((0, 32), (2, 20)):
        crops = s.plan(lab, 0, k)
        assert max(c.cell[2] for c in crops) == cell and max(c.cell[3] for c in crops) == cell
    out = s.sample(lab, seed=0, on_step=lambda st: None)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="final_tile_margin"):
        _sampler(image_unet, "tiled", final_tile_margin=16)


def test_state_refuses_another_job(image_unet):
    lab = _labels(40, 72)
    s = _sampler(image_unet, "random", steps=2)
    state = s.init_state(lab, seed=1)
    other = lab.copy()
    other[0, 0] = 3
    with pytest.raises(ValueError, match="labels_crc"):
        s.run(state, other)
    with pytest.raises(ValueError, match="mode"):
        _sampler(image_unet, "tiled", steps=2).run(state, lab)
    tiled = _sampler(image_unet, "tiled", steps=2).init_state(lab, seed=1)
    with pytest.raises(ValueError, match="tiling"):
        _sampler(image_unet, "tiled", steps=2, final_tile_margin=4, final_tile_steps=1).run(tiled, lab)


def test_small_and_odd_canvases(image_unet):
    lab = _labels(12, 26)  # smaller than the patch, not a multiple of the network divisor (4)
    out = _sampler(image_unet, "random", steps=2).sample(lab, seed=0)
    assert out.shape == (1, 4, 12, 26) and torch.isfinite(out).all()
    assert torch.equal(out, _sampler(image_unet, "tiled", steps=2).sample(lab, seed=0))  # one crop either way


def test_official_early_stop_option(image_unet):
    lab = _labels(32, 32)
    s = _sampler(image_unet, "random", steps=3, official_early_stop=True)
    state = s.init_state(lab, seed=0)
    s.run(state, lab)
    assert state.step == 2 and state.stop_at == 2
    assert float(state.latents.abs().max()) > 1.0  # x at t = 333, not the clipped x̂0


def test_bad_inputs(image_unet):
    with pytest.raises(ValueError, match="mode"):
        _sampler(image_unet, "grid")
    with pytest.raises(ValueError, match="multiple"):
        RandomPatchSampler(ImageDenoiser(image_unet), patch=30, multiple=4)
    with pytest.raises(ValueError, match="0…255"):
        _sampler(image_unet).init_state(np.full((8, 8), 300), seed=0)
    with pytest.raises(ValueError, match="2-D"):
        _sampler(image_unet).init_state(np.zeros((2, 8, 8), np.uint8), seed=0)
