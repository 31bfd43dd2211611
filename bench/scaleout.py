"""Scale-out: jobs per minute with 1, 2, 4 … workers behind one Redis-backed API, and the efficiency against 1.

    python -m bench.scaleout                                   # --workers 1,2,4 --jobs 12 --size 256 --steps 8
    python -m bench.scaleout --workers 1,2 --jobs 2 --steps 1  # a smoke run (tests/test_bench_scaleout.py)

For each worker count N: a private redis-server (one per run, a key prefix and queue per N), `slidesynth serve
--no-worker` and N `slidesynth worker` processes, each a Celery prefork worker with one pool process, one torch
and OpenMP thread, on the CPU — the deployment's shape (one process per device), with CPU cores standing in for
GPUs. First a warm-up round of N jobs, one per worker (each worker is idle with prefetch 1, so each takes one):
every pool process loads the model on its first job, which the measured batch should not pay. Then ``--jobs``
identical jobs (a striped mask of ``--size``² at 0.5 µm/px, ``--steps`` sampling steps, the same seed) are
submitted at once through the HTTP API and polled until all have succeeded.

Throughput = jobs ÷ (last job's finished_at − first job's created_at), in jobs per minute, from the job records.
Efficiency = throughput_N ÷ (N × throughput_1): 1.0 is perfect scaling. Resident memory: each worker's process tree
(the Celery parent, which holds no model, plus its pool process) after the batch — resident (RSS) and proportional
(PSS: pages the two share since the fork counted once) — and the pool process's peak (VmHWM). The last line is one
JSON object: ``ours`` = the 2-worker efficiency (or the largest N's when 2 is not measured), ``reference`` = 1.0
(ideal scaling) and the 1-worker throughput measured in the same run, ``ratio`` = ours ÷ 1.0.

Scaling needs a core (on a GPU box: a GPU) per worker and the memory of one pool process per worker: with more
workers than cores they share the cores and throughput stays flat (the README's Deployment section has the
figures of this machine).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench._stack import Deployment as Stack, RedisServer, mask_png, wait


def tree_memory_mb(pid: int) -> tuple[float, float, float]:
    """Of the process and its descendants (a worker: the Celery parent and its pool process): (resident MB
    summed, proportional MB summed — pages shared after the fork counted once — and the largest peak VmHWM)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0, 0.0
    rss = pss = peak = 0.0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            rss += info.rss / 2 ** 20
            pss += getattr(info, "pss", info.rss) / 2 ** 20
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError):
            continue
    return rss, pss, peak


class Deployment(Stack):
    """The API and N workers on one Redis, under their own key prefix and queue."""

    def __init__(self, redis_url: str, workers: int, folder: Path, model: str):
        super().__init__(redis_url, folder, workers=workers, name=f"scaleout-{workers}", default_model=model,
                         log_format="text")

    def submit(self, count: int, size: int, steps: int) -> list[str]:
        png = mask_png(size)
        ids = []
        for _ in range(count):
            resp = self.http.post("/generate", files={"mask": ("mask.png", png, "image/png")},
                                  data={"params": json.dumps({"mask_mpp": 0.5, "steps": steps, "seed": 7})})
            if resp.status_code != 202:
                raise RuntimeError(f"POST /generate answered {resp.status_code}: {resp.text}")
            ids.append(resp.json()["id"])
        return ids

    def finish(self, ids: list[str], timeout: float) -> list[dict]:
        pending, done = set(ids), {}

        def all_done():
            for job_id in list(pending):
                job = self.http.get(f"/jobs/{job_id}").json()
                if job["status"] in ("failed", "canceled", "expired"):
                    raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
                if job["status"] == "succeeded":
                    done[job_id] = job
                    pending.discard(job_id)
            return not pending

        wait(all_done, timeout, f"{len(ids)} jobs", interval=0.5)
        return [done[i] for i in ids]


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()


def measure(redis_url: str, workers: int, args, root: Path) -> dict:
    deployment = Deployment(redis_url, workers, root / f"workers-{workers}", args.model)
    try:
        deployment.ready(args.timeout)
        if args.warmup:
            deployment.finish(deployment.submit(workers, args.size, args.steps), args.timeout)
        ids = deployment.submit(args.jobs, args.size, args.steps)
        jobs = deployment.finish(ids, args.timeout)
        memory = [tree_memory_mb(p.pid) for p in deployment.workers]
    finally:
        deployment.stop()
    created = min(_ts(j["created_at"]) for j in jobs)
    finished = max(_ts(j["finished_at"]) for j in jobs)
    run = [(_ts(j["finished_at"]) - _ts(j["started_at"])) for j in jobs]
    wall = finished - created
    return {"workers": workers, "jobs": len(jobs), "wall_s": round(wall, 2),
            "jobs_per_min": round(len(jobs) / wall * 60, 3),
            "mean_job_s": round(sum(run) / len(run), 2),
            "rss_mb_per_worker": round(max(m[0] for m in memory), 1),
            "pss_mb_per_worker": round(max(m[1] for m in memory), 1),
            "peak_rss_mb_pool_process": round(max(m[2] for m in memory), 1)}


def machine() -> dict:
    import psutil

    return {"cpu_cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="worker counts to measure, comma-separated (1 first: "
                                                           "the efficiency is relative to it)")
    parser.add_argument("--jobs", type=int, default=12, help="jobs in the measured batch (default 12)")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per job (default 8)")
    parser.add_argument("--model", default="diffinfinite-demo")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the warm-up round (the batch then pays each pool process's model load)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each stage")
    args = parser.parse_args(argv)
    counts = sorted({int(x) for x in args.workers.split(",") if x.strip()})
    if not counts or counts[0] != 1 or args.jobs < 1:
        parser.error("--workers must include 1 (the baseline) and --jobs must be at least 1")
    info = machine()
    print(f"scale-out: {args.jobs} jobs of {args.size}² ({args.model}, {args.steps} steps) per worker count; "
          f"{info['cpu_cores']} CPU cores, {info['memory_gb']} GB; one pool process and one thread per worker",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="slidesynth-scaleout-") as tmp:
        root = Path(tmp)
        redis_server = RedisServer(root / "redis").start()
        try:
            for n in counts:
                rows.append(measure(redis_server.url, n, args, root))
                print(f"  measured {n} worker(s): {rows[-1]['jobs_per_min']} jobs/min", flush=True)
        finally:
            redis_server.stop()
    base = rows[0]["jobs_per_min"]
    for row in rows:
        row["efficiency"] = round(row["jobs_per_min"] / (row["workers"] * base), 3)
    header = (f"{'workers':>7} {'jobs':>5} {'wall s':>8} {'jobs/min':>9} {'efficiency':>10} {'job s':>7} "
              f"{'RSS/worker MB':>13} {'PSS/worker MB':>13} {'pool peak MB':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['workers']:>7} {r['jobs']:>5} {r['wall_s']:>8.1f} {r['jobs_per_min']:>9.2f} "
              f"{r['efficiency']:>10.3f} {r['mean_job_s']:>7.1f} {r['rss_mb_per_worker']:>13.0f} {r['pss_mb_per_worker']:>13.0f} "
              f"{r['peak_rss_mb_pool_process']:>12.0f}")
    mine = next((r for r in rows if r["workers"] == 2), rows[-1])
    summary = {
        "bench": "scaleout",
        "params": {"workers": counts, "jobs": args.jobs, "size": args.size, "steps": args.steps, "model": args.model,
                   "warmup": args.warmup},
        "machine": info,
        "rows": rows,
        "ours": {"workers": mine["workers"], "efficiency": mine["efficiency"],
                 "jobs_per_min": mine["jobs_per_min"]},
        "reference": {"efficiency": 1.0, "jobs_per_min_1_worker": base,
                      "note": "ideal scaling; the 1-worker throughput measured in the same run"},
        "ratio": round(mine["efficiency"] / 1.0, 3),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
