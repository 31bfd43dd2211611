"""Encoder cards: what an image-tile encoder is (id, dimension, input size, µm/px, recipe, weight hashes).

Cards are read without building a network, so the API lists encoders in a process that imports no torch. Two
sources:

* ``<models_dir>/encoders/<id>/encoder_card.json`` — encoders the project trains (``slidesynth-tile-v1``); the
  card names its weight file and pins the sha256 of every file the loader reads;
* ``<models_dir>/quiltnet-b-32/`` — QuiltNet as published, an OpenCLIP ``local-dir`` folder (the folder the
  ∞-Brush text tower reads). It carries no card of ours, so one is made from its ``open_clip_config.json``;
  an ``encoder_card.json`` placed beside it pins its weights' sha256 (and may name a native µm/px), which the
  loader then checks.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CARD_FILENAME = "encoder_card.json"
OPENCLIP_CONFIG = "open_clip_config.json"
# OpenAI CLIP's normalisation: OpenCLIP's default when a config has no preprocess_cfg
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

EncoderKind = Literal["tile-cnn", "openclip-vit"]


class EncoderCard(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    id: str = Field(description="Encoder id used in requests (`encoder` field).")
    kind: EncoderKind = Field(description="Which network reads the weights (models.encoders.registry.KINDS).")
    dim: int = Field(gt=0, description="Length of an embedding.")
    input_size: int = Field(gt=0, description="Side in px of the square the network sees; tiles are resized to it.")
    mpp: float | None = Field(None, description="µm per pixel of the tiles the encoder was trained on at "
                                                "input_size; None where its training data mixed magnifications.")
    description: str = ""
    resize: Literal["area", "bicubic"] = Field(
        "area", description="Resampling of tiles to input_size (shortest side, then a centred crop).")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    weights: str = Field("encoder.safetensors", description="Weight file in the folder.")
    files: dict[str, str] = Field(default_factory=dict, description="File name → sha256, checked on load.")
    config: dict[str, Any] = Field(default_factory=dict, description="Network configuration of the kind.")
    training: dict[str, Any] = Field(default_factory=dict, description="Objective, data, exact command, time.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Held-out figures.")
    prototypes: str | None = Field(None, description="File of class prototypes (mean embedding per class).")

    def min_tile_side(self) -> int:
        """The rule for tile sizes: each side at least ``input_size`` px — a smaller tile would be magnified,
        and an embedding of invented detail at the wrong scale is not one of the tissue."""
        return self.input_size

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CARD_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.model_dump(mode="json", exclude_none=False), indent=2, ensure_ascii=False)
                        + "\n")
        return path


def read_card(folder: str | Path) -> EncoderCard:
    """The card of a project encoder folder (``encoder_card.json``)."""
    path = Path(folder) / CARD_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"encoder folder {folder} has no {CARD_FILENAME}")
    return EncoderCard.model_validate(json.loads(path.read_text()))


def openclip_card(folder: str | Path, encoder_id: str) -> EncoderCard:
    """A card for an OpenCLIP ``local-dir`` folder, from its ``open_clip_config.json`` (+ an optional
    ``encoder_card.json`` beside it whose ``files``/``mpp``/``description`` override)."""
    folder = Path(folder)
    cfg_path = folder / OPENCLIP_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no {OPENCLIP_CONFIG} (an OpenCLIP local-dir folder is expected)")
    cfg = json.loads(cfg_path.read_text())
    model_cfg = cfg.get("model_cfg")
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
        raise ValueError(f"{cfg_path} has no model_cfg.vision_cfg section (no image tower)")
    vision = model_cfg["vision_cfg"]
    pre = cfg.get("preprocess_cfg") or {}
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ValueError(f"{cfg_path}: non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    card = EncoderCard(
        id=encoder_id, kind="openclip-vit", dim=int(model_cfg.get("embed_dim", 512)), input_size=int(image_size),
        mpp=None, resize="bicubic", mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)),
        weights="", config={"model_cfg": model_cfg},
        description="QuiltNet ViT-B/32 image tower (Ikezogwo et al. 2023: OpenCLIP ViT-B/32 fine-tuned on "
                    "Quilt-1M, histopathology image–text pairs at mixed magnifications), read from a local "
                    "OpenCLIP folder with the project's own ViT code.",
        training={"recipe": "published weights (not trained by this project)", "source": "OpenCLIP local-dir"},
    )
    pinned = folder / CARD_FILENAME
    if pinned.is_file():
        extra = json.loads(pinned.read_text())
        update = {k: extra[k] for k in ("files", "mpp", "description", "weights") if k in extra}
        card = card.model_copy(update=update)
    return card
