"""DDE coordinator cost: seconds per denoising step against canvas area, and its overhead over the patch model.

    python -m bench.dde_cost [--sides 128,192,256,384] [--model weights/diffinfinite-demo] [--device cpu]

For each square latent canvas (``dde`` plan: patch 64, stride 32) it times one coordinator correction over all
windows (inference, the shipped coordinator's architecture; weights do not change the cost) and the patch
model's passes over the same windows (the image UNet, one conditional pass per window, batches of 8), takes
the median of ``--repeat`` runs, and fits time ∝ area^e by least squares in log-log (e ≈ 1: linear, which the
windowed attention is built for; a global-attention coordinator would approach 2), and against the token count
(windows × tokens per window, which on small canvases grows faster than the area because of the border windows). It also prints the largest
attention group (tokens that attend to each other), which must not grow with the canvas.

Bands: at the largest canvas it also runs the correction in bands of window rows (``--band-tokens``, default half
the canvas's tokens; :meth:`models.dde.coordinator.DDECoordinator.bands`) and prints the peak memory
the correction adds (CUDA: ``max_memory_allocated``; CPU: the rise of the peak resident size, VmHWM reset first) and the time,
one pass against bands, with the largest difference between the two results (0 or float rounding).

Last line: JSON with ``ours`` = coordinator seconds per step at the largest canvas, ``reference`` = the patch
model's passes at that canvas (same run), ``ratio`` = overhead, the fitted exponents and the band figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fit(areas: list[float], secs: list[float]) -> float:
    return float(np.polyfit(np.log(areas), np.log(secs), 1)[0])


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_mb(fn, device: torch.device) -> float | None:
    """Peak memory (MB) ``fn`` adds: the CUDA allocator's peak, or on CPU the peak resident size (VmHWM, reset
    through /proc/self/clear_refs first) above the resident size before. None where Linux's reset is missing."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        base = _status_mb("VmRSS")
    except OSError:
        return None
    fn()
    return _status_mb("VmHWM") - base


def main(argv: list[str] | None = None) -> int:
    from models.dde.coordinator import CoordinatorConfig, DDECoordinator, attention_groups, canvas_token_positions
    from models.dde.loading import CoordinatorLoadError, load_coordinator
    from models.diffinfinite.loading import load_diffinfinite
    from models.patching import plan_windows

    p = argparse.ArgumentParser(prog="python -m bench.dde_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", default="128,192,256,384", help="latent canvas sides (comma-separated)")
    p.add_argument("--model", default="weights/diffinfinite-demo", help="DiffInfinite model folder (the base)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="UNet windows per forward")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--band-tokens", type=int, default=0,
                   help="tokens per banded pass at the largest canvas (0: half of its tokens)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sides = [int(s) for s in args.sides.split(",")]
    models = load_diffinfinite(args.model, device)
    unet = models.image_unet.eval()
    try:
        coord = load_coordinator(args.model, device)
        source = f"{args.model}/dde-coordinator"
    except CoordinatorLoadError:
        coord = DDECoordinator(CoordinatorConfig(channels=4, patch=64, stride=32, cond="labels",
                                                 cond_channels=unet.config.num_classes)).to(device).eval()
        source = "untrained, default architecture"
    cfg = coord.config
    print(f"coordinator: {source}: {coord.parameter_count():,} parameters, token {cfg.token}, attention square "
          f"{cfg.attn_window} px, depth {cfg.depth}, hidden {cfg.hidden}; device {device}, torch threads "
          f"{torch.get_num_threads()}")
    rows = []
    g = torch.Generator().manual_seed(0)
    for side in sides:
        plan = plan_windows("dde", (side, side), cfg.patch, cfg.stride)
        n = len(plan)
        outs = torch.randn((n, 4, cfg.patch, cfg.patch), generator=g).to(device)
        noisy = torch.randn((n, 4, cfg.patch, cfg.patch), generator=g).to(device)
        labels = torch.randint(1, unet.config.num_classes, (n, 1, cfg.patch, cfg.patch), generator=g).to(device)
        t = torch.full((n,), 500.0, device=device)
        origins = plan.origins_tensor(device)

        def run_coord():
            with torch.inference_mode():
                coord.correction(outs, noisy, origins, labels, t)
            if device.type == "cuda":
                torch.cuda.synchronize()

        def run_unet():
            with torch.inference_mode():
                for a in range(0, n, args.batch):
                    b = min(args.batch, n - a)
                    unet(noisy[a:a + b], t[a:a + b].long(), labels[a:a + b])
            if device.type == "cuda":
                torch.cuda.synchronize()

        tc = _time(run_coord, args.repeat)
        tu = _time(run_unet, args.repeat)
        pos = canvas_token_positions(origins.cpu(), cfg.patch, cfg.token)
        canvas = torch.zeros(len(pos), dtype=torch.long)
        wt = cfg.attn_window // cfg.token
        group = max(attention_groups(pos, canvas, wt, s).index.shape[1] for s in (0, wt // 2))
        rows.append({"side": side, "area": side * side, "windows": n, "tokens": len(pos), "group": group,
                     "coordinator_s": tc, "unet_s": tu, "overhead": tc / tu})
    print(f"{'canvas':>8} {'windows':>8} {'tokens':>8} {'max group':>10} {'coordinator s':>14} {'UNet passes s':>14} "
          f"{'overhead':>9}")
    for r in rows:
        print(f"{r['side']:>6}² {r['windows']:>8} {r['tokens']:>8} {r['group']:>10} {r['coordinator_s']:>14.3f} "
              f"{r['unet_s']:>14.3f} {r['overhead']:>9.3f}")
    # one pass against bands at the largest canvas: same result, bounded memory
    side = sides[-1]
    plan = plan_windows("dde", (side, side), cfg.patch, cfg.stride)
    n = len(plan)
    outs, noisy = (torch.randn((n, 4, cfg.patch, cfg.patch), generator=g).to(device) for _ in range(2))
    labels = torch.randint(1, unet.config.num_classes, (n, 1, cfg.patch, cfg.patch), generator=g).to(device)
    t = torch.full((n,), 500.0, device=device)
    origins = plan.origins_tensor(device)
    per = (cfg.patch // cfg.token) ** 2
    band_tokens = args.band_tokens or max(per, n * per // 2)
    results = {}

    def corrected(max_tokens: int):
        def run():
            coord.max_tokens = max_tokens
            with torch.inference_mode():
                results[max_tokens] = coord.correction(outs, noisy, origins, labels, t)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    banded = {"canvas": side, "tokens": n * per, "band_tokens": band_tokens}
    coord.max_tokens = band_tokens
    banded["bands"] = len(coord.bands(origins))
    for label, max_tokens in (("one_pass", 0), ("banded", band_tokens)):
        peak = _peak_mb(corrected(max_tokens), device)
        banded[f"{label}_peak_mb"] = None if peak is None else round(peak, 1)
        banded[f"{label}_s"] = round(_time(corrected(max_tokens), args.repeat), 4)
    banded["max_abs_diff"] = float((results[0] - results[band_tokens]).abs().max())
    mb = {k: "n/a" if banded[k] is None else f"{banded[k]:.0f}" for k in ("one_pass_peak_mb", "banded_peak_mb")}
    print(f"bands at {side}²: {banded['bands']} bands of ≤ {band_tokens} tokens (of {n * per}): peak memory "
          f"{mb['one_pass_peak_mb']} MB one pass → {mb['banded_peak_mb']} MB banded; time "
          f"{banded['one_pass_s']:.3f} s → {banded['banded_s']:.3f} s; largest difference {banded['max_abs_diff']:.3g}")
    areas = [r["area"] for r in rows]
    e_coord = _fit(areas, [r["coordinator_s"] for r in rows])
    e_unet = _fit(areas, [r["unet_s"] for r in rows])
    e_tok = _fit([r["tokens"] for r in rows], [r["coordinator_s"] for r in rows])
    print(f"fitted exponent (time ∝ area^e): coordinator {e_coord:.3f}, UNet passes {e_unet:.3f}; coordinator vs "
          f"its token count (windows × tokens per window, which grows faster than the area on small canvases: "
          f"border windows) {e_tok:.3f}")
    last = rows[-1]
    print(json.dumps({"bench": "dde_cost", "device": str(device), "canvas": last["side"],
                      "ours": round(last["coordinator_s"], 4), "reference": round(last["unet_s"], 4),
                      "ratio": round(last["overhead"], 4), "exponent": round(e_coord, 3), "exponent_vs_tokens": round(e_tok, 3),
                      "reference_exponent": round(e_unet, 3), "max_group": max(r["group"] for r in rows), "bands": banded,
                      "unit": "seconds per denoising step (coordinator vs the patch model's passes)"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
