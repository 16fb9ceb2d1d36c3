"""Reading, input checks and safe writing (synthetic images, plus the real CTs when present)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.errors import InputError, OutputError
from LiverTumorSegLib.imageio import (check_ct, ct_warnings, read_labels, read_volume, write_labels,
                                      write_seg_nrrd, write_volume)
from LiverTumorSegLib.terminology import SEGMENTS
from conftest import REAL_CTS
from LiverTumorSegLib.volume import Volume


def fake_ct(shape=(12, 20, 24), seed=0) -> np.ndarray:
    """Air around a noisy soft-tissue block with a little fat and bone."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(-1000, 20, shape)
    k, j, i = (slice(n // 5, n - n // 5) for n in shape)
    ct[k, j, i] = rng.normal(50, 30, ct[k, j, i].shape)
    ct[k, j, i.start:i.start + 2] = -100
    ct[k, j.start:j.start + 2, i] = 700
    return ct.astype(np.int16)


def ct_volume(array=None, spacing=(0.8, 0.8, 2.5), direction=np.eye(3)) -> Volume:
    return Volume(fake_ct() if array is None else array, spacing, (10.0, -20.0, 30.0), direction)


def save(array, path, spacing=(0.8, 0.8, 2.5)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def raises_input(word):
    return pytest.raises(InputError, match=f"(?i){word}")


# ---------------------------------------------------------------- reading


def test_read_keeps_values_and_geometry(tmp_path):
    ct = fake_ct()
    volume = read_volume(save(ct, tmp_path / "ct.mha", spacing=(0.5, 0.6, 2.0)))
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, ct)
    assert volume.spacing == (0.5, 0.6, 2.0)


def test_read_2d_image(tmp_path):
    with raises_input("2-D"):
        read_volume(save(fake_ct()[0], tmp_path / "slice.nrrd"))


def test_read_single_slice_volume(tmp_path):
    with raises_input("2-D"):
        read_volume(save(fake_ct()[:1], tmp_path / "slice.nii.gz"))


def test_read_4d_image(tmp_path):
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), str(tmp_path / "t.nii.gz"))
    with raises_input("4-D"):
        read_volume(tmp_path / "t.nii.gz")


def test_read_4d_image_with_one_time_point(tmp_path):
    image = sitk.Image([8, 9, 10, 1], sitk.sitkInt16)
    direction = np.eye(4)
    direction[:3, :3] = [[0, 0, 1], [1, 0, 0], [0, -1, 0]]
    image.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(image, str(tmp_path / "t1.nrrd"))
    volume = read_volume(tmp_path / "t1.nrrd")
    assert volume.array.shape == (10, 9, 8)
    np.testing.assert_array_equal(volume.direction, direction[:3, :3])


def test_read_rgb_image(tmp_path):
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    with raises_input("colour"):
        read_volume(tmp_path / "rgb.nrrd")


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_read_truncated_file(tmp_path, name, keep):
    """ITK zero-fills truncated NIfTI files without an error: we must not."""
    data = save(fake_ct(), tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: int(len(data) * keep)])
    with raises_input("could not be read"):
        read_volume(tmp_path / name)


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_read_refuses_non_finite_voxels_in_any_format(tmp_path, name, value, dtype):
    """ITK's NIfTI reader turns NaN and infinities into 0; the file must still be refused."""
    ct = fake_ct().astype(dtype)
    ct[3, 4, 5:8] = value
    with raises_input("NaN or infinite"):
        check_ct(read_volume(save(ct, tmp_path / name)))


@pytest.mark.parametrize("axis", [0, 2])
def test_read_refuses_a_zero_voxel_size_in_a_nifti_header(tmp_path, axis):
    """Without an sform, ITK reads a voxel size of 0 in the header as 1 mm: the volumes would be wrong."""
    path = save(fake_ct(), tmp_path / "ct.nii")
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[254:256], "little") == 1  # ITK writes an sform: the voxel size is ignored there
    data[252:256] = (1).to_bytes(2, "little") + (0).to_bytes(2, "little")  # qform only, as many converters write
    data[80 + 4 * axis:84 + 4 * axis] = np.float32(0).tobytes()
    path.write_bytes(bytes(data))
    with raises_input("voxel size of"):
        read_volume(path)


@pytest.mark.parametrize("qform_only", [False, True])
@pytest.mark.parametrize("axis", [0, 2])
def test_read_refuses_a_negative_voxel_size_in_a_nifti_header(tmp_path, axis, qform_only):
    """ITK reads a negative pixdim as a flip of that axis, even when a valid sform says otherwise;
    nibabel drops the sign. The orientation is ambiguous: refused, not guessed."""
    path = save(fake_ct(), tmp_path / "ct.nii")
    data = bytearray(path.read_bytes())
    if qform_only:
        data[252:256] = (1).to_bytes(2, "little") + (0).to_bytes(2, "little")
    size = np.frombuffer(bytes(data[80 + 4 * axis:84 + 4 * axis]), np.float32)[0]
    data[80 + 4 * axis:84 + 4 * axis] = np.float32(-size).tobytes()
    path.write_bytes(bytes(data))
    with raises_input("negative voxel size"):
        read_volume(path)


def _oblique_affine() -> np.ndarray:
    """A RAS affine: 0.8 x 0.9 x 2.5 mm voxels, rotated 20 degrees about two axes, somewhere in space."""
    a, b = np.radians(20), np.radians(-20)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rx @ ry @ np.diag([-0.8, 0.9, 2.5])
    affine[:3, 3] = [120.0, -40.0, 300.0]
    return affine


@pytest.mark.parametrize("qform, sform, problem", [
    (None, ("plain", 2, (1.0, 1.0, 1.0)), "differ from pixdim's"),  # ITK then takes neither form
    ("plain", ("plain", 1), None),
    ("plain", ("plain", 2), None),
    (None, ("plain", 2), None),  # sform alone (TotalSegmentator's example)
    ("plain", None, None),  # qform alone
    ("plain", ("shifted", 1), None),  # both readers take the sform
    ("plain", ("shifted", 2), "disagrees with its qform"),  # ITK takes the qform, nibabel the sform
    ("plain", ("rotated", 3), "disagrees with its qform"),
    ("plain", ("sheared", 1), "sheared"),
    (None, None, "no orientation"),
])
def test_a_nifti_whose_readers_disagree_on_its_orientation_is_refused(tmp_path, qform, sform, problem):
    """ITK and nibabel-style readers choose between a NIfTI's qform and sform by different rules: where
    they would place the image differently (or must invent an orientation), it is refused; else it is
    read as nibabel reads it."""
    nibabel = pytest.importorskip("nibabel")
    forms = {"plain": _oblique_affine()}
    forms["shifted"] = forms["plain"] + np.pad(np.array([[0, 0, 0, 40.0], [0, 0, 0, -25.0], [0, 0, 0, 60.0]]), ((0, 1), (0, 0)))
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(0.26), -np.sin(0.26)], [np.sin(0.26), np.cos(0.26)]]
    forms["rotated"] = turn @ forms["plain"]
    forms["sheared"] = forms["plain"].copy()
    forms["sheared"][0, 1] += 0.3
    image = nibabel.Nifti1Image(fake_ct((10, 12, 14)).transpose(2, 1, 0).astype(np.int16), None)
    image.set_qform(forms[qform] if qform else None, code=1 if qform else 0)
    image.set_sform(forms[sform[0]] if sform else None, code=sform[1] if sform else 0)
    image.header.set_zooms(sform[2] if sform and len(sform) > 2 else (0.8, 0.9, 2.5))
    path = tmp_path / "ct.nii"
    nibabel.save(image, str(path))
    if qform is None and sform is None:  # nibabel would write its default affine as an sform
        path.write_bytes(path.read_bytes()[:252] + bytes(4) + path.read_bytes()[256:])
    if problem is not None:
        with raises_input(problem):
            read_volume(path)
        return
    volume = read_volume(path)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.ijk_to_lps()
    assert np.allclose(ras, nibabel.load(str(path)).affine, atol=1e-3)


@pytest.mark.parametrize("spacing", [b"0.7 -0.7 5", b"0.7 0 5", b"nan 0.7 5"])
def test_a_metaimage_with_a_voxel_size_of_zero_or_below_is_refused(tmp_path, spacing):
    """ITK reads a negative MetaImage spacing as positive (the axis not flipped) and fails on zero."""
    path = tmp_path / "ct.mha"
    image = sitk.GetImageFromArray(fake_ct((8, 16, 16)))
    image.SetSpacing((0.5, 0.5, 5.0))
    sitk.WriteImage(image, str(path))
    text = path.read_bytes()
    assert b"ElementSpacing = 0.5 0.5 5" in text
    path.write_bytes(text.replace(b"ElementSpacing = 0.5 0.5 5", b"ElementSpacing = " + spacing))
    with raises_input("ElementSpacing"):
        read_volume(path)


def test_a_nifti_with_a_singular_sform_says_so(tmp_path):
    import struct

    path = save(fake_ct((8, 16, 16)), tmp_path / "ct.nii")
    data = bytearray(path.read_bytes())
    assert struct.unpack("<h", bytes(data[254:256]))[0] > 0  # ITK writes an sform
    data[312:328] = struct.pack("<4f", 0, 0, 0, 0)  # its third row: every voxel in one plane
    path.write_bytes(bytes(data))
    with raises_input("singular sform"):
        read_volume(path)


def test_read_garbage_file(tmp_path):
    (tmp_path / "bad.nrrd").write_bytes(gzip.compress(b"not an image"))
    with raises_input("could not be read"):
        read_volume(tmp_path / "bad.nrrd")


def test_read_missing_path(tmp_path):
    with raises_input("does not exist"):
        read_volume(tmp_path / "nothing.nii.gz")


def test_read_unsupported_suffix(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with raises_input("not a supported"):
        read_volume(tmp_path / "image.png")


def test_read_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with raises_input("No DICOM"):
        read_volume(tmp_path)


def test_read_dicom_folder_with_one_slice(tmp_path):
    (tmp_path / "dicom").mkdir()
    save(fake_ct()[0], tmp_path / "dicom" / "slice.dcm")
    with raises_input("2-D"):
        read_volume(tmp_path / "dicom")


def test_read_labels(tmp_path):
    reference = ct_volume()
    labels = np.zeros(reference.array.shape, np.float32)
    labels[2:5, 3:9, 4:10] = 2
    write = write_labels(labels.astype(np.uint8), reference, tmp_path / "labels.nii.gz")
    read = read_labels(write, reference)
    assert read.array.dtype == np.uint8
    np.testing.assert_array_equal(read.array, labels)
    with raises_input("voxel grid"):
        read_labels(write, ct_volume(spacing=(1.0, 0.8, 2.5)))


def test_read_labels_rejects_fractions(tmp_path):
    with raises_input("non-integer"):
        read_labels(save(np.full((8, 8, 8), 0.5, np.float32), tmp_path / "soft.nii.gz"))


# ---------------------------------------------------------------- CT checks


def test_fake_ct_passes():
    assert check_ct(ct_volume()) is None
    assert ct_warnings(ct_volume()) == []


def test_cropped_ct_without_air_passes():
    """A crop inside the body (no air), like lits-117-128cube: fat below -50 HU is enough."""
    rng = np.random.default_rng(0)
    array = rng.normal(60, 25, (16, 32, 32))
    array[:, :, :4] = rng.normal(-100, 15, (16, 32, 4))
    check_ct(ct_volume(array.astype(np.float32)))


def test_nan_voxel():
    array = fake_ct().astype(np.float32)
    array[3, 4, 5] = np.nan
    with raises_input("NaN"):
        check_ct(ct_volume(array))


def test_constant_image():
    with raises_input("same value"):
        check_ct(ct_volume(np.full((12, 20, 24), -1000, np.int16)))


@pytest.mark.parametrize("values", [(0, 1, 2), (0, 255), (0, 5, 117)])
def test_labelmap(values):
    array = np.resize(np.array(values, np.uint8), (12, 20, 24))
    with raises_input("label map"):
        check_ct(ct_volume(array))


def test_mr_like():
    array = np.random.default_rng(0).uniform(0, 1500, (12, 20, 24)).astype(np.float32)
    with raises_input("not look like a CT"):
        check_ct(ct_volume(array))


def test_normalised_ct():
    array = fake_ct().astype(np.float32)
    with raises_input("not look like a CT"):
        check_ct(ct_volume((array - array.mean()) / array.std()))


def test_ct_without_rescale_intercept():
    with raises_input("rescale"):
        check_ct(ct_volume(fake_ct() + 1024))


def test_mostly_outside_ct_range():
    array = fake_ct().astype(np.float32) * 10
    with raises_input("not look like a CT"):
        check_ct(ct_volume(array))


@pytest.mark.parametrize("spacing", [(0.0, 0.8, 2.5), (0.8, -0.8, 2.5), (0.8, 0.8, 25.0), (0.8, np.nan, 2.5),
                                     (0.0008, 0.0008, 0.0025)])  # the last: a header in metres
def test_implausible_spacing(spacing):
    with raises_input("spacing"):
        check_ct(ct_volume(spacing=spacing))


@pytest.mark.parametrize("direction", [[[1, 0.364, 0], [0, 0.931, 0], [0, 0, 1]],  # sheared: axes not perpendicular
                                       np.eye(3) * 2,  # scaled: a MetaImage TransformMatrix 2 0 0 ...
                                       [[1, 0, 0], [0, 1, 0], [0, 0, np.nan]]])
def test_a_direction_that_is_not_a_rotation_is_refused(direction):
    """ITK keeps such a matrix, but writers coerce it: the labels would land on other points."""
    with raises_input("not a rotation"):
        check_ct(ct_volume(direction=direction))
    check_ct(ct_volume(direction=np.diag([1.0, -1.0, -1.0]) @ [[0, 1, 0], [1, 0, 0], [0, 0, 1]]))  # flips, permutations: fine


def test_two_slices_are_2d():
    with raises_input("2-D"):
        check_ct(ct_volume(fake_ct()[:2]))


def test_thin_in_two_axes():
    with raises_input("voxels across"):
        check_ct(ct_volume(fake_ct((5, 6, 40))))


def test_three_slices_pass_with_a_warning():
    volume = ct_volume(fake_ct((3, 40, 40)))
    check_ct(volume)
    assert any("only 3 slices" in w for w in ct_warnings(volume))


def test_warnings():
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    oblique = ct_volume(direction=[[c, -s, 0], [s, c, 0], [0, 0, 1]])
    assert any("oblique" in w for w in ct_warnings(oblique))
    assert any("anisotropic" in w for w in ct_warnings(ct_volume(spacing=(0.5, 0.5, 5.0))))
    huge = Volume(fake_ct((1501, 8, 8)), (1.0, 1.0, 0.5))
    assert any("very large" in w for w in ct_warnings(huge))
    # an image check_ct refuses gets its one error, not warnings before it (50 mm slices: anisotropic too)
    assert ct_warnings(ct_volume(spacing=(0.5, 0.5, 50.0))) == []


# ---------------------------------------------------------------- writing


@pytest.mark.parametrize("name", ["out.nii", "out.nii.gz", "out.nrrd", "out.mha"])
def test_write_labels_formats(tmp_path, name):
    reference = ct_volume()
    labels = (reference.array > 0).astype(np.uint8)
    path = write_labels(labels, reference, tmp_path / "a" / "b" / name)
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(image.GetOrigin(), reference.origin)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    assert [p.name for p in path.parent.iterdir()] == [name], "no temporary file may be left"


def test_write_volume_round_trip(tmp_path):
    volume = ct_volume(direction=np.diag([1.0, -1.0, -1.0]))
    back = read_volume(write_volume(volume, tmp_path / "ct.nrrd"))
    assert back.array.dtype == np.int16 and back.origin == volume.origin
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_array_equal(back.direction, volume.direction)


def test_write_refuses_overwrite(tmp_path):
    reference = ct_volume()
    labels = np.zeros(reference.array.shape, np.uint8)
    for writer, name in [(write_labels, "out.nrrd"), (write_seg_nrrd, "out.seg.nrrd")]:
        path = writer(labels, reference, tmp_path / name)
        before = path.read_bytes()
        with pytest.raises(OutputError, match="already exists"):
            writer(labels + 1, reference, path)
        assert path.read_bytes() == before
        writer(labels + 1, reference, path, overwrite=True)
        assert path.read_bytes() != before


def test_write_bad_name_or_place(tmp_path):
    reference = ct_volume()
    labels = np.zeros(reference.array.shape, np.uint8)
    with pytest.raises(OutputError, match="must end with"):
        write_labels(labels, reference, tmp_path / "out.png")
    with pytest.raises(OutputError, match="must end with"):
        write_seg_nrrd(labels, reference, tmp_path / "out.nrrd")
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="could not be written"):
        write_labels(labels, reference, tmp_path / "file" / "out.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_seg_nrrd_keeps_empty_segments(tmp_path):
    import slicerio

    reference = ct_volume()
    labels = np.zeros(reference.array.shape, np.uint8)
    labels[2:4, 2:4, 2:4] = 1
    seg = slicerio.read_segmentation(str(write_seg_nrrd(labels, reference, tmp_path / "s.seg.nrrd")))
    assert [s["name"] for s in seg["segments"]] == ["Liver", "Liver tumor", "Liver cyst"]
    liver, tumor, _ = seg["segments"]
    assert liver["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert liver["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert tumor["terminology"]["type"] == ["SCT", "108369006", "Neoplasm"]
    assert tumor["terminology"]["anatomicRegion"] == ["SCT", "10200004", "Liver"]
    assert tumor["terminology"]["contextName"] == "Segmentation category and type - DICOM master list"
    assert tumor["extent"] == [0, -1, 0, -1, 0, -1]
    assert [s["terminology"] for s in SEGMENTS][2].split("~")[2] == "SCT^367643001^Cyst"


# ---------------------------------------------------------------- real data

REAL_LABELS = [
    "ircad-1.1/masks/liver.nii.gz",
    "ircad-1.1/masks/livertumor01.nii.gz",
    "lits-117-128cube/label.nii.gz",
    "totalseg-example/example_seg.nii.gz",
    "dcmqi-ct3slice-liver/liver_seg.nrrd",
]


@pytest.mark.parametrize("relpath", REAL_CTS)
def test_real_ct_passes(shared_data, relpath):
    volume = read_volume(shared_data(relpath))
    assert check_ct(volume) is None
    few_slices = any("slices" in w for w in ct_warnings(volume))
    assert few_slices == (relpath == "dcmqi-ct3slice-liver/ct-3slice")


@pytest.mark.parametrize("relpath", REAL_LABELS)
def test_real_labels_are_not_ct(shared_data, relpath):
    with raises_input("label map"):
        check_ct(read_volume(shared_data(relpath)))


def test_real_dicom_folder_picks_the_ct_series(shared_data):
    """The dcmqi folder holds a 3-slice CT series (in a subfolder) and a one-file DICOM SEG."""
    volume = read_volume(shared_data("dcmqi-ct3slice-liver"))
    assert volume.array.shape == (3, 512, 512)
    check_ct(volume)


def test_a_folder_of_several_series_says_which_it_reads(tmp_path, caplog):
    """The largest series is read, with a warning; two of one size (two phases?) are named as such."""
    from test_datasets import write_dicom_series

    arterial, portal = fake_ct((8, 16, 16)), fake_ct((8, 16, 16)) + 30
    write_dicom_series(arterial, tmp_path / "study" / "a", 1)
    write_dicom_series(portal[:5], tmp_path / "study" / "b", 2)
    volume = read_volume(tmp_path / "study")
    assert volume.array.shape == (8, 16, 16) and "holds 2 DICOM series; reading the largest" in caplog.text
    assert "two phases" not in caplog.text
    assert volume.source == {"dicom_series_uid": "1.2.826.0.1.3680043.2.1125.1", "dicom_folder": str(tmp_path / "study" / "a"),
                             "dicom_files": 8, "dicom_series_in_folder": 2}
    write_dicom_series(portal, tmp_path / "study" / "c", 3)
    caplog.clear()
    read_volume(tmp_path / "study")
    assert "holds 3 DICOM series" in caplog.text and "two phases?" in caplog.text
