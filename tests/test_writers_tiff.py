"""Pyramidal BigTIFF writer: what OpenSlide, tiffslide, tifffile and libvips see, exactness, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from tests.slide_helpers import he_like, iter_tiles, listing, psnr, reference_pyramid
from writers.pyramid import pad_tile
from writers.tiff import PyramidTiffWriter

W, H = 5000, 3001  # odd, not a tile multiple; 3 levels: 5000, 2500, 1250, then 625 < 1024
META = {"model": "diffinfinite-10class", "seed": 1234, "parameters": {"steps": 50, "cfg": 3.0}}


@pytest.fixture(scope="module")
def image():
    return he_like(H, W, seed=7)


@pytest.fixture(scope="module")
def reference(image):
    return reference_pyramid(image)


def write(path, img, **kw):
    with PyramidTiffWriter(path, img.shape[1], img.shape[0], mpp=kw.pop("mpp", 0.5), metadata=META, **kw) as w:
        for ty, tx, t in iter_tiles(img, w.cascade.tile):
            w.write_tile(ty, tx, t)
    return w


@pytest.fixture(scope="module")
def lossless_tiff(tmp_path_factory, image):
    path = tmp_path_factory.mktemp("lossless") / "slide.tif"
    w = write(path, image, compression="zstd")
    return path, w


@pytest.fixture(scope="module")
def jpeg_image():
    return he_like(1537, 2049, seed=8)  # 3 levels; the last tile column and row are 1 px wide


@pytest.fixture(scope="module")
def jpeg_tiff(tmp_path_factory, jpeg_image):
    path = tmp_path_factory.mktemp("jpeg") / "slide.tif"
    w = write(path, jpeg_image)  # defaults: JPEG Q90 4:2:0, 512-px tiles
    return path, w


def test_openslide_levels_mpp_and_exact_pixels(lossless_tiff, reference):
    path, _ = lossless_tiff
    assert len(reference) == 4 and reference[-1].shape[:2] == (375, 625)
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_count == len(reference)
        assert s.level_dimensions == tuple((r.shape[1], r.shape[0]) for r in reference)
        for lvl, ref in enumerate(reference):
            assert s.level_downsamples[lvl] == pytest.approx((H / ref.shape[0] + W / ref.shape[1]) / 2)
        assert float(s.properties["openslide.mpp-x"]) == 0.5
        assert float(s.properties["openslide.mpp-y"]) == 0.5
        desc = s.properties["tiff.ImageDescription"]
        assert desc.startswith("SYNTHETIC")
        meta = json.loads(desc.splitlines()[-1])
        assert meta["synthetic"] is True and meta["model"] == META["model"] and meta["seed"] == 1234
        assert meta["parameters"] == META["parameters"]
        for lvl, ref in enumerate(reference):
            got = np.asarray(s.read_region((0, 0), lvl, (ref.shape[1], ref.shape[0])).convert("RGB"))
            assert np.array_equal(got, ref), f"level {lvl} differs"
        # a region straddling tile borders at a non-aligned spot (level 0: no fractional resampling)
        got = np.asarray(s.read_region((1001, 2407), 0, (300, 200)).convert("RGB"))
        assert np.array_equal(got, reference[0][2407:2607, 1001:1301])


def test_tiffslide_and_tifffile_see_the_same_pyramid(lossless_tiff, reference):
    path, w = lossless_tiff
    with tiffslide.TiffSlide(path) as s:
        assert s.level_count == len(reference)
        assert s.level_dimensions == tuple((r.shape[1], r.shape[0]) for r in reference)
        assert s.level_downsamples == pytest.approx([2.0 ** lvl for lvl in range(len(reference))], rel=1e-3)
        assert s.properties["tiffslide.mpp-x"] == pytest.approx(0.5)
        assert s.properties["tiffslide.mpp-y"] == pytest.approx(0.5)
        for lvl, ref in enumerate(reference):
            got = np.asarray(s.read_region((0, 0), lvl, (ref.shape[1], ref.shape[0])).convert("RGB"))
            assert np.array_equal(got, ref), f"tiffslide level {lvl} differs"
    with tifffile.TiffFile(path) as tf:
        assert tf.is_bigtiff
        pages = tf.pages
        assert len(pages) == len(reference) + 1  # levels + stripped thumbnail
        for lvl in range(len(reference)):
            p = pages[lvl]
            assert p.is_tiled and (p.tilewidth, p.tilelength) == (512, 512)
            assert p.tags["NewSubfileType"].value == (0 if lvl == 0 else 1)
            assert p.tags["ResolutionUnit"].value == 3  # centimetre
            num, den = p.tags["XResolution"].value
            assert num / den == pytest.approx(20000 / 2 ** lvl)
            assert p.compression == 50000 and p.predictor == 2
        thumb = pages[-1]
        assert not thumb.is_tiled and thumb.tags["NewSubfileType"].value == 1
        assert np.array_equal(thumb.asarray(), reference[-1])
        assert len(tf.series[0].levels) == len(reference)
    assert np.array_equal(w.thumbnail, reference[-1]) and max(w.thumbnail.shape[:2]) <= 1024


def test_jpeg_q90_420_tiles_and_psnr(jpeg_tiff, jpeg_image):
    path, _ = jpeg_tiff
    image = jpeg_image
    reference = reference_pyramid(image)
    assert len(reference) == 3
    with tifffile.TiffFile(path) as tf:
        p0 = tf.pages[0]
        assert p0.compression == 7 and p0.photometric == 6  # JPEG, YCbCr
        assert p0.tags["YCbCrSubSampling"].value == (2, 2)
        # the stored tile is exactly libjpeg-turbo's quality-90 4:2:0 encoding of the (edge-padded) tile
        fh = tf.filehandle
        last = len(p0.dataoffsets) - 1  # bottom-right edge tile: padded by edge replication
        for idx, (ty, tx) in ((0, (0, 0)), (last, (3, 4))):
            fh.seek(p0.dataoffsets[idx])
            stored = fh.read(p0.databytecounts[idx])
            tile = image[ty * 512:(ty + 1) * 512, tx * 512:(tx + 1) * 512]
            assert stored == imagecodecs.jpeg8_encode(pad_tile(tile, 512), level=90, subsampling="420")
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_count == len(reference)
        assert float(s.properties["openslide.mpp-x"]) == 0.5
        for lvl, ref in enumerate(reference):
            got = np.asarray(s.read_region((0, 0), lvl, (ref.shape[1], ref.shape[0])).convert("RGB"))
            assert psnr(got, ref) > 40.0, f"level {lvl}: PSNR {psnr(got, ref):.1f} dB"


def test_libvips_reads_every_level(jpeg_tiff, jpeg_image):
    pyvips = pytest.importorskip("pyvips")
    path, _ = jpeg_tiff
    reference = reference_pyramid(jpeg_image)
    for lvl, ref in enumerate(reference):
        im = pyvips.Image.new_from_file(str(path), page=lvl)
        arr = np.ndarray(buffer=im.write_to_memory(), dtype=np.uint8, shape=(im.height, im.width, im.bands))
        assert arr.shape == ref.shape and psnr(arr, ref) > 40.0


def test_deflate_is_lossless_and_other_mpp(tmp_path):
    img = he_like(1100, 700, seed=3)
    path = tmp_path / "z.tif"
    write(path, img, compression="deflate", mpp=0.25, tile=256)
    ref = reference_pyramid(img)
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_count == 2 and float(s.properties["openslide.mpp-x"]) == 0.25
        for lvl, r in enumerate(ref):
            got = np.asarray(s.read_region((0, 0), lvl, (r.shape[1], r.shape[0])).convert("RGB"))
            assert np.array_equal(got, r)


def test_single_level_small_slide(tmp_path):
    img = he_like(300, 1000, seed=4)
    path = tmp_path / "small.tif"
    w = write(path, img, compression="deflate")
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_count == 1 and s.dimensions == (1000, 300)
        assert np.array_equal(np.asarray(s.read_region((0, 0), 0, (1000, 300)).convert("RGB")), img)
    assert np.array_equal(w.thumbnail, img)


def test_copied_tiles_may_be_reused_at_once_and_lent_tiles_give_the_same_file(tmp_path, jpeg_image):
    """copy=True (default) owns a copy before write_tile returns: a caller that scribbles over its one tile
    buffer right after each call gets the same bytes as one passing views; copy=False (lent views, encoded
    straight from the caller's array; edge tiles still padded) gives the same bytes too."""
    img = jpeg_image
    h, w = img.shape[:2]
    files = {}
    for mode in ("views", "reused-buffer", "lent"):
        path = tmp_path / f"{mode}.tif"
        buffer = np.empty((512, 512, 3), np.uint8)
        with PyramidTiffWriter(path, w, h, mpp=0.5, metadata=META) as wr:
            shared = {}  # per level-0 tile: was the caller's array handed to the encoder as it is?
            encode = wr.sinks[0].encode_tile
            wr.sinks[0].encode_tile = lambda lvl, ty, tx, a: (
                shared.update({(ty, tx): np.shares_memory(a, img)}) if lvl == 0 else None, encode(lvl, ty, tx, a))[1]
            for ty, tx, t in iter_tiles(img):
                if mode == "reused-buffer":
                    tile = buffer[:t.shape[0], :t.shape[1]]
                    tile[...] = t
                    wr.write_tile(ty, tx, tile)
                    buffer[...] = 0  # the writer must not see this
                else:
                    wr.write_tile(ty, tx, t, copy=mode == "views")
        files[mode] = path.read_bytes()
        full = [t.shape[:2] == (512, 512) for _, _, t in iter_tiles(img)]
        assert [shared[ty, tx] for ty, tx, _ in iter_tiles(img)] == (
            full if mode == "lent" else [False] * len(full)), mode  # edge tiles: padded copies
    assert files["reused-buffer"] == files["views"]
    assert files["lent"] == files["views"]
    with openslide.OpenSlide(str(tmp_path / "lent.tif")) as s:
        got = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
    assert psnr(got, img) > 40


@pytest.mark.parametrize("case", ["shape", "dtype", "order", "channels"])
def test_bad_tile_names_the_tile_and_leaves_nothing(tmp_path, case):
    img = he_like(1200, 1100, seed=5, grain=0)
    w = PyramidTiffWriter(tmp_path / "bad.tif", 1100, 1200, mpp=0.5)
    w.write_tile(0, 0, img[:512, :512])
    bad = {"shape": (0, 1, img[:500, 512:1024]),
           "dtype": (0, 1, img[:512, 512:1024].astype(np.float32)),
           "order": (1, 0, img[512:1024, :512]),
           "channels": (0, 1, img[:512, 512:1024, :2])}[case]
    with pytest.raises(ValueError) as err:
        w.write_tile(*bad)
    msg = str(err.value)
    assert f"tile ({bad[0]}, {bad[1]})" in msg
    assert {"shape": "shape", "dtype": "dtype", "order": "out of order", "channels": "shape"}[case] in msg
    assert listing(tmp_path) == []
    with pytest.raises(ValueError, match="already aborted"):
        w.write_tile(0, 1, img[:512, 512:1024])


def test_exception_in_block_and_incomplete_slide_leave_nothing(tmp_path):
    img = he_like(600, 600, seed=6, grain=0)
    with pytest.raises(RuntimeError, match="boom"):
        with PyramidTiffWriter(tmp_path / "x.tif", 600, 600, mpp=0.5) as w:
            w.write_tile(0, 0, img[:512, :512])
            raise RuntimeError("boom")
    assert listing(tmp_path) == []
    with pytest.raises(ValueError, match="incomplete"):
        with PyramidTiffWriter(tmp_path / "y.tif", 600, 600, mpp=0.5) as w:
            w.write_tile(0, 0, img[:512, :512])
    assert listing(tmp_path) == []


@pytest.mark.parametrize("codec", ["webp", "jpeg2000"])
def test_refuses_codecs_openslide_cannot_read(tmp_path, codec):
    with pytest.raises(ValueError, match="OpenSlide"):
        PyramidTiffWriter(tmp_path / "w.tif", 100, 100, mpp=0.5, compression=codec)
    assert listing(tmp_path) == []


def test_disk_full_fails_with_the_os_error_and_removes_the_temp_file(tmp_path):
    """A real write failure from the kernel: the file-size limit (RLIMIT_FSIZE) stops the writer mid-file."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parents[1])!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG from write() instead of being killed
        import numpy as np
        from writers.tiff import PyramidTiffWriter
        rng = np.random.default_rng(0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, resource.RLIM_INFINITY))
        with PyramidTiffWriter({str(tmp_path / 'full.tif')!r}, 4096, 2048, mpp=0.5, compression="zstd") as w:
            for ty in range(4):
                for tx in range(8):
                    w.write_tile(ty, tx, rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "OSError" in res.stderr and "File too large" in res.stderr, res.stderr[-2000:]
    assert listing(tmp_path) == []


def test_same_input_gives_byte_identical_files(tmp_path):
    """Tiles are appended in submission order whatever the encode threads' timing: deterministic bytes."""
    img = he_like(1300, 1100, seed=9)
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    write(a, img, workers=2)
    write(b, img, workers=3)
    assert a.read_bytes() == b.read_bytes()


def test_downsample_into_buffer_views_matches_the_allocating_path():
    from writers.pyramid import downsample2x

    rng = np.random.default_rng(3)
    for shape in [(512, 512, 3), (301, 77, 3), (64, 64, 1)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = downsample2x(img)
        h, w = shape[0] // 2, shape[1] // 2
        row = np.zeros((h + 3, w + 10, shape[2]), np.uint8)
        out = row[1:1 + h, 5:5 + w]  # a strided view, like a slice of a level's row buffer
        assert downsample2x(img, out=out) is out
        np.testing.assert_array_equal(out, expected)
        assert row[0].sum() == 0 and row[:, :5].sum() == 0  # nothing written outside the view
    a, b, c, d = (rng.integers(0, 256, (8, 8, 3)).astype(np.int32) for _ in range(4))
    img = np.zeros((16, 16, 3), np.uint8)
    img[0::2, 0::2], img[0::2, 1::2], img[1::2, 0::2], img[1::2, 1::2] = a, b, c, d
    np.testing.assert_array_equal(downsample2x(img), (a + b + c + d + 2) >> 2)
    with pytest.raises(ValueError, match="out has shape"):
        downsample2x(img, out=np.zeros((4, 8, 3), np.uint8))


def test_tile_buffers_are_reused_only_after_every_user_released_them():
    from writers.writer import TileBuffers

    pool = TileBuffers(8)
    tile = np.full((5, 3, 3), 7, np.uint8)
    first, release = pool.padded(tile, users=2)
    assert first.shape == (8, 8, 3) and (first == 7).all()  # edge padding replicates the border
    release()
    second, release2 = pool.padded(tile)
    assert second is not first  # one user still holds the first buffer
    release()
    third, _ = pool.padded(np.zeros((8, 8, 3), np.uint8))
    assert third is first and not third.any() and pool.allocated == 2
    release2()


@pytest.mark.parametrize("view", ["channels reversed", "transposed"])
def test_lent_views_the_encoder_cannot_read_in_place_are_copied(tmp_path, view):
    """copy=False with views whose rows are not one run of memory: the same file as copying them."""
    img = he_like(1024, 1024, seed=11)
    src = np.ascontiguousarray(img[..., ::-1]) if view == "channels reversed" else np.ascontiguousarray(
        img.transpose(1, 0, 2))
    lent = src[..., ::-1] if view == "channels reversed" else src.transpose(1, 0, 2)  # == img, other layout
    assert np.array_equal(lent, img)
    for name, copy in (("copied.tif", True), ("lent.tif", False)):
        with PyramidTiffWriter(tmp_path / name, 1024, 1024, mpp=0.5, metadata=META) as w:
            for ty, tx, t in iter_tiles(lent):
                w.write_tile(ty, tx, t, copy=copy)
    assert (tmp_path / "lent.tif").read_bytes() == (tmp_path / "copied.tif").read_bytes()


def test_an_encode_failure_names_the_tile_and_leaves_nothing(tmp_path):
    img = he_like(1024, 1024, seed=12)
    w = PyramidTiffWriter(tmp_path / "x.tif", 1024, 1024, mpp=0.5, workers=1)
    encode = w.sinks[0].encode
    calls = []

    def failing(tile):
        calls.append(1)
        if len(calls) == 3:  # level 0, tile (1, 0)
            raise MemoryError("no memory for the encoder")
        return encode(tile)

    w.sinks[0].encode = failing
    with pytest.raises(RuntimeError, match=r"TIFF level 0 tile \(1, 0\): jpeg encoding failed: no memory"):
        with w:
            for ty, tx, t in iter_tiles(img):
                w.write_tile(ty, tx, t)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("size,tile_px", [((8, 8), 256), ((100, 64), 256), ((128, 128), 256), ((129, 40), 512)])
def test_a_tiny_slide_gets_tiles_libvips_accepts(tmp_path, size, tile_px):
    """libvips refuses tiles longer than twice the longest side rounded up to 256 px ('tile size out of
    range'): a slide of at most 128 px is written with 256-px tiles, fed and read as before."""
    pyvips = pytest.importorskip("pyvips")
    w_px, h_px = size
    img = he_like(h_px, w_px, seed=13)
    path = tmp_path / "tiny.tif"
    w = write(path, img, compression="deflate")
    assert w.cascade.tile == tile_px
    with tifffile.TiffFile(path) as tf:
        assert tf.pages[0].tilewidth == tf.pages[0].tilelength == tile_px
    im = pyvips.Image.new_from_file(str(path), page=0, fail_on="warning")
    got = np.ndarray(buffer=im.write_to_memory(), dtype=np.uint8, shape=(im.height, im.width, im.bands))
    assert np.array_equal(got, img)
    with openslide.OpenSlide(str(path)) as s:
        assert np.array_equal(np.asarray(s.read_region((0, 0), 0, size).convert("RGB")), img)


def test_resolution_tags_keep_the_mpp():
    """X/YResolution are the closest RATIONAL with 32-bit terms: relative error ~1e-13, not ~1e-5."""
    from writers.tiff import resolution_px_per_cm

    rng = np.random.default_rng(0)
    for mpp in [0.123456789, 0.0515146, 0.25, 1 / 3] + list(rng.uniform(0.05, 100, 2000)):
        for level in (0, 5):
            n, d = resolution_px_per_cm(float(mpp), 2 ** level)
            assert 0 < n < 2 ** 32 and 0 < d < 2 ** 32
            assert abs(1e4 / (n / d) / 2 ** level - mpp) <= 1e-11 * mpp, (mpp, level, n, d)


@pytest.mark.parametrize("size", [(8, 16384), (5000, 3)])
def test_a_narrow_slide_is_reduced_below_1024_px(tmp_path, size):
    """A side that reaches 1 px stays 1 px while the other is still halved (8 × 16384 → … → 1 × 512)."""
    w_px, h_px = size
    img = he_like(h_px, w_px, seed=14)
    path = tmp_path / "narrow.tif"
    w = write(path, img, compression="deflate")
    ref = reference_pyramid(img)
    assert max(ref[-1].shape[:2]) < 1024 and [lv[::-1] for lv in w.levels] == [r.shape[:2] for r in ref]
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_count == len(ref)
        for lvl, r in enumerate(ref):
            got = np.asarray(s.read_region((0, 0), lvl, (r.shape[1], r.shape[0])).convert("RGB"))
            assert np.array_equal(got, r), lvl
    # pixel size per axis: a 1-px side is not halved, so its µm/px stops doubling (TIFF tags and NGFF scales)
    from writers.zarr import ngff_multiscale

    def expected_um(sides: list[int], lvl: int) -> float:
        first_1px = next((i for i, side in enumerate(sides) if side == 1), len(sides))
        return 0.5 * 2 ** min(lvl, first_1px)

    widths, heights = [lv[0] for lv in w.levels], [lv[1] for lv in w.levels]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ngff_multiscale(w.levels, 0.5, "0.4")["datasets"]]
    with tifffile.TiffFile(path) as tf:
        pages = [p for p in tf.pages if p.is_tiled]
        assert len(pages) == len(w.levels)
        for lvl, page in enumerate(pages):
            for tag, sides, axis in (("XResolution", widths, 2), ("YResolution", heights, 1)):
                n, d = page.tags[tag].value
                assert 1e4 * d / n == pytest.approx(expected_um(sides, lvl), rel=1e-9), (lvl, tag)
                assert scales[lvl][axis] == pytest.approx(expected_um(sides, lvl), rel=1e-12), (lvl, axis)
    assert min(widths + heights) == 1  # the case under test


@pytest.fixture
def opencv_threads():
    """OpenCV set to 3 threads (a value no writer sets) with no writer holding it serial; restored after."""
    import gc

    import cv2

    from writers.writer import SerialOpenCV

    gc.collect()  # writers earlier tests dropped give their holds back
    assert SerialOpenCV._holders == 0, "an earlier test left a writer open"
    before = cv2.getNumThreads()
    cv2.setNumThreads(3)
    yield
    cv2.setNumThreads(before)


def test_writers_run_opencv_serially_while_open_and_restore_its_threads(tmp_path, opencv_threads):
    """The cascade's resizes run on the feeding thread while the encode threads hold the cores: OpenCV's own
    pool is off while any writer is open (nested writers included) and comes back after the last one."""
    import cv2

    from writers.outputs import SlideOutputs
    from writers.zarr import OmeZarrWriter

    img = he_like(600, 700, seed=9, grain=0)
    a = PyramidTiffWriter(tmp_path / "a.tif", 700, 600, mpp=0.5)
    assert cv2.getNumThreads() == 1  # what OpenCV reports once threading is off (setNumThreads(0))
    with OmeZarrWriter(tmp_path / "b.zarr", 700, 600, mpp=0.5) as b:
        for ty, tx, tile in iter_tiles(img, 512):
            b.write_tile(ty, tx, tile)
    assert cv2.getNumThreads() == 1  # a is still open
    for ty, tx, tile in iter_tiles(img, 512):
        a.write_tile(ty, tx, tile)
    a.close()
    assert cv2.getNumThreads() == 3
    with pytest.raises(ValueError, match="shape"):
        with PyramidTiffWriter(tmp_path / "c.tif", 700, 600, mpp=0.5) as c:
            c.write_tile(0, 0, img[:10, :10])  # aborts
    assert cv2.getNumThreads() == 3
    with SlideOutputs(700, 600, mpp=0.5, tiff_path=tmp_path / "d.tif") as d:
        assert cv2.getNumThreads() == 1
        d.write_band(img)
    assert cv2.getNumThreads() == 3
    with pytest.raises(ValueError, match="incomplete"):
        with SlideOutputs(700, 600, mpp=0.5, tiff_path=tmp_path / "e.tif") as e:
            e.write_band(img[:100])
    assert cv2.getNumThreads() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.zarr", "d.tif"]


def test_the_opencv_hold_is_given_back_by_dropped_writers_and_failing_aborts(tmp_path, monkeypatch, opencv_threads):
    """A writer that is never closed gives its hold back when it is garbage-collected; an abort whose cleanup
    raises still gives it back and removes the temporary file; so does a constructor whose file cannot be
    created."""
    import gc

    import cv2

    from writers.outputs import SlideOutputs
    from writers.writer import SerialOpenCV

    w = PyramidTiffWriter(tmp_path / "dropped.tif", 100, 100, mpp=0.5)
    assert cv2.getNumThreads() == 1
    w.pool.shutdown()
    del w
    gc.collect()
    assert SerialOpenCV._holders == 0 and cv2.getNumThreads() == 3

    out = SlideOutputs(100, 100, mpp=0.5, tiff_path=tmp_path / "e.tif")

    def failing_abort():
        raise RuntimeError("abort failed")

    monkeypatch.setattr(out.sinks[0], "abort", failing_abort)
    with pytest.raises(RuntimeError, match="abort failed"):
        with out:
            out.write_band(np.zeros((10, 100, 3), np.uint8))
            raise KeyError("the job failed")
    assert SerialOpenCV._holders == 0 and cv2.getNumThreads() == 3
    assert not (tmp_path / "e.tif").exists()

    with pytest.raises(OSError):
        PyramidTiffWriter(tmp_path / "no-such-folder" / "x.tif", 100, 100, mpp=0.5)
    assert SerialOpenCV._holders == 0 and cv2.getNumThreads() == 3
    # nothing else is left (a dropped writer, never closed or aborted, does keep its partial file)
    assert [p.name for p in tmp_path.iterdir() if "dropped" not in p.name] == []
