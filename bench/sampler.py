"""DiffInfinite sampler benchmark: UNet cost per output pixel, seam ratio per mode, batched UNet throughput.

    python -m bench.sampler                 # CPU defaults (≈ 7 min on a busy 2-core machine)
    python -m bench.sampler --quick         # smaller: cost at 2048² only, fewer levels, no throughput
    python -m bench.sampler --device cuda   # + bf16 throughput / TFLOP/s and timed sampler steps on a GPU

1. **Cost.** For a 2048² and an 8192² output with a 5-class mask (synthetic, cleaned like a generated one):
   crops per step, UNet passes per step, crop pixels per canvas pixel and UNet cost per output latent pixel
   (passes × patch area ÷ canvas area; × GFLOP per pass) for our two modes and for the official schedule
   reproduced crop by crop (sequential first-come selection on the per-pixel time tensor, every label of the
   crop's window, a separate unconditional pass per label, ω > 0). Same number of steps for all. A pass
   counts its window's area: our tiled mode samples the partial cells a random offset leaves at the canvas
   border in fitted windows (``tile_edges="fit"``, ≥ half a patch); "tiled full edges" is the same plan with
   a full patch for every cell. FLOPs per pass scale with the window area (convolutions and the O(N) mask
   attention are linear in pixels).
2. **Seams.** Each mode samples a 2048² canvas (250 DDIM steps, η = 1; 3 seeds) with an analytic crop-local
   denoiser: the exact MMSE ε-predictor of a stationary Gaussian latent field given the crop alone — what an
   ideal network trained on 64² crops predicts. Its full-canvas samples are seamless, it costs no training,
   and every seam it leaves comes from the patch schedule. The latent is decoded by a fixed linear colour map
   + bilinear ×8 and the seam ratio (mean |∇| across former crop boundaries ÷ across other lines of the same
   phase mod 8) is measured on the last step's crop boundaries and on the aligned 512-px grid. A fixed,
   aligned tiling is the naive baseline the random offsets replace (it shows what a visible seam scores).
   "tiled" is the product default: random offsets, fitted border windows, plus 8 px of context around every
   cell in the last 10 steps (whose seams no later step smooths); its cost in part 1 includes those steps.
   "official loop (reference)" runs the official crop-by-crop loop (reference §8 pseudocode: own RNG, level-k
   view through the replica, DDIM applied per crop) with the same denoiser: "random" reproduces its
   algorithm, batched, so the two differ only by sampling noise between seeds.
3. **Throughput.** Official-size image UNet (and mask UNet) patches/s at several batch sizes on the CPU;
   on CUDA bf16 patches/s and achieved TFLOP/s, and wall time per sampler step at 2048² for both modes.

The last line is one JSON object: ours, the reference (official schedule) and their ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.diffinfinite.guidance import ImageDenoiser, passes_for
from models.diffinfinite.mask_cleaning import clean_mask, upsample_labels
from models.diffinfinite.sampler import RandomPatchSampler, _np_rng, plan_random, plan_tiled, tile_offset
from models.diffinfinite.scheduler import DDIMScheduler
from models.metrics import seam_ratios

PATCH = 64  # latent crop of the image model (512 px)
UNET_MULTIPLE = 8  # the official image UNet's spatial divisor (three downsamplings)
OMEGA = 3.0
STEPS = 250
FINAL_MARGIN, FINAL_STEPS = PATCH // 8, 10  # SamplingOptions defaults of the tiled mode


def _mix(a: "Cost", b: "Cost", wb: float) -> "Cost":
    return Cost(*((1 - wb) * x + wb * y for x, y in zip(
        (a.crops, a.passes, a.crop_px_per_px, a.passes_px_per_px), (b.crops, b.passes, b.crop_px_per_px,
                                                                   b.passes_px_per_px))))


# ------------------------------------------------------------------------------------------- mask
def _smooth_fields(n: int, h: int, w: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    g = np.exp(-2 * (math.pi * sigma) ** 2 * (fy ** 2 + fx ** 2))
    out = np.empty((n, h, w), np.float32)
    for i in range(n):
        f = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((h, w))) * g, s=(h, w))
        out[i] = f / f.std()
    return out


def synthetic_mask(side_px: int, seed: int = 0) -> np.ndarray:
    """5-class label mask (side_px²): smooth random regions at mask resolution (side/4), ≈ 55 % unknown,
    cleaned (boundaries → 0, 6×6 min-pool) and upsampled ×4, like the mask stage's output."""
    rng = np.random.default_rng(seed)
    m = side_px // 4
    fields = _smooth_fields(5, m, m, sigma=24.0, rng=rng)
    fields[0] += 0.9  # bias toward unknown, like the real masks' 55–68 % unknown
    lab = np.argmax(fields, axis=0).astype(np.uint8)
    return upsample_labels(clean_mask(lab), 4)


def latent_labels(mask_px: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(mask_px[::8, ::8])  # the network's nearest (top-left) downsampling


# ------------------------------------------------------------------------------------------- cost
@dataclass
class Cost:
    crops: float
    passes: float
    crop_px_per_px: float
    passes_px_per_px: float  # UNet passes × patch area ÷ canvas area (per step)


def official_levels(lab: np.ndarray, levels: int, seed: int, omega: float = OMEGA) -> Cost:
    """The official loop, crop by crop: pick a uniform random pixel among those with the minimum time,
    clamp the centre to [32, s−32], update the not-yet-updated pixels of the 64×64 window; each crop runs
    ddim_multimask over every label of its window: 1 pass for label 0, 2 (conditional + its own null) for
    every other label when ω > 0."""
    g = torch.Generator().manual_seed(seed)
    s_h, s_w = lab.shape
    p = PATCH // 2
    times = torch.zeros((s_h, s_w), dtype=torch.int32)
    lab_t = torch.from_numpy(lab)
    crops = passes = 0
    target = levels
    while int(times.min()) < target:
        k = int(times.min())
        idx = torch.nonzero(times == k)
        r, c = idx[torch.randint(idx.shape[0], (1,), generator=g)].tolist()[0]
        i, j = min(max(r, p), s_h - p), min(max(c, p), s_w - p)
        win = times[i - p:i + p, j - p:j + p]
        labels = torch.unique(lab_t[i - p:i + p, j - p:j + p]).tolist()
        passes += sum(1 if u == 0 or omega == 0 else 2 for u in labels)
        crops += 1
        win[win == k] = k + 1
    area = s_h * s_w
    return Cost(crops / levels, passes / levels, crops * PATCH ** 2 / area / levels,
                passes * PATCH ** 2 / area / levels)


def our_levels(lab: np.ndarray, mode: str, levels: int, seed: int, omega: float = OMEGA, margin: int = 0,
               edges: str = "fit") -> Cost:
    """Our planner's cost; a pass over a w×h window counts w·h (fitted border windows are smaller)."""
    crops = passes = crop_px = pass_px = 0
    cells = (PATCH - 2 * margin, PATCH - 2 * margin)
    for k in range(levels):
        plan = (plan_random(lab, (PATCH, PATCH), _np_rng(seed, 0, 3, k)) if mode == "random"
                else plan_tiled(lab, (PATCH, PATCH), tile_offset(seed, 0, cells, k), margin,
                                edges=edges, multiple=UNET_MULTIPLE))
        crops += len(plan)
        n = [len(passes_for(c.labels, omega, 0)) for c in plan]
        passes += sum(n)
        crop_px += sum(c.h * c.w for c in plan)
        pass_px += sum(k_ * c.h * c.w for k_, c in zip(n, plan))
    area = lab.size
    return Cost(crops / levels, passes / levels, crop_px / area / levels, pass_px / area / levels)


def unet_gflop(attn_impl: str, kind: str = "image") -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig
    from models.diffinfinite.unet import ImageUNet, ImageUNetConfig

    torch.manual_seed(0)
    if kind == "image":
        net = ImageUNet(ImageUNetConfig.official(5)).eval().requires_grad_(False).set_attention_impl(attn_impl)
        args = (torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.ones(1, 1, 64, 64, dtype=torch.long))
    else:
        net = MaskUNet(MaskUNetConfig.official()).eval().requires_grad_(False)
        args = (torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.tensor([0]))
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        net(*args)
    return fc.get_total_flops() / 1e9


# ------------------------------------------------------------------------------------------- seams
class GaussianFieldDenoiser:
    """Exact crop-local MMSE ε-predictor for x0 ~ a stationary Gaussian field (squared-exponential covariance,
    length ``ell`` latent px, variance ``var``, channels independent): E[ε | x_t restricted to the crop]
    = √(1−ᾱ)·(ᾱΣ + (1−ᾱ)I)⁻¹·x_crop with Σ the crop's covariance — what an ideal network trained on crops
    of that size predicts. Σ = Σ_y ⊗ Σ_x is separable, so one eigendecomposition per crop side suffices."""

    null_label = 0
    out_channels = 4

    def __init__(self, scheduler: DDIMScheduler, ell: float = 4.0, var: float = 0.04):
        self.alphas = scheduler.alphas_cumprod
        self.ell, self.var = ell, var
        self._eig: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _basis(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n, str(device))
        if key not in self._eig:
            i = torch.arange(n, dtype=torch.float64)
            cov = torch.exp(-((i[:, None] - i[None, :]) ** 2) / (2 * self.ell ** 2))
            lam, q = torch.linalg.eigh(cov)
            self._eig[key] = (lam.clamp_min(0).to(device), q.to(device))
        return self._eig[key]

    def __call__(self, x, t, label_windows, labels):
        b, c, h, w = x.shape
        lam_y, qy = self._basis(h, x.device)
        lam_x, qx = self._basis(w, x.device)
        a = self.alphas[t.cpu()].to(x.device).double().view(b, 1, 1, 1)
        lam = self.var * lam_y[:, None] * lam_x[None, :]
        gain = torch.sqrt(1 - a) / (a * lam + (1 - a))
        z = qy.T @ x.double() @ qx  # coordinates in the covariance eigenbasis
        return (qy @ (z * gain) @ qx.T).float()


def decode_linear(latent: torch.Tensor) -> np.ndarray:
    m = torch.tensor([[1.2, -0.4, 0.3, 0.5], [0.2, 1.1, -0.6, 0.4], [-0.5, 0.3, 1.0, 0.6]], dtype=torch.float32)
    rgb = 0.5 + torch.einsum("oc,bchw->bohw", m, latent.float().cpu()) * 0.8
    rgb = F.interpolate(rgb, scale_factor=8, mode="bilinear", align_corners=False).clamp(0, 1)
    return rgb[0].permute(1, 2, 0).numpy()


def boundary_seam_ratio(img: np.ndarray, owner: np.ndarray, f: int = 8) -> float:
    """Mean |∇| across the boundaries of a latent ownership map (px transitions 8j−1→8j where the owner
    changes) ÷ mean |∇| across the other 8j−1→8j transitions; max of both axes."""
    out = []
    for axis in (0, 1):
        g = np.abs(np.diff(img, axis=axis)).mean(axis=2)  # (H-1, W) or (H, W-1)
        if axis == 1:
            g, own = g.T, owner.T
        else:
            own = owner
        idx = np.arange(1, own.shape[0])
        rows = g[f * idx - 1]  # transitions between px rows 8j−1 and 8j: (n-1, W_px)
        change = own[1:] != own[:-1]  # (n-1, w_lat)
        change_px = np.repeat(change, f, axis=1)
        if change_px.any() and (~change_px).any():
            out.append(float(rows[change_px].mean() / rows[~change_px].mean()))
    return max(out) if out else float("nan")


def owner_map(plan, shape) -> np.ndarray:
    owner = np.full(shape, -1, np.int32)
    for i, c in enumerate(plan):
        win = owner[c.y0:c.y0 + c.h, c.x0:c.x0 + c.w]
        if c.cell is None:
            win[win == -1] = i
        else:
            cy, cx, ch, cw = c.cell
            owner[cy:cy + ch, cx:cx + cw] = i
    return owner


def official_sequential_sample(side_lat: int, steps: int, seed: int, den_sched: tuple | None = None
                               ) -> tuple[torch.Tensor, np.ndarray]:
    """The official large-image loop (reference §8 pseudocode) with the same ideal denoiser, crop by crop and
    with its own RNG: a uniform random pixel among those at the lowest level, centre clamped to [32, s−32],
    the 64² window's level-k view (pixels an earlier crop already moved to level k+1 are taken from the replica
    of level k) denoised, DDIM applied at once to the window's pixels still at level k. Returns the latent and
    the last level's ownership map."""
    sched = DDIMScheduler(eta=1.0)
    sched.set_timesteps(steps)
    den = GaussianFieldDenoiser(sched)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, side_lat, side_lat), generator=g)
    times = torch.zeros((side_lat, side_lat), dtype=torch.int32)
    owner = np.full((side_lat, side_lat), -1, np.int32)
    p = PATCH // 2
    for k in range(steps):
        t, t_next = sched.pairs[k]
        replica = x.clone()  # every pixel is at level k here
        n = 0
        while True:
            idx = torch.nonzero(times == k)
            if idx.shape[0] == 0:
                break
            r, c = idx[torch.randint(idx.shape[0], (1,), generator=g)].tolist()[0]
            i, j = min(max(r, p), side_lat - p), min(max(c, p), side_lat - p)
            win = x[:, :, i - p:i + p, j - p:j + p]
            tw = times[i - p:i + p, j - p:j + p]
            own = tw == k
            view = torch.where(own, win, replica[:, :, i - p:i + p, j - p:j + p])  # the level-k view
            eps = den(view, torch.tensor([t]), None, [None])
            noise = torch.randn(win.shape, generator=g)
            new = sched.step(eps, t, view, prev_timestep=t_next, noise=noise, eta=1.0).prev_sample
            win.copy_(torch.where(own, new, win))
            tw[own] = k + 1
            if k == steps - 1:
                owner[i - p:i + p, j - p:j + p][own.numpy()] = n
            n += 1
    return x, owner


def seam_bench(side_lat: int, steps: int, seeds: list[int], device: torch.device) -> dict[str, dict[str, float]]:
    lab = np.zeros((side_lat, side_lat), np.uint8)
    res = {}
    final = dict(final_tile_margin=FINAL_MARGIN, final_tile_steps=FINAL_STEPS)
    for name, mode, kw, runs in (("random", "random", {}, seeds), ("tiled", "tiled", final, seeds),
                                 ("tiled, full-patch edges", "tiled", dict(final, tile_edges="full"), seeds[:2]),
                                 ("tiled, no final margin", "tiled", {}, seeds),
                                 ("fixed-grid baseline", "tiled", dict(tile_offsets="fixed"), seeds[:1])):
        last_r, grid_r, secs = [], [], 0.0
        for seed in runs:
            sched = DDIMScheduler(eta=1.0)
            sampler = RandomPatchSampler(GaussianFieldDenoiser(sched), patch=PATCH, mode=mode, steps=steps,
                                         guidance=0.0, batch_size=64, scheduler=sched, multiple=UNET_MULTIPLE, **kw)
            t0 = time.perf_counter()
            z = sampler.sample(lab, seed=seed, device=device)
            secs += time.perf_counter() - t0
            img = decode_linear(z)
            last = sampler.plan(lab, seed, steps - 1)
            last_r.append(boundary_seam_ratio(img, owner_map(last, lab.shape)))
            grid_r.append(max(seam_ratios(img, PATCH * 8, offsets_px=(0,), match_mod=8).values()))
        res[name] = {"last_step_boundaries": float(np.mean(last_r)), "aligned_512px_grid": float(np.mean(grid_r)),
                     "last_step_boundaries_runs": last_r, "seconds_per_run": secs / len(runs)}
    last_r, grid_r, secs = [], [], 0.0
    for seed in seeds:  # the reference: the official crop-by-crop loop, same denoiser and decoder
        t0 = time.perf_counter()
        z, owner = official_sequential_sample(side_lat, steps, seed)
        secs += time.perf_counter() - t0
        img = decode_linear(z)
        last_r.append(boundary_seam_ratio(img, owner))
        grid_r.append(max(seam_ratios(img, PATCH * 8, offsets_px=(0,), match_mod=8).values()))
    res["official loop (reference)"] = {"last_step_boundaries": float(np.mean(last_r)),
                                        "aligned_512px_grid": float(np.mean(grid_r)),
                                        "last_step_boundaries_runs": last_r, "seconds_per_run": secs / len(seeds)}
    return res


# ------------------------------------------------------------------------------------------- throughput
def throughput(device: torch.device, batches: list[int], reps: int, dtype: torch.dtype | None,
               kind: str = "image") -> dict[int, float]:
    from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig
    from models.diffinfinite.unet import ImageUNet, ImageUNetConfig

    torch.manual_seed(0)
    net = (ImageUNet(ImageUNetConfig.official(5)) if kind == "image" else MaskUNet(MaskUNetConfig.official()))
    net = net.eval().requires_grad_(False).to(device)
    side = 64 if kind == "image" else 16
    out = {}
    for b in batches:
        x = torch.randn(b, 4, side, side, device=device)
        t = torch.full((b,), 500, device=device, dtype=torch.long)
        cond = (torch.ones(b, 1, side, side, dtype=torch.long, device=device) if kind == "image"
                else torch.zeros(b, dtype=torch.long, device=device))
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                                 enabled=False)
        with torch.inference_mode(), ctx:
            net(x, t, cond)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                net(x, t, cond)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        out[b] = b / float(np.median(times))
    return out


def gpu_step_times(device: torch.device, side_px: int, steps_timed: int, batch_size: int = 256) -> dict[str, float]:
    """Seconds per sampler step (official-size image UNet, bf16, ω = 3, 5-class mask) for both modes: one
    warm-up step, then ``steps_timed`` steps (``run(until=…)``: the job's own state, no hand-edited stop)."""
    from models.diffinfinite.unet import ImageUNet, ImageUNetConfig

    torch.manual_seed(0)
    net = ImageUNet(ImageUNetConfig.official(5)).eval().requires_grad_(False).to(device)
    lab = latent_labels(synthetic_mask(side_px))
    out = {}
    for mode in ("random", "tiled"):
        s = RandomPatchSampler(ImageDenoiser(net, autocast_dtype=torch.bfloat16), patch=PATCH, mode=mode,
                               steps=250, guidance=OMEGA, batch_size=batch_size, multiple=UNET_MULTIPLE,
                               tile_edges="bucket")
        state = s.init_state(lab, seed=0, device=device)
        s.run(state, lab, until=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        s.run(state, lab, until=1 + steps_timed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[mode] = (time.perf_counter() - t0) / steps_timed
        out[mode + "_passes_per_step"] = s.stats[1].forwards
        out[mode + "_network_calls_per_step"] = s.stats[1].calls
    return out


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--levels-2048", type=int, default=10)
    ap.add_argument("--levels-8192", type=int, default=2)
    ap.add_argument("--seam-steps", type=int, default=250)
    ap.add_argument("--seam-seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the cost and seam parts (small ops; the throughput part uses all)")
    args = ap.parse_args(argv)
    all_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    sizes = [(2048, args.levels_2048 if not args.quick else 3)] + ([] if args.quick else [(8192, args.levels_8192)])

    print("== UNet cost per step (ω = 3, 5-class mask, 64×64 latent crops) ==")
    gf_ours = unet_gflop("linear")
    gf_off = unet_gflop("quadratic")
    print(f"image UNet GFLOP per 64² pass: ours {gf_ours:.1f} (O(N) mask attention), official {gf_off:.1f}")
    cost: dict[str, dict[str, dict[str, float]]] = {}
    hdr = f"{'output':>7} {'schedule':>16} {'crops':>8} {'passes':>8} {'crop px/px':>10} {'pass px/px':>10} " \
          f"{'GFLOP/lat px':>12} {'vs official':>11}"
    print(hdr)
    for side, levels in sizes:
        mask = synthetic_mask(side, seed=args.seed)
        lab = latent_labels(mask)
        shares = np.bincount(mask.ravel(), minlength=5) / mask.size
        off = official_levels(lab, levels, args.seed)
        rows = {"official": (off, gf_off),
                "ours random": (our_levels(lab, "random", levels, args.seed), gf_ours),
                "ours tiled": (_mix(our_levels(lab, "tiled", levels, args.seed),
                                    our_levels(lab, "tiled", max(2, levels // 2), args.seed, margin=FINAL_MARGIN),
                                    FINAL_STEPS / STEPS), gf_ours),
                "tiled full edges": (_mix(our_levels(lab, "tiled", levels, args.seed, edges="full"),
                                          our_levels(lab, "tiled", max(2, levels // 2), args.seed,
                                                     margin=FINAL_MARGIN, edges="full"),
                                          FINAL_STEPS / STEPS), gf_ours)}
        base = off.passes_px_per_px * gf_off
        cost[str(side)] = {}
        for name, (c, gf) in rows.items():
            flop_px = c.passes_px_per_px * gf / PATCH ** 2
            cost[str(side)][name] = {"crops_per_step": c.crops, "passes_per_step": c.passes,
                                     "crop_px_per_px": c.crop_px_per_px, "passes_px_per_px": c.passes_px_per_px,
                                     "gflop_per_latent_px_per_step": flop_px,
                                     "ratio_passes_vs_official": c.passes_px_per_px / off.passes_px_per_px,
                                     "ratio_flops_vs_official": c.passes_px_per_px * gf / base}
            print(f"{side:>7} {name:>16} {c.crops:>8.1f} {c.passes:>8.1f} {c.crop_px_per_px:>10.2f} "
                  f"{c.passes_px_per_px:>10.2f} {flop_px:>12.3f} {c.passes_px_per_px * gf / base:>11.3f}")
        print(f"        label shares {np.round(shares, 3).tolist()}, {levels} levels; 250 steps of the official "
              f"schedule ≈ {off.passes * 250 * gf_off / 1e6:.1f} PFLOP, ours tiled ≈ "
              f"{rows['ours tiled'][0].passes * 250 * gf_ours / 1e6:.1f} PFLOP")

    seam_steps = args.seam_steps if not args.quick else 50
    seeds = list(range(args.seed, args.seed + (args.seam_seeds if not args.quick else 1)))
    print(f"\n== Seam ratio of the decoded image (crop-local Gaussian-field MMSE denoiser, 2048², {seam_steps} "
          f"steps, mean of {len(seeds)} seed(s)) ==")
    seams = seam_bench(256, seam_steps, seeds, device)
    print(f"{'mode':>20} {'last-step boundaries':>21} {'aligned 512-px grid':>20} {'s per run':>9}")
    for name, r in seams.items():
        print(f"{name:>20} {r['last_step_boundaries']:>21.3f} {r['aligned_512px_grid']:>20.3f} "
              f"{r['seconds_per_run']:>9.1f}")
    torch.set_num_threads(all_threads)

    thr: dict[str, dict] = {}
    if not args.quick:
        print("\n== Batched UNet throughput (official sizes, random weights) ==")
        if device.type == "cpu":
            img = throughput(device, [1, 2, 4], reps=2, dtype=None)
            msk = throughput(device, [1, 16, 64], reps=3, dtype=None, kind="mask")
            thr["cpu_fp32_image_patches_per_s"] = img
            thr["cpu_fp32_mask_patches_per_s"] = msk
            for b, v in img.items():
                print(f"image UNet CPU fp32 batch {b:>3}: {v:6.2f} patches/s  ({v * gf_ours:.0f} GFLOP/s)")
            for b, v in msk.items():
                print(f"mask  UNet CPU fp32 batch {b:>3}: {v:6.1f} patches/s")
        else:
            img = throughput(device, [8, 32, 128], reps=5, dtype=torch.bfloat16)
            thr["gpu_bf16_image_patches_per_s"] = img
            thr["gpu_bf16_image_tflops"] = {b: v * gf_ours / 1e3 for b, v in img.items()}
            for b, v in img.items():
                print(f"image UNet {device.type} bf16 batch {b:>3}: {v:8.1f} patches/s  {v * gf_ours / 1e3:6.1f} TFLOP/s")
            st = gpu_step_times(device, 2048, steps_timed=3)  # tiled: margin-0 steps (the bulk of a run)
            thr["gpu_bf16_seconds_per_step_2048"] = st
            print(f"sampler step at 2048² (bf16, ω=3): random {st['random']:.3f} s ({st['random_passes_per_step']} "
                  f"passes), tiled {st['tiled']:.3f} s ({st['tiled_passes_per_step']} passes)")

    big = str(sizes[-1][0])
    summary = {
        "bench": "diffinfinite_sampler",
        "ours": {
            "passes_px_per_px": {s: {m: cost[s][m]["passes_px_per_px"] for m in ("ours random", "ours tiled")}
                                 for s in cost},
            "gflop_per_latent_px_per_step": {s: {m: cost[s][m]["gflop_per_latent_px_per_step"]
                                                 for m in ("ours random", "ours tiled")} for s in cost},
            "seam_ratio": {m: seams[m]["last_step_boundaries"] for m in ("random", "tiled", "tiled, no final margin")},
            "seam_ratio_aligned_grid": {m: seams[m]["aligned_512px_grid"]
                                        for m in ("random", "tiled", "tiled, no final margin")},
            "throughput": thr,
        },
        "reference": {
            "passes_px_per_px": {s: cost[s]["official"]["passes_px_per_px"] for s in cost},
            "gflop_per_latent_px_per_step": {s: cost[s]["official"]["gflop_per_latent_px_per_step"] for s in cost},
            "seam_ratio_fixed_grid_baseline": seams["fixed-grid baseline"]["aligned_512px_grid"],
            "seam_ratio_official_loop": seams["official loop (reference)"]["last_step_boundaries"],
        },
        "ratio": {
            "tiled_vs_official_flops": {s: cost[s]["ours tiled"]["ratio_flops_vs_official"] for s in cost},
            "random_vs_official_flops": {s: cost[s]["ours random"]["ratio_flops_vs_official"] for s in cost},
            "tiled_vs_official_passes": {s: cost[s]["ours tiled"]["ratio_passes_vs_official"] for s in cost},
            "seam_random_vs_official_loop": seams["random"]["last_step_boundaries"]
            / seams["official loop (reference)"]["last_step_boundaries"],
            "goal_tiled_le_one_third_at_" + big: cost[big]["ours tiled"]["ratio_flops_vs_official"] <= 1 / 3,
        },
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
