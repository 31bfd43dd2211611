"""``slidesynth train diffinfinite|diffinfinite-mask`` and ``slidesynth convert diffinfinite-official``.

The lead's CLI calls :func:`add_train_parsers` / :func:`add_convert_parsers` with argparse sub-parser
collections; each parser sets ``func`` (called with the parsed args; returns an exit code).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


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
    from models.diffinfinite.data import parse_relabel
    from models.diffinfinite.training import TrainConfig

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
    from models.diffinfinite.training import train_diffinfinite

    result = train_diffinfinite(_train_config(args, kind), progress=not args.quiet)
    tail = result.losses[-10:]
    msg = f"trained {kind} model to step {result.steps_done}: {result.weights}"
    if tail:
        msg += f" (mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f})"
    print(msg)
    return 0


def add_train_parsers(train_subparsers) -> None:
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


def add_convert_parsers(convert_subparsers) -> None:
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
