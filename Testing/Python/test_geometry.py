"""Geometry is sacred: read -> canonical -> segment -> back -> write keeps every voxel in place."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from LiverTumorSegLib.imageio import check_ct, read_volume, write_labels, write_seg_nrrd
from LiverTumorSegLib.orientation import Reorient, nearest_axes, to_canonical
from LiverTumorSegLib.terminology import SEGMENTS
from LiverTumorSegLib.volume import Volume

SPACING = (0.7, 0.9, 3.0)  # i, j, k
SHAPE = (15, 48, 60)  # k, j, i: about 42 x 43 x 45 mm
ORIGIN = (-31.5, 12.25, 57.0)
MARKER_OFFSET = np.array([8.0, -8.0, 10.0])  # from the grid centre, LPS mm: patient left, anterior, superior
MARKER_RADIUS = 5.0
BODY_RADIUS = 20.0


def rotation(axis: int, degrees: float) -> np.ndarray:
    a, b = [n for n in range(3) if n != axis]
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


SAGITTAL = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float)  # i -> P, j -> S, k -> L
VARIANTS = {  # direction, canonical (z, y, x) spacing
    "axial": (np.eye(3), (3.0, 0.9, 0.7)),
    "oblique": (rotation(2, 20.0) @ rotation(0, 10.0), (3.0, 0.9, 0.7)),
    "sagittal": (SAGITTAL, (0.9, 0.7, 3.0)),
    "oblique-sagittal": (rotation(1, 20.0) @ SAGITTAL, (0.9, 0.7, 3.0)),
}
FLIPS = list(itertools.product([1, -1], repeat=3))


def voxel_centres_lps(volume: Volume) -> np.ndarray:
    """(k, j, i, 3) physical LPS position of every voxel centre."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in volume.array.shape), indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return (ijk1 @ volume.ijk_to_lps().T)[..., :3]


def synthetic_ct(direction: np.ndarray) -> tuple[Volume, np.ndarray]:
    """Air, a soft-tissue ball at the grid centre and a dense marker at a known LPS position."""
    volume = Volume(np.zeros(SHAPE, np.int16), SPACING, ORIGIN, direction)
    lps = voxel_centres_lps(volume)
    centre = volume.ijk_to_lps() @ np.append((np.array(volume.shape_ijk) - 1) / 2, 1.0)
    marker = centre[:3] + MARKER_OFFSET
    ct = np.full(SHAPE, -1000, np.int16)
    ct[np.linalg.norm(lps - centre[:3], axis=-1) <= BODY_RADIUS] = 40
    ct[np.linalg.norm(lps - marker, axis=-1) <= MARKER_RADIUS] = 300
    return volume.with_array(ct), marker


def segment(canonical: np.ndarray) -> np.ndarray:
    """Stand-in for the network: 1 = soft tissue ("liver"), 2 = dense marker ("tumor")."""
    return (canonical > 0).astype(np.uint8) + (canonical > 150).astype(np.uint8)


def write_ct(volume: Volume, path) -> None:
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction.ravel().tolist())
    sitk.WriteImage(image, str(path))


def assert_same_geometry(image: sitk.Image, volume: Volume) -> None:
    np.testing.assert_allclose(image.GetOrigin(), volume.origin, atol=1e-5)
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing, atol=1e-5)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), volume.direction, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("flips", FLIPS, ids=lambda f: "".join("+" if s > 0 else "-" for s in f))
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_round_trip(tmp_path, variant, flips, suffix):
    direction, expected_spacing = VARIANTS[variant]
    direction = direction @ np.diag(flips)
    original, marker = synthetic_ct(direction)
    write_ct(original, tmp_path / f"ct{suffix}")

    volume = read_volume(tmp_path / f"ct{suffix}")
    assert_same_geometry(_image(tmp_path / f"ct{suffix}"), original)
    np.testing.assert_array_equal(volume.array, original.array)
    check_ct(volume)

    canonical, spacing, reorient = to_canonical(volume)
    assert spacing == pytest.approx(expected_spacing)
    centroid = np.argwhere(canonical > 150).mean(axis=0)  # z, y, x
    middle = (np.array(canonical.shape) - 1) / 2
    assert centroid[0] > middle[0] + 1, "superior marker must be at larger canonical z"
    assert centroid[1] < middle[1] - 1, "anterior marker must be at smaller canonical y"
    assert centroid[2] > middle[2] + 1, "patient-left marker must be at larger canonical x"

    labels = reorient.from_canonical(segment(canonical))
    expected = segment(original.array)
    np.testing.assert_array_equal(labels, expected)

    out = write_labels(labels, volume, tmp_path / "out" / f"labels{suffix}")
    written = _image(out)
    assert_same_geometry(written, original)
    assert written.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected)

    seg_path = write_seg_nrrd(labels, volume, tmp_path / "out" / "labels.seg.nrrd")
    seg = slicerio.read_segmentation(str(seg_path))
    np.testing.assert_allclose(seg["ijkToLPS"], original.ijk_to_lps(), atol=1e-5)
    np.testing.assert_array_equal(seg["voxels"], expected.transpose(2, 1, 0))
    assert [(s["id"], s["name"]) for s in seg["segments"]] == [(s["id"], s["name"]) for s in SEGMENTS]
    for got, spec in zip(seg["segments"], SEGMENTS):
        assert got["labelValue"] == spec["label"]
        np.testing.assert_allclose(np.array(got["color"]) * 255, spec["color"], atol=0.01)
        assert got["terminology"]["type"][1] == spec["terminology"].split("~")[2].split("^")[1]


def _image(path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def test_marker_is_where_physics_says():
    """The canonical index of the marker centroid maps back to its physical position."""
    volume, marker = synthetic_ct(rotation(2, 20.0) @ SAGITTAL @ np.diag([1, -1, -1]))
    canonical, _, reorient = to_canonical(volume)
    index = np.zeros(canonical.shape, bool)
    index[tuple(np.round(np.argwhere(canonical > 150).mean(axis=0)).astype(int))] = True
    k, j, i = np.argwhere(reorient.from_canonical(index))[0]
    lps = volume.ijk_to_lps() @ np.array([i, j, k, 1.0])
    assert np.linalg.norm(lps[:3] - marker) < max(SPACING)


@pytest.mark.parametrize("direction", [VARIANTS["oblique-sagittal"][0] @ np.diag(f) for f in FLIPS])
def test_reorient_is_exact_inverse_with_channels(direction):
    rng = np.random.default_rng(1)
    volume = Volume(rng.integers(0, 1000, (5, 6, 7)).astype(np.int16), (1.0, 2.0, 3.0), direction=direction)
    canonical, spacing, reorient = to_canonical(volume)
    assert canonical.flags.c_contiguous and canonical.shape == reorient.canonical_shape
    assert spacing == tuple(volume.spacing[::-1][a] for a in reorient.axes)
    np.testing.assert_array_equal(reorient.from_canonical(canonical), volume.array)
    stacked = np.stack([volume.array, volume.array + 1])
    np.testing.assert_array_equal(reorient.to_canonical(stacked), np.stack([canonical, canonical + 1]))
    np.testing.assert_array_equal(reorient.from_canonical(reorient.to_canonical(stacked)), stacked)


def test_reorient_rejects_wrong_shapes():
    reorient = Reorient.for_volume(Volume(np.zeros((2, 3, 4)), (1, 1, 1), direction=SAGITTAL))
    with pytest.raises(ValueError):
        reorient.from_canonical(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError):
        reorient.to_canonical(np.zeros((3, 4)))


def test_nearest_axes_is_a_permutation_even_at_45_degrees():
    axes, signs = nearest_axes(rotation(2, 45.0))
    assert sorted(axes) == [0, 1, 2] and axes[2] == 2
    assert nearest_axes(rotation(2, 45.0)) == (axes, signs)
    assert nearest_axes(SAGITTAL @ np.diag([1, -1, 1])) == ((1, 2, 0), (1, -1, 1))


def test_standard_axial_is_untouched():
    volume = Volume(np.arange(24).reshape(2, 3, 4), (0.5, 0.6, 2.0))
    canonical, spacing, _ = to_canonical(volume)
    np.testing.assert_array_equal(canonical, volume.array)
    assert spacing == (2.0, 0.6, 0.5)


def test_real_ct_with_flipped_axes(shared_data):
    """LiTS volume-0 has direction diag(1, -1, -1): canonical flips its j and k axes."""
    volume = read_volume(shared_data("lits-volume0-ct/ct.nii.gz"))
    canonical, spacing, reorient = to_canonical(volume)
    assert reorient.flips == (True, True, False)
    assert spacing == pytest.approx((5.0, 0.703125, 0.703125))
    np.testing.assert_array_equal(canonical, volume.array[::-1, ::-1, :])


def test_real_ct_round_trip(shared_data, tmp_path):
    """TotalSegmentator's RAS-stored example: labels land back on the input grid."""
    volume = read_volume(shared_data("totalseg-example/example_ct_sm.nii.gz"))
    canonical, _, reorient = to_canonical(volume)
    labels = reorient.from_canonical(segment(canonical))
    written = _image(write_labels(labels, volume, tmp_path / "labels.nii.gz"))
    assert_same_geometry(written, volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), segment(volume.array))


@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, -1, 1), (-1, 1, -1)])
def test_overlay_shows_the_patients_left_on_the_right_and_anterior_up(tmp_path, flips):
    """Radiological convention whatever the storage: a mask at the patient's left-anterior is drawn in the
    panel's right half and top half (the R/L/A/P letters say so on the picture)."""
    import matplotlib.image

    from LiverTumorSegLib.overlay import save_overlay_png

    shape = (12, 64, 64)  # (k, j, i); with the identity direction i runs to the patient's left, j to posterior
    labels = np.zeros(shape, np.uint8)
    labels[4:8, 4:16, 48:60] = 1  # left (high i), anterior (low j)
    hu = np.full(shape, 40, np.int16)
    flipped = tuple(a for a, f in zip((2, 1, 0), flips) if f < 0)  # array axes (k, j, i) of the flipped (i, j, k)
    spacing = np.array([1.0, 1.0, 3.0])
    origin = np.array([0.0 if f > 0 else (n - 1) * s for f, n, s in zip(flips, shape[::-1], spacing)])
    ct = Volume(np.flip(hu, flipped).copy(), tuple(spacing), tuple(origin), np.diag(flips).astype(float))
    path = save_overlay_png(ct, np.flip(labels, flipped).copy(), tmp_path / "o.png", n_slices=1)
    rgb = matplotlib.image.imread(path)[..., :3] * 255
    liver = np.array(next(s for s in SEGMENTS if s["id"] == "liver")["color"], float)
    grey = 0.55 * 127 + 0.45 * liver  # the overlay's 45 % over the mid-grey of 40 HU (about)
    near = np.abs(rgb - grey).max(axis=2) < 40
    ys, xs = np.nonzero(near)
    assert ys.size > 100
    height, width = near.shape
    assert xs.mean() > 0.6 * width and ys.mean() < 0.5 * height, (xs.mean() / width, ys.mean() / height)
