"""The job contract the API, the worker and the command share: output file names and how stage progress maps
onto one fraction for the whole job."""
from __future__ import annotations

from collections.abc import Sequence

from models.engine import Stage

# Files of a succeeded job, by kind, in its job directory.
OUTPUT_FILES = {"tiff": "slide.tiff", "zarr": "slide.zarr", "thumbnail": "thumbnail.png", "mask": "mask-out.png"}

# Share of the whole job each stage takes, for one progress fraction (sampling dominates).
STAGE_WEIGHTS = {Stage.mask: 0.10, Stage.sampling: 0.75, Stage.decoding: 0.13, Stage.writing: 0.02}


def overall_fraction(stage: Stage, fraction: float, stages: Sequence[Stage]) -> float:
    """Map a stage-local fraction onto the whole job, whose engine reports ``stages`` (in order)."""
    order = [s for s in Stage if s in stages]
    total = sum(STAGE_WEIGHTS[s] for s in order)
    before = sum(STAGE_WEIGHTS[s] for s in order[: order.index(stage)])
    return min(1.0, (before + STAGE_WEIGHTS[stage] * min(max(fraction, 0.0), 1.0)) / total)
