"""`segment` on every real CT in shared/data (NIfTI and DICOM): runs, output on the input's grid.

These files are never copied into the repository; tests skip without them and fail under CI=true.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.cli import main
from LiverTumorSegLib.imageio import read_volume
from conftest import REAL_CTS



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
    written = json.loads(report.read_text(encoding="utf-8"))
    assert written["input"] == str(src)
    if src.is_dir():  # a DICOM folder: the report says which series it read
        assert written["dicom_series_uid"] == ref.source["dicom_series_uid"] and written["dicom_files"] == img.GetSize()[2]
    else:
        assert "dicom_series_uid" not in written
