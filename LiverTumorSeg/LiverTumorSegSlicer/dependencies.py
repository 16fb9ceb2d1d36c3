"""The Python packages the core needs inside Slicer, and how to add them without breaking Slicer.

Slicer ships numpy, SimpleITK and requests; torch comes from the PyTorch extension. pip must never
replace those (the most common way AI extensions break Slicer), so installs run with a
constraints file that pins them to the versions already installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

REQUIREMENTS = {  # import name -> pip requirement (as pyproject.toml)
    "monai": "monai>=1.4",
    "safetensors": "safetensors>=0.4",
    "cc3d": "connected-components-3d>=3.12",
    "slicerio": "slicerio>=1.1",
    "scipy": "scipy>=1.10",
    "tqdm": "tqdm>=4.60",
    "matplotlib": "matplotlib>=3.7",
    "h5py": "h5py>=3.8",
}
PROTECTED = ("numpy", "SimpleITK", "requests", "torch")  # Slicer's own, or the PyTorch extension's
TORCH_MINIMUM = (2, 5)  # as pyproject.toml


def missing() -> list[str]:
    """Requirements whose package cannot be imported; torch is listed as 'torch' when absent or older
    than TORCH_MINIMUM."""
    found = [r for name, r in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]
    if importlib.util.find_spec("torch") is None or _release(_torch_version()) < TORCH_MINIMUM:
        found.insert(0, "torch")
    return found


def _torch_version() -> str:
    """The installed torch's version, without importing it; a build without metadata (on PYTHONPATH) is
    taken as new enough: nothing says otherwise, and importing it here could not be undone."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return ".".join(map(str, TORCH_MINIMUM))


def torch_requirement() -> str:
    """The PyTorch extension's version requirement, e.g. '>=2.5'."""
    return ">=" + ".".join(map(str, TORCH_MINIMUM))


def _release(version: str) -> tuple[int, ...]:
    """Major and minor of a version: '2.4.1+cu121' -> (2, 4)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def constraints_text() -> str:
    """pip constraints that keep every protected package at its installed version."""
    lines = []
    for name in PROTECTED:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def pip_arguments(requirements: list[str], constraints_file: Path) -> list[str]:
    """Arguments for ``pip install`` of the non-torch requirements under the constraints."""
    return [r for r in requirements if r != "torch"] + ["-c", str(constraints_file)]
