"""Measure the imported pyliverlesionseg networks on 3D-IRCADb 1.1 (expert masks) and write the
numbers into their model cards.

    .venv/bin/livertumorseg models import pyliverlesionseg
    .venv/bin/python scripts/measure_imported.py [--no-write]

Liver Dice of their liver stage (in their abdomen box: the box, its dome and hip slices); lesion stage (on that liver) against the merged tumors (and
tumors + cyst): Dice and lesion-wise detection; seconds per stage with this machine's threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from LiverTumorSegLib.datasets import find_cases, load_case
from LiverTumorSegLib.kulcrop import abdomen_box
from LiverTumorSegLib.kulpipeline import ras_array, segment_lesions, segment_liver
from LiverTumorSegLib.metrics import dice, lesion_detection
from LiverTumorSegLib.modelfile import load_model, read_card, update_card
from LiverTumorSegLib.registry import model_files

IRCAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ircad-1.1"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    liver_file, tumor_file = model_files("pyliverlesionseg")
    liver, lesion = load_model(liver_file, stage="liver"), load_model(tumor_file, stage="tumor")
    ct, truth = load_case(find_cases(IRCAD, "ircad")[0])
    hu, spacing, _ = ras_array(ct)
    t = time.perf_counter()
    found = abdomen_box(np.flip(hu, (0, 1)), spacing)
    box_seconds = time.perf_counter() - t
    notes: list[str] = []
    t0 = time.perf_counter()
    liver_mask = segment_liver(ct, liver.net, warnings=notes)
    t1 = time.perf_counter()
    lesions = segment_lesions(ct, liver_mask, lesion.net)
    t2 = time.perf_counter()
    detection = lesion_detection(lesions, truth.array == 2)
    result = {
        "ircad_1_1": {
            "liver_dice": round(dice(liver_mask, truth.array >= 1), 4),
            "tumor_dice": round(dice(lesions, truth.array == 2), 4),
            "lesion_dice_tumors_and_cyst": round(dice(lesions, truth.array >= 2), 4),
            "tumor_detection": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in detection.items()},
            "seconds": {"liver": round(t1 - t0, 1), "lesions": round(t2 - t1, 1), "abdomen_box": round(box_seconds, 1)},
            "abdomen_box_lps": [[s.start, s.stop] for s in found.box], "dome_slice": found.dome, "hip_slice": found.hip,
            "warnings": notes,
            "threads": torch.get_num_threads(),
            "note": "3D-IRCADb-01 patient 1.1 is also LiTS training volume 28-47; the package does not name its "
                    "training data, so this case may have been seen in training.",
        }
    }
    print(json.dumps(result, indent=2))
    if not args.no_write:
        for path in (liver_file, tumor_file):
            update_card(path, metrics={**read_card(path).get("metrics", {}), **result})


if __name__ == "__main__":
    main()
