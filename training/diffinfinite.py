"""DiffInfinite training (paper Algorithm 1) for the image and the mask denoiser.

Per step: draw a batch of (image, mask) pairs (semi-supervised bucketing, :mod:`training.diffinfinite_data`),
encode with the frozen VAE (images in [0, 1], latent / 50; masks with the per-channel divisors), draw
t ~ U{0..T−1} and ε ~ N(0, I), form z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε on the cosine schedule (T = 1000,
s = 0.008), and take an Adam step on ‖ε − ε_θ(z_t, t, c)‖² (uniform weighting, p2 γ = 0).

Hyperparameters follow the release (reference §6): Adam lr 1e-4, β = (0.9, 0.99), OneCycle over all steps,
gradient clipping at 1.0, EMA β = 0.995 every 10 steps after 100 warm-up steps (power 2/3), p_unc = 0.5.
On CUDA the forward/backward runs under bf16 autocast (weights and optimiser state stay float32).

Image model: the conditioning mask is the single-class binary mask × label, taken to the latent size by the
same nearest path the sampler uses (:func:`models.diffinfinite.unet.downsample_label_mask`; reference §14 #10).
The unconditional step of Algorithm 1 is an all-zero mask (label 0 = the null condition).

Mask model: label maps at 1/4 of the tile size (512 → 128), subtype class, condition dropout p_unc inside the
forward (the learned null embedding), as in the release.

``p_unc`` is the probability of an *unconditional* step (the paper's text: "the probability of switching from
the conditional to the unconditional setting"; Alg. 1 writes the complementary test — identical at 0.5).

Outputs in ``out_dir``: ``image_unet.safetensors`` / ``mask_unet.safetensors`` (EMA weights), ``vae/`` (copied
or linked), ``model_card.json`` (merged with an existing card), ``<kind>_loss_log.csv`` and the resumable
state ``checkpoints/<kind>-last.pt``.
"""
from __future__ import annotations

import copy
import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.cards import CARD_FILENAME, ModelCard
from models.diffinfinite.checkpoints import IMAGE_WEIGHTS, MASK_WEIGHTS, install_vae, load_network, save_network
from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig
from models.engine import is_model_of
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig, downsample_label_mask
from models.hashing import sha256_file
from models.runtime import pick_device
from models.schedules import cosine_alphas_cumprod
from models.vae import LatentCodec, load_vae
from training.diffinfinite_data import DataSpec, IndexRange, PairDataset, scan_slides, scan_tiles, split_holdout

Kind = Literal["image", "mask"]


class EMA:
    """Exponential moving average of a model's parameters (ema-pytorch semantics used by the release).

    ``update()`` after every optimiser step; every ``update_every`` calls: copy the weights while
    ``step <= update_after_step``, afterwards lerp with decay min(β, 1 − (1 + n/inv_gamma)^−power),
    n = step − update_after_step − 1. Only for training: inference never calls ``update``.
    """

    def __init__(
        self,
        model: nn.Module,
        beta: float = 0.995,
        update_every: int = 10,
        update_after_step: int = 100,
        inv_gamma: float = 1.0,
        power: float = 2.0 / 3.0,
        min_value: float = 0.0,
    ):
        self.model = model
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.beta, self.update_every, self.update_after_step = beta, int(update_every), int(update_after_step)
        self.inv_gamma, self.power, self.min_value = inv_gamma, power, min_value
        self.step = 0
        src = dict(model.named_parameters())
        self._params = [(p, src[n]) for n, p in self.ema_model.named_parameters()]
        src_b = dict(model.named_buffers())
        self._buffers = [(b, src_b[n]) for n, b in self.ema_model.named_buffers()]

    def current_decay(self) -> float:
        epoch = max(self.step - self.update_after_step - 1, 0)
        if epoch <= 0:
            return 0.0
        value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
        return float(min(max(value, self.min_value), self.beta))

    @torch.no_grad()
    def update(self) -> None:
        step = self.step
        self.step += 1
        if step % self.update_every:
            return
        if step <= self.update_after_step:
            for p, q in self._params:
                p.copy_(q)
            return
        decay = self.current_decay()
        for p, q in self._params:
            p.lerp_(q.to(p.dtype), 1.0 - decay)
        for b, c in self._buffers:
            b.copy_(c)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ema_model": self.ema_model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.ema_model.load_state_dict(state["ema_model"], strict=True)


@dataclass
class TrainConfig:
    kind: Kind
    out_dir: Path
    vae: Path
    tiles: Path | None = None
    slides: Path | None = None
    network: Literal["official", "small", "tiny"] = "official"
    init: Path | None = None
    num_classes: int = 5
    class_names: dict[int, str] | None = None
    relabel: tuple[tuple[int, int], ...] = ()  # mask value → class, applied as masks are read
    steps: int = 250_000
    stop_after: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_beta: float = 0.995
    ema_every: int = 10
    ema_after: int = 100
    p_unc: float = 0.5
    tile_size: int = 512
    mask_downsample: int = 4
    mask_divisors: tuple[float, ...] | None = None
    latent_scale: float = 50.0
    native_mpp: float = 0.5
    slide_mpp: float | None = None
    augment: bool = True
    timesteps: int = 1000
    save_every: int = 25_000
    holdout: float = 0.0
    val_every: int = 0
    val_samples: int = 16
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    workers: int = 0
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    link_vae: bool = False
    name: str | None = None
    command: str = field(default_factory=lambda: " ".join(sys.argv))

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


@dataclass
class TrainResult:
    out_dir: Path
    steps_done: int
    losses: list[float]
    weights: Path
    val_losses: list[tuple[int, float]] = field(default_factory=list)


def network_config(kind: Kind, network: str, num_classes: int = 5) -> ImageUNetConfig | MaskUNetConfig:
    """The UNet configuration of a ``--network`` preset: ``official`` (the release: 172.1 M image / 38.4 M
    mask parameters), ``small`` (dim 32, mults 1-2-4, 4 heads × 16: 2.8 M each; the demo models) or ``tiny``
    (tests)."""
    if network == "official":
        return ImageUNetConfig.official(num_classes) if kind == "image" else MaskUNetConfig.official()
    if network == "small":
        if kind == "image":
            return ImageUNetConfig(dim=32, dim_mults=(1, 2, 4), num_classes=num_classes, attn_heads=4, attn_dim_head=16)
        return MaskUNetConfig(dim=32, dim_mults=(1, 2, 4), attn_heads=4, attn_dim_head=16)
    if network == "tiny":
        return ImageUNetConfig.tiny(num_classes) if kind == "image" else MaskUNetConfig.tiny()
    raise ValueError(f"unknown network preset {network!r}; choose official, small or tiny")


def _build_network(cfg: TrainConfig) -> ImageUNet | MaskUNet:
    if cfg.init is not None:
        init = Path(cfg.init)
        if init.is_dir():
            init = init / (IMAGE_WEIGHTS if cfg.kind == "image" else MASK_WEIGHTS)
        net = load_network(init, kind=cfg.kind)
        if cfg.kind == "image" and net.config.num_classes != cfg.num_classes:
            raise ValueError(f"--init {cfg.init} has {net.config.num_classes} classes, --num-classes is {cfg.num_classes}")
        return net.requires_grad_(True)
    conf = network_config(cfg.kind, cfg.network, cfg.num_classes)
    return ImageUNet(conf) if cfg.kind == "image" else MaskUNet(conf)


def _state_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoints" / f"{cfg.kind}-last.pt"


def _log_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / f"{cfg.kind}_loss_log.csv"


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool):
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.out_dir)
        self.device = pick_device(cfg.device)
        self.use_bf16 = bool(cfg.bf16 and self.device.type == "cuda")
        if cfg.steps < 1 or cfg.batch_size < 1:
            raise ValueError(f"steps and batch size must be positive, got {cfg.steps} and {cfg.batch_size}")
        if cfg.tiles is None and cfg.slides is None:
            raise ValueError("give training data: a tile folder (--tiles) and/or a slide folder (--slides)")
        if not (cfg.latent_scale > 0 and math.isfinite(cfg.latent_scale)):
            raise ValueError(f"latent_scale must be a positive number, got {cfg.latent_scale}")
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))

    # ----------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        state_path = _state_path(cfg)
        self.state = None
        if state_path.is_file():
            if cfg.resume:
                self.state = torch.load(state_path, map_location="cpu", weights_only=True)
            elif not cfg.overwrite:
                raise FileExistsError(
                    f"{state_path} exists: pass --resume to continue that run or --overwrite to start over"
                )
        elif cfg.resume:
            raise FileNotFoundError(f"--resume: no training state at {state_path}")
        if self.state is not None:
            saved = self.state["config"]
            for key in ("steps", "batch_size", "kind", "num_classes", "tile_size", "latent_scale"):
                if saved.get(key, 50.0 if key == "latent_scale" else None) != getattr(cfg, key):
                    raise ValueError(f"--resume: {key} = {getattr(cfg, key)} differs from the saved run's {saved[key]}")

        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        relabel = tuple(tuple(pair) for pair in cfg.relabel)
        tiles = scan_tiles(cfg.tiles, cfg.num_classes, relabel) if cfg.tiles else []
        slides = scan_slides(cfg.slides, cfg.num_classes, relabel) if cfg.slides else []
        (tr_tiles, tr_slides), (ho_tiles, ho_slides) = split_holdout(tiles, slides, cfg.holdout, cfg.seed)
        spec = DataSpec(
            num_classes=cfg.num_classes, tile_size=cfg.tile_size, p_unc=cfg.p_unc, mode=cfg.kind,
            mask_downsample=cfg.mask_downsample, native_mpp=cfg.native_mpp, slide_mpp=cfg.slide_mpp,
            augment=cfg.augment, seed=cfg.seed, relabel=relabel,
        )
        self.dataset = PairDataset(tr_tiles, tr_slides, spec)
        self.val_dataset = None
        if ho_tiles or ho_slides:
            vspec = DataSpec(**{**asdict(spec), "augment": False, "seed": cfg.seed + 1})
            self.val_dataset = PairDataset(ho_tiles, ho_slides, vspec)

        vae = load_vae(cfg.vae, device=self.device)
        divisors = cfg.mask_divisors
        if divisors is None:
            from models.diffinfinite.loading import default_mask_divisors

            divisors = default_mask_divisors(cfg.num_classes)
        self.codec = LatentCodec(vae, latent_scale=cfg.latent_scale, mask_divisors=divisors, num_classes=cfg.num_classes)

        if self.state is None:
            net = _build_network(cfg)
        else:
            net_cfg = (ImageUNetConfig if cfg.kind == "image" else MaskUNetConfig).from_dict(self.state["net_config"])
            net = ImageUNet(net_cfg) if cfg.kind == "image" else MaskUNet(net_cfg)
            net.load_state_dict(self.state["net"], strict=True)
        self.net = net.to(self.device).train()
        self.ema = EMA(self.net, beta=cfg.ema_beta, update_every=cfg.ema_every, update_after_step=cfg.ema_after)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas))
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=cfg.lr, total_steps=cfg.steps)
        self.step = 0
        if self.state is not None:
            self.ema.load_state_dict(self.state["ema"])
            self.opt.load_state_dict(self.state["opt"])
            self.sched.load_state_dict(self.state["sched"])
            self.step = int(self.state["step"])
            torch.set_rng_state(self.state["rng_cpu"])
            if self.device.type == "cuda" and self.state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(self.state["rng_cuda"], self.device)
        self.alphas_cumprod = cosine_alphas_cumprod(cfg.timesteps, normalize=False).float().to(self.device)

    # ----------------------------------------------------------------------------------------- steps
    def _latents(self, batch: dict[str, torch.Tensor]):
        # the networks do not range-check labels in forward (no host sync there); the batch is still on the
        # host here, so checking it costs no device sync
        self.net.check_labels(batch["labels"] if self.cfg.kind == "image" else batch["subtype"])
        if self.cfg.kind == "image":
            z0 = self.codec.encode_image(batch["image"].to(self.device))
            cond = downsample_label_mask(batch["labels"].to(self.device)[:, None], z0.shape[-2:])
        else:
            z0 = self.codec.encode_mask(batch["labels"].to(self.device))
            cond = batch["subtype"].to(self.device)
        return z0, cond

    def _loss(self, net: nn.Module, z0, cond, t, noise, cond_drop: float) -> torch.Tensor:
        ab = self.alphas_cumprod[t][:, None, None, None]
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            if self.cfg.kind == "image":
                pred = net(zt, t, cond)
            else:
                pred = net(zt, t, cond, cond_drop_prob=cond_drop)
        return F.mse_loss(pred.float(), noise)

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        z0, cond = self._latents(batch)
        b = z0.shape[0]
        t = torch.randint(0, self.cfg.timesteps, (b,), device=self.device)
        noise = torch.randn_like(z0)
        loss = self._loss(self.net, z0, cond, t, noise, self.cfg.p_unc)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.update()
        return float(loss.detach())

    @torch.no_grad()
    def validate(self) -> float:
        """EMA-model loss on fixed held-out samples with fixed t and noise (comparable across steps)."""
        n = self.cfg.val_samples
        items = [self.val_dataset[i] for i in range(n)]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + 12345)
            z0, cond = self._latents(batch)
            t = torch.randint(0, self.cfg.timesteps, (n,), device=self.device)
            noise = torch.randn_like(z0)
        return float(self._loss(self.ema.ema_model, z0, cond, t, noise, 0.0))

    # ----------------------------------------------------------------------------------------- outputs
    def save_state(self) -> None:
        cfg = self.cfg
        state = {
            "step": self.step,
            "config": cfg.as_json(),
            "net_config": self.net.config.to_dict(),
            "net": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        _atomic_save(state, _state_path(cfg))

    def export(self, losses: list[float], duration: float) -> Path:
        """EMA weights + card (+ vae/) in our format; merges with a card already in ``out_dir``."""
        from models.diffinfinite.loading import make_card

        cfg, out = self.cfg, self.out
        net = self.ema.ema_model
        card_path = out / CARD_FILENAME
        card = ModelCard.load(out) if card_path.is_file() else None
        if card is not None and not is_model_of(card, "diffinfinite"):
            raise ValueError(f"{out} holds a {card.engine} model card")
        if card is None:
            card = make_card(
                cfg.name or out.name,
                image_config=net.config if cfg.kind == "image" else None,
                num_labels=cfg.num_classes,
                class_names=cfg.class_names,
                training_data="",
                native_mpp=cfg.native_mpp,
            )
        elif cfg.name:
            card.name = cfg.name
        card.trained = True
        if cfg.class_names:
            card.classes = {int(k): v for k, v in cfg.class_names.items()}
        card.config["num_labels"] = cfg.num_classes
        card.config["mask_divisors"] = list(self.codec.mask_divisors)
        card.config["mask_downsample"] = cfg.mask_downsample
        if cfg.kind == "image":
            card.latent_scale = cfg.latent_scale
            card.config["image_unet"] = net.config.to_dict()
            weights = out / IMAGE_WEIGHTS
        else:
            card.config["mask_unet"] = net.config.to_dict()
            if "subtype" not in card.conditioning:
                card.conditioning = [*card.conditioning, "subtype"]
            weights = out / MASK_WEIGHTS
        card.files[weights.name] = save_network(net, weights)
        if not (out / "vae").exists():
            install_vae(cfg.vae, out / "vae", link=cfg.link_vae)
        for f in sorted((out / "vae").iterdir()):
            if f.is_file():
                card.files[f"vae/{f.name}"] = sha256_file(f)
        data_desc = f"{cfg.kind} model: {self.dataset.describe()} (tiles: {cfg.tiles}, slides: {cfg.slides})"
        tail = losses[-100:]
        card.training[f"{cfg.kind}_unet"] = {
            "data": data_desc,
            "command": cfg.command,
            "device": str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""),
            "precision": "bf16 autocast" if self.use_bf16 else "fp32",
            "steps_done": self.step,
            "steps_total": cfg.steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "p_unc": cfg.p_unc,
            **({"relabel": {str(a): b for a, b in cfg.relabel}} if cfg.relabel else {}),
            "ema": {"beta": cfg.ema_beta, "every": cfg.ema_every, "after": cfg.ema_after},
            "duration_s_this_run": round(duration, 1),
            "final_loss_mean_last_100": (sum(tail) / len(tail)) if tail else None,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        card.training_data = "; ".join(
            v["data"] for _, v in sorted(card.training.items()) if isinstance(v, dict) and "data" in v
        )
        card.save(out)
        return weights

    # ----------------------------------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.setup()
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = _log_path(cfg)
        if self.step == 0:
            with open(log_path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "loss", "lr", "ema_decay", "val_loss", "elapsed_s"])
        else:  # drop log lines past the resumed step (a crash after the last save)
            rows = list(csv.reader(open(log_path))) if log_path.is_file() else [["step", "loss", "lr", "ema_decay", "val_loss", "elapsed_s"]]
            rows = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= self.step]
            with open(log_path, "w", newline="") as f:
                csv.writer(f).writerows(rows)
        stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, self.step + int(cfg.stop_after))
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=IndexRange(self.step * cfg.batch_size, stop * cfg.batch_size),
            num_workers=cfg.workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),  # keep the global RNG untouched (resume)
        )
        losses: list[float] = []
        val_losses: list[tuple[int, float]] = []
        t0 = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc=f"train diffinfinite-{cfg.kind}")
        with open(log_path, "a", newline="") as logf:
            writer = csv.writer(logf)
            for batch in loader:
                loss = self.train_step(batch)
                self.step += 1
                losses.append(loss)
                val = ""
                if self.val_dataset is not None and cfg.val_every and self.step % cfg.val_every == 0:
                    v = self.validate()
                    val_losses.append((self.step, v))
                    val = f"{v:.6g}"
                writer.writerow([self.step, f"{loss:.6g}", f"{self.sched.get_last_lr()[0]:.6g}",
                                 f"{self.ema.current_decay():.6g}", val, f"{time.perf_counter() - t0:.1f}"])
                logf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < stop:
                    self.save_state()
                    self.export(losses, time.perf_counter() - t0)
        bar.close()
        self.save_state()
        weights = self.export(losses, time.perf_counter() - t0)
        return TrainResult(self.out, self.step, losses, weights, val_losses)


def train_diffinfinite(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train (or resume) the image (``cfg.kind="image"``) or mask (``"mask"``) denoiser."""
    return _Trainer(cfg, progress).run()
