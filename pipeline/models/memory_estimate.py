"""Expected peak GPU memory of a run's steps from the model's shapes alone: no weights, no GPU.

The arithmetic of docs/performance.md, used by `pipeline check` and by the tables there
(bench/expected_performance.py writes them from these functions, a test keeps them in sync):

    peak = weights (bf16: 2 bytes a parameter)
         + LoRA weights, gradients and AdamW's two moments (float32: 16 bytes a trainable parameter)
         + saved activations: bytes per token per layer x tokens with gradients x layers
         + logits: vocabulary x logit positions x 4 bytes x copies
         + the largest transient of one layer's forward (tokens x intermediate width x 2 bytes x 3)

The saved activations per token per layer were measured on a CPU (issue 29): a Llama-2-7B decoder layer
in bf16 with LoRA r 8 on q/k/v/o, lora_dropout 0.05, saves 257 KiB a token without checkpointing (56% of
it float32 copies PEFT makes per LoRA module). Other widths are scaled by hidden + intermediate, an
assumption until measured. With non-reentrant checkpointing a layer keeps only its input (hidden x 2
bytes a token: 8.0 KiB at LLaVA-7B's width, as bench/activation_memory.py measured on a real-size layer)
and one layer's activations live at a time, while it is recomputed in the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KIB = 1024
GIB = 2**30
# Measured (issue 29): Llama-2-7B decoder layer, bf16, LoRA r 8 on q/k/v/o, lora_dropout 0.05.
SAVED_BYTES_PER_TOKEN_PER_LAYER_LLAMA_7B = 257 * KIB
LLAMA_7B_WIDTHS = 4096 + 11008  # hidden + intermediate of that layer
ADAPTER_BYTES_PER_PARAMETER = 16  # float32 weight, gradient and AdamW's two moments (PEFT keeps LoRA in fp32)
TRAIN_LOGIT_COPIES = 3  # the logits, their float32 log-softmax, its gradient
INFERENCE_LOGIT_COPIES = 2  # the logits and their float32 softmax


@dataclass(frozen=True)
class ModelShapes:
    """What memory depends on: the language model's widths, the context and the image tokens."""

    name: str
    parameters: int  # every weight, vision tower included
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    context: int  # max_position_embeddings
    attention_heads: int
    kv_heads: int
    image_tokens: int | None  # per image; None where it depends on the image (Qwen2-VL's dynamic resolution)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, **(config.get("text_config") or {})}


def _vision_parameters(vision: dict[str, Any], text_hidden: int) -> int:
    """A ViT's weights: per block attention (4 h^2) and MLP (2 h i), plus a projector into the text width."""
    hidden = vision.get("hidden_size") or vision.get("embed_dim") or 0
    intermediate = vision.get("intermediate_size") or 4 * hidden
    layers = vision.get("num_hidden_layers") or vision.get("depth") or 0
    mlp_matrices = 3 if vision.get("model_type", "").startswith("qwen2_5") else 2  # Qwen2.5-VL's gated MLP
    merge = vision.get("spatial_merge_size", 1) ** 2
    blocks = layers * (4 * hidden * hidden + mlp_matrices * hidden * intermediate)
    projector = hidden * merge * hidden * merge + hidden * merge * text_hidden if merge > 1 else 0
    return blocks + (projector or (hidden * text_hidden + text_hidden * text_hidden))


def parameter_count(config: dict[str, Any]) -> int:
    """The weights of a LLaVA or Qwen2(.5)-VL checkpoint from its config.json (norms and biases aside)."""
    text = _text_config(config)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    kv_width = hidden // heads * text.get("num_key_value_heads", heads)
    attention = 2 * hidden * hidden + 2 * hidden * kv_width
    mlp = 3 * hidden * text["intermediate_size"]
    embeddings = text["vocab_size"] * hidden * (1 if text.get("tie_word_embeddings") else 2)
    return (
        layers * (attention + mlp) + embeddings + _vision_parameters(config.get("vision_config", {}), hidden)
    )


def image_tokens(config: dict[str, Any]) -> int | None:
    """LLaVA's fixed tokens per image ((image_size / patch_size)^2); None for dynamic resolution."""
    vision = config.get("vision_config", {})
    if "image_size" not in vision or "spatial_merge_size" in vision:
        return None
    return (vision["image_size"] // vision["patch_size"]) ** 2


def shapes_from_config(name: str, config: dict[str, Any]) -> ModelShapes:
    """ModelShapes from a checkpoint's config.json (a dict), as transformers writes LLaVA's and Qwen's."""
    text = _text_config(config)
    heads = text["num_attention_heads"]
    return ModelShapes(
        name=name,
        parameters=parameter_count(config),
        layers=text["num_hidden_layers"],
        hidden=text["hidden_size"],
        intermediate=text["intermediate_size"],
        vocab=text["vocab_size"],
        context=text["max_position_embeddings"],
        attention_heads=heads,
        kv_heads=text.get("num_key_value_heads", heads),
        image_tokens=image_tokens(config),
    )


def qwen_image_tokens(
    width: int, height: int, patch: int = 14, merge: int = 2, max_pixels: int | None = None
) -> int:
    """Qwen2-VL's tokens for one image: its pixels resized to multiples of patch x merge (capped at
    max_pixels, Qwen2-VL's smart_resize), one token per merge x merge patches."""
    factor = patch * merge
    if max_pixels is not None and width * height > max_pixels:
        scale = (max_pixels / (width * height)) ** 0.5
        width, height = int(width * scale // factor * factor), int(height * scale // factor * factor)
    return max(1, round(width / factor)) * max(1, round(height / factor))


def saved_bytes_per_token_per_layer(shapes: ModelShapes, checkpointing: bool) -> float:
    """Activations one decoder layer keeps for the backward pass, per token (see the module's note)."""
    if checkpointing:
        return 2 * shapes.hidden  # the layer's bf16 input; the rest is recomputed
    return SAVED_BYTES_PER_TOKEN_PER_LAYER_LLAMA_7B * (shapes.hidden + shapes.intermediate) / LLAMA_7B_WIDTHS


def activation_bytes(shapes: ModelShapes, tokens: int, checkpointing: bool) -> float:
    """Saved activations of one training step over `tokens` tokens that carry gradients."""
    kept = tokens * shapes.layers * saved_bytes_per_token_per_layer(shapes, checkpointing)
    if checkpointing:  # one layer's full activations while it is recomputed
        kept += tokens * saved_bytes_per_token_per_layer(shapes, checkpointing=False)
    return kept


def lora_parameters(shapes: ModelShapes, rank: int) -> int:
    """LoRA of rank r on q, k, v and o of every language-model layer: r x (in + out) per matrix."""
    kv_width = shapes.hidden // shapes.attention_heads * shapes.kv_heads
    return shapes.layers * rank * (6 * shapes.hidden + 2 * kv_width)


def logits_bytes(shapes: ModelShapes, positions: int, copies: int) -> float:
    """Logits at `positions` positions (the answer window in training, the last position when generating)."""
    return shapes.vocab * positions * 4 * copies


def layer_transient_bytes(shapes: ModelShapes, tokens: int) -> float:
    """The largest intermediate of one layer's forward (the MLP's gate, up and product, bf16)."""
    return tokens * shapes.intermediate * 2 * 3


def kv_cache_bytes(shapes: ModelShapes, tokens: int) -> float:
    """Keys and values of every layer for `tokens` positions (bf16), as generation keeps them."""
    return 2 * shapes.layers * tokens * shapes.hidden // shapes.attention_heads * shapes.kv_heads * 2


def weights_bytes(shapes: ModelShapes) -> float:
    return shapes.parameters * 2


@dataclass(frozen=True)
class StepShape:
    """One step's sequences: how many carry gradients, how many run without (teachers, frozen references)."""

    sequences_with_gradients: int
    sequences_without: int
    sequence_tokens: int  # prompt + image tokens + answer, the longest of the batch (padding)
    answer_tokens: int


def training_peak_bytes(shapes: ModelShapes, step: StepShape, lora_rank: int, checkpointing: bool) -> float:
    """Peak of one LoRA training step (stages/train.py's loss step)."""
    tokens = step.sequences_with_gradients * step.sequence_tokens
    positions = (step.sequences_with_gradients + step.sequences_without) * step.answer_tokens
    transient = max(tokens, step.sequences_without * step.sequence_tokens)
    return (
        weights_bytes(shapes)
        + ADAPTER_BYTES_PER_PARAMETER * lora_parameters(shapes, lora_rank)
        + activation_bytes(shapes, tokens, checkpointing)
        + logits_bytes(shapes, positions, TRAIN_LOGIT_COPIES)
        + layer_transient_bytes(shapes, transient)
    )


def forward_peak_bytes(
    shapes: ModelShapes, sequences: int, sequence_tokens: int, answer_tokens: int
) -> float:
    """Peak of one inference forward over a batch (precompute's teacher, likelihood scoring)."""
    return (
        weights_bytes(shapes)
        + layer_transient_bytes(shapes, sequences * sequence_tokens)
        + logits_bytes(shapes, sequences * answer_tokens, INFERENCE_LOGIT_COPIES)
    )


def generation_peak_bytes(shapes: ModelShapes, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    """Peak of generating `new_tokens` for a batch of prompts: the KV cache at its longest and the prefill."""
    return (
        weights_bytes(shapes)
        + kv_cache_bytes(shapes, batch * (prompt_tokens + new_tokens))
        + layer_transient_bytes(shapes, batch * prompt_tokens)
        + logits_bytes(shapes, batch, INFERENCE_LOGIT_COPIES)
    )


def gib(value: float) -> float:
    return value / GIB
