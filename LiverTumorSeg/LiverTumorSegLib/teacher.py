"""``livertumorseg pseudolabel``: label unlabelled CTs with a teacher model (e.g. the imported
pyliverlesionseg networks), writing a data set the training recipe reads (``X_ct.nii.gz`` +
``X_label.nii.gz`` pairs) and a ``pseudo-labels.json`` manifest saying what made the labels.
``train`` copies that manifest into the card of every model trained on the folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import case_name, is_dicom_folder, list_cases
from .errors import InputError, LiverTumorSegError, OutputError
from .imageio import read_volume, write_json, write_labels, write_volume
from .modelfile import load_model
from .pipeline import segment
from .registry import stage_files

MANIFEST = "pseudo-labels.json"


def find_inputs(items) -> list[Path]:
    """CT files and DICOM series folders: those given, and the cases inside other given folders (less
    the ``X_label`` files of ``X_ct`` + ``X_label`` pairs: a labelled folder's labels are no CTs)."""
    found = []
    for item in map(Path, items):
        if item.is_file() or (item.is_dir() and is_dicom_folder(item)):
            found.append(item)
        elif item.is_dir():
            cases = list_cases(item)
            stems = {case_name(p) for p in cases}
            labels = [p for p in cases if case_name(p).endswith("_label") and case_name(p)[:-6] + "_ct" in stems]
            if labels:
                print(f"note: {item} holds {len(labels)} labelled pair(s); their label files are not labelled again",
                      file=sys.stderr)
            found += [p for p in cases if p not in labels]
        else:
            raise InputError(f"Not found: {item}")
    if not found:
        raise InputError("No CT files or DICOM folders to label.")
    return found


def unique_names(inputs: list[Path]) -> list[str]:
    """One output name per input: the file stem, prefixed by its folder's name where stems collide
    (``a/ct.nii.gz`` and ``b/ct.nii.gz`` -> ``a_ct``, ``b_ct``); InputError if still not unique."""
    stems = [case_name(p).removesuffix("_ct") for p in inputs]
    names = [f"{p.parent.name}_{s}" if stems.count(s) > 1 else s for p, s in zip(inputs, stems)]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise InputError(f"Several inputs would be written as {', '.join(clashes)}; label them in separate runs.")
    return names


def run_pseudolabel(args) -> int:
    from tqdm import tqdm

    out = Path(args.out)
    if (out / MANIFEST).exists() and not args.overwrite:
        raise OutputError(f"{out} already holds pseudo-labels; use --overwrite to replace them.")
    liver_file, tumor_file = stage_files(args.model, args.liver_model, args.tumor_model, need_tumor=args.with_tumors)
    liver = load_model(liver_file, stage="liver")
    tumor = load_model(tumor_file, stage="tumor") if args.with_tumors else None  # liver only: stage 1 alone
    inputs = find_inputs(args.inputs)
    names = unique_names(inputs)
    targets = [(out / f"{n}_ct.nii.gz", out / f"{n}_label.nii.gz") for n in names]
    places = {q for p in inputs for q in (p.absolute(), p.absolute().parent, p.resolve(), p.resolve().parent)}
    if out.absolute() in places or out.resolve() in places:
        raise OutputError(f"{out} holds inputs: write the pseudo-labels into another folder (an input could be "
                          "replaced, and a rerun would label its own output).")
    existing = [str(p) for pair in targets for p in pair if p.exists()]
    if existing and not args.overwrite:
        raise OutputError(f"{existing[0]} exists ({len(existing)} file(s) in all); use --overwrite to replace them.")
    ours = {p.name for pair in targets for p in pair}
    others = sorted(p.name for p in out.glob("*_label.nii*") if p.name not in ours) if out.is_dir() else []
    if others:
        raise OutputError(f"{out} holds other pairs ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}) that "
                          "this run's manifest would not describe: use an empty folder.")
    teacher = {m.card["stage"]: {**m.identity(), "citation": m.card.get("citation")} for m in (liver, tumor) if m is not None}
    cases, failed, skipped = [], [], []

    def manifest(complete: bool) -> None:
        """Written before the first pair and after each case: a pair on disk is always described as
        pseudo-labelled, even if the run stops half-way."""
        write_json({
            "pseudo_labels": True,
            "what": "labels made by a model, not by an expert: " + ("liver 1, lesion 2" if args.with_tumors else "liver 1 only"),
            "with_tumors": bool(args.with_tumors),
            "teacher": teacher,
            "complete": complete,
            "cases": cases,
            "failed": failed,
            "skipped": skipped,
        }, out / MANIFEST, overwrite=True)

    manifest(False)
    for src, name, (ct_out, label_out) in tqdm(list(zip(inputs, names, targets)), desc="pseudo-labels", unit="case",
                                               disable=None, file=sys.stderr):
        try:
            ct = read_volume(src)
            result = segment(ct, liver, tumor, device=args.device)
        except LiverTumorSegError as err:
            failed.append({"input": str(src), "error": str(err)})
            print(f"error: {src.name}: {err}", file=sys.stderr)
            continue
        if not result.report["liver_found"]:  # empty labels would teach "no liver here"
            skipped.append({"input": str(src), "reason": "the teacher found no liver"})
            print(f"warning: {src.name}: no liver found; left out", file=sys.stderr)
            continue
        labels = result.labels if args.with_tumors else (result.labels > 0).astype("uint8")
        cases.append({"case": name, "source": str(src)})
        manifest(False)  # before the pair: listed, then written
        write_volume(ct, ct_out, overwrite=args.overwrite)
        write_labels(labels, ct, label_out, overwrite=args.overwrite)
    manifest(True)
    print(f"wrote {len(cases)} pseudo-labelled case(s) to {out}" + (f"; {len(failed)} failed" if failed else "")
          + (f"; {len(skipped)} without a liver left out" if skipped else ""))
    return 2 if failed else 0
