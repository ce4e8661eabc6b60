"""A full-size weight delta beside LoRA, per adapted layer and adapter: MMUnlearner's masked forget update.

A rank-r product B A cannot hold an arbitrary pattern of entries at zero, so the forget term's update,
which MMUnlearner confines to a per-weight mask, is kept in a delta D of the adapted weight's own shape:
the layer computes W0 x + s B A x + D x. Only the masked gradient of the forget term reaches D
(pipeline.training.saliency), so D is zero outside the mask for the whole run (AdamW moves no entry
whose gradient was always zero, and weight decay keeps zero at zero). D lives on PEFT's LoRA layer, is
saved beside the PEFT files (MASKED_DELTA_FILE) and loaded with the adapter; it applies while its
adapter is active and not when the adapters are disabled (the full model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MASKED_DELTA_FILE = "masked_delta.safetensors"
ATTRIBUTE = "masked_deltas"


def lora_layers(peft_model: torch.nn.Module) -> list[tuple[str, Any]]:
    """(module name, layer) of the layers LoRA adapts (PEFT's LoraLayer), in module order."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]


def apply_deltas(layer: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The forward hook: add D x for each active adapter that has a delta."""
    deltas = getattr(layer, ATTRIBUTE)
    if layer.disable_adapters or layer.merged:
        return output
    x = args[0]
    for name in layer.active_adapters:
        if name in deltas:
            delta = deltas[name]
            output = output + torch.nn.functional.linear(x.to(delta.dtype), delta).to(output.dtype)
    return output


def deltas_of(layer: Any) -> torch.nn.ParameterDict:
    """The layer's deltas by adapter name, created (with its forward hook) on first use."""
    if not hasattr(layer, ATTRIBUTE):
        setattr(layer, ATTRIBUTE, torch.nn.ParameterDict())
        layer.register_forward_hook(apply_deltas)
    return getattr(layer, ATTRIBUTE)


def add_masked_deltas(peft_model: torch.nn.Module, adapter: str = "default") -> list[torch.nn.Parameter]:
    """A zero float32 delta of each adapted weight's shape for `adapter`, trainable; in lora_layers order."""
    added = []
    for _, layer in lora_layers(peft_model):
        weight = layer.get_base_layer().weight
        delta = torch.nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
        deltas_of(layer)[adapter] = delta
        added.append(delta)
    return added


def masked_delta_state(peft_model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """{adapted module name: D} of `adapter`; empty when it has none."""
    return {
        name: getattr(layer, ATTRIBUTE)[adapter].detach().contiguous()
        for name, layer in lora_layers(peft_model)
        if adapter in getattr(layer, ATTRIBUTE, {})
    }


def save_adapter(peft_model: Any, directory: str | Path) -> None:
    """PEFT's files of the active adapter and, where it has them, its deltas beside them."""
    from safetensors.torch import save_file

    peft_model.save_pretrained(str(directory))
    state = masked_delta_state(peft_model, peft_model.active_adapter)
    if state:
        save_file(state, str(Path(directory) / MASKED_DELTA_FILE))


def load_masked_deltas(peft_model: torch.nn.Module, directory: str | Path, adapter: str) -> bool:
    """Attach the deltas saved at `directory` (if any) to `adapter`'s layers, frozen; True if it had them.
    A delta naming a layer the model does not adapt, or of another shape, is refused naming both."""
    from safetensors.torch import load_file

    path = Path(directory) / MASKED_DELTA_FILE
    if not path.is_file():
        return False
    saved = load_file(str(path))
    layers = dict(lora_layers(peft_model))
    for name, value in saved.items():
        layer = layers.get(name)
        weight = layer.get_base_layer().weight if layer is not None else None
        if weight is None or tuple(weight.shape) != tuple(value.shape):
            raise ValueError(
                f"{path}: delta {name} {tuple(value.shape)} does not fit the adapted model "
                f"({'no such adapted layer' if weight is None else f'weight {tuple(weight.shape)}'})"
            )
        deltas_of(layer)[adapter] = torch.nn.Parameter(value.to(weight.device), requires_grad=False)
    return True


def drop_masked_deltas(peft_model: torch.nn.Module, keep: str) -> None:
    """Delete every adapter's deltas but `keep`'s (the model is to hold one adapter)."""
    for _, layer in lora_layers(peft_model):
        deltas = getattr(layer, ATTRIBUTE, None)
        for name in [name for name in deltas or {} if name != keep]:
            del deltas[name]


def restore_masked_deltas(peft_model: torch.nn.Module, directory: str | Path) -> None:
    """Copy a checkpoint's deltas into the active adapter's trainable ones, in place (the optimizer holds
    them); a checkpoint without the deltas the run trains is refused."""
    from safetensors.torch import load_file

    adapter = peft_model.active_adapter
    current = {
        name: getattr(layer, ATTRIBUTE)[adapter]
        for name, layer in lora_layers(peft_model)
        if adapter in getattr(layer, ATTRIBUTE, {})
    }
    if not current:
        return
    path = Path(directory) / MASKED_DELTA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the checkpoint lacks the masked deltas this run trains")
    saved = load_file(str(path))
    if set(saved) != set(current):
        raise ValueError(f"{path}: its deltas are of other layers than this run's")
    with torch.no_grad():
        for name, delta in current.items():
            delta.copy_(saved[name])


def fold_masked_deltas(layer: Any) -> None:
    """Add the active adapters' deltas into the layer's base weight (a merge: the caller restores it)."""
    weight = layer.get_base_layer().weight
    for name in layer.active_adapters:
        if name in getattr(layer, ATTRIBUTE, {}):
            weight.data += getattr(layer, ATTRIBUTE)[name].detach().to(weight.dtype)
