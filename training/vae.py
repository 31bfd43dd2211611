"""Train the KL autoencoder (diffusers ``AutoencoderKL``: 3 ↔ 4 channels, ×8) from scratch on a tile folder.

The autoencoder serves both DiffInfinite models with the official conventions (reference diffinfinite.md §2):
images enter in [0, 1]; label maps l ∈ {0..K−1} enter as ``v = 2l/(K−1) − 1`` repeated to 3 channels. So
the training stream mixes the two: with probability ``mask_fraction`` a sample is the label map of a
labelled tile (``<stem>_mask.png``) in that encoding, otherwise a crop of the tile itself.

Loss per sample (reconstruction of a posterior *sample*, as the codec encodes):

    w_l1·|x̂ − x| + w_l2·(x̂ − x)² + w_edge·(|∂x x̂ − ∂x x| + |∂y x̂ − ∂y x|) + w_kl·KL(q(z|x) ‖ N(0, I))

all as means over elements (KL per latent element). No perceptual or adversarial term (no LPIPS weights
can be downloaded here); the edge term keeps some sharpness. Adam, linear warm-up then cosine decay to
``lr_final_ratio``·lr, gradient clipping, optional EMA of the weights. Every sample is a pure function of
(seed, index), and the run is resumable bit-for-bit from ``<out>/checkpoints/vae-last.pt``.

Outputs in ``out_dir``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``save_pretrained``,
readable by :func:`models.vae.load_vae`), ``vae_loss_log.csv``, and ``vae_training.json``: the command,
device, duration, losses and the latent statistics DiffInfinite training needs — ``latent_scale`` (raw
image-latent magnitude: the 99.9th percentile of |z|, so that z / latent_scale mostly lies in the sampler's
x̂0 clip range [−1, 1]) and ``mask_divisors`` (per-channel max |z| of mask latents: the official
"max-norm" mode). Pass them as ``--latent-scale`` / ``--mask-divisors`` to ``slidesynth train diffinfinite``.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.runtime import pick_device
from models.vae import build_vae, sd2_vae_config, tiny_vae_config

STATE_FILE = "vae-last.pt"
LOG_FILE = "vae_loss_log.csv"
INFO_FILE = "vae_training.json"
LOG_COLUMNS = ["step", "loss", "l1", "l2", "edge", "kl", "lr", "elapsed_s"]


def small_vae_config() -> dict[str, Any]:
    """≈ 2.7 M parameters: cheap full-resolution stages (16 channels), wider low-resolution ones."""
    cfg = tiny_vae_config()
    cfg.update({"block_out_channels": [16, 32, 64, 128], "layers_per_block": 1, "norm_num_groups": 8,
                "sample_size": 128})
    return cfg


VAE_PRESETS = {"tiny": tiny_vae_config, "small": small_vae_config, "sd2": sd2_vae_config}


def vae_preset(name: str) -> dict[str, Any]:
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; choose one of {', '.join(VAE_PRESETS)}")
    return VAE_PRESETS[name]()


@dataclass
class VAETrainConfig:
    tiles: Path
    out_dir: Path
    preset: str = "small"
    crop: int = 128
    batch_size: int = 8
    steps: int = 2000
    stop_after: int | None = None
    lr: float = 5e-4
    warmup: int = 50
    lr_final_ratio: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    edge_weight: float = 0.5
    kl_weight: float = 1e-6
    mask_fraction: float = 0.25
    num_classes: int = 5
    relabel: tuple[tuple[int, int], ...] = ()  # mask value → class, applied as label maps are read
    ema_beta: float = 0.0
    augment: bool = True
    save_every: int = 500
    stats_samples: int = 128
    normalize_latents: float = 0.0
    save_dtype: str = "float32"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    command: str = field(default_factory=lambda: " ".join(sys.argv))

    def validate(self) -> None:
        problems = []
        if self.crop < 8 or self.crop % 8:
            problems.append(f"crop must be a positive multiple of 8 (the VAE's ×8), got {self.crop}")
        for name in ("batch_size", "steps"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.mask_fraction <= 1.0:
            problems.append(f"mask_fraction must lie in [0, 1], got {self.mask_fraction}")
        if not 0.0 <= self.ema_beta < 1.0:
            problems.append(f"ema_beta must lie in [0, 1) (0 = no EMA), got {self.ema_beta}")
        for name in ("l1_weight", "l2_weight", "edge_weight", "kl_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.num_classes < 2:
            problems.append(f"num_classes must be ≥ 2, got {self.num_classes}")
        if not self.normalize_latents >= 0:
            problems.append(f"normalize_latents must be ≥ 0 (0 = off), got {self.normalize_latents}")
        if self.save_dtype not in ("float32", "float16"):
            problems.append(f"save_dtype must be float32 or float16, got {self.save_dtype!r}")
        if self.preset not in VAE_PRESETS:
            problems.append(f"unknown preset {self.preset!r} (choose {', '.join(VAE_PRESETS)})")
        if problems:
            raise ValueError("invalid VAE training configuration: " + "; ".join(problems))

    def as_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class VAETrainResult:
    out_dir: Path
    steps_done: int
    losses: list[float]
    info: dict[str, Any]


# ------------------------------------------------------------------------------------------------ data
class VAETileDataset(torch.utils.data.Dataset):
    """Index → ``{"x": float [3, crop, crop], "is_mask": bool}``; a pure function of (seed, index).

    Images are in [0, 1]; label maps in the mask encoding ``2l/(K−1) − 1`` (3 equal channels)."""

    def __init__(self, tiles: str | Path, crop: int, num_classes: int = 5, mask_fraction: float = 0.25,
                 augment: bool = True, seed: int = 0, relabel: tuple[tuple[int, int], ...] = ()):
        from training.diffinfinite_data import scan_tiles

        self.relabel = tuple(tuple(pair) for pair in relabel)
        self.records = scan_tiles(tiles, num_classes, self.relabel)
        self.labelled = [r for r in self.records if r.mask is not None]
        if mask_fraction > 0 and not self.labelled:
            raise ValueError(f"mask_fraction is {mask_fraction} but tile folder {tiles} holds no *_mask.png label maps")
        self.crop, self.num_classes = int(crop), int(num_classes)
        self.mask_fraction, self.augment, self.seed = float(mask_fraction), bool(augment), int(seed)

    def __len__(self) -> int:
        return 1 << 40

    def describe(self) -> str:
        return f"{len(self.records)} tiles ({len(self.labelled)} with label maps), {self.crop}-px crops"

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        from training.diffinfinite_data import DataError, _mask_array

        rng = np.random.default_rng([self.seed, int(index)])
        is_mask = bool(self.labelled) and rng.random() < self.mask_fraction
        rec = (self.labelled if is_mask else self.records)[int(rng.integers(len(self.labelled if is_mask else self.records)))]
        if is_mask:
            arr = _mask_array(rec.mask, self.num_classes, self.relabel).astype(np.float32)
            arr = 2.0 * arr / (self.num_classes - 1) - 1.0
        else:
            arr = np.asarray(Image.open(rec.image).convert("RGB"), dtype=np.float32) / 255.0
        h, w = arr.shape[:2]
        c = self.crop
        if h < c or w < c:
            raise DataError(f"tile {rec.image} is {w}×{h}, smaller than the crop {c}")
        y, x = int(rng.integers(h - c + 1)), int(rng.integers(w - c + 1))
        arr = arr[y:y + c, x:x + c]
        if self.augment:
            k = int(rng.integers(4))
            if rng.random() < 0.5:
                arr = arr[:, ::-1]
            if rng.random() < 0.5:
                arr = arr[::-1]
            arr = np.rot90(arr, k, axes=(0, 1))
        t = torch.from_numpy(np.ascontiguousarray(arr))
        t = t[None].expand(3, -1, -1) if is_mask else t.permute(2, 0, 1)
        return {"x": t.contiguous(), "is_mask": torch.tensor(is_mask)}


# ------------------------------------------------------------------------------------------------ losses
def vae_losses(vae, x: torch.Tensor, cfg: VAETrainConfig) -> dict[str, torch.Tensor]:
    """The loss terms for a batch (reconstruction of a posterior sample)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample()
    y = vae.decode(z).sample
    d = y - x
    l1 = d.abs().mean()
    l2 = d.pow(2).mean()
    edge = (d[..., :, 1:] - d[..., :, :-1]).abs().mean() + (d[..., 1:, :] - d[..., :-1, :]).abs().mean()
    kl = posterior.kl().mean() / float(z[0].numel())
    total = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.edge_weight * edge + cfg.kl_weight * kl
    return {"loss": total, "l1": l1, "l2": l2, "edge": edge, "kl": kl}


def _lr_lambda(cfg: VAETrainConfig):
    warm, total, floor = max(int(cfg.warmup), 0), int(cfg.steps), float(cfg.lr_final_ratio)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))

    return f


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ stats
@torch.no_grad()
def latent_statistics(vae, dataset: VAETileDataset, n: int, seed: int = 1234, batch: int = 16,
                      num_classes: int = 5) -> dict[str, Any]:
    """Latent magnitudes and reconstruction quality on ``n`` fixed image and ``n`` fixed mask crops.

    ``latent_scale``: 99.9th percentile of |raw image latent| (posterior samples); ``mask_divisors``: per-channel
    max |raw mask latent|; ``psnr_db`` of image reconstructions; ``mask_label_accuracy``: share of mask pixels
    whose label survives encode → decode → quantise (as :meth:`models.vae.LatentCodec.quantize_mask`)."""
    dev = next(vae.parameters()).device
    dt = next(vae.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    imgs, masks = [], []
    i = 0
    base = 1 << 38  # indices no training run reaches
    while (len(imgs) < n or len(masks) < n) and i < 50 * n:
        item = dataset[base + i]
        i += 1
        if bool(item["is_mask"]):
            if len(masks) < n:
                masks.append(item["x"])
        elif len(imgs) < n:
            imgs.append(item["x"])
    out: dict[str, Any] = {"samples_images": len(imgs), "samples_masks": len(masks)}
    if imgs:
        zs, se = [], []
        for j in range(0, len(imgs), batch):
            x = torch.stack(imgs[j:j + batch]).to(dev, dt)
            z = vae.encode(x).latent_dist.sample(generator=None if dev.type != "cpu" else gen)
            y = vae.decode(z).sample.float().clamp(0, 1)
            zs.append(z.float().cpu())
            se.append((y - x.float()).pow(2).mean((1, 2, 3)).cpu())
        z = torch.cat(zs)
        mse = torch.cat(se)
        out["image_latent_std"] = [round(float(v), 5) for v in z.std(dim=(0, 2, 3))]
        out["image_latent_mean"] = [round(float(v), 5) for v in z.mean(dim=(0, 2, 3))]
        out["image_latent_absmax"] = round(float(z.abs().max()), 5)
        q = float(torch.quantile(z.abs().flatten()[:1_000_000], 0.999))
        out["latent_scale"] = float(f"{q:.3g}")
        out["psnr_db"] = round(float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()), 3)
    if masks:
        zs, acc = [], []
        for j in range(0, len(masks), batch):
            x = torch.stack(masks[j:j + batch]).to(dev, dt)
            z = vae.encode(x).latent_dist.sample(generator=None if dev.type != "cpu" else gen)
            zs.append(z.float().cpu())
            y = vae.decode(z).sample.float()
            vals = ((y + 1) * 0.5).clamp(0, 1)
            labels = torch.round((x.float()[:, 0] + 1) * 0.5 * (num_classes - 1)).long()
            q = torch.round(torch.round(vals * (num_classes - 1)).mean(dim=1)).long()
            acc.append((q == labels).float().mean((1, 2)).cpu())
        z = torch.cat(zs)
        divs = z.abs().amax(dim=(0, 2, 3))
        out["mask_divisors"] = [float(f"{float(v):.4g}") for v in divs]
        out["mask_label_accuracy"] = round(float(torch.cat(acc).mean()), 5)
    return out


# ------------------------------------------------------------------------------------------------ trainer
@torch.no_grad()
def normalize_latents(vae, dataset: VAETileDataset, n: int, target: float, seed: int = 4321, batch: int = 16
                      ) -> dict[str, list[float]]:
    """Fold a per-channel affine map of the latents into the autoencoder (an exact reparametrisation).

    With μ_c the mean and q_c the 99.9th percentile of |z_c − μ_c| of the posterior means of ``n`` fixed image
    crops, the new latents are z'_c = (target / q_c)·(z_c − μ_c): ``quant_conv``'s mean rows are scaled and
    shifted, its log-variance biases move by 2·ln(target / q_c), and ``post_quant_conv`` absorbs the inverse, so
    decode(encode(x)) is unchanged while the image latents are centred with every channel's 99.9th percentile
    at ``target``. With ``target`` = 50 the release's convention (latent / 50) then puts image latents in the
    sampler's x̂0 clip range [−1, 1] with every channel used, instead of one channel dominating the scale.
    Returns the applied shift μ and gain target/q per channel."""
    if target <= 0:
        raise ValueError(f"normalisation target must be > 0, got {target}")
    if getattr(vae, "quant_conv", None) is None or getattr(vae, "post_quant_conv", None) is None:
        raise ValueError("latent normalisation needs an AutoencoderKL with quant_conv and post_quant_conv")
    dev = next(vae.parameters()).device
    imgs = []
    i = 0
    base = 1 << 39
    while len(imgs) < n and i < 50 * n:
        item = dataset[base + i]
        i += 1
        if not bool(item["is_mask"]):
            imgs.append(item["x"])
    if not imgs:
        raise ValueError("no image crops to measure the latent statistics on")
    means = []
    for j in range(0, len(imgs), batch):
        x = torch.stack(imgs[j:j + batch]).to(dev, torch.float32)
        means.append(vae.encode(x).latent_dist.mean.float().cpu())
    z = torch.cat(means).transpose(0, 1).reshape(means[0].shape[1], -1).double()  # (C, N)
    mu = z.mean(1)
    q = torch.stack([torch.quantile((zc - m).abs(), 0.999) for zc, m in zip(z, mu)]).clamp_min(1e-6)
    gain = float(target) / q
    c = mu.numel()
    qc, pq = vae.quant_conv, vae.post_quant_conv
    w, b = qc.weight.data.double(), qc.bias.data.double()
    w[:c] *= gain[:, None, None, None]
    b[:c] = gain * (b[:c] - mu)
    b[c:] += 2.0 * torch.log(gain)
    qc.weight.data.copy_(w)
    qc.bias.data.copy_(b)
    pw, pb = pq.weight.data.double(), pq.bias.data.double()
    pb = pb + pw[:, :, 0, 0] @ mu
    pw = pw / gain[None, :, None, None]
    pq.weight.data.copy_(pw)
    pq.bias.data.copy_(pb)
    return {"shift": [round(float(v), 6) for v in mu], "gain": [round(float(v), 6) for v in gain]}


class _EMA:
    def __init__(self, model, beta: float):
        self.beta = float(beta)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, src) -> None:
        for p, q in zip(self.model.parameters(), src.parameters()):
            p.lerp_(q, 1.0 - self.beta)


def _save_folder(vae, out: Path, dtype: str) -> None:
    model = copy.deepcopy(vae).to("cpu")
    if dtype == "float16":
        model = model.half()
    model.save_pretrained(str(out), safe_serialization=True)


def train_vae(cfg: VAETrainConfig, progress: bool = True) -> VAETrainResult:
    """Train (or resume) an AutoencoderKL; writes the diffusers folder to ``cfg.out_dir``."""
    from tqdm.auto import tqdm

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out_dir)
    state_path = out / "checkpoints" / STATE_FILE
    state = None
    if state_path.is_file():
        if cfg.resume:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            saved = state["config"]
            for key in ("steps", "batch_size", "crop", "preset", "seed", "mask_fraction", "num_classes"):
                if saved[key] != getattr(cfg, key):
                    raise ValueError(f"--resume: {key} = {getattr(cfg, key)} differs from the saved run's {saved[key]}")
        elif not cfg.overwrite:
            raise FileExistsError(f"{state_path} exists: pass --resume to continue that run or --overwrite to start over")
    elif cfg.resume:
        raise FileNotFoundError(f"--resume: no training state at {state_path}")

    device = pick_device(cfg.device)
    dataset = VAETileDataset(cfg.tiles, cfg.crop, cfg.num_classes, cfg.mask_fraction, cfg.augment, cfg.seed,
                             cfg.relabel)
    model_cfg = state["model_config"] if state is not None else vae_preset(cfg.preset)
    vae = build_vae(model_cfg, seed=cfg.seed).to(device).train().requires_grad_(True)
    ema = _EMA(vae, cfg.ema_beta) if cfg.ema_beta > 0 else None
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    step = 0
    elapsed_before = 0.0
    torch.manual_seed(cfg.seed)
    if state is not None:
        vae.load_state_dict(state["model"], strict=True)
        if ema is not None:
            ema.model.load_state_dict(state["ema"], strict=True)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = int(state["step"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        torch.set_rng_state(state["rng_cpu"])

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    if step == 0:
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(LOG_COLUMNS)
    else:  # drop lines past the resumed step
        rows = list(csv.reader(open(log_path))) if log_path.is_file() else [LOG_COLUMNS]
        rows = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerows(rows)

    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + int(cfg.stop_after))
    from training.diffinfinite_data import IndexRange

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=IndexRange(step * cfg.batch_size, stop * cfg.batch_size),
        num_workers=0, drop_last=True, generator=torch.Generator().manual_seed(cfg.seed),
    )

    def save_state(elapsed: float) -> None:
        _atomic_save({
            "step": step, "config": cfg.as_json(), "model_config": dict(model_cfg), "model": vae.state_dict(),
            "ema": ema.model.state_dict() if ema is not None else None, "opt": opt.state_dict(),
            "sched": sched.state_dict(), "rng_cpu": torch.get_rng_state(), "elapsed_s": elapsed,
        }, state_path)

    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train vae")
    with open(log_path, "a", newline="") as logf:
        writer = csv.writer(logf)
        for batch in loader:
            x = batch["x"].to(device)
            terms = vae_losses(vae, x, cfg)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(vae)
            step += 1
            vals = {k: float(v.detach()) for k, v in terms.items()}
            losses.append(vals["loss"])
            writer.writerow([step, *(f"{vals[k]:.6g}" for k in ("loss", "l1", "l2", "edge", "kl")),
                             f"{sched.get_last_lr()[0]:.6g}", f"{elapsed_before + time.perf_counter() - t0:.1f}"])
            logf.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{vals['loss']:.4f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < stop:
                save_state(elapsed_before + time.perf_counter() - t0)
                _save_folder(ema.model if ema is not None else vae, out, cfg.save_dtype)
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - t0
    save_state(elapsed)
    final = (ema.model if ema is not None else vae).eval()
    normalization = None
    if cfg.normalize_latents:
        final = copy.deepcopy(final).to(device)
        normalization = normalize_latents(final, dataset, cfg.stats_samples, cfg.normalize_latents)
    _save_folder(final, out, cfg.save_dtype)

    # statistics on the weights as saved (fp16 round trip included)
    from models.vae import load_vae

    saved = load_vae(out, device=device)
    stats = latent_statistics(saved, dataset, cfg.stats_samples, num_classes=cfg.num_classes)
    if normalization is not None:  # the scale the latents were normalised to is the one to use
        stats["latent_q999_measured"] = stats.get("latent_scale")
        stats["latent_scale"] = float(cfg.normalize_latents)
    with open(log_path, newline="") as f:  # the whole run's log (a resumed run holds only its own losses)
        tail = [float(r["loss"]) for r in csv.DictReader(f)][-50:]
    info = {
        "model": "diffusers AutoencoderKL",
        "preset": cfg.preset,
        "parameters": int(sum(p.numel() for p in final.parameters())),
        "config": model_cfg,
        "data": dataset.describe() + f" from {cfg.tiles}; mask_fraction {cfg.mask_fraction}",
        "command": cfg.command,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps_done": step,
        "steps_total": cfg.steps,
        "batch_size": cfg.batch_size,
        "crop": cfg.crop,
        "loss_weights": {"l1": cfg.l1_weight, "l2": cfg.l2_weight, "edge": cfg.edge_weight, "kl": cfg.kl_weight},
        "lr": cfg.lr,
        "ema_beta": cfg.ema_beta,
        "wall_time_s": round(elapsed, 1),
        "final_loss_mean_last_50": (sum(tail) / len(tail)) if tail else None,
        "saved_dtype": cfg.save_dtype,
        "latent_normalization": normalization,
        "stats": stats,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return VAETrainResult(out, step, losses, info)
