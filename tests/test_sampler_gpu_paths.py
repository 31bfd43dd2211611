"""Issue 18 on the CPU: window-shape bucketing (a step is a few fixed-shape network calls), halving the batch on
a CUDA out-of-memory, stopping at a step, and the DPM-Solver++(2M) multistep solver."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.diffinfinite.guidance import ImageDenoiser
from models.diffinfinite.sampler import RandomPatchSampler, SamplerState, edge_buckets, plan_tiled, tile_offset
from models.diffinfinite.scheduler import DDIMScheduler
from models.diffinfinite.solvers import DPMSolverPP2M
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig


def _labels(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.uint8)
    for u in (1, 2, 3):
        y, x = rng.integers(0, h), rng.integers(0, w)
        lab[max(0, y - h // 4):y + h // 4, max(0, x - w // 4):x + w // 4] = u
    return lab


class CountingDenoiser:
    """ε = a fixed per-pixel function of the window's input and label (no cross-window mixing); counts calls
    and the shapes and batch sizes it was called with."""

    null_label = 0
    out_channels = 4

    def __init__(self, oom_above: int | None = None):
        self.calls: list[tuple[int, int, int]] = []  # (batch, h, w)
        self.oom_above = oom_above

    def __call__(self, x, t, label_windows, labels):
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.calls.append((x.shape[0], x.shape[2], x.shape[3]))
        lab = torch.tensor([0 if u is None else u for u in labels], dtype=torch.float32).view(-1, 1, 1, 1)
        return 0.3 * x + 0.05 * lab + 0.01 * (t.view(-1, 1, 1, 1).float() / 1000)


# ------------------------------------------------------------------------------------------ bucketing
@pytest.mark.parametrize("shape", [(256, 256), (200, 333), (72, 96), (64, 150), (40, 40)])
def test_bucketed_plan_has_at_most_three_fixed_shapes_and_covers_once(shape):
    lab = _labels(*shape)
    patch = (64, 64)
    allowed_y = {min(v, shape[0]) for v in edge_buckets(64, 8)} | {shape[0]} if shape[0] <= 64 else set(edge_buckets(64, 8))
    allowed_x = {min(v, shape[1]) for v in edge_buckets(64, 8)} | {shape[1]} if shape[1] <= 64 else set(edge_buckets(64, 8))
    seen: set[tuple[int, int]] = set()
    for step in range(12):
        for margin in (0, 8):
            cells = (64 - 2 * margin, 64 - 2 * margin)
            plan = plan_tiled(lab, patch, tile_offset(7, 0, cells, step), margin, edges="bucket", multiple=8)
            shapes = {(c.h, c.w) for c in plan}
            assert len(shapes) <= 3, shapes
            seen |= shapes
            cover = np.zeros(shape, np.int32)
            for c in plan:
                cy, cx, ch, cw = c.cell
                assert c.y0 <= cy and cy + ch <= c.y0 + c.h and c.x0 <= cx and cx + cw <= c.x0 + c.w
                assert 0 <= c.y0 and c.y0 + c.h <= shape[0] and 0 <= c.x0 and c.x0 + c.w <= shape[1]
                cover[cy:cy + ch, cx:cx + cw] += 1
            assert (cover == 1).all()
    # the same few shapes in every step (fixed shapes for compiled execution)
    assert {h for h, _ in seen} <= allowed_y and {w for _, w in seen} <= allowed_x
    assert len(seen) <= 3


def test_bucketed_step_is_a_few_network_calls_per_batch():
    lab = _labels(256, 256)
    for edges, limit in (("bucket", 3), ("full", 1)):
        den = CountingDenoiser()
        s = RandomPatchSampler(den, patch=64, mode="tiled", steps=4, guidance=3.0, batch_size=256, multiple=8,
                               tile_edges=edges)
        s.sample(lab, seed=3)
        for k, st in s.stats.items():
            assert st.calls <= limit * st.batches, (edges, k, st)
        assert len({(h, w) for _, h, w in den.calls}) <= limit
    den = CountingDenoiser()
    s = RandomPatchSampler(den, patch=64, mode="tiled", steps=4, guidance=3.0, batch_size=256, multiple=8,
                           tile_edges="fit")
    s.sample(lab, seed=3)
    assert len({(h, w) for _, h, w in den.calls}) > 3  # what bucketing removes


def test_bucketed_and_fitted_windows_agree_where_the_windows_are_the_same():
    """Cells whose window is identical in both plans get identical ε̃ (a real UNet, one step)."""
    torch.manual_seed(0)
    unet = ImageUNet(ImageUNetConfig.tiny(5)).eval().requires_grad_(False)
    lab = _labels(112, 136, seed=4)
    out = {}
    for edges in ("fit", "bucket"):
        s = RandomPatchSampler(ImageDenoiser(unet), patch=32, mode="tiled", steps=5, guidance=2.0, batch_size=64,
                               multiple=4, tile_edges=edges)
        st = s.init_state(lab, seed=9)
        crops = s.plan(s._prepare_labels(lab), 9, 0)
        st.eps = torch.zeros_like(st.latents)
        s._eval_crops(st, crops, torch.from_numpy(s._prepare_labels(lab)), None)
        out[edges] = (st.eps.clone(), {c.cell: (c.y0, c.x0, c.h, c.w) for c in crops})
    same = [cell for cell, win in out["fit"][1].items() if out["bucket"][1].get(cell) == win]
    differ = [cell for cell, win in out["fit"][1].items() if out["bucket"][1].get(cell) != win]
    assert same and differ
    for cy, cx, ch, cw in same:
        a = out["fit"][0][0, :, cy:cy + ch, cx:cx + cw]
        b = out["bucket"][0][0, :, cy:cy + ch, cx:cx + cw]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ OOM, until
def test_out_of_memory_halves_the_batch_and_continues():
    lab = _labels(128, 160)
    ref = RandomPatchSampler(CountingDenoiser(), patch=64, mode="random", steps=3, guidance=2.0, batch_size=4,
                             multiple=8)
    want = ref.sample(lab, seed=1)
    s = RandomPatchSampler(CountingDenoiser(oom_above=4), patch=64, mode="random", steps=3, guidance=2.0,
                           batch_size=16, multiple=8)
    state = s.init_state(lab, seed=1)
    got = s.run(state, lab)
    assert torch.equal(got, want)
    assert [(r["from"], r["to"]) for r in s.batch_reductions] == [(16, 8), (8, 4)]
    assert s.batch_size == 4 and state.extra["batch_size"] == 4
    # a batch of one that does not fit is a real error
    s1 = RandomPatchSampler(CountingDenoiser(oom_above=0), patch=64, steps=1, batch_size=2, multiple=8)
    with pytest.raises(torch.OutOfMemoryError):
        s1.sample(lab, seed=1)


def test_run_until_then_resume_equals_one_run():
    lab = _labels(96, 96)
    mk = lambda: RandomPatchSampler(CountingDenoiser(), patch=64, mode="tiled", steps=6, guidance=1.0,  # noqa: E731
                                    batch_size=8, multiple=8)
    want = mk().sample(lab, seed=2)
    s = mk()
    st = s.init_state(lab, seed=2)
    s.run(st, lab, until=2)
    assert st.step == 2 and not st.done
    s.run(st, lab, until=2)  # nothing left to do before step 2
    assert st.step == 2
    got = mk().run(SamplerState.from_dict(st.to_dict()), lab)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------ solver
def _alpha_sigma(sched: DDIMScheduler, t: int) -> tuple[float, float]:
    a = sched.alpha_bar(t)
    return math.sqrt(a), math.sqrt(1 - a)


def test_dpm_solver_formulas():
    sched = DDIMScheduler(eta=0.0)
    sched.set_timesteps(20)
    solver = DPMSolverPP2M(sched)
    g = torch.Generator().manual_seed(0)
    x0t, eps, x0p, z = (torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64) for _ in range(4))
    x0p = x0p.clamp(-1, 1)
    (t0, _), (t, tn) = sched.pairs[3], sched.pairs[4]
    x = _alpha_sigma(sched, t)[0] * (0.3 * x0t).clamp(-0.9, 0.9) + _alpha_sigma(sched, t)[1] * eps  # x̂0 unclipped
    # first order = DDIM with η = 0
    ddim = sched.step(eps, t, x, prev_timestep=tn, eta=0.0).prev_sample
    first = solver.step(eps, t, x, tn).prev_sample
    torch.testing.assert_close(first, ddim, rtol=1e-10, atol=1e-10)
    # second order, written out
    (a_t, s_t), (a_n, s_n), (a_p, s_p) = (_alpha_sigma(sched, v) for v in (t, tn, t0))
    lam = lambda a, s: math.log(a / s)  # noqa: E731
    h, h0 = lam(a_n, s_n) - lam(a_t, s_t), lam(a_t, s_t) - lam(a_p, s_p)
    x0 = ((x - s_t * eps) / a_t).clamp(-1, 1)
    d = x0 + (h / h0) / 2 * (x0 - x0p)
    want = (s_n / s_t) * x - a_n * (math.exp(-h) - 1) * d
    got = solver.step(eps, t, x, tn, x0_prev=x0p, t_prev=t0)
    torch.testing.assert_close(got.prev_sample, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.pred_original_sample, x0)
    # the SDE variant: noise enters with σ_n·√(1 − e^{−2h})
    sde = DPMSolverPP2M(sched, sde=True)
    a = sde.step(eps, t, x, tn, x0_prev=x0p, t_prev=t0, noise=z).prev_sample
    b = sde.step(eps, t, x, tn, x0_prev=x0p, t_prev=t0, noise=torch.zeros_like(z)).prev_sample
    torch.testing.assert_close(a - b, s_n * math.sqrt(1 - math.exp(-2 * h)) * z, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="noise"):
        sde.step(eps, t, x, tn)
    # the last pair returns x̂0
    tl, tnl = sched.pairs[-1]
    torch.testing.assert_close(solver.step(eps, tl, x, tnl).prev_sample, ((x - _alpha_sigma(sched, tl)[1] * eps)
                                                                          / _alpha_sigma(sched, tl)[0]).clamp(-1, 1))


class ExactDenoiser:
    """The exact ε of a point-mass data distribution at ``target`` (per pixel): ε = (x_t − √ᾱ_t·x0)/√(1−ᾱ_t)."""

    null_label = 0
    out_channels = 4

    def __init__(self, target: torch.Tensor, sched: DDIMScheduler):
        self.target, self.sched = target, sched
        self.windows: list[tuple[int, int]] = []

    def __call__(self, x, t, label_windows, labels):
        a = torch.tensor([self.sched.alpha_bar(int(v)) for v in t], dtype=torch.float32).view(-1, 1, 1, 1)
        # every window sees the target where its pixels are; recover them from the input's own grid position
        return (x - a.sqrt() * self._target_like(x)) / (1 - a).sqrt()

    def _target_like(self, x):
        return self.target.expand(x.shape[0], -1, x.shape[2], x.shape[3])


@pytest.mark.parametrize("mode", ["tiled", "random"])
@pytest.mark.parametrize("solver", ["dpmpp-2m", "dpmpp-2m-sde"])
def test_solver_reaches_the_data_and_resumes_bit_identically(mode, solver, tmp_path):
    lab = _labels(80, 72)
    target = torch.full((1, 4, 1, 1), 0.4)

    def mk():
        s = RandomPatchSampler(ExactDenoiser(target, DDIMScheduler()), patch=32, mode=mode, steps=8,
                               guidance=1.0, batch_size=8, multiple=8, solver=solver)
        s.denoiser.sched = s.scheduler
        return s

    out = mk().sample(lab, seed=4)
    torch.testing.assert_close(out, torch.full_like(out, 0.4), rtol=0, atol=1e-5)
    # stop after 3 steps (history held in the state), save, reload, finish: same bits
    s = mk()
    st = s.init_state(lab, seed=4)
    s.run(st, lab, until=3)
    assert st.x0_prev is not None
    st.save(tmp_path / "state.pt")
    resumed = mk().run(SamplerState.load(tmp_path / "state.pt"), lab)
    full = mk().sample(lab, seed=4)
    assert torch.equal(resumed, full)
    # a DDIM state is not resumed by a multistep sampler
    d = RandomPatchSampler(ExactDenoiser(target, DDIMScheduler()), patch=32, mode=mode, steps=8, guidance=1.0,
                           batch_size=8, multiple=8)
    with pytest.raises(ValueError, match="solver"):
        mk().run(d.init_state(lab, seed=4), lab)


def test_bad_solver_and_edges():
    with pytest.raises(ValueError, match="solver"):
        RandomPatchSampler(CountingDenoiser(), solver="euler")
    with pytest.raises(ValueError, match="tile_edges"):
        RandomPatchSampler(CountingDenoiser(), tile_edges="round")


# ------------------------------------------------------------------------------------------ engine wiring
def _engine_slide(runtime, options=None):
    from models.diffinfinite.engine import DiffInfiniteEngine, DiffInfiniteOptions
    from models.diffinfinite.loading import untrained_diffinfinite
    from models.engine import SlideRequest

    lab = np.zeros((128, 192), np.uint8)
    lab[20:90, 30:120] = 1
    lab[60:, 140:] = 3
    req = SlideRequest(width=192, height=128, mpp=0.5, seed=3, steps=3, guidance=1.0, eta=1.0, conditioning="mask",
                       options=DiffInfiniteOptions(**(options or {})).resolved(), labels=lab)
    engine = DiffInfiniteEngine()
    slide = engine.generate(untrained_diffinfinite(seed=0), req, device=torch.device("cpu"), runtime=runtime,
                            report=lambda *a: None, cancel=lambda: False)
    return np.concatenate(list(slide.bands)), slide.notes


def test_engine_runs_through_the_inference_network_and_reports_its_work():
    from models.acceleration import clear_inference_cache
    from models.engine import Runtime

    plain, notes = _engine_slide(Runtime())
    assert notes["sampler_network_calls"] >= 3 and notes["sampler_passes"] >= notes["sampler_network_calls"]
    assert "seconds_compile_warmup" not in notes and "batch_size_reductions" not in notes
    try:
        wrapped, notes = _engine_slide(Runtime(compile=True, compile_mode="eager"))
    finally:
        clear_inference_cache()
    assert np.array_equal(plain, wrapped) and "seconds_compile_warmup" in notes
    fewer, notes = _engine_slide(Runtime(), {"solver": "dpmpp-2m"})
    assert fewer.shape == plain.shape and not np.array_equal(fewer, plain)


def test_padded_batches_run_few_sizes_and_equal_unpadded():
    from models.diffinfinite.guidance import MaskDenoiser, batch_bucket
    from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig

    assert [batch_bucket(n) for n in (1, 8, 9, 33, 256)] == [8, 8, 16, 64, 256]
    torch.manual_seed(0)
    unet = ImageUNet(ImageUNetConfig.tiny(5)).eval().requires_grad_(False)
    seen = []
    unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 16, 16, generator=g)
    t = torch.full((5,), 500)
    lw = torch.randint(0, 4, (5, 16, 16), generator=g)
    labels = [None, 1, 2, 3, 1]
    plain = ImageDenoiser(unet)(x, t, lw, labels)
    padded = ImageDenoiser(unet, pad_batches=True)(x, t, lw, labels)
    assert seen == [5, 8] and padded.shape == plain.shape
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    munet = MaskUNet(MaskUNetConfig.tiny()).eval().requires_grad_(False)
    m_labels = [None, 0, 1, None, 1]
    torch.testing.assert_close(MaskDenoiser(munet, pad_batches=True)(x, t, lw, m_labels),
                               MaskDenoiser(munet)(x, t, lw, m_labels), rtol=1e-5, atol=1e-5)
