"""The DDE coordinator network (models/dde): zero at init, canvas RoPE positions, windowed attention, strict
loading and the base-model check."""
from __future__ import annotations

import json

import pytest
import torch

from models.dde.coordinator import (CoordinatorConfig, DDECoordinator, attention_groups,
                                    canvas_token_positions)
from models.dde.loading import (COORDINATOR_CARD, COORDINATOR_DIR, BaseModelMismatch, CoordinatorLoadError,
                                load_coordinator, read_coordinator_card, save_coordinator)
from models.hashing import sha256_file


def _cfg(**kw) -> CoordinatorConfig:
    base = dict(channels=2, patch=16, stride=8, token=4, hidden=32, depth=2, heads=2, attn_window=16)
    base.update(kw)
    return CoordinatorConfig(**base)


def _randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def _grid(rows: int, cols: int, stride: int, dy: int = 0, dx: int = 0) -> torch.Tensor:
    return torch.tensor([[dy + i * stride, dx + j * stride] for i in range(rows) for j in range(cols)])


def _inputs(n: int, cfg: CoordinatorConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, cfg.channels, cfg.patch, cfg.patch)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.rand(n, generator=g) * 999


def test_untrained_correction_is_exactly_zero_and_training_moves_it():
    cfg = _cfg(cond="labels", cond_channels=3)
    net = DDECoordinator(cfg)
    origins = _grid(3, 3, 8)
    out, noisy, t = _inputs(9, cfg)
    labels = torch.randint(0, 3, (9, 1, 64, 64))  # label crops at 4× the latent resolution
    corr = net.correction(out, noisy, origins, labels, t)
    assert corr.shape == out.shape
    assert torch.equal(corr, torch.zeros_like(corr))
    (corr - out).pow(2).sum().backward()  # zero output but a trainable path: the output layer gets gradients
    assert net.out.weight.grad is not None and net.out.weight.grad.abs().sum() > 0


def test_positions_are_canvas_positions():
    pos = canvas_token_positions(torch.tensor([[0, 0], [8, 4]]), patch=16, token=4)
    side = 4
    first, second = pos[:side * side].reshape(side, side, 2), pos[side * side:].reshape(side, side, 2)
    # canvas pixel (8, 4): token (2, 1) of window 0, token (0, 0) of window 1 → same position
    assert first[2, 1].tolist() == second[0, 0].tolist() == [2, 1]
    assert first[3, 3].tolist() == [3, 3] and second[3, 3].tolist() == [5, 4]
    # a clamped last window (origin not a multiple of the token): fractional positions, same pixel → same
    clamped = canvas_token_positions(torch.tensor([[0, 0], [0, 6]]), patch=16, token=4)
    assert clamped[side * side + 0].tolist() == [0.0, 1.5] and clamped[side * side + 2].tolist() == [0.0, 3.5]


def test_translating_the_canvas_changes_nothing_but_origins():
    cfg = _cfg()
    net = _randomise(DDECoordinator(cfg)).eval()
    out, noisy, t = _inputs(9, cfg)
    with torch.no_grad():
        a = net.correction(out, noisy, _grid(3, 3, 8), None, t)
        b = net.correction(out, noisy, _grid(3, 3, 8, dy=64, dx=160), None, t)  # multiples of the square
        moved = _grid(3, 3, 8)
        moved[4] += torch.tensor([4, 0])  # one window elsewhere: the output must change (the test can fail)
        c = net.correction(out, noisy, moved, None, t)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    assert (a - c).abs().max() > 1e-3


def test_rope_gives_overlapping_tokens_the_same_rotation():
    # the same content at the same canvas pixels, presented by two different window plans (stride 8 vs 16),
    # must yield the same tokens' attention geometry: check the RoPE tables of coinciding tokens are equal
    from models.dde.coordinator import rope_tables
    pos_a = canvas_token_positions(_grid(2, 2, 8), 16, 4)
    cos, sin = rope_tables(pos_a, 16, 10000.0, torch.float32)
    same = [(i, j) for i in range(len(pos_a)) for j in range(i + 1, len(pos_a)) if pos_a[i].tolist() == pos_a[j].tolist()]
    assert same, "overlapping windows share canvas positions"
    for i, j in same:
        assert torch.equal(cos[i], cos[j]) and torch.equal(sin[i], sin[j])


def test_attention_is_confined_to_canvas_squares():
    cfg = _cfg(depth=1)  # one (unshifted) block: a token sees only its own 16-px square
    net = _randomise(DDECoordinator(cfg)).eval()
    origins = _grid(6, 6, 8)  # 56×56 canvas, squares of 16 px
    out, noisy, t = _inputs(36, cfg)
    far = 35  # window at (40, 40): squares (2..3, 2..3); window 0 covers square (0, 0) only
    out2, noisy2 = out.clone(), noisy.clone()
    out2[far] += 5.0
    noisy2[far] -= 3.0
    with torch.no_grad():
        a = net.correction(out, noisy, origins, None, t)
        b = net.correction(out2, noisy2, origins, None, t)
    assert torch.equal(a[0], b[0])  # far away: bit-identical
    assert torch.equal(a[14], b[14])  # window (16, 16): square (1, 1) only, next to the perturbed squares
    near = 28  # window at (32, 32) shares squares with the perturbed window: must change
    assert (a[near] - b[near]).abs().max() > 1e-4
    # with the shifted second block information crosses square borders
    net2 = _randomise(DDECoordinator(_cfg(depth=2))).eval()
    with torch.no_grad():
        a2 = net2.correction(out, noisy, origins, None, t)
        b2 = net2.correction(out2, noisy2, origins, None, t)
    assert (a2[14] - b2[14]).abs().max() > 1e-4  # window (16, 16): reached only through the shifted grid
    assert torch.equal(a2[0], b2[0])  # two blocks reach one square further, not the whole canvas


def test_tokens_per_square_are_bounded_whatever_the_canvas():
    cfg = _cfg()
    lengths = []
    for side in (3, 6, 12, 24):
        pos = canvas_token_positions(_grid(side, side, 8), 16, 4)
        canvas = torch.zeros(len(pos), dtype=torch.long)
        for shift in (0, 2):
            groups = attention_groups(pos, canvas, cfg.attn_window // cfg.token, shift)
            assert int(groups.valid.sum()) == len(pos)  # every token in exactly one square
            lengths.append(groups.index.shape[1])
    assert max(lengths) <= (16 // 4) ** 2 * 4  # square tokens × windows covering a pixel (2 × 2)


def test_windows_of_different_canvases_do_not_attend_to_each_other():
    cfg = _cfg(depth=2)
    net = _randomise(DDECoordinator(cfg)).eval()
    out, noisy, t = _inputs(8, cfg)
    origins = torch.cat((_grid(2, 2, 8), _grid(2, 2, 8)))
    canvas = torch.tensor([0] * 4 + [1] * 4)
    with torch.no_grad():
        both = net.correction(out, noisy, origins, None, t, canvas=canvas)
        alone = net.correction(out[:4], noisy[:4], origins[:4], None, t[:4])
    torch.testing.assert_close(both[:4], alone, rtol=0, atol=1e-5)


def test_bad_inputs_name_what_is_wrong():
    cfg = _cfg(cond="labels", cond_channels=3)
    net = DDECoordinator(cfg)
    out, noisy, t = _inputs(4, cfg)
    o = _grid(2, 2, 8)
    with pytest.raises(ValueError, match="cond is required"):
        net.correction(out, noisy, o, None, t)
    with pytest.raises(ValueError, match="class ids"):
        net.correction(out, noisy, o, torch.full((4, 1, 16, 16), 7), t)
    with pytest.raises(ValueError, match="t must be"):
        net.correction(out, noisy, o, torch.zeros(4, 1, 16, 16, dtype=torch.long), t[:2])
    with pytest.raises(ValueError, match="attn_window"):
        _cfg(attn_window=12).validate()


# ------------------------------------------------------------------------------------------ folders
def _model_folder(tmp_path, cfg=None):
    folder = tmp_path / "model"
    folder.mkdir()
    base = folder / "image_unet.safetensors"
    base.write_bytes(b"base weights v1")
    net = _randomise(DDECoordinator(cfg or _cfg()))
    save_coordinator(net, folder / COORDINATOR_DIR,
                     base={"model": "demo", "file": base.name, "sha256": sha256_file(base)},
                     training={"command": "test"})
    return folder, net


def test_save_and_load_round_trip(tmp_path):
    folder, net = _model_folder(tmp_path)
    loaded = load_coordinator(folder, "cpu")
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    card = read_coordinator_card(folder)
    assert card["patch"] == 16 and card["stride"] == 8 and card["base"]["model"] == "demo"


def test_strict_load_lists_the_mismatched_keys(tmp_path):
    folder, _ = _model_folder(tmp_path)
    card_path = folder / COORDINATOR_DIR / COORDINATOR_CARD
    card = json.loads(card_path.read_text())
    card["architecture"]["depth"] = 3  # the file lacks block 2
    card["architecture"]["mlp_ratio"] = 2.0  # every block's MLP has another shape
    card_path.write_text(json.dumps(card))
    with pytest.raises(CoordinatorLoadError) as err:
        load_coordinator(folder, "cpu")
    msg = str(err.value)
    assert "missing keys" in msg and "blocks.2.attn.qkv.weight" in msg
    assert "shape mismatches" in msg and "blocks.0.mlp.0.weight: file (128, 32) vs network (64, 32)" in msg
    card["architecture"]["depth"] = 1
    card["architecture"]["mlp_ratio"] = 4.0
    card_path.write_text(json.dumps(card))
    with pytest.raises(CoordinatorLoadError, match=r"unexpected keys \(\d+\): .*blocks\.1\.ada\.1\.bias"):
        load_coordinator(folder, "cpu")


def test_base_model_mismatch_names_both(tmp_path):
    folder, _ = _model_folder(tmp_path)
    trained_against = sha256_file(folder / "image_unet.safetensors")
    (folder / "image_unet.safetensors").write_bytes(b"base weights v2")
    now = sha256_file(folder / "image_unet.safetensors")
    with pytest.raises(BaseModelMismatch) as err:
        load_coordinator(folder, "cpu")
    assert trained_against in str(err.value) and now in str(err.value) and "'demo'" in str(err.value)
    with pytest.raises(BaseModelMismatch):
        load_coordinator(folder / COORDINATOR_DIR, "cpu", base_sha256="0" * 64)
    load_coordinator(folder / COORDINATOR_DIR, "cpu", base_sha256=trained_against)


def test_candidate_folder_is_checked_against_the_model_folders_base(tmp_path):
    """A coordinator folder outside the model folder (a candidate) is hashed against the base named on its card
    in ``base_folder``; the engine's ``coordinator_dir`` loads it that way, with the shipped path's checks."""
    import shutil
    from types import SimpleNamespace

    from models.diffinfinite.engine import DiffInfiniteEngine, DiffInfiniteOptions

    folder, net = _model_folder(tmp_path)
    candidate = tmp_path / "candidate"
    shutil.move(str(folder / COORDINATOR_DIR), candidate)
    loaded = load_coordinator(candidate, "cpu", base_folder=folder)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    models = SimpleNamespace(folder=folder, card=SimpleNamespace(name="demo"))
    dde = DiffInfiniteOptions(sampler="dde")
    with pytest.raises(ValueError, match="no trained DDE coordinator"):  # the model folder has none of its own
        DiffInfiniteEngine().coordinator(models, dde, "cpu")
    engine = DiffInfiniteEngine(coordinator_dir=candidate)
    assert engine.coordinator(models, DiffInfiniteOptions(sampler="mixture"), "cpu") is None
    with pytest.raises(ValueError, match="trained on 16-px windows, the sampler's are 64"):  # the patch check
        engine.coordinator(models, dde, "cpu")
    with pytest.raises(ValueError, match="no folder holding the base weights"):  # a built-in model: nothing to check
        engine.coordinator(SimpleNamespace(folder=None, card=models.card), dde, "cpu")
    # a coordinator whose card names no base weight file (the Gaussian oracle's) cannot be checked: refused
    card = json.loads((candidate / COORDINATOR_CARD).read_text())
    nofile = tmp_path / "nofile"
    shutil.copytree(candidate, nofile)
    (nofile / COORDINATOR_CARD).write_text(json.dumps(dict(card, base=dict(card["base"], file=None))))
    with pytest.raises(BaseModelMismatch, match="no weight file to check"):
        load_coordinator(nofile, "cpu", base_folder=folder)
    (folder / "image_unet.safetensors").write_bytes(b"base weights v2")
    with pytest.raises(BaseModelMismatch, match=sha256_file(folder / "image_unet.safetensors")):
        load_coordinator(candidate, "cpu", base_folder=folder)
    (folder / "image_unet.safetensors").unlink()
    with pytest.raises(CoordinatorLoadError, match="base weight file image_unet.safetensors is missing"):
        load_coordinator(candidate, "cpu", base_folder=folder)


def test_engine_refuses_a_coordinator_not_made_for_the_image_model(tmp_path):
    """64-px windows but 2 channels and no label input: refused when the job starts, naming what differs."""
    from types import SimpleNamespace

    from models.diffinfinite.engine import DiffInfiniteEngine, DiffInfiniteOptions

    folder, _ = _model_folder(tmp_path, _cfg(patch=64, stride=32))
    models = SimpleNamespace(folder=folder, card=SimpleNamespace(name="demo"),
                             image_unet=SimpleNamespace(config=SimpleNamespace(channels=4)))
    with pytest.raises(ValueError, match="takes 2-channel windows conditioned on 'none'.*4-channel, on labels"):
        DiffInfiniteEngine().coordinator(models, DiffInfiniteOptions(sampler="dde"), "cpu")


def test_tampered_weights_are_refused(tmp_path):
    folder, _ = _model_folder(tmp_path)
    w = folder / COORDINATOR_DIR / "coordinator.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(CoordinatorLoadError, match="sha256"):
        load_coordinator(folder, "cpu")


def test_is_a_patch_coordinator_and_untrained_dde_is_multidiffusion():
    from models.patching import PatchCoordinator, combine, plan_windows

    cfg = _cfg()
    net = DDECoordinator(cfg)
    assert isinstance(net, PatchCoordinator)
    plan = plan_windows("dde", (36, 36), 16, 8)  # 36 = 16 + 2·8 + 4: the last window is clamped to 20
    assert plan.origins[-1].tolist() == [20, 20]
    g = torch.Generator().manual_seed(3)
    outs = torch.randn(len(plan), 2, 16, 16, generator=g)
    noisy = torch.randn(len(plan), 2, 16, 16, generator=g)
    t = torch.full((len(plan),), 300.0)
    with torch.no_grad():
        dde = combine(plan, outs, noisy=noisy, t=t, coordinator=net)
    md = combine(plan_windows("multidiffusion", (36, 36), 16, 8), outs)
    assert torch.equal(dde, md)


@pytest.mark.parametrize("attention", [{}, {"attn_window": 32, "attention": "neighbourhood"}],
                         ids=["squares", "neighbourhood"])
def test_a_large_canvas_is_corrected_in_bands_with_the_one_pass_result(attention):
    cfg = _cfg(**attention)
    net = _randomise(DDECoordinator(cfg)).eval()
    origins = _grid(14, 3, cfg.stride)  # 14 window rows: several bands at 3 rows' worth of tokens
    outputs, noisy, t = _inputs(len(origins), cfg)
    per = (cfg.patch // cfg.token) ** 2
    with torch.no_grad():
        net.max_tokens = 0  # one pass
        one = net.correction(outputs, noisy, origins, None, t)
        net.max_tokens = per * 3 * 9
        if cfg.attention == "neighbourhood":  # each token gathered (2 + 2·3)² / 2² = 16 times as a key
            assert net.band_tokens == net.max_tokens // 16
            net.max_tokens *= 16
        bands = net.bands(origins)
        banded = net.correction(outputs, noisy, origins, None, t)
    assert len(bands) > 2
    own = torch.cat([o for o, _ in bands])
    assert sorted(own.tolist()) == list(range(len(origins)))  # every window corrected by exactly one band
    halo = cfg.patch + net.reach_px
    for o, ctx in bands:
        assert set(o.tolist()) <= set(ctx.tolist())
        rows = origins[ctx, 0]
        assert int(rows.min()) > int(origins[o, 0].min()) - halo and int(rows.max()) < int(origins[o, 0].max()) + halo
    # float rounding only: the passes have other shapes (and a neighbourhood's attend densely, ≈ 1e-7 relative)
    torch.testing.assert_close(banded, one, rtol=0, atol=1e-6 * max(1.0, float(one.abs().max())))
    assert one.abs().max() > 0.1


def test_the_band_context_is_what_the_correction_depends_on():
    """A band's context (windows within patch + reach, reach = depth × attention square) gives its windows their
    one-pass corrections; a context of windows within patch + stride only does not: the windows' corrections
    depend on windows beyond their own overlaps, which is why bands need a context (a safe bound: the measured
    dependence ends at ≈ depth × (square − token))."""
    cfg = _cfg()
    net = _randomise(DDECoordinator(cfg)).eval()
    origins = _grid(12, 2, cfg.stride)
    outputs, noisy, t = _inputs(len(origins), cfg)
    with torch.no_grad():
        net.max_tokens = 0
        one = net.correction(outputs, noisy, origins, None, t)
        target = 6  # a middle window row
        own = torch.nonzero(origins[:, 0] == target * cfg.stride).flatten()
        y = target * cfg.stride
        halo = cfg.patch + net.reach_px
        for cut, equal in ((halo, True), (cfg.patch + cfg.stride, False)):
            ctx = torch.nonzero((origins[:, 0] > y - cut) & (origins[:, 0] < y + cut)).flatten()
            part = net.correction(outputs[ctx], noisy[ctx], origins[ctx], None, t[ctx])
            got = part[torch.searchsorted(ctx, own)]
            assert torch.allclose(got, one[own], atol=1e-6) == equal, cut


# ------------------------------------------------------------------------------------------ disagreement scale
def test_window_deviations_are_outputs_minus_the_overlap_average():
    from models.dde.coordinator import window_deviations
    from models.patching import blend, plan_windows

    plan = plan_windows("dde", (36, 28), 16, 8)  # clamped last windows: uneven overlap counts
    g = torch.Generator().manual_seed(5)
    a = torch.randn(len(plan), 2, 16, 16, generator=g, dtype=torch.float64)
    b = torch.randn(len(plan), 2, 16, 16, generator=g, dtype=torch.float64) * 3
    origins = plan.origins_tensor("cpu")
    two = torch.cat((a, b))
    dev, scale = window_deviations(two, torch.cat((origins, origins)), torch.arange(2).repeat_interleave(len(plan)))
    for i, x in enumerate((a, b)):
        avg = blend(x, plan.origins, plan.weight, plan.canvas)
        want = x - torch.stack([avg[:, y:y + 16, xx:xx + 16] for y, xx in plan.origins.tolist()])
        got = dev[i * len(plan):(i + 1) * len(plan)]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        rms = want.pow(2).mean().sqrt()
        assert torch.allclose(scale[i * len(plan):(i + 1) * len(plan)], rms.expand(len(plan)))  # per canvas
    d2, s2 = window_deviations(2.5 * a, origins)  # linear in the outputs
    torch.testing.assert_close(d2, 2.5 * dev[:len(plan)]) and torch.testing.assert_close(s2, 2.5 * scale[:len(plan)])
    one_window = window_deviations(a[:1], origins[:1])  # no overlap: zero deviation, finite positive scale
    assert torch.equal(one_window[0], torch.zeros_like(a[:1])) and 0 < float(one_window[1][0]) < 1e-5


@pytest.mark.parametrize("noise_input", ["timestep", "sigma"])
def test_disagreement_scaled_coordinator_starts_at_zero_and_corrects_in_disagreement_units(noise_input):
    from models.dde.coordinator import window_deviations

    cfg = _cfg(scale="disagreement", noise_input=noise_input)
    origins = _grid(3, 3, 8)
    out, noisy, t = _inputs(9, cfg)
    t = t / 100 if noise_input == "sigma" else t
    assert torch.equal(DDECoordinator(cfg).correction(out, noisy, origins, None, t), torch.zeros_like(out))
    net = _randomise(DDECoordinator(cfg)).eval()
    dev, scale = window_deviations(out, origins)
    with torch.no_grad():
        one = net.correction(out, noisy, origins, None, t)
        direct = net._correction(out, noisy, origins, None, t, dev=dev, dev_scale=scale)
        # the network sees deviation ÷ scale; its output is multiplied by the scale
        doubled = net._correction(out, noisy, origins, None, t, dev=2 * dev, dev_scale=2 * scale)
        other = net._correction(out, noisy, origins, None, t, dev=dev, dev_scale=0.5 * scale)
    torch.testing.assert_close(one, direct, rtol=0, atol=0)
    torch.testing.assert_close(doubled, 2 * one, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other, 0.5 * one, atol=1e-3)  # the deviations are an input, not only the unit
    assert float(scale[0]) > 0 and one.abs().max() > 1e-3


def test_disagreement_scaled_bands_keep_the_one_pass_result():
    # the scale is the whole canvas's: computed before the canvas is split into bands
    cfg = _cfg(scale="disagreement")
    net = _randomise(DDECoordinator(cfg)).eval()
    origins = _grid(14, 3, cfg.stride)
    outputs, noisy, t = _inputs(len(origins), cfg)
    outputs[:20] *= 10  # one end of the canvas disagrees more: a band's own RMS would differ from the canvas's
    with torch.no_grad():
        net.max_tokens = 0
        one = net.correction(outputs, noisy, origins, None, t)
        net.max_tokens = (cfg.patch // cfg.token) ** 2 * 3 * 9
        banded = net.correction(outputs, noisy, origins, None, t)
    assert len(net.bands(origins)) > 2
    torch.testing.assert_close(banded, one, rtol=1e-5, atol=1e-5)


def test_cards_from_before_the_scale_options_load_with_the_first_architecture():
    old = {k: v for k, v in _cfg().to_dict().items() if k != "scale"}
    cfg = CoordinatorConfig.from_dict(old)
    assert cfg.scale == "none"
    assert not any(name.startswith("embed_dev") for name, _ in DDECoordinator(cfg).named_parameters())
    with pytest.raises(ValueError, match="scale must be none or disagreement"):
        _cfg(scale="rms").validate()


def test_a_moving_attention_grid_moves_the_squares_and_nothing_else():
    from models.dde.coordinator import step_grid_offset

    fixed = _cfg()
    assert not DDECoordinator(fixed).moves_grid
    assert [step_grid_offset(fixed, k).tolist() for k in (0, 7)] == [[0.0, 0.0]] * 2
    cfg = _cfg(attn_grid="moving")
    net = _randomise(DDECoordinator(cfg)).eval()
    assert net.moves_grid
    side = cfg.attn_window // cfg.token
    offsets = [tuple(net.grid_for_step(k).tolist()) for k in range(64)]
    # deterministic, whole tokens inside the square, every row and column offset used, consecutive steps apart
    assert offsets == [tuple(step_grid_offset(cfg, k).tolist()) for k in range(64)]
    assert all(0 <= v < side and v == int(v) for o in offsets for v in o)
    assert {o[0] for o in offsets} == {o[1] for o in offsets} == set(range(side))
    assert all(a != b for a, b in zip(offsets, offsets[1:]))
    origins = _grid(3, 3, 8)
    out, noisy, t = _inputs(9, cfg)
    with torch.no_grad():
        none = net.correction(out, noisy, origins, None, t)
        zero = net.correction(out, noisy, origins, None, t, grid=torch.zeros(2))
        whole = net.correction(out, noisy, origins, None, t, grid=torch.tensor([side, 2.0 * side]))  # a square
        moved = net.correction(out, noisy, origins, None, t, grid=torch.tensor([1.0, 2.0]))
        # per canvas: two canvases in one call, each with its own offset, equal their calls apart
        two = net.correction(torch.cat([out, out]), torch.cat([noisy, noisy]), torch.cat([origins, origins]), None,
                             torch.cat([t, t]), canvas=torch.arange(2).repeat_interleave(9),
                             grid=torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
    assert torch.equal(none, zero)
    torch.testing.assert_close(whole, none, rtol=0, atol=1e-6)
    assert (moved - none).abs().max() > 1e-3  # the squares moved: other tokens attend together
    torch.testing.assert_close(two[:9], none, rtol=0, atol=1e-5)
    torch.testing.assert_close(two[9:], moved, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="attn_grid must be fixed or moving"):
        _cfg(attn_grid="sliding").validate()


# ------------------------------------------------------------------------------------------ neighbourhood attention
@pytest.mark.parametrize("block,radius", [(1, 1), (2, 3), (3, 2)])
def test_neighbourhood_groups_are_the_cells_around_each_block(block, radius):
    from models.dde.coordinator import neighbourhood_groups

    origins = torch.cat([_grid(5, 5, 8), torch.tensor([[30, 3]])])  # a clamped window: fractional positions
    pos = canvas_token_positions(origins, 16, 4)
    canvas = torch.zeros(len(pos), dtype=torch.long)
    canvas[-16:] = 1  # the last window on a canvas of its own
    groups = neighbourhood_groups(pos, canvas, radius, block)
    cell = torch.floor(pos).long()
    queries = []
    for g in range(groups.index.shape[0]):
        qs = groups.index[g][groups.valid[g]]
        ks = groups.keys[g][groups.keys_valid[g]]
        b = torch.div(cell[qs[0]], block, rounding_mode="floor")
        assert (torch.div(cell[qs], block, rounding_mode="floor") == b).all() and (canvas[qs] == canvas[qs[0]]).all()
        lo, hi = b * block - radius, b * block + block - 1 + radius
        want = torch.nonzero(((cell >= lo) & (cell <= hi)).all(1) & (canvas == canvas[qs[0]])).flatten()
        assert torch.equal(ks, want)  # exactly the same canvas's tokens around the block, ascending
        queries += qs.tolist()
    assert sorted(queries) == list(range(len(pos)))  # every token queries in exactly one group


def test_neighbourhood_attention_covering_the_canvas_is_squares_covering_it():
    squares = _randomise(DDECoordinator(_cfg(attn_window=64))).eval()
    nbhd = DDECoordinator(_cfg(attn_window=64, attention="neighbourhood")).eval()
    nbhd.load_state_dict(squares.state_dict())  # no weight of its own: a squares coordinator's loads
    origins = _grid(3, 3, 8)  # a 32² canvas inside one 64-px square and inside every neighbourhood
    out, noisy, t = _inputs(9, squares.config)
    with torch.no_grad():
        torch.testing.assert_close(nbhd.correction(out, noisy, origins, None, t),
                                   squares.correction(out, noisy, origins, None, t), rtol=0, atol=1e-6)


def _changed_cells(net: DDECoordinator, origins: torch.Tensor, cell: tuple[int, int]) -> set[tuple[int, int]]:
    """Canvas cells (token units) whose correction changes when every window's output at ``cell`` changes."""
    cfg = net.config
    k = cfg.token
    out, noisy, t = _inputs(len(origins), cfg)
    out2 = out.clone()
    y, x = cell[0] * k, cell[1] * k
    for i, (oy, ox) in enumerate(origins.tolist()):
        if oy <= y < oy + cfg.patch and ox <= x < ox + cfg.patch:
            out2[i, :, y - oy:y - oy + k, x - ox:x - ox + k] += 5.0
    with torch.no_grad():
        diff = (net.correction(out2, noisy, origins, None, t) - net.correction(out, noisy, origins, None, t)).abs()
    side = cfg.patch // k
    per_cell = diff.amax(1).reshape(len(origins), side, k, side, k).amax((2, 4))
    return {(oy // k + r, ox // k + c) for i, (oy, ox) in enumerate(origins.tolist())
            for r in range(side) for c in range(side) if per_cell[i, r, c] > 0}


@pytest.fixture(params=["dense", "gathered"])
def attention_path(request, monkeypatch):
    """Run a neighbourhood test through the dense masked attention and through the gathered keys."""
    import models.dde.coordinator as coordinator

    if request.param == "gathered":
        monkeypatch.setattr(coordinator, "DENSE_MAX_TOKENS", 0)
    return request.param


def test_neighbourhood_attention_sees_all_sides_and_nothing_beyond_its_reach(attention_path):
    origins = _grid(6, 6, 8)  # 56² canvas, 14 × 14 cells
    cell = (7, 8)  # column 8: on the border of the 32-px (8-cell) attention squares
    squares = _randomise(DDECoordinator(_cfg(depth=1, attn_window=32))).eval()
    seen = _changed_cells(squares, origins, cell)
    assert (7, 7) not in seen and (7, 8) in seen  # a square coordinator: the cell next door, across the border, is blind
    nbhd = _randomise(DDECoordinator(_cfg(depth=1, attn_window=32, attention="neighbourhood"))).eval()
    block, radius = nbhd.neighbourhood
    assert (block, radius) == (2, 3) and nbhd.reach_px == 20
    seen = _changed_cells(nbhd, origins, cell)
    cells = [(r, c) for r in range(14) for c in range(14)]
    cheb = {rc: max(abs(rc[0] - cell[0]), abs(rc[1] - cell[1])) for rc in cells}
    assert {rc for rc in cells if cheb[rc] <= radius} <= seen  # every side, radius cells deep
    assert all(cheb[rc] < block + radius for rc in seen)  # and nothing beyond the block's neighbourhood


def test_attn_block_sets_the_neighbourhood_blocks(attention_path):
    auto = DDECoordinator(_cfg(attn_window=32, attention="neighbourhood"))
    per_token = DDECoordinator(_cfg(attn_window=32, attention="neighbourhood", attn_block=1))
    assert auto.neighbourhood == (2, 3) and per_token.neighbourhood == (1, 3)
    assert per_token.reach_px == 2 * 4 * 4 < auto.reach_px
    origins = _grid(6, 6, 8)
    seen = _changed_cells(_randomise(DDECoordinator(_cfg(depth=1, attn_window=32, attention="neighbourhood",
                                                         attn_block=1))).eval(), origins, (7, 8))
    # every token its own neighbourhood: exactly the cells within the radius change, on every side
    assert seen == {(r, c) for r in range(14) for c in range(14) if max(abs(r - 7), abs(c - 8)) <= 3}
    with pytest.raises(ValueError, match="attn_block must be 0"):
        _cfg(attn_window=32, attention="neighbourhood", attn_block=9).validate()


@pytest.mark.parametrize("block", [1, 2, 3])
def test_dense_neighbourhood_attention_is_the_gathered_one(block, monkeypatch):
    import models.dde.coordinator as coordinator

    net = _randomise(DDECoordinator(_cfg(attn_window=32, attention="neighbourhood", attn_block=block))).eval()
    single = _grid(4, 5, 8, 0, 0) + torch.tensor([[0, 3]])  # a 40 × 51 canvas, its origins not on the token grid
    origins = single.repeat(3, 1)  # three canvases alike
    canvas = torch.arange(3).repeat_interleave(len(single))
    out, noisy, t = _inputs(len(origins), net.config)
    per = (16 // 4) ** 2
    assert coordinator._alike_canvases(origins, canvas, per) == 3
    results = []
    for limit in (coordinator.DENSE_MAX_TOKENS, 0):  # dense, then gathered
        monkeypatch.setattr(coordinator, "DENSE_MAX_TOKENS", limit)
        net.zero_grad()
        o = out.clone().requires_grad_()
        y = net.correction(o, noisy, origins, None, t, canvas=canvas)
        y.square().sum().backward()
        results.append((y.detach(), o.grad, net.blocks[0].attn.qkv.weight.grad.clone()))
    for dense, gathered in zip(*results):
        torch.testing.assert_close(dense, gathered, rtol=1e-5, atol=1e-5 * float(gathered.abs().max()))


def test_dense_attention_is_only_for_canvases_laid_out_alike():
    from models.dde.coordinator import DENSE_MAX_TOKENS, _alike_canvases

    single = _grid(3, 3, 8)
    per = 16
    canvas = torch.arange(2).repeat_interleave(9)
    assert _alike_canvases(single.repeat(2, 1), canvas, per) == 2
    assert _alike_canvases(single, torch.zeros(9, dtype=torch.long), per) == 1
    moved = single.repeat(2, 1)
    moved[9:] += 4  # the second canvas's windows elsewhere
    assert _alike_canvases(moved, canvas, per) == 0
    assert _alike_canvases(single.repeat(2, 1), canvas.flip(0), per) == 0  # not canvas-major
    assert _alike_canvases(single.repeat(2, 1), torch.tensor([0] * 8 + [1] * 10), per) == 0  # unequal counts
    big = _grid(12, 12, 8)  # 144 windows × 16 tokens > the dense limit
    assert len(big) * per > DENSE_MAX_TOKENS and _alike_canvases(big, torch.zeros(144, dtype=torch.long), per) == 0


def test_attention_choice_is_validated():
    assert _cfg().attention == "squares"
    with pytest.raises(ValueError, match="attention must be squares or neighbourhood"):
        _cfg(attention="global").validate()
    with pytest.raises(ValueError, match="attn_grid must be fixed with attention neighbourhood"):
        _cfg(attention="neighbourhood", attn_grid="moving").validate()
    # cards written before the field load as squares
    data = _cfg().to_dict()
    del data["attention"]
    assert CoordinatorConfig.from_dict(data).attention == "squares"
