"""Tiled-decoder benchmark: decode consistency on a real slide, decode overhead, seams and memory.

    python -m bench.decoder                      # consistency at 2048² (demo model) + tiny-VAE seam table
    python -m bench.decoder --size 4096 --steps 50   # consistency on a 4096² slide
    python -m bench.decoder --modes hard,tukey,hann,four-pass --latent 256 --tile 32 --overlap 4 --untiled
    python -m bench.decoder --memory --memory-width 100000

**Decode consistency** (the headline; issue 17): the shipped demo model samples the latent of a slide (the
demo mask scaled to ``--size``, 0.5 µm/px, ``--steps``, seed 0, tiled sampler) — or, with ``--latent-source
encoded``, its autoencoder encodes the procedural render of that mask (fast, no sampling). The latent is
decoded (1) untiled, in one piece — the reference, where it fits; (2) tile by tile as the paper's code does
(``decode_context="tile"``: each tile's own GroupNorm statistics and attention — the same-run reference of
what we replaced); (3) with slide-wide context (``"slide"``, the worker's default) in the worker's geometry
(tukey, tile 64, overlap 6); (4) the same with another tiling (tile 96, overlap 8) and (5) the paper's
four-pass blending. Printed per decode: 64-px block means against the untiled decode (max and 99th
percentile |Δ|, grey levels), PSNR, the quilt score on the decoder's cut lines within the mask's regions
(:mod:`evaluation.quilt`; the procedural render of the mask scores what clean content scores) and the
time; for (3) also the preparation (statistics passes and pooled attention keys) as a share of its decode.
Goals: within 2 grey levels at the 99th percentile and 4 at most, PSNR ≥ 40 dB, two tilings as close,
quilt score within 10 % of the procedural render's, preparation ≤ 30 % of the decode.

The rest uses a tiny random-weight VAE and a synthetic latent:

Decoder: a **fixed random-weight tiny diffusers AutoencoderKL decoder** (4 latent channels, ×8 upsampling,
block channels 8/8/16/16, GroupNorm with 4 groups, seed 0) — it has the GroupNorm statistics that make real
VAE tiles disagree, at a size a 2-core CPU can run; output mapped to [0, 1] by a fixed affine calibrated once
on an untiled decode.  Latent: smooth random field (bicubic-upsampled noise) plus fine noise, seed 0.

Figures per mode: decoder forwards (tiles) ÷ non-overlapping tile count ceil(h/t)·ceil(w/t), and the seam
ratio (models.metrics.seam_ratio, lines with the same phase mod 8 as the interior) on the tile grid lines
(tile starts, ramp middles and ramp ends).  Same-run reference: non-overlapping ("hard") tiles.  With
``--untiled`` the latent is also decoded in one piece and every seam ratio is divided by the untiled image's
ratio on the same lines (1.0 = no seam at all; removes content noise).  Also the planned overhead at 100k² px
(latent 12500²) for several configurations (tile counts only, nothing decoded).
Goals: overhead ≤ 1.3×, seam ratio ≤ 1.05 for the production mode (tukey).

``--memory`` adds the decoder's memory on a wide strip (default 1024 × 16384 px, ``--memory-width``): peak
RSS growth of our streaming decoder (tukey, the worker's tile 64 / overlap 6) against diffusers'
``AutoencoderKL.tiled_decode`` set to the same tile and overlap (512 px tiles, 48 px blend), the same tiny
VAE, each in its own process.  diffusers keeps every decoded tile and the blended image in float32; ours
holds one band, one float ramp and one batch window.  A third row gives our paper-exact ``four-pass`` mode on
the same strip (it carries two half-tile float strips from one tile row to the next); a fourth the
slide-context decoder (its pooled attention keys of the slide and the stage-A window of a batch of tiles).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.memory import peak_rss_mb, rss_mb
from models.decoding import TiledDecoder
from models.metrics import seam_ratios

SCALE = 8


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=256)
    return vae.eval()


def make_latent(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 4, n // 16 + 3, n // 16 + 3, generator=g)
    smooth = F.interpolate(coarse, size=(n, n), mode="bicubic", align_corners=True)
    return smooth + 0.3 * torch.randn(1, 4, n, n, generator=g)


def make_decode_fn(vae):
    with torch.no_grad():
        probe = vae.decode(make_latent(32, seed=1)).sample
    mean, std = float(probe.mean()), float(probe.std())

    def decode_fn(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = vae.decode(z).sample
        return ((x - mean) / (4 * std) + 0.5).clamp(0.0, 1.0)
    return decode_fn


def lines(mode: str, tile: int, overlap: int, margin: int = 0) -> tuple[int, tuple[int, ...]]:
    """(period px, offsets px) of the grid lines where a seam could be, per mode."""
    t, o = tile * SCALE, overlap * SCALE
    if mode == "hard":
        return t, (0,)
    if mode == "tukey":  # tile start/end, ramp start/middle/end (multiples of 8 px)
        return t - o, tuple(sorted({0, margin // 8 * 8, (o // 2) // 8 * 8, (o - margin) // 8 * 8, o}))
    if mode == "hann":
        return t // 2, (0, (t // 4) // 8 * 8)
    return t // 2, (0,)  # four-pass: base grid and half-shifted grids


def decoder_for(mode: str, decode_fn, tile: int, overlap: int, batch: int, margin: int = 0) -> TiledDecoder:
    if mode == "hard":
        return TiledDecoder(decode_fn, scale=SCALE, tile=tile, overlap=0, window="tukey", batch_size=batch)
    if mode == "tukey":
        return TiledDecoder(decode_fn, scale=SCALE, tile=tile, overlap=overlap, window="tukey", batch_size=batch,
                            margin_px=margin)
    if mode == "hann":
        return TiledDecoder(decode_fn, scale=SCALE, tile=tile, overlap=tile // 2, window="hann", batch_size=batch)
    return TiledDecoder(decode_fn, scale=SCALE, tile=tile, window="four-pass", batch_size=batch)


def planned_overheads(latent: int = 12500) -> dict[str, float]:
    ones = lambda z: z  # never called
    cfgs = {"tukey t64 o8": (64, 8, "tukey"), "tukey t64 o6": (64, 6, "tukey"), "tukey t64 o4": (64, 4, "tukey"),
            "tukey t96 o8": (96, 8, "tukey"), "hann t64 o32": (64, 32, "hann"), "four-pass t64": (64, 32, "four-pass")}
    return {k: round(TiledDecoder(ones, tile=t, overlap=o, window=w).overhead(latent, latent), 3)
            for k, (t, o, w) in cfgs.items()}


def demo_slide_latent(size: int, steps: int, source: str, seed: int = 0):
    """(codec, latent, labels, procedural render) of the demo mask scaled to ``size`` px."""
    from evaluation.fidelity import labels_for_classes, map_labels
    from models.diffinfinite.loading import load_diffinfinite
    from procedural.tissue import render_tile
    from models.labels import resize_labels
    from slidesynth.demo import demo_mask

    repo = Path(__file__).resolve().parents[1]
    models = load_diffinfinite(repo / "weights" / "diffinfinite-demo")
    classes = demo_mask(max(64, size // 4))
    labels = resize_labels(labels_for_classes(classes, models.card.fidelity_classes).astype(np.uint8), size, size)
    render = render_tile(map_labels(labels, models.card.fidelity_classes).astype(np.uint8), seed)
    if source == "sampled":
        from models.diffinfinite.pipeline import DiffInfinitePipeline, SamplingOptions

        pipe = DiffInfinitePipeline(models)
        opts = SamplingOptions(steps=steps, guidance=models.card.default_guidance or 3.0, mode="tiled", seed=seed)
        latent = pipe.sample_latents(labels, opts)
    else:
        img = torch.from_numpy(render).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            latent = models.codec.encode_image(img, generator=torch.Generator().manual_seed(seed))
    return models.codec, latent, labels, render


def block_consistency(a: np.ndarray, b: np.ndarray, block: int = 64) -> dict[str, float]:
    """Max and 99th percentile |Δ| of ``block``-px block means (grey levels, any channel) and PSNR (dB)."""
    from models.metrics import psnr

    h, w = a.shape[0] // block * block, a.shape[1] // block * block
    means = [x[:h, :w].astype(np.float64).reshape(h // block, block, w // block, block, -1).mean(axis=(1, 3))
             for x in (a, b)]
    d = np.abs(means[0] - means[1])
    return {"block_max": round(float(d.max()), 3), "block_p99": round(float(np.percentile(d, 99)), 3),
            "psnr_db": round(psnr(a, b), 2)}


def consistency_figures(size: int, steps: int, source: str) -> dict:
    from evaluation.quilt import quilt_score

    codec, latent, labels, render = demo_slide_latent(size, steps, source)
    h, w = latent.shape[2:]
    cuts = {"decode": TiledDecoder(lambda z: z, scale=SCALE, tile=64, overlap=6, window="tukey").cut_zones(h, w)}
    quilt = lambda img: quilt_score(img, cuts, labels)["quilt_score"]
    out: dict = {"size_px": size, "latent": source, "steps": steps if source == "sampled" else None}
    t0 = time.perf_counter()
    with torch.no_grad():
        untiled = codec.decode_image(latent)
    untiled = (untiled[0].clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8).permute(1, 2, 0).numpy()
    out["untiled"] = {"wall_s": round(time.perf_counter() - t0, 1), "quilt_score": quilt(untiled)}
    out["procedural_render"] = {"quilt_score": quilt(render)}
    runs = {"tile": ("tile", "tukey", 64, 6), "slide": ("slide", "tukey", 64, 6),
            "slide t96/o8": ("slide", "tukey", 96, 8), "slide four-pass": ("slide", "four-pass", 64, 32)}
    images = {}
    for name, (context, window, tile, overlap) in runs.items():
        tiles = codec.tile_decoder("image", context)
        prep = [0.0]
        if context == "slide":
            inner = tiles.prepare

            def timed(*a, _inner=inner, **k):
                t = time.perf_counter()
                _inner(*a, **k)
                prep[0] = time.perf_counter() - t
            tiles.prepare = timed
        dec = TiledDecoder(tiles, scale=SCALE, tile=tile, overlap=overlap, window=window)
        t0 = time.perf_counter()
        img = dec.decode(latent)
        wall = time.perf_counter() - t0
        images[name] = img
        row = {**block_consistency(img, untiled), "quilt_score": quilt(img), "wall_s": round(wall, 1)}
        if context == "slide":
            row["prepare_s"] = round(prep[0], 1)
            row["prepare_over_decode"] = round(prep[0] / max(wall - prep[0], 1e-9), 3)
        out[name] = row
    out["two_tilings"] = block_consistency(images["slide t96/o8"], images["slide"])
    out["four_pass_vs_tukey"] = block_consistency(images["slide four-pass"], images["slide"])
    return out


def print_consistency(c: dict) -> None:
    print(f"Decode consistency, demo model, {c['size_px']}² slide ({c['latent']} latent"
          + (f", {c['steps']} steps" if c["steps"] else "") + "), against its untiled decode "
          f"({c['untiled']['wall_s']} s):")
    print(f"{'decode':<20} {'block max':>9} {'block p99':>9} {'PSNR dB':>8} {'quilt':>7} {'wall s':>7} {'prep/dec':>8}")
    for name in ("tile", "slide", "slide t96/o8", "slide four-pass"):
        r = c[name]
        prep = f"{r['prepare_over_decode']:>8.3f}" if "prepare_over_decode" in r else f"{'':>8}"
        label = "tile (paper's code)" if name == "tile" else name
        print(f"{label:<20} {r['block_max']:>9.2f} {r['block_p99']:>9.2f} {r['psnr_db']:>8.2f} "
              f"{r['quilt_score']:>7.3f} {r['wall_s']:>7.1f} {prep}")
    print(f"two tilings (slide 64/6 vs 96/8): block max {c['two_tilings']['block_max']:.2f}, "
          f"p99 {c['two_tilings']['block_p99']:.2f}, PSNR {c['two_tilings']['psnr_db']:.1f} dB; four-pass vs tukey: "
          f"block max {c['four_pass_vs_tukey']['block_max']:.2f}, PSNR {c['four_pass_vs_tukey']['psnr_db']:.1f} dB")
    print(f"quilt score: untiled {c['untiled']['quilt_score']:.3f}, procedural render of the mask "
          f"{c['procedural_render']['quilt_score']:.3f}")
    print("goals: slide vs untiled block p99 <= 2, max <= 4, PSNR >= 40 dB; quilt within 10 % of the render's; "
          "prepare <= 30 % of the decode")


def memory_child(which: str, width: int, tile: int = 64, overlap: int = 6) -> dict:
    """Decode a 1024 × ``width`` px strip; peak RSS growth over the state just before decoding."""
    vae = tiny_vae()
    decode_fn = make_decode_fn(vae)
    g = torch.Generator().manual_seed(3)
    latent = torch.rand(1, 4, 128, width // SCALE, generator=g) * 2 - 1
    base = rss_mb()
    t0 = time.perf_counter()
    if which in ("ours", "ours-four-pass", "ours-slide"):
        # one tile per forward, as diffusers decodes
        window = "four-pass" if which == "ours-four-pass" else "tukey"
        if which == "ours-slide":
            from models.context_decoding import SlideContextDecoder

            decode_fn = SlideContextDecoder(vae, 1.0, lambda y: y.clamp_(-1, 1) * 0.5 + 0.5)
        dec = TiledDecoder(decode_fn, scale=SCALE, tile=tile, overlap=overlap, window=window, batch_size=1)
        rows = 0
        for band in dec.iter_bands(latent):
            rows += band.shape[0]
        forwards = dec.decoder_calls
    else:
        vae.enable_tiling()
        vae.tile_latent_min_size, vae.tile_sample_min_size = tile, tile * SCALE
        vae.tile_overlap_factor = overlap / tile
        calls = [0]
        inner = vae.decoder.forward

        def counted(z, *a, **kw):
            calls[0] += z.shape[0]
            return inner(z, *a, **kw)

        vae.decoder.forward = counted
        with torch.no_grad():
            img = vae.tiled_decode(latent).sample
        rows = img.shape[2]
        forwards = calls[0]
        del img
    return {"wall_s": round(time.perf_counter() - t0, 1), "rss_growth_mb": round(peak_rss_mb() - base, 1),
            "rows": rows, "decoder_forwards": forwards}


def memory_figures(width: int, threads: int) -> dict:
    out = {}
    for which in ("ours", "diffusers", "ours-four-pass", "ours-slide"):
        cmd = [sys.executable, "-m", "bench.decoder", "--memory-child", which, "--memory-width", str(width),
               "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if res.returncode != 0:
            raise RuntimeError(f"memory run '{which}' failed:\n{res.stderr[-3000:]}")
        out[which] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=512, help="latent side (output = 8× px); default 512 (4096² px)")
    ap.add_argument("--tile", type=int, default=64, help="tile, latent px (default 64 = 512 px, the worker's)")
    ap.add_argument("--overlap", type=int, default=8, help="tukey overlap, latent px (default 8 = 12.5 %%)")
    ap.add_argument("--margin", type=int, default=0, help="tukey context crop per inner tile edge, px (default 0)")
    ap.add_argument("--modes", default="hard,tukey", help="comma list of hard,tukey,hann,four-pass")
    ap.add_argument("--untiled", action="store_true",
                    help="also decode the latent in one piece and divide seam ratios by its ratio on the same "
                         "lines (slow: ~6 min and ~3 GB at the default size on 2 busy cores)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--memory", action="store_true",
                    help="also measure peak memory on a wide strip, ours vs diffusers tiled_decode (~1 min)")
    ap.add_argument("--memory-width", type=int, default=16384, help="strip width in px for --memory (default 16384)")
    ap.add_argument("--memory-child", choices=["ours", "diffusers", "ours-four-pass", "ours-slide"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=2048, help="consistency: slide side in px (default 2048)")
    ap.add_argument("--steps", type=int, default=50, help="consistency: sampling steps (default 50, the card's)")
    ap.add_argument("--latent-source", choices=["sampled", "encoded"], default="sampled",
                    help="consistency: the demo model samples the latent, or its VAE encodes the mask's render")
    ap.add_argument("--no-consistency", action="store_true", help="skip the demo-model consistency section")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.memory_width)))
        return
    consistency = None
    if not args.no_consistency:
        consistency = consistency_figures(args.size, args.steps, args.latent_source)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "hard" not in modes:
        modes.insert(0, "hard")  # the same-run reference
    vae = tiny_vae()
    decode_fn = make_decode_fn(vae)
    latent = make_latent(args.latent)
    n = args.latent

    truth, t_truth = None, 0.0
    if args.untiled:
        t0 = time.perf_counter()
        truth = TiledDecoder(decode_fn, scale=SCALE, tile=n, overlap=0, window="tukey").decode(latent)
        t_truth = time.perf_counter() - t0

    rows = []
    figures: dict = {"decoder": "random-weight tiny diffusers AutoencoderKL (8/8/16/16 ch), CPU",
                     "latent": n, "tile": args.tile, "overlap": args.overlap, "margin_px": args.margin,
                     "ours": {}, "reference_hard_tiles": {}, "ratio": {}}
    results = {}
    for mode in modes:
        dec = decoder_for(mode, decode_fn, args.tile, args.overlap, args.batch, args.margin)
        t0 = time.perf_counter()
        img = np.concatenate(list(dec.iter_bands(latent)))
        wall = time.perf_counter() - t0
        period, offsets = lines(mode, args.tile, args.overlap, args.margin)
        ours = seam_ratios(img, period, offsets, match_mod=SCALE)
        raw = max(ours.values())
        rel = None
        if truth is not None:
            ref = seam_ratios(truth, period, offsets, match_mod=SCALE)
            rel = max(ours[k] / ref[k] for k in ours)
        base = math.ceil(n / args.tile) ** 2
        overhead = dec.decoder_calls / base
        results[mode] = {"decoder_forwards": dec.decoder_calls, "overhead": round(overhead, 3),
                         "seam_ratio": round(raw, 4), "wall_s": round(wall, 2)}
        if rel is not None:
            results[mode]["seam_ratio_over_untiled"] = round(rel, 4)
        rows.append((mode, dec.decoder_calls, base, overhead, raw, rel, wall))
        del img
    figures["reference_hard_tiles"] = results["hard"]
    figures["ours"] = {m: r for m, r in results.items() if m != "hard"}
    for m, r in figures["ours"].items():
        hard = results["hard"]
        figures["ratio"][m] = {"seam_ratio_ours_over_hard": round(r["seam_ratio"] / hard["seam_ratio"], 4),
                               "forwards_ours_over_hard": round(r["decoder_forwards"] / hard["decoder_forwards"], 3)}
    if truth is not None:
        figures["untiled_decode_s"] = round(t_truth, 1)
    figures["planned_overhead_100k"] = planned_overheads()
    if args.memory:
        mem = memory_figures(args.memory_width, args.threads)
        figures["memory"] = {
            "strip_px": [1024, args.memory_width], "tile": 64, "overlap": 6,
            "ours": mem["ours"], "reference_diffusers_tiled_decode": mem["diffusers"],
            "ours_four_pass": mem["ours-four-pass"], "ours_slide_context": mem["ours-slide"],
            "ratio": {f"rss_growth_{key}_over_diffusers": round(
                mem[which]["rss_growth_mb"] / max(mem["diffusers"]["rss_growth_mb"], 1e-9), 3)
                for key, which in (("ours", "ours"), ("ours_four_pass", "ours-four-pass"),
                                   ("ours_slide_context", "ours-slide"))}}

    print(f"Tiled decoding of a {n}² latent ({n * SCALE}² px), tile {args.tile} latent px "
          f"({args.tile * SCALE} px), tukey overlap {args.overlap} (margin {args.margin} px); "
          f"decoder: {figures['decoder']}")
    if truth is not None:
        print(f"untiled reference decode: {t_truth:.1f} s")
    print(f"{'mode':<10} {'forwards':>9} {'non-ovl':>8} {'overhead':>9} {'seam':>7} {'seam/untiled':>13} {'wall s':>7}")
    for mode, calls, base, ov, raw, rel, wall in rows:
        rel_s = f"{rel:>13.3f}" if rel is not None else f"{'(--untiled)':>13}"
        print(f"{mode:<10} {calls:>9} {base:>8} {ov:>9.3f} {raw:>7.3f} {rel_s} {wall:>7.1f}")
    print("planned overhead at 100k² px (latent 12500², counts only): "
          + ", ".join(f"{k} {v:.3f}" for k, v in figures["planned_overhead_100k"].items()))
    if args.memory:
        m = figures["memory"]
        print(f"memory, 1024 x {args.memory_width} px strip (tile 64, overlap 6), peak RSS growth while decoding:")
        for name, key in (("ours (streaming bands)", "ours"),
                          ("diffusers tiled_decode", "reference_diffusers_tiled_decode"),
                          ("ours, four-pass", "ours_four_pass"), ("ours, slide context", "ours_slide_context")):
            r = m[key]
            print(f"  {name:<24} {r['rss_growth_mb']:>8.1f} MB  {r['decoder_forwards']:>5} forwards  {r['wall_s']:>6.1f} s")
        print(f"  ours / diffusers: {m['ratio']['rss_growth_ours_over_diffusers']:.3f}; four-pass / diffusers: "
              f"{m['ratio']['rss_growth_ours_four_pass_over_diffusers']:.3f}")
    print("goals: overhead <= 1.3x, seam ratio <= 1.05 (tukey); 'hard' = non-overlapping tiles, the same-run reference")
    if consistency is not None:
        print_consistency(consistency)
        figures["consistency"] = consistency
        slide, tile = consistency["slide"], consistency["tile"]
        figures["ours"]["slide_context"] = slide
        figures["reference_tile_context"] = tile
        figures["ratio"]["slide_over_tile"] = {
            "block_p99": round(slide["block_p99"] / max(tile["block_p99"], 1e-9), 4),
            "quilt_score": round(slide["quilt_score"] / max(tile["quilt_score"], 1e-9), 4),
            "wall_s": round(slide["wall_s"] / max(tile["wall_s"], 1e-9), 3),
            "quilt_over_procedural_render": round(slide["quilt_score"] / consistency["procedural_render"]["quilt_score"], 4)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
