"""Procedural H&E-like tissue with pixel-exact label masks (training data and fidelity references)."""
from procedural.tissue import (
    CLASS_NAMES,
    E_VECTOR,
    H_VECTOR,
    NUM_CLASSES,
    iter_bands,
    make_dataset,
    random_layout,
    render_region,
    render_tile,
)

__all__ = [
    "CLASS_NAMES", "E_VECTOR", "H_VECTOR", "NUM_CLASSES", "iter_bands", "make_dataset", "random_layout",
    "render_region", "render_tile",
]
