"""SlideOutputs / PyramidWriter: band-fed TIFF + OME-Zarr, atomic commit, cancel/failure cleanup, decoder →
writer, a third format plugged in as a sink."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
import zarr

from models.decoding import TiledDecoder
from models.runtime import Canceled, check_cancel
from tests.slide_helpers import he_like, listing, reference_pyramid
from writers.outputs import SlideOutputs
from writers.pyramid import pad_tile
from writers.tiff import TiffSink
from writers.writer import PyramidWriter

W, H = 1500, 1100  # 2 levels (1500 → 750)


def feed(out, img, heights):
    pos = 0
    i = 0
    while pos < img.shape[0]:
        n = heights[i % len(heights)]
        out.write_band(img[pos:pos + n])
        pos += n
        i += 1


def test_bands_of_any_height_give_identical_tiff_and_zarr(tmp_path):
    img = he_like(H, W, seed=21)
    tif, zpath = tmp_path / "s.tif", tmp_path / "s.zarr"
    with SlideOutputs(width=W, height=H, mpp=0.5, tiff_path=tif, zarr_path=zpath, description="unit test",
                      metadata={"model": "m", "seed": 5, "parameters": {"a": 1}}, compression="deflate") as out:
        assert listing(tmp_path) != [] and not tif.exists() and not zpath.exists()  # only temporaries so far
        feed(out, img, [1, 700, 37, 513, 64])
    assert sorted(listing(tmp_path))[:1] == ["s.tif"] and zpath.is_dir()
    assert not [p for p in listing(tmp_path) if "partial" in p]
    ref = reference_pyramid(img)
    with openslide.OpenSlide(str(tif)) as s:
        assert s.level_count == len(ref) == 2
        assert "SYNTHETIC" in s.properties["tiff.ImageDescription"]
        assert "unit test" in s.properties["tiff.ImageDescription"]
        for lvl, r in enumerate(ref):
            got = np.asarray(s.read_region((0, 0), lvl, (r.shape[1], r.shape[0])).convert("RGB"))
            assert np.array_equal(got, r)
    g = zarr.open_group(str(zpath), mode="r")
    for lvl, r in enumerate(ref):
        assert np.array_equal(np.asarray(g[str(lvl)][:]).transpose(1, 2, 0), r)
    assert np.array_equal(out.thumbnail, ref[-1]) and max(out.thumbnail.shape) <= 1024


def test_cancel_inside_the_block_removes_everything(tmp_path):
    img = he_like(H, W, seed=22, grain=0)
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Canceled):
        with SlideOutputs(width=W, height=H, mpp=0.5, tiff_path=tmp_path / "c.tif",
                          zarr_path=tmp_path / "c.zarr") as out:
            for y in range(0, H, 300):
                check_cancel(cancel)
                out.write_band(img[y:y + 300])
    assert listing(tmp_path) == []
    assert out.thumbnail is None


@pytest.mark.parametrize("case,match", [
    ("width", r"band at row 0: shape \(10, 1499, 3\)"),
    ("dtype", "dtype float32"),
    ("gray", r"shape \(10, 1500\)"),
    ("overflow", "overflows the image height 1100"),
])
def test_bad_bands_raise_clear_errors_and_leave_nothing(tmp_path, case, match):
    img = he_like(H, W, seed=23, grain=0)
    band = {"width": img[:10, :-1], "dtype": img[:10].astype(np.float32), "gray": img[:10, :, 0],
            "overflow": np.concatenate([img, img[:5]])}[case]
    with pytest.raises(ValueError, match=match):
        with SlideOutputs(width=W, height=H, mpp=0.5, tiff_path=tmp_path / "b.tif", zarr_path=tmp_path / "b.zarr",
                          zarr_version="0.5") as out:
            out.write_band(band)
    assert listing(tmp_path) == []


def test_a_full_disk_fails_the_write_with_the_os_error_and_leaves_nothing(tmp_path):
    """The job path (TIFF + OME-Zarr): the kernel refuses a write (RLIMIT_FSIZE → EFBIG, the same path as ENOSPC)
    part-way through the TIFF; the error propagates as raised and neither output's temporary is left behind."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG from write() instead of being killed
        import numpy as np
        from writers.outputs import SlideOutputs
        rng = np.random.default_rng(0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, resource.RLIM_INFINITY))
        with SlideOutputs(width=2048, height=2048, mpp=0.5, tiff_path={str(tmp_path / 'f.tif')!r},
                          zarr_path={str(tmp_path / 'f.zarr')!r}, compression="zstd") as out:
            for y in range(0, 2048, 256):
                out.write_band(rng.integers(0, 256, (256, 2048, 3), dtype=np.uint8))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "OSError" in res.stderr and "File too large" in res.stderr, res.stderr[-2000:]
    assert listing(tmp_path) == []


def test_missing_rows_fail_on_exit_and_leave_nothing(tmp_path):
    img = he_like(H, W, seed=24, grain=0)
    with pytest.raises(ValueError, match="1000 of 1100 rows"):
        with SlideOutputs(width=W, height=H, mpp=0.5, tiff_path=tmp_path / "m.tif") as out:
            out.write_band(img[:1000])
    assert listing(tmp_path) == []


def test_decoder_bands_stream_into_outputs(tmp_path):
    """A linear stand-in decoder on a constant latent gives a constant slide (no seams) through the writer."""
    _decoder_into_outputs(tmp_path)


def _decoder_into_outputs(tmp_path):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 1)
    with torch.no_grad():
        conv.weight.mul_(0.1)

    def decode_fn(x):
        with torch.no_grad():
            return torch.sigmoid(torch.nn.functional.interpolate(conv(x), scale_factor=8, mode="bilinear"))

    latent = torch.full((1, 4, 75, 130), 0.3)  # 600 × 1040 px, not tile multiples
    dec = TiledDecoder(decode_fn, scale=8, tile=32, overlap=4, window="tukey", batch_size=3)
    path = tmp_path / "dec.tif"
    with SlideOutputs(width=1040, height=600, mpp=0.5, tiff_path=path, compression="zstd") as out:
        for band in dec.iter_bands(latent):
            out.write_band(band)
    with openslide.OpenSlide(str(path)) as s:
        got = np.asarray(s.read_region((0, 0), 0, (1040, 600)).convert("RGB"))
    assert (got == got[0, 0]).all()
    assert dec.decoder_calls == dec.count_tiles(75, 130)


def test_outputs_are_flushed_to_disk_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    import writers.atomic as atomic

    events = []
    real_fsync, real_syncfs = atomic.fsync_path, atomic.sync_filesystem

    def fsync_path(path):
        events.append(("fsync", Path(path).name, Path(path).exists()))
        real_fsync(path)

    def sync_filesystem(path):
        events.append(("syncfs", Path(path).name, Path(path).is_dir()))
        real_syncfs(path)

    monkeypatch.setattr(atomic, "fsync_path", fsync_path)
    monkeypatch.setattr(atomic, "sync_filesystem", sync_filesystem)
    img = he_like(H, W, seed=24, grain=0)
    folder = tmp_path / "out"
    folder.mkdir()
    tif, zpath = folder / "s.tif", folder / "s.zarr"
    with SlideOutputs(width=W, height=H, mpp=0.5, tiff_path=tif, zarr_path=zpath) as out:
        feed(out, img, [H])
        assert events == []
    kinds = [(kind, name.split(".partial")[0]) for kind, name, _ in events]
    # the TIFF itself, then its folder after the rename; the Zarr tree by its file system, then the folder
    assert kinds == [("fsync", ".s.tif"), ("fsync", "out"), ("syncfs", ".s.zarr"), ("fsync", "out")]
    assert all(ok for _, _, ok in events)


def test_a_failed_flush_fails_the_job_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import writers.atomic as atomic

    def broken(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(atomic, "sync_filesystem", broken)  # the Zarr (committed second) cannot be flushed
    img = he_like(H, W, seed=25, grain=0)
    tif, zpath = tmp_path / "s.tif", tmp_path / "s.zarr"
    with pytest.raises(OSError, match="Input/output error"):
        with SlideOutputs(width=W, height=H, mpp=0.5, tiff_path=tif, zarr_path=zpath) as out:
            feed(out, img, [H])
    assert listing(tmp_path) == []  # neither the committed TIFF nor any temporary is left


class TileCollector:
    """A toy format: every tile of every level, kept in memory (no file: ``path`` is None)."""

    path = None

    def start(self, target, layout):
        self.layout, self.tiles, self.aborted = layout, {}, False

    def encode_tile(self, level, ty, tx, tile):
        return tile.copy()

    def store_tile(self, level, ty, tx, encoded):
        self.tiles[level, ty, tx] = encoded

    def finish(self, thumbnail):
        self.thumbnail = thumbnail.copy()

    def abort(self):
        self.aborted = True


def test_a_new_format_is_a_new_sink_beside_the_tiff(tmp_path):
    """A sink defined here, plugged in beside the TIFF sink, gets exactly the tiles the TIFF stores."""
    img = he_like(H, W, seed=26)
    toy, tif = TileCollector(), tmp_path / "t.tif"
    with PyramidWriter(W, H, mpp=0.5, sinks=[TiffSink(tif, compression="zstd"), toy]) as w:
        feed(w, img, [300])
    assert listing(tmp_path) == ["t.tif"] and not toy.aborted
    t = toy.layout.tile
    with tifffile.TiffFile(tif) as tf:
        pages = [p for p in tf.pages if p.is_tiled]
        assert len(pages) == len(toy.layout.levels) == 2
        for lvl, page in enumerate(pages):
            rows, cols = toy.layout.grid[lvl]
            assert len(page.dataoffsets) == rows * cols
            assert sorted(k[1:] for k in toy.tiles if k[0] == lvl) == [(r, c) for r in range(rows) for c in range(cols)]
            level = page.asarray()
            for ty in range(rows):
                for tx in range(cols):
                    stored = pad_tile(level[ty * t:(ty + 1) * t, tx * t:(tx + 1) * t], t)  # as the TIFF holds it
                    assert np.array_equal(toy.tiles[lvl, ty, tx], stored), (lvl, ty, tx)
    assert np.array_equal(toy.thumbnail, w.thumbnail)


def test_a_failing_sink_aborts_every_output_and_a_writer_takes_tiles_or_bands(tmp_path):
    class Failing(TileCollector):
        def store_tile(self, level, ty, tx, encoded):
            if level == 1:
                raise OSError("sink full")

    img = he_like(H, W, seed=27, grain=0)
    failing = Failing()
    with pytest.raises(OSError, match="sink full"):
        with PyramidWriter(W, H, mpp=0.5, sinks=[TiffSink(tmp_path / "f.tif"), failing]) as w:
            feed(w, img, [H])
    assert listing(tmp_path) == [] and failing.aborted
    with pytest.raises(ValueError, match="fed bands; use write_band"):
        with PyramidWriter(W, H, mpp=0.5, sinks=[TiffSink(tmp_path / "m.tif")]) as w:
            w.write_band(img[:512])
            w.write_tile(1, 0, img[512:1024, :512])
    assert listing(tmp_path) == []
