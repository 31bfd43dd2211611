"""The worker's Prometheus metrics, written by the pool process that runs the job and served by
``slidesynth worker`` on ``SLIDESYNTH_METRICS_PORT`` (core/metrics.py: the processes' files, merged).

Throughputs are counters (steps, patches, megapixels, seconds, bytes): Prometheus derives the rates, e.g.
steps/s ``rate(slidesynth_sampling_steps_total[5m])``, decode Mpx/s
``rate(slidesynth_decoded_megapixels_total[5m]) / rate(slidesynth_decode_seconds_total[5m])`` (Mpx per second
spent decoding), and counters of several processes add up without losing anything when one ends.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from core.contract import OUTPUT_FILES
from core.jobs import JobRecord, JobStatus

# Seconds from minutes to a day (SLIDESYNTH_TASK_TIME_LIMIT): jobs last from seconds (tests) to hours.
LONG_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 43200, 86400)

QUEUE_WAIT = Histogram("slidesynth_job_queue_wait_seconds", "From a job's creation to the start of its first run, "
                       "by priority", ["priority"], buckets=(0.1, 0.5, *LONG_BUCKETS))
JOB_DURATION = Histogram("slidesynth_job_duration_seconds", "One run of a job, from its start in this worker to "
                         "its end, by outcome (succeeded, failed, canceled)", ["status"], buckets=LONG_BUCKETS)
STEPS = Counter("slidesynth_sampling_steps_total", "Sampling steps done (rate(): steps/s)")
PATCHES = Counter("slidesynth_sampling_patches_total", "Denoiser passes over sampler patches (windows × labels), "
                  "added when a job's sampling ends (rate(): patches/s); engines that report them (DiffInfinite)")
SAMPLING_SECONDS = Counter("slidesynth_sampling_seconds_total", "Seconds spent sampling, added when a job's "
                           "sampling ends (engines that time it)")
DECODED_MPX = Counter("slidesynth_decoded_megapixels_total", "Megapixels of slide bands produced by the engine "
                      "(the VAE decode; ∞-Brush samples them band by band too)")
DECODE_SECONDS = Counter("slidesynth_decode_seconds_total", "Seconds spent producing the slide's bands")
WRITTEN_MPX = Counter("slidesynth_written_megapixels_total", "Megapixels written into the outputs (TIFF pyramid, "
                      "Zarr)")
WRITE_SECONDS = Counter("slidesynth_write_seconds_total", "Seconds spent writing bands into the outputs")
OUTPUT_BYTES = Counter("slidesynth_output_bytes_total", "Bytes of the outputs of succeeded jobs, by kind (tiff, "
                       "zarr, thumbnail, mask)", ["kind"])
# One worker process per GPU: livesum adds the live processes on one device and forgets a process that ended.
GPU_MEMORY = Gauge("slidesynth_gpu_memory_allocated_bytes", "GPU memory held by torch tensors in the worker's "
                   "processes (torch.cuda.memory_allocated; CUDA workers only)", ["device"],
                   multiprocess_mode="livesum")
GPU_MEMORY_PEAK = Gauge("slidesynth_gpu_memory_peak_bytes", "Peak GPU memory of the last job of each worker "
                        "process (torch.cuda.max_memory_allocated), the largest over processes; CUDA only",
                        ["device"], multiprocess_mode="livemax")
RUNNING = Gauge("slidesynth_worker_jobs_running", "Jobs this worker is running now", multiprocess_mode="livesum")

for _priority in ("high", "normal", "low"):
    QUEUE_WAIT.labels(_priority)
for _status in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled):
    JOB_DURATION.labels(_status.value)
for _kind in OUTPUT_FILES:
    OUTPUT_BYTES.labels(_kind)


class JobMeter:
    """What one run of a job adds to the metrics; made by ``run_job`` once it holds the job."""

    def __init__(self, job: JobRecord, device: Any = None):
        self.job, self.device = job, device
        self.t0 = time.monotonic()
        self._step = None

    def started(self, first_run: bool) -> None:
        RUNNING.inc()
        if first_run and self.job.created_at:
            QUEUE_WAIT.labels(self.job.priority.value).observe(max(0.0, time.time() - self.job.created_at))

    def step(self, step: int | None) -> None:
        """A progress report: counts the sampling steps done since the last one."""
        if step is None:
            return
        if self._step is not None and step > self._step:
            STEPS.inc(step - self._step)
        self._step = step if self._step is None else max(self._step, step)
        self.gpu()

    def resumed_at(self, step: int) -> None:
        self._step = step  # steps before a checkpoint were counted by the run that did them

    def band(self, kind: str, pixels: int, seconds: float) -> None:
        """``kind``: decoded (the engine produced a band) or written (the writers took it)."""
        megapixels, spent = (DECODED_MPX, DECODE_SECONDS) if kind == "decoded" else (WRITTEN_MPX, WRITE_SECONDS)
        megapixels.inc(pixels / 1e6)
        spent.inc(max(0.0, seconds))

    def sampled(self, notes: dict[str, Any], seconds: dict[str, float]) -> None:
        """The engine's figures at the end of sampling."""
        passes = notes.get("sampler_passes")
        if isinstance(passes, (int, float)) and passes > 0:
            PATCHES.inc(passes)
        if seconds.get("sampling"):
            SAMPLING_SECONDS.inc(seconds["sampling"])

    def gpu(self) -> None:
        device = self.device
        if device is None or getattr(device, "type", None) != "cuda":
            return  # absent on CPU workers
        import torch

        label = str(device)
        GPU_MEMORY.labels(label).set(torch.cuda.memory_allocated(device))
        GPU_MEMORY_PEAK.labels(label).set(torch.cuda.max_memory_allocated(device))

    def reset_peak(self) -> None:
        if self.device is not None and getattr(self.device, "type", None) == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def outputs(self, outputs: dict[str, str], job_dir: Path) -> None:
        """A succeeded job's files, by kind."""
        for kind, name in outputs.items():
            OUTPUT_BYTES.labels(kind).inc(_size(job_dir / name))

    def finished(self, status: JobStatus | None) -> None:
        """The run ended: ``status`` as the run left the job (None: an error past the job's bookkeeping)."""
        RUNNING.dec()
        if status in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled):
            JOB_DURATION.labels(status.value).observe(time.monotonic() - self.t0)
        self.gpu()


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0
