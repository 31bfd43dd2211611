"""Cutting a slide that streams past in bands into a grid of square windows, one window row at a time."""
from __future__ import annotations

from typing import Iterator

import numpy as np


class WindowRows:
    """Feed full-width uint8 RGB bands top to bottom to :meth:`push`; it yields every window row the bands
    complete as ``(top, tiles)`` — the slide row it starts at and its ``(cols, window, window, 3)`` tiles (the
    ``width // window`` whole windows from the left edge). Keeps less than one window row of pixels."""

    def __init__(self, width: int, window: int):
        self.width, self.window = int(width), int(window)
        self.cols = self.width // self.window
        self._buf = np.empty((0, self.width, 3), np.uint8)
        self._top = 0  # slide row of self._buf[0]

    def push(self, band: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        band = np.asarray(band, dtype=np.uint8)
        if band.ndim != 3 or band.shape[1:] != (self.width, 3):
            raise ValueError(f"bands must be (rows, {self.width}, 3) RGB, got {band.shape}")
        self._buf = np.concatenate([self._buf, band]) if len(self._buf) else band
        w = self.window
        while len(self._buf) >= w:
            strip = self._buf[:w, :self.cols * w]
            yield self._top, np.ascontiguousarray(strip.reshape(w, self.cols, w, 3).transpose(1, 0, 2, 3))
            self._buf = self._buf[w:]
            self._top += w
