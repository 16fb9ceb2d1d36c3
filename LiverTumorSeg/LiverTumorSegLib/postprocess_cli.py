"""The ``postprocess`` command: re-run only the post-processing on an existing result (no network)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import InputError, OutputError
from .imageio import check_suffix, refuse_existing


def run_postprocess(args) -> int:
    """Read the CT and labels, apply the post-processing flags, write labels, table and plots."""
    from .cli import output_kind, post_params
    from .imageio import check_ct, read_labels, read_volume, write_labels, write_seg_nrrd, write_text
    from .postprocess import PostProcessor, table_csv

    params = post_params(args)
    if args.min_peak and not args.probabilities:  # the default gate simply finds no peaks in labels alone
        raise InputError("--min-peak needs the network's probabilities: add --probabilities FILE.npz "
                         "(written by segment --probabilities).")
    kind = output_kind(Path(args.output))
    _refuse_existing(args)
    ct = read_volume(args.ct)
    check_ct(ct)  # the HU fits and the outline levels mean nothing on another kind of image
    labels = read_labels(Path(args.labels), ct, ours=True).array
    if args.probabilities:
        probabilities = _probabilities(Path(args.probabilities), ct)
        # the network's liver as segment had it: post-processing removed "not tissue" regions from it, nothing else
        tumor = probabilities.tumor_full()
        network = (labels > 0) | (tumor >= probabilities.tumor_threshold)
        processor = PostProcessor(ct, network.astype(np.uint8), tumor, probabilities.tumor_threshold)
    else:
        grows = params.dilate_iterations or params.dilate_mode == "3d" or params.refine_outlines
        if (labels >= 2).any() and grows:  # a result post-processed already cannot be told from a network output
            why = "holds cysts (label 3), so it looks post-processed already" if (labels == 3).any() else \
                "is taken as a network output (no --probabilities)"
            logging.warning("%s %s: if it was post-processed already, the dilation and the outline refinement grow its "
                            "lesions again. For segment's result, give --probabilities (segment --probabilities), or the "
                            "network output (segment --no-postprocess).", Path(args.labels).name, why)
        processor = PostProcessor(ct, labels)
    labels, rows = processor.apply(params)
    write = write_seg_nrrd if kind == ".seg.nrrd" else write_labels
    write(labels, ct, args.output, overwrite=args.overwrite)
    if args.table:
        write_text(table_csv(rows), args.table, overwrite=args.overwrite)
    if args.plots:
        _save_plots(processor, rows, Path(args.plots), params)
    _print_summary(rows, labels, float(np.prod(ct.spacing)) / 1000.0)
    return 0


def _probabilities(path: Path, ct):
    """The network output ``segment --probabilities`` wrote, checked against the CT's grid (its size,
    and its spacing, origin and direction where the file holds them)."""
    import zipfile

    from .pipeline import Probabilities

    if not path.is_file():
        raise InputError(f"--probabilities: {path} not found.")
    try:
        probabilities = Probabilities.load(path)
        if not probabilities.liver.dtype == probabilities.tumor.dtype == np.uint8:  # NaN or float maps: not ours
            raise ValueError(f"maps of {probabilities.liver.dtype} and {probabilities.tumor.dtype}, not uint8 (0-255)")
        if probabilities.tumor.shape != tuple(s.stop - s.start for s in probabilities.box):
            raise ValueError(f"tumor map {probabilities.tumor.shape} does not fill its box")
        if not 1 <= probabilities.tumor_threshold <= 255:
            raise ValueError(f"cut-off {probabilities.tumor_threshold} is not 1-255")
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as err:
        raise InputError(f"--probabilities: {path} is not a probability file written by segment --probabilities ({err}).") from err
    if difference := probabilities.grid_difference(ct):
        raise InputError(f"--probabilities: {path.name} was written for another grid than the CT's ({difference}, "
                         "the file's first): use the file segment wrote for this CT.")
    return probabilities


def _refuse_existing(args) -> None:
    """Refuse, before any work, outputs that exist (plots: any region_*.png in the folder) without
    --overwrite, and, even with it, an output that is one of the inputs."""
    inputs = {Path(p).resolve() for p in (args.ct, args.labels, args.probabilities) if p}
    if any(Path(p).resolve() in inputs for p in (args.output, args.table) if p):
        raise OutputError("An output would replace one of the inputs (--ct, --labels, --probabilities): "
                          "choose another output name.")
    if args.plots and Path(args.plots).exists() and not Path(args.plots).is_dir():
        raise OutputError(f"--plots must name a folder; {args.plots} is a file.")
    check_suffix(args.table, ".csv", "--table")
    plots = sorted(Path(args.plots).glob("region_*.png")) if args.plots and Path(args.plots).is_dir() else []
    refuse_existing([args.output, args.table, *plots], args.overwrite)
    if args.plots:  # a folder that cannot be written is refused before the labels are
        refuse_existing([Path(args.plots) / "region_1.png"], overwrite=True)


def _save_plots(processor, rows: list[dict], folder: Path, params) -> None:
    from .postprocess import save_region_histogram_png

    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        save_region_histogram_png(processor, row["id"], folder / f"region_{row['id']}.png", params, row)


def _print_summary(rows: list[dict], labels: np.ndarray, voxel_ml: float) -> None:
    """A line per region, then the totals of the labels written (after dilation and outline refinement)."""
    for r in rows:
        outline = f"; outline +{r['refined_ml']:.2f} mL ({r['outline']})" if r["refined_ml"] else ""
        what = "median" if str(r["fit_quality"]).startswith("fallback") else "mean"
        print(f"region {r['id']}: {r['volume_ml']:.2f} mL, {what} {r['fit_M']:.1f} HU -> {r['decision']} ({r['reason']}){outline}")
    ml = {d: int((labels == label).sum()) * voxel_ml for d, label in (("tumor", 2), ("cyst", 3))}
    counts = {d: sum(r["decision"] == d for r in rows) for d in ("tumor", "cyst")}
    print(f"total: {len(rows)} regions; {counts['tumor']} tumor ({ml['tumor']:.2f} mL), {counts['cyst']} cyst ({ml['cyst']:.2f} mL)")
