"""The pyliverlesionseg abdomen box on the real CTs in shared/data and a phantom: our box, dome and
hip slices and time; with --wheel, their own ``crop_ct_image`` (run from the wheel) and its time;
with the imported liver network, the liver volume of HCC_048 in their box, on the whole image,
and in our pipeline (box widened when the liver reaches its lower face).

    .venv/bin/python scripts/measure_abdomen_box.py [--wheel pyliverlesionseg-0.3-py3-none-any.whl] [--liver]
"""

from __future__ import annotations

import argparse
import ast
import time
import zipfile
from pathlib import Path

import numpy as np

from LiverTumorSegLib.imageio import read_volume
from LiverTumorSegLib.kulcrop import abdomen_box
from LiverTumorSegLib.kulpipeline import (centred_patch_probability, liver_input, liver_postprocess, ras_array,
                                          ras_box, segment_liver)
from LiverTumorSegLib.phantom import generate_case

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CTS = {"3D-IRCADb 1.1": "ircad-1.1/ct.nii.gz", "HCC-TACE-Seg HCC_048": "hcc-tace-seg-hcc048/ct.nii.gz",
       "LiTS volume-0": "lits-volume0-ct/ct.nii.gz", "TotalSegmentator example": "totalseg-example/example_ct_sm.nii.gz",
       "LiTS-117 128 cube": "lits-117-128cube/image.nii.gz"}


def their_crop(wheel: Path):
    """Their ``crop_ct_image`` compiled from the wheel (find_objects adapted to SciPy >= 1.11)."""
    from scipy import ndimage, signal

    source = zipfile.ZipFile(wheel).read("pyliverlesionseg/cnn_liver_lesion_seg_CT_MR_functions.py").decode("utf-8")
    func = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "crop_ct_image")
    namespace = {"np": np, "convolve": signal.convolve, "argrelextrema": signal.argrelextrema, "label": ndimage.label,
                 "binary_erosion": ndimage.binary_erosion, "binary_opening": ndimage.binary_opening,
                 "labeled_comprehension": ndimage.labeled_comprehension,
                 "find_objects": lambda a, *rest: ndimage.find_objects(np.asarray(a).astype(np.int32), *rest)}
    exec(compile(ast.Module([func], []), "crop_ct_image", "exec"), namespace)
    return lambda lps, spacing: namespace["crop_ct_image"](  # the arguments their main function passes for CT
        lps, spacing, size_mm_max=[489, 408, 408], tissue_th=-150, lung_th=-600, bone_th=500, bone_hip_ratio=0.7,
        liver_height_max=400, liver_dome_margin_mm=70.0, hip_margin_mm=20.0)


def _span(box) -> str:
    return " / ".join(f"{int(s.start)}-{int(s.stop)}" for s in box)


def liver_ml(volume, net) -> dict:
    """Liver mL: in their box alone, on the whole image, and as our pipeline runs it."""
    hu, spacing, _ = ras_array(volume)
    ml = float(np.prod(spacing)) / 1000

    def in_box(box):
        crop = hu[box]
        return float(liver_postprocess(centred_patch_probability(net, liver_input(crop, spacing, 3.0)), crop.shape).sum()) * ml

    box = ras_box(abdomen_box(np.flip(hu, (0, 1)), spacing).box, hu.shape)
    notes: list[str] = []
    ours = float(segment_liver(volume, net, warnings=notes).sum()) * ml
    return {"their box": round(in_box(box), 1), "whole image": round(in_box((slice(None),) * 3), 1),
            "ours": round(ours, 1), "warnings": notes}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, help="the pyliverlesionseg 0.3 wheel: also run their function")
    ap.add_argument("--liver", action="store_true", help="HCC_048 liver volumes with the imported liver network")
    args = ap.parse_args(argv)
    theirs = their_crop(args.wheel) if args.wheel else None
    volumes = {name: read_volume(DATA / rel) for name, rel in CTS.items() if (DATA / rel).exists()}
    volumes["phantom seed 3000"] = generate_case(3000)[0]
    print("| CT | box x / y / z (LPS) | dome, hip | ours | theirs | equal |")
    print("|---|---|---|---|---|---|")
    for name, volume in volumes.items():
        hu, spacing, _ = ras_array(volume)
        lps = np.ascontiguousarray(np.flip(hu, (0, 1)))
        t = time.perf_counter()
        found = abdomen_box(lps, spacing)
        ours_s = time.perf_counter() - t
        row = f"| {name} {hu.shape} | {_span(found.box)} | {found.dome}, {found.hip} | {ours_s:.1f} s |"
        if theirs:
            t = time.perf_counter()
            box = theirs(lps, spacing)
            row += f" {time.perf_counter() - t:.1f} s | {_span(box) == _span(found.box)} |"
        else:
            row += " | |"
        print(row + (f" fallback: {found.fallback}" if found.fallback else ""), flush=True)
    if args.liver:
        from LiverTumorSegLib.modelfile import load_model
        from LiverTumorSegLib.registry import model_files

        net = load_model(model_files("pyliverlesionseg")[0], stage="liver").net
        print("HCC_048 liver mL:", liver_ml(volumes["HCC-TACE-Seg HCC_048"], net))


if __name__ == "__main__":
    main()
