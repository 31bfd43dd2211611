"""The engine contract and the engine registry.

An *engine* turns a validated request into the pixel bands of a slide. It owns everything specific to it: its
options (one pydantic model, used by the HTTP schema, the job record and the command line), its defaults, the
conditioning kinds it serves, how it loads weight folders and builds its untrained default, its guidance
convention, its decoder, and its resumable sampling state. The worker, the API and the command know engines only
through this module: they look one up by the name on a model card (:func:`get_engine`) and never compare names.

Importing an engine module must not import torch (the API process validates requests with the options models
and reads cards without loading networks); engines import their ML code inside the methods that run it.

Adding an engine: write one module with a class implementing :class:`Engine` and call :func:`register_engine`
(``tests/test_engine_contract.py`` does exactly this with an engine that paints a constant colour).
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict

from models.cards import ModelCard

ConditioningKind = Literal["mask", "subtype", "embedding", "embedding_grid"]


class Stage(str, Enum):
    """The stages a job reports progress in, in order (an engine may skip ``mask``)."""

    mask = "mask"
    sampling = "sampling"
    decoding = "decoding"
    writing = "writing"


ReportFn = Callable[[Stage, float, "int | None"], None]  # (stage, fraction of the stage done, sampling step)
CancelFn = Callable[[], bool]


class OptionError(ValueError):
    """An option value the engine cannot use; ``field`` names it (the API answers 422 at ``options.<field>``)."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field, self.msg = field, msg


def stage_progress(report: ReportFn, stage: Stage, steps: int) -> Callable[[int, int], None]:
    """A (done, total) callback reporting ``stage``; in sampling also the step (engines may count finer units
    than steps, e.g. ∞-Brush's coordinate chunks)."""
    def progress(done: int, total: int) -> None:
        report(stage, done / max(total, 1), done * steps // max(total, 1) if stage == Stage.sampling else None)

    return progress


class EngineOptions(BaseModel):
    """Base of every engine's options model: strict JSON types, unknown options refused (a 422 naming them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def resolved(self) -> "EngineOptions":
        """These options with defaults that depend on other options filled in; :class:`OptionError` for
        combinations the engine cannot run."""
        return self


@dataclass(frozen=True)
class SlideRequest:
    """One validated slide request as an engine sees it (built by the worker from a job record).

    ``labels``: the label mask at output size (mask jobs); ``subtype`` / ``subtype_id``: a subtype prompt;
    ``embedding`` / ``encoder``: an image embedding; ``embedding_grid`` / ``encoder``: (rows, cols, vectors), a
    grid of embeddings laid over the slide, vectors (rows·cols, D) in row-major order. ``guidance`` is ω of the
    API's convention (1+ω)·ε(c) − ω·ε(∅); an engine with another convention converts it. ``options``: the
    engine's options model.
    """

    width: int
    height: int
    mpp: float
    seed: int
    steps: int
    guidance: float
    eta: float
    conditioning: ConditioningKind
    options: EngineOptions
    labels: np.ndarray | None = None
    subtype: str | None = None
    subtype_id: int | None = None
    embedding: list[float] | None = None
    encoder: str | None = None
    embedding_grid: tuple[int, int, np.ndarray] | None = None


@dataclass
class Runtime:
    """How the worker runs engines: batch size of network calls, autocast precision, local folders, GPU fast
    paths. The worker resolves every field for its device when it starts (``worker.device_check``); the
    defaults are those of a plain CPU run."""

    batch_size: int = 8
    precision: str = "auto"  # "auto": bfloat16 on CUDA, float32 elsewhere; the worker passes the resolved dtype
    models_dir: Path | None = None  # where auxiliary encoders live (e.g. ∞-Brush's QuiltNet text tower)
    compile: bool = False  # torch.compile the networks
    compile_mode: str = "default"  # torch.compile's mode: default, reduce-overhead, max-autotune-no-cudagraphs
    fused_kernels: bool = False  # use the fused Triton kernels
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark (process-wide; the worker sets it)


@dataclass
class SlideBands:
    """What an engine hands the writers: bands of RGB rows, top to bottom, and what metrics need to know.

    ``bands`` yields uint8 arrays (rows, width, 3); the work happens as it is consumed. ``labels``: the label map
    the slide follows (requested or generated), for the fidelity score and the saved mask. ``seam_lines``:
    (rows, cols) where tiles were blended; ``cut_lines``: per kind of cut, the zones the quilt score compares.
    ``seconds``: engine timings (e.g. ``sampling``) for the job metrics; ``notes``: other figures for them
    (JSON values, e.g. network calls, a batch size halved after running out of GPU memory)."""

    bands: Iterator[np.ndarray]
    labels: np.ndarray | None = None
    seam_lines: tuple[list[int], list[int]] | None = None
    cut_lines: dict[str, tuple[list, list]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """What every engine provides (see the module docstring)."""

    name: ClassVar[str]  # the `engine` of its model cards
    options_model: ClassVar[type[EngineOptions]]
    conditioning: ClassVar[tuple[ConditioningKind, ...]]
    default_steps: ClassVar[int]  # when neither request nor card name any
    default_eta: ClassVar[float]
    untrained_name: ClassVar[str | None]  # the built-in seeded-random-weights model, if any

    def untrained_card(self) -> ModelCard:
        """The untrained default's card, read without building networks."""

    def load(self, folder: Path | None, device: Any) -> Any:
        """Loaded models (with ``.card``) from a weight folder, or the untrained default for ``None``."""

    def stages(self, conditioning: ConditioningKind) -> tuple[Stage, ...]:
        """The stages a job with this conditioning reports, in order."""

    def steps_for(self, card: ModelCard, options: EngineOptions | None) -> int:
        """Sampling steps when a request names none, for these (resolved) options (None: the defaults)."""

    def serves(self, card: ModelCard, conditioning: ConditioningKind, models_dir: Path) -> str | None:
        """None when this deployment can serve the conditioning with the card's model, else why not."""

    def generate(self, models: Any, request: SlideRequest, *, device: Any, runtime: Runtime, report: ReportFn,
                 cancel: CancelFn, state: Any = None,
                 on_checkpoint: Callable[[Any], None] | None = None) -> SlideBands:
        """The slide's bands. Raises ValueError for requests the models cannot serve, before any band exists.
        ``state``: a resumable state from :meth:`load_state` (ignored when it does not match the request);
        ``on_checkpoint(state)`` is called after each sampling step with an object that has ``save(path)``."""

    def load_state(self, path: Path) -> Any:
        """A saved resumable state, or None when there is none or it cannot be read."""

    # Optional (EngineBase has a default): ``probe_batch(models, device, batch, precision) -> bool`` runs one
    # forward of the network whose batch ``Runtime.batch_size`` sets, on ``batch`` items at ``precision``; the
    # worker measures its memory at start to size and check the batch. False: the engine has no such network.
    # ``check_options(card, options, models_dir) -> None`` raises :class:`OptionError` for (resolved) options this
    # deployment's copy of the model cannot serve (e.g. a file the option needs is missing from the model folder);
    # the API answers 422 naming ``options.<field>``. Default: every option is served.
    # ``max_embedding_grid(card) -> int | None``: the most rows (and columns) of an embedding grid the card's model
    # takes, read from the card (the API refuses larger grids before storing a job); None: no limit of its own.


class EngineBase:
    """Defaults for the optional parts of :class:`Engine`."""

    untrained_name: ClassVar[str | None] = None
    untrained_card_file: ClassVar[Path | None] = None  # a JSON card beside the engine module

    def untrained_card(self) -> ModelCard:
        if self.untrained_card_file is None:
            raise LookupError(f"engine {self.name} has no untrained default")
        return ModelCard.model_validate(json.loads(Path(self.untrained_card_file).read_text()))

    def stages(self, conditioning: ConditioningKind) -> tuple[Stage, ...]:
        return (Stage.sampling, Stage.decoding, Stage.writing)

    def steps_for(self, card: ModelCard, options: EngineOptions | None) -> int:
        return card.default_steps or self.default_steps

    def serves(self, card: ModelCard, conditioning: ConditioningKind, models_dir: Path) -> str | None:
        return None if conditioning in card.conditioning else f"model {card.name} does not take {conditioning} conditioning"

    def load_state(self, path: Path) -> Any:
        return None

    def check_options(self, card: ModelCard, options: EngineOptions, models_dir: Path | None) -> None:
        return None

    def probe_batch(self, models: Any, device: Any, batch: int, precision: str) -> bool:
        """Nothing to probe: the worker keeps the default batch size and trusts an explicit one."""
        return False

    def max_embedding_grid(self, card: ModelCard) -> int | None:
        """No limit of the engine's own on embedding grids (the API's bound still applies)."""
        return None


# ---------------------------------------------------------------------------------------------------------------
# Registry

_ENGINES: dict[str, Engine] = {}
# Built-in engines, imported on first lookup (their modules import no ML library at import time).
BUILTIN_ENGINES = ("models.diffinfinite.engine", "models.infbrush.engine")
_builtins_loaded = False


def register_engine(engine: Engine) -> Engine:
    """Make ``engine`` available under ``engine.name`` (replacing an engine of that name)."""
    if not isinstance(engine, Engine):
        raise TypeError(f"{engine!r} does not implement the Engine protocol")
    _ENGINES[engine.name] = engine
    return engine


def unregister_engine(name: str) -> None:
    _ENGINES.pop(name, None)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_ENGINES:
            try:
                importlib.import_module(module)  # registers itself
            except ImportError:  # an engine not installed in this deployment
                continue


def engines() -> dict[str, Engine]:
    """Every registered engine by name."""
    _load_builtins()
    return dict(_ENGINES)


class UnknownEngine(KeyError):
    """No engine is registered under the name (its message names the registered ones)."""

    def __str__(self) -> str:  # KeyError's own str() is the repr of its argument
        return str(self.args[0])


def get_engine(name: str) -> Engine:
    """The engine registered as ``name``; :class:`UnknownEngine` naming the known ones otherwise."""
    known = engines()
    if name not in known:
        raise UnknownEngine(f"no engine {name!r}; registered: {', '.join(sorted(known)) or 'none'}")
    return known[name]


def is_model_of(card: ModelCard, engine: str) -> bool:
    """Whether ``card`` is a model of the engine named ``engine`` (loaders check a folder before reading it)."""
    return card.engine == engine


def steps_default(card: ModelCard, options: EngineOptions | None = None) -> int:
    """Sampling steps when a request names none: the engine's choice for the options (e.g. fewer for a
    multistep solver), by default the card's, else the engine's (the paper's)."""
    return get_engine(card.engine).steps_for(card, options)
