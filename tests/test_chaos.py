"""Chaos (issue 21): `python -m bench.chaos` at a small size — two workers, seeded SIGKILLs of the pool processes
running jobs and one Redis restart, every job finished once, no duplicate run, slides bit-identical to a clean run,
steps redone per stop ≤ the checkpoint interval — and its checker, which must fail when the run is broken."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from bench.chaos import (JobObservation, Run, Schedule, attach_claims, check_job, claim_steps, log_lines,
                         runs_from_logs, slide_digests, succeeded_writes)
from core.jobs import FileJobStore, JobRecord, JobSpec
from tests.conftest import REPO, make_mask, png_bytes

INTERVAL = 5


@pytest.mark.slow
@pytest.mark.integration
def test_two_workers_survive_kills_and_a_redis_restart(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SLIDESYNTH_CHAOS_KEEP=str(tmp_path / "logs"))
    res = subprocess.run([sys.executable, "-m", "bench.chaos", "--jobs", "3", "--kills", "4", "--steps", "20",
                          "--checkpoint-every", str(INTERVAL), "--seed", "1", "--timeout", "300"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    out = res.stdout.strip().splitlines()
    summary = json.loads(out[-1]) if out and out[-1].startswith("{") else None
    assert summary is not None, res.stdout[-3000:] + res.stderr[-3000:]
    failed = [j for j in summary["jobs"] if j["violations"]]
    assert not failed, "\n".join(res.stdout.splitlines()[-12:]) + "\n" + json.dumps(failed, indent=1)
    assert summary["complete"] and summary["ours"]["kills"] == 4 and summary["ours"]["redis_restarts"] == 1
    assert summary["ours"]["violations"] == 0 and summary["reference"]["violations"] == 0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = summary["jobs"]
    assert len(jobs) == 3 and all(j["status"] == "succeeded" and j["finished_once"] for j in jobs)
    assert all(j["identical"] and j["bytes_identical"] and j["duplicates"] == 0 for j in jobs)
    # every kill and the restart cost a run: attempts = 1 + the job's stops, each accounted for
    assert sum(j["kills"] for j in jobs) == 4 and sum(j["restart_stops"] for j in jobs) >= 1
    assert all(j["attempts"] == j["runs"] == 1 + len(j["stops"]) for j in jobs)
    redone = [s["redone"] for j in jobs for s in j["stops"]]
    assert redone and all(r is not None and r <= INTERVAL for r in redone)
    assert summary["pool_processes_seen"] >= 2 + 4  # Celery replaced each killed pool process itself
    assert any(line.lstrip().startswith("job") and "identical" in line for line in out)  # the table


# --- the checker -----------------------------------------------------------------------------------------------

def _snapshots(claim, attempts, pid, steps, stale_step=None, first_at=100.0):
    """The record snapshots a run writes: its claim, the untrained flag, (sampling, 0), then its steps."""
    base = {"status": "running", "claim": claim, "attempts": attempts, "worker": f"host/{pid}"}
    out = [dict(base, stage="sampling" if stale_step is not None else None, step=stale_step),
           dict(base, stage="sampling" if stale_step is not None else None, step=stale_step),
           dict(base, stage="sampling", step=0)]
    out += [dict(base, stage="sampling", step=s, heartbeat_at=first_at + i) for i, s in enumerate(steps)]
    return out


def test_claim_steps_counts_a_runs_own_steps_not_the_step_it_inherited():
    events = _snapshots("c1", 1, 10, range(1, 13)) + _snapshots("c2", 2, 11, range(11, 21), stale_step=12,
                                                                    first_at=200.0)
    assert claim_steps(events, "c1") == (0, 12, 100.0)
    assert claim_steps(events, "c2") == (10, 20, 200.0)
    # a run that never sampled (killed while loading): it inherited step 12, it did nothing
    assert claim_steps(_snapshots("c3", 3, 12, [], stale_step=12), "c3") == (None, None, None)


def test_the_schedule_is_seeded_and_strikes_mid_sampling():
    a, b = Schedule.draw(7, 12), Schedule.draw(7, 12)
    assert (a.fractions, a.delays, a.restart_after) == (b.fractions, b.delays, b.restart_after)
    assert a.fractions != Schedule.draw(8, 12).fractions and 4 <= a.restart_after <= 8
    for k in range(12):
        for resumed in range(0, 28):  # a run that resumed at any step short of the last two still gets struck
            assert resumed < a.target(k, resumed, 30) <= 28


def _observation(runs, events, status="succeeded", same=True, **kw):
    attach_claims(runs, events)
    for run in runs:
        run.cause = run.cause or ("kill" if run.end_kind == "killed" else None)
    return JobObservation(job_id="j", seed=0, status=status, attempts=len(runs), runs=runs,
                          succeeded_writes=kw.pop("writes", 1 if status == "succeeded" else 0),
                          pixels_sha="a", reference_sha="a" if same else "b", **kw)


def test_a_clean_kill_and_resume_passes():
    events = _snapshots("c1", 1, 10, range(1, 13)) + _snapshots("c2", 2, 11, range(11, 21), stale_step=12)
    runs = [Run(1, 10, 0.0, 5.0, "killed"), Run(2, 11, 6.0, 9.0, "succeeded")]
    verdict = check_job(_observation(runs, events), INTERVAL)
    assert verdict["violations"] == [] and verdict["redone"] == [2] and verdict["kills"] == 1


def test_each_kind_of_violation_is_reported():
    events = _snapshots("c1", 1, 10, range(1, 13)) + _snapshots("c2", 2, 11, range(11, 21), stale_step=12)

    def verdict(runs, **kw):
        return check_job(_observation(runs, events, **kw), INTERVAL)["violations"]

    # two live runs of one job at once: the first was never seen to end
    assert any("duplicate" in v for v in verdict([Run(1, 10, 0.0, math.inf, "alive"),
                                                  Run(2, 11, 6.0, 9.0, "succeeded")]))
    # overlapping intervals: the second started before the first was killed
    assert any("duplicate" in v for v in verdict([Run(1, 10, 0.0, 7.0, "killed"),
                                                  Run(2, 11, 6.0, 9.0, "succeeded")]))
    ok = [Run(1, 10, 0.0, 5.0, "killed"), Run(2, 11, 6.0, 9.0, "succeeded")]
    assert verdict(ok, same=False) == ["output differs from the reference"]
    assert any("unfinished" in v for v in verdict([Run(1, 10, 0.0, 5.0, "killed"), Run(2, 11, 6.0, 9.0, "failed")],
                                                  status="failed"))
    assert any("finished" in v for v in verdict(ok, writes=2))
    # the log (and the resumed_from_step metric) says one step, the sampler went on from another
    misstated = [Run(1, 10, 0.0, 5.0, "killed"), Run(2, 11, 6.0, 9.0, "succeeded", resumed_logged=5)]
    assert verdict(misstated) == ["attempt 2 logged a resume from step 5 but sampled from step 10"]
    # a run that ended though nobody stopped it (e.g. it lost its claim to a recovery that thought it dead)
    lost = [Run(1, 10, 0.0, 5.0, "running", cause="unexplained"), Run(2, 11, 6.0, 9.0, "succeeded")]
    assert any("no reason" in v for v in verdict(lost))


def test_runs_and_their_ends_come_from_the_worker_logs(tmp_path):
    lines = [
        {"time": "2026-01-01T00:00:01.000+00:00", "pid": 10, "job_id": "j", "message": "job j started (attempt 1, …)"},
        {"time": "2026-01-01T00:00:02.000+00:00", "pid": 20, "job_id": "k", "message": "job k started (attempt 1, …)"},
        {"time": "2026-01-01T00:00:06.000+00:00", "pid": 11, "job_id": "j", "message": "job j started (attempt 2, …)"},
        {"time": "2026-01-01T00:00:06.100+00:00", "pid": 11, "job_id": "j",
         "message": "job j resumes from its checkpoint at step 10"},
        {"time": "2026-01-01T00:00:07.000+00:00", "pid": 20, "job_id": "j",
         "message": "job j is running in host/11: this delivery is a duplicate and is dropped"},
        {"time": "2026-01-01T00:00:09.000+00:00", "pid": 11, "job_id": "j", "message": "job j run ended: succeeded"},
    ]
    path = tmp_path / "worker0.log"
    path.write_text("not json\n" + "\n".join(json.dumps(line) for line in lines) + "\n")
    parsed = log_lines([path])
    t0 = parsed[0]["t"]
    runs, dropped = runs_from_logs(parsed, "j", kills={10: t0 + 4.0}, deaths={})
    assert dropped == 1 and [(r.attempt, r.pid, r.end_kind, r.resumed_logged) for r in runs] == [
        (1, 10, "killed", None), (2, 11, "succeeded", 10)]
    assert runs[0].end == pytest.approx(t0 + 4.0) and runs[1].end == pytest.approx(t0 + 8.0)
    # job k's run never ended and its process was not seen to die: it is alive, forever
    (k_run,), _ = runs_from_logs(parsed, "k", kills={}, deaths={})
    assert k_run.end == math.inf and k_run.interrupted


class SnapshotStore(FileJobStore):
    """The file store, keeping a snapshot of the record after every write (what the Redis store's event stream holds),
    and able to die — the process SIGKILLed — right after it recorded a given sampling step."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.events: list[dict] = []
        self.die_after_step: int | None = None

    def _snap(self, job_id):
        self.events.append(self.get(job_id).model_dump(mode="json", exclude={"spec"}))

    def update(self, job_id, **fields):
        super().update(job_id, **fields)
        self._snap(job_id)
        if self.die_after_step is not None and fields.get("step") == self.die_after_step:
            self.die_after_step = None
            raise Killed

    def transition(self, job_id, allowed, expect=None, **fields):
        done = super().transition(job_id, allowed, expect, **fields)
        if done:
            self._snap(job_id)
        return done


class Killed(BaseException):
    """Stands for SIGKILL: nothing in run_job catches it, the record stays as the run left it."""


@pytest.mark.parametrize("checkpoint_every", [INTERVAL, 0])
def test_the_checker_fails_a_worker_that_does_not_checkpoint(embedded_settings, checkpoint_every):
    """The real job runner, a run 'killed' after step 7 and its redelivery: with checkpoints every 5 steps the job
    goes on from step 5 (2 steps redone); with SLIDESYNTH_CHECKPOINT_EVERY=0, a broken setting, it starts over and
    the checker reports 7 steps redone > 5 — while the slide is still identical, so only this check catches it."""
    import os as _os

    from models.registry import ModelRegistry
    from worker.jobrunner import WorkerContext, run_job

    settings = embedded_settings.model_copy(update={"checkpoint_every": checkpoint_every})
    store = SnapshotStore(settings.data_dir)
    ctx = WorkerContext(settings, store, ModelRegistry(settings.models_dir), hostname="host")
    spec = JobSpec(model="diffinfinite-untrained", engine="diffinfinite", conditioning="mask", width=64, height=64,
                   mpp=0.5, seed=3, steps=12, guidance=2.0, mask_file="mask.png", compression="deflate")
    for job_id in ("ref", "j"):
        job_dir = store.job_dir(job_id)
        job_dir.mkdir(parents=True)
        (job_dir / "mask.png").write_bytes(png_bytes(make_mask(64, 64, classes=(0, 1, 3))))
        store.create(JobRecord(id=job_id, spec=spec))
    run_job("ref", ctx)
    events_before = len(store.events)
    store.die_after_step = 7
    with pytest.raises(Killed):
        run_job("j", ctx)
    run_job("j", ctx)
    events = [e for e in store.events[events_before:] if e["id"] == "j"]
    pid = _os.getpid()
    runs = [Run(1, pid, 0.0, 1.0, "killed", cause="kill"), Run(2, pid, 2.0, 3.0, "succeeded")]
    attach_claims(runs, events)
    digests = {j: slide_digests(store.job_dir(j) / "slide.tiff") for j in ("ref", "j")}
    obs = JobObservation(job_id="j", seed=3, status=store.get("j").status.value, attempts=store.get("j").attempts,
                         runs=runs, succeeded_writes=succeeded_writes(events), pixels_sha=digests["j"][0],
                         reference_sha=digests["ref"][0])
    verdict = check_job(obs, INTERVAL)
    assert runs[0].last_step == 7 and verdict["identical"] and verdict["finished_once"]
    if checkpoint_every:
        assert runs[1].resumed_from == 5 and verdict["redone"] == [2] and verdict["violations"] == []
    else:
        assert runs[1].resumed_from == 0 and verdict["redone"] == [7]
        assert verdict["violations"] == [f"attempt 1 (kill): 7 steps redone > {INTERVAL}"]
    import tifffile

    assert np.array_equal(tifffile.imread(store.job_dir("ref") / "slide.tiff", key=0),
                          tifffile.imread(store.job_dir("j") / "slide.tiff", key=0))
