"""The evaluated runs the report reads: results/runs/<run>/metrics.json (+ meta.json, responses.jsonl,
token_probs.json), grouped into methods by their seed suffix, and summarized over seeds."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.evaluation.bootstrap import PeopleAndSeeds, person_totals

# Row order and display names of the papers' tables; other runs follow in alphabetical order.
METHOD_NAMES = {
    "origin": "Origin", "base": "Base", "full": "Full", "icu": "ICU", "ga": "GA", "ga_diff": "GA_Diff",
    "kl_min": "KL_Min", "npo": "NPO", "po": "PO", "idkpo": "IdkPO", "rmu": "RMU",
    "mmunlearner": "MMUnlearner", "viker": "ViKeR", "vgid": "Vgid",
    "viker_no_ga": "ViKeR w/o GA", "viker_no_vis": "ViKeR w/o Vis",
}  # fmt: skip
SEED_SUFFIX = re.compile(r"^(?P<method>.+?)-s(?P<seed>\d+)$")

# method -> split -> metric -> (mean, sample std over seeds or None for one run, number of runs)
Summary = dict[str, dict[str, dict[str, tuple[float, float | None, int]]]]


@dataclass
class Run:
    name: str
    method: str
    metrics: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None  # holds responses.jsonl (the per-question scores) and token_probs.json


def method_of(run_name: str) -> str:
    """viker-s2 -> viker; a name without a seed suffix is its own method."""
    match = SEED_SUFFIX.match(run_name)
    return match.group("method") if match else run_name


def display_name(method: str) -> str:
    """The papers' spelling of a method (ViKeR w/o GA), else the method's own name."""
    return METHOD_NAMES.get(method, method)


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
    """The papers' row order (METHOD_NAMES), then the other methods alphabetically."""
    known = [name for name in METHOD_NAMES if name in methods]
    return known + sorted(set(methods) - set(known))


def summarize(runs: Sequence[Run]) -> Summary:
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
