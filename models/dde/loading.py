"""A trained coordinator's folder: ``<model folder>/dde-coordinator/`` with ``coordinator.safetensors`` and
``coordinator_card.json``.

The card records the architecture (:class:`~models.dde.coordinator.CoordinatorConfig`), the window plan it was
trained for (patch, stride), the base model it was trained against (id, weight file and that file's sha256),
the training recipe and the sha256 of the coordinator weights. Loading is strict: a weights file that does not
fit the architecture raises :class:`CoordinatorLoadError` listing missing, unexpected and shape-mismatched keys,
and a coordinator trained against another base model raises :class:`BaseModelMismatch` naming both.

:func:`read_coordinator_card` reads JSON only (the API process lists coordinators without importing torch);
the rest imports torch when called.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.hashing import sha256_file
from models.state_dicts import compare_state_dicts, mismatch_message

__all__ = [
    "COORDINATOR_DIR", "COORDINATOR_WEIGHTS", "COORDINATOR_CARD", "CARD_FORMAT", "CoordinatorLoadError",
    "BaseModelMismatch", "read_coordinator_card", "coordinator_folder", "save_coordinator", "load_coordinator",
    "check_state_dict",
]

COORDINATOR_DIR = "dde-coordinator"
COORDINATOR_WEIGHTS = "coordinator.safetensors"
COORDINATOR_CARD = "coordinator_card.json"
CARD_FORMAT = "slidesynth-dde-coordinator/1"


class CoordinatorLoadError(ValueError):
    """A coordinator folder that cannot be loaded (missing file, bad card, weights that do not fit)."""


class BaseModelMismatch(CoordinatorLoadError):
    """A coordinator trained against another base model than the one it is loaded with."""


def coordinator_folder(folder: str | Path) -> Path:
    """The coordinator folder of a model folder (``<folder>/dde-coordinator``), or ``folder`` itself when it
    holds a coordinator card (a standalone coordinator, e.g. one trained on the Gaussian oracle)."""
    folder = Path(folder)
    if (folder / COORDINATOR_CARD).is_file():
        return folder
    return folder / COORDINATOR_DIR


def read_coordinator_card(folder: str | Path) -> dict[str, Any]:
    """The card of the coordinator in ``folder`` (a model folder or the coordinator folder); JSON only."""
    path = coordinator_folder(folder) / COORDINATOR_CARD
    if not path.is_file():
        raise CoordinatorLoadError(f"no coordinator card at {path}")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CoordinatorLoadError(f"{path}: invalid JSON ({exc})") from exc
    for key in ("format", "architecture", "patch", "stride", "base", "weights_sha256"):
        if key not in card:
            raise CoordinatorLoadError(f"{path}: card has no {key!r}")
    if card["format"] != CARD_FORMAT:
        raise CoordinatorLoadError(f"{path}: card format {card['format']!r}, expected {CARD_FORMAT!r}")
    return card


def save_coordinator(net, folder: str | Path, *, base: dict[str, Any], training: dict[str, Any],
                     evaluation: dict[str, Any] | None = None) -> Path:
    """Write ``net`` (float32 safetensors) and its card into ``folder`` (the coordinator folder itself);
    ``base`` = {"model": id, "file": weight file name or None, "sha256": hash of the base weights}."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / COORDINATOR_WEIGHTS
    state = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(weights), metadata={"format": CARD_FORMAT})
    cfg = net.config
    card = {
        "format": CARD_FORMAT,
        "architecture": cfg.to_dict(),
        "patch": cfg.patch,
        "stride": cfg.stride,
        "parameters": int(sum(v.numel() for v in state.values())),
        "base": dict(base),
        "training": dict(training),
        "evaluation": dict(evaluation or {}),
        "weights_file": COORDINATOR_WEIGHTS,
        "weights_bytes": weights.stat().st_size,
        "weights_sha256": sha256_file(weights),
    }
    path = folder / COORDINATOR_CARD
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def check_state_dict(model_state: dict, file_state: dict, where: str) -> None:
    """Raise :class:`CoordinatorLoadError` listing every missing, unexpected and shape-mismatched key."""
    mismatch = compare_state_dicts(model_state, file_state)
    if mismatch:
        raise CoordinatorLoadError(mismatch_message(where, "the coordinator architecture of its card", mismatch))


def load_coordinator(folder: str | Path, device="cpu", *, base_sha256: str | None = None,
                     base_folder: str | Path | None = None):
    """The trained :class:`~models.dde.coordinator.DDECoordinator` of a model folder, in eval mode.

    ``folder``: a model folder holding ``dde-coordinator/`` (the base weight file named on the card is hashed
    and must match the card) or a coordinator folder itself. ``base_folder``: the model folder whose base
    weight file (named on the card) a coordinator folder outside it is checked against (a candidate not yet
    shipped). ``base_sha256``: the hash of the base the caller will combine it with (overrides hashing the
    file; needed for bases without a file, e.g. the Gaussian oracle's configuration hash). Raises
    :class:`BaseModelMismatch` when the two differ.
    """
    import torch
    from safetensors.torch import load_file

    from .coordinator import CoordinatorConfig, DDECoordinator

    folder = Path(folder)
    cdir = coordinator_folder(folder)
    card = read_coordinator_card(cdir)
    base = card["base"]
    expected = base.get("sha256")
    actual = base_sha256
    actual_what = "the given base"
    home = Path(base_folder) if base_folder is not None else (folder if cdir != folder else None)
    if actual is None and home is not None:
        if not base.get("file"):
            raise BaseModelMismatch(f"coordinator {cdir} was trained against base {base.get('model')!r}, which has "
                                    f"no weight file to check against {home}")
        base_path = home / base["file"]
        if not base_path.is_file():
            raise CoordinatorLoadError(f"{home}: the coordinator's base weight file {base['file']} is missing")
        actual, actual_what = sha256_file(base_path), str(base_path)
    if actual is not None and actual != expected:
        raise BaseModelMismatch(
            f"coordinator {cdir} was trained against base model {base.get('model')!r} "
            f"({base.get('file')}, sha256 {expected}), but {actual_what} has sha256 {actual}")
    weights = cdir / card.get("weights_file", COORDINATOR_WEIGHTS)
    if not weights.is_file():
        raise CoordinatorLoadError(f"{cdir}: no {weights.name}")
    digest = sha256_file(weights)
    if digest != card["weights_sha256"]:
        raise CoordinatorLoadError(f"{weights}: sha256 {digest} differs from the card's {card['weights_sha256']}")
    try:
        cfg = CoordinatorConfig.from_dict(card["architecture"])
    except (TypeError, ValueError) as exc:
        raise CoordinatorLoadError(f"{cdir}: bad architecture on the card: {exc}") from exc
    if (cfg.patch, cfg.stride) != (card["patch"], card["stride"]):
        raise CoordinatorLoadError(f"{cdir}: card patch/stride {card['patch']}/{card['stride']} differ from the "
                                   f"architecture's {cfg.patch}/{cfg.stride}")
    net = DDECoordinator(cfg)
    state = load_file(str(weights))
    check_state_dict(net.state_dict(), state, str(weights))
    net.load_state_dict(state, strict=True)
    net.card = card
    return net.to(torch.device(device)).eval()
