"""Train the bundled 'phantom-small' models (liver and tumor stages) on synthetic phantoms.

    python scripts/train_bundled.py --stage liver --cases 40 --steps 3000 -o LiverTumorSeg/LiverTumorSegLib/weights/phantom-small

Training seeds are 1000..1000+cases-1; evaluation uses other seeds (scripts/measure_bundled.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from LiverTumorSegLib.modelfile import save_model
from LiverTumorSegLib.netconfig import SMALL
from LiverTumorSegLib.phantom import generate_case
from LiverTumorSegLib.trainer import DEFAULT_PREPROCESSING, TrainConfig, build_sample, make_card, train

TRAIN_SEED0 = 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["liver", "tumor"], required=True)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pre = DEFAULT_PREPROCESSING[args.stage]
    samples = []
    for seed in tqdm(range(TRAIN_SEED0, TRAIN_SEED0 + args.cases), desc="phantoms", file=sys.stdout):
        ct, lab = generate_case(seed)
        samples.append(build_sample(ct, lab, args.stage, pre))
    cfg = TrainConfig(stage=args.stage, net=SMALL, preprocessing=pre, steps=args.steps, batch=args.batch, lr=args.lr,
                      fg_fraction=0.5 if args.stage == "liver" else 0.67)
    command = "python scripts/train_bundled.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    out = args.out / f"{args.stage}.ltsm"

    def save(net, step):
        data = f"{args.cases} synthetic phantoms (seeds {TRAIN_SEED0}-{TRAIN_SEED0 + args.cases - 1}); no real CT"
        save_model(net, make_card(f"phantom-small-{args.stage}", cfg, data, time.perf_counter() - t0, command), out)
        print(f"step {step}: saved {out}; loss {cfg.history[-1]['loss']:.4f}", flush=True)

    net = train(samples, cfg, checkpoint=save, checkpoint_every=250)
    save(net, cfg.steps)
    print(json.dumps(cfg.history[-3:]))


if __name__ == "__main__":
    main()
