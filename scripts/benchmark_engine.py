"""Engine benchmark: network size and speed, two-stage time per stage and peak RAM.

    .venv/bin/python scripts/benchmark_engine.py [--quick] [--json out.json]

Prints a Markdown table (copied into BENCHMARKS.md). Each two-stage run happens in a child
process so that its peak RSS is its own. The paper configuration has no trained weights: its
timings use random weights, stage 2 on the phantom's true liver box (same tile counts as a real
run). Timings are wall-clock on this machine; it is shared and noisy, so rerun before comparing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys, time
import numpy as np
import torch
from LiverTumorSegLib import pipeline
from LiverTumorSegLib.imageio import read_volume, read_labels
from LiverTumorSegLib.modelfile import load_model
from LiverTumorSegLib.orientation import to_canonical
args = json.loads(sys.argv[1])
ct = read_volume(args["ct"])
liver_m, tumor_m = load_model(args["liver"]), load_model(args["tumor"])
out = {"shape": list(ct.array.shape)}
if args["truth_liver"]:
    # random-weight networks: time stage 1 on the volume, stage 2 on the true liver box
    lab = read_labels(args["truth"], ct)
    hu, spacing, ro = to_canonical(ct)
    liver = ro.to_canonical(lab.array) > 0
    t = time.perf_counter()
    img = pipeline.liver_stage_input(hu, spacing, liver_m.card["preprocessing"])
    pipeline.stage_probability(liver_m, img, hu.shape, torch.device("cpu"), args["fast"], 2, None, None)
    out["liver_s"] = time.perf_counter() - t
    t = time.perf_counter()
    img, mask, box = pipeline.tumor_stage_input(hu, liver, spacing, tumor_m.card["preprocessing"])
    pipeline.stage_probability(tumor_m, img, hu[box].shape, torch.device("cpu"), args["fast"], 2, None, None, mask)
    out["tumor_s"] = time.perf_counter() - t
    out["tiles"] = {"liver": pipeline.planned_tiles(liver_m, hu.shape, spacing, args["fast"]),
                    "tumor": pipeline.count_tiles(img.shape, tumor_m.cfg.tile, pipeline.stage_step(tumor_m, args["fast"]))}
else:
    r = pipeline.segment(ct, liver_m, tumor_m, device="cpu", fast=args["fast"])
    out.update(liver_s=r.report["timings"]["liver_s"], tumor_s=r.report["timings"]["tumor_s"], tiles=r.report["tiles"])
out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT " + json.dumps(out))
"""


def phantom_with_slices(seed: int, slices: int, folder: Path) -> tuple[Path, Path]:
    """A 512 x 512 x ``slices`` phantom (0.7 mm in-plane) written as NIfTI."""
    from LiverTumorSegLib.imageio import write_labels, write_volume
    from LiverTumorSegLib.phantom import generate_case

    probe, _ = generate_case(seed, spacing=(6.0, 6.0, 6.0), matrix=64, orientation=False)
    dz = probe.array.shape[0] * 6.0 / slices
    ct, lab = generate_case(seed, spacing=(0.7, 0.7, dz), matrix=512, orientation=False)
    n = ct.array.shape[0]
    sl = slice(0, slices) if n >= slices else slice(None)
    ct_arr, lab_arr = ct.array[sl], lab.array[sl]
    if n < slices:
        import numpy as np

        pad = ((0, slices - n), (0, 0), (0, 0))
        ct_arr, lab_arr = np.pad(ct_arr, pad, mode="edge"), np.pad(lab_arr, pad)
    ct, lab = ct.__class__(ct_arr, ct.spacing, ct.origin, ct.direction), lab.__class__(lab_arr, lab.spacing, lab.origin, lab.direction)
    paths = folder / f"phantom_{slices}_ct.nii.gz", folder / f"phantom_{slices}_label.nii.gz"
    write_volume(ct, paths[0], overwrite=True)
    write_labels(lab.array, lab, paths[1], overwrite=True)
    return paths


def paper_models(folder: Path) -> tuple[Path, Path]:
    """Random-weight paper-configuration models with the paper's resampling (256 in-plane)."""
    from LiverTumorSegLib.modelfile import save_model
    from LiverTumorSegLib.netconfig import PAPER
    from LiverTumorSegLib.network import GUNETRpp

    paths = []
    for stage in ("liver", "tumor"):
        card = {"name": f"paper-random-{stage}", "stage": stage, "labels": ["background", stage], "training": {"data": "none: random weights, timing only"},
                "preprocessing": {"hu_window": [-250, 250], "resample": {"mode": "inplane_size", "size": 256}, "liver_margin_mm": 10.0},
                "inference": {"step": 0.5, "fast_step": 1.0}, "intended_use": "benchmark only"}
        paths.append(save_model(GUNETRpp(PAPER).eval(), card, folder / f"paper_{stage}.ltsm"))
    return tuple(paths)


def run_child(spec: dict, code: Path | None = None) -> dict:
    """Run CHILD on ``spec``; ``code`` is another checkout's LiverTumorSeg folder to measure instead."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(lines[-1][7:])


def ram_run(code: Path | None) -> dict:
    """Small config --fast on a 512x512x500 phantom (seed 12): time and peak RSS."""
    from LiverTumorSegLib.registry import model_files

    liver, tumor = model_files("phantom-small")
    with tempfile.TemporaryDirectory() as tmp:
        ct500, lab500 = phantom_with_slices(12, 500, Path(tmp))
        spec = {"ct": str(ct500), "truth": str(lab500), "liver": str(liver), "tumor": str(tumor), "fast": True, "truth_liver": False}
        r = run_child(spec, code)
    print(f"\n512x512x500 phantom, small --fast ({code or 'this checkout'}): {r['liver_s'] + r['tumor_s']:.1f} s, peak RAM {r['peak_rss_gb']:.2f} GB")
    return r


def tile_latency(cfg, amp, repeats=5) -> float:
    from LiverTumorSegLib.network import GUNETRpp

    net = GUNETRpp(cfg).eval()
    x = torch.rand(1, 1, *cfg.tile)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), ctx:
        net(x)
        net(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    from LiverTumorSegLib.netconfig import PAPER, SMALL
    from LiverTumorSegLib.network import GUNETRpp, count_macs, count_parameters
    from LiverTumorSegLib.registry import model_files

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the paper two-stage runs and the 500-slice RAM run")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ram-only", action="store_true", help="only the 512x512x500 peak-RAM run")
    ap.add_argument("--code", type=Path, help="for --ram-only: the LiverTumorSeg folder of another checkout (before/after)")
    args = ap.parse_args(argv)
    if args.ram_only:
        ram_run(args.code)
        return
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"}
    print(f"# machine: {results['machine']}\n")

    print("| config | params | GMAC / tile | tile | CPU s/tile fp32 | CPU s/tile bf16 |\n|---|---|---|---|---|---|")
    for name, cfg in (("small", SMALL), ("paper", PAPER)):
        net = GUNETRpp(cfg)
        row = {"params_M": count_parameters(net) / 1e6, "gmac": count_macs(net) / 1e9,
               "fp32_s": tile_latency(cfg, False), "bf16_s": tile_latency(cfg, True)}
        results[f"net_{name}"] = row
        print(f"| {name} | {row['params_M']:.2f} M | {row['gmac']:.2f} | {'x'.join(map(str, cfg.tile))} | {row['fp32_s']:.3f} | {row['bf16_s']:.3f} |")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ct200, lab200 = phantom_with_slices(11, 200, tmp)
        liver, tumor = model_files("phantom-small")
        runs = [("small", "normal", str(liver), str(tumor), False, False), ("small", "--fast", str(liver), str(tumor), True, False)]
        if not args.quick:
            pl, pt = paper_models(tmp)
            runs += [("paper (random weights)", "normal", str(pl), str(pt), False, True), ("paper (random weights)", "--fast", str(pl), str(pt), True, True)]
        print("\n| 512x512x200 phantom | mode | stage 1 liver s | stage 2 tumor s | total s | tiles (liver + tumor) | peak RAM GB |\n|---|---|---|---|---|---|---|")
        for cfg_name, mode, lp, tp, fast, truth in runs:
            r = run_child({"ct": str(ct200), "truth": str(lab200), "liver": lp, "tumor": tp, "fast": fast, "truth_liver": truth})
            results[f"two_stage_{cfg_name}_{mode}"] = r
            print(f"| {cfg_name} | {mode} | {r['liver_s']:.1f} | {r['tumor_s']:.1f} | {r['liver_s'] + r['tumor_s']:.1f} | "
                  f"{r['tiles']['liver']} + {r['tiles']['tumor']} | {r['peak_rss_gb']:.2f} |")
    if not args.quick:
        results["ram_512x512x500_small_fast"] = ram_run(None)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
