"""pyliverlesionseg's abdomen box for CT (their ``crop_ct_image``), the rules re-implemented.

Input: HU indexed (x, y, z) in LPS order (x toward the patient's left, y posterior, z toward the
head) and the voxel size in mm. Steps, with their constants (``CropRules``):

1. body: HU > -150, one erosion (6-neighbour cross), the largest 6-connected component; its
   bounding box gives x and y; outside it the image is set to its minimum;
2. liver dome: air is HU < -600 after setting the top slice to 0 HU (so lungs cut by the field of
   view stay apart from the outside air), opened with a 5x5x5 cube (all slices but the top);
   components are labelled with the x-y border padded by air, the largest is the outside air and
   every other air voxel is "inner air". Its z profile (voxels per slice, summed over 7 slices)
   above min + 0.5 (max - min) forms runs of slices; the first run's start is dome candidate 1,
   or the second run's start when the profile between them dips below min + 0.2 (max - min).
   Candidate 2 is the lower z end of the lung (of the 2nd and 3rd largest air components, the
   one that ends higher). The dome slice is the larger candidate;
3. hip: the bone (HU > 500) z profile, summed over 7 slices, below the dome; its deepest local
   minimum (order 15, lowered by 3 until one exists), moved above the second-highest local
   maximum (order 15) when it lies below both that maximum and the global one; hip candidates
   are local maxima (order 5, lowered by 1) above min + 0.7 (max - min) (0.7 lowered by 0.1 down
   to 0.05 until there is one); the hip is the last candidate below the minimum when there are
   at least two such candidates, else slice 0; the dome-hip distance is capped at 400 mm;
4. z from hip - 20 mm to dome + 70 mm; x and y from the largest 6-connected component of
   HU > -150 in that slab eroded by a 5x5x5 cube;
5. caps of 489 x 408 x 408 mm (163 x 136 x 136 voxels at 3 mm, the liver network's output):
   x and y shrink on both sides in proportion to the distance to the centre of the inner air's
   bounding box (rounded up), z from the feet side only.

Where their code would stop with an exception or loop for ever (no inner air, fewer than two
lung-like components, no bone profile, an empty slab), the whole image is used instead and
``AbdomenBox.fallback`` says why. With one lung-like component (lungs joined through the
trachea) it stands for both. Connected components use cc3d, the 5x5x5 cube morphology uses
separable min/max filters (equal to scipy's binary erosion/dilation with a zero border, tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage, signal


@dataclass(frozen=True)
class CropRules:
    """Their constants for CT, as the package's main function passes them."""

    tissue_hu: float = -150.0
    lung_hu: float = -600.0
    bone_hu: float = 500.0
    hip_ratio: float = 0.7
    liver_height_mm: float = 400.0
    dome_margin_mm: float = 70.0
    hip_margin_mm: float = 20.0
    max_mm: tuple[float, float, float] = (489.0, 408.0, 408.0)


@dataclass(frozen=True)
class AbdomenBox:
    """The box (slices in LPS index order); dome and hip slices; why the whole image, if so."""

    box: tuple[slice, slice, slice]
    dome: int | None = None
    hip: int | None = None
    fallback: str | None = None


class _NoLandmark(Exception):
    """A step of the heuristic found nothing to work with."""


def abdomen_box(hu_lps: np.ndarray, spacing, rules: CropRules = CropRules()) -> AbdomenBox:
    """The abdomen box of a CT (x, y, z in LPS order), or the whole image with the reason."""
    try:
        return _abdomen_box(hu_lps, np.asarray(spacing, float), rules)
    except _NoLandmark as why:
        return AbdomenBox(tuple(slice(0, n) for n in hu_lps.shape), fallback=str(why))


def _abdomen_box(hu: np.ndarray, spacing: np.ndarray, rules: CropRules) -> AbdomenBox:
    if hu.ndim != 3 or min(hu.shape) < 2:
        raise _NoLandmark(f"image {hu.shape} is not a 3-D volume")
    body = largest_component_box(ndimage.binary_erosion(hu > rules.tissue_hu), "body (HU > tissue threshold)")
    inside = np.full(hu.shape, hu.min(), dtype=hu.dtype)
    inside[body] = hu[body]
    dome, air_centre = liver_dome(inside, spacing, rules.lung_hu)
    hip = hip_slice(hu > rules.bone_hu, dome, spacing[2], rules)
    nz, vz = hu.shape[2], spacing[2]
    z = slice(max(0, hip - int(rules.hip_margin_mm / vz)), min(nz, dome + int(rules.dome_margin_mm / vz)))
    if z.stop <= z.start:
        raise _NoLandmark(f"empty slab between hip slice {hip} and dome slice {dome}")
    slab = hu[body[0], body[1], z] > rules.tissue_hu
    inner = largest_component_box(cube_erosion(slab, 5), "body in the liver slab")
    box = (_shift(inner[0], body[0].start), _shift(inner[1], body[1].start), z)
    return AbdomenBox(capped(box, spacing, air_centre, rules.max_mm), dome=int(dome), hip=int(hip))


def largest_component_box(mask: np.ndarray, what: str) -> tuple[slice, ...]:
    """Bounding box of the largest 6-connected component (the lowest label on ties)."""
    labels = cc3d.connected_components(mask, connectivity=6)
    sizes = np.bincount(labels.ravel())
    if sizes.size < 2:
        raise _NoLandmark(f"no {what}")
    return ndimage.find_objects((labels == int(np.argmax(sizes[1:])) + 1).astype(np.uint8))[0]


def cube_erosion(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary erosion by a size^3 cube, voxels outside the image counting as 0."""
    return ndimage.minimum_filter(mask.view(np.uint8), size=size, mode="constant", cval=0).astype(bool)


def cube_opening(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary opening by a size^3 cube (erosion, then dilation), zero border."""
    return ndimage.maximum_filter(cube_erosion(mask, size).view(np.uint8), size=size, mode="constant", cval=0).astype(bool)


def smooth7(profile: np.ndarray) -> np.ndarray:
    """Sum over a centred window of 7 slices (zeros beyond the ends), same length."""
    return np.convolve(profile.astype(float), np.ones(7), "full")[3:3 + profile.size]


def liver_dome(inside: np.ndarray, spacing: np.ndarray, lung_hu: float) -> tuple[int, tuple[int, int]]:
    """The dome slice and the (x, y) centre of the inner air's bounding box."""
    work = inside.copy()
    work[:, :, -1] = 0
    air = work < lung_hu
    air[:, :, :-1] = cube_opening(air[:, :, :-1], 5)
    padded = np.pad(air, ((3, 3), (3, 3), (0, 0)), constant_values=True)
    labels = cc3d.connected_components(padded, connectivity=6)[3:-3, 3:-3, :]
    sizes = np.bincount(labels.ravel(), minlength=2)[1:]
    if sizes.size < 2 or not sizes.any():
        raise _NoLandmark("no air inside the body (no lungs in the field of view?)")
    order = np.argsort(-sizes, kind="stable") + 1  # labels, largest first: the outside air, then lungs
    inner_air = air & (labels != order[0])
    if not inner_air.any():
        raise _NoLandmark("no air inside the body (no lungs in the field of view?)")
    profile = smooth7(inner_air.sum(axis=(0, 1)))
    lo, hi = profile.min(), profile.max()
    dome1 = _dome_from_profile(profile, lo, hi)
    lung_bottoms = [ndimage.find_objects((labels == lab).astype(np.uint8))[0][2].start for lab in order[1:3]]
    dome = max(dome1, max(lung_bottoms))
    box = ndimage.find_objects(inner_air.astype(np.uint8))[0]
    centre = tuple((s.start + s.stop + 1) // 2 for s in box[:2])
    return int(dome), centre


def _dome_from_profile(profile: np.ndarray, lo: float, hi: float) -> int:
    """Start of the first run of slices above half height, or of the second one after a deep dip."""
    above = np.flatnonzero(profile > lo + 0.5 * (hi - lo))
    if above.size == 0:
        raise _NoLandmark("flat inner-air profile")
    starts = np.flatnonzero(np.diff(above) != 1) + 1  # indices into ``above`` where a new run begins
    if starts.size and np.any(profile[above[starts[0] - 1]:above[starts[0]]] < lo + 0.2 * (hi - lo)):
        return int(above[starts[0]])
    return int(above[0])


def _extrema(profile: np.ndarray, compare, order: int, step: int) -> np.ndarray:
    """Local extrema, the order lowered by ``step`` (not below 1) until there is one."""
    while True:
        found = signal.argrelextrema(profile, compare, order=order)[0]
        if found.size or order == 1:
            return found
        order = max(1, order - step)


def hip_slice(bone: np.ndarray, dome: int, vz: float, rules: CropRules) -> int:
    """The hip slice from the bone z profile below the dome (0 when no hip is found)."""
    profile = smooth7(bone.sum(axis=(0, 1)))[:dome]
    if profile.size < 3:
        raise _NoLandmark(f"dome slice {dome}: no room for a bone profile below it")
    top = int(np.argmax(profile))
    minima = _extrema(profile, np.less, 15, 3)
    if minima.size == 0:
        raise _NoLandmark("no local minimum in the bone profile")
    low = int(minima[np.argsort(profile[minima], kind="stable")[0]])
    maxima = _extrema(profile, np.greater, 15, 3)
    if maxima.size == 0:
        raise _NoLandmark("no local maximum in the bone profile")
    ranked = maxima[np.argsort(profile[maxima], kind="stable")]
    second = int(ranked[-2] if ranked.size >= 2 else ranked[-1])
    if low < top and low < second:
        low = second + int(np.argmin(profile[second:]))
    peaks = _extrema(profile, np.greater, 5, 1)
    ratio = rules.hip_ratio
    while True:
        candidates = np.intersect1d(peaks, np.flatnonzero(profile > ratio * (profile[top] - profile[low]) + profile[low]))
        if candidates.size or ratio <= 0.05:
            break
        ratio = max(ratio - 0.1, 0.05)
    below = candidates[candidates < low]
    hip = int(below[-1]) if below.size >= 2 else 0
    if (dome - hip) * vz > rules.liver_height_mm:
        hip = dome - int(rules.liver_height_mm / vz)
    return hip


def capped(box, spacing: np.ndarray, air_centre: tuple[int, int], max_mm) -> tuple[slice, slice, slice]:
    """The box shrunk to at most ``max_mm``: x and y around the inner-air centre, z from the feet."""
    out = []
    for axis in (0, 1):
        s, size, v = box[axis], box[axis].stop - box[axis].start, spacing[axis]
        excess = size * v - max_mm[axis]
        if excess > 0:
            c = air_centre[axis]
            cut_start = math.ceil((c - s.start) / size * excess / v)
            cut_stop = math.ceil((s.stop - c) / size * excess / v)
            start, stop = s.start + max(cut_start, 0), s.stop - max(cut_stop, 0)
            s = slice(start, stop) if stop > start else s
        out.append(s)
    z, vz = box[2], spacing[2]
    excess = (z.stop - z.start) * vz - max_mm[2]
    if excess > 0:
        z = slice(z.start + math.ceil(excess / vz), z.stop)
    return out[0], out[1], z


def _shift(s: slice, by: int) -> slice:
    return slice(s.start + by, s.stop + by)
