"""``slidesynth train infinity-brush``: parser and entry point."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.infbrush.config import PRESETS, InfBrushConfig


def _config(spec: str, overrides: dict) -> InfBrushConfig:
    if spec in PRESETS:
        cfg = PRESETS[spec]()
    else:
        path = Path(spec)
        if not path.is_file():
            raise SystemExit(f"--config: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
        d = json.loads(path.read_text())
        cfg = InfBrushConfig.from_dict(d.get("network", d))
    return cfg.replace(**overrides) if overrides else cfg


def run_train(args: argparse.Namespace) -> int:
    from models.infbrush.train import TrainOptions, train_infbrush

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
    cfg = _config(args.config, overrides)
    sizes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.synthetic_sizes.split(","))
    opts = TrainOptions(
        out=Path(args.out), config=cfg, data=Path(args.data) if args.data else None, synthetic=args.synthetic,
        synthetic_sizes=tuple((h, w) for w, h in sizes), name=args.name, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, betas=(args.beta1, args.beta2), ema=args.ema,
        ema_every=args.ema_every, grad_clip=args.grad_clip, save_every=args.save_every, log_every=args.log_every,
        seed=args.seed, device=args.device, resume=args.resume, amp="bf16" if args.amp else None,
        progress=not args.no_progress, native_mpp=args.mpp, command=" ".join(sys.argv))
    result = train_infbrush(opts)
    losses = result["losses"]
    tail = sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else float("nan")
    print(f"trained {result['steps']} steps; mean loss of the last 10: {tail:.5f}; model folder: {result['out']}")
    return 0


def add_train_parsers(train_subparsers) -> argparse.ArgumentParser:
    p = train_subparsers.add_parser(
        "infinity-brush", help="train ∞-Brush on pixel subsets of images of any size",
        description="Train the ∞-Brush function-space diffusion model. Data: a folder of images (png/jpg/tif) each "
                    "with a same-named .npy QuiltNet embedding ((512,) or (rows, cols, 512)), or --synthetic N.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder of images + .npy embeddings")
    src.add_argument("--synthetic", type=int, default=0, help="train on N synthetic smooth functions (smoke runs)")
    p.add_argument("--synthetic-sizes", default="64x64,80x48", help="WxH list of synthetic image sizes")
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
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)
    return p
