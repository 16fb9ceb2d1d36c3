"""``livertumorseg train``: the minimal trainer on a folder of CT/label pairs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .errors import InputError
from .imageio import read_labels, read_volume, refuse_existing
from .modelfile import save_model
from .netconfig import CONFIGS
from .overlay import save_loss_curve_png
from .trainer import DEFAULT_PREPROCESSING, TrainConfig, build_sample, make_card, train


def find_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """``*_ct.nii[.gz]`` files with their ``*_label.nii[.gz]`` partners."""
    pairs = []
    for ct in sorted(folder.glob("*_ct.nii*")):
        label = ct.with_name(ct.name.replace("_ct.nii", "_label.nii"))
        if label.exists():
            pairs.append((ct, label))
    if not pairs:
        raise InputError(f"No *_ct.nii.gz / *_label.nii.gz pairs in {folder} (write some with 'livertumorseg phantom').")
    return pairs


def run_train(args) -> int:
    from tqdm import tqdm

    refuse_existing([args.output], args.overwrite)
    pre = DEFAULT_PREPROCESSING[args.stage]
    pairs = find_pairs(args.data)
    samples = []
    for ct_path, label_path in tqdm(pairs, desc="preparing", disable=None, file=sys.stderr):
        ct = read_volume(ct_path)
        samples.append(build_sample(ct, read_labels(label_path, ct), args.stage, pre))
    cfg = TrainConfig(stage=args.stage, net=CONFIGS[args.config], preprocessing=pre, steps=args.steps, batch=args.batch, lr=args.lr)
    bar = tqdm(total=args.steps, desc=f"training {args.stage}", disable=None, file=sys.stderr)

    def progress(step, steps, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    t0 = time.perf_counter()
    try:
        net = train(samples, cfg, progress=progress)
    finally:
        bar.close()
    data = f"{len(pairs)} CT/label pairs from {args.data.name}"
    card = make_card(f"{args.output.stem}-{args.stage}", cfg, data, time.perf_counter() - t0, "livertumorseg " + " ".join(sys.argv[1:]))
    save_model(net, card, args.output)
    curve = save_loss_curve_png({args.stage: cfg.history}, args.output.with_suffix(".loss.png"), f"{card['name']} training loss")
    print(f"wrote {args.output} and {curve} (final loss {cfg.history[-1]['loss']:.4f})")
    return 0
