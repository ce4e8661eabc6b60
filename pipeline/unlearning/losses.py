"""Unlearning losses: one short function per method, each reading like its paper's equation.

A loss function declares what it needs by its parameter names, so the training stage knows what to
compute (and which caches to stream) without a table beside the registry:

    forget, retain, refusal          AnswerPredictions of the student (answer positions only)
    forget_teacher, retain_teacher   sparse teacher distributions from a cache (cache.distributions)
    forget_reference_log_probs       (B,) log p(y | I, x; theta_full) of the frozen model
    refusal_reference_log_probs      (B,) log p(y_idk | I, x; theta_full)
    forget_reference_hidden,         per layer, (N, d) hidden states of the frozen model at the answer
      retain_reference_hidden        positions (the adapter switched off: no second copy of the model);
                                     the student's are AnswerPredictions.hidden_states (RMU)
    gradient_saliency                GradientSaliency: per weight of the LoRA-adapted layers, the mean
                                     squared gradients of L_NLL on D_f and on D_r at the frozen model
                                     (MMUnlearner)

Keyword-only parameters are the loss's own arguments (with the papers' defaults); params.yaml's method
entries set them (pipeline.unlearning.methods). Every loss returns a dict
with "loss" (the scalar to minimise) and its terms (for the training log). A term may be a MaskedTerm:
part of "loss" whose gradient with respect to each adapted layer's weight update the training step
multiplies by a mask before the rest is added (MMUnlearner's -m ⊙ L(D_f); pipeline.training.saliency).

Normalisation, the same for every method: ViKeR Eq. 2 and 5 sum over the answer tokens of a sample and
average over samples (L_NLL = -1/|D| sum_s log p(y|I,x), log p(y|I,x) = sum_i log p(y_i|I,x,i)).
Token-level divergences (ViKeR's KL(R_i || Q_i), Vgid's KL over the answer, KL_Min) are therefore also
summed over the answer tokens of a sample and averaged over the samples of the batch. NPO and DPO use the
sequence log-probability log p(y|x), i.e. the same per-sample token sum.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cache.distributions import SPARSE_DIVERGENCES, TruncatedDistributions, malformed_rows
from pipeline.arguments import Range, declared_arguments
from pipeline.hashing import stable_int
from pipeline.registry import Registry

Weight = Annotated[float, Range(low=0.0)]  # a term's weight: 0 switches the term off
Layer = Annotated[int, Range(low=0)]  # a decoder layer (0-based) whose output RMU reads
Temperature = Annotated[float, Range(low=0.0, low_open=True)]  # NPO / DPO's beta
LOSSES: Registry[Callable[..., LossTerms]] = Registry("loss")

REFUSALS_FILE = Path(__file__).with_name("refusals.txt")


@dataclass(frozen=True)
class MaskedTerm:
    """A part of a loss whose gradient on the i-th LoRA-adapted layer's weight is multiplied by masks[i]."""

    value: Tensor
    masks: list[Tensor]


LossTerms = dict[str, Tensor | MaskedTerm]


@dataclass
class AnswerPredictions:
    """The student's next-token logits at the answer positions of a batch, teacher-forced on its answers."""

    logits: Tensor  # (N, V), N = sum(answer_lengths), samples concatenated in order
    targets: Tensor  # (N,) the answer token ids
    answer_lengths: list[int]
    hidden_states: tuple[Tensor, ...] | None = None  # per layer, (N, d) at the same positions (RMU)

    def per_sample_sum(self, per_token: Tensor) -> Tensor:
        """(N,) per-token values -> (B,) sums over each sample's answer tokens."""
        lengths = torch.as_tensor(self.answer_lengths, device=per_token.device)
        sample_index = torch.repeat_interleave(
            torch.arange(len(self.answer_lengths), device=lengths.device), lengths
        )
        sums = torch.zeros(len(self.answer_lengths), dtype=per_token.dtype, device=per_token.device)
        return sums.index_add(0, sample_index, per_token)

    def token_log_probs(self) -> Tensor:
        """(N,) log p_theta(y_i | I, x, i) (ViKeR Eq. 1), in at least float32 whatever the logits' dtype."""
        logits = self.logits if self.logits.dtype == torch.float64 else self.logits.float()
        return -F.cross_entropy(logits, self.targets, reduction="none")

    def answer_log_probs(self) -> Tensor:
        """(B,) log p(y | I, x; theta) = sum_i log p_theta(y_i | I, x, i)."""
        return self.per_sample_sum(self.token_log_probs())

    def split(self, sample_counts: list[int]) -> list[AnswerPredictions]:
        """Cut a jointly computed batch (e.g. forget + retain samples in one forward) into its parts."""
        parts, sample_start, token_start = [], 0, 0
        for count in sample_counts:
            lengths = self.answer_lengths[sample_start : sample_start + count]
            token_end = token_start + sum(lengths)
            hidden = self.hidden_states and tuple(h[token_start:token_end] for h in self.hidden_states)
            parts.append(
                AnswerPredictions(
                    self.logits[token_start:token_end], self.targets[token_start:token_end], lengths, hidden
                )
            )
            sample_start, token_start = sample_start + count, token_end
        return parts


def nll(predictions: AnswerPredictions) -> Tensor:
    """L_NLL(D) = -1/|D| sum_s log p(y | I, x; theta)  (ViKeR Eq. 2)."""
    return -predictions.answer_log_probs().mean()


def divergence(name: str, teacher: TruncatedDistributions, predictions: AnswerPredictions) -> Tensor:
    """1/|D| sum_s sum_i D(R_i || Q_i): a token-level divergence summed per sample, averaged over samples.

    The teacher is top-p truncated; D is taken on its support plus the tail bucket (cache.distributions).
    """
    if len(teacher) != len(predictions.targets):
        raise ValueError(f"{len(teacher)} teacher rows for {len(predictions.targets)} answer tokens")
    problems = malformed_rows(
        teacher.support_ids, teacher.support_probs, teacher.tail_mass, predictions.logits.shape[-1]
    )
    if problems:
        row, problem = problems[0]
        sample = int(torch.searchsorted(torch.tensor(predictions.answer_lengths).cumsum(0), row, right=True))
        raise ValueError(f"teacher rows of sample {sample} of the batch, token row {row}: {problem}")
    if name not in SPARSE_DIVERGENCES:
        raise ValueError(f"unknown regularizer {name!r}; known: {', '.join(SPARSE_DIVERGENCES)}")
    divergence_of = SPARSE_DIVERGENCES[name]
    per_token = divergence_of(
        teacher.support_ids, teacher.support_probs, teacher.tail_mass, predictions.logits
    )
    return predictions.per_sample_sum(per_token).mean()


# NPO / DPO's log-likelihood of an answer: the sequence sum the papers write (ViKeR A.3, Vgid Eq. 9), or
# the per-token mean MLLMU-Bench's code takes (its beta then acts on a quantity about |y| times smaller).
Likelihood = Literal["sequence", "token_mean"]


def log_ratio(predictions: AnswerPredictions, reference_log_probs: Tensor, likelihood: Likelihood) -> Tensor:
    """(B,) log p_theta(y|I,x) - log p_ref(y|I,x), summed over the answer's tokens or averaged per token."""
    ratio = predictions.answer_log_probs() - reference_log_probs
    if likelihood == "token_mean":
        lengths = torch.as_tensor(predictions.answer_lengths, device=ratio.device, dtype=ratio.dtype)
        ratio = ratio / lengths
    return ratio


def preference_loss(log_ratio_preferred: Tensor, log_ratio_dispreferred: Tensor, beta: float) -> Tensor:
    """(B,) DPO / PO (Vgid Eq. 9): -log sigma(beta log pi/pi_ref(y+) - beta log pi/pi_ref(y-))."""
    return -F.logsigmoid(beta * log_ratio_preferred - beta * log_ratio_dispreferred)


# ---------------------------------------------------------------------------------------------------
# Methods


@LOSSES.register("ga")
def ga(forget: AnswerPredictions) -> LossTerms:
    """L_GA(D_f) = -L_NLL(D_f)  (ViKeR Eq. 3)."""
    forget_nll = nll(forget)
    return {"loss": -forget_nll, "forget_nll": forget_nll}


@LOSSES.register("finetune")
def finetune(forget: AnswerPredictions) -> LossTerms:
    """L = L_NLL(D): plain fine-tuning; `pipeline relearn` trains on part of the forget set with it (the
    relearning attack: Deeb & Roger 2024, Hu et al. 2024)."""
    forget_nll = nll(forget)
    return {"loss": forget_nll, "forget_nll": forget_nll}


@LOSSES.register("ga_diff")
def ga_diff(forget: AnswerPredictions, retain: AnswerPredictions, *, beta: Weight = 1.0) -> LossTerms:
    """L = -L(D_f) + beta L(D_r)  (MLLMU-Bench GA_Diff with beta = 1; Vgid Eq. 7 names the weight lambda)."""
    forget_nll, retain_nll = nll(forget), nll(retain)
    return {"loss": -forget_nll + beta * retain_nll, "forget_nll": forget_nll, "retain_nll": retain_nll}


@LOSSES.register("kl_min")
def kl_min(
    forget: AnswerPredictions,
    retain: AnswerPredictions,
    retain_teacher: TruncatedDistributions,
    *,
    beta: Weight = 1.0,
) -> LossTerms:
    """L = -L(D_f) + beta E_{D_r} KL(P_theta_ref(y|x) || P_theta(y|x))  (Vgid Eq. 8).

    The KL runs from the frozen model to the student, as in Vgid Eq. 8 (MLLMU-Bench Eq. 14 writes the
    arguments the other way round); in this direction the cached side is the KL's first argument, whose
    dropped tail enters only through its mass (the tail bucket).
    """
    forget_nll = nll(forget)
    retain_kl = divergence("kl", retain_teacher, retain)
    return {"loss": -forget_nll + beta * retain_kl, "forget_nll": forget_nll, "retain_kl": retain_kl}


@LOSSES.register("npo")
def npo(
    forget: AnswerPredictions,
    forget_reference_log_probs: Tensor,
    *,
    beta: Temperature = 0.4,
    likelihood: Likelihood = "sequence",
) -> LossTerms:
    """L_NPO = -(2/beta) E_{D_f} log sigma(-beta log(p(y|I,x;theta) / p(y|I,x;theta_full)))  (ViKeR A.3).

    Equal to MLLMU-Bench Eq. 15, (2/beta) E log(1 + (pi_theta/pi_ref)^beta); beta = 0.4 there and in ViKeR.
    """
    forget_log_ratio = log_ratio(forget, forget_reference_log_probs, likelihood)
    loss = -(2.0 / beta) * F.logsigmoid(-beta * forget_log_ratio).mean()
    return {"loss": loss, "forget_log_ratio": forget_log_ratio.mean()}


@LOSSES.register("po")
def po(
    forget: AnswerPredictions,
    refusal: AnswerPredictions,
    forget_reference_log_probs: Tensor,
    refusal_reference_log_probs: Tensor,
    *,
    beta: Temperature = 0.4,
    likelihood: Likelihood = "sequence",
) -> LossTerms:
    """L_PO = -E log sigma(beta log ratio(y+) - beta log ratio(y-))  (Vgid Eq. 9, DPO; Maini et al. 2024).

    y+ is a refusal, y- the true answer. Vgid states no beta; the default is ViKeR's 0.4 for IdkPO.
    """
    refusal_log_ratio = log_ratio(refusal, refusal_reference_log_probs, likelihood)
    forget_log_ratio = log_ratio(forget, forget_reference_log_probs, likelihood)
    return {
        "loss": preference_loss(refusal_log_ratio, forget_log_ratio, beta).mean(),
        "refusal_log_ratio": refusal_log_ratio.mean(),
        "forget_log_ratio": forget_log_ratio.mean(),
    }


@LOSSES.register("idkpo")
def idkpo(
    forget: AnswerPredictions,
    refusal: AnswerPredictions,
    forget_reference_log_probs: Tensor,
    refusal_reference_log_probs: Tensor,
    *,
    beta: Temperature = 0.4,
    likelihood: Likelihood = "sequence",
) -> LossTerms:
    """L_IdkPO = -(1/beta) E log sigma(beta log ratio(y_idk) - beta log ratio(y))  (ViKeR A.3).

    PO (Vgid Eq. 9) scaled by 1/beta as ViKeR writes it. beta is the same 0.4 as NPO's (ViKeR A.4).
    """
    terms = po(
        forget,
        refusal,
        forget_reference_log_probs,
        refusal_reference_log_probs,
        beta=beta,
        likelihood=likelihood,
    )
    return {**terms, "loss": terms["loss"] / beta}


@LOSSES.register("viker")
def viker(
    forget: AnswerPredictions,
    forget_teacher: TruncatedDistributions,
    *,
    lambda_: Weight = 0.05,
    regularizer: Literal["kl", "jsd", "cosine"] = "kl",
    no_ga: bool = False,
) -> LossTerms:
    """L_ViKeR = -L_NLL(D_f) + lambda/|D_f| sum_{D_f} sum_i KL(R_i || Q_i)  (ViKeR Eq. 5).

    R_i is the cached visual-guided teacher (Eq. 4). `regularizer` swaps KL for JSD or cosine (Table 9);
    `no_ga` drops the first term (the "w/o GA" ablation); lambda = 0 is "w/o Reg", i.e. GA.
    """
    forget_nll = nll(forget)
    regularization = divergence(regularizer, forget_teacher, forget)
    ga_term = torch.zeros_like(forget_nll) if no_ga else -forget_nll
    return {
        "loss": ga_term + lambda_ * regularization,
        "forget_nll": forget_nll,
        "regularization": regularization,
    }


@LOSSES.register("vgid")
def vgid(
    forget: AnswerPredictions,
    forget_teacher: TruncatedDistributions,
    retain: AnswerPredictions,
    retain_teacher: TruncatedDistributions,
    *,
    alpha: Weight = 1.0,
    beta: Weight = 1.0,
) -> LossTerms:
    """L = alpha E_{D_F} KL(pi_T || pi_theta) + beta E_{D_R} KL(pi_theta0 || pi_theta)  (Vgid Eq. 3-5)."""
    forget_kl = divergence("kl", forget_teacher, forget)
    retain_kl = divergence("kl", retain_teacher, retain)
    return {"loss": alpha * forget_kl + beta * retain_kl, "forget_kl": forget_kl, "retain_kl": retain_kl}


def check_layer(layer: int, num_layers: int) -> None:
    """Refuse an RMU `layer` whose output the loss cannot read: decoder layers 0 .. num_layers - 2.

    transformers returns the last decoder layer's output after the final norm (hidden_states[-1]), which
    is no residual-stream state, so the last layer is refused too.
    """
    if not 0 <= layer <= num_layers - 2:
        raise ValueError(
            f"rmu argument `layer` {layer} is out of range: the model has {num_layers} decoder layers, so "
            f"`layer` reads the output of decoder layer 0 .. {num_layers - 2} (the last one's output comes "
            "after the final norm)"
        )


def hidden_state(states: tuple[Tensor, ...], layer: int) -> Tensor:
    """(N, d) the output of decoder layer `layer` (0-based, WMDP's hook on layers[layer]): hidden_states[
    layer + 1], since transformers' hidden_states[0] is the embeddings."""
    check_layer(layer, len(states) - 1)
    return states[layer + 1]


def steering_direction(dim: int, seed: int, like: Tensor) -> Tensor:
    """(d,) u ~ Uniform(S^{d-1})  (Vgid Eq. 11): a normalised Gaussian, fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    return (direction / direction.norm()).to(device=like.device, dtype=like.dtype)


def squared_distance(predictions: AnswerPredictions, hidden: Tensor, target: Tensor) -> Tensor:
    """1/|D| sum_s sum_i ||h_i - t_i||^2 over the answer positions, in at least float32."""
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, target.dtype), torch.float32)
    difference = hidden.to(dtype) - target.to(dtype)
    return predictions.per_sample_sum(difference.pow(2).sum(-1)).mean()


@LOSSES.register("rmu")
def rmu(
    forget: AnswerPredictions,
    retain: AnswerPredictions,
    forget_reference_hidden: tuple[Tensor, ...],
    retain_reference_hidden: tuple[Tensor, ...],
    *,
    layer: Layer = 7,
    steering: Weight = 1.0,
    gamma: Weight = 1200.0,
    direction_seed: Annotated[int, Range(low=0)] = 0,
) -> LossTerms:
    """L_RMU = E_{D_F} ||h_theta(x_f) - v_f||^2 + gamma E_{D_R} ||h_theta(x_r) - h_ref(x_r)||^2,
    v_f = lambda ||h_ref(x_f)||_2 u  (Vgid Eq. 11-15; Dang et al. 2025).

    h is the output of decoder layer `layer` (0-based; hidden_states[layer + 1]); layer 7 is WMDP's choice
    for 7B models (Li et al. 2024 hook the output of layers[7]). `steering` is Eq. 12's lambda. gamma
    defaults to WMDP's alpha = 1200: WMDP averages both squared distances over the same elements, as both
    terms here are summed over the same positions, so the ratio of the terms' weights is the same number
    (Vgid states none). The hidden states are those at the answer positions, each token's v_f scaled by
    its own reference norm.
    """
    student_forget = hidden_state(forget.hidden_states, layer)
    reference_forget = hidden_state(forget_reference_hidden, layer)
    direction = steering_direction(student_forget.shape[-1], direction_seed, reference_forget)
    target = steering * reference_forget.norm(dim=-1, keepdim=True) * direction
    forget_term = squared_distance(forget, student_forget, target)
    retain_term = squared_distance(
        retain, hidden_state(retain.hidden_states, layer), hidden_state(retain_reference_hidden, layer)
    )
    return {"loss": forget_term + gamma * retain_term, "forget_mse": forget_term, "retain_mse": retain_term}


@dataclass(frozen=True)
class GradientSaliency:
    """Per weight W of the LoRA-adapted layers, the mean over batches of (dL_NLL/dW)^2 on D_f and on D_r."""

    forget_fisher: list[Tensor]
    retain_fisher: list[Tensor]
    masks: dict[float, list[Tensor]] = field(default_factory=dict, compare=False)  # by threshold, made once

    def mask(self, threshold: float) -> list[Tensor]:
        """m = (F_f + 1e-15) / (F_r + 1e-15) >= threshold, elementwise, boolean (MMUnlearner's gen_mask; an
        entry with no gradient on either set has ratio 1)."""
        if threshold not in self.masks:
            self.masks[threshold] = [
                (forget + 1e-15) / (retain + 1e-15) >= threshold
                for forget, retain in zip(self.forget_fisher, self.retain_fisher, strict=True)
            ]
        return self.masks[threshold]


@LOSSES.register("mmunlearner")
def mmunlearner(
    forget: AnswerPredictions,
    retain: AnswerPredictions,
    gradient_saliency: GradientSaliency,
    *,
    threshold: Weight = 1.0,
) -> LossTerms:
    """L = -m ⊙ L(D_f) + L(D_r)  (MMUnlearner, Huo et al. 2025; the baselines excerpt).

    m keeps the entries of W whose forget saliency is at least `threshold` times their retain saliency
    (threshold 1 as its official mask generator, which keeps ratio >= threshold); only the forget term's
    gradient is masked, on the adapted layers' weight update (pipeline.training.saliency says how that
    relates to the paper's full-weight update).
    """
    forget_nll, retain_nll = nll(forget), nll(retain)
    masks = gradient_saliency.mask(threshold)
    kept = sum(float(mask.sum()) for mask in masks) / max(1, sum(mask.numel() for mask in masks))
    return {
        "loss": -forget_nll + retain_nll,
        "masked_forget": MaskedTerm(-forget_nll, masks),
        "forget_nll": forget_nll,
        "retain_nll": retain_nll,
        "mask_kept": torch.tensor(kept),
    }


# ---------------------------------------------------------------------------------------------------
# What a method needs


def loss_inputs(method: str) -> list[str]:
    """The tensors a method reads (its positional parameters), e.g. ["forget", "forget_teacher"]."""
    parameters = inspect.signature(LOSSES[method]).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def loss_arguments(method: str) -> dict[str, object]:
    """A loss's own arguments (its keyword-only parameters) with their paper defaults."""
    return declared_arguments(LOSSES[method])


def compute_loss(method: str, inputs: dict[str, object], arguments: dict[str, object]) -> LossTerms:
    """Call a loss with the inputs it declares and its arguments (checked: pipeline.unlearning.methods)."""
    needed = loss_inputs(method)
    missing = [name for name in needed if inputs.get(name) is None]
    if missing:
        raise ValueError(f"loss {method!r} needs {', '.join(missing)}")
    return LOSSES[method](**{name: inputs[name] for name in needed}, **arguments)


def load_refusals(path: str | Path = REFUSALS_FILE) -> list[str]:
    """The "I don't know"-type answers IdkPO prefers (one per line; ViKeR uses a set of 100)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    refusals = [line for line in lines if line and not line.startswith("#")]
    if not refusals:
        raise ValueError(f"{path} holds no refusal sentences")
    return refusals


def choose_refusal(sample_id: str, refusals: list[str], seed: int) -> str:
    """The refusal a forget sample is paired with: random across samples, fixed for a (seed, sample) pair,
    so the frozen model's log-probability of it can be computed once before training."""
    return refusals[stable_int(f"{seed}:{sample_id}", num_bytes=8) % len(refusals)]
