"""DiffInfinite model folders: load, save, and the seeded untrained default.

Folder layout (our format)::

    <name>/model_card.json            # models.cards.ModelCard, engine "diffinfinite"
    <name>/image_unet.safetensors     # ImageUNet weights (EMA), config in card.config["image_unet"]
    <name>/mask_unet.safetensors      # optional MaskUNet weights, config in card.config["mask_unet"]
    <name>/vae/                       # diffusers AutoencoderKL folder (config.json + safetensors)

``card.config`` also holds ``mask_divisors`` (per-channel mask-latent divisors), ``num_labels`` (K) and
``mask_downsample`` (image pixels per mask pixel: 4).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.cards import ModelCard
from models.diffinfinite.checkpoints import IMAGE_WEIGHTS, MASK_WEIGHTS, load_network, save_network
from models.diffinfinite.mask_unet import SUBTYPES, MaskUNet, MaskUNetConfig
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig
from models.engine import is_model_of
from models.hashing import sha256_file
from models.vae import LatentCodec, build_vae, load_vae, official_mask_divisors, tiny_vae_config

OFFICIAL_CLASS_NAMES: dict[int, dict[int, str]] = {
    5: {0: "Unknown", 1: "Carcinoma", 2: "Necrosis", 3: "Tumor stroma", 4: "Others"},
    10: {
        0: "Unknown",
        1: "Alveole",
        2: "Artery",
        3: "Artifacts",
        4: "Carcinoma",
        5: "Cartilage",
        6: "Connective tissue",
        7: "Necrosis",
        8: "Tumor stroma",
        9: "Others",
    },
}
OFFICIAL_TRAINING_DATA = (
    "DiffInfinite release (Aversa et al., NeurIPS 2023): 41 H&E lung WSIs (adenocarcinoma / squamous cell "
    "carcinoma), Aperio 40x, patches at 0.5 um/px; image model 4,781 labelled + 255,643 unlabelled 512-px patches "
    "(p_unc 0.5); mask model 512-px masks resized to 128 px"
)
MASK_DOWNSAMPLE = 4  # image pixels per mask pixel (512-px tiles <-> 128-px masks)


@dataclass
class DiffInfiniteModels:
    image_unet: ImageUNet
    mask_unet: MaskUNet | None
    codec: LatentCodec
    card: ModelCard


def default_class_names(num_classes: int) -> dict[int, str]:
    if num_classes in OFFICIAL_CLASS_NAMES:
        return dict(OFFICIAL_CLASS_NAMES[num_classes])
    return {0: "Unknown", **{i: f"class {i}" for i in range(1, num_classes)}}


def default_mask_divisors(num_classes: int) -> list[float]:
    """Official divisors for K = 5 / 10; other K fall back to the K = 5 values."""
    return list(official_mask_divisors(num_classes if num_classes in (5, 10) else 5))


def make_card(
    name: str,
    *,
    image_config: ImageUNetConfig | None,
    mask_config: MaskUNetConfig | None = None,
    num_labels: int | None = None,
    trained: bool = True,
    class_names: dict[int, str] | None = None,
    description: str = "",
    training_data: str = OFFICIAL_TRAINING_DATA,
    native_mpp: float = 0.5,
) -> ModelCard:
    """A DiffInfinite model card with classes, subtypes, µm/px, latent scale and the network configs."""
    k = image_config.num_classes if image_config is not None else int(num_labels or 5)
    classes = {int(i): str(n) for i, n in (class_names or default_class_names(k)).items()}
    bad = [i for i in classes if not 0 <= i < k]
    if bad:
        raise ValueError(f"class ids {bad} are outside the model's {k} classes (0..{k - 1})")
    config: dict[str, Any] = {
        "num_labels": k,
        "mask_divisors": default_mask_divisors(k),
        "mask_downsample": MASK_DOWNSAMPLE,
    }
    if image_config is not None:
        config["image_unet"] = image_config.to_dict()
    if mask_config is not None:
        config["mask_unet"] = mask_config.to_dict()
    return ModelCard(
        name=name,
        engine="diffinfinite",
        trained=trained,
        description=description
        or "DiffInfinite (Aversa et al. 2023): mask-then-image latent diffusion with random-patch sampling.",
        classes=classes,
        subtypes=dict(SUBTYPES),
        native_mpp=native_mpp,
        latent_scale=50.0,
        vae_scale_factor=8,
        conditioning=["mask", "subtype"] if mask_config is not None else ["mask"],
        training_data=training_data,
        config=config,
    )


def load_diffinfinite(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DiffInfiniteModels:
    """Load a model folder in our format (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DiffInfinite model folder {folder} does not exist")
    card = ModelCard.load(folder)
    if not is_model_of(card, "diffinfinite"):
        raise ValueError(f"{folder}: model card engine is {card.engine!r}, not 'diffinfinite'")
    image_path = folder / IMAGE_WEIGHTS
    if not image_path.is_file():
        raise FileNotFoundError(f"DiffInfinite model folder {folder} has no {IMAGE_WEIGHTS}")
    image = load_network(image_path, card.config.get("image_unet"), kind="image", device=device, dtype=dtype)
    mask = None
    mask_path = folder / MASK_WEIGHTS
    if mask_path.is_file():
        mask = load_network(mask_path, card.config.get("mask_unet"), kind="mask", device=device, dtype=dtype)
    k = image.config.num_classes
    bad = [i for i in card.classes if not 0 <= int(i) < k]
    if bad:
        raise ValueError(f"{folder}: card lists class ids {bad} but the image model has {k} classes")
    vae = load_vae(folder / "vae", device=device, dtype=dtype)
    divisors = card.config.get("mask_divisors") or default_mask_divisors(k)
    codec = LatentCodec(vae, latent_scale=card.latent_scale, mask_divisors=divisors, num_classes=k)
    return DiffInfiniteModels(image_unet=image, mask_unet=mask, codec=codec, card=card)


def untrained_diffinfinite(seed: int = 0, device: str | torch.device = "cpu") -> DiffInfiniteModels:
    """Seeded random small networks (bit-identical for a seed): the default until trained weights exist."""
    image_cfg, mask_cfg = ImageUNetConfig.tiny(5), MaskUNetConfig.tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image = ImageUNet(image_cfg)
        mask = MaskUNet(mask_cfg)
    vae = build_vae(tiny_vae_config(), seed=seed + 1)
    image = image.to(device).eval().requires_grad_(False)
    mask = mask.to(device).eval().requires_grad_(False)
    vae = vae.to(device)
    card = make_card(
        "diffinfinite-untrained",
        image_config=image_cfg,
        mask_config=mask_cfg,
        trained=False,
        description=(
            "Untrained DiffInfinite (small networks, seeded random weights): exercises the whole pipeline; "
            "outputs are not tissue. Install trained weights with `slidesynth convert diffinfinite-official` "
            "or `slidesynth train diffinfinite`."
        ),
        training_data="none (random weights)",
    )
    card.config["seed"] = seed
    card.config["vae"] = tiny_vae_config()
    # Random weights gain nothing from the paper's 250 steps; keep the untrained default quick on a CPU.
    card.default_steps = 20
    codec = LatentCodec(vae, latent_scale=card.latent_scale, mask_divisors=card.config["mask_divisors"], num_classes=5)
    return DiffInfiniteModels(image_unet=image, mask_unet=mask, codec=codec, card=card)


def save_diffinfinite(models: DiffInfiniteModels, folder: str | Path) -> None:
    """Write our format: safetensors + ``vae/`` + card (configs and sha256 of every file in ``card.files``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card = models.card.model_copy(deep=True)
    card.files = {}
    card.config["image_unet"] = models.image_unet.config.to_dict()
    card.config["num_labels"] = models.codec.num_classes
    card.config["mask_divisors"] = list(models.codec.mask_divisors)
    card.latent_scale = models.codec.latent_scale
    card.files[IMAGE_WEIGHTS] = save_network(models.image_unet, folder / IMAGE_WEIGHTS)
    if models.mask_unet is not None:
        card.config["mask_unet"] = models.mask_unet.config.to_dict()
        card.files[MASK_WEIGHTS] = save_network(models.mask_unet, folder / MASK_WEIGHTS)
        if "subtype" not in card.conditioning:
            card.conditioning = [*card.conditioning, "subtype"]
    else:
        card.config.pop("mask_unet", None)
        (folder / MASK_WEIGHTS).unlink(missing_ok=True)
    vae_dir = folder / "vae"
    if vae_dir.is_symlink():  # never write through a link into a shared VAE folder
        vae_dir.unlink()
    models.codec.vae.save_pretrained(str(vae_dir), safe_serialization=True)
    for f in sorted(vae_dir.iterdir()):
        if f.is_file():
            card.files[f"vae/{f.name}"] = sha256_file(f)
    card.config.pop("vae", None)
    card.save(folder)
