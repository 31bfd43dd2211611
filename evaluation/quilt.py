"""Quilt score: does a slide change its low-frequency appearance where the pipeline cut it?

A slide assembled from pieces (decode tiles, sampler cells) can carry a per-piece offset in colour or
brightness that a smooth blend hides at the pixel level but not at the block level: a quilt. Gradient
metrics across a 1-px line (:func:`models.metrics.seam_ratio`) do not see it when the blend ramp is wide,
so this score compares *block means* on both sides of a cut:

* a **cut** is a zone ``[a, b)`` of rows or columns where one piece hands over to the next (the cross-fade
  ramp of two decode tiles, or ``a == b`` for a hard cell edge). Its **strips** are the ``strip_px`` rows
  (or columns) just outside the zone, ``[a − strip, a)`` and ``[b, b + strip)``;
* along the cut the strips are split into **segments** of ``segment_px``; a segment's **jump** is the mean
  over the colour channels of |mean(strip before) − mean(strip after)|, in grey levels;
* with a label map, a segment counts only when the whole segment (both strips and the zone) lies in one
  label region, so region borders do not count as jumps — only what happens *within* a tissue;
* **control zones** of the same width lie at the same phase modulo ``phase_px`` (the VAE's 8 px), with their
  strips at least ``clearance_px`` from every cut zone of every kind (so both strips lie in one piece):
  lines where nothing was cut, which measure what the content alone scores;
* **quilt score** of a kind of cut, per label region: the mean jump across its segments in the region ÷ the
  mean jump across the control segments in the same region (both means trimmed of their top
  ``trim`` = 10 %, so a vessel or fat lobule crossing one segment does not outweigh a line; ``floor_grey`` =
  0.5 grey level, the quantisation noise, added to both, so near-constant glass does not divide ~0 by ~0);
  the regions' ratios averaged, weighted by their cut segments. ≈ 1 when the pieces agree
  (a clean image, or the procedural render of the mask); a per-piece offset raises it.

:class:`QuiltScorer` streams: it takes full-width uint8 bands top to bottom and keeps only per-segment
sums, so it runs beside the writers on a gigapixel job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

Zone = tuple[int, int]  # [a, b) in output pixels; a == b is a hard line between pixels a − 1 and a

STRIP_PX = 32
SEGMENT_PX = 64
PHASE_PX = 8
CLEARANCE_PX = 0
MAX_CONTROLS = 256  # control zones per axis and zone width (evenly thinned beyond)
TRIM = 0.10
FLOOR_GREY = 0.5


@dataclass(frozen=True)
class _Spec:
    """One zone on one axis: strips ``[a − s, a)`` and ``[b, b + s)``; ``axis`` 0 = rows (a horizontal cut),
    1 = columns (a vertical cut)."""

    kind: str          # the cut kind, or "control:<width>"
    axis: int
    a: int
    b: int


def zones_from_lines(lines: Iterable[int]) -> list[Zone]:
    """Hard cuts: each line ``p`` (between pixels p − 1 and p) as the empty zone ``[p, p)``."""
    return [(int(p), int(p)) for p in lines]


def pair_zones(edges: Sequence[int]) -> list[Zone]:
    """Ramp zones from a sorted list of ramp start/end lines as :meth:`TiledDecoder.boundary_lines` gives them
    (start, end, start, end, …): ``[(s0, e0), (s1, e1), …]``."""
    e = [int(p) for p in edges]
    if len(e) % 2:
        raise ValueError(f"expected start/end pairs of ramp lines, got {len(e)} lines")
    return [(e[i], e[i + 1]) for i in range(0, len(e), 2)]


class QuiltScorer:
    """Streaming quilt score of one slide; see the module docstring.

    ``cuts``: ``{kind: (row_zones, column_zones)}`` in output pixels, e.g. ``{"decode": …, "sampler": …}``.
    ``labels``: optional (H, W) label map at the slide's resolution; without it the whole slide is one
    region. Feed full-width RGB (or grey) uint8 bands with :meth:`add_band`, then read :meth:`result`.
    """

    def __init__(self, height: int, width: int, cuts: Mapping[str, tuple[Sequence[Zone], Sequence[Zone]]],
                 labels: np.ndarray | None = None, *, strip_px: int = STRIP_PX, segment_px: int = SEGMENT_PX,
                 phase_px: int = PHASE_PX, clearance_px: int = CLEARANCE_PX, max_controls: int = MAX_CONTROLS,
                 trim: float = TRIM, floor_grey: float = FLOOR_GREY):
        self.height, self.width = int(height), int(width)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"slide size must be positive, got {height} x {width}")
        for name, v in (("strip_px", strip_px), ("segment_px", segment_px), ("phase_px", phase_px)):
            if int(v) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {v}")
        self.strip, self.segment, self.phase = int(strip_px), int(segment_px), int(phase_px)
        self.clearance = int(clearance_px)
        if not 0 <= trim < 1:
            raise ValueError(f"trim must be in [0, 1), got {trim}")
        self.trim, self.floor = float(trim), float(floor_grey)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (self.height, self.width):
                raise ValueError(f"labels must be ({self.height}, {self.width}), got {labels.shape}")
        specs: list[_Spec] = []
        all_zones: tuple[list[Zone], list[Zone]] = ([], [])
        for kind, axes in cuts.items():
            if kind.startswith("control"):
                raise ValueError(f"cut kind {kind!r} is reserved")
            for axis in (0, 1):
                for a, b in axes[axis]:
                    a, b = int(a), int(b)
                    if b < a:
                        raise ValueError(f"{kind} zone [{a}, {b}) ends before it starts")
                    all_zones[axis].append((a, b))
                    if self._fits(axis, a, b):
                        specs.append(_Spec(kind, axis, a, b))
        self.kinds = list(cuts)
        for axis in (0, 1):
            for width in sorted({b - a for a, b in all_zones[axis]}):
                specs.extend(self._controls(axis, width, all_zones[axis], max_controls))
        self.specs = specs
        n_seg = [-(-self.width // self.segment), -(-self.height // self.segment)]  # along the cut, per axis
        # sums[i]: (segments, 2 sides, channels) for spec i; counted lazily once the channel count is known
        self._sums: list[np.ndarray] | None = None
        self._n_seg = n_seg
        self._region = [self._segment_regions(s, labels) for s in specs]
        self._rows = 0
        self._channels: int | None = None

    # ------------------------------------------------------------------ geometry
    def _extent(self, axis: int) -> int:
        return self.height if axis == 0 else self.width

    def _fits(self, axis: int, a: int, b: int) -> bool:
        return a - self.strip >= 0 and b + self.strip <= self._extent(axis)

    def _controls(self, axis: int, width: int, zones: Sequence[Zone], max_controls: int) -> list[_Spec]:
        """Zones of ``width`` at the cuts' phase, clear of every cut, evenly thinned to ``max_controls``."""
        if not zones:
            return []
        phase = zones[0][0] % self.phase
        starts = np.arange(phase + self.strip, self._extent(axis) - width - self.strip + 1, self.phase)
        if starts.size == 0:
            return []
        lo = np.array([a for a, _ in zones]) - self.clearance
        hi = np.array([b for _, b in zones]) + self.clearance
        # a control [s, s + width) with its strips must stay clear: no overlap with any [lo, hi)
        s0, s1 = starts - self.strip, starts + width + self.strip
        clear = ~((s0[:, None] < hi[None, :]) & (s1[:, None] > lo[None, :])).any(axis=1)
        starts = starts[clear]
        if starts.size > max_controls:
            starts = starts[np.linspace(0, starts.size - 1, max_controls).round().astype(int)]
        return [_Spec(f"control:{width}", axis, int(s), int(s) + width) for s in starts]

    def _segment_regions(self, spec: _Spec, labels: np.ndarray | None) -> np.ndarray:
        """Per segment along the spec: the label its whole area lies in, or −1 (several labels, or a short last
        segment)."""
        n = self._n_seg[spec.axis]
        if labels is None:
            region = np.zeros(n, np.int64)
        else:
            if spec.axis == 1:   # vertical cut: the area is columns [a − s, b + s), segments along rows
                area = labels[:, spec.a - self.strip:spec.b + self.strip].T
            else:
                area = labels[spec.a - self.strip:spec.b + self.strip, :]
            length = area.shape[1]
            pad = n * self.segment - length
            lo = np.pad(area, ((0, 0), (0, pad)), mode="edge").reshape(area.shape[0], n, self.segment)
            first, last = lo.min(axis=(0, 2)).astype(np.int64), lo.max(axis=(0, 2)).astype(np.int64)
            region = np.where(first == last, first, -1)
        # the last segment may be short: count it only when it holds at least half a segment
        along = self.width if spec.axis == 0 else self.height
        if along % self.segment and along % self.segment < self.segment // 2:
            region[-1] = -1
        return region

    # ------------------------------------------------------------------ streaming
    def add_band(self, band: np.ndarray) -> None:
        band = np.asarray(band)
        if band.ndim == 2:
            band = band[:, :, None]
        if band.ndim != 3 or band.shape[1] != self.width:
            raise ValueError(f"bands must be (rows, {self.width}[, channels]), got {band.shape}")
        if band.dtype != np.uint8:
            raise ValueError(f"bands must be uint8, got {band.dtype}")
        r0, r1 = self._rows, self._rows + band.shape[0]
        if r1 > self.height:
            raise ValueError(f"bands exceed the slide's {self.height} rows")
        if self._sums is None:
            self._channels = band.shape[2]
            self._sums = [np.zeros((self._n_seg[s.axis], 2, self._channels), np.float64) for s in self.specs]
        elif band.shape[2] != self._channels:
            raise ValueError(f"bands must keep {self._channels} channels, got {band.shape[2]}")
        self._add_vertical(band, r0)
        self._add_horizontal(band, r0)
        self._rows = r1

    def _add_vertical(self, band: np.ndarray, r0: int) -> None:
        idx = [i for i, s in enumerate(self.specs) if s.axis == 1]
        if not idx:
            return
        s = self.strip
        edges = sorted({e for i in idx for e in (self.specs[i].a - s, self.specs[i].a, self.specs[i].b,
                                                 self.specs[i].b + s)})
        pos = {e: k for k, e in enumerate(edges)}
        for c0 in range(0, band.shape[0], 64):  # bounded memory: 64 rows of column prefix sums at a time
            chunk = band[c0:c0 + 64]
            cs = np.zeros((chunk.shape[0], self.width + 1, chunk.shape[2]), np.int64)
            np.cumsum(chunk, axis=1, dtype=np.int64, out=cs[:, 1:])
            at = cs[:, edges]  # (rows, len(edges), channels)
            rows = np.arange(r0 + c0, r0 + c0 + chunk.shape[0])
            seg = rows // self.segment
            for i in idx:
                sp = self.specs[i]
                before = at[:, pos[sp.a]] - at[:, pos[sp.a - s]]
                after = at[:, pos[sp.b + s]] - at[:, pos[sp.b]]
                np.add.at(self._sums[i][:, 0], seg, before)
                np.add.at(self._sums[i][:, 1], seg, after)

    def _add_horizontal(self, band: np.ndarray, r0: int) -> None:
        r1 = r0 + band.shape[0]
        s = self.strip
        n = self._n_seg[0]
        seg_sums: np.ndarray | None = None
        for i, sp in enumerate(self.specs):
            if sp.axis != 0:
                continue
            for side, (lo, hi) in enumerate(((sp.a - s, sp.a), (sp.b, sp.b + s))):
                lo, hi = max(lo, r0), min(hi, r1)
                if lo >= hi:
                    continue
                if seg_sums is None:  # per row, per segment of columns: one pass over the band
                    pad = n * self.segment - self.width
                    b = np.pad(band, ((0, 0), (0, pad), (0, 0))) if pad else band
                    seg_sums = b.reshape(band.shape[0], n, self.segment, band.shape[2]).sum(axis=2,
                                                                                             dtype=np.int64)
                self._sums[i][:, side] += seg_sums[lo - r0:hi - r0].sum(axis=0)

    # ------------------------------------------------------------------ result
    def _jumps(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Jumps (grey levels) of spec ``i``'s counted segments, and their regions."""
        sp = self.specs[i]
        along = self.width if sp.axis == 0 else self.height
        lengths = np.minimum(self.segment, along - np.arange(self._n_seg[sp.axis]) * self.segment)
        means = self._sums[i] / (lengths[:, None, None] * self.strip)
        keep = self._region[i] >= 0
        return np.abs(means[:, 0] - means[:, 1]).mean(axis=1)[keep], self._region[i][keep]

    def _trimmed_mean(self, x: np.ndarray) -> float:
        if self.trim and x.size > 1:
            x = x[x <= np.quantile(x, 1 - self.trim)]
        return float(x.mean())

    def result(self) -> dict:
        """``{"quilt_score": max over kinds (None when no kind has segments), "by_kind": {kind: {"score",
        "jump", "control_jump", "segments", "control_segments"}}}``; jumps (medians) in grey levels."""
        if self._rows != self.height:
            raise ValueError(f"only {self._rows} of the slide's {self.height} rows were scored")
        by_kind: dict[str, dict] = {}
        for kind in self.kinds:
            cut = [i for i, s in enumerate(self.specs) if s.kind == kind]
            widths = {self.specs[i].b - self.specs[i].a for i in cut}
            ctrl = [i for i, s in enumerate(self.specs) if s.kind in {f"control:{w}" for w in widths}]
            j_cut, r_cut = _gather([self._jumps(i) for i in cut])
            j_ctl, r_ctl = _gather([self._jumps(i) for i in ctrl])
            ratios, weights, n_cut, n_ctl = [], [], 0, 0
            for region in np.unique(r_cut):
                here, there = j_cut[r_cut == region], j_ctl[r_ctl == region]
                if not there.size:  # no control line crosses this region: nothing to compare with
                    continue
                ratios.append((self._trimmed_mean(here) + self.floor) / (self._trimmed_mean(there) + self.floor))
                weights.append(here.size)
                n_cut, n_ctl = n_cut + here.size, n_ctl + there.size
            score = float(np.average(ratios, weights=weights)) if ratios else None
            by_kind[kind] = {"score": None if score is None else round(score, 4),
                             "jump": round(self._trimmed_mean(j_cut), 4) if j_cut.size else None,
                             "control_jump": round(self._trimmed_mean(j_ctl), 4) if j_ctl.size else None,
                             "segments": int(n_cut), "control_segments": int(n_ctl)}
        scores = [v["score"] for v in by_kind.values() if v["score"] is not None]
        return {"quilt_score": max(scores) if scores else None, "by_kind": by_kind}


def _gather(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def quilt_score(image: np.ndarray, cuts: Mapping[str, tuple[Sequence[Zone], Sequence[Zone]]],
                labels: np.ndarray | None = None, **kw) -> dict:
    """:class:`QuiltScorer` over a whole image (H, W[, C]) uint8."""
    img = np.asarray(image)
    scorer = QuiltScorer(img.shape[0], img.shape[1], cuts, labels, **kw)
    for r in range(0, img.shape[0], 512):
        scorer.add_band(img[r:r + 512])
    return scorer.result()


RIDGE_HALF_PX = 4
RIDGE_FLANK_PX = 12


def _grey_band(band: np.ndarray, width: int) -> np.ndarray:
    """A full-width uint8 band (rows, ``width``[, channels]) as grey levels (the channels' mean), float64."""
    band = np.asarray(band)
    if band.ndim not in (2, 3) or band.shape[1] != width:
        raise ValueError(f"bands must be (rows, {width}[, channels]), got {band.shape}")
    if band.dtype != np.uint8:
        raise ValueError(f"bands must be uint8, got {band.dtype}")
    return band.mean(axis=2, dtype=np.float64) if band.ndim == 3 else band.astype(np.float64)


def _row_segment_means(grey: np.ndarray, segment: int) -> np.ndarray:
    """Per row, the means of the band's whole ``segment``-px segments of columns: (rows, width // segment)."""
    n = grey.shape[1] // segment
    return grey[:, :n * segment].reshape(grey.shape[0], n, segment).mean(axis=2)


class RidgeScorer:
    """Streaming :func:`ridge_score`: a ridge (or trough) a few px wide centred on a cut, which neither the quilt
    score (block means on both sides of the cut agree) nor a 1-px gradient ratio (the ridge's top is flat) sees.

    ``rows`` / ``cols``: cut lines (p = between pixels p − 1 and p) of horizontal / vertical cuts in a
    ``height`` × ``width`` slide. Per ``segment_px`` segment of a line (whole segments only), the jump is
    |mean grey of the ``2·half_px`` px centred on the line − mean of the ``flank_px`` px on both sides|. Control
    lines at the cuts' phases modulo ``phase_px``, whose whole reach stays clear of every cut's reach, measure
    what the content alone scores (at most ``max_controls`` per axis, evenly thinned; None = all); ``avoid``:
    (rows, cols) of other cuts (another kind's) that controls must stay clear of too. Score =
    trimmed mean jump on cuts ÷ on controls (``floor_grey`` added to both): ≈ 1 when nothing marks the cuts.
    ``labels`` (H, W): count only segments whose whole block lies in one label region.

    Feed full-width uint8 bands (H, W[, C]; grey = the channels' mean) top to bottom with :meth:`add_band`,
    then read :meth:`result`. Memory: one number per line and segment.
    """

    def __init__(self, height: int, width: int, rows: Iterable[int], cols: Iterable[int],
                 labels: np.ndarray | None = None, *, avoid: tuple[Iterable[int], Iterable[int]] = ((), ()),
                 half_px: int = RIDGE_HALF_PX, flank_px: int = RIDGE_FLANK_PX,
                 segment_px: int = SEGMENT_PX, phase_px: int = PHASE_PX, max_controls: int | None = MAX_CONTROLS,
                 trim: float = TRIM, floor_grey: float = FLOOR_GREY):
        self.height, self.width = int(height), int(width)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"slide size must be positive, got {height} x {width}")
        for name, v in (("half_px", half_px), ("flank_px", flank_px), ("segment_px", segment_px),
                        ("phase_px", phase_px)):
            if int(v) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {v}")
        if not 0 <= trim < 1:
            raise ValueError(f"trim must be in [0, 1), got {trim}")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (self.height, self.width):
                raise ValueError(f"labels must be ({self.height}, {self.width}), got {labels.shape}")
        self.half, self.flank, self.segment = int(half_px), int(flank_px), int(segment_px)
        self.trim, self.floor = float(trim), float(floor_grey)
        reach = self.reach = self.half + self.flank
        # per axis (0: horizontal lines at rows, 1: vertical lines at columns): lines, whether each is a cut,
        # and per line and segment the label test; sums[axis]: (lines, segments) signed centre − flank sums
        self._lines: list[np.ndarray] = []
        self._is_cut: list[np.ndarray] = []
        self._keep: list[np.ndarray] = []
        for axis, given in ((0, rows), (1, cols)):
            extent, along = (self.height, self.width) if axis == 0 else (self.width, self.height)
            cuts = sorted({int(q) for q in given})
            others = [int(q) for q in avoid[axis]]
            inside = [q for q in cuts if reach <= q <= extent - reach]
            controls: list[int] = []
            if cuts:
                phases = {q % int(phase_px) for q in cuts}
                taken = np.zeros(extent + 1, bool)
                for q in cuts + others:
                    taken[max(0, q - 2 * reach):q + 2 * reach] = True  # a control's reach must not touch a cut's
                controls = [q for q in range(reach, extent - reach + 1) if q % int(phase_px) in phases
                            and not taken[q]]
                if max_controls is not None and len(controls) > max_controls:
                    pick = np.linspace(0, len(controls) - 1, int(max_controls)).round().astype(int)
                    controls = [controls[i] for i in pick]
            lines = np.asarray(inside + controls, np.int64)
            self._lines.append(lines)
            self._is_cut.append(np.arange(lines.size) < len(inside))
            n_seg = along // self.segment
            keep = np.ones((lines.size, n_seg), bool)
            if labels is not None and lines.size and n_seg:
                lab = labels if axis == 0 else labels.T
                for i, q in enumerate(lines):
                    block = lab[q - reach:q + reach, :n_seg * self.segment].reshape(2 * reach, n_seg, self.segment)
                    keep[i] = block.min(axis=(0, 2)) == block.max(axis=(0, 2))
            self._keep.append(keep)
        self._sums = [np.zeros((self._lines[a].size, self._keep[a].shape[1]), np.float64) for a in (0, 1)]
        # the weight of each offset from a line in its centre − flanks difference (sums to 0)
        self._weights = np.concatenate([np.full(self.flank, -0.5 / self.flank), np.full(2 * self.half, 0.5 / self.half),
                                        np.full(self.flank, -0.5 / self.flank)])
        self._rows = 0

    def add_band(self, band: np.ndarray) -> None:
        self.add_grey(_grey_band(band, self.width))

    def add_grey(self, grey: np.ndarray, seg_means: np.ndarray | None = None) -> None:
        """:meth:`add_band` for a band already in grey levels (rows, width) float64; ``seg_means``: its
        :func:`_row_segment_means` when the caller has them (several scorers of one band)."""
        r0, r1 = self._rows, self._rows + grey.shape[0]
        if r1 > self.height:
            raise ValueError(f"bands exceed the slide's {self.height} rows")
        seg = self.segment
        # horizontal lines: each row in a line's reach adds its weight × its per-segment means
        n_seg = self._sums[0].shape[1]
        if self._lines[0].size and n_seg:
            seg_means = _row_segment_means(grey, seg) if seg_means is None else seg_means
            for i, q in enumerate(self._lines[0]):
                lo, hi = max(q - self.reach, r0), min(q + self.reach, r1)
                if lo < hi:
                    w = self._weights[lo - (q - self.reach):hi - (q - self.reach)]
                    self._sums[0][i] += w @ seg_means[lo - r0:hi - r0]
        # vertical lines: per row, the weighted columns around each line, summed into that row's segment
        n_seg = self._sums[1].shape[1]
        if self._lines[1].size and n_seg:
            k = max(0, min(r1, n_seg * seg) - r0)  # rows of this band in whole segments
            if k:
                seg_of = np.arange(r0, r0 + k) // seg
                first, count = np.unique(seg_of, return_counts=True)
                starts = np.concatenate([[0], np.cumsum(count)[:-1]])
                for i, q in enumerate(self._lines[1]):  # a view of 2·reach columns per line: no copy of the band
                    d = grey[:k, q - self.reach:q + self.reach] @ self._weights  # (k,)
                    self._sums[1][i, first] += np.add.reduceat(d, starts) / seg
        self._rows = r1

    def result(self) -> dict:
        """``{"score", "cut_grey", "control_grey", "segments", "controls"}``; grey levels; score None without
        cut or control segments."""
        if self._rows != self.height:
            raise ValueError(f"only {self._rows} of the slide's {self.height} rows were scored")
        cuts, ctls = [], []
        for axis in (0, 1):
            jumps = np.abs(self._sums[axis])
            cuts.append(jumps[self._is_cut[axis]][self._keep[axis][self._is_cut[axis]]])
            ctls.append(jumps[~self._is_cut[axis]][self._keep[axis][~self._is_cut[axis]]])
        cut, ctl = np.concatenate(cuts), np.concatenate(ctls)

        def trimmed(x: np.ndarray) -> float:
            x = np.sort(x)
            return float(x[:max(1, int(round(len(x) * (1 - self.trim))))].mean())

        if not len(cut) or not len(ctl):
            return {"score": None, "cut_grey": None, "control_grey": None, "segments": int(len(cut)),
                    "controls": int(len(ctl))}
        c, k = trimmed(cut), trimmed(ctl)
        return {"score": round((c + self.floor) / (k + self.floor), 4), "cut_grey": round(c, 3),
                "control_grey": round(k, 3), "segments": int(len(cut)), "controls": int(len(ctl))}


class RidgeScorers:
    """One :class:`RidgeScorer` per kind of cut, on the centre lines of its zones (``{kind: (row_zones,
    column_zones)}`` as :class:`QuiltScorer` takes them): the grey band is made once for all kinds."""

    def __init__(self, height: int, width: int, cuts: Mapping[str, tuple[Sequence[Zone], Sequence[Zone]]],
                 labels: np.ndarray | None = None, **kw):
        def centres(zones: Sequence[Zone]) -> list[int]:
            return [(int(a) + int(b)) // 2 for a, b in zones]

        lines = {kind: (centres(rz), centres(cz)) for kind, (rz, cz) in cuts.items()}
        # each kind's controls stay clear of every kind's lines, as QuiltScorer's do of every kind's zones
        every = ([q for r, _ in lines.values() for q in r], [q for _, c in lines.values() for q in c])
        self.scorers = {kind: RidgeScorer(height, width, r, c, labels, avoid=every, **kw)
                        for kind, (r, c) in lines.items()}
        self.width = int(width)

    def add_band(self, band: np.ndarray) -> None:
        grey = _grey_band(band, self.width)
        # the band's per-segment row means, once for every kind (the scorers share the segment length)
        means: dict[int, np.ndarray] = {}
        for scorer in self.scorers.values():
            if scorer.segment not in means:
                means[scorer.segment] = _row_segment_means(grey, scorer.segment)
            scorer.add_grey(grey, means[scorer.segment])

    def result(self) -> dict:
        """``{"ridge_score": max over kinds (None when no kind has segments), "by_kind": {kind: RidgeScorer
        result}}``."""
        by_kind = {kind: s.result() for kind, s in self.scorers.items()}
        scores = [v["score"] for v in by_kind.values() if v["score"] is not None]
        return {"ridge_score": max(scores) if scores else None, "by_kind": by_kind}


def ridge_score(image: np.ndarray, rows: Sequence[int], cols: Sequence[int], labels: np.ndarray | None = None, *,
                max_controls: int | None = None, **kw) -> dict:
    """:class:`RidgeScorer` over a whole image (H, W[, C]) uint8, every control line by default."""
    img = np.asarray(image)
    scorer = RidgeScorer(img.shape[0], img.shape[1], rows, cols, labels, max_controls=max_controls, **kw)
    for r in range(0, img.shape[0], 512):
        scorer.add_band(img[r:r + 512])
    return scorer.result()
