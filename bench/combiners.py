"""Patch combiners of the DiffInfinite sampler on the demo model, at equal patch-model passes (issue 22).

    python -m bench.combiners                                  # 2 masks, 1024² slides, tiled 25 steps as the budget
    python -m bench.combiners --size 4096 --masks 1            # the issue's size (CPU: tens of minutes)
    python -m bench.combiners --configs tiled,multidiffusion,mixture,dde --equal steps

Every configuration samples the same masks (the demo mask and procedural layouts of :mod:`bench.fidelity`,
at 2 µm/px, slides at the model's 0.5 µm/px) with the same seed through the engine (the worker's path).
``--equal calls`` (default): the `tiled` sampler at ``--steps`` sets the budget of UNet passes, and each other
configuration gets the number of steps that spends the same (its passes per step counted from its plan);
``--equal steps``: every configuration runs ``--steps`` steps. Columns: steps, UNet passes, quilt score on the
sampler's cut lines (the last step's cells for `tiled`, the window edges for the window modes; ≈ 1 = no
quilt) and on the decoder's, the gradient seam ratio on the sampler's lines (vs lines of the same phase mod 8;
the larger of the horizontal and vertical lines', each also shown, `h / v`), the ridge score on the sampler's
lines (:func:`evaluation.quilt.ridge_score`: a thin bright or dark line centred on a cut, which the other two miss),
balanced accuracy of the shipped classifier against the mask (conditioning fidelity), seconds per slide.
`dde` runs only for a model whose folder holds a trained coordinator, or with ``--coordinator DIR`` (a coordinator
folder trained on this model's image UNet, e.g. a candidate before it is shipped). ``--png DIR`` writes each slide
4× downsampled (what a viewer shows of its second level) and the procedural render of the same mask, to look at.

The JSON line's "reference" is `tiled` (the service default), "ours" the best overlapping combiner by sampler
quilt score, "ratio" ours ÷ reference.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DEFAULT_CONFIGS = "tiled,multidiffusion,mixture,dde"
WINDOW = ("independent", "multidiffusion", "mixture", "dde")


def line_ratio(profile: np.ndarray, lines: list[int], match_mod: int = 8) -> float | None:
    """Mean gradient on ``lines`` (index p = between p − 1 and p) ÷ mean on the other lines of the same phase
    modulo ``match_mod`` (the VAE's 8 px, so decoder texture does not bias it); None without lines."""
    idx = np.arange(profile.size)
    on = np.zeros(profile.size, bool)
    on[[p for p in lines if 1 <= p < profile.size]] = True
    if not on.any():
        return None
    phases = {p % match_mod for p in np.flatnonzero(on)}
    off = (idx >= 1) & ~on & np.isin(idx % match_mod, list(phases))
    return float(np.nanmean(profile[on]) / np.nanmean(profile[off]))


def passes_per_step(pipe, labels, options, steps_probe: int = 25) -> float:
    """UNet passes per step of a configuration, from its crop plans (mean over up to ``steps_probe`` steps
    spread over the run: `tiled` adds context margins in its last steps)."""
    sampler = pipe.image_sampler(options)
    lab = sampler._prepare_labels(pipe.latent_labels(labels))
    ks = sorted({int(k) for k in np.linspace(0, sampler.stop_at - 1, min(steps_probe, sampler.stop_at))})
    return float(np.mean([sum(len(sampler.passes(c)) for c in sampler.plan(lab, options.seed, k)) for k in ks]))


def _write_png(path, img: np.ndarray, factor: int = 4) -> None:
    """``img`` (H, W, 3) uint8, ``factor``× area-averaged, as a PNG."""
    from PIL import Image

    h, w = img.shape[0] // factor * factor, img.shape[1] // factor * factor
    small = img[:h, :w].astype(np.float32).reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
    Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.combiners", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="samplers, comma-separated (default: %(default)s)")
    p.add_argument("--size", type=int, default=1024, help="slide side in px at 0.5 µm/px")
    p.add_argument("--masks", type=int, default=2, help="the demo mask + up to 3 procedural layouts")
    p.add_argument("--steps", type=int, default=25, help="steps of `tiled` (the budget) or of every config")
    p.add_argument("--equal", choices=["calls", "steps"], default="calls")
    p.add_argument("--stride", type=int, default=None, help="sampler_stride of the window modes (default 32)")
    p.add_argument("--solver", default="dpmpp-2m-sde")
    p.add_argument("--model", help="model name (default: SLIDESYNTH_DEFAULT_MODEL)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dde-guidance", default=None,
                   help="comma-separated dde_guidance values (labels, null, shared): one dde row each, named "
                   "dde:<value> (default: one dde row with the engine's default)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance ω of every configuration (default: the model card's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--coordinator", help="coordinator folder for `dde` (default: the model folder's dde-coordinator/)")
    p.add_argument("--png", help="folder for 4×-downsampled PNGs of every slide and of the mask's procedural render")
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.dde_guidance and "dde" in configs:  # one dde row per way of meeting guidance
        at = configs.index("dde")
        configs[at:at + 1] = [f"dde:{v.strip()}" for v in args.dde_guidance.split(",") if v.strip()]

    import torch

    from bench.fidelity import masks
    from core.settings import get_settings
    from evaluation.fidelity import labels_for_classes, load_classifier, score_slide
    from evaluation.quilt import quilt_score, ridge_score
    from models.diffinfinite.engine import DiffInfiniteEngine, DiffInfiniteOptions, has_coordinator
    from models.diffinfinite.pipeline import DiffInfinitePipeline, SamplingOptions
    from models.engine import Runtime, SlideRequest
    from models.labels import resize_labels
    from models.metrics import gradient_profiles
    from models.registry import ModelRegistry

    settings = get_settings()
    model = args.model or settings.default_model
    registry = ModelRegistry(settings.models_dir)
    card = registry.card(model)
    device = torch.device(args.device)
    models = registry.load(model, device)
    if any(c.startswith("dde") for c in configs) and not (
            args.coordinator or has_coordinator(getattr(models, "folder", None))):
        print(f"(dde skipped: {model} has no trained coordinator in its folder)")
        configs = [c for c in configs if not c.startswith("dde")]
    engine = DiffInfiniteEngine(coordinator_dir=args.coordinator)
    png = Path(args.png) if args.png else None
    if png:
        png.mkdir(parents=True, exist_ok=True)
    clf = load_classifier(None)
    chosen = masks(args.size // 4, max(0, args.masks - 1))
    guidance = args.guidance if args.guidance is not None else (
        card.default_guidance if card.default_guidance is not None else 3.0)
    probe = DiffInfinitePipeline(models, device=device)

    def opts(config: str) -> DiffInfiniteOptions:
        sampler, _, how = config.partition(":")  # dde:<dde_guidance>
        stride = args.stride if sampler in ("multidiffusion", "mixture", "dde") else None
        return DiffInfiniteOptions(sampler=sampler, solver=args.solver, sampler_stride=stride,
                                   dde_guidance=how or None).resolved()

    print(f"model {model}, {len(chosen)} masks, {args.size}² px slides, seed {args.seed}, solver {args.solver}, "
          f"equal {args.equal} (tiled {args.steps} steps), guidance {guidance}, device {device}")
    head = (f"{'sampler':<15}{'mask':<14}{'steps':>6}{'passes':>9}{'quilt smp':>10}{'quilt dec':>10}"
            f"{'seam smp':>9}{'h / v':>16}{'ridge':>7}{'bal.acc':>8}{'s':>7}")
    print(head)
    print("-" * len(head))
    rows = []
    for name, mask in chosen:
        classes = resize_labels(mask.astype(np.uint8), args.size, args.size)  # the classifier's classes
        labels = labels_for_classes(classes, card.fidelity_classes)  # the model's labels asking for them
        budget = None
        if png:
            from evaluation.fidelity import map_labels
            from procedural.tissue import render_tile

            render = render_tile(map_labels(labels, card.fidelity_classes).astype(np.uint8), args.seed)
            _write_png(png / f"{name}-procedural.png", render)
        for sampler in configs:
            o = opts(sampler)
            sopts = SamplingOptions(steps=args.steps, guidance=guidance, mode=o.sampler, solver=o.solver,
                                    seed=args.seed, window_stride=o.sampler_stride)
            pps = passes_per_step(probe, labels, sopts)
            if budget is None:
                budget = pps * args.steps  # the first configuration (tiled by default) sets the budget
            steps = args.steps if args.equal == "steps" else max(1, int(round(budget / pps)))
            req = SlideRequest(width=args.size, height=args.size, mpp=card.native_mpp, seed=args.seed, steps=steps,
                               guidance=guidance, eta=1.0, conditioning="mask", options=o, labels=labels)
            t0 = time.perf_counter()
            slide = engine.generate(models, req, device=device, runtime=Runtime(batch_size=args.batch_size),
                                    report=lambda *a: None, cancel=lambda: False)
            img = np.concatenate(list(slide.bands))
            secs = time.perf_counter() - t0
            if png:
                _write_png(png / f"{name}-{sampler.replace(':', '-')}.png", img)
            q = quilt_score(img, slide.cut_lines, classes)["by_kind"]
            gy, gx = gradient_profiles(img)
            srows, scols = slide.cut_lines.get("sampler", ([], []))
            # horizontal lines (rows: the vertical gradient across them) and vertical lines apart
            seam_h, seam_v = line_ratio(gy, [a for a, _ in srows]), line_ratio(gx, [a for a, _ in scols])
            ratios = [r for r in (seam_h, seam_v) if r is not None]
            ridge = ridge_score(img, [a for a, _ in srows], [a for a, _ in scols], classes)["score"]
            score = score_slide(img, classes, clf, boundaries=slide.seam_lines)
            row = {"sampler": sampler, "mask": name, "steps": steps, "passes": int(slide.notes["sampler_passes"]),
                   "quilt_sampler": q.get("sampler", {}).get("score"), "quilt_decode": q.get("decode", {}).get("score"),
                   "seam_sampler": round(max(ratios), 4) if ratios else None,
                   "seam_rows": None if seam_h is None else round(seam_h, 4),
                   "seam_cols": None if seam_v is None else round(seam_v, 4), "ridge_sampler": ridge,
                   "balanced_accuracy": round(float(score["balanced_accuracy"]), 4), "seconds": round(secs, 1)}
            rows.append(row)
            f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{sampler:<15}{name:<14}{steps:>6}{row['passes']:>9}{f(row['quilt_sampler']):>10}"
                  f"{f(row['quilt_decode']):>10}{f(row['seam_sampler']):>9}"
                  f"{f(row['seam_rows']) + ' / ' + f(row['seam_cols']):>16}{f(row['ridge_sampler']):>7}"
                  f"{row['balanced_accuracy']:>8.3f}"
                  f"{secs:>7.1f}", flush=True)

    def mean(sampler: str, key: str) -> float | None:
        vals = [r[key] for r in rows if r["sampler"] == sampler and r[key] is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    summary_rows = {s: {k: mean(s, k) for k in ("steps", "passes", "quilt_sampler", "quilt_decode", "seam_sampler",
                                                  "seam_rows", "seam_cols", "ridge_sampler", "balanced_accuracy",
                                                  "seconds")} for s in configs}
    ref = summary_rows.get("tiled")
    cands = [s for s in configs if s.partition(":")[0] in WINDOW and summary_rows[s]["quilt_sampler"] is not None]
    best = min(cands, key=lambda s: summary_rows[s]["quilt_sampler"]) if cands else None
    ours = dict(summary_rows[best], sampler=best) if best else None
    ratio = None
    if ours and ref:
        ratio = {k: round(ours[k] / ref[k], 4) for k in ("quilt_sampler", "seam_sampler", "balanced_accuracy", "passes")
                 if ours.get(k) is not None and ref.get(k)}
    summary = {"bench": "combiners", "model": model, "size": args.size, "masks": len(chosen), "equal": args.equal,
               "budget_steps_tiled": args.steps, "guidance": guidance, "rows": summary_rows, "ours": ours,
               "reference": dict(ref, sampler="tiled") if ref else None, "ratio": ratio}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
