"""Training ∞-Brush on pixel subsets of images of any size (paper §5.2; ∞-Diff where the paper is silent).

Per image and iteration: ``n_points`` pixels drawn uniformly without replacement; A·u₀ and A·ξ are evaluated only at
those pixels from their (2r+1)² neighbourhoods (ξ from the counter-based field, keyed by a per-item seed, so shared
neighbours see the same noise); u_t = √ᾱ_t·A u₀ + √(1−ᾱ_t)·A ξ·noise_mul; the network predicts A ξ·noise_mul (MSE).
Adam (lr 5e-5, β 0.9/0.99), EMA 0.995 (updated every ``ema_every`` steps, ∞-Diff), gradient clipping 1.0 (∞-Diff),
condition dropped with p = cond_drop for classifier-free guidance.

Folder layout written by :func:`train_infbrush` (``--out``)::

    model_card.json, denoiser.safetensors    the EMA weights: a model folder load_infbrush() reads
    train_state/model.safetensors            raw weights
    train_state/optimizer.pt                 optimizer + RNG state (torch.load(weights_only=True))
    train_state/state.json                   step, configuration, options
    train_log.jsonl                          one line per logged step
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.infbrush.config import InfBrushConfig
from models.infbrush.denoiser import InfBrushDenoiser, token_positions
from models.infbrush.geometry import pixel_to_unit, point_geometry, points_grid_pairs
from models.infbrush.noise import Mollifier, gaussian_noise
from models.infbrush.pipeline import InfBrushModels, check_state_dict, make_card, save_infbrush
from models.infbrush.schedule import CosineSchedule

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
class ImageFolderDataset:
    """Images of any size with a sidecar embedding each: ``a.png`` + ``a.npy`` ((D,) or (rows, cols, D))."""

    def __init__(self, folder: str | Path, embedding_dim: int):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"training data folder not found: {self.folder}")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {self.folder}")
        missing = [p.name for p in self.files if not p.with_suffix(".npy").is_file()]
        if missing:
            raise ValueError(f"{len(missing)} images have no embedding .npy next to them, e.g. {', '.join(missing[:5])}")
        self.embeddings = []
        for p in self.files:
            e = np.load(p.with_suffix(".npy")).astype(np.float32)
            if e.ndim == 1:
                e = e[None, None]
            if e.ndim != 3 or e.shape[-1] != embedding_dim:
                raise ValueError(f"{p.with_suffix('.npy')} has shape {e.shape}; expected ({embedding_dim},) or "
                                 f"(rows, cols, {embedding_dim})")
            self.embeddings.append(torch.from_numpy(e))
        shapes = {tuple(e.shape) for e in self.embeddings}
        if len(shapes) > 1:
            raise ValueError(f"all embeddings must have the same shape, found {sorted(shapes)}")

    def __len__(self) -> int:
        return len(self.files)

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.files[i]
        if p.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(p)
        else:
            from PIL import Image

            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] < 3:
            raise ValueError(f"{p}: expected an RGB image, got shape {arr.shape}")
        return torch.from_numpy(np.array(arr[..., :3], dtype=np.uint8, copy=True)).permute(2, 0, 1), self.embeddings[i]


class SyntheticFunctions:
    """Smooth random RGB functions whose structure depends on a class; embedding = the class's fixed unit vector.

    Class c has its own colour and spatial frequency band; image sizes cycle through ``sizes`` (any size).
    """

    def __init__(self, n: int, sizes=((64, 64),), classes: int = 2, seed: int = 0, embedding_dim: int = 512):
        g = torch.Generator().manual_seed(seed)
        self.n, self.sizes, self.classes = n, [tuple(s) for s in sizes], classes
        self.class_vec = torch.nn.functional.normalize(torch.randn(classes, embedding_dim, generator=g), dim=-1)
        self.colours = torch.rand(classes, 3, generator=g) * 1.2 - 0.6
        self.seeds = torch.randint(0, 2 ** 31 - 1, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return self.n

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = i % self.classes
        H, W = self.sizes[i % len(self.sizes)]
        g = torch.Generator().manual_seed(self.seeds[i])
        side = max(H, W)
        y = (torch.arange(H, dtype=torch.float32)[:, None] + 0.5 + (side - H) / 2) / side
        x = (torch.arange(W, dtype=torch.float32)[None, :] + 0.5 + (side - W) / 2) / side
        f = torch.zeros(3, H, W)
        for _ in range(4):
            freq = (1.0 + 2.0 * c) + torch.rand(2, generator=g) * 2.0
            phase = torch.rand(1, generator=g) * 2 * math.pi
            amp = torch.rand(3, 1, 1, generator=g) * 0.25
            f += amp * torch.sin(2 * math.pi * (freq[0] * y + freq[1] * x) + phase)
        f += self.colours[c][:, None, None]
        img = ((f.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img, self.class_vec[c][None, None]


# ---------------------------------------------------------------------------------------------------------------
# One training batch
# ---------------------------------------------------------------------------------------------------------------
def sample_pixels(n: int, total: int, gen: torch.Generator) -> torch.Tensor:
    """n distinct flat pixel indices, uniformly without replacement, in random order; O(n) for n ≪ total (a
    randperm of a 4096² image would cost 16.7 M draws per image)."""
    if n * 4 >= total:
        return torch.randperm(total, generator=gen)[:n]
    have = torch.empty(0, dtype=torch.long)
    while have.numel() < n:
        extra = n - have.numel()
        draw = torch.randint(0, total, (extra + extra // 8 + 64,), generator=gen)
        have = torch.unique(torch.cat([have, draw]))
    return have[torch.randperm(have.numel(), generator=gen)[:n]]


def make_batch(items, cfg: InfBrushConfig, sched: CosineSchedule, gen: torch.Generator, device,
               t: list[int] | None = None, drop: list[bool] | None = None) -> dict:
    """Noisy smoothed values at sampled pixels and their targets for a list of (image uint8 (3,H,W), embedding)."""
    N = cfg.n_points
    u_t, target, px, xy, ts, embs, poss, sizes = [], [], [], [], [], [], [], []
    for b, (img, emb) in enumerate(items):
        _, H, W = img.shape
        if H * W < N:
            raise ValueError(f"image {b} of the batch has {H}×{W} = {H * W} pixels, fewer than n_points = {N}")
        img = img.to(device).float() / 127.5 - 1
        flat = sample_pixels(N, H * W, gen).to(device)
        rows, cols = torch.div(flat, W, rounding_mode="floor"), flat % W
        moll = Mollifier.for_side(max(H, W), cfg.mollify_sigma, cfg.train_resolution)
        a_u0 = moll.at_points(lambda rr, cc: img[:, rr, cc].movedim(0, -1), rows, cols, H, W)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
        a_xi = moll.at_points(lambda rr, cc: gaussian_noise(seed, 0, rr, cc), rows, cols, H, W) * moll.noise_mul
        ti = int(torch.randint(0, cfg.timesteps, (1,), generator=gen)) if t is None else int(t[b])
        ab = float(sched.alpha_bar[ti])
        u_t.append(math.sqrt(ab) * a_u0 + math.sqrt(1 - ab) * a_xi)
        target.append(a_xi)
        px.append(torch.stack([rows, cols], dim=-1).float())
        xy.append(pixel_to_unit(rows, cols, H, W))
        ts.append(ti)
        gh, gw = emb.shape[:2]
        embs.append(emb.reshape(gh * gw, -1))
        poss.append(token_positions(gh, gw, H, W))
        sizes.append((H, W))
    if len({e.shape for e in embs}) > 1:
        raise ValueError("all embeddings of a batch must have the same shape")
    B = len(items)
    dflags = (torch.rand(B, generator=gen) < cfg.cond_drop) if drop is None else torch.tensor(drop)
    return dict(u_t=torch.stack(u_t), target=torch.stack(target), px=torch.stack(px), xy=torch.stack(xy).to(device),
                t=torch.tensor(ts, device=device), emb=torch.stack(embs).to(device),
                pos=torch.stack(poss).to(device), drop=dflags.to(device), sizes=sizes)


def batch_loss(model: InfBrushDenoiser, batch: dict, cfg: InfBrushConfig, lam: torch.Tensor | None = None):
    hs, ws = [s[0] for s in batch["sizes"]], [s[1] for s in batch["sizes"]]
    geo = point_geometry(batch["px"], cfg.knn_k, hs, ws)
    pairs = points_grid_pairs(batch["px"], hs, ws, cfg.grid_size, cfg.grid_knn)
    ctx = model.context(batch["t"], batch["emb"], batch["pos"], batch["drop"])
    pred = model(batch["u_t"], batch["xy"], ctx, geo, pairs)
    per_item = ((pred.float() - batch["target"]) ** 2).mean(dim=(1, 2))
    if lam is not None:
        per_item = per_item * lam.to(per_item.device)[batch["t"]]
    return per_item.mean()


@torch.no_grad()
def evaluate_loss(model: InfBrushDenoiser, dataset, cfg: InfBrushConfig, n: int = 8, seed: int = 1234,
                  device="cpu") -> float:
    """Deterministic held-out loss: fixed items, points, noise and evenly spread timesteps, condition kept."""
    was = model.training
    model.eval()
    sched = CosineSchedule(cfg.timesteps)
    gen = torch.Generator().manual_seed(seed)
    items = [dataset.item(i % len(dataset)) for i in range(n)]
    ts = [int((j + 0.5) * cfg.timesteps / n) for j in range(n)]
    batch = make_batch(items, cfg, sched, gen, device, t=ts, drop=[False] * n)
    loss = float(batch_loss(model, batch, cfg))
    model.train(was)
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainOptions:
    out: Path
    config: InfBrushConfig
    data: Path | None = None
    synthetic: int = 0
    synthetic_sizes: tuple = ((64, 64), (48, 80))
    name: str = "infinity-brush"
    steps: int = 1000
    batch_size: int = 4
    lr: float = 5e-5
    betas: tuple = (0.9, 0.99)
    ema: float = 0.995
    ema_every: int = 10
    grad_clip: float = 1.0
    save_every: int = 1000
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    amp: str | None = None
    progress: bool = True
    native_mpp: float = 0.5
    command: str = ""
    extra: dict = field(default_factory=dict)


def _dataset(opts: TrainOptions):
    if opts.data is not None:
        return ImageFolderDataset(opts.data, opts.config.embedding_dim), str(opts.data)
    if opts.synthetic > 0:
        ds = SyntheticFunctions(opts.synthetic, sizes=opts.synthetic_sizes, seed=opts.seed,
                                embedding_dim=opts.config.embedding_dim)
        return ds, f"synthetic functions (n={opts.synthetic}, sizes={list(opts.synthetic_sizes)})"
    raise ValueError("give --data FOLDER (images + .npy embeddings) or --synthetic N")


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def train_infbrush(opts: TrainOptions) -> dict:
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    cfg, out, device = opts.config, Path(opts.out), torch.device(opts.device)
    state_dir = out / "train_state"
    dataset, data_desc = _dataset(opts)
    torch.manual_seed(opts.seed)
    model = InfBrushDenoiser(cfg).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=opts.lr, betas=tuple(opts.betas))
    gen = torch.Generator().manual_seed(opts.seed)
    step, elapsed = 0, 0.0
    if state_dir.exists():
        if not opts.resume:
            raise FileExistsError(f"{out} already holds a training run; pass --resume or choose another --out")
        saved = json.loads((state_dir / "state.json").read_text())
        if saved["config"] != cfg.to_dict():
            diff = sorted(k for k in set(saved["config"]) | set(cfg.to_dict())
                          if saved["config"].get(k) != cfg.to_dict().get(k))
            raise ValueError(f"--resume with a different configuration (keys {', '.join(diff)}); "
                             f"the run in {out} was started with its own config")
        raw = load_file(str(state_dir / "model.safetensors"))
        check_state_dict(model.state_dict(), raw, str(state_dir / "model.safetensors"))
        model.load_state_dict(raw)
        ema_sd = load_file(str(out / "denoiser.safetensors"))
        check_state_dict(ema.state_dict(), ema_sd, str(out / "denoiser.safetensors"))
        ema.load_state_dict(ema_sd)
        aux = torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(aux["optimizer"])
        gen.set_state(aux["generator"])
        step, elapsed = int(saved["step"]), float(saved.get("elapsed_s", 0.0))
    elif opts.resume:
        raise FileNotFoundError(f"--resume: no training state in {state_dir}")

    sched = CosineSchedule(cfg.timesteps)
    lam = sched.lambda_weights() if cfg.loss_weighting == "lambda" else None
    log_path = out / "train_log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []

    def save():
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / "model.safetensors.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, state_dir / "model.safetensors")
        torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state()}, state_dir / "optimizer.pt.tmp")
        os.replace(state_dir / "optimizer.pt.tmp", state_dir / "optimizer.pt")
        training = {"command": opts.command, "device": str(device), "steps": step, "batch_size": opts.batch_size,
                    "points_per_image": cfg.n_points, "lr": opts.lr, "betas": list(opts.betas), "ema": opts.ema,
                    "ema_every": opts.ema_every, "grad_clip": opts.grad_clip, "seed": opts.seed,
                    "duration_s": round(elapsed, 1), "last_loss": losses[-1] if losses else None}
        card = make_card(cfg, name=opts.name, trained=True, training=training, training_data=data_desc,
                         native_mpp=opts.native_mpp)
        save_infbrush(InfBrushModels(card=card, denoiser=ema), out)
        opt_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()
                    if k not in ("config", "out", "data")}
        _write_json_atomic(state_dir / "state.json", {"step": step, "elapsed_s": elapsed, "config": cfg.to_dict(),
                                                      "options": json.loads(json.dumps(opt_dict, default=str))})

    model.train()
    bar = tqdm(total=opts.steps, initial=step, disable=not opts.progress, desc="train infinity-brush", unit="step")
    use_amp = opts.amp is not None and device.type == "cuda"
    while step < opts.steps:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(dataset), (opts.batch_size,), generator=gen).tolist()
        batch = make_batch([dataset.item(i) for i in idx], cfg, sched, gen, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = batch_loss(model, batch, cfg, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        opt.step()
        step += 1
        if step % opts.ema_every == 0:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - opts.ema)
        losses.append(float(loss.detach()))
        elapsed += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % opts.log_every == 0 or step == opts.steps:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": losses[-1], "elapsed_s": round(elapsed, 2)}) + "\n")
        if step % opts.save_every == 0 and step < opts.steps:
            save()
    bar.close()
    save()
    return {"steps": step, "losses": losses, "out": str(out), "model": model, "ema": ema, "dataset": dataset}
