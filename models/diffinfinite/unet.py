"""DiffInfinite image denoiser: the mask-conditioned UNet of the official release.

Architecture (reference §3; official ``dm.Unet`` at marcoaversa/diffinfinite @ 4d23096, config
``image_gen_sample{5,10}.yaml``): 7×7 stem; per level two ResBlocks (FiLM from concat(time, class)
embeddings), a pre-norm residual mask cross-attention and a 4×4 stride-2 downsample (3×3 conv at the last
level); mid ResBlock / cross-attention / ResBlock; mirrored up path whose ResBlocks each concatenate a skip;
final ResBlock on concat(x, stem) and a 1×1 conv. Module names equal the official ones, so the official EMA
weights load with ``strict=True`` once the checkpoint prefix is stripped (see
:mod:`models.diffinfinite.checkpoints`).

Mask conditioning
-----------------
``mask`` holds ``binary_mask × label`` (0 = unknown / null). One downsampling path serves training and
sampling (the official code max-pools the 512² training mask straight to every feature resolution — a
dilation — but nearest-downsamples the mask to the latent size at sampling; reference §14 #10):

1. :func:`downsample_label_mask` takes the mask to the latent size by nearest sampling (the top-left pixel
   of each f×f block, identical to ``F.interpolate(mode="nearest")`` at an integer factor) — exactly what
   the official sampler feeds the network;
2. the class index is the maximum label of each sample's latent-size mask;
3. every cross-attention layer uses the binarised (> 0) mask max-pooled to its feature resolution, as in the
   official layer when it receives a latent-size mask.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from models.diffinfinite.attention import ATTENTION_IMPLS, MaskCrossAttention
from models.diffinfinite.layers import (
    Downsample,
    PreNorm,
    Residual,
    ResnetBlock,
    SinusoidalPosEmb,
    Upsample,
    embedding_mlp,
)


def _config_from_dict(cls, data: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config field(s) {unknown}; expected a subset of {sorted(names)}")
    kwargs = dict(data)
    if "dim_mults" in kwargs:
        kwargs["dim_mults"] = tuple(int(m) for m in kwargs["dim_mults"])
    return cls(**kwargs)


class UNetConfigMethods:
    """What both UNet configuration dataclasses share: size rule, (de)serialisation, validation."""

    @property
    def downsample_factor(self) -> int:
        """Latent h and w must be multiples of this."""
        return 2 ** (len(self.dim_mults) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dim_mults"] = list(self.dim_mults)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _config_from_dict(cls, data)

    def validate(self) -> None:
        if self.dim % 2 or self.dim < 4:
            raise ValueError(f"dim must be even and >= 4, got {self.dim}")
        if not self.dim_mults or any(int(m) < 1 for m in self.dim_mults):
            raise ValueError(f"dim_mults must be positive integers, got {self.dim_mults}")
        for m in (1, *self.dim_mults):
            if (self.dim * m) % self.resnet_block_groups:
                raise ValueError(
                    f"channel count {self.dim * m} is not divisible by resnet_block_groups={self.resnet_block_groups}"
                )
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")


@dataclass
class ImageUNetConfig(UNetConfigMethods):
    dim: int = 256
    dim_mults: tuple[int, ...] = (1, 2, 4)
    channels: int = 4
    num_classes: int = 5
    resnet_block_groups: int = 2
    attn_heads: int = 4
    attn_dim_head: int = 32
    dropout: float = 0.05

    @classmethod
    def official(cls, num_classes: int = 5) -> "ImageUNetConfig":
        """The released image model (5 or 10 classes incl. 0 = unknown): 172.10 M parameters."""
        return cls(num_classes=num_classes)

    @classmethod
    def tiny(cls, num_classes: int = 5) -> "ImageUNetConfig":
        """Same topology at a few hundred k parameters (tests, the untrained default)."""
        return cls(dim=16, dim_mults=(1, 2, 2), num_classes=num_classes, attn_heads=4, attn_dim_head=8)



class UNetSkeleton(nn.Module):
    """Shared down/mid/up layout of both official UNets (registration order = official state_dict order)."""

    def _build_levels(
        self,
        *,
        dim: int,
        dim_mults: tuple[int, ...],
        channels: int,
        groups: int,
        dropout: float,
        cond_dim: int,
        level_attn: Callable[[int], nn.Module],
        mid_attn: Callable[[int], nn.Module],
    ) -> None:
        dims = [dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        n = len(in_out)

        def block(a: int, b: int) -> ResnetBlock:
            return ResnetBlock(a, b, cond_dim=cond_dim, groups=groups, dropout=dropout)

        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == n - 1
            self.downs.append(
                nn.ModuleList(
                    [
                        block(d_in, d_in),
                        block(d_in, d_in),
                        Residual(PreNorm(d_in, level_attn(d_in))),
                        nn.Conv2d(d_in, d_out, 3, padding=1) if last else Downsample(d_in, d_out),
                    ]
                )
            )
        mid = dims[-1]
        self.mid_block1 = block(mid, mid)
        self.mid_attn = Residual(PreNorm(mid, mid_attn(mid)))
        self.mid_block2 = block(mid, mid)
        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            last = i == n - 1
            self.ups.append(
                nn.ModuleList(
                    [
                        block(d_out + d_in, d_out),
                        block(d_out + d_in, d_out),
                        Residual(PreNorm(d_out, level_attn(d_out))),
                        nn.Conv2d(d_out, d_in, 3, padding=1) if last else Upsample(d_out, d_in),
                    ]
                )
            )
        self.final_res_block = block(dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, channels, 1)

    def _run(self, x: Tensor, cond: Tensor, attn_args: Callable[[int], tuple]) -> Tensor:
        """``attn_args(level)``: the extra attention arguments at level ``level`` (resolution ÷ 2**level)."""
        x = self.init_conv(x)
        stem = x
        skips: list[Tensor] = []
        n = len(self.downs)
        for level, (block1, block2, attn, down) in enumerate(self.downs):
            x = block1(x, cond)
            skips.append(x)
            x = block2(x, cond)
            x = attn(x, *attn_args(level))
            skips.append(x)
            x = down(x)
        x = self.mid_block1(x, cond)
        x = self.mid_attn(x, *attn_args(n - 1))
        x = self.mid_block2(x, cond)
        for i, (block1, block2, attn, up) in enumerate(self.ups):
            x = block1(torch.cat((x, skips.pop()), dim=1), cond)
            x = block2(torch.cat((x, skips.pop()), dim=1), cond)
            x = attn(x, *attn_args(n - 1 - i))
            x = up(x)
        x = self.final_res_block(torch.cat((x, stem), dim=1), cond)
        return self.final_conv(x)

    def _check_latent(self, x: Tensor, channels: int, factor: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"x must be [B, {channels}, h, w], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % factor or w % factor or h == 0 or w == 0:
            raise ValueError(f"latent height and width must be positive multiples of {factor}, got {h}×{w}")

    def _time_embedding(self, time: Tensor | int, batch: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(time, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"time must be [B]={batch} (or a scalar), got {tuple(t.shape)}")
        emb = self.time_mlp[0](t).to(self.time_mlp[1].weight.dtype)  # float32 sinusoids → weight dtype
        return self.time_mlp[1:](emb)


def downsample_label_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-downsample an integer label mask [B, 1, H, W] (or [B, H, W]) to ``size`` = (h, w).

    ``H/h`` and ``W/w`` must be equal positive integers; the kept pixel of each block is its top-left one
    (``F.interpolate(mode="nearest")`` at an integer factor). The single mask path of training and sampling.
    """
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, 1, H, W] or [B, H, W], got {tuple(mask.shape)}")
    H, W = mask.shape[-2:]
    h, w = size[0], size[1]  # ints or SymInts: int() would specialise dynamic shapes under torch.compile
    if (H, W) == (h, w):
        return mask
    if h <= 0 or w <= 0 or H % h or W % w or H // h != W // w:
        raise ValueError(
            f"mask {H}×{W} cannot be nearest-downsampled to the latent {h}×{w}: "
            "it must be the latent size or an equal integer multiple of it in both axes"
        )
    f = H // h
    return mask[:, :, ::f, ::f]


def check_label_values(labels: Tensor | Iterable[int], num_classes: int, what: str) -> None:
    """Raise unless every label lies in ``[0, num_classes)``; ``labels`` is an integer tensor or Python ints.

    Kept out of the networks' ``forward``: reading a tensor's range back to the host stalls the GPU and breaks
    ``torch.compile`` graphs, so callers check once per job / per new label instead (out-of-range labels would
    otherwise index past the class embedding: a device-side assert on CUDA).
    """
    if isinstance(labels, Tensor):
        _check_label_dtype(labels, what)
        if labels.numel() == 0:
            return
        lo, hi = (int(v) for v in torch.aminmax(labels.to(torch.int64)))
    else:
        values = [operator.index(u) for u in labels]
        if not values:
            return
        lo, hi = min(values), max(values)
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{what} labels must lie in [0, {num_classes - 1}], found values in [{lo}, {hi}]")


def _check_label_dtype(labels: Tensor, what: str) -> None:
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"{what} must be an integer (or bool) tensor of labels, got {labels.dtype}")


class ImageUNet(UNetSkeleton):
    """ε-prediction network ``forward(x [B,4,h,w], time [B], mask [B,1,H,W]) → [B,4,h,w]``.

    ``forward`` has no host synchronisation (it compiles to one ``torch.compile`` graph); the mask's label range
    is checked by :meth:`check_labels`, which callers run once per job or new label.
    """

    def __init__(self, config: ImageUNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        dim = config.dim
        emb_dim = dim * 4
        self.init_conv = nn.Conv2d(config.channels, dim, 7, padding=3)
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), *embedding_mlp(dim, emb_dim))
        self.classes_emb = nn.Embedding(config.num_classes, dim)
        self.classes_mlp = nn.Sequential(*embedding_mlp(dim, emb_dim))

        def cross(d: int) -> nn.Module:
            return MaskCrossAttention(d, heads=config.attn_heads, dim_head=config.attn_dim_head)

        self._build_levels(
            dim=dim,
            dim_mults=tuple(config.dim_mults),
            channels=config.channels,
            groups=config.resnet_block_groups,
            dropout=config.dropout,
            cond_dim=2 * emb_dim,
            level_attn=cross,
            mid_attn=cross,
        )

    def check_labels(self, mask_or_labels: Tensor | Iterable[int]) -> None:
        """Raise ``ValueError`` unless every label of a mask (or of an iterable of Python ints) is a class of
        this model. ``forward`` does not check (no host sync inside it): call this once per job / new label."""
        check_label_values(mask_or_labels, self.config.num_classes, "mask")

    def set_attention_impl(self, impl: str) -> "ImageUNet":
        """``"linear"`` (default, exact O(N)) or ``"quadratic"`` (the official N×N computation)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
        for m in self.modules():
            if isinstance(m, MaskCrossAttention):
                m.impl = impl
        return self

    def latent_mask(self, mask: Tensor, size: tuple[int, int]) -> Tensor:
        """The latent-size label mask the network conditions on (dtype-checked; label range: see
        :meth:`check_labels`)."""
        _check_label_dtype(mask, "mask")
        return downsample_label_mask(mask, size)

    def forward(self, x: Tensor, time: Tensor, mask: Tensor) -> Tensor:
        cfg = self.config
        self._check_latent(x, cfg.channels, cfg.downsample_factor)
        b, _, h, w = x.shape
        if mask.shape[0] != b:
            raise ValueError(f"mask batch {mask.shape[0]} does not match x batch {b}")
        lat = self.latent_mask(mask, (h, w))
        classes = lat.reshape(b, -1).amax(dim=1).long()
        binary = (lat > 0).to(x.dtype)
        t = self._time_embedding(time, b, x.device)
        c = self.classes_mlp(self.classes_emb(classes))
        cond = torch.cat((t, c), dim=-1)
        # one binary mask per level, keyed by the level rather than the feature size (a size key would pin the
        # latent size as a constant under torch.compile's dynamic shapes)
        pooled = [binary] + [torch.nn.functional.max_pool2d(binary, 2 ** i) for i in range(1, len(self.downs))]
        return self._run(x, cond, lambda level: (pooled[level],))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
