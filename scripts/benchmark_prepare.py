"""Time the preparation of stage-2 training samples with 1 and more worker processes.

    .venv/bin/python scripts/benchmark_prepare.py [--cases 8] [--workers 1 2] [--no-liver-model]

Writes ``--cases`` phantoms (seeds 1000+, as training uses them) to a temporary folder, then builds
their tumor-stage samples with the ``small`` preprocessing, around the bundled liver model's
mirrored prediction (``train --liver-model phantom-small``'s default) unless ``--no-liver-model``,
once per worker count, each into a fresh cache. Prints the seconds and checks that every run wrote
the same arrays.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from LiverTumorSegLib.datasets import gather_cases
from LiverTumorSegLib.modelfile import load_model
from LiverTumorSegLib.phantom import write_cases
from LiverTumorSegLib.registry import model_files
from LiverTumorSegLib.samplecache import prepared_samples
from LiverTumorSegLib.trainconfig import load_config, stage_recipe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-liver-model", action="store_true", help="build around the reference liver instead")
    args = ap.parse_args(argv)
    pre = stage_recipe(load_config("small"), "tumor").preprocessing
    liver = None if args.no_liver_model else load_model(model_files("phantom-small")[0], stage="liver")
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads in the main process")
    with tempfile.TemporaryDirectory() as tmp:
        write_cases(Path(tmp) / "phantoms", args.cases, 1000)
        cases = gather_cases([Path(tmp) / "phantoms"])
        first = None
        for workers in args.workers:
            start = time.perf_counter()
            samples = prepared_samples(sorted(cases), cases, "tumor", pre, Path(tmp) / f"cache{workers}", build=True,
                                       liver_model=liver, workers=workers)
            seconds = time.perf_counter() - start
            arrays = [np.asarray(getattr(s, a)) for s in samples for a in ("image", "target", "mask")]
            same = first is None or all(np.array_equal(x, y) for x, y in zip(first, arrays))
            first = first or arrays
            print(f"{workers} worker(s): {seconds:.1f} s for {args.cases} cases ({seconds / args.cases:.1f} s per case)"
                  f"{'' if same else '  OUTPUT DIFFERS from the first run'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
