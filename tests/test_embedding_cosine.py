"""evaluation/embedding.py: the cosine between a slide's windows and its condition, with the shipped tile encoder."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.embedding import EmbeddingCosineScorer
from models.encoders import class_prototypes, load_encoder
from procedural.tissue import render_tile
from tests.conftest import REPO

MODELS = REPO / "weights"
CARCINOMA, STROMA = 1, 3  # procedural class ids (evaluation.fidelity.CLASS_NAMES)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("slidesynth-tile-v1", MODELS)


@pytest.fixture(scope="module")
def protos():
    p = class_prototypes("slidesynth-tile-v1", MODELS)
    return np.asarray(p["carcinoma"], np.float32), np.asarray(p["tumor stroma"], np.float32)


def _score(img, encoder, vectors, rows=1, cols=1, band=53):
    s = EmbeddingCosineScorer(img.shape[0], img.shape[1], 0.5, encoder, vectors, rows, cols)
    for r0 in range(0, img.shape[0], band):
        s.add_band(img[r0:r0 + band])
    return s.result()


def test_cosine_follows_the_condition_and_the_grid(encoder, protos):
    carc, strom = protos
    labels = np.full((256, 384), CARCINOMA, np.uint8)
    labels[:, 192:] = STROMA
    img = render_tile(labels, 777)
    # a grid whose left cell is carcinoma and right cell stroma matches the slide; swapped, it does not
    right = _score(img, encoder, np.stack([carc, strom]), 1, 2)
    swapped = _score(img, encoder, np.stack([strom, carc]), 1, 2)
    assert right > swapped + 0.1
    # one vector: carcinoma on an all-carcinoma slide beats stroma on it
    only_carc = render_tile(np.full((192, 192), CARCINOMA, np.uint8), 778)
    assert _score(only_carc, encoder, carc) > _score(only_carc, encoder, strom) + 0.1
    # streaming in other bands changes nothing
    assert _score(img, encoder, np.stack([carc, strom]), 1, 2, band=256) == pytest.approx(right, abs=1e-6)


def test_bad_conditions_are_named(encoder, protos):
    with pytest.raises(ValueError, match="dimension 512"):
        EmbeddingCosineScorer(128, 128, 0.5, encoder, np.ones(512))
    with pytest.raises(ValueError, match="holds no"):
        EmbeddingCosineScorer(32, 400, 0.5, encoder, protos[0])
