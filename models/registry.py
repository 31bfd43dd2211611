"""Which models exist and how to load them.

A model is either a folder under ``SLIDESYNTH_MODELS_DIR`` holding ``model_card.json`` (the card's
``engine`` says which loader reads the rest), or one of the built-in *untrained* defaults: the engines'
architectures at a small configuration with seeded random weights, which exist so the whole service
runs before any weights are installed. Their cards say ``trained: false``.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from models.cards import CARD_FILENAME, ModelCard
from models.engine import engines, get_engine


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
        for engine in engines().values():  # cards read from files: no network is built
            if engine.untrained_name is not None:
                cards[engine.untrained_name] = engine.untrained_card()
        if self.models_dir.is_dir():
            for card_path in sorted(self.models_dir.glob(f"*/{CARD_FILENAME}")):
                card = ModelCard.load(card_path.parent)
                if card.engine not in engines():  # a model of an engine this deployment lacks
                    continue
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
        card = self.card(name)
        key = (name, str(device))
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = get_engine(card.engine).load(self._folders.get(name), device)
            return self._loaded[key]
