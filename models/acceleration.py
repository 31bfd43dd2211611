"""The network a worker calls for inference: the eager module or a ``torch.compile``d one, built once per process.

Why: compiling a UNet costs seconds to minutes (and every new input signature can cost a recompile), so a worker
process compiles each (module, device, mode) once and reuses it for every job; the first call per input
signature is timed so a job can report its warm-up. Nothing here changes numerics except
:func:`configure_cuda_backends` (TF32), which callers opt into.

Modes (:data:`MODES`):

* ``"eager"`` — the module itself (no compilation);
* ``"default"`` — ``torch.compile`` with Inductor's default mode;
* ``"reduce-overhead"`` — Inductor plus CUDA graphs (kernel-launch overhead removed; outputs are copied out of
  the graph pool before they are returned, since the next replay overwrites them);
* ``"max-autotune-no-cudagraphs"`` — Inductor with GEMM/conv autotuning, no CUDA graphs (longest warm-up).

Compiled networks use dynamo's automatic dynamic shapes (``dynamic=None``): the first window shape compiles a
specialised graph, a second shape a graph symbolic in the dimensions that changed; the dynamo recompile limit is
raised to :data:`RECOMPILE_LIMIT` so a handful of fixed window shapes, batch sizes and autocast settings never
fall back to eager. ``fullgraph`` is left off: a graph break (none today, see ``tests/test_compile.py``) would
cost speed, not a job.

Cached entries hold their module alive until :func:`clear_inference_cache`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "MODES", "RECOMPILE_LIMIT", "WarmupStats", "InferenceNetwork", "inference_network", "clear_inference_cache",
    "configure_cuda_backends",
]

MODES = ("eager", "default", "reduce-overhead", "max-autotune-no-cudagraphs")

#: Dynamo recompile limit (per compiled code object) that :func:`inference_network` raises the limit to (never
#: lowers it): window shapes cost at most one static and three symbolic graphs (batch, height, width) per
#: autocast setting, and dynamo's default of 8 would leave no room for a second autocast dtype or the mask
#: UNet's condition-dropout variants before falling back to eager.
RECOMPILE_LIMIT = 16

_CACHE: dict[tuple[int, str, str, bool | None, str], "InferenceNetwork"] = {}
_LOCK = threading.Lock()


@dataclass
class WarmupStats:
    """Seconds of the first call per input signature (compilation + one run, device-synchronised) and the call
    count; a job reports them to tell compilation time from sampling time."""

    first_call_s: dict[str, float] = field(default_factory=dict)
    calls: int = 0

    @property
    def warmup_s(self) -> float:
        """Total first-call seconds over all signatures seen so far."""
        return float(sum(self.first_call_s.values()))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy: ``{"warmup_s", "first_call_s", "calls"}``."""
        return {"warmup_s": self.warmup_s, "first_call_s": dict(self.first_call_s), "calls": self.calls}


def _signature(args: tuple, kwargs: dict) -> str:
    """Tensor shapes and dtypes plus the autocast state: what decides whether a call may compile anew."""
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}"
        return type(v).__name__ if not isinstance(v, (int, float, bool, str, type(None))) else repr(v)

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in sorted(kwargs.items())]
    autocast = [d for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]
    if autocast:
        parts.append("autocast=" + ",".join(f"{d}:{str(torch.get_autocast_dtype(d)).removeprefix('torch.')}"
                                            for d in autocast))
    return "(" + ", ".join(parts) + ")"


def _clone_outputs(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone_outputs(o) for o in out)
    return out


class InferenceNetwork:
    """Callable stand-in for ``module`` (same arguments and results) that runs the eager or compiled network,
    times each new input signature's first call into :attr:`stats`, and forwards other attributes
    (``config``, ``check_labels`` …) to the module."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any], *, mode: str, device: torch.device):
        self.module = module
        self.mode = mode
        self.device = device
        self.stats = WarmupStats()
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = _signature(args, kwargs)
        first = key not in self.stats.first_call_s
        t0 = time.perf_counter() if first else 0.0
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: earlier outputs are not read
            out = _clone_outputs(self._fn(*args, **kwargs))
        else:
            out = self._fn(*args, **kwargs)
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stats.first_call_s[key] = time.perf_counter() - t0
        self.stats.calls += 1
        return out

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("module", "_fn", "mode", "device", "stats"):
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"InferenceNetwork({type(self.module).__name__}, mode={self.mode!r}, device={str(self.device)!r})"


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _raise_recompile_limit(limit: int) -> None:
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < limit:
        setattr(cfg, name, limit)


def inference_network(module: nn.Module, *, mode: str = "default", device: torch.device | str | None = None,
                      dynamic: bool | None = None, backend: str = "inductor") -> InferenceNetwork:
    """The process-wide :class:`InferenceNetwork` for ``(module, device, mode)``, built on first request.

    ``module`` should already be on ``device`` and in eval mode (``device`` defaults to its parameters'
    device). ``mode``: one of :data:`MODES`. ``dynamic`` is passed to ``torch.compile`` (``None``: automatic
    dynamic shapes). ``backend``: the ``torch.compile`` backend; the Inductor modes apply only to
    ``"inductor"`` (tests use ``"aot_eager"``). Compilation itself happens on the first call of each input
    signature, not here.
    """
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; expected one of {MODES}")
    dev = torch.device(device) if device is not None else _module_device(module)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (id(module), str(dev), mode, dynamic, backend)
    with _LOCK:
        net = _CACHE.get(key)
        if net is not None and net.module is module:
            return net
        if mode == "eager":
            fn: Callable[..., Any] = module
        else:
            _raise_recompile_limit(RECOMPILE_LIMIT)
            opts: dict[str, Any] = {"dynamic": dynamic, "backend": backend}
            if backend == "inductor":
                opts["mode"] = mode
            fn = torch.compile(module, **opts)
        net = InferenceNetwork(module, fn, mode=mode, device=dev)
        _CACHE[key] = net
        return net


def clear_inference_cache() -> None:
    """Drop every cached network (and the references that keep their modules alive), e.g. before a worker
    swaps models; also resets dynamo for the whole process, whose compiled code (CUDA-graph pools included)
    would otherwise keep the old weights' memory."""
    with _LOCK:
        _CACHE.clear()
    torch._dynamo.reset()


def configure_cuda_backends(device: torch.device | str | None = None) -> bool:
    """For a CUDA ``device`` (default: CUDA when available): let cuDNN benchmark convolution algorithms per
    input shape (the sampler repeats a few window shapes thousands of times) and allow TF32 in float32 matmuls
    and convolutions (≈10 mantissa bits: a precision trade the bf16 UNets already make). Process-wide; returns
    whether anything was set (False for CPU devices)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        return False
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True  # the legacy switches, as training/diffinfinite.py uses
    torch.backends.cudnn.allow_tf32 = True
    return True
