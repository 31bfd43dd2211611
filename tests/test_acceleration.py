"""models.acceleration: one cached inference network per (module, device, mode) and process, warm-up timing,
attribute forwarding, CUDA backend switches."""
from __future__ import annotations

import pytest
import torch

from models.acceleration import (
    MODES,
    RECOMPILE_LIMIT,
    InferenceNetwork,
    clear_inference_cache,
    configure_cuda_backends,
    inference_network,
)
from models.diffinfinite.guidance import ImageDenoiser
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig


@pytest.fixture(autouse=True)
def empty_cache():
    clear_inference_cache()
    yield
    clear_inference_cache()


@pytest.fixture(scope="module")
def net() -> ImageUNet:
    torch.manual_seed(0)
    return ImageUNet(ImageUNetConfig.tiny()).eval()


def _inputs(b=2, h=8, w=8):
    mask = torch.zeros(b, 1, h, w, dtype=torch.long)
    mask[0, :, : h // 2] = 3
    return torch.randn(b, 4, h, w), torch.tensor([5] * b), mask


def test_eager_mode_is_the_module_with_timing(net):
    run = inference_network(net, mode="eager")
    assert isinstance(run, InferenceNetwork) and run.mode == "eager" and run.device == torch.device("cpu")
    assert inference_network(net, mode="eager") is run  # cached per process
    x, t, m = _inputs()
    with torch.inference_mode():
        out = run(x, t, m)
        torch.testing.assert_close(out, net(x, t, m), rtol=0, atol=0)
        run(x, t, m)
        run(*_inputs(b=3))
    stats = run.stats
    assert stats.calls == 3 and len(stats.first_call_s) == 2  # two input signatures
    assert stats.warmup_s == pytest.approx(sum(stats.first_call_s.values())) and stats.warmup_s > 0
    assert set(stats.as_dict()) == {"warmup_s", "first_call_s", "calls"}
    assert run.config is net.config and run.check_labels == net.check_labels  # forwarded attributes


def test_compiled_mode_is_cached_and_matches_eager(net):
    run = inference_network(net, mode="default", backend="aot_eager")
    assert inference_network(net, mode="default", backend="aot_eager") is run
    assert inference_network(net, mode="eager") is not run
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    x, t, m = _inputs()
    with torch.inference_mode():
        out = run(x, t, m)
        again = run(x, t, m)
        ref = net(x, t, m)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    (signature, first), = run.stats.first_call_s.items()
    assert "(2, 4, 8, 8):float32" in signature and first > 0
    # a sampler adapter takes it like the module (labels are checked through the forwarded check_labels)
    eps = ImageDenoiser(run)(x, t, m[:, 0], [3, None])
    assert eps.shape == x.shape
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        ImageDenoiser(run)(x, t, m[:, 0], [7, None])


def test_autocast_is_part_of_the_signature(net):
    run = inference_network(net, mode="eager")
    x, t, m = _inputs()
    with torch.inference_mode():
        run(x, t, m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run(x, t, m)
    assert len(run.stats.first_call_s) == 2
    assert any("autocast=cpu:bfloat16" in k for k in run.stats.first_call_s)


def test_bad_mode_and_cuda_backends():
    with pytest.raises(ValueError, match="mode"):
        inference_network(torch.nn.Linear(2, 2), mode="fast")
    assert MODES == ("eager", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
    assert configure_cuda_backends("cpu") is False
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
        assert configure_cuda_backends("cuda") is True  # process-wide flags: settable without a CUDA device
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
