"""Noise priors for ∞-Brush (Multilevel Diffusion) and the resolution consistency of a prior-trained model.

    python -m bench.priors                      # the priors table, then the two demo models at 512² / 128²
    python -m bench.priors --size 1024          # consistency at 1024² (0.5 µm/px) vs 256² (2 µm/px)
    python -m bench.priors --no-models          # the priors table only (seconds)

Part 1 (reference dde_multilevel.md §5.2), per prior (white = today's mollified pixel noise, bessel ℓ = 16 µm,
laplacian, fno, combined; γ = 0.55): the radial PSD slope on a 256² canvas at 0.5 µm/px (r = 4 … 64 cycles per
canvas; target −4γ = −2.2 where the prior has a power law), the pixel variance of the noise as a field over a fixed
128 µm square at n = 32 … 256 px (white noise as a field, ξ/h, grows ∝ n²; a trace-class prior levels off), the
smallest mode variance of a 64² canvas relative to the mean (0: a frequency never drawn), the largest |Δ| between
a 96² window drawn whole and in 6 chunks, the nestedness error max |F↓(η_fine)/2 − η_coarse| / std (256² at
0.5 µm/px → 128² at 1 µm/px, the coarse white noise the Fourier downsampling of the fine one), and the isometry error of F↓ (Σ coarse² against Σ of the
kept modes' |x̂|²).

Part 2: resolution consistency. For the Bessel demo (weights/infinity-brush-bessel-demo, or --model) and the white
demo (weights/infinity-brush-demo, the reference): a size² sample at 0.5 µm/px, Fourier-downsampled 4× (values
kept: F↓/4), against a (size/4)² sample at 2 µm/px of the same field of view (same seed, condition and steps):
channel means and standard deviations, and the radial PSD in physical frequency on the shared band (mean
|log10 ratio|). Lower is more consistent. The last line is one JSON object: ours (bessel), the reference (white)
and the ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GAMMA = 0.55


def _priors():
    from models.infbrush.priors import NoisePrior

    return {
        "white": NoisePrior(kind="white"),
        "bessel": NoisePrior(kind="bessel", length_um=16.0, gamma=GAMMA),
        "laplacian": NoisePrior(kind="laplacian", gamma=GAMMA),
        "fno": NoisePrior(kind="fno", fno_period_um=128.0),
        "combined": NoisePrior(kind="combined", length_um=16.0, gamma=GAMMA, fno_period_um=128.0),
    }


def _white_field(prior, seed, n, mpp, white=None):
    """Today's noise on an n² canvas (the demo's mollifier: σ = 1 px at 1024²) — as a physical field ξ/h when
    ``white`` is given (the nestedness and energy rows)."""
    from models.infbrush.priors import noise_source

    if white is not None:
        return white / mpp
    return noise_source(prior, n, n, mpp, 1.0, 1024).noise_window(seed, 0, 0, n, 0, n).double()


def prior_table() -> dict:
    from models.infbrush.priors import fourier_downsample, psd_slope

    rows = {}
    for name, prior in _priors().items():
        t0 = time.perf_counter()
        row: dict = {}
        white = name == "white"
        canvas = (lambda s, n, mpp, w=None: _white_field(prior, s, n, mpp, w)) if white else \
            (lambda s, n, mpp, w=None: prior.sample_canvas(s, 0, n, n, mpp, white=w))
        row["slope"] = round(sum(psd_slope(canvas(s, 256, 0.5)) for s in range(3)) / 3, 3)
        area = 128.0
        if white:
            row["pixel_var_vs_n"] = [round((n / area) ** 2, 4) for n in (32, 64, 128, 256)]
            row["min_mode_var"] = 1.0
        else:
            row["pixel_var_vs_n"] = [round(prior.pixel_variance(n, n, area / n), 4) for n in (32, 64, 128, 256)]
            mv = prior.mode_variance(64, 64, 0.5)
            row["min_mode_var"] = float(f"{float(mv.min() / mv.mean()):.3g}")
        row["growth_32_to_256"] = round(row["pixel_var_vs_n"][-1] / row["pixel_var_vs_n"][0], 3)
        if prior.chunkable:
            if white:
                from models.infbrush.priors import noise_source

                src = noise_source(prior, 96, 96, 0.5, 1.0, 1024)
                win = lambda r0, r1, c0, c1: src.noise_window(4, 0, r0, r1, c0, c1)   # noqa: E731
            else:
                win = lambda r0, r1, c0, c1: prior.noise_window(4, 0, r0, r1, c0, c1, 0.5)   # noqa: E731
            whole = win(0, 96, 0, 96)
            pieces = torch.cat([torch.cat([win(r0, r1, c0, c1) for c0, c1 in ((0, 40), (40, 96))], dim=1)
                                for r0, r1 in ((0, 17), (17, 50), (50, 96))], dim=0)
            row["chunk_max_abs"] = float(f"{float((whole - pieces).abs().max()):.3g}")
        else:
            row["chunk_max_abs"] = None          # defined on the whole canvas only
        xi = prior.white_canvas(5, 0, 256, 256)             # 128 µm: one FNO period
        fine = canvas(5, 256, 0.5, xi)
        coarse = canvas(5, 128, 1.0, fourier_downsample(xi))
        row["nest_err"] = float(f"{float((fourier_downsample(fine) / 2 - coarse).abs().max() / coarse.std()):.3g}")
        X = torch.fft.fft2(fine, dim=(0, 1), norm="ortho")
        k = torch.fft.fftfreq(256, d=1 / 256).abs() < 64
        kept = float((X.abs() ** 2)[k][:, k].sum())
        row["iso_err"] = float(f"{abs(float(fourier_downsample(fine).pow(2).sum()) - kept) / kept:.3g}")
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows[name] = row
    return rows


def _sample(pipe, size, mpp, emb, seed, steps):
    import numpy as np

    bands = pipe.sample_float_bands(size, size, embedding=emb, seed=seed, steps=steps, guidance=1.0,
                                    eta=pipe.card.default_eta or 0.0, mpp=mpp)
    return torch.cat([b for _, _, b in bands]).double(), np


def consistency(folder: Path, size: int, steps: int, seed: int) -> dict:
    """Statistics of a size² sample at 0.5 µm/px downsampled 4× against a (size/4)² sample at 2 µm/px."""
    from models.encoders import load_encoder
    from evaluation.conditioning import held_out_tile
    from models.infbrush.pipeline import InfBrushPipeline, load_infbrush
    from models.infbrush.priors import fourier_downsample, radial_psd

    pipe = InfBrushPipeline(load_infbrush(folder), "cpu", models_dir=REPO / "weights")
    enc = load_encoder(pipe.card.embedding_encoder, REPO / "weights")
    emb = enc.embed(held_out_tile("carcinoma")[None])[0]
    t0 = time.perf_counter()
    fine, _ = _sample(pipe, size, 0.5, emb, seed, steps)
    t_fine = time.perf_counter() - t0
    coarse, _ = _sample(pipe, size // 4, 2.0, emb, seed, steps)
    down = fourier_downsample(fine, 4) / 4
    mean_d, mean_c = down.mean((0, 1)), coarse.mean((0, 1))
    std_d, std_c = down.std((0, 1)), coarse.std((0, 1))
    _, p_d = radial_psd(down)
    _, p_c = radial_psd(coarse)
    log_ratio = (torch.log10(p_c) - torch.log10(p_d)).abs()
    return {
        "model": pipe.card.name, "prior": pipe.prior.kind, "fine": f"{size}² at 0.5 µm/px",
        "coarse": f"{size // 4}² at 2 µm/px", "steps": steps,
        "mean_abs_diff": round(float((mean_d - mean_c).abs().mean()), 4),
        "std_ratio": [round(float(v), 3) for v in (std_c / std_d)],
        "psd_log10_ratio_mean": round(float(log_ratio.mean()), 4),
        "psd_log10_ratio_high_half": round(float(log_ratio[len(log_ratio) // 2:].mean()), 4),
        "seconds_fine": round(t_fine, 1),
        "images": (fine, down, coarse),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.priors", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="fine sample side at 0.5 µm/px (coarse: size/4 at 2 µm/px)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=REPO / "weights" / "infinity-brush-bessel-demo")
    p.add_argument("--reference", type=Path, default=REPO / "weights" / "infinity-brush-demo")
    p.add_argument("--no-models", action="store_true", help="the priors table only")
    p.add_argument("--png", type=Path, help="write fine / downsampled / coarse samples of both models here")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.size % 4:
        p.error("--size must be divisible by 4")
    table = prior_table()
    print(f"{'prior':<10} {'slope':>7} {'pixel var, 128 µm square at n = 32/64/128/256':>48} {'growth':>8} "
          f"{'min mode':>9} {'chunk Δ':>9} {'nest err':>9} {'iso err':>9}")
    for name, r in table.items():
        pv = " / ".join(f"{v:.4g}" for v in r["pixel_var_vs_n"])
        chunk = "canvas" if r["chunk_max_abs"] is None else f"{r['chunk_max_abs']:.2g}"
        print(f"{name:<10} {r['slope']:7.3f} {pv:>48} {r['growth_32_to_256']:8.3f} {r['min_mode_var']:9.3g} "
              f"{chunk:>9} {r['nest_err']:9.2g} {r['iso_err']:9.2g}")
    print(f"target slope −4γ = {-4 * GAMMA:.2f} (bessel, laplacian, combined above τ); white: 0")
    summary: dict = {"bench": "priors", "priors": table}
    if not args.no_models:
        res = {}
        for label, folder in (("ours", args.model), ("reference", args.reference)):
            if not (folder / "model_card.json").is_file():
                print(f"{label}: no model at {folder}; skipped")
                continue
            res[label] = consistency(folder, args.size, args.steps, args.seed)
        print(f"\n{'model':<28} {'prior':<8} {'|Δ mean|':>9} {'std coarse/down':>22} {'PSD |log10 ratio|':>18} "
              f"{'high half':>10}")
        for label, r in res.items():
            print(f"{r['model']:<28} {r['prior']:<8} {r['mean_abs_diff']:9.4f} {str(r['std_ratio']):>22} "
                  f"{r['psd_log10_ratio_mean']:18.4f} {r['psd_log10_ratio_high_half']:10.4f}")
        if args.png:
            import numpy as np
            from PIL import Image

            args.png.mkdir(parents=True, exist_ok=True)
            for label, r in res.items():
                for part, img in zip(("fine", "down4", "coarse"), r["images"]):
                    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
                    Image.fromarray(np.ascontiguousarray(arr)).save(args.png / f"{r['model']}-{part}.png")
        for r in res.values():
            r.pop("images")
        summary["consistency"] = res
        if "ours" in res and "reference" in res:
            o, ref = res["ours"]["psd_log10_ratio_mean"], res["reference"]["psd_log10_ratio_mean"]
            summary.update({"ours": o, "reference": ref, "ratio": round(o / ref, 3) if ref else None,
                            "metric": "mean |log10 PSD ratio| of a 2 µm/px sample vs the 4x Fourier-downsampled "
                                      f"0.5 µm/px sample ({args.size}² → {args.size // 4}²); lower is better"})
    if "ours" not in summary:
        b, w = table["bessel"]["growth_32_to_256"], table["white"]["growth_32_to_256"]
        summary.update({"ours": b, "reference": w, "ratio": round(b / w, 4),
                        "metric": "pixel-variance growth of the noise field from 32² to 256² over a fixed area "
                                  "(bessel vs white)"})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
