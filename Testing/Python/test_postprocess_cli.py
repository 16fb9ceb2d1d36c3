"""``livertumorseg postprocess``: re-run the cyst filter on a labelmap or .seg.nrrd; refusals; real CT."""

import csv
import importlib.util

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import REPO
from LiverTumorSegLib.imageio import write_labels, write_seg_nrrd, write_volume
from LiverTumorSegLib.metrics import dice
from LiverTumorSegLib.phantom import generate_case
from LiverTumorSegLib.pipeline import Probabilities
from LiverTumorSegLib.postprocess import PostParams, PostProcessor
from LiverTumorSegLib.volume import Volume
from test_cli import _assert_clean_error, _run


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Phantom CT and labels (cysts merged into 2) on disk, and the true labels."""
    ct, truth = generate_case(8, spacing=(1.5, 1.5, 4.0), matrix=240, orientation=False)
    assert (truth.array == 2).any() and (truth.array == 3).any()
    folder = tmp_path_factory.mktemp("case")
    merged = np.where(truth.array == 3, 2, truth.array)
    write_volume(ct, folder / "ct.nii.gz")
    write_labels(merged, ct, folder / "labels.nii.gz")
    write_seg_nrrd(merged, ct, folder / "labels.seg.nrrd")
    return folder, ct, truth.array


def _labels(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _decisions(table):
    with open(table, newline="") as f:
        return [row["decision"] for row in csv.DictReader(f)]


def _postprocess(capsys, case, out, *flags, labels="labels.nii.gz"):
    folder = case[0]
    return _run(capsys, "postprocess", "--ct", folder / "ct.nii.gz", "--labels", folder / labels, "-o", out, *flags)


def test_cysts_and_tumors_separated_with_table_and_plots(case, tmp_path, capsys):
    out, table, plots = tmp_path / "out.nii.gz", tmp_path / "regions.csv", tmp_path / "plots"
    code, stdout, err = _postprocess(capsys, case, out, "--table", table, "--plots", plots, "--dilate-iterations", "0")
    assert code == 0, err
    truth, labels = case[2], _labels(out)
    assert dice(labels == 3, truth == 3) > 0.9
    assert dice(labels == 2, truth == 2) > 0.9
    decisions = _decisions(table)
    assert sorted(set(decisions)) == ["cyst", "tumor"]
    assert sorted(p.name for p in plots.iterdir()) == sorted(f"region_{i}.png" for i in range(1, len(decisions) + 1))
    assert len(stdout.strip().splitlines()) == len(decisions) + 1 and stdout.startswith("region 1:")


def test_no_cyst_filter_keeps_every_lesion_as_tumor(case, tmp_path, capsys):
    out, table = tmp_path / "out.nii.gz", tmp_path / "t.csv"
    assert _postprocess(capsys, case, out, "--table", table, "--no-cyst-filter")[0] == 0
    labels = _labels(out)
    assert not (labels == 3).any() and (labels == 2).sum() >= (case[2] >= 2).sum()
    assert set(_decisions(table)) == {"tumor"}


def test_high_threshold_turns_everything_into_cysts(case, tmp_path, capsys):
    out, table = tmp_path / "out.nii.gz", tmp_path / "t.csv"
    assert _postprocess(capsys, case, out, "--table", table, "--cyst-threshold", "200")[0] == 0
    assert set(_decisions(table)) == {"cyst"}
    assert not (_labels(out) == 2).any()


def test_fit_whole_region_flag_reaches_the_table(case, tmp_path, capsys):
    """Default: each region's core is fitted (the table says so); --fit-whole-region: every voxel, a different mean."""
    tables = {}
    for name, flags in (("core", ()), ("whole", ("--fit-whole-region",))):
        tables[name] = tmp_path / f"{name}.csv"
        code, _, err = _postprocess(capsys, case, tmp_path / f"{name}.nii.gz", "--table", tables[name], *flags)
        assert code == 0, err
    rows = {}
    for name, table in tables.items():
        with open(table, newline="") as f:
            rows[name] = list(csv.DictReader(f))
    assert {r["fit_on"] for r in rows["whole"]} == {"region"}
    cored = [(c, w) for c, w in zip(rows["core"], rows["whole"]) if c["fit_on"] == "core"]
    assert cored and all("of the core" in c["reason"] for c, _ in cored)
    assert all(float(c["fit_M"]) < float(w["fit_M"]) - 1 for c, w in cored)  # this phantom's cyst: its rim is liver
    assert all(c["fit_M"] == w["fit_M"] for c, w in zip(rows["core"], rows["whole"]) if c["fit_on"] == "region")  # too small


def test_outline_refinement_flags_reach_the_labels_and_the_table(case, tmp_path, capsys):
    """Default: regions grow into liver voxels only, and the table says by how much; off: nothing grows."""
    runs = {}
    for name, flags in (("on", ("--refine-mm", "2")), ("off", ("--no-refine-outlines",))):
        table = tmp_path / f"{name}.csv"
        code, stdout, err = _postprocess(capsys, case, tmp_path / f"{name}.nii.gz", "--table", table, "--dilate-iterations", "0", *flags)
        assert code == 0, err
        with open(table, newline="") as f:
            runs[name] = (_labels(tmp_path / f"{name}.nii.gz"), list(csv.DictReader(f)), stdout)
    (on, rows_on, out_on), (off, rows_off, out_off) = runs["on"], runs["off"]
    assert {r["outline"] for r in rows_off} == {"not refined"} and {float(r["refined_ml"]) for r in rows_off} == {0.0}
    changed = on != off
    assert np.all(off[changed] == 1) and np.all(on[changed] >= 2)  # liver voxels became lesion, nothing else moved
    ml = float(np.prod(case[1].spacing)) / 1000
    assert sum(float(r["refined_ml"]) for r in rows_on) == pytest.approx(changed.sum() * ml, abs=1e-3)
    assert all(r["outline"].startswith("liver ") for r in rows_on)
    assert "outline +" in out_on and "outline +" not in out_off
    with pytest.raises(SystemExit) as exit_info:
        _postprocess(capsys, case, tmp_path / "bad.nii.gz", "--refine-mm", "11")
    assert exit_info.value.code == 2 and "--refine-mm: must be in (0, 10] mm" in capsys.readouterr().err


def test_dilate_mode_flag_reaches_the_post_processing(case, tmp_path, capsys):
    from LiverTumorSegLib.cli import build_parser, post_params
    from LiverTumorSegLib.imageio import read_volume

    base = ["postprocess", "--ct", "c.nii.gz", "--labels", "l.nii.gz", "-o", "o.nii.gz"]
    assert post_params(build_parser().parse_args(base)).dilate_mode == "slice"
    assert post_params(build_parser().parse_args([*base, "--dilate-mode", "3d"])).dilate_mode == "3d"
    assert post_params(build_parser().parse_args(["segment", "ct.nrrd", "-o", "s.seg.nrrd", "--dilate-mode", "3d"])).dilate_mode == "3d"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--dilate-mode", "2d"])
    out = tmp_path / "out.nii.gz"
    code, _, err = _postprocess(capsys, case, out, "--dilate-mode", "3d")
    assert code == 0, err
    folder, _, truth = case
    merged = np.where(truth == 3, 2, truth).astype(np.uint8)
    processor = PostProcessor(read_volume(folder / "ct.nii.gz"), merged)
    in_3d, in_slices = (processor.apply(PostParams(dilate_mode=m))[0] for m in ("3d", "slice"))
    assert np.array_equal(_labels(out), in_3d) and not np.array_equal(in_3d, in_slices)


def test_seg_nrrd_input_and_output_match_the_labelmap_run(case, tmp_path, capsys):
    assert _postprocess(capsys, case, tmp_path / "a.nii.gz")[0] == 0
    code, _, err = _postprocess(capsys, case, tmp_path / "b.seg.nrrd", labels="labels.seg.nrrd")
    assert code == 0, err
    seg = slicerio.read_segmentation(str(tmp_path / "b.seg.nrrd"))
    voxels = slicerio.extract_segments(seg, [("Liver", 1), ("Liver tumor", 2), ("Liver cyst", 3)])["voxels"]
    assert np.array_equal(voxels.transpose(2, 1, 0), _labels(tmp_path / "a.nii.gz"))


@pytest.mark.parametrize("which", ["output", "table", "plot"])
def test_existing_output_is_not_overwritten(case, tmp_path, capsys, which):
    paths = {"output": tmp_path / "out.nii.gz", "table": tmp_path / "t.csv", "plot": tmp_path / "plots" / "region_1.png"}
    paths[which].parent.mkdir(exist_ok=True)
    paths[which].write_bytes(b"precious")
    code, _, err = _postprocess(capsys, case, paths["output"], "--table", paths["table"], "--plots", paths["plot"].parent)
    _assert_clean_error(code, err, "exists", "--overwrite", paths[which].name)
    assert paths[which].read_bytes() == b"precious"
    assert not any(p.exists() for k, p in paths.items() if k != which)
    assert _postprocess(capsys, case, paths["output"], "--table", paths["table"], "--plots", paths["plot"].parent, "--overwrite")[0] == 0
    assert paths[which].read_bytes() != b"precious"


def test_a_plots_folder_that_cannot_be_made_is_refused_before_any_output(case, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file", encoding="utf-8")
    out = tmp_path / "out.nii.gz"
    code, _, err = _postprocess(capsys, case, out, "--plots", tmp_path / "notes.txt" / "plots")
    _assert_clean_error(code, err, "cannot be written", "notes.txt")
    assert not out.exists()


@pytest.mark.parametrize("name", ["shifted.nii.gz", "shifted.seg.nrrd"])
def test_labels_on_another_grid_are_refused(case, tmp_path, capsys, name):
    folder, ct, truth = case
    shifted = ct.with_array(ct.array)
    shifted.origin = tuple(o + 5.0 for o in ct.origin)
    (write_seg_nrrd if name.endswith(".seg.nrrd") else write_labels)(truth, shifted, folder / name, overwrite=True)
    code, _, err = _postprocess(capsys, case, tmp_path / "out.nii.gz", labels=name)
    _assert_clean_error(code, err, "grid", name)
    assert not (tmp_path / "out.nii.gz").exists()


def test_seg_nrrd_without_liver_segments_is_refused_naming_what_it_has(case, tmp_path, capsys):
    folder, ct, truth = case
    seg = slicerio.create_segmentation(truth.transpose(2, 1, 0).shape, ct.ijk_to_lps())
    slicerio.add_segment(seg, truth.transpose(2, 1, 0) == 1, {"name": "Spleen"})
    slicerio.write_segmentation(str(tmp_path / "other.seg.nrrd"), seg)
    code, _, err = _run(capsys, "postprocess", "--ct", folder / "ct.nii.gz", "--labels", tmp_path / "other.seg.nrrd",
                        "-o", tmp_path / "out.nii.gz")
    _assert_clean_error(code, err, "Liver tumor", "found: Spleen")


def _ircad_script():
    spec = importlib.util.spec_from_file_location("ircad_cyst_filter", REPO / "scripts" / "ircad_cyst_filter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_ct_filter_keeps_every_ircad_tumor(shared_data):
    """3D-IRCADb 1.1, expert masks as candidates (merged in memory only; the data is CC BY-NC-ND)."""
    script = _ircad_script()
    ct, labels, truth = script.load_case(shared_data("ircad-1.1/ct.nii.gz").parent)
    processor = PostProcessor(ct, labels)
    _, rows = processor.apply(PostParams(fit_on_core=False))  # the paper's rule: every voxel of the region
    _, core_rows = processor.apply(PostParams())  # the default: the region less its one-voxel rim
    names = script.truth_of_regions(labels, rows, truth)
    for name in script.LESIONS[:-1]:
        hits = [(r, c) for r, c in zip(rows, core_rows) if name in names[r["id"]]]
        assert hits, name
        for r, c in hits:
            assert r["decision"] == "tumor" and 70 <= r["fit_M"] <= 135, (name, r)  # the data notes: 76-126 HU
            # the rim mixes in the brighter enhancing liver: the core's fit is lower, still well above 45 HU
            assert c["decision"] == "tumor" and c["fit_on"] == "core" and 60 <= c["fit_M"] < r["fit_M"], (name, c)
    cyst = [r for r in rows if "liverkyst" in names[r["id"]]]
    assert len(cyst) == 1 and cyst[0]["reason"]


def test_an_image_that_is_not_a_ct_is_refused(case, tmp_path, capsys):
    """The HU fits and outline levels mean nothing on MR or a label map: as for segment, one error."""
    folder, ct, truth = case
    write_volume(ct.with_array((ct.array.astype(np.float32) + 1024) / 4), tmp_path / "mr.nii.gz")
    code, _, err = _run(capsys, "postprocess", "--ct", tmp_path / "mr.nii.gz", "--labels", folder / "labels.nii.gz",
                        "-o", tmp_path / "out.nii.gz")
    _assert_clean_error(code, err, "does not look like a CT")
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("what", ["the CT itself", "a label 7"])
def test_labels_that_are_not_ours_are_refused(case, tmp_path, capsys, what):
    folder, ct, truth = case
    labels = folder / "ct.nii.gz"
    if what == "a label 7":
        labels = write_labels(np.where(truth == 3, 7, truth), ct, tmp_path / "seven.nii.gz")
    code, _, err = _run(capsys, "postprocess", "--ct", folder / "ct.nii.gz", "--labels", labels, "-o", tmp_path / "out.nii.gz")
    _assert_clean_error(code, err, "label values", "not a label map of ours")
    assert not (tmp_path / "out.nii.gz").exists()


def test_cached_probabilities_bring_back_what_segment_removed_as_not_tissue(tmp_path, capsys):
    """segment's output has a gas 'lesion' removed (label 0); postprocess --probabilities must see the
    network's liver again: same table as segment, and with the filter off the region is a tumor, as
    segment --no-cyst-filter would give."""
    raw = np.zeros((6, 40, 40), np.uint8)
    raw[:, 2:38, 2:38] = 1
    prob = np.zeros(raw.shape, np.uint8)
    prob[:, 5:12, 5:12] = 230  # gas next to the liver, taken for a lesion
    prob[:, 20:30, 20:30] = 250  # a tumor
    raw[prob >= 128] = 2
    rng = np.random.default_rng(1)
    hu = np.full(raw.shape, 100.0) + rng.normal(0, 8, raw.shape)
    hu[:, 5:12, 5:12] = -900 + rng.normal(0, 20, (6, 7, 7))
    hu[:, 20:30, 20:30] -= 15
    ct = Volume(np.round(hu).astype(np.int16), (1.0, 1.0, 2.0))
    probabilities = Probabilities((raw > 0).astype(np.uint8) * 255, prob, (slice(0, 6), slice(0, 40), slice(0, 40)))
    segmented, seg_rows = PostProcessor.from_network(ct, raw, probabilities).apply(PostParams())
    assert [r["decision"] for r in seg_rows] == ["not tissue", "tumor"] and not segmented[:, 5:12, 5:12].any()
    write_volume(ct, tmp_path / "ct.nii.gz")
    write_labels(segmented, ct, tmp_path / "seg.nii.gz")
    probabilities.save(tmp_path / "p.npz")
    common = ("--ct", tmp_path / "ct.nii.gz", "--labels", tmp_path / "seg.nii.gz", "--probabilities", tmp_path / "p.npz")
    code, _, err = _run(capsys, "postprocess", *common, "-o", tmp_path / "again.nii.gz", "--table", tmp_path / "t.csv")
    assert code == 0, err
    assert np.array_equal(_labels(tmp_path / "again.nii.gz"), segmented)
    assert _decisions(tmp_path / "t.csv") == ["not tissue", "tumor"]
    code, _, err = _run(capsys, "postprocess", *common, "-o", tmp_path / "off.nii.gz", "--no-cyst-filter")
    assert code == 0, err
    expected, _ = PostProcessor.from_network(ct, raw, probabilities).apply(PostParams(cyst_filter=False))
    assert np.array_equal(_labels(tmp_path / "off.nii.gz"), expected) and (expected[:, 5:12, 5:12] == 2).all()


def test_probabilities_of_another_ct_grid_and_outputs_over_inputs_are_refused(tmp_path, capsys):
    """segment --probabilities records the CT's geometry: the same array shape on a flipped CT is
    refused (its lesions would land on mirrored voxels). An output naming an input is refused even
    with --overwrite, and the input is left as it was."""
    rng = np.random.default_rng(2)
    ct = Volume(np.round(100 + rng.normal(0, 8, (6, 40, 40))).astype(np.int16), (1.0, 1.0, 2.0))
    ct.array[:, :, :3] = -900
    raw = np.zeros(ct.array.shape, np.uint8)
    raw[:, 4:36, 4:36] = 1
    prob = np.zeros(raw.shape, np.uint8)
    prob[:, 10:15, 10:15] = 250
    grid = (np.asarray(ct.spacing), np.asarray(ct.origin), ct.direction)
    whole = tuple(slice(0, n) for n in raw.shape)
    Probabilities((raw > 0).astype(np.uint8) * 255, prob, whole, 128, grid).save(tmp_path / "p.npz")
    flipped = Volume(ct.array[:, :, ::-1].copy(), ct.spacing, (39.0, 0.0, 0.0), np.diag([-1.0, 1.0, 1.0]))
    write_volume(flipped, tmp_path / "flipped.nii.gz")
    write_labels(raw[:, :, ::-1], flipped, tmp_path / "labels.nii.gz")
    args = ("--ct", tmp_path / "flipped.nii.gz", "--labels", tmp_path / "labels.nii.gz", "--probabilities", tmp_path / "p.npz")
    code, _, err = _run(capsys, "postprocess", *args, "-o", tmp_path / "out.nii.gz")
    _assert_clean_error(code, err, "another grid", "direction")
    write_volume(ct, tmp_path / "ct.nii.gz")
    write_labels(raw, ct, tmp_path / "labels.nii.gz", overwrite=True)
    ok = ("--ct", tmp_path / "ct.nii.gz", "--labels", tmp_path / "labels.nii.gz", "--probabilities", tmp_path / "p.npz")
    code, _, err = _run(capsys, "postprocess", *ok, "-o", tmp_path / "out.nii.gz")
    assert code == 0, err
    before = (tmp_path / "ct.nii.gz").read_bytes()
    for target in ("ct.nii.gz", "labels.nii.gz"):
        code, _, err = _run(capsys, "postprocess", *ok, "-o", tmp_path / target, "--overwrite")
        _assert_clean_error(code, err, "would replace one of the inputs")
    assert (tmp_path / "ct.nii.gz").read_bytes() == before


def test_post_processing_a_post_processed_result_is_warned_about(case, tmp_path, capsys, caplog):
    """Labels holding cysts have been through the filter: growing their lesions again is named. Tumor-only
    labels without --probabilities cannot be told from a network output: the warning says what is assumed."""
    first = tmp_path / "first.nii.gz"
    assert _postprocess(capsys, case, first)[0] == 0
    assert "taken as a network output" in caplog.text and "looks post-processed" not in caplog.text
    caplog.clear()
    folder = case[0]
    again = ("postprocess", "--ct", folder / "ct.nii.gz", "--labels", first)
    assert _run(capsys, *again, "-o", tmp_path / "plain.nii.gz", "--dilate-iterations", "0", "--no-refine-outlines")[0] == 0
    assert "post-processed already" not in caplog.text  # nothing grows: deciding the cysts again is fine
    assert _run(capsys, *again, "-o", tmp_path / "again.nii.gz")[0] == 0
    assert "looks post-processed already" in caplog.text and "--probabilities" in caplog.text
