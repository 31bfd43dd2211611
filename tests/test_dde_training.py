"""``slidesynth train dde-coordinator`` on a tiny DiffInfinite base: the loss falls (held-out composite loss below
averaging), a resumed run is bit-identical to an uninterrupted one, the folder loads against its base and
refuses another."""
from __future__ import annotations

import json

import pytest
import torch

from models.dde.loading import (COORDINATOR_CARD, COORDINATOR_DIR, BaseModelMismatch, load_coordinator,
                                read_coordinator_card)
from training.dde import DDETrainConfig, train_dde_coordinator


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from models.diffinfinite.loading import save_diffinfinite, untrained_diffinfinite

    folder = tmp_path_factory.mktemp("dde") / "model"
    save_diffinfinite(untrained_diffinfinite(0), folder)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dde-data") / "latents.pt"  # procedural latents encoded once per module


def _cfg(model, out, cache=None, **kw) -> DDETrainConfig:
    base = dict(base=str(model), out=out, data_cache=cache, patch=16, stride=8, token=4, attn_window=16, hidden=32, depth=2, heads=2,
                steps=12, batch_size=2, slides=2, holdout_slides=1, slide_px=256, eval_crops=3, threads=1,
                save_every=100, lr=2e-3, warmup=1, ema_after=0, ema_beta=0.9)
    base.update(kw)
    return DDETrainConfig(**base)


def test_training_lowers_the_composite_loss_and_writes_a_loadable_folder(tiny_model, cache, tmp_path):
    out = tmp_path / COORDINATOR_DIR
    result = train_dde_coordinator(_cfg(tiny_model, out, cache, steps=20), log=lambda m: None)
    ev = result.evaluation
    # the untrained base's ε is far from the noise: a coordinator that learns anything beats plain averaging
    assert ev["coordinator"] < 0.97 * ev["averaging"], ev
    assert all(r["windows"] in (4, 9) for r in ev["per_canvas"])
    card = read_coordinator_card(out)
    assert card["training"]["steps_done"] == 20 and card["training"]["complete"]
    assert card["evaluation"]["ratio"] == pytest.approx(ev["ratio"])
    assert card["base"]["file"] == "image_unet.safetensors"
    # a model folder holding the coordinator: loads against its base, refuses another base
    (tiny_model / COORDINATOR_DIR).mkdir(exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            (tiny_model / COORDINATOR_DIR / f.name).write_bytes(f.read_bytes())
    net = load_coordinator(tiny_model)
    assert net.patch == 16 and net.stride == 8
    with pytest.raises(BaseModelMismatch, match=card["base"]["sha256"]):
        load_coordinator(out, base_sha256="f" * 64)


def test_resumed_run_is_bit_identical(tiny_model, cache, tmp_path):
    full = train_dde_coordinator(_cfg(tiny_model, tmp_path / "full", cache, steps=6, eval_crops=1), log=lambda m: None)
    part = train_dde_coordinator(_cfg(tiny_model, tmp_path / "part", cache, steps=6, eval_crops=1, stop_after=3), log=lambda m: None)
    assert part.steps_done == 3 and not read_coordinator_card(tmp_path / "part")["training"]["complete"]
    with pytest.raises(ValueError, match="resume"):
        train_dde_coordinator(_cfg(tiny_model, tmp_path / "part", cache, steps=6, eval_crops=1), log=lambda m: None)
    with pytest.raises(ValueError, match="another configuration"):
        train_dde_coordinator(_cfg(tiny_model, tmp_path / "part", cache, steps=6, eval_crops=1, lr=1e-3, resume=True), log=lambda m: None)
    resumed = train_dde_coordinator(_cfg(tiny_model, tmp_path / "part", cache, steps=6, eval_crops=1, resume=True), log=lambda m: None)
    assert resumed.steps_done == 6
    assert resumed.losses == full.losses
    a = read_coordinator_card(tmp_path / "full")
    b = read_coordinator_card(tmp_path / "part")
    assert a["weights_sha256"] == b["weights_sha256"]
    assert resumed.evaluation == full.evaluation
    # a different seed gives different weights (the comparison above can fail)
    other = train_dde_coordinator(_cfg(tiny_model, tmp_path / "other", cache, seed=1, steps=3, eval_crops=1), log=lambda m: None)
    assert read_coordinator_card(tmp_path / "other")["weights_sha256"] != a["weights_sha256"]
    assert other.losses[:3] != full.losses[:3]


def test_cli_trains_and_reports_bad_input(tiny_model, tmp_path, capsys):
    from slidesynth.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "dde-coordinator", "--base", str(tiny_model), "--out", str(out), "--patch", "16",
               "--stride", "8", "--attn-window", "16", "--hidden", "32", "--depth", "1", "--heads", "2",
               "--steps", "2", "--slides", "2", "--holdout-slides", "1", "--slide-px", "256", "--eval-crops", "1",
               "--threads", "1", "--scale", "disagreement", "--loss-weight", "disagreement",
               "--quiet"])
    assert rc == 0
    card = json.loads((out / COORDINATOR_CARD).read_text())
    assert card["training"]["command"].startswith("slidesynth ") and "--steps 2" in card["training"]["command"]
    assert "--scale disagreement --loss-weight disagreement" in card["training"]["command"]
    assert card["architecture"]["scale"] == "disagreement"
    weights_sha = card["weights_sha256"]
    rc = main(["train", "dde-coordinator", "--evaluate-only", "--base", str(tiny_model), "--out", str(out),
               "--patch", "16", "--stride", "8", "--slides", "2", "--holdout-slides", "1", "--slide-px", "256",
               "--eval-crops", "2", "--threads", "1", "--quiet"])
    assert rc == 0
    card = json.loads((out / COORDINATOR_CARD).read_text())
    assert card["evaluation"]["held_out_crops_per_canvas"] == 2 and card["weights_sha256"] == weights_sha
    rc = main(["train", "dde-coordinator", "--base", str(tmp_path / "nowhere"), "--out", str(out), "--quiet"])
    assert rc == 2 and "base" in capsys.readouterr().err


def test_oracle_run_writes_its_card_and_the_exact_denoiser_figures(tmp_path):
    cfg = DDETrainConfig(base="oracle", target="bayes", out=tmp_path / "oracle", patch=8, stride=4, token=2,
                         attn_window=8, hidden=32, depth=2, heads=2, min_extra=1, max_extra=2, steps=5,
                         batch_size=2, eval_crops=2, threads=1)
    result = train_dde_coordinator(cfg, log=lambda m: None)
    for r in result.evaluation["per_canvas"]:
        assert r["excess_averaging"] > 0 and r["bayes"] > 0 and r["excess_ratio"] > 0
    card = read_coordinator_card(tmp_path / "oracle")
    assert card["base"]["model"] == "gaussian-oracle" and card["base"]["file"] is None
    assert card["architecture"]["noise_input"] == "sigma"
    net = load_coordinator(tmp_path / "oracle", base_sha256=card["base"]["sha256"])
    assert net.patch == 8
    with pytest.raises(ValueError, match="target: bayes needs the oracle"):
        DDETrainConfig(base="weights/diffinfinite-demo", target="bayes").validate()

    # blend = mixture: the composite averages with Gaussian weights, so its uncorrected baseline is another one
    mix = train_dde_coordinator(DDETrainConfig(**{**cfg.__dict__, "out": tmp_path / "mix", "blend": "mixture",
                                                  "steps": 1}), log=lambda m: None)
    assert read_coordinator_card(tmp_path / "mix")["architecture"]["blend"] == "mixture"
    assert card["architecture"]["blend"] == "uniform"
    for r, m in zip(result.evaluation["per_canvas"], mix.evaluation["per_canvas"]):
        assert m["bayes"] == r["bayes"] and m["excess_averaging"] != r["excess_averaging"]
    with pytest.raises(ValueError, match="blend must be uniform or mixture"):
        DDETrainConfig(base="oracle", blend="gauss").validate()


def test_init_warm_starts_from_a_coordinator_and_refuses_another_architecture(tmp_path):
    from safetensors.torch import load_file

    kw = dict(base="oracle", target="bayes", patch=8, stride=4, token=2, attn_window=8, hidden=32, depth=2, heads=2,
              min_extra=1, max_extra=2, batch_size=2, eval_crops=1, threads=1, ema_after=0)
    train_dde_coordinator(DDETrainConfig(out=tmp_path / "a", steps=6, **kw), log=lambda m: None)
    first = load_file(tmp_path / "a" / "coordinator.safetensors")
    assert any(v.abs().sum() > 0 for k, v in first.items() if "out" in k)  # trained: not the zero correction
    # lr 0: nothing moves, so the warm-started run ships exactly the weights it started from
    cfg = DDETrainConfig(out=tmp_path / "b", steps=2, lr=0.0, init=tmp_path / "a", max_extra=4,
                         **{k: v for k, v in kw.items() if k != "max_extra"})
    train_dde_coordinator(cfg, log=lambda m: None)
    second = load_file(tmp_path / "b" / "coordinator.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    init = read_coordinator_card(tmp_path / "b")["training"]["init"]
    assert init["folder"] == str(tmp_path / "a") and init["steps"] == 6 and len(init["weights_sha256"]) == 64
    with pytest.raises(ValueError, match="another architecture.*hidden"):
        train_dde_coordinator(DDETrainConfig(out=tmp_path / "c", steps=1, init=tmp_path / "a",
                                             **dict(kw, hidden=16)), log=lambda m: None)
    # the blend changes no weight: a mixture-blend run may start from the uniform one (recorded)
    train_dde_coordinator(DDETrainConfig(out=tmp_path / "d", steps=1, lr=0.0, init=tmp_path / "a", blend="mixture",
                                         **kw), log=lambda m: None)
    card = read_coordinator_card(tmp_path / "d")
    assert card["architecture"]["blend"] == "mixture" and card["training"]["init"]["blend"] == "uniform"
    # --evaluate-only scores a coordinator with its own blend, whatever the run's config says
    from training.dde import evaluate_trained

    trained = card["evaluation"]["per_canvas"]
    again = evaluate_trained(DDETrainConfig(out=tmp_path / "d", steps=1, **kw), log=lambda m: None)["per_canvas"]
    assert [r["averaging"] for r in again] == [r["averaging"] for r in trained]


def test_coordinator_can_close_the_gap_to_the_exact_canvas_denoiser():
    # on a fixed batch the correction must be able to take averaging to the exact whole-canvas denoiser
    from models.dde.coordinator import DDECoordinator
    from training.dde import _generator, _rng, build_base, compose, window_outputs

    cfg = DDETrainConfig(base="oracle", target="bayes", patch=8, stride=4, token=2, attn_window=8, hidden=32,
                         depth=2, heads=2, max_extra=2, p_mean=0.0, p_std=1.0)
    base = build_base(cfg, torch.device("cpu"), None)
    torch.manual_seed(0)
    net = DDECoordinator(base.coordinator_config(cfg))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    b = base.draw(_rng(0, 1), _generator(0, 1), 8, 16)
    windows = window_outputs(base, b, 16)
    start = float(compose(base, None, b, windows).mean())
    for _ in range(120):
        loss = compose(base, net, b, windows).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(compose(base, net, b, windows).mean()) < 0.2 * start


def test_disagreement_loss_weight_divides_each_canvas_by_its_disagreement_squared():
    from models.dde.coordinator import window_deviations
    from training.dde import _generator, _rng, build_base, compose, multiscale_mse, window_outputs

    cfg = DDETrainConfig(base="oracle", target="bayes", patch=8, stride=4, token=2, attn_window=8, hidden=32,
                         depth=2, heads=2, max_extra=2, loss_weight="disagreement")
    base = build_base(cfg, torch.device("cpu"), None)
    b = base.draw(_rng(0, 2), _generator(0, 2), 3, 16)
    windows = window_outputs(base, b, 16)
    plan, _, out, _, _ = windows
    got = compose(base, None, b, windows)
    comp = torch.stack([torch.zeros(1, 16, 16, dtype=out.dtype)] * 3)
    n = len(plan)
    for i in range(3):
        from models.patching import blend
        comp[i] = blend(out[i * n:(i + 1) * n], plan.origins, plan.weight, plan.canvas)
        _, scale = window_deviations(out[i * n:(i + 1) * n], plan.origins_tensor("cpu"))
        plain = (comp[i] - base.bayes_denoise(b)[i]).pow(2).mean()
        torch.testing.assert_close(got[i], plain / scale[0] ** 2)
    # the held-out evaluation keeps the paper's EDM-weighted figures whatever the training weight
    edm = compose(base, None, b, windows, base.excess_loss)
    lam = (b.level ** 2 + base.sigma_data ** 2) / (b.level * base.sigma_data) ** 2
    torch.testing.assert_close(edm, lam * multiscale_mse(comp - base.bayes_denoise(b), 0))
    with pytest.raises(ValueError, match="loss_weight must be base or disagreement"):
        DDETrainConfig(loss_weight="sigma").validate()
    with pytest.raises(ValueError, match="scale must be none or disagreement"):
        DDETrainConfig(scale="rms").validate()


def test_multiscale_mse_weighs_window_scale_errors_up_and_keeps_white_errors_level():
    from training.dde import multiscale_mse

    g = torch.Generator().manual_seed(0)
    white = torch.randn(4, 1, 64, 64, generator=g, dtype=torch.float64)
    const = torch.ones(4, 1, 64, 64, dtype=torch.float64)
    assert torch.equal(multiscale_mse(white, 0), white.pow(2).flatten(1).mean(1))
    # a constant error: f² × 1 at every level f = 1, 2, 4, 8 → 1 + 4 + 16 + 64
    torch.testing.assert_close(multiscale_mse(const, 3), torch.full((4,), 85.0, dtype=torch.float64))
    # white noise: about 1 per level
    assert torch.allclose(multiscale_mse(white, 3), torch.full((4,), 4.0, dtype=torch.float64), rtol=0.1)
    # levels beyond the canvas are skipped
    torch.testing.assert_close(multiscale_mse(const[..., :6, :6], 5), torch.full((4,), 1 + 4 + 16.0,
                                                                                 dtype=torch.float64))
    with pytest.raises(ValueError, match="loss_levels must be in 0…8"):
        DDETrainConfig(loss_levels=9).validate()


def test_lr_decay_falls_linearly_to_zero_over_the_last_steps_and_resumes_bit_identically(tmp_path):
    from training.dde import lr_factor

    cfg = DDETrainConfig(base="oracle", steps=100, warmup=10, lr_decay=0.4)
    f = [lr_factor(cfg, k) for k in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[59] == 1.0  # warm-up, then constant until step 60
    assert f[60] == pytest.approx(1.0) and f[80] == pytest.approx(0.5) and f[99] == pytest.approx(1 / 40)
    assert all(a >= b for a, b in zip(f[60:], f[61:]))  # falling
    assert [lr_factor(DDETrainConfig(base="oracle", steps=100, warmup=10), k) for k in (9, 99)] == [1.0, 1.0]
    with pytest.raises(ValueError, match="lr_decay must be in"):
        DDETrainConfig(base="oracle", lr_decay=1.5).validate()

    kw = dict(base="oracle", target="bayes", patch=8, stride=4, token=2, attn_window=8, hidden=32, depth=2, heads=2,
              min_extra=1, max_extra=2, steps=6, batch_size=2, eval_crops=1, threads=1, lr=1e-2, warmup=1,
              lr_decay=0.5)
    full = train_dde_coordinator(DDETrainConfig(out=tmp_path / "full", **kw), log=lambda m: None)
    train_dde_coordinator(DDETrainConfig(out=tmp_path / "part", stop_after=4, **kw), log=lambda m: None)
    resumed = train_dde_coordinator(DDETrainConfig(out=tmp_path / "part", resume=True, **kw), log=lambda m: None)
    assert resumed.losses == full.losses
    sha = read_coordinator_card(tmp_path / "full")["weights_sha256"]
    assert read_coordinator_card(tmp_path / "part")["weights_sha256"] == sha
    const = train_dde_coordinator(DDETrainConfig(out=tmp_path / "const", **{**kw, "lr_decay": 0.0}), log=lambda m: None)
    # steps 0–3 at the full lr, 4 and 5 lower: the first loss a lower lr moves is step 5's
    assert const.losses[:5] == full.losses[:5] and const.losses[5] != full.losses[5]


def test_a_moving_grid_coordinator_trains_resumes_and_samples_with_its_grid(tmp_path):
    from evaluation.gaussian_oracle import GaussianOracle

    kw = dict(base="oracle", target="bayes", patch=8, stride=4, token=2, attn_window=8, hidden=32, depth=2, heads=2,
              min_extra=1, max_extra=2, steps=4, batch_size=2, eval_crops=1, threads=1, lr=1e-2, warmup=1,
              attn_grid="moving")
    full = train_dde_coordinator(DDETrainConfig(out=tmp_path / "full", **kw), log=lambda m: None)
    train_dde_coordinator(DDETrainConfig(out=tmp_path / "part", stop_after=2, **kw), log=lambda m: None)
    resumed = train_dde_coordinator(DDETrainConfig(out=tmp_path / "part", resume=True, **kw), log=lambda m: None)
    assert resumed.losses == full.losses
    card = read_coordinator_card(tmp_path / "full")
    assert card["architecture"]["attn_grid"] == "moving"
    assert read_coordinator_card(tmp_path / "part")["weights_sha256"] == card["weights_sha256"]
    fixed = train_dde_coordinator(DDETrainConfig(out=tmp_path / "fixed", **{**kw, "attn_grid": "fixed"}),
                                  log=lambda m: None)
    assert fixed.losses[0] == full.losses[0] and fixed.losses[1:] != full.losses[1:]  # same draws, other squares
    net = load_coordinator(tmp_path / "full")
    oracle = GaussianOracle(16, 8)
    _, noisy, sig = oracle.training_pairs(2, sigma=0.5, seed=3)
    a0, a0b, a1 = (oracle.composite(noisy, sig, "dde", net, stride=4, step=k) for k in (0, 0, 1))
    assert torch.equal(a0, a0b) and not torch.equal(a0, a1)  # the grid follows the sampling step
    with pytest.raises(ValueError, match="attn_grid must be fixed or moving"):
        DDETrainConfig(base="oracle", attn_grid="sliding").validate()


def test_a_neighbourhood_coordinator_trains_warm_starts_from_squares_and_samples(tmp_path):
    from evaluation.gaussian_oracle import GaussianOracle

    kw = dict(base="oracle", target="bayes", patch=8, stride=4, token=2, attn_window=8, hidden=32, depth=2, heads=2,
              min_extra=1, max_extra=3, steps=3, batch_size=2, eval_crops=1, threads=1, lr=1e-2, warmup=1)
    squares = train_dde_coordinator(DDETrainConfig(out=tmp_path / "sq", **kw), log=lambda m: None)
    nbhd = train_dde_coordinator(DDETrainConfig(out=tmp_path / "nb", attention="neighbourhood", **kw),
                                 log=lambda m: None)
    card = read_coordinator_card(tmp_path / "nb")
    assert card["architecture"]["attention"] == "neighbourhood"
    assert read_coordinator_card(tmp_path / "sq")["architecture"]["attention"] == "squares"
    # the same draws and initial weights; from the second step the other attention pattern shows
    assert nbhd.losses[0] == squares.losses[0] and nbhd.losses[1:] != squares.losses[1:]
    # no weight of its own: a neighbourhood run may start from a squares coordinator (the card says so)
    train_dde_coordinator(DDETrainConfig(out=tmp_path / "warm", init=tmp_path / "sq", attention="neighbourhood",
                                         **{**kw, "steps": 1, "lr": 0.0}), log=lambda m: None)
    assert read_coordinator_card(tmp_path / "warm")["training"]["init"]["attention"] == "squares"
    net = load_coordinator(tmp_path / "nb")
    oracle = GaussianOracle(16, 8)
    _, noisy, sig = oracle.training_pairs(2, sigma=0.5, seed=3)
    avg = oracle.composite(noisy, sig, "multidiffusion", stride=4)
    dde = oracle.composite(noisy, sig, "dde", net, stride=4)
    assert dde.shape == avg.shape and (dde - avg).abs().max() > 1e-4
    with pytest.raises(ValueError, match="attention must be squares or neighbourhood"):
        DDETrainConfig(base="oracle", attention="global").validate()
    with pytest.raises(ValueError, match="attn_block must be 0"):
        DDETrainConfig(base="oracle", attention="neighbourhood", attn_block=-1).validate()
    with pytest.raises(ValueError, match="attn_grid must be fixed with attention neighbourhood"):
        DDETrainConfig(base="oracle", attention="neighbourhood", attn_grid="moving").validate()


def test_the_command_line_offers_exactly_the_architecture_choices():
    """training/cli.py spells the choices out (the CLI must not import torch to print its help): they must stay
    the coordinator's own."""
    import argparse

    from models.dde.coordinator import ATTENTIONS, ATTN_GRIDS, SCALES
    from models.patching import BLENDS
    from training.cli import add_dde_train_parsers

    sub = argparse.ArgumentParser().add_subparsers()
    add_dde_train_parsers(sub)
    parser = sub.choices["dde-coordinator"]
    choices = {a.dest: tuple(a.choices) for a in parser._actions if a.choices}
    assert choices["blend"] == tuple(BLENDS)
    assert choices["attn_grid"] == tuple(ATTN_GRIDS)
    assert choices["attention"] == tuple(ATTENTIONS)
    assert choices["scale"] == tuple(SCALES)
