"""Which models exist and how to load them.

A model is either a folder under ``SLIDESYNTH_MODELS_DIR`` holding ``model_card.json`` (the card's
``engine`` says which loader reads the rest), or one of the built-in *untrained* defaults: the engines'
architectures at a small configuration with seeded random weights, which exist so the whole service
runs before any weights are installed. Their cards say ``trained: false``.

A model folder may also hold trained DDE coordinators (``<folder>/dde-coordinator/``, :mod:`models.dde.loading`);
:meth:`ModelRegistry.coordinators` lists those whose card names this folder's base weights (JSON and a file hash
only: the API process builds no network).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from models.cards import CARD_FILENAME, ModelCard
from models.engine import engines, get_engine


def _coordinator_cards(folder: Path) -> list[dict[str, Any]]:
    """The coordinator card of ``folder`` if there is one whose base sha256 matches the folder's base file."""
    from models.dde.loading import COORDINATOR_DIR, CoordinatorLoadError, read_coordinator_card
    from models.hashing import sha256_file

    if not (folder / COORDINATOR_DIR).is_dir():
        return []
    try:
        card = read_coordinator_card(folder)
    except CoordinatorLoadError:
        return []
    base_file = card["base"].get("file")
    if not base_file or not (folder / base_file).is_file():
        return []
    if sha256_file(folder / base_file) != card["base"].get("sha256"):
        return []  # trained against other weights: loading would refuse it
    return [card]


class ModelRegistry:
    """Cards for every available model; weights loaded lazily, once per process."""

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self._cards: dict[str, ModelCard] | None = None
        self._folders: dict[str, Path] = {}
        self._loaded: dict[tuple[str, str], Any] = {}
        self._coordinators: dict[str, list[dict[str, Any]]] = {}
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
                self._coordinators[card.name] = _coordinator_cards(card_path.parent)
        return cards

    def coordinators(self, name: str) -> list[dict[str, Any]]:
        """Cards of the trained DDE coordinators of model ``name`` that fit its base weights (may be empty)."""
        self.card(name)
        return list(self._coordinators.get(name, []))

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
