"""Band-fed slide outputs: one pyramid cascade feeding a pyramidal BigTIFF and/or an OME-Zarr.

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

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from writers.atomic import check_target, commit, partial_path, remove_path
from writers.appendfile import AppendFile
from writers.pyramid import (BandTiler, PyramidCascade, SerialOpenCV, TileBuffers, default_workers,
                             tile_size_for)
from writers.tiff import TiffPyramidSink, check_codec, synthetic_description
from writers.zarr import NGFF_VERSIONS, ZarrPyramidSink


class SlideOutputs:
    """Context manager writing full-width row bands into a pyramidal TIFF and/or an OME-Zarr."""

    def __init__(self, width: int, height: int, mpp: float, tiff_path: str | Path | None = None,
                 zarr_path: str | Path | None = None, description: str | None = None,
                 metadata: dict[str, Any] | None = None, compression: str = "jpeg", quality: int = 90,
                 tile: int = 512, zarr_version: str = "0.4", subsampling: str = "420", predictor: bool = True,
                 zarr_clevel: int = 3, min_size: int = 1024, workers: int | None = None, overwrite: bool = True):
        if tiff_path is None and zarr_path is None:
            raise ValueError("SlideOutputs needs at least one of tiff_path and zarr_path")
        if tiff_path is not None:
            check_codec(compression, quality, subsampling)
        if zarr_path is not None and zarr_version not in NGFF_VERSIONS:
            raise ValueError(f"zarr_version must be one of {NGFF_VERSIONS}, got {zarr_version!r}")
        if not isinstance(width, (int, np.integer)) or not isinstance(height, (int, np.integer)) \
                or width < 1 or height < 1:
            raise ValueError(f"width and height must be positive integers, got {width!r} x {height!r}")
        tile = tile_size_for(width, height, tile)
        self.width, self.height, self.mpp, self.tile = int(width), int(height), mpp, tile
        self.tiff_path = Path(tiff_path) if tiff_path is not None else None
        self.zarr_path = Path(zarr_path) if zarr_path is not None else None
        for p in (self.tiff_path, self.zarr_path):
            if p is not None:
                check_target(p, overwrite)
        self.overwrite = overwrite
        self.metadata = dict(metadata or {})
        self.thumbnail: np.ndarray | None = None
        self._state = "open"
        self._tiff_tmp = partial_path(self.tiff_path) if self.tiff_path else None
        self._zarr_tmp = partial_path(self.zarr_path) if self.zarr_path else None
        self._out: AppendFile | None = None
        self._tiff: TiffPyramidSink | None = None
        self._zarr: ZarrPyramidSink | None = None
        self.workers = max(1, int(workers)) if workers else default_workers()
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="slide-encode")
        self._serial = SerialOpenCV(self)
        try:
            self.cascade = PyramidCascade(self.width, self.height, self._on_tile, tile=tile, min_size=min_size)
            self.tiler = BandTiler(self.width, self.height, self.cascade.push_tile, tile=tile)
            self._buffers = TileBuffers(tile)
            pending = 8 * self.workers
            if self.tiff_path is not None:
                self._out = AppendFile(self._tiff_tmp)
                self._tiff = TiffPyramidSink(self._out, self.cascade.levels, mpp, tile, compression, quality,
                                             subsampling, predictor, synthetic_description(self.metadata, description),
                                             pool=self.pool, max_pending=pending)
            if self.zarr_path is not None:
                attrs = {"synthetic": True, "generator": "slidesynth", **self.metadata}
                if description:
                    attrs["description"] = description
                self._zarr = ZarrPyramidSink(self._zarr_tmp, self.cascade.levels, mpp, tile, zarr_version,
                                             zarr_clevel, attributes=attrs, pool=self.pool, max_pending=pending)
            self._sinks = [sink for sink in (self._tiff, self._zarr) if sink is not None]
        except BaseException:
            self.abort()
            raise

    @property
    def levels(self) -> list[tuple[int, int]]:
        return self.cascade.levels

    @property
    def rows_written(self) -> int:
        return self.tiler.rows_done

    def _on_tile(self, level: int, ty: int, tx: int, tile: np.ndarray) -> None:
        padded, release = self._buffers.padded(tile, users=len(self._sinks))  # one copy shared by both outputs
        for sink in self._sinks:
            sink.put_padded(level, ty, tx, padded, release)

    def write_band(self, band: np.ndarray) -> None:
        """Append a full-width uint8 band (rows, width, 3); bands must come in row order."""
        if self._state != "open":
            raise ValueError(f"band at row {self.tiler.rows_done}: outputs are already {self._state}")
        try:
            self.tiler.write_band(band)
        except BaseException:
            self.abort()
            raise

    def close(self) -> None:
        """Finish both outputs and rename them into place (raises if rows are missing)."""
        if self._state != "open":
            raise ValueError(f"outputs are already {self._state}")
        committed: list[Path] = []
        try:
            if not self.tiler.complete:
                raise ValueError(f"slide incomplete: {self.tiler.rows_done} of {self.height} rows written")
            self.cascade.check_complete()
            if self._tiff is not None:
                self._tiff.finish(self.cascade.smallest)
                self._out.close()
            if self._zarr is not None:
                self._zarr.finish()
            self.pool.shutdown(wait=True)
            if self._tiff is not None:
                commit(self._tiff_tmp, self.tiff_path, self.overwrite)
                committed.append(self.tiff_path)
            if self._zarr is not None:
                commit(self._zarr_tmp, self.zarr_path, self.overwrite)
                committed.append(self.zarr_path)
        except BaseException:
            self.abort()
            for path in committed:  # the job failed: do not leave half of its outputs behind
                remove_path(path)
            raise
        self._state = "closed"
        self._serial.release()
        self.thumbnail = self.cascade.smallest

    def abort(self) -> None:
        """Stop encoding and remove temporary outputs (idempotent; final paths are never touched)."""
        self._state = "aborted"
        try:
            for sink in (self._tiff, self._zarr):
                if sink is not None:
                    sink.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            if self._out is not None:
                self._out.abort()
        finally:  # whatever failed above, the hold is given back and no partial output stays
            self._serial.release()
            remove_path(self._tiff_tmp)
            remove_path(self._zarr_tmp)

    def __enter__(self) -> "SlideOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            if self._state == "open":
                self.abort()
            return False
        self.close()
        return False
