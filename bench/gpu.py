"""One prepared GPU benchmark (issue 18): where the sampling loop stands against the GPU's bf16 peak.

    python -m bench.gpu                       # on the GPU: ≈ 6–8 min on an H200
    python -m bench.gpu --smoke               # every code path on the CPU at tiny sizes (< 3 min; a test runs it)
    python -m bench.gpu --sections unet,steps --peak-tflops 989

Sections, in order (``--budget-s`` skips what would start after the budget is spent; skipped sections are
reported as such):

1. ``unet`` — the official-size image UNet (random weights, 64² latent windows, 5 classes, bf16 autocast):
   patches/s, TFLOP/s and % of ``--peak-tflops`` at several batches, eager (fused GroupNorm→FiLM→SiLU off),
   eager with the fused kernel, and compiled (``models.acceleration``, compile warm-up printed); then the fused
   kernel alone against the torch modules (ms, effective GB/s, largest |Δ|).
2. ``steps`` — seconds per sampler step at 2048² (ω = 3, 5-class mask) for ``random`` and ``tiled`` (bucketed
   border windows) at the service's batch (chosen from free memory like the worker does), with the compiled
   network; the reference, measured in the same run: the previous ``tiled`` (fitted border windows: up to
   nine shapes) with the eager network at batch 64. Network calls and passes per step are printed.
3. ``projection`` — a 50000² slide: passes per step from the planners at that size × seconds per pass measured
   on an 8192² step (tiled) → sampling time for 250 DDIM steps and for 25 DPM-Solver++ steps, plus decode and
   write scaled from section 5 by area.
4. ``infbrush`` — the paper-size ∞-Brush, 4096², 50 steps, full run (``bench.infbrush``'s measurement).
5. ``e2e`` — the demo model end to end (mask → sampling → decode → TIFF) at 16384², 50 steps, through
   ``slidesynth generate`` (the worker's code path and runtime checks).

The last line is one JSON object: ours (the sampling loop's % of peak at the service batch, the tiled/random
step ratio, the projections, the ∞-Brush and end-to-end seconds), the reference measured in the same run and
their ratios, and the goals.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ISSUE_PEAK_TFLOPS = 790.0  # the H200 bf16 peak issue 18's first measurements were expressed against
GOALS = {"percent_of_peak": 50.0, "tiled_over_random_step": 0.7, "projection_minutes": 40.0}
SECTIONS = ("unet", "steps", "projection", "infbrush", "e2e")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.config = "tiny" if self.smoke else "official"
        self.latent = 16 if self.smoke else 64  # the sampler's window (64 latent px = 512 px)
        self.peak = args.peak_tflops
        self.t0 = time.perf_counter()
        self.results: dict = {"skipped": []}
        self._net = None

    # ------------------------------------------------------------------ shared
    def net(self):
        if self._net is None:
            from models.diffinfinite.unet import ImageUNet, ImageUNetConfig

            torch.manual_seed(0)
            cfg = ImageUNetConfig.official(5) if self.config == "official" else ImageUNetConfig.tiny(5)
            self._net = ImageUNet(cfg).eval().requires_grad_(False).to(self.device)
        return self._net

    def compiled(self):
        from models.acceleration import inference_network

        if self.args.no_compile:
            return self.net()
        # the CPU smoke run checks the code path with a quick backend; the GPU run uses Inductor
        backend = "aot_eager" if self.device.type == "cpu" else "inductor"
        return inference_network(self.net(), mode="default", device=self.device, backend=backend)

    def inputs(self, b: int, side: int):
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, 4, side, side, generator=g).to(self.device)
        t = torch.randint(0, 1000, (b,), generator=g).to(self.device)
        mask = torch.zeros(b, 1, side, side, dtype=torch.long)
        mask[:, :, : side // 2] = torch.randint(1, 5, (b, 1, 1, 1), generator=g)
        return x, t, mask.to(self.device)

    def gflop_per_patch(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        x, t, m = self.inputs(1, self.latent)
        net = self.net()  # built outside inference mode (its parameters must stay ordinary tensors)
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            net(x, t, m)
        return fc.get_total_flops() / 1e9

    def forward_seconds(self, fn, b: int, reps: int) -> float:
        self.net()
        x, t, m = self.inputs(b, self.latent)

        def run():
            with torch.inference_mode(), _autocast(self.device, self.dtype):
                fn(x, t, m)

        return _median_s(run, self.device, reps)

    def service_batch(self) -> int:
        """The batch the worker would choose here (its own sizing: probe forwards, free memory); 8 on the CPU."""
        if self.device.type != "cuda":
            return 8
        from worker.device_check import choose_batch_size

        def measure(b: int) -> float:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.forward_seconds(self.net(), b, 1)
            return float(torch.cuda.max_memory_allocated(self.device) - base)

        batch, _ = choose_batch_size(None, measure, lambda: torch.cuda.mem_get_info(self.device)[0],
                                     device=str(self.device))
        return batch

    def over_budget(self, name: str) -> bool:
        spent = time.perf_counter() - self.t0
        if spent > self.args.budget_s:
            print(f"[{name}] skipped: {spent:.0f} s spent of the {self.args.budget_s:.0f} s budget", flush=True)
            self.results["skipped"].append(name)
            return True
        return False

    # ------------------------------------------------------------------ 1. unet
    def unet(self) -> None:
        from models.diffinfinite.layers import set_fused_kernels
        from models.kernels.groupnorm_film_silu import groupnorm_film_silu

        gflop = self.gflop_per_patch()
        batches = [2, 4] if self.smoke else [16, 64, 128, 256]
        reps = 2 if self.smoke else 5
        print(f"\n[unet] {self.config} image UNet, {self.latent}² latent, {gflop:.1f} GFLOP/patch, autocast "
              f"{self.dtype}, peak {self.peak} TFLOP/s")
        print(f"{'batch':>5} {'variant':<18} {'patches/s':>10} {'TFLOP/s':>8} {'% peak':>7}")
        rows = []
        compiled = self.compiled()
        for b in batches:
            for variant in ("eager", "eager+fused", "compiled+fused"):
                set_fused_kernels(variant != "eager")
                fn = compiled if variant.startswith("compiled") else self.net()
                secs = self.forward_seconds(fn, b, reps)
                tflops = b * gflop / secs / 1e3
                pct = 100 * tflops / self.peak if self.peak else None
                rows.append({"batch": b, "variant": variant, "patches_per_s": round(b / secs, 1),
                             "tflops": round(tflops, 2), "percent_of_peak": None if pct is None else round(pct, 1)})
                print(f"{b:>5} {variant:<18} {b / secs:>10.1f} {tflops:>8.2f} "
                      f"{'n/a' if pct is None else f'{pct:.1f}':>7}", flush=True)
        set_fused_kernels(None)
        warm = getattr(compiled, "stats", None)
        warmup = round(warm.warmup_s, 1) if warm is not None else 0.0
        print(f"compile warm-up (all shapes): {warmup} s")
        # the fused kernel alone, on the first level's activation
        cfg = self.net().config
        b = batches[-1]
        h = torch.randn(b, cfg.dim, self.latent, self.latent, device=self.device,
                        dtype=self.dtype or torch.float32)
        norm = torch.nn.GroupNorm(cfg.resnet_block_groups, cfg.dim).to(self.device)
        scale, shift = (torch.randn(b, cfg.dim, 1, 1, device=self.device, dtype=h.dtype) for _ in range(2))
        out_dtype = torch.float32 if self.device.type == "cuda" else h.dtype  # what CUDA autocast's GroupNorm gives

        def unfused():
            with _autocast(self.device, self.dtype):
                return torch.nn.functional.silu(norm(h) * (scale + 1) + shift)

        def fused():
            return groupnorm_film_silu(h, cfg.resnet_block_groups, norm.weight, norm.bias, norm.eps, scale, shift,
                                       out_dtype=out_dtype)

        with torch.inference_mode():
            diff = (fused().float() - unfused().float()).abs().max().item()
            s_u, s_f = _median_s(unfused, self.device, reps * 4), _median_s(fused, self.device, reps * 4)
        moved = h.numel() * (2 * h.element_size() + torch.finfo(out_dtype).bits // 8)
        print(f"kernel {list(h.shape)}: unfused {s_u * 1e3:.3f} ms, fused {s_f * 1e3:.3f} ms "
              f"({moved / s_f / 1e9:.0f} GB/s effective), |Δ| ≤ {diff:.3g}")
        self.results["unet"] = {"gflop_per_patch": round(gflop, 2), "rows": rows, "compile_warmup_s": warmup,
                                "kernel": {"unfused_ms": round(s_u * 1e3, 3), "fused_ms": round(s_f * 1e3, 3),
                                           "max_abs_diff": diff}}

    # ------------------------------------------------------------------ 2. steps
    def _sampler(self, net, mode: str, batch: int, edges: str, lab: np.ndarray):
        from models.diffinfinite.guidance import ImageDenoiser
        from models.diffinfinite.sampler import RandomPatchSampler

        return RandomPatchSampler(ImageDenoiser(net, autocast_dtype=self.dtype), patch=self.latent, mode=mode,
                                  steps=250, guidance=3.0, batch_size=batch, multiple=self.net().config.downsample_factor,
                                  tile_edges=edges)

    def step_time(self, net, mode: str, batch: int, edges: str, side_px: int, timed: int) -> dict:
        from bench.sampler import synthetic_mask

        f = 8 * 64 // self.latent  # px per latent px at this window (8 at the official 64² window)
        lab = np.ascontiguousarray(synthetic_mask(side_px)[::f, ::f])
        s = self._sampler(net, mode, batch, edges, lab)
        state = s.init_state(lab, seed=0, device=self.device)
        s.run(state, lab, until=1)  # warm-up step: shapes compiled, allocator pools filled
        _sync(self.device)
        t0 = time.perf_counter()
        s.run(state, lab, until=1 + timed)
        _sync(self.device)
        secs = (time.perf_counter() - t0) / timed
        st = s.stats[1]
        return {"seconds": secs, "passes": st.forwards, "calls": st.calls, "batches": st.batches}

    def steps(self) -> None:
        from models.diffinfinite.layers import set_fused_kernels

        side = 256 if self.smoke else 2048
        timed = 1 if self.smoke else 3
        batch = self.service_batch()
        set_fused_kernels(self.device.type == "cuda")
        net = self.compiled()
        print(f"\n[steps] {side}² px, service batch {batch}")
        out = {"side_px": side, "batch": batch}
        for name, mode, edges, fn, b in (("random", "random", "bucket", net, batch),
                                        ("tiled", "tiled", "bucket", net, batch),
                                        ("reference tiled (fit, eager, batch 64)", "tiled", "fit", self.net(),
                                         min(64, batch) if self.smoke else 64)):
            if name.startswith("reference"):
                set_fused_kernels(False)
            r = self.step_time(fn, mode, b, edges, side, timed)
            out[name] = r
            print(f"{name:<40} {r['seconds']:.3f} s/step, {r['passes']} passes in {r['calls']} calls "
                  f"({r['batches']} batches)", flush=True)
        set_fused_kernels(None)
        out["tiled_over_random"] = round(out["tiled"]["seconds"] / out["random"]["seconds"], 3)
        print(f"tiled ÷ random: {out['tiled_over_random']} (goal ≤ {GOALS['tiled_over_random_step']})")
        # the sampling loop's share of peak: UNet FLOPs of the step's passes (window area ÷ patch area) per second
        gflop = self.results.get("unet", {}).get("gflop_per_patch") or self.gflop_per_patch()
        for name in ("random", "tiled"):
            r = out[name]
            r["tflops"] = round(r["passes"] * gflop / r["seconds"] / 1e3, 2)  # upper bound: border windows smaller
            r["percent_of_peak"] = round(100 * r["tflops"] / self.peak, 1) if self.peak else None
        self.results["steps"] = out

    # ------------------------------------------------------------------ 3. projection
    def projection(self) -> None:
        from bench.sampler import synthetic_mask
        from models.diffinfinite.guidance import passes_for
        from models.diffinfinite.sampler import _np_rng, plan_random, plan_tiled, tile_offset

        measure_px = 512 if self.smoke else 8192
        target_px = 2048 if self.smoke else 50000
        batch = self.results.get("steps", {}).get("batch") or self.service_batch()
        from models.diffinfinite.layers import set_fused_kernels

        set_fused_kernels(self.device.type == "cuda")
        r = self.step_time(self.compiled(), "tiled", batch, "bucket", measure_px, 1 if self.smoke else 2)
        set_fused_kernels(None)
        per_pass = r["seconds"] / r["passes"]
        f = 8 * 64 // self.latent
        side_lat = target_px // f
        # the planners at the target size (labels: the synthetic mask's statistics, tiled to size)
        small = np.ascontiguousarray(synthetic_mask(min(target_px, 4096))[::f, ::f])
        reps = -(-side_lat // small.shape[0])
        lab = np.tile(small, (reps, reps))[:side_lat, :side_lat]
        p = (self.latent, self.latent)
        tiled = plan_tiled(lab, p, tile_offset(0, 0, p, 5), 0, edges="bucket", multiple=8)
        passes_tiled = sum(len(passes_for(c.labels, 3.0, 0)) for c in tiled)
        rand = plan_random(lab, p, _np_rng(0, 0, 3, 5))
        passes_random = sum(len(passes_for(c.labels, 3.0, 0)) for c in rand)
        e2e = self.results.get("e2e")
        post = None
        if e2e and e2e.get("seconds_total") and e2e.get("seconds_sampling") is not None:
            post = (e2e["seconds_total"] - e2e["seconds_sampling"]) * (target_px / e2e["side_px"]) ** 2
        out = {"target_px": target_px, "measured_at_px": measure_px, "seconds_per_pass": per_pass,
               "passes_per_step": {"tiled": passes_tiled, "random": passes_random},
               "decode_write_minutes": None if post is None else round(post / 60, 1)}
        print(f"\n[projection] {target_px}² px: {passes_tiled} tiled / {passes_random} random passes per step, "
              f"{per_pass * 1e3:.2f} ms per pass (tiled step at {measure_px}²)")
        for solver, steps in (("ddim", 250), ("dpmpp-2m", 25)):
            for mode, n in (("tiled", passes_tiled), ("random", passes_random)):
                minutes = n * per_pass * steps / 60 + (post or 0) / 60
                out[f"{mode}_{solver}_{steps}_minutes"] = round(minutes, 1)
                print(f"{mode:<7} {solver:<9} {steps:>4} steps: {minutes:8.1f} min"
                      + ("" if post is not None else " (sampling only: decode not measured yet)"))
        self.results["projection"] = out

    # ------------------------------------------------------------------ 4. infbrush
    def infbrush(self) -> None:
        from bench.infbrush import measure

        a = SimpleNamespace(device=str(self.device), config="tiny" if self.smoke else "paper",
                            steps=2 if self.smoke else 50, threads=max(1, (os.cpu_count() or 2) // 2), full=True,
                            chunk_pixels=65536 if self.smoke else 4194304, guidance=1.0, noise_prior="white",
                            eta=0.0)
        size = 64 if self.smoke else 4096
        r = measure(a, size, "chunked")
        print(f"\n[infbrush] {a.config} ∞-Brush, {size}², {a.steps} steps: {r['total_s']:.1f} s "
              f"({r['step_s']:.3f} s/step, {r['params'] / 1e6:.0f} M parameters)")
        self.results["infbrush"] = {"side_px": size, "steps": a.steps, "config": a.config,
                                    "seconds": round(r["total_s"], 2), "params": r["params"]}

    # ------------------------------------------------------------------ 5. e2e
    def e2e(self) -> None:
        from PIL import Image

        from slidesynth.cli import main as cli_main
        from slidesynth.demo import demo_mask

        side = 256 if self.smoke else 16384
        steps = 2 if self.smoke else 50
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            mask_path = Path(tmp) / "mask.png"
            Image.fromarray(demo_mask(side // 4).astype(np.uint8), mode="L").save(mask_path)
            argv = ["generate", "--mask", str(mask_path), "--mask-mpp", "2", "--out", str(Path(tmp) / "slide.tiff"),
                    "--steps", str(steps), "--seed", "0", "--device", str(self.device)]
            buf = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(buf):
                rc = cli_main(argv)
            wall = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"slidesynth {' '.join(argv)} exited with {rc}")
        metrics = json.loads(buf.getvalue().strip().splitlines()[-1])
        out = {"side_px": side, "steps": steps, "seconds_wall": round(wall, 1),
               "seconds_total": metrics.get("seconds_total"), "seconds_sampling": metrics.get("seconds_sampling"),
               "seconds_compile_warmup": metrics.get("seconds_compile_warmup"),
               "sampler_network_calls": metrics.get("sampler_network_calls")}
        print(f"\n[e2e] demo model {side}², {steps} steps: {wall:.1f} s wall ({out['seconds_sampling']} s sampling, "
              f"compile warm-up {out['seconds_compile_warmup']} s)")
        self.results["e2e"] = out

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        from models.acceleration import configure_cuda_backends

        configure_cuda_backends(self.device)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        print(f"bench.gpu on {name}, torch {torch.__version__}{' (smoke)' if self.smoke else ''}")
        # e2e before projection: the projection scales its decode and write time by area
        order = [s for s in ("unet", "steps", "e2e", "projection", "infbrush") if s in self.args.sections]
        for section in order:
            if self.over_budget(section):
                continue
            t0 = time.perf_counter()
            getattr(self, section)()
            self.results.setdefault("seconds", {})[section] = round(time.perf_counter() - t0, 1)
        return self.summary(name)

    def summary(self, device_name: str) -> dict:
        r = self.results
        steps = r.get("steps", {})
        proj = r.get("projection", {})
        unet_rows = r.get("unet", {}).get("rows", [])
        batch = steps.get("batch")
        loop_pct = steps.get("tiled", {}).get("percent_of_peak")
        ref_eager = next((x for x in unet_rows if x["variant"] == "eager" and x["batch"] == 16), None)
        ours = {
            "sampling_loop_percent_of_peak": loop_pct, "service_batch": batch,
            "tiled_step_s": steps.get("tiled", {}).get("seconds"), "random_step_s": steps.get("random", {}).get("seconds"),
            "tiled_over_random": steps.get("tiled_over_random"),
            "projection_50000_tiled_ddim250_min": proj.get("tiled_ddim_250_minutes"),
            "projection_50000_tiled_dpmpp25_min": proj.get("tiled_dpmpp-2m_25_minutes"),
            "infbrush_4096_50_s": r.get("infbrush", {}).get("seconds"),
            "e2e_16384_50_s": r.get("e2e", {}).get("seconds_wall"),
        }
        ref_step = steps.get("reference tiled (fit, eager, batch 64)", {}).get("seconds")
        reference = {"what": "the pre-issue path in the same run: tiled with fitted border windows, eager, batch 64; "
                             "UNet eager at batch 16 (the old default batch was 8)",
                     "tiled_step_s": ref_step,
                     "unet_eager_batch16_percent_of_peak": ref_eager and ref_eager["percent_of_peak"]}
        ratio = {"tiled_step": round(ours["tiled_step_s"] / ref_step, 3) if ours["tiled_step_s"] and ref_step else None}
        met = {
            "percent_of_peak": loop_pct is not None and loop_pct >= GOALS["percent_of_peak"],
            "tiled_over_random_step": (ours["tiled_over_random"] is not None
                                       and ours["tiled_over_random"] <= GOALS["tiled_over_random_step"]),
            "projection_minutes": (ours["projection_50000_tiled_dpmpp25_min"] is not None
                                   and ours["projection_50000_tiled_dpmpp25_min"] <= GOALS["projection_minutes"]),
        }
        return {"bench": "gpu", "device": device_name, "smoke": self.smoke, "peak_tflops": self.peak, "ours": ours,
                "reference": reference, "ratio": ratio, "goals": GOALS, "met": met, "details": r}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every code path on the CPU at tiny sizes")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"bf16 dense peak for %% of peak (default on CUDA: {ISSUE_PEAK_TFLOPS}, the H200 figure "
                        "issue 18 used; none on the CPU)")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip sections that would start after this")
    p.add_argument("--no-compile", action="store_true", help="eager networks only")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.peak_tflops is None and args.device.startswith("cuda"):
        args.peak_tflops = ISSUE_PEAK_TFLOPS
    summary = Bench(args).run()
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
