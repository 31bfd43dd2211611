"""Does an embedding-conditioned ∞-Brush slide show what its condition shows? The issue's goals, measured.

* :func:`held_out_tile` — a procedural tile of one class (a single-class layout rendered with a seed no
  training set uses), as a user would send it to ``POST /embed``.
* :func:`class_goal` — condition on one tile's embedding, sample a square slide, and give the shares of its
  windows per fidelity-classifier class (goal: ≥ 80 % of the requested class) and the embedding cosine of the
  slide's windows to the condition, beside the same for an unconditioned sample of the same seed.
* :func:`grid_goal` — condition on a 2 × 2 grid of four class tiles: the majority class of each quadrant.

Torch enters only through the pipeline and the encoders given; nothing here trains or loads weights itself.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from evaluation.embedding import EmbeddingCosineScorer
from evaluation.fidelity import CLASS_NAMES, ClassShareScorer, FidelityClassifier

# Seeds of the held-out tiles: no dataset of the recipes uses them (they use item_seed(0..2, i)).
HELD_OUT_SEED = 20270
CLASS_IDS = {name: i for i, name in CLASS_NAMES.items()}


def held_out_tile(class_name: str, size: int = 64, seed: int = HELD_OUT_SEED) -> np.ndarray:
    """uint8 (size, size, 3): a render of a layout that is all ``class_name`` (a fidelity-classifier class)."""
    from procedural.tissue import render_region

    if class_name not in CLASS_IDS:
        raise ValueError(f"unknown class {class_name!r}; classes: {', '.join(CLASS_IDS)}")
    # a larger layout, cropped away from its border: the render has no edge effects there
    labels = np.full((size + 64, size + 64), CLASS_IDS[class_name], np.uint8)
    return render_region(labels, seed + CLASS_IDS[class_name], (32, 32 + size), (32, 32 + size))


def _score(bands, height: int, width: int, mpp: float, classifier: FidelityClassifier | None, encoder,
           vectors: np.ndarray, rows: int, cols: int, keep: bool) -> tuple[dict, float, np.ndarray | None]:
    shares = ClassShareScorer(height, width, classifier)
    cosine = EmbeddingCosineScorer(height, width, mpp, encoder, vectors, rows, cols)
    kept = []
    for band in bands:
        shares.add_band(band)
        cosine.add_band(band)
        if keep:
            kept.append(band)
    return shares.result(), cosine.result(), (np.concatenate(kept) if keep else None)


def image_cosine(image: np.ndarray, encoder, vector: np.ndarray, mpp: float = 0.5) -> float:
    """Mean cosine of an image's encoder windows to one condition vector (:class:`EmbeddingCosineScorer`)."""
    scorer = EmbeddingCosineScorer(image.shape[0], image.shape[1], mpp, encoder, np.asarray(vector)[None], 1, 1)
    scorer.add_band(image)
    return scorer.result()


def class_goal(sample: Callable[..., Any], encoder, class_name: str, *, size: int = 1024, mpp: float = 0.5,
               seed: int = 0, classifier: FidelityClassifier | None = None,
               unconditioned: bool | np.ndarray = True, keep_images: bool = False) -> dict[str, Any]:
    """``sample(embedding=vector or None, seed=…)`` → iterable of uint8 (rows, size, 3) bands of a size² slide.

    Returns the requested class's share of windows, all shares, the cosine of the windows' embeddings to the
    condition, and (``unconditioned``) the same cosine for a sample without a condition, same seed — or for the
    unconditioned image given (one unconditioned sample serves every class)."""
    tile = held_out_tile(class_name, encoder.input_size)
    vector = np.asarray(encoder.embed(tile[None]), np.float32)[0]
    shares, cos, img = _score(sample(embedding=vector, seed=seed), size, size, mpp, classifier, encoder,
                              vector[None], 1, 1, keep_images)
    out: dict[str, Any] = {"class": class_name, "share": shares[class_name], "shares": shares, "cosine": cos}
    if isinstance(unconditioned, np.ndarray):
        out["cosine_unconditioned"] = image_cosine(unconditioned, encoder, vector, mpp)
    elif unconditioned:
        _, cos0, img0 = _score(sample(embedding=None, seed=seed), size, size, mpp, classifier, encoder,
                               vector[None], 1, 1, keep_images)
        out["cosine_unconditioned"] = cos0
        if keep_images:
            out["image_unconditioned"] = img0
    if keep_images:
        out["image"] = img
    return out


def quadrant_majorities(image: np.ndarray, classifier: FidelityClassifier) -> list[str]:
    """The majority fidelity class of the 64-px windows of each quadrant of an image, row-major."""
    H, W = image.shape[:2]
    out = []
    for r0, r1 in ((0, H // 2), (H // 2, H)):
        for c0, c1 in ((0, W // 2), (W // 2, W)):
            scorer = ClassShareScorer(r1 - r0, c1 - c0, classifier)
            scorer.add_band(np.ascontiguousarray(image[r0:r1, c0:c1]))
            shares = scorer.result()
            out.append(max(shares, key=shares.get))      # ties: the lower class id, as argmax
    return out


def grid_goal(sample: Callable[..., Any], encoder, classes: tuple[str, str, str, str], *, size: int = 1024,
              seed: int = 0, classifier: FidelityClassifier | None = None) -> dict[str, Any]:
    """``sample(embedding=(2, 2, D) grid, seed=…)`` → bands; the majority class of each quadrant vs ``classes``
    (row-major: top-left, top-right, bottom-left, bottom-right)."""
    from evaluation.fidelity import load_classifier

    classifier = classifier if classifier is not None else load_classifier()
    tiles = np.stack([held_out_tile(c, encoder.input_size) for c in classes])
    grid = np.asarray(encoder.embed(tiles), np.float32).reshape(2, 2, -1)
    image = np.concatenate(list(sample(embedding=grid, seed=seed)))
    got = quadrant_majorities(image, classifier)
    return {"requested": list(classes), "majorities": got, "correct": sum(a == b for a, b in zip(classes, got)),
            "image": image}
