"""Time how fast training batches are drawn (patch + augmentation), with and without loader workers.

    .venv/bin/python scripts/benchmark_loader.py [--config paper] [--iterations 20] [--workers 0 2] [--step-ms 0]

Builds the tumor-stage samples of 8 phantoms (seeds 1000+, reference livers) with the config's
preprocessing, then draws ``--iterations`` batches of the config's size and tile as
``StageTrainer.batches`` does, once per loader-worker count. The network does not run:
``--step-ms`` stands in for a GPU's training step (the training process sleeps that long per
batch, the CPU free meanwhile, as while a GPU computes), so the figure shows how much of the data
work the workers hide behind it. Prints batches per second and checks the batches are the same.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from LiverTumorSegLib.datasets import gather_cases
from LiverTumorSegLib.phantom import write_cases
from LiverTumorSegLib.samplecache import prepared_samples
from LiverTumorSegLib.trainconfig import load_config, stage_recipe
from LiverTumorSegLib.trainer import StageTrainer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="paper")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--step-ms", type=float, default=0.0, help="simulated GPU step per batch (CPU idle), in ms")
    args = ap.parse_args(argv)
    config = {**load_config(args.config), "iterations_per_epoch": args.iterations}
    pre = stage_recipe(config, "tumor").preprocessing
    print(f"{os.cpu_count()} CPUs; config {args.config}: batch {config['batch']}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        write_cases(Path(tmp) / "phantoms", 8, 1000)
        cases = gather_cases([Path(tmp) / "phantoms"])
        samples = prepared_samples(sorted(cases), cases, "tumor", pre, Path(tmp) / "cache", build=True)
        first = None
        for workers in args.workers:
            trainer = StageTrainer(config, "tumor", samples, [], Path(tmp) / f"run{workers}", torch.device("cpu"),
                                   loader_workers=workers)
            start = time.perf_counter()
            batches = []
            for x, _ in trainer.batches(0):
                batches.append(x)
                time.sleep(args.step_ms / 1000)
            seconds = time.perf_counter() - start
            same = first is None or all(torch.equal(a, b) for a, b in zip(first, batches))
            first = first or batches
            print(f"{workers} loader worker(s), step {args.step_ms:.0f} ms: {args.iterations / seconds:.2f} batches/s "
                  f"({seconds / args.iterations * 1000:.0f} ms per batch of {config['batch']})"
                  f"{'' if same else '  BATCHES DIFFER from the first run'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
