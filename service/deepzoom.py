"""Deep Zoom (DZI) view of a job's pyramidal TIFF, for OpenSeadragon and other Deep Zoom viewers.

OpenSeadragon cannot read a TIFF.  Given ``/jobs/{id}/slide.dzi`` it fetches that descriptor and then the
tiles next to it, ``/jobs/{id}/slide_files/{level}/{col}_{row}.jpeg``.  The tiles are cut from the TIFF by
openslide-python's :class:`~openslide.deepzoom.DeepZoomGenerator`: Deep Zoom level ``L`` is the image scaled
by ``2^(L − top)``, read from the TIFF level closest above it (so the lowest Deep Zoom levels, below the
TIFF's smallest level, are downsampled from that one).  254-px tiles with a 1-px overlap, JPEG quality 90.

Open slides are kept in a small LRU cache keyed by path, inode and modification time, so a viewer's
hundreds of tile requests do not reopen the file, and a replaced file is never served from a stale handle.
"""
from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from pathlib import Path

import openslide
from openslide.deepzoom import DeepZoomGenerator

TILE_SIZE = 254  # + 2 × OVERLAP = 256 px per interior tile, the Deep Zoom convention
OVERLAP = 1
QUALITY = 90
FORMAT = "jpeg"

_TILE_NAME = re.compile(r"(\d+)_(\d+)\.(\w+)")


class TileNotFound(LookupError):
    """A tile address outside the slide's Deep Zoom pyramid; the message names the field."""


def parse_tile_name(name: str) -> tuple[int, int]:
    """``"{col}_{row}.jpeg"`` → (col, row); :class:`TileNotFound` for any other name."""
    m = _TILE_NAME.fullmatch(name)
    if m is None:
        raise TileNotFound(f"tile name {name!r} is not '{{col}}_{{row}}.{FORMAT}'")
    if m.group(3) != FORMAT:
        raise TileNotFound(f"tile format {m.group(3)!r} is not served; tiles are '.{FORMAT}'")
    return int(m.group(1)), int(m.group(2))


class DeepZoomSlides:
    """LRU cache of open slides' Deep Zoom generators (thread-safe: OpenSlide reads are).

    Entries are dropped, never closed here: a request still cutting a tile from an evicted or forgotten
    slide keeps its handle, which OpenSlide releases with the last reference.  (OpenSlide opens the file
    per read, so a cached slide holds no file descriptor.)
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._open: OrderedDict[tuple[str, int, int], DeepZoomGenerator] = OrderedDict()
        self._lock = threading.Lock()

    def generator(self, path: Path) -> DeepZoomGenerator:
        st = Path(path).stat()
        key = (str(path), st.st_ino, st.st_mtime_ns)
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        gen = DeepZoomGenerator(openslide.OpenSlide(str(path)), tile_size=TILE_SIZE, overlap=OVERLAP,
                                limit_bounds=False)
        with self._lock:
            gen = self._open.setdefault(key, gen)  # another request may have opened it meanwhile: keep one
            while len(self._open) > self.capacity:
                self._open.popitem(last=False)
        return gen

    def forget(self, folder: Path) -> None:
        """Drop the slides under ``folder`` (a job being deleted): no cache entry outlives its job."""
        prefix = str(Path(folder)) + "/"
        with self._lock:
            for key in [k for k in self._open if k[0].startswith(prefix)]:
                del self._open[key]

    def __len__(self) -> int:
        return len(self._open)


def descriptor(gen: DeepZoomGenerator) -> str:
    """The DZI XML document (``Image`` with ``TileSize``, ``Overlap``, ``Format`` and ``Size``)."""
    return gen.get_dzi(FORMAT)


def tile_jpeg(gen: DeepZoomGenerator, level: int, col: int, row: int) -> bytes:
    """JPEG bytes of Deep Zoom tile (col, row) of ``level``; :class:`TileNotFound` names the bad field."""
    if not 0 <= level < gen.level_count:
        raise TileNotFound(f"level {level} is outside 0..{gen.level_count - 1}")
    cols, rows = gen.level_tiles[level]
    if not 0 <= col < cols:
        raise TileNotFound(f"col {col} is outside 0..{cols - 1} at level {level}")
    if not 0 <= row < rows:
        raise TileNotFound(f"row {row} is outside 0..{rows - 1} at level {level}")
    buf = io.BytesIO()
    gen.get_tile(level, (col, row)).save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()
