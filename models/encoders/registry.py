"""Which image-tile encoders are installed, and loading one by id.

Torch-free apart from :func:`load_encoder` (which imports the network module of the encoder's kind when
called), so the API lists encoders from cards alone.

Folders, under the models dir the service passes in (``SLIDESYNTH_MODELS_DIR``; models/ reads no environment):

* ``encoders/<id>/`` with ``encoder_card.json`` — any number of project-trained encoders;
* ``quiltnet-b-32/`` — QuiltNet's OpenCLIP folder, served as ``quilt-vit-b-32`` when its config has an image
  tower (the same folder gives ∞-Brush's subtype prompts their text tower).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.encoders.cards import CARD_FILENAME, OPENCLIP_CONFIG, EncoderCard, openclip_card, read_card

if TYPE_CHECKING:  # pragma: no cover
    from models.encoders.base import TileEncoder

ENCODERS_DIRNAME = "encoders"
QUILT_ENCODER_ID = "quilt-vit-b-32"
QUILT_DIRNAME = "quiltnet-b-32"      # = models.infbrush.config.TEXT_ENCODER_DIRNAME (a test keeps them equal)
DEFAULT_ENCODER = "slidesynth-tile-v1"

# card kind → "module:class" of its TileEncoder (imported only when an encoder of that kind is loaded)
KINDS = {
    "tile-cnn": "models.encoders.tile_cnn:TileCNNEncoder",
    "openclip-vit": "models.encoders.quilt_vit:QuiltImageEncoder",
}


class EncoderNotInstalled(LookupError):
    """An encoder id with no folder; the message names the folder looked for and the installed ids."""

    def __init__(self, encoder_id: str, folder: Path, installed: list[str]):
        self.encoder_id, self.folder, self.installed = encoder_id, folder, installed
        have = ", ".join(installed) if installed else "none"
        super().__init__(f"encoder {encoder_id!r} is not installed (no {folder}); installed: {have}")


def encoder_folder(encoder_id: str, models_dir: str | Path) -> Path:
    """Where the encoder's files are (whether or not they exist)."""
    root = Path(models_dir)
    if encoder_id == QUILT_ENCODER_ID:
        return root / QUILT_DIRNAME
    if not encoder_id or "/" in encoder_id or encoder_id.startswith(".") or "\\" in encoder_id:
        raise EncoderNotInstalled(encoder_id, root / ENCODERS_DIRNAME / "<id>", list(installed_encoders(root)))
    return root / ENCODERS_DIRNAME / encoder_id


def installed_encoders(models_dir: str | Path) -> dict[str, EncoderCard]:
    """Cards of the encoders whose folders exist, by id (sorted). A folder whose card cannot be read is left
    out here; loading it by id raises the reason."""
    root = Path(models_dir)
    cards: dict[str, EncoderCard] = {}
    enc_root = root / ENCODERS_DIRNAME
    if enc_root.is_dir():
        for path in sorted(enc_root.glob(f"*/{CARD_FILENAME}")):
            try:
                card = read_card(path.parent)
            except (OSError, ValueError):
                continue
            if card.id == path.parent.name:
                cards[card.id] = card
    if (root / QUILT_DIRNAME / OPENCLIP_CONFIG).is_file():
        try:
            cards[QUILT_ENCODER_ID] = openclip_card(root / QUILT_DIRNAME, QUILT_ENCODER_ID)
        except (OSError, ValueError):
            pass
    return dict(sorted(cards.items()))


def encoder_card(encoder_id: str, models_dir: str | Path) -> EncoderCard:
    """The card of one encoder; :class:`EncoderNotInstalled` when its folder is missing."""
    folder = encoder_folder(encoder_id, models_dir)
    if not folder.is_dir():
        raise EncoderNotInstalled(encoder_id, folder, list(installed_encoders(models_dir)))
    if encoder_id == QUILT_ENCODER_ID:
        return openclip_card(folder, encoder_id)
    card = read_card(folder)
    if card.id != encoder_id:
        raise ValueError(f"{folder / CARD_FILENAME} is the card of {card.id!r}, not {encoder_id!r}")
    return card


def load_encoder(encoder_id: str, models_dir: str | Path, device: str = "cpu") -> "TileEncoder":
    """Build the encoder and load its weights: every file's sha256 must match the card where the card pins it,
    and the state dict must match the network exactly (no missing, extra or mis-shaped tensor)."""
    card = encoder_card(encoder_id, models_dir)
    module, _, cls = KINDS[card.kind].partition(":")
    return getattr(importlib.import_module(module), cls).from_folder(encoder_folder(encoder_id, models_dir), card,
                                                                     device)


def class_prototypes(encoder_id: str, models_dir: str | Path) -> dict[str, np.ndarray]:
    """Class name → unit-length mean embedding of that class's held-out procedural tiles (the card's
    ``prototypes`` file); ∞-Brush's subtype prompts without QuiltNet use them. Torch-free."""
    card = encoder_card(encoder_id, models_dir)
    if not card.prototypes:
        raise ValueError(f"encoder {encoder_id!r} ships no class prototypes")
    from models.hashing import sha256_file

    path = encoder_folder(encoder_id, models_dir) / card.prototypes
    want = card.files.get(card.prototypes)
    if want is not None and (got := sha256_file(path)) != want:
        raise ValueError(f"{path} has sha256 {got}, but its card says {want}")
    data = json.loads(path.read_text())
    out = {name: np.asarray(v, np.float32) for name, v in data["vectors"].items()}
    for name, v in out.items():
        if v.shape != (card.dim,):
            raise ValueError(f"{path}: prototype {name!r} has shape {v.shape}, the encoder's dim is {card.dim}")
    return out
