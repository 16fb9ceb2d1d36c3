"""Intensity scaling and resampling, as a model card prescribes.

Arrays are canonical (z, y, x); spacings are (z, y, x) mm. Resampling maps voxel grids onto each
other (align_corners=False), so going to the model grid and back is consistent voxel for voxel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_HU_WINDOW = (-250.0, 250.0)


def scale_hu(arr: np.ndarray, window=DEFAULT_HU_WINDOW) -> np.ndarray:
    """Clip HU to ``window`` and scale to [0, 1] (float32)."""
    lo, hi = float(window[0]), float(window[1])
    out = np.clip(arr, lo, hi, dtype=np.float32) if arr.dtype == np.float32 else np.clip(arr.astype(np.float32), lo, hi)
    out -= lo
    out /= hi - lo
    return out


def model_shape(shape, spacing, resample: dict, full_shape=None) -> tuple[int, int, int]:
    """Grid shape on which the network sees an image of ``shape`` voxels of ``spacing`` mm.

    Modes: ``spacing`` (fixed voxel size in mm, z y x), ``inplane_size`` (the paper: every axial
    slice of the full image resized to ``size`` x ``size``, slices kept; a crop of that image,
    ``shape`` within ``full_shape``, is scaled by the same factors), ``none``.
    """
    mode = resample.get("mode")
    if mode == "spacing":
        target = resample["spacing"]
        return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))
    if mode == "inplane_size":
        size, full = int(resample["size"]), full_shape or shape
        return (int(shape[0]), *(max(1, int(round(n * size / f))) for n, f in zip(shape[1:], full[1:])))
    if mode == "none":
        return tuple(int(n) for n in shape)
    raise ValueError(f"unknown resampling mode {mode!r}")


def model_spacing(shape, spacing, new_shape) -> tuple[float, float, float]:
    return tuple(float(s) * n / m for s, n, m in zip(spacing, shape, new_shape))


CHUNK_SLICES_VOXELS = 8_000_000  # voxels per chunk of slices in the separable resize


def _interp(t: torch.Tensor, size, mode: str) -> torch.Tensor:
    return F.interpolate(t[None], size=size, mode=mode, align_corners=False)[0]


def resize(arr: np.ndarray, shape, *, dtype=np.float32, scale: float = 1.0) -> np.ndarray:
    """Resize a (Z, Y, X) array to ``shape`` linearly (align_corners=False).

    Linear resizing is separable, so it runs as an in-plane pass over chunks of slices and a
    pass along z, in the order that keeps the intermediate small: a 512x512x500 CT never needs
    a full-size float copy. The result is ``arr * scale`` resized, stored as ``dtype``
    (rounded and clipped for integer types, e.g. uint8 probabilities with scale 255).
    """
    shape = tuple(int(n) for n in shape)
    z_out, plane = shape[0], shape[1:]
    if plane[0] * plane[1] <= arr.shape[1] * arr.shape[2]:
        small = _inplane(arr, plane, np.float32, 1.0)
        return _along_z(small, z_out, dtype, scale)
    return _inplane(_along_z(arr, z_out, np.float32, 1.0), plane, dtype, scale)


def _store(t: torch.Tensor, dtype, scale: float) -> np.ndarray:
    if scale != 1.0:
        t = t * scale
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        t = t.round_().clamp_(info.min, info.max)
    return t.numpy().astype(dtype, copy=False)


def _inplane(arr: np.ndarray, plane, dtype, scale: float) -> np.ndarray:
    """Bilinear in-plane resize, a chunk of slices at a time."""
    if tuple(arr.shape[1:]) == tuple(plane) and scale == 1.0 and arr.dtype == dtype:
        return arr
    out = np.empty((arr.shape[0], *plane), dtype)
    step = max(1, CHUNK_SLICES_VOXELS // max(arr.shape[1] * arr.shape[2], plane[0] * plane[1]))
    for z0 in range(0, arr.shape[0], step):
        chunk = torch.from_numpy(np.ascontiguousarray(arr[z0 : z0 + step], dtype=np.float32))
        res = chunk if tuple(arr.shape[1:]) == tuple(plane) else _interp(chunk, plane, "bilinear")
        out[z0 : z0 + step] = _store(res, dtype, scale)
    return out


def _along_z(arr: np.ndarray, z_out: int, dtype, scale: float) -> np.ndarray:
    """Linear resize along the first axis, a chunk of rows at a time."""
    z_in, y, x = arr.shape
    if z_in == z_out and scale == 1.0 and arr.dtype == dtype:
        return arr
    out = np.empty((z_out, y, x), dtype)
    rows = max(1, CHUNK_SLICES_VOXELS // max(z_in, z_out) // x)
    for y0 in range(0, y, rows):
        block = torch.from_numpy(np.ascontiguousarray(arr[:, y0 : y0 + rows], dtype=np.float32))
        flat = block.reshape(z_in, -1).T  # (rows * x, z): channels by length
        res = flat if z_in == z_out else _interp(flat, (z_out,), "linear")
        out[:, y0 : y0 + rows] = _store(res.T.reshape(z_out, -1, x), dtype, scale)
    return out


def resize_labels(labels: np.ndarray, shape) -> np.ndarray:
    """Label-aware resize: each class's indicator is resized linearly, then argmax (never raw integers)."""
    shape = tuple(int(n) for n in shape)
    if labels.shape == shape:
        return labels
    classes = np.unique(labels)
    best = np.full(shape, -1.0, dtype=np.float32)
    out = np.zeros(shape, dtype=labels.dtype)
    for c in classes:
        p = resize((labels == c).astype(np.float32), shape)
        better = p > best
        out[better] = c
        best[better] = p[better]
    return out
