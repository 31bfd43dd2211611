"""The client commands of ``slidesynth``: submit, status, wait, download, cancel, jobs, models — against a running
service (``--server`` / SLIDESYNTH_SERVER, ``--api-key`` / SLIDESYNTH_API_KEY).

Like ``slidesynth.client``, imports only httpx, tqdm and the standard library. Output: human-readable lines on
stdout, or with ``--json`` one JSON document; progress bars go to stderr, and only when it is a terminal. The exit
status says how it ended (``ExitCode``; the README's "Client CLI" lists them).
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from slidesynth.client import (DEFAULT_SERVER, OUTPUTS, TERMINAL, Client, ClientError, ExitCode,
                               JobNotSucceeded, UsageError, WaitTimeout, describe_detail, embedding_conditioning,
                               join_message, output_name)

CLIENT_COMMANDS = ("submit", "status", "wait", "download", "cancel", "jobs", "models")

# request field → the submit flag that sets it (named beside the field in a 422's message)
FIELD_FLAGS = {"model": "--model", "width": "--width/--size", "height": "--height/--size", "mpp": "--mpp",
               "mask_mpp": "--mask-mpp", "seed": "--seed", "steps": "--steps", "guidance": "--guidance",
               "eta": "--eta", "outputs": "--outputs", "compression": "--compression", "quality": "--quality",
               "zarr_version": "--zarr-version", "mask": "--mask", "conditioning.subtype": "--subtype",
               "conditioning": "--subtype/--embedding", "priority": "--priority",
               "header.Idempotency-Key": "--idempotency-key"}


def _flag_of(path: str) -> str | None:
    parts = path.split(".")
    if parts[0] == "params":
        parts = parts[1:]
    if not parts:
        return None
    if parts[0] == "options" and len(parts) > 1:
        return f"--option {parts[1]}=…"
    if parts[0] == "conditioning" and len(parts) > 1 and parts[1] != "subtype":
        return "--embedding" if parts[1] != "type" else None
    return FIELD_FLAGS.get(".".join(parts[:2])) or FIELD_FLAGS.get(parts[0])


# --- formatting ------------------------------------------------------------------------------------------------

def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    value = max(0, round(value))
    if value < 60:
        return f"{value}s"
    if value < 3600:
        return f"{value // 60}m{value % 60:02d}s"
    return f"{value // 3600}h{value % 3600 // 60:02d}m"


def _elapsed(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None


def progress_words(job: dict) -> str:
    """``sampling step 3/25 · ETA 41s`` for a running job; the status otherwise."""
    status = job.get("status", "?")
    if status != "running":
        return status + (" (cancel requested)" if job.get("cancel_requested") and status == "queued" else "")
    words = [job.get("stage") or "starting"]
    if job.get("step") is not None and job.get("stage") == "sampling":
        words[0] += f" step {job['step']}/{job.get('steps', '?')}"
    if job.get("eta_seconds") is not None:
        words.append(f"ETA {_seconds(job['eta_seconds'])}")
    if job.get("cancel_requested"):
        words.append("cancel requested")
    return " · ".join(words)


def status_line(job: dict) -> str:
    """One line per job: id, status and what matters for that status."""
    status = job.get("status", "?")
    size = f"{job.get('width')}x{job.get('height')} px"
    head = f"{job.get('id')}  {status}"
    if status == "running":
        return f"{head}  {100 * job.get('progress', 0):.0f}%  {progress_words(job)}  ({job.get('model')}, {size})"
    if status == "queued":
        return f"{head}{'  cancel requested' if job.get('cancel_requested') else ''}  ({job.get('model')}, {size})"
    if status == "failed":
        return f"{head}  {job.get('error') or 'no error recorded'}"
    took = _elapsed(job.get("started_at"), job.get("finished_at"))
    tail = f" in {_seconds(took)}" if took is not None else ""
    if status == "succeeded":
        untrained = "  UNTRAINED model: not tissue" if job.get("untrained") else ""
        return (f"{head}{tail}  {size} at {job.get('mpp')} µm/px  model {job.get('model')}  seed {job.get('seed')}"
                f"  steps {job.get('steps')}{untrained}")
    return f"{head}{tail}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _say(*words: Any) -> None:
    print(*words, file=sys.stderr, flush=True)


# --- progress --------------------------------------------------------------------------------------------------

class WaitDisplay:
    """What ``wait`` shows while it polls: a tqdm bar on a terminal; otherwise one stderr line per change of
    status or stage (none with ``--json``)."""

    def __init__(self, quiet: bool):
        self.tty, self.quiet = stderr_is_tty(), quiet
        self.bar = None
        self.last: tuple | None = None

    def __call__(self, job: dict) -> None:
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                # the words go in as `unit`, which tqdm prints as given (a postfix gets a ", " before it)
                self.bar = tqdm(total=100, file=sys.stderr, desc=str(job.get("id", ""))[:8], leave=True,
                                bar_format="{desc} {percentage:3.0f}%|{bar}| {unit}", unit=progress_words(job))
            self.bar.n = round(100 * float(job.get("progress") or 0), 1)
            self.bar.unit = progress_words(job)
            self.bar.refresh()
        elif not self.quiet:
            key = (job.get("status"), job.get("stage"))
            if key != self.last:
                _say(f"{job.get('id')}: {progress_words(job)}")
            self.last = key

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _download_bars(enabled: bool):
    """``progress`` for Client.download: a byte bar per file on a terminal."""
    if not enabled:
        return None
    from tqdm import tqdm

    bars = []

    def start(name: str, total: int | None):
        for bar in bars:
            bar.close()
        bar = tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=True)
        bars.append(bar)
        return bar.update

    start.close = lambda: [bar.close() for bar in bars]  # type: ignore[attr-defined]
    return start


# --- commands --------------------------------------------------------------------------------------------------

def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, args.api_key)


def _key_value(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--param/--option {text!r}: write KEY=VALUE")
    try:
        value = json.loads(raw)  # numbers, true/false/null, lists and objects; anything else is a string
    except ValueError:
        value = raw
    return key.strip().split("."), value


def _set_path(target: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        nested = target.get(part)
        if not isinstance(nested, dict):
            nested = target[part] = {}
        target = nested
    target[path[-1]] = value


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    try:
        return (int(width), int(height)) if sep else (int(width), int(width))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write WIDTHxHEIGHT (e.g. 1024x768) or one side") from None


def _request_body(args: argparse.Namespace) -> tuple[dict, dict | None]:
    """The request's parameters and conditioning from the submit flags."""
    params: dict[str, Any] = {}
    if args.size:
        params["width"], params["height"] = args.size
    for field in ("model", "width", "height", "mpp", "mask_mpp", "seed", "steps", "guidance", "eta", "compression",
                  "quality", "zarr_version", "priority"):
        value = getattr(args, field)
        if value is not None:
            params[field] = value
    if args.outputs:
        params["outputs"] = [o.strip() for o in args.outputs.split(",") if o.strip()]
    for text in args.option or ():
        path, value = _key_value(text)
        _set_path(params, ["options", *path], value)
    for text in args.param or ():
        path, value = _key_value(text)
        _set_path(params, path, value)
    conditioning = params.pop("conditioning", None)
    if args.subtype:
        conditioning = {"type": "subtype", "subtype": args.subtype}
    elif args.embedding:
        try:
            conditioning = embedding_conditioning(Path(args.embedding), args.encoder)
        except (OSError, ValueError, KeyError, SyntaxError) as exc:
            raise UsageError(f"--embedding {args.embedding}: {getattr(exc, 'strerror', None) or exc}") from None
    if args.mask and conditioning is not None:
        raise UsageError("--mask goes alone: a mask job takes no --subtype, --embedding or conditioning param")
    if not args.mask and conditioning is None:
        raise UsageError("give one of --mask FILE, --subtype NAME or --embedding FILE")
    return params, conditioning


def cmd_submit(args: argparse.Namespace) -> int:
    params, conditioning = _request_body(args)
    _what(args.what)  # a bad name is a usage error before the job exists
    with _client(args) as client:
        try:
            created = client.submit(params, conditioning=conditioning, mask=args.mask,
                                    idempotency_key=args.idempotency_key)
        except ClientError as exc:
            if isinstance(exc.detail, list):  # a 422: name the flag beside each field
                exc.args = (join_message(exc.headline, describe_detail(exc.detail, _flag_of)),)
            raise
        job_id = created["id"]
        if not (args.wait or args.download):
            if args.json:
                _print_json(created)
            else:
                print(job_id, flush=True)
                if created.get("untrained"):
                    _say("note: the model is UNTRAINED (random weights): the slide will not look like tissue")
            return ExitCode.OK
        if not args.json:
            print(job_id, flush=True)
        return _wait_and_download(client, args, job_id)


def _wait_and_download(client: Client, args: argparse.Namespace, job_id: str) -> int:
    display = WaitDisplay(quiet=args.json)
    try:
        job = client.wait(job_id, timeout=args.timeout, interval=args.interval, on_update=display)
    except WaitTimeout as exc:
        display.close()
        if args.json:
            _print_json(exc.job)
        raise WaitTimeout(f"{exc} (last: {status_line(exc.job)})", exc.job) from None
    finally:
        display.close()
    if job["status"] != "succeeded" or not getattr(args, "download", None):
        if args.json:
            _print_json(job)
        else:
            (print if args.command == "wait" else _say)(status_line(job))  # submit's stdout: the id
        return _job_exit(job)
    bars = _download_bars(stderr_is_tty())
    try:
        files = client.download(job, args.download, _what(args.what), progress=bars)
    finally:
        if bars is not None:
            bars.close()
    if args.json:
        _print_json({**job, "files": {name: str(path.resolve()) for name, path in files.items()}})
    else:
        _say(status_line(job))
        for path in files.values():
            print(path, flush=True)
    return ExitCode.OK


def _job_exit(job: dict) -> int:
    return {"succeeded": ExitCode.OK, "failed": ExitCode.FAILED, "canceled": ExitCode.CANCELED,
            "expired": ExitCode.EXPIRED}.get(
        job.get("status"), ExitCode.TIMEOUT)


def _what(text: str | None) -> list[str] | None:
    return [output_name(n) for n in text.split(",") if n.strip()] if text else None


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.id)
    _print_json(job) if args.json else print(status_line(job))
    return ExitCode.OK


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _wait_and_download(client, args, args.id)


def cmd_download(args: argparse.Namespace) -> int:
    what = _what(args.what)  # a bad name is a usage error before any request
    with _client(args) as client:
        job = client.job(args.id)
        bars = _download_bars(stderr_is_tty())
        try:
            files = client.download(job, args.out or args.id, what, progress=bars)
        finally:
            if bars is not None:
                bars.close()
    if args.json:
        _print_json({"id": job["id"], "files": {name: str(path.resolve()) for name, path in files.items()}})
    else:
        for path in files.values():
            print(path)
    return ExitCode.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.id)
        if job["status"] == "canceled" and not args.delete:
            if args.json:
                _print_json({"id": args.id, "result": "already-canceled", "job": job})
            else:
                print(f"{args.id}  already canceled")
            return ExitCode.OK
        if job["status"] in TERMINAL and not args.delete:
            message = (f"job {args.id} has already {job['status']}; nothing to cancel "
                       f"(`slidesynth cancel --delete {args.id}` deletes it and its files)")
            if args.json:
                _print_json({"id": args.id, "result": "already-finished", "job": job})
            _say(message)
            return ExitCode.REFUSED
        if job["status"] not in TERMINAL and args.delete:
            _say(f"note: job {args.id} is {job['status']}: --delete cancels it; delete it once it has ended")
        code, after = client.cancel(args.id)
    result = {200: "canceled", 202: "cancel-requested", 204: "deleted"}.get(code, str(code))
    if code == 204 and not args.delete:  # DELETE is also the API's delete: the job ended after the check above
        _say(f"note: job {args.id} ended just before the cancel arrived; the service deleted it with its files")
    if args.json:
        _print_json({"id": args.id, "result": result, "job": after})
    else:
        print({"canceled": f"{args.id}  canceled",
               "cancel-requested": f"{args.id}  cancel requested: it stops within one sampling step",
               "deleted": f"{args.id}  deleted with its files"}.get(result, f"{args.id}  {result}"))
    return ExitCode.OK


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listing = client.jobs(limit=args.limit, offset=args.offset)
    if args.json:
        _print_json(listing)
        return ExitCode.OK
    rows = []
    for job in listing["items"]:
        progress = (f"{100 * job.get('progress', 0):.0f}% {progress_words(job)}" if job["status"] == "running"
                    else "")
        rows.append([job["id"], job["status"], progress, job.get("model", ""),
                     f"{job.get('width')}x{job.get('height')}", (job.get("created_at") or "")[:19].replace("T", " ")])
    if rows:
        print(_table(rows, ["ID", "STATUS", "PROGRESS", "MODEL", "SIZE", "CREATED (UTC)"]))
    shown = len(rows)
    if listing.get("total", shown) > shown or not rows:
        first = listing.get("offset", 0) + (1 if shown else 0)
        _say(f"{shown} shown ({first}–{listing.get('offset', 0) + shown}) of {listing.get('total', shown)} jobs")
    return ExitCode.OK


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listing = client.models()
    if args.json:
        _print_json(listing)
        return ExitCode.OK
    default, default_embedding = listing.get("default"), listing.get("default_embedding")
    rows = []
    for m in listing.get("models", []):
        mark = "*" if m["name"] == default else "+" if m["name"] == default_embedding else ""
        rows.append([m["name"] + mark, m.get("engine", ""), "yes" if m.get("trained") else "UNTRAINED",
                     ",".join(m.get("conditioning", [])), f"{m.get('native_mpp')}",
                     f"{m.get('max_width')}x{m.get('max_height')}", str(m.get("default_steps", ""))])
    print(_table(rows, ["MODEL", "ENGINE", "TRAINED", "CONDITIONING", "µm/px", "MAX SIZE", "STEPS"]))
    _say(f"* default model ({default}); + default for embeddings ({default_embedding})")
    return ExitCode.OK


# --- parser ----------------------------------------------------------------------------------------------------

def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text}: must be > 0")
        return value
    return parse


def _add_wait_flags(container) -> None:
    container.add_argument("--timeout", type=_positive(float), metavar="SECONDS",
                           help="give up waiting after this long (exit status 4; the job goes on)")
    container.add_argument("--interval", type=_positive(float), default=1.0, metavar="SECONDS",
                           help="seconds between status requests (default 1)")


def add_client_commands(sub) -> None:
    """The client commands, on ``slidesynth``'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", metavar="URL",
                        help=f"service base URL (default: SLIDESYNTH_SERVER, else {DEFAULT_SERVER})")
    common.add_argument("--api-key", metavar="KEY", help="sent as X-API-Key (default: SLIDESYNTH_API_KEY)")
    common.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout (for scripts); messages and progress go to stderr")
    what_help = (f"comma-separated outputs to fetch: {', '.join(OUTPUTS)} (or tiff, thumbnail, mask, zarr); "
                 f"default: every output the job has")
    epilog = ("exit status: 0 ok (job succeeded), 1 job failed, 2 usage error, 3 job canceled, 4 timed out waiting, "
              "5 server unreachable or 5xx, 6 not found, 7 request refused (401, 409, 422, 429 …), 8 outputs expired")

    def add(name: str, help_: str, description: str):
        return sub.add_parser(name, parents=[common], help=help_, description=description, epilog=epilog)

    p = add("submit", "submit a job to a running service (POST /generate)",
            "Submit a slide synthesis job to a running service and print its id. A mask file goes as multipart "
            "with the parameters as the `params` part; --subtype and --embedding as a JSON body. The service "
            "validates everything: a refused field is exit status 7 naming it.")
    cond = p.add_argument_group("conditioning (one)")
    cond.add_argument("--mask", metavar="FILE", help="label mask PNG/TIFF (pixel value = class index)")
    cond.add_argument("--subtype", metavar="NAME", help="cancer subtype prompt (e.g. LUAD, LUSC)")
    cond.add_argument("--embedding", metavar="FILE",
                      help="image embedding: .npy of shape (D,) or (rows, cols, D) for a grid, or JSON (a list of "
                           "numbers, or {rows, cols, vectors})")
    cond.add_argument("--encoder", metavar="ID", help="encoder of --embedding (default: the file's, else the API's)")
    par = p.add_argument_group("parameters (GenerateParams; default: the model's / the service's)")
    par.add_argument("--model", help="model id (`slidesynth models`)")
    par.add_argument("--size", type=_size, metavar="WxH", help="output size in pixels, e.g. 1024x768 or 1024")
    par.add_argument("--width", type=int, help="output width in pixels (not with --mask)")
    par.add_argument("--height", type=int, help="output height in pixels (not with --mask)")
    par.add_argument("--mpp", type=float, help="output µm per pixel")
    par.add_argument("--mask-mpp", type=float, help="µm per pixel of the mask")
    par.add_argument("--seed", type=int)
    par.add_argument("--steps", type=int, help="sampling steps")
    par.add_argument("--guidance", type=float, help="classifier-free guidance weight ω")
    par.add_argument("--eta", type=float, help="DDIM η (1 stochastic, 0 deterministic)")
    par.add_argument("--outputs", metavar="LIST", help="comma-separated: tiff (default), zarr")
    par.add_argument("--compression", choices=["jpeg", "deflate", "zstd"], help="TIFF tile compression")
    par.add_argument("--quality", type=int, help="JPEG quality 1–100")
    par.add_argument("--zarr-version", choices=["0.4", "0.5"], help="OME-NGFF version of the Zarr output")
    par.add_argument("--priority", choices=["low", "normal", "high"], help="the queue the job waits in")
    par.add_argument("--idempotency-key", metavar="KEY",
                     help="Idempotency-Key header: a repeat with the same key and body gets the same job (and a "
                          "failed send is retried up to 3 times)")
    par.add_argument("--option", action="append", metavar="KEY=VALUE",
                     help="engine option (`options` of the request), e.g. sampler=random; repeatable")
    par.add_argument("--param", action="append", metavar="KEY=VALUE",
                     help="any request field, dotted for nested ones (options.decoder=hann); VALUE is JSON when it "
                          "parses, else a string; repeatable, wins over the flags")
    after = p.add_argument_group("after submitting")
    after.add_argument("--wait", action="store_true", help="wait for the job to end (exit status: its outcome)")
    after.add_argument("--download", metavar="DIR", help="wait, then download the outputs into DIR")
    after.add_argument("--what", metavar="LIST", help=what_help + " (with --download)")
    _add_wait_flags(after)
    p.set_defaults(func=cmd_submit)

    p = add("status", "show a job's status (GET /jobs/{id})", "One line: id, status, stage, step, progress, ETA.")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_status)

    p = add("wait", "wait for a job to end, with a progress bar",
            "Poll the job (GET /jobs/{id}) until it ends, with a progress bar on a terminal (stage, step/total, "
            "the server's ETA). The exit status is the outcome.")
    _add_wait_flags(p)
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_wait)

    p = add("download", "download a finished job's outputs",
            "Download a succeeded job's outputs into a folder: each file as NAME.part, renamed when complete; an "
            "interrupted download resumes from its .part with a Range request. Prints the paths.")
    p.add_argument("id", metavar="ID")
    p.add_argument("--out", metavar="DIR", help="folder for the files (default: ./ID)")
    p.add_argument("--what", metavar="LIST", help=what_help)
    p.set_defaults(func=cmd_download)

    p = add("cancel", "cancel a queued or running job (DELETE /jobs/{id})",
            "Cancel a queued job (it never starts) or a running one (it stops within one sampling step). A job "
            "that has ended is left alone unless --delete is given.")
    p.add_argument("id", metavar="ID")
    p.add_argument("--delete", action="store_true", help="also delete a job that has ended, with its files")
    p.set_defaults(func=cmd_cancel)

    p = add("jobs", "list your jobs, newest first (GET /jobs)", "A table of the caller's jobs, newest first.")
    p.add_argument("--limit", type=int, default=20, help="how many (1–100, default 20)")
    p.add_argument("--offset", type=int, default=0, help="skip this many of the newest")
    p.set_defaults(func=cmd_jobs)

    p = add("models", "list the service's models (GET /models)",
            "The service's models: engine, trained, conditioning, native µm/px, largest size, default steps.")
    p.set_defaults(func=cmd_models)


def run(args: argparse.Namespace) -> int:
    """Run a client command: its exit status, errors as readable ``error: …`` lines on stderr (and with
    ``--json`` as ``{"error": …}`` on stdout when nothing else was printed there)."""
    try:
        return int(args.func(args))
    except WaitTimeout as exc:  # the job's last state is already printed
        _say(f"error: {exc}")
        return int(exc.exit_code)
    except JobNotSucceeded as exc:
        if args.json:
            _print_json({"error": str(exc), "status": None, "detail": None, "exit_code": int(exc.exit_code),
                         "job": exc.job})
        _say(f"error: {exc}")
        return int(exc.exit_code)
    except ClientError as exc:
        if args.json:
            _print_json({"error": str(exc), "status": exc.status, "detail": exc.detail,
                         "exit_code": int(exc.exit_code)})
        _say(f"error: {exc}")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        job_id = getattr(args, "id", None)
        _say("interrupted" + (f"; the job goes on (`slidesynth wait {job_id}`)" if job_id else ""))
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        return int(ExitCode.OK)


