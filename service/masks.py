"""Label-mask uploads: format sniffing and header checks *before* any pixel is decoded.

A mask is a single-channel PNG or TIFF whose pixel values are class indices. The header is read first
so that a file declaring more pixels than allowed is refused without decompressing it (no bombs).
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class MaskError(ValueError):
    """A mask that cannot be used; the message says why."""


@dataclass
class MaskInfo:
    format: str  # "png" | "tiff"
    width: int
    height: int
    mpp: float | None  # from TIFF resolution tags when present


def inspect_mask(data: bytes, max_pixels: int) -> MaskInfo:
    """Check format, channel count and pixel count from the header only."""
    if data.startswith(PNG_MAGIC):
        info = _inspect_png(data)
    elif data[:4] in TIFF_MAGICS:
        info = _inspect_tiff(data)
    else:
        raise MaskError("must be a PNG or TIFF file")
    if info.width < 1 or info.height < 1:
        raise MaskError("has no pixels")
    if info.width * info.height > max_pixels:
        raise MaskError(
            f"declares {info.width}×{info.height} = {info.width * info.height} pixels, "
            f"more than the limit of {max_pixels}"
        )
    return info


def _inspect_png(data: bytes) -> MaskInfo:
    # IHDR is always the first chunk: length(4) 'IHDR'(4) width(4) height(4) depth(1) colour type(1) …
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise MaskError("is not a valid PNG (no IHDR)")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if colour not in (0, 3):  # 0 greyscale, 3 palette (indices); 2/4/6 carry several channels
        channels = {2: 3, 4: 2, 6: 4}.get(colour, "several")
        raise MaskError(f"must have one channel (class indices); this PNG has {channels}")
    if depth > 8 and colour == 0 and depth != 16:
        raise MaskError(f"has an unsupported bit depth {depth}")
    return MaskInfo("png", width, height, None)


def _inspect_tiff(data: bytes) -> MaskInfo:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            samples = page.samplesperpixel
            width, height = page.imagewidth, page.imagelength
            mpp = _tiff_mpp(page)
            if samples != 1 or page.imagedepth > 1:
                raise MaskError(f"must have one channel (class indices); this TIFF has {samples}")
            if page.dtype is None or page.dtype.kind not in "ui":
                raise MaskError(f"must hold integer class indices, not {page.dtype}")
    except MaskError:
        raise
    except Exception as exc:  # tifffile raises several types for corrupt files
        raise MaskError(f"is not a readable TIFF ({exc})") from exc
    return MaskInfo("tiff", width, height, mpp)


def _tiff_mpp(page) -> float | None:
    try:
        tags = page.tags
        if "XResolution" not in tags:
            return None
        num, den = tags["XResolution"].value
        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
        if not num or not den:
            return None
        px_per_unit = num / den
        per_unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit))
        return per_unit_um / px_per_unit if per_unit_um else None
    except Exception:
        return None


def decode_mask(data: bytes, info: MaskInfo) -> np.ndarray:
    """Decode to a ``uint8`` (H, W) label array; call only after :func:`inspect_mask`."""
    if info.format == "png":
        from PIL import Image

        # Our own header check has bounded the pixel count; Pillow's global bomb limit stays as it is.
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                if im.mode not in ("L", "P", "I;16", "I", "1"):
                    raise MaskError(f"must have one channel (class indices); PNG mode is {im.mode}")
                arr = np.asarray(im)
        except Image.DecompressionBombError as exc:
            raise MaskError(f"is too large to decode safely ({exc})") from exc
        except OSError as exc:
            raise MaskError(f"is not a readable PNG ({exc})") from exc
        except ValueError as exc:  # Pillow: a compressed iCCP/zTXt/iTXt chunk over its 1 MB limit, …
            raise MaskError(f"is not a PNG this service reads ({exc})") from exc
    else:
        import tifffile

        try:
            arr = tifffile.imread(io.BytesIO(data), key=0)
        except Exception as exc:  # corrupt strips/tiles raise codec-specific errors
            raise MaskError(f"is not a readable TIFF ({exc.__class__.__name__}: {exc})") from exc
    while arr.ndim > 2 and 1 in (arr.shape[0], arr.shape[-1]):  # single-sample axes, never 1-px rows/columns
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    if arr.ndim != 2:
        raise MaskError(f"must be a 2-D single-channel image, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise MaskError(f"class values must be in 0..255, found {int(arr.min())}..{int(arr.max())}")
    return np.ascontiguousarray(arr.astype(np.uint8))


def encode_png(labels: np.ndarray) -> bytes:
    """Canonical storage of an accepted mask: 8-bit greyscale PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(labels, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
