"""Stage `report`: the papers' tables, findings and figures from the evaluated runs, and nothing else.

    results/runs/<run>/metrics.json (+ meta.json, responses.jsonl, token_probs.json)
                                    written by `pipeline evaluate`; <run> is a method name, with -sN for
                                    seed N (viker-s1)
    -> results/report.md            each paper's table, the findings, the figures, an appendix of every
                                    measure (pipeline.reporting.markdown)
    -> results/tradeoff.png, results/relearning.png, results/token_probs.png   (pipeline.reporting.figures)

The report only reads: it loads no model (the token plot's probabilities come from the runs' files).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.files import write_atomic
from pipeline.reporting.figures import (
    relearning_plot,
    token_probabilities_of_runs,
    token_probability_plot,
    tradeoff_plot,
)
from pipeline.reporting.markdown import report_markdown
from pipeline.reporting.runs import load_runs
from stages.config import ReportConfig


def run(config: ReportConfig) -> Path:
    """Write report.md (+ tradeoff.png, relearning.png, token_probs.png) from every run under config.runs."""
    runs = load_runs(config.runs)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = [
        tradeoff_plot(runs, out.parent / "tradeoff.png"),
        relearning_plot(runs, out.parent / "relearning.png"),
    ]
    token_table = token_probabilities_of_runs(runs) if config.token_plot else None
    if token_table is not None:
        figures.append(token_probability_plot(token_table, out.parent / "token_probs.png", config.epsilon))
    return write_atomic(out, report_markdown(runs, [str(figure) for figure in figures if figure]))
