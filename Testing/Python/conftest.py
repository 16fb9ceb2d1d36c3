"""Shared test helpers: locating the real CT test data (never copied into the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Every real CT in shared/data (files and DICOM folders), relative to it.
REAL_CTS = [
    "ircad-1.1/ct.nii.gz",
    "hcc-tace-seg-hcc048/ct.nii.gz",
    "lits-117-128cube/image.nii.gz",
    "lits-volume0-ct/ct.nii.gz",
    "totalseg-example/example_ct_sm.nii.gz",
    "totalseg-example/example_ct_dicom",
    "dcmqi-ct3slice-liver/ct-3slice",
]
DATA_ROOTS = [REPO / "shared" / "data", REPO.parent / "shared" / "data"]


def data_roots() -> list[Path]:
    """Where real data is looked for: $LIVERTUMORSEG_SHARED_DATA, else shared/data in or beside the repo."""
    override = os.environ.get("LIVERTUMORSEG_SHARED_DATA")
    return [Path(override)] if override else DATA_ROOTS


@pytest.fixture
def shared_data():
    """``shared_data(relpath)`` -> Path of a real-data file; skips when absent (fails when CI=true)."""

    def locate(relpath: str) -> Path:
        found = [root / relpath for root in data_roots() if (root / relpath).exists()]
        if not found:
            reason = f"real test data '{relpath}' not found in {', '.join(map(str, data_roots()))}"
            if os.environ.get("CI") == "true":
                pytest.fail(reason + "; CI must provide it")
            pytest.skip(reason)
        return found[0]

    return locate


@pytest.fixture
def slicer_scene():
    """A Slicer MRML scene set up as the Slicer application sets it up (the segmentations logic
    registers the segment converters; subject hierarchy), also as ``slicer.mrmlScene``.
    Needs slicer-core; the test modules using it skip without it (and fail under CI=true)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = []
    for cls in (slicer.vtkSlicerSegmentationsModuleLogic, slicer.vtkSlicerSubjectHierarchyModuleLogic):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        logics.append(logic)
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    yield scene
    slicer.mrmlScene = previous
    scene.Clear(1)
