"""pyliverlesionseg's CT abdomen box (kulcrop): building blocks against scipy and hand-computed
cases, the fallbacks, and a synthetic torso whose landmarks are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, signal

from LiverTumorSegLib.kulcrop import (
    CropRules,
    _dome_from_profile,
    abdomen_box,
    capped,
    cube_erosion,
    cube_opening,
    hip_slice,
    smooth7,
)


def test_cube_morphology_equals_scipy_binary_morphology_with_a_zero_border():
    rng = np.random.default_rng(0)
    mask = ndimage.binary_dilation(rng.random((23, 19, 17)) > 0.9, iterations=2)
    cube = np.ones((5, 5, 5), bool)
    assert np.array_equal(cube_erosion(mask, 5), ndimage.binary_erosion(mask, cube))
    assert np.array_equal(cube_opening(mask, 5), ndimage.binary_opening(mask, cube))


def test_smooth7_is_a_centred_seven_slice_sum():
    p = np.arange(12.0) ** 2
    assert np.allclose(smooth7(p), signal.convolve(p, np.ones(7), "same"))
    assert smooth7(np.eye(1, 9, 4)[0]).tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 0]  # a spike spreads 3 slices each way


def test_dome_is_the_first_run_start_or_the_second_after_a_deep_dip():
    one_run = np.array([0, 0, 5, 10, 10, 4, 0.0])  # half height 5: slices 3, 4
    assert _dome_from_profile(one_run, 0, 10) == 3
    deep_dip = np.array([0, 10, 10, 1, 10, 10, 0.0])  # dips below 2 (20 %) between runs
    assert _dome_from_profile(deep_dip, 0, 10) == 4
    shallow = np.array([0, 10, 10, 3, 10, 10, 0.0])  # the dip stays above 2
    assert _dome_from_profile(shallow, 0, 10) == 1


def test_caps_shrink_x_y_around_the_air_centre_and_z_from_the_feet():
    box = (slice(0, 200), slice(10, 110), slice(5, 305))
    spacing = np.array([3.0, 1.0, 2.0])
    # x: 600 mm, 111 mm too long = 37 voxels: centre 50 of 0..200 -> ceil(50/200*37)=10 from the start, ceil(150/200*37)=28 from the end
    # y: 100 mm: no cut; z: 600 mm, 192 mm too long -> 96 slices from the start
    out = capped(box, spacing, (50, 60), (489.0, 408.0, 408.0))
    assert out == (slice(10, 172), slice(10, 110), slice(101, 305))
    assert (out[0].stop - out[0].start) * 3.0 <= 489.0 + 3.0


def test_hip_is_the_last_strong_bone_peak_below_the_deepest_minimum():
    z = np.arange(200)
    # spine everywhere (300) with a bone-poor lumbar bowl (deepest at 115), three pelvic peaks (20, 45, 70), ribs (170)
    peaks = sum(a * np.exp(-((z - c) / 5.0) ** 2) for a, c in ((900, 20), (1000, 45), (800, 70), (500, 170)))
    profile = 300 - 200 * np.exp(-((z - 115) / 15.0) ** 2) + peaks
    counts = np.round(profile).astype(int)  # bone voxels per slice
    big = np.arange(counts.max())[:, None, None] < counts[None, None, :]
    hip = hip_slice(big, dome=190, vz=1.0, rules=CropRules())
    assert hip == 70  # the pelvic peak nearest the lumbar minimum
    # no pelvis in the field of view: no hip (slice 0), capped at 400 mm below the dome
    assert hip_slice(big[:, :, 90:], dome=100, vz=1.0, rules=CropRules()) == 0
    assert hip_slice(big, dome=190, vz=5.0, rules=CropRules()) == 190 - 80  # (190 - 70) x 5 mm > 400 mm


def _torso(lungs: bool = True) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 4 mm torso in LPS order (x, y, z up): soft tissue in air, lungs from slice 70 up, and below
    them bone whose voxel count per slice is exact: spine 300 with a lumbar bowl (deepest at 50),
    pelvic peaks at slices 8, 20, 32 and a rib peak at 64."""
    nx, ny, nz = 100, 80, 110
    x, y, z = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    hu = np.full((nx, ny, nz), -1000, np.int16)
    body = ((x - 50) / 40.0) ** 2 + ((y - 40) / 28.0) ** 2 < 1
    hu[body] = 40
    if lungs:
        for cx in (32, 68):
            hu[(((x - cx) / 12.0) ** 2 + ((y - 40) / 15.0) ** 2 < 1) & (z >= 70) & (z < 106)] = -850
    k = np.arange(70)
    bone = 300 - 200 * np.exp(-((k - 50) / 8.0) ** 2) + sum(
        a * np.exp(-((k - c) / 3.0) ** 2) for a, c in ((900, 8), (1000, 20), (800, 32), (500, 64)))
    for slice_, count in enumerate(np.round(bone).astype(int)):
        ix, iy = np.nonzero(body[:, :, 0])
        hu[ix[:count], iy[:count], slice_] = 700
    return hu, (4.0, 4.0, 4.0)


def test_a_torso_gets_the_body_in_x_y_and_lung_base_to_pelvis_in_z():
    hu, spacing = _torso()
    found = abdomen_box(hu, spacing)
    assert found.fallback is None and found.dome == 70 and found.hip == 32  # lung base; pelvic peak above the bowl
    x, y, z = found.box
    assert z == slice(32 - 20 // 4, 70 + 70 // 4)  # hip - 20 mm to dome + 70 mm
    assert 10 <= x.start <= 14 and 86 <= x.stop <= 90  # the body (11..89) after the 5x5x5 erosion
    assert 12 <= y.start <= 16 and 64 <= y.stop <= 68


@pytest.mark.parametrize("what", ["no lungs", "2-D"])
def test_without_landmarks_the_whole_image_is_used_and_the_reason_given(what):
    hu, spacing = _torso(lungs=False)
    hu[hu == 700] = 40
    if what == "2-D":
        hu = hu[:, :, :1]
    found = abdomen_box(hu, spacing)
    assert found.box == tuple(slice(0, n) for n in hu.shape)
    assert found.fallback and ("air" in found.fallback or "3-D" in found.fallback)
