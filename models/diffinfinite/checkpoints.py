"""DiffInfinite checkpoints: the official release's ``.pt`` files and our safetensors files.

Official file layout (reference diffinfinite.md §13, checkpoints/*.json)
------------------------------------------------------------------------
``torch.save`` of a plain dict with ``step``, ``loss``, ``lr``, ``model``, ``opt``, ``scheduler``, ``ema``,
``scaler`` (+ ``version`` for the mask trainer). ``ema`` is the ema-pytorch wrapper's state dict:
``initted``, ``step``, ``online_model.*`` (schedule buffers and ``online_model.model.<unet key>``) and
``ema_model.*`` (buffers and ``ema_model.model.<unet key>``). Sampling uses the EMA weights.

Key mapping (official → ours)
-----------------------------
``ema_model.model.<k>`` → ``<k>`` for every UNet key ``k``; nothing else is renamed, because our modules carry
the official names (:mod:`models.diffinfinite.unet`, :mod:`models.diffinfinite.mask_unet`). With
``weights="online"`` the non-EMA entry is used instead: ``model.<k>`` (inside ``ckpt["model"]``) → ``<k>``.
The 13 GaussianDiffusion schedule buffers and the EMA wrapper's ``initted``/``step`` are dropped (the
schedule is recomputed by the sampler). A bare UNet state dict (keys already ``<k>``) is accepted as is.

Which model a file holds is read from its keys (``null_classes_emb`` / ``to_qkv`` → mask model, ``to_kv`` →
image model); widths, level multipliers and the class count from the tensor shapes. The attention head
split is not visible in shapes: it is taken to be the official 4 heads when the attention width divides by 4.

Loading ``.pt`` files
---------------------
``torch.load(weights_only=True)`` first. Files written by the official trainer (torch 2.0) may hold a pickled
bound method in the LR-scheduler entry, which the weights-only unpickler refuses; we then unpickle again with
an allowlisting unpickler that builds tensors and plain containers and replaces every other global by an inert
placeholder (nothing from the file is imported or called), and we only read tensors from the result.
"""
from __future__ import annotations

import json
import pickle
import re
import types
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from models.diffinfinite.mask_unet import MaskUNet, MaskUNetConfig
from models.diffinfinite.unet import ImageUNet, ImageUNetConfig
from models.hashing import sha256_file
from models.state_dicts import KeyMismatch, compare_state_dicts, mismatch_message

OFFICIAL_EMA_PREFIX = "ema_model.model."
OFFICIAL_ONLINE_PREFIX = "model."  # inside ckpt["model"]
IMAGE_WEIGHTS = "image_unet.safetensors"
MASK_WEIGHTS = "mask_unet.safetensors"

Kind = Literal["image", "mask"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a DiffInfinite model."""


class CheckpointKeyError(CheckpointError):
    """State dict keys or shapes that do not match the network; lists every offending key."""

    def __init__(self, what: str, mismatch: KeyMismatch):
        self.missing, self.unexpected, self.mismatched = mismatch.missing, mismatch.unexpected, mismatch.mismatched
        super().__init__(mismatch_message(what, "the network", mismatch))


# ------------------------------------------------------------------------------------------------ torch.load


class _Opaque:
    """Inert stand-in for a pickled object whose class we refuse to import."""

    _name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __call__(self, *args, **kwargs):
        return _opaque_class(self._name + "()")()

    def __repr__(self):
        return f"<opaque {self._name}>"


def _opaque_class(name: str) -> type:
    return type("Opaque", (_Opaque,), {"_name": name})


def _allowed_globals() -> dict[str, Any]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = dict(_get_allowed_globals())
    except Exception:  # pragma: no cover - private API moved
        allowed = {}
    import collections

    allowed.setdefault("collections.OrderedDict", collections.OrderedDict)
    return allowed


class _AllowlistUnpickler(pickle.Unpickler):
    _allowed: dict[str, Any] | None = None

    def find_class(self, module: str, name: str):
        if _AllowlistUnpickler._allowed is None:
            _AllowlistUnpickler._allowed = _allowed_globals()
        full = f"{module}.{name}"
        if full in _AllowlistUnpickler._allowed:
            return _AllowlistUnpickler._allowed[full]
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if module == "torch._utils" and name.startswith("_rebuild_") and hasattr(torch._utils, name):
            return getattr(torch._utils, name)
        return _opaque_class(full)


_allowlist_pickle = types.ModuleType("slidesynth_allowlist_pickle")
_allowlist_pickle.Unpickler = _AllowlistUnpickler
_allowlist_pickle.load = lambda f, **kw: _AllowlistUnpickler(f, **kw).load()
_allowlist_pickle.__name__ = "slidesynth_allowlist_pickle"


def load_torch_file(path: str | Path) -> Any:
    """``torch.load`` on CPU, weights-only first; see the module docstring for the fallback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_allowlist_pickle)
        lines = [ln.strip() for ln in str(first).splitlines() if "global" in ln.lower()] or str(first).splitlines()[:1]
        warnings.warn(
            f"{path}: weights-only loading refused a non-tensor object ({lines[0][:200]}); "
            "read it with an allowlisting unpickler instead (only tensors are used; other objects are inert "
            "placeholders)",
            stacklevel=2,
        )
        return obj
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} as a torch checkpoint: weights-only loading failed ({first}) and the "
            f"allowlisting fallback failed too ({type(exc).__name__}: {exc})"
        ) from exc


# ------------------------------------------------------------------------------------------------ state dicts


def _tensor_items(d: Any) -> dict[str, Tensor]:
    if not isinstance(d, dict):
        return {}
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _looks_like_unet(sd: dict[str, Tensor]) -> bool:
    return "init_conv.weight" in sd and "final_conv.weight" in sd


def extract_unet_state_dict(obj: Any, weights: Literal["ema", "online"] = "ema", source: str = "checkpoint") -> dict[str, Tensor]:
    """The UNet state dict inside an official checkpoint dict (or a bare state dict)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, expected a dict (official layout or a state dict)")
    bare = _tensor_items(obj)
    if _looks_like_unet(bare):
        return bare
    if weights == "ema":
        if "ema" not in obj:
            raise CheckpointError(
                f"{source} has no 'ema' entry (top-level keys: {sorted(map(str, obj))}); "
                "use weights='online' (CLI: --weights online) to take the non-EMA 'model' entry"
            )
        entry, prefix = _tensor_items(obj["ema"]), OFFICIAL_EMA_PREFIX
    elif weights == "online":
        if "model" not in obj:
            raise CheckpointError(f"{source} has no 'model' entry (top-level keys: {sorted(map(str, obj))})")
        entry, prefix = _tensor_items(obj["model"]), OFFICIAL_ONLINE_PREFIX
    else:
        raise ValueError(f"weights must be 'ema' or 'online', got {weights!r}")
    sd = {k[len(prefix):]: v for k, v in entry.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{source}: no tensors under the prefix {prefix!r} in its {weights!r} entry")
    return sd


def detect_kind(sd: dict[str, Tensor], source: str = "state dict") -> Kind:
    keys = list(sd)
    if "null_classes_emb" in sd or any(k.endswith(".to_qkv.weight") for k in keys):
        return "mask"
    if any(k.endswith(".to_kv.weight") for k in keys):
        return "image"
    raise CheckpointError(
        f"{source} is neither a DiffInfinite image UNet (mask cross-attention 'to_kv' keys) nor a mask UNet "
        "('null_classes_emb' / 'to_qkv' keys)"
    )


def _shape(sd: dict[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointKeyError(source, [key], [], [])
    return tuple(sd[key].shape)


def _level_mults(sd: dict[str, Tensor], dim: int, source: str) -> tuple[int, ...]:
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"downs\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: cannot read the UNet levels from its 'downs.<i>' keys")
    mults = []
    for i in levels:
        out = _shape(sd, f"downs.{i}.3.weight", source)[0]
        if out % dim:
            raise CheckpointError(f"{source}: downs.{i}.3 has {out} output channels, not a multiple of dim={dim}")
        mults.append(out // dim)
    return tuple(mults)


def _heads(hidden: int, attn_heads: int | None) -> tuple[int, int]:
    heads = attn_heads or (4 if hidden % 4 == 0 else 1)
    if hidden % heads:
        raise CheckpointError(f"attention width {hidden} is not divisible by {heads} heads")
    return heads, hidden // heads


def infer_config(
    sd: dict[str, Tensor],
    kind: Kind | None = None,
    *,
    attn_heads: int | None = None,
    resnet_block_groups: int = 2,
    source: str = "state dict",
) -> ImageUNetConfig | MaskUNetConfig:
    """Network configuration read from a state dict's shapes (heads: see the module docstring)."""
    kind = kind or detect_kind(sd, source)
    dim, channels = _shape(sd, "init_conv.weight", source)[:2]
    num_classes = _shape(sd, "classes_emb.weight", source)[0]
    mults = _level_mults(sd, dim, source)
    if kind == "image":
        heads, dim_head = _heads(_shape(sd, "downs.0.2.fn.fn.to_q.weight", source)[0], attn_heads)
        return ImageUNetConfig(
            dim=dim, dim_mults=mults, channels=channels, num_classes=num_classes,
            resnet_block_groups=resnet_block_groups, attn_heads=heads, attn_dim_head=dim_head,
        )
    heads, dim_head = _heads(_shape(sd, "downs.0.2.fn.fn.to_qkv.weight", source)[0] // 3, attn_heads)
    return MaskUNetConfig(
        dim=dim, dim_mults=mults, channels=channels, num_classes=num_classes,
        resnet_block_groups=resnet_block_groups, attn_heads=heads, attn_dim_head=dim_head,
    )


def check_state_dict(model: nn.Module, sd: dict[str, Tensor], source: str = "state dict") -> None:
    """Raise :class:`CheckpointKeyError` listing missing, unexpected and wrongly shaped keys."""
    mismatch = compare_state_dicts(model.state_dict(), sd)
    if mismatch:
        raise CheckpointKeyError(source, mismatch)


def build_network(config: ImageUNetConfig | MaskUNetConfig) -> ImageUNet | MaskUNet:
    return ImageUNet(config) if isinstance(config, ImageUNetConfig) else MaskUNet(config)


def network_from_state_dict(
    sd: dict[str, Tensor],
    config: ImageUNetConfig | MaskUNetConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    source: str = "state dict",
) -> ImageUNet | MaskUNet:
    """Build the network without initialising it (meta device), then load ``sd`` with ``strict=True``."""
    with torch.device("meta"):
        net = build_network(config)
    check_state_dict(net, sd, source)
    net = net.to_empty(device=device)
    net.load_state_dict(sd, strict=True)
    net = net.to(dtype=dtype)
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ files


def save_network(net: ImageUNet | MaskUNet, path: str | Path) -> str:
    """Write ``net``'s weights as safetensors (config in the metadata); returns the file's sha256."""
    from safetensors.torch import save_file

    kind = "image" if isinstance(net, ImageUNet) else "mask"
    sd = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    meta = {"format": "pt", "engine": "diffinfinite", "kind": kind, "config": json.dumps(net.config.to_dict())}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)
    return sha256_file(path)


def read_checkpoint(
    path: str | Path, weights: Literal["ema", "online"] = "ema"
) -> tuple[Kind, dict[str, Tensor], dict[str, Any]]:
    """One loader for every accepted file: our ``.safetensors`` or an official (or bare) torch file.

    Returns (kind, UNet state dict, info) where info holds ``config`` (a dict, when the file records one),
    ``step`` (official files) and ``format``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    info: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        info["format"] = "safetensors"
        if "config" in meta:
            info["config"] = json.loads(meta["config"])
    else:
        obj = load_torch_file(path)
        sd = extract_unet_state_dict(obj, weights, source=str(path))
        info["format"] = "official" if isinstance(obj, dict) and ("ema" in obj or "model" in obj) else "state_dict"
        if isinstance(obj, dict):
            step = obj.get("step")
            if isinstance(step, (int, float)) or (isinstance(step, Tensor) and step.numel() == 1):
                info["step"] = int(step)
        info["weights"] = weights
    kind = detect_kind(sd, str(path))
    if "kind" in info and info["kind"] != kind:  # pragma: no cover - metadata/keys disagreement
        raise CheckpointError(f"{path}: metadata says {info['kind']} model, keys say {kind}")
    return kind, sd, info


def load_network(
    path: str | Path,
    config: ImageUNetConfig | MaskUNetConfig | dict | None = None,
    *,
    kind: Kind | None = None,
    weights: Literal["ema", "online"] = "ema",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ImageUNet | MaskUNet:
    """Load an image or mask UNet from any accepted file; ``config`` defaults to the file's or the inferred one."""
    found, sd, info = read_checkpoint(path, weights)
    if kind is not None and kind != found:
        raise CheckpointError(f"{path} holds a DiffInfinite {found} model, expected a {kind} model")
    cfg_cls = ImageUNetConfig if found == "image" else MaskUNetConfig
    if isinstance(config, dict):
        config = cfg_cls.from_dict(config)
    elif config is None and "config" in info:
        config = cfg_cls.from_dict(info["config"])
    elif config is None:
        config = infer_config(sd, found, source=str(path))
    if not isinstance(config, cfg_cls):
        raise CheckpointError(f"{path} holds a {found} model but a {type(config).__name__} was given")
    return network_from_state_dict(sd, config, device=device, dtype=dtype, source=str(path))


# ------------------------------------------------------------------------------------------------ conversion


def convert_official_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    vae: str | Path | None = None,
    link_vae: bool = False,
    name: str | None = None,
    num_labels: int | None = None,
    weights: Literal["ema", "online"] = "ema",
    attn_heads: int | None = None,
    class_names: dict[int, str] | None = None,
) -> Path:
    """Official ``.pt`` (image or mask model) → our folder (safetensors + model card [+ vae/]).

    An image model writes ``image_unet.safetensors``; a mask model writes ``mask_unet.safetensors``. When
    ``out_dir`` already holds a card (e.g. the image model converted first), the new file joins it and the
    card is updated, so converting the image and then the mask checkpoint into one folder gives a model
    ready to serve. ``num_labels`` (K of the image model the mask model pairs with: 5 or 10) selects the
    mask-latent divisors when there is no image model in the folder yet; default 5.
    """
    from models.cards import CARD_FILENAME, ModelCard
    from models.engine import is_model_of
    from models.diffinfinite.loading import default_class_names, make_card
    from models.vae import official_mask_divisors, resolve_vae_folder

    checkpoint, out = Path(checkpoint), Path(out_dir)
    if vae is not None:
        vae_src = resolve_vae_folder(vae)  # validate before writing anything
    kind, sd, info = read_checkpoint(checkpoint, weights)
    if info["format"] == "safetensors":
        raise CheckpointError(f"{checkpoint} is already in our safetensors format; no conversion needed")
    config = infer_config(sd, kind, attn_heads=attn_heads, source=str(checkpoint))
    net = network_from_state_dict(sd, config, source=str(checkpoint))

    out.mkdir(parents=True, exist_ok=True)
    card = ModelCard.load(out) if (out / CARD_FILENAME).is_file() else None
    if card is not None and not is_model_of(card, "diffinfinite"):
        raise CheckpointError(f"{out} already holds a {card.engine} model card; convert into an empty folder")
    source = {"checkpoint": checkpoint.name, "weights": weights, **({"step": info["step"]} if "step" in info else {})}
    if kind == "image":
        k = config.num_classes
        if card is None:
            card = make_card(name or out.name, image_config=config, trained=True, class_names=class_names)
        else:
            old = card.config.get("image_unet")
            if old and int(old.get("num_classes", k)) != k:
                raise CheckpointError(f"{out} is a {old['num_classes']}-class model; {checkpoint} has {k} classes")
            labels = int(card.config.get("num_labels", k))
            if card.config.get("mask_unet") and labels != k:
                raise CheckpointError(
                    f"the mask model in {out} was converted for K = {labels} labels but {checkpoint} has {k} classes; "
                    f"convert the mask checkpoint again with --num-labels {k}"
                )
            if labels != k:
                card.classes = default_class_names(k)
            card.config["image_unet"] = config.to_dict()
            card.config["num_labels"] = k
            card.trained = True
        if class_names:
            card.classes = {int(i): str(n) for i, n in class_names.items()}
        if k in (5, 10):
            card.config["mask_divisors"] = list(official_mask_divisors(k))
        card.training.setdefault("image_unet", {}).update({"source": "official DiffInfinite release", **source})
        card.files[IMAGE_WEIGHTS] = save_network(net, out / IMAGE_WEIGHTS)
    else:
        if card is None:
            k = int(num_labels or 5)
            card = make_card(name or out.name, image_config=None, num_labels=k, trained=True, class_names=class_names)
        elif num_labels and card.config.get("image_unet") and int(card.config["image_unet"]["num_classes"]) != num_labels:
            raise CheckpointError(
                f"--num-labels {num_labels} disagrees with the {card.config['image_unet']['num_classes']}-class "
                f"image model already in {out}"
            )
        elif num_labels and not card.config.get("image_unet"):
            card.config["num_labels"] = int(num_labels)
            card.config["mask_divisors"] = list(official_mask_divisors(int(num_labels)))
            card.classes = class_names or default_class_names(int(num_labels))
        card.config["mask_unet"] = config.to_dict()
        if "subtype" not in card.conditioning:
            card.conditioning = [*card.conditioning, "subtype"]
        card.training.setdefault("mask_unet", {}).update({"source": "official DiffInfinite release", **source})
        card.files[MASK_WEIGHTS] = save_network(net, out / MASK_WEIGHTS)
    if name:
        card.name = name
    if vae is not None:
        install_vae(vae_src, out / "vae", link=link_vae)
        for f in sorted((out / "vae").iterdir()):
            if f.is_file():
                card.files[f"vae/{f.name}"] = sha256_file(f)
    card.save(out)
    return out


def install_vae(src: str | Path, dst: str | Path, link: bool = False) -> Path:
    """Copy (or symlink) a validated AutoencoderKL folder to ``dst``."""
    import shutil

    from models.vae import resolve_vae_folder

    src = resolve_vae_folder(src)
    dst = Path(dst)
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.is_dir():
        if dst.resolve() == src.resolve():
            return dst
        shutil.rmtree(dst)
    if link:
        dst.symlink_to(src.resolve(), target_is_directory=True)
    else:
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin")):
                shutil.copy2(f, dst / f.name)
    return dst


def official_layout_checkpoint(
    unet_sd: dict[str, Tensor],
    *,
    step: int = 0,
    include_online: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A dict in the official trainer's save layout around a UNet state dict (for tests and round trips).

    ``ema``: ``initted``, ``step``, schedule buffers and ``online_model.model.*`` / ``ema_model.model.*``;
    ``model``: schedule buffers + ``model.*``. Tensors are shared, not copied (``torch.save`` stores each
    storage once).
    """
    buffers = _schedule_buffers()
    ema: dict[str, Any] = {"initted": torch.tensor([1.0]), "step": torch.tensor([step], dtype=torch.int64)}
    if include_online:
        ema.update({f"online_model.{k}": v for k, v in buffers.items()})
        ema.update({f"online_model.model.{k}": v for k, v in unet_sd.items()})
    ema.update({f"ema_model.{k}": v for k, v in buffers.items()})
    ema.update({f"{OFFICIAL_EMA_PREFIX}{k}": v for k, v in unet_sd.items()})
    model = {**buffers, **{f"{OFFICIAL_ONLINE_PREFIX}{k}": v for k, v in unet_sd.items()}}
    out = {
        "step": step,
        "loss": [1.0, 0.5],
        "lr": 1e-4,
        "model": model,
        "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.99), "params": []}]},
        "scheduler": {"total_steps": 250000, "last_epoch": step},
        "ema": ema,
        "scaler": None,
    }
    out.update(extra or {})
    return out


def _schedule_buffers(T: int = 1000, s: float = 0.008) -> dict[str, Tensor]:
    """The 13 GaussianDiffusion buffers of the cosine schedule (float32), as stored in official files."""
    from models.schedules import cosine_betas

    betas = cosine_betas(T, s, 0.999, normalize=True)
    alphas = 1.0 - betas
    acp = torch.cumprod(alphas, dim=0)
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    d = {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": acp.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - acp).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - acp).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / acp).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / acp - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * acp_prev.sqrt() / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp),
        "p2_loss_weight": torch.ones(T, dtype=torch.float64),
    }
    return {k: v.float() for k, v in d.items()}


__all__ = [
    "CheckpointError",
    "CheckpointKeyError",
    "OFFICIAL_EMA_PREFIX",
    "IMAGE_WEIGHTS",
    "MASK_WEIGHTS",
    "load_torch_file",
    "extract_unet_state_dict",
    "detect_kind",
    "infer_config",
    "check_state_dict",
    "network_from_state_dict",
    "read_checkpoint",
    "load_network",
    "save_network",
    "convert_official_checkpoint",
    "install_vae",
    "official_layout_checkpoint",
    "sha256_file",
]
