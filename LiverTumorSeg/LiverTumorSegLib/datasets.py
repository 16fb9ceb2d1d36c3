"""Public liver CT data sets on disk: finding their cases, loading merged labels, fixed splits.

Every reader returns ``Case`` records in a deterministic order; ``load_case`` gives the CT and a
uint8 label map on its grid: 0 background, 1 liver, 2 tumour, 3 cyst.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .imageio import check_ct, read_labels, read_volume, write_json
from .volume import Volume

NIFTI = ("*.nii.gz", "*.nii")
SPLITS = ("train", "val", "test")
LITS_PAPER_TEST = (3, 5, 15, 18, 28, 33, 37, 42, 47, 54, 62, 70, 73, 80, 90, 100, 105, 110, 121, 127)
LITS_CASES = 131
MAX_LABEL = {"lits": 2, "msd": 2, "pairs": 3}  # highest label value allowed in a label file


@dataclass(frozen=True)
class Case:
    """One CT with its reference labels: a label file, an IRCAD masks folder, or None."""

    name: str
    image: Path
    label: Path | None
    kind: str


class LayoutNotFound(InputError):
    """The folder does not have the layout a reader looks for."""


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (case-2 before case-10); names it ties
    (x-1, X-1, x-01) are ordered by the name itself, so every listing, and the splits, are the same
    in every run."""
    return [*(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)), "", text]


def _nifti_files(folder: Path, pattern: str = "*") -> list[Path]:
    """NIfTI files directly in ``folder`` matching ``pattern``, without macOS ``._`` junk."""
    files = {p for suffix in NIFTI for p in folder.glob(pattern + suffix[1:]) if p.is_file()}
    return sorted((p for p in files if not p.name.startswith("._")), key=lambda p: natural_key(p.name))


def _stem(path: Path) -> str:
    """The file name without its image extension (.nii, .nii.gz, .nrrd, .mha, .mhd)."""
    return re.sub(r"\.(nii(\.gz)?|nrrd|mha|mhd)$", "", path.name, flags=re.IGNORECASE)


# ---------------------------------------------------------------- LiTS


def find_lits(root: Path) -> list[Case]:
    """LiTS: ``volume-N.nii[.gz]`` with ``segmentation-N.nii[.gz]`` anywhere below ``root``."""
    root = Path(root)
    volumes = _numbered(root, "volume")
    if not volumes:
        raise LayoutNotFound(f"No LiTS volume-N.nii[.gz] files below '{root}'.")
    labels = _numbered(root, "segmentation")
    return [Case(f"lits-{n}", volumes[n], labels.get(n), "lits") for n in sorted(volumes)]


def _numbered(root: Path, prefix: str) -> dict[int, Path]:
    """``prefix-N.nii[.gz]`` files below ``root`` by N; a number found twice is an error."""
    found: dict[int, Path] = {}
    for path in sorted(root.rglob(f"{prefix}-*.nii*")):
        match = re.fullmatch(rf"{prefix}-(\d+)\.nii(\.gz)?", path.name)
        if not match or not path.is_file():
            continue
        n = int(match.group(1))
        if n in found:
            raise InputError(f"LiTS {prefix} {n} is present twice: '{found[n]}' and '{path}'.")
        found[n] = path
    return found


# ---------------------------------------------------------------- Medical Segmentation Decathlon


def find_msd(root: Path) -> list[Case]:
    """MSD Task03_Liver: ``imagesTr``/``labelsTr``, listed by ``dataset.json`` when present."""
    root = Path(root)
    if not (root / "imagesTr").is_dir() or not (root / "labelsTr").is_dir():
        raise LayoutNotFound(f"No Decathlon imagesTr/ and labelsTr/ folders in '{root}'.")
    manifest = root / "dataset.json"
    pairs = _msd_listed(root, manifest) if manifest.is_file() else _msd_scanned(root)
    if not pairs:
        raise InputError(f"The Decathlon folder '{root}' has no training image with labels.")
    return [Case(_stem(image), image, label, "msd") for image, label in pairs]


def _msd_listed(root: Path, manifest: Path) -> list[tuple[Path, Path]]:
    try:
        training = json.loads(manifest.read_text(encoding="utf-8"))["training"]
        pairs = [(root / item["image"], root / item["label"]) for item in training]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"'{manifest}' is not a Decathlon dataset.json with a 'training' list.") from exc
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise InputError(f"'{manifest}' lists {len(missing)} missing file(s), e.g. '{missing[0]}'.")
    return sorted(pairs, key=lambda pair: natural_key(pair[0].name))


def _msd_scanned(root: Path) -> list[tuple[Path, Path]]:
    pairs = [(image, root / "labelsTr" / image.name) for image in _nifti_files(root / "imagesTr")]
    return [(image, label) for image, label in pairs if label.is_file()]


# ---------------------------------------------------------------- 3D-IRCADb


def find_ircad(root: Path) -> list[Case]:
    """3D-IRCADb patients: ``ct.nii.gz`` + ``masks/`` or ``PATIENT_DICOM/`` + ``MASKS_DICOM/``.

    ``root`` is one patient folder or a folder of them; a case's label is its masks folder.
    """
    root = Path(root)
    folders = [root] if _ircad_parts(root) else sorted(
        (p for p in root.iterdir() if p.is_dir() and _ircad_parts(p)), key=lambda p: natural_key(p.name))
    if not folders:
        zipped = sorted(z.parent for z in (*root.glob("PATIENT_DICOM.zip"), *root.glob("*/PATIENT_DICOM.zip")))
        if zipped:  # the layout as 3D-IRCADb distributes it: each patient's series zipped
            raise InputError(f"3D-IRCADb patient folder(s) with the DICOM still zipped in '{root}' (e.g. "
                             f"'{zipped[0].name}'): unzip PATIENT_DICOM.zip and MASKS_DICOM.zip inside each "
                             "patient folder first (cd 3Dircadb1.1 && unzip PATIENT_DICOM.zip && unzip MASKS_DICOM.zip).")
        raise LayoutNotFound(f"No 3D-IRCADb patient folder (ct.nii.gz + masks/, or PATIENT_DICOM/ + "
                             f"MASKS_DICOM/) in '{root}'.")
    return [Case(folder.name, *_ircad_parts(folder), "ircad") for folder in folders]


def _ircad_parts(folder: Path) -> tuple[Path, Path] | None:
    """(CT, masks folder) of an IRCAD patient folder, or None."""
    for image, masks in (("ct.nii.gz", "masks"), ("PATIENT_DICOM", "MASKS_DICOM")):
        if (folder / image).exists() and (folder / masks).is_dir():
            return folder / image, folder / masks
    return None


def ircad_label_value(structure: str) -> int | None:
    """Our label for an IRCAD mask name: liver 1, liver tumours 2, liver cysts 3, else None."""
    name = re.sub(r"[\s_-]", "", structure.lower())
    if name == "liver":
        return 1
    if name.startswith(("livertumor", "tumor")):
        return 2
    if name.startswith(("liverkyst", "livercyst")):
        return 3
    return None


def _ircad_masks(folder: Path) -> list[tuple[int, Path]]:
    """(label, path) of the liver, tumour and cyst masks: NIfTI files or DICOM sub-folders."""
    entries = [p for p in folder.iterdir() if not p.name.startswith("._")
               and (p.is_dir() or p.name.lower().endswith((".nii", ".nii.gz")))]
    masks = [(ircad_label_value(_stem(p)), p) for p in sorted(entries, key=lambda p: natural_key(p.name))]
    return [(label, path) for label, path in masks if label is not None]


def merge_ircad_masks(folder: Path, ct: Volume) -> Volume:
    """One label map from IRCAD's 0/255 masks: liver 1, then cysts 3, then tumours 2 on top."""
    masks = _ircad_masks(Path(folder))
    if 1 not in {label for label, _ in masks}:
        raise InputError(f"The IRCAD masks folder '{folder}' has no 'liver' mask.")
    labels = np.zeros(ct.array.shape, np.uint8)
    for value in (1, 3, 2):
        for label, path in masks:
            if label == value:
                labels[read_labels(path, ct).array > 0] = value
    return ct.with_array(labels)


# ---------------------------------------------------------------- generic pairs


def find_pairs(root: Path) -> list[Case]:
    """Image/label pairs: ``X_ct.nii[.gz]`` + ``X_label.nii[.gz]``, ``images/X`` + ``labels/X``, or
    one case per folder as ``image.nii[.gz]`` + ``label.nii[.gz]`` (named after the folder)."""
    root = Path(root)
    labels = {_stem(p): p for p in _nifti_files(root, "*_label")}
    pairs = [(ct, labels.get(_stem(ct).removesuffix("_ct") + "_label")) for ct in _nifti_files(root, "*_ct")]
    if (root / "images").is_dir() and (root / "labels").is_dir():
        labels = {_stem(p): p for p in _nifti_files(root / "labels")}
        pairs += [(image, labels.get(_stem(image))) for image in _nifti_files(root / "images")]
    cases = [Case(_stem(image).removesuffix("_ct"), image, label, "pairs") for image, label in pairs if label]
    single = [(image, label) for image in _nifti_files(root, "image") for label in _nifti_files(root, "label")]
    cases += [Case(root.resolve().name, image, label, "pairs") for image, label in single[:1]]
    if not cases:
        raise LayoutNotFound(f"No image/label pairs (X_ct.nii.gz + X_label.nii.gz, images/X.nii.gz + "
                             f"labels/X.nii.gz, or image.nii.gz + label.nii.gz) in '{root}'.")
    return cases


FORMATS = {"lits": find_lits, "msd": find_msd, "ircad": find_ircad, "pairs": find_pairs, "phantom": find_pairs}
AUTO_ORDER = ("msd", "ircad", "lits", "pairs")


def find_cases(root: Path, fmt: str = "auto") -> list[Case]:
    """The cases below ``root`` in format ``fmt`` (one of FORMATS), or the first layout found."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"'{root}' is not a folder.")
    if fmt != "auto":
        if fmt not in FORMATS:
            raise InputError(f"Unknown data set format '{fmt}'; use auto or {', '.join(FORMATS)}.")
        return FORMATS[fmt](root)
    for name in AUTO_ORDER:
        try:
            return FORMATS[name](root)
        except LayoutNotFound:
            continue
    raise InputError(f"No known data set layout ({', '.join(AUTO_ORDER)}) was found in '{root}'.")


def gather_cases(folders, fmt: str = "auto") -> dict[str, Case]:
    """The cases of several data set folders by name; the same name twice is an error."""
    cases: dict[str, Case] = {}
    for folder in folders:
        for case in find_cases(folder, fmt):
            if case.name in cases:
                raise InputError(f"Two data sets have a case named '{case.name}' ({cases[case.name].image} and {case.image}).")
            cases[case.name] = case
    return cases


def load_case(case: Case) -> tuple[Volume, Volume | None]:
    """The CT and its labels on the CT grid (0 bg, 1 liver, 2 tumour, 3 cyst); None without labels.
    The CT must pass ``segment``'s checks (``check_ct``): what inference refuses is not learnt from."""
    ct = read_volume(case.image)
    try:
        check_ct(ct)
    except InputError as err:
        raise InputError(f"Case '{case.name}' ({case.image}): {err}") from None
    if case.label is None:
        return ct, None
    if case.kind == "ircad":
        return ct, merge_ircad_masks(case.label, ct)
    labels = read_labels(case.label, ct)
    top = MAX_LABEL[case.kind]
    if labels.array.size and (labels.array.min() < 0 or labels.array.max() > top):
        raise InputError(f"'{case.label}' has label values outside 0..{top} for a {case.kind} data set.")
    return ct, labels.with_array(labels.array.astype(np.uint8))


# ---------------------------------------------------------------- splits


def make_split(cases, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, list[str]]:
    """Shuffle the case names (sorted first, then numpy ``default_rng(seed)``) into train/val/test.

    ``fractions`` are three shares summing to 1, or three integer counts summing to the number
    of cases; val and test get the rounded shares, train the rest.
    """
    names = _names(cases)
    val, test = _split_counts(len(names), fractions)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    parts = (order[val + test:], order[:val], order[val:val + test])
    return {split: sorted(part, key=natural_key) for split, part in zip(SPLITS, parts)}


def _names(cases) -> list[str]:
    names = [c.name if isinstance(c, Case) else str(c) for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("case names must be unique to split them")
    return sorted(names, key=natural_key)


def _split_counts(n: int, fractions) -> tuple[int, int]:
    """(val, test) sizes from three shares or three counts."""
    if len(fractions) != 3 or min(fractions) < 0:
        raise ValueError("give three non-negative fractions or counts (train, val, test)")
    if all(isinstance(f, (int, np.integer)) for f in fractions):
        if sum(fractions) != n:
            raise ValueError(f"split counts {tuple(fractions)} do not add up to the {n} cases "
                             "(whole numbers are counts; shares are written with a decimal point, e.g. 0.7)")
        return int(fractions[1]), int(fractions[2])
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions {tuple(fractions)} do not add up to 1")
    return round(n * fractions[1]), round(n * fractions[2])


def lits_paper_split(n_val: int = 20, seed: int = 0) -> dict[str, list[str]]:
    """LiTS' 131 training scans: the G-UNETR++ authors' 20 test volumes, ``n_val`` drawn for val."""
    test = [f"lits-{n}" for n in LITS_PAPER_TEST]
    rest = [f"lits-{n}" for n in range(LITS_CASES) if n not in LITS_PAPER_TEST]
    split = make_split(rest, (len(rest) - n_val, n_val, 0), seed)
    split["test"] = test
    return split


LITS_PAPER_SPLIT = lits_paper_split()


def write_split(split: dict[str, list[str]], path, *, overwrite: bool = False) -> Path:
    """Write a split as JSON (atomically; refuses to replace a file unless ``overwrite``)."""
    return write_json({name: list(split[name]) for name in SPLITS}, path, overwrite=overwrite)


def read_split(path) -> dict[str, list[str]]:
    """Read a split written by ``write_split``, checking it names each case once."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        split = {name: [str(c) for c in data[name]] for name in SPLITS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"'{path}' is not a split file with train, val and test lists.") from exc
    names = [c for part in split.values() for c in part]
    if len(set(names)) != len(names):
        raise InputError(f"The split file '{path}' names a case in more than one place.")
    return split
