"""Fused GroupNorm → FiLM → SiLU: the Triton kernels (run by Triton's interpreter on CPU tensors) and the torch
fallback against the unfused modules, inside torch.compile, and in a whole UNet forward."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from models.diffinfinite import layers
from models.diffinfinite.layers import Block, fused_kernels_enabled, set_fused_kernels
from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig
from models.kernels.groupnorm_film_silu import groupnorm_film_silu
from models.kernels.overlap_add import triton_available

gn_mod = importlib.import_module("models.kernels.groupnorm_film_silu")  # the package exports the function

needs_triton = pytest.mark.skipif(not triton_available(),
                                  reason="triton is not importable here (CPU-only install); "
                                         "the torch fallback is covered by the other tests")

# (B, C, H, W, groups): small groups, odd sizes, one group per channel, 1×1 maps, and two groups of 64
# channels × 32×32 = 65536 elements each (64 chunks merged)
SHAPES = [(2, 8, 5, 7, 2), (1, 6, 3, 3, 3), (3, 4, 1, 1, 1), (2, 12, 9, 4, 4), (1, 128, 32, 32, 2)]


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels in its interpreter on CPU tensors (the kernels are built per interpret mode)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def fused_switch():
    """Restore the process default of the fused-kernel switch after a test."""
    yield set_fused_kernels
    set_fused_kernels(None)


def _unfused(x, norm: nn.GroupNorm, scale=None, shift=None):
    """The modules Block runs without the kernel, in float32."""
    y = norm.float()(x.float())
    if scale is not None:
        y = y * (scale.float()[:, :, None, None] + 1) + shift.float()[:, :, None, None]
    return nn.functional.silu(y)


def _case(shape, dtype, seed=0):
    b, c, h, w, g = shape
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, h, w, generator=gen) * 3 + 5).to(dtype)  # an offset mean: stable moments matter
    norm = nn.GroupNorm(g, c, eps=1e-3)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=gen))
        norm.bias.copy_(torch.randn(c, generator=gen))
    scale = (torch.randn(b, c, generator=gen) * 0.5).to(dtype)
    shift = torch.randn(b, c, generator=gen).to(dtype)
    return x, norm, scale, shift


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("film", [False, True], ids=["plain", "film"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_unfused_modules(interpret, shape, dtype, film):
    x, norm, scale, shift = _case(shape, dtype)
    kw = dict(scale=scale, shift=shift) if film else {}
    with torch.no_grad():
        ref = _unfused(x, norm, **kw)
        args = (x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        y32 = groupnorm_film_silu(*args, **kw, out_dtype=torch.float32, backend="triton")
        y_in = groupnorm_film_silu(*args, **kw, backend="triton")
        fallback = groupnorm_film_silu(*args, **kw, out_dtype=torch.float32, backend="torch")
    assert y32.dtype == torch.float32 and y_in.dtype == dtype and y_in.shape == x.shape
    torch.testing.assert_close(y32, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y32, fallback, rtol=1e-5, atol=1e-5)
    # the input-dtype output is the float32 result rounded once: to nearest on a GPU, truncated by Triton's
    # interpreter (its float32 → bfloat16 conversion drops the low bits)
    nearest = y32.to(dtype)
    truncated = (y32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype) if dtype == torch.bfloat16 else y32
    assert bool(((y_in == nearest) | (y_in == truncated)).all())


@needs_triton
def test_multi_block_chunks_and_stability(interpret, monkeypatch):
    """Smaller blocks / fewer chunks force the block-by-block merge inside a chunk; a mean of 1000 with a
    standard deviation of 0.01 needs the stable merge (E[x²] − E[x]² would lose every digit in float32)."""
    monkeypatch.setattr(gn_mod, "_STATS_BLOCK_MAX", 32)
    monkeypatch.setattr(gn_mod, "_MAX_CHUNKS", 3)
    gen = torch.Generator().manual_seed(3)
    x = 1000 + 0.01 * torch.randn(2, 6, 11, 13, generator=gen)  # 429 elements per group: 4 chunks of 4 blocks
    with torch.no_grad():
        exact = nn.functional.silu(nn.functional.group_norm(x.double(), 2, eps=1e-6))
        y = groupnorm_film_silu(x, 2, eps=1e-6, backend="triton")
    # the float32 input's own rounding (ulp(1000)/0.01 ≈ 6e-3 relative) bounds any float32 method
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=2e-2)


@needs_triton
def test_kernel_inside_compiled_graph(interpret):
    from torch._dynamo.testing import CompileCounterWithBackend

    x, norm, scale, shift = _case((2, 8, 4, 4, 2), torch.float32)

    def f(x, scale, shift):
        y = groupnorm_film_silu(x * 2, 2, norm.weight, norm.bias, norm.eps, scale, shift, backend="triton")
        return y + 1

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        out = torch.compile(f, fullgraph=True, backend=cnt)(x, scale, shift)
        ref = f(x, scale, shift)
    assert cnt.frame_count == 1
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="groups"):
        groupnorm_film_silu(x, 3)
    with pytest.raises(ValueError, match="backend"):
        groupnorm_film_silu(x, 2, backend="cuda")
    with pytest.raises(ValueError, match="out_dtype"):
        groupnorm_film_silu(x, 2, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="pairs"):
        groupnorm_film_silu(x, 2, weight=torch.ones(8))
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        groupnorm_film_silu(x, 2, scale=torch.ones(2, 4), shift=torch.ones(2, 4))
    with pytest.raises(RuntimeError, match="inference-only"):
        groupnorm_film_silu(x.requires_grad_(), 2)


def test_switch_defaults_off_on_cpu(fused_switch):
    fused_switch(None)
    assert not fused_kernels_enabled(torch.device("cpu"))
    assert fused_kernels_enabled(torch.device("cuda")) == triton_available()
    fused_switch(True)
    assert fused_kernels_enabled(torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        fused_switch(True, backend="cuda")


def test_block_fuses_only_in_inference(fused_switch, monkeypatch):
    """Training mode, active dropout and tensors needing a gradient keep the unfused modules."""
    fused_switch(True)
    calls = []
    real = layers.groupnorm_film_silu
    monkeypatch.setattr(layers, "groupnorm_film_silu", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    block = Block(4, 8, groups=2, dropout=0.1)
    x = torch.randn(2, 4, 6, 6)
    ss = (torch.randn(2, 8, 1, 1), torch.randn(2, 8, 1, 1))
    block.train()
    block(x, ss).sum().backward()  # unfused: gradients flow
    assert not calls
    block.eval()
    block(x, ss).sum().backward()  # eval, but the parameters need gradients: unfused
    assert not calls
    with torch.no_grad():
        fused = block(x, ss)
        assert calls
        fused_switch(False)
        torch.testing.assert_close(fused, block(x, ss), rtol=1e-5, atol=1e-5)


def test_block_under_autocast_matches_unfused(fused_switch):
    torch.manual_seed(0)
    block = Block(8, 16, groups=2, dropout=0.0).eval()
    x = torch.randn(2, 8, 6, 6)
    ss = tuple(t.bfloat16() for t in (torch.randn(2, 16, 1, 1), torch.randn(2, 16, 1, 1)))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused_switch(False)
        ref = block(x, ss)
        fused_switch(True)
        out = block(x, ss)
    assert out.dtype == ref.dtype  # CPU autocast leaves group_norm in bf16 (CUDA autocast: float32)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2.0 ** -6, atol=2.0 ** -6)


@needs_triton
def test_image_unet_forward_fused_on_vs_off(interpret, fused_switch):
    torch.manual_seed(0)
    net = ImageUNet(ImageUNetConfig.tiny()).eval()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    mask[..., :4, :] = 2
    with torch.inference_mode():
        fused_switch(False)
        ref = net(x, t, mask)
        fused_switch(True, backend="triton")
        out = net(x, t, mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_mask_unet_forward_fused_fallback_vs_off(fused_switch):
    torch.manual_seed(0)
    net = MaskUNet(MaskUNetConfig.tiny()).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    with torch.inference_mode():
        fused_switch(False)
        ref = net(x, t, torch.tensor([0, 1]))
        fused_switch(True, backend="torch")
        out = net(x, t, torch.tensor([0, 1]))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
