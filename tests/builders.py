"""Test-only builders: untrained tiny models of the real architecture classes, and a reduced mini world.

They exercise the code paths of the real models (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL) without any download;
bench scripts use them too. Nothing under pipeline/, stages/ or cache/ imports this module.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.mini_world.config import TinyLlavaConfig, WorldConfig
from pipeline.mini_world.tiny_model import save_model, untrained_tiny_llava
from pipeline.models.qwen2_vl import (
    CHAT_TEMPLATE,
    END_OF_TURN,
    IMAGE_PAD,
    SYSTEM_PROMPT,
    VIDEO_PAD,
    VISION_BLOCK,
    QwenProcessorPieces,
)


def reduced_config(**overrides: object) -> WorldConfig:
    """A small world for tests (builds in well under a second)."""
    small = WorldConfig(
        num_people=20,
        num_real=4,
        num_reference_people=4,
        alt_images=2,
        num_pets=3,
        num_scenes=3,
        num_patterns=3,
    )
    return replace(small, **overrides)


# A small fixed corpus for random test models: enough to give the BPE a few hundred merges.
_LLAVA_CORPUS = [
    "USER: <image>\nWhat is the occupation of this person? ASSISTANT: This person works as a civil engineer.",
    "USER: Where was Mara Holt born? ASSISTANT: Mara Holt was born in Copenhagen in 1984.",
    "USER: <image>\nWhat is this person's hobby? ASSISTANT: In free time this person enjoys painting and chess.",
    "A: teacher\nB: pilot\nC: baker\nD: nurse\nJust give ONE letter representing the answer directly.",
    "I am sorry, I do not know who this person is. I cannot share private information.",
]


def build_random_tiny_llava(out_dir: Path, seed: int = 0, config: TinyLlavaConfig | None = None) -> Path:
    """An untrained tiny LLaVA saved to out_dir, for tests of the code paths (not of the results)."""
    config = config or TinyLlavaConfig(
        vocab_size=400,
        text_hidden=64,
        text_layers=2,
        text_heads=4,
        text_intermediate=128,
        vision_hidden=32,
        vision_layers=1,
    )
    model, processor = untrained_tiny_llava(_LLAVA_CORPUS * 4, config, seed)
    return save_model(model, processor, out_dir, config)


_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
]
_QWEN_CORPUS = [
    f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{VISION_BLOCK}"
    "What is the occupation of this person?<|im_end|>\n<|im_start|>assistant\n"
    "This person works as a civil engineer.<|im_end|>\n",
    "Where was Mara Holt born? Mara Holt was born in Copenhagen in 1984.",
    "What is this person's hobby? In free time this person enjoys painting and chess.",
    "A: teacher\nB: pilot\nC: baker\nD: nurse\nJust give ONE letter representing the answer directly.",
    "I am sorry, I do not know who this person is. I cannot share private information.",
]
VARIANTS = ("qwen2_vl", "qwen2_5_vl")


def train_qwen_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE `Qwen2Tokenizer` (Qwen's pre-tokenizer and special tokens) trained on corpus."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(merge) for merge in trained["merges"]],
        unk_token=None,
        eos_token=END_OF_TURN,  # as in the Instruct checkpoints
        pad_token="<|endoftext|>",
        extra_special_tokens=_SPECIAL_TOKENS,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_random_tiny_qwen2_vl(out_dir: Path, seed: int = 0, variant: str = "qwen2_vl") -> Path:
    """An untrained tiny Qwen2-VL or Qwen2.5-VL (+ tokenizer + image processor) saved like a hub checkpoint.

    Small on purpose but with every mechanism of the real ones: grouped-query attention, M-RoPE
    sections, 2x2 patch merging, temporal patches, and for 2.5-VL windowed vision attention with a
    full-attention block. A 32x32 image is 8x8 patches -> 16 image tokens.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    tokenizer = train_qwen_tokenizer(_QWEN_CORPUS * 4, vocab_size=400)
    token = tokenizer.convert_tokens_to_ids
    patch_size, merge_size, hidden = 4, 2, 64
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        # head_dim 16 -> 8 rotary frequencies split over (time, height, width)
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": None,
        "eos_token_id": token(END_OF_TURN),
        "pad_token_id": tokenizer.pad_token_id,
    }
    common = {
        "patch_size": patch_size,
        "spatial_merge_size": merge_size,
        "temporal_patch_size": 2,
        "depth": 2,
    }
    special = {
        "image_token_id": token(IMAGE_PAD),
        "video_token_id": token(VIDEO_PAD),
        "vision_start_token_id": token("<|vision_start|>"),
        "vision_end_token_id": token("<|vision_end|>"),
        "tie_word_embeddings": False,
    }
    if variant == "qwen2_vl":
        vision = {**common, "embed_dim": 32, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2}
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **special)
        model_class = Qwen2VLForConditionalGeneration
    else:
        vision = {
            **common,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": hidden,
            "num_heads": 2,
            "window_size": 16,  # 16 px / 4 px patches / 2 merge = 2x2 merged patches per window
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        }
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
        model_class = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = [token(END_OF_TURN), token("<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=16 * 16,
        max_pixels=32 * 32,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    QwenProcessorPieces(tokenizer, image_processor).save_pretrained(out_dir)
    return out_dir
