"""The report's figures, drawn from the runs' files only (no model is loaded here):

    tradeoff.png     forgetting vs utility per method (Vgid Fig. 4 and App. A.3.6)
    relearning.png   each forget measure on the held-out people before and after the relearning attack
    token_probs.png  per-token probabilities of one forget answer before and after unlearning, key tokens
                     in red (ViKeR Fig. 2 / 4), from the token_probs.json `pipeline evaluate` writes per run

Key tokens follow ViKeR Def. 2: token y_i is key when the entropy of its ideal post-unlearning
distribution R_i (the full model's distribution averaged over irrelevant reference images, Eq. 4) is at
least epsilon.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.reporting.robustness import RELEARN_COLUMNS, relearning_results
from pipeline.reporting.runs import Run, display_name, method_order, summarize
from pipeline.reporting.tables import COLUMNS

TOKEN_PROBS_FILE = "token_probs.json"  # per run, written by `pipeline evaluate`
TOKEN_KEYS = ("sample_id", "question", "answer", "tokens", "probabilities")  # and entropy (or null)
MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # 7 markers x 10 colours: no two methods look alike


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, out_path: str | Path, bbox_inches: str | None = None) -> Path:
    figure.tight_layout()
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=120, bbox_inches=bbox_inches)
    _pyplot().close(figure)
    return out_path


def method_style(index: int) -> tuple[str, str]:
    """The colour and marker of the index-th method: distinct for the first 70 methods."""
    return f"C{index % 10}", MARKERS[index % len(MARKERS)]


def tradeoff_plot(runs: Sequence[Run], out_path: str | Path) -> Path | None:
    """Forgetting vs utility per method (Vgid Fig. 4-7): x = drop of the forget metric from the full
    model's (or 1 - forget metric without a `full` run), y = the retain metric; error bars over seeds.
    Methods are told apart by colour and marker in one legend beside the panels (labels next to the points
    would hide each other where methods cluster)."""
    plt = _pyplot()
    summary = summarize(runs)
    methods = [m for m in method_order(list(summary)) if "forget" in summary[m] and "retain" in summary[m]]
    panels = [(metric, header) for metric, header in COLUMNS[:4]
              if any(metric in summary[m]["forget"] for m in methods)]  # fmt: skip
    if not methods or not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    handles = {}
    for axis, (metric, header) in zip(axes[0], panels, strict=True):
        base = summary.get("full", {}).get("forget", {}).get(metric)
        for index, method in enumerate(methods):
            forget, retain = summary[method]["forget"].get(metric), summary[method]["retain"].get(metric)
            if forget is None or retain is None:
                continue
            x = (base[0] - forget[0]) if base else 1.0 - forget[0]
            colour, marker = method_style(index)
            # Hollow markers: methods on the same spot (e.g. one that did not move from Full) stay visible.
            handles[display_name(method)] = axis.errorbar(
                x, retain[0], xerr=forget[1] or 0.0, yerr=retain[1] or 0.0, fmt=marker, color=colour,
                markerfacecolor="none", markersize=8, markeredgewidth=1.5, elinewidth=1, capsize=3,
            )  # fmt: skip
        axis.set_xlabel(f"forget {header} drop vs Full" if base else f"1 - forget {header}")
        axis.set_ylabel(f"retain {header}")
        axis.grid(alpha=0.3)
    figure.legend(
        list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8
    )
    figure.suptitle("Unlearning completeness vs model utility (upper right is better)")
    return _save_figure(figure, out_path, bbox_inches="tight")


def relearning_plot(runs: Sequence[Run], out_path: str | Path) -> Path | None:
    """Per method, each forget measure on the held-out people before and after the relearning attack;
    the dashed line is the full model's level."""
    plt = _pyplot()
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
        axis.set_xticks(positions, [display_name(m) for m in methods], rotation=60, ha="right", fontsize=8)
        axis.set_ylabel(f"held-out forget {name} (%)")
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("Forget measures before and after the relearning attack (lower is more forgetting)")
    return _save_figure(figure, out_path)


@dataclass
class TokenProbabilityTable:
    """The token plot's table: one sample's tokens, H(R_i), and p(y_i) under each run's model (the runs'
    token_probs.json files, each written by pipeline.evaluation.token_probabilities for one model)."""

    sample_id: str
    question: str
    answer: str
    tokens: list[str]
    entropy: list[float] | None  # nats; None when no reference images were available
    probabilities: dict[str, list[float]]  # model label -> p(y_i)


def token_probabilities_of_runs(runs: Sequence[Run]) -> TokenProbabilityTable | None:
    """The runs' token_probs.json together: the `full` run's as Full, then per method its first seed's
    run (sorted names) under the method's display name; H(R_i) from the first that has it. None when no
    run has the file."""
    first_runs: dict[str, Path] = {}
    for run in sorted(runs, key=lambda r: r.name):
        if run.directory is not None and (run.directory / TOKEN_PROBS_FILE).is_file():
            first_runs.setdefault(run.method, run.directory / TOKEN_PROBS_FILE)
    table, first = None, None
    for method in sorted(method_order(list(first_runs)), key=lambda m: m != "full"):  # Full on top
        entry = _read_token_probs(first_runs[method])
        if table is None:
            table, first = (
                TokenProbabilityTable(*(entry[k] for k in TOKEN_KEYS[:4]), None, {}),
                first_runs[method],
            )
        elif (entry["sample_id"], entry["tokens"]) != (table.sample_id, table.tokens):
            raise ValueError(
                f"{first_runs[method]} shows sample {entry['sample_id']}, {first} {table.sample_id} (or "
                "other tokens): evaluate every run on the same token-plot sample"
            )
        table.probabilities[display_name(method)] = entry["probabilities"]
        table.entropy = table.entropy if table.entropy is not None else entry.get("entropy")
    return table


def _read_token_probs(path: Path) -> dict:
    try:
        entry = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if any(key not in entry for key in TOKEN_KEYS) or len(entry["probabilities"]) != len(entry["tokens"]):
        raise ValueError(f"{path}: needs {', '.join(TOKEN_KEYS)}, one probability per token")
    return entry


def token_probability_plot(table: TokenProbabilityTable, out_path: str | Path, epsilon: float) -> Path:
    """Bars of p(y_i) per model; red bars are key tokens (H(R_i) >= epsilon), gray bars normal ones."""
    plt = _pyplot()
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
