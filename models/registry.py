"""Which models exist and how to load them.

A model is either a folder under ``SLIDESYNTH_MODELS_DIR`` holding ``model_card.json`` (the card's
``engine`` says which loader reads the rest), or one of the built-in *untrained* defaults: the engines'
architectures at a small configuration with seeded random weights, which exist so the whole service
runs before any weights are installed. Their cards say ``trained: false``.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from models.cards import CARD_FILENAME, ModelCard

UNTRAINED_SEED = 0


def _untrained_diffinfinite(device):
    from models.diffinfinite.loading import untrained_diffinfinite

    return untrained_diffinfinite(seed=UNTRAINED_SEED, device=device)


def _untrained_infbrush(device):
    from models.infbrush import untrained_infbrush

    return untrained_infbrush(seed=UNTRAINED_SEED, device=device)


BUILTIN: dict[str, Callable[[Any], Any]] = {
    "diffinfinite-untrained": _untrained_diffinfinite,
    "infinity-brush-untrained": _untrained_infbrush,
}


def _load_folder(card: ModelCard, folder: Path, device):
    if card.engine == "diffinfinite":
        from models.diffinfinite.loading import load_diffinfinite

        return load_diffinfinite(folder, device=device)
    from models.infbrush import load_infbrush

    return load_infbrush(folder, device=device)


class ModelRegistry:
    """Cards for every available model; weights loaded lazily, once per process."""

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self._cards: dict[str, ModelCard] | None = None
        self._folders: dict[str, Path] = {}
        self._loaded: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def _scan(self) -> dict[str, ModelCard]:
        cards: dict[str, ModelCard] = {}
        for name, build in BUILTIN.items():
            try:
                cards[name] = build("cpu").card
            except ImportError:  # an engine not installed in this deployment
                continue
        if self.models_dir.is_dir():
            for card_path in sorted(self.models_dir.glob(f"*/{CARD_FILENAME}")):
                card = ModelCard.load(card_path.parent)
                cards[card.name] = card
                self._folders[card.name] = card_path.parent
        return cards

    def cards(self) -> dict[str, ModelCard]:
        with self._lock:
            if self._cards is None:
                self._cards = self._scan()
            return dict(self._cards)

    def card(self, name: str) -> ModelCard:
        cards = self.cards()
        if name not in cards:
            raise KeyError(name)
        return cards[name]

    def load(self, name: str, device) -> Any:
        """The engine's loaded models (e.g. ``DiffInfiniteModels``), cached per (name, device)."""
        self.card(name)
        key = (name, str(device))
        with self._lock:
            if key not in self._loaded:
                if name in self._folders:
                    self._loaded[key] = _load_folder(self._cards[name], self._folders[name], device)
                else:
                    self._loaded[key] = BUILTIN[name](device)
            return self._loaded[key]
