"""Intervals over people and seeds for the report's means and its findings (docs/evaluation.md, "Intervals").

A split's measure is the mean over its questions, which are grouped by person; a method's cell is the mean
of that over its seeds. The two levels are treated apart:

* people: a paired bootstrap. A resample draws the people of every split with replacement (the same draw
  for every method, so comparisons between methods are paired) and recomputes each seed run's value as
  the question-weighted mean over the drawn people; the cell is the mean over the seeds (`people_values`).
* seeds: a handful of training runs, too few for a bootstrap (with 3 seeds a percentile bootstrap never
  leaves the observed seeds' range, so it calls "holds in 100% of resamples" whatever holds for the worst
  seed). Each method's between-seed standard error gets a Student t quantile with seeds - 1 degrees of
  freedom, the interval a t-test would give.

A claim or a cell is a margin D (positive where the claim holds) of the means, and `Margin` combines the
two levels. People and seeds are crossed (every seed run answers the same people), so in the two-way
crossed random-effects model (Cornfield & Tukey 1956; Searle, Casella & McCulloch 1992, Variance
Components, ch. 4) the error of D on the means over n_s seeds and n_p people has the variance

    Var(D) = s2_seed / n_s + s2_people / n_p + s2_interaction / (n_s n_p).

The between-seed variance of the per-seed margins, / n_s, estimates the first and the last term; the
variance of D over the people resamples (the seeds averaged) the second and the last; so adding the
two counts the small interaction term twice and errs on the safe side. The confidence limits add the
two parts' own limits in quadrature, the MOVER construction for a sum of independent parts (Zou &
Donner 2008, Stat. Med. 27:1693): with h_people = D - (D's 1 - c quantile over the people resamples)
and se_k the standard error of D over method k's n_k seeds (the other methods at their means),

    lower_c(D) = D - sqrt(h_people^2 + sum_k (t_{c, n_k - 1} se_k)^2)     (the upper limit alike).

With no spread over the people this is the t-test on the seeds exactly; with one seed per method it is
the people's percentile bootstrap (the verdict then rests on the people only: say so). A claim of several
inequalities holds when every margin's lower limit is above 0 (an intersection-union test, Berger 1982,
Technometrics 24:295: each at level c gives the conjunction level c).

`values` keeps the former draws of people and seeds together (the percentile bootstrap over seeds,
too liberal with few seeds); `share_holding` reads them.
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


Measured = Callable[[str, str, str], float]  # m(method, split, measure)
Margins = Callable[[Measured], "float | Sequence[float]"]  # a claim's margins, each > 0 where it holds


def _student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer df: the exact finite series (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, term, series = math.cos(theta) ** 2, 1.0, 0.0
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 3 terms by 2
        for j in range(1, (df - 1) // 2 + 1):
            series += term
            term *= cos2 * 2 * j / (2 * j + 1)
        central = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df / 2 terms
        for j in range(1, df // 2 + 1):
            series += term
            term *= cos2 * (2 * j - 1) / (2 * j)
        central = math.sin(theta) * series
    return 0.5 + math.copysign(0.5 * central, t)


def student_t_quantile(probability: float, df: int) -> float:
    """The t with P(T <= t) = probability, Student's t with integer df >= 1 (bisection on the exact cdf)."""
    if not 0.0 < probability < 1.0 or df < 1:
        raise ValueError(f"need 0 < probability < 1 and df >= 1, got {probability}, {df}")
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while _student_t_cdf(high, df) < probability:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if _student_t_cdf(middle, df) < probability else (low, middle)
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Margin:
    """A claim's margin D on the means over seeds (> 0 where the claim holds) and what its error is made
    of; the limits combine the people and the seeds as the module docstring explains."""

    estimate: float
    people: np.ndarray  # (draws,) D in each resample of the people, seeds averaged (NaN: no value)
    seed_errors: tuple[tuple[float, int], ...]  # (standard error of D over a method's seeds, seeds), >= 2
    seeds: Mapping[str, int]  # method -> the seeds its means average (1: the people only, for it)

    def _seed_part(self, level: float) -> float:
        return sum((student_t_quantile(level, n - 1) * error) ** 2 for error, n in self.seed_errors)

    def lower(self, confidence: float = 0.95) -> float:
        """The one-sided lower confidence limit."""
        people = max(self.estimate - float(np.nanquantile(self.people, 1 - confidence)), 0.0)
        return self.estimate - math.sqrt(people**2 + self._seed_part(confidence))

    def upper(self, confidence: float = 0.95) -> float:
        """The one-sided upper confidence limit."""
        people = max(float(np.nanquantile(self.people, confidence)) - self.estimate, 0.0)
        return self.estimate + math.sqrt(people**2 + self._seed_part(confidence))

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """The two-sided interval: each limit at (1 + confidence) / 2."""
        level = (1 + confidence) / 2
        return self.lower(level), self.upper(level)


@dataclass(frozen=True)
class Verdict:
    """Whether a claim holds at `confidence`: every margin's lower limit above 0."""

    holds: bool
    margins: tuple[Margin, ...]
    confidence: float

    @property
    def seeds(self) -> dict[str, int]:
        """method -> the seeds the claim's means of it rest on."""
        return {method: n for margin in self.margins for method, n in sorted(margin.seeds.items())}

    @property
    def fewest_seeds(self) -> int:
        """The fewest seeds of any method the claim reads (1: that method's part rests on people only)."""
        return min(self.seeds.values(), default=1)

    def basis(self) -> str:
        """What the verdict rests on, for the report: 'people only (one seed)' or 'people and seeds (...)'."""
        if max(self.seeds.values(), default=1) == 1:
            return "people only (one seed)"
        counts = ", ".join(f"{method} {n}" for method, n in self.seeds.items())
        one_seed = "; a method with 1 seed: people only" if self.fewest_seeds == 1 else ""
        return f"people and seeds ({counts}{one_seed})"


class PeopleAndSeeds:
    """Resampled values of every cell: cells[(method, split, measure)] holds one PersonTotals per seed run.

    seed_values[cell] (runs,): each run's value on the people as they are; people_values[cell] (draws,):
    the mean over the runs in each resample of the people; values[cell] (draws,): the former draws of
    people and seeds together (share_holding). margins/verdict/interval combine the people and the seeds.
    """

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
        self.seed_values: dict[Cell, np.ndarray] = {}
        self.people_values: dict[Cell, np.ndarray] = {}
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
            self.seed_values[cell] = sums.sum(axis=1) / counts.sum(axis=1)
            self.people_values[cell] = _mean_over_answered(per_seed.T)
            drawn = per_seed[seed_draws[(method, len(runs))], np.arange(draws)[:, None]]  # (draws, seeds)
            self.values[cell] = _mean_over_answered(drawn)
        self.means = {cell: float(np.mean(runs)) for cell, runs in self.seed_values.items()}

    def interval(self, cell: Cell, confidence: float = 0.95) -> tuple[float, float] | None:
        """The cell's two-sided `confidence` interval over people and seeds (None for an unknown cell)."""
        if cell not in self.seed_values or np.isnan(self.people_values[cell]).all():
            return None
        runs = self.seed_values[cell]
        errors = ((float(runs.std(ddof=1)) / math.sqrt(len(runs)), len(runs)),) if len(runs) > 1 else ()
        margin = Margin(self.means[cell], self.people_values[cell], errors, {cell[0]: len(runs)})
        return margin.interval(confidence)

    def verdict(self, claim: Margins, confidence: float = 0.95) -> Verdict | None:
        """Whether every margin claim(m) returns (each > 0 where the claim holds, e.g. a - b for 'a > b')
        has its one-sided `confidence` lower limit above 0; None when a cell it reads was not resampled."""
        margins = self.margins(claim)
        if margins is None:
            return None
        holds = all(margin.lower(confidence) > 0 for margin in margins)
        return Verdict(holds, tuple(margins), confidence)

    def margins(self, claim: Margins) -> list[Margin] | None:
        """claim(m)'s margins on the means, each with its people resamples and per-method seed errors
        (None: a cell it reads was not resampled, or no resample of the people has a value)."""
        read: set[Cell] = set()
        try:
            estimate = _margins_of(claim, self._reader(self.means.__getitem__, read))
            people = np.array(
                [
                    _margins_of(claim, self._reader(lambda cell, d=draw: self.people_values[cell][d], read))
                    for draw in range(self.num_draws)
                ]
            ).reshape(self.num_draws, len(estimate))
        except KeyError:
            return None
        if np.isnan(people).all(axis=0).any():
            return None
        # A method's means rest on its fewest runs among the cells read (a run may lack a split).
        methods = sorted({cell[0] for cell in read})
        seeds = {method: min(len(self.seed_values[c]) for c in read if c[0] == method) for method in methods}
        errors = self._seed_errors(
            claim, {(cell[0], len(self.seed_values[cell])) for cell in read}, len(estimate)
        )
        return [
            Margin(float(value), people[:, index], errors[index], seeds)
            for index, value in enumerate(estimate)
        ]

    def _seed_errors(
        self, claim: Margins, groups: set[tuple[str, int]], margins: int
    ) -> list[tuple[tuple[float, int], ...]]:
        """Per margin, (standard error, runs) for each method with >= 2 runs: the margin evaluated on each
        of the method's runs in turn, every other cell at its mean; the standard error of their mean."""
        errors: list[list[tuple[float, int]]] = [[] for _ in range(margins)]
        for method, runs in sorted(group for group in groups if group[1] > 1):
            per_run = np.array([_margins_of(claim, self._at_run(method, runs, run)) for run in range(runs)])
            for index, error in enumerate(
                per_run.reshape(runs, margins).std(axis=0, ddof=1) / math.sqrt(runs)
            ):
                errors[index].append((float(error), runs))
        return [tuple(entries) for entries in errors]

    def _reader(self, value_of: Callable[[Cell], float], read: set[Cell]) -> Measured:
        """m(method, split, measure) = value_of(cell), noting the cells read; KeyError for an unknown one."""

        def measured(method: str, split: str, measure: str) -> float:
            cell = (method, split, measure)
            if cell not in self.seed_values:
                raise KeyError(cell)
            read.add(cell)
            return float(value_of(cell))

        return measured

    def _at_run(self, method: str, runs: int, run: int) -> Measured:
        """m reading run `run` of the method's cells that have `runs` runs, every other cell at its mean."""

        def value_of(cell: Cell) -> float:
            in_group = cell[0] == method and len(self.seed_values[cell]) == runs
            return float(self.seed_values[cell][run]) if in_group else self.means[cell]

        return self._reader(value_of, set())

    def share_holding(self, check: Callable[[Callable[[str, str, str], float]], bool]) -> float:
        """The share of the former draws of people and seeds (`values`) in which check(m) holds. With few
        seeds this is too liberal (module docstring); a verdict on a claim's margins is `verdict`."""
        held = 0
        for draw in range(self.num_draws):

            def measured(method: str, split: str, measure: str, draw: int = draw) -> float:
                return float(self.values[(method, split, measure)][draw])

            try:
                held += bool(check(measured))
            except KeyError:
                return math.nan
        return held / self.num_draws


def _mean_over_answered(per_run: np.ndarray) -> np.ndarray:
    """(draws, runs) -> (draws,) the mean over the runs that have a value; NaN where none has (a resample
    that drew only people without this measure's questions)."""
    answered = (~np.isnan(per_run)).sum(axis=1)
    return np.where(answered > 0, np.nansum(per_run, axis=1) / np.maximum(answered, 1), np.nan)


def _margins_of(claim: Margins, measured: Measured) -> np.ndarray:
    return np.atleast_1d(np.asarray(claim(measured), dtype=float))
