"""Evaluation metrics with the papers' definitions: overlap, surface distances, lesion detection.

A = prediction, B = truth, boolean masks on one voxel grid indexed (z, y, x); spacing is given per
array axis in mm, i.e. (sz, sy, sx).

Conventions for empty masks (documented once, used everywhere):

* both empty: DSC 1, VOE 0, RAVD 0, precision 1, recall 1; ASSD and HD95 nan (no surface to
  measure: a tumor-free case scored 0 mm would pull a mean of outline errors down, as MONAI's nan);
* only one empty: DSC 0, VOE 1, precision 0, recall 0 (the undefined 0/0 side scores 0: nothing in
  it is right), RAVD -1 when A is empty and +inf when B is empty, ASSD and HD95 nan.
  ``summarize`` skips non-finite values and reports how many it skipped.

Surface distances: the surface of a mask is its voxels with a face (6-) neighbour outside the mask,
the array border counting as outside. Both directed sets of surface-to-surface distances (A's surface
voxels to B's surface and B's to A's) are pooled; ASSD is their mean and HD95 their 95th percentile
(``numpy.percentile``, linear interpolation). This is *not* MONAI's
``compute_hausdorff_distance(percentile=95)``, which takes the larger of the two directed 95th
percentiles.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import cc3d
import numpy as np
from scipy import ndimage, stats

AUTHORS_PROTOCOL = "mean excluding cases with DSC 0 and cases with both masks empty (G-UNETR++ reporting)"


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient of two masks; 1.0 when both are empty, 0.0 when only one is."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def overlap_metrics(n_pred: int, n_truth: int, n_inter: int) -> dict:
    """DSC, VOE, RAVD (signed and absolute), precision and recall from voxel counts |A|, |B|, |A and B|."""
    if n_pred == 0 and n_truth == 0:
        return {"dsc": 1.0, "voe": 0.0, "ravd": 0.0, "abs_ravd": 0.0, "precision": 1.0, "recall": 1.0}
    ravd = (n_pred - n_truth) / n_truth if n_truth else math.inf
    return {
        "dsc": 2.0 * n_inter / (n_pred + n_truth),
        "voe": 1.0 - n_inter / (n_pred + n_truth - n_inter),
        "ravd": ravd,
        "abs_ravd": abs(ravd),
        "precision": n_inter / n_pred if n_pred else 0.0,
        "recall": n_inter / n_truth if n_truth else 0.0,
    }


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (outside the array counts as outside)."""
    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _crop_union(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their union's bounding box (all outside it is outside both: same surfaces)."""
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    return pred[box], truth[box]


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Pooled symmetric surface distances in mm (A's surface to B's, then B's to A's); both masks non-empty."""
    pred, truth = _crop_union(np.asarray(pred, bool), np.asarray(truth, bool))
    surf_pred, surf_truth = surface(pred), surface(truth)
    to_truth = ndimage.distance_transform_edt(~surf_truth, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
    return np.concatenate([to_truth[surf_pred], to_pred[surf_truth]])


def distance_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict:
    """ASSD and HD95 in mm (pooled convention, see module docstring); nan if either mask is empty."""
    if not (np.any(pred) and np.any(truth)):
        return {"assd_mm": math.nan, "hd95_mm": math.nan}
    dist = surface_distances(pred, truth, spacing)
    return {"assd_mm": float(dist.mean()), "hd95_mm": float(np.percentile(dist, 95))}


def lesion_detection(pred: np.ndarray, truth: np.ndarray, connectivity: int = 26) -> dict:
    """Lesion-wise detection from 3-D connected components (cc3d).

    A truth lesion is detected if any predicted voxel overlaps it; a predicted component overlapping
    no truth voxel is a false positive. ``recall`` is 1.0 when there is no truth lesion.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    truth_labels, n_truth = cc3d.connected_components(truth, connectivity=connectivity, return_N=True)
    pred_labels, n_pred = cc3d.connected_components(pred, connectivity=connectivity, return_N=True)
    detected = np.unique(truth_labels[pred & truth]).size
    true_pred = np.unique(pred_labels[pred & truth]).size
    return {
        "truth_lesions": int(n_truth),
        "detected": int(detected),
        "missed": int(n_truth - detected),
        "pred_lesions": int(n_pred),
        "false_positives": int(n_pred - true_pred),
        "recall": detected / n_truth if n_truth else 1.0,
    }


def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict:
    """All metrics of one case as plain floats/ints: voxel counts, overlap, distances, ``lesion_*`` detection.

    nan and inf (see module docstring) are written by ``json.dumps`` as NaN and Infinity.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    counts = {"pred_voxels": int(pred.sum()), "truth_voxels": int(truth.sum()),
              "intersection": int(np.count_nonzero(pred & truth))}
    overlap = overlap_metrics(counts["pred_voxels"], counts["truth_voxels"], counts["intersection"])
    lesions = {f"lesion_{k}": v for k, v in lesion_detection(pred, truth).items()}
    return {**counts, **overlap, **distance_metrics(pred, truth, spacing), **lesions}


def _finite_mean(values: Iterable[float]) -> dict:
    """Mean of the finite values, with how many were used and how many (nan, inf) were skipped."""
    values = np.asarray(list(values), float)
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if finite.size else math.nan
    return {"mean": mean, "cases": int(finite.size), "skipped": int(values.size - finite.size)}


def summarize(rows: Sequence[dict], key: str = "dsc") -> dict:
    """Summary over ``case_metrics`` rows.

    * ``mean``/``sd`` of ``key`` over all cases (a missed case counts with its value, e.g. DSC 0;
      sd is the population sd, ddof=0);
    * ``global_dice``: 2 * sum |A and B| / sum (|A| + |B|) over the pooled voxels (1.0 if all empty);
    * ``authors_protocol_mean``: mean of ``key`` excluding cases with DSC 0 and cases with both
      masks empty, as the G-UNETR++ authors reported; ``authors_protocol_excluded`` counts them;
    * ``voe``, ``ravd``, ``abs_ravd``, ``assd_mm``, ``hd95_mm``: means skipping nan/inf, with counts.
    """
    values = np.asarray([row[key] for row in rows], float)
    kept = [row[key] for row in rows
            if row["dsc"] != 0 and (row["pred_voxels"] or row["truth_voxels"])]
    inter = sum(row["intersection"] for row in rows)
    total = sum(row["pred_voxels"] + row["truth_voxels"] for row in rows)
    return {
        "key": key,
        "cases": len(rows),
        "mean": float(values.mean()) if len(rows) else math.nan,
        "sd": float(values.std()) if len(rows) else math.nan,
        "global_dice": 2.0 * inter / total if total else 1.0,
        "authors_protocol": AUTHORS_PROTOCOL,
        "authors_protocol_mean": float(np.mean(kept)) if kept else math.nan,
        "authors_protocol_excluded": len(rows) - len(kept),
        **{name: _finite_mean(row[name] for row in rows)
           for name in ("voe", "ravd", "abs_ravd", "assd_mm", "hd95_mm")},
    }


def mean_ci(values: Iterable[float], level: float = 0.95, resamples: int = 9999, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of the finite values (scipy.stats.bootstrap).

    Deterministic for a seed; (nan, nan) with fewer than two finite values.
    """
    v = np.asarray(list(values), float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return math.nan, math.nan
    if np.all(v == v[0]):  # no spread: every resample has the same mean
        return float(v[0]), float(v[0])
    ci = stats.bootstrap((v,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                         rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)
