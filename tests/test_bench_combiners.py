"""bench.combiners: a candidate coordinator folder runs as `dde`, and every slide can be looked at as a PNG."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "diffinfinite-demo" / "dde-coordinator"


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="the demo model's coordinator is not in this checkout")
def test_candidate_coordinator_and_pngs(tmp_path, capsys):
    from PIL import Image

    from bench.combiners import main

    candidate = tmp_path / "candidate"
    shutil.copytree(SHIPPED, candidate)  # a coordinator folder outside the model folder
    out = tmp_path / "png"
    summary = main(["--size", "256", "--masks", "1", "--configs", "multidiffusion,dde", "--steps", "1",
                    "--equal", "steps", "--coordinator", str(candidate), "--png", str(out),
                    "--dde-guidance", "labels,shared", "--guidance", "2"])
    assert list(summary["rows"]) == ["multidiffusion", "dde:labels", "dde:shared"] and summary["guidance"] == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    names = sorted(p.name for p in out.iterdir())
    assert names == ["demo-dde-labels.png", "demo-dde-shared.png", "demo-multidiffusion.png", "demo-procedural.png"]
    two = [np.asarray(Image.open(out / f"demo-dde-{how}.png"), dtype=np.int16) for how in ("labels", "shared")]
    assert np.abs(two[0] - two[1]).max() > 0  # the way the coordinator meets guidance reached the sampler
    for n in names:
        img = np.asarray(Image.open(out / n))
        assert img.shape == (64, 64, 3) and img.std() > 1  # 4× down, not blank
    # a coordinator trained on other base weights is refused, naming both hashes
    card = json.loads((candidate / "coordinator_card.json").read_text())
    card["base"]["sha256"] = "0" * 64
    (candidate / "coordinator_card.json").write_text(json.dumps(card))
    with pytest.raises(Exception, match="0{64}"):
        main(["--size", "256", "--masks", "1", "--configs", "dde", "--steps", "1", "--equal", "steps",
              "--coordinator", str(candidate)])
