"""The ``slidesynth`` command: serve, worker, generate, embed, train, convert — and the client commands (submit,
status, wait, download, cancel, jobs, models; ``slidesynth/client_cli.py``) for a running service."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from slidesynth.client_cli import CLIENT_COMMANDS, add_client_commands
from slidesynth.client_cli import run as client_run


def _observability(settings, log_level: str, metrics_dir: Path | None, wipe: bool = True) -> None:
    """First thing a launcher does: the metrics folder its processes share (core/metrics.py), set before any
    metric exists and inherited by every process it starts, and the log format (core/logs.py)."""
    from core import logs, metrics

    metrics.prepare_multiprocess(metrics_dir, wipe=wipe)
    logs.configure(settings, log_level)


def cmd_serve(args: argparse.Namespace) -> int:
    from core import logs
    from core.settings import get_settings

    settings = get_settings()
    _observability(settings, args.log_level, settings.metrics_dir)
    import uvicorn

    from service.app import create_app

    log = logging.getLogger("slidesynth.api")
    worker = None
    start_worker = settings.embedded if args.worker is None else args.worker
    if start_worker:
        # The worker runs in its own process (CUDA must not be initialised in the API process). It is told
        # to stop when `serve` dies however it dies: uvicorn re-raises SIGTERM after its graceful shutdown,
        # so a `finally` here is not enough. It writes its metrics into this server's folder (no port of its own):
        # the API's /metrics shows them.
        worker = subprocess.Popen([sys.executable, "-m", "slidesynth.cli", "worker", "--shared-metrics"],
                                  env=os.environ.copy(), preexec_fn=_terminate_with_parent)
    try:
        mode = "embedded (no broker server)" if settings.embedded else f"broker {settings.broker_url}"
        logs.say(log, settings, f"slidesynth: API on http://{args.host}:{args.port}, {mode}, data in "
                 f"{settings.data_dir}" + (f", {args.processes} HTTP processes" if args.processes > 1 else ""))
        # uvicorn applies the same logging configuration in each of its processes; the access line is ours
        # (service/metrics.py: route template, job id, tenant)
        log_config = logs.log_config(settings.log_format, args.log_level, logs.secrets_of(settings))
        if args.processes > 1:
            # uvicorn forks its worker processes from an import string; each builds the app from the same settings
            uvicorn.run("service.app:create_app", factory=True, workers=args.processes, host=args.host,
                        port=args.port, log_level=args.log_level, log_config=log_config, access_log=False)
        else:
            uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                        log_config=log_config, access_log=False)
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=90)  # warm shutdown (60 s) lets a running job re-queue itself
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent process exits (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not Linux: the finally block in cmd_serve still stops it on a normal exit
        pass


def cmd_worker(args: argparse.Namespace) -> int:
    from core import logs, metrics
    from core.settings import get_settings

    settings = get_settings()
    # --shared-metrics (from `serve`): write into the API's folder, which the API exposes; else a folder and a
    # port of this worker's own
    shared = metrics.multiprocess_dir() if args.shared_metrics else None
    _observability(settings, args.log_level, shared or settings.metrics_dir, wipe=shared is None)
    from worker.start_checks import StartCheckError, check_deployment

    log = logging.getLogger("slidesynth.worker")
    try:  # the deployment first (torch-free, instant), then the device
        queues = check_deployment(settings, args.queues)
    except StartCheckError as exc:
        logs.say(log, settings, f"slidesynth worker: refusing to start: {exc}", level=logging.ERROR,
                 stream=sys.stderr)
        return 2
    from worker.device_check import DeviceCheckError, check_worker_start, describe

    try:
        runtimes = check_worker_start(settings)  # before the pool exists: a bad setting stops here, not mid-job
    except DeviceCheckError as exc:
        logs.say(log, settings, f"slidesynth worker: refusing to start: {exc}", level=logging.ERROR,
                 stream=sys.stderr)
        return 2
    for device, runtime in runtimes.items():
        logs.say(log, settings, f"slidesynth worker: {describe(device, runtime)}")
    from worker.celery_app import app

    logs.take_over_celery_logging(app, settings.log_format)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    port = None
    if shared is None and settings.metrics_port:
        port = settings.metrics_port if metrics.serve_worker_metrics(settings.metrics_port) else None
    logs.say(log, settings, f"slidesynth worker: queues {','.join(queues)}, {settings.worker_concurrency} "
             f"process(es), broker {settings.broker_url or 'filesystem (embedded mode)'}, metrics "
             + (f"on :{port}/metrics" if port else "in the API's /metrics" if shared else "not served"))
    argv = ["worker", f"--loglevel={args.log_level}", "-Q", ",".join(queues), "-c", str(settings.worker_concurrency),
            "-P", "prefork", "-n", f"{args.name}@%h", "--without-gossip", "--without-mingle",
            # one state file per Celery node (%p: name@host): workers share the data folder (a volume), and two
            # of them writing one shelve file would corrupt it
            f"--statedb={settings.data_dir / 'worker-state-%p'}"]
    if settings.log_format == "json":
        argv.insert(0, "--quiet")  # Celery's banner is lines of text on stdout: its figures are in the line above
    app.worker_main(argv)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option of every registered engine, declared by the engines' options models."""
    from types import UnionType
    from typing import Literal, Union, get_args, get_origin

    from models.engine import engines

    # an option name several engines take (e.g. solver) is one flag: its choices are the union, the engine of the
    # model validates the value
    flags: dict[str, dict] = {}
    for name, engine in sorted(engines().items()):
        for field_name, info in engine.options_model.model_fields.items():
            union = get_origin(info.annotation) in (Union, UnionType)
            kinds = [a for a in (get_args(info.annotation) if union else (info.annotation,)) if a is not type(None)]
            choices = [v for k in kinds if get_origin(k) is Literal for v in get_args(k)] or None
            kind = next((k for k in kinds if k in (int, float)), str)
            help_text = f"{name} option: {info.description or field_name}"
            if field_name not in flags:
                flags[field_name] = dict(type=kind, choices=choices, help=help_text)
                continue
            flag = flags[field_name]
            if flag["choices"] is not None and choices is not None:
                flag["choices"] = flag["choices"] + [c for c in choices if c not in flag["choices"]]
            flag["help"] += f"; {help_text}"
    for field_name, flag in flags.items():
        parser.add_argument(_option_flag(field_name), dest=f"option_{field_name}", type=flag["type"],
                            choices=flag["choices"], metavar=None if flag["choices"] else field_name.upper(),
                            help=flag["help"].replace("%", "%%"))


def _generate_params(args: argparse.Namespace):
    from service.schemas import GenerateParams

    options = {k.removeprefix("option_"): v for k, v in vars(args).items() if k.startswith("option_") and v is not None}
    fields = dict(model=args.model, mpp=args.mpp, mask_mpp=args.mask_mpp, seed=args.seed, steps=args.steps,
                  guidance=args.guidance, eta=args.eta, compression=args.compression, quality=args.quality,
                  outputs=["tiff"] + (["zarr"] if args.zarr else []), options=options or None)
    if not args.mask:
        fields.update(width=args.width, height=args.height)
    return GenerateParams(**{k: v for k, v in fields.items() if v is not None})


def _embedding_conditioning(path: Path, encoder: str | None):
    """``--embedding``: one vector ((D,) .npy or a JSON list) or a grid of them ((rows, cols, D) .npy or a JSON
    object as the API's ``conditioning``, ``{"rows": R, "cols": C, "vectors": [[…], …]}``, ``type`` optional).
    ``--encoder`` wins over the object's ``encoder``; neither: the API's default."""
    from service.schemas import EmbeddingConditioning, EmbeddingGridConditioning

    enc = {"encoder": encoder} if encoder else {}
    if path.suffix == ".npy":
        import numpy as np

        arr = np.load(path, allow_pickle=False).astype(float)
        if arr.ndim == 3:
            return EmbeddingGridConditioning(type="embedding_grid", rows=arr.shape[0], cols=arr.shape[1],
                                             vectors=arr.reshape(-1, arr.shape[2]).tolist(), **enc)
        return EmbeddingConditioning(type="embedding", vector=arr.ravel().tolist(), **enc)
    value = json.loads(path.read_text())
    if isinstance(value, dict):
        kind = EmbeddingConditioning if value.get("type") == "embedding" else EmbeddingGridConditioning
        return kind.model_validate({"type": "embedding_grid", **value, **enc})
    return EmbeddingConditioning(type="embedding", vector=value, **enc)


def _conditioning(args: argparse.Namespace):
    from service.schemas import SubtypeConditioning

    if args.subtype:
        return SubtypeConditioning(type="subtype", subtype=args.subtype)
    if args.embedding:
        try:
            return _embedding_conditioning(Path(args.embedding), args.encoder)
        except (OSError, ValueError) as exc:  # unreadable, not .npy / JSON (a pydantic error passes: it names fields)
            from pydantic import ValidationError

            if isinstance(exc, ValidationError):
                raise
            raise ValueError(f"--embedding {args.embedding}: {exc}") from None
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    """One job in-process, no server: preparation, pipeline and writers are the service's own."""
    from pydantic import ValidationError
    from tqdm import tqdm

    from core.contract import overall_fraction
    from core.settings import get_settings
    from models.engine import get_engine
    from models.registry import ModelRegistry
    from service.preparation import prepare_job
    from service.validation import FieldError
    from worker.device_check import DeviceCheckError, resolve_device, resolve_runtime
    from worker.pipeline import generate_slide

    settings = get_settings()
    registry = ModelRegistry(settings.models_dir)
    if sum(bool(x) for x in (args.mask, args.subtype, args.embedding)) != 1:
        print("error: give exactly one of --mask, --subtype or --embedding", file=sys.stderr)
        return 2
    try:
        params = _generate_params(args)
        mask = Path(args.mask).read_bytes() if args.mask else None
        job = prepare_job(params, registry.cards(), settings, conditioning=_conditioning(args), mask=mask)
    except FieldError as exc:
        flag = _option_flag(str(exc.loc[1])) if exc.loc[:1] == ("options",) and len(exc.loc) > 1 else None
        print(f"error: {flag + ': ' + exc.msg if flag else exc}", file=sys.stderr)
        return 2
    except (ValidationError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec, engine = job.spec, get_engine(job.spec.engine)
    try:
        device = resolve_device(args.device or settings.device, variable="--device" if args.device else
                                "SLIDESYNTH_DEVICE")
        runtime = resolve_runtime(settings, device, registry, model=spec.model)
    except DeviceCheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    models = registry.load(spec.model, device)
    if not models.card.trained:
        print(f"note: model {spec.model} is UNTRAINED (random weights): the slide will not look like tissue",
              file=sys.stderr)
    out = Path(args.out).resolve()
    if args.zarr and Path(args.zarr).exists() and not _is_zarr(Path(args.zarr)):
        print(f"error: --zarr {args.zarr} exists and is not a Zarr folder; refusing to replace it", file=sys.stderr)
        return 2
    stages = engine.stages(spec.conditioning)
    with tempfile.TemporaryDirectory(prefix="slidesynth-", dir=out.parent) as tmp:
        job_dir = Path(tmp)
        if job.mask_png is not None:
            (job_dir / "mask.png").write_bytes(job.mask_png)
        bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}] {postfix}")

        def report(stage, fraction, step):
            bar.n = 100 * overall_fraction(stage, fraction, stages)
            bar.set_postfix_str(stage.value + (f" step {step}/{spec.steps}" if step is not None else ""))

        result = generate_slide(spec, models, job_dir, engine=engine, device=device, report=report,
                                cancel=lambda: False, runtime=runtime)
        bar.close()
        shutil.move(str(job_dir / result.outputs["tiff"]), out)
        if args.zarr:
            shutil.rmtree(args.zarr, ignore_errors=True)
            shutil.move(str(job_dir / result.outputs["zarr"]), args.zarr)
    print(json.dumps({"tiff": str(out), "width": spec.width, "height": spec.height, "mpp": spec.mpp,
                      "seed": spec.seed, "model": spec.model, **result.metrics}))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Tiles → embeddings in-process: the API's header checks and resize, the worker's encoder loading."""
    import numpy as np

    from core.settings import get_settings
    from models.encoders import DEFAULT_ENCODER, EncoderNotInstalled, encoder_card, load_encoder
    from models.encoders.preprocess import prepare_tile
    from service.tiles import TileError, read_tile

    settings = get_settings()
    encoder_id = args.encoder or DEFAULT_ENCODER
    try:
        card = encoder_card(encoder_id, settings.models_dir)
    except (EncoderNotInstalled, OSError, ValueError) as exc:
        print(f"error: --encoder: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in (".npy", ".json"):
        print(f"error: --out {args.out}: write a .npy or a .json file", file=sys.stderr)
        return 2
    tiles, sizes = [], []  # each tile resized as soon as it is read: memory of one full tile at a time
    for name in args.tiles:
        try:
            tile = read_tile(Path(name).read_bytes(), settings.max_tile_pixels, card.min_tile_side())
            sizes.append((tile.shape[1], tile.shape[0]))
            tiles.append(prepare_tile(tile, card.input_size, card.resize))
        except TileError as exc:
            print(f"error: tile {name} {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: tile {name}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    try:
        encoder = load_encoder(encoder_id, settings.models_dir, args.device or "cpu")
    except (OSError, ValueError) as exc:
        print(f"error: encoder {encoder_id}: {exc}", file=sys.stderr)
        return 2
    vectors = encoder.embed(np.stack(tiles))
    if out is not None and out.suffix == ".npy":
        np.save(out, vectors)
        print(json.dumps({"encoder": encoder.id, "dim": encoder.dim, "tiles": len(tiles), "out": str(out)}))
        return 0
    text = json.dumps({"encoder": encoder.id, "dim": encoder.dim, "input_size": encoder.input_size,
                       "mpp": encoder.mpp, "embeddings": vectors.tolist(),
                       "tiles": [{"filename": Path(n).name, "width": w, "height": h}
                                 for n, (w, h) in zip(args.tiles, sizes)]})
    if out is None:
        print(text)
    else:
        out.write_text(text + "\n")
        print(json.dumps({"encoder": encoder.id, "dim": encoder.dim, "tiles": len(tiles), "out": str(out)}))
    return 0


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (".zattrs", ".zgroup", "zarr.json"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slidesynth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP API (and, in embedded mode, a worker)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--worker", action=argparse.BooleanOptionalAction, default=None,
                   help="also start a worker (default: only in embedded mode)")
    p.add_argument("--processes", type=_positive_int, default=1,
                   help="HTTP server processes (uvicorn workers; default 1): a container runs several, e.g. 4")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery worker for the job queue")
    p.add_argument("--name", default="gpu")
    p.add_argument("--queues", help="comma-separated queues to consume, polled in this order with a Redis broker "
                                    "(default: the embed queue, SLIDESYNTH_EMBED_QUEUE, then the job queues from "
                                    "high to low priority: <SLIDESYNTH_QUEUE>.high, <SLIDESYNTH_QUEUE>, "
                                    "<SLIDESYNTH_QUEUE>.low); e.g. only the embed queue for a worker that answers "
                                    "POST /embed while the others run slides, or only <queue>.high for a worker "
                                    "kept for urgent jobs; a queue the API does not send to is refused")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--shared-metrics", action="store_true",
                   help="write metrics into the folder of the `slidesynth serve` that started this worker (its "
                        "PROMETHEUS_MULTIPROC_DIR), exposed by the API's /metrics, and serve no port of its own")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("generate", help="generate one slide in-process (no server)")
    p.add_argument("--mask", help="label mask PNG/TIFF (pixel value = class index)")
    p.add_argument("--subtype", help="cancer subtype prompt (e.g. LUAD, LUSC)")
    p.add_argument("--embedding", help="image embedding: a .npy file ((D,) one vector, (rows, cols, D) a grid over "
                                       "the slide) or a JSON list of numbers or grid object {rows, cols, vectors}")
    p.add_argument("--encoder", help="encoder of --embedding (default: the JSON object's, else quilt-vit-b-32)")
    p.add_argument("--out", required=True, help="output pyramidal TIFF path")
    p.add_argument("--zarr", help="also write an OME-Zarr at this path")
    p.add_argument("--model")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--mpp", type=float)
    p.add_argument("--mask-mpp", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--eta", type=float)
    add_engine_option_flags(p)
    p.add_argument("--compression", choices=["jpeg", "deflate", "zstd"])
    p.add_argument("--quality", type=int)
    p.add_argument("--device")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("embed", help="embed image tiles with an encoder (no server)",
                       description="Embed PNG/JPEG/TIFF tiles with an installed encoder (SLIDESYNTH_MODELS_DIR), as "
                                   "POST /embed does: the same header checks and resize, in this process.")
    p.add_argument("tiles", nargs="+", metavar="TILE", help="image tiles (each side ≥ the encoder's input size)")
    p.add_argument("--encoder", help="encoder id (default slidesynth-tile-v1; `GET /encoders` lists them)")
    p.add_argument("--out", help="write the embeddings to a .npy ((N, dim) float32) or .json file (default: "
                                 "print the JSON)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.set_defaults(func=cmd_embed)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="model_kind", required=True)
    convert = sub.add_parser("convert", help="convert third-party checkpoints").add_subparsers(
        dest="source", required=True)
    _add_engine_commands(train, convert)
    add_client_commands(sub)
    return parser


def _add_engine_commands(train, convert) -> None:
    try:
        from training.cli import add_convert_parsers, add_train_parsers
    except ImportError:
        return
    add_train_parsers(train)
    add_convert_parsers(convert)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        return client_run(args)
    from pydantic import ValidationError

    try:
        return int(args.func(args) or 0)
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        # pydantic's own message quotes the values, and a value may be a secret (an API key, a URL's password)
        problems = "; ".join(f"SLIDESYNTH_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                             for e in exc.errors(include_input=False, include_url=False))
        print(f"slidesynth: invalid settings: {problems}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
