"""Job priorities through the real app (embedded: file job store, kombu's filesystem broker): the field, its
record, its view and the queue each job is sent to. Ordering by a real worker on Redis:
tests/test_priority_redis.py."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_mask, png_bytes

SUBTYPE = {"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def client(embedded_settings):
    from service.app import create_app

    app = create_app(embedded_settings)
    with TestClient(app) as c:
        c.settings, c.store = embedded_settings, app.state.services.store
        yield c


def message_queues(client) -> list[str]:
    """The queue of every message in the filesystem broker (files ``<ms>_<uuid>.<queue>.msg``)."""
    folder = client.settings.data_dir / "broker" / "queue"
    names = sorted(folder.iterdir()) if folder.is_dir() else []
    return [p.name.partition(".")[2].removesuffix(".msg") for p in names]


def test_priority_is_recorded_shown_and_picks_the_queue(client):
    ids = {}
    for priority in ("high", "low", None):
        body = SUBTYPE if priority is None else {**SUBTYPE, "priority": priority}
        resp = client.post("/generate", json=body)
        assert resp.status_code == 202, resp.text
        ids[priority or "normal"] = resp.json()["id"]
        # one message per job, on its priority's queue; normal keeps the queue's own name
        assert message_queues(client)[-1] == {"high": "gpu.high", "low": "gpu.low", None: "gpu"}[priority]
    resp = client.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(32, 32)), "image/png")},
                       data={"params": json.dumps({"priority": "high", "steps": 2})})
    assert resp.status_code == 202, resp.text
    ids["mask-high"] = resp.json()["id"]
    assert sorted(message_queues(client)) == ["gpu", "gpu.high", "gpu.high", "gpu.low"]
    for name, job_id in ids.items():
        want = name.removeprefix("mask-")
        assert client.store.get(job_id).priority.value == want
        assert client.get(f"/jobs/{job_id}").json()["priority"] == want
    listing = {j["id"]: j["priority"] for j in client.get("/jobs").json()["items"]}
    assert listing == {job_id: name.removeprefix("mask-") for name, job_id in ids.items()}


@pytest.mark.parametrize("value", ["urgent", "HIGH", 1, None, ""])
def test_an_invalid_priority_is_a_422_naming_it(client, value):
    resp = client.post("/generate", json={**SUBTYPE, "priority": value})
    assert resp.status_code == 422 and [d["loc"] for d in resp.json()["detail"]] == [["body", "priority"]]
    resp = client.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(32, 32)), "image/png")},
                       data={"params": json.dumps({"priority": value})})
    assert resp.status_code == 422 and [d["loc"] for d in resp.json()["detail"]] == [["body", "params", "priority"]]
    assert client.store.list("public", 0, 10)[1] == 0 and message_queues(client) == []


def test_queue_names_and_the_workers_order(embedded_settings):
    from core.queue import broker_options, job_queue, worker_queues

    settings = embedded_settings.model_copy(update={"queue": "slides"})
    assert [job_queue(settings, p) for p in ("high", "normal", "low")] == ["slides.high", "slides", "slides.low"]
    # the embed queue first (short requests a client waits for), then the job queues high → low
    assert worker_queues(settings) == ["slides.embed", "slides.high", "slides", "slides.low"]
    redis = settings.model_copy(update={"broker_url": "redis://127.0.0.1:6379/0"})
    assert broker_options(redis)[1]["queue_order_strategy"] == "priority"


def test_a_record_from_before_priorities_is_normal(client):
    from core.jobs import JobRecord

    job_id = client.post("/generate", json=SUBTYPE).json()["id"]
    path = client.store.job_dir(job_id) / "job.json"
    data = json.loads(path.read_text())
    del data["priority"]
    path.write_text(json.dumps(data))
    assert JobRecord.model_validate(data).priority.value == "normal"
    assert client.get(f"/jobs/{job_id}").json()["priority"] == "normal"
