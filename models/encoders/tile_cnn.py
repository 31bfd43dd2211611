"""``tile-cnn``: the project's small convolutional tile encoder (``slidesynth-tile-v1``).

Six 3×3 convolutions (BatchNorm, ReLU; four of them stride 2: 64² → 4²), mean- and max-pooled, then a two-layer
head to ``dim``. Small on purpose: it runs beside sampling on every ∞-Brush job (fidelity of generated windows)
and trains on a CPU in minutes; procedural tissue needs no more. Training lives in :mod:`training.tile_encoder`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from models.encoders.base import TileEncoder, load_strict, read_state, verify_files
from models.encoders.cards import EncoderCard

DEFAULT_WIDTHS = (24, 48, 48, 96, 96, 192)
DEFAULT_STRIDES = (2, 2, 1, 2, 1, 2)
DEFAULT_HIDDEN = 256


class TileCNN(nn.Module):
    """float (B, 3, S, S), normalised → (B, dim), not normalised (the encoder normalises)."""

    def __init__(self, dim: int = 128, widths: Sequence[int] = DEFAULT_WIDTHS,
                 strides: Sequence[int] = DEFAULT_STRIDES, hidden: int = DEFAULT_HIDDEN):
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError(f"widths {list(widths)} and strides {list(strides)} differ in length")
        layers: list[nn.Module] = []
        cin = 3
        for w, s in zip(widths, strides):
            layers += [nn.Conv2d(cin, int(w), 3, int(s), 1, bias=False), nn.BatchNorm2d(int(w)), nn.ReLU(inplace=True)]
            cin = int(w)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1))


def build_network(card: EncoderCard) -> TileCNN:
    cfg = card.config
    return TileCNN(card.dim, cfg.get("widths", DEFAULT_WIDTHS), cfg.get("strides", DEFAULT_STRIDES),
                   int(cfg.get("hidden", DEFAULT_HIDDEN)))


class TileCNNEncoder(TileEncoder):
    @classmethod
    def from_folder(cls, folder: Path, card: EncoderCard, device: str | torch.device = "cpu") -> "TileCNNEncoder":
        files = [card.weights] + ([card.prototypes] if card.prototypes else [])
        digests = verify_files(Path(folder), card, files, require_pins=True)
        net = build_network(card)
        load_strict(net, read_state(Path(folder) / card.weights), str(Path(folder) / card.weights))
        return cls(card, net, device, digests)
