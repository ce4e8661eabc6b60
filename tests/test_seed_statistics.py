"""Few seeds (issue 30, defect 1): the seed level of pipeline/evaluation/bootstrap.py gets a t quantile
with seeds - 1 degrees of freedom, combined with the paired bootstrap over people; known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.bootstrap import PeopleAndSeeds, PersonTotals, student_t_quantile

CELL = ("viker", "forget", "mc_acc")


def constant_run(value: float, people: int = 5) -> PersonTotals:
    """A seed run scoring `value` on each person's one question: no spread over the people."""
    return PersonTotals({f"p{i}": value for i in range(people)}, {f"p{i}": 1 for i in range(people)})


def varied_run(values: list[float]) -> PersonTotals:
    return PersonTotals({f"p{i}": v for i, v in enumerate(values)}, {f"p{i}": 1 for i in range(len(values))})


@pytest.mark.parametrize(
    "probability, df, expected",
    [(0.975, 1, 12.706205), (0.975, 2, 4.302653), (0.95, 2, 2.919986), (0.975, 10, 2.228139),
     (0.95, 29, 1.699127), (0.5, 3, 0.0), (0.025, 4, -2.776445)],
)  # fmt: skip
def test_t_quantiles_match_the_tables(probability, df, expected):
    assert student_t_quantile(probability, df) == pytest.approx(expected, abs=1e-6)


def test_the_issue_example_is_not_reproduced_at_95_percent():
    # Seeds at 0.20 / 0.25 / 0.50, claim "mean > 0.15": one-sided t-test p = 0.107, t-interval
    # [-0.08, 0.72]; the percentile bootstrap over seeds said 100% and [0.20, 0.50].
    seeds = [0.20, 0.25, 0.50]
    resamples = PeopleAndSeeds({CELL: [constant_run(v) for v in seeds]}, draws=500)
    mean, error = float(np.mean(seeds)), float(np.std(seeds, ddof=1)) / math.sqrt(3)
    p_value = 0.5 * (1 - (mean - 0.15) / error / math.sqrt(2 + ((mean - 0.15) / error) ** 2))  # t, 2 df
    assert p_value == pytest.approx(0.107, abs=5e-4)

    def claim(m):
        return m(*CELL) - 0.15

    assert resamples.share_holding(lambda m: claim(m) > 0) == 1.0  # the former, too liberal answer
    verdict = resamples.verdict(claim)
    assert verdict is not None and not verdict.holds and verdict.fewest_seeds == 3
    assert "viker 3" in verdict.basis()
    # Exactly the t-test: it holds at any confidence below 1 - p and at none above.
    assert resamples.verdict(claim, confidence=1 - p_value - 1e-3).holds
    assert not resamples.verdict(claim, confidence=1 - p_value + 1e-3).holds
    low, high = resamples.interval(CELL)
    t_quantile = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t with 2 df at 0.975, in closed form: 4.3027
    t_low, t_high = mean - t_quantile * error, mean + t_quantile * error
    assert (low, high) == pytest.approx((t_low, t_high), abs=1e-9)
    assert round(t_low, 2) == -0.08 and round(t_high, 2) == 0.72
    assert high - low >= t_high - t_low - 1e-9


def test_one_seed_rests_on_the_people_alone_as_before():
    cell = ("full", "forget", "mc_acc")
    resamples = PeopleAndSeeds({cell: [varied_run([1, 0, 1, 1, 0, 1, 1, 1])]}, draws=1000, seed=3)
    # With one seed the people's percentile bootstrap is the whole interval (and the former draws agree).
    expected = np.nanquantile(resamples.people_values[cell], [0.025, 0.975])
    assert resamples.interval(cell) == pytest.approx(tuple(expected), abs=1e-12)
    np.testing.assert_array_equal(resamples.values[cell], resamples.people_values[cell])
    verdict = resamples.verdict(lambda m: m(*cell) - 0.2)
    assert verdict.holds and verdict.fewest_seeds == 1 and verdict.basis() == "people only (one seed)"


def test_the_interval_holds_both_the_people_interval_and_the_seeds_t_interval():
    runs = [
        varied_run([0.9, 0.1, 0.5, 0.7, 0.3, 0.6]),
        varied_run([0.8, 0.2, 0.6, 0.7, 0.2, 0.5]),
        varied_run([0.95, 0.3, 0.7, 0.9, 0.4, 0.8]),
    ]
    resamples = PeopleAndSeeds({CELL: runs}, draws=2000, seed=1)
    low, high = resamples.interval(CELL)
    seeds = resamples.seed_values[CELL]
    half = 4.302653 * float(np.std(seeds, ddof=1)) / math.sqrt(3)
    people_low, people_high = np.nanquantile(resamples.people_values[CELL], [0.025, 0.975])
    assert low <= min(seeds.mean() - half, people_low) and high >= max(seeds.mean() + half, people_high)
    # Variances add: strictly wider than either part alone.
    assert high - low > max(2 * half, people_high - people_low) + 1e-6
    margin = resamples.margins(lambda m: m(*CELL))[0]
    assert margin.interval() == pytest.approx((low, high), abs=1e-12)


def test_each_method_contributes_its_own_seeds_and_a_one_seed_method_its_people():
    full = ("full", "forget", "mc_acc")
    cells = {full: [constant_run(0.9)], CELL: [constant_run(v) for v in (0.2, 0.3, 0.4)]}
    resamples = PeopleAndSeeds(cells, draws=200)
    verdict = resamples.verdict(lambda m: m(*full) - m(*CELL) - 0.3)  # 0.9 - 0.3 = 0.6 > 0.3
    (margin,) = verdict.margins
    assert margin.estimate == pytest.approx(0.3)
    assert margin.seed_errors == ((pytest.approx(0.1 / math.sqrt(3)), 3),)
    assert verdict.seeds == {"full": 1, "viker": 3} and verdict.fewest_seeds == 1
    assert "a method with 1 seed: people only" in verdict.basis()
    assert verdict.holds == (0.3 - 2.919986 * 0.1 / math.sqrt(3) > 0)


def test_a_claim_of_several_inequalities_holds_only_when_each_does():
    cells = {CELL: [constant_run(v) for v in (0.30, 0.31, 0.29)]}
    resamples = PeopleAndSeeds(cells, draws=200)
    within = resamples.verdict(lambda m: (m(*CELL) - 0.10, 0.40 - m(*CELL)))  # |MC - 0.25| <= 0.15
    assert within.holds and len(within.margins) == 2
    assert not resamples.verdict(lambda m: (m(*CELL) - 0.10, 0.31 - m(*CELL))).holds
    assert resamples.verdict(lambda m: m("ga", "forget", "mc_acc") - 0.1) is None


def test_at_the_boundary_a_95_percent_verdict_holds_in_about_5_percent_of_worlds():
    """Calibration with a known answer: seeds drawn around a true mean 0.3, the claim 'mean > 0.3'
    false; the verdict must call it reproduced in at most about 5% of worlds (the percentile bootstrap
    over 3 seeds did in more than 10%)."""
    rng = np.random.default_rng(7)
    reproduced, former = 0, 0
    worlds = 1000
    for world in range(worlds):
        seeds = rng.normal(0.3, 0.1, 3)
        resamples = PeopleAndSeeds({CELL: [constant_run(v, people=3) for v in seeds]}, draws=20, seed=world)
        reproduced += resamples.verdict(lambda m: m(*CELL) - 0.3).holds
        former += resamples.share_holding(lambda m: m(*CELL) > 0.3) >= 0.95
    assert reproduced / worlds < 0.075
    assert former / worlds > 0.10
