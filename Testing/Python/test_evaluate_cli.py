"""The evaluate command: hand-computed metrics, summaries, plot, case matching and refusals."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.cli import main
from LiverTumorSegLib.imageio import write_seg_nrrd
from LiverTumorSegLib.volume import Volume

SHAPE = (20, 40, 40)  # (z, y, x)
SPACING_IJK = (1.0, 1.0, 2.0)
TUMOR = (slice(5, 15), slice(10, 20), slice(10, 20))  # 1000 voxels
SHIFTED = (slice(5, 15), slice(10, 20), slice(12, 22))  # overlaps TUMOR in 800 voxels
CYST = (slice(2, 5), slice(25, 28), slice(25, 28))  # 27 voxels


def _labels(tumor=None, cyst=True):
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:19, 5:35, 5:35] = 1
    if tumor is not None:
        labels[tumor] = 2
    if cyst:
        labels[CYST] = 3
    return labels


def _write(labels, path, spacing=SPACING_IJK):
    img = sitk.GetImageFromArray(labels)
    img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(code, err, *words):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def _metrics(out):
    with open(out / "metrics.csv") as f:
        return {(r["case"], r["structure"]): r for r in csv.DictReader(f)}


@pytest.fixture
def folders(tmp_path):
    """Case a: tumor shifted (DSC 0.8); case b: tumor missed (labelled liver); an unmatched prediction."""
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    _write(_labels(SHIFTED), pred / "a.nii.gz")
    _write(_labels(TUMOR), truth / "a_label.nii.gz")
    _write(_labels(None), pred / "b_seg.nii.gz")
    _write(_labels(TUMOR), truth / "b_segmentation.nii.gz")
    _write(_labels(TUMOR), pred / "extra.nii.gz")
    return pred, truth


def test_folders_hand_computed_metrics_and_summaries(folders, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "evaluate", "--pred", folders[0], "--truth", folders[1], "-o", out)
    assert code == 0, err
    assert "extra" in err
    rows = _metrics(out)
    assert sorted(rows) == [(c, s) for c in "ab" for s in ("lesion", "liver", "tumor")]
    assert float(rows["a", "tumor"]["dsc"]) == pytest.approx(0.8)
    assert int(rows["a", "tumor"]["intersection"]) == 800
    assert float(rows["a", "lesion"]["dsc"]) == pytest.approx(2 * 827 / 2054)
    assert float(rows["a", "liver"]["dsc"]) == 1.0 and float(rows["b", "liver"]["dsc"]) == 1.0
    assert float(rows["b", "tumor"]["dsc"]) == 0.0 and rows["b", "tumor"]["assd_mm"] == "nan"
    assert float(rows["a", "tumor"]["assd_mm"]) > 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))["tumor"]
    assert summary["metrics"]["dsc"]["mean"] == pytest.approx(0.4)
    assert summary["metrics"]["dsc"]["ci95"] == pytest.approx([0.0, 0.8])  # resampled means 0, 0.4, 0.8 at 1:2:1
    assert summary["authors_protocol"]["dsc"] == pytest.approx(0.8)
    assert summary["authors_protocol"]["excluded"] == 1
    assert summary["global_dice"] == pytest.approx(1600 / 3000)
    markdown = (out / "summary.md").read_text(encoding="utf-8")
    assert "0.4000 +/-" in markdown and "0.5333" in markdown and "| 0.0000-0.8000 |" in markdown
    assert "G-UNETR++ authors' protocol, not comparable with the LiTS leaderboard: DSC 0.8000" in markdown
    assert "0.4000 +/-" in stdout
    assert "| n/a (1 case) |" in markdown and "nan" not in markdown  # the ASSD of case a alone: no interval to give
    liver_table = markdown.split("## liver")[1].split("##")[0]
    assert "| DSC |" in liver_table and "lesion recall" not in liver_table  # no lesion-wise detection for the organ
    png = (out / "boxplot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    with open(out / "tumor_gap.csv") as f:
        gap = {r["case"]: r for r in csv.DictReader(f)}
    assert [float(gap["a"][k]) for k in ("as is", "labels right", "no false tumors", "no missed tumors")] == pytest.approx([0.8] * 4)
    assert [float(gap["b"][k]) for k in ("as is", "labels right", "no false tumors", "no missed tumors")] == [0.0, 0.0, 0.0, 1.0]
    steps = json.loads((out / "summary.json").read_text(encoding="utf-8"))["tumor_gap"]
    assert steps["cost"] == pytest.approx({"tumor/cyst labels": 0.0, "false tumors": 0.0, "missed tumors": 0.5, "outlines": 0.1})
    assert "over 2 case(s)" in markdown and "missed tumors 0.5000" in markdown
    assert gap["a"]["tumors in truth"] == gap["b"]["tumors in truth"] == "1"
    assert list(steps["groups"]) == ["with tumors"] and steps["groups"]["with tumors"]["cases"] == 2
    assert "| with tumors (2) |" in markdown


def test_single_files_with_seg_nrrd_prediction(tmp_path, capsys):
    pred = write_seg_nrrd(_labels(SHIFTED), Volume(np.zeros(SHAPE), SPACING_IJK), tmp_path / "case.seg.nrrd")
    truth = _write(_labels(TUMOR), tmp_path / "case_labels.nii.gz")
    code, _, err = _run(capsys, "evaluate", "--pred", pred, "--truth", truth, "-o", tmp_path / "out")
    assert code == 0, err
    rows = _metrics(tmp_path / "out")
    assert list({c for c, _ in rows}) == ["case"]
    assert float(rows["case", "tumor"]["dsc"]) == pytest.approx(0.8)
    assert float(rows["case", "lesion"]["dsc"]) == pytest.approx(2 * 827 / 2054)
    assert float(rows["case", "liver"]["dsc"]) == 1.0


def test_grid_mismatch_names_the_case(folders, tmp_path, capsys):
    _write(_labels(TUMOR), folders[1] / "a_label.nii.gz", spacing=(1.0, 1.0, 3.0))
    code, _, err = _run(capsys, "evaluate", "--pred", folders[0], "--truth", folders[1], "-o", tmp_path / "out")
    _one_error_line(code, err, "'a'", "grid")
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_a_truth_case_without_prediction_is_refused_or_scored_empty(folders, tmp_path, capsys):
    """Leaving case c out would raise every mean; it is refused, or with --missing-as-empty scored
    as an empty prediction (its tumor Dice 0). The summary's undefined figures are JSON null."""
    _write(_labels(TUMOR), folders[1] / "c_label.nii.gz")
    _write(_labels(None), folders[1] / "d_label.nii.gz")  # tumor-free: an empty prediction scores 1 on tumor
    code, _, err = _run(capsys, "evaluate", "--pred", folders[0], "--truth", folders[1], "-o", tmp_path / "out")
    _one_error_line(code, err, "2 truth case(s) have no prediction", "c, d", "--missing-as-empty")
    assert not (tmp_path / "out").exists()
    code, _, err = _run(capsys, "evaluate", "--pred", folders[0], "--truth", folders[1], "-o", tmp_path / "out",
                        "--missing-as-empty")
    assert code == 0, err
    assert "scored as empty: c, d" in err and "extra" in err
    rows = _metrics(tmp_path / "out")
    assert sorted({c for c, _ in rows}) == ["a", "b", "c", "d"]
    assert [float(rows[c, "tumor"]["dsc"]) for c in "abcd"] == pytest.approx([0.8, 0.0, 0.0, 1.0])
    assert float(rows["c", "liver"]["dsc"]) == 0.0 and rows["d", "tumor"]["assd_mm"] == "nan"
    text = (tmp_path / "out" / "summary.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    tumor = json.loads(text)["tumor"]["metrics"]
    assert tumor["dsc"]["mean"] == pytest.approx((0.8 + 0 + 0 + 1) / 4)
    assert (tumor["assd_mm"]["cases"], tumor["assd_mm"]["skipped"]) == (1, 3)  # a alone has two surfaces
    assert tumor["assd_mm"]["ci95"] == [None, None]  # no CI from one case: null, not the non-standard NaN
    code, _, err = _run(capsys, "evaluate", "--pred", folders[0] / "a.nii.gz", "--truth", folders[1] / "a_label.nii.gz",
                        "-o", tmp_path / "out2", "--missing-as-empty")
    _one_error_line(code, err, "--missing-as-empty", "folders")


def test_no_matching_case_is_an_error(tmp_path, capsys):
    _write(_labels(TUMOR), tmp_path / "pred" / "x.nii.gz")
    _write(_labels(TUMOR), tmp_path / "truth" / "y_label.nii.gz")
    code, _, err = _run(capsys, "evaluate", "--pred", tmp_path / "pred", "--truth", tmp_path / "truth", "-o", tmp_path / "out")
    _one_error_line(code, err, "no case", "x", "y")


def test_post_processing_flags_without_a_model_are_refused(folders, tmp_path, capsys):
    """--pred is scored as it is: a post-processing flag there would be silently ignored, even at its default."""
    for flags in (["--min-peak", "0.6"], ["--cyst-threshold", "45"], ["--fit-whole-region"], ["--dilate-mode", "slice"]):
        code, _, err = _run(capsys, "evaluate", "--pred", folders[0], "--truth", folders[1], "-o", tmp_path / "out", *flags)
        _one_error_line(code, err, "post-processing flags", "--model", flags[0])
        assert not (tmp_path / "out").exists()


def test_an_input_folder_is_refused_as_the_output(folders, tmp_path, capsys):
    for out in folders[:2]:
        before = sorted(p.name for p in out.iterdir())
        code, _, err = _run(capsys, "evaluate", "--pred", folders[0], "--truth", folders[1], "-o", out, "--overwrite")
        _one_error_line(code, err, "input folder")
        assert sorted(p.name for p in out.iterdir()) == before


def test_existing_outputs_kept_without_overwrite(folders, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.md").write_text("precious")
    argv = ["evaluate", "--pred", folders[0], "--truth", folders[1], "-o", out]
    code, _, err = _run(capsys, *argv)
    _one_error_line(code, err, "exists", "--overwrite")
    assert (out / "summary.md").read_text(encoding="utf-8") == "precious" and not (out / "metrics.csv").exists()
    assert _run(capsys, *argv, "--overwrite")[0] == 0
    assert "DSC" in (out / "summary.md").read_text(encoding="utf-8")


def test_prediction_with_another_origin_is_refused(tmp_path, capsys):
    labels = np.zeros((8, 16, 16), np.uint8)
    labels[2:6, 4:12, 4:12] = 1
    truth, pred = sitk.GetImageFromArray(labels), sitk.GetImageFromArray(labels)
    pred.SetOrigin((5.0, 0.0, 0.0))  # same shape and spacing, shifted: voxel-wise scores would be wrong
    sitk.WriteImage(truth, str(tmp_path / "t.nii.gz"))
    sitk.WriteImage(pred, str(tmp_path / "p.nii.gz"))
    code = main(["evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--truth", str(tmp_path / "t.nii.gz"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "different grids (origin (5, 0, 0) vs (0, 0, 0) mm (LPS)" in err and "Traceback" not in err
    flipped = sitk.GetImageFromArray(labels[:, :, ::-1].copy())  # the same voxels in space, stored along -x
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    flipped.SetOrigin((15.0, 0.0, 0.0))
    sitk.WriteImage(flipped, str(tmp_path / "p.nii.gz"))
    code = main(["evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--truth", str(tmp_path / "t.nii.gz"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err  # refused, and the message says what differs (shape and spacing are the same)
    assert code == 2 and "direction (-1, 0, 0, 0, 1, 0, 0, 0, 1) vs (1, 0, 0, 0, 1, 0, 0, 0, 1)" in err, err


def test_a_ct_given_as_the_prediction_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 300, SHAPE).astype(np.int16)
    _write(ct, tmp_path / "pred.nii.gz")
    _write(_labels(TUMOR), tmp_path / "truth.nii.gz")
    code, _, err = _run(capsys, "evaluate", "--pred", tmp_path / "pred.nii.gz", "--truth", tmp_path / "truth.nii.gz",
                        "-o", tmp_path / "out")
    _one_error_line(code, err, "pred.nii.gz", "label values")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_evaluate_model_refuses_a_split_part_it_cannot_score_whole(tmp_path):
    """An empty part, a case the data lack, a case without labels: refused, never silently fewer
    cases (or, for an empty part, every case, training cases included). No split: the labelled cases."""
    from types import SimpleNamespace

    from LiverTumorSegLib.datasets import Case
    from LiverTumorSegLib.errors import InputError
    from LiverTumorSegLib.evaluate_model import split_cases

    cases = {n: Case(n, tmp_path / f"{n}.nii.gz", None if n == "u" else tmp_path / f"{n}_label.nii.gz", "pairs")
             for n in ("a", "b", "c", "u")}
    split = tmp_path / "split.json"

    def part(test, model_dir=None, split_file=split):
        split.write_text(json.dumps({"train": ["a"], "val": ["b"], "test": test}), encoding="utf-8")
        return split_cases(SimpleNamespace(split=split_file, part="test"), model_dir, cases)

    assert part(["c"]) == (["c"], f"the test part of {split}")
    for test, words in (([], "is empty"), (["c", "x"], "not in --data: x"), (["c", "u"], "no reference labels: u")):
        with pytest.raises(InputError, match=words):
            part(test)
    assert part(["c"], split_file=None) == (["a", "b", "c"], "all labelled cases (no split file)")  # no split anywhere
    assert part(["c"], model_dir=tmp_path, split_file=None)[0] == ["c"]  # the model folder's split.json


def test_model_evaluation_scores_what_segment_writes(tmp_path, capsys):
    """evaluate --model's two outputs are the label maps `segment` writes with and without
    --no-postprocess, scored as evaluate --pred scores them (here the cyst filter changes the result)."""
    from LiverTumorSegLib.imageio import write_labels, write_volume
    from LiverTumorSegLib.phantom import generate_case

    ct, truth = generate_case(3014, spacing=(2.0, 2.0, 5.0), matrix=160)
    data = tmp_path / "data"
    ct_file, truth_file = data / "case_3014_ct.nii.gz", data / "case_3014_label.nii.gz"
    write_volume(ct, ct_file)
    write_labels(truth.array, ct, truth_file)
    quick = ("--fast", "--no-tta")
    assert _run(capsys, "evaluate", "--model", "phantom-small", "--data", data, "-o", tmp_path / "model", *quick)[0] == 0
    scored = {}
    for output, flags in (("post-processed", ()), ("network", ("--no-postprocess",))):
        labels = tmp_path / output / "case_3014.nii.gz"
        assert _run(capsys, "segment", ct_file, "-o", labels, *quick, *flags)[0] == 0
        assert _run(capsys, "evaluate", "--pred", labels, "--truth", truth_file, "-o", tmp_path / f"eval-{output}")[0] == 0
        with open(tmp_path / f"eval-{output}" / "metrics.csv", encoding="utf-8") as f:
            scored[output] = {row["structure"]: row for row in csv.DictReader(f)}
    with open(tmp_path / "model" / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        mine = scored[row["output"]][row["structure"]]
        for metric in ("dsc", "voe", "ravd", "assd_mm", "hd95_mm"):
            assert row[metric] == mine[metric], (row["output"], row["structure"], metric)
    assert any(scored["network"][s]["dsc"] != scored["post-processed"][s]["dsc"] for s in ("tumor", "cyst"))
