"""The paper's training augmentations with MONAI transforms: in-plane 90/180/270 rotations,
mirroring, scaling and an intensity shift.

Every patch is augmented from its own seed, so a batch is reproducible from (seed, epoch,
iteration, sample) alone: that makes resume exact and lets distributed ranks build disjoint parts
of the same global batch.
"""

from __future__ import annotations

import numpy as np
from monai.transforms import Compose, RandFlipd, RandRotate90d, RandShiftIntensityd, RandZoomd

KEYS = ("image", "label")


class Augmenter:
    """``augmenter(image, label, seed)`` -> augmented (image, label), same shapes, label still 0/1.

    ``settings``: ``rotate90`` (probability of a random k*90 degree in-plane rotation), ``mirror``
    (probability per axis), ``scale`` ({prob, min, max}: zoom about the patch centre, size kept),
    ``intensity_shift`` ({prob, max}: one offset in [-max, max] added to the non-background voxels;
    the scaled CT's 0 is the masked-out background at inference, so it stays 0).
    """

    def __init__(self, settings: dict):
        self.settings = dict(settings)
        spatial = []
        if settings.get("rotate90"):
            spatial.append(RandRotate90d(KEYS, prob=settings["rotate90"], max_k=3, spatial_axes=(1, 2)))
        if settings.get("mirror"):
            spatial += [RandFlipd(KEYS, prob=settings["mirror"], spatial_axis=axis) for axis in range(3)]
        scale = settings.get("scale")
        if scale and scale.get("prob"):
            spatial.append(RandZoomd(KEYS, prob=scale["prob"], min_zoom=scale["min"], max_zoom=scale["max"],
                                     mode=("trilinear", "nearest-exact"), padding_mode="constant", keep_size=True))
        self.spatial = Compose(spatial) if spatial else None
        shift = settings.get("intensity_shift")
        self.shift = RandShiftIntensityd("image", offsets=shift["max"], prob=shift["prob"]) if shift and shift.get("prob") else None

    def __call__(self, image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        data = {"image": image[None].astype(np.float32), "label": label[None].astype(np.float32)}
        if self.shift is not None:
            background = data["image"] == 0
            self.shift.set_random_state(int(rng.integers(2**31)))
            data["image"] = np.where(background, 0.0, np.asarray(self.shift(data)["image"])).astype(np.float32)
        if self.spatial is not None:
            self.spatial.set_random_state(int(rng.integers(2**31)))
            data = self.spatial(data)
        img = np.asarray(data["image"], np.float32)[0]
        lab = (np.asarray(data["label"]) >= 0.5).astype(np.uint8)[0]
        return img, lab
