"""Qwen2-VL and Qwen2.5-VL in the model adapter layer (pipeline.models).

What differs from LLaVA:

- Prompts follow the models' chat template, whose default system turn is part of every prompt:
  `<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n`
  `<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n`;
  an answer follows without a leading space and ends with `<|im_end|>`.
- Images become a variable number of tokens (dynamic resolution): the image processor returns the
  flattened patches of all images plus each image's (t, h, w) patch grid, and every `<|image_pad|>`
  stands for grid.prod() / merge_size**2 tokens. The official processor does this expansion but
  cannot be built without torchvision (its video processor needs it), so we load the tokenizer and
  the PIL image processor and expand the pads ourselves; the numbers are then the same whether or
  not torchvision is installed.
- Positions are 3-D (M-RoPE: time, height, width for image tokens). The model computes them from
  input_ids, attention_mask (so left padding is skipped), image_grid_thw and `mm_token_type_ids`
  (0 text, 1 image, 2 video). Without mm_token_type_ids, Qwen2-VL refuses to run and Qwen2.5-VL
  silently falls back to 1-D positions 0..T-1 over the padded row: wrong logits, no error. So the
  family always passes mm_token_type_ids and never overrides positions when a batch holds images.
- LoRA: the vision blocks use `qkv`/`proj`, the language model `q_proj`...`o_proj` under
  `model.language_model.layers.N.self_attn`; the regex names the latter only.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.models.family import FAMILIES, ModelFamily

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_BLOCK = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"
END_OF_TURN = "<|im_end|>"
TEXT, IMAGE, VIDEO = 0, 1, 2  # the model's mm_token_type_ids values

# The chat template of Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct (identical; the
# tiny test models ship it so that tests can check build_prompt against apply_chat_template).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class QwenProcessorPieces:
    """The parts of Qwen2VLProcessor the pipeline uses, built without torchvision."""

    tokenizer: Any
    image_processor: Any

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)


@FAMILIES.register("qwen2_vl")
class Qwen2VLFamily(ModelFamily):
    """Qwen2-VL (`Qwen2VLForConditionalGeneration`, e.g. Qwen/Qwen2-VL-7B-Instruct)."""

    name = "qwen2_vl"
    image_placeholder = VISION_BLOCK
    image_tokens_vary = True  # dynamic resolution: one token per 2x2 patches of the resized image
    template_names = ("chat",)  # the Instruct checkpoints' chat template (CHAT_TEMPLATE)
    lora_target_modules = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

    def build_prompt(
        self, question: str, has_image: bool, instruction: str | None = None, exemplars: str = ""
    ) -> str:
        text = f"{instruction}\n{question}" if instruction else question
        vision = VISION_BLOCK if has_image else ""
        # Exemplars go inside the user turn, before the query's image: a chat model reads anything
        # outside its turns as a malformed conversation.
        return (
            f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
            f"<|im_start|>user\n{exemplars}{vision}{text}<|im_end|>\n<|im_start|>assistant\n"
        )

    def answer_text(self, answer: str) -> str:
        return answer  # the assistant turn starts right after "assistant\n"

    def end_token_ids(self, tokenizer) -> list[int]:
        return [_special_token_id(tokenizer, END_OF_TURN)]

    def load_processor(self, model_dir: str, trust_remote_code: bool = False) -> QwenProcessorPieces:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        if self.config is not None:
            pad_id = _special_token_id(tokenizer, IMAGE_PAD)
            if pad_id != self.config.image_token_id:
                raise ValueError(
                    f"{model_dir}: the tokenizer's {IMAGE_PAD} is id {pad_id} but the model's config says "
                    f"image_token_id {self.config.image_token_id}: tokenizer and model do not belong together"
                )
        self._check_chat_template(model_dir, tokenizer)
        return QwenProcessorPieces(tokenizer=tokenizer, image_processor=image_processor)

    def encode_prompts(
        self,
        processor,
        prompts: list[str],
        images: list[Image.Image],
        processed: list[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, Any]:
        """Token ids with every `<|image_pad|>` repeated once per merged patch of its image, plus
        pixel_values (all images' patches, flattened) and image_grid_thw (one (t, h, w) row per image)."""
        placeholders = sum(prompt.count(IMAGE_PAD) for prompt in prompts)
        if placeholders != len(images):
            raise ValueError(
                f"the prompts hold {placeholders} {IMAGE_PAD} placeholders but {len(images)} images were "
                f"given (first prompt: {prompts[0][:80]!r})"
            )
        tokenizer = processor.tokenizer
        token_ids = [list(ids) for ids in tokenizer(prompts)["input_ids"]]
        if not images:
            return {"input_ids": token_ids}
        if processed is None:
            processed = self.preprocess_images(processor, images)
        grids = torch.cat([tensors["image_grid_thw"] for tensors in processed])
        pixel_values = torch.cat([tensors["pixel_values"] for tensors in processed])
        tokens_per_image = (grids.prod(-1) // processor.image_processor.merge_size**2).numpy()
        pad_id = _special_token_id(tokenizer, IMAGE_PAD)
        expanded, first_image = [], 0
        for ids in token_ids:
            ids = np.asarray(ids)
            repeats = np.ones(len(ids), dtype=np.int64)
            is_pad = ids == pad_id
            repeats[is_pad] = tokens_per_image[first_image : first_image + int(is_pad.sum())]
            first_image += int(is_pad.sum())
            expanded.append(np.repeat(ids, repeats).tolist())
        return {"input_ids": expanded, "pixel_values": pixel_values, "image_grid_thw": grids}

    def preprocess_images(self, processor, images: list[Image.Image]) -> list[dict[str, torch.Tensor]]:
        """Each image's patches (t * h * w rows of pixel_values) and its (1, 3) grid."""
        features = processor.image_processor(images=images, return_tensors="pt")
        grids = features["image_grid_thw"]
        patches = torch.split(features["pixel_values"], grids.prod(-1).tolist())
        return [
            {"pixel_values": rows, "image_grid_thw": grids[index : index + 1]}
            for index, rows in enumerate(patches)
        ]

    def cap_pixels(self, processor, max_pixels: int | None) -> None:
        """Resize no image to more than `max_pixels` pixels (about max_pixels / 784 image tokens at Qwen's
        28 x 28 px per merged token): the checkpoints' own cap, 12,845,056 px, lets one 3000 x 2000 photo
        become 7,597 tokens and pad its whole batch."""
        if max_pixels is None:
            return
        image_processor = processor.image_processor
        least = image_processor.size["shortest_edge"]  # Qwen's "shortest_edge" is min_pixels
        if max_pixels < least:
            raise ValueError(
                f"max_pixels {max_pixels} is below the image processor's min_pixels {least} ({self.name})"
            )
        image_processor.size = {"shortest_edge": least, "longest_edge": max_pixels}

    def extra_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.config is None:
            raise ValueError(f"the {self.name} family needs the model config (load it with load_model)")
        token_types = torch.full_like(input_ids, TEXT)
        token_types[input_ids == self.config.image_token_id] = IMAGE
        token_types[input_ids == self.config.video_token_id] = VIDEO
        inputs = {"mm_token_type_ids": token_types}
        if not bool((token_types != TEXT).any()):
            # Without images the model does not compute positions from the mask: it numbers 0..T-1
            # over the padded row. Give each token its unpadded position, as get_rope_index would.
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return inputs

    def continuation_inputs(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int
    ) -> dict[str, torch.Tensor]:
        """Text after a cached image prompt continues its M-RoPE positions: its unpadded index plus the
        prefill's rope_deltas (get_rope_index's max position + 1 - unpadded length)."""
        inputs = super().continuation_inputs(model, input_ids, attention_mask, length)
        if "position_ids" in inputs:  # a text-only prompt: positions from the mask
            return inputs
        deltas = next(m.rope_deltas for m in model.modules() if getattr(m, "rope_deltas", None) is not None)
        unpadded = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[..., -length:]
        return {**inputs, "position_ids": unpadded + deltas.cpu().long().reshape(-1, 1)}

    def _check_chat_template(self, model_dir: str, tokenizer) -> None:
        """Warn when the checkpoint's own chat template renders another prompt than build_prompt."""
        template = _chat_template(model_dir, tokenizer)
        if template is None:
            return
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
        ours = self.build_prompt("Q?", has_image=True)
        try:
            rendered = tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        except Exception as error:  # a text-only template cannot render image content
            rendered = f"(an error: {error})"
        if rendered != ours:
            warnings.warn(
                f"{model_dir}: its chat template renders {rendered!r}, but the {self.name} family builds "
                f"{ours!r}; prompts follow the family",
                stacklevel=3,
            )


@FAMILIES.register("qwen2_5_vl")
class Qwen25VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, e.g. Qwen/Qwen2.5-VL-7B-Instruct)."""

    name = "qwen2_5_vl"


def _special_token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token: not a Qwen2-VL / Qwen2.5-VL tokenizer")
    return token_id


def _chat_template(model_dir: str, tokenizer) -> str | None:
    """The processor's chat template (the one with image content) before the tokenizer's."""
    directory = Path(model_dir)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        return json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    return tokenizer.chat_template or None
