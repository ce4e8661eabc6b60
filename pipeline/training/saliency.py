"""MMUnlearner's gradient saliency over the trainable (LoRA) tensors, and the backward pass of a loss
with a masked term.

The mask is taken where training happens: over the LoRA tensors, at the frozen model (LoRA freshly
initialised), from the mean squared gradient of L_NLL per batch on D_f and on D_r, as MMUnlearner's mask
generator does over the model's weights. PEFT starts B at zero, so A's gradient is zero on both sets, its
ratio is 1 and it is kept: the mask selects entries of B, i.e. which (output channel, rank) pairs of each
adapted projection the forget term may move. The retain term moves every LoRA tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.unlearning.losses import AnswerPredictions, GradientSaliency, LossTerms, MaskedTerm, nll


def mean_squared_gradients(
    predictions_of: Callable[[list], AnswerPredictions],
    samples: Sequence,
    batch_size: int,
    trainable: list[torch.nn.Parameter],
) -> list[torch.Tensor]:
    """Per trainable tensor, 1/|batches| sum_b (d L_NLL(b) / d theta)^2 over `samples` in batches."""
    totals = [torch.zeros_like(parameter, dtype=torch.float32) for parameter in trainable]
    batches = [list(samples[start : start + batch_size]) for start in range(0, len(samples), batch_size)]
    for batch in batches:
        gradients = torch.autograd.grad(nll(predictions_of(batch)), trainable, allow_unused=True)
        for total, gradient in zip(totals, gradients, strict=True):
            if gradient is not None:
                total += gradient.detach().float().pow(2) / len(batches)
    return totals


def gradient_saliency(
    predictions_of: Callable[[list], AnswerPredictions],
    forget_samples: Sequence,
    retain_samples: Sequence,
    batch_size: int,
    trainable: list[torch.nn.Parameter],
) -> GradientSaliency:
    """The forget and retain saliency of every trainable tensor (MMUnlearner's gen_mask, on LoRA)."""
    if not retain_samples:
        raise ValueError("the gradient saliency needs retain samples (--retain-split)")
    return GradientSaliency(
        mean_squared_gradients(predictions_of, forget_samples, batch_size, trainable),
        mean_squared_gradients(predictions_of, retain_samples, batch_size, trainable),
    )


def backward(terms: LossTerms, scale: float, trainable: list[torch.nn.Parameter]) -> None:
    """Accumulate d(scale * loss)/d theta into .grad; a MaskedTerm's share is multiplied by its masks."""
    masked = [value for value in terms.values() if isinstance(value, MaskedTerm)]
    if not masked:
        (terms["loss"] * scale).backward()
        return
    if len(masked) > 1:
        raise ValueError("a loss may return one MaskedTerm")
    term = masked[0]
    earlier = [parameter.grad for parameter in trainable]
    for parameter in trainable:
        parameter.grad = None
    (term.value * scale).backward(retain_graph=True)
    for parameter, mask, before in zip(trainable, term.masks, earlier, strict=True):
        gradient = None if parameter.grad is None else parameter.grad * mask.to(parameter.grad)
        parameter.grad = before if gradient is None else gradient if before is None else before + gradient
    ((terms["loss"] - term.value) * scale).backward()


def all_reduce_gradients(trainable: list[torch.nn.Parameter], world_size: int) -> None:
    """The mean gradient over ranks, as DDP's reducer would give (used where a masked term bypasses it)."""
    import torch.distributed as dist

    for parameter in trainable:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad /= world_size
