"""Stage `report`: the papers' tables and figures from several evaluated runs.

    results/runs/<run>/metrics.json (+ meta.json)   written by `pipeline evaluate`, one per run;
                                               <run> is a method name, with -sN for seed N (viker-s1)
    -> results/report.md                       tables in the papers' layout, means ± std over seeds
    -> results/tradeoff.png                    forgetting vs utility (Vgid Fig. 4 and App. A.3.6)
    -> results/token_probs.png                 per-token probabilities of one forget answer before and
                                               after unlearning, key tokens in red (ViKeR Fig. 2 / 4)

Key tokens follow ViKeR Sec. 5: token y_i is key when the entropy of its ideal post-unlearning
distribution R_i (the full model's distribution averaged over irrelevant reference images, Eq. 4) is at
least epsilon. `key_tokens` lists them for every sample of a teacher cache (`pipeline key-tokens`).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.benchmarks import Layout, layout
from pipeline.evaluation.bootstrap import PeopleAndSeeds, person_totals
from pipeline.evaluation.relearning import recovery
from stages.config import KEY_TOKEN_EPSILON, ReportConfig

# Row order and display names of the papers' tables; other runs follow in alphabetical order.
METHOD_NAMES = {
    "origin": "Origin", "base": "Base", "full": "Full", "icu": "ICU", "ga": "GA", "ga_diff": "GA_Diff",
    "kl_min": "KL_Min", "npo": "NPO", "po": "PO", "idkpo": "IdkPO", "rmu": "RMU",
    "mmunlearner": "MMUnlearner", "viker": "ViKeR", "vgid": "Vgid",
    "viker_no_ga": "ViKeR w/o GA", "viker_no_vis": "ViKeR w/o Vis",
}  # fmt: skip
SPLIT_GROUPS = (("forget", "Forget"), ("test", "Generalization"), ("retain", "Retain"), ("real", "Real"))
COLUMNS = (("mc_acc", "ACC"), ("cloze_acc", "Cloze"), ("rougeL", "ROUGE-L"), ("bleu", "BLEU"),
           ("coherence", "GIB"), ("rec", "REC"))  # fmt: skip
CLEAR_CELLS = (("forget", "rec", "Forget Rec"), ("forget", "coherence", "Forget Gib"),
               ("retain", "rec", "Retain Rec"), ("retain", "coherence", "Retain Gib"),
               ("real_faces", "mc_acc", "Real QA Acc (Aut)"), ("real_world", "mc_acc", "Real QA Acc (Wor)"))  # fmt: skip
CLEAR_LEGEND = (
    'Rec: the person\'s name appears in the answer to "What is the name of the person in the image?" '
    "(lower on Forget means more forgetting, higher on Retain more retention). Gib: coherence of those "
    "answers. Acc: multiple choice on real authors' faces (Aut) and real-world images (Wor)."
)
MIA_COLUMNS = (("loss_auc", "LOSS AUC"), ("min_k_auc", "Min-K% AUC"), ("zlib_auc", "zlib AUC"))
RELEARN_COLUMNS = (("cloze_acc", "Cloze"), ("mc_acc", "ACC"), ("rougeL", "ROUGE-L"))  # the first: the finding
SEED_SUFFIX = re.compile(r"^(?P<method>.+?)-s(?P<seed>\d+)$")
NUM_REFERENCES = 9  # reference images the token plot's ViKeR teacher averages over


@dataclass
class Run:
    name: str
    method: str
    metrics: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None  # holds responses.jsonl, the per-question scores


def method_of(run_name: str) -> str:
    """viker-s2 -> viker; a name without a seed suffix is its own method."""
    match = SEED_SUFFIX.match(run_name)
    return match.group("method") if match else run_name


def load_runs(runs_dir: str | Path) -> list[Run]:
    """Every <run>/metrics.json under runs_dir, with its meta.json when present."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"--runs {runs_dir} is not a directory")
    runs = []
    for path in sorted(runs_dir.glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        meta_path = path.parent / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        runs.append(Run(path.parent.name, method_of(path.parent.name), metrics, meta, path.parent))
    if not runs:
        raise FileNotFoundError(f"no <run>/metrics.json under {runs_dir}")
    return runs


def method_order(methods: Sequence[str]) -> list[str]:
    known = [name for name in METHOD_NAMES if name in methods]
    return known + sorted(set(methods) - set(known))


def summarize(runs: Sequence[Run]) -> dict[str, dict[str, dict[str, tuple[float, float | None, int]]]]:
    """method -> split -> metric -> (mean, sample std over seeds or None for one run, number of runs)."""
    grouped: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        for split, values in run.metrics.items():
            if split == "meta" or not isinstance(values, dict):
                continue
            for metric, value in values.items():
                if isinstance(value, (int, float)):
                    grouped.setdefault(run.method, {}).setdefault(split, {}).setdefault(metric, []).append(
                        value
                    )
    return {
        method: {
            split: {
                metric: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v))
                for metric, v in metrics.items()
            }
            for split, metrics in splits.items()
        }
        for method, splits in grouped.items()
    }


def resample_runs(runs: Sequence[Run], draws: int = 2000) -> PeopleAndSeeds | None:
    """Resamples over people and seeds of every cell, from the runs' responses.jsonl (None when a run
    has none, e.g. metrics pulled without the responses)."""
    cells: dict[tuple[str, str, str], list] = {}
    for run in runs:
        responses = run.directory / "responses.jsonl" if run.directory else None
        if responses is None or not responses.is_file():
            return None
        for (split, measure), totals in person_totals(responses).items():
            cells.setdefault((run.method, split, measure), []).append(totals)
    return PeopleAndSeeds(cells, draws=draws)


def _cell(summary, method: str, split: str, metric: str, resamples: PeopleAndSeeds | None = None) -> str:
    entry = summary.get(method, {}).get(split, {}).get(metric)
    if entry is None:
        return "-"
    mean, std, _ = entry
    interval = resamples.interval((method, split, metric)) if resamples else None
    if interval is not None:
        return f"{100 * mean:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f}±{100 * std:.1f}"


def markdown_table(
    summary,
    methods: Sequence[str],
    groups,
    columns,
    prefix: str = "",
    resamples: PeopleAndSeeds | None = None,
) -> str:
    """One row per method; column groups of the papers' tables (values in %)."""
    cells = [
        (split, f"{prefix}{metric}", f"{title} {name}") for split, title in groups for metric, name in columns
    ]
    return cells_table(summary, methods, cells, resamples)


def cells_table(
    summary, methods: Sequence[str], cells: Sequence[tuple[str, str, str]], resamples: PeopleAndSeeds | None
) -> str:
    """One row per method, one column per (split, metric, header) that some method has (values in %)."""
    present = [cell for cell in cells if any(cell[1] in summary.get(m, {}).get(cell[0], {}) for m in methods)]
    header = "| Method | " + " | ".join(name for _, _, name in present) + " |"
    rule = "|---|" + "---|" * len(present)
    rows = [
        f"| {METHOD_NAMES.get(method, method)} | "
        + " | ".join(_cell(summary, method, split, metric, resamples) for split, metric, _ in present)
        + " |"
        for method in methods
    ]
    return "\n".join([header, rule, *rows])


def report_markdown(runs: Sequence[Run], figures: Sequence[str] = (), draws: int = 2000) -> str:
    summary = summarize(runs)
    methods = method_order([run.method for run in runs])
    resamples = resample_runs(runs, draws)
    clear = any(
        "real_faces" in run.metrics for run in runs
    )  # CLEAR (pipeline.benchmarks.layouts.ClearLayout)
    lines = _header(runs, methods, resamples)
    lines += (
        _clear_tables(summary, methods, resamples) if clear else _mllmu_tables(summary, methods, resamples)
    )
    lines += _knowledge_section(summary, methods, resamples)
    checked = [] if clear else findings(summary, resamples)  # the papers' findings are MLLMU-Bench's
    if checked:
        judged = "means over seeds" + (f", and in ≥ {HOLDS_SHARE:.0%} of the resamples" if resamples else "")
        lines += ["", f"## The papers' findings on these runs (judged on the {judged})", ""]
        lines += [f"- {'reproduced' if holds else '**not reproduced**'}: {claim} ({measured})"
                  for claim, holds, measured in checked]  # fmt: skip
    for figure in figures:
        lines += ["", f"![{Path(figure).stem}]({Path(figure).name})"]
    return "\n".join(lines) + "\n"


def _clear_tables(summary, methods: Sequence[str], resamples: PeopleAndSeeds | None) -> list[str]:
    return ["", "## CLEAR (ViKeR Table 2's layout)", "", CLEAR_LEGEND, "",
            cells_table(summary, methods, CLEAR_CELLS, resamples)]  # fmt: skip


def _mllmu_tables(summary, methods: Sequence[str], resamples: PeopleAndSeeds | None) -> list[str]:
    lines = [
        "",
        "## Image + text questions (the papers' layout)",
        "",
        markdown_table(summary, methods, SPLIT_GROUPS, COLUMNS, resamples=resamples),
        "",
        "## Text-only questions",
        "",
        markdown_table(summary, methods, SPLIT_GROUPS, COLUMNS[:5], prefix="text_", resamples=resamples),
    ]
    reverse_groups = (("forget", "Forget"), ("forget_reverse", "Forget w/ reverse"),
                      ("test", "Test"), ("test_reverse", "Test w/ reverse"))  # fmt: skip
    if any("forget_reverse" in summary.get(method, {}) for method in methods):
        lines += [
            "",
            "## Reverse-engineering attack (Vgid Table 6)",
            "",
            markdown_table(summary, methods, reverse_groups, COLUMNS[:3], resamples=resamples),
        ]
    return lines


def _header(runs: Sequence[Run], methods: Sequence[str], resamples: PeopleAndSeeds | None) -> list[str]:
    protocols = sorted({str(run.metrics.get("meta", {}).get("protocol", "?")) for run in runs})
    scorers = sorted({str(run.metrics.get("meta", {}).get("coherence_scorer", "?")) for run in runs})
    mc_scorings = sorted({str(run.metrics.get("meta", {}).get("mc_scoring", "generate")) for run in runs})
    seeds = {method: sum(1 for run in runs if run.method == method) for method in methods}
    spread = (
        "[95% bootstrap interval over the people and the seeds]"
        if resamples
        else "± sample standard deviation over seed runs"
    )
    lines = [
        "# Evaluation report",
        "",
        f"Runs: {', '.join(run.name for run in runs)}.",
        f"Evaluation protocol: {', '.join(protocols)}. Multiple choice scored by: {', '.join(mc_scorings)} "
        "(generate: the generated letter; likelihood: the most likely option, MLLMU-Bench Eq. 13). "
        f"Coherence (GIB) scorer: {', '.join(scorers)}.",
        f"All values are percentages, the mean over seeds {spread} "
        f"(seeds: {', '.join(f'{METHOD_NAMES.get(m, m)} {n}' for m, n in seeds.items())}).",
        "Forget and Generalization (the forget people through other images and paraphrases): lower ACC, "
        "Cloze, ROUGE-L and BLEU mean more forgetting. Retain and Real: higher is better. GIB: higher is "
        "more fluent. REC: the person's name appears in answers to questions asking for it.",
    ]
    if len(protocols) > 1 or len(scorers) > 1 or len(mc_scorings) > 1:
        lines.append("\n**Warning: the runs were scored differently; their numbers do not compare.**")
    return lines


def _knowledge_section(summary, methods: Sequence[str], resamples: PeopleAndSeeds | None) -> list[str]:
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


# ------------------------------------------------------------------------------------------ robustness


@dataclass
class Relearning:
    """One method's forget measure on the held-out people: before and after the relearning attack
    (means over seeds), and the recovery with its 95% interval over people and seeds (None: unlearning
    lowered the measure by too little; NaN bounds: most resamples did)."""

    before: float
    after: float
    recovery: tuple[float, float, float] | None


def relearning_results(summary, resamples: PeopleAndSeeds | None) -> dict[str, dict[str, Relearning]]:
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
    method: str, measure: str, summary, resamples: PeopleAndSeeds | None
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


def robustness_table(results: dict[str, dict[str, Relearning]], summary) -> str:
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
        cells += [_cell(summary, method, "mia", metric) for metric, _ in MIA_COLUMNS]
        rows.append(f"| {METHOD_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def relearning_finding(results: dict[str, dict[str, Relearning]]) -> str:
    """Which methods' forgotten facts come back under the attack, on the first of RELEARN_COLUMNS."""
    measure, name = RELEARN_COLUMNS[0]
    back, gone, unforgotten = [], [], []
    for method, measures in results.items():
        entry, label = measures.get(measure), METHOD_NAMES.get(method, method)
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


# ------------------------------------------------------------------------------------------ findings

CHANCE_MC = 0.25  # four options
HOLDS_SHARE = 0.95  # of the resamples over people and seeds in which a finding must hold


Measured = Callable[[str, str, str], float]  # m(method, split, metric)


def paper_claims() -> list[tuple[str, Callable[[Measured], tuple[bool, str]]]]:
    """The papers' claims on this benchmark: (claim, check(m) -> (holds, the measured values))."""
    return [
        ("The full model remembers: forget MC ≥ 0.9, forget ROUGE-L ≥ 0.8",
         lambda m: (m("full", "forget", "mc_acc") >= 0.9 and m("full", "forget", "rougeL") >= 0.8,
                  f"MC {m('full', 'forget', 'mc_acc'):.2f}, ROUGE-L {m('full', 'forget', 'rougeL'):.2f}")),
        ("GA destroys retention and coherence: retain ROUGE-L and GIB below half the full model's",
         lambda m: (m("ga", "retain", "rougeL") < 0.5 * m("full", "retain", "rougeL")
                  and m("ga", "retain", "coherence") < 0.5 * m("full", "retain", "coherence"),
                  f"ROUGE-L {m('ga', 'retain', 'rougeL'):.2f} vs {m('full', 'retain', 'rougeL'):.2f}, "
                  f"GIB {m('ga', 'retain', 'coherence'):.2f} vs {m('full', 'retain', 'coherence'):.2f}")),
        (f"ViKeR forgets: forget MC within 0.15 of chance ({CHANCE_MC})",
         lambda m: (abs(m("viker", "forget", "mc_acc") - CHANCE_MC) <= 0.15,
                  f"MC {m('viker', 'forget', 'mc_acc'):.2f}")),
        ("ViKeR keeps: retain ROUGE-L ≥ 0.8 × and GIB ≥ 0.9 × the full model's",
         lambda m: (m("viker", "retain", "rougeL") >= 0.8 * m("full", "retain", "rougeL")
                  and m("viker", "retain", "coherence") >= 0.9 * m("full", "retain", "coherence"),
                  f"ROUGE-L {m('viker', 'retain', 'rougeL'):.2f} vs {m('full', 'retain', 'rougeL'):.2f}, "
                  f"GIB {m('viker', 'retain', 'coherence'):.2f} vs {m('full', 'retain', 'coherence'):.2f}")),
        # Comparable forgetting: ViKeR's forget MC is at least as close to chance (the accuracy of a model
        # that never saw the people, ViKeR's "Origin"), give or take 0.15; below chance is no better.
        *[(f"ViKeR beats {METHOD_NAMES[other]} on retain ROUGE-L at comparable forgetting (forget MC as "
           "close to chance, within 0.15)",
           lambda m, other=other: (m("viker", "retain", "rougeL") > m(other, "retain", "rougeL")
                                and abs(m("viker", "forget", "mc_acc") - CHANCE_MC)
                                <= abs(m(other, "forget", "mc_acc") - CHANCE_MC) + 0.15,
                                f"ViKeR {m('viker', 'retain', 'rougeL'):.2f} at forget MC "
                                f"{m('viker', 'forget', 'mc_acc'):.2f}, {METHOD_NAMES[other]} "
                                f"{m(other, 'retain', 'rougeL'):.2f} at {m(other, 'forget', 'mc_acc'):.2f}"))
          for other in ("ga", "npo")],
        ("Vgid: forget ROUGE-L drops by ≥ 0.3, retain ROUGE-L by ≤ 0.06",
         lambda m: (m("full", "forget", "rougeL") - m("vgid", "forget", "rougeL") >= 0.3
                  and m("full", "retain", "rougeL") - m("vgid", "retain", "rougeL") <= 0.06,
                  f"forget drop {m('full', 'forget', 'rougeL') - m('vgid', 'forget', 'rougeL'):.3f}, "
                  f"retain drop {m('full', 'retain', 'rougeL') - m('vgid', 'retain', 'rougeL'):.3f}")),
        ("ViKeR w/o GA forgets less: higher forget MC than ViKeR",
         lambda m: (m("viker_no_ga", "forget", "mc_acc") > m("viker", "forget", "mc_acc"),
                  f"{m('viker_no_ga', 'forget', 'mc_acc'):.2f} vs {m('viker', 'forget', 'mc_acc'):.2f}")),
        ("ViKeR w/o Vis keeps less: lower retain ROUGE-L than ViKeR",
         lambda m: (m("viker_no_vis", "retain", "rougeL") < m("viker", "retain", "rougeL"),
                  f"{m('viker_no_vis', 'retain', 'rougeL'):.2f} vs {m('viker', 'retain', 'rougeL'):.2f}")),
    ]  # fmt: skip


def findings(summary, resamples: PeopleAndSeeds | None = None) -> list[tuple[str, bool, str]]:
    """Each of the papers' claims checked on the means over seeds: (claim, holds, the measured values).
    With resamples (over people and seeds), a claim holds only when it also holds in at least
    HOLDS_SHARE of them. A claim whose runs are missing is left out."""

    def point(method: str, split: str, metric: str) -> float:
        return summary[method][split][metric][0]  # the mean; KeyError when the run was not evaluated

    results = []
    for claim, check in paper_claims():
        try:
            holds, measured = check(point)
        except KeyError:  # a run the claim needs was not evaluated
            continue
        share = resamples.share_holding(lambda m, check=check: check(m)[0]) if resamples else math.nan
        if not math.isnan(share):
            holds = holds and share >= HOLDS_SHARE
            measured = f"{measured}; holds in {100 * share:.0f}% of resamples"
        results.append((claim, holds, measured))
    return results


# ------------------------------------------------------------------------------------------ figures


def tradeoff_plot(runs: Sequence[Run], out_path: str | Path) -> Path | None:
    """Forgetting vs utility per method (Vgid Fig. 4-7): x = drop of the forget metric from the full
    model's (or 1 - forget metric without a `full` run), y = the retain metric; error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(runs)
    methods = [m for m in method_order(list(summary)) if "forget" in summary[m] and "retain" in summary[m]]
    panels = [(metric, header) for metric, header in COLUMNS[:4]
              if any(metric in summary[m]["forget"] for m in methods)]  # fmt: skip
    if not methods or not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for axis, (metric, header) in zip(axes[0], panels, strict=True):
        base = summary.get("full", {}).get("forget", {}).get(metric)
        for method in methods:
            forget, retain = summary[method]["forget"].get(metric), summary[method]["retain"].get(metric)
            if forget is None or retain is None:
                continue
            x = (base[0] - forget[0]) if base else 1.0 - forget[0]
            axis.errorbar(x, retain[0], xerr=forget[1] or 0.0, yerr=retain[1] or 0.0, fmt="o", capsize=3)
            axis.annotate(
                METHOD_NAMES.get(method, method),
                (x, retain[0]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        axis.set_xlabel(f"forget {header} drop vs Full" if base else f"1 - forget {header}")
        axis.set_ylabel(f"retain {header}")
        axis.grid(alpha=0.3)
    figure.suptitle("Unlearning completeness vs model utility (upper right is better)")
    return _save_figure(figure, out_path)


def relearning_plot(runs: Sequence[Run], out_path: str | Path) -> Path | None:
    """Per method, each forget measure on the held-out people before and after the relearning attack;
    the dashed line is the full model's level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = relearning_results(summarize(runs), None)
    methods = [method for method in results if method != "full"]
    if not methods:
        return None
    figure, axes = plt.subplots(
        1, len(RELEARN_COLUMNS), figsize=(4.5 * len(RELEARN_COLUMNS), 4.0), squeeze=False
    )
    positions = np.arange(len(methods))
    for axis, (measure, name) in zip(axes[0], RELEARN_COLUMNS, strict=True):
        entries = [results[m].get(measure) for m in methods]
        axis.bar(positions - 0.2, [100 * e.before if e else 0 for e in entries], 0.4, label="unlearned")
        axis.bar(positions + 0.2, [100 * e.after if e else 0 for e in entries], 0.4, label="relearned")
        if measure in results.get("full", {}):
            axis.axhline(100 * results["full"][measure].before, color="black", linestyle="--", label="Full")
        axis.set_xticks(
            positions, [METHOD_NAMES.get(m, m) for m in methods], rotation=60, ha="right", fontsize=8
        )
        axis.set_ylabel(f"held-out forget {name} (%)")
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("Forget measures before and after the relearning attack (lower is more forgetting)")
    return _save_figure(figure, out_path)


def _save_figure(figure, out_path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return out_path


@dataclass
class TokenProbabilities:
    """Per answer token of one sample: its text, H(R_i) and p(y_i) under each model."""

    sample_id: str
    question: str
    answer: str
    tokens: list[str]
    entropy: list[float] | None  # nats; None when no reference images were available
    probabilities: dict[str, list[float]]  # model label -> p(y_i)


def reference_entropy(
    loaded, prompt: str, answer: str, reference_images: Sequence, batch_size: int = 8
) -> list[float]:
    """H(R_i) per answer token, R_i the full model's distribution averaged over the reference images
    (ViKeR Eq. 4) with the same question and answer prefix."""
    import torch

    from pipeline.models import PromptedSample, answer_logits, encode_answers

    total = None
    with torch.inference_mode():
        for start in range(0, len(reference_images), batch_size):
            chunk = reference_images[start : start + batch_size]
            batch = encode_answers(loaded, [PromptedSample(prompt, image, answer) for image in chunk]).to(
                loaded.device
            )
            probabilities = answer_logits(loaded.model, batch).float().softmax(-1)
            summed = torch.stack(batch.per_sample(probabilities)).sum(0)
            total = summed if total is None else total + summed
    average = total / len(reference_images)
    return (-(average * average.clamp_min(1e-30).log()).sum(-1)).tolist()


def answer_probabilities(loaded, model, prompt: str, image, answer: str) -> list[float]:
    """p(y_i | image, question, y_<i) of every ground-truth answer token under `model`."""
    import torch

    from pipeline.models import PromptedSample, answer_logits, encode_answers

    batch = encode_answers(loaded, [PromptedSample(prompt, image, answer)]).to(loaded.device)
    with torch.inference_mode():
        probabilities = answer_logits(model, batch).float().softmax(-1)
    return probabilities.gather(1, batch.targets[:, None])[:, 0].tolist()


def token_probabilities(
    model_path: str,
    adapters: dict[str, str],
    data: Layout,
    forget_split: str,
    reference_images: Sequence,
    sample_index: int = 0,
    device: str = "cpu",
) -> TokenProbabilities:
    """One forget sample's per-token probabilities under the full model and each adapter."""
    from pipeline.benchmarks import DataError
    from pipeline.models import answer_token_ids, load_model
    from pipeline.models.adapters import switch_adapter

    try:
        samples = data.unlearning_samples(forget_split, ("qa",))
    except DataError:  # the benchmark's evaluation folders carry no training QA: use generation items
        samples = data.unlearning_samples(forget_split, ("generation",))
    samples = [sample for sample in samples if sample.image is not None]
    if not samples:
        raise ValueError(f"split {forget_split} under {data.root} has no image question to plot")
    sample = samples[sample_index % len(samples)]
    loaded = load_model(model_path, device=device)
    prompt = loaded.family.build_prompt(sample.question, True)
    image = sample.pil_image()
    token_ids = answer_token_ids(loaded, sample.answer)
    tokens = [loaded.tokenizer.decode([token]) for token in token_ids]
    entropy = reference_entropy(loaded, prompt, sample.answer, reference_images) if reference_images else None
    probabilities = {"Full": answer_probabilities(loaded, loaded.model, prompt, image, sample.answer)}
    model = loaded.model
    for label, adapter_dir in adapters.items():
        model = switch_adapter(loaded, model, adapter_dir, label)
        probabilities[label] = answer_probabilities(loaded, model, prompt, image, sample.answer)
    return TokenProbabilities(
        sample.sample_id, sample.question, sample.answer, tokens, entropy, probabilities
    )


def token_probability_plot(
    table: TokenProbabilities, out_path: str | Path, epsilon: float = KEY_TOKEN_EPSILON
) -> Path:
    """Bars of p(y_i) per model; red bars are key tokens (H(R_i) >= epsilon), gray bars normal ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(table.probabilities)
    positions = list(range(len(table.tokens)))
    key = [h >= epsilon for h in table.entropy] if table.entropy is not None else [False] * len(positions)
    colours = ["tab:red" if is_key else "tab:gray" for is_key in key]
    figure, axes = plt.subplots(
        len(labels),
        1,
        figsize=(max(6.0, 0.45 * len(positions)), 1.9 * len(labels)),
        sharex=True,
        squeeze=False,
    )
    for axis, label in zip(axes[:, 0], labels, strict=True):
        axis.bar(positions, table.probabilities[label], color=colours)
        axis.set_ylim(0, 1)
        axis.set_ylabel(f"{label}\np(y_i)")
    axes[-1, 0].set_xticks(positions)
    axes[-1, 0].set_xticklabels(
        [repr(token)[1:-1] for token in table.tokens], rotation=60, ha="right", fontsize=8
    )
    legend = (
        f"red: key token (H(R_i) >= {epsilon:.2g} nats), gray: normal"
        if table.entropy
        else ("no reference images: key tokens not marked")
    )
    axes[0, 0].set_title(f"{table.sample_id}: {table.question}\n{legend}", fontsize=9)
    return _save_figure(figure, out_path)


# ------------------------------------------------------------------------------------------ key tokens


@dataclass
class KeyTokens:
    sample_id: str
    tokens: list[str]
    entropy: list[float]
    key: list[bool]


def key_tokens(
    cache_dir: str | Path, epsilon: float = KEY_TOKEN_EPSILON, tokenizer=None, limit: int | None = None
) -> Iterator[KeyTokens]:
    """ViKeR Definition 2 over a teacher cache: y_i is key iff H(R_i) >= epsilon (the cache stores H)."""
    from cache import CacheError, iter_cache, read_manifest

    if tokenizer is not None:
        from pipeline.models import tokenizer_fingerprint

        if read_manifest(cache_dir).tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
            raise CacheError(
                f"cache {cache_dir} was made with another tokenizer than the one given to decode it"
            )
    for index, sample in enumerate(iter_cache(cache_dir, draw=0)):
        if limit is not None and index >= limit:
            break
        ids = sample.answer_token_ids.tolist()
        tokens = (
            [tokenizer.decode([token]) for token in ids] if tokenizer is not None else [str(t) for t in ids]
        )
        entropy = sample.entropy.tolist()
        yield KeyTokens(sample.sample_id, tokens, entropy, [h >= epsilon for h in entropy])


def format_key_tokens(entry: KeyTokens) -> str:
    """`sample_id: token [KEY 1.73] token ...` — key tokens marked with their entropy in nats."""
    parts = [f"[{token!r} KEY {h:.2f}]" if is_key else f"{token!r}"
             for token, h, is_key in zip(entry.tokens, entry.entropy, entry.key, strict=True)]  # fmt: skip
    return f"{entry.sample_id}: " + " ".join(parts)


# ------------------------------------------------------------------------------------------ the stage


def run(config: ReportConfig) -> Path:
    """Write report.md (+ tradeoff.png, token_probs.png) from every run under config.runs."""
    runs = load_runs(config.runs)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures: list[str] = []
    for plot, name in ((tradeoff_plot, "tradeoff.png"), (relearning_plot, "relearning.png")):
        written = plot(runs, out.parent / name)
        if written:
            figures.append(str(written))
    if config.token_plot:
        figure = _token_plot_from_runs(
            runs, out.parent / "token_probs.png", config.references, config.sample_index, config.epsilon,
            NUM_REFERENCES, config.device,
        )  # fmt: skip
        if figure:
            figures.append(str(figure))
    out.write_text(report_markdown(runs, figures))
    return out


def _token_plot_from_runs(
    runs: Sequence[Run],
    out_path: Path,
    reference_dir: str | None,
    sample_index: int,
    epsilon: float,
    num_references: int,
    device: str,
) -> Path | None:
    """The token plot needs the runs' model and data (from meta.json); one adapter per method (first seed)."""
    configs = [run.meta.get("config", {}) for run in runs if run.meta.get("config")]
    if not configs:
        return None
    model_path, data_dir, forget_split = configs[0]["model"], configs[0]["data"], configs[0]["forget_split"]
    adapters: dict[str, str] = {}
    for run in sorted(runs, key=lambda r: r.name):
        adapter = run.meta.get("config", {}).get("adapter")
        label = METHOD_NAMES.get(run.method, run.method)
        if adapter and label not in adapters and run.meta["config"]["model"] == model_path:
            adapters[label] = adapter
    ordered = {label: adapters[label] for label in [METHOD_NAMES.get(m, m) for m in method_order(
        [run.method for run in runs])] if label in adapters}  # fmt: skip
    references = _reference_images(reference_dir, data_dir, num_references)
    data = layout(configs[0].get("data_format", "auto"), configs[0].get("train_data") or data_dir)
    table = token_probabilities(model_path, ordered, data, forget_split, references, sample_index, device)
    (out_path.parent / "token_probs.json").write_text(
        json.dumps(table.__dict__, indent=1, ensure_ascii=False) + "\n"
    )
    return token_probability_plot(table, out_path, epsilon)


def _reference_images(reference_dir: str | None, data_dir: str, count: int) -> list:
    """Up to `count` images of the 'people' reference pool (ViKeR's irrelevant images), evenly spread."""
    from pipeline.benchmarks import DataError, load_reference_pool
    from pipeline.samples import decode_image

    roots = [reference_dir] if reference_dir else [str(Path(data_dir).parent), data_dir]
    for root in roots:
        try:
            pool = load_reference_pool(root, "people")
        except DataError:
            continue
        step = max(1, len(pool) // count)
        return [decode_image(data, f"reference image {name}") for name, data in pool[::step][:count]]
    if reference_dir:
        raise FileNotFoundError(f"--references {reference_dir}: no 'people' reference pool there")
    return []
