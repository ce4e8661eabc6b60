"""The student-aware truncation rule when the support cap binds (issue 30, defect 5): the top-p set comes
first, the extras ranked by R + Q fill the room it leaves; where the cap does not bind, nothing changes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_distributions import cases, dense_kl, random_case

import cache.distributions as distributions
from cache.distributions import sparse_kl, tail_bucket_errors, truncate_probabilities


def student_aware_before_issue_30(probs, student, top_ids, keep, width, tail_cost):
    """The rule as it was: candidates are the top `width` by R + Q only, so top-p members ranked below
    them are lost. The reference for 'unchanged where the cap does not bind'."""
    _, order = torch.topk(probs + student, width, dim=-1, sorted=True)
    errors = tail_bucket_errors(probs, student, order)
    prefix = torch.argmin(errors + tail_cost * torch.arange(1, width + 1), dim=-1)
    kept_by_error = torch.arange(width)[None, :] <= prefix[:, None]
    vocab_size = probs.shape[-1]
    marked = torch.zeros(probs.shape[0], vocab_size + 1, dtype=torch.bool)
    marked.scatter_(1, torch.where(keep, top_ids, torch.full_like(top_ids, vocab_size)), True)
    in_top_p = marked[:, :vocab_size].gather(1, order)
    return order, probs.gather(1, order), kept_by_error | in_top_p


def the_old_rule(*args, **kwargs):
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(distributions, "_student_aware", student_aware_before_issue_30)
        return truncate_probabilities(*args, **kwargs)


def supports(truncated) -> list[set[int]]:
    return [set(row[row >= 0].tolist()) for row in truncated.support_ids]


def top_p_set(probs: torch.Tensor, top_p: float) -> list[list[int]]:
    """Dense: per row, the most probable tokens until the mass before the next one reaches top_p,
    most probable first (every token when top_p >= 1)."""
    result = []
    for row in probs:
        ranked = torch.argsort(row, descending=True)
        mass_before = torch.cumsum(row[ranked], 0) - row[ranked]
        size = len(row) if top_p >= 1 else int((mass_before < top_p).sum())
        result.append(ranked[: max(size, 1)].tolist())
    return result


def test_the_issue_example_keeps_the_top_p_set_when_the_cap_binds():
    # Vocabulary 8, cap 4, top-p set {0, 1, 2}; the student's tail has the teacher's shape (top-p alone:
    # no error) but puts its mass on 3..7, so R + Q ranks [0, 3, 4, 5] first: the old rule kept exactly
    # those, 0.57 of the teacher's mass, with a KL error of 0.32 nats.
    teacher = torch.tensor([[0.30, 0.20, 0.12, 0.10, 0.09, 0.08, 0.06, 0.05]], dtype=torch.float64)
    student = torch.cat([torch.tensor([0.04, 0.03, 0.03]).double(), 0.9 * teacher[0, 3:] / 0.38])[None]
    truncated = truncate_probabilities(teacher, 0.6, 4, student=student, tail_cost=1e-3)
    kept = supports(truncated)[0]
    assert {0, 1, 2} <= kept and len(kept) <= 4
    error = dense_kl(teacher, student.log()) - sparse_kl(
        truncated.support_ids, truncated.support_probs, truncated.tail_mass, student.log()
    )
    assert float(error) == pytest.approx(0.0, abs=1e-6)
    assert float(truncated.tail_mass[0]) <= 0.38 + 1e-6


@settings(max_examples=80, deadline=None)
@given(
    cases,
    st.floats(0.05, 1.0),
    st.integers(1, 39),
    st.sampled_from([1e-4, 1e-3, 1e-2]),
    st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_a_binding_cap_keeps_the_most_probable_top_p_members_and_the_target(
    case, top_p, max_support, tail_cost, pick
):
    teacher_logits, student_logits = random_case(*case)
    teacher, student = torch.softmax(teacher_logits, -1), torch.softmax(student_logits, -1)
    rows, vocab = teacher.shape
    include = None
    if pick is not None:
        include = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(pick))
    truncated = truncate_probabilities(
        teacher, top_p, max_support, include=include, student=student, tail_cost=tail_cost
    )
    width = min(max_support, vocab)
    for row, (kept, members) in enumerate(zip(supports(truncated), top_p_set(teacher, top_p), strict=True)):
        assert len(kept) <= width
        most_probable = members[:width]
        target = None if include is None else int(include[row])
        needed = len(most_probable)
        if target is not None:
            assert target in kept
            # A full top-p set gives its least probable member's place to a target outside it.
            if target not in most_probable and needed == width:
                needed -= 1
        assert set(most_probable[:needed]) <= kept


@settings(max_examples=60, deadline=None)
@given(
    cases,
    st.floats(0.05, 1.0),
    st.integers(0, 10),
    st.sampled_from([1e-4, 1e-3, 1e-2]),
    st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_without_a_binding_cap_the_support_is_byte_for_byte_the_old_one(
    case, top_p, above_vocab, tail_cost, pick
):
    teacher_logits, student_logits = random_case(*case, dtype=torch.float32)
    teacher, student = torch.softmax(teacher_logits, -1), torch.softmax(student_logits, -1)
    rows, vocab = teacher.shape
    include = None
    if pick is not None:
        include = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(pick))
    arguments = (teacher, top_p, vocab + above_vocab)
    options = {"include": include, "student": student, "tail_cost": tail_cost}
    new, old = truncate_probabilities(*arguments, **options), the_old_rule(*arguments, **options)
    for field in ("support_ids", "support_probs", "tail_mass", "entropy"):
        assert torch.equal(getattr(new, field), getattr(old, field)), field


@settings(max_examples=80, deadline=None)
@given(cases, st.floats(0.05, 1.0), st.integers(1, 39), st.sampled_from([1e-4, 1e-3, 1e-2]))
def test_rows_the_old_rule_kept_whole_within_the_cap_are_unchanged(case, top_p, max_support, tail_cost):
    """Below the vocabulary, a row is unchanged wherever the old rule lost nothing: its support held the
    whole top-p set and had room left under the cap."""
    teacher_logits, student_logits = random_case(*case)
    teacher, student = torch.softmax(teacher_logits, -1), torch.softmax(student_logits, -1)
    options = {"student": student, "tail_cost": tail_cost}
    new = truncate_probabilities(teacher, top_p, max_support, **options)
    old = the_old_rule(teacher, top_p, max_support, **options)
    width = min(max_support, teacher.shape[1])
    for row, (kept_new, kept_old, members) in enumerate(
        zip(supports(new), supports(old), top_p_set(teacher, top_p), strict=True)
    ):
        if set(members[:width]) <= kept_old and len(kept_old) < width:
            assert kept_new == kept_old
            assert torch.equal(new.tail_mass[row], old.tail_mass[row])
        else:  # the old rule lost a top-p member or was full: the new support is never smaller
            assert set(members[:width]) <= kept_new and len(kept_new) >= min(len(kept_old), width)
