"""Canonical (LPS-aligned) voxel order for the network, by axis permutation and flips only.

A canonical array is indexed (z, y, x) with x running right -> left, y anterior -> posterior and
z inferior -> superior, as a standard axial DICOM series. Oblique images are not resampled: each
voxel axis is mapped to its nearest patient axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np

from .volume import Volume


def nearest_axes(direction: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For each voxel axis (i, j, k): the LPS axis it is closest to, and the sign (+1/-1) along it.

    The assignment is the permutation maximising the summed |cosines| (first one found on ties),
    so that every LPS axis gets exactly one voxel axis, even for strongly oblique images.
    """
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    weight = np.abs(direction)
    best = max(permutations(range(3)), key=lambda p: sum(weight[p[a], a] for a in range(3)))
    signs = tuple(-1 if direction[best[a], a] < 0 else 1 for a in range(3))
    return best, signs


@dataclass(frozen=True)
class Reorient:
    """Maps arrays between a volume's grid (k, j, i) and the canonical grid (z, y, x).

    ``axes[c]`` is the original array axis that becomes canonical axis ``c``; ``flips[c]`` tells
    whether canonical axis ``c`` is reversed afterwards. Both directions are exact voxel copies and
    accept extra leading (e.g. channel) dimensions.
    """

    shape: tuple[int, int, int]
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @classmethod
    def for_volume(cls, volume: Volume) -> "Reorient":
        lps_of_voxel_axis, signs = nearest_axes(volume.direction)
        axes, flips = [], []
        for c in range(3):  # canonical array axis c holds LPS axis 2 - c
            a = lps_of_voxel_axis.index(2 - c)  # voxel axis (i=0, j=1, k=2)
            axes.append(2 - a)  # array axis of voxel axis a
            flips.append(signs[a] < 0)
        return cls(tuple(volume.array.shape), tuple(axes), tuple(flips))

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[a] for a in self.axes)

    def to_canonical(self, arr: np.ndarray) -> np.ndarray:
        """An array on the original grid (..., k, j, i), as a contiguous canonical (..., z, y, x) array."""
        _check_shape(arr, self.shape, "original")
        lead = tuple(range(arr.ndim - 3))
        out = np.transpose(arr, lead + tuple(len(lead) + a for a in self.axes))
        return np.ascontiguousarray(np.flip(out, self._flip_axes(len(lead))))

    def from_canonical(self, arr: np.ndarray) -> np.ndarray:
        """A canonical (..., z, y, x) array, back on the original grid (..., k, j, i), contiguous."""
        _check_shape(arr, self.canonical_shape, "canonical")
        lead = tuple(range(arr.ndim - 3))
        out = np.flip(arr, self._flip_axes(len(lead)))
        inverse = np.argsort(self.axes)
        return np.ascontiguousarray(np.transpose(out, lead + tuple(len(lead) + int(c) for c in inverse)))

    def _flip_axes(self, n_lead: int) -> tuple[int, ...]:
        return tuple(n_lead + c for c in range(3) if self.flips[c])


def _check_shape(arr: np.ndarray, shape: tuple[int, int, int], which: str) -> None:
    if arr.ndim < 3 or tuple(arr.shape[-3:]) != tuple(shape):
        raise ValueError(f"array shape {arr.shape} does not end with the {which} shape {tuple(shape)}")


def to_canonical(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float], Reorient]:
    """The volume's voxels in canonical (z, y, x) order, their (z, y, x) spacing, and the way back."""
    reorient = Reorient.for_volume(volume)
    spacing_kji = volume.spacing[::-1]
    spacing = tuple(float(spacing_kji[a]) for a in reorient.axes)
    return reorient.to_canonical(volume.array), spacing, reorient
