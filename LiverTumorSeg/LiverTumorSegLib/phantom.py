"""Synthetic abdominal CT phantoms (int16 HU) with liver, tumour and cyst labels.

The anatomy is a set of analytic shapes in a patient frame (mm; x toward the patient's left,
y posterior, z superior, as LPS, with the body axis at x = y = 0 and the right liver lobe centred
at z = 0). It is evaluated at the physical centres of the voxels, so every direction matrix keeps
each organ in its right physical place. Three random streams (anatomy, geometry, noise) keep a
seed's anatomy the same whatever grid it is rendered on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import OutputError
from .volume import Volume

LABEL_LIVER, LABEL_TUMOR, LABEL_CYST = 1, 2, 3

_SLICE_SPACINGS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
_FLIPS = ((1, 1, 1), (1, -1, -1), (-1, -1, 1), (1, 1, -1), (-1, -1, -1))  # LPS, LAI, RAS, LPI, RAI
_DEFAULT_MATRIX = 512
_COARSE_MM = 3.0  # grid of the liver model used for calibration and lesion placement
_AIR, _GAS = -1000.0, -950.0
_EVERYWHERE = (np.full(3, -1e6), np.full(3, 1e6))


# --------------------------------------------------------------------------- shapes


def _rot(axis: int, deg: float) -> np.ndarray:
    """Rotation by ``deg`` degrees about coordinate axis 0 (x), 1 (y) or 2 (z)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = (a for a in range(3) if a != axis)
    m = np.eye(3)
    m[i, i] = m[j, j] = c
    m[i, j], m[j, i] = -s, s
    return m


def _random_rotation(rng: np.random.Generator, deg: float) -> np.ndarray:
    return _rot(0, rng.uniform(-deg, deg)) @ _rot(1, rng.uniform(-deg, deg)) @ _rot(2, rng.uniform(-deg, deg))


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


@dataclass
class _Ellipsoid:
    centre: np.ndarray
    axes: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns: the axis directions

    def q(self, x, y, z):
        """Squared normalised radius: < 1 inside."""
        d = (x - float(self.centre[0]), y - float(self.centre[1]), z - float(self.centre[2]))
        q = 0.0
        for m in range(3):
            w = [float(self.rot[l, m] / self.axes[m]) for l in range(3)]
            q = q + (d[0] * w[0] + d[1] * w[1] + d[2] * w[2]) ** 2
        return q

    def box(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.rot * self.axes) ** 2).sum(1)) + margin
        return self.centre - half, self.centre + half

    def scaled(self, factor: float, add: float = 0.0) -> "_Ellipsoid":
        return _Ellipsoid(self.centre, np.maximum(self.axes * factor + add, 0.5), self.rot)


def _segment(x, y, z, a: np.ndarray, b: np.ndarray):
    """Distance to the segment a-b, and the position (0..1) of the nearest point along it."""
    d = [float(v) for v in b - a]
    inv_l2 = 1.0 / max(d[0] ** 2 + d[1] ** 2 + d[2] ** 2, 1e-9)
    px, py, pz = x - float(a[0]), y - float(a[1]), z - float(a[2])
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) * inv_l2, 0.0, 1.0)
    return np.sqrt((px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2), t


def _polyline_distance(x, y, z, points: np.ndarray):
    dist = None
    for a, b in zip(points[:-1], points[1:]):
        d = _segment(x, y, z, a, b)[0]
        dist = d if dist is None else np.minimum(dist, d)
    return dist


# --------------------------------------------------------------------------- grid and canvas


@dataclass
class _Geometry:
    spacing: tuple[float, float, float]  # (i, j, k) mm
    shape: tuple[int, int, int]  # (k, j, i)
    origin: np.ndarray  # LPS mm
    direction: np.ndarray  # rotation about z times axis flips


class _View(NamedTuple):
    x: np.ndarray  # (1, J, I) patient-frame mm
    y: np.ndarray
    z: np.ndarray  # (K, 1, 1)
    ct: np.ndarray  # (K, J, I) views into the canvas
    lab: np.ndarray


class _Grid:
    """Patient-frame coordinates of the voxel centres: x and y depend on (j, i) only, z on k only."""

    def __init__(self, geo: _Geometry, offset: np.ndarray):
        m = geo.direction @ np.diag(geo.spacing)
        if np.abs(m[:2, 2]).max() > 1e-9 or np.abs(m[2, :2]).max() > 1e-9:
            raise ValueError("the direction may only rotate about z")
        self.shape = geo.shape
        nk, nj, ni = geo.shape
        o = np.asarray(geo.origin, float) - offset
        j, i = np.mgrid[0:nj, 0:ni]
        self.x = (o[0] + m[0, 0] * i + m[0, 1] * j).astype(np.float32)
        self.y = (o[1] + m[1, 0] * i + m[1, 1] * j).astype(np.float32)
        self.z = (o[2] + m[2, 2] * np.arange(nk)).astype(np.float32)
        self._o, self._inv2, self._dz = o, np.linalg.inv(m[:2, :2]), m[2, 2]

    def block(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index ranges covering every voxel whose centre lies in the box [lo, hi]."""
        corners = np.array([[lo[0], lo[1]], [lo[0], hi[1]], [hi[0], lo[1]], [hi[0], hi[1]]], float)
        ij = (corners - self._o[:2]) @ self._inv2.T
        kk = (np.array([lo[2], hi[2]], float) - self._o[2]) / self._dz
        lows = np.floor(np.r_[kk.min(), ij[:, 1].min(), ij[:, 0].min()])
        highs = np.ceil(np.r_[kk.max(), ij[:, 1].max(), ij[:, 0].max()]) + 1
        lows = np.clip(lows, 0, self.shape).astype(int)
        highs = np.clip(highs, 0, self.shape).astype(int)
        if np.any(highs <= lows):
            return None
        return tuple(slice(a, b) for a, b in zip(lows, highs))


class _Canvas:
    """The HU (float32) and label volumes being painted."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        self.ct = np.full(grid.shape, _AIR, np.float32)
        self.lab = np.zeros(grid.shape, np.uint8)

    def views(self, lo, hi, chunk: int = 16):
        """Views over the voxels of the box [lo, hi], a slab of at most ``chunk`` slices at a time."""
        block = self.grid.block(lo, hi)
        if block is None:
            return
        sk, sj, si = block
        x, y = self.grid.x[None, sj, si], self.grid.y[None, sj, si]
        for k0 in range(sk.start, sk.stop, chunk):
            ks = slice(k0, min(k0 + chunk, sk.stop))
            yield _View(x, y, self.grid.z[ks, None, None], self.ct[ks, sj, si], self.lab[ks, sj, si])


def _put(view: _View, mask, hu, label: int | None = None) -> None:
    np.copyto(view.ct, hu, where=mask)
    if label is not None:
        np.copyto(view.lab, label, where=mask)


def _paint_tube(canvas: _Canvas, points, radii, hu, *, label: int | None = None, within: int | None = None,
                clip: Callable | None = None):
    """A tube along a polyline; ``radii`` is one value or one per point; ``hu`` a value or f(view).

    ``within`` restricts it to voxels of that label, ``clip(x, y, z)`` to where that is true.
    """
    points = np.asarray(points, float)
    radii = np.broadcast_to(np.asarray(radii, float), len(points))
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        ra, rb = float(ra), float(rb)
        for v in canvas.views(np.minimum(a, b) - max(ra, rb), np.maximum(a, b) + max(ra, rb)):
            dist, t = _segment(v.x, v.y, v.z, a, b)
            mask = dist < ra + (rb - ra) * t
            if within is not None:
                mask &= v.lab == within
            if clip is not None:
                mask &= clip(v.x, v.y, v.z)
            _put(v, mask, hu(v) if callable(hu) else hu, label)


def _paint_ellipsoid(canvas: _Canvas, ell: _Ellipsoid, hu, *, label=None, clip: Callable | None = None):
    """Fills an ellipsoid; ``clip(x, y, z)`` optionally restricts it."""
    for v in canvas.views(*ell.box()):
        mask = ell.q(v.x, v.y, v.z) < 1
        if clip is not None:
            mask &= clip(v.x, v.y, v.z)
        _put(v, mask, hu(v) if callable(hu) else hu, label)


# --------------------------------------------------------------------------- lesions


@dataclass
class _Lesion:
    centre: np.ndarray
    radius: float
    rot: np.ndarray
    stretch: np.ndarray  # per local axis
    bumps: list  # (amplitude, frequency, unit direction, phase): lobulated margin
    texture: list  # (amplitude HU, wave vector, phase): internal heterogeneity
    hu: float
    margin: float  # width (mm) of the blurred edge; 0: sharp
    label: int
    core: tuple[float, float] | None = None  # (radius fraction, HU drop): necrotic centre

    def extent(self) -> float:
        return self.radius * (1 + sum(b[0] for b in self.bumps)) * float(self.stretch.max()) + self.margin

    def paint(self, canvas: _Canvas) -> None:
        """Blends the lesion into the liver (labels 1-3) only; its label covers the half-way level."""
        e = self.extent()
        for v in canvas.views(self.centre - e, self.centre + e):
            region = v.lab >= LABEL_LIVER
            if not region.any():
                continue
            d = (v.x - float(self.centre[0]), v.y - float(self.centre[1]), v.z - float(self.centre[2]))
            u = [sum(d[l] * float(self.rot[l, m] / self.stretch[m]) for l in range(3)) for m in range(3)]
            dist = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
            inv = 1.0 / np.maximum(dist, 1e-3)
            edge = 1.0
            for amp, freq, n, phase in self.bumps:
                edge = edge + amp * np.cos((u[0] * n[0] + u[1] * n[1] + u[2] * n[2]) * inv * freq + phase)
            edge = edge * self.radius
            if self.margin > 0:
                frac = np.clip((edge - dist) * (1.0 / self.margin) + 0.5, 0.0, 1.0)
            else:
                frac = (dist < edge).astype(np.float32)
            hu = self.hu
            for amp, k, phase in self.texture:
                hu = hu + amp * np.sin(u[0] * k[0] + u[1] * k[1] + u[2] * k[2] + phase)
            if self.core is not None:
                fraction, drop = self.core
                hu = hu - drop * np.clip((fraction * self.radius - dist) * 0.25 + 0.5, 0.0, 1.0)
            mask = region & (frac > 0)
            np.copyto(v.ct, v.ct + frac * (hu - v.ct), where=mask)
            np.copyto(v.lab, self.label, where=region & (frac >= 0.5))


def _draw_lesion(rng, centre, radius, label, hu) -> _Lesion:
    tumour = label == LABEL_TUMOR
    bumps = [
        (rng.uniform(0.02, 0.07) if tumour else rng.uniform(0.0, 0.01), rng.uniform(2, 6),
         _random_unit(rng).tolist(), rng.uniform(0, 2 * math.pi))
        for _ in range(4)
    ]
    stretch = 1 + rng.uniform(-0.15, 0.15, 3) if tumour else 1 + rng.uniform(-0.06, 0.06, 3)
    texture = []
    core = None
    if tumour:
        texture = [(rng.uniform(2, 6), np.multiply(_random_unit(rng), rng.uniform(0.2, 0.6)).tolist(),
                    rng.uniform(0, 2 * math.pi)) for _ in range(3)]
        if radius > 15 and rng.random() < 0.4:
            core = (rng.uniform(0.3, 0.55), rng.uniform(10, min(30, hu - 40)))
    return _Lesion(np.asarray(centre, float), float(radius), _random_rotation(rng, 180), stretch, bumps, texture,
                   float(hu), rng.uniform(1.0, 2.5) if tumour else 0.0, label, core)


# --------------------------------------------------------------------------- coarse liver model


@dataclass
class _CoarseMask:
    """A boolean mask on an axis-aligned patient-frame grid (indexed x, y, z) with its depth in mm."""

    lo: np.ndarray
    mask: np.ndarray
    depth: np.ndarray

    @staticmethod
    def axes(lo, hi) -> tuple[np.ndarray, ...]:
        n = np.maximum(np.ceil((np.asarray(hi) - lo) / _COARSE_MM).astype(int) + 1, 1)
        return tuple(
            (lo[a] + _COARSE_MM * np.arange(n[a])).reshape([-1 if b == a else 1 for b in range(3)]) for a in range(3)
        )

    def volume_ml(self) -> float:
        return float(self.mask.sum()) * _COARSE_MM ** 3 / 1000

    def points(self, min_depth: float = 0.0) -> np.ndarray:
        return self.lo + _COARSE_MM * np.argwhere(self.depth >= max(min_depth, 1e-6))

    def depth_at(self, p) -> float:
        idx = np.round((np.asarray(p) - self.lo) / _COARSE_MM).astype(int)
        if np.any(idx < 0) or np.any(idx >= self.mask.shape):
            return 0.0
        return float(self.depth[tuple(idx)])

    def bounds(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        idx = np.argwhere(self.mask)
        return self.lo + _COARSE_MM * idx.min(0) - margin, self.lo + _COARSE_MM * idx.max(0) + margin


# --------------------------------------------------------------------------- the patient


class _Phantom:
    """One patient's anatomy, drawn from ``rng`` (patient frame, mm), and its painting on a canvas."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self._draw_body()
        self._draw_spine_and_great_vessels()
        self._draw_liver()
        self._calibrate_liver(rng.uniform(1200, 2000) * 1.05)  # the gallbladder, aorta and ribs take ~5 %
        self._draw_upper_organs()
        self._draw_bowel()
        self._draw_liver_vessels()
        self._draw_lesions()
        self._draw_ribs()
        self.offset = np.array([rng.uniform(-20, 20), rng.uniform(-30, 10), rng.uniform(-600, -100)])

    # ---- body wall, diaphragm, lungs

    def _draw_body(self):
        rng = self.rng
        self.a0 = rng.uniform(150, 190)
        self.b0 = min(rng.uniform(110, 140), 0.82 * self.a0)
        self.body_waves = [(rng.uniform(0.02, 0.05), 2 * math.pi / rng.uniform(250, 450), rng.uniform(0, 2 * math.pi))
                           for _ in range(2)]
        self.square = rng.uniform(0.3, 0.6)  # flat back
        fat = (rng.uniform(10, 35), rng.uniform(10, 45), rng.uniform(8, 25))  # lateral, anterior, posterior
        muscle = rng.uniform(8, 14)
        self.inset_fat = fat
        self.inset_muscle = tuple(f + muscle for f in fat)
        self.inset_ribs = tuple(f + muscle / 2 for f in fat)
        self.hu_fat = rng.uniform(-120, -80)
        self.hu_visceral_fat = float(np.clip(self.hu_fat + rng.uniform(-10, 10), -120, -80))
        self.hu_muscle = rng.uniform(40, 60)
        self.hu_skin = rng.uniform(20, 50)
        self.hu_lung = rng.uniform(-880, -820)
        # the abdominal cavity at z = 0: x = am * xi, y = yc + bm * eta
        self.am = self.a0 - fat[0] - muscle
        self.bm = self.b0 - (fat[1] + fat[2]) / 2 - muscle
        self.yc = (fat[1] - fat[2]) / 2
        self.y_back = self.yc + self.bm
        self.t_dia = rng.uniform(3, 6)

    def _semi_axes(self, z):
        (wa, ka, pa), (wb, kb, pb) = self.body_waves
        return self.a0 * (1 + wa * np.sin(ka * z + pa)), self.b0 * (1 + wb * np.sin(kb * z + pb))

    def _r2(self, x, y, z, inset):
        """Squared normalised radius (< 1 inside) of the body outline moved in by ``inset`` mm."""
        lat, ant, post = (float(v) for v in inset)
        a, b = self._semi_axes(z)
        u2 = (x * x) * (1.0 / (a - lat) ** 2)
        v = (y - (ant - post) / 2) * (1.0 / (b - (ant + post) / 2))
        v2 = v * v
        corner = np.minimum(u2, 1.0) * np.minimum(v2, 1.0) * self.square
        return u2 + v2 - np.where(v > 0, corner, 0.0)

    def _outline(self, inset, phi, z):
        """Points of an outline at angles ``phi`` (0: posterior midline, pi/2: patient's left)."""
        s, c = np.sin(phi), np.cos(phi)
        lo, hi = np.zeros_like(phi), np.full_like(phi, 400.0)
        for _ in range(30):
            mid = (lo + hi) / 2
            inside = self._r2(mid * s, mid * c, z, inset) < 1
            lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
        return lo * s, lo * c

    def _spine_block(self, x, y):
        """The spine and paraspinal muscles, which the cavity wraps around."""
        return (x * (1.0 / self.block_w)) ** 2 + ((y - self.y_back - 10) * (1.0 / self.block_h)) ** 2 < 1

    def _cavity(self, x, y, z):
        return (self._r2(x, y, z, self.inset_muscle) < 1) & ~self._spine_block(x, y)

    def _diaphragm(self, x, y):
        """Height of the diaphragm's upper surface: the larger of two domes."""
        k = 0.5 / self.dome_curv
        (xr, yr, zr), (xl, yl, zl) = self.domes
        return np.maximum(zr - ((x - xr) ** 2 + (y - yr) ** 2) * k, zl - ((x - xl) ** 2 + (y - yl) ** 2) * k)

    def _abdomen(self, x, y, z):
        """Inside the abdominal cavity, below the diaphragm."""
        return self._cavity(x, y, z) & (z < self._diaphragm(x, y) - self.t_dia)

    def _paint_body(self, canvas: _Canvas):
        skin = (1 - 2.0 / self.b0) ** 2
        table_y = self.b0 + self.table_gap
        for v in canvas.views(*_EVERYWHERE):
            plate_y = v.y - table_y + 0.0008 * v.x * v.x  # a trough, its rims curving up
            wide = np.abs(v.x) < 230
            _put(v, wide & (plate_y > 0) & (plate_y < 45), -950.0)
            _put(v, wide & (((plate_y > 0) & (plate_y < 3)) | ((plate_y > 42) & (plate_y < 45))), self.hu_table)
            r_skin = self._r2(v.x, v.y, v.z, (0, 0, 0))
            _put(v, r_skin < 1, self.hu_skin)
            _put(v, r_skin < skin, self.hu_fat)
            _put(v, self._r2(v.x, v.y, v.z, self.inset_fat) < 1, self.hu_muscle)
            cavity = self._cavity(v.x, v.y, v.z)
            dome = self._diaphragm(v.x, v.y)
            _put(v, cavity & (v.z < dome - self.t_dia), self.hu_visceral_fat)  # the diaphragm stays muscle
            _put(v, cavity & (v.z > dome), self.hu_lung + 0.3 * (v.y - self.yc))  # denser where dependent

    # ---- spine, aorta, IVC

    def _draw_spine_and_great_vessels(self):
        rng = self.rng
        self.vb = (rng.uniform(19, 24), rng.uniform(14, 18))  # vertebral body half width, half depth
        self.y_vb = self.y_back - rng.uniform(70, 80)
        self.block_w = rng.uniform(60, 70)
        self.block_h = self.y_back + 10 - self.y_vb - 0.3 * self.vb[1]
        self.canal = (self.y_vb + self.vb[1] + 10, rng.uniform(7, 9))
        self.levels = (rng.uniform(30, 36), rng.uniform(7, 10), rng.uniform(0, 36))  # period, disc, phase
        self.hu_cortex, self.hu_marrow = rng.uniform(700, 1200), rng.uniform(200, 300)
        self.hu_disc, self.cortex = rng.uniform(70, 100), rng.uniform(1.5, 2.5)
        self.hu_blood = rng.uniform(150, 200)
        self.hu_ivc = rng.uniform(150, 200)
        front = self.y_vb - self.vb[1]
        r = self.r_aorta = rng.uniform(10, 13)
        self.aorta = np.array([[self.vb[0] + r + 2, self.y_vb - 0.3 * self.vb[1], 400],
                               [rng.uniform(10, 16), front - r - 2, 20], [rng.uniform(6, 12), front - r - 2, -500]])
        # the IVC ends in the right atrium, just above the diaphragm
        r = self.r_ivc = rng.uniform(10, 13)
        self.ivc = np.array([[-rng.uniform(15, 22), front - r - rng.uniform(12, 20), 90],
                             [-rng.uniform(20, 28), front - r + rng.uniform(0, 6), 0],
                             [-self.vb[0] - 2, front - r + 4, -500]])
        self.psoas = (self.vb[0] + rng.uniform(10, 16), self.y_vb - 2, rng.uniform(20, 26))  # x, y, max radius
        self.hu_table = rng.uniform(100, 300)
        self.table_gap = rng.uniform(2, 10)

    def _paint_spine(self, canvas: _Canvas):
        period, disc_height, phase = self.levels
        (rx, ry), cy = self.vb, self.y_vb
        canal_y, canal_r = self.canal
        lo, hi = (-rx - 32, cy - ry - 1, -1e6), (rx + 32, self.y_back - 6, 1e6)
        for v in canvas.views(lo, hi):
            zp = np.mod(v.z - phase, period)
            disc = zp < disc_height
            plate = (zp < disc_height + self.cortex) | (zp > period - self.cortex)
            mid = np.abs(zp - (period + disc_height) / 2) < 5
            body = (v.x / rx) ** 2 + ((v.y - cy) / ry) ** 2 < 1
            marrow = (v.x / (rx - self.cortex)) ** 2 + ((v.y - cy) / (ry - self.cortex)) ** 2 < 1
            _put(v, body, np.where(disc, self.hu_disc, np.where(plate | ~marrow, self.hu_cortex, self.hu_marrow)), 0)
            canal_d = np.sqrt(v.x ** 2 + (v.y - canal_y) ** 2)
            arch = (canal_d < canal_r + 5) & (v.y > canal_y - 3)
            spinous = (np.abs(v.x) < 4) & (v.y > canal_y) & (v.y < self.y_back - 6)
            transverse = (np.abs(v.x) < rx + 22) & (np.abs(v.y - canal_y - 0.3 * np.abs(v.x)) < 3.5)
            _put(v, ~disc & (arch | spinous | (mid & transverse)), self.hu_cortex * 0.8, 0)
            _put(v, canal_d < canal_r, 20.0, 0)

    def _paint_psoas(self, canvas: _Canvas):
        x0, y0, rmax = self.psoas
        top = float(self.kidneys[0].centre[2])
        for side in (-1, 1):
            for v in canvas.views((side * x0 - rmax, y0 - rmax, -1e6), (side * x0 + rmax, y0 + rmax, top)):
                r = np.clip((top - v.z) * 0.2, 0.5, rmax)
                _put(v, ((v.x - side * x0) / r) ** 2 + ((v.y - y0) / (0.8 * r)) ** 2 < 1, self.hu_muscle, 0)

    # ---- liver

    def _draw_liver(self):
        rng = self.rng
        am, bm, yc = self.am, self.bm, self.yc
        self.liver_c = np.array([-rng.uniform(0.42, 0.5) * am, yc + rng.uniform(-0.1, 0.05) * bm, 0.0])
        right = _Ellipsoid(np.zeros(3), np.array([rng.uniform(0.45, 0.55) * am, rng.uniform(0.7, 0.85) * bm,
                                                  rng.uniform(70, 85)]),
                           _rot(1, rng.uniform(10, 25)) @ _random_rotation(rng, 8))
        left = _Ellipsoid(np.array([rng.uniform(55, 75), -rng.uniform(0.4, 0.55) * bm, rng.uniform(15, 30)]),
                          np.array([rng.uniform(55, 70), rng.uniform(28, 38), rng.uniform(28, 38)]),
                          _rot(2, rng.uniform(-25, 0)) @ _random_rotation(rng, 10))
        ivc_rel = self.ivc[1] - self.liver_c
        caudate = _Ellipsoid(ivc_rel + [rng.uniform(15, 25), -rng.uniform(8, 15), rng.uniform(5, 20)],
                             np.array([rng.uniform(18, 24), rng.uniform(16, 22), rng.uniform(30, 40)]),
                             _random_rotation(rng, 15))
        self.lobes = [right, left, caudate]
        self.liver_waves = [  # (amplitude mm, wave vector, displacement direction, phase)
            (rng.uniform(4, 8), np.multiply(_random_unit(rng), 2 * math.pi / rng.uniform(90, 160)).tolist(),
             _random_unit(rng).tolist(), rng.uniform(0, 2 * math.pi)) for _ in range(3)]
        self.top0 = math.sqrt(((right.rot[2] * right.axes) ** 2).sum())  # the right lobe's top, unscaled
        self.dome_drop = rng.uniform(5, 15)
        self.dome_curv = rng.uniform(90, 120)
        self.left_dome = (rng.uniform(0.4, 0.5) * am, yc - rng.uniform(0, 0.1) * bm, rng.uniform(10, 25))
        self.hu_liver = rng.uniform(90, 120)
        self.hu_vessel = rng.uniform(150, 180)
        self.scale = 1.0

    def _set_scale(self, scale: float):
        self.scale = scale
        xl, yl, drop = self.left_dome
        z_right = scale * self.top0 - self.dome_drop
        self.domes = ((float(self.liver_c[0]) * 0.95, self.yc - 0.05 * self.bm, z_right), (xl, yl, z_right - drop))

    def _liver_field(self, x, y, z):
        """Smooth implicit liver shape (> 0 inside) before clipping by its neighbours."""
        inv = 1.0 / self.scale
        c = self.liver_c
        p = [(x - float(c[0])) * inv, (y - float(c[1])) * inv, (z - float(c[2])) * inv]
        for amp, k, n, phase in self.liver_waves:
            w = amp * np.sin(p[0] * k[0] + p[1] * k[1] + p[2] * k[2] + phase)
            p = [p[a] + w * n[a] for a in range(3)]
        total = 0.0
        for lobe in self.lobes:
            total = total + np.exp(-3.0 * (lobe.q(*p) - 1.0))
        return total - 1.0

    def _liver(self, x, y, z):
        inside = (self._liver_field(x, y, z) > 0) & self._abdomen(x, y, z)
        return inside & (_polyline_distance(x, y, z, self.ivc) > self.r_ivc)

    def _liver_box(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        lows, highs = zip(*(lobe.box() for lobe in self.lobes))
        warp = sum(w[0] for w in self.liver_waves)
        reach = self.scale * (np.max(highs, 0) + warp) + margin
        return self.liver_c + self.scale * (np.min(lows, 0) - warp) - margin, self.liver_c + reach

    def _calibrate_liver(self, volume_ml: float):
        """Scales the liver to ``volume_ml`` (measured on a coarse grid, after clipping)."""
        scale = 1.0
        for _ in range(3):
            self._set_scale(scale)
            self.coarse = self._coarse_liver()
            scale *= (volume_ml / max(self.coarse.volume_ml(), 1.0)) ** (1 / 3)
        self._set_scale(scale)
        self.coarse = self._coarse_liver()

    def _coarse_liver(self) -> _CoarseMask:
        lo, hi = self._liver_box(5)
        mask = self._liver(*_CoarseMask.axes(lo, hi))
        depth = ndimage.distance_transform_edt(mask) * _COARSE_MM
        return _CoarseMask(lo, mask, depth)

    def _paint_liver(self, canvas: _Canvas):
        for v in canvas.views(*self.coarse.bounds(2 * _COARSE_MM)):
            _put(v, self._liver(v.x, v.y, v.z), self.hu_liver, LABEL_LIVER)

    def _draw_liver_vessels(self):
        """Portal and hepatic vein trees (segments a, b, radius) painted inside the liver only."""
        rng, s, c = self.rng, self.scale, self.liver_c
        self.liver_vessels = []
        hilum = self._nearest_liver_point(c + s * np.array([40, -20, -30]))
        left_lobe = c + s * self.lobes[1].centre
        for target in (c + s * np.array([-15, 5, 0]), left_lobe):
            d = target - hilum
            self._vessel_tree(hilum, d / np.linalg.norm(d), rng.uniform(6.5, 8), 0.5 * np.linalg.norm(d), 4)
        top = self.domes[0][2] - rng.uniform(20, 35)
        root = np.array([np.interp(top, self.ivc[::-1, 2], self.ivc[::-1, a]) for a in range(2)] + [top])
        for direction in ((-1, 0.15, -0.5), (-0.15, -1, -0.6), (0.7, -0.7, -0.3)):
            d = np.array(direction) + rng.uniform(-0.2, 0.2, 3)
            self._vessel_tree(root, d / np.linalg.norm(d), rng.uniform(5.5, 7.5), rng.uniform(35, 50) * s, 4)
        self.portal_trunk = np.array([self.confluence, hilum])

    def _nearest_liver_point(self, p) -> np.ndarray:
        points = self.coarse.points(8.0)
        if len(points) == 0:
            points = self.coarse.points()
        return points[np.argmin(((points - p) ** 2).sum(1))]

    def _vessel_tree(self, start, direction, radius, length, depth):
        """A segment and, while it stays in the liver, two narrower branches from its end."""
        end = start + direction * length
        if self.coarse.depth_at(end) <= 0:  # leaving the liver: a last, shorter segment
            self.liver_vessels.append((start, start + direction * length / 2, radius))
            return
        self.liver_vessels.append((start, end, radius))
        if depth == 0:
            return
        axis = np.cross(direction, _random_unit(self.rng))
        axis /= np.linalg.norm(axis)
        for sign in (-1, 1):
            angle = math.radians(sign * self.rng.uniform(20, 45))
            child = direction * math.cos(angle) + np.cross(axis, direction) * math.sin(angle)
            self._vessel_tree(end, child, radius * 0.72, length * self.rng.uniform(0.6, 0.85), depth - 1)

    # ---- lesions

    def _draw_lesions(self):
        rng = self.rng
        kind = rng.random()  # < 0.15: no lesion; < 0.3: cysts only; else tumours, sometimes cysts too
        n_tumours = 0 if kind < 0.3 else int(rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.2, 0.1]))
        n_cysts = int(rng.integers(1, 4)) if 0.15 <= kind < 0.3 or (kind >= 0.3 and rng.random() < 0.35) else 0
        self.lesions = []
        for label, count in ((LABEL_TUMOR, n_tumours), (LABEL_CYST, n_cysts)):
            for _ in range(count):
                hi = 35 if label == LABEL_TUMOR else 22
                radius = math.exp(rng.uniform(math.log(4), math.log(hi)))
                lesion = self._place_lesion(label, radius)
                if lesion is not None:
                    self.lesions.append(lesion)

    def _lesion_hu(self, label) -> float:
        rng = self.rng
        if label == LABEL_CYST:
            return rng.uniform(9, 50)
        if rng.random() < 0.85:  # most are hypodense to the parenchyma
            return rng.uniform(67, min(112, self.hu_liver - 12))
        return rng.uniform(67, 112)

    def _place_lesion(self, label, radius) -> _Lesion | None:
        rng = self.rng
        depth = self.coarse.depth
        radius = min(radius, max(4.0, (depth.max() - 2) / 0.6))
        candidates = self.coarse.points(0.6 * radius + 2)
        for _ in range(20):
            if len(candidates) == 0:
                return None
            centre = candidates[rng.integers(len(candidates))] + rng.uniform(-1.5, 1.5, 3)
            if all(np.linalg.norm(centre - o.centre) > radius + o.radius + 3 for o in self.lesions):
                return _draw_lesion(rng, centre, radius, label, self._lesion_hu(label))
        return None

    # ---- other organs

    def _draw_upper_organs(self):
        rng, s, am, bm, yc = self.rng, self.scale, self.am, self.bm, self.yc
        z_left = self.domes[1][2]
        right = np.array([-rng.uniform(55, 75), self.y_vb + rng.uniform(0, 10), -s * rng.uniform(55, 75)])
        left = np.array([rng.uniform(55, 75), self.y_vb + rng.uniform(0, 10), right[2] + rng.uniform(15, 25)])
        self.kidneys = []
        for side, centre in ((-1, right), (1, left)):
            rot = _rot(2, side * rng.uniform(20, 35)) @ _rot(1, side * rng.uniform(-15, -5)) @ _random_rotation(rng, 5)
            self.kidneys.append(_Ellipsoid(centre, np.array([rng.uniform(24, 30), rng.uniform(20, 26),
                                                             rng.uniform(48, 58)]), rot))
        self.hu_cortex_k = rng.uniform(150, 200)
        self.hu_medulla = self.hu_cortex_k - rng.uniform(20, 50)
        self.spleen = _Ellipsoid(np.array([rng.uniform(0.55, 0.65) * am, yc + rng.uniform(0.2, 0.35) * bm,
                                           z_left - rng.uniform(35, 50)]),
                                 np.array([rng.uniform(18, 26), rng.uniform(45, 60), rng.uniform(45, 60)]),
                                 _rot(2, rng.uniform(25, 45)) @ _random_rotation(rng, 10))
        self.hu_spleen = rng.uniform(100, 130)
        self._draw_stomach()
        self.hu_fluid = rng.uniform(0, 25)
        heart_base = float(self._diaphragm(20.0, yc - 0.45 * bm))
        self.heart = _Ellipsoid(np.array([rng.uniform(15, 30), yc - rng.uniform(0.4, 0.5) * bm,
                                          heart_base + rng.uniform(40, 50)]),
                                np.array([rng.uniform(50, 58), rng.uniform(35, 42), rng.uniform(45, 55)]),
                                _rot(2, -rng.uniform(25, 40)) @ _random_rotation(rng, 8))
        self.hu_myocardium = rng.uniform(90, 130)
        front = self.y_vb - self.vb[1]
        self.confluence = np.array([rng.uniform(-5, 5), front - rng.uniform(35, 45), -s * rng.uniform(45, 60)])
        hilum = self.spleen.centre + [-rng.uniform(20, 30), -rng.uniform(15, 25), -rng.uniform(0, 10)]
        conf = self.confluence
        self.splenic_vein = np.array([conf, conf + [35, 8, 8], hilum])
        self.smv = np.array([conf, conf + [6, -4, -60], conf + [10, -10, -400]])
        self.pancreas = np.array([conf + [-30, -8, -20], conf + [0, -14, 0], conf + [40, -6, 12], hilum + [0, -10, -5]])
        self.pancreas_r = np.array([rng.uniform(13, 17), 11, rng.uniform(9, 12), 8])
        self.hu_pancreas = rng.uniform(90, 115)
        self.gallbladder = None
        if rng.random() < 0.85:
            self.gallbladder = self._draw_gallbladder()

    def _draw_stomach(self):
        """A J-shaped tube: the fundus under the left dome, the body, the antrum and the pylorus."""
        rng, bm, yc = self.rng, self.bm, self.yc
        xl, yl, _ = self.domes[1]
        r = [rng.uniform(28, 38), rng.uniform(22, 30), rng.uniform(14, 20), rng.uniform(8, 11)]
        fx, fy = xl + rng.uniform(-10, 5), yl + rng.uniform(-10, 5)
        fz = float(self._diaphragm(fx, fy)) - self.t_dia - 0.5 * r[0]  # clipped by the dome
        bz = fz - rng.uniform(35, 50)
        az = bz - rng.uniform(15, 30)
        self.stomach = np.array([[fx, fy, fz], [xl - rng.uniform(5, 15), yc - 0.45 * bm, bz],
                                 [rng.uniform(0, 15), yc - 0.6 * bm, az],
                                 [-rng.uniform(20, 30), yc - 0.5 * bm, az + rng.uniform(0, 10)]])
        self.stomach_r = np.array(r)
        self.stomach_level = yc - rng.uniform(0.2, 0.6) * bm  # gas rises to the anterior antrum and body

    def _draw_gallbladder(self) -> _Ellipsoid | None:
        """Straddling the liver's lowest anterior surface right of the hilum (the gallbladder fossa)."""
        rng, s, c = self.rng, self.scale, self.liver_c
        points = self.coarse.points()
        near = points[(np.abs(points[:, 0] - c[0] - 40 * s) < 15) & (points[:, 1] < c[1] - 15 * s)]
        if len(near) == 0:
            return None
        bottom = near[np.argmin(near[:, 2])]
        return _Ellipsoid(bottom + [0, 0, rng.uniform(5, 15)],
                          np.array([rng.uniform(12, 17), rng.uniform(14, 20), rng.uniform(30, 45)]),
                          _rot(0, rng.uniform(20, 40)) @ _random_rotation(rng, 10))

    def _paint_kidneys(self, canvas: _Canvas):
        for kidney, side in zip(self.kidneys, (-1, 1)):
            _paint_ellipsoid(canvas, kidney, self.hu_cortex_k, label=0)
            _paint_ellipsoid(canvas, kidney.scaled(1.0, -7), self.hu_medulla)
            hilum = kidney.centre - side * 0.5 * kidney.axes[0] * kidney.rot[:, 0] - 6 * kidney.rot[:, 1]
            sinus = _Ellipsoid(hilum, kidney.axes * [0.45, 0.4, 0.5], kidney.rot)
            _paint_ellipsoid(canvas, sinus, self.hu_visceral_fat)
            _paint_ellipsoid(canvas, sinus.scaled(0.45), self.hu_fluid)

    def _paint_upper_organs(self, canvas: _Canvas):
        def lumen(x, y, z):
            return self._cavity(x, y, z) & (z < self._diaphragm(x, y) - self.t_dia - 4)

        _paint_tube(canvas, self.stomach, self.stomach_r, self.hu_muscle, clip=self._abdomen)
        level = self.stomach_level
        _paint_tube(canvas, self.stomach, self.stomach_r - 4, lambda v: np.where(v.y < level, _GAS, self.hu_fluid),
                    clip=lumen)
        self._paint_kidneys(canvas)
        _paint_ellipsoid(canvas, self.spleen, self.hu_spleen, clip=self._abdomen)
        _paint_tube(canvas, self.pancreas, self.pancreas_r, self.hu_pancreas)
        for path, r in ((self.splenic_vein, 4.5), (self.smv, 5.5)):
            _paint_tube(canvas, path, r, self.hu_ivc)

    def _paint_heart(self, canvas: _Canvas):
        def above(x, y, z):
            return (z > self._diaphragm(x, y) + 1) & self._cavity(x, y, z) & (y < self.y_vb - self.vb[1] - 15)

        _paint_ellipsoid(canvas, self.heart.scaled(1.0, 6), self.hu_visceral_fat, clip=above)
        _paint_ellipsoid(canvas, self.heart, self.hu_myocardium, clip=above)
        _paint_ellipsoid(canvas, self.heart.scaled(1.0, -10), self.hu_blood, clip=above)

    # ---- bowel

    def _draw_bowel(self):
        """Small-bowel loops (random walks; fluid, gas or an air-fluid level) and the colon frame."""
        rng, s = self.rng, self.scale
        self.loops = []
        for _ in range(rng.integers(10, 16)):
            r = rng.uniform(8, 13)
            p = np.array([rng.uniform(-0.7, 0.7) * self.am, self.yc + rng.uniform(-0.8, 0.2) * self.bm,
                          rng.uniform(-300, -s * 45)])
            if not self._bowel_fits(p, r):
                continue
            points = [p]
            for _ in range(rng.integers(3, 7)):
                step = [points[-1] + rng.uniform(20, 35) * _random_unit(rng) for _ in range(10)]
                step = [q for q in step if self._bowel_fits(q, r)]
                if not step:
                    break
                points.append(step[0])
            if len(points) > 1:
                kind = rng.random()
                level = np.inf if kind < 0.2 else -np.inf if kind < 0.7 else points[0][1] + rng.uniform(-r, r)
                self.loops.append((np.array(points), r, rng.uniform(2, 3), float(level), rng.uniform(0, 30)))
        self.hu_bowel_wall = rng.uniform(40, 70)
        am, bm, yc = self.am, self.bm, self.yc
        self.colon = np.array([[-0.62 * am, yc + 0.05 * bm, -400],  # ascending, transverse, descending
                               [-0.55 * am, yc - 0.1 * bm, -s * rng.uniform(60, 80)],
                               [-0.2 * am, yc - 0.55 * bm, -s * rng.uniform(85, 110)],
                               [0.25 * am, yc - 0.5 * bm, -s * rng.uniform(75, 100)],
                               [0.6 * am, yc - 0.05 * bm, -s * rng.uniform(30, 50)],
                               [0.65 * am, yc + 0.1 * bm, -400]])
        self.colon[:, 0] += rng.uniform(-8, 8, len(self.colon))
        self.colon_r = rng.uniform(16, 22)
        waves = [(np.multiply(_random_unit(rng), 2 * math.pi / rng.uniform(12, 25)).tolist(),
                  rng.uniform(0, 2 * math.pi)) for _ in range(3)]
        self.stool = (rng.random() < 0.5, waves, rng.uniform(-40, 30))  # (mottled?, gas texture, HU)

    def _bowel_fits(self, p, r) -> bool:
        """Whether a loop of radius r centred at p stays in the lower abdomen, clear of the wall and spine."""
        margin = (r + 10) / self.bm
        return (self._r2(p[0], p[1], p[2], self.inset_muscle) < (1 - margin) ** 2
                and p[1] < self.y_vb - self.vb[1] - r - 10 and -400 < p[2] < -self.scale * 40)

    def _colon_content(self, v: _View):
        """Gas, or stool mottled with gas bubbles."""
        mottled, waves, hu = self.stool
        if not mottled:
            return _GAS
        texture = sum(np.sin(v.x * k[0] + v.y * k[1] + v.z * k[2] + phase) for k, phase in waves)
        return np.where(texture > 0.8, _GAS, hu)

    def _paint_bowel(self, canvas: _Canvas):
        _paint_tube(canvas, self.colon, self.colon_r, self.hu_bowel_wall)
        _paint_tube(canvas, self.colon, self.colon_r - 2, self._colon_content)
        for points, r, wall, level, fluid in self.loops:
            _paint_tube(canvas, points, r, self.hu_bowel_wall)
            _paint_tube(canvas, points, r - wall, lambda v: np.where(v.y < level, _GAS, fluid))

    # ---- ribs

    def _draw_ribs(self):
        """Pairs of ribs from the spine along the body wall, sloping down anteriorly; the lowest float."""
        rng = self.rng
        self.ribs = []
        z_head = self.domes[0][2] + 120
        while z_head > -self.scale * 85:
            floating = z_head < -self.scale * 60
            phi_end = rng.uniform(1.2, 1.6) if floating else min(2.7, rng.uniform(2.0, 2.3) + 0.6 * (z_head > 0))
            drop = rng.uniform(90, 130) * phi_end / 2.7
            for side in (-1, 1):
                phi = np.linspace(0.5, phi_end, 12)
                z = z_head - drop * ((phi - 0.5) / (phi_end - 0.5)) ** 1.3
                x, y = self._outline(self.inset_ribs, phi, z)
                head = [side * (self.vb[0] + 6), self.y_vb + 0.4 * self.vb[1], z_head + 20]
                points = np.vstack([head, np.column_stack([side * x, y, z])])
                cartilage = (phi > 2.1) & (not floating)
                self.ribs.append((points, rng.uniform(4, 5.5), np.r_[False, cartilage]))
            z_head -= rng.uniform(24, 30)

    def _paint_ribs(self, canvas: _Canvas):
        hu_cartilage = 0.5 * (self.hu_marrow + 100)
        for points, r, cartilage in self.ribs:
            bone = int(np.argmax(cartilage)) + 1 if cartilage.any() else len(points)
            _paint_tube(canvas, points[:bone], r, self.hu_cortex, label=0)
            _paint_tube(canvas, points[:bone], r - 1.5, self.hu_marrow)
            if bone < len(points):
                _paint_tube(canvas, points[bone - 1:], r, hu_cartilage, label=0)

    # ---- painting

    def render(self, canvas: _Canvas) -> None:
        self._paint_body(canvas)
        self._paint_bowel(canvas)
        self._paint_psoas(canvas)
        self._paint_upper_organs(canvas)
        self._paint_liver(canvas)
        for a, b, r in self.liver_vessels:
            _paint_tube(canvas, [a, b], [r, 0.85 * r], self.hu_vessel, within=LABEL_LIVER)
        _paint_tube(canvas, self.portal_trunk, 7.0, self.hu_vessel)
        if self.gallbladder is not None:
            _paint_ellipsoid(canvas, self.gallbladder, self.hu_bowel_wall, label=0, clip=self._cavity)
            _paint_ellipsoid(canvas, self.gallbladder.scaled(1.0, -2), self.hu_fluid, clip=self._cavity)
        _paint_tube(canvas, self.aorta, self.r_aorta, self.hu_blood, label=0)
        _paint_tube(canvas, self.ivc, self.r_ivc, self.hu_ivc, label=0)
        self._paint_heart(canvas)
        for lesion in self.lesions:
            lesion.paint(canvas)
        self._paint_spine(canvas)
        self._paint_ribs(canvas)


# --------------------------------------------------------------------------- geometry and image formation


def _draw_geometry(rng, phantom: _Phantom, spacing, matrix, orientation) -> _Geometry:
    """Spacing, size, direction and origin; every draw is made whatever the overrides."""
    fov = round(rng.uniform(max(0.6, min(1.0, (2 * phantom.a0 + 20) / _DEFAULT_MATRIX)), 1.0) * _DEFAULT_MATRIX)
    slice_spacing = float(rng.choice(_SLICE_SPACINGS))
    lo, hi = phantom.coarse.bounds(0)
    height = hi[2] - lo[2]
    extent = max(rng.uniform(180, 300), height + 20)  # the whole liver, with a margin
    flips = _FLIPS[rng.integers(len(_FLIPS))]
    angle = rng.uniform(-10, 10) if rng.random() < 0.3 else 0.0
    centre = np.array([rng.uniform(-15, 15), rng.uniform(-10, 20), rng.uniform(-10, 10)])

    if matrix is not None and int(matrix) < 1:
        raise ValueError(f"matrix must be positive, not {matrix}")
    if spacing is None:
        pixel = fov / (matrix or _DEFAULT_MATRIX)
        spacing = (pixel, pixel, slice_spacing)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(0 < s < np.inf for s in spacing):  # NaN fails the comparison too
        raise ValueError(f"spacing must be three positive finite numbers, not {spacing}")
    ni, nj = (int(matrix),) * 2 if matrix is not None else (max(1, round(fov / s)) for s in spacing[:2])
    nk = max(1, round(extent / spacing[2]))
    direction = _rot(2, angle) @ np.diag(flips) if orientation else np.eye(3)

    centre[2] += (lo[2] + hi[2]) / 2  # the jitter (< 10 mm) keeps the liver inside
    half = np.array(spacing) * (np.array([ni, nj, nk]) - 1) / 2
    origin = centre + phantom.offset - direction @ half
    return _Geometry(spacing, (nk, nj, ni), origin, direction)


def _noise_gain(sigma: float, truncate: float) -> float:
    """Standard deviation of unit white noise after scipy's 1-D Gaussian filter."""
    r = int(truncate * sigma + 0.5)
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return float(np.sqrt(((w / w.sum()) ** 2).sum()))


def _form_image(ct: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Adds noise, blurs by the point spread function (so the noise is correlated too), rounds to int16."""
    sigmas = (0.5, *(rng.uniform(0.5, 0.7),) * 2)  # voxels, (k, j, i)
    truncate = 3.0
    noise = rng.uniform(8, 20) / np.prod([_noise_gain(s, truncate) for s in sigmas])
    for k0 in range(0, ct.shape[0], 16):
        part = ct[k0:k0 + 16]
        part += rng.standard_normal(part.shape, dtype=np.float32) * np.float32(noise)
    ndimage.gaussian_filter(ct, sigmas, output=ct, truncate=truncate)
    np.rint(ct, out=ct)
    np.clip(ct, -1024, 3071, out=ct)
    return ct.astype(np.int16)


# --------------------------------------------------------------------------- public API


def generate_case(seed: int, *, spacing: tuple[float, float, float] | None = None,
                  matrix: int | None = None, orientation: bool = True) -> tuple[Volume, Volume]:
    """One synthetic abdominal CT (int16 HU) and its label volume (uint8: 0 bg, 1 liver, 2 tumor, 3 cyst).

    Both share one geometry; the case is deterministic for a seed. ``spacing`` ((i, j, k) mm) and
    ``matrix`` (in-plane size) override the random draw; the field of view is kept when only one is
    given. With ``orientation`` the direction matrix is a random axis flip of LPS, sometimes rotated
    up to 10 degrees about z; the anatomy stays at the same physical place either way.
    """
    anatomy, geometry, noise = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    phantom = _Phantom(anatomy)
    geo = _draw_geometry(geometry, phantom, spacing, matrix, orientation)
    canvas = _Canvas(_Grid(geo, phantom.offset))
    phantom.render(canvas)
    ct = _form_image(canvas.ct, noise)
    return (Volume(ct, geo.spacing, tuple(geo.origin), geo.direction.copy()),
            Volume(canvas.lab, geo.spacing, tuple(geo.origin), geo.direction.copy()))


def _write(volume: Volume, path: Path) -> None:
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(volume.direction.ravel()))
    try:
        sitk.WriteImage(image, str(path), useCompression=True)
    except RuntimeError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc


def write_cases(out_dir, cases: int, seed: int, *, overwrite: bool = False,
                progress=None) -> list[tuple[Path, Path]]:
    """Writes ``case_{seed+n:04d}_ct.nii.gz`` and ``..._label.nii.gz`` for n < ``cases``; returns the pairs.

    Case n is ``generate_case(seed + n)``. Raises OutputError if a file exists and not ``overwrite``.
    ``progress(fraction, message)`` is called before each case and at the end.
    """
    out = Path(out_dir)
    pairs = [(out / f"case_{seed + n:04d}_ct.nii.gz", out / f"case_{seed + n:04d}_label.nii.gz")
             for n in range(cases)]
    existing = [p for pair in pairs for p in pair if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]} already exists (and {len(existing) - 1} more); use overwrite to replace")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc}") from exc
    for n, (ct_path, label_path) in enumerate(pairs):
        if progress is not None:
            progress(n / cases, f"case {n + 1}/{cases}")
        ct, labels = generate_case(seed + n)
        _write(ct, ct_path)
        _write(labels, label_path)
    if progress is not None:
        progress(1.0, f"{cases} cases written")
    return pairs
