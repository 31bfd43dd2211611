"""Image tiles for ``POST /embed`` and ``slidesynth embed``: format sniffing and header checks before decoding.

A tile is an RGB(A) or greyscale PNG, JPEG or TIFF. Its header is read first — format from the magic bytes,
width and height from the PNG IHDR chunk, the JPEG start-of-frame marker or the first TIFF page — so a file
declaring more pixels than allowed, or too small for the encoder, is refused without decompressing it (no
decompression bombs), as :mod:`service.masks` does for masks. Only then is it decoded to uint8 (H, W, 3):
greyscale repeated, alpha dropped, 16-bit samples scaled to 8.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

from service.masks import PNG_MAGIC, TIFF_MAGICS

JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers (baseline, extended, progressive, lossless, …): C0–CF except DHT, JPG and DAC
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class TileError(ValueError):
    """A tile that cannot be used; the message says why (the caller names the field)."""


@dataclass
class TileInfo:
    format: str  # "png" | "jpeg" | "tiff"
    width: int
    height: int


def inspect_tile(data: bytes, max_pixels: int) -> TileInfo:
    """Format and size from the header only; refuses non-images and tiles over ``max_pixels``."""
    if data.startswith(PNG_MAGIC):
        info = _inspect_png(data)
    elif data.startswith(JPEG_MAGIC):
        info = _inspect_jpeg(data)
    elif data[:4] in TIFF_MAGICS:
        info = _inspect_tiff(data)
    else:
        raise TileError("is not a PNG, JPEG or TIFF image")
    if info.width < 1 or info.height < 1:
        raise TileError("has no pixels")
    if info.width * info.height > max_pixels:
        raise TileError(f"declares {info.width}×{info.height} = {info.width * info.height} pixels, more than the "
                        f"limit of {max_pixels}")
    return info


def _inspect_png(data: bytes) -> TileInfo:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise TileError("is not a valid PNG (no IHDR)")
    width, height = struct.unpack(">II", data[16:24])
    return TileInfo("png", width, height)


def _inspect_jpeg(data: bytes) -> TileInfo:
    """Walk the marker segments to the first start-of-frame (bounded by the data; no pixel is decoded)."""
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise TileError("is not a valid JPEG (bad marker)")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # stand-alone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            break
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if length < 2:
            raise TileError("is not a valid JPEG (bad segment length)")
        if marker in _SOF:
            if i + 9 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return TileInfo("jpeg", width, height)
        i += 2 + length
    raise TileError("is not a valid JPEG (no frame header)")


def _inspect_tiff(data: bytes) -> TileInfo:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            width, height, samples = page.imagewidth, page.imagelength, page.samplesperpixel
            if page.imagedepth > 1:
                raise TileError("must be a 2-D image, this TIFF is a volume")
            if samples not in (1, 2, 3, 4):
                raise TileError(f"must be greyscale or RGB(A); this TIFF has {samples} samples per pixel")
            if page.dtype is None or page.dtype.kind not in "u" or page.dtype.itemsize > 2:
                raise TileError(f"must hold 8- or 16-bit unsigned samples, not {page.dtype}")
    except TileError:
        raise
    except Exception as exc:  # tifffile raises several types for corrupt files
        raise TileError(f"is not a readable TIFF ({exc})") from exc
    return TileInfo("tiff", width, height)


def decode_tile(data: bytes, info: TileInfo) -> np.ndarray:
    """Decode to uint8 (H, W, 3) RGB; call only after :func:`inspect_tile`."""
    if info.format in ("png", "jpeg"):
        from PIL import Image

        fmt = "PNG" if info.format == "png" else "JPEG"
        try:  # our header check has bounded the pixel count; Pillow's bomb limit stays as it is
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                if im.size != (info.width, info.height):
                    raise TileError(f"decodes to {im.size[0]}×{im.size[1]} px, its header said "
                                    f"{info.width}×{info.height}")
                arr = _to_rgb8(np.asarray(im.convert("RGB") if im.mode in ("P", "PA", "CMYK", "YCbCr", "LA", "1")
                                          else im))
        except Image.DecompressionBombError as exc:
            raise TileError(f"is too large to decode safely ({exc})") from exc
        except OSError as exc:
            raise TileError(f"is not a readable {fmt} ({exc})") from exc
        except ValueError as exc:  # Pillow: a compressed iCCP/zTXt/iTXt chunk over its 1 MB limit, …
            raise TileError(f"is not a {fmt} this service reads ({exc})") from exc
    else:
        import tifffile

        try:
            arr = tifffile.imread(io.BytesIO(data), key=0)
        except Exception as exc:  # corrupt strips/tiles raise codec-specific errors
            raise TileError(f"is not a readable TIFF ({exc.__class__.__name__}: {exc})") from exc
        arr = _to_rgb8(arr)
    if arr.shape[:2] != (info.height, info.width):
        raise TileError(f"decodes to {arr.shape[1]}×{arr.shape[0]} px, its header said {info.width}×{info.height}")
    return arr


def _to_rgb8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16 or (arr.dtype.kind in "ui" and arr.dtype.itemsize == 2):
        arr = (arr.astype(np.uint32) * 255 + 32767) // 65535   # full scale to full scale, rounded
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind in "iu" and arr.dtype.itemsize > 2:  # PIL's 32-bit integer mode "I"
        arr = np.clip(arr, 0, 65535).astype(np.uint32) * 255 // 65535
    arr = arr.astype(np.uint8, copy=False)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] in (1, 2):          # grey, grey + alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] >= 3:               # RGB, RGBA: alpha dropped
        arr = arr[:, :, :3]
    else:
        raise TileError(f"is not a 2-D image (decoded shape {arr.shape})")
    return np.ascontiguousarray(arr)


def read_tile(data: bytes, max_pixels: int, min_side: int) -> np.ndarray:
    """Header check (format, pixel limit, the encoder's minimum side), then decode: the one path of the API
    and the command."""
    from models.encoders.preprocess import TileSizeError, check_tile_size

    info = inspect_tile(data, max_pixels)
    try:
        check_tile_size(info.width, info.height, min_side)
    except TileSizeError as exc:
        raise TileError(str(exc)) from None
    return decode_tile(data, info)
