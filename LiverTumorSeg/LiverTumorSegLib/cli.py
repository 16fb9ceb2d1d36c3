"""The ``livertumorseg`` command: segment, phantom, train, models."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path

from . import __version__
from .datasets import FORMATS
from .errors import Cancelled, InputError, LiverTumorSegError, OutputError
from .imageio import check_suffix, refuse_existing

LABEL_EXTS = (".nii.gz", ".nii", ".nrrd", ".mha")
INPUT_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def device_arg(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (N a GPU index); ``devices.resolve_device`` checks the GPU."""
    head, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"'{text}' is not auto, cpu, cuda or cuda:N")


def positive_int(text: str) -> int:
    """A whole number above 0."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number above 0")
    return int(text)


def non_negative_int(text: str) -> int:
    """A whole number, 0 or more."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of 0 or more")
    return int(text)


def positive_minutes(text: str) -> float:
    """--time-limit: a number of minutes above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of minutes above 0")
    return value


def extension_of(path: Path, exts) -> str | None:
    name = path.name.lower()
    if name.endswith(".seg.nrrd"):
        return ".seg.nrrd"
    return next((e for e in exts if name.endswith(e)), None)


def case_name(path: Path) -> str:
    ext = extension_of(path, INPUT_EXTS)
    return path.name[: -len(ext)] if ext else path.name


def is_dicom_folder(folder: Path) -> bool:
    from .imageio import dicom_series_ids

    return bool(dicom_series_ids(folder))


def list_cases(folder: Path) -> list[Path]:
    """Image files and DICOM sub-folders of a folder of cases."""
    cases = [p for p in sorted(folder.iterdir()) if p.is_file() and extension_of(p, INPUT_EXTS) and not p.name.endswith(".seg.nrrd")]
    cases += [p for p in sorted(folder.iterdir()) if p.is_dir() and is_dicom_folder(p)]
    return cases


def output_kind(path: Path) -> str:
    ext = extension_of(path, LABEL_EXTS)
    if ext is None:
        raise OutputError(f"Unknown output type '{path.name}': use .seg.nrrd (Slicer segmentation) or a labelmap .nii.gz, .nii, .nrrd or .mha.")
    return ext


def _side_path(output: Path, given, suffix: str, args) -> Path:
    """Where a per-case side output goes: the given name for one case, else beside each output."""
    if not Path(args.input).is_dir() or is_dicom_folder(Path(args.input)):
        return Path(given)
    return output.with_name(case_name(output) + suffix)


def _plan(args) -> list[tuple[Path, Path]]:
    """(input, output) pairs; refuses existing outputs before any work unless --overwrite."""
    src, dst = Path(args.input), Path(args.output)
    if args.no_postprocess and post_flags_given(args):
        raise InputError("--no-postprocess writes the network output as it is: drop the post-processing flags "
                         f"({' '.join(post_flags_given(args))}).")
    if not src.exists():
        raise InputError(f"Input not found: {src}")
    if src.is_dir() and not is_dicom_folder(src):
        cases = list_cases(src)
        if not cases:
            raise InputError(f"{src} holds no DICOM series and no NIfTI/NRRD/MHA images.")
        if dst.exists() and not dst.is_dir():
            raise OutputError(f"For a folder of cases the output must be a folder; {dst} is a file.")
        if not dst.exists() and extension_of(dst, LABEL_EXTS):
            raise OutputError(f"For a folder of cases the output is a folder (one file per case); '{dst.name}' is a "
                              "file name. Give a folder, and --format for the files in it.")
        pairs = [(c, dst / f"{case_name(c)}{args.format}") for c in cases]
    else:
        output_kind(dst)
        pairs = [(src, dst)]
    for given, suffix, what in ((args.table, ".csv", "--table"), (args.probabilities, ".npz", "--probabilities"),
                                (args.report, ".json", "--report")):
        check_suffix(given, suffix, what)
    inputs = {c.resolve() for c, _ in pairs}
    if any(o.resolve() in inputs for _, o in pairs):
        raise OutputError("An output would replace its own input: choose another output folder or format.")
    outputs = [o for _, o in pairs]
    dupes = sorted({o.name for o in outputs if outputs.count(o) > 1})
    if dupes:
        raise InputError(f"Several inputs would write the same output ({', '.join(dupes)}): rename them or split the folder.")
    for given, suffix in ((args.probabilities, "_probabilities.npz"), (args.table, "_regions.csv")):
        if given:
            outputs += [_side_path(o, given, suffix, args) for _, o in pairs]
    if args.report:
        outputs.append(Path(args.report))
    refuse_existing(outputs, args.overwrite)
    return pairs


def post_params(args):
    """PostParams from the shared post-processing flags."""
    from .postprocess import PostParams

    return PostParams(cyst_filter=not args.no_cyst_filter, cyst_threshold_hu=args.cyst_threshold,
                      dilate_iterations=args.dilate_iterations, dilate_max_area_px=args.dilate_max_area,
                      dilate_mode=args.dilate_mode, fit_on_core=not args.fit_whole_region,
                      refine_outlines=not args.no_refine_outlines, refine_max_mm=args.refine_mm,
                      **({} if args.min_peak is None else {"min_peak_probability": args.min_peak}))


def post_flags_given(args) -> list[str]:
    """The post-processing flags written on the command line, defaults included."""
    return list(getattr(args, POST_GIVEN, ()))


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None


def _reach_mm(text: str) -> float:
    from .outline import MAX_REFINE_MM

    value = _number(text)
    if not 0 < value <= MAX_REFINE_MM:
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_REFINE_MM:g}] mm, not {text}")
    return value


def peak_gate(text: str) -> float:
    """``--min-peak``: a probability in [0, 1)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {text}")
    return value


def add_tta_argument(parser: argparse.ArgumentParser) -> None:
    """``--tta`` / ``--no-tta``: test-time mirroring, on by default (chosen on the tuning phantoms and IRCAD)."""
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                        help="test-time mirroring: average each network over in-plane flips (default on; "
                             "--no-tta: 4x less network time)")


POST_GIVEN = "post_flags_written"


class _Noted(argparse.Action):
    """Stores a value (or ``const`` for a switch) and notes the flag as given, even at its default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        setattr(namespace, POST_GIVEN, (*getattr(namespace, POST_GIVEN, ()), option_string))


def add_post_arguments(p: argparse.ArgumentParser, when: str = "") -> None:
    """The post-processing flags shared by segment, postprocess and evaluate (defaults: ``PostParams``)."""
    group = p.add_argument_group("post-processing", f"{when}the post-processing's settings" if when else None)

    def add(*names, switch=False, **kw):
        group.add_argument(*names, action=_Noted, **({"nargs": 0, "const": True, "default": False} if switch else {}), **kw)

    add("--dilate-iterations", type=int, default=2, choices=range(4), metavar="N", help="small-tumor dilation, 0-3 (default 2)")
    add("--dilate-max-area", type=int, default=100, metavar="PX", help="dilate 2-D tumor regions smaller than this, in pixels (default 100)")
    add("--dilate-mode", choices=("slice", "3d"), default="slice",
        help="slice: the paper's per-slice rule (the two flags above; default); 3d: the authors' code, "
             "3-D regions under 80 / 100 voxels of a 256 matrix grown once / twice (ignores the two flags above)")
    add("--cyst-threshold", type=float, default=45.0, metavar="HU", help="fitted mean below this -> Liver cyst (default 45)")
    add("--no-cyst-filter", switch=True, help="keep every lesion as tumor")
    add("--fit-whole-region", switch=True,
        help="fit the HU Gaussian to every voxel of a region (the paper's rule), not to its core "
             "(the region less its one-voxel partial-volume rim; the default)")
    add("--no-refine-outlines", switch=True,
        help="keep the outlines as the network and the dilation left them (default: each tumor and cyst "
             "grows into the liver around it, where the CT is on its side of half-way to the liver's HU)")
    add("--refine-mm", type=_reach_mm, default=3.0, metavar="MM",
        help="how far the outline refinement may grow a region, in mm (default 3, at most 10)")
    add("--min-peak", type=peak_gate, metavar="P",
        help="confidence gate: a lesion region whose highest network probability is below P goes back to "
             "liver (listed in the table; default 0.6; 0: off; at or below the tumor card's cut-off, 0.5 for "
             "the bundled models, it changes nothing). Needs the network's probabilities (segment; postprocess "
             "--probabilities); imported networks give none (every peak is 1)")


PROGRESS_PREFIX = "PROGRESS "


class _Lines:
    """Machine-readable progress for a parent process: ``PROGRESS {"fraction": f, "message": m}`` lines."""

    def __init__(self, desc: str):
        self.desc = desc

    def __call__(self, fraction: float, message: str):
        print(PROGRESS_PREFIX + json.dumps({"case": self.desc, "fraction": round(float(fraction), 4), "message": message}), flush=True)

    def close(self):
        pass


def _progress(desc: str, args):
    return _Lines(desc) if getattr(args, "progress_lines", False) else _Bar(desc)


class _Bar:
    """A tqdm bar on a terminal, silent otherwise."""

    def __init__(self, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=100, desc=desc, unit="%", disable=None, file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def __call__(self, fraction: float, message: str):
        self.bar.n = round(100 * fraction)
        self.bar.set_postfix_str(message, refresh=True)

    def close(self):
        self.bar.close()


def cmd_segment(args) -> int:
    from .devices import resolve_device
    from .imageio import write_json
    from .modelfile import load_model
    from .registry import stage_files

    pairs = _plan(args)
    liver_path, tumor_path = stage_files(args.model, args.liver_model, args.tumor_model)
    dev = resolve_device(args.device)
    liver, tumor = load_model(liver_path, stage="liver", device=dev), load_model(tumor_path, stage="tumor", device=dev)
    reports, failed = [], 0
    for src, dst in pairs:
        try:
            reports.append(_segment_one(src, dst, liver, tumor, dev, args))
        except Exception as err:  # noqa: BLE001 - one bad case must not stop a batch
            if len(pairs) == 1:
                raise
            failed += 1
            if not isinstance(err, LiverTumorSegError):
                err = f"unexpected failure: {type(err).__name__}: {err}"
            print(f"error: {src.name}: {err}", file=sys.stderr)
            reports.append({"input": str(src), "error": str(err)})
    if args.report:
        write_json(reports[0] if len(reports) == 1 else reports, args.report, overwrite=args.overwrite)
    if failed:
        print(f"{failed} of {len(pairs)} cases failed; the others were written.", file=sys.stderr)
        return 2
    return 0


def _segment_one(src: Path, dst: Path, liver, tumor, dev, args) -> dict:
    from .imageio import ct_warnings, read_volume, write_labels, write_seg_nrrd, write_text
    from .pipeline import segment
    from .postprocess import PostProcessor, table_csv

    volume = read_volume(src)
    warnings = ct_warnings(volume)
    for w in warnings:
        logging.warning("%s: %s", src.name, w)
    bar = _progress(case_name(src), args)
    try:
        result = segment(volume, liver, tumor, device=str(dev), fast=args.fast, tta=args.tta, progress=bar)
    finally:
        bar.close()
    labels, rows = result.labels, []
    if not args.no_postprocess:
        labels, rows = PostProcessor.from_network(volume, result.labels, result.probabilities).apply(post_params(args))
    if output_kind(dst) == ".seg.nrrd":
        write_seg_nrrd(labels, volume, dst, overwrite=args.overwrite)
    else:
        write_labels(labels, volume, dst, overwrite=args.overwrite)
    if args.table:
        write_text(table_csv(rows), _side_path(dst, args.table, "_regions.csv", args), overwrite=args.overwrite)
    if args.probabilities:
        result.probabilities.save(_side_path(dst, args.probabilities, "_probabilities.npz", args), overwrite=args.overwrite)
    warnings += result.report["warnings"]
    for w in result.report["warnings"]:
        logging.warning("%s: %s", src.name, w)
    report = dict(result.report, input=str(src), **volume.source, output=str(dst), warnings=warnings, version=__version__,
                  intended_use=liver.card["intended_use"], postprocessing=None if args.no_postprocess else vars(post_params(args)),
                  regions=rows)
    report["voxels"] = dict(report["voxels"], tumor=int((labels == 2).sum()), cyst=int((labels == 3).sum()))
    t, ml = report["timings"], report["voxel_volume_ml"]
    decided = [r["decision"] for r in rows]
    counts = ", ".join(f"{decided.count(d)} {d}" for d in ("tumor", "cyst", "low confidence", "not tissue") if d in decided)
    print(f"{src.name} -> {dst}: liver {report['voxels']['liver'] * ml:.0f} mL, tumor {report['voxels']['tumor'] * ml:.1f} mL, "
          f"cyst {report['voxels']['cyst'] * ml:.1f} mL" + (f" ({len(rows)} regions: {counts})" if rows else "")
          + f" ({t['liver_s']:.1f} s + {t['tumor_s']:.1f} s on {report['device']})")
    return report


def cmd_phantom(args) -> int:
    from .phantom import write_cases

    bar = _Bar("phantoms")
    try:
        pairs = write_cases(args.out, args.cases, args.seed, overwrite=args.overwrite, progress=bar)
    finally:
        bar.close()
    for ct, lab in pairs:
        print(f"{ct}  {lab}")
    return 0


DEMO_SEED = 7  # not among the training seeds (1000+) nor the evaluation seeds (2000+)


def cmd_demo(args) -> int:
    """Segment a phantom (or --ct) with the bundled models and write every output kind."""
    from .devices import resolve_device
    from .imageio import read_volume, refuse_existing_in, write_json, write_labels, write_seg_nrrd, write_text, write_volume
    from .metrics import dice
    from .modelfile import load_model
    from .overlay import save_overlay_png
    from .phantom import generate_case
    from .pipeline import segment
    from .postprocess import PostParams, PostProcessor, table_csv
    from .registry import model_files

    out = Path(args.out)
    names = ["ct.nii.gz", "truth.nii.gz", "segmentation.seg.nrrd", "labels.nii.gz", "regions.csv", "report.json", "overlay.png"]
    refuse_existing_in(out, names, args.overwrite)
    dev = resolve_device(args.device)
    liver_path, tumor_path = model_files(args.model)  # models first: a bad one leaves no half-written demo behind
    liver, tumor = load_model(liver_path, stage="liver", device=dev), load_model(tumor_path, stage="tumor", device=dev)
    truth = None
    if args.ct:
        volume = read_volume(args.ct)
    else:
        volume, truth = generate_case(DEMO_SEED)
    bar = _Bar("demo")
    try:
        result = segment(volume, liver, tumor, device=str(dev), fast=args.fast, tta=args.tta, progress=bar)
    finally:
        bar.close()
    labels, rows = PostProcessor.from_network(volume, result.labels, result.probabilities).apply(PostParams())
    if truth is not None:  # written with the results, so an interrupted demo leaves no CT without them
        write_volume(volume, out / "ct.nii.gz", overwrite=True)
        write_labels(truth.array, truth, out / "truth.nii.gz", overwrite=True)
    write_seg_nrrd(labels, volume, out / "segmentation.seg.nrrd", overwrite=True)
    write_labels(labels, volume, out / "labels.nii.gz", overwrite=True)
    write_text(table_csv(rows), out / "regions.csv", overwrite=True)
    report = dict(result.report, input=str(args.ct or f"phantom seed {DEMO_SEED}"), **volume.source, version=__version__,
                  intended_use=liver.card["intended_use"], regions=rows)
    if truth is not None:
        report["dice_vs_phantom_truth"] = {
            "liver": round(dice(labels > 0, truth.array > 0), 4),
            "lesion": round(dice(labels >= 2, truth.array >= 2), 4),
            "tumor": round(dice(labels == 2, truth.array == 2), 4),
            "cyst": round(dice(labels == 3, truth.array == 3), 4),
        }
    write_json(report, out / "report.json", overwrite=True)
    save_overlay_png(volume, labels, out / "overlay.png", title=f"LiverTumorSeg {'on ' + Path(args.ct).name if args.ct else 'demo phantom'} "
                     f"({liver.card['name']} + {tumor.card['name']}; not for clinical use)")
    if args.ct:  # an earlier phantom demo's CT and truth would sit beside this CT's result as if they were its own
        for stale in (out / "ct.nii.gz", out / "truth.nii.gz"):
            if stale.is_file() and stale.resolve() != Path(args.ct).resolve():
                stale.unlink()
    print(f"wrote {out}/: {', '.join(names if truth is not None else names[2:])}")
    print(json.dumps({k: report[k] for k in ("device", "timings") + (("dice_vs_phantom_truth",) if truth is not None else ())}))
    return 0


def cmd_train(args) -> int:
    from .trainer_cli import run_train

    return run_train(args)


def cmd_compare(args) -> int:
    from .compare import run_compare

    return run_compare(args)


def cmd_pseudolabel(args) -> int:
    from .teacher import run_pseudolabel

    return run_pseudolabel(args)


def cmd_postprocess(args) -> int:
    from .postprocess_cli import run_postprocess

    return run_postprocess(args)


def cmd_evaluate(args) -> int:
    from .evaluate_cli import run_evaluate

    return run_evaluate(args)


def cmd_models(args) -> int:
    from .registry import BUNDLED, IMPORTABLE, model_files, model_summary, peek_card

    if args.action == "import":
        from .importer import import_pyliverlesionseg

        if args.name not in IMPORTABLE:
            raise InputError(f"Nothing to import called '{args.name}'; importable: {', '.join(IMPORTABLE)}.")
        folder, fresh = import_pyliverlesionseg(wheel=args.wheel)
        print(f"{'imported' if fresh else 'already imported'}: {folder} (use --model {args.name}, or "
              f"--liver-model / --tumor-model with the files in it)")
        return 0
    for name, text in {**BUNDLED, **IMPORTABLE}.items():
        print(f"{name}: {text}")
        try:
            print(f"  {model_summary(name)}")
            for f in model_files(name):
                print(f"  {peek_card(f)['stage']}: {f} (all measured figures: the card's 'metrics')")
        except LiverTumorSegError as err:
            print(f"  {'not imported yet' if name in IMPORTABLE else 'not available'}: {err}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livertumorseg", description="Liver and liver-tumor segmentation on CT (G-UNETR++). Not for clinical use.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment the liver and liver tumors in a CT")
    s.add_argument("input", help="NIfTI/NRRD/MHA file, DICOM folder, or a folder of cases")
    s.add_argument("-o", "--output", required=True, help="output .seg.nrrd or labelmap .nii.gz/.nrrd/.mha (a folder for a folder of cases)")
    s.add_argument("--model", default="phantom-small", help="model name (bundled, or imported: pyliverlesionseg) or a folder with liver.ltsm and tumor.ltsm")
    s.add_argument("--liver-model", help="stage 1 from this .ltsm file or model name instead (e.g. pyliverlesionseg)")
    s.add_argument("--tumor-model", help="stage 2 from this .ltsm file or model name instead")
    s.add_argument("--device", default="auto", type=device_arg, metavar="auto|cpu|cuda|cuda:N")
    s.add_argument("--fast", action="store_true", help="fewer tiles (step 1.0) and bf16 where the CPU has it")
    add_tta_argument(s)
    s.add_argument("--report", help="write a JSON report (device, timings, tiles, models)")
    s.add_argument("--probabilities", help="cache the network output (.npz) for later post-processing")
    s.add_argument("--format", default=".seg.nrrd", choices=[".seg.nrrd", *LABEL_EXTS], help="output type for a folder of cases")
    s.add_argument("--table", help="write the region table (CSV: volume, fitted HU Gaussian, decision and why)")
    s.add_argument("--no-postprocess", action="store_true", help="write the thresholded network output as it is")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.add_argument("--progress-lines", action="store_true", help="print progress as 'PROGRESS {json}' lines on stdout (for a parent process)")
    add_post_arguments(s)
    s.set_defaults(func=cmd_segment)

    s = sub.add_parser("postprocess", help="re-run only the post-processing on an existing result (no network)")
    s.add_argument("--ct", required=True, help="the CT (file or DICOM folder)")
    s.add_argument("--labels", required=True, help="labelmap on the CT grid: 1 liver; 2 (and 3 if present) are the candidate lesions")
    s.add_argument("-o", "--output", required=True, help="output .seg.nrrd or labelmap .nii.gz/.nrrd/.mha")
    s.add_argument("--table", help="write the region table (.csv)")
    s.add_argument("--plots", type=Path, help="folder for one HU histogram PNG per region")
    s.add_argument("--probabilities", type=Path,
                   help="the network output segment --probabilities saved for this CT: the lesion candidates and their "
                        "peak probabilities then come from it (as in segment), the labels giving the liver")
    s.add_argument("--overwrite", action="store_true")
    add_post_arguments(s)
    s.set_defaults(func=cmd_postprocess)

    s = sub.add_parser("evaluate", help="score predictions, or a model on a data set, against ground truth (DSC, VOE, RAVD, ASSD, HD95, detection)",
                       description="Either --pred + --truth (label maps), or --model + --data: segment the split's cases "
                                   "and score the network output and the post-processed result.")
    s.add_argument("--pred", type=Path, help="a labelmap/.seg.nrrd or a folder of them")
    s.add_argument("--truth", type=Path, help="a labelmap or a folder of them, matched by case name")
    s.add_argument("--missing-as-empty", action="store_true",
                   help="with --pred/--truth folders: score a truth case without a prediction as an empty prediction "
                        "(Dice 0 for each structure it holds) instead of refusing")
    s.add_argument("--model", help="bundled model name or a folder with liver.ltsm + tumor.ltsm (e.g. a training run folder)")
    s.add_argument("--data", type=Path, action="append", help="with --model: data set folder (repeat for several)")
    s.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="with --model: data set layout")
    s.add_argument("--split", type=Path, help="with --model: split file (default: the model folder's split.json, else all labelled cases; every case of the part must be in --data with labels)")
    s.add_argument("--part", default="test", choices=["train", "val", "test"], help="with --model: which part of the split (default test)")
    s.add_argument("--device", default="auto", type=device_arg, metavar="auto|cpu|cuda|cuda:N")
    s.add_argument("--fast", action="store_true", help="with --model: fewer tiles (step 1.0) and bf16 where the CPU has it")
    add_tta_argument(s)
    s.add_argument("-o", "--out", required=True, type=Path, help="folder for metrics.csv, tumor_gap.csv, summary.md, summary.json and boxplot.png")
    add_post_arguments(s, "with --model: ")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("compare", help="two evaluate folders, paired case by case (difference, bootstrap CI, Wilcoxon p)",
                       description="Compare two evaluations of the same cases (e.g. two models): for each output, "
                                   "structure and metric, the mean per-case difference B - A with its bootstrap 95 %% CI, "
                                   "the Wilcoxon signed-rank p, and how many cases B does better or worse.")
    s.add_argument("a", type=Path, help="evaluate output folder A (the reference)")
    s.add_argument("b", type=Path, help="evaluate output folder B")
    s.add_argument("-o", "--out", required=True, type=Path, help="folder for compare.md, compare.json and compare.png")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("demo", help="segment a phantom (or --ct) and write all outputs and an overlay PNG")
    s.add_argument("-o", "--out", default="demo-output", type=Path)
    s.add_argument("--ct", help="segment this CT instead of a phantom")
    s.add_argument("--model", default="phantom-small")
    s.add_argument("--device", default="auto", type=device_arg, metavar="auto|cpu|cuda|cuda:N")
    s.add_argument("--fast", action="store_true")
    add_tta_argument(s)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("phantom", help="write synthetic CT phantoms with labels (NIfTI)")
    s.add_argument("-o", "--out", required=True, type=Path)
    s.add_argument("--cases", type=positive_int, default=1)
    s.add_argument("--seed", type=non_negative_int, default=0, help="seed of the first case (0 or more)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_phantom)

    s = sub.add_parser("train", help="train one stage (liver or tumor); run under torchrun for several GPUs or nodes",
                       description="Train one stage. The run folder gets split.json, checkpoints, curves and <stage>.ltsm; "
                                   "train both stages into one folder to get a model for segment/evaluate --model.")
    s.add_argument("--stage", choices=["liver", "tumor"], required=True)
    s.add_argument("--data", required=True, type=Path, action="append", help="data set folder (repeat for several)")
    s.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="data set layout (default: detect)")
    s.add_argument("--config", help="small (default), paper, paper-sgd, or a JSON file; on --resume the run's own copy")
    s.add_argument("-o", "--output", required=True, type=Path, help="run folder")
    s.add_argument("--split", type=Path, help="split file (train/val/test case names); default: the run folder's, else a new one")
    s.add_argument("--epochs", type=int, help="override the config's number of epochs")
    s.add_argument("--device", default="auto", type=device_arg, metavar="auto|cpu|cuda|cuda:N")
    s.add_argument("--init", type=Path, help="fine-tune: start from this model file's weights (same network configuration)")
    s.add_argument("--liver-model", help="tumor stage: build each case's sample around this liver model's prediction "
                                         "(model name, folder or .ltsm), as inference will, not the reference liver")
    s.add_argument("--liver-tta", action=argparse.BooleanOptionalAction,
                   help="with --liver-model: predict the liver mirrored, as segment does by default (the "
                        "default here too); --no-liver-tta: unmirrored, as segment --no-tta")
    s.add_argument("--workers", type=positive_int, metavar="N",
                   help="cases prepared at once, in separate processes (default: the CPU count, at most 8, "
                        "from 16 cases up; one where --liver-model runs on a GPU)")
    s.add_argument("--loader-workers", type=int, metavar="N",
                   help="processes drawing and augmenting the next batches while the network trains (same batches; "
                        "default: 4 on a GPU, fewer if the CPUs are shared by more processes; 0 on the CPU)")
    s.add_argument("--name", help="model name in the card (default: <run folder>-<stage>)")
    s.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    s.add_argument("--time-limit", type=positive_minutes, metavar="MINUTES",
                   help="stop after the last epoch that fits in this many minutes (e.g. a job's or a lent GPU's "
                        "time), writing the model and its card; --resume continues")
    s.add_argument("--overwrite", action="store_true", help="start over in a run folder that has this stage")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("pseudolabel", help="label unlabelled CTs with a teacher model, as a data set for train (pseudo-labels)")
    s.add_argument("inputs", nargs="+", help="CT files, or folders of CT files / a DICOM series")
    s.add_argument("-o", "--out", required=True, type=Path, help="folder for X_ct.nii.gz + X_label.nii.gz pairs and pseudo-labels.json")
    s.add_argument("--model", default="pyliverlesionseg", help="teacher: a model name or folder (default: the imported pyliverlesionseg)")
    s.add_argument("--liver-model", help="stage 1 from this file or model name instead")
    s.add_argument("--tumor-model", help="stage 2 from this file or model name instead")
    s.add_argument("--with-tumors", action="store_true", help="also label lesions (default: liver only)")
    s.add_argument("--device", default="auto", type=device_arg, metavar="auto|cpu|cuda|cuda:N")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_pseudolabel)

    s = sub.add_parser("models", help="list the bundled and imported models; 'models import pyliverlesionseg' imports one")
    s.add_argument("action", nargs="?", default="list", choices=["list", "import"])
    s.add_argument("name", nargs="?", help="with import: pyliverlesionseg")
    s.add_argument("--wheel", type=Path, help="with import: a downloaded wheel instead of fetching it from PyPI")
    s.set_defaults(func=cmd_models)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler, ``kill``), handled like Ctrl-C: temporary files are removed."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return args.func(args)
    except Cancelled as err:
        print(f"cancelled: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt as err:
        how, code = ("terminated (SIGTERM)", 143) if isinstance(err, Terminated) else ("cancelled by the user", 130)
        print(f"{how}; outputs already finished are kept, none is half-written.", file=sys.stderr)
        return code
    except LiverTumorSegError as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (RAM). Try --fast, or a machine with more memory.", file=sys.stderr)
        return 3
    except Exception as err:  # noqa: BLE001 - last resort: one line, traceback only with --debug
        if args.debug:
            traceback.print_exc()
        print(f"error: unexpected failure: {type(err).__name__}: {err} (run with --debug for details)", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
