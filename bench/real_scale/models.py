"""Random models at the shipped experiments' real shapes, built from written-out configs (no download):
LLaVA-1.5-7B and Qwen2.5-VL-3B (pipeline.models.known_configs), or with --tiny the same structures
shrunk to run on a CPU in seconds. Random weights change no shape, so time and memory are the real ones.

The tokenizers are byte-level BPEs trained on the mini world's text: LLaVA's laid out like llava-hf's
(<unk> <s> </s> at 0-2, <image> 32000, <pad> 32001), Qwen's as tests/builders.py builds it.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.mini_world.tiny_model import llava_tokenizer
from pipeline.models import DTYPES, LlavaFamily, LoadedModel, tokenizer_fingerprint
from pipeline.models.known_configs import LLAVA_15_7B, QWEN25_VL_3B

ROOT = Path(__file__).resolve().parents[2]

TINY_LLAVA = {
    "text_config": {
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": 112,
    },
}
TINY_QWEN_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "mrope_section": [2, 3, 3],
}
TINY_QWEN_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 4}
TINY_QWEN_PIXELS = 64 * 64  # the image processor's max_pixels in --tiny (the real default is Qwen's)


def model_config(tiny: bool) -> dict:
    """LLaVA-1.5-7B's config, or its --tiny shrink."""
    config = copy.deepcopy(LLAVA_15_7B)
    if tiny:
        for part, overrides in TINY_LLAVA.items():
            config[part].update(overrides)
    return config


def llava_layout_tokenizer(corpus: list[str], vocab_size: int = 4000):
    """A byte-level BPE trained on corpus, with LLaVA-1.5's special token ids (filler rows up to 32000)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = byte_level
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(corpus, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), 32000)})  # never produced by the merges
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]], unk_token="<unk>")
    )
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<image>", "<pad>"])  # 32000, 32001 as in llava-hf
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = llava_tokenizer(tokenizer)
    assert wrapped.convert_tokens_to_ids("<image>") == 32000 and wrapped.pad_token_id == 32001
    return wrapped


def build_llava(corpus: list[str], tiny: bool, dtype: str, device: str, attn: str | None) -> LoadedModel:
    """The random LLaVA, initialised directly on the device in its dtype (no 28 GB fp32 copy on the host)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    config = LlavaConfig(**model_config(tiny))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(
            config, dtype=DTYPES[dtype], attn_implementation=attn
        )
    model.eval().requires_grad_(False)
    size = config.vision_config.image_size
    tokenizer = llava_layout_tokenizer(corpus)
    tokenizer.padding_side = "left"
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LoadedModel(
        model=model,
        processor=processor,
        family=LlavaFamily(config),
        model_fingerprint="random-init",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        path="random:llava-1.5-7b" + ("-tiny" if tiny else ""),
    )


def qwen_config(tokenizer, tiny: bool) -> dict:
    """Qwen2.5-VL-3B's config (transformers 5's text_config / vision_config layout), ids from tokenizer."""
    real = copy.deepcopy(QWEN25_VL_3B)
    vision = real.pop("vision_config")
    text = {
        key: real[key]
        for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
        )
    }  # fmt: skip
    section = real["rope_scaling"]["mrope_section"]
    if tiny:
        text.update({k: v for k, v in TINY_QWEN_TEXT.items() if k != "mrope_section"})
        vision.update(TINY_QWEN_VISION)
        vision["out_hidden_size"] = text["hidden_size"]
        vision["fullatt_block_indexes"], vision["window_size"] = [1], 16
        section = TINY_QWEN_TEXT["mrope_section"]
    token = tokenizer.convert_tokens_to_ids
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": real["rope_theta"],
        "mrope_section": section,
    }
    text.update(bos_token_id=None, eos_token_id=token("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    special = {
        "image_token_id": token("<|image_pad|>"),
        "video_token_id": token("<|video_pad|>"),
        "vision_start_token_id": token("<|vision_start|>"),
        "vision_end_token_id": token("<|vision_end|>"),
        "tie_word_embeddings": real["tie_word_embeddings"],
    }
    return {"text_config": text, "vision_config": vision, **special}


def build_qwen(corpus: list[str], tiny: bool, dtype: str, device: str, attn: str | None) -> LoadedModel:
    """The random Qwen2.5-VL-3B; its processor saved to a folder and read back as the pipeline reads it."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from pipeline.models.family import FAMILIES
    from pipeline.models.qwen2_vl import QwenProcessorPieces

    sys.path.insert(0, str(ROOT / "tests"))
    from builders import train_qwen_tokenizer  # the tests' Qwen tokenizer (bench scripts share it)

    tokenizer = train_qwen_tokenizer(corpus, vocab_size=2000)
    config = Qwen2_5_VLConfig(**qwen_config(tokenizer, tiny))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=DTYPES[dtype], attn_implementation=attn
        )
    model.eval().requires_grad_(False)
    vision = config.vision_config
    pixels = {"max_pixels": TINY_QWEN_PIXELS, "min_pixels": 16 * 16} if tiny else {}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size, temporal_patch_size=2, **pixels
    )
    family = FAMILIES["qwen2_5_vl"](config, None)
    with tempfile.TemporaryDirectory(prefix="bench-qwen-processor-") as folder:
        QwenProcessorPieces(tokenizer, image_processor).save_pretrained(folder)
        processor = family.load_processor(folder)
    processor.tokenizer.padding_side = "left"
    return LoadedModel(
        model=model,
        processor=processor,
        family=family,
        model_fingerprint="random-init",
        tokenizer_fingerprint=tokenizer_fingerprint(processor.tokenizer),
        path="random:qwen2.5-vl-3b" + ("-tiny" if tiny else ""),
    )


def release(loaded: LoadedModel | None) -> None:
    """Free a model's device memory before the next one is built."""
    if loaded is not None:
        loaded.model.to("meta")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
