"""Training data for DiffInfinite: (image, label mask) pairs from tile folders or whole slides.

Sources
-------
*Tile folder* (``--tiles DIR``): every image file under DIR (png, jpg, jpeg, tif, tiff, bmp, webp) whose
stem does not end in ``_mask`` is a tile. ``<stem>_mask.png`` (any of the image extensions) next to it is
its label mask: same size, one channel, pixel value = class id (0 = unknown / not annotated). Tiles without
a mask are unlabelled. Tiles are taken to be at the model's native µm/px; larger tiles are randomly cropped.

*Whole slides* (``--slides DIR``): every file OpenSlide can read (svs, tif, tiff, ndpi, mrxs, scn, bif,
svslide, vms, vmu) whose stem does not end in ``_mask``. ``<stem>_mask.png`` is a label-mask image covering
the whole slide at any resolution (its aspect ratio must match the slide's). Regions are read at the
target µm/px (slide MPP from the OpenSlide properties or ``slide_mpp``) and resized to the tile size;
unlabelled regions are drawn from tissue (a thumbnail threshold), labelled ones around pixels of the
chosen class.

*Subtypes* (mask model): ``subtypes.csv`` at the root of either folder, lines ``<stem or relative path>,
<subtype>`` where subtype is 0 / 1 or a name (``adenocarcinoma``, ``squamous``…); or a first-level sub-folder
named after the subtype (``adenocarcinoma/…``, ``squamous/…``, ``0/…``, ``1/…``).

Sampling (Algorithm 1 and the official class-balanced sampler)
--------------------------------------------------------------
Image model, per sample: with probability ``p_unc`` an unconditional sample (an unlabelled tile or slide
region, or — when there is no unlabelled data — a labelled one) with an all-zero mask; otherwise a class c is
drawn uniformly among the classes present in the labelled data, then a source containing c, and the mask is
``c`` where the labels equal c and 0 elsewhere (single-class binary mask, as the network is trained). Same
random flips / rot90 for image and mask. The mask model samples labelled sources with a known subtype and
returns the full label map at 1/``mask_downsample`` resolution (nearest, top-left pixel of each block).

Every sample is a pure function of (seed, index): a DataLoader over consecutive indices is deterministic and
resumable, with any number of workers. ``holdout`` splits *sources* (tiles grouped by their folder, slides)
before any bucketing, so no image appears in both splits (reference §14 #9).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from models.diffinfinite.mask_unet import SUBTYPES

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SLIDE_EXTS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".svslide", ".vms", ".vmu")
MASK_SUFFIX = "_mask"
SUBTYPES_CSV = "subtypes.csv"

Image.MAX_IMAGE_PIXELS = None  # label masks of whole slides can be large


class DataError(ValueError):
    """Training data that cannot be used as given."""


def parse_subtype(value: str, where: str) -> int:
    v = str(value).strip().lower()
    if v in ("0", "1"):
        return int(v)
    for i, name in SUBTYPES.items():
        if v == name or (len(v) >= 4 and name.startswith(v)) or v.replace("_", " ") == name:
            return i
    if v.startswith("squam") or v in ("scc", "lusc"):
        return 1
    if v.startswith("adeno") or v in ("luad",):
        return 0
    raise DataError(f"{where}: unknown subtype {value!r}; use 0 / adenocarcinoma or 1 / squamous cell carcinoma")


def _read_subtypes_csv(root: Path) -> dict[str, int]:
    path = root / SUBTYPES_CSV
    if not path.is_file():
        return {}
    out: dict[str, int] = {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or row[0].strip().startswith("#"):
                continue
            if len(row) < 2:
                raise DataError(f"{path}:{n}: expected '<name>,<subtype>', got {row}")
            if n == 1 and row[1].strip().lower() in ("subtype", "label", "class"):
                continue  # header
            out[row[0].strip()] = parse_subtype(row[1], f"{path}:{n}")
    return out


def _subtype_for(path: Path, root: Path, table: dict[str, int]) -> int | None:
    rel = path.relative_to(root)
    for key in (rel.as_posix(), rel.with_suffix("").as_posix(), path.name, path.stem):
        if key in table:
            return table[key]
    if len(rel.parts) > 1:
        try:
            return parse_subtype(rel.parts[0], str(path))
        except DataError:
            return None
    return None


def _find_mask(path: Path) -> Path | None:
    for ext in IMAGE_EXTS:
        cand = path.with_name(path.stem + MASK_SUFFIX + ext)
        if cand.is_file():
            return cand
    return None


@dataclass
class TileRecord:
    image: Path
    mask: Path | None
    subtype: int | None
    group: str
    classes: tuple[int, ...] = ()


@dataclass
class SlideRecord:
    slide: Path
    mask: Path | None
    subtype: int | None
    classes: tuple[int, ...] = ()


Relabel = tuple[tuple[int, int], ...]  # (from, to) pairs applied to label masks as they are read


def parse_relabel(text: str | None) -> Relabel:
    """``"0:5,3:2"`` → ((0, 5), (3, 2)): mask value ``from`` is read as class ``to`` (e.g. to give a class that a
    dataset stores as 0 its own label, so that it no longer coincides with the null condition)."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        try:
            a, b = (int(v) for v in item.split(":"))
        except ValueError:
            raise DataError(f"relabel entry {item!r} is not FROM:TO with integer class ids") from None
        if a < 0 or b < 0:
            raise DataError(f"relabel entry {item!r} has a negative class id")
        pairs.append((a, b))
    if len({a for a, _ in pairs}) != len(pairs):
        raise DataError(f"relabel {text!r} maps one value twice")
    return tuple(pairs)


def apply_relabel(arr: np.ndarray, relabel: Relabel) -> np.ndarray:
    """Map mask values through ``relabel`` (simultaneously: ``0:5,5:0`` swaps)."""
    if not relabel:
        return arr
    out = arr.copy()
    for a, b in relabel:
        out[arr == a] = b
    return out


def _mask_array(path: Path, num_classes: int, relabel: Relabel = ()) -> np.ndarray:
    img = Image.open(path)
    if img.mode not in ("L", "P", "I", "I;16", "1"):
        if img.mode in ("RGB", "RGBA", "LA"):
            arr = np.asarray(img)
            if arr.ndim == 3 and not (np.all(arr[..., 0] == arr[..., 1]) and np.all(arr[..., 0] == arr[..., 2 % arr.shape[-1]])):
                raise DataError(f"label mask {path} is a colour image; save class ids in one channel (mode L or P)")
            arr = arr[..., 0]
        else:
            raise DataError(f"label mask {path} has unsupported mode {img.mode}")
    else:
        arr = np.asarray(img)
    arr = apply_relabel(arr.astype(np.int64), relabel)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise DataError(
            f"label mask {path} holds values{' (after relabelling)' if relabel else ''} in [{arr.min()}, {arr.max()}], outside the model's classes 0..{num_classes - 1}"
        )
    return arr


def scan_tiles(root: str | Path, num_classes: int, relabel: Relabel = ()) -> list[TileRecord]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"tile folder {root} does not exist")
    table = _read_subtypes_csv(root)
    records = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
        if path.stem.endswith(MASK_SUFFIX):
            continue
        mask = _find_mask(path)
        classes: tuple[int, ...] = ()
        if mask is not None:
            arr = _mask_array(mask, num_classes, relabel)
            classes = tuple(int(c) for c in np.unique(arr) if c > 0)
        group = path.parent.relative_to(root).as_posix()
        group = path.relative_to(root).as_posix() if group in ("", ".") else group
        records.append(TileRecord(path, mask, _subtype_for(path, root, table), group, classes))
    if not records:
        raise DataError(f"tile folder {root} holds no image tiles ({', '.join(IMAGE_EXTS)})")
    return records


def scan_slides(root: str | Path, num_classes: int, relabel: Relabel = ()) -> list[SlideRecord]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"slide folder {root} does not exist")
    table = _read_subtypes_csv(root)
    records = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_EXTS):
        if path.stem.endswith(MASK_SUFFIX):
            continue
        mask = _find_mask(path)
        classes: tuple[int, ...] = ()
        if mask is not None:
            classes = tuple(int(c) for c in np.unique(_mask_array(mask, num_classes, relabel)) if c > 0)
        records.append(SlideRecord(path, mask, _subtype_for(path, root, table), classes))
    if not records:
        raise DataError(f"slide folder {root} holds no slides ({', '.join(SLIDE_EXTS)})")
    return records


def split_holdout(
    tiles: list[TileRecord], slides: list[SlideRecord], fraction: float, seed: int
) -> tuple[tuple[list[TileRecord], list[SlideRecord]], tuple[list[TileRecord], list[SlideRecord]]]:
    """Split by source (tile group / slide) before bucketing: (train, holdout)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"holdout fraction must lie in [0, 1), got {fraction}")
    if fraction == 0.0:
        return (tiles, slides), ([], [])
    groups = sorted({t.group for t in tiles} | {f"slide:{s.slide}" for s in slides})
    rng = np.random.default_rng(seed)
    n_hold = max(1, int(round(fraction * len(groups))))
    if n_hold >= len(groups):
        raise DataError(f"holdout fraction {fraction} leaves no training source ({len(groups)} sources)")
    held = set(rng.choice(groups, size=n_hold, replace=False).tolist())
    train = ([t for t in tiles if t.group not in held], [s for s in slides if f"slide:{s.slide}" not in held])
    hold = ([t for t in tiles if t.group in held], [s for s in slides if f"slide:{s.slide}" in held])
    return train, hold


# ------------------------------------------------------------------------------------------------ slides


class _Slide:
    """A lazily opened slide (one handle per process) with its label mask and tissue candidates."""

    def __init__(self, rec: SlideRecord, num_classes: int, slide_mpp: float | None, relabel: Relabel = ()):
        self.rec = rec
        self.num_classes = num_classes
        self.relabel = relabel
        self.slide_mpp = slide_mpp
        self._pid = None
        self._osr = None
        self._mask: np.ndarray | None = None
        self._class_px: dict[int, np.ndarray] = {}
        self._tissue: np.ndarray | None = None

    @property
    def osr(self):
        if self._osr is None or self._pid != os.getpid():
            import openslide

            try:
                self._osr = openslide.OpenSlide(str(self.rec.slide))
            except Exception as exc:
                raise DataError(f"OpenSlide cannot read {self.rec.slide}: {exc}") from exc
            self._pid = os.getpid()
        return self._osr

    def mpp(self) -> float:
        import openslide

        props = self.osr.properties
        value = props.get(openslide.PROPERTY_NAME_MPP_X)
        if value:
            return float(value)
        if self.slide_mpp:
            return float(self.slide_mpp)
        raise DataError(f"slide {self.rec.slide} records no µm/px ({openslide.PROPERTY_NAME_MPP_X}); pass slide_mpp (--slide-mpp)")

    def mask(self) -> np.ndarray:
        if self._mask is None:
            arr = _mask_array(self.rec.mask, self.num_classes, self.relabel)
            w, h = self.osr.dimensions
            if abs(arr.shape[1] / arr.shape[0] - w / h) > 0.02 * (w / h) + 2.0 / arr.shape[0]:
                raise DataError(
                    f"label mask {self.rec.mask} ({arr.shape[1]}×{arr.shape[0]}) does not have the aspect ratio of "
                    f"slide {self.rec.slide} ({w}×{h})"
                )
            self._mask = arr
        return self._mask

    def class_pixels(self, c: int) -> np.ndarray:
        if c not in self._class_px:
            ys, xs = np.nonzero(self.mask() == c)
            self._class_px[c] = np.stack([ys, xs], 1)
        return self._class_px[c]

    def tissue(self) -> np.ndarray:
        """Thumbnail pixel coordinates (and the thumbnail size) that look like tissue."""
        if self._tissue is None:
            thumb = np.asarray(self.osr.get_thumbnail((512, 512)).convert("RGB")).astype(np.int16)
            sat = thumb.max(-1) - thumb.min(-1)
            tissue = (sat > 15) & (thumb.mean(-1) < 235)
            ys, xs = np.nonzero(tissue)
            if len(ys) == 0:
                ys, xs = np.nonzero(np.ones(thumb.shape[:2], bool))
            self._tissue = np.stack([ys, xs], 1)
            self._thumb_shape = thumb.shape[:2]
        return self._tissue

    def read(self, rng: np.random.Generator, size: int, target_mpp: float, cls: int | None, need_labels: bool):
        """A random region of ``size`` px at ``target_mpp`` (around a pixel of class ``cls`` when given)."""
        osr = self.osr
        W, H = osr.dimensions
        span = size * target_mpp / self.mpp()  # level-0 pixels covered
        if span > min(W, H):
            raise DataError(f"slide {self.rec.slide} ({W}×{H} px) is smaller than one {size}-px tile at {target_mpp} µm/px")
        if cls is not None:
            px = self.class_pixels(cls)
            y, x = px[rng.integers(len(px))]
            mh, mw = self.mask().shape
            cy, cx = (y + rng.random()) * H / mh, (x + rng.random()) * W / mw
        else:
            px = self.tissue()
            y, x = px[rng.integers(len(px))]
            th, tw = self._thumb_shape
            cy, cx = (y + rng.random()) * H / th, (x + rng.random()) * W / tw
        x0 = float(np.clip(cx - span / 2, 0, W - span))
        y0 = float(np.clip(cy - span / 2, 0, H - span))
        level = osr.get_best_level_for_downsample(span / size)
        ds = osr.level_downsamples[level]
        n = max(1, int(math.ceil(span / ds)))
        region = osr.read_region((int(x0), int(y0)), level, (n, n))
        rgb = Image.new("RGB", region.size, (255, 255, 255))
        rgb.paste(region, mask=region.split()[-1])
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.LANCZOS)
        img = np.asarray(rgb)
        labels = None
        if need_labels and self.rec.mask is not None:
            m = self.mask()
            mh, mw = m.shape
            centres = (np.arange(size) + 0.5) * span / size
            rows = np.clip(((y0 + centres) * mh / H).astype(np.int64), 0, mh - 1)
            cols = np.clip(((x0 + centres) * mw / W).astype(np.int64), 0, mw - 1)
            labels = m[rows[:, None], cols[None, :]]
        return img, labels


# ------------------------------------------------------------------------------------------------ dataset


def _load_tile(rec: TileRecord, num_classes: int, relabel: Relabel = ()) -> tuple[np.ndarray, np.ndarray | None]:
    img = np.asarray(Image.open(rec.image).convert("RGB"))
    labels = _mask_array(rec.mask, num_classes, relabel) if rec.mask is not None else None
    if labels is not None and labels.shape != img.shape[:2]:
        raise DataError(f"label mask {rec.mask} is {labels.shape[1]}×{labels.shape[0]}, tile {rec.image} is {img.shape[1]}×{img.shape[0]}")
    return img, labels


def _crop(img: np.ndarray, labels: np.ndarray | None, size: int, rng: np.random.Generator, where: Path):
    h, w = img.shape[:2]
    if h < size or w < size:
        raise DataError(f"tile {where} is {w}×{h}, smaller than the training tile size {size}")
    y = int(rng.integers(h - size + 1))
    x = int(rng.integers(w - size + 1))
    img = img[y : y + size, x : x + size]
    if labels is not None:
        labels = labels[y : y + size, x : x + size]
    return img, labels


def _augment(img: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    k = int(rng.integers(4))
    if rng.random() < 0.5:
        img, labels = img[:, ::-1], labels[:, ::-1]
    if rng.random() < 0.5:
        img, labels = img[::-1], labels[::-1]
    return np.rot90(img, k, axes=(0, 1)), np.rot90(labels, k, axes=(0, 1))


@dataclass
class DataSpec:
    num_classes: int = 5
    tile_size: int = 512
    p_unc: float = 0.5
    mode: Literal["image", "mask"] = "image"
    mask_downsample: int = 4
    native_mpp: float = 0.5
    slide_mpp: float | None = None
    augment: bool = True
    seed: int = 0
    length: int = 1 << 40
    relabel: Relabel = ()


class PairDataset(torch.utils.data.Dataset):
    """Index → sample dict (``image`` float [3,S,S] in [0,1] (image mode), ``labels`` int64, ``subtype`` int64)."""

    def __init__(self, tiles: list[TileRecord], slides: list[SlideRecord], spec: DataSpec):
        if not 0.0 <= spec.p_unc <= 1.0:
            raise DataError(f"p_unc must lie in [0, 1], got {spec.p_unc}")
        if spec.tile_size % 32:
            raise DataError(f"tile size must be a multiple of 32 (VAE ×8 and mask ×4), got {spec.tile_size}")
        self.spec = spec
        self.tiles = list(tiles)
        self.slides = [_Slide(s, spec.num_classes, spec.slide_mpp, spec.relabel) for s in slides]
        # sources: ("tile", i) / ("slide", j)
        self.sources = [("tile", i) for i in range(len(self.tiles))] + [("slide", j) for j in range(len(self.slides))]
        if not self.sources:
            raise DataError("no training data: give a tile folder and/or a slide folder")
        labelled = {s for s in self.sources if self._record(s).mask is not None}
        if spec.mode == "image":
            self.unlabelled = [s for s in self.sources if s not in labelled or s[0] == "slide"] or list(self.sources)
            self.by_class: dict[int, list[tuple[str, int]]] = {}
            for s in labelled:
                for c in self._record(s).classes:
                    self.by_class.setdefault(c, []).append(s)
            for v in self.by_class.values():
                v.sort()
            self.class_ids = sorted(self.by_class)
        else:
            self.mask_sources = sorted(
                s for s in labelled if self._record(s).subtype is not None
            )
            if not self.mask_sources:
                raise DataError(
                    "mask-model training needs labelled sources with a known subtype "
                    f"({SUBTYPES_CSV} or adenocarcinoma/ squamous/ sub-folders); none found"
                )
            if spec.tile_size % (8 * spec.mask_downsample):
                raise DataError(f"tile size {spec.tile_size} must be a multiple of 8×mask_downsample={8 * spec.mask_downsample}")

    def _record(self, s: tuple[str, int]):
        return self.tiles[s[1]] if s[0] == "tile" else self.slides[s[1]].rec

    def __len__(self) -> int:
        return self.spec.length

    def describe(self) -> str:
        n_lab_t = sum(t.mask is not None for t in self.tiles)
        parts = [f"{len(self.tiles)} tiles ({n_lab_t} labelled)", f"{len(self.slides)} slides"]
        if self.spec.mode == "image" and self.class_ids:
            parts.append("classes " + ",".join(map(str, self.class_ids)))
        return "; ".join(parts)

    def _read(self, s: tuple[str, int], rng: np.random.Generator, cls: int | None, need_labels: bool):
        size = self.spec.tile_size
        if s[0] == "tile":
            rec = self.tiles[s[1]]
            img, labels = _load_tile(rec, self.spec.num_classes, self.spec.relabel)
            if cls is not None and labels is not None and (img.shape[0] > size or img.shape[1] > size):
                ys, xs = np.nonzero(labels == cls)  # keep the chosen class in the crop
                i = int(rng.integers(len(ys)))
                y = int(np.clip(ys[i] - rng.integers(size), 0, img.shape[0] - size))
                x = int(np.clip(xs[i] - rng.integers(size), 0, img.shape[1] - size))
                img, labels = img[y : y + size, x : x + size], labels[y : y + size, x : x + size]
            else:
                img, labels = _crop(img, labels, size, rng, rec.image)
            return img, labels
        return self.slides[s[1]].read(rng, size, self.spec.native_mpp, cls, need_labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, int(index)])
        size = spec.tile_size
        subtype = -1
        if spec.mode == "image":
            if rng.random() < spec.p_unc or not self.class_ids:
                s = self.unlabelled[int(rng.integers(len(self.unlabelled)))]
                img, _ = self._read(s, rng, None, need_labels=False)
                labels = np.zeros((size, size), np.int64)
            else:
                c = self.class_ids[int(rng.integers(len(self.class_ids)))]
                pool = self.by_class[c]
                s = pool[int(rng.integers(len(pool)))]
                img, full = self._read(s, rng, c, need_labels=True)
                labels = np.where(full == c, c, 0).astype(np.int64)
        else:
            s = self.mask_sources[int(rng.integers(len(self.mask_sources)))]
            img, labels = self._read(s, rng, None, need_labels=True)
            subtype = int(self._record(s).subtype)
        if spec.augment:
            img, labels = _augment(img, labels, rng)
        out = {"subtype": torch.tensor(subtype, dtype=torch.int64)}
        if spec.mode == "image":
            out["image"] = torch.tensor(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
            out["labels"] = torch.tensor(np.ascontiguousarray(labels)).long()
        else:
            f = spec.mask_downsample
            out["labels"] = torch.tensor(np.ascontiguousarray(labels[::f, ::f])).long()
        return out


class IndexRange(torch.utils.data.Sampler):
    """Consecutive indices [start, stop): resumable, deterministic sampling."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = int(start), int(stop)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
