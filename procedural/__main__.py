"""``python -m procedural``: write procedural training data, or render one slide for a look.

    python -m procedural dataset OUT --n 2000 --size 512 --seed 0              # image-model tiles
    python -m procedural dataset OUT --n 400 --size 2048 --kind slide --seed 1  # mask-model slides
    python -m procedural slide OUT.png --size 2048 --seed 7 [--mask-out MASK.png]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m procedural", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dataset", help="write <kind>_<i>.png + <kind>_<i>_mask.png pairs (DiffInfinite tile folder)")
    d.add_argument("out")
    d.add_argument("--n", type=int, required=True)
    d.add_argument("--size", type=int, default=512)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--kind", choices=["tile", "slide", "mosaic"], default="tile")
    d.add_argument("--mpp", type=float, default=0.5, help="µm per pixel of the layout (feature sizes)")
    d.add_argument("--workers", type=int, default=1)
    s = sub.add_parser("slide", help="render one slide layout to a PNG")
    s.add_argument("out")
    s.add_argument("--size", type=int, default=2048)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mpp", type=float, default=0.5)
    s.add_argument("--subtype", type=int, choices=[0, 1])
    s.add_argument("--mask-out")
    args = p.parse_args(argv)

    from procedural.tissue import make_dataset, random_layout, render_tile

    t0 = time.perf_counter()
    if args.cmd == "dataset":
        out = make_dataset(args.out, args.n, args.size, args.seed, kind=args.kind, mpp=args.mpp,
                           workers=args.workers)
        print(json.dumps({"out": str(out), "n": args.n, "seconds": round(time.perf_counter() - t0, 2)}))
        return 0
    from PIL import Image

    labels = random_layout(args.size, args.size, args.seed, "slide", mpp=args.mpp, subtype=args.subtype)
    t1 = time.perf_counter()
    Image.fromarray(render_tile(labels, args.seed)).save(args.out)
    if args.mask_out:
        Image.fromarray(labels, mode="L").save(args.mask_out)
    frac = (np.bincount(labels.ravel(), minlength=5) / labels.size).round(3).tolist()
    print(json.dumps({"out": args.out, "class_fractions": frac, "layout_s": round(t1 - t0, 2),
                      "render_s": round(time.perf_counter() - t1, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
