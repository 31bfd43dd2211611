"""A client of the slidesynth HTTP API: submit jobs, follow them, download their outputs.

Imports only httpx and the standard library (no torch, no pydantic, nothing of ``service``, ``worker`` or
``core``), so it runs wherever the API is reachable: a laptop, a ComfyUI node, a notebook. The ``slidesynth
submit|status|wait|download|cancel|jobs|models`` commands (``slidesynth/client_cli.py``) are built on it::

    from slidesynth.client import Client

    with Client("http://gpu-box:8000", api_key="k1") as client:
        job = client.submit({"steps": 25, "seed": 1}, mask="mask.png")
        done = client.wait(job["id"])
        files = client.download(done, "out/")
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable
from enum import IntEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from slidesynth import __version__

DEFAULT_SERVER = "http://127.0.0.1:8000"

# The client's own settings: environment variables read by the client commands only (the server's settings are
# core.settings.Settings, which the client does not import). The README's "Client CLI" section lists them all.
CLIENT_SETTINGS: dict[str, tuple[str, str]] = {
    "SLIDESYNTH_SERVER": (DEFAULT_SERVER, "Base URL of the service (a path prefix is kept, e.g. "
                                          "`https://host/slidesynth`); `--server` wins."),
    "SLIDESYNTH_API_KEY": ("", "API key sent as `X-API-Key` (one of the server's SLIDESYNTH_API_KEYS); "
                               "`--api-key` wins. Empty: no key is sent."),
}

TERMINAL = ("succeeded", "failed", "canceled", "expired")


class ExitCode(IntEnum):
    """Exit status of the client commands (documented in the README)."""

    OK = 0            # done; for wait/submit --wait: the job succeeded
    FAILED = 1        # the job failed
    USAGE = 2         # bad command line or local input (argparse's own status for usage errors)
    CANCELED = 3      # the job was canceled
    TIMEOUT = 4       # --timeout passed while waiting
    UNAVAILABLE = 5   # server unreachable, a 5xx, or a download cut short
    NOT_FOUND = 6     # 404: no such job (for this API key), or no such output
    REFUSED = 7       # any other 4xx: 401 bad key, 409 not finished, 413, 422 invalid field, 429 …
    EXPIRED = 8       # the job ended and its outputs were removed (SLIDESYNTH_RETENTION_HOURS); 410 on a download
    INTERRUPTED = 130  # Ctrl-C


class ClientError(Exception):
    """An outcome other than success; ``exit_code`` is the command's exit status."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, *, status: int | None = None, detail: Any = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.detail, self.retry_after = status, detail, retry_after
        self.headline = message


class UsageError(ClientError):
    exit_code = ExitCode.USAGE


class ServerUnavailable(ClientError):
    exit_code = ExitCode.UNAVAILABLE


class NotFound(ClientError):
    exit_code = ExitCode.NOT_FOUND


class Refused(ClientError):
    exit_code = ExitCode.REFUSED


class Expired(ClientError):
    """The job's outputs were removed by the service's retention (410 Gone, or status ``expired``)."""

    exit_code = ExitCode.EXPIRED


class JobNotSucceeded(ClientError):
    """A job ended failed or canceled (``job`` is its last state)."""

    def __init__(self, message: str, job: dict):
        super().__init__(message)
        self.job = job
        self.exit_code = {"canceled": ExitCode.CANCELED, "expired": ExitCode.EXPIRED}.get(job.get("status"),
                                                                                        ExitCode.FAILED)


class WaitTimeout(ClientError):
    exit_code = ExitCode.TIMEOUT

    def __init__(self, message: str, job: dict):
        super().__init__(message)
        self.job = job


def field_path(loc: Iterable) -> str:
    """A 422's ``loc`` as the request's field path: ``["body", "params", "steps"]`` → ``params.steps``."""
    parts = [str(p) for p in loc]
    if parts[:1] == ["body"]:
        parts = parts[1:]
    return ".".join(parts) or "body"


def describe_detail(detail: Any, flag: Callable[[str], str | None] | None = None) -> str:
    """The server's ``detail`` in words: a string as is, a 422's problems as ``field: message`` lines (with
    ``flag(field)``, the command-line flag that sets the field, when it names one)."""
    if isinstance(detail, list):
        lines = []
        for problem in detail:
            if isinstance(problem, dict) and "msg" in problem:
                path = field_path(problem.get("loc", []))
                hint = flag(path) if flag else None
                lines.append(f"{path}{f' ({hint})' if hint else ''}: {problem['msg']}")
            else:
                lines.append(str(problem))
        return "\n".join(lines)
    if detail is None:
        return ""
    return detail if isinstance(detail, str) else json.dumps(detail)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def error_for(response: httpx.Response, what: str) -> ClientError:
    """The exception for an error response (its body must have been read)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = response.text.strip() or None
    words = describe_detail(detail)
    status = response.status_code
    kind = ServerUnavailable if status >= 500 else NotFound if status == 404 else Expired if status == 410 \
        else Refused
    reason = response.reason_phrase or ""
    headline = f"{what}: {status} {reason}".rstrip()
    retry = _retry_after(response)
    error = kind(join_message(headline, words, retry), status=status, detail=detail, retry_after=retry)
    error.headline = headline
    return error


def join_message(headline: str, words: str, retry_after: float | None = None) -> str:
    message = headline
    if words:
        message += (":\n  " + words.replace("\n", "\n  ")) if "\n" in words else f": {words}"
    if retry_after is not None:
        message += f" (retry after {retry_after:g} s)"
    return message


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/200`` → (100, 200); ``bytes */200`` → (None, 200)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    first = int(span.split("-")[0]) if span != "*" else None
    return first, int(total) if total.isdigit() else None


# --- outputs ---------------------------------------------------------------------------------------------------

# Output file name → the job's `links` key that says it exists. The file name is also its URL under /jobs/{id}/.
OUTPUTS = {"slide.tiff": "slide", "thumbnail.png": "thumbnail", "mask.png": "mask", "slide.zarr": "zarr"}
ALIASES = {"tiff": "slide.tiff", "slide": "slide.tiff", "thumbnail": "thumbnail.png", "mask": "mask.png",
           "zarr": "slide.zarr"}


def output_name(name: str) -> str:
    """``tiff`` → ``slide.tiff`` (the file name of an output, from its name or an alias)."""
    name = name.strip()
    if name in OUTPUTS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise UsageError(f"unknown output {name!r}; choose from {', '.join(OUTPUTS)} (or {', '.join(ALIASES)})")


def job_outputs(job: dict) -> list[str]:
    """File names of the outputs a succeeded job has (its `outputs` when the server lists them, else its
    `links`)."""
    listed = job.get("outputs")
    if isinstance(listed, (list, dict)) and listed:
        names = []
        for item in listed:
            try:
                names.append(output_name(str(item)))
            except UsageError:
                continue  # an output kind this client does not know how to fetch
        return names
    links = job.get("links") or {}
    return [name for name, key in OUTPUTS.items() if links.get(key)]


# --- embeddings from files (no NumPy: the .npy format is a header and raw numbers) ------------------------------

_NPY_TYPES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q", "u1": "B", "u2": "H",
              "u4": "I", "u8": "Q"}


def read_npy(path: Path) -> tuple[tuple[int, ...], list[float]]:
    """Shape and values (row-major) of a numeric ``.npy`` file, read with the standard library."""
    data = path.read_bytes()
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file")
    major = data[6]
    if major == 1:
        (size,), start = struct.unpack("<H", data[8:10]), 10
    else:
        (size,), start = struct.unpack("<I", data[8:12]), 12
    header = ast.literal_eval(data[start:start + size].decode("latin1"))
    descr, shape = header["descr"], tuple(header["shape"])
    order, code = descr[0], descr[1:]
    if not isinstance(descr, str) or code not in _NPY_TYPES or order not in "<>|=":
        raise ValueError(f"unsupported dtype {descr!r}; save numbers (e.g. float32)")
    count = 1
    for side in shape:
        count *= side
    fmt = (">" if order == ">" else "<") + f"{count}{_NPY_TYPES[code]}"
    values = [float(v) for v in struct.unpack_from(fmt, data, start + size)]
    if header.get("fortran_order") and len(shape) > 1:  # column-major on disk: reorder to row-major
        strides = [1]
        for side in shape[:-1]:
            strides.append(strides[-1] * side)
        ordered = []
        for flat in range(count):
            rest, offset = flat, 0
            for axis in reversed(range(len(shape))):
                rest, index = divmod(rest, shape[axis])
                offset += index * strides[axis]
            ordered.append(values[offset])
        values = ordered
    return shape, values


def embedding_conditioning(path: Path, encoder: str | None = None) -> dict:
    """The request's ``conditioning`` from an embedding file: a ``.npy`` of shape (D,) (one vector) or
    (rows, cols, D) (a grid over the slide), a JSON list of numbers, or a JSON object as the API's
    ``conditioning`` (``{"rows", "cols", "vectors"}``, ``type`` optional). ``encoder`` wins over the file's."""
    if path.suffix == ".npy":
        shape, values = read_npy(path)
        if len(shape) == 3:
            rows, cols, dim = shape
            cond = {"type": "embedding_grid", "rows": rows, "cols": cols,
                    "vectors": [values[i * dim:(i + 1) * dim] for i in range(rows * cols)]}
        elif len(shape) in (1, 2) and (len(shape) == 1 or shape[0] == 1):
            cond = {"type": "embedding", "vector": values}
        else:
            raise ValueError(f"shape {shape}: give (D,) for one vector or (rows, cols, D) for a grid")
    else:
        value = json.loads(path.read_text())
        if isinstance(value, list):
            cond = {"type": "embedding", "vector": value}
        elif isinstance(value, dict):
            kind = value.get("type") or ("embedding" if "vector" in value else "embedding_grid")
            cond = {**value, "type": kind}
        else:
            raise ValueError("a JSON list of numbers or an object {rows, cols, vectors}")
    if encoder:
        cond["encoder"] = encoder
    return cond


# --- the client ------------------------------------------------------------------------------------------------

def _mask_type(path: Path) -> str:
    return {".png": "image/png", ".tif": "image/tiff", ".tiff": "image/tiff"}.get(path.suffix.lower(),
                                                                                 "application/octet-stream")


class Client:
    """The slidesynth HTTP API. Every method raises a ``ClientError`` subclass on anything but success."""

    def __init__(self, server: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 retry_for: float = 60.0):
        self.server = (server or os.environ.get("SLIDESYNTH_SERVER") or DEFAULT_SERVER).rstrip("/")
        if "://" not in self.server:
            self.server = "http://" + self.server
        key = api_key if api_key is not None else os.environ.get("SLIDESYNTH_API_KEY", "")
        headers = {"User-Agent": f"slidesynth-client/{__version__}"}
        if key:
            headers["X-API-Key"] = key
        self.retry_for = retry_for  # wait(): how long the server may stay unreachable once it has answered
        self._http = httpx.Client(base_url=self.server + "/", headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def job_path(job_id: str, *rest: str) -> str:
        return "/".join(["jobs", quote(job_id, safe=""), *rest])

    def _request(self, method: str, path: str, what: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"{what}: cannot reach {self.server} ({exc or type(exc).__name__})") from None
        if response.status_code >= 400:
            raise error_for(response, what)
        return response

    # --- jobs ---

    def submit(self, params: dict, *, conditioning: dict | None = None, mask: str | Path | None = None,
               idempotency_key: str | None = None, retries: int = 3) -> dict:
        """``POST /generate``: ``mask`` (a PNG/TIFF path) as multipart with ``params``; else a JSON body with
        ``params`` and ``conditioning``. Returns the JobCreated answer (``id``, ``status``, ``status_url``,
        ``untrained``).

        With ``idempotency_key`` (the ``Idempotency-Key`` header) a request that failed in transit or with a 5xx
        is sent again up to ``retries`` times (after 1, 2, 4 s): the service answers a repeat with the job the
        first one made, so a retry never makes a second job. Without a key nothing is retried."""
        for attempt in range(retries + 1 if idempotency_key else 1):
            try:
                return self._submit_once(params, conditioning, mask, idempotency_key)
            except ServerUnavailable:
                if attempt >= retries or not idempotency_key:
                    raise
                time.sleep(2 ** attempt)
        raise AssertionError("unreachable")

    def _submit_once(self, params: dict, conditioning: dict | None, mask: str | Path | None,
                     idempotency_key: str | None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        if mask is not None:
            path = Path(mask)
            try:
                handle = path.open("rb")
            except OSError as exc:
                raise UsageError(f"--mask {mask}: {exc.strerror or exc}") from None
            with handle:
                response = self._request("POST", "generate", "submit",
                                         files={"mask": (path.name, handle, _mask_type(path))},
                                         data={"params": json.dumps(params)}, headers=headers)
        else:
            body = dict(params)
            if conditioning is not None:
                body["conditioning"] = conditioning
            response = self._request("POST", "generate", "submit", json=body, headers=headers)
        return response.json()

    def job(self, job_id: str) -> dict:
        """``GET /jobs/{id}``."""
        return self._request("GET", self.job_path(job_id), f"job {job_id}").json()

    def jobs(self, limit: int = 20, offset: int = 0) -> dict:
        """``GET /jobs``: the caller's jobs, newest first (``items``, ``total``, ``offset``, ``limit``)."""
        return self._request("GET", "jobs", "jobs", params={"limit": limit, "offset": offset}).json()

    def models(self) -> dict:
        """``GET /models``."""
        return self._request("GET", "models", "models").json()

    def cancel(self, job_id: str) -> tuple[int, dict | None]:
        """``DELETE /jobs/{id}``: 200 a queued job canceled, 202 a running job asked to stop, 204 a finished job
        deleted with its files (no body)."""
        response = self._request("DELETE", self.job_path(job_id), f"cancel {job_id}")
        return response.status_code, (response.json() if response.status_code != 204 else None)

    def wait(self, job_id: str, *, timeout: float | None = None, interval: float = 1.0,
             on_update: Callable[[dict], None] | None = None) -> dict:
        """Poll ``GET /jobs/{id}`` until the job ends; returns its last state. Raises WaitTimeout after
        ``timeout`` seconds. The first request must succeed; after that the server may be unreachable (or answer
        5xx / 429) for up to ``retry_for`` seconds in a row — a restart — before ServerUnavailable."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.job(job_id)
        failing_since: float | None = None
        pause = interval
        while True:
            if on_update is not None:
                on_update(job)
            if job.get("status") in TERMINAL:
                return job
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise WaitTimeout(f"timed out after {timeout:g} s waiting for job {job_id}", job)
            time.sleep(max(0.0, min(pause, deadline - now)) if deadline is not None else pause)
            pause = interval
            try:
                job = self.job(job_id)
                failing_since = None
            except (ServerUnavailable, Refused) as exc:
                if isinstance(exc, Refused) and exc.status != 429:
                    raise
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.retry_for:
                    raise
                pause = max(interval, min(exc.retry_after or 2 * interval, 30.0))

    # --- downloads ---

    def download(self, job: dict | str, out_dir: str | Path, what: Iterable[str] | None = None, *,
                 progress: Callable[[str, int | None], Callable[[int], None]] | None = None) -> dict[str, Path]:
        """Write a succeeded job's outputs into ``out_dir`` (created); ``what``: file names or aliases (default:
        every output the job has). Each file is written as ``NAME.part`` and renamed when complete; a ``.part``
        left by an interrupted download is resumed with a Range request. ``slide.zarr`` is a folder (fetched
        into ``slide.zarr.part/`` file by file, then renamed). ``progress(name, total_bytes)`` may return a
        callable that gets each chunk's size. Returns file name → path."""
        if isinstance(job, str):
            job = self.job(job)
        job_id = job["id"]
        status = job.get("status")
        if status == "expired":
            raise Expired(f"job {job_id} expired: its outputs were removed (the service's retention)")
        if status in ("failed", "canceled"):
            raise JobNotSucceeded(f"job {job_id} {status}" + (f": {job['error']}" if job.get("error") else "")
                                  + "; it has no outputs", job)
        if status != "succeeded":
            raise Refused(f"job {job_id} is {status}; outputs exist once it has succeeded "
                          f"(`slidesynth wait {job_id}`)", status=409)
        available = job_outputs(job)
        names = [output_name(n) for n in what] if what else available
        missing = [n for n in names if n not in available]
        if missing:
            raise NotFound(f"job {job_id} has no {', '.join(missing)} (it has: {', '.join(available) or 'none'})",
                           status=404)
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {out}: {exc.strerror or exc}") from None
        files = {}
        for name in dict.fromkeys(names):
            if name == "slide.zarr":
                files[name] = self._download_tree(job_id, name, out / name, progress)
            else:
                files[name] = self._download_file(self.job_path(job_id, name), out / name, progress, name)
        return files

    def _download_file(self, url: str, dest: Path, progress, label: str, _retry: bool = True) -> Path:
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        what = f"download {label}"
        try:
            with self._http.stream("GET", url, headers=headers,
                                   timeout=httpx.Timeout(300.0, connect=10.0)) as response:
                if response.status_code == 416 and have:
                    response.read()
                    _, total = _parse_content_range(response.headers.get("content-range"))
                    if total == have:  # the .part is the whole file: the rename was all that was left
                        os.replace(part, dest)
                        return dest
                    part.unlink()  # larger than the file: not a prefix of it
                    if _retry:
                        return self._download_file(url, dest, progress, label, _retry=False)
                if response.status_code >= 400:
                    response.read()
                    raise error_for(response, what)
                first, total = _parse_content_range(response.headers.get("content-range"))
                if response.status_code == 206 and first != have:  # not the range asked for: start over
                    if not _retry:
                        raise ServerUnavailable(f"{what}: the server sent bytes from {first}, not {have}")
                    part.unlink()
                    return self._download_file(url, dest, progress, label, _retry=False)
                if response.status_code == 206:
                    mode = "ab"
                else:  # the server sent the whole file (no Range support, or it ignored ours): start over
                    mode, have = "wb", 0
                    length = response.headers.get("content-length")
                    total = int(length) if length and length.isdigit() else None
                advance = progress(label, total) if progress else None
                if advance is not None and have:
                    advance(have)
                with part.open(mode) as fh:
                    for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)
                        if advance is not None:
                            advance(len(chunk))
                    fh.flush()
                    os.fsync(fh.fileno())
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"{what}: cut short ({exc or type(exc).__name__}); {part} is kept — run "
                                    f"the download again to resume it") from None
        if total is not None and part.stat().st_size != total:
            raise ServerUnavailable(f"{what}: got {part.stat().st_size} of {total} bytes; {part} is kept — run "
                                    f"the download again to resume it")
        os.replace(part, dest)
        return dest

    def _download_tree(self, job_id: str, name: str, dest: Path, progress) -> Path:
        """A folder output (the OME-Zarr): its listing is JSON ``{"path", "entries"}``, folders end in ``/``."""
        staging = dest.with_name(dest.name + ".part")
        pending = [""]
        while pending:
            rel = pending.pop()
            listing = self._request("GET", self.job_path(job_id, name, rel), f"list {name}/{rel}").json()
            for entry in listing.get("entries", []):
                base = entry.rstrip("/")
                if base in ("", ".", "..") or "/" in base or "\\" in base:
                    raise ServerUnavailable(f"list {name}/{rel}: the server named an unsafe entry {entry!r}")
                if entry.endswith("/"):
                    (staging / rel / base).mkdir(parents=True, exist_ok=True)
                    pending.append(f"{rel}{base}/")
                    continue
                target = staging / rel / base
                if target.is_file():  # finished in an earlier, interrupted download (files land by rename)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                self._download_file(self.job_path(job_id, name, rel + base), target, None, f"{name}/{rel}{base}")
        staging.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(staging, dest)
        return dest
