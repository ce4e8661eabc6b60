"""The config.json of the checkpoints the shipped experiments use, written out, so that their shapes are
known without a download: `pipeline check` falls back on them, bench/real_scale/ builds random models
from them, and docs/performance.md's tables are computed from them (pipeline.models.memory_estimate).
"""

from __future__ import annotations

import copy
from typing import Any

# llava-hf/llava-1.5-7b-hf/config.json, with the defaults it relies on written out.
LLAVA_15_7B = {
    "model_type": "llava",
    "image_token_index": 32000,
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False,
    "text_config": {  # lmsys/vicuna-7b-v1.5 (Llama-2-7B)
        "model_type": "llama",
        "vocab_size": 32064,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    },
    "vision_config": {  # openai/clip-vit-large-patch14-336
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
    },
}

# Qwen/Qwen2.5-VL-3B-Instruct/config.json (the fields that set shapes and token ids).
QWEN25_VL_3B = {
    "model_type": "qwen2_5_vl",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128000,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_config": {
        "model_type": "qwen2_5_vl",
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
}

# Hub ids (experiments' `sources`) -> config. MLLMU-Bench's fine-tuned LLaVA has llava-hf's shapes.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "llava-hf/llava-1.5-7b-hf": LLAVA_15_7B,
    "MLLMU/LLaVA_Vanilla": LLAVA_15_7B,  # as the experiments' sources spell it
    "MLLMMU/LLaVA_Vanilla": LLAVA_15_7B,
    "therem/llava-1.5-7b-CLEAR-finetune": LLAVA_15_7B,
    "Qwen/Qwen2.5-VL-3B-Instruct": QWEN25_VL_3B,
}


def known_config(repo: str) -> dict[str, Any]:
    """A copy of a known checkpoint's config (KeyError names the known ones)."""
    if repo not in KNOWN_CONFIGS:
        raise KeyError(f"no written-out config for {repo!r}; known: {', '.join(KNOWN_CONFIGS)}")
    return copy.deepcopy(KNOWN_CONFIGS[repo])
