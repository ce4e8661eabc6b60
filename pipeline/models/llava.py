"""LLaVA-1.5 in the model adapter layer (`llava-hf/llava-1.5-7b-hf` and the tiny mini-world model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.models.family import FAMILIES, ModelFamily


def image_token_count(processor: Any, image_size: int) -> int:
    """How many <image> tokens the processor writes for one image of the vision tower's size."""
    from PIL import Image

    encoded = processor(text=["<image>"], images=[Image.new("RGB", (image_size, image_size))])
    return list(encoded["input_ids"][0]).count(
        processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    )


@FAMILIES.register("llava")
class LlavaFamily(ModelFamily):
    """LLaVA-1.5 (`llava-hf/llava-1.5-7b-hf` and the tiny mini-world model)."""

    name = "llava"
    # llava-hf's chat format, and MLLMU-Bench's (its fine-tune and eval.py: a newline before ASSISTANT:).
    TEMPLATES = {"llava": "USER: {image}{text} ASSISTANT:", "mllmu-bench": "USER: {image}{text}\nASSISTANT:"}
    template_names = tuple(TEMPLATES)
    base_model_hint = "llava-hf/llava-1.5-7b-hf"
    # transformers 5's LlavaProcessor counts an image's tokens from these processor_config.json fields;
    # without them it raises a TypeError, or counts one token fewer than the vision tower's features.
    PROCESSOR_FIELDS = ("patch_size", "num_additional_image_tokens")  # the rest: the count check below

    def check_processor(self, processor: Any, config: Any, processor_dir: str, embedding_rows: int) -> None:
        """Also: processor_config.json names the fields the image-token count is computed from, and the
        count equals the vision tower's features (llava-hf's files: 576 for LLaVA-1.5-7B)."""
        super().check_processor(processor, config, processor_dir, embedding_rows)
        path = Path(processor_dir) / "processor_config.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        missing = [name for name in self.PROCESSOR_FIELDS if saved.get(name) is None]
        if missing:
            raise ValueError(
                f"{processor_dir}/processor_config.json lacks {', '.join(missing)} (a checkpoint saved without "
                f"llava-hf's processor files, e.g. MLLMU-Bench's fine-tuned LLaVA): copy processor_config.json "
                f"from {self.base_model_hint}, or set model.processor_from: {self.base_model_hint}"
            )
        vision = config.vision_config
        features = (vision.image_size // vision.patch_size) ** 2 + (
            0 if config.vision_feature_select_strategy == "default" else 1
        )
        tokens = image_token_count(processor, vision.image_size)
        if tokens != features:
            raise ValueError(
                f"{processor_dir}/processor_config.json gives {tokens} image tokens per image, the vision tower "
                f"{features} features (patch_size {processor.patch_size}, num_additional_image_tokens "
                f"{processor.num_additional_image_tokens}): take it from {self.base_model_hint}"
            )

    def build_prompt(
        self, question: str, has_image: bool, instruction: str | None = None, exemplars: str = ""
    ) -> str:
        text = f"{instruction}\n{question}" if instruction else question
        # MLLMU-Bench's eval.py puts the solved exemplars in front of the whole "USER: ..." turn.
        turn = self.TEMPLATES[self.template].format(image="<image>\n" if has_image else "", text=text)
        return exemplars + turn

    def answer_text(self, answer: str) -> str:
        return " " + answer
