"""The job runner's outputs: a pyramidal BigTIFF and/or an OME-Zarr of one band-fed slide.

::

    with SlideOutputs(width=W, height=H, mpp=0.5, tiff_path=..., zarr_path=..., metadata={...}) as out:
        for band in decoder.iter_bands(latent):
            out.write_band(band)
    out.thumbnail  # uint8 (h, w, 3), longest side < 1024

On normal exit both outputs are renamed into place; on any exception inside the block (a bad band, a
full disk, ``models.runtime.Canceled``, …) the temporary files are removed and the exception propagates.
Memory: one level-0 tile row (tile × W × 3 bytes) + the cascade's half tile rows (≈ 1.5 · tile · W · 3) +
the in-flight encodes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from writers.tiff import TiffSink
from writers.writer import PyramidWriter
from writers.zarr import ZarrSink


class SlideOutputs(PyramidWriter):
    """A :class:`~writers.writer.PyramidWriter` with a :class:`~writers.tiff.TiffSink` at ``tiff_path``
    and/or a :class:`~writers.zarr.ZarrSink` at ``zarr_path`` (at least one), committed in that order; both
    carry ``description`` and ``metadata``."""

    def __init__(self, width: int, height: int, mpp: float, tiff_path: str | Path | None = None,
                 zarr_path: str | Path | None = None, description: str | None = None,
                 metadata: dict[str, Any] | None = None, compression: str = "jpeg", quality: int = 90,
                 tile: int = 512, zarr_version: str = "0.4", subsampling: str = "420", predictor: bool = True,
                 zarr_clevel: int = 3, min_size: int = 1024, workers: int | None = None, overwrite: bool = True):
        if tiff_path is None and zarr_path is None:
            raise ValueError("SlideOutputs needs at least one of tiff_path and zarr_path")
        sinks = []
        if tiff_path is not None:
            sinks.append(TiffSink(tiff_path, compression, quality, subsampling, predictor, description, metadata))
        if zarr_path is not None:
            sinks.append(ZarrSink(zarr_path, zarr_version, zarr_clevel, metadata=metadata, description=description))
        super().__init__(width, height, mpp, sinks, tile=tile, min_size=min_size, workers=workers,
                         overwrite=overwrite)
