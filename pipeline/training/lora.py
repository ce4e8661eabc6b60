"""LoRA on the language model (its attention, or every linear layer): the vision tower and projector stay
frozen."""

from __future__ import annotations

import re

import torch


def named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def language_model_linear(model: torch.nn.Module) -> str:
    """A regex over module paths matching every nn.Linear of the language model and nothing else: the
    names MLLMU-Bench's find_all_linear_names collects (not lm_head), confined to the language model,
    which the official script's bare names are not (PEFT matches them in the CLIP tower's q/k/v too)."""
    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "language_model" in name.split(".")
        }
    )
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layer under a `language_model` module")
    return rf".*language_model\..*\.({'|'.join(map(re.escape, names))})"


def add_lora(loaded, rank: int, alpha: int, dropout: float, seed: int, targets: str = "attention"):
    """The model wrapped with fresh LoRA weights (initialised from `seed`) on its language model's attention
    (`targets` "attention") or on all of its linear layers ("linear")."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # A regex over module paths: the CLIP tower has q_proj/v_proj too and must stay frozen.
        target_modules=(
            loaded.family.lora_target_modules
            if targets == "attention"
            else language_model_linear(loaded.model)
        ),
        bias="none",
    )
    return get_peft_model(loaded.model, lora)


def enable_gradient_checkpointing(model) -> None:
    """Each decoder layer keeps only its input and recomputes its activations in the backward pass
    (transformers' checkpointing of the model's layers, PyTorch's non-reentrant kind; no KV cache)."""
    # The reentrant kind gives a layer's LoRA weights no gradient unless the layer's input requires one,
    # which frozen embeddings' output does not (it would need enable_input_require_grads).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' name from 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False
