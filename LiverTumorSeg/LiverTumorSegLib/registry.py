"""Bundled models by name, and resolution of ``--model NAME|PATH``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import ModelFileError

WEIGHTS_DIR = Path(__file__).parent / "weights"

BUNDLED = {
    "phantom-small": "Small G-UNETR++ pair trained on synthetic phantoms and one real CT (LiTS 117, cropped). Not for clinical use.",
}
DEFAULT_MODEL = "phantom-small"
IMPORTABLE = {
    "pyliverlesionseg": "KU Leuven whole-liver and liver-lesion U-Nets (pyliverlesionseg 0.3, CT and MR trained, "
                        "Apache-2.0), imported with 'livertumorseg models import pyliverlesionseg'. Not for clinical use.",
}


def model_files(name_or_path: str | Path = DEFAULT_MODEL) -> tuple[Path, Path]:
    """(liver, tumor) model files of a bundled or imported model name, or of a folder holding liver.ltsm + tumor.ltsm."""
    key = str(name_or_path)
    if key in IMPORTABLE:
        from .importer import imported_folder

        folder = imported_folder()
        if not folder.is_dir():
            raise ModelFileError(f"'{key}' is not imported yet: run 'livertumorseg models import {key}' (downloads it once).")
    else:
        folder = WEIGHTS_DIR / key if key in BUNDLED else Path(key)
    if not folder.is_dir():
        names = ", ".join([*BUNDLED, *IMPORTABLE])
        raise ModelFileError(f"Unknown model '{key}': give a model name ({names}) or a folder with liver.ltsm and tumor.ltsm.")
    files = folder / "liver.ltsm", folder / "tumor.ltsm"
    for f in files:
        if not f.is_file():
            raise ModelFileError(f"Model folder {folder} lacks {f.name}.")
    return files


def stage_files(model: str | Path | None = DEFAULT_MODEL, liver: str | Path | None = None,
                tumor: str | Path | None = None, *, need_tumor: bool = True) -> tuple[Path, Path | None]:
    """(liver, tumor) files: the pair of ``model``, with either stage replaced by a model file or by
    that stage of another named model or folder (e.g. the imported liver network with our tumors).
    ``model`` is only looked up for a stage not given; ``need_tumor=False`` leaves stage 2 out (None)."""
    chosen = [liver, tumor if need_tumor else None]
    files: list[Path | None] = [None, None]
    for i, choice in enumerate(chosen):
        if i == 1 and not need_tumor:
            continue
        if choice is None:
            if model is None:
                raise ModelFileError(f"No {('liver', 'tumor')[i]} model: give --model or --{('liver', 'tumor')[i]}-model.")
            files[i] = model_files(model)[i]
        else:
            path = Path(str(choice))
            files[i] = path if path.is_file() else model_files(choice)[i]
    return files[0], files[1]


def peek_card(path: Path) -> dict:
    """A model file's card read from its safetensors header alone (the format's 8-byte length and JSON).
    Not ``safetensors.safe_open``: the Slicer panel calls this before its packages (safetensors and
    torch among them) are installed. Raises ``ModelFileError`` on an unreadable file."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if not 0 < size < 2**24:
                raise ValueError(f"header length {size} is not that of a safetensors file")
            header = json.loads(f.read(size))
        return json.loads(header["__metadata__"]["card"])
    except (OSError, struct.error, ValueError, KeyError, TypeError) as err:
        raise ModelFileError(f"{path} has no readable model card: {err}") from None


def model_summary(name_or_path: str | Path = DEFAULT_MODEL) -> str:
    """What a user must read before using a model: its intended use and the figures its cards hold."""
    liver_file, tumor_file = model_files(name_or_path)
    liver, tumor = peek_card(liver_file), peek_card(tumor_file)
    metrics = {**liver.get("metrics", {}), **tumor.get("metrics", {})}
    phantoms, ircad = metrics.get("fresh_phantoms", {}), metrics.get("ircad_1_1", {})
    figures = []
    if "tumor_after_filter_dice_per_case_mean" in phantoms:
        low, high = phantoms.get("tumor_after_filter_dice_per_case_ci95", (float("nan"),) * 2)
        figures.append(f"{phantoms['cases']} synthetic test phantoms: liver Dice {phantoms['liver_dice_per_case_mean']:.3f}, "
                       f"tumor Dice per case {phantoms['tumor_after_filter_dice_per_case_mean']:.3f} "
                       f"[95 % CI {low:.3f}-{high:.3f}]")
    tumor_dice = ircad.get("tumor_dice_after_filter", ircad.get("tumor_dice"))
    if "liver_dice" in ircad and tumor_dice is not None:
        figures.append(f"one real CT (3D-IRCADb 1.1): liver {ircad['liver_dice']:.3f}, tumor {tumor_dice:.3f}")
    measured = "Measured: " + "; ".join(figures) + "." if figures else "Its cards hold no measured figures."
    return f"{tumor.get('intended_use', liver.get('intended_use', 'NOT FOR CLINICAL USE.'))} {measured}"
