"""An image array with its physical geometry (LPS, as ITK and DICOM)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """A 3-D scalar image.

    ``array`` is indexed (k, j, i) = (z, y, x), as ``SimpleITK.GetArrayFromImage`` returns it.
    ``spacing`` and ``origin`` are (i, j, k)-ordered in mm; ``direction`` is a 3x3 matrix whose
    columns are the i, j, k axis directions in LPS. ``source`` says what was read when that is not
    plain from the path (the DICOM series of a folder).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape[::-1])

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping voxel (i, j, k, 1) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping voxel (i, j, k, 1) to RAS mm (Slicer's world)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.ijk_to_lps()

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry with another voxel array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} differs from {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())
