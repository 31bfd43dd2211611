"""The UNets under torch.compile: one graph (no graph break, no host sync) for both networks, tiny and official
configurations, fp32 / inference mode / bf16 autocast; few recompiles across window shapes; label checks outside
forward (the networks' check_labels, called by the sampler adapters once per label)."""
from __future__ import annotations

import time

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from models.diffinfinite.guidance import ImageDenoiser, MaskDenoiser
from models.diffinfinite.layers import WeightStandardizedConv2d
from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _image_inputs(b: int, h: int, w: int, device="cpu"):
    g = torch.Generator().manual_seed(b * 1000 + h)
    x = torch.randn(b, 4, h, w, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    mask = torch.zeros(b, 1, h, w, dtype=torch.long)
    mask[0, :, : h // 2] = 2
    mask[-1, :, :, w // 2:] = 4
    return x, t, mask.to(device)


def _graphs(cnt: CompileCounterWithBackend) -> int:
    """Graphs compiled (a restarted analysis, e.g. when a Python float becomes symbolic, counts a frame with an
    empty graph)."""
    return sum(1 for g in cnt.graphs if len(g.graph.nodes))


def _compiled(net, backend="aot_eager"):
    cnt = CompileCounterWithBackend(backend)
    return torch.compile(net, fullgraph=True, backend=cnt), cnt


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_tiny_image_unet_is_one_graph(autocast):
    torch.manual_seed(0)
    net = ImageUNet(ImageUNetConfig.tiny()).eval()
    compiled, cnt = _compiled(net)
    x, t, mask = _image_inputs(2, 16, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = compiled(x, t, mask)
        again = compiled(x, t, mask)
        # the compiled WS-convs standardise in the graph: no Python-side cache written
        assert all(m._ws_cache is None for m in net.modules() if isinstance(m, WeightStandardizedConv2d))
        ref = net(x, t, mask)
    assert cnt.frame_count == 1 and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_tiny_mask_unet_is_one_graph(autocast):
    torch.manual_seed(0)
    net = MaskUNet(MaskUNetConfig.tiny()).eval()
    compiled, cnt = _compiled(net)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999])
    classes = torch.tensor([0, 1, 1])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for p in (0.0, 1.0):
            torch.testing.assert_close(compiled(x, t, classes, cond_drop_prob=p), net(x, t, classes, cond_drop_prob=p),
                                       rtol=1e-5, atol=1e-5)
    assert _graphs(cnt) == 2  # the conditional pass (p = 0) and one graph for any other p


def test_fused_kernel_stays_in_the_graph():
    """With the fused GroupNorm → FiLM → SiLU on (the torch-fallback implementation of the op on CPU), Blocks
    call one torch op, which the compiler keeps in the graph."""
    from models.diffinfinite.layers import set_fused_kernels

    torch.manual_seed(0)
    net = ImageUNet(ImageUNetConfig.tiny()).eval()
    compiled, cnt = _compiled(net)
    x, t, mask = _image_inputs(2, 16, 16)
    try:
        with torch.inference_mode():
            ref = net(x, t, mask)
            set_fused_kernels(True, backend="torch")
            out = compiled(x, t, mask)
    finally:
        set_fused_kernels(None)
    assert cnt.frame_count == 1
    assert any("groupnorm_film_silu" in str(n.target) for g in cnt.graphs for n in g.graph.nodes)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["image", "mask"])
def test_official_unets_are_one_graph(kind):
    """The official configurations on the meta device: the topology compiles whole (bf16 weights, as served)."""
    with torch.device("meta"):
        if kind == "image":
            net = ImageUNet(ImageUNetConfig.official()).eval().to(torch.bfloat16)
            args = (torch.randn(2, 4, 64, 64, dtype=torch.bfloat16), torch.tensor([3, 4]),
                    torch.zeros(2, 1, 64, 64, dtype=torch.long))
        else:
            net = MaskUNet(MaskUNetConfig.official()).eval().to(torch.bfloat16)
            args = (torch.randn(2, 4, 16, 16, dtype=torch.bfloat16), torch.tensor([3, 4]), torch.tensor([0, 1]))
    compiled, cnt = _compiled(net)
    with torch.inference_mode():
        out = compiled(*args)
    assert cnt.frame_count == 1 and out.shape == args[0].shape and out.dtype == torch.bfloat16


def test_window_shapes_and_batches_compile_a_few_graphs_not_one_per_block():
    """Dynamo's automatic dynamic shapes: each dimension that changes costs one recompile, then one symbolic
    graph serves every window; no recompile per ResBlock (WS-conv cache guards) or per latent size (mask
    pooling keyed by size). Meta tensors: only tracing is measured."""
    with torch.device("meta"):
        net = ImageUNet(ImageUNetConfig.tiny()).eval()
    compiled, cnt = _compiled(net, backend="eager")
    seen = []
    with torch.inference_mode():
        for b, h, w in ((8, 64, 64), (16, 64, 64), (8, 32, 64), (16, 32, 64), (16, 64, 64), (12, 48, 32),
                        (8, 40, 56)):
            compiled(*_image_inputs(b, h, w, device="meta"))
            seen.append(cnt.frame_count)
    # static; batch symbolic; height symbolic (reused for 16×32×64 and 16×64×64); width symbolic (reused after)
    assert seen == [1, 2, 3, 3, 3, 4, 4], seen


@pytest.mark.slow
def test_inductor_compile_of_tiny_image_unet_matches_eager():
    """Inductor on CPU (C++ kernels): ≈100 s cold on 2 cores, ≈8 s with a warm inductor cache."""
    torch.manual_seed(0)
    net = ImageUNet(ImageUNetConfig.tiny()).eval()
    x, t, mask = _image_inputs(2, 16, 16)
    compiled = torch.compile(net, fullgraph=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = compiled(x, t, mask)
        ref = net(x, t, mask)
    print(f"inductor first call: {time.perf_counter() - t0:.1f} s")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- label checks
class _Spy(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.checked: list[list[int]] = []

    def check_labels(self, labels):
        self.checked.append(list(labels))
        self.net.check_labels(labels)

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


def test_image_adapter_checks_each_label_once():
    torch.manual_seed(0)
    spy = _Spy(ImageUNet(ImageUNetConfig.tiny(5)).eval())
    d = ImageDenoiser(spy)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 10, 10])
    lw = torch.zeros(3, 8, 8, dtype=torch.long)
    lw[:, :4] = 3
    lw[2, 4:] = 1
    d(x, t, lw, [None, 3, 1])
    d(x, t, lw, [3, 3, None])
    d(x, t, lw, [1, None, 4])
    assert spy.checked == [[1, 3], [4]]
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        d(x, t, lw, [5, None, 1])
    with pytest.raises(ValueError, match=r"\[0, 4\]"):  # a rejected label is not remembered as checked
        d(x, t, lw, [5, None, 1])


def test_mask_adapter_checks_subtypes_and_works_with_a_compiled_network():
    torch.manual_seed(0)
    net = MaskUNet(MaskUNetConfig.tiny()).eval()
    compiled, cnt = _compiled(net, backend="eager")  # dynamo only: the adapter, not the compiler, is tested
    d = MaskDenoiser(compiled)  # the compile wrapper forwards check_labels to the network
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([7, 7])
    lw = torch.zeros(2, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        d(x, t, lw, [0, 2])
    out = d(x, t, lw, [1, None])
    torch.testing.assert_close(out, MaskDenoiser(net)(x, t, lw, [1, None]), rtol=1e-5, atol=1e-5)
    assert _graphs(cnt) == 2  # the conditional and the null pass
