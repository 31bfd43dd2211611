"""Image-UNet forward speed: eager vs fused GroupNorm → FiLM → SiLU vs torch.compile (issue 18), one device check.

    python -m bench.unet_speed                          # CUDA: official image UNet, bf16 autocast, 64² latents
    python -m bench.unet_speed --config tiny --no-compile --batches 2 --latent 16   # CPU smoke run

Random weights (speed does not depend on them). Per batch size: milliseconds per forward (median of
``--reps`` after warm-up) for eager with the fused kernel off, eager with it on, and — unless ``--no-compile``
— ``models.acceleration.inference_network`` in ``--mode`` with the kernel on (its first-call seconds printed as
the warm-up); the largest |Δ| of each variant against eager-unfused (bf16 rounding is the expected scale).
Then the kernel alone on the top level's activation shape: fused vs ``nn.GroupNorm`` + FiLM + SiLU, with the
fused kernel's effective bandwidth (one read of the statistics pass, one read and one write of the apply pass).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from models.acceleration import MODES, configure_cuda_backends, inference_network
from models.diffinfinite.layers import set_fused_kernels
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig
from models.kernels.groupnorm_film_silu import groupnorm_film_silu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _inputs(b: int, size: int, num_classes: int, device: torch.device):
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, 4, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    mask = torch.zeros(b, 1, size, size, dtype=torch.long)
    mask[:, :, : size // 2] = torch.randint(1, num_classes, (b, 1, 1, 1), generator=g)
    return x, t, mask.to(device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("official", "tiny"), default="official")
    ap.add_argument("--batches", default="8,16", help="comma-separated batch sizes")
    ap.add_argument("--latent", type=int, default=64, help="latent side (the sampler's 512-px patch → 64)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--mode", choices=MODES[1:], default="default")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    configure_cuda_backends(device)
    torch.manual_seed(0)
    cfg = ImageUNetConfig.official() if args.config == "official" else ImageUNetConfig.tiny()
    net = ImageUNet(cfg).to(device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{args.config} image UNet, autocast {dtype}, latent {args.latent}²")

    def run(fn, x, t, m):
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return fn(x, t, m)

    compiled = None if args.no_compile else inference_network(net, mode=args.mode, device=device)
    for b in (int(s) for s in args.batches.split(",")):
        x, t, m = _inputs(b, args.latent, cfg.num_classes, device)
        set_fused_kernels(False)
        ref = run(net, x, t, m).float()
        ms_plain = _time_ms(lambda: run(net, x, t, m), device, args.reps)
        set_fused_kernels(True)
        fused = run(net, x, t, m).float()
        ms_fused = _time_ms(lambda: run(net, x, t, m), device, args.reps)
        line = (f"batch {b:3d}: eager {ms_plain:8.2f} ms | eager+fused {ms_fused:8.2f} ms "
                f"(|Δ| ≤ {(fused - ref).abs().max().item():.3g})")
        if compiled is not None:
            out = run(compiled, x, t, m).float()
            warm = compiled.stats.warmup_s
            ms_comp = _time_ms(lambda: run(compiled, x, t, m), device, args.reps)
            line += (f" | {args.mode}+fused {ms_comp:8.2f} ms (|Δ| ≤ {(out - ref).abs().max().item():.3g}, "
                     f"warm-up total {warm:.1f} s)")
        print(line, flush=True)
    set_fused_kernels(None)

    # the kernel alone, on the first level's activation (dim channels, latent², groups as configured)
    b = max(int(s) for s in args.batches.split(","))
    c, g = cfg.dim, cfg.resnet_block_groups
    h = torch.randn(b, c, args.latent, args.latent, device=device, dtype=dtype)
    norm = nn.GroupNorm(g, c).to(device)
    scale = torch.randn(b, c, 1, 1, device=device, dtype=dtype)
    shift = torch.randn(b, c, 1, 1, device=device, dtype=dtype)
    out_dtype = torch.float32 if device.type == "cuda" else dtype  # what CUDA autocast's group_norm gives

    def unfused():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return nn.functional.silu(norm(h) * (scale + 1) + shift)

    def fused():
        return groupnorm_film_silu(h, g, norm.weight, norm.bias, norm.eps, scale, shift, out_dtype=out_dtype)

    with torch.inference_mode():
        diff = (fused().float() - unfused().float()).abs().max().item()
        ms_u = _time_ms(unfused, device, args.reps * 5)
        ms_f = _time_ms(fused, device, args.reps * 5)
    moved = h.numel() * (2 * h.element_size() + torch.finfo(out_dtype).bits // 8)
    print(f"kernel [{b}, {c}, {args.latent}, {args.latent}] groups {g}: unfused {ms_u:.3f} ms, fused {ms_f:.3f} ms "
          f"({moved / ms_f / 1e6:.0f} GB/s effective), |Δ| ≤ {diff:.3g}")


if __name__ == "__main__":
    main()
