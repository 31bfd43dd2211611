"""Procedural H&E-like tissue: label layouts and renders that follow them pixel-exactly.

Classes (DiffInfinite K = 5, reference §7): 0 unknown (glass), 1 carcinoma, 2 necrosis, 3 tumour stroma,
4 others (fat and vessels).

Rendering
---------
Every class is painted as two stain concentration fields, hematoxylin ``h`` and eosin ``e`` (optical density
per unit stain), and coloured by Beer–Lambert with the Ruifrok & Johnston (2001) H and E optical-density
vectors: ``I = 255 · exp(−(h·H + e·E))``. The designed look per class:

* carcinoma — sheets of cells (jittered-grid cells of ≈ 15 px, faint membranes) with large, irregular,
  hematoxylin-dark nuclei (chromatin texture), purple cytoplasm and a few pale clefts;
* tumour stroma — eosin-pink wavy collagen fibres (three warped stripe families blended by slow noise) with
  sparse spindle nuclei aligned with the fibres;
* necrosis — pale, blotchy pink with a hematoxylin haze and clustered small dark fragments (karyorrhexis);
* others — adipose tissue (polygonal empty cells with thin pink membranes) and vessels (a pink wall around a
  lumen of red cells);
* unknown — nearly white glass.

Each pixel's colour before blur is a pure function of (seed, absolute pixel coordinates, its own label):
all noise is hash-based value noise and jittered-grid cells keyed by integer coordinates, so rendering a
slide in bands or tiles gives exactly the render of the whole (:func:`render_region` adds a halo for the
5-tap Gaussian blur). Mild blur (σ ≈ 0.8 px) and per-pixel noise (σ ≈ 2.5 grey levels) follow; a per-seed
stain strength and a slow slide-wide intensity drift vary the look between tiles and across slides.

Layouts
-------
:func:`random_layout` draws a label map: ``kind="tile"`` mixes 1–4 classes as the argmax of smooth random
fields (organic, pixel-exact regions); ``kind="slide"`` draws a tissue section on glass with tumour islands
in stroma, necrotic cores in the larger islands and fat/vessel regions away from the tumour. Feature sizes
are in µm, so ``mpp`` sets the scale (0.5 µm/px: the image models; 2 µm/px: the mask canvas).

Datasets
--------
:func:`make_dataset` writes the tile-folder format of :mod:`training.diffinfinite_data`: ``<stem>.png`` (RGB)
and ``<stem>_mask.png`` (mode L, pixel = class id), plus ``subtypes.csv`` for slide layouts and
``dataset.json`` (generator version and arguments).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

GENERATOR_VERSION = 1
NUM_CLASSES = 5
CLASS_NAMES = {0: "unknown", 1: "carcinoma", 2: "necrosis", 3: "tumor stroma", 4: "others"}
SUBTYPE_NAMES = {0: "adenocarcinoma-like (many small islands, rare necrosis)",
                 1: "squamous-like (large solid nests with necrotic cores)"}

# Ruifrok & Johnston (2001), optical-density vectors in RGB order, normalised to unit length.
_RJ_H = np.array([0.65, 0.70, 0.29])
_RJ_E = np.array([0.07, 0.99, 0.11])
H_VECTOR = (_RJ_H / np.linalg.norm(_RJ_H)).astype(np.float32)
E_VECTOR = (_RJ_E / np.linalg.norm(_RJ_E)).astype(np.float32)
STAIN_MATRIX = np.stack([H_VECTOR, E_VECTOR])  # (2, 3): OD = [h, e] @ STAIN_MATRIX

BLUR_SIGMA = 0.8
_BLUR_TAPS = np.exp(-np.arange(-2, 3) ** 2 / (2 * BLUR_SIGMA**2))
_BLUR_TAPS = (_BLUR_TAPS / _BLUR_TAPS.sum()).astype(np.float32)
HALO = 2  # rows/columns of context the blur needs on each side
NOISE_SIGMA = 2.5  # grey levels

_M64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------------------ hashing
def _mix_int(x: int) -> int:
    x &= _M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key(seed: int, *parts: int) -> np.uint64:
    """A 64-bit stream key from the seed and integer stream ids (splitmix64 chain)."""
    x = _mix_int(int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019)
    for p in parts:
        x = _mix_int(x ^ ((int(p) * 0xD1B54A32D192ED03) & _M64))
    return np.uint64(x)


_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_CA = np.uint64(0x9E3779B97F4A7C15)
_CB = np.uint64(0xC2B2AE3D27D4EB4F)
_S30, _S27, _S31, _S40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)


def _mix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _S30)
    h = h * _C1
    h = h ^ (h >> _S27)
    h = h * _C2
    return h ^ (h >> _S31)


def _hash64(key: np.uint64, a, b) -> np.ndarray:
    """uint64 hash of integer lattice coordinates (broadcasting ``a`` against ``b``)."""
    a = np.atleast_1d(np.asarray(a).astype(np.int64)).astype(np.uint64)
    b = np.atleast_1d(np.asarray(b).astype(np.int64)).astype(np.uint64)
    return _mix(_mix(key ^ (a * _CA)) ^ (b * _CB))


def _hash01(key: np.uint64, a, b) -> np.ndarray:
    """Uniform float32 in [0, 1) per lattice point."""
    return (_hash64(key, a, b) >> _S40).astype(np.float32) * np.float32(2.0**-24)


# ------------------------------------------------------------------------------------------------ noise
def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _vnoise(py: np.ndarray, px: np.ndarray, key: np.uint64) -> np.ndarray:
    """Value noise in [0, 1] at float coordinates in lattice units (smoothstep-bilinear between hashed
    lattice values). ``py``/``px`` broadcast against each other; the result is a pure function of the
    coordinates and the key."""
    fy, fx = np.floor(py), np.floor(px)
    ty, tx = _smooth((py - fy).astype(np.float32)), _smooth((px - fx).astype(np.float32))
    iy, ix = fy.astype(np.int64), fx.astype(np.int64)
    y0, x0 = int(iy.min()), int(ix.min())
    lat = _hash01(key, np.arange(y0, int(iy.max()) + 2)[:, None], np.arange(x0, int(ix.max()) + 2)[None, :])
    ry, rx = iy - y0, ix - x0
    v00, v01 = lat[ry, rx], lat[ry, rx + 1]
    v10, v11 = lat[ry + 1, rx], lat[ry + 1, rx + 1]
    a = v00 + tx * (v01 - v00)
    b = v10 + tx * (v11 - v10)
    return a + ty * (b - a)


def _vnoise_grid(yv: np.ndarray, xv: np.ndarray, inv_scale: float, key: np.uint64) -> np.ndarray:
    """:func:`_vnoise` on the pixel grid ``yv`` × ``xv`` (1-D absolute coordinates), separably: the lattice
    is interpolated along x for the few lattice rows needed, then along y. Returns (len(yv), len(xv))."""
    inv = np.float32(inv_scale)
    py, px = yv * inv, xv * inv
    fy, fx = np.floor(py), np.floor(px)
    ty, tx = _smooth(py - fy), _smooth(px - fx)
    iy, ix = fy.astype(np.int64), fx.astype(np.int64)
    y0, x0 = int(iy.min()), int(ix.min())
    lat = _hash01(key, np.arange(y0, int(iy.max()) + 2)[:, None], np.arange(x0, int(ix.max()) + 2)[None, :])
    rx = ix - x0
    a = lat.take(rx, axis=1)
    rows = a + tx * (lat.take(rx + 1, axis=1) - a)  # (lattice rows, w)
    ry = iy - y0
    top = rows.take(ry, axis=0)
    return top + ty[:, None] * (rows.take(ry + 1, axis=0) - top)


def _fbm(yv: np.ndarray, xv: np.ndarray, scales: tuple[float, ...], key_parts: tuple[int, ...], seed: int
         ) -> np.ndarray:
    """Octaves of grid value noise at the given pixel scales (gain ½ per octave), normalised to [0, 1]."""
    gains = [0.5**i for i in range(len(scales))]
    total = None
    for i, (s, g) in enumerate(zip(scales, gains)):
        v = _vnoise_grid(yv, xv, 1.0 / s, _key(seed, *key_parts, i))
        total = v * np.float32(g) if total is None else total + v * np.float32(g)
    return total * np.float32(1.0 / sum(gains))


def _fbm_at(ys: np.ndarray, xs: np.ndarray, scales: tuple[float, ...], key_parts: tuple[int, ...], seed: int
            ) -> np.ndarray:
    """:func:`_fbm` at arbitrary points (same octave keys, so the same field)."""
    gains = [0.5**i for i in range(len(scales))]
    total = None
    for i, (s, g) in enumerate(zip(scales, gains)):
        inv = np.float32(1.0 / s)
        v = _vnoise(ys * inv, xs * inv, _key(seed, *key_parts, i))
        total = v * np.float32(g) if total is None else total + v * np.float32(g)
    return total * np.float32(1.0 / sum(gains))


def _sstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - np.float32(lo)) * np.float32(1.0 / (hi - lo)), 0.0, 1.0)
    return _smooth(t)


class _Cells:
    """A jittered grid of feature points (one per ``spacing``-px cell) over the pixel grid ``yv`` × ``xv``.

    Per-cell attributes are uniform hashes of the cell's integer coordinates, kept on a small lattice that
    covers the grid's cells ± 1; :meth:`gather` spreads a lattice array onto the pixel grid for one
    neighbour offset (two ``take``\\ s: separable, so cheap).
    """

    def __init__(self, yv: np.ndarray, xv: np.ndarray, spacing: float, seed: int, stream: int,
                 n_attr: int, jitter: tuple[float, float] = (0.15, 0.85)):
        self.spacing = np.float32(spacing)
        inv = np.float32(1.0 / spacing)
        fy, fx = yv * inv, xv * inv
        iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
        self.y0, self.x0 = int(iy.min()) - 1, int(ix.min()) - 1
        self.ry, self.rx = iy - self.y0, ix - self.x0
        # nearer half of the cell: the 2 × 2 neighbourhood that can reach a pixel when objects are small
        self.near_y = np.where(fy - iy < 0.5, -1, 1)
        self.near_x = np.where(fx - ix < 0.5, -1, 1)
        gy = np.arange(self.y0, int(iy.max()) + 2)[:, None]
        gx = np.arange(self.x0, int(ix.max()) + 2)[None, :]
        lo, span = np.float32(jitter[0]), np.float32(jitter[1] - jitter[0])
        self.cy = (gy.astype(np.float32) + lo + span * _hash01(_key(seed, stream, 0), gy, gx)) * self.spacing
        self.cx = (gx.astype(np.float32) + lo + span * _hash01(_key(seed, stream, 1), gy, gx)) * self.spacing
        self.attr = [_hash01(_key(seed, stream, 2 + k), gy, gx) for k in range(n_attr)]

    def offsets(self, full: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """Row/column lattice indices per neighbour: 3 × 3 (``full``) or the nearer 2 × 2."""
        if full:
            return [(self.ry + oy, self.rx + ox) for oy in (-1, 0, 1) for ox in (-1, 0, 1)]
        ys = (self.ry, self.ry + self.near_y)
        xs = (self.rx, self.rx + self.near_x)
        return [(a, b) for a in ys for b in xs]

    @staticmethod
    def gather(lat: np.ndarray, ry: np.ndarray, rx: np.ndarray) -> np.ndarray:
        return lat.take(rx, axis=1).take(ry, axis=0)


def _ellipses(cells: _Cells, ys: np.ndarray, xs: np.ndarray, present: np.ndarray, semi_a: np.ndarray,
              semi_b: np.ndarray, angle: np.ndarray, value: np.ndarray, edge: float = 1.0,
              full: bool = True):
    """Soft elliptical objects centred on the cells' feature points.

    ``ys``/``xs``: pixel coordinates broadcastable to the grid (possibly warped). Lattice arrays (per cell):
    ``present`` (bool), semi-axes ``semi_a`` (along ``angle``) and ``semi_b`` (px), ``value``. Returns per
    pixel the coverage in [0, 1] of the most covering object and that object's ``value``. ``full=False``
    searches only the nearer 2 × 2 cells: exact when every object's reach is under (jitter_lo + ½)·spacing.
    """
    cos_l, sin_l = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    inv_a = (1.0 / semi_a).astype(np.float32)
    inv_b = (1.0 / semi_b).astype(np.float32)
    soft = (np.minimum(semi_a, semi_b) / np.float32(edge) * present).astype(np.float32)
    g = cells.gather
    best = val = None
    for ry, rx in cells.offsets(full):
        dy = ys - g(cells.cy, ry, rx)
        dx = xs - g(cells.cx, ry, rx)
        c, s = g(cos_l, ry, rx), g(sin_l, ry, rx)
        a = (dx * c + dy * s) * g(inv_a, ry, rx)
        b = (dy * c - dx * s) * g(inv_b, ry, rx)
        m = np.clip((np.float32(1.0) - np.sqrt(a * a + b * b)) * g(soft, ry, rx), 0.0, 1.0)
        if best is None:
            best, val = m, g(value, ry, rx)
        else:
            upd = m > best
            best = np.where(upd, m, best)
            val = np.where(upd, g(value, ry, rx), val)
    return best, val


def _worley(cells: _Cells, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Distance to the second-nearest minus the nearest feature point (0 on cell membranes)."""
    d1 = d2 = None
    for ry, rx in cells.offsets(True):
        dy = ys - cells.gather(cells.cy, ry, rx)
        dx = xs - cells.gather(cells.cx, ry, rx)
        d = np.sqrt(dx * dx + dy * dy)
        if d1 is None:
            d1, d2 = d, np.full(d.shape, np.inf, np.float32)
        else:
            d2 = np.minimum(d2, np.maximum(d1, d))
            d1 = np.minimum(d1, d)
    return d2 - d1


# ------------------------------------------------------------------------------------------------ painters
# Each painter maps the pixel grid yv × xv (float32 absolute coordinates, 1-D) to the hematoxylin and eosin
# concentrations there, (len(yv), len(xv)) each, as a pure function of the coordinates and the seed.
# Stream ids keep every random field independent.
_F = np.float32


def _paint_unknown(yv, xv, seed):
    n = _fbm(yv, xv, (256.0, 64.0), (0, 1), seed)
    return _F(0.010) + _F(0.010) * n, _F(0.016) + _F(0.014) * n


def _paint_carcinoma(yv, xv, seed):
    y, x = yv[:, None], xv[None, :]
    # irregular nuclei and wavy membranes: distances are measured at domain-warped coordinates
    wy = y + _F(6.0) * (_fbm(yv, xv, (7.0, 3.5), (1, 1), seed) - _F(0.5))
    wx = x + _F(6.0) * (_fbm(yv, xv, (7.0, 3.5), (1, 2), seed) - _F(0.5))
    cells = _Cells(yv, xv, 15.0, seed, 1003, n_attr=5)
    u_p, u_r, u_asp, u_ang, u_int = cells.attr
    r = _F(4.4) + _F(2.8) * u_r
    asp = np.sqrt(_F(1.0) + _F(0.6) * u_asp)
    nuc, inten = _ellipses(cells, wy, wx, u_p < 0.93, r * asp, r / asp, _F(np.pi) * u_ang,
                           _F(0.8) + _F(0.45) * u_int, edge=1.3)
    membrane = np.clip(_F(1.0) - _worley(cells, wy, wx) * _F(1.0 / 1.6), 0.0, 1.0)
    tone = _fbm(yv, xv, (48.0, 16.0), (1, 3), seed)
    chrom = _fbm(yv, xv, (2.4, 1.3), (1, 4), seed)
    cyto_h = _F(0.26) + _F(0.14) * tone
    cyto_e = _F(0.36) + _F(0.16) * tone + _F(0.14) * membrane
    nuc_h = (_F(1.05) + _F(1.1) * chrom) * inten
    h = cyto_h + nuc * (nuc_h - cyto_h)
    e = cyto_e + nuc * (_F(0.22) - cyto_e)
    cleft = _sstep(0.72, 0.78, _fbm(yv, xv, (36.0, 14.0), (1, 5), seed))
    h = h + cleft * (_F(0.05) - h)
    e = e + cleft * (_F(0.10) - e)
    return h, e


_FIBRE_PERIOD = 8.0
_FIBRE_SHARPNESS = 14.0


def _fibre_logits(fbm, yv, xv, seed):
    return [_F(_FIBRE_SHARPNESS) * fbm(yv, xv, (110.0, 45.0), (3, 10 + k), seed) for k in range(3)]


def _paint_stroma(yv, xv, seed):
    y, x = yv[:, None], xv[None, :]
    theta0 = float(np.pi * _hash01(_key(seed, 3, 0), 0, 0)[0])
    logits = _fibre_logits(_fbm, yv, xv, seed)
    top = np.maximum(np.maximum(logits[0], logits[1]), logits[2])
    weights = [np.exp(lg - top) for lg in logits]
    norm = _F(1.0) / (weights[0] + weights[1] + weights[2])
    fib = None
    for k in range(3):
        th = theta0 + k * np.pi / 3
        c, s = _F(np.cos(th)), _F(np.sin(th))
        u = x * c + y * s  # across the fibres
        v = y * c - x * s  # along the fibres
        u = u + _F(26.0) * (_fbm(yv, xv, (80.0, 30.0), (3, 20 + k), seed) - _F(0.5))
        stripe = _F(0.5) + _F(0.5) * np.cos(u * _F(2 * np.pi / _FIBRE_PERIOD))
        stripe = stripe * stripe * stripe
        breaks = _sstep(0.30, 0.62, _vnoise(u * _F(1 / 7.0), v * _F(1 / 50.0), _key(seed, 3, 30 + k)))
        term = weights[k] * stripe * (_F(0.35) + _F(0.65) * breaks)
        fib = term if fib is None else fib + term
    fib = fib * norm
    tone = _fbm(yv, xv, (60.0, 20.0), (3, 40), seed)
    e = _F(0.22) + _F(0.70) * fib + _F(0.10) * tone
    h = _F(0.04) + _F(0.05) * fib
    # sparse spindle nuclei along the locally dominant fibre family
    cells = _Cells(yv, xv, 34.0, seed, 3003, n_attr=4)
    u_p, u_len, u_wid, u_int = cells.attr
    fam = np.argmax(np.stack(_fibre_logits(_fbm_at, cells.cy, cells.cx, seed)), axis=0).astype(np.float32)
    angle = _F(theta0 + np.pi / 2) + fam * _F(np.pi / 3)
    semi_a = _F(6.5) + _F(4.5) * u_len
    semi_b = _F(1.7) + _F(1.1) * u_wid
    nuc, inten = _ellipses(cells, y, x, u_p < 0.45, semi_a, semi_b, angle, _F(0.9) + _F(0.4) * u_int,
                           edge=1.0, full=False)
    h = h + nuc * (_F(1.35) * inten - h)
    e = e + nuc * (_F(0.25) - e)
    return h, e


def _paint_necrosis(yv, xv, seed):
    y, x = yv[:, None], xv[None, :]
    blot = _fbm(yv, xv, (40.0, 14.0, 5.0), (2, 1), seed)
    haze = _fbm(yv, xv, (26.0, 9.0), (2, 2), seed)
    grain = _vnoise_grid(yv, xv, 1 / 1.7, _key(seed, 2, 3))
    e = _F(0.09) + _F(0.24) * blot + _F(0.05) * grain
    h = _F(0.06) + _F(0.14) * haze + _F(0.04) * grain
    cells = _Cells(yv, xv, 8.0, seed, 2003, n_attr=4, jitter=(0.1, 0.9))
    u_p, u_r, u_asp, u_int = cells.attr
    cluster = _fbm_at(cells.cy, cells.cx, (30.0, 12.0), (2, 4), seed)
    present = u_p < _F(0.05) + _F(0.9) * _sstep(0.35, 0.75, cluster)
    r = _F(0.9) + _F(1.5) * u_r
    asp = np.sqrt(_F(1.0) + _F(0.8) * u_asp)
    frag, inten = _ellipses(cells, y, x, present, r * asp, r / asp, _F(7 * np.pi) * u_r,
                            _F(1.0) + _F(0.6) * u_int, edge=0.8, full=False)
    h = h + frag * (_F(1.3) * inten - h)
    e = e + frag * (_F(0.2) - e)
    return h, e


def _paint_others(yv, xv, seed):
    y, x = yv[:, None], xv[None, :]
    # adipose: polygonal cells (second-nearest minus nearest feature point distance) with thin membranes
    wy = y + _F(8.0) * (_fbm(yv, xv, (22.0,), (4, 1), seed) - _F(0.5))
    wx = x + _F(8.0) * (_fbm(yv, xv, (22.0,), (4, 2), seed) - _F(0.5))
    fat = _Cells(yv, xv, 44.0, seed, 4003, n_attr=0, jitter=(0.0, 1.0))
    mem = np.clip(_F(1.0) - _worley(fat, wy, wx) * _F(1.0 / 2.2), 0.0, 1.0)
    h = _F(0.015) + _F(0.12) * mem
    e = _F(0.025) + _F(0.62) * mem
    # vessels: an elliptical lumen of red cells inside a pink muscular wall
    ves = _Cells(yv, xv, 150.0, seed, 4004, n_attr=5, jitter=(0.3, 0.7))
    u_p, u_r, u_w, u_asp, u_ang = ves.attr
    rl = _F(16.0) + _F(22.0) * u_r
    rw = rl + _F(6.0) + _F(7.0) * u_w
    asp = np.sqrt(_F(1.0) + _F(0.7) * u_asp)
    present = u_p < 0.5
    ang = _F(np.pi) * u_ang
    outer, _ = _ellipses(ves, y, x, present, rw * asp, rw / asp, ang, rl, edge=1.2, full=False)
    lumen, _ = _ellipses(ves, y, x, present, rl * asp, rl / asp, ang, rl, edge=1.2, full=False)
    wall = np.clip(outer - lumen, 0.0, 1.0)
    rbc = _vnoise_grid(yv, xv, 1 / 2.6, _key(seed, 4, 5))
    wall_tone = _fbm(yv, xv, (12.0, 4.0), (4, 6), seed)
    h = h + wall * (_F(0.18) + _F(0.25) * wall_tone - h)
    e = e + wall * (_F(0.62) + _F(0.25) * wall_tone - e)
    h = h + lumen * (_F(0.05) - h)
    e = e + lumen * (_F(0.55) + _F(0.65) * rbc - e)
    return h, e


_PAINTERS: dict[int, Callable] = {0: _paint_unknown, 1: _paint_carcinoma, 2: _paint_necrosis, 3: _paint_stroma,
                                  4: _paint_others}


def _stain_strength(seed: int) -> tuple[float, float]:
    """Per-seed stain strength (a mild batch effect between tiles/slides)."""
    rng = np.random.default_rng([int(seed) & _M64, 0x5EED])
    return float(rng.uniform(0.88, 1.12)), float(rng.uniform(0.88, 1.12))


# ------------------------------------------------------------------------------------------------ render
def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] < 1 or labels.shape[1] < 1:
        raise ValueError(f"labels must be a 2-D (H, W) class map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must hold integer class ids, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        bad = sorted(int(v) for v in np.unique(labels[(labels < 0) | (labels >= NUM_CLASSES)])[:10])
        raise ValueError(f"labels hold class ids {bad} outside 0..{NUM_CLASSES - 1} ({', '.join(CLASS_NAMES.values())})")
    return labels


_BLOCK = 128


def _concentrations(lab: np.ndarray, y0: int, x0: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stain concentrations of the label map ``lab`` whose top-left pixel is (y0, x0) of the slide.

    Painted in blocks of ``_BLOCK`` px, each class only in the blocks where it occurs (the painters are
    pure functions of pixel coordinates, so the blocking does not change the result)."""
    H, W = lab.shape
    h = np.empty(lab.shape, np.float32)
    e = np.empty(lab.shape, np.float32)
    gh, ge = _stain_strength(seed)
    for by in range(0, H, _BLOCK):
        yv = np.arange(y0 + by, y0 + min(H, by + _BLOCK), dtype=np.float32)
        for bx in range(0, W, _BLOCK):
            xv = np.arange(x0 + bx, x0 + min(W, bx + _BLOCK), dtype=np.float32)
            sub = lab[by:by + len(yv), bx:bx + len(xv)]
            hb, eb = h[by:by + len(yv), bx:bx + len(xv)], e[by:by + len(yv), bx:bx + len(xv)]
            counts = np.bincount(sub.ravel(), minlength=NUM_CLASSES)
            drift = None
            for c in np.flatnonzero(counts):
                hc, ec = _PAINTERS[int(c)](yv, xv, seed)
                if c != 0:  # slow slide-wide intensity drift of the tissue stains
                    if drift is None:
                        drift = _F(0.9) + _F(0.2) * _fbm(yv, xv, (700.0,), (9, 1), seed)
                    hc, ec = hc * drift, ec * drift
                if counts[c] == sub.size:
                    hb[...], eb[...] = hc, ec
                else:
                    m = sub == c
                    hb[m], eb[m] = hc[m], ec[m]
    return h * _F(gh), e * _F(ge)


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable 5-tap Gaussian (σ = BLUR_SIGMA) with edge padding; same output shape."""
    t0, t1, t2 = _BLUR_TAPS[0], _BLUR_TAPS[1], _BLUR_TAPS[2]
    p = np.pad(img, ((2, 2), (0, 0), (0, 0)), mode="edge")
    img = t2 * p[2:-2] + t1 * (p[1:-3] + p[3:-1]) + t0 * (p[:-4] + p[4:])
    p = np.pad(img, ((0, 0), (2, 2), (0, 0)), mode="edge")
    return t2 * p[:, 2:-2] + t1 * (p[:, 1:-3] + p[:, 3:-1]) + t0 * (p[:, :-4] + p[:, 4:])


def _pixel_noise(y0: int, y1: int, x0: int, x1: int, seed: int) -> np.ndarray:
    """Per-pixel, per-channel noise in grey levels: one 64-bit hash per pixel gives each channel the sum of
    two 10-bit uniforms (triangular, σ = NOISE_SIGMA)."""
    ys = np.arange(y0, y1, dtype=np.int64)[:, None]
    xs = np.arange(x0, x1, dtype=np.int64)[None, :]
    h = _hash64(_key(seed, 99), ys, xs)
    out = np.empty((y1 - y0, x1 - x0, 3), np.float32)
    m10 = np.uint64(0x3FF)
    scale = np.float32(NOISE_SIGMA * np.sqrt(6.0) / 1024.0)  # the sum of two U(0,1) has σ = 1/√6
    for c in range(3):
        a = ((h >> np.uint64(20 * c)) & m10).astype(np.float32)
        b = ((h >> np.uint64(20 * c + 10)) & m10).astype(np.float32)
        out[..., c] = (a + b - np.float32(1023.0)) * scale
    return out


def render_region(labels: np.ndarray, seed: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Render rows ``[r0, r1)`` × columns ``[c0, c1)`` of the slide whose whole label map is ``labels``.

    Tiles of a partition, assembled, equal :func:`render_tile` of the whole map exactly (the blur reads a
    ``HALO``-px margin from ``labels``). Returns uint8 (r1 − r0, c1 − c0, 3).
    """
    labels = _check_labels(labels)
    H, W = labels.shape
    r0, r1 = int(rows[0]), int(rows[1])
    c0, c1 = int(cols[0]), int(cols[1])
    if not (0 <= r0 < r1 <= H and 0 <= c0 < c1 <= W):
        raise ValueError(f"region rows {rows} × cols {cols} is empty or outside the {H}×{W} label map")
    y0, y1 = max(0, r0 - HALO), min(H, r1 + HALO)
    x0, x1 = max(0, c0 - HALO), min(W, c1 + HALO)
    h, e = _concentrations(labels[y0:y1, x0:x1], y0, x0, seed)
    od = h[..., None] * H_VECTOR + e[..., None] * E_VECTOR
    rgb = np.float32(255.0) * np.exp(-od)
    rgb = _blur(rgb)[r0 - y0:r1 - y0, c0 - x0:c1 - x0]
    rgb = rgb + _pixel_noise(r0, r1, c0, c1, seed)
    return np.clip(np.floor(rgb + np.float32(0.5)), 0, 255).astype(np.uint8)


def iter_bands(labels: np.ndarray, seed: int, band_rows: int = 256) -> Iterator[np.ndarray]:
    """The render of ``labels`` as consecutive full-width bands of ``band_rows`` rows (last one shorter)."""
    labels = _check_labels(labels)
    if band_rows < 1:
        raise ValueError(f"band_rows must be ≥ 1, got {band_rows}")
    H, W = labels.shape
    for r in range(0, H, band_rows):
        yield render_region(labels, seed, (r, min(H, r + band_rows)), (0, W))


def render_tile(labels: np.ndarray, seed: int) -> np.ndarray:
    """Paint an H&E-like RGB image (uint8 (H, W, 3)) that follows the label map ``labels`` pixel-exactly.

    Works for tiles and whole slides alike (large maps are rendered in bands of 512 rows; the result does
    not depend on the banding).
    """
    labels = _check_labels(labels)
    H, W = labels.shape
    if H * W <= 1 << 21:
        return render_region(labels, seed, (0, H), (0, W))
    out = np.empty((H, W, 3), np.uint8)
    for r in range(0, H, 512):
        out[r:r + 512] = render_region(labels, seed, (r, min(H, r + 512)), (0, W))
    return out


# ------------------------------------------------------------------------------------------------ layouts
def _field(h: int, w: int, scale_px: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth zero-mean, unit-variance random field with correlation length ≈ ``scale_px``."""
    import cv2

    step = max(1.0, scale_px / 2.0)
    gh, gw = int(np.ceil(h / step)) + 4, int(np.ceil(w / step)) + 4
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    g = cv2.GaussianBlur(g, (0, 0), sigmaX=1.0, borderType=cv2.BORDER_REFLECT)
    # the grid's interior (2 cells of margin each side) is stretched onto the image
    oy, ox = 2.0, 2.0
    big = cv2.resize(g, (int(round(gw * step)), int(round(gh * step))), interpolation=cv2.INTER_CUBIC)
    sy, sx = int(round(oy * step)), int(round(ox * step))
    f = big[sy:sy + h, sx:sx + w]
    if f.shape != (h, w):
        f = cv2.resize(g[2:-2, 2:-2], (w, h), interpolation=cv2.INTER_CUBIC)
    f = f - f.mean()
    return f / (f.std() + 1e-6)


def _tile_layout(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    n = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.45, 0.27, 0.08]))
    classes = rng.choice(NUM_CLASSES, size=n, replace=False, p=[0.10, 0.30, 0.16, 0.28, 0.16])
    if n == 1:
        return np.full((h, w), classes[0], np.uint8)
    fields = np.stack([_field(h, w, rng.uniform(50, 200), rng) + rng.normal(0, 0.4) for _ in range(n)])
    return classes.astype(np.uint8)[np.argmax(fields, axis=0)]


_MOSAIC_GRIDS = ((1, 1), (2, 2), (1, 2), (2, 1))
_MOSAIC_GRID_P = (0.4, 0.4, 0.1, 0.1)
_MOSAIC_CLASS_P = (0.1, 0.25, 0.2, 0.25, 0.2)


def _mosaic_layout(h: int, w: int, rng: np.random.Generator, mpp: float) -> np.ndarray:
    """rows × cols cells (1×1, 2×2, 1×2 or 2×1) of one class each, borders warped by ±6 % of the side, and
    up to 12 % of each cell taken by inclusions of another class (blobs of ≈ 40–80 µm)."""
    rows, cols = _MOSAIC_GRIDS[int(rng.choice(len(_MOSAIC_GRIDS), p=_MOSAIC_GRID_P))]
    classes = rng.choice(NUM_CLASSES, size=rows * cols, p=_MOSAIC_CLASS_P).astype(np.uint8).reshape(rows, cols)
    side = min(h, w)
    amp = 0.06 * side
    yy = np.arange(h, dtype=np.float32)[:, None] + amp * _field(h, w, side / 4.0, rng)
    xx = np.arange(w, dtype=np.float32)[None, :] + amp * _field(h, w, side / 4.0, rng)
    r = np.clip((yy * rows / h).astype(np.int64), 0, rows - 1)
    c = np.clip((xx * cols / w).astype(np.int64), 0, cols - 1)
    labels = classes[r, c]
    share = rng.uniform(0.0, 0.12)
    if share > 0.005:
        blobs = _field(h, w, rng.uniform(40, 80) / mpp, rng)
        other = rng.choice(NUM_CLASSES, p=_MOSAIC_CLASS_P)
        inc = (blobs > np.quantile(blobs, 1.0 - share)) & (labels != other)
        labels = np.where(inc, np.uint8(other), labels)
    return labels


def _slide_layout(h: int, w: int, rng: np.random.Generator, mpp: float, subtype: int) -> np.ndarray:
    import cv2

    def px(um: float) -> float:
        return um / mpp

    side = min(h, w)
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h * 2 - 1
    xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w * 2 - 1
    cy, cx = rng.uniform(-0.1, 0.1, 2)
    ry, rx = rng.uniform(0.72, 0.95, 2)
    ang = rng.uniform(0, np.pi)
    ca, sa = np.cos(ang), np.sin(ang)
    u = ((xx - cx) * ca + (yy - cy) * sa) / rx
    v = ((yy - cy) * ca - (xx - cx) * sa) / ry
    shape = 1.0 - (u * u + v * v) + 0.35 * _field(h, w, side / 3.0, rng)
    edge = np.minimum(np.minimum(yy + 1, 1 - yy), np.minimum(xx + 1, 1 - xx))  # 0 at the image border
    shape = shape - 4.0 * (np.clip(0.3 - edge, 0.0, None) / 0.3) ** 2  # tissue rounds off before the border
    shape = np.where(edge < 0.03, -np.inf, shape)  # a glass margin all round
    tissue = shape > 0.0
    if tissue.mean() < 0.3:  # a noise draw that ate the section: keep the top 30 %
        tissue = shape > np.quantile(shape, 0.7)

    labels = np.zeros((h, w), np.uint8)
    labels[tissue] = 3
    n_tissue = int(tissue.sum())
    if n_tissue == 0:
        return labels
    island_scale = px(rng.uniform(70, 150)) if subtype == 0 else px(rng.uniform(150, 300))
    tumour_field = _field(h, w, island_scale, rng)
    frac = rng.uniform(0.25, 0.42) if subtype == 0 else rng.uniform(0.32, 0.5)
    carc = tissue & (tumour_field > np.quantile(tumour_field[tissue], 1.0 - frac))
    labels[carc] = 1
    if carc.any():
        depth = cv2.distanceTransform(carc.astype(np.uint8), cv2.DIST_L2, 5)
        core = px(rng.uniform(70, 110)) if subtype == 0 else px(rng.uniform(45, 80))
        nec = carc & (depth > core + px(15) * _field(h, w, px(40), rng))
        labels[nec] = 2
        to_tumour = cv2.distanceTransform((~carc).astype(np.uint8), cv2.DIST_L2, 5)
    else:
        to_tumour = np.full((h, w), np.inf, np.float32)
    cand = tissue & ~carc & (to_tumour > px(25))
    if cand.any():
        fat_field = _field(h, w, px(rng.uniform(100, 220)), rng)
        share = min(0.9, rng.uniform(0.06, 0.18) * n_tissue / cand.sum())
        labels[cand & (fat_field > np.quantile(fat_field[cand], 1.0 - share))] = 4
    return labels


def random_layout(height: int, width: int, seed: int, kind: Literal["tile", "slide", "mosaic"] = "tile", *,
                  mpp: float = 0.5, subtype: int | None = None) -> np.ndarray:
    """A seeded uint8 (height, width) label map.

    ``kind="tile"``: 1–4 classes as the argmax of smooth random fields (correlation 50–200 px).
    ``kind="slide"``: tissue on glass (a margin of glass all round) — tumour islands (carcinoma) in stroma,
    necrotic cores where islands are thick, fat/vessel regions at least 25 µm from the tumour. ``mpp``
    (µm per pixel of the map) sets the feature sizes; ``subtype`` 0 gives many smaller islands with rare
    necrosis, 1 larger solid nests with necrotic cores (None: drawn from the seed).
    ``kind="mosaic"``: 1×1, 2×2, 1×2 or 2×1 cells of one class each with warped borders and a few small
    inclusions of another class (∞-Brush: images whose regions a grid of embeddings describes).
    """
    if height < 1 or width < 1:
        raise ValueError(f"layout size must be positive, got {height}×{width}")
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    rng = np.random.default_rng([int(seed) & _M64, 0x1A70])
    if kind == "tile":
        return _tile_layout(int(height), int(width), rng)
    if kind == "slide":
        st = int(rng.integers(2)) if subtype is None else int(subtype)
        if st not in SUBTYPE_NAMES:
            raise ValueError(f"subtype must be 0 or 1, got {subtype}")
        return _slide_layout(int(height), int(width), rng, float(mpp), st)
    if kind == "mosaic":
        return _mosaic_layout(int(height), int(width), rng, float(mpp))
    raise ValueError(f"kind must be 'tile', 'slide' or 'mosaic', got {kind!r}")


def layout_subtype(seed: int, subtype: int | None = None) -> int:
    """The subtype :func:`random_layout` (kind="slide") uses for this seed."""
    if subtype is not None:
        return int(subtype)
    return int(np.random.default_rng([int(seed) & _M64, 0x1A70]).integers(2))


# ------------------------------------------------------------------------------------------------ datasets
def item_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` of a dataset made with ``seed`` (layout and render)."""
    return int(np.random.SeedSequence([int(seed) & _M64, int(index)]).generate_state(1, np.uint32)[0])


def _write_item(args) -> tuple[str, int | None, list[int]]:
    from PIL import Image

    out_dir, index, seed, size, kind, mpp = args
    s = item_seed(seed, index)
    stem = f"{kind}_{index:05d}"
    subtype = layout_subtype(s) if kind == "slide" else None
    labels = random_layout(size, size, s, kind, mpp=mpp, subtype=subtype)
    image = render_tile(labels, s)
    Image.fromarray(image).save(Path(out_dir) / f"{stem}.png")
    Image.fromarray(labels, mode="L").save(Path(out_dir) / f"{stem}_mask.png")
    return stem, subtype, np.bincount(labels.ravel(), minlength=NUM_CLASSES).tolist()


def make_dataset(out_dir: str | Path, n_tiles: int, size: int = 512, seed: int = 0, *,
                 kind: Literal["tile", "slide", "mosaic"] = "tile", mpp: float = 0.5, workers: int = 1) -> Path:
    """Write ``n_tiles`` (image, mask) pairs in the tile-folder format of ``training.diffinfinite_data``:
    ``<kind>_<i>.png`` (RGB) and ``<kind>_<i>_mask.png`` (L, pixel = class id); for slide layouts also
    ``subtypes.csv`` (mask-model training); and ``dataset.json`` (arguments, class pixel counts).

    Item i depends only on (seed, i), so any prefix of a larger dataset is the smaller dataset.
    """
    if n_tiles < 1:
        raise ValueError(f"n_tiles must be ≥ 1, got {n_tiles}")
    if size < 8:
        raise ValueError(f"size must be ≥ 8 px, got {size}")
    if kind not in ("tile", "slide", "mosaic"):
        raise ValueError(f"kind must be 'tile', 'slide' or 'mosaic', got {kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), i, seed, size, kind, mpp) for i in range(n_tiles)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_write_item, jobs, chunksize=4))
    else:
        results = [_write_item(j) for j in jobs]
    counts = np.sum([r[2] for r in results], axis=0).tolist()
    if kind == "slide":
        (out / "subtypes.csv").write_text("name,subtype\n" + "".join(f"{stem},{st}\n" for stem, st, _ in results))
    meta = {"generator": "procedural.tissue", "version": GENERATOR_VERSION, "kind": kind, "n": n_tiles,
            "size": size, "seed": seed, "mpp": mpp, "classes": CLASS_NAMES, "class_pixels": counts}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
