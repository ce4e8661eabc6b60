"""LoRA on the language model's attention only: the vision tower and projector stay frozen."""

from __future__ import annotations

import torch


def named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def add_lora(loaded, rank: int, alpha: int, dropout: float, seed: int):
    """The model wrapped with fresh LoRA weights (initialised from `seed`) on its language model's attention."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # A regex over module paths: the CLIP tower has q_proj/v_proj too and must stay frozen.
        target_modules=loaded.family.lora_target_modules,
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
