"""``livertumorseg pseudolabel``: label unlabelled CTs with a teacher model (e.g. the imported
pyliverlesionseg networks), writing a data set the training recipe reads (``X_ct.nii.gz`` +
``X_label.nii.gz`` pairs) and a ``pseudo-labels.json`` manifest saying what made the labels.
``train`` copies that manifest into the card of every model trained on the folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .datasets import natural_key
from .errors import InputError, LiverTumorSegError, OutputError
from .imageio import read_volume, write_json, write_labels, write_volume
from .modelfile import load_model
from .pipeline import segment
from .registry import stage_files

MANIFEST = "pseudo-labels.json"
CT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def find_inputs(folders) -> list[Path]:
    """CT files (NIfTI, NRRD, MHA) and DICOM series folders directly in the given folders, or the files themselves."""
    found = []
    for item in map(Path, folders):
        if item.is_file():
            found.append(item)
        elif item.is_dir():
            files = [p for p in item.iterdir() if p.is_file() and p.name.lower().endswith(CT_SUFFIXES)]
            dicom = [item] if any(p.suffix.lower() == ".dcm" for p in item.iterdir()) else []
            found += sorted(files, key=lambda p: natural_key(p.name)) + dicom
        else:
            raise InputError(f"Not found: {item}")
    if not found:
        raise InputError("No CT files or DICOM folders to label.")
    return found


def case_name(path: Path) -> str:
    name = path.name
    for suffix in CT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def run_pseudolabel(args) -> int:
    from tqdm import tqdm

    out = Path(args.out)
    if (out / MANIFEST).exists() and not args.overwrite:
        raise OutputError(f"{out} already holds pseudo-labels; use --overwrite to replace them.")
    liver_file, tumor_file = stage_files(args.model, args.liver_model, args.tumor_model)
    liver = load_model(liver_file, stage="liver")
    tumor = load_model(tumor_file, stage="tumor") if args.with_tumors else None  # liver only: stage 1 alone
    inputs = find_inputs(args.inputs)
    cases, failed = [], []
    for src in tqdm(inputs, desc="pseudo-labels", unit="case", disable=None, file=sys.stderr):
        name = case_name(src)
        try:
            ct = read_volume(src)
            result = segment(ct, liver, tumor, device=args.device)
        except LiverTumorSegError as err:
            failed.append({"input": str(src), "error": str(err)})
            print(f"error: {src.name}: {err}", file=sys.stderr)
            continue
        labels = result.labels if args.with_tumors else (result.labels > 0).astype("uint8")
        write_volume(ct, out / f"{name}_ct.nii.gz", overwrite=args.overwrite)
        write_labels(labels, ct, out / f"{name}_label.nii.gz", overwrite=args.overwrite)
        cases.append({"case": name, "source": str(src), "liver_found": result.report["liver_found"]})
    manifest = {
        "pseudo_labels": True,
        "what": "labels made by a model, not by an expert: " + ("liver 1, lesion 2" if args.with_tumors else "liver 1 only"),
        "teacher": {m.card["stage"]: {"name": m.card["name"], "file": m.path.name, "sha256": m.sha256,
                                      "citation": m.card.get("citation")} for m in (liver, tumor) if m is not None},
        "cases": cases,
        "failed": failed,
    }
    write_json(manifest, out / MANIFEST, overwrite=True)
    print(f"wrote {len(cases)} pseudo-labelled case(s) to {out}" + (f"; {len(failed)} failed" if failed else ""))
    return 2 if failed else 0
