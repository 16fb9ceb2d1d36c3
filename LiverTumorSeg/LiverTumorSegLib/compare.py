"""``livertumorseg compare``: two evaluations of the same cases, paired case by case.

Two ``evaluate`` output folders (their ``metrics.csv``) are matched on (output, structure, case).
For each metric: the mean of B - A over the cases both scored, a percentile-bootstrap 95 % CI of
that mean (``metrics.mean_ci``), the two-sided Wilcoxon signed-rank p (scipy; zero differences
dropped, as Wilcoxon did), and how many cases B does better, worse or the same. A case that is
not finite in either (e.g. HD95 with an empty mask) is left out of that metric, and counted.
An evaluation of label maps (``--pred``, no output column) pairs with each output of a ``--model``
one (network, post-processed): e.g. another tool's segmentations against ours. Below
``MIN_CASES`` paired cases no verdict is given: a bootstrap of 2-9 differences of one sign
excludes 0 whatever their size.
Paired, because two models on the same cases share each case's difficulty: their per-case Dice
differences vary far less than the Dice itself, so two unpaired CIs overlap where the paired one
may not.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from scipy import stats

from .errors import InputError
from .imageio import refuse_existing_in, refuse_input_as_output, write_json, write_text
from .metrics import mean_ci

METRICS = (("DSC", "dsc", 1), ("ASSD (mm)", "assd_mm", -1), ("HD95 (mm)", "hd95_mm", -1))  # (label, key, +1: higher is better)
OUTPUTS = ("compare.md", "compare.json", "compare.png")
NO_OUTPUT = ""  # evaluate --pred/--truth rows have no "output" column
MIN_CASES = 10


def read_metrics(folder: Path) -> dict[tuple[str, str, str], dict[str, float]]:
    """(output, structure, case) -> {metric: value} from an ``evaluate`` folder's metrics.csv."""
    path = Path(folder) / "metrics.csv"
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise InputError(f"Cannot read {path}: {err.strerror or err}. Give two folders written by livertumorseg evaluate.") from None
    if not rows or not {"case", "structure", "dsc"} <= set(rows[0]):
        raise InputError(f"{path} is not the metrics.csv of livertumorseg evaluate (case, structure, dsc ...).")
    table = {}
    for row in rows:
        key = (row.get("output", NO_OUTPUT), row["structure"], row["case"])
        table[key] = {k: _number(row.get(k)) for _, k, _ in METRICS}
    return table


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences; 1.0 when none differs from 0."""
    nonzero = differences[differences != 0]
    if nonzero.size == 0:
        return 1.0
    return float(stats.wilcoxon(nonzero).pvalue)


def compare_metric(a: list[float], b: list[float], direction: int) -> dict:
    """Paired summary of one metric over the cases (same order in ``a`` and ``b``)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    both = np.isfinite(a) & np.isfinite(b)
    diff = b[both] - a[both]
    better = int(np.sum(direction * diff > 0))
    worse = int(np.sum(direction * diff < 0))
    low, high = mean_ci(diff)
    return {
        "cases": int(both.sum()), "left_out": int((~both).sum()),
        "mean_a": float(a[both].mean()) if both.any() else math.nan,
        "mean_b": float(b[both].mean()) if both.any() else math.nan,
        "mean_difference": float(diff.mean()) if diff.size else math.nan, "ci95": [low, high],
        "wilcoxon_p": wilcoxon_p(diff), "b_better": better, "b_worse": worse, "same": int(diff.size) - better - worse,
    }


def verdict(row: dict, direction: int) -> str:
    """Plain words for a row: the mean's verdict where its CI excludes 0; else, where the Wilcoxon
    test finds the cases shifted (p < 0.05), the side most cases favour. The two can disagree
    when a few large losses (a tumor-free case flipping from 1 to 0) outweigh many small gains."""
    if row["cases"] < MIN_CASES:
        return f"too few cases to tell (under {MIN_CASES})"
    low, high = row["ci95"]
    if math.isfinite(low) and math.isfinite(high) and not low <= 0 <= high:
        return "B better (mean)" if direction * low > 0 else "A better (mean)"
    if row["wilcoxon_p"] < 0.05 and row["b_better"] != row["b_worse"]:
        side = "B" if row["b_better"] > row["b_worse"] else "A"
        return f"mean: no clear difference; most cases: {side} better (Wilcoxon)"
    return "no clear difference"


def paired_keys(a: dict, b: dict) -> dict[tuple[str, str], list[tuple[str, str, str]]]:
    """The (output, structure, case) keys both tables hold, by (output, structure)."""
    groups: dict = {}
    for key in sorted(set(a) & set(b)):
        groups.setdefault(key[:2], []).append(key)
    return groups


def outputs(table: dict) -> set[str]:
    return {key[0] for key in table}


def align_outputs(a: dict, b: dict) -> tuple[dict, dict]:
    """The tables with a label-map evaluation's rows (no output) repeated under each output of the
    other side, when only one side has outputs; else unchanged."""
    def spread(plain: dict, named: set[str]) -> dict:
        return {(out, *key[1:]): value for key, value in plain.items() for out in sorted(named)}

    if outputs(a) == {NO_OUTPUT} and NO_OUTPUT not in outputs(b):
        return spread(a, outputs(b)), b
    if outputs(b) == {NO_OUTPUT} and NO_OUTPUT not in outputs(a):
        return a, spread(b, outputs(a))
    return a, b


def compare(a: dict, b: dict, a_name: str, b_name: str) -> dict:
    """Every (output, structure, metric) both ``read_metrics`` tables scored, paired on the cases both
    hold (``align_outputs`` first)."""
    a, b = align_outputs(a, b)
    groups = paired_keys(a, b)
    if not groups:
        raise InputError(f"{a_name} and {b_name} share no (case, structure): were they evaluated on the same cases? "
                         f"(cases in A: {len({k[2] for k in a})}, in B: {len({k[2] for k in b})}, in both: "
                         f"{len({k[2] for k in a} & {k[2] for k in b})})")
    result = {"a": a_name, "b": b_name, "only_in_a": sorted({k[2] for k in set(a) - set(b)}),
              "only_in_b": sorted({k[2] for k in set(b) - set(a)}), "rows": []}
    for (output, structure), keys in groups.items():
        for label, metric, direction in METRICS:
            row = compare_metric([a[k][metric] for k in keys], [b[k][metric] for k in keys], direction)
            if row["cases"] == 0:  # a metric neither file holds for this structure (e.g. Dice-only tables)
                continue
            row.update(output=output, structure=structure, metric=label)
            row["verdict"] = verdict(row, direction)
            result["rows"].append(row)
    return result


def markdown(result: dict) -> str:
    """The comparison as a Markdown table (one row per output, structure and metric)."""
    lines = [f"A = `{result['a']}`, B = `{result['b']}`; paired on the cases both scored.", "",
             "| output | structure | metric | cases | A | B | B - A [95 % CI] | Wilcoxon p | B better / worse / same | |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        low, high = r["ci95"]
        cases = f"{r['cases']} ({r['left_out']} left out)" if r["left_out"] else str(r["cases"])
        lines.append(f"| {r['output'] or '-'} | {r['structure']} | {r['metric']} | {cases} | {r['mean_a']:.4f} | "
                     f"{r['mean_b']:.4f} | {r['mean_difference']:+.4f} [{low:+.4f}, {high:+.4f}] | "
                     f"{r['wilcoxon_p']:.3g} | {r['b_better']} / {r['b_worse']} / {r['same']} | {r['verdict']} |")
    for side in ("a", "b"):
        if result[f"only_in_{side}"]:
            lines.append(f"\nOnly in {side.upper()} (left out): {', '.join(result[f'only_in_{side}'])}")
    return "\n".join(lines) + "\n"


def save_plot(a: dict, b: dict, path: Path) -> Path:
    """Per-case DSC of B against A, one panel per (output, structure); points above the diagonal: B better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = paired_keys(a, b)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.4), squeeze=False)
    for ax, ((output, structure), keys) in zip(axes[0], groups.items()):
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8)
        ax.scatter([a[k]["dsc"] for k in keys], [b[k]["dsc"] for k in keys], s=14, alpha=0.7)
        ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="DSC, A", ylabel="DSC, B",
               title=f"{structure}" + (f" ({output})" if output else ""))
        ax.set_aspect("equal")
    fig.suptitle("per-case DSC, B against A (above the line: B better)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_compare(args) -> int:
    """``compare A B -o DIR``: write compare.md, compare.json and compare.png, print the table."""
    out = Path(args.out)
    refuse_input_as_output(out, [args.a, args.b])
    refuse_existing_in(out, OUTPUTS, args.overwrite)
    a, b = align_outputs(read_metrics(Path(args.a)), read_metrics(Path(args.b)))
    result = compare(a, b, str(args.a), str(args.b))
    text = markdown(result)
    write_text(text, out / "compare.md", overwrite=args.overwrite)
    write_json(result, out / "compare.json", overwrite=args.overwrite)
    save_plot(a, b, out / "compare.png")
    print(text)
    return 0
