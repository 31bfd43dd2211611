"""`python -m bench.fidelity --embedding` runs end to end (tiny size and steps: its figures mean nothing here) and
prints a table and a last JSON line with ours, the reference (an unconditioned sample) and their ratio."""
import json


def test_embedding_bench_runs_and_ends_with_one_json_line(capsys, monkeypatch):
    from bench.fidelity import main
    from core.settings import get_settings

    for name in ("SLIDESYNTH_MODELS_DIR", "SLIDESYNTH_DEFAULT_EMBEDDING_MODEL"):  # the shipped weights
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    try:
        assert main(["--embedding", "--size", "128", "--steps", "1"]) == 0
    finally:
        get_settings.cache_clear()
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["bench"] == "fidelity-embedding" and summary["model"] == "infinity-brush-bessel-demo"  # the default
    rows = summary["ours"]["rows"]
    assert [r["condition"] for r in rows] == ["carcinoma", "tumor stroma", "necrosis"]
    assert all(0.0 <= r["share"] <= 1.0 and -1.0 <= r["cosine"] <= 1.0 for r in rows)
    assert len(summary["ours"]["grid_majorities"]) == 4 and "mean_cosine" in summary["reference"]
    assert any(line.startswith("carcinoma") for line in lines)
