"""``evaluate --model``: segment the cases of a split with a model pair and score the network output
and the post-processed result (default parameters, or the post-processing flags given) against the
reference labels."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from .datasets import gather_cases, load_case, read_split
from .errors import InputError
from .evaluate_cli import NETWORK, POSTPROCESSED, case_rows, gap_row, summarize_structures, summary_markdown
from .modelfile import load_model
from .pipeline import segment
from .postprocess import PostParams, PostProcessor
from .registry import model_files
from .tumorgap import steps_markdown, summarize_steps

TITLES = {NETWORK: "Network output (before post-processing)", POSTPROCESSED: "After post-processing"}


def settings_text(params: PostParams) -> str:
    """'default parameters', or the settings that differ from the defaults."""
    changed = [f"{f.name}={getattr(params, f.name)}" for f in dataclasses.fields(params)
               if getattr(params, f.name) != f.default]
    return ", ".join(changed) if changed else "default parameters"


def split_cases(args, model_dir: Path | None, cases: dict) -> tuple[list[str], str]:
    """Case names to evaluate: a part of --split (or of the model folder's split.json), else every
    labelled case of ``cases``. A part that is empty, or names cases the data lack or has no labels
    for, is refused: scoring fewer cases than the split names would leave failures, or a wrong
    data folder, unseen."""
    split_file = args.split or (model_dir / "split.json" if model_dir and (model_dir / "split.json").is_file() else None)
    if split_file is None:
        return [n for n, c in cases.items() if c.label is not None], "all labelled cases (no split file)"
    names, source = read_split(split_file)[args.part], f"the {args.part} part of {split_file}"
    if not names:
        raise InputError(f"{source[0].upper()}{source[1:]} is empty: no case to evaluate (--part chooses another part).")
    missing = [n for n in names if n not in cases]
    if missing:
        raise InputError(f"{len(missing)} case(s) of {source} are not in --data: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}. Give the data the split was made on.")
    unlabelled = [n for n in names if cases[n].label is None]
    if unlabelled:
        raise InputError(f"{len(unlabelled)} case(s) of {source} have no reference labels: {', '.join(unlabelled[:5])}"
                         f"{' ...' if len(unlabelled) > 5 else ''}.")
    return names, source


def evaluate_model(args) -> tuple[list[dict], list[dict], dict, str]:
    """Rows (one per case, output and structure), tumor-gap rows (one per case, post-processed),
    summaries by output, and the Markdown report."""
    from tqdm import tqdm

    from .cli import post_params

    if not args.data:
        raise InputError("evaluate --model needs --data: the labelled cases to segment and score.")
    params = post_params(args)
    liver_file, tumor_file = model_files(args.model)
    liver, tumor = load_model(liver_file, stage="liver"), load_model(tumor_file, stage="tumor")
    cases = gather_cases(args.data, args.format)
    model_dir = Path(args.model) if Path(args.model).is_dir() else None
    names, source = split_cases(args, model_dir, cases)
    rows, gaps = [], []
    for name in tqdm(names, desc="segment + evaluate", unit="case", disable=None, file=sys.stderr):
        ct, truth = load_case(cases[name])
        result = segment(ct, liver, tumor, device=args.device, fast=args.fast, tta=args.tta)
        post, _ = PostProcessor.from_network(ct, result.labels, result.probabilities).apply(params)
        spacing_zyx = ct.spacing[::-1]
        rows += case_rows(name, result.labels, truth.array, spacing_zyx, output=NETWORK)
        rows += case_rows(name, post, truth.array, spacing_zyx, output=POSTPROCESSED)
        gaps.append(gap_row(name, post, truth.array, output=POSTPROCESSED))
    if not rows:
        raise InputError(f"No labelled case to evaluate in {source}.")
    summary = {out: summarize_structures([r for r in rows if r["output"] == out]) for out in TITLES}
    summary["tumor_gap"] = summarize_steps(gaps)
    summary["postprocessing"] = dataclasses.asdict(params)
    titles = dict(TITLES, **{POSTPROCESSED: f"{TITLES[POSTPROCESSED]} ({settings_text(params)})"})
    header = (f"# Evaluation of {liver.card['name']} + {tumor.card['name']}\n\n"
              f"Cases: {source} ({len({r['case'] for r in rows})}). Liver = labels >= 1; tumor = label 2 (the network's lesions "
              "before the filter, tumors after it); lesion = labels 2 or 3.\n\n")
    markdown = (header + "\n".join(summary_markdown(summary[out], titles[out], level=2) for out in TITLES)
                + "\n" + steps_markdown(summary["tumor_gap"]))
    return rows, gaps, summary, markdown
