"""The worker's device settings, resolved into a :class:`models.engine.Runtime` and checked against the device
once, when the worker starts: a setting the device cannot run stops the worker with a message naming it,
instead of failing every job.

``slidesynth worker`` calls :func:`check_worker_start` before Celery forks its pool; each pool process then
takes the checked Runtime of its device (:func:`worker_runtime`). The batch sizing is pure functions
(:func:`linear_memory`, :func:`auto_batch_size`, :func:`choose_batch_size`) fed by thin CUDA measurements.
"""
from __future__ import annotations

import logging
import multiprocessing
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Mapping

import torch

from core.settings import Settings
from models.engine import Runtime, get_engine
from models.registry import ModelRegistry

log = logging.getLogger("slidesynth.worker")

CPU_BATCH = 8  # the batch size on CPU, and where an engine has nothing to measure
MAX_BATCH = 256  # the sampler gains nothing from larger batches on any GPU we know
BATCH_BUDGET = 0.6  # share of the free memory the sampler's batches may project to use: the rest is for the
# latent canvas, the decoder's batches and the allocator's fragmentation
PROBE_BATCHES = (1, 2, 4)  # small batches whose peak memory gives the per-item cost


class DeviceCheckError(ValueError):
    """A setting this machine's device cannot run; the message starts with the variable and its value."""

    def __init__(self, variable: str, value: Any, problem: str):
        super().__init__(variable, value, problem)  # all three in args: the error pickles across processes
        self.variable, self.value, self.problem = variable, value, problem

    def __str__(self) -> str:
        return f"{self.variable}={self.value}: {self.problem}"


# --- pure parts ------------------------------------------------------------------------------------------------

def linear_memory(peaks: Mapping[int, float]) -> tuple[float, float]:
    """(bytes per item, fixed bytes) of the line through the peak memory of the two largest probe batches.
    With one probe, or peaks that do not grow, the whole largest peak counts per item (an overestimate)."""
    points = sorted(peaks.items())
    if not points:
        raise ValueError("no probe measured")
    b1, p1 = points[-1]
    if len(points) >= 2:
        b0, p0 = points[-2]
        per_item = (p1 - p0) / (b1 - b0)
        if per_item > 0:
            return per_item, max(0.0, p1 - per_item * b1)
    return p1 / b1, 0.0


def auto_batch_size(free_bytes: float, per_item_bytes: float, fixed_bytes: float = 0.0, *,
                    budget: float = BATCH_BUDGET, largest: int = MAX_BATCH) -> int:
    """The largest power of two ≤ ``largest`` whose projected use ``fixed + batch·per_item`` stays within
    ``budget``·``free_bytes``; 0 when not even one item does."""
    allowed = budget * free_bytes - fixed_bytes
    batch = 1 << (max(1, largest).bit_length() - 1)
    while batch >= 1 and batch * max(per_item_bytes, 0.0) > allowed:
        batch //= 2
    return batch


def choose_batch_size(requested: int | None, measure: Callable[[int], float | None],
                      free_bytes: Callable[[], float], *, device: str, sharers: int = 1) -> tuple[int, str]:
    """The batch size for one device, and how it was chosen.

    ``measure(batch)``: the peak bytes of one probe forward at ``batch`` (raises ``torch.OutOfMemoryError``;
    None: the engine has nothing to probe); ``free_bytes()``: the device's free memory; ``sharers``: pool
    processes on the device, which split it. ``requested`` (None: automatic) is tried as given; one that runs
    out of memory raises :class:`DeviceCheckError` saying which batch size fits.
    """
    if requested:
        try:
            measure(requested)
            return requested, "set"
        except torch.OutOfMemoryError:
            pass  # leave the except block first: its traceback holds the failed forward's tensors
        fits, _ = _fitting_batch(measure, free_bytes, sharers)
        hint = (f"{fits} fits (or unset SLIDESYNTH_BATCH_SIZE to choose it automatically)" if fits
                else "not even a batch of 1 fits beside the model")
        raise DeviceCheckError("SLIDESYNTH_BATCH_SIZE", requested,
                               f"one forward of the model's network at this batch runs out of memory on "
                               f"{device}; {hint}")
    fits, how = _fitting_batch(measure, free_bytes, sharers)
    if fits is None:
        return CPU_BATCH, "the engine has nothing to measure"
    if fits == 0:
        raise DeviceCheckError("SLIDESYNTH_DEVICE", device, "too little free memory for one forward of the model's "
                               "network at batch 1")
    return fits, how


def _fitting_batch(measure: Callable[[int], float | None], free_bytes: Callable[[], float],
                   sharers: int) -> tuple[int | None, str]:
    peaks: dict[int, float] = {}
    for batch in PROBE_BATCHES:
        try:
            peak = measure(batch)
        except torch.OutOfMemoryError:
            break
        if peak is None:
            return None, ""
        peaks[batch] = peak
    if not peaks:
        return 0, ""
    per_item, fixed = linear_memory(peaks)
    free = free_bytes() / max(1, sharers)
    batch = max(1, auto_batch_size(free, per_item, fixed))
    while batch > max(peaks):  # the projection is a line through small batches: confirm it at the size chosen
        try:
            measure(batch)
            break
        except torch.OutOfMemoryError:
            pass
        batch //= 2
    return batch, f"auto: {per_item / 2**20:.0f} MiB per item, {free / 2**30:.1f} GiB free per process"


def fast_paths(compile: str, fused_kernels: str, cudnn_benchmark: bool, *, cuda: bool,
               triton: bool) -> dict[str, bool]:
    """The GPU fast-path switches for a device: ``compile`` and ``fused_kernels`` auto = on for CUDA when
    Triton imports (torch.compile generates Triton kernels on CUDA); ``on`` where the device cannot run it
    raises :class:`DeviceCheckError`. ``compile=on`` is allowed on CPU (inductor's C++ backend)."""
    if compile == "on" and cuda and not triton:
        raise DeviceCheckError("SLIDESYNTH_COMPILE", compile, "torch.compile on CUDA needs Triton, which does not "
                               "import here; use off")
    if fused_kernels == "on" and not (cuda and triton):
        raise DeviceCheckError("SLIDESYNTH_FUSED_KERNELS", fused_kernels,
                               "the fused kernels need a CUDA device and Triton"
                               + ("" if cuda else " (the worker's device is the CPU)") + "; use auto or off")
    return {"compile": compile == "on" or (compile == "auto" and cuda and triton),
            "fused_kernels": fused_kernels == "on" or (fused_kernels == "auto" and cuda and triton),
            "cudnn_benchmark": bool(cudnn_benchmark and cuda)}


# --- the device ------------------------------------------------------------------------------------------------

def resolve_device(setting: str, index: int = 0, *, variable: str = "SLIDESYNTH_DEVICE") -> torch.device:
    """The device ``setting`` names, for pool process ``index``: ``auto`` = CUDA when available (process N on
    GPU N mod count), else CPU; CUDA devices always with their index. :class:`DeviceCheckError` when this
    machine has no such device."""
    name = setting.strip()
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", index % torch.cuda.device_count())
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceCheckError(variable, setting, "not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceCheckError(variable, setting, f"the worker runs on cpu or cuda, not {device.type}")
    if not torch.cuda.is_available():
        why = ("this torch is a CPU build" if torch.version.cuda is None and torch.version.hip is None
               else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
        raise DeviceCheckError(variable, setting, f"no CUDA device here ({why}); use cpu or auto")
    count = torch.cuda.device_count()
    wanted = device.index or 0
    if wanted >= count:
        raise DeviceCheckError(variable, setting, f"this machine has {count} CUDA device"
                               f"{'s' if count != 1 else ''} (cuda:0{f' … cuda:{count - 1}' if count > 1 else ''})")
    return torch.device("cuda", wanted)


def autocast_problem(device: torch.device, precision: str) -> str | None:
    """None when a tiny convolution, GroupNorm and attention run, finite and in ``precision``, under autocast on
    ``device``; otherwise what went wrong."""
    dtype = getattr(torch, precision)
    try:
        # torch disables an autocast it cannot run with only a warning: keep it, and check the dtype that came out
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=dtype):
                x = torch.randn(1, 8, 8, 8, device=device)
                y = torch.nn.functional.conv2d(x, torch.randn(8, 8, 3, 3, device=device), padding=1)
                q = torch.nn.functional.group_norm(y, 4).flatten(2).transpose(1, 2)
                out = torch.softmax(q @ q.transpose(1, 2) / 8, dim=-1) @ q
                finite = bool(torch.isfinite(out.float()).all())
    except Exception as exc:  # any failure of the trial is the answer, whatever torch raises
        return f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if y.dtype != dtype:
        said = " ".join(str(w.message) for w in caught).replace("\n", " ")
        return f"autocast computed in {str(y.dtype).removeprefix('torch.')}, not {precision}" + (f" ({said})" if said else "")
    return None if finite else "non-finite results"


def resolve_precision(setting: str, device: torch.device) -> str:
    """The autocast dtype for ``device``: auto = bfloat16 on CUDA (float16 where the GPU lacks bfloat16),
    float32 on CPU. :class:`DeviceCheckError` for a dtype the device cannot run."""
    precision = setting
    if device.type == "cuda":
        with torch.cuda.device(device):  # is_bf16_supported asks about the current device
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if setting == "bfloat16" and not bf16:
            raise DeviceCheckError("SLIDESYNTH_PRECISION", setting, f"{device} ({torch.cuda.get_device_name(device)}) "
                                   "has no bfloat16 support; use float16 or float32")
        if setting == "auto":
            precision = "bfloat16" if bf16 else "float16"
    elif setting == "auto":
        precision = "float32"
    if precision == "float32":
        return precision
    problem = autocast_problem(device, precision)
    if problem is None:
        return precision
    if setting == "auto":
        log.warning("autocast to %s fails on %s (%s): sampling in float32", precision, device, problem)
        return "float32"
    raise DeviceCheckError("SLIDESYNTH_PRECISION", setting, f"autocast to {precision} fails on {device}: {problem}; "
                           "use float32" + (" or auto" if device.type == "cuda" else ""))


def triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as none
        return False
    return True


def _cuda_measure(engine: Any, models: Any, device: torch.device, precision: str) -> Callable[[int], float | None]:
    """``measure(batch)`` for :func:`choose_batch_size`: the peak memory one probe forward allocates."""
    probe = getattr(engine, "probe_batch", None)  # optional: engines not built on EngineBase may lack it

    def measure(batch: int) -> float | None:
        if probe is None:
            return None
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            if not probe(models, device, batch, precision):
                return None
            torch.cuda.synchronize(device)
            return float(torch.cuda.max_memory_allocated(device) - base)
        finally:
            torch.cuda.empty_cache()

    return measure


def _cuda_batch_size(settings: Settings, device: torch.device, precision: str, registry: ModelRegistry,
                     model: str, sharers: int) -> int:
    requested = settings.batch_size or None
    try:
        engine = get_engine(registry.card(model).engine)
        models = registry.load(model, device)
    except torch.OutOfMemoryError:
        raise DeviceCheckError("SLIDESYNTH_DEVICE", device, f"model {model} does not fit in its memory") from None
    except Exception as exc:  # a model problem is not the device's: jobs of that model will report it
        log.warning("could not load model %s to size the batch (%s); batch size %s", model, exc,
                    requested or CPU_BATCH)
        return requested or CPU_BATCH

    def free() -> float:
        return float(torch.cuda.mem_get_info(device)[0])

    batch, how = choose_batch_size(requested, _cuda_measure(engine, models, device, precision), free,
                                   device=str(device), sharers=sharers)
    log.info("batch size %d on %s (%s)", batch, device, how)
    return batch


# --- the runtime -----------------------------------------------------------------------------------------------

def resolve_runtime(settings: Settings, device: torch.device | None = None, registry: ModelRegistry | None = None,
                    *, model: str | None = None, sharers: int = 1) -> Runtime:
    """The Runtime engines run with on ``device`` (default: SLIDESYNTH_DEVICE's), every setting checked
    against it: :class:`DeviceCheckError` names the first one it cannot run. On CUDA it loads ``model``
    (default: the default model) through ``registry`` and runs trial forwards to size or check the batch;
    ``sharers``: pool processes on the device."""
    device = resolve_device(settings.device) if device is None else device
    cuda = device.type == "cuda"
    precision = resolve_precision(settings.precision, device)
    paths = fast_paths(settings.compile, settings.fused_kernels, settings.cudnn_benchmark, cuda=cuda,
                       triton=cuda and triton_imports())
    if cuda:
        torch.backends.cudnn.benchmark = paths["cudnn_benchmark"]  # the trial forwards pick what jobs will
        registry = registry or ModelRegistry(settings.models_dir)
        batch = _cuda_batch_size(settings, device, precision, registry, model or settings.default_model, sharers)
    else:
        batch = settings.batch_size or CPU_BATCH
    return Runtime(batch_size=batch, precision=precision, models_dir=settings.models_dir,
                   compile_mode=settings.compile_mode, **paths)


def check_runtimes(settings: Settings) -> dict[str, Runtime]:
    """The checked Runtime of every device the pool's processes will use, by device name."""
    sharers = Counter(str(resolve_device(settings.device, index)) for index in range(settings.worker_concurrency))
    registry = ModelRegistry(settings.models_dir)
    return {name: resolve_runtime(settings, torch.device(name), registry, sharers=count)
            for name, count in sharers.items()}


_checked: dict[str, Runtime] = {}  # filled before the pool forks: its processes inherit it


def check_worker_start(settings: Settings) -> dict[str, Runtime]:
    """Check the settings against this machine's devices before the worker's pool starts (raises
    :class:`DeviceCheckError`); returns the Runtimes its processes will take. The check runs in a freshly
    spawned process unless the device is the CPU: Celery forks the pool from this process, and a forked
    child cannot use CUDA initialised in its parent."""
    if settings.device.strip() == "cpu":
        runtimes = check_runtimes(settings)
    else:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runtimes = pool.submit(check_runtimes, settings).result()
    _checked.clear()
    _checked.update(runtimes)
    return runtimes


def worker_runtime(settings: Settings, device: torch.device, registry: ModelRegistry) -> Runtime:
    """This process's Runtime on ``device``: the one checked at worker start, else (a worker started some other
    way) resolved now. Sets the process-wide cuDNN switch."""
    runtime = _checked.get(str(device)) or resolve_runtime(settings, device, registry)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = runtime.cudnn_benchmark
    return runtime


def describe(device: str, runtime: Runtime) -> str:
    """One line for the worker's log: what it runs with on ``device``."""
    compiled = f"on ({runtime.compile_mode})" if runtime.compile else "off"
    return (f"{device}: batch_size={runtime.batch_size} precision={runtime.precision} compile={compiled} "
            f"fused_kernels={'on' if runtime.fused_kernels else 'off'} "
            f"cudnn_benchmark={'on' if runtime.cudnn_benchmark else 'off'}")
