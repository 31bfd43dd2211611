"""Does an embedding-conditioned slide look like what it was conditioned on, seen by the condition's encoder?

:class:`EmbeddingCosineScorer` streams a slide's bands, cuts it into windows that show the encoder what it was
trained on (its input size at its µm/px; the input size itself when the encoder states no scale), embeds them
with the same encoder the condition came from and averages the cosine between each window's embedding and the
condition of the place it lies in (the one vector of an ``embedding`` job; the cell under the window's centre
of an ``embedding_grid`` job). Every encoder here returns unit vectors, so the cosine is a dot product.
The number means little alone — compare it with unconditioned samples (``bench.fidelity`` prints both).
"""
from __future__ import annotations

from typing import Any

import numpy as np


class EmbeddingCosineScorer:
    """Feed full-width uint8 RGB bands top to bottom (:meth:`add_band`), then read :meth:`result`.

    ``vectors``: (rows·cols, dim) conditions laid over the slide row-major (rows = cols = 1 for one vector);
    ``encoder``: a :class:`models.encoders.base.TileEncoder`; ``mpp``: the slide's µm/px."""

    def __init__(self, height: int, width: int, mpp: float, encoder: Any, vectors: np.ndarray, rows: int = 1,
                 cols: int = 1):
        self.encoder = encoder
        vectors = np.asarray(vectors, np.float32).reshape(rows * cols, -1)
        if vectors.shape[1] != encoder.dim:
            raise ValueError(f"conditions of dimension {vectors.shape[1]} cannot be compared with encoder "
                             f"{encoder.id!r}'s {encoder.dim}-d embeddings")
        self.vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        self.rows, self.cols = int(rows), int(cols)
        self.height, self.width = int(height), int(width)
        scale = 1.0 if encoder.mpp is None else float(encoder.mpp) / float(mpp)
        self.window = max(1, int(round(encoder.input_size * scale)))
        if self.window > min(self.height, self.width):
            raise ValueError(f"a {self.height}×{self.width} slide holds no {self.window}-px window of encoder "
                             f"{encoder.id!r}")
        self.n_cols = self.width // self.window
        self._buf = np.empty((0, self.width, 3), np.uint8)
        self._top = 0  # slide row of self._buf[0]
        self._sum, self._count = 0.0, 0

    def add_band(self, band: np.ndarray) -> None:
        band = np.asarray(band, dtype=np.uint8)
        if band.ndim != 3 or band.shape[1:] != (self.width, 3):
            raise ValueError(f"bands must be (rows, {self.width}, 3) RGB, got {band.shape}")
        self._buf = np.concatenate([self._buf, band]) if len(self._buf) else band
        w = self.window
        while len(self._buf) >= w:
            strip = self._buf[:w, :self.n_cols * w]
            tiles = np.ascontiguousarray(strip.reshape(w, self.n_cols, w, 3).transpose(1, 0, 2, 3))
            emb = np.asarray(self.encoder.embed(tiles), np.float32)
            cy = self._top + w / 2
            cx = (np.arange(self.n_cols) + 0.5) * w
            r = min(int(cy * self.rows / self.height), self.rows - 1)
            c = np.minimum((cx * self.cols / self.width).astype(int), self.cols - 1)
            cond = self.vectors[r * self.cols + c]
            self._sum += float((emb * cond).sum())
            self._count += len(emb)
            self._buf = self._buf[w:]
            self._top += w

    def result(self) -> float:
        if self._count == 0:
            raise ValueError("no window was embedded")
        return self._sum / self._count
