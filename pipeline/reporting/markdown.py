"""report.md: each paper's own table first (ViKeR Table 1 and Vgid Table 3 on MLLMU-Bench, ViKeR Table 2
on CLEAR), then the papers' findings checked on the runs, the relearning attack and membership inference,
the figures, and an appendix with every measure of every split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.evaluation.bootstrap import PeopleAndSeeds
from pipeline.reporting.claims import CONFIDENCE, finding_lines, findings
from pipeline.reporting.robustness import knowledge_section
from pipeline.reporting.runs import Run, Summary, display_name, method_order, resample_runs, summarize
from pipeline.reporting.tables import (
    CLEAR_GROUPS,
    CLEAR_LEGEND,
    COLUMNS,
    REVERSE_GROUPS,
    SPLIT_GROUPS,
    VGID_TABLE_3,
    VIKER_TABLE_1,
    VIKER_TABLE_2,
    PaperTable,
    cells_table,
    group_cells,
    has_cells,
)


def report_markdown(runs: Sequence[Run], figures: Sequence[str] = (), draws: int = 2000) -> str:
    """The whole report from the runs (and the figures already drawn beside it)."""
    summary = summarize(runs)
    methods = method_order([run.method for run in runs])
    resamples = resample_runs(runs, draws)
    clear = any("real_faces" in run.metrics for run in runs)  # CLEAR (pipeline.benchmarks.clear)
    lines = _header(runs, methods, resamples)
    if clear:
        lines += _paper_table(summary, methods, VIKER_TABLE_2, resamples, CLEAR_LEGEND)
    else:
        for table in (VIKER_TABLE_1, VGID_TABLE_3):
            lines += _paper_table(summary, methods, table, resamples)
        lines += _findings_section(summary, resamples)  # the papers' findings are MLLMU-Bench's
    lines += knowledge_section(summary, methods, resamples)
    for figure in figures:
        lines += ["", f"![{Path(figure).stem}]({Path(figure).name})"]
    lines += _appendix(summary, methods, resamples, clear)
    return "\n".join(lines) + "\n"


def _header(runs: Sequence[Run], methods: Sequence[str], resamples: PeopleAndSeeds | None) -> list[str]:
    protocols = sorted({str(run.metrics.get("meta", {}).get("protocol", "?")) for run in runs})
    scorers = sorted({str(run.metrics.get("meta", {}).get("coherence_scorer", "?")) for run in runs})
    # as each run's metrics.json recorded it: a run that did not record it is not guessed at
    mc_scorings = sorted({str(run.metrics.get("meta", {}).get("mc_scoring", "not recorded")) for run in runs})
    seeds = {method: sum(1 for run in runs if run.method == method) for method in methods}
    spread = (
        "[95% interval over the people and the seeds]"
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
        f"(seeds: {', '.join(f'{display_name(m)} {n}' for m, n in seeds.items())}).",
        "Forget and Generalization (the forget people through other images and paraphrases): lower ACC, "
        "Cloze, ROUGE-L and BLEU mean more forgetting. Retain and Real: higher is better. GIB: higher is "
        "more fluent. REC: the person's name appears in answers to questions asking for it.",
        *([_intervals_note(resamples)] if resamples else []),
    ]
    if len(protocols) > 1 or len(scorers) > 1 or len(mc_scorings) > 1:
        lines.append("\n**Warning: the runs were scored differently; their numbers do not compare.**")
    return lines


def _intervals_note(resamples: PeopleAndSeeds) -> str:
    """How the report's intervals and verdicts are computed (docs/evaluation.md, "Intervals")."""
    return (
        f"Intervals and verdicts: the people by a paired bootstrap ({resamples.num_draws} resamples of the "
        "people, the same draw for every method), the seeds by a Student t quantile on the between-seed "
        "standard error (seeds - 1 degrees of freedom; 3 seeds are too few for a bootstrap); the two "
        "parts' limits are added in quadrature. A method with one seed rests on the people alone."
    )


def _paper_table(
    summary: Summary,
    methods: Sequence[str],
    table: PaperTable,
    resamples: PeopleAndSeeds | None,
    legend: str | None = None,
) -> list[str]:
    """A paper's table with the columns these runs have; nothing when they have none of them."""
    if not has_cells(summary, methods, table.cells):
        return []
    return [
        "",
        f"## {table.title} ({table.source})",
        *(["", legend] if legend else []),
        "",
        cells_table(summary, methods, table.cells, resamples),
    ]


def _findings_section(summary: Summary, resamples: PeopleAndSeeds | None) -> list[str]:
    judged = "means over seeds" + (
        f", and each margin's one-sided {CONFIDENCE:.0%} lower limit over people and seeds above 0; each "
        "finding says how many seeds it rests on"
        if resamples
        else ""
    )
    return [
        "",
        f"## The papers' findings on these runs (judged on the {judged})",
        "",
        *finding_lines(findings(summary, resamples)),
    ]


def _appendix(
    summary: Summary, methods: Sequence[str], resamples: PeopleAndSeeds | None, clear: bool
) -> list[str]:
    """Every measure of every split: image + text questions, text-only ones, the reverse attack."""
    groups = CLEAR_GROUPS if clear else SPLIT_GROUPS
    tables = [
        ("Image + text questions", groups, COLUMNS, ""),
        ("Text-only questions", groups, COLUMNS[:5], "text_"),
        ("Reverse-engineering attack (Vgid Table 6)", REVERSE_GROUPS, COLUMNS[:3], ""),
    ]
    lines = ["", "## Appendix: every measure of every split"]
    for title, table_groups, columns, prefix in tables:
        if title.startswith("Reverse") and not any("forget_reverse" in summary.get(m, {}) for m in methods):
            continue  # without the attack's splits the table would only repeat Forget and Test
        cells = group_cells(table_groups, columns, prefix)
        if has_cells(summary, methods, cells):
            lines += ["", f"### {title}", "", cells_table(summary, methods, cells, resamples)]
    return lines
