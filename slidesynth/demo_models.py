"""The recipe of ``weights/diffinfinite-demo``: small DiffInfinite models trained on procedural tissue.

    python -m slidesynth.demo_models all            # every step below, in order (≈ 1 h on a shared 2-core CPU)
    python -m slidesynth.demo_models STEP [STEP …]  # datasets | vae | diffusion | finetune | assemble | evaluate | picture
    python -m slidesynth.demo_models commands       # print the exact command lines

Steps (each runs the exact command lines listed in :func:`commands`; ``work`` = ``data/demo-models``):

1. ``datasets`` — procedural H&E-like data (:mod:`procedural.tissue`): 800 labelled 256² tiles (tile layouts,
   seed 0) for the VAE and the image model; 120 labelled whole-slide layouts of 1024² px at 0.5 µm/px (seed 1,
   with subtypes) for the mask model, which sees 512-px crops at 1/4 resolution (128-px masks, 16² latents) as
   in the release. The procedural world stores glass as class 0; every training command reads it as label 5
   (``--relabel 0:5``), so glass is a condition of its own and label 0 stays DiffInfinite's "unknown", the
   null condition of classifier-free guidance (all labelled tiles with an all-zero mask, not glass alone).
2. ``vae`` — ``slidesynth train vae`` (AutoencoderKL, 4 latent channels, ×8, 2.7 M parameters, fp16), with the
   latents normalised per channel so that the release's ``latent / 50`` convention fits the sampler's clip
   range. Its ``vae_training.json`` gives the image ``latent_scale`` (50) and the mask-latent divisors.
3. ``diffusion`` — ``slidesynth train diffinfinite`` (image model, ``--network small``, 2.8 M parameters, 128-px
   crops = 16² latents) and ``slidesynth train diffinfinite-mask`` (mask model, 2.8 M, 2000 steps) side by
   side.
4. ``finetune`` — a second image-model run from the first one's EMA weights (``--init``), lower peak lr.
5. ``assemble`` — ``weights/diffinfinite-demo``: fp16 safetensors, ``vae/``, ``model_card.json`` (classes,
   data, the commands, device, wall times, sha256 of every file, default steps 50 and guidance ω = 0).
6. ``evaluate`` — fidelity (:mod:`evaluation.fidelity`) of slides generated from layouts none of the models
   saw; written into the card's ``metrics``.
7. ``picture`` — ``docs/demo.png``: the demo mask beside the slide generated from it (the ``make demo``
   request: 256-px mask at 2 µm/px → 1024² px at 0.5 µm/px, seed 0, the card's default steps and ω).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORK = Path("data/demo-models")
OUT = Path("weights/diffinfinite-demo")
NAME = "diffinfinite-demo"
PICTURE = Path("docs/demo.png")

# Sampling defaults written into the card (requests may override them).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 1.5  # ω: measured best of 0 / 1.5 on the unseen layouts (python -m slidesynth.demo_models evaluate --guidance …)
# Unseen layouts for the fidelity figures: seeds no training set used (datasets use item_seed(seed, i)).
EVAL_SEEDS = (20261, 20262, 20263)
EVAL_SIZES = (1024, 1024, 2048)  # the 2048² layout holds 3 former tile boundaries per axis for the seam ratio
# The model's labels: DiffInfinite's 0 = unknown (the null condition: regions nobody asked for), the four
# tissue classes, and glass as a label of its own (the procedural world's class 0, read with --relabel 0:5).
NUM_LABELS = 6
GLASS_LABEL = 5
RELABEL = f"0:{GLASS_LABEL}"
CLASS_NAMES = {0: "Unknown (not requested)", 1: "Carcinoma", 2: "Necrosis", 3: "Tumor stroma",
               4: "Others (fat, vessels)", GLASS_LABEL: "Glass (background)"}
# label → class of the fidelity classifier (procedural classes: 0 glass, 1–4 as the labels); 0 is not scored
FIDELITY_CLASSES = {1: 1, 2: 2, 3: 3, 4: 4, GLASS_LABEL: 0}
TRAINING_DATA = (
    "procedural H&E-like tissue (procedural.tissue v{v}, Beer-Lambert H&E stain model, pixel-exact masks; NOT "
    "real histology; glass read as label 5, label 0 = unknown/null). VAE and image model: 800 labelled 256-px "
    "tiles at 0.5 um/px (tile layouts, seed 0); mask model: 120 whole-slide layouts of 1024 px at 0.5 um/px "
    "(seed 1; subtype 0 adenocarcinoma-like, 1 squamous-like), 512-px crops seen at 128 px"
)


def to_model_labels(tissue_classes: np.ndarray) -> np.ndarray:
    """A procedural / fidelity-classifier class map (0 glass, 1–4 tissue) → this model's labels (glass → 5)."""
    from evaluation.fidelity import labels_for_classes

    return labels_for_classes(tissue_classes, FIDELITY_CLASSES)


def commands(work: Path = WORK, latent_scale: float | None = None, mask_divisors: list[float] | None = None,
             python: str = "python", slidesynth: str = "slidesynth") -> dict[str, list[str]]:
    """The exact command lines of each step (``latent_scale``/``mask_divisors`` come from the VAE step)."""
    w = str(work)
    ls = f"{latent_scale:g}" if latent_scale is not None else "<latent_scale from vae_training.json>"
    md = ",".join(f"{d:g}" for d in mask_divisors) if mask_divisors else "<mask_divisors from vae_training.json>"
    common = (f"--vae {w}/vae --network small --num-classes {NUM_LABELS} --relabel {RELABEL} --latent-scale {ls} "
              f"--mask-divisors {md} --ema-every 1 --ema-after 100 --save-every 200 --device cpu --quiet --overwrite")
    return {
        "datasets": [
            f"{python} -m procedural dataset {w}/tiles --n 800 --size 256 --seed 0 --workers 2",
            f"{python} -m procedural dataset {w}/slides --n 120 --size 1024 --kind slide --mpp 0.5 --seed 1 --workers 2",
        ],
        "vae": [
            f"{slidesynth} train vae --tiles {w}/tiles --out {w}/vae --config small --crop 64 --batch-size 8 "
            f"--steps 1600 --lr 5e-4 --warmup 50 --save-every 200 --normalize-latents 50 --num-classes {NUM_LABELS} "
            f"--relabel {RELABEL} --fp16 --device cpu --threads 2 --seed 0 --quiet --overwrite",
        ],
        "diffusion": [
            f"{slidesynth} train diffinfinite --tiles {w}/tiles --out {w}/image --tile-size 128 --p-unc 0.2 "
            f"--steps 1500 --batch-size 16 --lr 1e-3 --seed 0 --threads 1 {common}",
            f"{slidesynth} train diffinfinite-mask --tiles {w}/slides --out {w}/mask --tile-size 512 "
            f"--steps 2000 --batch-size 16 --lr 1e-3 --seed 0 --threads 2 {common}",
        ],
        "finetune": [
            f"{slidesynth} train diffinfinite --init {w}/image/image_unet.safetensors --tiles {w}/tiles --out {w}/image-ft "
            f"--tile-size 128 --p-unc 0.2 --steps 2500 --batch-size 16 --lr 5e-4 --seed 1 --threads 2 {common}",
        ],
    }


# ------------------------------------------------------------------------------------------------ data
# ------------------------------------------------------------------------------------------------ running
def _run_logged(cmd: str, log: Path, env: dict[str, str]) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = shlex.split(cmd)
    if argv[0] == "slidesynth":
        argv = [sys.executable, "-m", "slidesynth.cli", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _record(work: Path, step: str, data: dict[str, Any]) -> None:
    path = REPO / work / "recipe.json"
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec[step] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2) + "\n")


def _vae_stats(work: Path) -> tuple[float, list[float]]:
    info = json.loads((REPO / work / "vae" / "vae_training.json").read_text())
    return float(info["stats"]["latent_scale"]), [float(v) for v in info["stats"]["mask_divisors"]]


def run_step(step: str, work: Path = WORK) -> None:
    """Run one command step; commands of the ``diffusion`` step run in parallel."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if step in ("diffusion", "finetune"):
        ls, md = _vae_stats(work)
        cmds = commands(work, ls, md)[step]
        parallel = step == "diffusion"
    else:
        cmds = commands(work)[step]
        parallel = False
    t0 = time.perf_counter()
    walls: list[float] = []
    if parallel:
        procs = [(c, _run_logged(c, REPO / work / "logs" / f"{step}-{i}.log", env), time.perf_counter())
                 for i, c in enumerate(cmds)]
        for c, p, ts in procs:
            if p.wait() != 0:
                raise RuntimeError(f"step {step} failed: {c} (see {work}/logs)")
            walls.append(round(time.perf_counter() - ts, 1))
    else:
        for i, c in enumerate(cmds):
            ts = time.perf_counter()
            if _run_logged(c, REPO / work / "logs" / f"{step}-{i}.log", env).wait() != 0:
                raise RuntimeError(f"step {step} failed: {c} (see {work}/logs/{step}-{i}.log)")
            walls.append(round(time.perf_counter() - ts, 1))
    _record(work, step, {"commands": cmds, "wall_time_s": round(time.perf_counter() - t0, 1),
                         "command_wall_time_s": walls, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


# ------------------------------------------------------------------------------------------------ assembly
def assemble(work: Path = WORK, out: Path = OUT) -> Path:
    """Combine the trained image model, mask model and VAE into ``out`` (fp16 safetensors + card)."""
    import shutil

    import torch

    from models.cards import ModelCard
    from models.diffinfinite.checkpoints import IMAGE_WEIGHTS, MASK_WEIGHTS, load_network, save_network
    from models.diffinfinite.mask_unet import SUBTYPES
    from models.hashing import sha256_file
    from models.vae import resolve_vae_folder
    from procedural.tissue import GENERATOR_VERSION

    work_abs, out_abs = REPO / work, REPO / out
    image_dir = work_abs / ("image-ft" if (work_abs / "image-ft" / IMAGE_WEIGHTS).is_file() else "image")
    image_card = ModelCard.load(image_dir)
    first_card = ModelCard.load(work_abs / "image")
    mask_card = ModelCard.load(work_abs / "mask")
    vae_info = json.loads((work_abs / "vae" / "vae_training.json").read_text())
    recipe = json.loads((work_abs / "recipe.json").read_text())
    ls, md = _vae_stats(work)
    if abs(image_card.latent_scale - ls) > 1e-9 or [round(d, 6) for d in image_card.config["mask_divisors"]] != [
            round(d, 6) for d in md]:
        raise ValueError("the image model was not trained with the VAE's latent_scale / mask divisors")
    if [round(d, 6) for d in mask_card.config["mask_divisors"]] != [round(d, 6) for d in md]:
        raise ValueError("the mask model was not trained with the VAE's mask divisors")

    if out_abs.exists():
        shutil.rmtree(out_abs)
    out_abs.mkdir(parents=True)
    files: dict[str, str] = {}
    image = load_network(image_dir / IMAGE_WEIGHTS, image_card.config["image_unet"], kind="image",
                         dtype=torch.float16)
    mask = load_network(work_abs / "mask" / MASK_WEIGHTS, mask_card.config["mask_unet"], kind="mask",
                        dtype=torch.float16)
    files[IMAGE_WEIGHTS] = save_network(image, out_abs / IMAGE_WEIGHTS)
    files[MASK_WEIGHTS] = save_network(mask, out_abs / MASK_WEIGHTS)
    vae_src = resolve_vae_folder(work_abs / "vae")
    (out_abs / "vae").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy2(vae_src / name, out_abs / "vae" / name)
        files[f"vae/{name}"] = sha256_file(out_abs / "vae" / name)

    def n_params(net) -> int:
        return int(sum(p.numel() for p in net.parameters()))

    ls_, md_ = _vae_stats(work)
    cmds = commands(work, ls_, md_)
    img_tr, msk_tr = image_card.training["image_unet"], mask_card.training["mask_unet"]
    walls = {k: v.get("wall_time_s") for k, v in recipe.items() if isinstance(v, dict)}
    trained_steps = [k for k in ("datasets", "vae", "diffusion", "finetune") if k in recipe]
    card = ModelCard(
        name=NAME,
        engine="diffinfinite",
        trained=True,
        description=(
            "Small DiffInfinite models (image UNet, mask UNet, KL autoencoder; ≈ 8 M parameters in all) trained "
            "from scratch on CPU on procedural H&E-like tissue, for the demo and the tests. They paint the four "
            "procedural tissue classes and glass (label 5) where a label mask asks for them; label 0 is unknown "
            "(the null condition). They are NOT models of real histology."
        ),
        classes=dict(CLASS_NAMES),
        fidelity_classes=dict(FIDELITY_CLASSES),
        subtypes=dict(SUBTYPES),
        native_mpp=0.5,
        latent_scale=ls,
        vae_scale_factor=8,
        default_steps=DEFAULT_STEPS,
        default_guidance=DEFAULT_GUIDANCE,
        conditioning=["mask", "subtype"],
        training_data=TRAINING_DATA.format(v=GENERATOR_VERSION),
        training={
            "recipe": "python -m slidesynth.demo_models all",
            "commands": [c for step in trained_steps for c in cmds[step]],
            "device": "cpu",
            "hardware": "2-core CPU shared with other work (no GPU); torch threads as in each command",
            "torch": torch.__version__,
            "wall_time_s": walls,
            "wall_time_total_s": round(sum(walls.get(k) or 0.0 for k in trained_steps), 1),
            "wall_time_training_s": round(sum(walls.get(k) or 0.0 for k in ("vae", "diffusion", "finetune")), 1),
            "vae": {k: vae_info[k] for k in ("preset", "parameters", "steps_done", "batch_size", "crop", "lr",
                                             "loss_weights", "wall_time_s", "final_loss_mean_last_50", "stats")},
            "image_unet": {"runs": [{k: c.training["image_unet"][k] for k in (
                               "command", "steps_done", "batch_size", "lr", "p_unc", "ema", "duration_s_this_run",
                               "final_loss_mean_last_100")} for c in ([first_card, image_card] if image_dir.name == "image-ft"
                                                                       else [image_card])],
                           "parameters": n_params(image), "tile_size": 128},
            "mask_unet": {**{k: msk_tr[k] for k in ("steps_done", "batch_size", "lr", "p_unc", "ema",
                                                     "duration_s_this_run", "final_loss_mean_last_100")},
                          "parameters": n_params(mask), "tile_size": 512, "mask_size": 128},
        },
        files=files,
        config={
            "num_labels": NUM_LABELS,
            "mask_divisors": md,
            "mask_downsample": 4,
            "image_unet": image.config.to_dict(),
            "mask_unet": mask.config.to_dict(),
            "vae": {"parameters": vae_info["parameters"], "preset": vae_info["preset"]},
        },
    )
    card.save(out_abs)
    return out_abs


def verify_files(folder: str | Path) -> dict[str, str]:
    """sha256 of every file the card lists; ValueError naming the first mismatch or missing file."""
    from models.cards import ModelCard
    from models.hashing import sha256_file

    folder = Path(folder)
    card = ModelCard.load(folder)
    if not card.files:
        raise ValueError(f"{folder}/model_card.json lists no files")
    for name, digest in card.files.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} (listed in the model card) is missing")
        got = sha256_file(path)
        if got != digest:
            raise ValueError(f"{path} has sha256 {got}, the model card says {digest}")
    return dict(card.files)


# ------------------------------------------------------------------------------------------------ generation
def default_guidance(card: Any) -> float:
    """The card's ``default_guidance`` (ω), else the service's default 3.0."""
    value = getattr(card, "default_guidance", None)
    return 3.0 if value is None else float(value)


def generate_image(models: Any, labels: np.ndarray, *, steps: int | None = None, guidance: float | None = None,
                   seed: int = 0, sampler: str = "tiled", eta: float = 1.0, device: str = "cpu",
                   decoder: str = "tukey", with_seams: bool = False):
    """The worker's DiffInfinite path (sample latents → tiled decode, the worker's default Tukey windows)
    for one label mask at the model's resolution; uint8 (H, W, 3) — and, with ``with_seams``, the decoder's
    blend edges (rows, columns) for the seam ratio."""
    from models.diffinfinite.engine import DiffInfiniteOptions, slide_decoder
    from models.diffinfinite.pipeline import DiffInfinitePipeline, SamplingOptions
    from models.engine import steps_default

    pipe = DiffInfinitePipeline(models, device=device)
    guidance = default_guidance(models.card) if guidance is None else guidance
    opts = SamplingOptions(steps=steps or steps_default(models.card), guidance=guidance, eta=eta, mode=sampler,
                           seed=seed)
    latent = pipe.sample_latents(labels, options=opts)
    dec = slide_decoder(models.codec.tile_decoder("image"), models.codec.scale_factor, DiffInfiniteOptions(decoder=decoder))
    img = dec.decode(latent)
    return (img, dec.boundary_lines(latent.shape[2], latent.shape[3])) if with_seams else img


def evaluate(out: Path = OUT, seeds: tuple[int, ...] = EVAL_SEEDS, sizes: tuple[int, ...] = EVAL_SIZES, write: bool = True,
             steps: int | None = None, guidance: float | None = None) -> dict[str, Any]:
    """Balanced accuracy and seam ratio (:func:`evaluation.fidelity.score_slide`) of slides generated from
    unseen slide layouts (``random_layout(size, size, seed, "slide")``) with the card's default steps and ω."""
    import torch

    from evaluation.fidelity import load_classifier, score_slide
    from models.cards import ModelCard
    from models.diffinfinite.loading import load_diffinfinite
    from procedural.tissue import random_layout, render_tile

    torch.manual_seed(0)
    models = load_diffinfinite(REPO / out)
    clf = load_classifier()
    results = []
    for s, size in zip(seeds, sizes):
        tissue_classes = random_layout(size, size, s, "slide", mpp=0.5)
        t0 = time.perf_counter()
        img, seams = generate_image(models, to_model_labels(tissue_classes), steps=steps, guidance=guidance, seed=0,
                                    with_seams=True)
        sec = time.perf_counter() - t0
        r = score_slide(img, tissue_classes, clf, boundaries=seams)
        tissue = score_slide(img, tissue_classes, clf, ignore=(0,), boundaries=seams)
        # the content's own figure: the same layout rendered directly, scored on the same lines
        truth = score_slide(render_tile(tissue_classes, s), tissue_classes, clf, boundaries=seams)
        results.append({"layout_seed": s, "size": size, "seconds": round(sec, 1),
                        **{k: r[k] for k in ("balanced_accuracy", "seam_ratio", "recall", "windows_scored")},
                        "balanced_accuracy_tissue_classes": tissue["balanced_accuracy"],
                        "seam_ratio_procedural_render": truth["seam_ratio"]})
    summary = {
        "fidelity": results,
        "balanced_accuracy_mean": round(float(np.mean([r["balanced_accuracy"] for r in results])), 4),
        "balanced_accuracy_tissue_classes_mean": round(float(np.mean(
            [r["balanced_accuracy_tissue_classes"] for r in results])), 4),
        "seam_ratio_max": max((r["seam_ratio"] for r in results if r["seam_ratio"] is not None), default=None),
        "seam_ratio_at_2048": next((r["seam_ratio"] for r in results if r["size"] >= 2048), None),
        "steps": steps or steps_default(models.card),
        "guidance": default_guidance(models.card) if guidance is None else guidance,
        "eta": 1.0,
        "sampler": "tiled",
        "note": "unseen procedural slide layouts at 0.5 um/px; evaluation.fidelity classifier (64-px windows); seam "
                "ratio on the Tukey decoder's blend edges vs same-phase lines within 32 px (seam_ratio_procedural_render: the same layout "
                "rendered directly, i.e. what content alone scores); "
                "'tissue classes' leaves out glass (classifier class 0, the model's label 5)",
    }
    if write:
        write_card_metrics(REPO / out, summary)
    return summary


def write_card_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    """Put ``metrics`` into the model card in ``folder`` (an extra field; the files' hashes do not change)."""
    from models.cards import ModelCard

    data = ModelCard.load(folder).model_dump()
    data["metrics"] = metrics
    (folder / "model_card.json").write_text(json.dumps(data, indent=2) + "\n")


def picture(out: Path = OUT, path: Path = PICTURE, seed: int = 0) -> dict[str, Any]:
    """``docs/demo.png``: the demo mask (coloured) beside the slide generated from it by the demo request."""
    from PIL import Image, ImageDraw

    from evaluation.fidelity import score_slide
    from models.diffinfinite.loading import load_diffinfinite
    from models.labels import resize_labels
    from slidesynth.demo import demo_mask

    models = load_diffinfinite(REPO / out)
    mask = to_model_labels(demo_mask())
    labels = resize_labels(mask, 1024, 1024)
    img, seams = generate_image(models, labels, seed=seed, with_seams=True)
    score = score_slide(img, labels, label_map=FIDELITY_CLASSES, boundaries=seams)
    palette = np.array([[0, 0, 0], [120, 40, 140], [250, 200, 90], [230, 120, 160], [90, 170, 220],
                        [245, 245, 245]], np.uint8)
    side = 512
    left = Image.fromarray(palette[mask]).resize((side, side), Image.NEAREST)
    right = Image.fromarray(img).resize((side, side), Image.LANCZOS)
    pad, head = 12, 28
    canvas = Image.new("RGB", (2 * side + 3 * pad, side + head + pad), (255, 255, 255))
    canvas.paste(left, (pad, head))
    canvas.paste(right, (2 * pad + side, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 8), "demo mask (1 carcinoma, 2 necrosis, 3 stroma, 4 fat/vessels, 5 glass)", fill=(0, 0, 0))
    draw.text((2 * pad + side, 8), f"{NAME}: 1024 px at 0.5 um/px, seed {seed}, "
              f"balanced acc. {score['balanced_accuracy']:.2f}", fill=(0, 0, 0))
    target = REPO / path
    target.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(target, optimize=True)
    Image.fromarray(img).save(REPO / WORK / "demo_slide.png")
    return {"picture": str(path), "balanced_accuracy": score["balanced_accuracy"], "seam_ratio": score["seam_ratio"],
            "recall": score["recall"]}


# ------------------------------------------------------------------------------------------------ CLI
STEPS = ("datasets", "vae", "diffusion", "finetune", "assemble", "evaluate", "picture")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slidesynth.demo_models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("steps", nargs="+", help=f"all, or some of: {', '.join(STEPS)}; or 'commands'")
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--guidance", type=float, help="evaluate: ω to score with (default: the card's)")
    p.add_argument("--no-write", action="store_true", help="evaluate: print only, leave the card's metrics as they are")
    args, rest = p.parse_known_args(argv)
    if rest:
        p.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.steps[0] == "commands":
        try:
            ls, md = _vae_stats(args.work)
        except FileNotFoundError:
            ls, md = None, None
        print(json.dumps(commands(args.work, ls, md), indent=2))
        return 0
    steps = list(STEPS) if args.steps == ["all"] else args.steps
    bad = [s for s in steps if s not in STEPS]
    if bad:
        p.error(f"unknown steps {bad}; choose from {', '.join(STEPS)} or all")
    for step in steps:
        t0 = time.perf_counter()
        print(f"[demo-models] {step} …", flush=True)
        if step in ("datasets", "vae", "diffusion", "finetune"):
            run_step(step, args.work)
        elif step == "assemble":
            print(assemble(args.work, args.out))
        elif step == "evaluate":
            print(json.dumps(evaluate(args.out, guidance=args.guidance, write=not args.no_write), indent=2))
        elif step == "picture":
            print(json.dumps(picture(args.out)))
        print(f"[demo-models] {step} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
