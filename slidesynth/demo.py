"""``make demo``: start the embedded service, submit the demo mask over HTTP, follow it, print the TIFF path;
then ask for "a slide like this tile": embed a procedural carcinoma tile (``POST /embed``) and generate an
∞-Brush slide from its embedding.

Runs with no configuration: no broker server, a local data directory (``data/demo`` unless
``SLIDESYNTH_DATA_DIR`` is set), and the default models (the untrained ones until weights exist).
``SLIDESYNTH_DEMO_INFBRUSH=0`` skips the ∞-Brush slide.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def demo_mask(size: int = 256, seed: int = 0) -> np.ndarray:
    """A seeded 5-class layout: tumour islands (1) with necrotic cores (2) in stroma (3), a fat/vessel
    region (4) and glass (0) around the tissue."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    labels = np.zeros((size, size), np.uint8)
    tissue = (xx - 0.5) ** 2 / 0.22 + (yy - 0.5) ** 2 / 0.18 < 1.0
    labels[tissue] = 3
    labels[tissue & (xx > 0.68) & (yy > 0.55)] = 4
    for _ in range(6):
        cx, cy, r = rng.uniform(0.25, 0.65), rng.uniform(0.25, 0.7), rng.uniform(0.06, 0.11)
        dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        labels[tissue & (dist < r)] = 1
        labels[tissue & (dist < r * 0.35)] = 2
    return labels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import httpx
    from PIL import Image

    env = os.environ.copy()
    env.setdefault("SLIDESYNTH_DATA_DIR", str(REPO / "data" / "demo"))
    env.pop("SLIDESYNTH_BROKER_URL", None)  # the demo is the embedded mode
    port = int(env.get("SLIDESYNTH_DEMO_PORT", _free_port()))
    mask_mpp = 2.0  # 256 px mask at 2 µm/px → 1024² px slide at 0.5 µm/px
    server = subprocess.Popen([sys.executable, "-m", "slidesynth.cli", "serve", "--port", str(port),
                               "--log-level", "warning"], env=env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                print("error: the embedded service did not start", file=sys.stderr)
                return 1
            time.sleep(0.3)
        models = client.get("/models").json()
        default = next(m for m in models["models"] if m["name"] == models["default"])
        print(f"model: {default['name']} ({'trained' if default['trained'] else 'UNTRAINED: random weights'})")
        from evaluation.fidelity import labels_for_classes

        # demo_mask() is in the procedural classes (0 glass, 1–4 tissue); ask with the model's own labels
        buf = io.BytesIO()
        Image.fromarray(labels_for_classes(demo_mask(), default.get("fidelity_classes"))).save(buf, format="PNG")
        params = {"mask_mpp": mask_mpp, "seed": 0, "outputs": ["tiff", "zarr"]}
        resp = client.post("/generate", files={"mask": ("demo_mask.png", buf.getvalue(), "image/png")},
                           data={"params": json.dumps(params)})
        if resp.status_code != 202:
            print(f"error: {resp.status_code} {resp.text}", file=sys.stderr)
            return 1
        job_id = resp.json()["id"]
        print(f"job {job_id} submitted: POST /generate → {resp.headers['location']}")
        if not _follow(client, job_id, env):
            return 1
        if env.get("SLIDESYNTH_DEMO_INFBRUSH", "1") != "0":
            return 0 if _infbrush_slide(client, models, env) else 1
        return 0
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _infbrush_slide(client, models: dict, env: dict) -> bool:
    """"A slide like this tile": POST /embed a held-out procedural carcinoma tile with the default ∞-Brush
    model's encoder, then POST /generate with that embedding (no model named: the default embedding model)."""
    from PIL import Image

    from evaluation.conditioning import held_out_tile

    info = next(m for m in models["models"] if m["name"] == models["default_embedding"])
    encoder = info["embedding_encoder"]
    if encoder not in {e["id"] for e in client.get("/encoders").json()["encoders"]}:
        print(f"∞-Brush: the default embedding model {info['name']} takes {encoder} embeddings, an encoder this "
              "deployment has not installed; skipped")
        return True
    buf = io.BytesIO()
    Image.fromarray(held_out_tile("carcinoma", 64)).save(buf, format="PNG")
    resp = client.post("/embed", files={"tiles": ("carcinoma.png", buf.getvalue(), "image/png")},
                       data={"encoder": encoder})
    if resp.status_code != 200:
        print(f"error: POST /embed: {resp.status_code} {resp.text}", file=sys.stderr)
        return False
    vector = resp.json()["embeddings"][0]
    print(f"∞-Brush: a 64-px carcinoma tile embedded by {encoder} ({len(vector)} numbers): POST /embed")
    body = {"conditioning": {"type": "embedding", "vector": vector, "encoder": encoder}, "width": 1024,
            "height": 1024, "seed": 0, "steps": 25, "outputs": ["tiff"]}
    resp = client.post("/generate", json=body)
    if resp.status_code != 202:
        print(f"error: {resp.status_code} {resp.text}", file=sys.stderr)
        return False
    job_id = resp.json()["id"]
    print(f"job {job_id} submitted (model {info['name']}): POST /generate → {resp.headers['location']}")
    return _follow(client, job_id, env)


def _follow(client, job_id: str, env: dict) -> bool:
    """Poll a job with a progress bar until it ends; print where its outputs are."""
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}] {postfix}")
    while True:
            job = client.get(f"/jobs/{job_id}").json()
            bar.n = round(100 * job["progress"], 1)
            eta = f", eta {job['eta_seconds']:.0f}s" if job.get("eta_seconds") else ""
            step = f" step {job['step']}/{job['steps']}" if job.get("step") is not None else ""
            bar.set_postfix_str(f"{job['status']} {job['stage'] or ''}{step}{eta}")
            bar.refresh()
            if job["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.5)
    bar.close()
    if job["status"] != "succeeded":
        print(f"error: job {job['status']}: {job['error']}", file=sys.stderr)
        return False
    job_dir = Path(env["SLIDESYNTH_DATA_DIR"]).resolve() / "jobs" / job_id
    metrics = job.get("metrics") or {}
    print(f"{job['width']}×{job['height']} px at {job['mpp']} µm/px in {metrics.get('seconds_total')} s")
    shares = {k[len("class_share_"):]: v for k, v in metrics.items() if k.startswith("class_share_")}
    if shares:
        print("windows by class (fidelity classifier): " + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()))
    print(f"thumbnail: {job_dir / 'thumbnail.png'}")
    if (job_dir / "slide.zarr").exists():
        print(f"OME-Zarr:  {job_dir / 'slide.zarr'}")
    print(f"pyramidal TIFF: {job_dir / 'slide.tiff'}")
    return True


if __name__ == "__main__":
    sys.exit(main())
