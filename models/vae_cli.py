"""``slidesynth train vae``: train the KL autoencoder from scratch on a tile folder (:mod:`models.vae_training`).

The lead's CLI calls :func:`add_train_parsers` with the ``train`` sub-parser collection; the parser sets
``func`` (called with the parsed args; returns an exit code).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from models.diffinfinite.data import parse_relabel
    from models.vae_training import VAETrainConfig, train_vae

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


def add_train_parsers(train_subparsers) -> None:
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
    p.set_defaults(func=_run)
