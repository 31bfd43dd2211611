"""DiffInfinite mask-then-image pipeline: mask cleaning, mask stage, image stage, resume, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.diffinfinite.loading import untrained_diffinfinite
from models.diffinfinite.mask_cleaning import (
    clean_mask,
    find_boundaries,
    min_pool,
    resize_labels_nearest,
    upsample_labels,
)
from models.diffinfinite.pipeline import DiffInfinitePipeline, SamplingOptions
from models.runtime import Canceled




@pytest.fixture(scope="module")
def pipe() -> DiffInfinitePipeline:
    return DiffInfinitePipeline(untrained_diffinfinite(seed=0), device=torch.device("cpu"))


def _opts(**kw) -> SamplingOptions:
    base = dict(steps=2, guidance=3.0, mode="tiled", batch_size=8, seed=0, image_patch=32)
    base.update(kw)
    return SamplingOptions(**base)


# ------------------------------------------------------------------------------------------------ cleaning
def test_clean_mask_removes_a_speck_with_symmetric_pool():
    lab = np.full((8, 8), 2, np.uint8)
    lab[2, 2] = 4  # one-pixel region
    want = np.full((8, 8), 2, np.uint8)
    want[0:5, 1:4] = 0  # the 4-connected boundary "plus" around (2, 2), dilated by the 3×3 pool
    want[1:4, 0:5] = 0
    assert np.array_equal(clean_mask(lab, pool=3), want)


def test_clean_mask_interface_with_padded_six_pool():
    lab = np.zeros((6, 10), np.uint8)
    lab[:, :5] = 1
    lab[:, 5:] = 2
    b = find_boundaries(lab)
    assert b[:, 4].all() and b[:, 5].all() and b.sum() == 12  # thick: both sides of the interface
    out = clean_mask(lab)  # 6×6 pool, window of column j = j−2 … j+3
    assert out.shape == lab.shape  # padded: no shrinkage (official: 5 px smaller, bug #11)
    want = np.zeros_like(lab)
    want[:, 0] = 1
    want[:, 8:] = 2
    assert np.array_equal(out, want)


def test_clean_mask_deletes_thin_regions_and_keeps_the_border():
    lab = np.full((20, 20), 1, np.uint8)
    lab[:, 8:12] = 3  # a 4-px stripe: thinner than the 6-px pool
    out = clean_mask(lab)
    assert not (out == 3).any()
    # boundaries at columns 7, 8, 11, 12; the pool zeroes columns j with j−2 ≤ 12 and j+3 ≥ 7
    assert (out[:, 4:15] == 0).all()
    assert (out[:, :4] == 1).all() and (out[:, 15:] == 1).all()  # rows 0 and 19: the canvas edge does not erode


def test_min_pool_window_and_resizers():
    a = np.array([[5, 1, 7, 7, 7, 7, 7, 3]], np.uint8)
    assert min_pool(a, 3).tolist() == [[1, 1, 1, 7, 7, 7, 3, 3]]
    assert min_pool(a, 6).tolist() == [[1, 1, 1, 1, 3, 3, 3, 3]]  # window i−2 … i+3, clipped
    assert upsample_labels(np.array([[1, 2]], np.uint8), 2).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2]]
    assert resize_labels_nearest(np.array([[1, 2, 3, 4]], np.uint8), 1, 2).tolist() == [[2, 4]]


# ------------------------------------------------------------------------------------------------ pipeline
def test_validate_labels_names_the_bad_ones(pipe):
    lab = np.zeros((64, 64), np.uint8)
    lab[3, 3] = 7
    lab[5, 5] = 9
    with pytest.raises(ValueError, match=r"\[7, 9\]"):
        pipe.validate_labels(lab)
    with pytest.raises(ValueError, match=r"\[-1\]"):
        pipe.validate_labels(np.full((8, 8), -1, np.int32))
    with pytest.raises(ValueError, match=r"\[7, 9\]"):
        pipe.sample_latents(lab, _opts())
    assert pipe.validate_labels(np.full((8, 8), 4, np.int64)).dtype == np.uint8


def test_mask_stage_shapes_determinism_and_subtypes(pipe):
    seen = []
    opts = _opts(steps=2, mode="random")
    m1 = pipe.sample_mask(subtype=1, height=200, width=264, options=opts, progress=lambda d, t: seen.append((d, t)))
    assert m1.shape == (200, 264) and m1.dtype == np.uint8  # H/4 = 50, 66: not multiples of 8
    assert set(np.unique(m1)) <= set(pipe.classes)
    assert seen[-1] == (3, 3) and seen[0] == (1, 3)
    assert np.array_equal(m1, pipe.sample_mask(1, 200, 264, opts))
    # the raw decoded mask is made of 4×4 blocks (nearest ×4 from the mask resolution)
    assert np.array_equal(m1, np.repeat(np.repeat(m1[::4, ::4], 4, 0), 4, 1))
    with pytest.raises(ValueError, match="subtype 5"):
        pipe.sample_mask(5, 64, 64, opts)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe.sample_mask(0, 100, 64, opts)


def test_mask_decode_uses_the_mask_path(pipe):
    codec = pipe.models.codec
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    raw = pipe.decode_mask_latents(z, 512, 512, _opts())  # one 16×16 tile: the Hann blend has weight 1
    want = codec.quantize_mask(codec.decode_mask_values(z))[0].numpy()
    assert raw.shape == (128, 128)
    assert np.array_equal(raw, want) and len(np.unique(raw)) >= 3


def test_image_stage_resume_cancel_and_progress(pipe, tmp_path):
    labels = np.zeros((256, 320), np.uint8)
    labels[40:200, 40:160] = 1
    labels[100:, 200:] = 4
    opts = _opts(steps=3, mode="random")
    saved, prog = {}, []

    def on_step(state):
        if state.step == 1:
            saved["path"] = state.save(tmp_path / "ckpt.pt")

    z = pipe.sample_latents(labels, opts, progress=lambda d, t: prog.append((d, t)), on_step=on_step)
    assert z.shape == (1, 4, 32, 40) and torch.isfinite(z).all()
    assert prog == [(1, 3), (2, 3), (3, 3)]
    from models.diffinfinite.sampler import SamplerState

    resumed = pipe.sample_latents(labels, opts, state=SamplerState.load(saved["path"]))
    assert torch.equal(z, resumed)
    with pytest.raises(Canceled):
        pipe.sample_latents(labels, opts, cancel=lambda: True)
    with pytest.raises(ValueError, match="seed"):
        pipe.sample_latents(labels, _opts(steps=3, mode="random", seed=1), state=SamplerState.load(saved["path"]))
    z_t = pipe.sample_latents(labels, _opts(steps=3, mode="tiled"))
    assert z_t.shape == z.shape and not torch.equal(z_t, z)


def test_sampling_options_validation():
    with pytest.raises(ValueError, match="steps"):
        SamplingOptions(steps=0)
    with pytest.raises(ValueError, match="mode"):
        SamplingOptions(mode="sliding")
    with pytest.raises(ValueError, match="guidance"):
        SamplingOptions(guidance=-1)


def test_state_mismatch_names_why_a_checkpoint_cannot_resume():
    import numpy as np

    from models.diffinfinite.loading import untrained_diffinfinite
    from models.diffinfinite.pipeline import DiffInfinitePipeline, SamplingOptions

    models = untrained_diffinfinite(seed=0)
    pipe = DiffInfinitePipeline(models)
    labels = np.zeros((256, 320), np.uint8)
    opts = SamplingOptions(steps=2, mode="tiled", seed=5)
    state = pipe.new_state(labels, opts)
    assert pipe.state_mismatch(state, labels, opts) is None
    assert "seed" in pipe.state_mismatch(state, labels, SamplingOptions(steps=2, mode="tiled", seed=6))
    assert "tiling" in pipe.state_mismatch(state, labels, SamplingOptions(steps=2, mode="tiled", seed=5,
                                                                           tile_edges="full"))
    other = labels.copy()
    other[:8, :8] = 1
    assert "labels_crc" in pipe.state_mismatch(state, other, opts)
