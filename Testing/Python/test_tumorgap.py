"""tumorgap.py (and scripts/tumor_gap.py): each cumulative correction removes exactly its own cause of error."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import REPO
from LiverTumorSegLib import tumorgap


def _script():
    spec = importlib.util.spec_from_file_location("tumor_gap", REPO / "scripts" / "tumor_gap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gap = _script()


def _case():
    """Liver block with a found tumor A (half predicted), a missed tumor B, a cyst C called tumor, a false tumor D."""
    truth = np.ones((10, 40, 40), np.uint8)
    truth[2:6, 2:10, 2:10] = 2  # A: 256 voxels
    truth[2:4, 30:32, 30:32] = 2  # B: 8 voxels
    truth[2:6, 20:26, 2:8] = 3  # C: 144 voxels
    post = np.ones_like(truth)
    post[2:4, 2:10, 2:10] = 2  # half of A: 128
    post[2:6, 20:26, 2:8] = 2  # C, labelled tumor by the filter
    post[7:9, 30:34, 10:14] = 2  # D: 32 voxels, nothing in truth
    return truth, post


def test_corrections_remove_one_cause_each():
    truth, post = _case()
    result = tumorgap.tumor_dice_steps(post, truth)
    assert list(result) == list(tumorgap.STEPS)
    assert result["as is"] == pytest.approx(2 * 128 / (128 + 144 + 32 + 264))
    assert result["labels right"] == pytest.approx(2 * 128 / (128 + 32 + 264))
    assert result["no false tumors"] == pytest.approx(2 * 128 / (128 + 264))
    assert result["no missed tumors"] == pytest.approx(2 * 136 / (136 + 264))


def test_the_cyst_relabelled_and_the_false_tumor_dropped_become_cyst_and_liver():
    truth, post = _case()
    fixed = tumorgap.relabel_by_truth(post, truth)
    assert (fixed[2:6, 20:26, 2:8] == 3).all() and (fixed[2:4, 2:10, 2:10] == 2).all()
    assert (fixed[7:9, 30:34, 10:14] == 2).all()  # touches no lesion: the filter's label stays
    dropped = tumorgap.drop_false_tumors(fixed, truth)
    assert (dropped[7:9, 30:34, 10:14] == 1).all() and (dropped[2:4, 2:10, 2:10] == 2).all()


def test_a_tumor_free_case_with_one_false_tumor_goes_from_0_to_1():
    truth = np.ones((6, 20, 20), np.uint8)
    post = truth.copy()
    post[1:3, 5:8, 5:8] = 2
    result = tumorgap.tumor_dice_steps(post, truth)
    assert result["as is"] == 0.0 and result["labels right"] == 0.0
    assert result["no false tumors"] == 1.0 and result["no missed tumors"] == 1.0


def test_tumor_rows_measure_contrast_and_detection():
    rng = np.random.default_rng(0)
    ct = (100 + rng.normal(0, 10, (20, 40, 40))).astype(np.int16)
    truth = np.ones(ct.shape, np.uint8)
    truth[8:12, 5:11, 5:11] = 2
    ct[8:12, 5:11, 5:11] -= 30
    truth[8:12, 28:34, 28:34] = 2
    post = np.ones_like(truth)
    post[8:12, 5:11, 5:8] = 2  # half of the first tumor
    rows = sorted(gap.tumor_rows(ct, (1.0, 1.0, 1.0), truth, post), key=lambda r: r["hu"])
    assert [r["found"] for r in rows] == [True, False]
    assert rows[0]["dice"] == pytest.approx(2 * 72 / (72 + 144))
    assert rows[0]["contrast_hu"] == pytest.approx(30, abs=4) and rows[1]["contrast_hu"] == pytest.approx(0, abs=4)
    assert rows[0]["noise_hu"] == pytest.approx(10, abs=2) and rows[0]["ml"] == pytest.approx(0.144)


def test_a_tumor_called_cyst_is_relabelled_tumor_and_costs_are_the_steps():
    truth, post = _case()
    post[post == 2] = 3  # everything called cyst: found tumor A becomes a "missed" cyst until relabelled
    steps = tumorgap.tumor_dice_steps(post, truth)
    assert steps["as is"] == 0.0
    assert steps["labels right"] == pytest.approx(2 * 128 / (128 + 264))  # A back to tumor, C stays cyst, D stays cyst
    summary = tumorgap.summarize_steps([steps, {k: 1.0 for k in tumorgap.STEPS}])
    assert summary["per_case_mean"]["as is"] == 0.5
    assert sum(summary["cost"].values()) == pytest.approx(1 - 0.5)
    assert summary["cost"]["tumor/cyst labels"] == pytest.approx((steps["labels right"] + 1) / 2 - 0.5)
    text = tumorgap.steps_markdown(summary)
    assert "| labels right | " in text and "Costs: tumor/cyst labels" in text


def test_cases_with_tumors_and_tumor_free_cases_are_also_summarised_apart():
    truth, post = _case()
    assert tumorgap.tumors_in_truth(truth) == 2  # A and B; the cyst C is not a tumor
    free_truth = np.ones_like(truth)
    assert tumorgap.tumors_in_truth(free_truth) == 0
    with_tumors = {tumorgap.TUMORS_IN_TRUTH: 2, **tumorgap.tumor_dice_steps(post, truth)}
    free = {tumorgap.TUMORS_IN_TRUTH: 0, **tumorgap.tumor_dice_steps(post, free_truth)}  # C and D are false tumors
    assert [free[s] for s in tumorgap.STEPS] == [0.0, 0.0, 1.0, 1.0]
    summary = tumorgap.summarize_steps([with_tumors, free])
    assert summary["per_case_mean"]["as is"] == pytest.approx(with_tumors["as is"] / 2)
    assert summary["groups"]["with tumors"] == {"cases": 1, "per_case_mean": {s: with_tumors[s] for s in tumorgap.STEPS}}
    assert summary["groups"]["tumor-free"]["per_case_mean"]["no false tumors"] == 1.0
    text = tumorgap.steps_markdown(summary)
    assert "| step (cumulative) | per-case mean tumor Dice | with tumors (1) | tumor-free (1) |" in text
    assert f"| no false tumors | {(with_tumors['no false tumors'] + 1) / 2:.4f} | {with_tumors['no false tumors']:.4f} | 1.0000 |" in text
    assert "groups" not in tumorgap.summarize_steps([{s: 1.0 for s in tumorgap.STEPS}])  # rows without the count
    only = tumorgap.summarize_steps([with_tumors])
    assert list(only["groups"]) == ["with tumors"]
