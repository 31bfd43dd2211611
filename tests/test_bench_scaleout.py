"""`python -m bench.scaleout` end to end at a tiny size (its figures mean nothing here: the lead runs the full
one): real redis-server, API and workers, and the JSON line's fields."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
@pytest.mark.integration
def test_scaleout_bench_runs_and_reports_efficiency_against_one_worker():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "bench.scaleout", "--workers", "1,2", "--jobs", "2", "--steps", "1",
                          "--timeout", "300"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert any(line.lstrip().startswith("workers") and "efficiency" in line for line in lines)  # the table
    assert summary["bench"] == "scaleout"
    assert summary["params"] == {"workers": [1, 2], "jobs": 2, "size": 256, "steps": 1, "model": "diffinfinite-demo",
                                 "warmup": True}
    rows = {row["workers"]: row for row in summary["rows"]}
    assert set(rows) == {1, 2}
    for n, row in rows.items():
        assert row["jobs"] == 2 and row["wall_s"] > 0 and row["jobs_per_min"] > 0
        assert row["jobs_per_min"] == pytest.approx(2 / row["wall_s"] * 60, rel=0.01)
        assert row["efficiency"] == pytest.approx(row["jobs_per_min"] / (n * rows[1]["jobs_per_min"]), abs=0.002)
        assert 100 < row["pss_mb_per_worker"] <= row["rss_mb_per_worker"] and row["peak_rss_mb_pool_process"] > 100
    assert rows[1]["efficiency"] == 1.0
    assert summary["ours"] == {"workers": 2, "efficiency": rows[2]["efficiency"],
                               "jobs_per_min": rows[2]["jobs_per_min"]}
    assert summary["reference"]["efficiency"] == 1.0
    assert summary["reference"]["jobs_per_min_1_worker"] == rows[1]["jobs_per_min"]
    assert summary["ratio"] == pytest.approx(rows[2]["efficiency"])
    assert summary["machine"]["cpu_cores"] >= 1 and summary["machine"]["memory_gb"] > 0
