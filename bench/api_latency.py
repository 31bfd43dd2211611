"""API latency: `GET /jobs/{id}` p50/p90/p99 under an open-loop load, idle and while a job runs, and the
server-sent events' delay from the worker's step write to the client's receipt of that step's event.

    python -m bench.api_latency                                  # --rate 200 --seconds 20 --steps 80 --streams 1,50
    python -m bench.api_latency --rate 50 --seconds 2 --steps 6 --streams 1,2   # a smoke run (the test's)

One deployment: a private redis-server (or ``--redis URL``, under a key prefix and queue of the run's own),
`slidesynth serve --no-worker --processes P` (uvicorn) and one `slidesynth worker` (one pool process, one torch
thread, the CPU), as in a container, with the deployments' JSON logs at INFO (an access line per request) and
Prometheus metrics on. A warm-up job loads the model in the worker first.

**Status latency.** An open-loop generator (asyncio, a pool of up to ``--connections`` HTTP/1.1 keep-alive
connections; a minimal client of its own by default, ``--client httpx`` for httpx's): request *i* is due
at t0 + i / rate whatever happened to the earlier ones, and its latency runs from that due time to the end of the
response, so a stalled server shows as queueing (no coordinated omission: a closed loop would have sent less while
it stalled). Twice, ``--seconds`` each: *idle* — the worker idle, the target a finished job — and *job running* —
the target the job the worker is running, its record rewritten at every sampling step while it is read. Reported:
p50, p90, p99, max, errors (non-200 or no answer), the achieved rate (answers ÷ the window); beside them, to tell
where time went, the API's own timing of the same requests (its JSON access line's ``duration_ms``, from the app's
receipt of the request to the end of its answer: uvicorn's parsing and the socket queues are outside it), the
time the API's threads waited for a core (their run-queue wait, /proc schedstat, per second), the
client's own lag (due time → the request's start) and CPU share: the generator shares the cores with the server, and
a late start is counted in the latency, as a real client would see it.

**SSE delay.** For each ``--streams`` count C: a blocker job occupies the worker while a short job (``--steps``
steps of a ``--size``² slide) waits queued behind it; C streams ``GET /jobs/{job}/events`` connect and receive
its first (queued) event; then the blocker is canceled, the job runs, and every step's event is timed. The write
time is the worker's own: each progress write sets the record's ``heartbeat_at`` (``time.time()`` in
worker/jobrunner.py's ProgressRecorder, just before the write) and the job's Redis event stream keeps a snapshot of
the record per event id (``0-<event id>``), so the event id an SSE event carries names the write that made it; the
bench reads those snapshots after the job. Worker, API and client run on one machine and one clock
(CLOCK_REALTIME). Delay = the client's ``time.time()`` when the event's blank line arrived − that
``heartbeat_at``: the write itself, the publish, the API's wake-up, XRANGE and rendering, and the transport. One
sample per step per stream (steps 0 … N, where the step changes).

The last line is one JSON object: ``ours`` = status p99 while a job runs (ms), ``reference`` = 28 ms (issue 21's
figure, "p99 11–28 ms at 200 req/s with an idle worker") with the idle p99 measured in the same run beside it,
``ratio`` = ours ÷ 28.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import tempfile
import time
from pathlib import Path

from bench._stack import Deployment as Stack, RedisServer, mask_png, wait
from bench.scaleout import machine

REFERENCE_P99_MS = 28.0  # issue 21: "p99 11–28 ms at 200 req/s with an idle worker"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0–100), nearest rank: a value that occurred."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Deployment(Stack):
    """Redis, the API (P uvicorn processes) and one worker, under a key prefix and queue of their own."""

    def __init__(self, redis_url: str, folder: Path, args):
        super().__init__(redis_url, folder, workers=1, name="apilat", api_args=("--processes", str(args.processes)),
                         log_level=args.log_level, default_model=args.model, log_format="json")

    def submit(self, size: int, steps: int) -> str:
        resp = self.http.post("/generate", files={"mask": ("mask.png", mask_png(size), "image/png")},
                              data={"params": json.dumps({"mask_mpp": 0.5, "steps": steps, "seed": 7})})
        if resp.status_code != 202:
            raise RuntimeError(f"POST /generate answered {resp.status_code}: {resp.text}")
        return resp.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/jobs/{job_id}").json()

    def until(self, job_id: str, predicate, timeout: float, what: str) -> dict:
        def check():
            job = self.job(job_id)
            if job["status"] == "failed":
                raise RuntimeError(f"job {job_id} failed: {job.get('error')}")
            return job if predicate(job) else None

        return wait(check, timeout, what, interval=0.1)

    def cancel(self, job_id: str, timeout: float) -> None:
        resp = self.http.delete(f"/jobs/{job_id}")
        if resp.status_code not in (200, 202):
            raise RuntimeError(f"DELETE /jobs/{job_id} answered {resp.status_code}: {resp.text}")
        self.until(job_id, lambda j: j["status"] == "canceled", timeout, f"job {job_id} to be canceled")

    def snapshots(self, job_id: str) -> dict[int, dict]:
        """The job's event stream: event id → the record's fields at that event (as written by the worker)."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            entries = client.xrange(f"{self.prefix}:job:{job_id}:events", min="-", max="+")
        finally:
            client.close()
        return {int(entry_id.split(b"-")[1]): {k.decode(): json.loads(v) for k, v in fields.items()}
                for entry_id, fields in entries}

    def api_run_delay(self) -> float:
        """Seconds the API's threads (every uvicorn process) have waited on a run queue for a CPU, summed
        (/proc/<pid>/task/<tid>/schedstat, second field): how much the shared cores kept the server waiting."""
        import psutil

        try:
            procs = [psutil.Process(self.api.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return 0.0
        total = 0
        for proc in procs:
            for task in Path(f"/proc/{proc.pid}/task").glob("*"):
                try:
                    total += int((task / "schedstat").read_text().split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        return total / 1e9

    def api_log_size(self) -> int:
        return (self.logs / "api.log").stat().st_size

    def in_app_ms(self, offset: int, job_id: str) -> list[float]:
        """The API's own timing of each GET /jobs/{job_id} of this job logged after ``offset``: the access
        line's ``duration_ms`` (service/metrics.py: from the app's receipt of the request to the end of its
        answer; uvicorn's parsing and the socket queues are outside it). Empty unless the log is JSON at INFO."""
        with open(self.logs / "api.log", "rb") as f:
            f.seek(offset)
            lines = f.read().splitlines()
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("logger") == "slidesynth.access" and rec.get("route") == "/jobs/{job_id}" and \
                    rec.get("method") == "GET" and rec.get("job_id") == job_id and "duration_ms" in rec:
                out.append(float(rec["duration_ms"]))
        return out



# -- status latency ---------------------------------------------------------------------------------------------

class RawPool:
    """A minimal HTTP/1.1 keep-alive GET client on asyncio streams, a pool of up to ``size`` connections: about a
    quarter of httpx's CPU per request (0.4 vs 1.6 ms on the 2-core development VM), which matters when the
    generator shares two cores with the server."""

    def __init__(self, base_url: str, size: int, timeout: float = 30):
        from urllib.parse import urlsplit

        url = urlsplit(base_url)
        self.host, self.port, self.size, self.timeout = url.hostname, url.port or 80, size, timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []  # the last freed on top
        self.opened = 0
        self.freed = asyncio.Condition()

    async def _take(self) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], bool]:
        """A connection, and whether it has answered before."""
        async with self.freed:
            while True:
                while self.idle and self.idle[-1][0].at_eof():  # the server closed it while idle (keep-alive timeout)
                    self.opened -= 1
                    self.idle.pop()[1].close()
                if self.idle:
                    return self.idle.pop(), True
                if self.opened < self.size:
                    self.opened += 1
                    break
                await self.freed.wait()
        try:
            return await asyncio.open_connection(self.host, self.port), False
        except BaseException:
            await self._give(None, False)
            raise

    async def _give(self, conn, keep: bool) -> None:
        async with self.freed:
            if keep:
                self.idle.append(conn)
            else:
                self.opened -= 1
                if conn is not None:
                    conn[1].close()
            self.freed.notify()

    async def get(self, path: str) -> tuple[int, bytes]:
        retry = True
        while True:
            conn, reused = await self._take()
            keep = False
            try:
                status, body, keep = await self._exchange(conn, path)
                return status, body
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if reused and retry and not getattr(exc, "partial", b""):
                    retry = False  # a kept-alive connection the server had just closed: once more, on another
                    continue
                raise
            finally:
                await self._give(conn, keep)

    async def _exchange(self, conn, path: str) -> tuple[int, bytes, bool]:
        reader, writer = conn
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, close = None, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if length is None:
            raise ValueError("an answer without Content-Length")
        body = await asyncio.wait_for(reader.readexactly(length), self.timeout)
        return status, body, not close

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle = []


class HttpxPool:
    def __init__(self, base_url: str, size: int, timeout: float = 30):
        import httpx

        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self.client = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout)

    async def get(self, path: str) -> tuple[int, bytes]:
        resp = await self.client.get(path)
        return resp.status_code, resp.content

    async def aclose(self) -> None:
        await self.client.aclose()


async def open_loop(base_url: str, path: str, rate: float, seconds: float, connections: int,
                    client: str = "raw", on_start=None) -> dict:
    """GET ``path`` at ``rate`` per second for ``seconds``, each request due at a fixed time (open loop);
    ``on_start()`` is called after the connections are opened, just before the first request is due."""
    count = max(1, round(rate * seconds))
    latencies: list[float] = []
    lags: list[float] = []
    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}
    steps: list[int] = []
    pool = (RawPool if client == "raw" else HttpxPool)(base_url, connections)
    try:
        for _ in range(3):  # open some connections first: the measured window pays no TCP connects
            await asyncio.gather(*(pool.get(path) for _ in range(min(8, connections))))

        async def one(due: float) -> None:
            lags.append(time.perf_counter() - due)
            try:
                status, body = await pool.get(path)
            except Exception as exc:  # no answer: a connection error, a timeout
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            done = time.perf_counter()
            if status != 200:
                errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1
                return
            latencies.append(done - due)
            job = json.loads(body)
            statuses[job["status"]] = statuses.get(job["status"], 0) + 1
            if job.get("step") is not None:
                steps.append(job["step"])

        await asyncio.sleep(0.2)  # the warm-up's last answers logged and done with
        if on_start is not None:
            on_start()
        tasks = []
        cpu0 = time.process_time()
        t0 = time.perf_counter() + 0.05
        for i in range(count):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
        end = time.perf_counter()
        cpu = time.process_time() - cpu0
    finally:
        await pool.aclose()
    window = max(end - t0, count / rate)
    ms = [x * 1000 for x in latencies]
    return {"requests": count, "ok": len(latencies), "errors": sum(errors.values()), "error_kinds": errors,
            "achieved_rate": round(len(latencies) / window, 1),
            "p50_ms": round(percentile(ms, 50), 2), "p90_ms": round(percentile(ms, 90), 2),
            "p99_ms": round(percentile(ms, 99), 2), "max_ms": round(max(ms, default=float("nan")), 2),
            "mean_ms": round(sum(ms) / len(ms), 2) if ms else float("nan"),
            "client_lag_p99_ms": round(percentile([x * 1000 for x in lags], 99), 2),
            "client_cpu_share": round(cpu / window, 3),
            "statuses": statuses,
            "steps_advanced": (max(steps) - min(steps)) if steps else 0}


# -- SSE delay --------------------------------------------------------------------------------------------------

async def read_stream(client, path: str, connected: asyncio.Event | None) -> list[tuple[float, int, dict]]:
    """One SSE client: (receipt time, event id, data) per ``event: job``, until the stream ends."""
    events: list[tuple[float, int, str]] = []
    async with client.stream("GET", path, headers={"Accept": "text/event-stream"}) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"GET {path} answered {resp.status_code}")
        seq, data = None, []
        async for line in resp.aiter_lines():
            if line == "":
                if data and seq is not None:
                    events.append((time.time(), seq, "\n".join(data)))  # parsed later: the clock first
                    if connected is not None and not connected.is_set():
                        connected.set()
                seq, data = None, []
            elif line.startswith("id:"):
                seq = int(line[3:].strip())
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
    return [(t, s, json.loads(d)) for t, s, d in events]


def step_delays(events: list[tuple[float, int, dict]], snapshots: dict[int, dict]) -> dict[int, float]:
    """step → seconds from the worker's write of that step (its heartbeat_at) to this client's receipt."""
    delays: dict[int, float] = {}
    previous = None
    for received, seq, data in events:
        step = data.get("step")
        if step is not None and step != previous and data.get("status") == "running":
            snap = snapshots.get(seq)
            if snap is None or snap.get("step") != step or snap.get("heartbeat_at") is None:
                raise RuntimeError(f"event {seq} (step {step}) has no matching snapshot in the job's event stream")
            delays.setdefault(step, received - snap["heartbeat_at"])
        previous = step
    return delays


async def sse_round(deployment: Deployment, streams: int, args) -> dict:
    import httpx

    blocker = deployment.submit(args.blocker_size, args.blocker_steps)
    job_id = deployment.submit(args.size, args.steps)
    await asyncio.to_thread(deployment.until, blocker, lambda j: j["status"] == "running", args.timeout,
                            "the blocker job to start")
    limits = httpx.Limits(max_connections=streams + 2, max_keepalive_connections=streams + 2)
    timeout = httpx.Timeout(30, read=args.timeout)
    async with httpx.AsyncClient(base_url=deployment.base_url, limits=limits, timeout=timeout) as client:
        connected = [asyncio.Event() for _ in range(streams)]
        readers = [asyncio.create_task(read_stream(client, f"/jobs/{job_id}/events", ev)) for ev in connected]
        waiting = asyncio.gather(*(ev.wait() for ev in connected))
        try:
            await asyncio.wait_for(waiting, args.timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{streams} streams did not all connect in {args.timeout:.0f} s") from None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.to_thread(deployment.cancel, blocker, args.timeout)
        results = await asyncio.wait_for(asyncio.gather(*readers), args.timeout)
        cpu_share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    job = deployment.job(job_id)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
    snapshots = deployment.snapshots(job_id)
    per_stream = [step_delays(events, snapshots) for events in results]
    expected = set(range(0, args.steps + 1))
    complete = sum(1 for d in per_stream if set(d) >= expected - {0})
    ms = [v * 1000 for d in per_stream for v in d.values()]
    step_times = sorted(s["heartbeat_at"] for s in snapshots.values()
                        if s.get("stage") == "sampling" and s.get("step") is not None)
    step_s = (step_times[-1] - step_times[0]) / max(1, args.steps) if len(step_times) > 1 else float("nan")
    return {"streams": streams, "steps": args.steps, "samples": len(ms),
            "streams_with_every_step": complete,
            # every stream's first event was the queued job: it was connected before the first step
            "connected_while_queued": all(events and events[0][2]["status"] == "queued" for events in results),
            "missing_steps": sorted(set().union(*((expected - {0}) - set(d) for d in per_stream))),
            "p50_ms": round(percentile(ms, 50), 2), "p90_ms": round(percentile(ms, 90), 2),
            "p99_ms": round(percentile(ms, 99), 2), "max_ms": round(max(ms, default=float("nan")), 2),
            "min_ms": round(min(ms, default=float("nan")), 2),
            "worker_step_ms": round(step_s * 1000, 1), "client_cpu_share": round(cpu_share, 3)}


# -- the run ----------------------------------------------------------------------------------------------------

def step_seconds(deployment: Deployment, job_id: str) -> float:
    """Seconds per sampling step of a finished job, from its event stream's heartbeats."""
    times = sorted(s["heartbeat_at"] for s in deployment.snapshots(job_id).values()
                   if s.get("stage") == "sampling" and s.get("step") is not None and s.get("heartbeat_at"))
    return (times[-1] - times[0]) / max(1, len(times) - 1) if len(times) > 1 else 0.1


def status_window(deployment: Deployment, job_id: str, args) -> dict:
    """One open-loop window on GET /jobs/{job_id}, with the API's own timing of the same requests."""
    mark = {}

    def start():
        mark["offset"], mark["run_delay"] = deployment.api_log_size(), deployment.api_run_delay()

    row = asyncio.run(open_loop(deployment.base_url, f"/jobs/{job_id}", args.rate, args.seconds, args.connections,
                                args.client, on_start=start))
    waited = deployment.api_run_delay() - mark["run_delay"]
    row["api_runqueue_ms_per_s"] = round(waited * 1000 / args.seconds, 1)
    time.sleep(0.5)  # the access lines of the last answers
    # the window's lines are the last ones (should a warm-up request's line have come after the mark)
    in_app = deployment.in_app_ms(mark["offset"], job_id)[-row["requests"]:]
    row["in_app_samples"] = len(in_app)
    row["in_app_p50_ms"] = round(percentile(in_app, 50), 2)
    row["in_app_p99_ms"] = round(percentile(in_app, 99), 2)
    return row


def run(deployment: Deployment, args) -> dict:
    deployment.ready(args.timeout)
    warm = deployment.submit(args.size, max(4, min(args.steps, 20)))  # the worker loads the model
    deployment.until(warm, lambda j: j["status"] == "succeeded", args.timeout, "the warm-up job")
    per_step = step_seconds(deployment, warm)
    # the blocker (and the running job read in the status window) runs until canceled: sized to outlast it 1.5×, in
    # at most the engines' 1000 steps (a larger slide when steps this fast would not do)
    needed = max(200, math.ceil(1.5 * (args.seconds + 10) / max(per_step, 0.001)))
    args.blocker_steps = min(needed, 1000)
    args.blocker_size = args.size * max(1, math.ceil(math.sqrt(needed / 1000)))
    print(f"  warm-up job done ({per_step * 1000:.0f} ms per step); status latency, idle worker …", flush=True)

    idle = status_window(deployment, warm, args)
    busy = deployment.submit(args.blocker_size, args.blocker_steps)
    deployment.until(busy, lambda j: j["status"] == "running" and (j.get("step") or 0) >= 1, args.timeout,
                     "the job to run")
    print("  status latency, a job running …", flush=True)
    running = status_window(deployment, busy, args)
    still = deployment.job(busy)["status"]
    deployment.cancel(busy, args.timeout)
    running["job_ran_throughout"] = still == "running" and set(running["statuses"]) == {"running"}
    running["step_writes_per_s"] = round(running["steps_advanced"] / args.seconds, 1)
    running["job"] = {"size": args.blocker_size, "steps": args.blocker_steps, "canceled_after": True}
    sse = []
    for streams in args.stream_counts:
        print(f"  SSE delay, {streams} stream(s) on a {args.steps}-step job …", flush=True)
        sse.append(asyncio.run(sse_round(deployment, streams, args)))
    return {"idle": idle, "running": running, "sse": sse}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.api_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200, help="GET /jobs/{id} per second (default 200)")
    parser.add_argument("--seconds", type=float, default=20, help="length of each status window (default 20)")
    parser.add_argument("--processes", type=int, default=1, help="uvicorn processes of the API (default 1)")
    parser.add_argument("--redis", help="a Redis URL to use (default: a private redis-server on a free port)")
    parser.add_argument("--steps", type=int, default=80, help="sampling steps of the SSE job (default 80)")
    parser.add_argument("--streams", default="1,50", help="concurrent SSE streams on the job, comma-separated "
                                                          "(default 1,50: one round each)")
    parser.add_argument("--size", type=int, default=256, help="side of the jobs' slides in pixels (default 256)")
    parser.add_argument("--model", default="diffinfinite-demo")
    parser.add_argument("--connections", type=int, default=64,
                        help="the load generator's connection pool (default 64)")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="the load generator's HTTP client: raw (asyncio streams, HTTP/1.1 keep-alive; the "
                             "default, the cheaper) or httpx")
    parser.add_argument("--log-level", default="info", help="the API's log level (default info: an access line "
                                                            "per request, as deployed)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for each stage")
    args = parser.parse_args(argv)
    args.stream_counts = [int(x) for x in args.streams.split(",") if x.strip()]
    if args.rate <= 0 or args.seconds <= 0 or args.steps < 1 or args.processes < 1 or \
            any(n < 1 for n in args.stream_counts):
        parser.error("--rate, --seconds, --steps, --processes and every --streams count must be positive")
    info = machine()
    print(f"api latency: GET /jobs/{{id}} at {args.rate:g} req/s for {args.seconds:g} s (open loop), API "
          f"{args.processes} process(es), 1 worker ({args.model}, {args.size}²); SSE on {args.steps}-step jobs, "
          f"{args.streams} stream(s); {info['cpu_cores']} CPU cores shared by the load generator, the API, Redis "
          f"and the worker (load average {info['load_avg_1m_at_start']} at start)", flush=True)
    with tempfile.TemporaryDirectory(prefix="slidesynth-apilat-") as tmp:
        root = Path(tmp)
        redis_server = None if args.redis else RedisServer(root / "redis").start()
        try:
            deployment = Deployment(args.redis or redis_server.url, root / "deployment", args)
            try:
                result = run(deployment, args)
            finally:
                deployment.stop()
        finally:
            if redis_server is not None:
                redis_server.stop()
    info["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    idle, running = result["idle"], result["running"]

    print(f"\nGET /jobs/{{id}}: latency from each request's due time (open loop, {args.rate:g} req/s, "
          f"{args.seconds:g} s); the load generator runs on the same {info['cpu_cores']} cores")
    header = (f"{'worker':<12} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} "
              f"{'p99 ms':>8} {'max ms':>8} {'in-app p50/p99 ms':>17} {'API CPU wait':>12} {'client lag p99 ms':>17} "
              f"{'client CPU':>10}")
    print(header)
    print("-" * len(header))
    for name, row in (("idle", idle), ("job running", running)):
        in_app = f"{row['in_app_p50_ms']:.1f} / {row['in_app_p99_ms']:.1f}" if row["in_app_samples"] else "n/a"
        print(f"{name:<12} {row['requests']:>8} {row['errors']:>6} {row['achieved_rate']:>7.1f} {row['p50_ms']:>8.1f} "
              f"{row['p90_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['max_ms']:>8.1f} {in_app:>17} "
              f"{row['api_runqueue_ms_per_s']:>7.0f} ms/s "
              f"{row['client_lag_p99_ms']:>17.1f} {row['client_cpu_share']:>9.0%}")
    print("(latency: due time → end of the answer, as the client saw it; in-app: the API's access-log duration of "
          "the same requests; API CPU wait: time the API's threads spent runnable but waiting for a core, per "
          "second; client lag: due time → the request's start in the generator; client CPU: the generator's share "
          "of one core)")
    print(f"(job running: the record was written {running['step_writes_per_s']} times/s while read; the job ran "
          f"throughout: {running['job_ran_throughout']})")
    print("\nSSE: the worker's write of a step (its heartbeat_at) → the client's receipt of that step's event")
    header = (f"{'streams':>7} {'steps':>5} {'samples':>7} {'all steps':>9} {'p50 ms':>8} {'p90 ms':>8} "
              f"{'p99 ms':>8} {'max ms':>8} {'step ms':>8} {'client CPU':>10}")
    print(header)
    print("-" * len(header))
    for r in result["sse"]:
        print(f"{r['streams']:>7} {r['steps']:>5} {r['samples']:>7} {r['streams_with_every_step']:>5}/{r['streams']:<3} "
              f"{r['p50_ms']:>8.1f} {r['p90_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} "
              f"{r['worker_step_ms']:>8.1f} {r['client_cpu_share']:>9.0%}")
    print("(samples: one per step per stream, steps 0 … N; all steps: streams that got an event for every step; "
          "step ms: the worker's time per sampling step meanwhile; client CPU: the SSE clients' share of one core)")
    summary = {
        "bench": "api_latency",
        "params": {"rate": args.rate, "seconds": args.seconds, "processes": args.processes, "steps": args.steps,
                   "streams": args.stream_counts, "size": args.size, "model": args.model,
                   "connections": args.connections, "client": args.client, "log_level": args.log_level,
                   "redis": "external" if args.redis else "private"},
        "machine": {**info, "note": "the load generator, the API, Redis and the worker share these cores"},
        "status": {"idle": idle, "running": running},
        "sse": result["sse"],
        "ours": {"status_p99_ms_job_running": running["p99_ms"], "status_p99_ms_idle": idle["p99_ms"],
                 "sse_p99_ms": {str(r["streams"]): r["p99_ms"] for r in result["sse"]}},
        "reference": {"status_p99_ms": REFERENCE_P99_MS, "idle_p99_ms_same_run": idle["p99_ms"],
                      "note": "issue 21: p99 11–28 ms at 200 req/s with an idle worker; the idle p99 of this run "
                              "beside it"},
        "ratio": round(running["p99_ms"] / REFERENCE_P99_MS, 3),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
