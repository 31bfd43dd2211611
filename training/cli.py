"""The ``slidesynth train …`` and ``slidesynth convert …`` commands (argparse parsers and their entry points).

``slidesynth`` calls :func:`add_train_parsers` with the ``train`` sub-parser collection and
:func:`add_convert_parsers` with the ``convert`` one; each parser sets ``func`` (called with the parsed args;
returns an exit code). Commands:

* ``train diffinfinite`` / ``train diffinfinite-mask`` (:mod:`training.diffinfinite`);
* ``train vae``: the KL autoencoder from scratch on a tile folder (:mod:`training.vae`);
* ``train infinity-brush`` (:mod:`training.infbrush`);
* ``train tile-encoder``: the project's tile encoder on procedural tissue (:mod:`training.tile_encoder`);
* ``train dde-coordinator``: a DDE coordinator over a frozen patch model (:mod:`training.dde`);
* ``convert diffinfinite-official``: an official DiffInfinite checkpoint into a servable model folder (the
  converter itself, :func:`models.diffinfinite.checkpoints.convert_official_checkpoint`, stays in ``models/``:
  loading reads official checkpoints with the same code).

Heavy imports (torch, the trainers) happen when a command runs, not when the parsers are built.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.infbrush.config import PRESETS, InfBrushConfig


def add_train_parsers(train_subparsers) -> None:
    """Add every training command: ``diffinfinite``, ``diffinfinite-mask``, ``vae``, ``infinity-brush``,
    ``tile-encoder``, ``dde-coordinator``."""
    add_diffinfinite_train_parsers(train_subparsers)
    add_vae_train_parsers(train_subparsers)
    add_infbrush_train_parsers(train_subparsers)
    add_tile_encoder_train_parsers(train_subparsers)
    add_dde_train_parsers(train_subparsers)


def add_convert_parsers(convert_subparsers) -> None:
    """Add every conversion command: ``diffinfinite-official``."""
    add_diffinfinite_convert_parsers(convert_subparsers)


# ------------------------------------------------------------------------------------------ DiffInfinite


def _class_names(text: str | None) -> dict[int, str] | None:
    """``'{"0": "Unknown", "1": "Tumour"}'``, a path to such a JSON file, or ``'Unknown,Tumour,…'``."""
    if not text:
        return None
    p = Path(text)
    raw = p.read_text() if p.is_file() else text
    raw = raw.strip()
    if raw.startswith("{"):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"--class-names: invalid JSON ({exc})") from exc
        return {int(k): str(v) for k, v in data.items()}
    return {i: name.strip() for i, name in enumerate(raw.split(","))}


def _divisors(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--mask-divisors: expected 4 comma-separated numbers, got {text!r}") from exc
    if len(vals) != 4 or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"--mask-divisors: expected 4 positive numbers, got {text!r}")
    return vals


def _add_common_train_args(p: argparse.ArgumentParser, kind: str) -> None:
    defaults = {"image": (250_000, 25_000), "mask": (100_000, 20_000)}[kind]
    p.add_argument("--tiles", type=Path, help="folder of tiles (<name>.png + optional <name>_mask.png label masks)")
    p.add_argument("--slides", type=Path, help="folder of whole slides (OpenSlide) + optional <stem>_mask.png label masks")
    p.add_argument("--vae", type=Path, required=True, help="local AutoencoderKL folder (SD 2 base 'vae')")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (weights, card, vae/, logs, state)")
    p.add_argument("--name", help="model name in the card (default: the folder name)")
    p.add_argument("--network", choices=("official", "small", "tiny"), default="official",
                   help="network size: official (the release), small (2.8 M parameters), tiny (tests); default official")
    p.add_argument("--init", type=Path, help="start from these weights (our model folder, .safetensors or official .pt)")
    p.add_argument("--num-classes", type=int, default=5, help="labels K incl. 0 = unknown (default 5)")
    p.add_argument("--class-names", help="JSON {id: name}, a JSON file, or 'Unknown,Carcinoma,…'")
    p.add_argument("--relabel", help="read mask value FROM as class TO, e.g. '0:5' (comma-separated FROM:TO pairs)")
    p.add_argument("--steps", type=int, default=defaults[0], help=f"total steps (OneCycle length; default {defaults[0]})")
    p.add_argument("--stop-after", type=int, help="stop after this many steps in this run (resume later)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-beta", type=float, default=0.995)
    p.add_argument("--ema-every", type=int, default=10)
    p.add_argument("--ema-after", type=int, default=100)
    p.add_argument("--p-unc", type=float, default=0.5, help="probability of an unconditional step (default 0.5)")
    p.add_argument("--tile-size", type=int, default=512, help="training tile size in px (default 512)")
    p.add_argument("--mask-downsample", type=int, default=4, help="image px per mask px (default 4: 512 → 128)")
    p.add_argument("--mask-divisors", help="4 per-channel mask-latent divisors (default: official for K)")
    p.add_argument("--latent-scale", type=float, default=50.0,
                   help="image latents = raw VAE latents / this (default 50, the release's; a VAE trained with "
                   "`slidesynth train vae` reports its own in vae_training.json)")
    p.add_argument("--mpp", type=float, default=0.5, help="native µm/px of the model (default 0.5)")
    p.add_argument("--slide-mpp", type=float, help="µm/px of slides that record none")
    p.add_argument("--no-augment", action="store_true", help="disable flips / rot90")
    p.add_argument("--save-every", type=int, default=defaults[1])
    p.add_argument("--holdout", type=float, default=0.0, help="fraction of sources (slides / tile folders) held out")
    p.add_argument("--val-every", type=int, default=0, help="validation loss every N steps (needs --holdout)")
    p.add_argument("--val-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-bf16", action="store_true", help="fp32 on GPU (default: bf16 autocast on CUDA)")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/<kind>-last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over even if a training state exists")
    p.add_argument("--link-vae", action="store_true", help="symlink the VAE folder instead of copying it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_config(args: argparse.Namespace, kind: str):
    from training.diffinfinite import TrainConfig
    from training.diffinfinite_data import parse_relabel

    return TrainConfig(
        kind=kind, out_dir=args.out, vae=args.vae, tiles=args.tiles, slides=args.slides, network=args.network,
        init=args.init, num_classes=args.num_classes, class_names=_class_names(args.class_names), steps=args.steps,
        relabel=parse_relabel(args.relabel),
        stop_after=args.stop_after, batch_size=args.batch_size, lr=args.lr, grad_clip=args.grad_clip,
        ema_beta=args.ema_beta, ema_every=args.ema_every, ema_after=args.ema_after, p_unc=args.p_unc,
        tile_size=args.tile_size, mask_downsample=args.mask_downsample, mask_divisors=_divisors(args.mask_divisors),
        latent_scale=args.latent_scale,
        native_mpp=args.mpp, slide_mpp=args.slide_mpp, augment=not args.no_augment, save_every=args.save_every,
        holdout=args.holdout, val_every=args.val_every, val_samples=args.val_samples, seed=args.seed,
        device=args.device, bf16=not args.no_bf16, workers=args.workers, threads=args.threads, resume=args.resume,
        overwrite=args.overwrite, link_vae=args.link_vae, name=args.name,
    )


def _run_train(args: argparse.Namespace, kind: str) -> int:
    from training.diffinfinite import train_diffinfinite

    result = train_diffinfinite(_train_config(args, kind), progress=not args.quiet)
    tail = result.losses[-10:]
    msg = f"trained {kind} model to step {result.steps_done}: {result.weights}"
    if tail:
        msg += f" (mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f})"
    print(msg)
    return 0


def add_diffinfinite_train_parsers(train_subparsers) -> None:
    """Add ``diffinfinite`` (image model) and ``diffinfinite-mask`` (mask model) training commands."""
    p = train_subparsers.add_parser(
        "diffinfinite",
        help="train the DiffInfinite image denoiser (Algorithm 1, semi-supervised)",
        description="Train the mask-conditioned image UNet on (image, label mask) pairs; unlabelled tiles "
        "train the null condition with probability --p-unc.",
    )
    _add_common_train_args(p, "image")
    p.set_defaults(func=lambda args: _run_train(args, "image"))
    q = train_subparsers.add_parser(
        "diffinfinite-mask",
        help="train the DiffInfinite mask denoiser (subtype-conditioned)",
        description="Train the subtype-conditioned mask UNet on label masks (0 = adenocarcinoma, 1 = squamous).",
    )
    _add_common_train_args(q, "mask")
    q.set_defaults(func=lambda args: _run_train(args, "mask"))


def _run_convert(args: argparse.Namespace) -> int:
    from models.diffinfinite.checkpoints import convert_official_checkpoint

    out = convert_official_checkpoint(
        args.checkpoint, args.out_dir, vae=args.vae, link_vae=args.link_vae, name=args.name,
        num_labels=args.num_labels, weights=args.weights, attn_heads=args.attn_heads,
        class_names=_class_names(args.class_names),
    )
    print(f"converted {args.checkpoint} into {out}")
    return 0


def add_diffinfinite_convert_parsers(convert_subparsers) -> None:
    """Add ``diffinfinite-official CHECKPOINT OUT_DIR``."""
    p = convert_subparsers.add_parser(
        "diffinfinite-official",
        help="convert an official DiffInfinite checkpoint (image or mask model) into a servable model folder",
        description="Reads the EMA weights (prefix 'ema_model.model.') of an official model-*.pt file; the model "
        "kind and class count come from its keys and shapes. Convert the image and the mask checkpoint into "
        "the same OUT_DIR and give --vae once.",
    )
    p.add_argument("checkpoint", type=Path, help="official .pt file (or a bare UNet state dict)")
    p.add_argument("out_dir", type=Path, help="model folder to create or extend")
    p.add_argument("--vae", type=Path, help="AutoencoderKL folder (SD 2 base 'vae') to copy into OUT_DIR/vae")
    p.add_argument("--link-vae", action="store_true", help="symlink the VAE folder instead of copying")
    p.add_argument("--name", help="model name (default: the folder name)")
    p.add_argument("--num-labels", type=int, choices=(5, 10), help="K of the paired image model (mask checkpoints; default 5)")
    p.add_argument("--weights", choices=("ema", "online"), default="ema", help="EMA (default) or the online weights")
    p.add_argument("--attn-heads", type=int, help="attention heads (default: 4, as released)")
    p.add_argument("--class-names", help="JSON {id: name}, a JSON file, or comma-separated names")
    p.set_defaults(func=_run_convert)


# ------------------------------------------------------------------------------------------ VAE


def _run_vae(args: argparse.Namespace) -> int:
    from training.diffinfinite_data import parse_relabel
    from training.vae import VAETrainConfig, train_vae

    cfg = VAETrainConfig(
        tiles=args.tiles, out_dir=args.out, preset=args.config, crop=args.crop, batch_size=args.batch_size,
        steps=args.steps, stop_after=args.stop_after, lr=args.lr, warmup=args.warmup,
        lr_final_ratio=args.lr_final_ratio, grad_clip=args.grad_clip, l1_weight=args.l1_weight,
        l2_weight=args.l2_weight, edge_weight=args.edge_weight, kl_weight=args.kl_weight,
        mask_fraction=args.mask_fraction, num_classes=args.num_classes, ema_beta=args.ema_beta,
        relabel=parse_relabel(args.relabel),
        augment=not args.no_augment, save_every=args.save_every, stats_samples=args.stats_samples,
        normalize_latents=args.normalize_latents,
        save_dtype="float16" if args.fp16 else "float32", seed=args.seed, device=args.device,
        threads=args.threads, resume=args.resume, overwrite=args.overwrite,
    )
    result = train_vae(cfg, progress=not args.quiet)
    stats = result.info.get("stats", {})
    print(json.dumps({
        "out": str(result.out_dir), "steps": result.steps_done, "parameters": result.info["parameters"],
        "final_loss_mean_last_50": result.info["final_loss_mean_last_50"], "wall_time_s": result.info["wall_time_s"],
        "psnr_db": stats.get("psnr_db"), "mask_label_accuracy": stats.get("mask_label_accuracy"),
        "latent_scale": stats.get("latent_scale"), "mask_divisors": stats.get("mask_divisors"),
    }))
    return 0


def add_vae_train_parsers(train_subparsers) -> None:
    """Add ``vae``: train a diffusers AutoencoderKL (4 latent channels, ×8) on a tile folder."""
    p = train_subparsers.add_parser(
        "vae",
        help="train the KL autoencoder (diffusers AutoencoderKL, 4 latent channels, x8) from scratch",
        description="Trains on random crops of the tiles (images in [0, 1]) and, with probability "
        "--mask-fraction, of their *_mask.png label maps (encoded 2l/(K-1)-1, 3 channels). Writes a diffusers "
        "folder (config.json + safetensors) usable as --vae, plus vae_training.json with the latent_scale and "
        "mask_divisors to pass to `slidesynth train diffinfinite`.",
    )
    p.add_argument("--tiles", type=Path, required=True, help="folder of tiles (<name>.png + optional <name>_mask.png)")
    p.add_argument("--out", type=Path, required=True, help="output folder (diffusers AutoencoderKL)")
    p.add_argument("--config", choices=("tiny", "small", "sd2"), default="small",
                   help="architecture: tiny (0.26 M), small (2.7 M, default), sd2 (83.7 M, the SD 2 VAE)")
    p.add_argument("--crop", type=int, default=128, help="training crop size in px (multiple of 8; default 128)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000, help="total steps (learning-rate schedule length)")
    p.add_argument("--stop-after", type=int, help="stop after this many steps in this run (resume later)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then cosine decay")
    p.add_argument("--lr-final-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--l1-weight", type=float, default=1.0)
    p.add_argument("--l2-weight", type=float, default=1.0)
    p.add_argument("--edge-weight", type=float, default=0.5, help="L1 on finite differences (sharpness)")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="KL per latent element (small)")
    p.add_argument("--mask-fraction", type=float, default=0.25, help="share of label-map samples (default 0.25)")
    p.add_argument("--num-classes", type=int, default=5, help="labels K of the mask encoding (default 5)")
    p.add_argument("--relabel", help="read label-map value FROM as class TO, e.g. '0:5' (comma-separated FROM:TO)")
    p.add_argument("--ema-beta", type=float, default=0.0, help="EMA decay of the saved weights (0: no EMA)")
    p.add_argument("--no-augment", action="store_true", help="disable flips / rot90")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--stats-samples", type=int, default=128, help="crops for the latent statistics (per kind)")
    p.add_argument("--normalize-latents", type=float, default=0.0, metavar="TARGET",
                   help="fold a per-channel shift/gain into the saved autoencoder so image latents are centred with "
                   "each channel's 99.9th percentile |z| at TARGET (50: the release's latent/50 convention); 0: off")
    p.add_argument("--fp16", action="store_true", help="save the weights as float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/vae-last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over even if a training state exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_vae)


# ------------------------------------------------------------------------------------------ ∞-Brush


def _infbrush_config(spec: str, overrides: dict) -> InfBrushConfig:
    if spec in PRESETS:
        cfg = PRESETS[spec]()
    else:
        path = Path(spec)
        if not path.is_file():
            raise SystemExit(f"--config: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
        d = json.loads(path.read_text())
        cfg = InfBrushConfig.from_dict(d.get("network", d))
    return cfg.replace(**overrides) if overrides else cfg


class _InstalledEncoderEmbed:
    """An installed encoder's ``embed`` under a readable name (recorded in the training state and the card)."""

    def __init__(self, encoder_id: str, models_dir):
        from models.encoders import class_prototypes, load_encoder

        self.encoder = load_encoder(encoder_id, models_dir)
        self.__qualname__ = f"encoder {encoder_id}"
        try:
            self.prototype_classes = tuple(class_prototypes(encoder_id, models_dir))
        except ValueError:
            self.prototype_classes = ()

    def __call__(self, tiles):
        return self.encoder.embed(tiles)


def _import_function(spec: str, models_dir: str | None = None):
    """``package.module:function`` → the function (how a caller names its image encoder's ``embed``); a spec
    without ':' is the id of an encoder installed in ``models_dir`` (default: the repository's weights/)."""
    import importlib

    if ":" not in spec:
        from models.encoders import EncoderNotInstalled

        root = Path(models_dir) if models_dir else Path(__file__).resolve().parents[1] / "weights"
        try:
            return _InstalledEncoderEmbed(spec, root)
        except (EncoderNotInstalled, OSError, ValueError) as exc:
            raise SystemExit(f"--embed: {exc}") from None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SystemExit(f"--embed: {spec!r} is not MODULE:FUNCTION")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise SystemExit(f"--embed: {module} has no function {name!r}")
    return fn


def _run_infbrush(args: argparse.Namespace) -> int:
    from training.infbrush import TrainOptions, train_infbrush

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    overrides = {}
    if args.points is not None:
        overrides["n_points"] = args.points
    if args.cond_drop is not None:
        overrides["cond_drop"] = args.cond_drop
    if args.train_resolution is not None:
        overrides["train_resolution"] = args.train_resolution
    if args.encoder is not None:
        overrides["embedding_encoder"] = args.encoder
    if args.embedding_dim is not None:
        overrides["embedding_dim"] = args.embedding_dim
    if args.cond_field:
        overrides["cond_field"] = True
    cfg = _infbrush_config(args.config, overrides)
    sizes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.synthetic_sizes.split(","))
    grids = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.grids.split(","))
    embed = _import_function(args.embed, args.models_dir) if args.embed else None
    mosaic = tuple(int(v) for v in args.synthetic_mosaic.lower().split("x"))
    from models.infbrush.priors import NoisePrior

    try:
        prior = NoisePrior(kind=args.noise_prior, length_um=args.prior_length_um, gamma=args.prior_gamma,
                           scale=args.prior_scale, reference_mpp=args.mpp, symbol=args.prior_symbol).validate()
    except ValueError as exc:
        raise SystemExit(f"--noise-prior: {exc}") from None
    opts = TrainOptions(
        out=Path(args.out), config=cfg, data=Path(args.data) if args.data else None, synthetic=args.synthetic,
        synthetic_sizes=tuple((h, w) for w, h in sizes), synthetic_mosaic=(mosaic[1], mosaic[0]),
        embed=embed, grids=tuple((r, c) for c, r in grids),
        prototype_classes=getattr(embed, "prototype_classes", ()),
        tile_px=args.tile_px, regions=args.regions, single_tile_p=args.single_tile_p, points=args.point_layout, patch_px=args.patch_px,
        image_cache_mb=args.image_cache_mb,
        name=args.name, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, betas=(args.beta1, args.beta2), ema=args.ema,
        ema_every=args.ema_every, grad_clip=args.grad_clip, save_every=args.save_every, log_every=args.log_every,
        seed=args.seed, device=args.device, resume=args.resume, amp="bf16" if args.amp else None,
        progress=not args.no_progress, native_mpp=args.mpp, command=" ".join(sys.argv),
        noise_prior=prior, levels=args.levels, coarse_fraction=args.coarse_fraction,
        init=Path(args.init) if args.init else None)
    result = train_infbrush(opts)
    losses = result["losses"]
    tail = sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else float("nan")
    print(f"trained {result['steps']} steps; mean loss of the last 10: {tail:.5f}; model folder: {result['out']}")
    return 0


def add_infbrush_train_parsers(train_subparsers) -> argparse.ArgumentParser:
    """Add ``infinity-brush``: train ∞-Brush (:mod:`training.infbrush`)."""
    p = train_subparsers.add_parser(
        "infinity-brush", help="train ∞-Brush on pixel subsets of images of any size",
        description="Train the ∞-Brush function-space diffusion model. Data: a folder of images (png/jpg/tif) each "
                    "with a same-named .npy QuiltNet embedding ((512,) or (rows, cols, 512)), or --synthetic N; or "
                    "conditions computed from the images' regions by an encoder (--embed, --grids).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder of images + .npy embeddings")
    src.add_argument("--synthetic", type=int, default=0, help="train on N synthetic smooth functions (smoke runs)")
    p.add_argument("--synthetic-sizes", default="64x64,80x48", help="WxH list of synthetic image sizes")
    p.add_argument("--synthetic-mosaic", default="1x1",
                   help="COLSxROWS cells of random classes per synthetic image (regions for --grids)")
    p.add_argument("--embed", metavar="ENCODER|MODULE:FUNCTION",
                   help="an installed encoder's id (e.g. slidesynth-tile-v1) or an image encoder function "
                        "embed(tiles uint8 (N, H, W, 3)) → (N, D): conditions are computed from each image's regions "
                        "(no .npy needed); with --synthetic and --grids, a colour-class stand-in")
    p.add_argument("--models-dir", help="where --embed ID looks for encoders/ID (default: the repository's weights/)")
    p.add_argument("--regions", choices=["resize", "tiles"], default="resize",
                   help="a region's condition: resize = the region resized to --tile-px (the paper); tiles = the "
                        "mean embedding of up to 16 native --tile-px tiles of the region (an encoder with a fixed "
                        "µm/px)")
    p.add_argument("--single-tile-p", type=float, default=0.0, metavar="P",
                   help="with --regions tiles: the chance, per region and step, that its condition is the embedding "
                        "of one of its tiles instead of their mean (users condition on one tile); default 0")
    p.add_argument("--point-layout", choices=["uniform", "patches"], default="uniform",
                   help="training pixels: uniform without replacement (the paper) or dense --patch-px squares "
                        "(the neighbourhoods dense sampling sees)")
    p.add_argument("--patch-px", type=int, default=32, help="side of the squares of --point-layout patches")
    p.add_argument("--image-cache-mb", type=float, default=2048, metavar="MIB",
                   help="decoded --data images kept in memory, the first drawn (default 2048 MiB: a 1024² RGB image "
                        "takes 3 MiB); the others are decoded on every draw")
    p.add_argument("--grids", default="1x1",
                   help="COLSxROWS layouts of the conditions from --embed, one drawn per step; 1x1 = a global "
                        "vector, e.g. 1x1,2x2,4x4 for a model that follows a vector and grids")
    p.add_argument("--tile-px", type=int, default=224, help="side each region is resized to for --embed")
    p.add_argument("--encoder", help="encoder id of the conditions (model card; default quilt-vit-b-32)")
    p.add_argument("--embedding-dim", type=int, help="dimension of the conditions (default 512)")
    p.add_argument("--cond-field", action="store_true",
                   help="also blend a grid's cells bilinearly into every point (a local condition; see "
                        "models/infbrush/layers.py LocalCondition)")
    p.add_argument("--out", required=True, help="model folder to write (card, EMA weights, train_state/)")
    p.add_argument("--config", default="tiny", help=f"preset ({', '.join(PRESETS)}) or a JSON file")
    p.add_argument("--name", default="infinity-brush", help="model name in the card")
    p.add_argument("--points", type=int, default=None, help="pixels sampled per image (paper: 65536)")
    p.add_argument("--train-resolution", type=int, default=None, help="side at which the mollifier σ is defined")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--ema-every", type=int, default=10)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--cond-drop", type=float, default=None, help="CFG condition dropout (default 0.1)")
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mpp", type=float, default=0.5, help="µm per pixel of the training images (model card)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--noise-prior", choices=["white", "bessel", "laplacian", "fno", "combined"], default="white",
                   help="noise of the forward process and the loss: white = the mollified pixel noise A·ξ (default); "
                        "bessel = (τI − Δ)^−γ, τ = 1/ℓ²; laplacian = (−Δ)^−γ (zero mean: unfit for H&E); fno = a "
                        "random low-mode multiplier; combined = fno + bessel (models/infbrush/priors.py)")
    p.add_argument("--prior-length-um", type=float, default=16.0, help="ℓ of the Bessel prior in µm (default 16)")
    p.add_argument("--prior-gamma", type=float, default=0.55, help="γ of the prior (default 0.55: PSD slope −2.2)")
    p.add_argument("--prior-scale", type=float, default=1.0, help="pixel std of the prior's noise at --mpp (default 1)")
    p.add_argument("--prior-symbol", choices=["continuous", "discrete"], default="continuous",
                   help="Laplacian eigenvalues: continuous (nested across resolutions) or the paper's 5-point stencil")
    p.add_argument("--levels", type=int, choices=[1, 2], default=1,
                   help="2: multilevel training — the first --coarse-fraction of the steps on the images Fourier-"
                        "downsampled to half resolution (2 × --mpp) with the prior's noise at that µm/px")
    p.add_argument("--coarse-fraction", type=float, default=0.5, help="share of the steps at the coarse level")
    p.add_argument("--init", help="warm start from this ∞-Brush model folder (same configuration; recorded on the card)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_infbrush)
    return p


# ------------------------------------------------------------------------------------------ tile encoder


def _run_tile_encoder(args: argparse.Namespace) -> int:
    from training.tile_encoder import train_tile_encoder

    card = train_tile_encoder(
        args.out, encoder_id=args.id or Path(args.out).name, dim=args.dim, n_images=args.n_images,
        per_image=args.per_image, steps=args.steps, batch=args.batch, lr=args.lr,
        contrastive_weight=args.contrastive_weight, temperature=args.temperature, seed=args.seed,
        threads=args.threads or None, log=(lambda _: None) if args.quiet else print)
    m = card["metrics"]
    print(f"encoder {card['id']}: nearest-prototype accuracy {m['nearest_prototype_accuracy']} on held-out "
          f"procedural windows; {card['size_bytes'] / 1e6:.2f} MB; {card['training']['seconds']:.0f} s; "
          f"folder {args.out}")
    return 0


def add_tile_encoder_train_parsers(train_subparsers) -> argparse.ArgumentParser:
    """Add ``tile-encoder``: the project's CNN tile encoder on procedural tissue (:mod:`training.tile_encoder`)."""
    p = train_subparsers.add_parser(
        "tile-encoder", help="train the project's tile encoder (slidesynth-tile-v1) on procedural tissue",
        description="Train a small CNN tile encoder on procedural H&E-like windows (supervised cosine classifier "
                    "+ NT-Xent between two views), evaluate it on held-out layouts and write an encoder folder: "
                    "encoder.safetensors, prototypes.json (mean embedding per class), encoder_card.json.")
    p.add_argument("--out", required=True, help="encoder folder to write (e.g. weights/encoders/slidesynth-tile-v1)")
    p.add_argument("--id", help="encoder id on the card (default: the folder name)")
    p.add_argument("--dim", type=int, default=128, help="embedding length (default 128)")
    p.add_argument("--n-images", type=int, default=640, help="procedural renders of 256² px (default 640)")
    p.add_argument("--per-image", type=int, default=24, help="windows drawn per render (default 24)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--contrastive-weight", type=float, default=0.5, help="weight of the NT-Xent term (default 0.5)")
    p.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it; default 1)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_tile_encoder)
    return p


# ------------------------------------------------------------------------------------------ DDE coordinator


def _dde_command(args: argparse.Namespace) -> str:
    """The full command line of this run (every option, defaults included): the card's exact recipe."""
    import shlex

    parts = ["slidesynth", "train", "dde-coordinator"]
    for key, value in vars(args).items():
        if key in ("func", "command", "model_kind", "resume", "overwrite", "quiet", "stop_after", "evaluate_only") or value is None:
            continue
        if value is False:
            continue
        parts.append("--" + key.replace("_", "-"))
        if value is not True:
            parts.append(str(value))
    return " ".join(shlex.quote(p) for p in parts)


def _run_dde(args: argparse.Namespace) -> int:
    from training.dde import DDETrainConfig, evaluate_trained, train_dde_coordinator

    cfg = DDETrainConfig(
        base=args.base, out=args.out, steps=args.steps, stop_after=args.stop_after, batch_size=args.batch_size,
        min_extra=args.min_extra, max_extra=args.max_extra, patch=args.patch, stride=args.stride, lr=args.lr,
        warmup=args.warmup, lr_decay=args.lr_decay, grad_clip=args.grad_clip, ema_beta=args.ema_beta,
        ema_after=args.ema_after,
        save_every=args.save_every, seed=args.seed, device=args.device, threads=args.threads, hidden=args.hidden,
        depth=args.depth, heads=args.heads, token=args.token, attn_window=args.attn_window, p_null=args.p_null,
        slides=args.slides, holdout_slides=args.holdout_slides, slide_px=args.slide_px, p_mean=args.p_mean,
        p_std=args.p_std, target=args.target, loss_levels=args.loss_levels, scale=args.scale,
        loss_weight=args.loss_weight, blend=args.blend, attn_grid=args.attn_grid,
        attention=args.attention, attn_block=args.attn_block, init=args.init, eval_crops=args.eval_crops, resume=args.resume,
        overwrite=args.overwrite, command=_dde_command(args),
    )
    log = (lambda _m: None) if args.quiet else print
    try:
        if args.evaluate_only:
            evaluate_trained(cfg, log=log)
            return 0
        result = train_dde_coordinator(cfg, log=log)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"trained the DDE coordinator to step {result.steps_done}: {result.out}")
    return 0


def add_dde_train_parsers(train_subparsers) -> None:
    """Add ``dde-coordinator``: a DDE coordinator over a frozen patch model (:mod:`training.dde`)."""
    p = train_subparsers.add_parser(
        "dde-coordinator",
        help="train a DDE coordinator over a frozen patch model (DiffInfinite image UNet or the Gaussian oracle)",
        description="Only the coordinator is trained: the frozen base runs on the overlapping windows of larger "
        "crops (canvas sides patch + k·stride, k random per step), the coordinator corrects each window's "
        "output, the corrected outputs are averaged over overlaps and the base's denoising loss is taken on "
        "the composite. Writes <out>/coordinator.safetensors + coordinator_card.json; resumable.",
    )
    p.add_argument("--base", default="weights/diffinfinite-demo",
                   help="'oracle' (the Gaussian-field oracle) or a DiffInfinite model folder (default "
                   "weights/diffinfinite-demo)")
    p.add_argument("--out", type=Path, help="coordinator folder (default <base>/dde-coordinator; required for oracle)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--stop-after", type=int, help="stop after this many steps in this run (resume later)")
    p.add_argument("--batch-size", type=int, default=2, help="canvases per step (default 2)")
    p.add_argument("--min-extra", type=int, default=1, help="smallest canvas: patch + this × stride (default 1)")
    p.add_argument("--max-extra", type=int, default=2, help="largest canvas: patch + this × stride (default 2)")
    p.add_argument("--patch", type=int, help="window side (default 64 latent px; oracle: its patch)")
    p.add_argument("--stride", type=int, help="window stride (default patch/2; oracle: patch/4)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--lr-decay", type=float, default=0.0,
                   help="fraction of --steps at the end over which the lr falls linearly to 0 (default 0: constant)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-beta", type=float, default=0.995)
    p.add_argument("--ema-after", type=int, default=50)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--token", type=int, default=4, help="token cell side in px (default 4)")
    p.add_argument("--attn-window", type=int, default=32, help="canvas square attention is confined to (px)")
    p.add_argument("--p-null", type=float, default=0.1, help="DiffInfinite: share of null-condition canvases")
    p.add_argument("--slides", type=int, default=16, help="DiffInfinite: procedural training slides")
    p.add_argument("--holdout-slides", type=int, default=4, help="DiffInfinite: held-out slides (evaluation)")
    p.add_argument("--slide-px", type=int, default=1024, help="DiffInfinite: procedural slide side in px")
    p.add_argument("--p-mean", type=float, default=-1.0, help="oracle: mean of ln σ (default -1.0)")
    p.add_argument("--p-std", type=float, default=1.6, help="oracle: std of ln σ (default 1.6)")
    p.add_argument("--target", choices=("clean", "bayes"), default="clean",
                   help="oracle: regress the composite on the clean canvas (the paper's loss, default) or on the exact "
                   "canvas denoiser E[X|x] (same minimiser, no irreducible noise)")
    p.add_argument("--scale", choices=("none", "disagreement"), default="none",
                   help="architecture: 'disagreement' gives the coordinator each window's deviation from the overlap "
                   "average and scales its correction by their RMS over the canvas (default none: EDM c_out / plain)")
    p.add_argument("--loss-weight", choices=("base", "disagreement"), default="base",
                   help="'disagreement': each canvas's error ÷ its windows' disagreement² (every noise level counts "
                   "alike; same minimiser) instead of the base's weighting (EDM λ(σ), plain ε MSE; default base)")
    p.add_argument("--blend", choices=("uniform", "mixture"), default="uniform",
                   help="architecture: the overlap weights the corrected windows are averaged with (default uniform, "
                   "the paper's: an untrained coordinator is MultiDiffusion; mixture: Gaussian, it starts from Mixture "
                   "of Diffusers)")
    p.add_argument("--attn-grid", choices=("fixed", "moving"), default="fixed",
                   help="architecture: 'moving' shifts the attention squares at random per training canvas and "
                   "along a low-discrepancy sequence per sampling step, so their borders leave no fixed seam "
                   "(default fixed: anchored at the canvas origin)")
    p.add_argument("--attention", choices=("squares", "neighbourhood"), default="squares",
                   help="architecture: which tokens a token attends to: those of its attention square (default) or "
                   "those in the attn_window square around its block of cells (context on all sides)")
    p.add_argument("--attn-block", type=int, default=0,
                   help="architecture, neighbourhood attention: query blocks of this many cells a side (default 0: "
                   "attn_window/(4·token); 1: every token its own neighbourhood)")
    p.add_argument("--loss-levels", type=int, default=0,
                   help="multiscale loss: add the error average-pooled over 2×2 … 2^L×2^L blocks, each level's MSE "
                   "× its block area, so low-frequency and window-scale errors weigh as much as fine detail (same "
                   "minimiser; default 0 = the paper's plain MSE)")
    p.add_argument("--init", type=Path,
                   help="warm start from this coordinator folder (same architecture, trained over the same base; "
                   "recorded on the card), e.g. to go on training on larger canvases")
    p.add_argument("--eval-crops", type=int, default=16, help="held-out crops per canvas size for the card")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/dde-last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over even if a training state exists")
    p.add_argument("--evaluate-only", action="store_true",
                   help="no training: re-run the held-out evaluation of the coordinator in --out (e.g. with more "
                   "--eval-crops) and record it on its card")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_run_dde)
