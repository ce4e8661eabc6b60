"""Bootstrap over people and seeds: intervals for the report's means and its findings (docs/evaluation.md,
"Intervals").

A split's measure is the mean over its questions, which are grouped by person; a method's cell is the mean
of that over its seeds. A resample draws the people of every split with replacement (the same draw for
every method, so comparisons between methods are paired) and each method's seeds with replacement, and
recomputes every cell as the question-weighted mean over the drawn people, averaged over the drawn seeds.
With every person and seed drawn once, a cell is exactly the mean metrics.json gives.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.evaluation.metrics import question_measures

Cell = tuple[str, str, str]  # (method, split, measure)


@dataclass
class PersonTotals:
    """One run's sum and number of question scores per person, for one measure on one split."""

    sums: dict[str, float]
    counts: dict[str, int]


def person_totals(responses: Path) -> dict[tuple[str, str], PersonTotals]:
    """(split, measure) -> per-person totals, from an evaluation's responses.jsonl (item ids read
    <data split>/<person>/<task>/<index>)."""
    totals: dict[tuple[str, str], PersonTotals] = defaultdict(lambda: PersonTotals({}, {}))
    for line in Path(responses).read_text().splitlines():
        record = json.loads(line)
        person = record["item_id"].split("/")[1]
        for measure, value in question_measures(record["task"], record["modality"], record["scores"]).items():
            entry = totals[(record["split"], measure)]
            entry.sums[person] = entry.sums.get(person, 0.0) + value
            entry.counts[person] = entry.counts.get(person, 0) + 1
    return dict(totals)


class PeopleAndSeeds:
    """Resampled values of every cell: cells[(method, split, measure)] holds one PersonTotals per seed run."""

    def __init__(
        self, cells: Mapping[Cell, Sequence[PersonTotals]], draws: int = 2000, seed: int = 0
    ) -> None:
        rng = np.random.default_rng(seed)
        self.num_draws = draws
        # Splits asked about the same people share one draw of them (forget_heldout and forget_relearned).
        people_of: dict[str, tuple[str, ...]] = {}
        for (_, split, _), runs in cells.items():
            known = set(people_of.get(split, ())).union(*(run.counts for run in runs))
            people_of[split] = tuple(sorted(known))
        person_draws = {
            people: rng.integers(0, len(people), (draws, len(people)))
            for people in sorted(set(people_of.values()))
        }
        seed_draws: dict[tuple[str, int], np.ndarray] = {}
        self.values: dict[Cell, np.ndarray] = {}
        for cell, runs in cells.items():
            method, split, _ = cell
            people = people_of[split]
            if (method, len(runs)) not in seed_draws:
                seed_draws[(method, len(runs))] = rng.integers(0, len(runs), (draws, len(runs)))
            sums = np.array([[run.sums.get(person, 0.0) for person in people] for run in runs])
            counts = np.array([[run.counts.get(person, 0) for person in people] for run in runs])
            chosen = person_draws[people]
            with np.errstate(invalid="ignore", divide="ignore"):
                per_seed = sums[:, chosen].sum(axis=2) / counts[:, chosen].sum(axis=2)  # (seeds, draws)
            drawn = per_seed[seed_draws[(method, len(runs))], np.arange(draws)[:, None]]  # (draws, seeds)
            # A resample that drew only people without this measure's questions has no value (NaN).
            answered = (~np.isnan(drawn)).sum(axis=1)
            self.values[cell] = np.where(
                answered > 0, np.nansum(drawn, axis=1) / np.maximum(answered, 1), np.nan
            )

    def interval(self, cell: Cell, confidence: float = 0.95) -> tuple[float, float] | None:
        """The central `confidence` interval of a cell's resampled values (None for an unknown cell)."""
        values = self.values.get(cell)
        if values is None or np.isnan(values).all():
            return None
        low, high = np.nanquantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
        return float(low), float(high)

    def share_holding(self, check: Callable[[Callable[[str, str, str], float]], bool]) -> float:
        """The share of resamples in which check(m) holds, m(method, split, measure) reading that resample."""
        held = 0
        for draw in range(self.num_draws):

            def measured(method: str, split: str, measure: str, draw: int = draw) -> float:
                return float(self.values[(method, split, measure)][draw])

            try:
                held += bool(check(measured))
            except KeyError:
                return math.nan
        return held / self.num_draws
