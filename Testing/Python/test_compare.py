"""``livertumorseg compare``: paired per-case differences of two evaluations, checked by hand."""

import json
import math

import numpy as np
import pytest

from LiverTumorSegLib.compare import MIN_CASES, compare_metric, verdict, wilcoxon_p
from test_evaluate_cli import SHIFTED, TUMOR, _labels, _one_error_line, _run, _write


def test_paired_difference_counts_and_exact_wilcoxon():
    row = compare_metric([0.5, 0.6, 0.7, 0.8, 0.9], [0.6, 0.7, 0.8, 0.9, 1.0], 1)
    assert row["mean_difference"] == pytest.approx(0.1) and row["cases"] == 5 and row["left_out"] == 0
    assert (row["b_better"], row["b_worse"], row["same"]) == (5, 0, 0)
    assert row["wilcoxon_p"] == pytest.approx(2 / 2**5)  # exact: all 5 ranks positive, two-sided
    assert row["ci95"][0] == pytest.approx(0.1) and row["ci95"][1] == pytest.approx(0.1)
    assert verdict(row, 1) == "too few cases to tell (under 10)"  # the bootstrap CI excludes 0, but from 5 cases
    a = [0.5 + 0.04 * i for i in range(MIN_CASES)]
    row = compare_metric(a, [x + 0.01 + 0.001 * i for i, x in enumerate(a)], 1)
    assert row["cases"] == MIN_CASES and row["ci95"][0] > 0 and verdict(row, 1) == "B better (mean)"
    assert verdict(compare_metric(a, [x - 0.01 for x in a], 1), 1) == "A better (mean)"


def test_distances_count_lower_as_better_and_non_finite_cases_are_left_out():
    row = compare_metric([2.0, 3.0, math.inf, 5.0], [1.0, 4.0, 2.0, 5.0], -1)
    assert (row["cases"], row["left_out"]) == (3, 1)
    assert (row["b_better"], row["b_worse"], row["same"]) == (1, 1, 1)
    assert row["mean_a"] == pytest.approx(10 / 3) and row["mean_b"] == pytest.approx(10 / 3)
    assert row["mean_difference"] == pytest.approx(0.0) and verdict(row, -1).startswith("too few cases")
    a = [2.0 + 0.3 * i for i in range(12)]
    row = compare_metric(a, [x - 0.5 - 0.01 * i for i, x in enumerate(a)], -1)  # B's distances shorter: B better
    assert row["b_better"] == 12 and verdict(row, -1) == "B better (mean)"
    assert verdict(compare_metric(a, list(a), -1), -1) == "no clear difference"


def test_many_small_gains_against_one_large_loss():
    """Fourteen cases gain 0.005-0.07, one tumor-free case flips from 1 to 0: the mean falls and its
    CI holds 0, while the signed ranks favour B. Exact two-sided p: the loss has the top rank 15, so
    W- = 15, and 137 of the 2**15 sign patterns have W- <= 15 (subsets of 1..15 summing to 15 or less)."""
    a = [0.5] * 14 + [1.0]
    b = [0.5 + 0.005 * (i + 1) for i in range(14)] + [0.0]
    row = compare_metric(a, b, 1)
    assert row["mean_difference"] == pytest.approx((0.525 - 1) / 15)
    assert row["ci95"][0] < 0 < row["ci95"][1]
    assert row["wilcoxon_p"] == pytest.approx(2 * 137 / 2**15)
    assert (row["b_better"], row["b_worse"]) == (14, 1)
    assert verdict(row, 1) == "mean: no clear difference; most cases: B better (Wilcoxon)"


def test_no_difference_gives_p_one():
    assert wilcoxon_p(np.zeros(4)) == 1.0
    assert compare_metric([1.0, 0.0], [1.0, 0.0], 1)["wilcoxon_p"] == 1.0


def test_two_evaluate_folders_compared_end_to_end(tmp_path, capsys):
    """A: case a's tumor shifted (DSC 0.8), case b's missed (0); B: both exact (1, 1)."""
    truth, pred_a, pred_b = tmp_path / "truth", tmp_path / "pred_a", tmp_path / "pred_b"
    for case in ("a", "b"):
        _write(_labels(TUMOR), truth / f"{case}.nii.gz")
        _write(_labels(TUMOR), pred_b / f"{case}.nii.gz")
    _write(_labels(SHIFTED), pred_a / "a.nii.gz")
    _write(_labels(None), pred_a / "b.nii.gz")
    for pred, out in ((pred_a, "eval_a"), (pred_b, "eval_b")):
        code, _, err = _run(capsys, "evaluate", "--pred", pred, "--truth", truth, "-o", tmp_path / out)
        assert code == 0, err
    code, out, err = _run(capsys, "compare", tmp_path / "eval_a", tmp_path / "eval_b", "-o", tmp_path / "cmp")
    assert code == 0, err
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text(encoding="utf-8"))
    rows = {(r["structure"], r["metric"]): r for r in result["rows"]}
    tumor = rows[("tumor", "DSC")]
    assert tumor["mean_a"] == pytest.approx(0.4) and tumor["mean_b"] == pytest.approx(1.0)
    assert tumor["mean_difference"] == pytest.approx(0.6) and tumor["b_better"] == 2
    liver = rows[("liver", "DSC")]
    assert liver["same"] == 2 and liver["mean_difference"] == 0 and liver["wilcoxon_p"] == 1.0
    assert "| tumor | DSC | 2 |" in out and (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert (tmp_path / "cmp" / "compare.md").read_text(encoding="utf-8") == out.rstrip("\n") + "\n"

    code, _, err = _run(capsys, "compare", tmp_path / "eval_a", tmp_path / "eval_b", "-o", tmp_path / "cmp")
    _one_error_line(code, err, "exists")
    code, _, err = _run(capsys, "compare", tmp_path / "eval_a", truth, "-o", tmp_path / "cmp2")
    _one_error_line(code, err, "metrics.csv")
    assert not (tmp_path / "cmp2").exists()
    before = sorted(p.name for p in (tmp_path / "eval_a").iterdir())
    code, _, err = _run(capsys, "compare", tmp_path / "eval_a", tmp_path / "eval_b", "-o", tmp_path / "eval_a", "--overwrite")
    _one_error_line(code, err, "input folder")
    assert sorted(p.name for p in (tmp_path / "eval_a").iterdir()) == before


def test_label_maps_pair_with_each_output_of_a_model_evaluation():
    """Another tool's label maps (evaluate --pred: no output column) against a --model evaluation's
    network and post-processed rows: B's rows are repeated under each of A's outputs."""
    from LiverTumorSegLib.compare import align_outputs, compare

    dsc = {"dsc": 0.8, "assd_mm": 1.0, "hd95_mm": 2.0}
    model = {(out, "tumor", c): dict(dsc) for out in ("network", "post-processed") for c in ("x", "y")}
    tool = {("", "tumor", c): dict(dsc, dsc=0.9) for c in ("x", "y")}
    a, b = align_outputs(model, tool)
    assert a == model and set(b) == set(model)
    result = compare(model, tool, "ours", "tool")
    assert {(r["output"], r["metric"]) for r in result["rows"]} == {
        (o, m) for o in ("network", "post-processed") for m in ("DSC", "ASSD (mm)", "HD95 (mm)")}
    assert all(r["mean_difference"] == pytest.approx(0.1) for r in result["rows"] if r["metric"] == "DSC")
    assert align_outputs(tool, tool) == (tool, tool) and align_outputs(model, model) == (model, model)
    with pytest.raises(Exception, match="in both: 0"):
        compare(model, {("", "tumor", "z"): dict(dsc)}, "ours", "tool")
