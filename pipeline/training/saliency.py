"""MMUnlearner's gradient saliency over the weights the method is defined on, and the backward pass of a
loss with a masked term.

The saliency is MMUnlearner's mask generator's (its official gen_mask): per entry of each weight W of the
layers LoRA adapts, the mean over batches of (dL_NLL/dW)^2 on D_f and on D_r, at the frozen model (B = 0,
so the adapted model is the frozen one), in eval mode. The batches are split over the ranks and the sums
added across them, so every rank holds the same mask.

How this LoRA form relates to the paper's full-weight one. MMUnlearner updates W with -m ⊙ grad_W L(D_f)
+ grad_W L(D_r). Here the forget term trains a full-size delta D of each adapted weight and nothing
else, with its gradient multiplied by m (pipeline.models.masked_delta): its update is confined to the
mask for the whole run, as in the paper. The retain term trains the LoRA weights A and B only, so its
update is the paper's restricted to rank r (as every LoRA baseline here). The adapted layer computes
W0 x + s B A x + D x.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.models.masked_delta import lora_layers as named_lora_layers
from pipeline.training.processes import Processes
from pipeline.unlearning.losses import AnswerPredictions, GradientSaliency, LossTerms, MaskedTerm, nll

AllReduce = Callable[[torch.Tensor], None]  # an in-place sum over ranks (torch.distributed.all_reduce)


def lora_layers(peft_model: torch.nn.Module) -> list[Any]:
    """The layers LoRA adapts (PEFT's LoraLayer: base_layer, lora_A, lora_B), in module order."""
    return [layer for _, layer in named_lora_layers(peft_model)]


def rank_batches(samples: Sequence, batch_size: int, processes: Processes) -> tuple[list[list], int]:
    """This rank's batches (batch b goes to rank b mod W) and the number of batches over all ranks."""
    batches = [list(samples[start : start + batch_size]) for start in range(0, len(samples), batch_size)]
    return batches[processes.rank :: processes.world_size], len(batches)


def squared_gradient_sums(
    predictions_of: Callable[[list], AnswerPredictions], batches: list[list], weights: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Per weight, sum_b (d L_NLL(b) / dW)^2 over `batches` (float32)."""
    totals = [torch.zeros_like(weight, dtype=torch.float32) for weight in weights]
    for batch in batches:
        gradients = torch.autograd.grad(nll(predictions_of(batch)), weights, allow_unused=True)
        for total, gradient in zip(totals, gradients, strict=True):
            if gradient is not None:
                total += gradient.detach().float().pow(2)
    return totals


def mean_over_ranks(
    sums: list[torch.Tensor], count: int, processes: Processes, all_reduce: AllReduce | None = None
) -> list[torch.Tensor]:
    """The sums added over every rank, divided by `count`: the same tensors on all of them."""
    if processes.world_size > 1:
        if all_reduce is None:
            import torch.distributed as dist

            all_reduce = dist.all_reduce
        for total in sums:
            all_reduce(total)
    return [total / count for total in sums]


def gradient_saliency(
    predictions_of: Callable[[list], AnswerPredictions],
    forget_samples: Sequence,
    retain_samples: Sequence,
    batch_size: int,
    weights: list[torch.Tensor],
    processes: Processes,
    all_reduce: AllReduce | None = None,
) -> GradientSaliency:
    """MMUnlearner's F_f and F_r of each weight (its gen_mask): 1/|batches| sum_b (dL_NLL(b)/dW)^2 on D_f
    and on D_r. The weights are made differentiable for the passes and frozen again after."""
    if not retain_samples:
        raise ValueError("the gradient saliency needs retain samples (--retain-split)")
    for weight in weights:
        weight.requires_grad_(True)
    try:
        fishers = []
        for samples in (forget_samples, retain_samples):
            batches, count = rank_batches(samples, batch_size, processes)
            sums = squared_gradient_sums(predictions_of, batches, weights)
            fishers.append(mean_over_ranks(sums, count, processes, all_reduce))
    finally:
        for weight in weights:
            weight.requires_grad_(False)
    return GradientSaliency(*fishers)


def accumulate(parameter: torch.nn.Parameter, gradient: torch.Tensor) -> None:
    gradient = gradient.to(parameter.dtype)
    parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient


def backward(
    terms: LossTerms,
    scale: float,
    trainable: list[torch.nn.Parameter],
    deltas: list[torch.nn.Parameter] | None = None,
) -> None:
    """Accumulate d(scale * loss)/d theta into .grad. A MaskedTerm's gradient goes to the masked deltas
    only (pipeline.models.masked_delta), multiplied by its mask, and the rest of the loss to the other
    trainable weights only: the masked term moves no weight outside its mask."""
    masked = [value for value in terms.values() if isinstance(value, MaskedTerm)]
    if not masked:
        (terms["loss"] * scale).backward()
        return
    if len(masked) > 1:
        raise ValueError("a loss may return one MaskedTerm")
    if not deltas:
        raise ValueError(
            "a MaskedTerm needs the masked deltas its update goes to (pipeline.models.masked_delta)"
        )
    term = masked[0]
    gradients = torch.autograd.grad(term.value * scale, deltas, retain_graph=True, allow_unused=True)
    for delta, gradient, mask in zip(deltas, gradients, term.masks, strict=True):
        if gradient is not None:
            accumulate(delta, gradient * mask.to(gradient))
    others = [parameter for parameter in trainable if not any(parameter is delta for delta in deltas)]
    torch.autograd.backward((terms["loss"] - term.value) * scale, inputs=others)


def all_reduce_gradients(trainable: list[torch.nn.Parameter], world_size: int) -> None:
    """The mean gradient over ranks, as DDP's reducer would give (used where a masked term bypasses it)."""
    import torch.distributed as dist

    for parameter in trainable:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad /= world_size
