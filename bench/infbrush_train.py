"""∞-Brush training step time: the demo recipe's step (``slidesynth train infinity-brush``, ``demo`` preset).

    python -m bench.infbrush_train                     # CPU, 2 threads, 20 warm-up + 20 measured steps per run
    python -m bench.infbrush_train --prior bessel      # the Bessel demo's fine-tune step (noise from the FFT prior)
    python -m bench.infbrush_train --device cuda --threads 16

Both runs train the same model with the recipe's options (batch 4, 4,096 points per image as dense 32² patches,
conditions from slidesynth-tile-v1 over 1×1 and 2×2 regions) on ``--images`` procedural 1024² mosaics for
``--warmup`` + ``--steps`` steps, seed 0:

* ours — the training loop as shipped;
* reference — the same loop with the k-NN of the point sets computed as before (a (chunk, N, 2) difference,
  squared and summed over its last axis, on chunks of 2^24 distances) and every image decoded from its PNG on
  each draw (``--image-cache-mb 0``).

Time per step is the median of the per-step times in the run's ``train_log.jsonl`` over the measured steps (the
warm-up fills the encoder's per-image cache). Both runs must end with bit-identical weights ("identical" in the
JSON): the speed-up changes no number. The last line is one JSON object: ours, the reference and the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pairwise_knn_reference(queries, points, k, chunk=None):
    """The k-NN as it was computed before (the reference): the (chunk, N, 2) difference squared and summed."""
    import torch

    N = points.shape[0]
    chunk = chunk or max(1, (1 << 24) // max(N, 1))
    idx = torch.empty(queries.shape[0], k, dtype=torch.long, device=points.device)
    d2 = torch.empty(queries.shape[0], k, dtype=points.dtype, device=points.device)
    for q0 in range(0, queries.shape[0], chunk):
        dist = ((queries[q0:q0 + chunk, None, :] - points[None, :, :]) ** 2).sum(-1)
        d2[q0:q0 + chunk], idx[q0:q0 + chunk] = dist.topk(k, dim=-1, largest=False, sorted=True)
    return idx, d2


def train_run(data: Path, out: Path, args, reference: bool) -> dict:
    """One training run; returns the per-step times of the measured steps and the final weights' digest."""
    import hashlib

    import torch

    import models.infbrush.geometry as geometry
    from models.infbrush.config import demo_config
    from models.infbrush.priors import NoisePrior
    from slidesynth.demo_infbrush import PRIORS
    from training.cli import _import_function
    from training.infbrush import TrainOptions, train_infbrush

    torch.set_num_threads(args.threads)
    saved = geometry.knn_brute
    if reference:
        geometry.knn_brute = pairwise_knn_reference
    try:
        embed = _import_function("slidesynth-tile-v1", None)
        bessel = PRIORS["bessel"]      # the shipped Bessel demo's prior
        prior = None if args.prior == "white" else \
            NoisePrior(kind="bessel", length_um=bessel["length_um"], gamma=bessel["gamma"]).validate()
        opts = TrainOptions(
            out=out, config=demo_config(), data=data, embed=embed, grids=((1, 1), (2, 2)),
            prototype_classes=getattr(embed, "prototype_classes", ()), tile_px=64, regions="tiles",
            image_cache_mb=0 if reference else 2048, points="patches", patch_px=32,
            steps=args.warmup + args.steps, batch_size=4, lr=5e-4, ema=0.995, ema_every=1,
            save_every=10 ** 9, log_every=1, seed=0, device=args.device, progress=False, noise_prior=prior)
        t0 = time.perf_counter()
        result = train_infbrush(opts)
        wall = time.perf_counter() - t0
    finally:
        geometry.knn_brute = saved
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows]
    per_step = [b - a for a, b in zip(elapsed[args.warmup - 1:], elapsed[args.warmup:])]
    digest = hashlib.sha256()
    for name, value in sorted(result["model"].state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return {"median_s": statistics.median(per_step), "mean_s": statistics.fmean(per_step), "wall_s": wall,
            "digest": digest.hexdigest(), "last_loss": result["losses"][-1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prior", choices=["white", "bessel"], default="white")
    ap.add_argument("--images", type=int, default=4, help="procedural 1024² mosaics to train on (default 4)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be ≥ 1")
    with tempfile.TemporaryDirectory(prefix="bench-infbrush-train-") as tmp:
        data = Path(tmp) / "mosaics"
        subprocess.run([sys.executable, "-m", "procedural", "dataset", str(data), "--n", str(args.images),
                        "--size", "1024", "--kind", "mosaic", "--seed", "2", "--workers", "2"], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL)
        ours = train_run(data, Path(tmp) / "ours", args, reference=False)
        ref = train_run(data, Path(tmp) / "reference", args, reference=True)
    ratio = ref["median_s"] / ours["median_s"]
    print(f"∞-Brush demo training step, {args.prior} noise, {args.device}, {args.threads} threads, "
          f"median of {args.steps} steps after {args.warmup}")
    print(f"{'run':<12}{'s/step (median)':>17}{'s/step (mean)':>15}{'wall s':>9}  final weights")
    for name, r in (("ours", ours), ("reference", ref)):
        print(f"{name:<12}{r['median_s']:>17.3f}{r['mean_s']:>15.3f}{r['wall_s']:>9.1f}  {r['digest'][:16]}")
    identical = ours["digest"] == ref["digest"]
    print(f"speed-up {ratio:.2f}×; weights {'bit-identical' if identical else 'DIFFER'}")
    print(json.dumps({"bench": "infbrush_train", "device": args.device, "threads": args.threads, "prior": args.prior,
                      "steps": args.steps, "warmup": args.warmup, "images": args.images,
                      "ours_s_per_step": round(ours["median_s"], 4), "reference_s_per_step": round(ref["median_s"], 4),
                      "ratio": round(ratio, 3), "identical": identical}))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
