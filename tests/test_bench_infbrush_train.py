"""`python -m bench.infbrush_train`: the demo recipe's training step with the cache-blocked k-NN and decoded
images kept in memory against the previous k-NN and decoding on every draw — and the two runs' weights must be
bit-identical (the bench exits 1 otherwise)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_infbrush_train_runs_both_loops_to_identical_weights():
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, "-m", "bench.infbrush_train", "--images", "2", "--warmup", "2",
                          "--steps", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "infbrush_train" and summary["identical"] is True
    assert summary["ours_s_per_step"] > 0 and summary["reference_s_per_step"] > 0
    assert summary["ratio"] == round(summary["reference_s_per_step"] / summary["ours_s_per_step"], 3) or \
        abs(summary["ratio"] - summary["reference_s_per_step"] / summary["ours_s_per_step"]) < 0.01
