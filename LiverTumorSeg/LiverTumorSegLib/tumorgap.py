"""Where a tumor Dice is lost: the Dice after cumulative corrections, each removing one cause of error.

Labels: 0 background, 1 liver, 2 tumor, 3 cyst; regions are 26-connected (cc3d). From the
prediction as it is (``STEPS[0]``), in this order:

1. ``labels right``: every predicted lesion region (tumor or cyst) that touches a true lesion takes
   the label of the true lesion kind it overlaps most (tumor on a tie): what the tumor/cyst
   decision (the HU cyst filter, or a manual flip) got wrong;
2. ``no false tumors``: tumor regions touching no true lesion become liver;
3. ``no missed tumors``: true tumors that no predicted tumor touches are added with their true outline.

What remains up to 1 is the outline of the tumors found. The per-case means are also given apart
for cases whose truth has tumors and for tumor-free ones (where a case scores 1 or 0: the per-case
mean mixes an outline measure with a false-alarm rate). The steps are cumulative, so what a cause
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
TUMORS_IN_TRUTH = "tumors in truth"  # a row's count of true tumors (26-connected regions)
GROUPS = ("with tumors", "tumor-free")


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


def tumors_in_truth(truth: np.ndarray) -> int:
    """How many true tumors (26-connected regions of label 2) a case has."""
    return int(cc3d.connected_components(np.asarray(truth) == TUMOR, connectivity=26, return_N=True)[1])


def _means(rows: list[dict]) -> dict[str, float]:
    return {step: float(np.mean([r[step] for r in rows])) for step in STEPS}


def summarize_steps(rows: list[dict]) -> dict:
    """Per-case means of each step over ``rows`` (each holding the ``STEPS`` keys) and what each cause costs.

    When every row also holds ``TUMORS_IN_TRUTH``, ``groups`` gives the case count and per-case
    means of cases with tumors and of tumor-free cases (a group without cases is left out)."""
    means = _means(rows)
    ends = list(means.values()) + [1.0]
    summary = {"cases": len(rows), "per_case_mean": means,
               "cost": {cause: ends[i + 1] - ends[i] for i, cause in enumerate(COSTS)}}
    if rows and all(TUMORS_IN_TRUTH in r for r in rows):
        with_tumors = [r for r in rows if r[TUMORS_IN_TRUTH] > 0]
        tumor_free = [r for r in rows if r[TUMORS_IN_TRUTH] == 0]
        summary["groups"] = {group: {"cases": len(part), "per_case_mean": _means(part)}
                             for group, part in zip(GROUPS, (with_tumors, tumor_free)) if part}
    return summary


def steps_markdown(summary: dict, level: int = 2) -> str:
    """A Markdown table of the per-case mean tumor Dice after each correction, then what each cause costs."""
    groups = summary.get("groups", {})
    head = "| step (cumulative) | per-case mean tumor Dice |" + "".join(
        f" {g} ({part['cases']}) |" for g, part in groups.items())
    lines = [f"{'#' * level} Where the tumor Dice is lost", "",
             f"Per-case means over {summary['cases']} case(s); each step also removes one cause of error "
             "(`tumorgap.py`).", "", head, "|---|---|" + "---|" * len(groups)]
    lines += [f"| {step} | {summary['per_case_mean'][step]:.4f} |"
              + "".join(f" {part['per_case_mean'][step]:.4f} |" for part in groups.values()) for step in STEPS]
    lines += ["| perfect outlines | 1.0000 |" + " 1.0000 |" * len(groups), "",
              "Costs: " + ", ".join(f"{cause} {cost:.4f}" for cause, cost in summary["cost"].items()) + "."]
    return "\n".join(lines) + "\n"
