"""MMUnlearner's gradient saliency over the weights the method is defined on, and the backward pass of a
loss with a masked term.

The saliency is MMUnlearner's mask generator's (its official gen_mask): per entry of each weight W of the
layers LoRA adapts, the mean over batches of (dL_NLL/dW)^2 on D_f and on D_r, at the frozen model (B = 0,
so the adapted model is the frozen one), in eval mode. The batches are split over the ranks and the sums
added across them, so every rank holds the same mask.

How this LoRA form relates to the paper's full-weight one. MMUnlearner updates W with m ⊙ grad_W L(D_f) +
grad_W L(D_r). Here W = W0 + (alpha/r) B A and only A and B train. The forget term's gradient is taken
with respect to the update ΔW = (alpha/r) B A of each adapted layer (sum over the batch's tokens of the
output gradient times the LoRA branch's input), multiplied by m there, and carried back to B and A by the
chain rule of ΔW = s B A: dL/dB = s (m ⊙ G) A^T, dL/dA = s B^T (m ⊙ G). The retain term's gradient is
the ordinary one. So the forget term reaches the adapter only through the masked entries' gradient, as in
the paper; but a rank-r product cannot keep an arbitrary entry pattern at zero, so the update it makes to
ΔW (s^2 (m ⊙ G) A^T A on a B step) is not confined to the mask. Confining ΔW itself needs a masked delta
that a LoRA adapter cannot store (issue 30, defect 3: left open; tests/test_train.py marks it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.training.processes import Processes
from pipeline.unlearning.losses import AnswerPredictions, GradientSaliency, LossTerms, MaskedTerm, nll

AllReduce = Callable[[torch.Tensor], None]  # an in-place sum over ranks (torch.distributed.all_reduce)


def lora_layers(peft_model: torch.nn.Module) -> list[Any]:
    """The layers LoRA adapts (PEFT's LoraLayer: base_layer, lora_A, lora_B), in module order."""
    from peft.tuners.lora import LoraLayer

    return [module for module in peft_model.modules() if isinstance(module, LoraLayer)]


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


class DeltaGradients:
    """Records, in each forward with gradients, every adapted layer's LoRA input x (after dropout) and the
    branch's output o = B A x, so that a term's gradient with respect to ΔW = s B A can be formed:
    dL/dΔW = sum_t dL/dy_t x_t^T with y = W0 x + s o, i.e. (1/s) sum_t dL/do_t x_t^T."""

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers
        self.inputs: list[list[torch.Tensor]] = [[] for _ in layers]
        self.outputs: list[list[torch.Tensor]] = [[] for _ in layers]
        for index, layer in enumerate(layers):
            name = layer.active_adapters[0]
            layer.lora_A[name].register_forward_hook(self.recorder(self.inputs[index], from_input=True))
            layer.lora_B[name].register_forward_hook(self.recorder(self.outputs[index], from_input=False))

    @staticmethod
    def recorder(recorded: list[torch.Tensor], from_input: bool) -> Callable:
        def record(module, args, output) -> None:
            # Not in a backward pass: gradient checkpointing reruns the layer there, and the terms' graph
            # is the first forward's.
            if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
                recorded.append(args[0] if from_input else output)

        return record

    def clear(self) -> None:
        for recorded in (*self.inputs, *self.outputs):
            recorded.clear()

    def masked_backward(self, value: torch.Tensor, masks: list[torch.Tensor]) -> None:
        """Add to B's and A's .grad the pull-back of m ⊙ G through ΔW = s B A: s (m ⊙ G) A^T, s B^T (m ⊙ G),
        with G = d value / dΔW = (1/s) sum_t dvalue/do_t x_t^T over the recorded forwards. One layer's G at a
        time, in float64: the forget gradient of a barely used weight (a key projection) is tiny, and
        AdamW would magnify float32 rounding in it into a different update on 1 and on W processes."""
        outputs = [output for recorded in self.outputs for output in recorded]
        gradients = iter(torch.autograd.grad(value, outputs, retain_graph=True, allow_unused=True))
        for layer, inputs, mask in zip(self.layers, self.inputs, masks, strict=True):
            name = layer.active_adapters[0]
            lora_a, lora_b, scaling = (
                layer.lora_A[name].weight,
                layer.lora_B[name].weight,
                layer.scaling[name],
            )
            delta_gradient = torch.zeros(mask.shape, dtype=torch.float64, device=lora_a.device)
            for x in inputs:
                gradient = next(gradients)
                if gradient is not None:
                    flat_gradient = gradient.reshape(-1, gradient.shape[-1]).double()
                    delta_gradient += flat_gradient.T @ x.reshape(-1, x.shape[-1]).double()
            masked = mask.to(delta_gradient) * delta_gradient / scaling
            accumulate(lora_b, scaling * masked @ lora_a.detach().double().T)
            accumulate(lora_a, scaling * lora_b.detach().double().T @ masked)


def accumulate(parameter: torch.nn.Parameter, gradient: torch.Tensor) -> None:
    gradient = gradient.to(parameter.dtype)
    parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient


def backward(
    terms: LossTerms, scale: float, trainable: list[torch.nn.Parameter], delta: DeltaGradients | None = None
) -> None:
    """Accumulate d(scale * loss)/d theta into .grad; a MaskedTerm's share is masked on ΔW (`delta`)."""
    masked = [value for value in terms.values() if isinstance(value, MaskedTerm)]
    if not masked:
        (terms["loss"] * scale).backward()
        return
    if len(masked) > 1:
        raise ValueError("a loss may return one MaskedTerm")
    if delta is None:
        raise ValueError("a MaskedTerm needs the adapted layers' recorded forward (DeltaGradients)")
    term = masked[0]
    delta.masked_backward(term.value * scale, term.masks)
    ((terms["loss"] - term.value) * scale).backward()
    delta.clear()


def all_reduce_gradients(trainable: list[torch.nn.Parameter], world_size: int) -> None:
    """The mean gradient over ranks, as DDP's reducer would give (used where a masked term bypasses it)."""
    import torch.distributed as dist

    for parameter in trainable:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad /= world_size
