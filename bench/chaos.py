"""Chaos: two workers, seeded SIGKILLs of the pool processes running jobs and a Redis restart, and what the jobs
made of it.

    python -m bench.chaos                          # --jobs 8 --kills 12 --seed 0 --steps 30 --checkpoint-every 5
    python -m bench.chaos --jobs 3 --kills 4       # the size of tests/test_chaos.py

One private redis-server with AOF (``--appendonly yes``, its own folder), ``slidesynth serve --no-worker`` (uvicorn)
and two ``slidesynth worker`` processes (Celery prefork, one pool process each, one torch/OpenMP thread, CPU), with
``SLIDESYNTH_CHECKPOINT_EVERY=--checkpoint-every``, ``SLIDESYNTH_RECOVERY_SECONDS=2`` and
``SLIDESYNTH_MAX_ATTEMPTS`` above the most runs a job can be given here (``--kills`` + 3: the bench kills
the same job again and again if the dice say so; the cap itself is tests/test_worker_jobrunner.py's).

1. **Reference**: ``--jobs`` requests (a striped 5-class mask of ``--size``² at 0.5 µm/px, ``--steps`` steps, seed
   ``--seed``·1000 + i, Deflate) run once without faults; each slide's sha256 of the decoded base level (and of the
   file).
2. **Chaos**: the same requests again, all submitted at once. A schedule drawn from ``random.Random(--seed)``:
   for kill k a fraction f of what a run has left to sample and a fraction u of a step. Once a job's current run,
   which started sampling at step r, has reported step r + ⌈f·(steps − r)⌉ (at least r + 1, at most steps − 2
   unless r + 1 is more;
   its own steps, read from the job's record snapshots in its event stream, not the step the previous run left
   in the record), one such job (a seeded choice among those that qualify then) waits u of a step and its pool
   process — the record's ``worker`` "host/pid", checked to be a live child of one of the bench's workers, never
   another process — is SIGKILLed. After a seeded number of kills, while a run samples, Redis is stopped
   (SIGTERM: the AOF is flushed) and started again on the same port and folder after ``--redis-downtime``
   seconds. Nothing else is restarted: Celery replaces a killed pool process itself (the bench counts them),
   re-queues the lost task (late ack, reject on worker lost) and the periodic recovery re-queues a job whose
   process is gone. Which job a kill strikes also depends on timing: the schedule, not the run, is reproducible.

Per job, from the records, their event streams (a snapshot per write: claim, attempts, worker, stage, step), the
workers' JSON logs ("started (attempt n)", "resumes from its checkpoint at step s", "run ended") and the pool
processes the bench saw come and go:

* **runs**: each claim of the job, from its start line to its end line, or to its SIGKILL, or to the moment its
  process was seen gone; **attempts** from the record (must equal the runs). A run that ended without ending the
  job is a *stop*: a kill, or the Redis restart (Celery SIGTERMs a task it can no longer acknowledge once the
  broker is gone: its end line says ``error``); any other stop is a violation;
* **finished once**: status succeeded, one run ended ``succeeded`` and one write made it succeeded (stream);
* **duplicate runs**: pairs of its runs whose intervals overlap (two live runs of one job at once);
* **identical**: the decoded base level's sha256 equals the reference's (file bytes are compared too: no date is
  written, so they are equal as well);
* **steps redone** per interruption: the last sampling step the interrupted run reported minus the step the next
  run's sampler started from (its first reported step − 1, from the stream; the log's "resumes … at step", which
  the ``resumed_from_step`` metric repeats, must agree); must be ≤ ``--checkpoint-every``.

The last line is one JSON object: ``ours`` = the violations (jobs unfinished or finished more than once, duplicate
runs, non-identical slides, stops with more steps redone than the checkpoint interval, unexplained stops, a resume
step its log misstates, attempts ≠ runs),
``reference`` = 0 violations and the clean batch's wall time measured in the same run, ``ratio`` = chaos wall time ÷
clean wall time (what the faults cost). The exit status is 1 when there is a violation or the schedule could not be
carried out (fewer kills than asked, no restart).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from bench._stack import Deployment as Stack, RedisServer, mask_png, wait

TERMINAL = ("succeeded", "failed", "canceled", "expired")
RECOVERY_SECONDS = 2
RESTART_WINDOW = 30.0  # a run that ends this soon after Redis went down counts as ended by the restart


# --- what the checks read: runs and their steps ---------------------------------------------------------------

@dataclass
class Run:
    """One claim of a job: a run of ``run_job`` that took the job."""

    attempt: int
    pid: int
    start: float
    end: float = math.inf  # math.inf: never seen to end
    end_kind: str = "alive"  # the "run ended" line's status (succeeded, failed, error, …), or killed / died / alive
    claim: str | None = None
    resumed_from: int | None = None  # the step its sampler started from (0: from scratch); None: it never sampled
    last_step: int | None = None  # the last sampling step it reported; None: none
    resumed_logged: int | None = None  # "resumes from its checkpoint at step s" (None: no such line)
    first_step_at: float | None = None  # when it reported its first sampling step
    cause: str | None = None  # of an interruption: "kill", "redis-restart", "unexplained"

    @property
    def interrupted(self) -> bool:
        """It ended without ending the job: SIGKILLed, its process gone, or its end line says so ("error": the
        SIGTERM Celery sends a task it cannot acknowledge after losing the broker; "running": it lost its claim)."""
        return self.end_kind not in ("succeeded", "failed", "canceled")


@dataclass
class JobObservation:
    job_id: str
    seed: int
    status: str
    attempts: int
    runs: list[Run]
    succeeded_writes: int  # writes of the job's record that made it succeeded (its event stream)
    pixels_sha: str | None = None
    reference_sha: str | None = None
    bytes_identical: bool | None = None
    dropped_deliveries: int = 0  # deliveries dropped because a live run held the job
    wall_s: float | None = None


def claim_steps(events: list[dict], claim: str) -> tuple[int | None, int | None, float | None]:
    """``(resumed_from, last_step, first_step_at)`` of the run that held ``claim``, from the job's record snapshots
    in write order: the step its sampler started from, the last step it reported and when it reported its first
    (the write's ``heartbeat_at``); Nones when it sampled no step.

    The claim's first snapshot is the claiming write itself and its next ones (before sampling starts) still show
    the step the previous run left; a run's own sampling begins with a (sampling, step 0) write, then reports
    step s + 1, s + 2, … from the step s its sampler starts at. So: the steps after that write; resumed_from = the
    first of them − 1, last_step = the largest."""
    mine = [e for e in events if e.get("claim") == claim]
    start = next((i for i in range(1, len(mine)) if mine[i].get("stage") == "sampling" and mine[i].get("step") == 0),
                 None)
    if start is None:
        return None, None, None
    steps = [(e["step"], e.get("heartbeat_at")) for e in mine[start + 1:]
             if e.get("stage") == "sampling" and isinstance(e.get("step"), int) and e["step"] > 0]
    if not steps:
        return None, None, None
    return steps[0][0] - 1, max(step for step, _ in steps), steps[0][1]


@dataclass
class Stop:
    """An interrupted run and what it cost."""

    run: Run
    redone: int | None  # sampling steps done again (None: no later run)
    resumed_from: int | None  # the step the job's sampling went on from
    resume_s: float | None  # from the interruption to the next sampled step


def stops(runs: list[Run]) -> list[Stop]:
    """For each interrupted run that another run followed: the sampling steps the job did again — its last reported
    step minus the step the next run that sampled started from (or, when no later run sampled, the step its log line
    names) — and the seconds until sampling went on. 0 steps for a run that had not sampled."""
    out = []
    for i, run in enumerate(runs):
        if not run.interrupted or i == len(runs) - 1:
            continue
        later = next((r for r in runs[i + 1:] if r.resumed_from is not None), None)
        if later is not None:
            resumed = later.resumed_from
        else:
            logged = [r.resumed_logged for r in runs[i + 1:] if r.resumed_logged is not None]
            resumed = logged[0] if logged else None
        resume_s = None
        if later is not None and later.first_step_at is not None and math.isfinite(run.end):
            resume_s = round(later.first_step_at - run.end, 2)
        if run.last_step is None:
            redone = 0
        else:
            redone = None if resumed is None else run.last_step - resumed
        out.append(Stop(run, redone, resumed, resume_s))
    return out


def overlapping_runs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Pairs of runs of one job that were alive at the same time."""
    pairs = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if a.start < b.end and b.start < a.end:
                pairs.append((a, b))
    return pairs


def check_job(obs: JobObservation, interval: int) -> dict[str, Any]:
    """The verdict on one job: its figures and the list of violations (empty: it came through)."""
    runs = sorted(obs.runs, key=lambda r: r.start)
    succeeded_runs = sum(r.end_kind == "succeeded" for r in runs)
    finished_once = obs.status == "succeeded" and succeeded_runs == 1 and obs.succeeded_writes == 1
    duplicates = overlapping_runs(runs)
    identical = obs.pixels_sha is not None and obs.pixels_sha == obs.reference_sha
    stopped = stops(runs)
    violations = []
    if obs.status != "succeeded":
        violations.append(f"unfinished ({obs.status})")
    elif not finished_once:
        violations.append(f"finished {succeeded_runs} times by runs, {obs.succeeded_writes} by writes")
    if duplicates:
        violations.append(f"{len(duplicates)} duplicate run(s): "
                          + ", ".join(f"attempts {a.attempt} and {b.attempt}" for a, b in duplicates))
    if obs.status == "succeeded" and not identical:
        violations.append("output differs from the reference")
    for run in runs:
        if run.interrupted and run.cause == "unexplained":
            violations.append(f"attempt {run.attempt} ended for no reason the bench gave ({run.end_kind})")
    for run in runs:
        if run.resumed_logged is not None and run.resumed_from is not None and run.resumed_logged != run.resumed_from:
            violations.append(f"attempt {run.attempt} logged a resume from step {run.resumed_logged} but sampled "
                              f"from step {run.resumed_from}")
    for stop in stopped:
        if stop.redone is None:
            violations.append(f"attempt {stop.run.attempt} interrupted and never resumed")
        elif stop.redone > interval:
            violations.append(f"attempt {stop.run.attempt} ({stop.run.cause}): {stop.redone} steps redone > {interval}")
    if obs.attempts != len(runs):
        violations.append(f"attempts {obs.attempts} != runs {len(runs)}")
    return {"job": obs.job_id, "seed": obs.seed, "status": obs.status, "attempts": obs.attempts, "runs": len(runs),
            "kills": sum(r.cause == "kill" for r in runs),
            "restart_stops": sum(r.cause == "redis-restart" for r in runs),
            "other_stops": sum(r.cause == "unexplained" for r in runs),
            "finished_once": finished_once, "duplicates": len(duplicates), "identical": identical,
            "bytes_identical": obs.bytes_identical,
            "redone": [stop.redone for stop in stopped], "dropped_deliveries": obs.dropped_deliveries,
            "wall_s": obs.wall_s, "violations": violations,
            "stops": [{"attempt": stop.run.attempt, "cause": stop.run.cause, "ended": stop.run.end_kind,
                       "last_step": stop.run.last_step, "resumed_from": stop.resumed_from, "redone": stop.redone,
                       "resume_s": stop.resume_s} for stop in stopped]}


# --- reading what happened: logs, streams, files ------------------------------------------------------------------

_STARTED = re.compile(r"^job (\w+) started \(attempt (\d+)")
_RESUMES = re.compile(r"^job (\w+) resumes from its checkpoint at step (\d+)")
_ENDED = re.compile(r"^job (\w+) run ended: (\w+)")
_DROPPED = re.compile(r"^job (\w+) is running in .*duplicate and is dropped")


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def log_lines(paths: Iterable[Path]) -> list[dict]:
    """The JSON lines of the workers' logs (other lines — a traceback a library printed — are skipped), by time."""
    lines = []
    for path in paths:
        for raw in path.read_text(errors="replace").splitlines():
            if not raw.startswith("{"):
                continue
            try:
                line = json.loads(raw)
                line["t"] = _ts(line["time"])
            except (ValueError, KeyError):
                continue
            lines.append(line)
    lines.sort(key=lambda line: line["t"])
    return lines


def runs_from_logs(lines: list[dict], job_id: str, kills: dict[int, float],
                   deaths: dict[int, float]) -> tuple[list[Run], int]:
    """The job's runs (start line, its resumes line, its end) and the deliveries dropped as duplicates. A run with no
    end line ended when the bench SIGKILLed its process (``kills``: pid → time) or when its process was seen gone
    (``deaths``: pid → the first poll that missed it; later than the death, so an overlap is never missed)."""
    runs: list[Run] = []
    open_runs: dict[int, Run] = {}
    dropped = 0
    for line in lines:
        message, pid, t = line.get("message", ""), line.get("pid"), line["t"]
        if (m := _STARTED.match(message)) and m.group(1) == job_id:
            run = Run(attempt=int(m.group(2)), pid=pid, start=t)
            runs.append(run)
            open_runs[pid] = run
        elif (m := _RESUMES.match(message)) and m.group(1) == job_id and pid in open_runs:
            open_runs[pid].resumed_logged = int(m.group(2))
        elif (m := _ENDED.match(message)) and m.group(1) == job_id and pid in open_runs:
            run = open_runs.pop(pid)
            run.end, run.end_kind = t, m.group(2)
        elif (m := _DROPPED.match(message)) and m.group(1) == job_id:
            dropped += 1
    for pid, run in open_runs.items():
        if pid in kills and kills[pid] >= run.start:
            run.end, run.end_kind = kills[pid], "killed"
        elif pid in deaths and deaths[pid] >= run.start:
            run.end, run.end_kind = deaths[pid], "died"
    return runs, dropped


def decode_event(fields: dict) -> dict:
    out = {}
    for key, value in fields.items():
        key = key.decode() if isinstance(key, bytes) else key
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def claims_of(events: list[dict]) -> list[dict]:
    """The claiming writes among a job's snapshots: claim, attempts, worker."""
    out, last = [], None
    for e in events:
        claim = e.get("claim")
        if claim and claim != last:
            out.append({"claim": claim, "attempts": e.get("attempts"), "worker": e.get("worker")})
        last = claim
    return out


def attach_claims(runs: list[Run], events: list[dict]) -> None:
    """Give each run its claim (the claiming write with its attempt number and pid) and the steps it sampled."""
    claims = claims_of(events)
    for run in runs:
        for c in claims:
            if c["attempts"] == run.attempt and str(c["worker"] or "").endswith(f"/{run.pid}"):
                run.claim = c["claim"]
                run.resumed_from, run.last_step, run.first_step_at = claim_steps(events, c["claim"])
                break


def succeeded_writes(events: list[dict]) -> int:
    count, before = 0, None
    for e in events:
        status = e.get("status")
        if status == "succeeded" and before != "succeeded":
            count += 1
        before = status
    return count


def slide_digests(path: Path) -> tuple[str, str]:
    """(sha256 of the decoded base level's pixels with its shape and dtype, sha256 of the file)."""
    import tifffile

    pixels = tifffile.imread(path, key=0)
    h = hashlib.sha256(f"{pixels.shape}{pixels.dtype}".encode())
    h.update(pixels.tobytes())
    return h.hexdigest(), hashlib.sha256(path.read_bytes()).hexdigest()


# --- the deployment -----------------------------------------------------------------------------------------------

class Deployment(Stack):
    """The API and two workers on one Redis, under their own key prefix and queue."""

    def __init__(self, redis_url: str, folder: Path, args, workers: int = 2):
        import redis

        super().__init__(redis_url, folder, workers=workers, name="chaos", default_model=args.model,
                         log_format="json", checkpoint_every=args.checkpoint_every,
                         recovery_seconds=RECOVERY_SECONDS, max_attempts=args.kills + 3)
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)

    def submit(self, size: int, steps: int, seeds: list[int]) -> list[str]:
        png = mask_png(size)
        ids = []
        for seed in seeds:
            params = {"mask_mpp": 0.5, "steps": steps, "seed": seed, "compression": "deflate"}
            resp = self.http.post("/generate", files={"mask": ("mask.png", png, "image/png")},
                                  data={"params": json.dumps(params)})
            if resp.status_code != 202:
                raise RuntimeError(f"POST /generate answered {resp.status_code}: {resp.text}")
            ids.append(resp.json()["id"])
        return ids

    def record(self, job_id: str) -> dict:
        return decode_event(self.redis.hgetall(f"{self.prefix}:job:{job_id}"))

    def events(self, job_id: str) -> list[dict]:
        return [decode_event(fields) for _, fields in self.redis.xrange(f"{self.prefix}:job:{job_id}:events")]

    def wait_finished(self, ids: list[str], timeout: float) -> list[dict]:
        def done():
            records = [self.record(i) for i in ids]
            return records if all(r.get("status") in TERMINAL for r in records) else None

        return wait(done, timeout, f"{len(ids)} jobs", interval=0.5)

    def pool_processes(self) -> dict[int, int]:
        """pid → worker index of every pool process now (children of the Celery parents)."""
        import psutil

        out = {}
        for i, proc in enumerate(self.workers):
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    if child.status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by its Celery parent
                        continue
                except psutil.NoSuchProcess:
                    continue
                out[child.pid] = i
        return out



# --- the chaos run ------------------------------------------------------------------------------------------------

@dataclass
class Schedule:
    """What random.Random(seed) drew. Kill k strikes a run once it has sampled ``fractions[k]`` of what it had left
    to sample (at least one step; :meth:`target`), ``delays[k]`` of a step later; Redis restarts
    after kill ``restart_after``; ``choices`` picks among the runs that qualify at once."""

    fractions: list[float]
    delays: list[float]
    restart_after: int
    choices: random.Random = field(repr=False, default_factory=random.Random)

    @classmethod
    def draw(cls, seed: int, kills: int) -> "Schedule":
        rng = random.Random(seed)
        fractions = [round(rng.uniform(0.0, 1.0), 3) for _ in range(kills)]
        delays = [round(rng.uniform(0.0, 1.0), 3) for _ in range(kills)]
        restart_after = rng.randint(max(1, kills // 3), max(1, (2 * kills) // 3)) if kills else 0
        return cls(fractions, delays, restart_after, random.Random(rng.random()))

    def target(self, k: int, resumed_from: int, steps: int) -> int:
        """The step at which kill k strikes a run that started sampling at ``resumed_from``: after its first step,
        and before its second-to-last where it can (a step of margin for the delay; else its last)."""
        left = steps - resumed_from
        step = min(steps - 2, resumed_from + math.ceil(self.fractions[k] * left))
        return min(steps - 1, max(resumed_from + 1, step))


@dataclass
class Progress:
    """Where a live run is: the step its sampler started from, its last step, seconds per step (its last two)."""

    resumed_from: int
    step: int
    step_seconds: float


class Chaos:
    def __init__(self, deployment: Deployment, redis_server: RedisServer, schedule: Schedule, args):
        self.d, self.redis_server, self.schedule, self.args = deployment, redis_server, schedule, args
        self.kills: list[dict] = []
        self.kill_times: dict[int, float] = {}
        self.restart: dict | None = None
        self.first_seen: dict[int, float] = {}
        self.deaths: dict[int, float] = {}
        self.live: set[int] = set()
        self.unfinished: list[str] = []

    def watch_processes(self) -> None:
        now = time.time()
        current = set(self.d.pool_processes())
        for pid in current - self.live:
            self.first_seen.setdefault(pid, now)
        for pid in self.live - current:
            self.deaths.setdefault(pid, now)
        self.live = current

    @staticmethod
    def run_pid(record: dict) -> int | None:
        host, _, pid = str(record.get("worker") or "").rpartition("/")
        return int(pid) if pid.isdigit() else None

    def progress(self, job_id: str, record: dict) -> Progress | None:
        """The job's current run, if it is alive and sampling (counting only its own steps), else None."""
        if record.get("status") != "running" or record.get("stage") != "sampling" or not record.get("claim"):
            return None
        pid = self.run_pid(record)
        if pid is None or pid not in self.live or pid in self.kill_times:
            return None  # its process is gone: the record waits for the next run
        mine = [e for e in self.d.events(job_id) if e.get("claim") == record["claim"]]
        resumed, last, _ = claim_steps(mine, record["claim"])
        if last is None or last >= self.args.steps:
            return None
        beats = [e.get("heartbeat_at") for e in mine[-2:] if e.get("stage") == "sampling"]
        seconds = beats[1] - beats[0] if len(beats) == 2 and None not in beats else 0.2
        return Progress(resumed, last, max(0.0, min(seconds, 5.0)))

    def kill(self, job_id: str, record: dict, k: int, at: Progress) -> bool:
        time.sleep(self.schedule.delays[k] * at.step_seconds)  # a random moment within the step
        now_record = self.d.record(job_id)
        pid = self.run_pid(now_record)
        self.watch_processes()
        if now_record.get("claim") != record.get("claim") or pid is None or pid in self.kill_times:
            return False  # it moved on (or the run ended) meanwhile: try again with the next candidate
        now = self.progress(job_id, now_record)  # checks its pid is a live pool process of ours
        if now is None:  # gone, or sampling is over: no longer mid-sampling
            return False
        os.kill(pid, signal.SIGKILL)  # a pool process of our own workers (checked above), never anything else
        t = time.time()
        self.kill_times[pid] = t
        self.kills.append({"k": k, "job": job_id, "pid": pid, "attempt": now_record.get("attempts"),
                           "claim": now_record.get("claim"), "resumed_from": at.resumed_from,
                           "target": self.schedule.target(k, at.resumed_from, self.args.steps), "step": now.step,
                           "at": t})
        return True

    def restart_redis(self, running: dict[str, Progress]) -> None:
        t = time.time()
        down = self.redis_server.restart(self.args.redis_downtime)
        self.restart = {"at": t, "down_s": round(down, 2),
                        "running": {job_id: at.step for job_id, at in running.items()}}

    def run(self, ids: list[str], timeout: float) -> None:
        import redis

        deadline = time.time() + timeout
        pending = set(ids)
        kills_wanted = len(self.schedule.fractions)
        while pending:
            if time.time() > deadline:  # a hung job: reported as unfinished, with what its runs did
                self.unfinished = sorted(pending)
                print(f"  chaos: {len(pending)} job(s) unfinished after {timeout:.0f} s: {self.unfinished}", flush=True)
                break
            try:
                self.watch_processes()
                records = {job_id: self.d.record(job_id) for job_id in sorted(pending)}
                for job_id, record in records.items():
                    if record.get("status") in TERMINAL:
                        pending.discard(job_id)
                k = len(self.kills)
                want_restart = self.restart is None and k >= self.schedule.restart_after
                if k < kills_wanted or want_restart:
                    sampling = {j: p for j in sorted(pending) if (p := self.progress(j, records[j])) is not None}
                    if want_restart and sampling:
                        self.restart_redis(sampling)
                        continue
                    if k < kills_wanted:
                        eligible = [j for j, p in sampling.items()
                                    if p.step >= self.schedule.target(k, p.resumed_from, self.args.steps)]
                        if eligible:
                            job_id = self.schedule.choices.choice(eligible)
                            self.kill(job_id, records[job_id], k, sampling[job_id])
                            continue
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass  # the bench's own reads during the Redis restart
            time.sleep(0.05)
        time.sleep(RECOVERY_SECONDS + 1)  # a stray duplicate delivery would show in the logs by now
        self.watch_processes()


def reference_run(d: Deployment, args, seeds: list[int]) -> tuple[dict[int, tuple[str, str]], float]:
    t0 = time.time()
    ids = d.submit(args.size, args.steps, seeds)
    records = d.wait_finished(ids, args.timeout)
    wall = time.time() - t0
    digests = {}
    for seed, job_id, record in zip(seeds, ids, records):
        if record.get("status") != "succeeded":
            raise RuntimeError(f"reference job {job_id} (seed {seed}) {record.get('status')}: {record.get('error')}")
        digests[seed] = slide_digests(d.data / "jobs" / job_id / "slide.tiff")
    return digests, wall


def observe(d: Deployment, chaos: Chaos, ids: list[str], seeds: list[int],
            reference: dict[int, tuple[str, str]]) -> list[JobObservation]:
    lines = log_lines(d.worker_logs())
    restart_at = chaos.restart["at"] if chaos.restart else None
    out = []
    for job_id, seed in zip(ids, seeds):
        record, events = d.record(job_id), d.events(job_id)
        runs, dropped = runs_from_logs(lines, job_id, chaos.kill_times, chaos.deaths)
        attach_claims(runs, events)
        for run in runs:
            if run.end_kind == "killed":
                run.cause = "kill"
            elif run.interrupted:  # Celery ends the tasks it can no longer acknowledge when the broker goes away
                near = restart_at is not None and restart_at <= run.end <= restart_at + RESTART_WINDOW
                run.cause = "redis-restart" if near else "unexplained"
        pixels = file_sha = None
        tiff = d.data / "jobs" / job_id / "slide.tiff"
        if record.get("status") == "succeeded" and tiff.exists():
            pixels, file_sha = slide_digests(tiff)
        wall = None
        if record.get("finished_at") and record.get("created_at"):
            wall = round(record["finished_at"] - record["created_at"], 1)
        out.append(JobObservation(job_id=job_id, seed=seed, status=str(record.get("status")),
                                  attempts=int(record.get("attempts") or 0), runs=runs,
                                  succeeded_writes=succeeded_writes(events), pixels_sha=pixels,
                                  reference_sha=reference[seed][0],
                                  bytes_identical=None if file_sha is None else file_sha == reference[seed][1],
                                  dropped_deliveries=dropped, wall_s=wall))
    return out


def print_table(verdicts: list[dict]) -> None:
    header = (f"{'job':<8} {'seed':>5} {'status':<9} {'attempts':>8} {'runs':>4} {'kills':>5} {'restart':>7} "
              f"{'other':>5} {'once':>4} {'dup':>3} {'identical':>9} {'redone':<12} {'dropped':>7} {'wall s':>6}  "
              f"violations")
    print(header)
    print("-" * len(header))
    for v in verdicts:
        redone = ",".join("?" if s is None else str(s) for s in v["redone"]) or "-"
        print(f"{v['job'][:8]:<8} {v['seed']:>5} {v['status']:<9} {v['attempts']:>8} {v['runs']:>4} {v['kills']:>5} "
              f"{v['restart_stops']:>7} {v['other_stops']:>5} {'yes' if v['finished_once'] else 'NO':>4} "
              f"{v['duplicates']:>3} {'yes' if v['identical'] else 'NO':>9} {redone:<12} "
              f"{v['dropped_deliveries']:>7} {'' if v['wall_s'] is None else v['wall_s']:>6}  "
              f"{'; '.join(v['violations']) or '-'}")


def print_stops(verdicts: list[dict]) -> None:
    header = (f"{'job':<8} {'attempt':>7} {'cause':<13} {'ended':<7} {'last step':>9} {'resumed from':>12} "
              f"{'redone':>6} {'resumed after s':>15}")
    print(header)
    print("-" * len(header))
    for v in verdicts:
        for stop in v["stops"]:
            cells = ["-" if stop[k] is None else str(stop[k]) for k in ("last_step", "resumed_from", "redone",
                                                                          "resume_s")]
            print(f"{v['job'][:8]:<8} {stop['attempt']:>7} {stop['cause'] or '-':<13} {stop['ended']:<7} "
                  f"{cells[0]:>9} {cells[1]:>12} {cells[2]:>6} {cells[3]:>15}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8, help="jobs in the batch (default 8)")
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs of pool processes running jobs (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule and of the jobs (default 0)")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps per job (default 30)")
    parser.add_argument("--checkpoint-every", type=int, default=5,
                        help="SLIDESYNTH_CHECKPOINT_EVERY of the workers, and the bound on steps redone (default 5)")
    parser.add_argument("--size", type=int, default=256, help="slide side in pixels (default 256)")
    parser.add_argument("--model", default="diffinfinite-demo")
    parser.add_argument("--redis-downtime", type=float, default=1.0,
                        help="seconds Redis stays down in its restart (default 1)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds to wait for each phase (jobs still unfinished then count as violations)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.kills < 0 or args.steps < 2 or args.checkpoint_every < 1:
        parser.error("--jobs ≥ 1, --kills ≥ 0, --steps ≥ 2 and --checkpoint-every ≥ 1")
    schedule = Schedule.draw(args.seed, args.kills)
    seeds = [args.seed * 1000 + i for i in range(args.jobs)]
    print(f"chaos: {args.jobs} jobs of {args.size}² ({args.model}, {args.steps} steps, checkpoint every "
          f"{args.checkpoint_every}), 2 workers × 1 pool process; {args.kills} SIGKILLs (at these fractions of what "
          f"a run has left to sample: {schedule.fractions}), Redis restarted after kill {schedule.restart_after} "
          f"({args.redis_downtime:g} s down); seed {args.seed}; {os.cpu_count()} CPU cores, load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="slidesynth-chaos-") as tmp:
        root = Path(tmp)
        redis_server = RedisServer(root / "redis", aof=True)
        redis_server.start()
        d = None
        try:
            d = Deployment(redis_server.url, root / "deployment", args)
            d.ready(args.timeout)
            reference, clean_wall = reference_run(d, args, seeds)
            print(f"  reference: {args.jobs} jobs without faults in {clean_wall:.1f} s", flush=True)
            chaos = Chaos(d, redis_server, schedule, args)
            chaos.watch_processes()
            initial = len(chaos.live)
            t0 = time.time()
            ids = d.submit(args.size, args.steps, seeds)
            chaos.run(ids, args.timeout)
            chaos_wall = time.time() - t0 - (RECOVERY_SECONDS + 1)
            observations = observe(d, chaos, ids, seeds, reference)
            pool_processes = len(chaos.first_seen)
            died = len(chaos.deaths)
            replaced = pool_processes - initial
            workers_alive = all(p.poll() is None for p in d.workers)
        finally:
            if d is not None:
                d.stop()
            redis_server.stop()
            if os.environ.get("SLIDESYNTH_CHAOS_KEEP"):  # the logs, for a post-mortem
                shutil.copytree(root / "deployment" / "logs", os.environ["SLIDESYNTH_CHAOS_KEEP"], dirs_exist_ok=True)
    verdicts = [check_job(obs, args.checkpoint_every) for obs in observations]
    print_stops(verdicts)
    print()
    print_table(verdicts)
    redone = [s for v in verdicts for s in v["redone"] if s is not None]
    violations = sum(len(v["violations"]) for v in verdicts)
    kills_done, restarted = len(chaos.kills), chaos.restart is not None
    print(f"kills {kills_done}/{args.kills}, Redis restart: "
          + (f"{chaos.restart['down_s']} s without Redis, {len(chaos.restart['running'])} job(s) sampling"
             if restarted else "none")
          + f"; pool processes: {initial} at the start, {died} died, {replaced} started by Celery (the bench restarted "
          f"no worker; workers {'alive' if workers_alive else 'NOT ALIVE'} at the end); steps redone per stop: "
          f"max {max(redone, default=0)}, mean {sum(redone) / max(len(redone), 1):.1f} (bound "
          f"{args.checkpoint_every}); wall {chaos_wall:.1f} s with faults vs {clean_wall:.1f} s clean; "
          f"violations {violations}")
    complete = kills_done == args.kills and restarted and workers_alive
    summary = {
        "bench": "chaos",
        "params": {"jobs": args.jobs, "kills": args.kills, "seed": args.seed, "steps": args.steps,
                   "checkpoint_every": args.checkpoint_every, "size": args.size, "model": args.model,
                   "redis_downtime": args.redis_downtime, "workers": 2},
        "schedule": {"fractions": schedule.fractions, "delays": schedule.delays,
                     "restart_after": schedule.restart_after},
        "kills": [{k: v for k, v in kill.items() if k != "claim"} for kill in chaos.kills],
        "restart": chaos.restart,
        "complete": complete,
        "jobs": verdicts,
        "pool_processes_seen": pool_processes,
        "pool_processes": {"initial": initial, "died": died, "started_by_celery": replaced,
                           "workers_alive_at_end": workers_alive},
        "ours": {"violations": violations, "kills": kills_done, "redis_restarts": int(restarted),
                 "max_redone": max(redone, default=0), "wall_s": round(chaos_wall, 1)},
        "reference": {"violations": 0, "wall_s": round(clean_wall, 1),
                      "note": "the same batch without faults, in the same run"},
        "ratio": round(chaos_wall / clean_wall, 3),
        "ratio_of": "wall time with faults ÷ without",
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["complete"] and result["ours"]["violations"] == 0 else 1)
