"""Conditioning-fidelity benchmark: does a generated slide follow its mask, and is it seamless?

    python -m bench.fidelity                       # the default model (SLIDESYNTH_DEFAULT_MODEL), card steps
    python -m bench.fidelity --model NAME --steps 50 --device cuda
    python -m bench.fidelity --quick               # 2 masks of 128² (512² px slides), 10 steps

For the demo mask (:func:`slidesynth.demo.demo_mask`, 256² at 2 µm/px → a 1024² slide at 0.5 µm/px, as
``make demo`` submits it) and three procedural slide layouts (seeds 9001–9003, subtypes 0/1/0; none of them
in any training set), the slide is generated through the same code path as ``slidesynth generate`` (mask
checks, job spec, worker pipeline, pyramidal TIFF), read back at full resolution and scored with
:func:`evaluation.fidelity.score_slide`: balanced accuracy of the shipped window classifier's labels against
the requested mask, and the seam ratio on the worker decoder's blend edges (the samplers leave no fixed
grid), beside a control: the same ratio on lines shifted by half a decoder tile stride (232 px, same
phase mod 8), where no tile boundary lies — what content alone scores in this image.

Also the **quilt score** (:mod:`evaluation.quilt`): block-mean jumps across the decoder's cut lines
against jumps across other lines, within each region of the mask — the low-frequency quilt of per-tile
decoding that the seam ratio does not see (a decode with tile-local statistics scores ~2 at 4096²; clean
content ~1). ``--mask-size 1024`` makes 4096² slides.

Reference, measured in the same run: the same masks rendered directly by :mod:`procedural.tissue` (the data
the demo models learn from) and scored the same way: the ceiling a generator can reach with this
classifier. Goals (issues 6, 17): balanced accuracy ≥ 0.8, seam ratio ≤ 1.05, quilt score within 10 % of the
render's. An untrained model scores near chance (≈ 1 / number of classes present) — printed as is.

The last line is one JSON object with our figures, the reference's and their ratio.

``--embedding`` (∞-Brush, issue 20): for held-out procedural tiles of carcinoma, tumour stroma and necrosis
(:func:`evaluation.conditioning.held_out_tile`), embed the tile with the model's encoder and run
``slidesynth generate --embedding`` (the job path: its ``class_share_<class>`` and ``embedding_cosine``
metrics); then a 2 × 2 grid of four class tiles, scored by the majority class of each quadrant. Reference,
in the same run: an unconditioned sample of the same seed and size, its windows' cosine to each condition.
Goals: ≥ 80 % of the windows of the requested class; the cosine clearly above the unconditioned one; every
quadrant's majority the requested class.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

GOAL_BALANCED_ACCURACY = 0.8
GOAL_SEAM_RATIO = 1.05
GOAL_QUILT_OVER_RENDER = 1.10
LAYOUT_SEEDS = (9001, 9002, 9003)


def masks(size: int, n_generated: int = 3) -> list[tuple[str, np.ndarray]]:
    """(name, labels) — the demo mask and ``n_generated`` procedural slide layouts at 2 µm/px."""
    from procedural.tissue import random_layout
    from slidesynth.demo import demo_mask

    out = [("demo", demo_mask(size))]
    for i, s in enumerate(LAYOUT_SEEDS[:n_generated]):
        out.append((f"layout-{s}", random_layout(size, size, s, "slide", mpp=2.0, subtype=i % 2)))
    return out


def read_level0(path: Path) -> np.ndarray:
    import tifffile

    img = tifffile.imread(str(path), series=0, level=0)
    return np.ascontiguousarray(img[..., :3])


def generate(mask: np.ndarray, out_dir: Path, *, model: str | None, steps: int | None, seed: int,
             mask_mpp: float, device: str | None, sampler: str | None,
             solver: str | None = None) -> tuple[np.ndarray, float]:
    """Run ``slidesynth generate`` in-process; return the level-0 RGB image and the seconds it took."""
    from PIL import Image

    mask_path = out_dir / "mask.png"
    Image.fromarray(mask.astype(np.uint8), mode="L").save(mask_path)
    tiff = out_dir / "slide.tiff"
    argv = ["generate", "--mask", str(mask_path), "--out", str(tiff), "--mask-mpp", str(mask_mpp),
            "--seed", str(seed)]
    for flag, value in (("--model", model), ("--steps", steps), ("--device", device), ("--sampler", sampler),
                        ("--solver", solver)):
        if value is not None:
            argv += [flag, str(value)]
    _, seconds = run_cli(argv)
    return read_level0(tiff), seconds


def run_cli(argv: list[str]) -> tuple[str, float]:
    """``slidesynth ARGV`` in-process: (what it printed, seconds); RuntimeError when it fails."""
    from slidesynth.cli import main as cli_main

    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(argv)
    if rc != 0:
        raise RuntimeError(f"slidesynth {' '.join(argv)} exited with {rc}")
    return buf.getvalue(), time.perf_counter() - t0


GOAL_CLASS_SHARE = 0.8


def _generate_embedding(path: Path, out_dir: Path, *, model: str, encoder: str, size: int, steps: int | None,
                        seed: int, device: str | None) -> tuple[dict, Path, float]:
    """``slidesynth generate --embedding`` in-process → (its printed JSON: metrics …, the TIFF, seconds)."""
    tiff = out_dir / f"{path.stem}.tiff"
    argv = ["generate", "--embedding", str(path), "--encoder", encoder, "--model", model, "--width", str(size),
            "--height", str(size), "--seed", str(seed), "--out", str(tiff)]
    for flag, value in (("--steps", steps), ("--device", device)):
        if value is not None:
            argv += [flag, str(value)]
    printed, seconds = run_cli(argv)
    return json.loads(printed.strip().splitlines()[-1]), tiff, seconds


def embedding_main(args) -> int:
    """The ∞-Brush conditioning goals through the job path, against an unconditioned sample."""
    from core.settings import get_settings
    from evaluation.conditioning import held_out_tile, image_cosine, quadrant_majorities
    from evaluation.fidelity import load_classifier
    from models.cards import ModelCard
    from models.encoders import load_encoder
    from models.registry import ModelRegistry

    settings = get_settings()
    model = args.model or settings.default_embedding_model
    card = ModelCard.load(settings.models_dir / model)
    encoder = load_encoder(card.embedding_encoder, settings.models_dir)
    clf = load_classifier(args.classifier)
    size = args.size
    classes = ("carcinoma", "tumor stroma", "necrosis")
    grid_classes = ("carcinoma", "tumor stroma", "necrosis", "others")
    print(f"model {model} (encoder {encoder.id}), {size}² px at {card.native_mpp} µm/px, "
          f"{args.steps or 'card default'} steps, seed {args.seed}")
    # the reference: one unconditioned sample (guidance scale 0: the null condition), same seed and size
    from models.infbrush.pipeline import InfBrushPipeline

    t0 = time.perf_counter()
    pipe = InfBrushPipeline(ModelRegistry(settings.models_dir).load(model, args.device or "cpu"),
                            args.device or "cpu", models_dir=settings.models_dir)
    uncond = pipe.sample_array(size, size, embedding=None, seed=args.seed,
                               steps=args.steps or card.default_steps or 50)
    uncond_s = time.perf_counter() - t0
    header = f"{'condition':<14} {'share':>6} {'majority':>13} {'cosine':>7} {'uncond. cos':>11} {'gen s':>6}"
    print(header)
    print("-" * len(header))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-emb-") as tmp:
        for c in classes:
            vec = np.asarray(encoder.embed(held_out_tile(c, encoder.input_size)[None]), np.float32)[0]
            path = Path(tmp) / f"{c.replace(' ', '_')}.npy"
            np.save(path, vec)
            out, _, secs = _generate_embedding(path, Path(tmp), model=model, encoder=encoder.id, size=size,
                                               steps=args.steps, seed=args.seed, device=args.device)
            shares = {k[len("class_share_"):].replace("_", " "): v for k, v in out.items()
                      if k.startswith("class_share_")}
            row = {"condition": c, "share": shares[c], "majority": max(shares, key=shares.get),
                   "cosine": out["embedding_cosine"],
                   "cosine_unconditioned": round(image_cosine(uncond, encoder, vec, card.native_mpp), 4),
                   "shares": shares, "seconds_generate": round(secs, 1)}
            rows.append(row)
            print(f"{c:<14} {row['share']:>6.3f} {row['majority']:>13} {row['cosine']:>7.3f} "
                  f"{row['cosine_unconditioned']:>11.3f} {secs:>6.1f}", flush=True)
        tiles = np.stack([held_out_tile(c, encoder.input_size) for c in grid_classes])
        grid = np.asarray(encoder.embed(tiles), np.float32).reshape(2, 2, -1)
        np.save(Path(tmp) / "grid.npy", grid)
        _, tiff, secs = _generate_embedding(Path(tmp) / "grid.npy", Path(tmp), model=model, encoder=encoder.id,
                                            size=size, steps=args.steps, seed=args.seed, device=args.device)
        got = quadrant_majorities(read_level0(tiff), clf)
    correct = sum(a == b for a, b in zip(grid_classes, got))
    print(f"2×2 grid {', '.join(grid_classes)} → quadrant majorities {', '.join(got)} ({correct}/4) in {secs:.1f} s")
    share_min = min(r["share"] for r in rows)
    cos = round(float(np.mean([r["cosine"] for r in rows])), 4)
    cos0 = round(float(np.mean([r["cosine_unconditioned"] for r in rows])), 4)
    print(f"lowest share of the requested class {share_min:.3f} (goal ≥ {GOAL_CLASS_SHARE}); mean cosine {cos} vs "
          f"{cos0} unconditioned; grid {correct}/4")
    summary = {
        "bench": "fidelity-embedding", "model": model, "encoder": encoder.id, "size": size, "steps": args.steps,
        "ours": {"min_class_share": share_min, "mean_cosine": cos, "grid_quadrants_correct": correct,
                 "grid_majorities": got, "rows": rows},
        "reference": {"what": "an unconditioned sample of the same seed and size: its windows' cosine to each "
                              "condition", "mean_cosine": cos0, "seconds": round(uncond_s, 1)},
        "ratio": {"mean_cosine": round(cos / cos0, 4) if cos0 else None},
        "goal": {"class_share": GOAL_CLASS_SHARE, "grid_quadrants_correct": 4,
                 "met": bool(share_min >= GOAL_CLASS_SHARE and correct == 4 and cos > cos0)},
    }
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model name (default: SLIDESYNTH_DEFAULT_MODEL, as the demo)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model card's)")
    p.add_argument("--sampler", choices=["random", "tiled"])
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-size", type=int, default=256, help="mask side in px at 2 µm/px (slide = 4×)")
    p.add_argument("--classifier", help="fidelity classifier folder (default: weights/fidelity-classifier)")
    p.add_argument("--quick", action="store_true", help="2 masks of 128², 10 steps")
    p.add_argument("--embedding", action="store_true",
                   help="∞-Brush: held-out class tiles' embeddings and a 2×2 grid (default model: "
                        "SLIDESYNTH_DEFAULT_EMBEDDING_MODEL)")
    p.add_argument("--size", type=int, default=1024, help="--embedding: slide side in px")
    args = p.parse_args(argv)
    if args.embedding:
        return embedding_main(args)
    if args.quick:
        args.mask_size = 128
        args.steps = args.steps or 10

    from evaluation.fidelity import labels_for_classes, load_classifier, score_slide
    from evaluation.quilt import quilt_score
    from models.diffinfinite.engine import slide_decoder
    from procedural.tissue import render_tile
    from models.labels import resize_labels
    from core.settings import get_settings

    from models.cards import ModelCard

    settings = get_settings()
    model = args.model or settings.default_model
    label_map = ModelCard.load(settings.models_dir / model).fidelity_classes  # model label → classifier class
    clf = load_classifier(args.classifier)
    mask_mpp = 2.0
    rows = []
    print(f"model {model}, {args.steps or 'card default'} steps, masks {args.mask_size}² at {mask_mpp} µm/px "
          f"→ slides {4 * args.mask_size}² px at 0.5 µm/px; classifier sha256 "
          f"{clf.card['files']['classifier.safetensors'][:12]}")
    header = (f"{'mask':<12} {'classes':>7} {'bal.acc':>8} {'seam':>7} {'control':>8} {'quilt':>6} "
              f"{'ref bal.acc':>11} {'ref seam':>8} {'ref quilt':>9} {'gen s':>7}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
        for name, mask in masks(args.mask_size, 1 if args.quick else 3):
            work = Path(tmp) / name
            work.mkdir()
            # the masks are in the classifier's classes (0 glass …); the model is asked with its own labels
            img, secs = generate(labels_for_classes(mask, label_map), work, model=model, steps=args.steps,
                                 seed=args.seed, mask_mpp=mask_mpp, device=args.device, sampler=args.sampler)
            labels = resize_labels(mask.astype(np.uint8), img.shape[0], img.shape[1])
            # former tile boundaries = the worker's decoder blend edges (the samplers leave no fixed grid)
            decoder = slide_decoder(lambda z: z)
            seams = decoder.boundary_lines(-(-img.shape[0] // 8), -(-img.shape[1] // 8))
            ours = score_slide(img, labels, clf, boundaries=seams)
            # control lines: half a decoder tile stride away (a multiple of 8 px: same phase), no tile boundary
            shift = (decoder.tile - decoder.overlap) // 2 * decoder.scale
            control = score_slide(img, labels, clf, boundaries=(
                [p + shift for p in seams[0] if p + shift < img.shape[0]],
                [p + shift for p in seams[1] if p + shift < img.shape[1]]))["seam_ratio"]
            render = render_tile(labels, args.seed)
            ref = score_slide(render, labels, clf, boundaries=seams)
            cuts = {"decode": decoder.cut_zones(-(-img.shape[0] // 8), -(-img.shape[1] // 8))}
            quilt, ref_quilt = (quilt_score(x, cuts, labels)["quilt_score"] for x in (img, render))
            row = {"mask": name, "width": img.shape[1], "height": img.shape[0],
                   "classes": len(ours["recall"]), "balanced_accuracy": ours["balanced_accuracy"],
                   "seam_ratio": ours["seam_ratio"], "seam_ratio_control_lines": control, "recall": ours["recall"],
                   "reference_balanced_accuracy": ref["balanced_accuracy"], "reference_seam_ratio": ref["seam_ratio"],
                   "quilt_score": quilt, "reference_quilt_score": ref_quilt, "seconds_generate": round(secs, 1)}
            rows.append(row)
            seam = "n/a" if ours["seam_ratio"] is None else f"{ours['seam_ratio']:.3f}"
            rseam = "n/a" if ref["seam_ratio"] is None else f"{ref['seam_ratio']:.3f}"
            cseam = "n/a" if control is None else f"{control:.3f}"
            qs = lambda v: "n/a" if v is None else f"{v:.3f}"
            print(f"{name:<12} {row['classes']:>7} {ours['balanced_accuracy']:>8.3f} {seam:>7} {cseam:>8} "
                  f"{qs(quilt):>6} {ref['balanced_accuracy']:>11.3f} {rseam:>8} {qs(ref_quilt):>9} {secs:>7.1f}",
                  flush=True)

    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    ours_ba, ref_ba = mean("balanced_accuracy"), mean("reference_balanced_accuracy")
    worst_seam = max((r["seam_ratio"] for r in rows if r["seam_ratio"] is not None), default=None)
    chance = round(float(np.mean([1.0 / r["classes"] for r in rows])), 4)
    quilt_ratios = [r["quilt_score"] / r["reference_quilt_score"] for r in rows
                    if r["quilt_score"] is not None and r["reference_quilt_score"]]
    worst_quilt = round(max(quilt_ratios), 4) if quilt_ratios else None
    print(f"mean balanced accuracy {ours_ba} (reference {ref_ba}, chance ≈ {chance}); worst seam ratio "
          f"{worst_seam}; worst quilt score ÷ the render's {worst_quilt}; goals: ≥ {GOAL_BALANCED_ACCURACY}, "
          f"≤ {GOAL_SEAM_RATIO}, ≤ {GOAL_QUILT_OVER_RENDER}")
    summary = {
        "bench": "fidelity",
        "model": model,
        "steps": args.steps,
        "ours": {"mean_balanced_accuracy": ours_ba, "worst_seam_ratio": worst_seam,
                 "worst_quilt_score": max((r["quilt_score"] for r in rows if r["quilt_score"] is not None),
                                          default=None),
                 "worst_seam_ratio_control_lines": max((r["seam_ratio_control_lines"] for r in rows
                                                        if r["seam_ratio_control_lines"] is not None), default=None),
                 "rows": rows},
        "reference": {"what": "procedural.tissue render of the same masks (the training data's ceiling)",
                      "mean_balanced_accuracy": ref_ba,
                      "worst_seam_ratio": max((r["reference_seam_ratio"] for r in rows
                                               if r["reference_seam_ratio"] is not None), default=None),
                      "worst_quilt_score": max((r["reference_quilt_score"] for r in rows
                                                if r["reference_quilt_score"] is not None), default=None)},
        "ratio": {"balanced_accuracy": round(ours_ba / ref_ba, 4) if ours_ba is not None and ref_ba else None,
                  "worst_quilt_score_over_render": worst_quilt},
        "chance_balanced_accuracy": chance,
        "goal": {"balanced_accuracy": GOAL_BALANCED_ACCURACY, "seam_ratio": GOAL_SEAM_RATIO,
                 "quilt_score_over_render": GOAL_QUILT_OVER_RENDER,
                 "met": bool(ours_ba is not None and ours_ba >= GOAL_BALANCED_ACCURACY
                             and (worst_seam is None or worst_seam <= GOAL_SEAM_RATIO)
                             and (worst_quilt is None or worst_quilt <= GOAL_QUILT_OVER_RENDER))},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    raise SystemExit(main())
