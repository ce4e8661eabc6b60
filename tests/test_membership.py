"""Membership inference: each attack's score and the AUC on constructed cases."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.evaluation.membership import ATTACKS, auc, membership_aucs, min_k_score, zlib_score

scores = st.lists(st.floats(-50, 0, allow_nan=False), min_size=1, max_size=30)


@settings(max_examples=50, deadline=None)
@given(scores)
def test_identical_score_distributions_give_half(values):
    assert auc(values, values) == pytest.approx(0.5)


@settings(max_examples=50, deadline=None)
@given(scores, scores)
def test_separated_scores_give_one_and_reversed_zero_and_the_two_sum_to_one(low, high):
    shifted = [value + 100 for value in high]
    assert auc(shifted, low) == 1.0 and auc(low, shifted) == 0.0
    assert auc(low, high) + auc(high, low) == pytest.approx(1.0)


def test_auc_counts_ties_as_half_and_needs_both_sides():
    assert auc([1.0, 2.0], [1.0, 0.0]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        auc([], [1.0])


def test_attack_scores():
    log_probs = torch.tensor([-0.1, -3.0, -0.2, -5.0, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8])
    assert ATTACKS["loss"](log_probs, "x") == pytest.approx(float(log_probs.mean()))
    assert min_k_score(log_probs, "x") == pytest.approx((-5.0 - 3.0) / 2)  # 20% of 10 tokens: the two lowest
    assert min_k_score(torch.tensor([-2.0]), "x") == -2.0  # at least one token
    answer = "This person works as a software engineer."
    assert zlib_score(log_probs, answer) == pytest.approx(
        float(log_probs.mean()) / len(zlib.compress(answer.encode()))
    )


def test_a_memorising_model_is_told_apart_and_a_forgetting_one_is_not():
    """Members with higher likelihood than non-members give AUC 1 for every attack; the same likelihoods
    on both sides give 0.5."""
    generator = torch.Generator().manual_seed(0)
    answers = ["The name of this person is Ada Lovelace.", "This person enjoys hiking in their free time."]
    members = [(-0.01 * torch.rand(8, generator=generator), answers[i % 2]) for i in range(10)]
    nonmembers = [(-3 - torch.rand(8, generator=generator), answers[i % 2]) for i in range(12)]
    separated = membership_aucs(members, nonmembers)
    assert {key: separated[key] for key in ("loss_auc", "min_k_auc", "zlib_auc")} == {
        "loss_auc": 1.0, "min_k_auc": 1.0, "zlib_auc": 1.0,
    }  # fmt: skip
    assert (separated["members"], separated["nonmembers"]) == (10, 12)
    same = membership_aucs(members, members)
    assert all(math.isclose(same[f"{name}_auc"], 0.5) for name in ATTACKS)
