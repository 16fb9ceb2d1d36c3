"""``livertumorseg models import pyliverlesionseg``: the KU Leuven liver and lesion networks from
PyPI (pyliverlesionseg 0.3, Apache-2.0) as LiverTumorSeg model files, in the user's model folder.

The wheel is fetched with pip (pure download, no install), its sha256 and the two Keras HDF5
files' sha256 are checked, the weights are read with h5py and loaded layer by layer into the
PyTorch port (``kulunet``), and each network is written as a model file with a full card.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import InputError, ModelFileError
from .kulunet import CONFIGS, KULUNet, load_keras_weights

PACKAGE, VERSION = "pyliverlesionseg", "0.3"
WHEEL = "pyliverlesionseg-0.3-py3-none-any.whl"
WHEEL_SHA256 = "ffe1576aefff5922ea8d1cfa2c50864cda97798798559542b9517689fd290cb8"
MEMBERS = {  # stage -> (network, file in the wheel, sha256 as in the wheel's RECORD)
    "liver": ("liver", "pyliverlesionseg/trained_models/model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_3mm_"
              "20201011_dice_loss_val_binary_dice_mean.hdf5",
              "591ea17ca58630bc5c972d58e8600068c46a4d56a5ca45af52c1c1277a41c662"),
    "tumor": ("lesion", "pyliverlesionseg/trained_models/model_unet_ct_mr_lesion_seg_resize_1mm_1mm_3mm_"
              "20220207_dice_loss_val_binary_dice_mean.hdf5",
              "0dc9bc877a99c8afde00a078f122ae386136ed6eae1f157220317106e4f10e04"),
}
CITATION = [  # as the package's metadata gives it
    "Robben, D., Bertels, J., Willems, S., Vandermeulen, D., Maes, F., Suetens, P. (2018). DeepVoxNet: voxel-wise "
    "prediction for 3D images. Report No. KUL/ESAT/PSI/1801.",
    "Tang, X. et al. Whole liver segmentation based on deep learning and manual adjustment for clinical use in SIRT, "
    "European journal of nuclear medicine and molecular imaging, 47, 2020, "
    "https://link.springer.com/article/10.1007/s00259-020-04800-3",
]
IMPORTED_NAME = f"{PACKAGE}-{VERSION}"
MEASURED = {  # by LiverTumorSeg: scripts/measure_imported.py, 2-core x86-64 CPU, 2 threads, idle, 2026-11-23
    "ircad_1_1": {"liver_dice": 0.9654, "tumor_dice": 0.8913,
                  "tumor_detection": {"truth_lesions": 7, "detected": 6, "false_positives": 0},
                  "seconds": {"liver": 17.9, "lesions": 147.1, "abdomen_box": 4.3}, "threads": 2,
                  "note": "3D-IRCADb-01 patient 1.1 (expert masks) is also a LiTS volume; the package does not name "
                          "its training data, so it may have seen this case."},
}


def user_model_dir() -> Path:
    """Where imported models live: $LIVERTUMORSEG_HOME/models, else ~/.livertumorseg/models."""
    home = os.environ.get("LIVERTUMORSEG_HOME")
    return (Path(home) if home else Path.home() / ".livertumorseg") / "models"


def imported_folder() -> Path:
    return user_model_dir() / IMPORTED_NAME


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_wheel(folder: Path) -> Path:
    """pip download of the wheel (no dependencies, no install); a clear error when offline."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.6",
           f"{PACKAGE}=={VERSION}", "-d", str(folder), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = folder / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelFileError(f"Could not download {PACKAGE} {VERSION} from PyPI (offline, or no access to the "
                             f"package index?): {last[0]}. Download {WHEEL} elsewhere and pass it with --wheel.")
    return wheel


def read_keras_file(data: bytes) -> tuple[dict, list[float]]:
    """The Conv3D weights ({"conv3d_N": (kernel, bias)}) and header/voxel_size of a Keras weight file."""
    import h5py

    with h5py.File(io.BytesIO(data), "r") as f:
        layers = {name: (f[name][name]["kernel:0"][()], f[name][name]["bias:0"][()])
                  for name in f.keys() if name.startswith("conv3d_")}
        voxel_size = [float(v) for v in f["header"]["voxel_size"][()]]
    return layers, voxel_size


def _card(stage: str, network: str, member: str, sha: str, voxel_size: list[float]) -> dict:
    from . import __version__

    if stage == "liver":
        pre = {"pipeline": "pyliverlesionseg liver stage (kulpipeline)", "voxel_size_mm": voxel_size,
               "steps": "their CT abdomen box (lung base + 70 mm to hip - 20 mm, the body in x and y, at most "
                        "489 x 408 x 408 mm; the whole image, with a warning, where it finds no landmarks); RAS "
                        "array order; their resampling (pymirc zoom3d) to voxel_size/2, 3-voxel median filter, "
                        "resampling to voxel_size; HU clipped to [-200, 200] -> [-0.5, 0.5]; one 189x162x162 patch centred on "
                        "the box (zeros outside); p > 0.5, erosion, largest 6-connected component, dilation, "
                        "linear resampling back (>= 0.5), zero outside the box"}
    else:
        pre = {"pipeline": "pyliverlesionseg lesion stage (kulpipeline)", "voxel_size_mm": voxel_size,
               "steps": "HU clipped to [-200, 200] -> [-0.5, 0.5] on the CT grid; resampled to voxel_size (pymirc "
                        "zoom3d); the liver mask resampled, > 0.5, dilated once with a 5x5x5 structure (|d|inf <= 2, |d|1 <= 4); "
                        "-0.5 outside it; cropped to it; 180x172x86 tiles (92x84x42 outputs, later tiles "
                        "overwrite earlier ones); p > 0.5, linear resampling back (> 0)"}
    return {
        "name": f"{IMPORTED_NAME}-{network}",
        "version": __version__,
        "stage": stage,
        "labels": ["background", "liver" if stage == "liver" else "lesion"],
        "preprocessing": pre,
        "inference": {"threshold": 0.5},
        "training": {
            "by": "the authors of pyliverlesionseg (KU Leuven); not trained by LiverTumorSeg",
            "data": "CT and MR, as the package states (no dataset named in the package)",
            "source": f"PyPI {PACKAGE}=={VERSION}, {WHEEL} (sha256 {WHEEL_SHA256}), {member} (sha256 {sha})",
            "homepage": "https://github.com/KUL-recon-lab/pyliverlesionseg",
        },
        "authors": "Xikai Tang and Georg Schramm",
        "citation": CITATION,
        "licence": "Apache-2.0 (the package's licence; its copyright line is the unfilled template)",
        "port": "PyTorch reimplementation from the published architecture; weights copied layer by layer with shape checks",
        "metrics": MEASURED,
        "intended_use": "Research only. NOT FOR CLINICAL USE. Imported third-party weights, evaluated by us only as "
                        "the card's metrics say.",
    }


def import_pyliverlesionseg(*, wheel: Path | None = None, folder: Path | None = None) -> tuple[Path, bool]:
    """Import both networks into ``folder`` (default: the user's model folder); (folder, imported now).

    A second call finds valid model files and does nothing.
    """
    from .modelfile import load_model, save_model

    folder = Path(folder or imported_folder())
    files = {stage: folder / f"{stage}.ltsm" for stage in MEMBERS}
    if all(f.is_file() for f in files.values()):
        try:
            for stage, f in files.items():
                load_model(f, stage=stage)
            return folder, False
        except ModelFileError:
            pass  # damaged: import again
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(wheel) if wheel else download_wheel(Path(tmp))
        if not wheel.is_file():
            raise InputError(f"--wheel: {wheel} is not a file (give the downloaded {PACKAGE} {VERSION} wheel).")
        data = wheel.read_bytes()
        if _sha256(data) != WHEEL_SHA256:
            raise ModelFileError(f"{wheel.name} has sha256 {_sha256(data)}, not the {WHEEL_SHA256} of {PACKAGE} {VERSION}.")
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = {stage: z.read(member) for stage, (_, member, _) in MEMBERS.items()}
    for stage, (network, member, sha) in MEMBERS.items():
        if _sha256(members[stage]) != sha:
            raise ModelFileError(f"{member} in the wheel does not have the sha256 its RECORD gives.")
        layers, voxel_size = read_keras_file(members[stage])
        net = KULUNet(CONFIGS[network])
        try:
            load_keras_weights(net, layers)
        except ValueError as err:
            raise ModelFileError(f"{member}: {err}") from None
        save_model(net, _card(stage, network, member, sha, voxel_size), files[stage], dtype=__import__("torch").float32)
    return folder, True
