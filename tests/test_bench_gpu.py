"""`python -m bench.gpu --smoke`: every code path of the prepared GPU benchmark, on the CPU at tiny sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_bench_gpu_smoke_runs_every_section():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    res = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "gpu" and summary["smoke"] is True
    details = summary["details"]
    assert details["skipped"] == []
    assert set(details["seconds"]) == {"unet", "steps", "e2e", "projection", "infbrush"}
    variants = {row["variant"] for row in details["unet"]["rows"]}
    assert variants == {"eager", "eager+fused", "compiled+fused"}
    assert details["unet"]["kernel"]["max_abs_diff"] < 1e-3
    steps = details["steps"]
    assert steps["tiled"]["calls"] <= 3 * steps["tiled"]["batches"]
    assert summary["ours"]["tiled_over_random"] > 0
    proj = details["projection"]
    assert proj["passes_per_step"]["tiled"] < proj["passes_per_step"]["random"]
    assert proj["tiled_dpmpp-2m_25_minutes"] < proj["tiled_ddim_250_minutes"]
    assert summary["ours"]["e2e_16384_50_s"] > 0 and summary["ours"]["infbrush_4096_50_s"] is not None
