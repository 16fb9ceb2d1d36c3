"""Tests of the synthetic CT phantoms (small, coarse grids to stay fast)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from LiverTumorSegLib import phantom
from LiverTumorSegLib.errors import OutputError
from LiverTumorSegLib.phantom import LABEL_CYST, LABEL_LIVER, LABEL_TUMOR, generate_case, write_cases

SMALL = {"matrix": 128, "spacing": (2.5, 2.5, 5.0)}
SEEDS = range(12)


@functools.lru_cache(maxsize=None)
def small_case(seed: int, orientation: bool = True):
    return generate_case(seed, orientation=orientation, **SMALL)


def lps_centroid(volume, mask: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask)[:, ::-1].astype(float)
    m = volume.ijk_to_lps()
    return (ijk @ m[:3, :3].T + m[:3, 3]).mean(0)


def test_deterministic_per_seed():
    ct1, lab1 = generate_case(5, **SMALL)
    ct2, lab2 = generate_case(5, **SMALL)
    assert np.array_equal(ct1.array, ct2.array) and np.array_equal(lab1.array, lab2.array)
    assert ct1.origin == ct2.origin and ct1.spacing == ct2.spacing
    assert np.array_equal(ct1.direction, ct2.direction)


def test_different_seeds_differ():
    (ct0, lab0), (ct1, lab1) = small_case(0), small_case(1)
    assert ct0.array.shape != ct1.array.shape or not np.array_equal(ct0.array, ct1.array)
    assert lab0.array.shape != lab1.array.shape or not np.array_equal(lab0.array, lab1.array)
    assert ct0.origin != ct1.origin


@pytest.mark.parametrize("seed", SEEDS)
def test_types_labels_and_shared_geometry(seed):
    ct, lab = small_case(seed)
    assert ct.array.dtype == np.int16 and lab.array.dtype == np.uint8
    assert ct.array.shape == lab.array.shape and ct.array.shape[1:] == (128, 128)
    assert set(np.unique(lab.array)) <= {0, LABEL_LIVER, LABEL_TUMOR, LABEL_CYST}
    assert (lab.array == LABEL_LIVER).sum() > 1000
    assert ct.spacing == lab.spacing == (2.5, 2.5, 5.0)
    assert ct.origin == lab.origin
    assert np.array_equal(ct.direction, lab.direction)
    assert np.allclose(ct.direction.T @ ct.direction, np.eye(3))
    assert ct.array.min() >= -1024 and (ct.array < -900).mean() > 0.2  # air around the body


def test_hu_of_liver_tumours_and_cysts():
    tumour_cases = cyst_cases = negatives = 0
    for seed in SEEDS:
        ct, lab = small_case(seed)
        hu, labels = ct.array.astype(float), lab.array
        assert 85 <= hu[labels == LABEL_LIVER].mean() <= 125
        tumour, cyst = labels == LABEL_TUMOR, labels == LABEL_CYST
        negatives += not tumour.any()
        if tumour.sum() >= 50:
            tumour_cases += 1
            assert 60 <= hu[tumour].mean() <= 120
        if cyst.sum() >= 50:
            cyst_cases += 1
            assert 0 <= hu[cyst].mean() <= 60
    assert tumour_cases >= 3 and cyst_cases >= 3 and negatives >= 2


def test_lesions_lie_inside_the_liver():
    components = 0
    for seed in SEEDS:
        ct, lab = small_case(seed)
        labels = lab.array
        body = np.stack([ndimage.binary_fill_holes(s) for s in ct.array > -400])
        lesions = (labels == LABEL_TUMOR) | (labels == LABEL_CYST)
        assert np.all(body[lesions])
        parts, n = ndimage.label(lesions)
        for index in range(1, n + 1):
            part = parts == index
            ring = ndimage.binary_dilation(part) & ~part
            assert (labels[ring] != 0).mean() >= 0.5  # surrounded mostly by liver
        components += n
    assert components >= 10


def test_liver_is_on_the_patients_right_physically():
    flipped = oblique = 0
    for seed in SEEDS:
        ct, lab = small_case(seed)
        flipped += bool(np.any(np.diag(ct.direction) < 0))
        oblique += bool(abs(ct.direction[0, 1]) > 1e-6)
        liver = lps_centroid(lab, lab.array == LABEL_LIVER)
        body = lps_centroid(ct, ct.array > -300)
        assert liver[0] < body[0] - 20  # LPS x grows toward the patient's left
    assert flipped >= 3 and oblique >= 1


def test_direction_does_not_move_the_anatomy():
    checked = 0
    for seed in SEEDS:
        ct, lab = small_case(seed)
        if np.allclose(ct.direction, np.eye(3)):
            continue
        plain = small_case(seed, orientation=False)[1]
        assert np.allclose(plain.direction, np.eye(3))
        moved = lps_centroid(lab, lab.array == LABEL_LIVER) - lps_centroid(plain, plain.array == LABEL_LIVER)
        assert np.abs(moved).max() < 2.0
        checked += 1
    assert checked >= 3


def test_one_override_keeps_the_field_of_view():
    by_spacing = generate_case(3, spacing=(4.0, 4.0, 6.0))[0]
    by_matrix = generate_case(3, matrix=64)[0]
    assert by_spacing.array.shape[1] == by_spacing.array.shape[2]
    assert by_matrix.array.shape[1:] == (64, 64)
    assert abs(by_spacing.array.shape[2] * 4.0 - 64 * by_matrix.spacing[0]) <= 4.0
    for bad in ((1.0, -1.0, 2.0), (1.0, float("nan"), 2.0), (float("inf"), 1.0, 2.0), (1.0, 2.0)):
        with pytest.raises(ValueError, match="three positive finite numbers"):
            generate_case(3, spacing=bad)


def test_write_cases(tmp_path, monkeypatch):
    small = functools.partial(generate_case, matrix=48, spacing=(7.0, 7.0, 10.0))
    monkeypatch.setattr(phantom, "generate_case", small)
    calls = []
    pairs = write_cases(tmp_path / "out", 2, 40, progress=lambda f, m: calls.append(f))
    assert [p.name for pair in pairs for p in pair] == [
        "case_0040_ct.nii.gz", "case_0040_label.nii.gz", "case_0041_ct.nii.gz", "case_0041_label.nii.gz"]
    assert calls[0] == 0.0 and calls[-1] == 1.0
    for n, pair in enumerate(pairs):
        for path, volume in zip(pair, small(40 + n)):
            image = sitk.ReadImage(str(path))
            assert np.array_equal(sitk.GetArrayFromImage(image), volume.array)
            assert np.allclose(image.GetOrigin(), volume.origin, atol=1e-4)
            assert np.allclose(image.GetSpacing(), volume.spacing, atol=1e-4)
            assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), volume.direction, atol=1e-4)

    before = pairs[0][0].stat().st_mtime_ns
    with pytest.raises(OutputError):
        write_cases(tmp_path / "out", 1, 40)
    assert pairs[0][0].stat().st_mtime_ns == before
    assert write_cases(tmp_path / "out", 1, 40, overwrite=True) == pairs[:1]
