"""The two stages of pyliverlesionseg 0.3 with the ported networks (``kulunet``), on our volumes.

Liver, as their package runs it on CT: the CT cropped to their abdomen box (``kulcrop``: lung
base + 70 mm down to the hip - 20 mm, the body in x and y, at most 489 x 408 x 408 mm), in RAS
array order (x, y, z); resampled to 1.5 mm, median-filtered (3 voxels), resampled to 3 mm (the
voxel size stored in the weight file); HU clipped to [-200, 200] and mapped to [-0.5, 0.5]; one patch of 189 x 162 x 162 voxels centred
on the image (zero outside it), its 163 x 136 x 136 output placed back, uncovered voxels given
the nearest covered value; then p > 0.5, one erosion (3x3x3, 18-neighbourhood), the largest
6-connected component, one dilation, linear resampling back to the box (>= 0.5), and zero
outside the box.

Lesions: HU clipped to [-200, 200] and mapped to [-0.5, 0.5] on the CT grid, resampled to
1 x 1 x 3 mm (the lesion file's voxel size) with the liver mask (> 0.5 after resampling), the
mask dilated once with a 5x5x5 structure (|d|inf <= 2 and |d|1 <= 4), -0.5 outside it, cropped
to it; tiles of 180 x 172 x 86 voxels (zeros outside the crop) whose 92 x 84 x 42 outputs are
written in order, later tiles overwriting earlier ones (starts 0, O, 2O, ... and a last one
flush with the end); p > 0.5, linear resampling back to the CT grid, any positive value kept.

Resampling is theirs (pymirc ``zoom3d``: centred grids, linear up, area-weighted down, zeros
beyond the edges), here as one weight matrix per axis. Differences, stated: where their crop
heuristic would fail (no lungs in the field of view, no bone profile) the whole image is used and
a warning says why; when the liver reaches the box's lower face (their hip rule misfires on CTs
without the pelvis) the box is widened down to the 408 mm cap and the stage rerun, with a warning.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from .devices import is_out_of_memory
from .errors import LiverTumorSegError
from .kulcrop import CropRules, abdomen_box
from .kulunet import LESION, LIVER, KULUNet
from .orientation import to_canonical
from .volume import Volume

MEDIAN_VOXELS = 3
CT_WINDOW_HU = 200.0
ERODE = ndimage.generate_binary_structure(3, 2)  # 3x3x3 minus corners: 19 voxels
SIX = ndimage.generate_binary_structure(3, 1)
LIVER_DILATION = ndimage.iterate_structure(ndimage.generate_binary_structure(3, 2), 2)  # 5x5x5, 93 voxels


def ras_array(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float], object]:
    """HU indexed (x, y, z) with x toward the right, y anterior, z superior; spacing; the way back."""
    hu, spacing_zyx, reorient = to_canonical(volume)  # canonical: x toward left, y posterior, z superior
    return np.ascontiguousarray(np.flip(hu.transpose(2, 1, 0), (0, 1))), spacing_zyx[::-1], reorient


def from_ras(mask: np.ndarray, reorient) -> np.ndarray:
    """A mask indexed like ``ras_array``'s output, back on the volume's own grid (k, j, i)."""
    return reorient.from_canonical(np.ascontiguousarray(np.flip(mask, (0, 1)).transpose(2, 1, 0)))


def resample(arr: np.ndarray, spacing, target) -> np.ndarray:
    """Their resampling (pymirc ``zoom3d``, cval 0) to ``target`` mm voxels, one axis at a time."""
    out = np.asarray(arr, np.float32)
    for axis, (s, t) in enumerate(zip(spacing, target)):
        zoom = float(s) / float(t)
        if zoom != 1:
            weights = zoom_weights(out.shape[axis], zoom)
            out = np.moveaxis(np.tensordot(weights, out, axes=(1, axis)), 0, axis)
    return np.ascontiguousarray(out)


def zoom_weights(n: int, zoom: float) -> np.ndarray:
    """(n_out, n) float32 weights of pymirc's ``zoom3d`` along one axis with cval 0.

    Both grids are centred on each other; n_out = ceil(n / (1 / zoom)). Up (zoom > 1): linear
    interpolation between the two neighbours of each output centre, a neighbour outside the
    input counting 0 (edges darken). Down (zoom < 1): each input voxel spreads over the output
    bins its extent overlaps, weighted by the overlap (the mean where bins are full; partial
    edge bins stay under-filled).
    """
    delta = 1.0 / zoom
    m = math.ceil(n / delta)
    weights = np.zeros((m, n), np.float64)
    if zoom > 1:
        out = np.arange(m)
        centre = delta * (out - 0.5 * m + 0.5) + 0.5 * n - 0.5
        left = np.floor(centre).astype(int)
        right = left + 1
        ok = left >= 0
        weights[out[ok], left[ok]] += (right - centre)[ok]
        ok = right < n
        weights[out[ok], right[ok]] += (centre - left)[ok]
    else:
        src = np.arange(n)
        lo = (1.0 / delta) * (src - 0.5 * n) + 0.5 * m
        hi = (1.0 / delta) * (src + 1 - 0.5 * n) + 0.5 * m
        first, last = np.floor(lo).astype(int), np.ceil(hi).astype(int) - 1
        one = first == last
        np.add.at(weights, (first[one], src[one]), 1.0 / delta)
        split = np.ceil(lo)
        np.add.at(weights, (first[~one], src[~one]), (split - lo)[~one])
        np.add.at(weights, (last[~one], src[~one]), (hi - split)[~one])
    return weights.astype(np.float32)


def _normalise_ct(hu: np.ndarray) -> np.ndarray:
    """Their CT intensity: HU clipped to [-200, 200], mapped to [-0.5, 0.5]."""
    return np.clip(hu / 1000.0, -CT_WINDOW_HU / 1000, CT_WINDOW_HU / 1000) * (0.5 / (CT_WINDOW_HU / 1000))


def liver_input(hu_ras: np.ndarray, spacing, voxel_mm: float) -> np.ndarray:
    """The normalised 3 mm image the liver network sees."""
    fine = resample(hu_ras, spacing, (voxel_mm / 2,) * 3)
    fine = ndimage.median_filter(fine, size=MEDIAN_VOXELS)
    coarse = resample(fine, (voxel_mm / 2,) * 3, (voxel_mm,) * 3)
    return _normalise_ct(coarse)


def _run(net: KULUNet, patch: np.ndarray) -> np.ndarray:
    """The network on one patch, on the device its weights are on (one patch: nothing smaller to retry)."""
    device = next(net.parameters()).device
    try:
        with torch.no_grad():
            return net(torch.from_numpy(patch)[None, None].to(device))[0, 0].float().cpu().numpy()
    except Exception as err:  # noqa: BLE001 - only out of memory is turned into advice
        if not is_out_of_memory(err):
            raise
        raise LiverTumorSegError(f"Out of memory on {device} running the imported network on a {patch.shape} patch "
                                 f"({str(err).splitlines()[0]}). " + ("Close other programs using the GPU, or run with "
                                 "--device cpu." if device.type == "cuda" else "Close other programs, or use a machine "
                                 "with more memory.")) from None


def centred_patch_probability(net: KULUNet, image: np.ndarray) -> np.ndarray:
    """Their centre sampling: one input patch centred on the image (voxel n // 2 at patch index d // 2,
    zeros outside), its output written back, uncovered voxels filled from the nearest covered one."""
    cfg = net.cfg
    d_in, d_out = np.array(cfg.patch_in), np.array(cfg.patch_out)
    margin = (d_in - d_out) // 2
    centre = np.array(image.shape) // 2
    start = centre - d_in // 2  # image voxel at patch index 0
    patch = np.zeros(cfg.patch_in, np.float32)
    src = tuple(slice(max(s, 0), min(s + d, n)) for s, d, n in zip(start, d_in, image.shape))
    dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
    patch[dst] = image[src]
    out = _run(net, patch)
    prob = np.full(image.shape, np.nan, np.float32)
    ostart = start + margin
    src = tuple(slice(max(s, 0), min(s + d, n)) for s, d, n in zip(ostart, d_out, image.shape))
    dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, ostart))
    prob[src] = out[dst]
    missing = np.isnan(prob)
    if missing.any():
        idx = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
        prob = prob[tuple(idx)]
    return prob


def liver_postprocess(prob: np.ndarray, out_shape) -> np.ndarray:
    """p > 0.5, erosion, largest 6-connected component, dilation, linear zoom back (>= 0.5)."""
    mask = ndimage.binary_erosion(prob > 0.5, ERODE)
    labels, n = ndimage.label(mask, SIX)
    if n == 0:
        return np.zeros(out_shape, bool)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    mask = ndimage.binary_dilation(labels == int(np.argmax(sizes)) + 1, ERODE)
    factors = np.array(out_shape) / np.array(mask.shape)
    back = ndimage.zoom(mask.astype(np.float32), factors, order=1, prefilter=False)
    out = np.zeros(out_shape, bool)
    region = tuple(slice(0, min(a, b)) for a, b in zip(back.shape, out_shape))
    out[region] = back[region] >= 0.5
    return out


def ras_box(lps_box, shape) -> tuple[slice, slice, slice]:
    """A box in LPS index order as a box of the RAS-ordered array (x and y counted from the end)."""
    x, y, z = lps_box
    return slice(shape[0] - x.stop, shape[0] - x.start), slice(shape[1] - y.stop, shape[1] - y.start), z


def segment_liver(volume: Volume, net: KULUNet, voxel_mm: float = 3.0, warnings: list | None = None) -> np.ndarray:
    """The liver mask (bool, k, j, i) of a CT volume; crop fallbacks are appended to ``warnings``."""
    if net.cfg is not LIVER:
        raise ValueError("segment_liver needs the liver network")
    notes = warnings if warnings is not None else []
    hu, spacing, reorient = ras_array(volume)
    found = abdomen_box(np.flip(hu, (0, 1)), spacing)
    if found.fallback:
        notes.append(f"pyliverlesionseg abdomen box not found ({found.fallback}): the liver network saw the whole image")
    box = ras_box(found.box, hu.shape)
    liver = _liver_in_box(net, hu, spacing, box, voxel_mm)
    z = box[2]
    start = max(0, z.stop - int(CropRules().max_mm[2] / spacing[2]))
    if start < z.start and liver[:, :, z.start].any():
        # (ours) their hip rule expects the pelvis in the field of view; without it the box can cut the
        # liver (HCC-TACE-Seg HCC_048: 1038 mL in their box, 1374 mL on the whole image). Widen to the 408 mm cap.
        notes.append(f"the liver reached the lower face of the pyliverlesionseg abdomen box (slice {z.start}); "
                     f"rerun with the box widened down to slice {start}")
        box = (box[0], box[1], slice(start, z.stop))
        liver = _liver_in_box(net, hu, spacing, box, voxel_mm)
    return from_ras(liver, reorient)


def _liver_in_box(net: KULUNet, hu: np.ndarray, spacing, box, voxel_mm: float) -> np.ndarray:
    """Their liver stage on ``hu[box]`` (RAS order), placed in a mask of the whole image."""
    crop = hu[box]
    prob = centred_patch_probability(net, liver_input(crop, spacing, voxel_mm))
    mask = np.zeros(hu.shape, bool)
    mask[box] = liver_postprocess(prob, crop.shape)
    return mask


def tile_starts(size: int, out: int) -> list[int]:
    """Their tile starts along one axis: 0, O, 2O, ... and, if O does not divide the size, size - O."""
    o = min(size, out)
    starts = list(range(0, size, o))
    if size % o:
        starts.append(size - o)
    return starts


def tiled_probability(net: KULUNet, image: np.ndarray) -> np.ndarray:
    """Their non-centred sampling: each tile's output written in loop order (x, y, z), overwriting."""
    cfg = net.cfg
    d_in, d_out = np.array(cfg.patch_in), np.array(cfg.patch_out)
    margin = (d_in - d_out) // 2
    size = np.minimum(image.shape, d_out)
    prob = np.zeros(image.shape, np.float32)
    for sx in tile_starts(image.shape[0], d_out[0]):
        for sy in tile_starts(image.shape[1], d_out[1]):
            for sz in tile_starts(image.shape[2], d_out[2]):
                start = np.array([sx, sy, sz])
                centre = np.ceil(start + (size - 1) / 2).astype(int)
                first = centre - d_in // 2  # image voxel at patch index 0
                patch = np.zeros(cfg.patch_in, np.float32)
                src = tuple(slice(max(f, 0), min(f + d, n)) for f, d, n in zip(first, d_in, image.shape))
                patch[tuple(slice(a.start - f, a.stop - f) for a, f in zip(src, first))] = image[src]
                out = _run(net, patch)
                ofirst = first + margin
                region = tuple(slice(s, min(s + n, total)) for s, n, total in zip(start, size, image.shape))
                prob[region] = out[tuple(slice(r.start - o, r.stop - o) for r, o in zip(region, ofirst))]
    return prob


def segment_lesions(volume: Volume, liver: np.ndarray, net: KULUNet, voxel_mm=(1.0, 1.0, 3.0)) -> np.ndarray:
    """The lesion mask (bool, k, j, i) inside a liver mask (bool, k, j, i) of a CT volume."""
    if net.cfg is not LESION:
        raise ValueError("segment_lesions needs the lesion network")
    hu, spacing, reorient = ras_array(volume)
    if not liver.any():
        return np.zeros(volume.array.shape, bool)
    liver_ras = np.ascontiguousarray(np.flip(reorient.to_canonical(liver.astype(np.float32)).transpose(2, 1, 0), (0, 1)))
    image = resample(_normalise_ct(hu), spacing, voxel_mm)
    mask = resample(liver_ras, spacing, voxel_mm) > 0.5
    mask = ndimage.binary_dilation(mask, LIVER_DILATION)
    if not mask.any():
        return np.zeros(volume.array.shape, bool)
    image = np.clip(np.where(mask, image, -0.5), -0.5, 0.5).astype(np.float32)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    lesions = np.zeros(image.shape, np.float32)
    lesions[box] = tiled_probability(net, image[box]) > 0.5
    back = ndimage.zoom(lesions, np.array(hu.shape) / np.array(lesions.shape), order=1, prefilter=False)
    out = np.zeros(hu.shape, bool)
    region = tuple(slice(0, min(a, b)) for a, b in zip(back.shape, hu.shape))
    out[region] = back[region] > 0
    return from_ras(out, reorient)
