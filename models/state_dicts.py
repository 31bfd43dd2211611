"""Does a weight file fit a network? One comparison and one message for every loader in ``models/``.

:func:`compare_state_dicts` lists the keys the network expects but the file lacks (missing), the keys the file
holds but the network does not (unexpected) and the keys whose tensors differ in shape; :meth:`KeyMismatch.describe`
words them the same way for the DiffInfinite checkpoints, the ∞-Brush denoiser, the tile encoders and the DDE
coordinator. Each loader raises its own exception type with that text, so a user sees every offending key at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["KeyMismatch", "compare_state_dicts", "mismatch_message"]

SHOWN = 200   # keys listed per kind before "… (+N more)": every key of any network we load


@dataclass(frozen=True)
class KeyMismatch:
    """Sorted key lists; ``mismatched`` entries read ``"key: file (shape) vs network (shape)"``."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = SHOWN) -> str:
        """``"missing keys (2): a, b; unexpected keys (1): c; shape mismatches (1): d: file (3,) vs network (4,)"``
        (only the kinds present; at most ``limit`` keys each)."""
        parts = []
        for label, keys in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                            ("shape mismatches", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:limit]) + (f", … (+{len(keys) - limit} more)" if len(keys) > limit else "")
                parts.append(f"{label} ({len(keys)}): {shown}")
        return "; ".join(parts)


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def compare_state_dicts(expected: Mapping[str, Any], got: Mapping[str, Any]) -> KeyMismatch:
    """``expected``: the network's state dict (tensors or anything with ``.shape``, meta tensors included);
    ``got``: the file's."""
    common = set(expected) & set(got)
    return KeyMismatch(
        missing=sorted(set(expected) - set(got)),
        unexpected=sorted(set(got) - set(expected)),
        mismatched=sorted(f"{k}: file {_shape(got[k])} vs network {_shape(expected[k])}"
                          for k in common if _shape(got[k]) != _shape(expected[k])))


def mismatch_message(source: str, what: str, mismatch: KeyMismatch) -> str:
    """``"<source> does not fit <what>: <describe()>"``."""
    return f"{source} does not fit {what}: {mismatch.describe()}"
