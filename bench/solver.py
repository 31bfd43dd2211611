"""Fewer steps: DPM-Solver++(2M) against DDIM on the demo model — does it hold quality?

    python -m bench.solver                       # 4 masks (1024² slides), DDIM 250 / 50, DPM++ 2M 20 / 25 / 30, SDE 25
    python -m bench.solver --configs ddim:50,dpmpp-2m:25 --mask-size 128     # a subset, smaller slides
    python -m bench.solver --sampler random      # the random-patch mode instead of the tiled one

Every configuration generates the same masks (the demo mask and the procedural layouts of
:mod:`bench.fidelity`) with the same seed through ``slidesynth generate`` (the worker's path) and is scored
like :mod:`bench.fidelity`: balanced accuracy of the shipped window classifier against the mask, the seam
ratio on the decoder's blend edges and the quilt score. The network cost of a configuration is its number of
steps (one evaluation per pass and step for every solver).

Goal (issue 18): the multistep solver at ≤ 30 steps within 0.02 balanced accuracy of DDIM 50. The reference
of the JSON line is DDIM 50; "ours" is the best multistep configuration at ≤ 30 steps that meets the goal
(else the best at ≤ 30 steps).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_CONFIGS = "ddim:250,ddim:50,dpmpp-2m:20,dpmpp-2m:25,dpmpp-2m:30,dpmpp-2m-sde:25"
GOAL_BALANCED_ACCURACY_GAP = 0.02
GOAL_MAX_STEPS = 30


def parse_configs(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        solver, _, steps = item.strip().partition(":")
        if solver not in ("ddim", "dpmpp-2m", "dpmpp-2m-sde") or not steps.isdigit():
            raise SystemExit(f"bad configuration {item!r}: expected SOLVER:STEPS, e.g. dpmpp-2m:25")
        out.append((solver, int(steps)))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.solver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="SOLVER:STEPS,… (default: %(default)s)")
    p.add_argument("--model", help="model name (default: SLIDESYNTH_DEFAULT_MODEL)")
    p.add_argument("--sampler", choices=["random", "tiled"], default="tiled")
    p.add_argument("--mask-size", type=int, default=256, help="mask side in px at 2 µm/px (slide = 4×)")
    p.add_argument("--masks", type=int, default=4, help="the demo mask + up to 3 procedural layouts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    args = p.parse_args(argv)
    configs = parse_configs(args.configs)

    from bench.fidelity import generate, masks
    from core.settings import get_settings
    from evaluation.fidelity import labels_for_classes, load_classifier, score_slide
    from evaluation.quilt import quilt_score
    from models.cards import ModelCard
    from models.diffinfinite.engine import slide_decoder
    from models.labels import resize_labels

    settings = get_settings()
    model = args.model or settings.default_model
    label_map = ModelCard.load(settings.models_dir / model).fidelity_classes
    clf = load_classifier(None)
    chosen = masks(args.mask_size, max(0, args.masks - 1))
    print(f"model {model}, {args.sampler} sampler, {len(chosen)} masks of {args.mask_size}² at 2 µm/px → "
          f"{4 * args.mask_size}² px slides, seed {args.seed}")
    header = f"{'solver':<13} {'steps':>5} {'bal.acc':>8} {'min':>6} {'seam':>6} {'quilt':>6} {'s/slide':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-solver-") as tmp:
        for solver, steps in configs:
            accs, seams, quilts, secs = [], [], [], []
            for name, mask in chosen:
                work = Path(tmp) / f"{solver}-{steps}-{name}"
                work.mkdir()
                img, s = generate(labels_for_classes(mask, label_map), work, model=model, steps=steps,
                                  seed=args.seed, mask_mpp=2.0, device=args.device, sampler=args.sampler,
                                  solver=solver)
                labels = resize_labels(mask.astype(np.uint8), img.shape[0], img.shape[1])
                decoder = slide_decoder(lambda z: z)
                hl, wl = -(-img.shape[0] // 8), -(-img.shape[1] // 8)
                score = score_slide(img, labels, clf, boundaries=decoder.boundary_lines(hl, wl))
                accs.append(score["balanced_accuracy"])
                if score["seam_ratio"] is not None:
                    seams.append(score["seam_ratio"])
                q = quilt_score(img, {"decode": decoder.cut_zones(hl, wl)}, labels)["quilt_score"]
                if q is not None:
                    quilts.append(q)
                secs.append(s)
            row = {"solver": solver, "steps": steps, "balanced_accuracy": round(float(np.mean(accs)), 4),
                   "min_balanced_accuracy": round(float(np.min(accs)), 4),
                   "worst_seam_ratio": round(float(np.max(seams)), 4) if seams else None,
                   "worst_quilt_score": round(float(np.max(quilts)), 4) if quilts else None,
                   "seconds_per_slide": round(float(np.mean(secs)), 1)}
            rows.append(row)
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{solver:<13} {steps:>5} {row['balanced_accuracy']:>8.3f} {row['min_balanced_accuracy']:>6.3f} "
                  f"{fmt(row['worst_seam_ratio']):>6} {fmt(row['worst_quilt_score']):>6} "
                  f"{row['seconds_per_slide']:>8.1f}", flush=True)

    ref = next((r for r in rows if r["solver"] == "ddim" and r["steps"] == 50), None)
    few = [r for r in rows if r["solver"] != "ddim" and r["steps"] <= GOAL_MAX_STEPS]
    meets = [r for r in few if ref is not None
             and r["balanced_accuracy"] >= ref["balanced_accuracy"] - GOAL_BALANCED_ACCURACY_GAP]
    ours = (min(meets, key=lambda r: (r["steps"], -r["balanced_accuracy"])) if meets
            else max(few, key=lambda r: r["balanced_accuracy"]) if few else None)
    summary = {
        "bench": "solver", "model": model, "sampler": args.sampler, "mask_size": args.mask_size, "rows": rows,
        "ours": ours, "reference": ref,
        "ratio": {"balanced_accuracy": round(ours["balanced_accuracy"] / ref["balanced_accuracy"], 4),
                  "network_evaluations": round(ours["steps"] / ref["steps"], 4)} if ours and ref else None,
        "goal": {"balanced_accuracy_gap": GOAL_BALANCED_ACCURACY_GAP, "max_steps": GOAL_MAX_STEPS,
                 "met": bool(meets)},
    }
    if ours and ref:
        print(f"best multistep at ≤ {GOAL_MAX_STEPS} steps: {ours['solver']} {ours['steps']} steps, balanced "
              f"accuracy {ours['balanced_accuracy']:.3f} vs DDIM 50 {ref['balanced_accuracy']:.3f} (goal: within "
              f"{GOAL_BALANCED_ACCURACY_GAP}) — {'met' if meets else 'not met'}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
