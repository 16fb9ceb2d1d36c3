"""Small mask helpers shared by the pipeline and the post-processing."""

from __future__ import annotations

import numpy as np


def bounding_box(mask: np.ndarray, margin=(0, 0, 0)) -> tuple[slice, slice, slice] | None:
    """Bounding box of a 3-D mask widened by ``margin`` voxels per axis (clipped); None when empty."""
    box = []
    for axis, m in enumerate(margin):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - m, 0), min(int(hit[-1]) + 1 + m, mask.shape[axis])))
    return tuple(box)
