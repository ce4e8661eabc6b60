"""The unlearning losses against dense reference implementations and the papers' closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.distributions import PAD_ID, TruncatedDistributions
from pipeline.unlearning.losses import (
    LOSSES,
    AnswerPredictions,
    GradientSaliency,
    MaskedTerm,
    choose_refusal,
    compute_loss,
    load_refusals,
    loss_arguments,
    loss_inputs,
    nll,
    preference_loss,
    steering_direction,
)

PROPERTY = settings(max_examples=25, deadline=None)
answer_lengths_strategy = st.lists(st.integers(1, 5), min_size=1, max_size=4)


@pytest.fixture(scope="module", autouse=True)
def float64_by_default():
    """The references are exact; float64 keeps the comparisons tight (restored for other test modules)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------------------------
# Random inputs and dense references (loops over samples and tokens, full vocabulary)


def random_predictions(generator: torch.Generator, lengths: list[int], vocab: int, scale: float = 3.0):
    tokens = sum(lengths)
    logits = torch.randn(tokens, vocab, generator=generator) * scale
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    return AnswerPredictions(logits, targets, list(lengths))


def random_distributions(generator: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, vocab, generator=generator) * 3.0, dim=-1)


def untruncated(probs: torch.Tensor) -> TruncatedDistributions:
    """A dense teacher in the cache's layout: the whole vocabulary as support, no tail."""
    rows, vocab = probs.shape
    support_ids = torch.arange(vocab).expand(rows, vocab).clone()
    entropy = -(probs * probs.log()).sum(-1)
    return TruncatedDistributions(support_ids, probs.clone(), torch.zeros(rows), entropy)


def dense_sequence_log_probs(predictions: AnswerPredictions) -> torch.Tensor:
    sums, token = [], 0
    for length in predictions.answer_lengths:
        total = 0.0
        for _ in range(length):
            log_probs = torch.log_softmax(predictions.logits[token], dim=-1)
            total = total + log_probs[predictions.targets[token]]
            token += 1
        sums.append(total)
    return torch.stack(sums)


def dense_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum()


def dense_jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    mixture = 0.5 * (p + q)
    return 0.5 * dense_kl(p, mixture) + 0.5 * dense_kl(q, mixture)


def dense_cosine(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 1.0 - (p @ q) / (p.norm() * q.norm())


DENSE_DIVERGENCES = {"kl": dense_kl, "jsd": dense_jsd, "cosine": dense_cosine}


def dense_mean_divergence(name: str, teacher: torch.Tensor, predictions: AnswerPredictions) -> torch.Tensor:
    """1/|D| sum_s sum_i D(R_i || Q_i), token by token over the full vocabulary."""
    per_sample, token = [], 0
    for length in predictions.answer_lengths:
        total = 0.0
        for _ in range(length):
            student = torch.softmax(predictions.logits[token], dim=-1)
            total = total + DENSE_DIVERGENCES[name](teacher[token], student)
            token += 1
        per_sample.append(total)
    return torch.stack(per_sample).mean()


# ---------------------------------------------------------------------------------------------------
# Each loss equals its dense reference


@PROPERTY
@given(seed=st.integers(0, 2**16), lengths=answer_lengths_strategy, vocab=st.integers(2, 12))
def test_ga_ga_diff_and_finetune_equal_dense_reference(seed, lengths, vocab):
    generator = torch.Generator().manual_seed(seed)
    forget = random_predictions(generator, lengths, vocab)
    retain = random_predictions(generator, lengths[::-1], vocab)
    forget_nll = -dense_sequence_log_probs(forget).mean()
    retain_nll = -dense_sequence_log_probs(retain).mean()
    torch.testing.assert_close(LOSSES["ga"](forget)["loss"], -forget_nll)
    torch.testing.assert_close(LOSSES["finetune"](forget)["loss"], forget_nll)
    torch.testing.assert_close(
        LOSSES["ga_diff"](forget, retain, beta=0.7)["loss"], -forget_nll + 0.7 * retain_nll
    )


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    lengths=answer_lengths_strategy,
    vocab=st.integers(2, 12),
    npo_beta=st.floats(0.05, 2.0),
)
def test_npo_and_idkpo_equal_dense_reference(seed, lengths, vocab, npo_beta):
    generator = torch.Generator().manual_seed(seed)
    forget = random_predictions(generator, lengths, vocab)
    refusal = random_predictions(generator, [n + 1 for n in lengths], vocab)
    forget_reference = torch.randn(len(lengths), generator=generator) * 5 - 10
    refusal_reference = torch.randn(len(lengths), generator=generator) * 5 - 10

    # MLLMU-Bench Eq. 15: (2/beta) E log(1 + (pi_theta / pi_ref)^beta)
    ratio = torch.exp(dense_sequence_log_probs(forget) - forget_reference)
    expected_npo = (2 / npo_beta) * torch.log1p(ratio**npo_beta).mean()
    torch.testing.assert_close(LOSSES["npo"](forget, forget_reference, beta=npo_beta)["loss"], expected_npo)

    # ViKeR A.3: -(1/beta) E log sigma(beta log(p(y_idk)/p_ref(y_idk)) - beta log(p(y)/p_ref(y)))
    preferred = dense_sequence_log_probs(refusal) - refusal_reference
    dispreferred = dense_sequence_log_probs(forget) - forget_reference
    margin = npo_beta * preferred - npo_beta * dispreferred
    expected_idkpo = -(1 / npo_beta) * torch.log(1 / (1 + torch.exp(-margin))).mean()
    actual = LOSSES["idkpo"](forget, refusal, forget_reference, refusal_reference, beta=npo_beta)["loss"]
    torch.testing.assert_close(actual, expected_idkpo)


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    lengths=answer_lengths_strategy,
    vocab=st.integers(2, 12),
    regularizer=st.sampled_from(["kl", "jsd", "cosine"]),
    lambda_=st.floats(0.0, 10.0),
    no_ga=st.booleans(),
)
def test_viker_equals_dense_reference(seed, lengths, vocab, regularizer, lambda_, no_ga):
    generator = torch.Generator().manual_seed(seed)
    forget = random_predictions(generator, lengths, vocab)
    teacher = random_distributions(generator, sum(lengths), vocab)
    ga_term = 0.0 if no_ga else dense_sequence_log_probs(forget).mean()  # -L_NLL(D_f)
    expected = ga_term + lambda_ * dense_mean_divergence(regularizer, teacher, forget)
    terms = LOSSES["viker"](
        forget, untruncated(teacher), lambda_=lambda_, regularizer=regularizer, no_ga=no_ga
    )
    torch.testing.assert_close(terms["loss"], torch.as_tensor(expected))


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    lengths=answer_lengths_strategy,
    vocab=st.integers(2, 12),
    alpha=st.floats(0.0, 3.0),
    beta=st.floats(0.0, 3.0),
)
def test_vgid_and_kl_min_equal_dense_reference(seed, lengths, vocab, alpha, beta):
    generator = torch.Generator().manual_seed(seed)
    forget = random_predictions(generator, lengths, vocab)
    retain = random_predictions(generator, lengths + [2], vocab)
    forget_teacher = random_distributions(generator, sum(forget.answer_lengths), vocab)
    retain_teacher = random_distributions(generator, sum(retain.answer_lengths), vocab)
    forget_kl = dense_mean_divergence("kl", forget_teacher, forget)
    retain_kl = dense_mean_divergence("kl", retain_teacher, retain)

    vgid = LOSSES["vgid"](
        forget, untruncated(forget_teacher), retain, untruncated(retain_teacher), alpha=alpha, beta=beta
    )
    torch.testing.assert_close(vgid["loss"], alpha * forget_kl + beta * retain_kl)
    kl_min = LOSSES["kl_min"](forget, retain, untruncated(retain_teacher), beta=beta)
    torch.testing.assert_close(kl_min["loss"], dense_sequence_log_probs(forget).mean() + beta * retain_kl)


def test_viker_with_a_truncated_teacher_uses_the_tail_bucket():
    """Support {0, 1} + tail: the regulariser is the coarse-grained KL over {0}, {1}, {2..V-1}."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.3]])
    forget = AnswerPredictions(logits, torch.tensor([0]), [1])
    teacher = TruncatedDistributions(
        torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.3]]), torch.tensor([0.1]), torch.tensor([1.0])
    )
    q = torch.softmax(logits[0], dim=-1)
    coarse_q = torch.stack([q[0], q[1], q[2:].sum()])
    expected_kl = dense_kl(torch.tensor([0.6, 0.3, 0.1]), coarse_q)
    terms = LOSSES["viker"](forget, teacher, lambda_=0.5)
    torch.testing.assert_close(terms["regularization"], expected_kl)
    torch.testing.assert_close(terms["loss"], q[0].log() + 0.5 * expected_kl)


def test_padded_support_rows_do_not_count():
    """Rows of different support sizes are padded with PAD_ID; padding adds nothing to the divergence."""
    generator = torch.Generator().manual_seed(3)
    forget = random_predictions(generator, [2], 5)
    teacher = TruncatedDistributions(
        torch.tensor([[1, 3, PAD_ID], [0, 2, 4]]),
        torch.tensor([[0.5, 0.4, 0.0], [0.2, 0.3, 0.4]]),
        torch.tensor([0.1, 0.1]),
        torch.zeros(2),
    )
    unpadded_first = TruncatedDistributions(
        torch.tensor([[1, 3]]), torch.tensor([[0.5, 0.4]]), torch.tensor([0.1]), torch.zeros(1)
    )
    first_only = AnswerPredictions(forget.logits[:1], forget.targets[:1], [1])
    second_only = AnswerPredictions(forget.logits[1:], forget.targets[1:], [1])
    second = TruncatedDistributions(
        teacher.support_ids[1:], teacher.support_probs[1:], teacher.tail_mass[1:], teacher.entropy[1:]
    )
    both = LOSSES["viker"](forget, teacher, lambda_=1.0)["regularization"]
    parts = (
        LOSSES["viker"](first_only, unpadded_first)["regularization"]
        + LOSSES["viker"](second_only, second)["regularization"]
    )
    torch.testing.assert_close(both, parts)


# ---------------------------------------------------------------------------------------------------
# Closed forms at theta = theta_ref and gradients, on a tiny model (a linear layer producing the logits)


class LinearLogits:
    """logits = features @ weight.T: a model whose parameter gradients we can take token by token."""

    def __init__(self, seed: int, vocab: int = 5, width: int = 4):
        generator = torch.Generator().manual_seed(seed)
        self.vocab, self.width, self.generator = vocab, width, generator
        self.weight = torch.randn(vocab, width, generator=generator, requires_grad=True)

    def batch(self, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = sum(lengths)
        features = torch.randn(tokens, self.width, generator=self.generator)
        targets = torch.randint(0, self.vocab, (tokens,), generator=self.generator)
        return features, targets

    def predictions(self, features, targets, lengths, weight=None) -> AnswerPredictions:
        weight = self.weight if weight is None else weight
        return AnswerPredictions(features @ weight.T, targets, list(lengths))

    def gradient(self, loss: torch.Tensor) -> torch.Tensor:
        (gradient,) = torch.autograd.grad(loss, self.weight)
        return gradient

    def sequence_log_prob_gradients(self, features, targets, lengths) -> torch.Tensor:
        """(B, V, d): grad_W log p(y_s | x_s) of each sample, one autograd call per sample."""
        log_probs = self.predictions(features, targets, lengths).answer_log_probs()
        return torch.stack(
            [torch.autograd.grad(value, self.weight, retain_graph=True)[0] for value in log_probs]
        )


def test_npo_at_reference_is_2_over_beta_log_2_with_the_ga_gradient():
    model = LinearLogits(seed=0)
    lengths = [3, 1, 4]
    features, targets = model.batch(lengths)
    reference = model.predictions(features, targets, lengths).answer_log_probs().detach()  # theta = theta_ref
    ga_gradient = model.gradient(LOSSES["ga"](model.predictions(features, targets, lengths))["loss"])
    for npo_beta in (0.1, 0.4, 1.5):
        loss = LOSSES["npo"](model.predictions(features, targets, lengths), reference, beta=npo_beta)["loss"]
        torch.testing.assert_close(loss, torch.tensor(2 / npo_beta * math.log(2)))
        # grad L_NPO = E[2 sigma(beta log ratio) grad log p(y|x)] = E[grad log p] = grad L_GA at sigma(0) = 1/2
        torch.testing.assert_close(model.gradient(loss), ga_gradient)


def test_npo_gradient_has_the_known_form():
    """grad L_NPO = E_s[2 sigma(beta (log p_s - log p_ref,s)) grad log p_s] (Zhang et al. 2024)."""
    model = LinearLogits(seed=1)
    lengths = [2, 3]
    features, targets = model.batch(lengths)
    forget = model.predictions(features, targets, lengths)
    reference = torch.tensor([-4.0, -9.0])
    npo_beta = 0.4
    weights = 2 * torch.sigmoid(npo_beta * (forget.answer_log_probs().detach() - reference))
    per_sample = model.sequence_log_prob_gradients(features, targets, lengths)
    expected = (weights[:, None, None] * per_sample).mean(0)
    torch.testing.assert_close(
        model.gradient(LOSSES["npo"](forget, reference, beta=npo_beta)["loss"]), expected
    )


def test_dpo_and_idkpo_at_reference_are_log_2_with_the_known_gradient():
    model = LinearLogits(seed=2)
    lengths, refusal_lengths = [2, 4], [3, 3]
    features, targets = model.batch(lengths)
    refusal_features, refusal_targets = model.batch(refusal_lengths)
    forget = model.predictions(features, targets, lengths)
    refusal = model.predictions(refusal_features, refusal_targets, refusal_lengths)
    forget_reference = forget.answer_log_probs().detach()
    refusal_reference = refusal.answer_log_probs().detach()

    zero = torch.zeros(3)
    torch.testing.assert_close(preference_loss(zero, zero, beta=0.4), torch.full((3,), math.log(2)))  # DPO
    npo_beta = 0.4
    loss = LOSSES["idkpo"](forget, refusal, forget_reference, refusal_reference, beta=npo_beta)["loss"]
    torch.testing.assert_close(loss, torch.tensor(math.log(2) / npo_beta))  # ViKeR's 1/beta-scaled DPO
    # grad DPO = -beta sigma(-beta h) (grad log p(y+) - grad log p(y-)); with ViKeR's 1/beta and h = 0: -1/2 (...)
    preferred = model.sequence_log_prob_gradients(refusal_features, refusal_targets, refusal_lengths)
    dispreferred = model.sequence_log_prob_gradients(features, targets, lengths)
    torch.testing.assert_close(model.gradient(loss), (-0.5 * (preferred - dispreferred)).mean(0))


def test_idkpo_gradient_away_from_reference():
    model = LinearLogits(seed=3)
    lengths = [3, 2]
    features, targets = model.batch(lengths)
    refusal_features, refusal_targets = model.batch(lengths)
    forget = model.predictions(features, targets, lengths)
    refusal = model.predictions(refusal_features, refusal_targets, lengths)
    forget_reference, refusal_reference = torch.tensor([-3.0, -5.0]), torch.tensor([-6.0, -2.0])
    beta = 0.4
    margin = (refusal.answer_log_probs() - refusal_reference) - (forget.answer_log_probs() - forget_reference)
    weights = torch.sigmoid(-beta * margin.detach())  # d/dh of -(1/beta) log sigma(beta h) is -sigma(-beta h)
    preferred = model.sequence_log_prob_gradients(refusal_features, refusal_targets, lengths)
    dispreferred = model.sequence_log_prob_gradients(features, targets, lengths)
    expected = (-weights[:, None, None] * (preferred - dispreferred)).mean(0)
    loss = LOSSES["idkpo"](forget, refusal, forget_reference, refusal_reference, beta=beta)["loss"]
    torch.testing.assert_close(model.gradient(loss), expected)


@pytest.mark.parametrize("lambda_", [0.0, 0.05, 0.5, 10.0])
def test_viker_proposition_3_token_level_gradient(lambda_):
    """ViKeR Prop. 3 (dense, untruncated teacher): the ViKeR gradient is the GA token gradients
    grad log p_theta(v | I, x, i) weighted by (1[v = y_i] - lambda R_i(v)), summed over v and tokens,
    averaged over samples — checked on the logits and on the parameters of a linear model."""
    model = LinearLogits(seed=4, vocab=6)
    lengths = [3, 2, 4]
    features, targets = model.batch(lengths)
    teacher = random_distributions(model.generator, sum(lengths), model.vocab)
    weights = torch.nn.functional.one_hot(targets, model.vocab) - lambda_ * teacher  # (N, V)
    samples = len(lengths)

    # With respect to the logits z_i: grad_z log p(v) = e_v - p_i.
    logits = (features @ model.weight.T).detach().requires_grad_(True)
    loss = LOSSES["viker"](
        AnswerPredictions(logits, targets, lengths), untruncated(teacher), lambda_=lambda_
    )["loss"]
    (logit_gradient,) = torch.autograd.grad(loss, logits)
    probs = torch.softmax(logits.detach(), dim=-1)
    identity = torch.eye(model.vocab)
    expected_logit_gradient = (
        torch.stack(
            [
                sum(weights[i, v] * (identity[v] - probs[i]) for v in range(model.vocab))
                for i in range(len(targets))
            ]
        )
        / samples
    )
    torch.testing.assert_close(logit_gradient, expected_logit_gradient)

    # With respect to the parameters: grad_W log p_theta(v | I, x, i) for every token i and value v.
    token_gradients = torch.func.jacrev(lambda w: torch.log_softmax(features @ w.T, dim=-1))(
        model.weight.detach()
    )
    expected_parameter_gradient = torch.einsum("iv,ivab->ab", weights, token_gradients) / samples
    viker_loss = LOSSES["viker"](
        model.predictions(features, targets, lengths), untruncated(teacher), lambda_=lambda_
    )["loss"]
    torch.testing.assert_close(model.gradient(viker_loss), expected_parameter_gradient)


def test_viker_proposition_2_normal_tokens_scale_the_ga_gradient_by_one_minus_lambda():
    """A one-hot teacher at y_i (a normal token) leaves (1 - lambda) times the GA gradient."""
    model = LinearLogits(seed=5)
    lengths = [2, 3]
    features, targets = model.batch(lengths)
    forget = model.predictions(features, targets, lengths)
    # The cache layout of a Dirac teacher: support {y_i} with probability 1, no tail.
    teacher = TruncatedDistributions(
        targets[:, None], torch.ones(len(targets), 1), torch.zeros(len(targets)), torch.zeros(len(targets))
    )
    lambda_ = 0.3
    viker_gradient = model.gradient(LOSSES["viker"](forget, teacher, lambda_=lambda_)["loss"])
    ga_gradient = model.gradient(LOSSES["ga"](model.predictions(features, targets, lengths))["loss"])
    torch.testing.assert_close(viker_gradient, (1 - lambda_) * ga_gradient)


# ---------------------------------------------------------------------------------------------------
# Plumbing: what methods need, splitting joint batches, refusals


def test_methods_declare_the_inputs_the_training_stage_must_provide():
    assert set(LOSSES.names()) >= {"ga", "ga_diff", "kl_min", "npo", "idkpo", "viker", "vgid"}
    assert loss_inputs("viker") == ["forget", "forget_teacher"]
    assert loss_inputs("vgid") == ["forget", "forget_teacher", "retain", "retain_teacher"]
    assert loss_inputs("npo") == ["forget", "forget_reference_log_probs"]
    assert loss_arguments("npo") == {"beta": 0.4, "likelihood": "sequence"}
    assert loss_arguments("viker") == {"lambda_": 0.05, "regularizer": "kl", "no_ga": False}


def test_compute_loss_names_missing_inputs_and_unknown_regularizers():
    generator = torch.Generator().manual_seed(0)
    forget = random_predictions(generator, [2, 2], 6)
    with pytest.raises(ValueError, match="forget_reference_log_probs"):
        compute_loss("npo", {"forget": forget}, {})
    terms = compute_loss("ga", {"forget": forget, "retain": None}, {})
    torch.testing.assert_close(terms["loss"], LOSSES["ga"](forget)["loss"])
    with pytest.raises(ValueError, match="unknown regularizer 'l2'"):
        compute_loss(
            "viker",
            {"forget": forget, "forget_teacher": untruncated(random_distributions(generator, 4, 6))},
            {"regularizer": "l2"},
        )


def test_split_recovers_the_parts_of_a_joint_batch():
    generator = torch.Generator().manual_seed(1)
    forget = random_predictions(generator, [2, 3], 7)
    retain = random_predictions(generator, [1, 4, 2], 7)
    joint = AnswerPredictions(
        torch.cat([forget.logits, retain.logits]),
        torch.cat([forget.targets, retain.targets]),
        forget.answer_lengths + retain.answer_lengths,
    )
    forget_part, retain_part = joint.split([2, 3])
    torch.testing.assert_close(forget_part.answer_log_probs(), forget.answer_log_probs())
    torch.testing.assert_close(retain_part.answer_log_probs(), retain.answer_log_probs())


def test_refusals_ship_and_are_chosen_deterministically():
    refusals = load_refusals()
    assert len(refusals) == 100 and len(set(refusals)) == 100
    chosen = [choose_refusal(f"forget_10/{i}", refusals, seed=0) for i in range(200)]
    assert chosen == [choose_refusal(f"forget_10/{i}", refusals, seed=0) for i in range(200)]
    assert len(set(chosen)) > 50  # spread over the set, not one sentence
    assert chosen != [choose_refusal(f"forget_10/{i}", refusals, seed=1) for i in range(200)]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.support_ids.__setitem__((1, 1), int(t.support_ids[1, 0])), "appears twice"),
        (lambda t: (t.support_ids[1].fill_(PAD_ID), t.support_probs[1].zero_()), "empty support"),
        (lambda t: t.tail_mass.__setitem__(1, 0.25), "whole vocabulary but tail mass 0.25"),
        (lambda t: t.support_probs[1].mul_(0.5), "sum to 0.5"),
    ],
)
def test_malformed_teacher_rows_are_refused_not_turned_into_numbers(damage, message):
    """A duplicate id would be counted twice, an empty row gives eps log eps < 0, a whole-vocabulary support
    drops its leftover tail mass: each is an error naming where it is."""
    generator = torch.Generator().manual_seed(4)
    forget = random_predictions(generator, [1, 2], 6)
    teacher = untruncated(random_distributions(generator, 3, 6))
    damage(teacher)
    with pytest.raises(ValueError, match=f"sample 1 of the batch, token row 1: .*{message}"):
        LOSSES["viker"](forget, teacher, lambda_=1.0)


def test_npo_and_idkpo_token_mean_form_divides_each_log_ratio_by_the_answer_length():
    """MLLMU-Bench's code applies beta to the per-token mean: the same loss with every log-ratio / |y|."""
    generator = torch.Generator().manual_seed(11)
    forget, refusal = random_predictions(generator, [2, 5], 7), random_predictions(generator, [3, 1], 7)
    reference, refusal_reference = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -2.0])
    per_token = LOSSES["npo"](forget, reference, beta=0.4, likelihood="token_mean")
    ratio = (forget.answer_log_probs() - reference) / torch.tensor([2.0, 5.0])
    torch.testing.assert_close(
        per_token["loss"], -(2 / 0.4) * torch.nn.functional.logsigmoid(-0.4 * ratio).mean()
    )
    assert not torch.isclose(per_token["loss"], LOSSES["npo"](forget, reference, beta=0.4)["loss"])
    idk = LOSSES["idkpo"](forget, refusal, reference, refusal_reference, beta=0.4, likelihood="token_mean")
    preferred = (refusal.answer_log_probs() - refusal_reference) / torch.tensor([3.0, 1.0])
    expected = -torch.nn.functional.logsigmoid(0.4 * preferred - 0.4 * ratio).mean() / 0.4
    torch.testing.assert_close(idk["loss"], expected)


def test_po_is_dpo_without_idkpos_one_over_beta():
    """Vgid Eq. 9 (PO) and ViKeR's IdkPO share the preference loss; IdkPO divides it by beta."""
    generator = torch.Generator().manual_seed(12)
    forget, refusal = random_predictions(generator, [2, 3], 7), random_predictions(generator, [1, 2], 7)
    reference, refusal_reference = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -2.0])
    po = LOSSES["po"](forget, refusal, reference, refusal_reference, beta=0.25)["loss"]
    margin = 0.25 * (refusal.answer_log_probs() - refusal_reference) - 0.25 * (
        forget.answer_log_probs() - reference
    )
    torch.testing.assert_close(po, -torch.nn.functional.logsigmoid(margin).mean())
    idk = LOSSES["idkpo"](forget, refusal, reference, refusal_reference, beta=0.25)["loss"]
    torch.testing.assert_close(idk, po / 0.25)
    assert loss_inputs("po") == loss_inputs("idkpo")


# ---------------------------------------------------------------------------------------------------
# RMU and MMUnlearner


def with_hidden(predictions: AnswerPredictions, generator: torch.Generator, layers: int, dim: int):
    tokens = sum(predictions.answer_lengths)
    hidden = tuple(torch.randn(tokens, dim, generator=generator) * 4 for _ in range(layers + 1))
    return AnswerPredictions(predictions.logits, predictions.targets, predictions.answer_lengths, hidden)


def dense_rmu(forget, retain, forget_reference, retain_reference, layer, steering, gamma, direction):
    """Vgid Eq. 11-15, sample by sample and token by token."""

    def mean_over_samples(predictions, targets_of):
        per_sample, token = [], 0
        for length in predictions.answer_lengths:
            total = 0.0
            for _ in range(length):
                state = predictions.hidden_states[layer + 1][token]  # the output of decoder layer `layer`
                total = total + ((state - targets_of(token)) ** 2).sum()
                token += 1
            per_sample.append(total)
        return torch.stack(per_sample).mean()

    forget_term = mean_over_samples(
        forget, lambda t: steering * forget_reference[layer + 1][t].norm() * direction
    )
    retain_term = mean_over_samples(retain, lambda t: retain_reference[layer + 1][t])
    return forget_term + gamma * retain_term


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    lengths=answer_lengths_strategy,
    layer=st.integers(0, 1),
    steering=st.floats(0.0, 10.0),
    gamma=st.floats(0.0, 5.0),
)
def test_rmu_equals_dense_reference(seed, lengths, layer, steering, gamma):
    generator = torch.Generator().manual_seed(seed)
    forget = with_hidden(random_predictions(generator, lengths, 5), generator, 3, 6)
    retain = with_hidden(random_predictions(generator, lengths[::-1], 5), generator, 3, 6)
    forget_reference = with_hidden(forget, generator, 3, 6).hidden_states
    retain_reference = with_hidden(retain, generator, 3, 6).hidden_states
    arguments = dict(layer=layer, steering=steering, gamma=gamma, direction_seed=seed % 7)
    terms = LOSSES["rmu"](forget, retain, forget_reference, retain_reference, **arguments)
    direction = steering_direction(6, seed % 7, forget.logits)
    expected = dense_rmu(
        forget, retain, forget_reference, retain_reference, layer, steering, gamma, direction
    )
    torch.testing.assert_close(terms["loss"], expected)


def test_rmu_direction_is_a_fixed_unit_vector_and_its_minimum_is_the_steered_target():
    generator = torch.Generator().manual_seed(3)
    direction = steering_direction(16, 5, torch.zeros(1))
    assert float(direction.norm()) == pytest.approx(1.0)
    torch.testing.assert_close(direction, steering_direction(16, 5, torch.zeros(1)))
    assert not torch.allclose(direction, steering_direction(16, 6, torch.zeros(1)))
    forget = with_hidden(random_predictions(generator, [2, 1], 4), generator, 2, 16)
    reference = with_hidden(forget, generator, 2, 16).hidden_states
    steered = tuple(3.0 * h.norm(dim=-1, keepdim=True) * direction for h in reference)
    at_target = AnswerPredictions(forget.logits, forget.targets, forget.answer_lengths, steered)
    terms = LOSSES["rmu"](
        at_target, forget, reference, forget.hidden_states, layer=0, steering=3.0, direction_seed=5
    )
    assert float(terms["forget_mse"]) == pytest.approx(0.0, abs=1e-9)
    assert float(terms["retain_mse"]) == pytest.approx(0.0, abs=1e-9)


def test_rmu_layer_is_the_decoder_layer_whose_output_is_read():
    """WMDP's layer l hooks the output of layers[l], i.e. hidden_states[l + 1] (hidden_states[0]: the
    embeddings); the last layer's output (after the final norm) and anything beyond are refused."""
    generator = torch.Generator().manual_seed(8)
    forget = with_hidden(random_predictions(generator, [2, 1], 4), generator, 3, 8)  # 3 decoder layers
    reference = list(forget.hidden_states)
    reference[2] = reference[2] + 1.0  # only the output of decoder layer 1 differs from the student's
    reference = tuple(reference)
    for layer, moved in ((0, False), (1, True)):
        terms = LOSSES["rmu"](forget, forget, reference, reference, layer=layer)
        assert (float(terms["retain_mse"]) > 0) == moved, layer
    for layer in (2, 3, 7):
        with pytest.raises(ValueError, match=rf"`layer` {layer} is out of range: the model has 3 decoder"):
            LOSSES["rmu"](forget, forget, reference, reference, layer=layer)


def test_saliency_mask_keeps_what_the_forget_set_needs_more_than_the_retain_set():
    saliency = GradientSaliency(
        forget_fisher=[torch.tensor([2.0, 1.0, 0.0, 0.5])], retain_fisher=[torch.tensor([1.0, 2.0, 0.0, 0.5])]
    )
    assert saliency.mask(1.0)[0].tolist() == [1.0, 0.0, 1.0, 1.0]  # 0/0 and equal ratios are kept
    assert saliency.mask(1.5)[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def tiny_lora(init_b: bool = False):
    """Two adapted linear layers (PEFT LoRA, r 2, alpha 4: s = 2), no dropout; B random when `init_b`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=not init_b)
    return get_peft_model(model, config).float()  # whatever default dtype another test set


def lora_predictions(model, batch) -> AnswerPredictions:
    """Each sample (a (5,) input, a target class) as a one-token answer."""
    inputs = torch.stack([x for x, _ in batch])
    return AnswerPredictions(model(inputs), torch.tensor([y for _, y in batch]), [1] * len(batch))


LORA_SAMPLES = [(torch.randn(5, generator=torch.Generator().manual_seed(i)), i % 3) for i in range(7)]


def test_saliency_is_the_mean_squared_gradient_of_the_adapted_layers_weights_at_the_frozen_model():
    """MMUnlearner's gen_mask: per entry of W, 1/|batches| sum_b (dL_NLL(b)/dW)^2 (not the LoRA tensors)."""
    from pipeline.training.processes import Processes
    from pipeline.training.saliency import gradient_saliency, lora_layers

    model = tiny_lora()
    layers = lora_layers(model)
    weights = [layer.base_layer.weight for layer in layers]
    forget, retain = LORA_SAMPLES[:5], LORA_SAMPLES[5:]
    saliency = gradient_saliency(
        lambda b: lora_predictions(model, b), forget, retain, 2, weights, Processes()
    )
    assert [f.shape for f in saliency.forget_fisher] == [(4, 5), (3, 4)]
    assert not any(weight.requires_grad for weight in weights)  # frozen again
    frozen = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).float()
    frozen.load_state_dict({k.replace("base_model.model.", "").replace("base_layer.", ""): v
                            for k, v in model.state_dict().items() if "lora" not in k})  # fmt: skip
    for samples, fisher in ((forget, saliency.forget_fisher), (retain, saliency.retain_fisher)):
        batches = [samples[i : i + 2] for i in range(0, len(samples), 2)]
        expected = [torch.zeros_like(f) for f in fisher]
        for batch in batches:
            gradients = torch.autograd.grad(
                nll(lora_predictions(frozen, batch)), [frozen[0].weight, frozen[2].weight]
            )
            for total, gradient in zip(expected, gradients, strict=True):
                total += gradient**2 / len(batches)
        for actual, wanted in zip(fisher, expected, strict=True):
            torch.testing.assert_close(actual, wanted)


def test_saliency_sums_are_added_over_ranks_so_every_rank_has_one_process_mask():
    """Batches split over 2 ranks (b mod 2), the sums all-reduced: the mask of one process (simulated
    all-reduce: rank 1's sums recorded, then added on rank 0)."""
    from pipeline.training.processes import Processes
    from pipeline.training.saliency import gradient_saliency, lora_layers

    model = tiny_lora()
    weights = [layer.base_layer.weight for layer in lora_layers(model)]
    forget, retain = LORA_SAMPLES[:5], LORA_SAMPLES[5:]

    def saliency(processes, all_reduce=None):
        return gradient_saliency(
            lambda b: lora_predictions(model, b), forget, retain, 2, weights, processes, all_reduce
        )

    recorded: list[torch.Tensor] = []
    saliency(Processes(rank=1, world_size=2), lambda total: recorded.append(total.clone()))
    others = iter(recorded)
    reduced = saliency(Processes(rank=0, world_size=2), lambda total: total.add_(next(others)))
    alone = saliency(Processes())
    for actual, expected in zip(reduced.forget_fisher + reduced.retain_fisher,
                                alone.forget_fisher + alone.retain_fisher, strict=True):  # fmt: skip
        torch.testing.assert_close(actual, expected)


def masked_setup(seed: int = 1):
    """tiny_lora with B random, masked deltas on its layers, random masks, and the terms of a loss whose
    masked part is -NLL and whose rest is a second, unmasked term."""
    from pipeline.models.masked_delta import add_masked_deltas
    from pipeline.training.saliency import lora_layers

    model = tiny_lora(init_b=True)
    deltas = add_masked_deltas(model)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    masks = [
        torch.rand(layer.base_layer.weight.shape, generator=generator) > 0.5 for layer in lora_layers(model)
    ]

    def terms():
        predictions = lora_predictions(model, LORA_SAMPLES)
        masked, rest = -nll(predictions), predictions.logits.pow(2).mean()
        return {"loss": masked + rest, "part": MaskedTerm(masked, masks)}, masked, rest

    return model, deltas, trainable, masks, terms


def test_a_masked_term_reaches_only_the_deltas_times_its_mask_and_the_rest_only_the_lora_weights():
    """backward(): D.grad = m ⊙ d(masked)/dD (= m ⊙ d(masked)/dW, D x being added to W x), and A, B get
    the gradient of the rest of the loss alone."""
    from pipeline.training.saliency import backward, lora_layers

    model, deltas, trainable, masks, terms = masked_setup()
    backward(terms()[0], 2.0, trainable, deltas)
    actual = {id(parameter): parameter.grad.clone() for parameter in trainable}
    for parameter in trainable:
        parameter.grad = None
    weights = [layer.base_layer.weight for layer in lora_layers(model)]
    for weight in weights:
        weight.requires_grad_(True)
    _, masked, rest = terms()
    weight_gradients = torch.autograd.grad(2.0 * masked, weights, retain_graph=True)
    lora = [parameter for parameter in trainable if not any(parameter is delta for delta in deltas)]
    rest_gradients = torch.autograd.grad(2.0 * rest, lora)
    for weight in weights:
        weight.requires_grad_(False)
    for delta, gradient, mask in zip(deltas, weight_gradients, masks, strict=True):
        torch.testing.assert_close(actual[id(delta)], mask * gradient)
    for parameter, gradient in zip(lora, rest_gradients, strict=True):
        torch.testing.assert_close(actual[id(parameter)], gradient)


def test_after_n_steps_the_masked_term_has_moved_nothing_outside_its_mask():
    """Issue 30 defect 3: AdamW with weight decay for 5 steps on masked term + rest; the weight update the
    masked term makes (the deltas) is exactly zero outside the mask and not inside it."""
    from pipeline.training.saliency import backward

    model, deltas, trainable, masks, terms = masked_setup(seed=2)
    optimizer = torch.optim.AdamW(trainable, lr=0.05, weight_decay=0.1)
    for _ in range(5):
        backward(terms()[0], 1.0, trainable, deltas)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for delta, mask in zip(deltas, masks, strict=True):
        assert torch.count_nonzero(delta.detach()[~mask]) == 0
        assert torch.count_nonzero(delta.detach()[mask]) == int(mask.sum())


def test_the_masked_deltas_are_in_the_forward_pass_only_while_their_adapter_is_on(tmp_path):
    """W0 x + s B A x + D x with the adapter on; W0 x with it disabled; saved beside the PEFT files and loaded
    with them, a delta of another shape refused naming the layer."""
    from safetensors.torch import load_file, save_file

    from pipeline.models.masked_delta import MASKED_DELTA_FILE, load_masked_deltas, save_adapter
    from pipeline.training.saliency import lora_layers

    model, deltas, _, _, _ = masked_setup()
    inputs = torch.stack([x for x, _ in LORA_SAMPLES])
    before = model(inputs).detach()
    with torch.no_grad():
        for delta in deltas:
            delta.normal_()
    after = model(inputs).detach()
    assert not torch.allclose(before, after)
    with model.disable_adapter():
        bare = model(inputs).detach()
    first, second = (layer.base_layer for layer in lora_layers(model))
    torch.testing.assert_close(bare, second(torch.tanh(first(inputs))).detach())
    from pipeline.models.adapters import merged

    with merged(model) as merged_model:  # evaluation answers with the adapter merged: the deltas too
        torch.testing.assert_close(merged_model(inputs).detach(), after)
    torch.testing.assert_close(model(inputs).detach(), after)
    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_lora(init_b=True)
    fresh.load_state_dict(model.state_dict(), strict=False)  # the LoRA weights; no deltas yet
    assert load_masked_deltas(fresh, tmp_path / "adapter", "default")
    torch.testing.assert_close(fresh(inputs).detach(), after)
    saved = load_file(str(tmp_path / "adapter" / MASKED_DELTA_FILE))
    name = next(iter(saved))
    save_file({**saved, name: torch.zeros(2, 2)}, str(tmp_path / "adapter" / MASKED_DELTA_FILE))
    with pytest.raises(ValueError, match=name):
        load_masked_deltas(tiny_lora(init_b=True), tmp_path / "adapter", "default")


def test_mmunlearner_is_ga_diff_with_its_forget_term_masked():
    generator = torch.Generator().manual_seed(4)
    forget, retain = random_predictions(generator, [2, 3], 6), random_predictions(generator, [1, 2], 6)
    saliency = GradientSaliency([torch.tensor([3.0, 0.0])], [torch.tensor([1.0, 1.0])])
    terms = LOSSES["mmunlearner"](forget, retain, saliency)
    torch.testing.assert_close(terms["loss"], LOSSES["ga_diff"](forget, retain)["loss"])
    torch.testing.assert_close(terms["masked_forget"].value, -LOSSES["ga"](forget)["forget_nll"])
    assert terms["masked_forget"].masks[0].tolist() == [1.0, 0.0]
    assert float(terms["mask_kept"]) == 0.5
