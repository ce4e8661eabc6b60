"""Is the knowledge gone? The relearning attack's results (each forget measure on the held-out people
before and after relearning, and the recovery with its interval over people and seeds), the robustness
table beside the membership-inference AUCs, and the section of the report that shows them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from pipeline.evaluation.bootstrap import PeopleAndSeeds
from pipeline.evaluation.relearning import MIN_FORGOTTEN, recovery
from pipeline.reporting.runs import Summary, display_name, method_order
from pipeline.reporting.tables import MIA_COLUMNS, cell, markdown_table

RELEARN_COLUMNS = (("cloze_acc", "Cloze"), ("mc_acc", "ACC"), ("rougeL", "ROUGE-L"))  # the first: the finding


@dataclass
class Relearning:
    """One method's forget measure on the held-out people before and after the relearning attack (means
    over seeds); the recovery ratio (None: unlearning lowered the measure by under MIN_FORGOTTEN) with its
    95% interval over people and seeds (None: no resamples, or the gap full - before not surely above
    MIN_FORGOTTEN); whether the knowledge came back (after - before's one-sided 95% lower limit above 0
    over every paired resample; on the means without resamples) and what that verdict rests on."""

    before: float
    after: float
    recovery: float | None
    interval: tuple[float, float] | None = None
    came_back: bool = False
    basis: str = "the means only (no resamples)"
    lower: float | None = None  # after - before's 95% lower limit


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
            point = None
            if method != "full" and measure in full:
                point = recovery(before[0], after[0], full[measure][0])
            entry = Relearning(before[0], after[0], point, came_back=after[0] > before[0])
            if resamples is not None:
                entry = judged_on_resamples(entry, method, measure, resamples)
            results[method][measure] = entry
    return results


def judged_on_resamples(
    entry: Relearning, method: str, measure: str, resamples: PeopleAndSeeds
) -> Relearning:
    """'Came back' from after - before on ALL paired resamples (keeping only those where unlearning forgot
    enough would keep those where little came back out: both share `before`, issue 30), and the ratio's
    interval only where the gap full - before has its 95% lower limit above MIN_FORGOTTEN."""
    verdict = resamples.verdict(
        lambda m: m(method, "forget_relearned", measure) - m(method, "forget_heldout", measure)
    )
    if verdict is None:  # a cell was not resampled: the means' answer stands
        return entry
    entry = replace(entry, came_back=verdict.holds, basis=verdict.basis(), lower=verdict.margins[0].lower())
    if entry.recovery is None:
        return entry
    gap = resamples.margins(
        lambda m: m("full", "forget_heldout", measure) - m(method, "forget_heldout", measure)
    )
    if gap is None or not gap[0].lower() > MIN_FORGOTTEN:
        return entry
    ratio = resamples.margins(
        lambda m: recovery(
            m(method, "forget_heldout", measure),
            m(method, "forget_relearned", measure),
            m("full", "forget_heldout", measure),
            min_forgotten=0.0,
        )
    )
    return entry if ratio is None else replace(entry, interval=ratio[0].interval())


def _recovery_cell(entry: Relearning) -> str:
    if entry.recovery is None:
        return "-"
    if entry.interval is not None:
        return f"{entry.recovery:.2f} [{entry.interval[0]:.2f}, {entry.interval[1]:.2f}]"
    return f"{entry.recovery:.2f}" + (" (gap too small for a ratio)" if entry.lower is not None else "")


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
    """Which methods' forgotten facts come back under the attack, on the first of RELEARN_COLUMNS: judged
    on after - before over all paired resamples, each method with the seeds its verdict rests on."""
    measure, name = RELEARN_COLUMNS[0]
    back, gone, unforgotten = [], [], []
    for method, measures in results.items():
        entry, label = measures.get(measure), display_name(method)
        if method == "full" or entry is None:
            continue
        if entry.recovery is None:
            unforgotten.append(label)
            continue
        lower = "" if entry.lower is None else f", lower limit {entry.lower:+.3f}"
        described = (
            f"{label} recovery {_recovery_cell(entry)} (after - before {entry.after - entry.before:+.3f}"
            f"{lower}; rests on {entry.basis})"
        )
        (back if entry.came_back else gone).append(described)
    lines = [
        f"- Knowledge came back ({name} after - before, 95% lower limit over people and seeds above 0): "
        f"{', '.join(back) or 'none'}.",
        f"- No recovery detected (the lower limit reaches 0): {', '.join(gone) or 'none'}.",
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
            "(after - before) / (Full - before), 1 = back to the full model, 0 = nothing back, with its 95% "
            "interval over held-out people and seeds where the gap Full - before is surely (95% lower limit) "
            "over 5 points; '-' where unlearning lowered the mean by under 5 points. Whether knowledge came "
            "back is judged on after - before in every paired resample, not on the ratio. Full's row is "
            "the control: the same attack on the model that never unlearned. "
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
