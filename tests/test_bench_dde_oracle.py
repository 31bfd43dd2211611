"""`python -m bench.dde_oracle --smoke`: the prepared oracle-goal run (train a coordinator on the Gaussian-field
oracle, then sample with it against MultiDiffusion and mixture), every code path on the CPU at tiny sizes; and
the oracle's exact denoiser following its input's device and dtype."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_bench_dde_oracle_smoke_trains_resumes_in_chunks_and_samples(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "bench.dde_oracle", "--smoke", "--out", str(tmp_path / "c")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "dde_oracle" and summary["steps_done"] == summary["steps"] == 4
    # two chunks of 2 steps, the second resumed from the checkpoint
    assert res.stdout.count("trained to step") == 2
    card = json.loads((tmp_path / "c" / "coordinator_card.json").read_text())
    assert card["training"]["complete"] is True and card["training"]["steps_done"] == 4
    assert set(summary["goals"]) == {"seam_b", "var", "lf"}
    # a 4-step coordinator barely moves off averaging: the dde row is MultiDiffusion's within a few per cent
    assert abs(summary["ratio"]["var_ratio"] - 1) < 0.05
    assert summary["evaluation"]["per_canvas"], summary
    assert [r["sigma"] for r in summary["excess_by_sigma"]] == [0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
    assert all(r["excess_averaging"] > 0 for r in summary["excess_by_sigma"])
    assert len(summary["line_ratio"]) == 24 - 1 and all(v > 0 for v in summary["line_ratio"])
    assert "seam by line" in res.stdout


def test_the_exact_patch_denoiser_runs_on_its_input_s_device():
    """The matrices are cached per device; the scalar-σ and per-window-σ paths agree."""
    from evaluation.gaussian_oracle import GaussianOracle

    oracle = GaussianOracle(24, 16)
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    a = oracle.denoiser(x, 0.7)
    b = oracle.denoiser(x, torch.full((3,), 0.7, dtype=torch.float64))
    assert a.device == x.device and torch.allclose(a, b, atol=1e-12)
    assert set(oracle.denoiser._basis) == {"cpu"} and set(oracle.denoiser._cache) == {(0.7, "cpu")}
