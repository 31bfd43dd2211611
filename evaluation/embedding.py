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

from evaluation.windows import WindowRows


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
        self._rows = WindowRows(self.width, self.window)
        self._sum, self._count = 0.0, 0

    def add_band(self, band: np.ndarray) -> None:
        w = self.window
        for top, tiles in self._rows.push(band):
            emb = np.asarray(self.encoder.embed(tiles), np.float32)
            r = min(int((top + w / 2) * self.rows / self.height), self.rows - 1)
            c = np.minimum(((np.arange(len(tiles)) + 0.5) * w * self.cols / self.width).astype(int), self.cols - 1)
            self._sum += float((emb * self.vectors[r * self.cols + c]).sum())
            self._count += len(emb)

    def result(self) -> float:
        if self._count == 0:
            raise ValueError("no window was embedded")
        return self._sum / self._count
