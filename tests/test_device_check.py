"""Worker start: the device settings resolved into a Runtime and checked against the device (worker/device_check.py).

CUDA cannot run here: the batch sizing is tested as pure functions with fake memory numbers, the CUDA-only
checks with torch.cuda's answers replaced."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from core.settings import Settings
from models.engine import EngineBase, Runtime
from tests.conftest import REPO
from worker import device_check
from worker.device_check import (DeviceCheckError, auto_batch_size, choose_batch_size, fast_paths, linear_memory,
                                 resolve_device, resolve_precision, resolve_runtime)

GiB, MiB = 2**30, 2**20


@pytest.fixture
def settings(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLIDESYNTH_"):
            monkeypatch.delenv(key)
    return lambda **kw: Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "weights", **kw)


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda answering as if this machine had ``n`` GPUs (nothing may really run on them)."""
    def install(n: int = 1, bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    return install


def fake_device(per_item: float, fixed: float = 0.0, capacity: float = float("inf")):
    """measure(batch) of a device whose probe forward takes fixed + batch·per_item bytes, out of memory above
    ``capacity``; records the batches it was asked for."""
    asked: list[int] = []

    def measure(batch: int) -> float:
        asked.append(batch)
        need = fixed + batch * per_item
        if need > capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {need / GiB:.1f} GiB")
        return need

    measure.asked = asked
    return measure


# --- batch sizing: pure ----------------------------------------------------------------------------------------

def test_auto_batch_size_is_the_largest_power_of_two_within_60_percent_of_free_memory():
    assert auto_batch_size(80 * GiB, 300 * MiB) == 128  # 0.6·80 GiB / 300 MiB = 163.8
    assert auto_batch_size(140 * GiB, 300 * MiB) == 256  # 286.7, capped at 256
    assert auto_batch_size(140 * GiB, 10 * MiB) == 256
    assert auto_batch_size(8 * GiB, 300 * MiB) == 16  # 16.4
    assert auto_batch_size(8 * GiB, 300 * MiB, fixed_bytes=2 * GiB) == 8  # (4.8 − 2) GiB / 300 MiB = 9.6
    assert auto_batch_size(1 * GiB, 700 * MiB) == 0  # not one item within the budget
    assert auto_batch_size(1 * GiB, 1 * MiB, fixed_bytes=1 * GiB) == 0
    assert auto_batch_size(80 * GiB, 10 * MiB, largest=100) == 64  # largest is rounded down to a power of two


def test_a_large_gpu_gets_at_least_64():
    # an H100/H200 with a DiffInfinite-sized UNet (≈ 0.3–0.6 GiB of activations per 64×64 window)
    for free in (70 * GiB, 130 * GiB):
        for per_item in (300 * MiB, 600 * MiB):
            assert auto_batch_size(free, per_item, fixed_bytes=1 * GiB) >= 64


def test_linear_memory_separates_the_per_item_cost_from_the_fixed_one():
    assert linear_memory({1: 1.5 * GiB, 2: 2.5 * GiB, 4: 4.5 * GiB}) == (1 * GiB, 0.5 * GiB)
    assert linear_memory({4: 4 * GiB}) == (1 * GiB, 0.0)  # one probe: all of it per item
    assert linear_memory({2: 4 * GiB, 4: 4 * GiB}) == (1 * GiB, 0.0)  # peaks that do not grow: the same
    with pytest.raises(ValueError):
        linear_memory({})


def test_choose_auto_batch_from_a_fake_device():
    measure = fake_device(per_item=400 * MiB, fixed=1 * GiB)
    batch, how = choose_batch_size(None, measure, lambda: 80 * GiB, device="cuda:0")
    assert batch == 64  # (48 − 1) GiB / 400 MiB = 120.3
    assert measure.asked == [1, 2, 4, 64]  # the probes, then the chosen size confirmed
    assert how.startswith("auto: 400 MiB per item")
    # two pool processes on one GPU split its memory
    assert choose_batch_size(None, fake_device(400 * MiB, 1 * GiB), lambda: 80 * GiB, device="cuda:0",
                             sharers=2)[0] == 32


def test_an_auto_batch_the_device_refuses_is_halved_until_it_runs():
    measure = fake_device(per_item=100 * MiB, capacity=5 * GiB)  # the projection promises more than there is
    batch, _ = choose_batch_size(None, measure, lambda: 80 * GiB, device="cuda:0")
    assert batch == 32 and measure.asked == [1, 2, 4, 256, 128, 64, 32]


def test_an_explicit_batch_that_runs_is_kept_and_one_that_runs_out_of_memory_names_what_fits():
    measure = fake_device(per_item=400 * MiB, fixed=1 * GiB, capacity=40 * GiB)
    assert choose_batch_size(96, measure, lambda: 40 * GiB, device="cuda:0") == (96, "set")
    with pytest.raises(DeviceCheckError) as err:
        choose_batch_size(512, measure, lambda: 40 * GiB, device="cuda:0")
    assert err.value.variable == "SLIDESYNTH_BATCH_SIZE"
    assert str(err.value).startswith("SLIDESYNTH_BATCH_SIZE=512: ")
    assert "runs out of memory on cuda:0" in str(err.value) and "32 fits" in str(err.value)  # (24 − 1) GiB / 400 MiB


def test_a_device_without_room_for_one_item_is_refused():
    full = fake_device(per_item=1 * GiB, capacity=0.5 * GiB)
    with pytest.raises(DeviceCheckError, match=r"^SLIDESYNTH_DEVICE=cuda:0: too little free memory"):
        choose_batch_size(None, full, lambda: 0.5 * GiB, device="cuda:0")
    with pytest.raises(DeviceCheckError, match=r"^SLIDESYNTH_BATCH_SIZE=8: .*not even a batch of 1 fits"):
        choose_batch_size(8, full, lambda: 0.5 * GiB, device="cuda:0")


def test_an_engine_with_nothing_to_probe_keeps_the_default_or_the_setting():
    assert choose_batch_size(None, lambda batch: None, lambda: 80 * GiB, device="cuda:0")[0] == 8
    assert choose_batch_size(48, lambda batch: None, lambda: 80 * GiB, device="cuda:0") == (48, "set")


def test_cuda_batch_sizing_loads_the_default_model_and_probes_its_engine(settings, monkeypatch):
    """The wiring of the CUDA path with torch.cuda's numbers faked: the default model is loaded through the
    registry and its engine's probe_batch runs (here on the CPU) for every measured batch."""
    from models.registry import ModelRegistry

    probed: list[int] = []

    def measure_on_cpu(engine, models, device, precision):
        def measure(batch):
            assert engine.probe_batch(models, torch.device("cpu"), batch, precision) is True
            probed.append(batch)
            return 1 * GiB + batch * 3 * GiB
        return measure

    monkeypatch.setattr(device_check, "_cuda_measure", measure_on_cpu)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * GiB, 80 * GiB))
    s = settings(device="cpu", default_model="diffinfinite-untrained")
    registry = ModelRegistry(s.models_dir)
    monkeypatch.setattr(registry, "load", lambda name, device: ModelRegistry.load(registry, name, "cpu"))
    assert device_check._cuda_batch_size(s, torch.device("cuda:0"), "float32", registry, s.default_model, 1) == 8
    assert probed == [1, 2, 4, 8]  # (48 − 1) GiB / 3 GiB = 15.7


def test_diffinfinite_probes_its_image_unet_and_other_engines_have_nothing_to_probe():
    from models.diffinfinite.engine import DiffInfiniteEngine
    from models.diffinfinite.loading import untrained_diffinfinite

    models = untrained_diffinfinite(seed=0, device="cpu")
    assert DiffInfiniteEngine().probe_batch(models, torch.device("cpu"), 2, "bfloat16") is True
    assert EngineBase.probe_batch(object(), models, torch.device("cpu"), 2, "float32") is False


# --- fast paths: pure ------------------------------------------------------------------------------------------

def test_fast_paths_auto_is_on_for_cuda_with_triton_and_off_on_cpu():
    on = {"compile": True, "fused_kernels": True, "cudnn_benchmark": True}
    off = {"compile": False, "fused_kernels": False, "cudnn_benchmark": False}
    assert fast_paths("auto", "auto", True, cuda=True, triton=True) == on
    assert fast_paths("auto", "auto", True, cuda=False, triton=True) == off
    assert fast_paths("auto", "auto", True, cuda=True, triton=False) == {**off, "cudnn_benchmark": True}
    assert fast_paths("off", "off", False, cuda=True, triton=True) == off
    assert fast_paths("on", "auto", True, cuda=False, triton=False)["compile"] is True  # inductor's C++ backend


def test_fast_paths_on_where_the_device_cannot_run_them_is_refused():
    with pytest.raises(DeviceCheckError, match=r"^SLIDESYNTH_FUSED_KERNELS=on: .*CUDA device and Triton"):
        fast_paths("auto", "on", True, cuda=False, triton=True)
    with pytest.raises(DeviceCheckError, match=r"^SLIDESYNTH_FUSED_KERNELS=on: "):
        fast_paths("auto", "on", True, cuda=True, triton=False)
    with pytest.raises(DeviceCheckError, match=r"^SLIDESYNTH_COMPILE=on: .*needs Triton"):
        fast_paths("on", "auto", True, cuda=True, triton=False)


# --- the device ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, problem", [
    ("foo", "not a device name"),
    ("", "not a device name"),
    ("cuda:x", "not a device name"),
    ("mps", "runs on cpu or cuda, not mps"),
])
def test_unknown_device_names_are_refused(name, problem):
    with pytest.raises(DeviceCheckError) as err:
        resolve_device(name)
    assert str(err.value).startswith(f"SLIDESYNTH_DEVICE={name}: ") and problem in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_on_this_cpu_only_machine_is_refused(name):
    with pytest.raises(DeviceCheckError, match=rf"^SLIDESYNTH_DEVICE={name}: no CUDA device here"):
        resolve_device(name)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")


def test_a_gpu_index_the_machine_lacks_is_refused(fake_gpus):
    fake_gpus(1)
    assert resolve_device("cuda") == resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceCheckError, match=r"^SLIDESYNTH_DEVICE=cuda:7: this machine has 1 CUDA device \(cuda:0\)$"):
        resolve_device("cuda:7")
    fake_gpus(2)
    with pytest.raises(DeviceCheckError, match=r"has 2 CUDA devices \(cuda:0 … cuda:1\)"):
        resolve_device("cuda:2")
    assert [resolve_device("auto", index) for index in range(3)] == [torch.device("cuda", i) for i in (0, 1, 0)]


def test_bfloat16_on_a_gpu_without_it_is_refused_and_auto_takes_float16(fake_gpus, monkeypatch):
    fake_gpus(1, bf16=False)
    with pytest.raises(DeviceCheckError, match=r"^SLIDESYNTH_PRECISION=bfloat16: cuda:0 \(Tesla V100.*\) has no "
                                               r"bfloat16 support; use float16 or float32$"):
        resolve_precision("bfloat16", torch.device("cuda", 0))
    monkeypatch.setattr(device_check, "autocast_problem", lambda device, precision: None)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "float16"
    fake_gpus(1, bf16=True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bfloat16"


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_cpu_autocast_precisions_are_tried_and_kept_when_they_run(precision):
    assert device_check.autocast_problem(torch.device("cpu"), precision) is None
    assert resolve_precision(precision, torch.device("cpu")) == precision
    assert resolve_precision("auto", torch.device("cpu")) == "float32"


def test_an_autocast_that_fails_or_does_nothing_is_refused(monkeypatch):
    def failing(device_type, dtype):
        raise RuntimeError(f"Current CPU does not support {dtype}")

    monkeypatch.setattr(torch, "autocast", failing)
    with pytest.raises(DeviceCheckError, match=r"^SLIDESYNTH_PRECISION=float16: autocast to float16 fails on cpu: "
                                               r"RuntimeError: Current CPU does not support"):
        resolve_precision("float16", torch.device("cpu"))
    # torch turns an autocast it cannot run into a warning and computes in float32
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype: contextlib.nullcontext())
    with pytest.raises(DeviceCheckError, match=r"^SLIDESYNTH_PRECISION=bfloat16: .*computed in float32, not bfloat16"):
        resolve_precision("bfloat16", torch.device("cpu"))


# --- the runtime -----------------------------------------------------------------------------------------------

def test_runtime_on_cpu_auto_batch_is_8_and_fast_paths_are_off(settings):
    runtime = resolve_runtime(settings(device="cpu"))
    assert runtime == Runtime(batch_size=8, precision="float32", models_dir=runtime.models_dir, compile=False,
                              compile_mode="default", fused_kernels=False, cudnn_benchmark=False)
    assert resolve_runtime(settings(device="cpu", batch_size=0)).batch_size == 8
    explicit = resolve_runtime(settings(device="cpu", batch_size=24, precision="bfloat16", compile="on",
                                        compile_mode="reduce-overhead"))
    assert (explicit.batch_size, explicit.precision, explicit.compile, explicit.compile_mode) == (
        24, "bfloat16", True, "reduce-overhead")


def test_runtime_refuses_fused_kernels_forced_on_the_cpu(settings):
    with pytest.raises(DeviceCheckError, match="^SLIDESYNTH_FUSED_KERNELS=on: "):
        resolve_runtime(settings(device="cpu", fused_kernels="on"))


def test_settings_read_auto_batch_and_switch_spellings(settings, monkeypatch):
    for value in ("", "auto", "0"):
        monkeypatch.setenv("SLIDESYNTH_BATCH_SIZE", value)
        assert not Settings().batch_size
    monkeypatch.setenv("SLIDESYNTH_BATCH_SIZE", "32")
    monkeypatch.setenv("SLIDESYNTH_COMPILE", "true")
    monkeypatch.setenv("SLIDESYNTH_FUSED_KERNELS", "0")
    monkeypatch.setenv("SLIDESYNTH_CUDNN_BENCHMARK", "false")
    s = Settings()
    assert (s.batch_size, s.compile, s.fused_kernels, s.cudnn_benchmark, s.compile_mode) == (32, "on", "off", False,
                                                                                          "default")
    from pydantic import ValidationError

    for name, value in (("SLIDESYNTH_COMPILE_MODE", "max-autotune"), ("SLIDESYNTH_BATCH_SIZE", "-1"),
                        ("SLIDESYNTH_COMPILE", "sometimes")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError):
            Settings()
        monkeypatch.delenv(name)


def test_pool_processes_take_the_runtime_checked_at_start(settings, monkeypatch):
    checked = Runtime(batch_size=128, precision="bfloat16")
    monkeypatch.setattr(device_check, "_checked", {"cpu": checked})
    assert device_check.worker_runtime(settings(device="cpu"), torch.device("cpu"), None) is checked
    monkeypatch.setattr(device_check, "_checked", {})
    assert device_check.worker_runtime(settings(device="cpu"), torch.device("cpu"), None).batch_size == 8


def test_check_worker_start_on_cpu_checks_in_process(settings, monkeypatch):
    monkeypatch.setattr(device_check, "_checked", {})  # what it fills is for pool processes, not later tests
    runtimes = device_check.check_worker_start(settings(device="cpu", worker_concurrency=2))
    assert list(runtimes) == ["cpu"] and runtimes["cpu"].batch_size == 8


def test_the_worker_command_refuses_a_device_the_machine_lacks(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(SLIDESYNTH_DATA_DIR=str(tmp_path / "data"), SLIDESYNTH_MODELS_DIR=str(tmp_path / "weights"),
               SLIDESYNTH_DEVICE="cuda:3")
    proc = subprocess.run([sys.executable, "-m", "slidesynth.cli", "worker"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "refusing to start: SLIDESYNTH_DEVICE=cuda:3: " in proc.stderr, proc.stderr
    assert not list((tmp_path / "data").glob("worker-state*"))  # Celery never started
