"""Post-processing speed on a synthetic 512x512x300 CT with 20 lesions (prints figures, no asserts).

    OMP_NUM_THREADS=1 PYTHONPATH=LiverTumorSeg python scripts/benchmark_postprocess.py [--no-refine-outlines]

Liver ellipsoid ~100 HU, 10 tumors ~90 HU and 10 cysts ~25 HU (spheres), Gaussian noise 15 HU.
Times PostProcessor construction (components), the first apply() (fits included), then the
median of 20 parameter changes (threshold and dilation moves) served from the cache. The outline
refinement is on, as by default; ``--no-refine-outlines`` times the post-processing without it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from LiverTumorSegLib.postprocess import PostParams, PostProcessor
from LiverTumorSegLib.volume import Volume

SHAPE = (300, 512, 512)


def synthetic_case(seed: int = 0) -> tuple[Volume, np.ndarray]:
    """CT (int16) and labels (liver 1, lesions 2) of the benchmark volume."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(-100, 15, SHAPE).astype(np.int16)
    labels = np.zeros(SHAPE, np.uint8)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    liver = ((z - 150) / 120.0) ** 2 + ((y - 256) / 180.0) ** 2 + ((x - 256) / 200.0) ** 2 <= 1
    labels[liver] = 1
    ct[liver] += 200
    for n in range(20):
        r = rng.uniform(4, 15)
        c = (rng.uniform(80, 220), 256 + rng.uniform(-100, 100), 256 + rng.uniform(-110, 110))
        box = tuple(slice(int(ci - r) - 1, int(ci + r) + 2) for ci in c)
        zz, yy, xx = np.ogrid[box]
        ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
        labels[box][ball] = 2
        ct[box][ball] += -10 if n % 2 else -75  # tumors ~90 HU, cysts ~25 HU
    return Volume(ct, (0.8, 0.8, 1.5)), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-refine-outlines", action="store_true", help="time the post-processing without the outline refinement")
    refine = not ap.parse_args().no_refine_outlines
    ct, labels = synthetic_case()
    start = time.perf_counter()
    processor = PostProcessor(ct, labels)
    built = time.perf_counter()
    _, rows = processor.apply(PostParams(refine_outlines=refine))
    first = time.perf_counter()
    changes = [PostParams(cyst_threshold_hu=t, dilate_iterations=i, dilate_max_area_px=a, refine_outlines=refine)
               for t, i, a in zip(np.linspace(20, 80, 20), [0, 1, 2, 3] * 5, [50, 100, 200, 400] * 5)]
    times = []
    for params in changes:
        t0 = time.perf_counter()
        processor.apply(params)
        times.append(time.perf_counter() - t0)
    print(f"volume {SHAPE[::-1]} (i, j, k), regions {len(rows)}, outline refinement {'on' if refine else 'off'}, "
          f"cysts {sum(r['decision'] == 'cyst' for r in rows)}")
    print(f"construction (components, crops): {built - start:.3f} s")
    print(f"first apply (fits, dilation, outlines): {first - built:.3f} s")
    print(f"construction + first apply:       {first - start:.3f} s")
    print(f"parameter change, median of 20:   {1000 * statistics.median(times):.1f} ms "
          f"(max {1000 * max(times):.1f} ms, first visits of new dilation settings included)")
    repeat = []
    for params in changes:
        t0 = time.perf_counter()
        processor.apply(params)
        repeat.append(time.perf_counter() - t0)
    print(f"parameter change, all cached:     {1000 * statistics.median(repeat):.1f} ms (median of 20)")


if __name__ == "__main__":
    main()
