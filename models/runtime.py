"""Small contracts shared by every engine: progress callbacks, cooperative cancel, device choice."""
from __future__ import annotations

from typing import Callable, Protocol

import torch


class Canceled(Exception):
    """Raised by a sampler or decoder when its cancel check returns True."""


class ProgressFn(Protocol):
    def __call__(self, done: int, total: int) -> None:  # pragma: no cover - protocol
        ...


CancelFn = Callable[[], bool]


def no_progress(done: int, total: int) -> None:
    """Default progress callback: ignore."""


def never_cancel() -> bool:
    """Default cancel check: never."""
    return False


def check_cancel(cancel: CancelFn | None) -> None:
    """Raise :class:`Canceled` when ``cancel()`` says so (call between steps and tiles)."""
    if cancel is not None and cancel():
        raise Canceled("canceled")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
