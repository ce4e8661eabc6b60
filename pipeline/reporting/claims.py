"""The papers' claims on MLLMU-Bench as data: each a list of comparisons between measured cells, checked on
the means over seeds and, with resamples over people and seeds, by its margins' 95% lower limits
(`PeopleAndSeeds.verdict`: a paired bootstrap over people, a t quantile over seeds; docs/evaluation.md,
"Intervals"). A claim whose run was not evaluated is listed as not checked, naming the run."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.evaluation.bootstrap import PeopleAndSeeds
from pipeline.reporting.runs import Summary, display_name

CHANCE_MC = 0.25  # four options
CONFIDENCE = 0.95  # each margin's one-sided lower limit at this confidence must be above 0

Measured = Callable[[str, str, str], float]  # m(method, split, metric)
OPERATORS = {
    ">=": (operator.ge, "≥"),
    ">": (operator.gt, ">"),
    "<=": (operator.le, "≤"),
    "<": (operator.lt, "<"),
}
METRIC_NAMES = {"mc_acc": "MC", "rougeL": "ROUGE-L", "coherence": "GIB"}


@dataclass(frozen=True)
class Value:
    """scale × x + plus, x the mean of (method, split, metric), less `minus`'s same cell when given (a
    drop), then taken as the distance |x - from_level| when given (e.g. from chance)."""

    method: str
    split: str
    metric: str
    minus: str | None = None
    from_level: float | None = None
    scale: float = 1.0
    plus: float = 0.0

    @property
    def methods(self) -> tuple[str, ...]:
        return (self.method,) if self.minus is None else (self.method, self.minus)

    def signed(self, m: Measured) -> float:
        """x (less `minus`'s cell), before any distance from a level is taken."""
        x = m(self.method, self.split, self.metric)
        return x if self.minus is None else x - m(self.minus, self.split, self.metric)

    def raw(self, m: Measured) -> float:
        x = self.signed(m)
        return x if self.from_level is None else abs(x - self.from_level)

    def of(self, m: Measured) -> float:
        return self.raw(m) * self.scale + self.plus

    def branches(self, m: Measured) -> tuple[float, ...]:
        """The value as the largest of smooth terms: itself, or for |x - level| the two signed distances
        scale × ±(x - level) + plus; 'this ≤ y' is then one margin y - term per term, each must hold."""
        if self.from_level is None:
            return (self.of(m),)
        distance = self.signed(m) - self.from_level
        return tuple(self.scale * sign * distance + self.plus for sign in (1.0, -1.0))

    def describe(self, m: Measured) -> str:
        """e.g. `0.5 × Full retain ROUGE-L 0.982` or `|ViKeR forget MC − 0.25| 0.099 + 0.15`."""
        term = " − ".join(display_name(method) for method in self.methods)
        term = f"{term} {self.split} {METRIC_NAMES.get(self.metric, self.metric)}"
        if self.from_level is not None:
            term = f"|{term} − {self.from_level:g}|"
        scale = f"{self.scale:g} × " if self.scale != 1.0 else ""
        plus = f" + {self.plus:g}" if self.plus else ""
        return f"{scale}{term} {self.raw(m):.3f}{plus}"


@dataclass(frozen=True)
class Comparison:
    """left op right, op one of OPERATORS; right a Value or a constant."""

    left: Value
    op: str
    right: Value | float

    def sides(self, m: Measured) -> tuple[float, float]:
        right = self.right.of(m) if isinstance(self.right, Value) else self.right
        return self.left.of(m), right

    def margins(self, m: Measured) -> tuple[float, ...]:
        """Each > 0 where the comparison holds: larger side - smaller side, one per smooth term of the
        side that must be smaller (|x - c| ≤ d is x - c ≤ d and c - x ≤ d)."""
        larger, smaller = (self.left, self.right) if self.op in (">=", ">") else (self.right, self.left)
        big = larger.of(m) if isinstance(larger, Value) else larger
        terms = smaller.branches(m) if isinstance(smaller, Value) else (smaller,)
        return tuple(big - term for term in terms)

    def describe(self, m: Measured) -> str:
        right = self.right.describe(m) if isinstance(self.right, Value) else f"{self.right:g}"
        return f"{self.left.describe(m)} {OPERATORS[self.op][1]} {right}"


@dataclass(frozen=True)
class Claim:
    """A paper's claim: it holds when every comparison does."""

    text: str
    comparisons: tuple[Comparison, ...]

    @property
    def cells(self) -> list[tuple[str, str, str]]:
        """Every (method, split, metric) the claim reads, in order of first use."""
        values = [side for c in self.comparisons for side in (c.left, c.right) if isinstance(side, Value)]
        found = [(method, value.split, value.metric) for value in values for method in value.methods]
        return list(dict.fromkeys(found))

    @property
    def runs(self) -> list[str]:
        """The methods whose runs the claim needs."""
        return list(dict.fromkeys(method for method, _, _ in self.cells))

    def holds(self, m: Measured) -> bool:
        # Every cell is read before judging, so a cell missing from the resamples is noticed (KeyError).
        sides = [comparison.sides(m) for comparison in self.comparisons]
        return all(
            OPERATORS[c.op][0](left, right) for c, (left, right) in zip(self.comparisons, sides, strict=True)
        )

    def margins(self, m: Measured) -> tuple[float, ...]:
        """Every comparison's margins, each > 0 where it holds: the claim holds when all do."""
        return tuple(margin for comparison in self.comparisons for margin in comparison.margins(m))

    def describe(self, m: Measured) -> str:
        return ", ".join(comparison.describe(m) for comparison in self.comparisons)


def _beats_at_comparable_forgetting(other: str) -> Claim:
    # Comparable forgetting: ViKeR's forget MC is at least as close to chance (the accuracy of a model
    # that never saw the people, ViKeR's "Origin"), give or take 0.15; below chance is no better.
    return Claim(
        f"ViKeR beats {display_name(other)} on retain ROUGE-L at comparable forgetting (forget MC as close "
        "to chance, within 0.15)",
        (
            Comparison(Value("viker", "retain", "rougeL"), ">", Value(other, "retain", "rougeL")),
            Comparison(
                Value("viker", "forget", "mc_acc", from_level=CHANCE_MC),
                "<=",
                Value(other, "forget", "mc_acc", from_level=CHANCE_MC, plus=0.15),
            ),
        ),
    )


# The papers' claims on MLLMU-Bench (ViKeR Sec. 6 and Table 1, Vgid Sec. 4.2 and Table 3, ViKeR Table 3's
# ablations), with the thresholds the mini world's docs/evaluation.md states.
PAPER_CLAIMS: tuple[Claim, ...] = (
    Claim(
        "The full model remembers: forget MC ≥ 0.9, forget ROUGE-L ≥ 0.8",
        (
            Comparison(Value("full", "forget", "mc_acc"), ">=", 0.9),
            Comparison(Value("full", "forget", "rougeL"), ">=", 0.8),
        ),
    ),
    Claim(
        "GA destroys retention and coherence: retain ROUGE-L and GIB below half the full model's",
        (
            Comparison(Value("ga", "retain", "rougeL"), "<", Value("full", "retain", "rougeL", scale=0.5)),
            Comparison(
                Value("ga", "retain", "coherence"), "<", Value("full", "retain", "coherence", scale=0.5)
            ),
        ),
    ),
    Claim(
        f"ViKeR forgets: forget MC within 0.15 of chance ({CHANCE_MC})",
        (Comparison(Value("viker", "forget", "mc_acc", from_level=CHANCE_MC), "<=", 0.15),),
    ),
    Claim(
        "ViKeR keeps: retain ROUGE-L ≥ 0.8 × and GIB ≥ 0.9 × the full model's",
        (
            Comparison(
                Value("viker", "retain", "rougeL"), ">=", Value("full", "retain", "rougeL", scale=0.8)
            ),
            Comparison(
                Value("viker", "retain", "coherence"), ">=", Value("full", "retain", "coherence", scale=0.9)
            ),
        ),
    ),
    _beats_at_comparable_forgetting("ga"),
    _beats_at_comparable_forgetting("npo"),
    Claim(
        "Vgid: forget ROUGE-L drops by ≥ 0.3, retain ROUGE-L by ≤ 0.06",
        (
            Comparison(Value("full", "forget", "rougeL", minus="vgid"), ">=", 0.3),
            Comparison(Value("full", "retain", "rougeL", minus="vgid"), "<=", 0.06),
        ),
    ),
    Claim(
        "ViKeR w/o GA forgets less: higher forget MC than ViKeR",
        (Comparison(Value("viker_no_ga", "forget", "mc_acc"), ">", Value("viker", "forget", "mc_acc")),),
    ),
    Claim(
        "ViKeR w/o Vis keeps less: lower retain ROUGE-L than ViKeR",
        (Comparison(Value("viker_no_vis", "retain", "rougeL"), "<", Value("viker", "retain", "rougeL")),),
    ),
)


@dataclass(frozen=True)
class Finding:
    """A claim checked on the runs: holds is None when it could not be checked (`measured` says why)."""

    claim: str
    holds: bool | None
    measured: str


def check_claim(claim: Claim, summary: Summary, resamples: PeopleAndSeeds | None = None) -> Finding:
    """The claim on the means over seeds and, with resamples, by its margins' lower limits over people and
    seeds (PeopleAndSeeds.verdict): it holds when both do; the finding says what the verdict rests on."""
    missing = [method for method in claim.runs if method not in summary]
    if missing:
        return Finding(claim.text, None, f"run{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing")
    absent = [cell for cell in claim.cells if cell[2] not in summary[cell[0]].get(cell[1], {})]
    if absent:
        return Finding(claim.text, None, f"{' '.join(absent[0])} not measured")

    def point(method: str, split: str, metric: str) -> float:
        return summary[method][split][metric][0]  # the mean over seeds

    holds, measured = claim.holds(point), claim.describe(point)
    verdict = resamples.verdict(claim.margins, CONFIDENCE) if resamples else None  # None: not resampled
    if verdict is not None:
        holds = holds and verdict.holds
        lows = ", ".join(f"{margin.lower(CONFIDENCE):+.3f}" for margin in verdict.margins)
        limits = (
            "margin's {:.0%} lower limit" if len(verdict.margins) == 1 else "margins' {:.0%} lower limits"
        )
        measured = f"{measured}; {limits.format(CONFIDENCE)} {lows}; rests on {verdict.basis()}"
    return Finding(claim.text, holds, measured)


def findings(
    summary: Summary, resamples: PeopleAndSeeds | None = None, claims: Sequence[Claim] = PAPER_CLAIMS
) -> list[Finding]:
    """Every claim checked on the runs, those whose runs are missing included (as not checked)."""
    return [check_claim(claim, summary, resamples) for claim in claims]


def finding_lines(checked: Sequence[Finding]) -> list[str]:
    """One Markdown bullet per finding: reproduced, not reproduced or not checked, with the measured values."""
    verdicts = {True: "reproduced", False: "**not reproduced**", None: "not checked"}
    return [f"- {verdicts[finding.holds]}: {finding.claim} ({finding.measured})" for finding in checked]
