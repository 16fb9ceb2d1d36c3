"""Reading CT and label volumes, checking that an input is a usable CT, writing results.

Readers and writers keep the geometry exactly (origin, spacing, direction in LPS, as ITK).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import secrets
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .terminology import SEGMENTS
from .volume import Volume

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
OUTPUT_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
SEG_SUFFIX = ".seg.nrrd"

SAMPLE_SIZE = 1_000_000  # voxels drawn (fixed seed) for value statistics
MIN_SLICES = 3  # fewer voxels along an axis: a 2-D image
FEW_SLICES = 8  # fewer: accepted with a warning (along one axis only)
MIN_SPACING_MM = 0.1  # below: no clinical CT; most likely a header in metres
MAX_SPACING_MM = 20.0
MAX_SLICES = 1500
MAX_ANISOTROPY = 8.0
OBLIQUE_DEGREES = 1.0


# ---------------------------------------------------------------- reading


def read_volume(path) -> Volume:
    """Read a 3-D scalar image: NIfTI, NRRD, MetaImage file, or a folder holding a DICOM series."""
    path = Path(path)
    if not path.is_dir():
        return _to_volume(_read_image_file(path), path)
    image, source = _read_dicom_folder(path)
    volume = _to_volume(image, path)
    volume.source = source
    return volume


def read_labels(path, reference: Volume | None = None, *, ours: bool = False) -> Volume:
    """Read a label volume as integers; with ``reference``, require the same voxel grid; with
    ``ours``, require our label values only (0 background, 1 liver, 2 tumor, 3 cyst).

    A Slicer ``.seg.nrrd`` gives our labels from its segments named Liver (1), Liver tumor (2)
    and Liver cyst (3), whatever their IDs; other segments are ignored.
    """
    if str(path).lower().endswith(".seg.nrrd"):
        volume = _read_seg_nrrd(Path(path))
    else:
        volume = _read_integer_volume(path)
    if ours:
        others = np.setdiff1d(np.unique(volume.array), [0, *(s["label"] for s in SEGMENTS)])
        if others.size:
            shown = ", ".join(str(v) for v in others[:5]) + (", ..." if others.size > 5 else "")
            raise InputError(f"'{path}' holds label values {shown} besides 0 background, 1 liver, 2 tumor and "
                             "3 cyst: it is not a label map of ours (a CT, or labels of another scheme?).")
    if reference is not None and (difference := grid_difference(volume, reference)):
        raise InputError(f"The labels in '{path}' are not on the voxel grid of the image ({difference}); "
                         "resample them onto the image first.")
    return volume


def _read_seg_nrrd(path: Path) -> Volume:
    import slicerio  # here, not at the top: Slicer imports this module before its packages are installed

    if not path.exists():
        raise InputError(f"'{path}' does not exist; check the path.")
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # noqa: BLE001 - slicerio/pynrrd raise many types for a bad file
        raise InputError(f"'{path.name}' could not be read as a Slicer segmentation ({type(exc).__name__}).") from exc
    by_name = {s["name"].lower(): s["label"] for s in SEGMENTS}
    names = [s.get("name", "") for s in segmentation["segments"]]
    wanted = [(n, by_name[n.strip().lower()]) for n in names if n.strip().lower() in by_name]
    if not wanted:
        raise InputError(f"'{path.name}' has no segment named Liver, Liver tumor or Liver cyst; "
                         f"found: {', '.join(names) or 'none'}.")
    voxels = slicerio.extract_segments(segmentation, wanted, minimalExtent=False)["voxels"]
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    return Volume(np.asarray(voxels).transpose(2, 1, 0).astype(np.uint8), spacing,
                  ijk_to_lps[:3, 3], ijk_to_lps[:3, :3] / spacing)


def _read_integer_volume(path) -> Volume:
    volume = read_volume(path)
    labels = volume.array
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.rint(labels)):
            raise InputError(f"'{path}' has non-integer values, so it is not a label map.")
    low, high = labels.min(), labels.max()
    dtype = np.uint8 if 0 <= low and high <= 255 else np.int32
    return volume.with_array(labels.astype(dtype, copy=False))


def grid_difference(a: Volume, b: Volume, tol: float = 1e-4) -> str | None:
    """What differs between two volumes' grids (size, spacing, origin, direction; mm and cosine
    tolerance), in words with both values, or None when they share one grid."""
    def show(values):
        return "(" + ", ".join(f"{float(v):.6g}" for v in np.ravel(values)) + ")"

    if a.array.shape != b.array.shape:
        return f"size {tuple(a.shape_ijk)} vs {tuple(b.shape_ijk)}"
    if not np.allclose(a.spacing, b.spacing, atol=tol):
        return f"spacing {show(a.spacing)} vs {show(b.spacing)} mm"
    if not np.allclose(a.direction, b.direction, atol=tol):
        return f"direction {show(a.direction)} vs {show(b.direction)}"
    if not np.allclose(a.origin, b.origin, atol=tol * 10):
        return f"origin {show(a.origin)} vs {show(b.origin)} mm (LPS)"
    return None


def same_grid(a: Volume, b: Volume, tol: float = 1e-4) -> bool:
    """Whether two volumes share shape, spacing, origin and direction (``grid_difference``)."""
    return grid_difference(a, b, tol) is None


def _read_image_file(path: Path) -> sitk.Image:
    if not path.exists():
        raise InputError(f"'{path}' does not exist; check the path.")
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise InputError(f"'{path.name}' is not a supported image file ({', '.join(IMAGE_SUFFIXES)}); "
                         "for DICOM, select the folder that holds the series.")
    if path.name.lower().endswith((".mha", ".mhd")):
        _check_metaimage_spacing(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        _check_layout(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), path)
        if path.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_file(path, reader)
        return reader.Execute()
    except RuntimeError as exc:
        log.debug("ITK could not read %s: %s", path, exc)
        why = _unreadable_geometry(path)
        raise InputError(f"'{path.name}' {why}" if why else f"'{path.name}' could not be read: the file is damaged, "
                         "incomplete or not a valid image.") from exc


def _check_metaimage_spacing(path: Path) -> None:
    """ITK reads a MetaImage's negative voxel size as positive (the axis not flipped) and fails on a
    zero one: both refused, as in NIfTI, naming the header field."""
    try:
        with open(path, "rb") as f:
            lines = [f.readline(4096).decode("latin-1") for _ in range(64)]
    except OSError:
        return
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() in ("ElementSpacing", "ElementSize"):
            try:
                sizes = [float(v) for v in value.split()]
            except ValueError:
                return
            if not all(np.isfinite(v) and v > 0 for v in sizes):
                raise InputError(f"'{path.name}' has a voxel size of {' x '.join(f'{v:g}' for v in sizes)} mm in its "
                                 f"header ({key.strip()}): readers disagree on what it means, so the geometry is "
                                 "unknown. Fix the header (sizes > 0; a flip belongs in TransformMatrix).")
        if key.strip() == "ElementDataFile":
            return


def _unreadable_geometry(path: Path) -> str | None:
    """Why ITK refused a NIfTI, where its header says: an sform that maps no volume (singular)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            info = _nifti_header(f.read(348))
    except (OSError, EOFError, zlib.error):
        return None
    return SINGULAR_SFORM if info is not None and info["sform_code"] > 0 and _singular_sform(info) else None


SINGULAR_SFORM = "has a singular sform (an axis of zero length, or two parallel axes): its geometry is unknown. Fix the header."


def _singular_sform(info: dict) -> bool:
    return abs(np.linalg.det(info["srow"][:, :3])) < 1e-9 * max(float(np.abs(info["srow"][:, :3]).max()), 1e-30) ** 3


NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI-1 datatype codes of real-valued voxels


def _check_nifti_file(path: Path, reader: sitk.ImageFileReader) -> None:
    """What ITK's NIfTI reader would hide. Raise RuntimeError when the file lacks voxel bytes (ITK
    zero-fills a truncated file), and InputError for a zero or non-finite voxel size in a header
    without an sform (ITK reads it as 1 mm), for a negative voxel size in any header (ITK flips that
    axis even against a valid sform, nibabel drops the sign, nifti1_io reads 1 mm: the standard
    requires it positive), for an orientation other readers would read elsewhere
    (``_nifti_orientation_problem``) or for NaN/infinite float voxels (ITK reads them as 0)."""
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            header = f.read(348)
            info = _nifti_header(header)
            sizes = info["pixdim"][1:min(info["dims"][0], 3) + 1] if info is not None else ()
            if any(s < 0 for s in sizes):
                raise InputError(f"'{path.name}' has a negative voxel size ({' x '.join(f'{s:g}' for s in sizes)} mm) "
                                 "in its header. Readers disagree on what it means (ITK flips the axis, others drop "
                                 "the sign), so the image's orientation is ambiguous. Fix the header (pixdim > 0).")
            if info is not None and info["sform_code"] == 0:
                if not all(np.isfinite(s) and s != 0 for s in sizes):
                    raise InputError(f"'{path.name}' has a voxel size of {' x '.join(f'{s:g}' for s in sizes)} mm "
                                     "in its header: the image's geometry is unknown. Fix the header (pixdim).")
            if info is not None and (problem := _nifti_orientation_problem(info, reader)):
                raise InputError(f"'{path.name}' {problem}")
            float_code = NIFTI_FLOATS.get(info["datatype"]) if info is not None else None
            if float_code is None and not compressed:
                size = path.stat().st_size
            else:  # read to the end: checks a compressed file's CRC, and float voxels for NaN/inf
                size, bad = len(header), 0
                skip = max(info["offset"] - len(header), 0) if float_code else 0
                size += len(f.read(skip))
                dtype = np.dtype(info["endian"] + float_code) if float_code else None
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    size += len(chunk)
                    if dtype is not None:
                        usable = len(chunk) - len(chunk) % dtype.itemsize  # whole 16 MiB reads until the end: aligned
                        bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:usable], dtype))))
                if bad:
                    raise InputError(f"'{path.name}' contains {bad} NaN or infinite voxel values: it is damaged "
                                     "(neither a CT nor a label map holds them).")
    except (OSError, EOFError, zlib.error) as exc:
        raise RuntimeError(f"compressed stream is damaged: {exc}") from exc
    expected = _nifti_data_end(header)
    if expected is not None and size < expected:
        raise RuntimeError(f"NIfTI file holds {size} bytes, its header announces {expected}")


def _nifti_header(header: bytes) -> dict | None:
    """The fields of a NIfTI-1 header this module checks (None if not one)."""
    for endian in "<>":
        if len(header) < 348 or struct.unpack(endian + "i", header[:4])[0] != 348:
            continue
        dims = struct.unpack(endian + "8h", header[40:56])
        if not 1 <= dims[0] <= 7:
            return None
        return {"endian": endian, "dims": dims,
                "datatype": struct.unpack(endian + "h", header[70:72])[0],
                "bitpix": struct.unpack(endian + "h", header[72:74])[0],
                "pixdim": struct.unpack(endian + "8f", header[76:108]),
                "offset": int(struct.unpack(endian + "f", header[108:112])[0]),
                "qform_code": struct.unpack(endian + "h", header[252:254])[0],
                "sform_code": struct.unpack(endian + "h", header[254:256])[0],
                "srow": np.array(struct.unpack(endian + "12f", header[280:328]), float).reshape(3, 4)}
    return None


def _nifti_orientation_problem(info: dict, reader: sitk.ImageFileReader) -> str | None:
    """Why other readers (nibabel, FSL, ANTs' NIfTI-1 paths) would place this image elsewhere than ITK
    does, or None. They take the sform when its code is set, else the qform; ITK may take the qform
    (an sform code other than 1, a sheared sform) and invents an orientation when neither is set."""
    if info["qform_code"] <= 0 and info["sform_code"] <= 0:
        return ("has no orientation in its header (qform and sform codes 0): readers place and orient it "
                "differently, so results could land mirrored. Set the header's qform or sform (e.g. from the "
                "scanner's DICOM).")
    if info["sform_code"] <= 0:
        return None
    if _singular_sform(info):
        return SINGULAR_SFORM
    size = np.array(reader.GetSize()[:3], float)
    itk = np.diag([-1.0, -1.0, 1.0]) @ np.c_[np.reshape(reader.GetDirection(), (-1, reader.GetDimension()))[:3, :3]
                                              @ np.diag(reader.GetSpacing()[:3]), reader.GetOrigin()[:3]]  # RAS
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    apart = float(np.max(np.linalg.norm(corners @ (itk - info["srow"]).T, axis=1)))
    if apart <= 0.1 * min(reader.GetSpacing()[:3]):
        return None
    linear = info["srow"][:, :3]
    sheared = not np.allclose(linear.T @ linear, np.diag(np.diag(linear.T @ linear)), rtol=1e-4,
                              atol=1e-4 * float(np.max(np.abs(linear)))**2)
    scales, pixdim = np.linalg.norm(linear, axis=0), np.array(info["pixdim"][1:4])
    if sheared:
        why = "that is not a rotation with voxel sizes (sheared)"
    elif not np.allclose(scales, pixdim, rtol=1e-3):
        why = f"whose voxel sizes ({' x '.join(f'{v:g}' for v in scales)} mm) differ from pixdim's ({' x '.join(f'{v:g}' for v in pixdim)})"
    else:
        why = f"(code {info['sform_code']}) that disagrees with its qform"
    return (f"has an sform {why}: ITK-based tools (this one, Slicer) and tools that read the sform (nibabel, "
            f"FSL) place the image {apart:.1f} mm apart at its corners, so results would land elsewhere in some. "
            "Make the header's qform and sform agree.")


def _nifti_data_end(header: bytes) -> int | None:
    """Byte offset of the end of the voxel data from a NIfTI-1 header (None if not one)."""
    info = _nifti_header(header)
    if info is None:
        return None
    dims = info["dims"]
    return max(info["offset"], 352) + int(np.prod(dims[1:dims[0] + 1])) * info["bitpix"] // 8


def _read_dicom_folder(path: Path) -> tuple[sitk.Image, dict]:
    """The largest DICOM series under ``path`` and what it is (UID, folder, file count, series count)."""
    series = _dicom_series(path)
    if not series:
        raise InputError(f"No DICOM image series was found in the folder '{path}'.")
    series = sorted(series, key=lambda s: len(s[1]), reverse=True)
    series_id, files = series[0]
    if len(series) > 1:
        tie = " (as large as the next one: two phases? select the folder of the one you want)" \
            if len(series[1][1]) == len(files) else ""
        log.warning("The folder '%s' holds %d DICOM series; reading the largest, %s (%d files in '%s')%s.",
                    path, len(series), series_id, len(files), Path(files[0]).parent, tie)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        log.debug("ITK could not read the DICOM series in %s: %s", path, exc)
        raise InputError(f"The DICOM series in '{path}' could not be read: files are damaged "
                         "or not images.") from exc
    _check_layout(image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(), path)
    return image, {"dicom_series_uid": series_id or None, "dicom_folder": str(Path(files[0]).parent),  # None: the files name none
                   "dicom_files": len(files), "dicom_series_in_folder": len(series)}


def dicom_series_ids(folder) -> tuple[str, ...]:
    """The DICOM series UIDs directly in ``folder``; ITK's "No Series were found" warning, printed for
    every folder without one, is kept quiet (a folder of NIfTI cases would print it once per file)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _dicom_series(folder: Path) -> list[tuple[str, list[str]]]:
    """(series UID, file names) of every DICOM series in a folder and its subfolders."""
    series = []
    for root, _, _ in os.walk(folder):
        for series_id in dicom_series_ids(root):
            series.append((series_id, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(root, series_id))))
    return series


def _check_layout(dimension: int, size, components: int, path: Path) -> None:
    """Reject images that are not 3-D scalar volumes (a 4-D image with one time point is fine)."""
    name = path.name
    if components != 1:
        raise InputError(f"'{name}' has {components} values per voxel (a colour or vector image); "
                         "a CT has one, so select a greyscale CT.")
    if dimension == 4 and size[3] > 1:
        raise InputError(f"'{name}' is a 4-D image ({size[3]} volumes, e.g. a time series); "
                         "select a single 3-D CT.")
    if dimension < 3 or min(size[:3]) < 2:
        raise InputError(f"'{name}' is a 2-D image (a single slice); a 3-D CT volume is needed.")
    if dimension > 4:
        raise InputError(f"'{name}' has {dimension} dimensions; a 3-D CT volume is needed.")


def _to_volume(image: sitk.Image, path: Path) -> Volume:
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    volume = Volume(
        array=sitk.GetArrayFromImage(image),
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=np.array(image.GetDirection()).reshape(3, 3),
    )
    log.debug("Read %s: shape %s, spacing %s", path, volume.array.shape, volume.spacing)
    return volume


# ---------------------------------------------------------------- checking


def check_ct(volume: Volume) -> None:
    """Raise InputError when the volume is not a usable CT in Hounsfield units.

    Checked in order: spacing in (0, 20] mm; at least 3 voxels along every axis and 8 along two;
    finite values; not constant; not a label map (integer values that are binary, or non-negative
    with at most 256 levels); and the CT rule, on a fixed random sample of voxels: the 1st
    percentile is below -50 HU (every body CT shows air or fat, even a crop around the liver), the
    99th percentile is at most 4000, and at least 10 % of voxels lie in the soft-tissue/fat range
    [-200, 300] HU. MR, PET, normalised (z-score, 0..1) and un-rescaled data fail it.
    """
    _check_geometry(volume)
    arr = volume.array
    low, high = arr.min(), arr.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputError("The image contains NaN or infinite voxel values; it is damaged or not a CT.")
    if low == high:
        raise InputError(f"All voxels of the image have the same value ({low:g}): the image is empty.")
    sample = _sample(arr)
    _check_not_labels(sample, low)
    _check_hounsfield(sample)


def ct_warnings(volume: Volume) -> list[str]:
    """Things about a valid CT that may reduce accuracy, as user-facing sentences; none for an image
    ``check_ct`` refuses (its error is then the one message)."""
    try:
        check_ct(volume)
    except InputError:
        return []
    warnings = []
    degrees = oblique_degrees(volume.direction)
    if degrees > OBLIQUE_DEGREES:
        warnings.append(f"The image axes are oblique ({degrees:.1f} degrees from the patient axes); "
                        "it is processed without resampling, which may reduce accuracy.")
    if max(volume.spacing) / min(volume.spacing) > MAX_ANISOTROPY:
        spacing = " x ".join(f"{s:g}" for s in volume.spacing)
        warnings.append(f"The voxels are very anisotropic ({spacing} mm); thick slices reduce accuracy.")
    if min(volume.array.shape) < FEW_SLICES:
        warnings.append(f"The image has only {min(volume.array.shape)} slices along one axis; "
                        "results near its borders will be unreliable.")
    if max(volume.array.shape) > MAX_SLICES:
        warnings.append(f"The image is very large ({max(volume.array.shape)} slices along one axis); "
                        "segmentation will be slow and use much memory.")
    return warnings


def oblique_degrees(direction: np.ndarray) -> float:
    """The largest angle, in degrees, between a voxel axis and its nearest patient axis."""
    cosines = np.abs(np.asarray(direction, dtype=float)).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def _check_geometry(volume: Volume) -> None:
    spacing = np.asarray(volume.spacing)
    if not np.all(np.isfinite(spacing)) or np.any(spacing < MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        text = " x ".join(f"{s:g}" for s in volume.spacing)
        raise InputError(f"The voxel spacing {text} mm is implausible for a CT (it must be between {MIN_SPACING_MM:g} "
                         f"and {MAX_SPACING_MM:g} mm); the file header is probably wrong (metres for mm?).")
    direction = np.asarray(volume.direction, float)
    if not np.all(np.isfinite(direction)) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise InputError("The image's direction matrix is not a rotation (its axes are sheared, scaled or not "
                         "perpendicular), so voxels have no well-defined place in the patient; resample it onto "
                         "an orthogonal grid first.")
    sizes = sorted(volume.array.shape)
    if sizes[0] < MIN_SLICES:
        raise InputError(f"The image has only {sizes[0]} slice(s) along one axis, so it is 2-D; "
                         f"a 3-D CT with at least {MIN_SLICES} slices is needed.")
    if sizes[1] < FEW_SLICES:
        raise InputError(f"The image is only {sizes[0]} x {sizes[1]} voxels across; a 3-D CT volume "
                         "is needed.")


def _sample(arr: np.ndarray) -> np.ndarray:
    """Up to SAMPLE_SIZE voxels drawn at random with a fixed seed (all voxels of small images)."""
    flat = arr.reshape(-1)
    if flat.size <= SAMPLE_SIZE:
        return flat
    return flat[np.random.default_rng(0).integers(0, flat.size, SAMPLE_SIZE)]


def _check_not_labels(sample: np.ndarray, low) -> None:
    """Integer values that are binary, or non-negative with at most 256 levels, are a label map.

    Few levels alone are not enough: a CT phantom (air, tissue, bone) has negative HU values.
    """
    if not np.issubdtype(sample.dtype, np.integer) and np.any(sample != np.rint(sample)):
        return
    distinct = np.unique(sample).size
    if distinct <= 2 or (low >= 0 and distinct <= 256):
        raise InputError(f"The image looks like a label map or mask ({distinct} distinct integer "
                         "values), not a CT scan; select the CT image itself.")


def _check_hounsfield(sample: np.ndarray) -> None:
    p1, p99 = np.percentile(sample, [1, 99])
    tissue = np.mean((sample >= -200) & (sample <= 300))
    if p1 > -50:
        raise InputError("The image does not look like a CT in Hounsfield units (no air or fat "
                         "below -50 HU): it may be MR, PET, normalised data, or a CT saved without "
                         "its rescale intercept.")
    if p99 > 4000:
        raise InputError(f"The image does not look like a CT in Hounsfield units (1 % of voxels "
                         f"are above {p99:.0f}, far beyond bone); it may be MR or un-rescaled data.")
    if tissue < 0.1:
        raise InputError(f"The image does not look like a body CT (only {tissue:.0%} of voxels in "
                         "the soft-tissue range -200..300 HU); select an abdominal CT.")


# ---------------------------------------------------------------- writing


def write_labels(labels: np.ndarray, reference: Volume, path, *, overwrite: bool = False) -> Path:
    """Write a uint8 label map (.nii, .nii.gz, .nrrd, .mha) on exactly the reference's grid."""
    return write_volume(reference.with_array(_as_uint8_labels(labels, reference)), path, overwrite=overwrite)


def write_volume(volume: Volume, path, *, overwrite: bool = False) -> Path:
    """Write a volume (.nii, .nii.gz, .nrrd, .mha) with its voxel type and exact geometry."""
    path, suffix = _output_path(path, OUTPUT_SUFFIXES, overwrite)
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction.reshape(-1).tolist())
    _write_atomically(path, suffix, lambda tmp: sitk.WriteImage(image, str(tmp), True))
    return path


def write_seg_nrrd(labels: np.ndarray, reference: Volume, path, *, overwrite: bool = False) -> Path:
    """Write a 3D Slicer segmentation (.seg.nrrd) with the liver, tumor and cyst segments.

    Every segment of ``terminology.SEGMENTS`` is written (empty or not), in one layer, with its
    fixed ID, name, colour and terminology; its label value in the file equals ours.
    """
    import slicerio  # here, not at the top: Slicer imports this module before its packages are installed
    from slicerio.segmentation import terminology_entry_from_string

    path, suffix = _output_path(path, (SEG_SUFFIX,), overwrite)
    voxels = _as_uint8_labels(labels, reference).transpose(2, 1, 0)  # slicerio indexes (i, j, k)
    top = max(spec["label"] for spec in SEGMENTS)
    if voxels.size and voxels.max() > top:
        raise ValueError(f"labels for a .seg.nrrd must lie in 0..{top}")
    segmentation = slicerio.create_segmentation(voxels.shape, reference.ijk_to_lps())
    for spec in SEGMENTS:
        segment = slicerio.add_segment(segmentation, voxels == spec["label"], {
            "id": spec["id"],
            "name": spec["name"],
            "color": [c / 255 for c in spec["color"]],
            "terminology": terminology_entry_from_string(spec["terminology"]),
        })
        assert segment["labelValue"] == spec["label"] and segment["layer"] == 0
    _write_atomically(path, suffix,
                      lambda tmp: slicerio.write_segmentation(str(tmp), segmentation, compression_level=1))
    return path


def _as_uint8_labels(labels: np.ndarray, reference: Volume) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != reference.array.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the image's {reference.array.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("label values must lie in 0..255")
    return labels.astype(np.uint8, copy=False)


def _output_path(path, suffixes, overwrite: bool) -> tuple[Path, str]:
    """The output path and its suffix (in the path's own case), after the refusals."""
    path = Path(path)
    suffix = next((path.name[-len(s):] for s in sorted(suffixes, key=len, reverse=True)
                   if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise OutputError(f"'{path.name}' must end with one of {', '.join(suffixes)}; choose another name.")
    if path.is_dir():
        raise OutputError(f"'{path}' is a folder; give a file name for the output.")
    if path.exists() and not overwrite:
        raise OutputError(f"'{path}' already exists; choose another name or allow overwriting.")
    return path, suffix


def refuse_existing(paths, overwrite: bool) -> None:
    """Refuse, before any work, to replace existing outputs unless ``overwrite``, and outputs whose
    folder could not be made or written (nothing is created here)."""
    existing = [str(p) for p in paths if p and Path(p).exists()]
    if existing and not overwrite:
        more = " ..." if len(existing) > 3 else ""
        raise OutputError(f"Output exists: {', '.join(existing[:3])}{more}. Use --overwrite to replace.")
    for path in paths:
        if path:
            _check_writable(Path(path))


def refuse_existing_in(folder, names, overwrite: bool) -> None:
    """``refuse_existing`` for a command's output folder and the file names it writes there."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"The output must be a folder; {folder} is a file.")
    refuse_existing([folder / name for name in names], overwrite)


def refuse_input_as_output(out, inputs) -> None:
    """Refuse an output folder that is one of the input folders (its files would mix with the inputs')."""
    folder = Path(out).resolve()
    for given in inputs:
        if given is not None and Path(given).resolve() == folder:
            raise OutputError(f"-o {out} is an input folder ({given}): write the results into a folder of their own.")


def _check_writable(path: Path) -> None:
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"'{path}' cannot be written: '{folder}' is not a folder you may write in.")


def check_suffix(path, suffix: str, what: str) -> None:
    """Refuse, before any work, an output name without the ending its writer needs."""
    if path and not str(path).lower().endswith(suffix):
        raise OutputError(f"{what} must end with {suffix}: '{path}'.")


def _write_atomically(path: Path, suffix: str, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place."""
    tmp = path.with_name(f".{path.name[:-len(suffix)]}.{secrets.token_hex(4)}.tmp{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "the writer failed"
        raise OutputError(f"'{path}' could not be written ({reason}); check the folder's "
                          "permissions and free disk space.") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(obj, path, *, overwrite: bool = False) -> Path:
    """Write a JSON document atomically (a report, a table); nan and inf become null, as standard
    JSON has no token for them."""
    path, suffix = _output_path(path, (".json",), overwrite)
    text = json.dumps(_finite_or_null(obj), indent=2, allow_nan=False)
    _write_atomically(path, suffix, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def _finite_or_null(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def write_text(text: str, path, suffixes=(".csv", ".md", ".txt"), *, overwrite: bool = False) -> Path:
    """Write a text file (a CSV table, a Markdown report) atomically."""
    path, suffix = _output_path(path, suffixes, overwrite)
    _write_atomically(path, suffix, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def write_npz(arrays: dict, path, *, overwrite: bool = False) -> Path:
    """Write compressed numpy arrays atomically, under exactly the given ``.npz`` name."""
    path, suffix = _output_path(path, (".npz",), overwrite)

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    _write_atomically(path, suffix, write)
    return path
