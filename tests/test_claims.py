"""The papers' claims as data (pipeline/reporting/claims.py): each checked on the means, failing only on the
numbers it reads, and listed as not checked (never dropped) when its run is missing."""

from __future__ import annotations

import pytest

from pipeline.reporting.claims import PAPER_CLAIMS, Claim, Comparison, Value, finding_lines, findings


def _summary(values: dict[str, dict[str, dict[str, float]]]):
    return {
        method: {
            split: {metric: (value, None, 1) for metric, value in metrics.items()}
            for split, metrics in splits.items()
        }
        for method, splits in values.items()
    }


def _paper_like() -> dict[str, dict[str, dict[str, float]]]:
    def run(forget_mc, forget_rouge, retain_rouge, coherence):
        return {
            "forget": {"mc_acc": forget_mc, "rougeL": forget_rouge},
            "retain": {"rougeL": retain_rouge, "coherence": coherence},
        }

    return {
        "full": run(1.0, 1.0, 1.0, 1.0),
        "ga": run(0.1, 0.0, 0.2, 0.3),
        "npo": run(0.3, 0.2, 0.5, 0.6),
        "viker": run(0.3, 0.5, 0.9, 0.95),
        "vgid": run(0.8, 0.6, 0.95, 1.0),
        "viker_no_ga": run(0.8, 0.9, 1.0, 1.0),
        "viker_no_vis": run(0.3, 0.3, 0.6, 0.7),
    }


def test_findings_check_each_claim_on_the_means():
    checked = findings(_summary(_paper_like()))
    assert len(checked) == 9 and all(finding.holds for finding in checked)
    # Each claim fails when its numbers say otherwise, and only the claims that read them.
    for method, split, metric, value, failing in [
        ("full", "forget", "mc_acc", 0.8, ["The full model"]),
        ("ga", "retain", "coherence", 0.9, ["GA destroys"]),
        ("viker", "forget", "mc_acc", 0.42, ["ViKeR forgets"]),
        # Far from chance, ViKeR's forgetting no longer compares with GA's (0.1) or NPO's (0.3).
        ("viker", "forget", "mc_acc", 0.7, ["ViKeR forgets", "ViKeR beats GA", "ViKeR beats NPO"]),
        ("viker", "retain", "rougeL", 0.75, ["ViKeR keeps"]),
        ("npo", "retain", "rougeL", 0.95, ["ViKeR beats NPO"]),
        ("vgid", "forget", "rougeL", 0.8, ["Vgid"]),
        ("vgid", "retain", "rougeL", 0.9, ["Vgid"]),
        ("viker_no_ga", "forget", "mc_acc", 0.2, ["ViKeR w/o GA"]),
        ("viker_no_vis", "retain", "rougeL", 0.95, ["ViKeR w/o Vis"]),
    ]:
        values = _paper_like()
        values[method][split][metric] = value
        failed = [finding.claim for finding in findings(_summary(values)) if finding.holds is False]
        assert len(failed) == len(failing), (method, metric, failed)
        assert all(claim.startswith(start) for claim, start in zip(failed, failing, strict=True)), failed


def test_a_claim_whose_run_is_missing_is_listed_as_not_checked():
    partial = {name: runs for name, runs in _paper_like().items() if name in ("full", "viker")}
    checked = findings(_summary(partial))
    assert [finding.claim for finding in checked] == [claim.text for claim in PAPER_CLAIMS]  # none dropped
    assert [finding.claim for finding in checked if finding.holds] == [
        "The full model remembers: forget MC ≥ 0.9, forget ROUGE-L ≥ 0.8",
        "ViKeR forgets: forget MC within 0.15 of chance (0.25)",
        "ViKeR keeps: retain ROUGE-L ≥ 0.8 × and GIB ≥ 0.9 × the full model's",
    ]
    ga = next(finding for finding in checked if finding.claim.startswith("GA destroys"))
    assert ga.holds is None and ga.measured == "run ga missing"
    lines = finding_lines(checked)
    assert "- not checked: GA destroys retention and coherence" in lines[1] and lines[1].endswith(
        "(run ga missing)"
    )
    # A run that is there but was not scored on a measure the claim reads: not checked either, and said so.
    del partial["viker"]["retain"]["coherence"]
    keeps = next(f for f in findings(_summary(partial)) if f.claim.startswith("ViKeR keeps"))
    assert keeps.holds is None and keeps.measured == "viker retain coherence not measured"


def test_a_claim_names_the_runs_it_needs_and_shows_what_it_compared():
    claim = Claim(
        "A forgets more than B, by 0.1",
        (Comparison(Value("b", "forget", "mc_acc", minus="a"), ">=", 0.1),
         Comparison(Value("a", "forget", "mc_acc", from_level=0.25), "<", Value("b", "retain", "rougeL", scale=0.5, plus=0.1))),
    )  # fmt: skip
    assert claim.runs == ["b", "a"]
    summary = _summary(
        {"a": {"forget": {"mc_acc": 0.3}}, "b": {"forget": {"mc_acc": 0.5}, "retain": {"rougeL": 0.2}}}
    )
    [finding] = findings(summary, claims=[claim])
    assert finding.holds is True  # 0.5 - 0.3 >= 0.1 and |0.3 - 0.25| < 0.5 * 0.2 + 0.1
    assert finding.measured == (
        "b − a forget MC 0.200 ≥ 0.1, |a forget MC − 0.25| 0.050 < 0.5 × b retain ROUGE-L 0.200 + 0.1"
    )
    assert [f.measured for f in findings({"a": summary["a"]}, claims=[claim])] == ["run b missing"]
    assert [f.measured for f in findings({}, claims=[claim])] == ["runs b, a missing"]


def test_each_comparison_gives_margins_positive_where_it_holds():
    """The verdict reads margins (issue 30): a ≥ k·b gives a - k·b; |x - c| ≤ d gives d - (x - c) and
    d + (x - c); |a - c| ≤ |b - c| + d gives one margin per sign of a - c, |b - c| kept whole."""
    summary = _summary(_paper_like())

    def m(method, split, metric):
        return summary[method][split][metric][0]

    keeps = next(claim for claim in PAPER_CLAIMS if claim.text.startswith("ViKeR keeps"))
    assert keeps.margins(m) == pytest.approx((0.9 - 0.8 * 1.0, 0.95 - 0.9 * 1.0))
    forgets = next(claim for claim in PAPER_CLAIMS if claim.text.startswith("ViKeR forgets"))
    assert forgets.margins(m) == pytest.approx((0.15 - 0.05, 0.15 + 0.05))  # forget MC 0.3
    beats = next(claim for claim in PAPER_CLAIMS if claim.text.startswith("ViKeR beats GA"))
    # retain: 0.9 - 0.2; forgetting: |0.1 - 0.25| + 0.15 - (±(0.3 - 0.25))
    assert beats.margins(m) == pytest.approx((0.7, 0.3 - 0.05, 0.3 + 0.05))
    vgid = next(claim for claim in PAPER_CLAIMS if claim.text.startswith("Vgid"))
    assert vgid.margins(m) == pytest.approx((0.4 - 0.3, 0.06 - 0.05))
    # Every paper claim: all margins positive exactly where the comparisons hold on the means.
    for claim in PAPER_CLAIMS:
        assert claim.holds(m) == all(margin > 0 for margin in claim.margins(m)), claim.text
