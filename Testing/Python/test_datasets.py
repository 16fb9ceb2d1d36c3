"""Data set readers (LiTS, MSD, 3D-IRCADb, pairs), label merging and fixed splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.datasets import (LITS_PAPER_SPLIT, LITS_PAPER_TEST, Case, find_cases, find_ircad,
                                       find_lits, find_msd, find_pairs, load_case, make_split, natural_key,
                                       read_split, write_split)
from LiverTumorSegLib.errors import InputError, OutputError
from LiverTumorSegLib.phantom import generate_case, write_cases

SHAPE = (8, 16, 16)  # (z, y, x)
SPACING = (0.8, 0.8, 2.0)


def ct_array(seed=0) -> np.ndarray:
    """Air around a soft-tissue block, int16 HU."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(-1000, 20, SHAPE)
    ct[1:7, 3:13, 3:13] = rng.normal(60, 20, (6, 10, 10))
    return ct.astype(np.int16)


def label_array(tumour=True) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:6, 4:12, 4:12] = 1
    if tumour:
        lab[3:5, 6:9, 6:9] = 2
    return lab


def write(array, path, spacing=SPACING):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def write_pair(image_path, label_path, seed=0):
    write(ct_array(seed), image_path)
    write(label_array(), label_path)


# ---------------------------------------------------------------- LiTS


def test_lits_sorted_numerically_in_subfolders(tmp_path):
    for n, batch in ((10, "batch2"), (2, "batch1"), (1, "batch1")):
        write_pair(tmp_path / batch / f"volume-{n}.nii", tmp_path / batch / f"segmentation-{n}.nii")
    write(ct_array(), tmp_path / "test" / "volume-3.nii.gz")  # no labels
    cases = find_lits(tmp_path)
    assert [c.name for c in cases] == ["lits-1", "lits-2", "lits-3", "lits-10"]
    assert cases[2].label is None and cases[3].label.name == "segmentation-10.nii"
    ct, labels = load_case(cases[1])
    assert labels.array.dtype == np.uint8 and np.array_equal(labels.array, label_array())
    assert ct.array.dtype == np.int16 and load_case(cases[2])[1] is None


def test_lits_duplicate_number_and_bad_values_refused(tmp_path):
    write_pair(tmp_path / "a" / "volume-1.nii.gz", tmp_path / "a" / "segmentation-1.nii.gz")
    write(label_array() * 2, tmp_path / "a" / "segmentation-1.nii.gz")  # values 0, 2, 4
    with pytest.raises(InputError, match="outside 0..2"):
        load_case(find_lits(tmp_path)[0])
    write(ct_array(), tmp_path / "b" / "volume-1.nii.gz")
    with pytest.raises(InputError, match="twice"):
        find_lits(tmp_path)


def test_labels_must_be_on_the_image_grid(tmp_path):
    write(ct_array(), tmp_path / "volume-0.nii.gz")
    write(label_array(), tmp_path / "segmentation-0.nii.gz", spacing=(1.0, 1.0, 2.0))
    with pytest.raises(InputError, match="voxel grid"):
        load_case(find_lits(tmp_path)[0])


# ---------------------------------------------------------------- MSD


def msd_folder(root, with_json: bool):
    for n in (10, 2, 0):
        write_pair(root / "imagesTr" / f"liver_{n}.nii.gz", root / "labelsTr" / f"liver_{n}.nii.gz", seed=n)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder / "._liver_0.nii.gz").write_bytes(b"\0junk")  # macOS resource fork
    write(ct_array(), root / "imagesTs" / "liver_99.nii.gz")
    if with_json:
        training = [{"image": f"./imagesTr/liver_{n}.nii.gz", "label": f"./labelsTr/liver_{n}.nii.gz"}
                    for n in (10, 0)]  # liver_2 left out on purpose
        (root / "dataset.json").write_text(json.dumps({"name": "Liver", "training": training}))
    return root


@pytest.mark.parametrize("with_json, names", [(False, ["liver_0", "liver_2", "liver_10"]),
                                              (True, ["liver_0", "liver_10"])])
def test_msd(tmp_path, with_json, names):
    cases = find_msd(msd_folder(tmp_path / "Task03_Liver", with_json))
    assert [c.name for c in cases] == names and {c.kind for c in cases} == {"msd"}
    ct, labels = load_case(cases[-1])
    assert np.array_equal(ct.array, ct_array(10)) and np.array_equal(labels.array, label_array())


def test_msd_json_naming_other_image_formats(tmp_path):
    """dataset.json may list MetaImage or NRRD files: the case name drops their extension too."""
    root = tmp_path / "Task"
    write(ct_array(1), root / "imagesTr" / "liver_1.mha")
    write(label_array(), root / "labelsTr" / "liver_1.nrrd")
    (root / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/liver_1.mha",
                                                                 "label": "./labelsTr/liver_1.nrrd"}]}))
    (case,) = find_msd(root)
    assert case.name == "liver_1" and np.array_equal(load_case(case)[1].array, label_array())


def test_msd_json_with_missing_file(tmp_path):
    root = msd_folder(tmp_path, with_json=True)
    (root / "labelsTr" / "liver_10.nii.gz").unlink()
    with pytest.raises(InputError, match="missing"):
        find_msd(root)


# ---------------------------------------------------------------- pairs


def test_pairs_both_layouts(tmp_path):
    write_pair(tmp_path / "p" / "b_ct.nii.gz", tmp_path / "p" / "b_label.nii.gz")
    write_pair(tmp_path / "p" / "a_ct.nii.gz", tmp_path / "p" / "a_label.nii.gz")
    write(ct_array(), tmp_path / "p" / "lonely_ct.nii.gz")
    write_pair(tmp_path / "q" / "images" / "x.nii.gz", tmp_path / "q" / "labels" / "x.nii.gz")
    assert [c.name for c in find_pairs(tmp_path / "p")] == ["a", "b"]
    assert [c.name for c in find_cases(tmp_path / "p", "phantom")] == ["a", "b"]
    (case,) = find_pairs(tmp_path / "q")
    assert case.name == "x" and case.label == tmp_path / "q" / "labels" / "x.nii.gz"
    assert np.array_equal(load_case(case)[1].array, label_array())


def test_pairs_match_by_name_whatever_the_extension(tmp_path):
    """An image saved as .nii.gz and its label as .nii (or the other way) are still one case."""
    write_pair(tmp_path / "p" / "a_ct.nii.gz", tmp_path / "p" / "a_label.nii")
    write_pair(tmp_path / "p" / "b_ct.nii", tmp_path / "p" / "b_label.nii.gz")
    write_pair(tmp_path / "q" / "images" / "x.nii.gz", tmp_path / "q" / "labels" / "x.nii")
    assert [(c.name, c.label.name) for c in find_pairs(tmp_path / "p")] == [("a", "a_label.nii"), ("b", "b_label.nii.gz")]
    assert [(c.name, c.label.name) for c in find_pairs(tmp_path / "q")] == [("x", "x.nii")]


def test_names_natural_order_ties_broken_by_the_name():
    """x-1, X-1 and x-01 are equal to the natural order: the name itself decides, so a listing (and
    a split) never depends on the order files came from the disk or a set."""
    names = ["x-01", "X-1", "x-1", "x-10", "x-2"]
    assert sorted(names, key=natural_key) == ["X-1", "x-01", "x-1", "x-2", "x-10"]
    assert sorted(reversed(names), key=natural_key) == sorted(names, key=natural_key)
    assert make_split(names, (3, 1, 1)) == make_split(list(reversed(names)), (3, 1, 1))


def test_a_ct_that_segment_would_refuse_is_not_learnt_from(tmp_path):
    write(np.zeros(SHAPE, np.int16), tmp_path / "p" / "flat_ct.nii.gz")
    write(label_array(), tmp_path / "p" / "flat_label.nii.gz")
    (case,) = find_pairs(tmp_path / "p")
    with pytest.raises(InputError, match="Case 'flat'.*same value"):
        load_case(case)


def test_pairs_one_case_per_folder(tmp_path):
    """``image.nii.gz`` + ``label.nii.gz`` in a folder is one case named after the folder (the layout
    of shared/data's lits-117-128cube); each such folder is its own ``--data``."""
    write_pair(tmp_path / "patient-7" / "image.nii.gz", tmp_path / "patient-7" / "label.nii.gz")
    (case,) = find_cases(tmp_path / "patient-7")
    assert (case.name, case.kind, case.image.name) == ("patient-7", "pairs", "image.nii.gz")
    assert np.array_equal(load_case(case)[1].array, label_array())
    (tmp_path / "patient-7" / "label.nii.gz").unlink()
    with pytest.raises(InputError, match="No known data set layout"):
        find_cases(tmp_path / "patient-7")


def test_phantom_format_reads_what_the_generator_writes(tmp_path):
    (ct_file, label_file), = write_cases(tmp_path, 1, 4100)
    (case,) = find_cases(tmp_path, "phantom")
    assert (case.name, case.image, case.label) == ("case_4100", ct_file, label_file)
    ct, labels = load_case(case)
    truth_ct, truth = generate_case(4100)
    assert np.array_equal(labels.array, truth.array) and np.allclose(ct.array, truth_ct.array, atol=0.5)
    assert np.allclose(ct.direction, truth_ct.direction) and np.allclose(ct.spacing, truth_ct.spacing)


# ---------------------------------------------------------------- 3D-IRCADb


def fake_ircad_masks() -> dict[str, np.ndarray]:
    """0/255 masks: a liver, two overlapping tumours, a cyst touching one of them, another organ."""
    masks = {name: np.zeros(SHAPE, np.uint8) for name in
             ("liver", "livertumor01", "livertumor02", "liverkyst", "spleen")}
    masks["liver"][1:7, 3:13, 3:13] = 255
    masks["livertumor01"][2:4, 4:7, 4:7] = 255
    masks["livertumor02"][3:6, 6:11, 6:11] = 255
    masks["liverkyst"][5:6, 10:12, 10:12] = 255
    masks["spleen"][1:7, 13:15, 0:3] = 255
    return masks


def expected_ircad_labels(masks) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[masks["liver"] > 0] = 1
    lab[masks["liverkyst"] > 0] = 3
    lab[(masks["livertumor01"] > 0) | (masks["livertumor02"] > 0)] = 2  # a tumour wins over a cyst
    return lab


def test_ircad_nifti_patient_and_folder_of_patients(tmp_path):
    masks = fake_ircad_masks()
    for patient in ("3Dircadb1.10", "3Dircadb1.2"):
        write(ct_array(), tmp_path / patient / "ct.nii.gz")
        for name, mask in masks.items():
            write(mask, tmp_path / patient / "masks" / f"{name}.nii.gz")
    assert [c.name for c in find_ircad(tmp_path)] == ["3Dircadb1.2", "3Dircadb1.10"]
    (case,) = find_ircad(tmp_path / "3Dircadb1.2")
    ct, labels = load_case(case)
    assert labels.array.dtype == np.uint8
    assert np.array_equal(labels.array, expected_ircad_labels(masks))
    assert set(np.unique(labels.array)) == {0, 1, 2, 3}


def write_dicom_series(array, folder, number, spacing=SPACING):
    """A DICOM series of axial slices (one file per slice) with consistent geometry tags."""
    folder.mkdir(parents=True)
    series = f"1.2.826.0.1.3680043.2.1125.{number}"
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.KeepOriginalImageUIDOn()
    for k, plane in enumerate(array):
        image = sitk.GetImageFromArray(plane)
        image.SetSpacing(spacing[:2])
        for tag, value in (("0020|000e", series), ("0020|0013", str(k + 1)), ("0008|0060", "CT"),
                           ("0020|0032", f"0\\0\\{k * spacing[2]}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0018|0050", str(spacing[2])), ("0008|0018", f"{series}.{k + 1}")):
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"image_{k}"))
        writer.Execute(image)


def test_ircad_original_dicom_layout(tmp_path):
    masks = fake_ircad_masks()
    write_dicom_series(ct_array(), tmp_path / "PATIENT_DICOM", 1)
    for number, name in enumerate(("liver", "livertumor01", "livertumor02", "liverkyst"), 2):
        write_dicom_series(masks[name], tmp_path / "MASKS_DICOM" / name, number)
    (case,) = find_cases(tmp_path)
    assert case.kind == "ircad" and case.label == tmp_path / "MASKS_DICOM"
    ct, labels = load_case(case)
    assert np.array_equal(ct.array, ct_array())
    assert np.array_equal(labels.array, expected_ircad_labels(masks))


@pytest.mark.parametrize("where", [".", "3Dircadb1.1"])
def test_ircad_still_zipped_says_to_unzip(tmp_path, where):
    """3D-IRCADb ships each patient's series as PATIENT_DICOM.zip + MASKS_DICOM.zip."""
    import zipfile

    patient = tmp_path / where
    patient.mkdir(exist_ok=True)
    for name in ("PATIENT_DICOM.zip", "MASKS_DICOM.zip"):
        zipfile.ZipFile(patient / name, "w").close()
    for fmt in ("auto", "ircad"):
        with pytest.raises(InputError, match="unzip PATIENT_DICOM.zip and MASKS_DICOM.zip"):
            find_cases(tmp_path, fmt)


def test_ircad_without_liver_mask(tmp_path):
    write(ct_array(), tmp_path / "ct.nii.gz")
    write(fake_ircad_masks()["spleen"], tmp_path / "masks" / "spleen.nii.gz")
    with pytest.raises(InputError, match="no 'liver' mask"):
        load_case(find_ircad(tmp_path)[0])


def test_real_ircad_patient(shared_data):
    root = shared_data("ircad-1.1")
    (case,) = find_cases(root)
    assert case.kind == "ircad" and case.name == "ircad-1.1"
    ct, labels = load_case(case)

    def mask(name):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(root / "masks" / f"{name}.nii.gz"))) > 0

    lesions = [mask(f"livertumor{n:02d}") for n in range(1, 8)]
    tumours = np.logical_or.reduce(lesions)  # the sum of the lesion masks minus their overlaps
    assert set(np.unique(labels.array)) == {0, 1, 2, 3}
    assert np.count_nonzero(labels.array == 2) == np.count_nonzero(tumours)
    assert np.count_nonzero(tumours) == sum(map(np.count_nonzero, lesions)) == 214268  # disjoint here
    assert np.count_nonzero(labels.array == 3) == np.count_nonzero(mask("liverkyst"))
    assert np.count_nonzero(labels.array > 0) == np.count_nonzero(mask("liver") | tumours)


# ---------------------------------------------------------------- detection


def test_auto_detection(tmp_path):
    write_pair(tmp_path / "lits" / "volume-0.nii.gz", tmp_path / "lits" / "segmentation-0.nii.gz")
    write_pair(tmp_path / "pairs" / "c_ct.nii.gz", tmp_path / "pairs" / "c_label.nii.gz")
    msd_folder(tmp_path / "msd", with_json=False)
    write(ct_array(), tmp_path / "ircad" / "ct.nii.gz")
    (tmp_path / "ircad" / "masks").mkdir()
    kinds = {name: {c.kind for c in find_cases(tmp_path / name)} for name in ("lits", "pairs", "msd", "ircad")}
    assert kinds == {"lits": {"lits"}, "pairs": {"pairs"}, "msd": {"msd"}, "ircad": {"ircad"}}


def test_missing_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(InputError, match="No known data set layout"):
        find_cases(tmp_path)
    for fmt in ("lits", "msd", "ircad", "pairs"):
        with pytest.raises(InputError):
            find_cases(tmp_path, fmt)
    with pytest.raises(InputError, match="Unknown"):
        find_cases(tmp_path, "kits")
    with pytest.raises(InputError, match="not a folder"):
        find_cases(tmp_path / "absent")


# ---------------------------------------------------------------- splits


NAMES = [f"case-{n}" for n in range(40)]


def test_split_deterministic_disjoint_covering():
    split = make_split(NAMES, (0.6, 0.2, 0.2), seed=3)
    assert split == make_split(list(reversed(NAMES)), (0.6, 0.2, 0.2), seed=3)
    assert split != make_split(NAMES, (0.6, 0.2, 0.2), seed=4)
    assert [len(split[s]) for s in ("train", "val", "test")] == [24, 8, 8]
    together = split["train"] + split["val"] + split["test"]
    assert sorted(together) == sorted(NAMES) and len(set(together)) == len(NAMES)
    cases = [Case(n, None, None, "pairs") for n in NAMES]
    assert make_split(cases, (30, 5, 5))["val"] == make_split(NAMES, (30, 5, 5))["val"]


def test_split_is_stable_across_runs_and_platforms():
    # default_rng(0).permutation(10) = [4 6 2 7 3 5 9 0 8 1] (PCG64, platform independent)
    split = make_split([f"c{n}" for n in range(10)], (6, 2, 2), seed=0)
    assert split == {"train": ["c0", "c1", "c3", "c5", "c8", "c9"],
                     "val": ["c4", "c6"], "test": ["c2", "c7"]}


def test_split_bad_arguments():
    with pytest.raises(ValueError):
        make_split(NAMES, (30, 5, 4))
    with pytest.raises(ValueError):
        make_split(NAMES, (0.5, 0.2, 0.2))
    with pytest.raises(ValueError):
        make_split(NAMES + ["case-0"])


def test_lits_paper_split():
    test = LITS_PAPER_SPLIT["test"]
    assert test == [f"lits-{n}" for n in (3, 5, 15, 18, 28, 33, 37, 42, 47, 54, 62, 70, 73, 80, 90, 100,
                                          105, 110, 121, 127)]
    assert len(LITS_PAPER_TEST) == 20
    together = LITS_PAPER_SPLIT["train"] + LITS_PAPER_SPLIT["val"] + test
    assert sorted(together) == sorted(f"lits-{n}" for n in range(131))
    assert [len(LITS_PAPER_SPLIT[s]) for s in ("train", "val", "test")] == [91, 20, 20]


def test_split_json_round_trip(tmp_path):
    split = make_split(NAMES, seed=1)
    path = write_split(split, tmp_path / "split.json")
    assert read_split(path) == split
    with pytest.raises(OutputError):
        write_split(split, path)
    write_split(LITS_PAPER_SPLIT, path, overwrite=True)
    assert read_split(path) == LITS_PAPER_SPLIT
    path.write_text(json.dumps({"train": ["a"], "val": ["a"], "test": []}))
    with pytest.raises(InputError, match="more than one"):
        read_split(path)
