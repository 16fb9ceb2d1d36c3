"""Output segments: label values, names, colours and DICOM (SNOMED CT) terminology.

Terminology strings use 3D Slicer's ``TerminologyEntry`` format::

    context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier

where each code is ``scheme^value^meaning`` (empty code: ``^^``).
"""

from __future__ import annotations

CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
ALTERED_STRUCTURE = ("SCT", "49755003", "Morphologically Altered Structure")
LIVER = ("SCT", "10200004", "Liver")
NEOPLASM = ("SCT", "108369006", "Neoplasm")
CYST = ("SCT", "367643001", "Cyst")

EMPTY_CODE = ("", "", "")

LABEL_LIVER = 1
LABEL_TUMOR = 2
LABEL_CYST = 3


def terminology_string(category, type_, region=None) -> str:
    """A Slicer terminology entry string for a category, a type and an optional anatomic region."""
    codes = [category, type_, EMPTY_CODE]
    region_part = [ANATOMIC_CONTEXT, "^".join(region or EMPTY_CODE), "^".join(EMPTY_CODE)]
    return "~".join([CATEGORY_CONTEXT, *("^".join(c) for c in codes), *region_part])


SEGMENTS = [
    {
        "id": "liver",
        "name": "Liver",
        "label": LABEL_LIVER,
        "color": (221, 130, 101),
        "terminology": terminology_string(ANATOMICAL_STRUCTURE, LIVER),
    },
    {
        "id": "liver_tumor",
        "name": "Liver tumor",
        "label": LABEL_TUMOR,
        "color": (144, 238, 144),
        "terminology": terminology_string(ALTERED_STRUCTURE, NEOPLASM, LIVER),
    },
    {
        "id": "liver_cyst",
        "name": "Liver cyst",
        "label": LABEL_CYST,
        "color": (205, 205, 100),
        "terminology": terminology_string(ALTERED_STRUCTURE, CYST, LIVER),
    },
]
"""The segments we write, in order; ``color`` is 0-255 RGB, ``label`` the value in our label arrays."""
