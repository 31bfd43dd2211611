"""The tile-encoder interface and what every encoder shares: file checks, strict loading, batched embedding.

An encoder maps RGB tiles to unit-length float32 vectors. Every kind loads the same way — the files its card
pins are hashed and compared before any byte is deserialised, then the state dict must match the network
exactly — so a truncated download, a file swapped for another model's, or a renamed layer fails on load with
the file named, rather than producing plausible but wrong embeddings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.encoders.cards import EncoderCard
from models.encoders.preprocess import prepare_tiles
from models.hashing import sha256_file
from models.state_dicts import compare_state_dicts, mismatch_message


def verify_files(folder: Path, card: EncoderCard, names: Sequence[str], *, require_pins: bool) -> dict[str, str]:
    """sha256 of each named file, checked against the card's ``files``; returns the digests.

    ``require_pins``: a card of ours must pin every file it loads (an unpinned file is refused, naming it);
    a published folder without a pinning card is hashed and reported but cannot be checked."""
    digests = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"encoder {card.id!r}: weight file {path} is missing")
        want = card.files.get(name)
        if want is None and require_pins:
            raise ValueError(f"encoder {card.id!r}: {folder / 'encoder_card.json'} pins no sha256 for {name}")
        got = sha256_file(path)
        if want is not None and got != want:
            raise ValueError(f"encoder {card.id!r}: {path} has sha256 {got}, but its card says {want} "
                             f"(corrupted or replaced weight file)")
        digests[name] = got
    return digests


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch checkpoint (``state_dict`` wrapper and ``module.`` prefixes of
    training checkpoints removed); an unreadable file raises naming it."""
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except Exception as exc:  # safetensors and torch raise several types for damaged files
        raise ValueError(f"cannot read weight file {path}: {exc.__class__.__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"weight file {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped tensor raises naming ``source``."""
    mismatch = compare_state_dicts(module.state_dict(), state)
    if mismatch:
        raise ValueError(mismatch_message(f"weight file {source}", "the encoder's network", mismatch))
    module.load_state_dict(state, strict=True)


class TileEncoder:
    """RGB tiles → L2-normalised embeddings. Subclasses build ``net`` (float (B, 3, S, S) normalised by the
    card's mean/std → (B, dim)) and implement ``from_folder(folder, card, device)``."""

    def __init__(self, card: EncoderCard, net: nn.Module, device: str | torch.device = "cpu",
                 digests: dict[str, str] | None = None):
        self.card = card
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.digests = dict(digests or {})     # sha256 of the files loaded (pinned or, for published folders, seen)
        self._mean = torch.tensor(card.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(card.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @property
    def id(self) -> str:
        return self.card.id

    @property
    def dim(self) -> int:
        return self.card.dim

    @property
    def input_size(self) -> int:
        return self.card.input_size

    @property
    def mpp(self) -> float | None:
        return self.card.mpp

    @classmethod
    def from_folder(cls, folder: Path, card: EncoderCard, device: str | torch.device = "cpu") -> "TileEncoder":
        raise NotImplementedError

    def normalise(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) on any device → the network's float input (B, 3, S, S)."""
        x = tiles.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def embed(self, tiles: np.ndarray | Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """uint8 (N, H, W, 3) tiles (or a sequence of tiles of any sizes, each side ≥ ``input_size``) →
        float32 (N, dim), unit length. Tiles are resized as :mod:`models.encoders.preprocess` states."""
        x = prepare_tiles(tiles, self.input_size, self.card.resize)
        out = np.empty((len(x), self.dim), np.float32)
        for i in range(0, len(x), batch_size):
            e = self.net(self.normalise(torch.from_numpy(np.array(x[i:i + batch_size])))).float()  # a writable copy
            if e.shape[1] != self.dim:
                raise ValueError(f"encoder {self.id!r} produced {e.shape[1]} numbers per tile, its card says {self.dim}")
            out[i:i + batch_size] = F.normalize(e, dim=-1).cpu().numpy()
        return out
