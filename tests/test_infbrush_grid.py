"""∞-Brush conditioned on a grid of embeddings: the local condition, chunking independence, training on grids of
region embeddings, and the command line's grid input."""
import json

import numpy as np
import pytest
import torch

from models.infbrush import InfBrushPipeline, untrained_infbrush
from models.infbrush.config import tiny_config
from models.infbrush.denoiser import InfBrushDenoiser, canvas_window, token_positions
from models.infbrush.layers import LocalCondition
from models.infbrush.pipeline import InfBrushModels, make_card
from models.infbrush.sampler import Canvas, evaluate_full
from training.infbrush import (EncodedRegions, SyntheticFunctions, TrainOptions, evaluate_loss, region_bounds,
                               region_tiles, train_infbrush)


def _field_model(seed: int = 0) -> InfBrushDenoiser:
    """A tiny model with a local condition whose (zero-initialised) output layer is made non-zero, as training
    would, so the tests see the field."""
    torch.manual_seed(seed)
    model = InfBrushDenoiser(tiny_config(cond_field=True)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.local.mlp[2].weight, std=0.5)
    return model


def _grid_ctx(model, H, W, rows, cols, seed=0):
    emb = torch.randn(2, rows * cols, 512, generator=torch.Generator().manual_seed(seed))
    pos = token_positions(rows, cols, H, W)[None].expand(2, -1, -1)
    return model.context(torch.tensor([700, 700]), emb, pos, torch.tensor([False, True]), grid=(rows, cols),
                         window=canvas_window(H, W))


def test_local_condition_is_the_cells_blended_bilinearly():
    cells = torch.arange(2 * 3, dtype=torch.float32).reshape(1, 1, 2, 3)      # one channel, 2 rows × 3 cols
    H, W = 40, 60                                                              # unit square: y ∈ [1/6, 5/6]
    window = torch.tensor([canvas_window(H, W)])
    centres = token_positions(2, 3, H, W)[None]                                # (1, 6, 2)
    at = LocalCondition.at(cells, window, centres)[0, :, 0]
    assert torch.allclose(at, torch.arange(6.0), atol=1e-5)                   # each centre: its own cell
    mid = (centres[:, 0] + centres[:, 1]) / 2                                  # halfway between cells 0 and 1
    assert abs(float(LocalCondition.at(cells, window, mid[:, None])[0, 0, 0]) - 0.5) < 1e-5
    corner = torch.tensor([[[1 / 6 + 1e-3, 1e-3]]])                            # beyond the outer centres: constant
    assert abs(float(LocalCondition.at(cells, window, corner)[0, 0, 0])) < 1e-6
    # continuous: a fine line across the canvas never jumps by more than its step allows
    line = torch.stack([torch.full((201,), 0.5), torch.linspace(0, 1, 201)], -1)[None]
    vals = LocalCondition.at(cells, window, line)[0, :, 0]
    assert float(vals.diff().abs().max()) <= 1.0 / (60 / 3) * (60 / 200) + 1e-5
    # one cell is the same vector everywhere, exactly
    one = torch.randn(2, 4, 1, 1)
    got = LocalCondition.at(one, torch.zeros(2, 4), torch.rand(1, 5, 7, 2))
    assert got.shape == (2, 5, 7, 4) and torch.equal(got[1, 3, 2], one[1, :, 0, 0])


def test_a_fresh_local_condition_changes_nothing_and_the_null_condition_has_none():
    torch.manual_seed(3)
    plain = InfBrushDenoiser(tiny_config()).eval()
    torch.manual_seed(3)
    field = InfBrushDenoiser(tiny_config(cond_field=True)).eval()
    # created last: every weight the plain model has is drawn identically
    fsd = field.state_dict()
    assert all(torch.equal(v, fsd[k]) for k, v in plain.state_dict().items())
    H, W = 20, 28
    x = torch.randn(H, W, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = evaluate_full(plain, x, _grid_ctx(plain, H, W, 2, 2), 2)
        b = evaluate_full(field, x, _grid_ctx(field, H, W, 2, 2), 2)
        assert torch.equal(a, b)                                              # zero-initialised output layer
        ctx = _grid_ctx(_field_model(), H, W, 2, 2)
        assert float(ctx.cells[0].abs().max()) > 0 and float(ctx.cells[1].abs().max()) == 0.0
    with pytest.raises(ValueError, match="grid"):
        field.context(torch.tensor([1]), torch.randn(1, 4, 512), torch.rand(1, 4, 2), torch.tensor([False]))


@pytest.mark.parametrize("cond_field", [False, True])
def test_grid_conditioned_network_is_independent_of_chunking(cond_field):
    model = _field_model() if cond_field else untrained_infbrush(seed=3).denoiser
    H, W = 33, 45
    x = torch.randn(H, W, 3, generator=torch.Generator().manual_seed(1)) * 0.7
    with torch.no_grad():
        ctx = _grid_ctx(model, H, W, 2, 3)
        ref = evaluate_full(model, x, ctx, 2)
        for chunk in (150, 10 ** 6):
            got = Canvas(model, H, W, chunk).predict_eps(x, ctx, 2)
            assert float((got - ref).abs().max()) < 1e-4, chunk
        assert Canvas(model, H, W, 150).n_tiles >= 9
        # the grid reaches the output, and where it is laid matters (not just which vectors it holds)
        flipped = model.context(torch.tensor([700, 700]), torch.flip(_ctx_emb(2, 3), dims=[1]),
                                token_positions(2, 3, H, W)[None].expand(2, -1, -1), torch.tensor([False, True]),
                                grid=(2, 3), window=canvas_window(H, W))
        assert float((evaluate_full(model, x, flipped, 2)[0] - ref[0]).abs().max()) > 1e-4


def _ctx_emb(rows, cols, seed=0):
    return torch.randn(2, rows * cols, 512, generator=torch.Generator().manual_seed(seed))


def _sample(pipe, emb, chunk, H=30, W=44):
    return torch.cat([b for _, _, b in pipe.sample_float_bands(H, W, embedding=emb, seed=5, steps=3, guidance=2.0,
                                                               chunk_pixels=chunk)])


@pytest.mark.parametrize("cond_field", [False, True])
def test_grid_conditioned_sample_does_not_depend_on_chunking(cond_field):
    models = untrained_infbrush(seed=0) if not cond_field else InfBrushModels(
        card=make_card(tiny_config(cond_field=True), name="t", trained=False), denoiser=_field_model())
    pipe = InfBrushPipeline(models, "cpu")
    grid = np.random.RandomState(2).randn(3, 2, 512)
    a = _sample(pipe, grid, 10 ** 6)
    c = _sample(pipe, grid, 100)
    # as test_infbrush_model's sampling test: the network agrees to rounding, amplified at the first DDIM step for a
    # few values; a condition laid per chunk (or a halo error) would move whole tiles
    d = (a - c).abs()
    assert float(d.max()) < 5e-2 and float(d.mean()) < 1e-4 and float((d > 1e-3).float().mean()) < 0.01
    assert not torch.equal(a, _sample(pipe, grid[::-1].copy(), 10 ** 6))


def test_region_tiles_and_encoded_regions():
    img = torch.zeros(3, 30, 40, dtype=torch.uint8)
    img[:, :15, 20:] = 255
    tiles = region_tiles(img, 2, 2, 8)
    assert tiles.shape == (4, 8, 8, 3) and tiles.dtype == np.uint8
    assert [int(t.mean()) for t in tiles] == [0, 255, 0, 0]                  # row-major
    assert region_bounds(30, 40, 2, 2)[1] == ((0, 15), (20, 40))
    ds = SyntheticFunctions(4, sizes=((32, 32),), classes=3, embedding_dim=16, mosaic=(2, 2))
    img, truth = ds.item(1)
    assert img.shape == (3, 32, 32) and truth.shape == (2, 2, 16)
    calls = []

    def embed(t):
        calls.append(len(t))
        return ds.colour_encoder()(t)

    enc = EncodedRegions(ds, embed, 16, layouts=((1, 1), (2, 2)), tile_px=8)
    _, grid = enc.item(1, (2, 2))
    assert torch.equal(grid, truth)                       # the stand-in encoder recovers each region's class
    assert enc.item(1)[1].shape == (1, 1, 16) and enc.item(1, (2, 2))[1] is grid and calls == [4, 1]
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*\(4, 16\)"):
        EncodedRegions(ds, lambda t: np.ones((len(t), 3)), 16, layouts=((2, 2),), tile_px=8).item(0)
    with pytest.raises(ValueError, match="non-finite"):
        EncodedRegions(ds, lambda t: np.full((len(t), 16), np.nan), 16, tile_px=8).item(0)


def test_tiny_model_trained_on_grids_of_region_embeddings_learns(tmp_path):
    """Grids of per-region embeddings from an encoder function (the stand-in: per-class fixed random vectors read
    from the tile's colour), mixed with global vectors, one layout per step: the loss falls, the local condition
    learns, and the card offers grids."""
    cfg = tiny_config(n_points=256, cond_field=True)
    sizes = ((32, 32), (24, 40))
    opts = TrainOptions(out=tmp_path / "grid", config=cfg, synthetic=8, synthetic_sizes=sizes,
                        synthetic_mosaic=(2, 2), grids=((1, 1), (2, 2)), tile_px=8, steps=30, batch_size=4, lr=3e-3,
                        progress=False, save_every=100, seed=0)
    res = train_infbrush(opts)
    ds = res["dataset"]
    assert isinstance(ds, EncodedRegions) and ds.layouts == [(1, 1), (2, 2)]
    torch.manual_seed(0)
    before = evaluate_loss(InfBrushDenoiser(cfg), ds, cfg, layout=(2, 2))
    after = evaluate_loss(res["model"], ds, cfg, layout=(2, 2))
    assert after < 0.5 * before, (before, after)
    assert float(res["model"].local.mlp[2].weight.detach().abs().max()) > 0  # the local condition learnt
    from models.infbrush import load_infbrush

    card = load_infbrush(tmp_path / "grid").card
    assert "embedding_grid" in card.conditioning and "2×2" in card.training_data
    state = json.loads((tmp_path / "grid" / "train_state" / "state.json").read_text())
    assert state["options"]["grids"] == [[1, 1], [2, 2]]
    # a model trained on global vectors only does not offer grids
    plain = train_infbrush(TrainOptions(out=tmp_path / "plain", config=tiny_config(n_points=256), synthetic=4,
                                        synthetic_sizes=sizes, steps=1, batch_size=2, progress=False))
    assert load_infbrush(plain["out"]).card.conditioning == ["embedding", "subtype"]


def test_cli_reads_embedding_grids(tmp_path):
    from slidesynth.cli import _embedding_conditioning

    grid = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.save(tmp_path / "g.npy", grid)
    cond = _embedding_conditioning(tmp_path / "g.npy", None)
    assert (cond.type, cond.rows, cond.cols, cond.encoder) == ("embedding_grid", 2, 3, "quilt-vit-b-32")
    assert cond.vectors[4] == grid[1, 1].tolist()                             # row-major
    (tmp_path / "g.json").write_text(json.dumps({"rows": 1, "cols": 2, "vectors": [[1, 2], [3, 4]],
                                                 "encoder": "slidesynth-tile-v1"}))
    cond = _embedding_conditioning(tmp_path / "g.json", None)
    assert (cond.rows, cond.cols, cond.encoder) == (1, 2, "slidesynth-tile-v1")
    assert _embedding_conditioning(tmp_path / "g.json", "other").encoder == "other"
    np.save(tmp_path / "v.npy", np.ones(8))
    assert _embedding_conditioning(tmp_path / "v.npy", None).type == "embedding"
    (tmp_path / "bad.json").write_text(json.dumps({"rows": 1, "cols": 2, "vectorz": []}))
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="vectorz"):
        _embedding_conditioning(tmp_path / "bad.json", None)
