"""`segment` on every real CT in shared/data (NIfTI and DICOM): runs, output on the input's grid.

These files are never copied into the repository; tests skip without them and fail under CI=true.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.cli import main
from LiverTumorSegLib.imageio import read_volume

REAL_CTS = [
    "ircad-1.1/ct.nii.gz",
    "hcc-tace-seg-hcc048/ct.nii.gz",
    "lits-117-128cube/image.nii.gz",
    "lits-volume0-ct/ct.nii.gz",
    "totalseg-example/example_ct_sm.nii.gz",
    "totalseg-example/example_ct_dicom",
    "dcmqi-ct3slice-liver/ct-3slice",
]


@pytest.mark.parametrize("relpath", REAL_CTS)
def test_segment_real_ct(relpath, shared_data, tmp_path, capsys):
    src = shared_data(relpath)
    out = tmp_path / "labels.nrrd"
    report = tmp_path / "report.json"
    code = main(["segment", str(src), "-o", str(out), "--fast", "--report", str(report)])
    _, err = capsys.readouterr()
    assert code == 0, err
    ref = read_volume(src)
    img = sitk.ReadImage(str(out))
    assert img.GetSize() == ref.shape_ijk
    assert np.allclose(img.GetSpacing(), ref.spacing, atol=1e-6)
    assert np.allclose(img.GetOrigin(), ref.origin, atol=1e-5)
    assert np.allclose(np.reshape(img.GetDirection(), (3, 3)), ref.direction, atol=1e-6)
    assert json.loads(report.read_text())["input"] == str(src)
