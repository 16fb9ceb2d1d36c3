"""The livertumorseg command: outputs, geometry, refusals with one clear message and exit code."""

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
import slicerio

from LiverTumorSegLib.cli import main
from LiverTumorSegLib.imageio import read_volume, write_volume
from LiverTumorSegLib.masks import bounding_box
from LiverTumorSegLib.modelfile import read_card
from LiverTumorSegLib.netconfig import SMALL
from LiverTumorSegLib.phantom import generate_case
from LiverTumorSegLib.pipeline import Probabilities
from LiverTumorSegLib.registry import model_files
from LiverTumorSegLib.volume import Volume


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    ct, _ = generate_case(2031, spacing=(1.2, 1.2, 4.0), matrix=300)
    return write_volume(ct, tmp_path_factory.mktemp("in") / "case.nii.gz")


def _geometry(path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean_error(code, err, *words):
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def test_segment_writes_seg_nrrd_and_labelmap_on_input_grid(ct_file, tmp_path, capsys):
    seg, lab, rep = tmp_path / "out.seg.nrrd", tmp_path / "out.nii.gz", tmp_path / "report.json"
    code, out, err = _run(capsys, "segment", ct_file, "-o", seg, "--fast", "--report", rep)
    assert code == 0, err
    assert _run(capsys, "segment", ct_file, "-o", lab, "--fast")[0] == 0
    assert _geometry(lab) == _geometry(ct_file)
    s = slicerio.read_segmentation(str(seg))
    assert [x["name"] for x in s["segments"]] == ["Liver", "Liver tumor", "Liver cyst"]
    assert np.allclose(s["ijkToLPS"], read_volume(ct_file).ijk_to_lps())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
    extracted = slicerio.extract_segments(s, [("Liver", 1), ("Liver tumor", 2), ("Liver cyst", 3)])["voxels"]
    assert np.array_equal(extracted.transpose(2, 1, 0), labels)
    assert (labels == 1).sum() > 1000 and '"timings"' in rep.read_text(encoding="utf-8")
    report = json.loads(rep.read_text(encoding="utf-8"))  # the summary line names every kind of finding
    ml = report["voxel_volume_ml"]
    assert f"cyst {report['voxels']['cyst'] * ml:.1f} mL" in out and f"tumor {report['voxels']['tumor'] * ml:.1f} mL" in out
    decided = [r["decision"] for r in report["regions"]]
    assert (f"({len(decided)} regions: " in out) == bool(decided)


def test_tta_is_recorded_and_keeps_the_grid(ct_file, tmp_path, capsys):
    plain, tta, rep = tmp_path / "plain.nii.gz", tmp_path / "tta.nii.gz", tmp_path / "r.json"
    assert _run(capsys, "segment", ct_file, "-o", plain, "--fast", "--no-postprocess")[0] == 0
    assert _run(capsys, "segment", ct_file, "-o", tta, "--fast", "--tta", "--no-postprocess", "--report", rep)[0] == 0
    assert json.loads(rep.read_text(encoding="utf-8"))["tta_mirror_axes"] == [1, 2]
    assert _geometry(tta) == _geometry(ct_file)
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) > 0 for p in (plain, tta))
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95  # the same liver, from the average of four passes


def test_segment_applies_postprocessing_and_writes_the_table(ct_file, tmp_path, capsys):
    raw, post, table = tmp_path / "raw.nii.gz", tmp_path / "post.nii.gz", tmp_path / "regions.csv"
    assert _run(capsys, "segment", ct_file, "-o", raw, "--fast", "--no-postprocess")[0] == 0
    assert _run(capsys, "segment", ct_file, "-o", post, "--fast", "--table", table, "--cyst-threshold", "200")[0] == 0
    raw_l, post_l = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (raw, post))
    assert set(np.unique(raw_l)) <= {0, 1, 2} and (raw_l == 2).any()
    assert not (post_l == 2).any() and (post_l == 3).sum() >= (raw_l == 2).sum()  # every lesion below 200 HU -> cyst
    rows = table.read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("id,decision,reason") and len(rows) > 1 and all(",cyst," in r for r in rows[1:])


@pytest.mark.parametrize("which", ["output", "report", "probabilities"])
def test_existing_output_is_not_overwritten(ct_file, tmp_path, capsys, which):
    paths = {"output": tmp_path / "labels.nii.gz", "report": tmp_path / "r.json", "probabilities": tmp_path / "p.npz"}
    paths[which].write_bytes(b"precious")
    code, _, err = _run(capsys, "segment", ct_file, "-o", paths["output"], "--report", paths["report"],
                        "--probabilities", paths["probabilities"], "--fast")
    _assert_clean_error(code, err, "exists", "--overwrite")
    assert paths[which].read_bytes() == b"precious"
    assert not any(p.exists() for k, p in paths.items() if k != which)


def test_probabilities_cache_written_under_the_given_name(ct_file, tmp_path, capsys):
    cache = tmp_path / "cache.npz"
    assert _run(capsys, "segment", ct_file, "-o", tmp_path / "l.nii.gz", "--probabilities", cache, "--fast")[0] == 0
    assert cache.exists() and not list(tmp_path.glob("*.tmp*"))


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_postprocess_with_the_cached_probabilities_repeats_segment_and_gates_by_peak(ct_file, tmp_path, capsys):
    """segment's labels and probabilities through postprocess give segment's labels back; --min-peak
    sends exactly the regions whose peak is below it back to liver; without the probabilities it is refused."""
    seg, cache, table = tmp_path / "seg.nii.gz", tmp_path / "p.npz", tmp_path / "seg.csv"
    assert _run(capsys, "segment", ct_file, "-o", seg, "--probabilities", cache, "--table", table, "--fast")[0] == 0
    again = tmp_path / "again.nii.gz"
    common = ("postprocess", "--ct", ct_file, "--labels", seg, "--probabilities", cache)
    assert _run(capsys, *common, "-o", again)[0] == 0
    assert np.array_equal(_array(again), _array(seg))
    rows = _table(table)
    assert rows and all(r["peak_probability"] != "" for r in rows)  # every row of segment's table has its peak
    # a faint region (peak 150/255 = 0.588) added to the cached map, inside the liver, away from the lesions
    probabilities = Probabilities.load(cache)
    assert probabilities.grid is not None and probabilities.grid_difference(read_volume(ct_file)) is None  # geometry kept
    full = probabilities.tumor_full()
    inner = ndimage.binary_erosion(_array(seg) == 1, iterations=4) & (ndimage.maximum_filter(full, size=9) == 0)
    k, j, i = np.argwhere(inner)[int(inner.sum()) // 2]
    blob = (slice(k - 1, k + 2), slice(j - 2, j + 3), slice(i - 2, i + 3))
    full[blob] = 150
    box = bounding_box(full > 0)
    faint = tmp_path / "faint.npz"
    Probabilities(probabilities.liver, full[box].copy(), box, probabilities.tumor_threshold, probabilities.grid).save(faint)
    with_faint = ("postprocess", "--ct", ct_file, "--labels", seg, "--probabilities", faint)
    for name, flags, gated in (("off", ("--min-peak", "0"), False), ("default", (), True), ("low", ("--min-peak", "0.55"), False)):
        out, out_table = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}.csv"
        code, stdout, err = _run(capsys, *with_faint, "-o", out, "--table", out_table, *flags)
        assert code == 0, err
        row = next(r for r in _table(out_table) if float(r["peak_probability"]) == round(150 / 255, 3))
        assert (row["decision"] == "low confidence") is gated, (name, row["decision"])
        assert bool((_array(out)[blob] == 1).all()) is gated and (_array(out)[blob] >= 1).all()
        assert ("low confidence" in stdout) is gated
    code, _, err = _run(capsys, "postprocess", "--ct", ct_file, "--labels", seg, "-o", tmp_path / "x.nii.gz", "--min-peak", "0.7")
    _assert_clean_error(code, err, "--min-peak", "--probabilities")
    for bad, words in (("1", "must be in [0, 1)"), ("abc", "not a number: abc")):
        with pytest.raises(SystemExit) as exit_info:
            _run(capsys, *common, "-o", tmp_path / "y.nii.gz", "--min-peak", bad)
        assert exit_info.value.code == 2 and f"--min-peak: {words}" in capsys.readouterr().err
    for flags in (["--min-peak", "0.7"], ["--cyst-threshold", "45"], ["--no-refine-outlines"]):  # a default is refused too
        code, _, err = _run(capsys, "segment", ct_file, "-o", tmp_path / "w.nii.gz", "--no-postprocess", *flags)
        _assert_clean_error(code, err, "--no-postprocess", "post-processing flags", flags[0])
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, liver=np.zeros((2, 3, 4), np.uint8), tumor=np.zeros((1, 1, 1), np.uint8), box=np.array([0, 0, 0, 1, 1, 1]))
    code, _, err = _run(capsys, *common[:-1], wrong, "-o", tmp_path / "z.nii.gz")
    _assert_clean_error(code, err, "--probabilities", "grid")
    nan = tmp_path / "nan.npz"  # float maps (NaN here) would be cast to zeros: every lesion silently dropped
    Probabilities(probabilities.liver, np.full(probabilities.tumor.shape, np.nan, np.float32), probabilities.box,
                  probabilities.tumor_threshold, probabilities.grid).save(nan)
    code, _, err = _run(capsys, *common[:-1], nan, "-o", tmp_path / "z.nii.gz")
    _assert_clean_error(code, err, "--probabilities", "not uint8")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    code, _, err = _run(capsys, *common[:-1], tmp_path / "junk.npz", "-o", tmp_path / "z.nii.gz")
    _assert_clean_error(code, err, "--probabilities", "not a probability file")
    assert not any((tmp_path / n).exists() for n in ("x.nii.gz", "y.nii.gz", "z.nii.gz", "w.nii.gz"))


def _write(tmp_path, name, arr, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(arr)
    if img.GetDimension() == 3:
        img.SetSpacing(spacing)
    path = tmp_path / name
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize("kind,words", [
    ("2d", ["2-d"]), ("4d", ["4-d"]), ("labelmap", ["label map"]), ("nan", ["nan"]), ("mr", ["hounsfield"]),
])
def test_bad_inputs_are_refused_clearly(kind, words, tmp_path, capsys):
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 300, (20, 40, 40)).astype(np.int16)
    arrays = {
        "2d": ct[0],
        "labelmap": (rng.random((20, 40, 40)) > 0.5).astype(np.uint8),
        "nan": np.where(rng.random((20, 40, 40)) > 0.999, np.nan, ct).astype(np.float32),
        "mr": rng.uniform(0, 1500, (20, 40, 40)).astype(np.float32),
    }
    if kind == "4d":
        img = sitk.JoinSeries([sitk.GetImageFromArray(ct.astype(np.float32))] * 3)
        path = tmp_path / "4d.nii.gz"
        sitk.WriteImage(img, str(path))
    else:
        ext = ".mha" if kind == "nan" else ".nii.gz"  # ITK's NIfTI I/O turns NaN into 0
        path = _write(tmp_path, f"{kind}{ext}", arrays[kind])
    code, _, err = _run(capsys, "segment", path, "-o", tmp_path / "o.nii.gz")
    _assert_clean_error(code, err, *words)
    assert not (tmp_path / "o.nii.gz").exists()


def test_corrupt_or_mismatched_model_folder(ct_file, tmp_path, capsys):
    liver, tumor = model_files("phantom-small")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "liver.ltsm").write_bytes(liver.read_bytes()[:20000])
    shutil.copy(tumor, folder / "tumor.ltsm")
    code, _, err = _run(capsys, "segment", ct_file, "-o", tmp_path / "o.nii.gz", "--model", folder)
    _assert_clean_error(code, err, "truncated or corrupt")
    shutil.copy(tumor, folder / "liver.ltsm")  # a tumor model where the liver model belongs
    code, _, err = _run(capsys, "segment", ct_file, "-o", tmp_path / "o.nii.gz", "--model", folder)
    _assert_clean_error(code, err, "'tumor' model")


def test_unknown_output_type_and_missing_input(ct_file, tmp_path, capsys):
    _assert_clean_error(*_run(capsys, "segment", ct_file, "-o", tmp_path / "o.png")[::2], "output type")
    _assert_clean_error(*_run(capsys, "segment", tmp_path / "nope.nii.gz", "-o", tmp_path / "o.nii.gz")[::2], "not found")


def test_folder_of_cases(ct_file, tmp_path, capsys):
    src = tmp_path / "cases"
    src.mkdir()
    shutil.copy(ct_file, src / "a.nii.gz")
    vol = read_volume(ct_file)
    write_volume(Volume(np.flip(vol.array, 0).copy(), vol.spacing, vol.origin, vol.direction), src / "b.nrrd")
    (src / "notes.nii.gz").write_bytes(b"not an image")  # one bad case must not stop the others
    code, _, err = _run(capsys, "segment", src, "-o", tmp_path / "out", "--fast", "--format", ".nii.gz")
    assert code == 2 and "notes.nii.gz" in err and "1 of 3 cases failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    code, _, err = _run(capsys, "segment", src, "-o", tmp_path / "two.seg.nrrd", "--fast")  # a file name for many cases
    assert code == 2 and "is a file name" in err and not (tmp_path / "two.seg.nrrd").exists()


def test_phantom_command_and_train_refusals(tmp_path, capsys):
    """Training itself is tested in test_training.py; here the phantom command and bad train input."""
    assert _run(capsys, "phantom", "-o", tmp_path / "ph", "--cases", "2", "--seed", "3100")[0] == 0
    assert len(list((tmp_path / "ph").glob("*_ct.nii.gz"))) == 2
    for extra, message in ((["--config", "nonsense"], "No training config 'nonsense'"),
                           (["--data", tmp_path / "missing"], "is not a folder"),
                           (["--resume"], "Nothing to resume")):
        args = ["train", "--stage", "tumor", "--data", tmp_path / "ph", "-o", tmp_path / "run", *extra]
        code, _, err = _run(capsys, *args)
        assert code == 2 and message in err and err.count("error:") == 1, err


def test_models_lists_bundled(capsys):
    code, out, _ = _run(capsys, "models")
    assert code == 0 and "phantom-small" in out
    assert "not available" not in out and "NOT FOR CLINICAL USE" in out and "Measured: 48 synthetic test phantoms" in out
    assert out.count("phantom-small/liver.ltsm") == out.count("phantom-small/tumor.ltsm") == 1
    assert "pyliverlesionseg" in out  # importable, imported or not


def test_demo_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = _run(capsys, "demo", "-o", out, "--fast")
    assert code == 0, err
    names = {"ct.nii.gz", "truth.nii.gz", "segmentation.seg.nrrd", "labels.nii.gz", "regions.csv", "report.json", "overlay.png"}
    assert names <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["dice_vs_phantom_truth"]["liver"] > 0.9 and "NOT FOR CLINICAL USE" in report["intended_use"]
    assert _geometry(out / "labels.nii.gz") == _geometry(out / "ct.nii.gz")
    code, _, err = _run(capsys, "demo", "-o", out, "--fast")  # a second run must not replace it silently
    _assert_clean_error(code, err, "--overwrite")
    own = tmp_path / "mine.nii.gz"
    shutil.copy(out / "ct.nii.gz", own)
    code, _, err = _run(capsys, "demo", "-o", out, "--fast", "--ct", own, "--overwrite")  # your CT after a phantom demo
    assert code == 0, err
    assert not (out / "truth.nii.gz").exists() and not (out / "ct.nii.gz").exists()  # the phantom's are gone
    assert "dice_vs_phantom_truth" not in json.loads((out / "report.json").read_text(encoding="utf-8")) and own.is_file()


def test_demo_refuses_a_file_as_its_folder_and_a_bad_model_before_writing(tmp_path, capsys):
    (tmp_path / "notes.csv").write_text("mine", encoding="utf-8")
    code, _, err = _run(capsys, "demo", "-o", tmp_path / "notes.csv", "--fast")
    _assert_clean_error(code, err, "must be a folder", "notes.csv")
    assert (tmp_path / "notes.csv").read_text(encoding="utf-8") == "mine"
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_files("phantom-small"):
        shutil.copy(f, broken / f.name)
    (broken / "liver.ltsm").write_bytes((broken / "liver.ltsm").read_bytes()[:5000])
    code, _, err = _run(capsys, "demo", "-o", tmp_path / "demo", "--fast", "--model", broken)
    _assert_clean_error(code, err, "liver.ltsm")
    assert not (tmp_path / "demo").exists() or not any((tmp_path / "demo").iterdir())  # a rerun needs no --overwrite


@pytest.mark.parametrize("flag,value,words", [("--table", "regions.txt", ["--table", ".csv"]),
                                              ("--probabilities", "p.cache", ["--probabilities", ".npz"]),
                                              ("--report", "r.txt", ["--report", ".json"])])
def test_side_output_names_checked_before_any_work(ct_file, tmp_path, capsys, flag, value, words):
    out = tmp_path / "l.nii.gz"
    code, _, err = _run(capsys, "segment", ct_file, "-o", out, flag, tmp_path / value)
    _assert_clean_error(code, err, *words)
    assert not out.exists()


def test_output_never_replaces_its_input(ct_file, tmp_path, capsys):
    src = tmp_path / "cases"
    src.mkdir()
    shutil.copy(ct_file, src / "a.nii.gz")
    before = (src / "a.nii.gz").read_bytes()
    code, _, err = _run(capsys, "segment", src, "-o", src, "--format", ".nii.gz", "--overwrite")
    _assert_clean_error(code, err, "replace its own input")
    assert (src / "a.nii.gz").read_bytes() == before


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "ct.nii.gz").write_bytes(b"not read: the outputs are checked first")
    code, _, err = _run(capsys, "segment", tmp_path / "ct.nii.gz", "-o", tmp_path / "a-file" / "out.nii.gz")
    _assert_clean_error(code, err, "cannot be written", "a-file")
    assert (tmp_path / "a-file").read_text() == "x"


@pytest.mark.parametrize("sig, code, words", [("SIGINT", 130, "cancelled by the user"), ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_interrupt_or_terminate_mid_run_leaves_no_output(tmp_path, sig, code, words):
    """Ctrl-C or a scheduler's SIGTERM during the network: one message, its exit code, no output and
    no temporary file left beside where it would have gone."""
    import signal
    import subprocess
    import sys

    ct, _ = generate_case(11, spacing=(1.5, 1.5, 3.0), matrix=240)
    write_volume(ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-m", "LiverTumorSegLib.cli", "segment", str(tmp_path / "ct.nii.gz"),
                              "-o", str(out / "seg.nii.gz"), "--progress-lines", "--device", "cpu"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in child.stdout:  # the network is running once progress is reported
        if line.startswith("PROGRESS "):
            break
    child.send_signal(getattr(signal, sig))
    _, err = child.communicate(timeout=120)
    assert child.returncode == code, err
    assert words in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_small_refusals_name_the_problem(tmp_path, capsys):
    """No case to make, a negative seed, a wheel that is not there: one error each, nothing written."""
    for argv, words in ((["phantom", "-o", tmp_path / "ph", "--cases", "0"], ("--cases", "above 0")),
                        (["phantom", "-o", tmp_path / "ph", "--seed", "-1"], ("--seed", "0 or more")),
                        (["models", "import", "pyliverlesionseg", "--wheel", tmp_path / "none.whl"], ("not a file",)),
                        (["models", "import", "pyliverlesionseg", "--wheel", tmp_path], ("not a file",))):
        try:
            code, _, err = _run(capsys, *argv)
        except SystemExit as exit_:  # argparse refuses the value itself
            code, err = exit_.code, capsys.readouterr().err
            assert code == 2 and all(w in err for w in words), err
            continue
        _assert_clean_error(code, err, *words)
    assert not (tmp_path / "ph").exists()


def test_out_of_memory_on_the_cpu_is_recognised_and_does_not_speak_of_a_gpu():
    """PyTorch's CPU allocator says "not enough memory": one clear error, not an unexpected failure."""
    import torch

    from LiverTumorSegLib.errors import LiverTumorSegError
    from LiverTumorSegLib.slidingwindow import sliding_window_probabilities

    class Hungry(torch.nn.Module):
        cfg = SMALL

        def forward(self, x):
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB")

    with pytest.raises(LiverTumorSegError) as err:
        sliding_window_probabilities(Hungry(), np.zeros((8, 32, 32), np.float32))
    assert "GPU" not in str(err.value) and "more memory" in str(err.value)
