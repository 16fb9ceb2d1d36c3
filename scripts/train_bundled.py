"""Reproduce the bundled 'phantom-small' models with the training recipe.

    .venv/bin/python scripts/train_bundled.py [--work bundled-run] [--data ../shared/data] [--install]

1. Writes 60 training phantoms (seeds 1000-1059) and 4 validation phantoms (1900-1903), a split
   (train: the phantoms + the real lits-117-128cube; validation: the real, held-out 3D-IRCADb 1.1 +
   the 4 phantoms), then trains both stages side by side with the ``small`` config, one CPU thread
   each, in ``WORK/run``.
2. Fine-tunes that tumor stage in ``WORK/cascade`` on samples built around the liver that step 1's
   liver model predicts (``--liver-model``: the masks inference hands stage 2), with 40 more
   phantoms (1060-1099): the ``small`` recipe at Adam 2e-4 for 25 epochs, validated every 5.
   Stage 1 runs unmirrored here (``--no-liver-tta``), as it did when the bundled model was
   trained; ``train``'s default now mirrors it, as ``segment`` does.
3. Continues that fine-tune in ``WORK/cascade2`` (same data, split and masks): ``--init`` from step
   2's tumor model, Adam 1e-4, 30 more epochs (the validation Dice was still rising at step 2's end).
4. Continues step 3's tumor model in ``WORK/cascade3`` on the recipe as it stands since: samples
   built around stage 1's *mirrored* liver (``train``'s default, as ``segment`` runs) and the
   label-zoom fix; same data and split, Adam 1e-4, 40 epochs, validated every 5.
5. Averages the tumor models of steps 3 and 4 weight by weight into ``WORK/average/tumor.ltsm``
   (``modelfile.average_models``): chosen on tuning phantoms with a rule set beforehand
   (BENCHMARKS.md, "averaged weight by weight").

``--install`` copies step 1's liver model and step 5's tumor model into the package's weights
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
from LiverTumorSegLib.modelfile import average_models, read_card, update_card
from LiverTumorSegLib.phantom import write_cases
from LiverTumorSegLib.registry import WEIGHTS_DIR
from LiverTumorSegLib.trainconfig import load_config

TRAIN_SEEDS = range(1000, 1060)
FINETUNE_SEEDS = range(1060, 1100)
VAL_SEEDS = range(1900, 1904)
REAL_TRAIN, REAL_VAL = "lits-117-128cube", "ircad-1.1"
NOT_CLINICAL = "Research and demonstration only. NOT FOR CLINICAL USE."
SELECTION = ("3D-IRCADb 1.1 (real) and 4 phantoms were used to pick the best epoch, and 3D-IRCADb 1.1 was a condition of "
             "every later adoption rule: its figure is not an independent estimate.")
INTENDED_USE = {
    "liver": f"{NOT_CLINICAL} Trained on 60 synthetic phantoms and one real CT (LiTS case 117 as cropped to 128^3 by "
             f"its packager, spacing unknown). {SELECTION}",
    "tumor": f"{NOT_CLINICAL} Trained on 60 synthetic phantoms and one real CT (LiTS case 117, cropped), then fine-tuned "
             f"twice on 100 synthetic phantoms and that CT around the liver stage 1 predicts; the mean, weight by weight, "
             f"of that model and of its continuation around stage 1's mirrored prediction. {SELECTION}",
}
REPRODUCE = ("scripts/train_bundled.py --install in the LiverTumorSeg repository: four runs (liver and tumor from "
             "scratch, then three tumor fine-tunes) and the weight average of the last two tumor models; the tumor "
             "card's 'command' and 'seconds' are those of the last fine-tune, 'averaged_from' names both")


def cascade_config() -> dict:
    """Step 2's recipe: ``small`` at a fine-tuning learning rate, 25 epochs."""
    config = load_config("small")
    return {**config, "description": "Fine-tuning of the tumor stage on samples built around stage 1's predicted liver: "
                                     "the small recipe at Adam 2e-4, 25 epochs, validation every 5.",
            "epochs": 25, "val_every": 5, "optimizer": {**config["optimizer"], "lr": 2e-4}}


def continuation_config() -> dict:
    """Step 3's recipe: step 2's, from its model, at Adam 1e-4 for 30 more epochs."""
    config = cascade_config()
    return {**config, "description": "Continuation of the cascade fine-tune of the tumor stage (predicted livers): "
                                     "Adam 1e-4, 30 more epochs.",
            "epochs": 30, "optimizer": {**config["optimizer"], "lr": 1e-4}}


def mirrored_continuation_config() -> dict:
    """Step 4's recipe: step 3's, 40 epochs, around stage 1's mirrored liver (train's default)."""
    return {**continuation_config(), "epochs": 40,
            "description": "Continuation of the tumor stage with the current recipe (nearest-exact label zoom, stage-1 "
                           "livers predicted mirrored), 100 phantoms + LiTS 117, Adam 1e-4, 40 epochs."}


def train(cli: Path, stage: str, data: list[Path], split: Path, config: str, out: Path, threads: int, *extra: str):
    cmd = [str(cli), "train", "--stage", stage, *[a for d in data for a in ("--data", str(d))], "--split", str(split),
           "--config", config, "--name", f"phantom-small-{stage}", *extra, "-o", str(out)]
    print(" ".join(cmd), flush=True)
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def describe(path: Path, stage: str) -> None:
    """Say in a bundled card what the model was trained on and how to rebuild it."""
    card = read_card(path)
    update_card(path, intended_use=INTENDED_USE[stage], training={**card["training"], "reproduce": REPRODUCE})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bundled-run"))
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--install", action="store_true", help="copy the trained models into the package")
    args = ap.parse_args(argv)
    phantoms = args.work / "phantoms"
    for seeds in (TRAIN_SEEDS, FINETUNE_SEEDS, VAL_SEEDS):
        if not (phantoms / f"case_{seeds[-1]:04d}_label.nii.gz").exists():
            write_cases(phantoms, len(seeds), seeds[0], overwrite=True)
    data = [phantoms, args.data / REAL_TRAIN, args.data / REAL_VAL]
    val = [REAL_VAL] + [f"case_{s:04d}" for s in VAL_SEEDS]
    split_file = write_split({"train": [f"case_{s:04d}" for s in TRAIN_SEEDS] + [REAL_TRAIN], "val": val, "test": []},
                             args.work / "bundled-split.json", overwrite=True)
    cli = Path(sys.executable).with_name("livertumorseg")
    run, cascade, cascade2, cascade3 = (args.work / name for name in ("run", "cascade", "cascade2", "cascade3"))
    if any(p.wait() for p in [train(cli, stage, data, split_file, "small", run, 1) for stage in ("liver", "tumor")]):
        return 1
    finetune_split = write_split({"train": [f"case_{s:04d}" for s in (*TRAIN_SEEDS, *FINETUNE_SEEDS)] + [REAL_TRAIN],
                                  "val": val, "test": []}, args.work / "cascade-split.json", overwrite=True)
    config_file = args.work / "cascade-config.json"
    config_file.write_text(json.dumps(cascade_config(), indent=1), encoding="utf-8")
    if train(cli, "tumor", data, finetune_split, str(config_file), cascade, 2,
             "--init", str(run / "tumor.ltsm"), "--liver-model", str(run / "liver.ltsm"), "--no-liver-tta").wait():
        return 1
    config_file = args.work / "cascade2-config.json"
    config_file.write_text(json.dumps(continuation_config(), indent=1), encoding="utf-8")
    if train(cli, "tumor", data, finetune_split, str(config_file), cascade2, 2,
             "--init", str(cascade / "tumor.ltsm"), "--liver-model", str(run / "liver.ltsm"), "--no-liver-tta").wait():
        return 1
    config_file = args.work / "cascade3-config.json"
    config_file.write_text(json.dumps(mirrored_continuation_config(), indent=1), encoding="utf-8")
    if train(cli, "tumor", data, finetune_split, str(config_file), cascade3, 2,
             "--init", str(cascade2 / "tumor.ltsm"), "--liver-model", str(run / "liver.ltsm")).wait():
        return 1
    average = args.work / "average"
    average_models([cascade2 / "tumor.ltsm", cascade3 / "tumor.ltsm"], average / "tumor.ltsm",
                   note="mean of the tumor models of steps 3 and 4 of scripts/train_bundled.py")
    if args.install:
        for stage, folder in (("liver", run), ("tumor", average)):
            target = WEIGHTS_DIR / "phantom-small" / f"{stage}.ltsm"
            shutil.copyfile(folder / f"{stage}.ltsm", target)
            describe(target, stage)
    print(json.dumps({"runs": [str(run), str(cascade), str(cascade2), str(cascade3)], "average": str(average),
                      "installed": args.install}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
