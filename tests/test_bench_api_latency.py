"""`python -m bench.api_latency`: its open-loop generator and SSE timing on their own (fast), and the whole bench
end to end at a tiny size (its figures mean nothing here: the lead runs the full one)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from bench.api_latency import open_loop, percentile, step_delays
from tests.conftest import REPO


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0


async def _stalling_server(stall_at: int, stall_s: float):
    """An HTTP/1.1 keep-alive server answering a job's JSON; request number ``stall_at`` takes ``stall_s``."""
    served = []
    body = json.dumps({"status": "running", "step": 3}).encode()

    async def handle(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                served.append(time.perf_counter())
                if len(served) == stall_at:
                    await asyncio.sleep(stall_s)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, served


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_open_loop_counts_the_queueing_a_stall_causes(client):
    """One connection, 100 req/s for 1 s, and one answer stalled 0.3 s: the requests due meanwhile wait, and their
    latency runs from their due time (a closed loop would have sent nothing while it waited, and seen one slow
    request). About 30 requests are due during the stall: each must show its wait."""
    async def main():
        server, served = await _stalling_server(stall_at=24 + 30, stall_s=0.3)  # 24 warm-up requests first
        port = server.sockets[0].getsockname()[1]
        try:
            return await open_loop(f"http://127.0.0.1:{port}", "/jobs/x", rate=100, seconds=1, connections=1,
                                   client=client)
        finally:
            server.close()
            await server.wait_closed()

    row = asyncio.run(main())
    assert row["requests"] == 100 and row["ok"] == 100 and row["errors"] == 0
    assert row["statuses"] == {"running": 100}
    assert row["max_ms"] >= 290  # the stalled one
    assert row["p90_ms"] >= 100  # those queued behind it: ~30 % of the requests waited 0–300 ms
    assert row["p50_ms"] < 100
    assert 70 <= row["achieved_rate"] <= 101


def test_open_loop_reports_errors_without_answers():
    async def main():
        async def refuse(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await open_loop(f"http://127.0.0.1:{port}", "/jobs/x", rate=50, seconds=0.2, connections=4)
        finally:
            server.close()
            await server.wait_closed()

    row = asyncio.run(main())
    assert row["requests"] == 10 and row["ok"] == 0 and row["errors"] == 10
    # the server closes each connection after its answer (no `Connection: close`): the pool notices and reconnects
    assert row["error_kinds"] == {"HTTP 404": 10}


def test_step_delays_time_each_step_from_its_own_write():
    events = [(100.0, 3, {"status": "queued", "step": None}),
              (101.0, 5, {"status": "running", "step": None}),
              (102.010, 7, {"status": "running", "step": 0}),
              (102.020, 8, {"status": "running", "step": 0, "progress": 0.1}),  # same step: not a new sample
              (102.120, 9, {"status": "running", "step": 1}),
              (103.0, 12, {"status": "succeeded", "step": 1})]
    snapshots = {7: {"step": 0, "heartbeat_at": 102.0}, 8: {"step": 0, "heartbeat_at": 102.015},
                 9: {"step": 1, "heartbeat_at": 102.1}}
    delays = step_delays(events, snapshots)
    assert set(delays) == {0, 1}
    assert delays[0] == pytest.approx(0.010) and delays[1] == pytest.approx(0.020)
    with pytest.raises(RuntimeError, match="no matching snapshot"):
        step_delays(events, {7: snapshots[7]})


@pytest.mark.slow
@pytest.mark.integration
def test_api_latency_bench_runs_and_times_every_step():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "bench.api_latency", "--rate", "50", "--seconds", "2", "--steps", "6",
                          "--streams", "1,3", "--timeout", "120"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert any(line.startswith("worker") and "p99 ms" in line for line in lines)  # the status table
    assert any(line.lstrip().startswith("streams") and "p99 ms" in line for line in lines)  # the SSE table
    assert any("shared by the load generator" in line for line in lines)
    assert summary["bench"] == "api_latency"
    assert summary["params"] == {"rate": 50.0, "seconds": 2.0, "processes": 1, "steps": 6, "streams": [1, 3],
                                 "size": 256, "model": "diffinfinite-demo", "connections": 64, "client": "raw",
                                 "log_level": "info", "redis": "private"}
    for name, expected_status in (("idle", "succeeded"), ("running", "running")):
        row = summary["status"][name]
        assert row["requests"] == 100 and row["ok"] + row["errors"] == 100 and row["errors"] == 0, row
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["achieved_rate"] > 25
        assert row["statuses"] == {expected_status: 100}
        assert row["in_app_samples"] == 100 and 0 < row["in_app_p50_ms"] <= row["in_app_p99_ms"]
        assert row["api_runqueue_ms_per_s"] >= 0 and 0 < row["client_cpu_share"] < 1
    assert summary["status"]["running"]["job_ran_throughout"] is True
    assert summary["status"]["running"]["step_writes_per_s"] > 0  # the record was written while it was read
    assert summary["status"]["running"]["job"]["steps"] <= 1000  # the engines' limit
    assert [r["streams"] for r in summary["sse"]] == [1, 3]
    for r in summary["sse"]:
        # every step 1…6 timed on every stream (step 0 too: 7 samples per stream), each after its write
        assert r["streams_with_every_step"] == r["streams"] and r["missing_steps"] == []
        assert r["samples"] == 7 * r["streams"] and r["connected_while_queued"] is True
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] < 10_000
        assert r["worker_step_ms"] > 0
    running = summary["status"]["running"]["p99_ms"]
    assert summary["ours"]["status_p99_ms_job_running"] == running
    assert summary["ours"]["sse_p99_ms"] == {"1": summary["sse"][0]["p99_ms"], "3": summary["sse"][1]["p99_ms"]}
    assert summary["reference"]["status_p99_ms"] == 28.0
    assert summary["reference"]["idle_p99_ms_same_run"] == summary["status"]["idle"]["p99_ms"]
    assert summary["ratio"] == pytest.approx(running / 28.0, abs=0.001)
    assert summary["machine"]["cpu_cores"] >= 1
