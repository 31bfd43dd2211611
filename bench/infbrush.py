"""∞-Brush sampling cost against the number of output pixels.

    python -m bench.infbrush                       # CPU, small config, one DDIM step at 256² … 4096²
    python -m bench.infbrush --sizes 256,512,1024 --reference-max 1024
    python -m bench.infbrush --device cuda --config paper --sizes 4096 --steps 50 --full --chunk-pixels 4194304
                                                   # the H200 goal: a 4096² sample, 50 steps, paper model size
    python -m bench.infbrush --noise-prior bessel --eta 1   # the default demo's sampling: Bessel noise every step

Each measurement runs in a fresh subprocess (clean peak-RSS high-water mark on CPU; torch.cuda peak on GPU).
"ours" = the chunked sampler (memory bounded by --chunk-pixels plus the H×W×3 state); "reference" = the same network
evaluated one-shot over the whole canvas (models.infbrush.sampler.evaluate_full), measured where it fits
(--reference-max). The fitted exponent is the slope of log(cost) against log(pixels); linear growth means ≈ 1
(below 1 where fixed per-step costs — the grid UNO, the grid-transfer patches — still dominate).
The last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from models.infbrush import InfBrushPipeline
    from models.infbrush.config import PRESETS
    from models.infbrush.denoiser import InfBrushDenoiser
    from models.infbrush.pipeline import InfBrushModels, make_card, parameter_count
    from models.infbrush.sampler import evaluate_full

    dev = torch.device(args.device)
    cfg = PRESETS[args.config]()
    torch.manual_seed(0)
    model = InfBrushDenoiser(cfg).to(dev).eval()
    prior = None
    if args.noise_prior != "white":
        from models.infbrush.priors import NoisePrior

        prior = NoisePrior(kind=args.noise_prior, length_um=8.0, gamma=0.55).validate()   # the Bessel demo's
    models = InfBrushModels(card=make_card(cfg, name=f"bench-{args.config}", trained=False, noise_prior=prior),
                            denoiser=model)
    pipe = InfBrushPipeline(models, dev)
    emb = np.random.RandomState(0).randn(cfg.embedding_dim)
    size = args.size
    # warm up on a small canvas so allocator pools and kernels exist before the baseline is taken
    list(pipe.sample_bands(64, 64, embedding=emb, steps=1, guidance=args.guidance, chunk_pixels=args.chunk_pixels))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2 ** 20
    else:
        base = _rss_mb()
    out = {"size": size, "pixels": size * size, "mode": args.mode, "params": parameter_count(model)}
    if args.mode == "chunked":
        run = pipe.run(size, size, embedding=emb, seed=0, steps=args.steps, guidance=args.guidance, eta=args.eta,
                       chunk_pixels=args.chunk_pixels)
        t0 = time.perf_counter()
        run.init_state()
        _sync(dev)
        t1, c1 = time.perf_counter(), time.process_time()
        n_steps = len(run.ts) if args.full else 1
        for s in range(len(run.ts) - n_steps, len(run.ts)) if args.full else [0]:
            for _ in run.step(s):
                pass
        _sync(dev)
        t2, c2 = time.perf_counter(), time.process_time()
        out.update(init_s=t1 - t0, step_s=(t2 - t1) / n_steps, step_cpu_s=(c2 - c1) / n_steps, steps=n_steps,
                   total_s=t2 - t0,
                   tiles=run.canvas.n_tiles, grid_pixels=int(run.canvas.grid_pixels.shape[0]))
    else:
        from models.infbrush.denoiser import token_positions

        B = 1 if args.guidance == 1.0 else 2
        x = torch.randn(size, size, 3, device=dev) * 0.3
        with torch.inference_mode():
            e = torch.as_tensor(emb, dtype=torch.float32, device=dev).reshape(1, 1, -1).expand(B, -1, -1)
            pos = token_positions(1, 1, size, size)[None].expand(B, -1, -1).to(dev)
            ctx = model.context(torch.full((B,), 999, device=dev), e, pos, torch.tensor([False, True][:B], device=dev))
            t1, c1 = time.perf_counter(), time.process_time()
            evaluate_full(model, x, ctx, B)
            _sync(dev)
            t2, c2 = time.perf_counter(), time.process_time()
        out.update(step_s=t2 - t1, step_cpu_s=c2 - c1, steps=1)
    if dev.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20 - base
    else:
        out["peak_mb"] = _rss_mb() - base
    return out


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def fit_exponent(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    n = len(lx)
    if n < 2:
        return float("nan")
    mx, my = sum(lx) / n, sum(ly) / n
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def linear_fit(xs, ys) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((a - mx) * (c - my) for a, c in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return my - b * mx, b


def measure(args, size: int, mode: str) -> dict:
    cmd = [sys.executable, "-m", "bench.infbrush", "--_child", "--size", str(size), "--mode", mode,
           "--device", args.device, "--config", args.config, "--steps", str(args.steps), "--threads", str(args.threads),
           "--chunk-pixels", str(args.chunk_pixels), "--guidance", str(args.guidance), "--noise-prior", args.noise_prior,
           "--eta", str(args.eta)] + (["--full"] if args.full else [])
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
    if res.returncode != 0:
        raise RuntimeError(f"measurement {size}² {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,512,1024,2048,4096")
    p.add_argument("--config", default="small", choices=["tiny", "small", "demo", "paper"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the run (one is timed unless --full)")
    p.add_argument("--full", action="store_true", help="time every step of the run (the 4096² / 50-step goal)")
    p.add_argument("--chunk-pixels", type=int, default=65536)
    p.add_argument("--guidance", type=float, default=1.0, help="≠ 1 doubles the batch (classifier-free guidance)")
    p.add_argument("--noise-prior", default="white", choices=["white", "bessel"],
                   help="the model's noise prior (bessel: ℓ = 8 µm, γ = 0.55, the Bessel demo's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η (> 0 draws the prior's noise every step)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable figures on a shared host)")
    p.add_argument("--reference-max", type=int, default=1024, help="largest side for the one-shot reference")
    p.add_argument("--goal-s", type=float, default=600.0, help="wall-time goal of a --full run")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="chunked", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(child(args)))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    ours, ref = [], []
    print(f"∞-Brush sampling cost — config {args.config}, device {args.device}, chunk {args.chunk_pixels} px, "
          f"guidance {args.guidance}, noise prior {args.noise_prior}, η {args.eta:g}, {args.threads} thread(s)")
    print(f"{'size':>6} {'pixels':>10} | {'ours s/step':>11} {'cpu s':>8} {'ours MB':>8} {'init s':>7} {'tiles':>6} | "
          f"{'one-shot s':>10} {'cpu s':>8} {'one-shot MB':>11} | {'cpu ratio':>9} {'mem ratio':>9}")
    for size in sizes:
        o = measure(args, size, "chunked")
        ours.append(o)
        r = measure(args, size, "oneshot") if size <= args.reference_max and not args.full else None
        if r:
            ref.append(r)
        rt = f"{o['step_cpu_s'] / r['step_cpu_s']:9.2f}" if r else f"{'-':>9}"
        rm = f"{o['peak_mb'] / max(r['peak_mb'], 1.0):9.2f}" if r else f"{'-':>9}"
        rs = (f"{r['step_s']:10.3f} {r['step_cpu_s']:8.3f} {r['peak_mb']:11.1f}" if r
              else f"{'-':>10} {'-':>8} {'-':>11}")
        print(f"{size:>5}² {size * size:>10} | {o['step_s']:11.3f} {o['step_cpu_s']:8.3f} {o['peak_mb']:8.1f} {o['init_s']:7.2f} "
              f"{o['tiles']:>6} | {rs} | {rt} {rm}", flush=True)

    px = [o["pixels"] for o in ours]
    summary = {"bench": "infbrush", "config": args.config, "device": args.device, "chunk_pixels": args.chunk_pixels,
               "guidance": args.guidance, "noise_prior": args.noise_prior, "eta": args.eta, "threads": args.threads,
               "params": ours[0]["params"],
               "ours": [{k: o[k] for k in ("size", "pixels", "step_s", "step_cpu_s", "peak_mb", "init_s", "tiles")} for o in ours],
               "reference_oneshot": [{k: r[k] for k in ("size", "pixels", "step_s", "step_cpu_s", "peak_mb")}
                                     for r in ref]}
    if len(ours) >= 2:
        summary["time_exponent"] = fit_exponent(px, [o["step_s"] for o in ours])
        summary["cpu_time_exponent"] = fit_exponent(px, [o["step_cpu_s"] for o in ours])
        summary["memory_exponent"] = fit_exponent(px, [o["peak_mb"] for o in ours])
        top = ours[-3:] if len(ours) >= 3 else ours
        summary["time_exponent_top3"] = fit_exponent([o["pixels"] for o in top], [o["step_s"] for o in top])
        summary["memory_exponent_top3"] = fit_exponent([o["pixels"] for o in top], [o["peak_mb"] for o in top])
        a, b = linear_fit(px, [o["step_s"] for o in ours])
        summary["time_linear_fit"] = {"fixed_s": a, "us_per_pixel": b * 1e6}
        a, b = linear_fit(px, [o["peak_mb"] for o in ours])
        summary["memory_linear_fit"] = {"fixed_mb": a, "bytes_per_pixel": b * 2 ** 20}
        print(f"fitted exponent (log cost vs log pixels): wall time {summary['time_exponent']:.3f} "
              f"(top 3 sizes {summary['time_exponent_top3']:.3f}), CPU time {summary['cpu_time_exponent']:.3f}, peak memory {summary['memory_exponent']:.3f} "
              f"(top 3 {summary['memory_exponent_top3']:.3f})")
        print(f"linear fit: time = {summary['time_linear_fit']['fixed_s']:.3f} s + "
              f"{summary['time_linear_fit']['us_per_pixel']:.3f} µs/px; memory = "
              f"{summary['memory_linear_fit']['fixed_mb']:.1f} MB + {summary['memory_linear_fit']['bytes_per_pixel']:.1f} B/px")
    if ref:
        pairs = [(o, r) for o in ours for r in ref if o["size"] == r["size"]]
        summary["ratio_time"] = {str(o["size"]): o["step_s"] / r["step_s"] for o, r in pairs}
        summary["ratio_cpu_time"] = {str(o["size"]): o["step_cpu_s"] / r["step_cpu_s"] for o, r in pairs}
        summary["ratio_memory"] = {str(o["size"]): o["peak_mb"] / max(r["peak_mb"], 1.0) for o, r in pairs}
        if len(ref) >= 2:
            summary["reference_time_exponent"] = fit_exponent([r["pixels"] for r in ref], [r["step_s"] for r in ref])
            summary["reference_cpu_time_exponent"] = fit_exponent([r["pixels"] for r in ref],
                                                                  [r["step_cpu_s"] for r in ref])
            summary["reference_memory_exponent"] = fit_exponent([r["pixels"] for r in ref], [r["peak_mb"] for r in ref])
    if args.full:
        for o in ours:
            print(f"full run {o['size']}²: {o['steps']} steps in {o['total_s']:.1f} s "
                  f"({'meets' if o['total_s'] <= args.goal_s else 'misses'} the {args.goal_s:.0f} s goal)")
        summary["full_runs"] = [{"size": o["size"], "steps": o["steps"], "total_s": o["total_s"],
                                 "meets_goal": o["total_s"] <= args.goal_s} for o in ours]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
