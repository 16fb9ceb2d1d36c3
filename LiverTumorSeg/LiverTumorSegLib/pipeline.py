"""Two-stage inference: liver, then tumors inside the (cropped, masked) liver."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cc3d
import numpy as np
import torch
from scipy import ndimage

from . import devices, kulpipeline
from .imageio import FEW_SLICES, check_ct, grid_difference, write_npz
from .masks import bounding_box
from .modelfile import KUL_UNET, StageModel
from .orientation import to_canonical
from .preprocess import model_shape, model_spacing, resize, scale_hu
from .slidingwindow import check_cancel, count_tiles, sliding_window_probabilities
from .volume import Volume

LABEL_LIVER, LABEL_TUMOR, LABEL_CYST = 1, 2, 3
NO_LIVER = "No liver found in this CT (is it an abdominal CT covering the liver?): the segments are empty."


def no_liver_warning(volume: Volume) -> str:
    """NO_LIVER, or, for a CT of a few slices, the likelier reason: too little of the liver to see."""
    slices = min(volume.array.shape)
    if slices < FEW_SLICES:
        return (f"No liver found: this CT has only {slices} slices along one axis, too few for the model to find the "
                "liver reliably; the segments are empty.")
    return NO_LIVER


GRID_KEYS = ("spacing", "origin", "direction")


@dataclass
class Probabilities:
    """Compact network output on the input grid: uint8 probabilities (0-255 for 0-1).

    ``tumor`` covers only ``box`` (slices of the input's (k, j, i) array); zero elsewhere.
    ``tumor_threshold``: the tumor card's cut-off on that scale (tumor iff value >= it).
    ``grid``: the input's (spacing, origin, direction), so a saved file is checked against the CT
    it is used with (None in files written before it was stored).
    """

    liver: np.ndarray
    tumor: np.ndarray
    box: tuple[slice, slice, slice]
    tumor_threshold: int = 128
    grid: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def grid_difference(self, volume: Volume) -> str | None:
        """What differs between this output's grid and ``volume``'s, in words; None when they match
        (or when the file holds no geometry but its array shape fits)."""
        spacing, origin, direction = self.grid or (volume.spacing, volume.origin, volume.direction)
        return grid_difference(Volume(self.liver, tuple(spacing), tuple(origin), direction), volume)

    def tumor_full(self) -> np.ndarray:
        out = np.zeros(self.liver.shape, np.uint8)
        out[self.box] = self.tumor
        return out

    def save(self, path, *, overwrite: bool = False) -> None:
        """Write an ``.npz`` (atomically; refuses to replace a file unless ``overwrite``)."""
        starts = [s.start for s in self.box] + [s.stop for s in self.box]
        grid = {} if self.grid is None else dict(zip(GRID_KEYS, (np.asarray(g, float) for g in self.grid)))
        write_npz({"liver": self.liver, "tumor": self.tumor, "box": np.array(starts),
                   "tumor_threshold": np.array(self.tumor_threshold), **grid}, path, overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "Probabilities":
        with np.load(path) as z:
            b = z["box"]
            threshold = int(z["tumor_threshold"]) if "tumor_threshold" in z else 128  # caches before it was stored
            grid = tuple(z[k] for k in GRID_KEYS) if all(k in z for k in GRID_KEYS) else None
            return cls(z["liver"], z["tumor"], tuple(slice(int(b[i]), int(b[i + 3])) for i in range(3)), threshold, grid)


@dataclass
class Result:
    labels: np.ndarray
    probabilities: Probabilities
    report: dict = field(default_factory=dict)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component, holes filled."""
    if not mask.any():
        return mask
    lab = cc3d.largest_k(mask.astype(np.uint8), k=1, connectivity=26)
    return ndimage.binary_fill_holes(lab > 0)


class _Progress:
    """Maps each stage's tile count onto its share of one 0..1 fraction that never goes back."""

    SHARES = {"Liver": (0.02, 0.45), "Tumors": (0.45, 0.95)}

    def __init__(self, callback):
        self.callback, self.last = callback, 0.0

    def stage(self, name: str):
        lo, hi = self.SHARES[name]

        def report(done: int, total: int):
            self.message(lo + (hi - lo) * done / max(total, 1), f"{name}: tile {done}/{total}")

        return report

    def message(self, fraction: float, text: str):
        self.last = max(self.last, fraction)
        if self.callback:
            self.callback(self.last, text)


def liver_stage_input(hu: np.ndarray, spacing, pre: dict) -> np.ndarray:
    """Stage-1 network input: the CT resampled to the model grid, clipped and scaled."""
    shape = model_shape(hu.shape, spacing, pre["resample"])
    return scale_hu(resize(hu, shape), pre.get("hu_window", (-250, 250)))


def tumor_stage_input(hu: np.ndarray, liver: np.ndarray, spacing, pre: dict):
    """Stage-2 network input, as training and inference both build it.

    Crop to the liver's bounding box + ``liver_margin_mm``, resample, clip and scale, and set to
    background (0 = -250 HU) everything farther than the margin from the liver.
    Returns (image, mask on the model grid, box on the input grid).
    """
    margin_mm = float(pre.get("liver_margin_mm", 10.0))
    box = bounding_box(liver, [int(np.ceil(margin_mm / s)) for s in spacing])
    crop = hu[box]
    shape = model_shape(crop.shape, spacing, pre["resample"], full_shape=hu.shape)
    resized = resize(liver[box], shape)
    small = resized >= 0.5
    if not small.any():  # a liver under one voxel of the model grid: its strongest voxels stand for it
        small = resized >= resized.max()
    mask = ndimage.distance_transform_edt(~small, sampling=model_spacing(crop.shape, spacing, shape)) <= margin_mm
    img = scale_hu(resize(crop, shape), pre.get("hu_window", (-250, 250)))
    img[~mask] = 0.0
    return img, mask, box


def is_imported(model: StageModel) -> bool:
    """A pyliverlesionseg network, which runs its own stage (``kulpipeline``)."""
    return model.card.get("architecture") == KUL_UNET


def stage_step(model: StageModel, fast: bool) -> float:
    inf = model.card["inference"]
    return inf.get("fast_step", 1.0) if fast else inf.get("step", 0.5)


TTA_AXES = (1, 2)  # test-time mirroring: in-plane (y, x) flips, 4 passes per tile


def stage_probability(model: StageModel, img, out_shape, device, fast, batch, progress, cancel, mask=None,
                      tta: bool = False) -> np.ndarray:
    """Foreground probability of ``model`` on ``img``, resized to ``out_shape`` as uint8 (0-255 for 0-1)."""
    probs = sliding_window_probabilities(
        model.net, img, step=stage_step(model, fast), batch=batch, device=device,
        amp_dtype=devices.amp_dtype(device, fast), mirror_axes=TTA_AXES if tta else (), progress=progress, cancel=cancel,
    )
    fg = probs[1]
    if mask is not None:
        fg[~mask] = 0.0
    return resize(fg, out_shape, dtype=np.uint8, scale=255.0)


def uint8_threshold(model: StageModel) -> int:
    """The card's probability threshold (default 0.5) on the uint8 scale: u8 >= this <=> p >= t, up to
    the uint8 rounding (a p within 0.5/255 of t may fall on either side)."""
    return int(np.ceil(float(model.card["inference"].get("threshold", 0.5)) * 255))


def planned_tiles(model: StageModel, shape, spacing, fast: bool) -> int:
    """Tiles a stage will run on an image of ``shape`` voxels of ``spacing`` mm."""
    grid = model_shape(shape, spacing, model.card["preprocessing"]["resample"])
    return count_tiles(grid, model.cfg.tile, stage_step(model, fast))


def segment(
    volume: Volume,
    liver_model: StageModel,
    tumor_model: StageModel | None,
    *,
    device: str = "auto",
    fast: bool = False,
    tta: bool = False,
    batch: int | None = None,
    progress=None,
    cancel=None,
) -> Result:
    """Run both stages on a CT volume; labels (0 bg, 1 liver, 2 tumor) on the input's grid.

    ``tumor_model`` None runs the liver stage only (e.g. liver pseudo-labels). ``tta`` averages
    each of our networks over in-plane mirrored copies of every tile (4x the tiles' time).

    A CT where stage 1 finds no liver is a result, not an error: the labels are empty and the
    report says so (``liver_found`` false, a warning), so batch runs go on.

    ``progress(fraction, message)`` is called as tiles complete; ``cancel`` (an Event or a
    callable returning True) is checked between tile batches and raises ``Cancelled``.
    """
    t0 = time.perf_counter()
    check_ct(volume)
    dev = devices.resolve_device(device)
    batch = batch or (8 if dev.type == "cuda" else 2)
    models = [m for m in (liver_model, tumor_model) if m is not None]
    for m in models:
        m.net.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    hu, spacing, reorient = to_canonical(volume)
    timings = {}
    prog = _Progress(progress)
    prog.message(0.01, "Stage 1: liver")
    notes: list[str] = []

    t = time.perf_counter()
    if is_imported(liver_model):  # pyliverlesionseg's liver stage, on the volume's own grid
        liver = reorient.to_canonical(kulpipeline.segment_liver(volume, liver_model.net, warnings=notes))
        liver_u8, tiles1 = np.where(liver, 255, 0).astype(np.uint8), 1
    else:
        img = liver_stage_input(hu, spacing, liver_model.card["preprocessing"])
        tiles1 = count_tiles(img.shape, liver_model.cfg.tile, stage_step(liver_model, fast))
        liver_u8 = stage_probability(liver_model, img, hu.shape, dev, fast, batch, prog.stage("Liver"), cancel, tta=tta)
        liver = largest_component(liver_u8 >= uint8_threshold(liver_model))
    timings["liver_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tiles2, box, tumor_box_u8 = 0, (slice(0, 0),) * 3, np.zeros((0, 0, 0), np.uint8)
    if liver.any() and tumor_model is not None:
        prog.message(0.45, "Stage 2: tumors")
        check_cancel(cancel)
        if is_imported(tumor_model):  # pyliverlesionseg's lesion stage: a mask, no probabilities
            lesions = reorient.to_canonical(kulpipeline.segment_lesions(volume, reorient.from_canonical(liver), tumor_model.net))
            box = bounding_box(liver | lesions) or (slice(0, 0),) * 3
            tumor_box_u8, tiles2 = np.where(lesions[box], 255, 0).astype(np.uint8), None
        else:
            img, mask, box = tumor_stage_input(hu, liver, spacing, tumor_model.card["preprocessing"])
            tiles2 = count_tiles(img.shape, tumor_model.cfg.tile, stage_step(tumor_model, fast))
            tumor_box_u8 = stage_probability(tumor_model, img, hu[box].shape, dev, fast, batch, prog.stage("Tumors"), cancel,
                                            mask, tta=tta)
    timings["tumor_s"] = time.perf_counter() - t

    labels = np.zeros(hu.shape, np.uint8)
    labels[liver] = LABEL_LIVER
    tumor_threshold = 128 if tumor_model is None else uint8_threshold(tumor_model)
    labels[box][tumor_box_u8 >= tumor_threshold] = LABEL_TUMOR
    tumor_u8 = np.zeros(hu.shape, np.uint8)
    tumor_u8[box] = tumor_box_u8

    labels = reorient.from_canonical(labels)
    tumor_full = reorient.from_canonical(tumor_u8)
    orig_box = bounding_box(tumor_full > 0) or (slice(0, 0),) * 3
    probs = Probabilities(reorient.from_canonical(liver_u8), tumor_full[orig_box].copy(), orig_box, tumor_threshold,
                          (np.asarray(volume.spacing), np.asarray(volume.origin), np.asarray(volume.direction)))
    timings["total_s"] = time.perf_counter() - t0
    prog.message(1.0, "Done")
    report = {
        "device": devices.describe(dev),
        "fast": fast,
        "tta_mirror_axes": list(TTA_AXES) if tta else [],
        "amp_dtype": str(devices.amp_dtype(dev, fast)).replace("torch.", ""),
        "batch": batch,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "tiles": {"liver": tiles1, "tumor": tiles2},
        "steps": {m.card["stage"]: None if is_imported(m) else stage_step(m, fast) for m in models},
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None,
        "peak_process_ram_mb": devices.peak_ram_mb(),
        "models": {m.card["stage"]: m.identity() for m in models},
        "voxels": {"liver": int((labels == LABEL_LIVER).sum() + (labels == LABEL_TUMOR).sum()), "tumor": int((labels == LABEL_TUMOR).sum())},
        "voxel_volume_ml": float(np.prod(volume.spacing)) / 1000.0,
        "liver_found": bool(liver.any()),
        "warnings": notes + ([] if liver.any() else [no_liver_warning(volume)]),
    }
    return Result(labels, probs, report)
