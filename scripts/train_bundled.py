"""Reproduce the bundled 'phantom-small' models with the training recipe.

    .venv/bin/python scripts/train_bundled.py [--work bundled-run] [--data ../shared/data] [--install]

Writes 60 training phantoms (seeds 1000-1059) and 4 validation phantoms (1900-1903), a split
(train: the phantoms + the real lits-117-128cube; validation: the real, held-out 3D-IRCADb 1.1 +
the 4 phantoms), then trains both stages side by side with the ``small`` config, one CPU thread
each, in ``WORK/run``. ``--install`` copies the two model files into the package's weights
folder; ``scripts/measure_bundled.py`` then measures them on fresh phantoms (seeds 2000+) and
writes the numbers into their cards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from LiverTumorSegLib.datasets import write_split
from LiverTumorSegLib.phantom import write_cases
from LiverTumorSegLib.registry import WEIGHTS_DIR

TRAIN_SEEDS = range(1000, 1060)
VAL_SEEDS = range(1900, 1904)
REAL_TRAIN, REAL_VAL = "lits-117-128cube", "ircad-1.1"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bundled-run"))
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--install", action="store_true", help="copy the trained models into the package")
    args = ap.parse_args(argv)
    phantoms = args.work / "phantoms"
    for seeds in (TRAIN_SEEDS, VAL_SEEDS):
        if not (phantoms / f"case_{seeds[-1]:04d}_label.nii.gz").exists():
            write_cases(phantoms, len(seeds), seeds[0], overwrite=True)
    split = {"train": [f"case_{s:04d}" for s in TRAIN_SEEDS] + [REAL_TRAIN],
             "val": [REAL_VAL] + [f"case_{s:04d}" for s in VAL_SEEDS], "test": []}
    split_file = write_split(split, args.work / "bundled-split.json", overwrite=True)
    cli = Path(sys.executable).with_name("livertumorseg")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for stage in ("liver", "tumor"):
        cmd = [str(cli), "train", "--stage", stage, "--data", str(phantoms), "--data", str(args.data / REAL_TRAIN),
               "--data", str(args.data / REAL_VAL), "--split", str(split_file), "--config", "small",
               "--name", f"phantom-small-{stage}", "-o", str(args.work / "run")]
        print(" ".join(cmd), flush=True)
        runs.append(subprocess.Popen(cmd, env=env))
    if any(run.wait() for run in runs):
        return 1
    if args.install:
        for stage in ("liver", "tumor"):
            shutil.copyfile(args.work / "run" / f"{stage}.ltsm", WEIGHTS_DIR / "phantom-small" / f"{stage}.ltsm")
    print(json.dumps({"run": str(args.work / "run"), "installed": args.install}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
