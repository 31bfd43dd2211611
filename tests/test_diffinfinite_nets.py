"""DiffInfinite networks: shape/dtype contracts, official layout (meta device), exact linear attention, caching."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.diffinfinite.attention import (
    MaskCrossAttention,
    mask_cross_attention_linear,
    mask_cross_attention_quadratic,
)
from models.diffinfinite.layers import WeightStandardizedConv2d
from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig, count_parameters, downsample_label_mask

MANIFESTS = Path(__file__).resolve().parent / "data" / "checkpoints"  # copies of shared/reference/checkpoints

OFFICIAL = [
    ("diffinfinite_image_unet_5cls.json", lambda: ImageUNet(ImageUNetConfig.official(5)), 172_101_124),
    ("diffinfinite_image_unet_10cls.json", lambda: ImageUNet(ImageUNetConfig.official(10)), 172_102_404),
    ("diffinfinite_mask_unet_5cls.json", lambda: MaskUNet(MaskUNetConfig.official()), 38_401_988),
]




def _tiny_image(seed=0, **kw) -> ImageUNet:
    torch.manual_seed(seed)
    return ImageUNet(ImageUNetConfig(**{**ImageUNetConfig.tiny().__dict__, **kw})).eval()


def _tiny_mask(seed=0) -> MaskUNet:
    torch.manual_seed(seed)
    return MaskUNet(MaskUNetConfig.tiny()).eval()


@pytest.mark.parametrize("manifest,build,n_params", OFFICIAL, ids=["image5", "image10", "mask"])
def test_official_layout_on_meta_device(manifest, build, n_params):
    path = MANIFESTS / manifest
    if not path.is_file():
        pytest.fail(f"reference manifest {path} missing")
    ref = json.loads(path.read_text())
    with torch.device("meta"):
        net = build()
    ours = [[k, list(v.shape), "float32"] for k, v in net.state_dict().items()]
    assert ours == ref["state_dict"]  # names, shapes and registration order
    assert count_parameters(net) == ref["num_parameters"] == n_params
    for prefix, count in ref["parameter_count_by_module"].items():
        assert sum(v.numel() for k, v in net.state_dict().items() if k == prefix or k.startswith(prefix + ".")) == count


def test_image_unet_contract():
    net = _tiny_image()
    assert 1e5 < count_parameters(net) < 1e6
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([3, 999])
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    mask[0, :, 2:9, 4:15] = 3
    with torch.no_grad():
        out = net(x, t, mask)
        assert out.shape == x.shape and out.dtype == torch.float32
        # training passes the image-resolution mask (8h × 8w): the same nearest path as sampling
        big = mask.repeat_interleave(8, -2).repeat_interleave(8, -1)
        assert torch.equal(net(x, t, big), out)
        big_shifted = big.clone()
        big_shifted[:, :, 1::8, :] = 0  # not the kept (top-left) pixel of any block
        assert torch.equal(net(x, t, big_shifted), out)
        assert torch.equal(net(x, t, mask.to(torch.uint8)), out)
        # rectangular latents, any size divisible by 2**(levels-1)
        assert net(torch.randn(1, 4, 8, 20), torch.tensor([5]), torch.zeros(1, 1, 8, 20, dtype=torch.long)).shape == (1, 4, 8, 20)


def test_class_index_is_the_mask_maximum():
    net = _tiny_image()
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    region = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    region[..., 4:12, 2:10] = 1
    with torch.no_grad():
        two_labels = region * 3
        two_labels[..., 4:8, 2:10] = 1  # same support, labels {1, 3}: class = 3
        assert torch.equal(net(x, t, two_labels), net(x, t, region * 3))
        assert not torch.allclose(net(x, t, region * 2), net(x, t, region * 3))
        # the query depends only on the binary mask: same class, different support → different output
        other = torch.zeros_like(region)
        other[..., 0:4, 0:16] = 3
        assert not torch.allclose(net(x, t, other), net(x, t, region * 3))


def test_linear_attention_equals_quadratic():
    torch.manual_seed(0)
    attn = MaskCrossAttention(24, heads=3, dim_head=8)
    x = torch.randn(4, 24, 12, 10)
    mask = torch.rand(4, 1, 12, 10) > 0.6
    mask[1] = False  # no mask pixel: every position takes mean(V)
    mask[2] = True  # all mask pixels
    with torch.no_grad():
        lin = mask_cross_attention_linear(attn, x, mask)
        quad = mask_cross_attention_quadratic(attn, x, mask)
    assert (lin - quad).abs().max().item() < 1e-5
    assert not torch.allclose(lin[0], lin[1])

    net = _tiny_image()
    x = torch.randn(2, 4, 16, 16)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    mask[0, :, 3:11, 5:13] = 2
    with torch.no_grad():
        a = net(x, torch.tensor([10, 700]), mask)
        b = net.set_attention_impl("quadratic")(x, torch.tensor([10, 700]), mask)
    net.set_attention_impl("linear")
    assert (a - b).abs().max().item() < 1e-5


def test_weight_standardisation_cache_tracks_weights():
    net = _tiny_image(dropout=0.0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([42])
    mask = torch.ones(1, 1, 8, 8, dtype=torch.long)
    with torch.no_grad():
        first = net(x, t, mask)
    conv = next(m for m in net.modules() if isinstance(m, WeightStandardizedConv2d))
    assert conv._ws_cache is not None
    with torch.no_grad():
        assert torch.equal(net(x, t, mask), first)
        conv.weight.add_(torch.randn_like(conv.weight))  # in-place update invalidates the cache
        changed = net(x, t, mask)
    assert not torch.allclose(changed, first)
    net.train()  # no cache in training mode (dropout 0: same function)
    torch.testing.assert_close(net(x, t, mask).detach(), changed, rtol=0, atol=1e-6)
    net.eval()
    other = _tiny_image(seed=1, dropout=0.0)
    net.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, mask), other(x, t, mask), rtol=0, atol=0)


def test_mask_unet_contract():
    net = _tiny_mask()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        cond0 = net(x, t, torch.tensor([0, 0, 0]))
        cond1 = net(x, t, torch.tensor([1, 1, 1]))
        null = net(x, t, torch.tensor([0, 0, 0]), cond_drop_prob=1.0)
        assert cond0.shape == x.shape and cond0.dtype == torch.float32
        assert not torch.allclose(cond0, cond1) and not torch.allclose(cond0, null)
        torch.testing.assert_close(net(x, t, torch.tensor([1, 1, 1]), cond_drop_prob=1.0), null, rtol=0, atol=0)
        torch.manual_seed(5)
        mixed = net(x, t, torch.tensor([0, 0, 0]), cond_drop_prob=0.5)
    for i in range(3):
        assert torch.allclose(mixed[i], cond0[i], atol=1e-6) or torch.allclose(mixed[i], null[i], atol=1e-6)


def test_bad_inputs():
    net = _tiny_image()
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([1])
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        net.check_labels(torch.full((1, 1, 16, 16), 5))
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        net.check_labels([0, 3, 5])
    net.check_labels([0, 4])
    net.check_labels(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="integer"):
        net.check_labels(torch.zeros(1, 1, 16, 16))
    with pytest.raises(TypeError, match="integer"):
        net(x, t, torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.randn(1, 4, 10, 16), t, torch.zeros(1, 1, 10, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="integer multiple"):
        net(x, t, torch.zeros(1, 1, 20, 20, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        net(torch.randn(1, 3, 16, 16), t, torch.zeros(1, 1, 16, 16, dtype=torch.long))
    mnet = _tiny_mask()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mnet.check_labels(torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mnet.check_labels([-1])
    mnet.check_labels([0, 1])
    with pytest.raises(ValueError, match="cond_drop_prob"):
        mnet(torch.randn(1, 4, 8, 8), t, torch.tensor([0]), cond_drop_prob=1.5)
    assert downsample_label_mask(torch.arange(16).reshape(1, 4, 4), (2, 2)).tolist() == [[[[0, 2], [8, 10]]]]


def test_reduced_precision_contracts():
    net, mnet = _tiny_image(), _tiny_mask()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 800])
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    mask[0, :, :4] = 2
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training: bf16 autocast, fp32 weights and grads
        out = net(x, t, mask)
        mout = mnet(x, t, torch.tensor([0, 1]), cond_drop_prob=0.5)
    (out.float().square().mean() + mout.float().square().mean()).backward()
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and mout.dtype == torch.bfloat16
    assert net.init_conv.weight.grad.dtype == torch.float32 and net.init_conv.weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():  # inference with bf16 weights
        ref = net(x, t, mask)
        low = net.to(torch.bfloat16)(x.bfloat16(), t, mask)
        mlow = mnet.to(torch.bfloat16)(x.bfloat16(), t, torch.tensor([0, 1]))
    assert low.dtype == torch.bfloat16 and mlow.dtype == torch.bfloat16
    assert (low.float() - ref).abs().mean() < 0.1 * ref.abs().mean()
