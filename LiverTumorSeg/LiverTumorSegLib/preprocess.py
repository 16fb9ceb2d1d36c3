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


def resize(arr: np.ndarray, shape, *, order: int = 1) -> np.ndarray:
    """Resize a (Z, Y, X) or (C, Z, Y, X) float array to ``shape`` (order 1 linear, 0 nearest)."""
    shape = tuple(int(n) for n in shape)
    if tuple(arr.shape[-3:]) == shape:
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr))
    lead = t.shape[:-3]
    t = t.reshape(1, -1, *t.shape[-3:])
    if order == 0:
        out = F.interpolate(t.float() if not t.is_floating_point() else t, size=shape, mode="nearest-exact")
        out = out.to(t.dtype)
    else:
        out = F.interpolate(t.float(), size=shape, mode="trilinear", align_corners=False)
    return out.reshape(*lead, *shape).numpy()


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
