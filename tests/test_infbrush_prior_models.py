"""∞-Brush with a noise prior: card round trip, the refusal of another prior, the Euler–Maruyama sampler, training
with a Bessel prior (and multilevel), and the white path unchanged."""
import json

import numpy as np
import pytest
import torch

from models.engine import OptionError, get_engine
from models.infbrush import InfBrushPipeline, load_infbrush
from models.infbrush.config import tiny_config
from models.infbrush.denoiser import InfBrushDenoiser
from models.infbrush.noise import Mollifier
from models.infbrush.pipeline import InfBrushModels, card_prior, make_card, save_infbrush, untrained_infbrush
from models.infbrush.priors import NoisePrior, noise_source
from models.infbrush.schedule import CosineSchedule, em_update
from training.infbrush import SyntheticFunctions, TrainOptions, evaluate_loss, train_infbrush

PRIOR = NoisePrior(kind="bessel", length_um=3.0, gamma=0.6)


def _prior_models(prior=PRIOR) -> InfBrushModels:
    models = untrained_infbrush(seed=0)
    models.card = make_card(models.config, name="ib-bessel", trained=False, noise_prior=prior)
    return models


def _sample(pipe, seed=3, chunk=10 ** 6, H=24, W=32, steps=3, **kw):
    return torch.cat([b for _, _, b in pipe.sample_float_bands(H, W, embedding=np.ones(512), seed=seed, steps=steps,
                                                               guidance=1.0, chunk_pixels=chunk, **kw)])


def test_white_prior_noise_is_todays_mollified_noise_bit_for_bit():
    cfg = tiny_config()
    for H, W in ((40, 24), (130, 90)):
        moll = Mollifier.for_side(max(H, W), cfg.mollify_sigma, cfg.train_resolution)
        src = noise_source(NoisePrior(), H, W, 0.5, cfg.mollify_sigma, cfg.train_resolution)
        for stream, (r0, r1) in ((0, (0, H)), (3, (5, 17))):
            assert torch.equal(src.noise_window(7, stream, r0, r1, 0, W), moll.noise_window(7, stream, r0, r1, 0, W, H, W))
    # a card without a prior (every card before priors) is white, and white cards record nothing new
    card = untrained_infbrush(seed=0).card
    assert card_prior(card).kind == "white" and "noise_prior" not in card.config


def test_card_round_trip_with_prior(tmp_path):
    models = _prior_models()
    save_infbrush(models, tmp_path / "m")
    loaded = load_infbrush(tmp_path / "m")
    assert card_prior(loaded.card) == PRIOR
    assert loaded.card.config["noise_prior"]["length_um"] == 3.0
    assert InfBrushPipeline(loaded, "cpu").prior == PRIOR


def test_a_prior_the_model_was_not_trained_with_is_refused_naming_both():
    from service.validation import FieldError, engine_options
    from service.schemas import GenerateParams

    engine = get_engine("infinity-brush")
    card = _prior_models().card
    params = GenerateParams(model=card.name, width=64, height=64, options={"noise_prior": "white"})
    with pytest.raises(FieldError) as exc:
        engine_options(params, card)
    assert exc.value.loc == ("options", "noise_prior")
    assert "'white'" in str(exc.value) and "'bessel'" in str(exc.value) and card.name in str(exc.value)
    ok = engine_options(GenerateParams(model=card.name, width=64, height=64, options={"noise_prior": "bessel"}), card)
    assert ok.noise_prior == "bessel" and ok.solver == "ddim"
    white_card = untrained_infbrush(seed=0).card
    with pytest.raises(OptionError, match="'bessel' was asked for.*trained with the 'white' prior"):
        engine.check_options(white_card, engine.options_model(noise_prior="bessel"))
    with pytest.raises(FieldError) as exc:
        engine_options(GenerateParams(model=card.name, width=64, height=64, options={"solver": "heun"}), card)
    assert exc.value.loc[:2] == ("options", "solver")
    pipe = InfBrushPipeline(_prior_models(), "cpu")
    with pytest.raises(ValueError, match="noise_prior 'white'.*'bessel' prior"):
        pipe.run(24, 24, noise_prior="white")


def test_euler_maruyama_update_matches_the_reverse_sde_step():
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(2))
    ab_t, ab_p = 0.5, 0.6
    b = np.log(ab_p / ab_t)
    got, _ = em_update(x, eps, ab_t, ab_p, noise=noise)
    want = x + b * (0.5 * x - eps / np.sqrt(1 - ab_t)) + np.sqrt(b) * noise
    assert torch.allclose(got, want.float(), atol=1e-6)
    # a step from ᾱ ≈ 0 re-noises x̂₀ exactly; the last step returns x̂₀
    x0 = ((x - np.sqrt(1 - 1e-6) * eps) / np.sqrt(1e-6)).clamp(-1, 1)
    assert torch.allclose(em_update(x, eps, 1e-6, 0.01, noise=noise)[0], 0.1 * x0 + np.sqrt(0.99) * noise, atol=1e-5)
    assert torch.equal(em_update(x, eps, 0.99, 1.0)[0], em_update(x, eps, 0.99, 1.0)[1])


def test_euler_maruyama_sampler_is_deterministic_and_chunk_exact():
    pipe = InfBrushPipeline(_prior_models(), "cpu")
    a = _sample(pipe, solver="euler-maruyama")
    assert torch.equal(a, _sample(pipe, solver="euler-maruyama"))
    b = _sample(pipe, solver="euler-maruyama", chunk=100)
    # the noise is identical under any chunking; the network agrees to float rounding, amplified by 1/√ᾱ at the
    # first step (see test_infbrush_model's chunking test): almost every value agrees to 1e-5
    d = (a - b).abs()
    assert float(d.max()) < 5e-2 and float(d.mean()) < 1e-4 and float((d > 1e-3).float().mean()) < 0.01
    assert float((a - _sample(pipe, solver="ddim")).abs().max()) > 1e-2      # another sampler
    assert float((a - _sample(pipe, solver="euler-maruyama", seed=4)).abs().max()) > 1e-2
    # the prior's noise is drawn at the slide's µm/px
    assert float((a - _sample(pipe, solver="euler-maruyama", mpp=1.0)).abs().max()) > 1e-2
    # DDIM with η > 0 draws the prior too, chunk-exact in the same sense
    c = _sample(pipe, eta=1.0)
    d = (c - _sample(pipe, eta=1.0, chunk=100)).abs()
    assert float(d.mean()) < 1e-4


def test_tiny_model_trained_with_a_bessel_prior_loss_falls(tmp_path):
    cfg = tiny_config(n_points=256)
    sizes = ((32, 32), (32, 48))
    ds = SyntheticFunctions(8, sizes=sizes)
    torch.manual_seed(0)
    before = evaluate_loss(InfBrushDenoiser(cfg), ds, cfg, prior=PRIOR, mpp=0.5)
    res = train_infbrush(TrainOptions(out=tmp_path / "run", config=cfg, synthetic=8, synthetic_sizes=sizes, steps=30,
                                      batch_size=4, lr=3e-3, progress=False, save_every=100, seed=0,
                                      noise_prior=PRIOR, levels=2, native_mpp=0.5))
    after = evaluate_loss(res["model"], ds, cfg, prior=PRIOR, mpp=0.5)
    assert after < 0.7 * before, (before, after)
    card = load_infbrush(tmp_path / "run").card
    assert card_prior(card) == PRIOR
    assert card.training["levels"] == 2 and card.training["coarse_steps"] == 15
    # a resumed run must use the same prior
    with pytest.raises(ValueError, match="different noise prior"):
        train_infbrush(TrainOptions(out=tmp_path / "run", config=cfg, synthetic=8, synthetic_sizes=sizes, steps=31,
                                    progress=False, resume=True, noise_prior=NoisePrior(kind="bessel")))


def test_command_line_solver_flag_takes_every_engines_solvers():
    import argparse

    from slidesynth.cli import add_engine_option_flags

    parser = argparse.ArgumentParser()
    add_engine_option_flags(parser)
    assert parser.parse_args(["--solver", "euler-maruyama"]).option_solver == "euler-maruyama"
    assert parser.parse_args(["--solver", "dpmpp-2m"]).option_solver == "dpmpp-2m"
    assert parser.parse_args(["--noise-prior", "bessel"]).option_noise_prior == "bessel"
    with pytest.raises(SystemExit):
        parser.parse_args(["--solver", "heun"])


def test_the_api_answers_422_naming_both_priors(embedded_settings):
    from fastapi.testclient import TestClient

    from service.app import create_app

    save_infbrush(_prior_models(), embedded_settings.models_dir / "ib-bessel")
    body = {"model": "ib-bessel", "width": 64, "height": 64, "options": {"noise_prior": "white"},
            "conditioning": {"type": "embedding", "encoder": "quilt-vit-b-32", "vector": [1.0] * 512}}
    with TestClient(create_app(embedded_settings)) as client:
        resp = client.post("/generate", json=body)
        assert resp.status_code == 422, resp.text
        assert resp.json()["detail"][0]["loc"] == ["body", "options", "noise_prior"]
        assert "'white'" in resp.text and "'bessel'" in resp.text
        models = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert "noise_prior" in json.dumps(models["ib-bessel"]["options"])
        ok = client.post("/generate", json={**body, "options": {"noise_prior": "bessel", "solver": "euler-maruyama"}})
        assert ok.status_code in (200, 201, 202), ok.text
