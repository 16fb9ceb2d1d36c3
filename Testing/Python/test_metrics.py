"""Evaluation metrics: hand-computed values, an independent brute-force check, empty masks, summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from LiverTumorSegLib.metrics import case_metrics, dice, lesion_detection, mean_ci, summarize

ANISO = (2.5, 0.7, 0.9)  # (sz, sy, sx) mm


def blob(seed: int, shape=(14, 24, 22), fraction=0.25) -> np.ndarray:
    """Smoothed random noise thresholded at its (1 - fraction) quantile: a few blobby shapes."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    return field > np.quantile(field, 1.0 - fraction)


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with at least one of the six face neighbours outside (array border = outside)."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in range(3))
    outside = np.zeros_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            outside |= ~np.roll(padded, step, axis=axis)[inner]
    return mask & outside


def brute_distances(pred, truth, spacing):
    """Pooled surface distances by nearest-neighbour search over surface-voxel coordinates in mm."""
    a = np.argwhere(brute_surface(pred)) * np.asarray(spacing)
    b = np.argwhere(brute_surface(truth)) * np.asarray(spacing)
    return np.concatenate([cKDTree(b).query(a)[0], cKDTree(a).query(b)[0]])


def box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(l, h) for l, h in zip(lo, hi))] = True
    return mask


def test_single_voxels_along_z():
    a, b = box((6, 3, 3), (1, 1, 1), (2, 2, 2)), box((6, 3, 3), (4, 1, 1), (5, 2, 2))
    m = case_metrics(a, b, (2.0, 1.0, 1.0))
    assert m["assd_mm"] == pytest.approx(6.0) and m["hd95_mm"] == pytest.approx(6.0)
    assert m["dsc"] == 0.0 and m["voe"] == 1.0 and m["precision"] == 0.0 and m["recall"] == 0.0


def test_cube_shifted_one_voxel_along_x():
    # 4^3 cubes, B = A shifted by +1 in x; sx is the smallest spacing. Each direction: 56 surface
    # voxels, 20 at sx (A's left face, 4 inner voxels of A's right face), 36 on the other surface.
    a, b = box((8, 8, 9), (2, 2, 2), (6, 6, 6)), box((8, 8, 9), (2, 2, 3), (6, 6, 7))
    m = case_metrics(a, b, (2.0, 1.5, 0.5))
    assert (m["pred_voxels"], m["truth_voxels"], m["intersection"]) == (64, 64, 48)
    assert m["dsc"] == pytest.approx(0.75) and m["voe"] == pytest.approx(0.4)
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    assert m["ravd"] == 0.0 and m["abs_ravd"] == 0.0
    assert m["assd_mm"] == pytest.approx(40 * 0.5 / 112)
    assert m["hd95_mm"] == pytest.approx(0.5)


def test_identical_masks():
    a = blob(3)
    m = case_metrics(a, a.copy(), ANISO)
    assert (m["dsc"], m["voe"], m["ravd"], m["assd_mm"], m["hd95_mm"]) == (1.0, 0.0, 0.0, 0.0, 0.0)


def test_ravd_is_signed():
    m = case_metrics(box((4, 4, 4), (0, 0, 0), (1, 1, 2)), box((4, 4, 4), (0, 0, 0), (1, 2, 2)), ANISO)
    assert m["ravd"] == pytest.approx(-0.5) and m["abs_ravd"] == pytest.approx(0.5)
    assert m["precision"] == 1.0 and m["recall"] == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_distances_match_brute_force(seed):
    pred, truth = blob(seed), blob(seed + 100)  # touch the array border, partly overlap
    assert pred.any() and truth.any() and (pred & truth).any() and (pred ^ truth).any()
    expected = brute_distances(pred, truth, ANISO)
    m = case_metrics(pred, truth, ANISO)
    assert m["assd_mm"] == pytest.approx(expected.mean(), abs=1e-6)
    assert m["hd95_mm"] == pytest.approx(np.percentile(expected, 95), abs=1e-6)
    assert m["hd95_mm"] > 0


def test_crop_does_not_change_results():
    pred, truth = blob(5), blob(6)
    big_pred, big_truth = (np.pad(x, ((3, 20), (40, 5), (7, 60))) for x in (pred, truth))
    assert case_metrics(big_pred, big_truth, ANISO) == case_metrics(pred, truth, ANISO)


def test_both_empty():
    empty = np.zeros((3, 4, 5), bool)
    m = case_metrics(empty, empty, ANISO)
    assert {k: m[k] for k in ("dsc", "voe", "ravd", "abs_ravd", "precision", "recall")} == {
        "dsc": 1.0, "voe": 0.0, "ravd": 0.0, "abs_ravd": 0.0, "precision": 1.0, "recall": 1.0}
    assert math.isnan(m["assd_mm"]) and math.isnan(m["hd95_mm"])  # no surface: left out of the means
    assert m["lesion_recall"] == 1.0 and m["lesion_truth_lesions"] == 0


@pytest.mark.parametrize("pred_empty", [True, False])
def test_one_empty(pred_empty):
    empty, full = np.zeros((3, 4, 5), bool), box((3, 4, 5), (1, 1, 1), (2, 3, 3))
    m = case_metrics(empty, full, ANISO) if pred_empty else case_metrics(full, empty, ANISO)
    assert (m["dsc"], m["voe"], m["precision"], m["recall"]) == (0.0, 1.0, 0.0, 0.0)
    assert m["ravd"] == (-1.0 if pred_empty else math.inf)
    assert math.isnan(m["assd_mm"]) and math.isnan(m["hd95_mm"])


def test_case_metrics_is_json_serialisable():
    m = case_metrics(blob(1), blob(2), ANISO)
    assert json.loads(json.dumps(m)) == m
    assert all(type(v) in (int, float) for v in m.values())


def test_dice_unchanged():
    empty = np.zeros((2, 2, 2), bool)
    assert dice(empty, empty) == 1.0 and dice(empty, ~empty) == 0.0
    assert dice(box((2, 2, 2), (0, 0, 0), (1, 1, 1)), box((2, 2, 2), (0, 0, 0), (1, 1, 2))) == pytest.approx(2 / 3)


def test_lesion_detection_hand_case():
    truth = box((10, 10, 10), (1, 1, 1), (3, 3, 3)) | box((10, 10, 10), (6, 6, 6), (8, 8, 8))
    pred = box((10, 10, 10), (2, 2, 2), (4, 4, 4)) | box((10, 10, 10), (0, 7, 0), (2, 9, 2))
    assert lesion_detection(pred, truth) == {"truth_lesions": 2, "detected": 1, "missed": 1,
                                             "pred_lesions": 2, "false_positives": 1, "recall": 0.5}


def test_lesion_detection_many_to_one():
    shape = (4, 4, 12)
    truth = box(shape, (1, 1, 1), (3, 3, 5)) | box(shape, (1, 1, 7), (3, 3, 11))
    two_on_one = box(shape, (1, 1, 0), (2, 2, 2)) | box(shape, (1, 1, 4), (2, 2, 6))
    m = lesion_detection(two_on_one, truth)
    assert (m["pred_lesions"], m["detected"], m["false_positives"]) == (2, 1, 0)
    m = lesion_detection(box(shape, (2, 2, 3), (3, 3, 9)), truth)  # one component spans both lesions
    assert (m["pred_lesions"], m["detected"], m["false_positives"], m["recall"]) == (1, 2, 0, 1.0)


def test_lesion_detection_connectivity():
    truth = np.zeros((3, 3, 3), bool)
    truth[0, 0, 0] = truth[1, 1, 1] = True  # corner-touching: one lesion at 26, two at 6
    pred = box((3, 3, 3), (0, 0, 0), (1, 1, 1))
    assert lesion_detection(pred, truth)["recall"] == 1.0
    six = lesion_detection(pred, truth, connectivity=6)
    assert (six["truth_lesions"], six["detected"], six["recall"]) == (2, 1, 0.5)
    assert lesion_detection(np.zeros_like(truth), np.zeros_like(truth))["recall"] == 1.0


def test_summarize_hand_case():
    shape, spacing = (1, 1, 6), (1.0, 1.0, 1.0)
    four, two = box(shape, (0, 0, 0), (1, 1, 4)), box(shape, (0, 0, 0), (1, 1, 2))
    empty = np.zeros(shape, bool)
    rows = [case_metrics(four, four, spacing),    # DSC 1
            case_metrics(two, four, spacing),     # DSC 2*2/6
            case_metrics(empty, two, spacing),    # missed: DSC 0, ASSD nan
            case_metrics(empty, empty, spacing)]  # both empty: DSC 1
    s = summarize(rows)
    dscs = [1.0, 2 / 3, 0.0, 1.0]
    assert s["cases"] == 4 and s["mean"] == pytest.approx(np.mean(dscs)) and s["sd"] == pytest.approx(np.std(dscs))
    assert s["global_dice"] == pytest.approx(2 * (4 + 2) / (8 + 6 + 2))
    assert s["authors_protocol_mean"] == pytest.approx((1.0 + 2 / 3) / 2) and s["authors_protocol_excluded"] == 2
    assert s["assd_mm"]["skipped"] == 2 and s["assd_mm"]["cases"] == 2  # the missed and the both-empty case
    assert s["voe"] == {"mean": pytest.approx((0 + 0.5 + 1 + 0) / 4), "cases": 4, "skipped": 0}
    assert summarize(rows, key="recall")["mean"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_mean_ci_matches_the_normal_approximation_on_a_large_sample():
    v = np.random.default_rng(3).normal(0.6, 0.3, 400)
    lo, hi = mean_ci(v)
    half = 1.96 * v.std(ddof=1) / np.sqrt(v.size)
    assert lo == pytest.approx(v.mean() - half, abs=0.15 * half) and hi == pytest.approx(v.mean() + half, abs=0.15 * half)
    assert mean_ci(v) == (lo, hi)  # deterministic for the default seed


def test_mean_ci_edge_cases():
    assert mean_ci([0.5, 0.5, np.nan]) == (0.5, 0.5)  # no spread; nan skipped
    assert all(np.isnan(mean_ci([0.7]))) and all(np.isnan(mean_ci([])))
    lo, hi = mean_ci([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    assert 0.0 <= lo < 2 / 3 < hi <= 1.0
