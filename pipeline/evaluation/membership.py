"""Membership inference on answers: can the model's likelihoods still tell the forget set's answers
from answers about people it never saw?

Each attack turns a sample's answer-token log-probabilities (under the evaluated model, teacher-forced
on the ground truth) into a score, higher meaning "more like training data"; the AUC of forget (member)
against never-seen (non-member) scores is 0.5 when they are indistinguishable, the ideal after
unlearning, and near 1 for the model that memorised the forget set. The attacks are the standard
reference-free ones (as open-unlearning ships them):

    loss    mean log p(y_i | I, x, y_<i)                              (Yeom et al. 2018)
    min_k   mean of the k% lowest token log-probabilities (k = 20%)   (Shi et al. 2024, Min-K% Prob)
    zlib    mean log p / zlib-compressed length of the answer (bytes) (Carlini et al. 2021)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

MIN_K_FRACTION = 0.2


def loss_score(token_log_probs: Tensor, answer: str) -> float:
    """-L(y): the mean answer-token log-probability."""
    return float(token_log_probs.double().mean())


def min_k_score(token_log_probs: Tensor, answer: str, fraction: float = MIN_K_FRACTION) -> float:
    """The mean of the ceil(fraction * |y|) lowest token log-probabilities (at least one)."""
    count = max(1, math.ceil(fraction * len(token_log_probs)))
    return float(torch.sort(token_log_probs.double()).values[:count].mean())


def zlib_score(token_log_probs: Tensor, answer: str) -> float:
    """The mean log-probability over the answer's zlib entropy (its compressed length in bytes)."""
    return float(token_log_probs.double().mean()) / len(zlib.compress(answer.encode("utf-8")))


ATTACKS: dict[str, Callable[[Tensor, str], float]] = {
    "loss": loss_score,
    "min_k": min_k_score,
    "zlib": zlib_score,
}


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(member score > non-member score) + P(equal) / 2 (the Mann-Whitney form of the ROC AUC)."""
    if not members or not nonmembers:
        raise ValueError("the AUC needs at least one member and one non-member score")
    member, nonmember = (
        torch.tensor(members, dtype=torch.float64),
        torch.tensor(nonmembers, dtype=torch.float64),
    )
    greater = (member[:, None] > nonmember[None, :]).double().mean()
    equal = (member[:, None] == nonmember[None, :]).double().mean()
    return float(greater + 0.5 * equal)


def membership_aucs(
    members: Sequence[tuple[Tensor, str]], nonmembers: Sequence[tuple[Tensor, str]]
) -> dict[str, float]:
    """{attack}_auc for every attack, from (token log-probs, answer text) of each side's samples."""
    results = {
        f"{name}_auc": auc([attack(*m) for m in members], [attack(*n) for n in nonmembers])
        for name, attack in ATTACKS.items()
    }
    return {**results, "members": len(members), "nonmembers": len(nonmembers)}


def scored_answers(loaded, model, samples: Sequence, batch_size: int) -> list[tuple[Tensor, str]]:
    """(answer-token log-probs under `model`, answer) per QA sample, on the student's own prompt."""
    from pipeline.models import answer_token_log_probs, prompted

    inputs = [prompted(loaded, sample) for sample in samples]
    log_probs = answer_token_log_probs(loaded, model, inputs, batch_size)
    return list(zip(log_probs, [sample.answer for sample in samples], strict=True))
