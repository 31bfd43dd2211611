"""The latent autoencoder shared by DiffInfinite's image and mask models, with the official conventions.

VAE: the Stable Diffusion 2 base KL autoencoder (``stabilityai/stable-diffusion-2-base``, subfolder ``vae``:
4 latent channels, ×8 downsampling), loaded with :class:`diffusers.AutoencoderKL` from a local folder
(``config.json`` + ``diffusion_pytorch_model.safetensors``). There is no hub access at run time.

Conventions (reference diffinfinite.md §2 and checkpoints/vae_conventions.json):

* images enter the VAE in [0, 1] (never mapped to [−1, 1]); latents are a posterior *sample* divided by 50
  (not × 0.18215); decoding is ``clip(vae.decode(50·z), 0, 1)``;
* label maps l ∈ {0..K−1} are encoded as ``v = 2l/(K−1) − 1`` repeated to 3 channels, a posterior sample is
  divided per channel by fixed divisors (K = 5: [40, 36, 48, 32]; K = 10: [46, 36, 55, 36]);
* mask decoding inverts the divisors and maps ``y → (y + 1)/2`` before clipping (the official large-canvas
  path skips both: reference §14 #1); quantisation is ``round((K−1)·x)``, mean over channels, round.

The image/mask resolutions are the caller's business (the mask model works at 1/4 of the image resolution:
512-px tiles ↔ 128-px masks ↔ 16×16 latents).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

# Per-channel divisors of the mask latents ("max_norm" mode, mean 0), by mask-model size and label count.
OFFICIAL_MASK_DIVISORS: dict[tuple[str, int], tuple[float, float, float, float]] = {
    ("small", 5): (40.0, 36.0, 48.0, 32.0),
    ("small", 10): (46.0, 36.0, 55.0, 36.0),
    ("large", 5): (24.0, 25.0, 30.0, 21.0),
    ("large", 10): (21.0, 25.0, 24.0, 27.0),
}

VAE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def official_mask_divisors(num_classes: int, size: str = "small") -> tuple[float, float, float, float]:
    """The released divisors for K = 5 or 10 labels; ``size="small"`` is the model the release samples with."""
    key = (size, int(num_classes))
    if key not in OFFICIAL_MASK_DIVISORS:
        raise ValueError(
            f"no official mask-latent divisors for {num_classes} labels ({size} model); "
            "the release defines K = 5 and K = 10 — pass mask_divisors explicitly"
        )
    return OFFICIAL_MASK_DIVISORS[key]


def tiny_vae_config() -> dict[str, Any]:
    """A small AutoencoderKL with the SD2 interface (3 ↔ 4 channels, ×8): for tests and the untrained default."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 16, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "act_fn": "silu",
        "sample_size": 64,
    }


def sd2_vae_config() -> dict[str, Any]:
    """The SD 2 base VAE architecture (reference vae_conventions.json), for building an empty model."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 512,
    }


def resolve_vae_folder(folder: str | Path) -> Path:
    """The folder holding the AutoencoderKL ``config.json`` (a pipeline folder's ``vae/`` is accepted).

    Raises FileNotFoundError naming the folder when it or its config is missing, ValueError when the config
    is not an AutoencoderKL one.
    """
    path = Path(folder).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"VAE folder {path} does not exist (expected a diffusers AutoencoderKL folder)")
    if not path.is_dir():
        raise NotADirectoryError(f"VAE path {path} is not a folder (expected a diffusers AutoencoderKL folder)")
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a whole pipeline folder: use its vae component only
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"VAE folder {path} has no config.json (expected a diffusers AutoencoderKL folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"VAE config {cfg_path} is not valid JSON: {exc}") from exc
    cls_name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if cls_name != "AutoencoderKL":
        raise ValueError(
            f"{cfg_path} is not an AutoencoderKL config (_class_name = {cls_name!r}); "
            "point to the VAE folder of Stable Diffusion 2 base (its 'vae' subfolder)"
        )
    for key, want in (("in_channels", 3), ("out_channels", 3), ("latent_channels", 4)):
        if key in cfg and int(cfg[key]) != want:
            raise ValueError(f"{cfg_path}: {key} = {cfg[key]}, DiffInfinite needs {want}")
    if not any((path / name).is_file() for name in VAE_WEIGHT_FILES):
        raise FileNotFoundError(f"VAE folder {path} has no weights file (one of {', '.join(VAE_WEIGHT_FILES)})")
    return path


def load_vae(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a frozen :class:`diffusers.AutoencoderKL` from a local folder (no network access)."""
    from diffusers import AutoencoderKL

    path = resolve_vae_folder(folder)
    vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False)
    vae.to(device)
    vae.eval().requires_grad_(False)
    return vae


def build_vae(config: dict[str, Any], seed: int | None = None):
    """An AutoencoderKL from a config dict, with seeded initialisation when ``seed`` is given."""
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    if seed is None:
        vae = AutoencoderKL(**cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(**cfg)
    return vae.eval().requires_grad_(False)


class LatentCodec:
    """Image and label-mask ↔ latent conversions with DiffInfinite's conventions."""

    def __init__(
        self,
        vae,
        latent_scale: float = 50.0,
        mask_divisors: Sequence[float] = (40.0, 36.0, 48.0, 32.0),
        num_classes: int = 5,
    ):
        if latent_scale <= 0:
            raise ValueError(f"latent_scale must be positive, got {latent_scale}")
        latent_channels = int(vae.config.latent_channels)
        if len(mask_divisors) != latent_channels:
            raise ValueError(f"mask_divisors needs {latent_channels} values (one per latent channel), got {len(mask_divisors)}")
        if any(float(d) <= 0 for d in mask_divisors):
            raise ValueError(f"mask_divisors must be positive, got {list(mask_divisors)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 to encode label masks, got {num_classes}")
        self.vae = vae
        self.latent_scale = float(latent_scale)
        self.mask_divisors = tuple(float(d) for d in mask_divisors)
        self.num_classes = int(num_classes)
        self.latent_channels = latent_channels
        self.scale_factor: int = 2 ** (len(vae.config.block_out_channels) - 1)

    # ---------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _divisors(self, like: Tensor) -> Tensor:
        return torch.tensor(self.mask_divisors, device=like.device, dtype=torch.float32)[None, :, None, None]

    def _check_pixels(self, x: Tensor, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{what} must be [B, 3, H, W], got {tuple(x.shape)}")
        f = self.scale_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"{what} height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")

    def _check_latent(self, z: Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be [B, {self.latent_channels}, h, w], got {tuple(z.shape)}")

    @torch.no_grad()
    def _encode(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        posterior = self.vae.encode(x.to(device=self.device, dtype=self.dtype)).latent_dist
        return posterior.sample(generator=generator).float()

    @torch.no_grad()
    def _decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.to(device=self.device, dtype=self.dtype)).sample.float()

    # ---------------------------------------------------------------- images
    def encode_image(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, 3, H, W] in [0, 1] → posterior sample / latent_scale, [B, 4, H/8, W/8] float32."""
        self._check_pixels(img, "image")
        if not img.dtype.is_floating_point:
            raise TypeError(f"image must be a float tensor in [0, 1], got {img.dtype}")
        return self._encode(img, generator) / self.latent_scale

    def decode_image(self, z: Tensor) -> Tensor:
        """[B, 4, h, w] → clip(vae.decode(z · latent_scale), 0, 1), [B, 3, 8h, 8w] float32."""
        self._check_latent(z)
        return self._decode(z.float() * self.latent_scale).clamp_(0.0, 1.0)

    # ---------------------------------------------------------------- masks
    def mask_values(self, labels: Tensor) -> Tensor:
        """Label map [B, H, W] → VAE input v = 2l/(K−1) − 1 repeated to 3 channels, [B, 3, H, W]."""
        if labels.ndim == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 3:
            raise ValueError(f"labels must be [B, H, W], got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], found values in [{lo}, {hi}]")
        v = 2.0 * labels.float() / (self.num_classes - 1) - 1.0
        return v[:, None].expand(-1, 3, -1, -1)

    def encode_mask(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Label map [B, H, W] → posterior sample / per-channel divisors, [B, 4, H/8, W/8] float32."""
        v = self.mask_values(labels)
        self._check_pixels(v, "label mask")
        z = self._encode(v, generator)
        return z / self._divisors(z)

    def decode_mask_values(self, z: Tensor) -> Tensor:
        """[B, 4, h, w] → clip((vae.decode(z · divisors) + 1)/2, 0, 1), [B, 3, 8h, 8w] (blendable)."""
        self._check_latent(z)
        y = self._decode(z.float() * self._divisors(z))
        return ((y + 1.0) * 0.5).clamp_(0.0, 1.0)

    def quantize_mask(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] → labels [B, H, W] int64: round((K−1)x), mean over channels, round."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"mask values must be [B, 3, H, W], got {tuple(x.shape)}")
        k1 = self.num_classes - 1
        q = torch.round(x.float().clamp(0.0, 1.0) * k1)
        return torch.round(q.mean(dim=1)).long().clamp_(0, k1)

    def decode_mask(self, z: Tensor) -> Tensor:
        """Convenience: decode and quantise (no tiling) → labels [B, 8h, 8w]."""
        return self.quantize_mask(self.decode_mask_values(z))

    # ---------------------------------------------------------------- tiled decoding
    def tile_decoder(self, kind: Literal["image", "mask"] = "image", context: Literal["slide", "tile"] = "slide"):
        """What :class:`models.decoding.TiledDecoder` decodes this codec's image or mask latents with.

        ``context="slide"``: :class:`models.context_decoding.SlideContextDecoder` — the decoder's GroupNorms use
        statistics of the whole latent and its mid-block attention a hierarchy of keys spanning it, so the
        result does not depend on the tiling; ``"tile"``: every tile decoded on its own (the paper's code; a
        quilt of tile-wise statistics).
        """
        if kind not in ("image", "mask"):
            raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")
        if context == "tile":
            from models.decoding import FunctionTileDecoder

            fn = self.decode_image if kind == "image" else self.decode_mask_values
            return FunctionTileDecoder(fn, self.latent_channels)
        if context != "slide":
            raise ValueError(f"context must be 'slide' or 'tile', got {context!r}")
        from models.context_decoding import SlideContextDecoder

        if kind == "image":
            return SlideContextDecoder(self.vae, self.latent_scale, lambda y: y.clamp_(0.0, 1.0))
        return SlideContextDecoder(self.vae, self.mask_divisors, lambda y: ((y + 1.0) * 0.5).clamp_(0.0, 1.0))
