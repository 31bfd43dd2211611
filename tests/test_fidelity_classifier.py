"""Conditioning fidelity: the shipped window classifier, the window/balanced-accuracy rules, streaming scores."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from evaluation.fidelity import (
    CARD_FILE, CLASSIFIER_DIR, WEIGHTS_FILE, ClassShareScorer, SlideScorer, balanced_accuracy, load_classifier, score_slide,
    sha256_file, window_labels,
)
from procedural.tissue import random_layout, render_tile

UNSEEN_SEED = 4_242_424  # not an item seed of the classifier's training, validation or sanity data


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


def test_shipped_classifier_is_small_loads_strict_and_matches_its_card(clf):
    card = json.loads((CLASSIFIER_DIR / CARD_FILE).read_text())
    weights = CLASSIFIER_DIR / WEIGHTS_FILE
    assert weights.stat().st_size < 2 * 1024 * 1024
    assert sha256_file(weights) == card["files"][WEIGHTS_FILE]
    assert sum(p.numel() for p in clf.net.parameters()) == card["parameters"]
    assert "python -m evaluation.fidelity train" in card["training"]["command"]


def test_tampered_weights_or_keys_are_refused(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "clf"
    shutil.copytree(CLASSIFIER_DIR, folder)
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_classifier(folder)
    # a consistent card but a state dict with an extra tensor: strict loading names it
    state = load_file(str(CLASSIFIER_DIR / WEIGHTS_FILE))
    state["head.extra"] = torch.zeros(1)
    save_file(state, str(folder / WEIGHTS_FILE))
    card = json.loads((folder / CARD_FILE).read_text())
    card["files"][WEIGHTS_FILE] = sha256_file(folder / WEIGHTS_FILE)
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(RuntimeError, match="head.extra"):
        load_classifier(folder)


def test_directly_rendered_unseen_slide_scores_high(clf):
    labels = random_layout(512, 512, UNSEEN_SEED, "slide", mpp=1.0, subtype=1)
    present = set(np.unique(window_labels(labels)).tolist()) - {-1}
    assert len(present) >= 4
    res = score_slide(render_tile(labels, UNSEEN_SEED), labels, clf)
    assert res["balanced_accuracy"] >= 0.9, res
    assert res["windows_scored"] >= 40
    # the same slide scored against another slide's mask is far from it: the score can fail
    other = random_layout(512, 512, UNSEEN_SEED + 1, "slide", mpp=1.0, subtype=0)
    wrong = score_slide(render_tile(labels, UNSEEN_SEED), other, clf)
    assert wrong["balanced_accuracy"] < 0.6, wrong


def test_streamed_bands_give_the_whole_image_score_and_the_metrics_seam_ratio(clf):
    from models.metrics import seam_ratio

    labels = random_layout(1100, 1030, UNSEEN_SEED + 2, "slide", mpp=2.0, subtype=0)
    smooth = render_tile(labels, 3)
    img = smooth.copy()
    img[:, 512:] = np.clip(img[:, 512:].astype(int) + 12, 0, 255).astype(np.uint8)  # a hard vertical seam
    whole = score_slide(img, labels, clf)
    scorer = SlideScorer(labels, clf)
    for r in range(0, 1100, 100):
        scorer.add_band(img[r:r + 100])
    assert scorer.result() == whole
    assert whole["seam_ratio"] > 1.2
    # all same-phase lines as the reference: the library's seam_ratio exactly
    glob = SlideScorer(labels, clf, neighbourhood_px=None)
    for r in range(0, 1100, 100):
        glob.add_band(img[r:r + 100])
    assert glob.seam_ratio() == pytest.approx(seam_ratio(img, 512, (0,), match_mod=8), rel=1e-9)
    # explicit boundary lines (what the service passes: the decoder's blend edges) find the same seam
    explicit = score_slide(img, labels, clf, boundaries=([], [512, 1024]))  # the grid's columns
    assert explicit["seam_ratio"] == pytest.approx(whole["seam_ratio"], rel=1e-9) and explicit["seam_lines"]
    assert score_slide(img, labels, clf, boundaries=([], [256]))["seam_ratio"] < 0.8 * explicit["seam_ratio"]  # none
    smooth_scorer = SlideScorer(labels, clf)
    for r in range(0, 1100, 512):
        smooth_scorer.add_band(smooth[r:r + 512])
    assert smooth_scorer.seam_ratio() < 1.05


def test_window_labels_skip_mixed_windows():
    labels = np.zeros((128, 192), np.uint8)
    labels[:64, :32] = 1  # window (0,0): half carcinoma → skipped
    labels[:64, 64:64 + 52] = 3  # window (0,1): 52/64 = 81 % stroma → stroma
    labels[64:, 128:] = 2  # window (1,2): all necrosis
    ref = window_labels(labels)
    assert ref.tolist() == [[-1, 3, 0], [0, 0, 2]]
    assert window_labels(labels, min_share=0.85).tolist() == [[-1, -1, 0], [0, 0, 2]]


def test_label_map_scores_a_model_whose_labels_differ_from_the_classes():
    from evaluation.fidelity import map_labels, window_labels

    labels = np.array([[5, 5, 0, 1], [3, 3, 0, 1]], np.uint8)
    mapped = map_labels(labels, {1: 1, 3: 3, 5: 0})
    assert mapped.tolist() == [[0, 0, -1, 1], [3, 3, -1, 1]]  # label 0 (unknown) is not requested
    assert map_labels(labels[:, :2] % 5, None).dtype == np.int64
    with pytest.raises(ValueError, match="not classifier classes"):
        map_labels(labels, {5: 7})
    from evaluation.fidelity import labels_for_classes

    layout = np.array([[0, 1], [3, 0]], np.uint8)
    asked = labels_for_classes(layout, {"1": 1, "3": 3, "5": 0})  # JSON card keys are strings
    assert asked.tolist() == [[5, 1], [3, 5]] and (map_labels(asked, {1: 1, 3: 3, 5: 0}) == layout).all()
    with pytest.raises(ValueError, match=r"classifier classes \[3\]"):
        labels_for_classes(layout, {1: 1, 5: 0})
    big = np.zeros((128, 128), np.int64) - 1
    big[:64, :64] = 2
    assert window_labels(big).tolist() == [[2, -1], [-1, -1]]


def test_balanced_accuracy_is_the_mean_recall_of_present_classes():
    bacc, rec = balanced_accuracy(np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 0, 2]))
    assert rec == {0: 0.5, 1: pytest.approx(2 / 3), 2: 1.0}
    assert bacc == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)


def test_bad_input_is_named(clf):
    labels = np.zeros((128, 128), np.uint8)
    scorer = SlideScorer(labels, clf)
    with pytest.raises(ValueError, match="128, 3"):
        scorer.add_band(np.zeros((64, 100, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        scorer.add_band(np.zeros((64, 128, 3), np.float32))
    scorer.add_band(np.zeros((64, 128, 3), np.uint8))
    with pytest.raises(ValueError, match="only 64 of"):
        scorer.result()
    with pytest.raises(ValueError, match="no 64-px window"):
        window_labels(np.zeros((32, 500), np.uint8))
    with pytest.raises(ValueError, match="outside 0..4"):
        window_labels(np.full((64, 64), 9, np.uint8))


def test_class_shares_of_a_slide_without_a_mask(clf):
    """An unseen procedural render: the shares follow its layout; streaming in odd bands changes nothing."""
    labels = random_layout(320, 384, UNSEEN_SEED, "slide", mpp=0.5)
    img = render_tile(labels, UNSEEN_SEED)
    whole = ClassShareScorer(*img.shape[:2], clf)
    whole.add_band(img)
    banded = ClassShareScorer(*img.shape[:2], clf)
    for r0 in range(0, img.shape[0], 37):
        banded.add_band(img[r0:r0 + 37])
    assert whole.result() == banded.result()
    assert sum(whole.result().values()) == pytest.approx(1.0) and whole.counts.sum() == 5 * 6
    # against the layout's own window classes (windows mostly of one class)
    truth = window_labels(labels, clf.window, 0.0)
    want = np.bincount(truth.ravel(), minlength=5) / truth.size
    got = np.array([whole.result()[n] for n in ("unknown", "carcinoma", "necrosis", "tumor stroma", "others")])
    assert np.abs(got - want).max() < 0.2
    with pytest.raises(ValueError, match="no 64"):
        ClassShareScorer(40, 400, clf)
