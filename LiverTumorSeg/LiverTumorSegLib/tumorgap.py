"""Where a tumor Dice is lost: the Dice after cumulative corrections, each removing one cause of error.

Labels: 0 background, 1 liver, 2 tumor, 3 cyst; regions are 26-connected (cc3d). From the
prediction as it is (``STEPS[0]``), in this order:

1. ``labels right``: every predicted lesion region (tumor or cyst) that touches a true lesion takes
   the label of the true lesion kind it overlaps most (tumor on a tie): what the tumor/cyst
   decision (the HU cyst filter, or a manual flip) got wrong;
2. ``no false tumors``: tumor regions touching no true lesion become liver;
3. ``no missed tumors``: true tumors that no predicted tumor touches are added with their true outline.

What remains up to 1 is the outline of the tumors found. The steps are cumulative, so what a cause
costs depends on the order; this one is fixed. A step works on whole regions, so it can cost a
little below 0: a predicted region straddling a tumor and a cyst takes the label of the larger
overlap, losing the rest. Dice of two empty masks is 1 (``metrics.dice``).
"""

from __future__ import annotations

import cc3d
import numpy as np

from .metrics import dice

LIVER, TUMOR, CYST = 1, 2, 3
STEPS = ("as is", "labels right", "no false tumors", "no missed tumors")
COSTS = ("tumor/cyst labels", "false tumors", "missed tumors", "outlines")  # what each step's gain measures


def relabel_by_truth(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each predicted lesion region touching a true lesion gets the majority true lesion label."""
    out = pred.copy()
    regions, n = cc3d.connected_components(np.isin(pred, (TUMOR, CYST)), connectivity=26, return_N=True)
    if n == 0:
        return out
    tumor = np.bincount(regions[truth == TUMOR], minlength=n + 1)
    cyst = np.bincount(regions[truth == CYST], minlength=n + 1)
    touched = (tumor + cyst) > 0
    touched[0] = False
    majority = np.where(tumor >= cyst, TUMOR, CYST).astype(out.dtype)
    mask = touched[regions]
    out[mask] = majority[regions[mask]]
    return out


def drop_false_tumors(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Tumor regions overlapping no true lesion become liver."""
    out = pred.copy()
    regions, n = cc3d.connected_components(pred == TUMOR, connectivity=26, return_N=True)
    hit = np.zeros(n + 1, bool)
    hit[np.unique(regions[np.isin(truth, (TUMOR, CYST))])] = True
    out[(regions > 0) & ~hit[regions]] = LIVER
    return out


def add_missed_tumors(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """True tumors no predicted tumor voxel touches are added with their true outline."""
    out = pred.copy()
    regions, n = cc3d.connected_components(truth == TUMOR, connectivity=26, return_N=True)
    found = np.zeros(n + 1, bool)
    found[np.unique(regions[pred == TUMOR])] = True
    found[0] = True
    out[~found[regions]] = TUMOR
    return out


def tumor_dice_steps(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Tumor Dice as is and after each cumulative correction (keys: ``STEPS``)."""
    maps = [np.asarray(pred)]
    for fix in (relabel_by_truth, drop_false_tumors, add_missed_tumors):
        maps.append(fix(maps[-1], truth))
    return {step: dice(m == TUMOR, truth == TUMOR) for step, m in zip(STEPS, maps)}


def summarize_steps(rows: list[dict]) -> dict:
    """Per-case means of each step over ``rows`` (each holding the ``STEPS`` keys) and what each cause costs."""
    means = {step: float(np.mean([r[step] for r in rows])) for step in STEPS}
    ends = list(means.values()) + [1.0]
    return {"cases": len(rows), "per_case_mean": means,
            "cost": {cause: ends[i + 1] - ends[i] for i, cause in enumerate(COSTS)}}


def steps_markdown(summary: dict, level: int = 2) -> str:
    """A Markdown table of the per-case mean tumor Dice after each correction, then what each cause costs."""
    lines = [f"{'#' * level} Where the tumor Dice is lost", "",
             f"Per-case means over {summary['cases']} case(s); each step also removes one cause of error "
             "(`tumorgap.py`).", "", "| step (cumulative) | per-case mean tumor Dice |", "|---|---|"]
    lines += [f"| {step} | {summary['per_case_mean'][step]:.4f} |" for step in STEPS]
    lines += ["| perfect outlines | 1.0000 |", "",
              "Costs: " + ", ".join(f"{cause} {cost:.4f}" for cause, cost in summary["cost"].items()) + "."]
    return "\n".join(lines) + "\n"
