"""Conditioning fidelity: does a generated slide show, region by region, the classes its mask asked for?

A small CNN (≈ 100 k parameters), trained on procedural H&E-like tiles (:mod:`procedural.tissue`), labels
64 × 64-px RGB windows with the five DiffInfinite classes (0 unknown/glass, 1 carcinoma, 2 necrosis,
3 tumour stroma, 4 others). :func:`score_slide` compares its labels with the requested mask:

* windows: the non-overlapping 64-px grid from the slide's top-left corner (partial windows at the right and
  bottom edges are left out);
* a window's reference label is the majority class of the mask inside it; windows whose majority covers
  less than ``min_share`` = 75 % of the window straddle a region border and are skipped (they have no
  single right answer);
* every class counts, unknown/glass included: painting tissue where the mask asks for glass (or glass where
  it asks for tissue) is a conditioning failure too. ``ignore`` drops classes if wanted;
* a model whose label ids differ from the classifier's classes passes ``label_map`` (its card's
  ``fidelity_classes``: label → classifier class); labels the map leaves out (e.g. a separate "unknown" null
  label) count as not requested, and windows they dominate are skipped;
* **balanced accuracy** = mean over the classes present among the kept windows of the recall (share of that
  class's windows the classifier labels as that class), so large stroma areas do not drown small necrotic
  cores; chance level is 1/(number of classes present);
* **seam ratio** = :func:`models.metrics.seam_ratio`'s definition — mean |gradient| across the former tile
  boundaries — given explicitly (``boundaries``: the service passes the tiled decoder's blend edges,
  :meth:`models.decoding.TiledDecoder.boundary_lines`; the samplers leave no fixed grid), else the rows/
  columns ≡ offset mod ``period_px`` (default 512 px) — over the mean |gradient| on the other lines of the same phase mod ``match_mod`` = 8 (the VAE's factor)
  within ``neighbourhood_px`` = 32 px of a boundary (4 lines each side: a boundary line crossing tumour
  is compared with lines crossing the same tumour, not with the glass margin) — computed while the slide
  streams past (profiles accumulated band by band), the maximum over both axes.
  None when the slide holds no boundary line (smaller than one period).

The scorer streams: :class:`SlideScorer` takes full-width bands in order and keeps only the rows of one
window row and two gradient profiles, so it can run beside the writers on a gigapixel job.

Weights live in ``weights/fidelity-classifier/`` (``classifier.safetensors`` + ``classifier_card.json``
with the sha256 and the command that made them; the card is deliberately not a ``model_card.json``, so
the model registry does not take it for a generator). :func:`train_classifier` reproduces them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from models.hashing import sha256_file
from evaluation.windows import WindowRows
from models.metrics import lines_ratio

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER_DIR = REPO / "weights" / "fidelity-classifier"
WEIGHTS_FILE = "classifier.safetensors"
CARD_FILE = "classifier_card.json"
WINDOW = 64
MIN_SHARE = 0.75
NUM_CLASSES = 5
CLASS_NAMES = {0: "unknown", 1: "carcinoma", 2: "necrosis", 3: "tumor stroma", 4: "others"}
DEFAULT_WIDTHS = (16, 32, 64, 128)
SEAM_NEIGHBOURHOOD = 32  # px: reference lines for the seam ratio lie within this distance of a boundary


# ------------------------------------------------------------------------------------------------ network
class FidelityNet(nn.Module):
    """64² RGB window → 5 class logits. Input: float in [0, 1], (B, 3, 64, 64)."""

    def __init__(self, widths: Sequence[int] = DEFAULT_WIDTHS, num_classes: int = NUM_CLASSES):
        super().__init__()
        w0, w1, w2, w3 = (int(w) for w in widths)

        def block(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w0, 2),  # 32²
            *block(w0, w1, 2),  # 16²
            *block(w1, w2), nn.MaxPool2d(2),  # 8²
            *block(w2, w3), nn.MaxPool2d(2),  # 4²
        )
        self.head = nn.Linear(2 * w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features((x - 0.5) * 4.0)
        pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        return self.head(pooled)


@dataclass
class FidelityClassifier:
    net: FidelityNet
    card: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def window(self) -> int:
        return int(self.card.get("window", WINDOW))

    @torch.no_grad()
    def predict(self, windows: np.ndarray, batch: int = 512) -> np.ndarray:
        """uint8 (N, w, w, 3) windows → int64 (N,) class ids."""
        windows = np.asarray(windows)
        if windows.ndim != 4 or windows.shape[1:] != (self.window, self.window, 3):
            raise ValueError(f"windows must be (N, {self.window}, {self.window}, 3) RGB, got {windows.shape}")
        out = np.empty(len(windows), np.int64)
        self.net.eval()
        for i in range(0, len(windows), batch):
            x = torch.from_numpy(np.ascontiguousarray(windows[i:i + batch])).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            out[i:i + batch] = self.net(x).argmax(1).cpu().numpy()
        return out


def load_classifier(folder: str | Path | None = None, device: str | torch.device = "cpu") -> FidelityClassifier:
    """Load the classifier from ``folder`` (default: the shipped one): the weights' sha256 must match the
    card, and every tensor must match the network (``strict=True``)."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else CLASSIFIER_DIR
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise FileNotFoundError(f"fidelity classifier folder {folder} has no {CARD_FILE}")
    card = json.loads(card_path.read_text())
    files = card.get("files") or {}
    if WEIGHTS_FILE not in files:
        raise ValueError(f"{card_path} lists no sha256 for {WEIGHTS_FILE}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"fidelity classifier weights {weights} are missing")
    digest = sha256_file(weights)
    if digest != files[WEIGHTS_FILE]:
        raise ValueError(f"{weights} has sha256 {digest}, but {card_path} says {files[WEIGHTS_FILE]}")
    net = FidelityNet(card.get("config", {}).get("widths", DEFAULT_WIDTHS), int(card.get("num_classes", NUM_CLASSES)))
    net.load_state_dict(load_file(str(weights)), strict=True)
    device = torch.device(device)
    return FidelityClassifier(net.to(device).eval(), card, device)


# ------------------------------------------------------------------------------------------------ scoring
def window_labels(labels: np.ndarray, window: int = WINDOW, min_share: float = MIN_SHARE) -> np.ndarray:
    """Reference label per window of the non-overlapping grid: the majority class, or −1 where the majority
    covers less than ``min_share`` of the window. int64 (H // window, W // window)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D class map, got shape {labels.shape}")
    gh, gw = labels.shape[0] // window, labels.shape[1] // window
    if gh == 0 or gw == 0:
        raise ValueError(f"a {labels.shape[1]}×{labels.shape[0]} mask holds no {window}-px window")
    if labels.min() < -1 or labels.max() >= NUM_CLASSES:  # −1: not requested (see map_labels)
        raise ValueError(f"labels hold class ids outside 0..{NUM_CLASSES - 1}")
    lab = labels[:gh * window, :gw * window].reshape(gh, window, gw, window)
    counts = np.stack([(lab == c).sum((1, 3)) for c in range(NUM_CLASSES)], -1)
    major = counts.argmax(-1)
    share = counts.max(-1) / float(window * window)
    return np.where(share >= min_share, major, -1).astype(np.int64)


def map_labels(labels: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """A model's label map → classifier classes (int64): ``label_map[l]`` for listed labels, −1 (not scored)
    for the others. ``None`` or empty: the labels are the classes already (returned as int64)."""
    labels = np.asarray(labels)
    if not label_map:
        return labels.astype(np.int64)
    bad = sorted({int(v) for v in label_map.values() if not 0 <= int(v) < NUM_CLASSES})
    if bad:
        raise ValueError(f"label_map targets {bad} are not classifier classes 0..{NUM_CLASSES - 1}")
    lut = np.full(max(int(labels.max()) if labels.size else 0, *map(int, label_map)) + 1, -1, np.int64)
    for lab, cls in label_map.items():
        lut[int(lab)] = int(cls)
    return lut[labels.astype(np.int64)]


def labels_for_classes(classes: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """The inverse of :func:`map_labels`: a class map in the classifier's classes (e.g. a procedural layout)
    → the model labels that ask for those classes (uint8). ``None``/empty: the classes are the labels."""
    classes = np.asarray(classes)
    if not label_map:
        return classes.astype(np.uint8)
    inverse = {int(c): int(lab) for lab, c in sorted(label_map.items(), reverse=True)}  # lowest label wins
    missing = sorted(set(np.unique(classes).tolist()) - set(inverse))
    if missing:
        raise ValueError(f"no model label asks for classifier classes {missing}")
    lut = np.zeros(NUM_CLASSES, np.uint8)
    for c, lab in inverse.items():
        lut[c] = lab
    return lut[classes.astype(np.int64)]


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, dict[int, float]]:
    """Mean per-class recall over the classes present in ``y_true`` (and the recalls)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = {int(c): float((y_pred[y_true == c] == c).mean()) for c in np.unique(y_true)}
    if not recalls:
        raise ValueError("no scored windows: every window straddles a region border or is ignored")
    return float(np.mean(list(recalls.values()))), recalls


class SlideScorer:
    """Streaming fidelity score of one slide: feed full-width uint8 RGB bands top to bottom with
    :meth:`add_band`, then read :meth:`result`.

    ``labels``: the requested class map at the slide's resolution (H, W); use :func:`score_slide` to pass a
    mask of another size (it is resized nearest-neighbour, as the service does).
    """

    def __init__(self, labels: np.ndarray, classifier: FidelityClassifier | None = None, *,
                 min_share: float = MIN_SHARE, ignore: Iterable[int] = (), period_px: int = 512,
                 offsets_px: Sequence[int] = (0,), match_mod: int | None = 8,
                 neighbourhood_px: int | None = SEAM_NEIGHBOURHOOD, label_map: dict[int, int] | None = None,
                 boundaries: tuple[Sequence[int], Sequence[int]] | None = None):
        self.classifier = classifier if classifier is not None else load_classifier()
        self.window = self.classifier.window
        self.labels = map_labels(labels, label_map)
        self.ref = window_labels(self.labels, self.window, min_share)
        for c in ignore:
            self.ref[self.ref == int(c)] = -1
        self.height, self.width = self.labels.shape
        self.period, self.offsets, self.match_mod = int(period_px), tuple(int(o) for o in offsets_px), match_mod
        self.neighbourhood = neighbourhood_px
        # explicit (rows, columns) of former tile boundaries (e.g. TiledDecoder.boundary_lines) replace the
        # period/offset grid
        self.boundaries = None if boundaries is None else (tuple(map(int, boundaries[0])),
                                                           tuple(map(int, boundaries[1])))
        if self.period < 2:
            raise ValueError(f"period_px must be ≥ 2, got {period_px}")
        self.pred = np.full(self.ref.shape, -1, np.int64)
        self._rows = 0
        self._buf = np.empty((0, self.width, 3), np.uint8)
        self._gy = np.full(self.height, np.nan, np.float64)
        self._gx = np.zeros(self.width, np.float64)
        self._last: np.ndarray | None = None

    def add_band(self, band: np.ndarray) -> None:
        band = np.asarray(band)
        if band.ndim != 3 or band.shape[2] != 3 or band.shape[1] != self.width:
            raise ValueError(f"bands must be (rows, {self.width}, 3) RGB, got {band.shape}")
        if band.dtype != np.uint8:
            raise ValueError(f"bands must be uint8, got {band.dtype}")
        if self._rows + band.shape[0] > self.height:
            raise ValueError(f"bands exceed the mask's {self.height} rows")
        self._profiles(band)
        r0 = self._rows
        self._rows += band.shape[0]
        # classify the window rows this band completes
        w = self.window
        first_row = r0 - len(self._buf)  # image row of self._buf[0]
        self._buf = np.concatenate([self._buf, band]) if len(self._buf) else band
        while True:
            gi = -(-first_row // w)  # next window row starting at or after first_row
            y = gi * w
            if gi >= self.ref.shape[0] or y + w > self._rows:
                break
            keep = np.flatnonzero(self.ref[gi] >= 0)
            if keep.size:
                strip = self._buf[y - first_row:y - first_row + w]
                wins = np.stack([strip[:, j * w:(j + 1) * w] for j in keep])
                self.pred[gi, keep] = self.classifier.predict(wins)
            self._buf = self._buf[y + w - first_row:]
            first_row = y + w
        if len(self._buf) > w:  # only rows of a window row not yet complete are needed
            drop = len(self._buf) - w
            self._buf = self._buf[drop:]

    def _profiles(self, band: np.ndarray) -> None:
        """Accumulate models.metrics.gradient_profiles' |∂y| (per row) and Σ|∂x| (per column)."""
        b = band.astype(np.float32)
        r0 = self._rows
        self._gx[1:] += np.abs(np.diff(b, axis=1)).sum(axis=(0, 2), dtype=np.float64)
        if b.shape[0] > 1:
            self._gy[r0 + 1:r0 + b.shape[0]] = np.abs(np.diff(b, axis=0)).mean(axis=(1, 2), dtype=np.float64)
        if self._last is not None:
            self._gy[r0] = np.abs(b[0] - self._last).mean(dtype=np.float64)
        self._last = b[-1]

    def seam_ratio(self) -> float | None:
        gx = self._gx.copy()
        gx[1:] /= self.height * 3
        gx[0] = np.nan
        if self.boundaries is not None:
            grids = [self.boundaries]
        else:  # the period grid, one set of lines per offset
            grids = [(range(o % self.period, self.height, self.period), range(o % self.period, self.width, self.period))
                     for o in self.offsets]
        vals = []
        for rows, cols in grids:
            for prof, lines in ((self._gy, rows), (gx, cols)):
                v = lines_ratio(prof, lines, self.match_mod, self.neighbourhood)
                if not np.isnan(v):
                    vals.append(v)
        return max(vals) if vals else None

    def result(self) -> dict[str, Any]:
        if self._rows != self.height:
            raise ValueError(f"only {self._rows} of the mask's {self.height} rows were scored")
        scored = self.ref >= 0
        bacc, recalls = balanced_accuracy(self.ref[scored], self.pred[scored])
        confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
        np.add.at(confusion, (self.ref[scored], self.pred[scored]), 1)
        sr = self.seam_ratio()
        return {
            "balanced_accuracy": round(bacc, 4),
            "seam_ratio": None if sr is None else round(sr, 4),
            "recall": {CLASS_NAMES[c]: round(r, 4) for c, r in recalls.items()},
            "windows_scored": int(scored.sum()),
            "windows_skipped": int((~scored).sum()),
            "confusion": confusion.tolist(),
            "window": self.window,
            "seam_period_px": None if self.boundaries is not None else self.period,
            "seam_lines": None if self.boundaries is None else {"rows": len(self.boundaries[0]),
                                                                 "columns": len(self.boundaries[1])},
            "seam_neighbourhood_px": self.neighbourhood,
            "seam_offsets_px": list(self.offsets),
        }


class ClassShareScorer:
    """Streaming class shares of a slide without a requested mask (e.g. an ∞-Brush slide conditioned on an
    embedding): every whole ``window``² tile of the slide on a regular grid is classified and counted. Feed
    full-width uint8 RGB bands top to bottom with :meth:`add_band`; :meth:`result` gives the share of windows
    per classifier class (by name). Keeps at most one window row of pixels."""

    def __init__(self, height: int, width: int, classifier: FidelityClassifier | None = None):
        self.classifier = classifier if classifier is not None else load_classifier()
        self.window = self.classifier.window
        self.height, self.width = int(height), int(width)
        self.cols = self.width // self.window
        if self.height < self.window or self.cols == 0:
            raise ValueError(f"a {self.height}×{self.width} slide holds no {self.window}² window")
        self.counts = np.zeros(len(CLASS_NAMES), np.int64)
        self._rows = WindowRows(self.width, self.window)

    def add_band(self, band: np.ndarray) -> None:
        for _, tiles in self._rows.push(band):
            pred = self.classifier.predict(tiles)
            self.counts += np.bincount(pred, minlength=len(self.counts))[:len(self.counts)]

    def result(self) -> dict[str, float]:
        total = int(self.counts.sum())
        if total == 0:
            raise ValueError("no window was classified")
        return {CLASS_NAMES[i]: float(c) / total for i, c in enumerate(self.counts)}


def score_slide(image_or_bands: np.ndarray | Iterable[np.ndarray], labels: np.ndarray,
                classifier: FidelityClassifier | None = None, **kw) -> dict[str, Any]:
    """Fidelity of a slide to its mask: ``{"balanced_accuracy", "seam_ratio", "recall", …}``.

    ``image_or_bands``: uint8 (H, W, 3), or an iterable of full-width bands top to bottom. ``labels``: the
    requested class map; with a whole image it may have any size (nearest-neighbour resize to the image),
    with bands it must be at the slide's resolution. Keyword arguments go to :class:`SlideScorer`.
    """
    labels = np.asarray(labels)
    if isinstance(image_or_bands, np.ndarray):
        img = image_or_bands
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image must be (H, W, 3) RGB, got {img.shape}")
        if labels.shape != img.shape[:2]:
            import cv2

            labels = cv2.resize(labels.astype(np.uint8), (img.shape[1], img.shape[0]),
                                interpolation=cv2.INTER_NEAREST)
        bands: Iterable[np.ndarray] = (img[r:r + 512] for r in range(0, img.shape[0], 512))
    else:
        bands = image_or_bands
    scorer = SlideScorer(labels, classifier, **kw)
    for band in bands:
        scorer.add_band(band)
    return scorer.result()


# ------------------------------------------------------------------------------------------------ training
def _sample_windows(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, n: int, window: int,
                    min_share: float) -> tuple[list[np.ndarray], list[int]]:
    h, w = labels.shape
    wins, ys = [], []
    for _ in range(n):
        y = int(rng.integers(0, h - window + 1))
        x = int(rng.integers(0, w - window + 1))
        lab = labels[y:y + window, x:x + window]
        counts = np.bincount(lab.ravel(), minlength=NUM_CLASSES)
        c = int(counts.argmax())
        if counts[c] >= min_share * window * window:
            wins.append(image[y:y + window, x:x + window])
            ys.append(c)
    return wins, ys


def procedural_windows(n_images: int, seed: int, *, size: int = 256, per_image: int = 32, window: int = WINDOW,
                       min_share: float = MIN_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Windows (uint8 (N, w, w, 3)) and labels (N,) cut from procedural renders: three in four images are
    tile layouts, one in four a slide layout (at 0.5–2 µm/px region scales)."""
    from procedural.tissue import item_seed, random_layout, render_tile

    X, Y = [], []
    for i in range(n_images):
        s = item_seed(seed, i)
        rng = np.random.default_rng([s, 17])
        if i % 4 == 3:
            labels = random_layout(size, size, s, "slide", mpp=float(rng.choice([0.5, 1.0, 2.0])))
        else:
            labels = random_layout(size, size, s, "tile")
        img = render_tile(labels, s)
        wins, ys = _sample_windows(img, labels, rng, per_image, window, min_share)
        X += wins
        Y += ys
    return np.stack(X), np.asarray(Y, np.int64)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Training augmentation of a float [0, 1] batch: rot90/flips, stain strength (in optical density),
    brightness, blur or ×2/×4/×8 down-up sampling (a decoder's softness), pixel noise."""
    import torch.nn.functional as F

    b = x.shape[0]
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, (2, 3))
    if torch.rand(1, generator=gen) < 0.5:
        x = x.flip(3)
    od = -torch.log(x.clamp_min(1 / 255))
    od = od * (0.7 + 0.65 * torch.rand(b, 1, 1, 1, generator=gen)) * (0.85 + 0.3 * torch.rand(b, 3, 1, 1, generator=gen))
    x = torch.exp(-od)
    x = x * (0.92 + 0.16 * torch.rand(b, 1, 1, 1, generator=gen))
    mode = int(torch.randint(0, 4, (1,), generator=gen))
    if mode == 1:  # Gaussian blur, σ ∈ [0.5, 3.5]
        sigma = 0.5 + 3.0 * float(torch.rand(1, generator=gen))
        r = 8
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        g = torch.exp(-t * t / (2 * sigma * sigma))
        g = g / g.sum()
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    elif mode >= 2:  # soft reconstruction: down ×2 or ×4 (mode 2) or ×8 (mode 3), up again
        f = 8 if mode == 3 else (2, 4)[int(torch.randint(0, 2, (1,), generator=gen))]
        size = x.shape[-1]
        x = F.interpolate(F.avg_pool2d(x, f), size=(size, size), mode="bilinear", align_corners=False)
    x = x + torch.randn(x.shape, generator=gen) * (0.025 * torch.rand(b, 1, 1, 1, generator=gen))
    return x.clamp(0, 1)


def train_classifier(out_dir: str | Path = CLASSIFIER_DIR, *, n_images: int = 480, size: int = 256,
                     per_image: int = 40, steps: int = 1200, batch: int = 64, lr: float = 3e-3, seed: int = 0,
                     widths: Sequence[int] = DEFAULT_WIDTHS, val_images: int = 64, sanity_slides: int = 3,
                     log=print) -> dict[str, Any]:
    """Train the window classifier on procedural renders (CPU, minutes) and save weights + card.

    Data seeds: training images from ``seed``, validation windows from ``seed + 1``, sanity slides (slide
    layouts 768² px, rendered directly and scored with :func:`score_slide`) from ``seed + 2``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    X, Y = procedural_windows(n_images, seed, size=size, per_image=per_image)
    Xv, Yv = procedural_windows(val_images, seed + 1, size=size, per_image=per_image)
    counts = np.bincount(Y, minlength=NUM_CLASSES)
    log(f"data: {len(Y)} training windows {counts.tolist()}, {len(Yv)} validation windows "
        f"({time.perf_counter() - t0:.0f} s)")
    if (counts == 0).any():
        raise ValueError(f"training windows miss classes {np.flatnonzero(counts == 0).tolist()}; raise n_images")
    # class-balanced sampling
    p = (1.0 / counts)[Y]
    p /= p.sum()
    rng = np.random.default_rng([seed, 5])
    Xt = torch.from_numpy(X).permute(0, 3, 1, 2).contiguous()  # uint8
    net = FidelityNet(widths)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    net.train()
    t1 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.choice(len(Y), size=batch, p=p))
        xb = _augment(Xt[idx].float().div_(255.0), gen)
        loss = loss_fn(net(xb), torch.from_numpy(Y)[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t1:.0f} s)")
    net.eval()
    clf = FidelityClassifier(net, {"window": WINDOW})
    val_bacc, val_recall = balanced_accuracy(Yv, clf.predict(Xv))
    sanity = []
    from procedural.tissue import item_seed, random_layout, render_tile

    for i in range(sanity_slides):
        s = item_seed(seed + 2, i)
        labels = random_layout(768, 768, s, "slide", mpp=0.5 if i % 2 == 0 else 1.0)
        sanity.append(score_slide(render_tile(labels, s), labels, clf)["balanced_accuracy"])
    log(f"validation balanced accuracy {val_bacc:.4f}; sanity slides {sanity}")

    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(weights),
              metadata={"format": "pt"})
    n_params = sum(p.numel() for p in net.parameters())
    card = {
        "name": "fidelity-classifier",
        "kind": "window-classifier",
        "description": "Labels 64×64-px RGB windows of H&E-like slides with the five DiffInfinite classes; "
                       "trained on procedural tiles only (procedural.tissue). Used by evaluation.fidelity.",
        "classes": CLASS_NAMES,
        "num_classes": NUM_CLASSES,
        "window": WINDOW,
        "native_mpp": 0.5,
        "config": {"widths": [int(w) for w in widths]},
        "parameters": n_params,
        "files": {WEIGHTS_FILE: sha256_file(weights)},
        "training": {
            "command": (f"python -m evaluation.fidelity train --out {out_dir} --n-images {n_images} --size {size} "
                        f"--per-image {per_image} --steps {steps} --batch {batch} --lr {lr} --seed {seed} "
                        f"--threads {torch.get_num_threads()}"),
            "data": f"procedural.tissue v{_generator_version()}: {n_images} renders of {size}² px (seed {seed}), "
                    f"{len(Y)} windows, majority share ≥ {MIN_SHARE}",
            "windows_per_class": counts.tolist(),
            "device": "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "metrics": {
            "val_balanced_accuracy": round(val_bacc, 4),
            "val_recall": {CLASS_NAMES[c]: round(r, 4) for c, r in val_recall.items()},
            "sanity_slides_balanced_accuracy": sanity,
            "sanity_note": f"held-out slide layouts (seed {seed + 2}), 768² px, rendered directly: the ceiling "
                           "a generator can reach",
        },
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card


def _generator_version() -> int:
    from procedural.tissue import GENERATOR_VERSION

    return GENERATOR_VERSION


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m evaluation.fidelity")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the window classifier on procedural tiles")
    t.add_argument("--out", default=str(CLASSIFIER_DIR.relative_to(REPO)))
    t.add_argument("--n-images", type=int, default=480)
    t.add_argument("--size", type=int, default=256)
    t.add_argument("--per-image", type=int, default=40)
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible bit for bit)")
    s = sub.add_parser("score", help="score an RGB image (PNG/TIFF level 0) against a label mask")
    s.add_argument("image")
    s.add_argument("mask")
    args = p.parse_args(argv)
    if args.cmd == "train":
        torch.set_num_threads(args.threads)
        card = train_classifier(args.out, n_images=args.n_images, size=args.size, per_image=args.per_image,
                                steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
        print(json.dumps(card["metrics"]))
        return 0
    from PIL import Image

    if args.image.lower().endswith((".tif", ".tiff")):
        import tifffile

        img = tifffile.imread(args.image, series=0, level=0)
    else:
        img = np.asarray(Image.open(args.image).convert("RGB"))
    labels = np.asarray(Image.open(args.mask).convert("L"))
    print(json.dumps(score_slide(img[..., :3], labels)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
