"""Is the knowledge gone? The relearning attack's results (each forget measure on the held-out people
before and after relearning, and the recovery with its interval over people and seeds), the robustness
table beside the membership-inference AUCs, and the section of the report that shows them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.evaluation.bootstrap import PeopleAndSeeds
from pipeline.evaluation.relearning import recovery
from pipeline.reporting.runs import Summary, display_name, method_order
from pipeline.reporting.tables import MIA_COLUMNS, cell, markdown_table

RELEARN_COLUMNS = (("cloze_acc", "Cloze"), ("mc_acc", "ACC"), ("rougeL", "ROUGE-L"))  # the first: the finding


@dataclass
class Relearning:
    """One method's forget measure on the held-out people: before and after the relearning attack
    (means over seeds), and the recovery with its 95% interval over people and seeds (None: unlearning
    lowered the measure by too little; NaN bounds: most resamples did)."""

    before: float
    after: float
    recovery: tuple[float, float, float] | None


def relearning_results(
    summary: Summary, resamples: PeopleAndSeeds | None
) -> dict[str, dict[str, Relearning]]:
    """method -> measure -> Relearning, for each method scored on forget_relearned, with the full model's
    held-out level as the recovery's 1."""
    full = summary.get("full", {}).get("forget_heldout", {})
    results: dict[str, dict[str, Relearning]] = {}
    for method in method_order(list(summary)):
        splits = summary[method]
        if "forget_relearned" not in splits:
            continue
        results[method] = {}
        for measure, _ in RELEARN_COLUMNS:
            before = splits["forget_heldout"].get(measure)
            after = splits["forget_relearned"].get(measure)
            if before is None or after is None:
                continue
            interval = None
            if method != "full" and measure in full:
                interval = recovery_with_interval(method, measure, summary, resamples)
            results[method][measure] = Relearning(before[0], after[0], interval)
    return results


def recovery_with_interval(
    method: str, measure: str, summary: Summary, resamples: PeopleAndSeeds | None
) -> tuple[float, float, float] | None:
    """The recovery of the means over seeds, with its interval over the resamples (NaN without them)."""

    def mean(who: str, split: str) -> float:
        return summary[who][split][measure][0]

    point = recovery(
        mean(method, "forget_heldout"), mean(method, "forget_relearned"), mean("full", "forget_heldout")
    )
    if point is None:
        return None
    if resamples is None:
        return float(point), math.nan, math.nan
    try:
        before, after, full = (
            resamples.values[(who, split, measure)]
            for who, split in (
                (method, "forget_heldout"),
                (method, "forget_relearned"),
                ("full", "forget_heldout"),
            )
        )
    except KeyError:
        return float(point), math.nan, math.nan
    draws = recovery(before, after, full)
    if np.isnan(draws).mean() > 0.5:  # most resamples forgot too little: no interval worth the name
        return float(point), math.nan, math.nan
    low, high = np.nanquantile(draws, [0.025, 0.975])
    return float(point), float(low), float(high)


def _recovery_cell(entry: Relearning) -> str:
    if entry.recovery is None:
        return "-"
    point, low, high = entry.recovery
    return f"{point:.2f}" if math.isnan(low) else f"{point:.2f} [{low:.2f}, {high:.2f}]"


def robustness_table(results: dict[str, dict[str, Relearning]], summary: Summary) -> str:
    """Methods as rows: each forget measure before -> after relearning with its recovery, then MIA AUCs."""
    header = (
        "| Method | "
        + " | ".join(f"{name} before → after | {name} recovery" for _, name in RELEARN_COLUMNS)
        + " | "
        + " | ".join(name for _, name in MIA_COLUMNS)
        + " |"
    )
    rule = "|---|" + "---|---|" * len(RELEARN_COLUMNS) + "---|" * len(MIA_COLUMNS)
    rows = []
    for method, measures in results.items():
        cells = []
        for measure, _ in RELEARN_COLUMNS:
            entry = measures.get(measure)
            if entry is None:
                cells += ["-", "-"]
                continue
            cells += [f"{100 * entry.before:.1f} → {100 * entry.after:.1f}", _recovery_cell(entry)]
        cells += [cell(summary, method, "mia", metric) for metric, _ in MIA_COLUMNS]
        rows.append(f"| {display_name(method)} | " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def relearning_finding(results: dict[str, dict[str, Relearning]]) -> str:
    """Which methods' forgotten facts come back under the attack, on the first of RELEARN_COLUMNS."""
    measure, name = RELEARN_COLUMNS[0]
    back, gone, unforgotten = [], [], []
    for method, measures in results.items():
        entry, label = measures.get(measure), display_name(method)
        if method == "full" or entry is None:
            continue
        if entry.recovery is None or math.isnan(entry.recovery[1]):
            unforgotten.append(label)
        elif entry.recovery[1] > 0:
            back.append(f"{label} {_recovery_cell(entry)}")
        else:
            gone.append(f"{label} {_recovery_cell(entry)}")
    lines = [
        f"- Knowledge came back ({name} recovery interval above 0): {', '.join(back) or 'none'}.",
        f"- No recovery detected (interval reaches 0): {', '.join(gone) or 'none'}.",
    ]
    if unforgotten:
        lines.append(f"- Forgot too little of {name} to measure a recovery: {', '.join(unforgotten)}.")
    return "\n".join(lines)


def knowledge_section(
    summary: Summary, methods: Sequence[str], resamples: PeopleAndSeeds | None
) -> list[str]:
    """The relearning attack and membership inference: the robustness table (or MIA alone)."""
    relearned = relearning_results(summary, resamples)
    if relearned:
        return [
            "",
            "## Is the knowledge gone? The relearning attack and membership inference",
            "",
            "Each adapter was fine-tuned on the QA of part of the forget people (`pipeline relearn`), then "
            "asked about the other forget people, whose facts it never saw again (docs/evaluation.md). "
            "Before → after: the forget measure on those held-out people (%, mean over seeds). Recovery: "
            "(after - before) / (Full - before), 1 = back to the full model, 0 = nothing back, with a 95% "
            "bootstrap interval over seeds and held-out people; '-' where unlearning lowered the measure by "
            "under 5 points. Full's row is the control: the same attack on the model that never unlearned. "
            "MIA: the AUC of each attack telling the forget split's QA answers from those of people no "
            "model was trained on (pipeline/evaluation/membership.py); 50 = indistinguishable, the full model's row "
            "is the starting point.",
            "",
            robustness_table(relearned, summary),
            "",
            relearning_finding(relearned),
        ]
    if not any("mia" in summary.get(method, {}) for method in methods):
        return []
    return [
        "",
        "## Is the knowledge gone? Membership inference (forget QA against never-seen people)",
        "",
        "AUC of each attack telling the forget split's QA answers from those of people no model was "
        "trained on (pipeline/evaluation/membership.py): 50 means indistinguishable, the ideal after unlearning; "
        "the full model's row is the starting point. A method whose generated answers forget while its "
        "AUC stays near the full model's hides the knowledge rather than removing it.",
        "",
        markdown_table(summary, methods, (("mia", "MIA"),), MIA_COLUMNS),
    ]
