"""Two-stage inference: liver, then tumors inside the (cropped, masked) liver."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cc3d
import numpy as np
import torch
from scipy import ndimage

from . import devices
from .errors import InputError
from .imageio import check_ct
from .modelfile import StageModel
from .orientation import to_canonical
from .preprocess import model_shape, model_spacing, resize, scale_hu
from .slidingwindow import count_tiles, sliding_window_probabilities
from .volume import Volume

LABEL_LIVER, LABEL_TUMOR, LABEL_CYST = 1, 2, 3


@dataclass
class Probabilities:
    """Compact network output on the input grid: uint8 probabilities (0-255 for 0-1).

    ``tumor`` covers only ``box`` (slices of the input's (k, j, i) array); zero elsewhere.
    """

    liver: np.ndarray
    tumor: np.ndarray
    box: tuple[slice, slice, slice]

    def tumor_full(self) -> np.ndarray:
        out = np.zeros(self.liver.shape, np.uint8)
        out[self.box] = self.tumor
        return out

    def save(self, path) -> None:
        starts = [s.start for s in self.box] + [s.stop for s in self.box]
        np.savez_compressed(path, liver=self.liver, tumor=self.tumor, box=np.array(starts))

    @classmethod
    def load(cls, path) -> "Probabilities":
        with np.load(path) as z:
            b = z["box"]
            return cls(z["liver"], z["tumor"], tuple(slice(int(b[i]), int(b[i + 3])) for i in range(3)))


@dataclass
class Result:
    labels: np.ndarray
    probabilities: Probabilities
    report: dict = field(default_factory=dict)


def _to_u8(p: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(p * 255), 0, 255).astype(np.uint8)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component, holes filled."""
    if not mask.any():
        return mask
    lab = cc3d.largest_k(mask.astype(np.uint8), k=1, connectivity=26)
    return ndimage.binary_fill_holes(lab > 0)


def bounding_box(mask: np.ndarray, margin_vox) -> tuple[slice, ...]:
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(slice(max(int(i[0]) - m, 0), min(int(i[-1]) + 1 + m, n)) for i, m, n in zip(idx, margin_vox, mask.shape))


class _Progress:
    """Maps per-stage tile counts onto one 0..1 fraction."""

    def __init__(self, callback, total_tiles: int):
        self.callback, self.total, self.done = callback, max(total_tiles, 1), 0

    def stage(self, name: str, tiles: int):
        base = self.done

        def report(done: int, total: int):
            self.done = base + done
            if self.callback:
                self.callback(0.02 + 0.93 * self.done / self.total, f"{name}: tile {done}/{total}")

        return report

    def message(self, fraction: float, text: str):
        if self.callback:
            self.callback(fraction, text)


def liver_stage_input(hu: np.ndarray, spacing, pre: dict) -> np.ndarray:
    """Stage-1 network input: the CT resampled to the model grid, clipped and scaled."""
    shape = model_shape(hu.shape, spacing, pre["resample"])
    return scale_hu(resize(hu.astype(np.float32, copy=False), shape), pre.get("hu_window", (-250, 250)))


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
    small = resize(liver[box].astype(np.float32), shape) >= 0.5
    mask = ndimage.distance_transform_edt(~small, sampling=model_spacing(crop.shape, spacing, shape)) <= margin_mm
    img = scale_hu(resize(crop.astype(np.float32, copy=False), shape), pre.get("hu_window", (-250, 250)))
    img[~mask] = 0.0
    return img, mask, box


def stage_step(model: StageModel, fast: bool) -> float:
    inf = model.card["inference"]
    return inf.get("fast_step", 1.0) if fast else inf.get("step", 0.5)


def stage_probability(model: StageModel, img, out_shape, device, fast, batch, progress, cancel, mask=None) -> np.ndarray:
    probs = sliding_window_probabilities(
        model.net, img, step=stage_step(model, fast), batch=batch, device=device,
        amp_dtype=devices.amp_dtype(device, fast), progress=progress, cancel=cancel,
    )
    fg = probs[1]
    if mask is not None:
        fg[~mask] = 0.0
    return resize(fg, out_shape)


def planned_tiles(model: StageModel, shape, spacing, fast: bool) -> int:
    grid = model_shape(shape, spacing, model.card["preprocessing"]["resample"])
    return count_tiles(grid, model.cfg.tile, stage_step(model, fast))


def segment(
    volume: Volume,
    liver_model: StageModel,
    tumor_model: StageModel,
    *,
    device: str = "auto",
    fast: bool = False,
    batch: int | None = None,
    progress=None,
    cancel=None,
) -> Result:
    """Run both stages on a CT volume; labels (0 bg, 1 liver, 2 tumor) on the input's grid.

    ``progress(fraction, message)`` is called as tiles complete; ``cancel`` (an Event or a
    callable returning True) is checked between tile batches and raises ``Cancelled``.
    """
    t0 = time.perf_counter()
    check_ct(volume)
    dev = devices.resolve_device(device)
    batch = batch or (8 if dev.type == "cuda" else 2)
    for m in (liver_model, tumor_model):
        m.net.to(dev)
    hu, spacing, reorient = to_canonical(volume)
    timings = {}
    est = planned_tiles(liver_model, hu.shape, spacing, fast)
    prog = _Progress(progress, est * 2)
    prog.message(0.01, "Stage 1: liver")

    t = time.perf_counter()
    img = liver_stage_input(hu, spacing, liver_model.card["preprocessing"])
    liver_p = stage_probability(liver_model, img, hu.shape, dev, fast, batch, prog.stage("Liver", est), cancel)
    liver = largest_component(liver_p >= 0.5)
    timings["liver_s"] = time.perf_counter() - t
    if not liver.any():
        raise InputError("No liver found in this CT: check that it is an abdominal CT covering the liver.")

    t = time.perf_counter()
    img, mask, box = tumor_stage_input(hu, liver, spacing, tumor_model.card["preprocessing"])
    tiles2 = count_tiles(img.shape, tumor_model.cfg.tile, stage_step(tumor_model, fast))
    prog.total = prog.done + tiles2
    prog.message(0.02 + 0.93 * prog.done / prog.total, "Stage 2: tumors")
    tumor_p = stage_probability(tumor_model, img, hu[box].shape, dev, fast, batch, prog.stage("Tumors", tiles2), cancel, mask)
    timings["tumor_s"] = time.perf_counter() - t

    labels = np.zeros(hu.shape, np.uint8)
    labels[liver] = LABEL_LIVER
    labels[box][tumor_p >= 0.5] = LABEL_TUMOR
    liver_u8 = _to_u8(liver_p)
    tumor_u8 = np.zeros(hu.shape, np.uint8)
    tumor_u8[box] = _to_u8(tumor_p)

    labels = reorient.from_canonical(labels)
    tumor_full = reorient.from_canonical(tumor_u8)
    orig_box = bounding_box(tumor_full > 0, (0, 0, 0)) if tumor_full.any() else (slice(0, 0),) * 3
    probs = Probabilities(reorient.from_canonical(liver_u8), tumor_full[orig_box].copy(), orig_box)
    timings["total_s"] = time.perf_counter() - t0
    prog.message(1.0, "Done")
    report = {
        "device": devices.describe(dev),
        "fast": fast,
        "amp_dtype": str(devices.amp_dtype(dev, fast)).replace("torch.", ""),
        "batch": batch,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "tiles": {"liver": est, "tumor": tiles2},
        "steps": {"liver": stage_step(liver_model, fast), "tumor": stage_step(tumor_model, fast)},
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None,
        "models": {m.card["stage"]: {"name": m.card["name"], "file": m.path.name, "sha256": m.sha256} for m in (liver_model, tumor_model)},
        "voxels": {"liver": int((labels == LABEL_LIVER).sum() + (labels == LABEL_TUMOR).sum()), "tumor": int((labels == LABEL_TUMOR).sum())},
        "voxel_volume_ml": float(np.prod(volume.spacing)) / 1000.0,
    }
    return Result(labels, probs, report)
