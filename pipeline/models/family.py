"""What differs between architectures: a model family knows its prompt format, where image tokens go,
how answers end and which modules LoRA targets. Families register under the config's `model_type`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.registry import Registry


@dataclass
class PromptedSample:
    """One model input: a full prompt (image placeholders included), its images, an optional answer.

    `context_images` belong to placeholders that come before the main image's in the prompt
    (few-shot exemplars precede the query), so the images go in as [*context_images, image].
    """

    prompt: str
    image: Image.Image | None
    answer: str | None = None
    context_images: tuple[Image.Image, ...] = ()

    @property
    def images(self) -> list[Image.Image]:
        return [*self.context_images, *([self.image] if self.image is not None else [])]


class ModelFamily:
    """What differs between architectures. Subclasses register under the config's model_type."""

    name = "base"
    image_placeholder = "<image>"
    # LoRA goes on the language model's attention only: the vision tower has q_proj/v_proj too.
    lora_target_modules = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    # The prompt formats a family can write, by name; the first is its default. A checkpoint is asked in
    # the format it was trained on (e.g. MLLMU-Bench's fine-tuned LLaVA: "mllmu-bench").
    template_names: tuple[str, ...] = ("default",)
    # Whether an image's token count depends on its size (Qwen's dynamic resolution) or is fixed (LLaVA).
    image_tokens_vary = False

    def __init__(self, config: Any = None, template: str | None = None) -> None:
        # The model's config (load_model passes it): token ids some families need, e.g. Qwen's image pad.
        self.config = config
        self.template = template or self.template_names[0]
        self._image_tokens: dict[tuple[int, int] | None, int] = {}
        if self.template not in self.template_names:
            raise ValueError(
                f"prompt template {self.template!r} is not one of the {self.name} family's: "
                f"{', '.join(self.template_names)}"
            )

    def load_processor(self, model_dir: str, trust_remote_code: bool = False) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)

    def build_prompt(
        self, question: str, has_image: bool, instruction: str | None = None, exemplars: str = ""
    ) -> str:
        """The model's prompt for one question; `exemplars` is a solved few-shot block put where the
        family's format wants it (its image placeholders are matched by `PromptedSample.context_images`)."""
        raise NotImplementedError

    def answer_text(self, answer: str) -> str:
        """The text that follows the prompt when the model gives `answer`."""
        raise NotImplementedError

    def end_token_ids(self, tokenizer) -> list[int]:
        """Tokens that close an answer (appended when teacher forcing)."""
        return [tokenizer.eos_token_id]

    def encode_prompts(self, processor, prompts: list[str], images: list[Image.Image]) -> dict[str, Any]:
        """Tokenize prompts (image placeholders expanded) and preprocess images, unpadded.

        Returns {"input_ids": list[list[int]], plus image tensors such as "pixel_values"}.
        """
        encoded = processor(text=prompts, images=images or None, padding=False)
        result = {"input_ids": [list(ids) for ids in encoded["input_ids"]]}
        if images:
            result["pixel_values"] = torch.as_tensor(np.stack(encoded["pixel_values"]))
        return result

    def image_token_count(self, processor, image: Image.Image) -> int:
        """The tokens an image adds to its prompt beyond its placeholder's own text tokens (computed once per
        image size, or once where the count does not depend on the size)."""
        key = image.size if self.image_tokens_vary else None
        if key not in self._image_tokens:
            expanded = self.encode_prompts(processor, [self.image_placeholder], [image])["input_ids"][0]
            self._image_tokens[key] = len(expanded) - len(
                processor.tokenizer(self.image_placeholder)["input_ids"]
            )
        return self._image_tokens[key]

    def extra_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Family-specific tensors beside input_ids/attention_mask (e.g. position ids)."""
        # Left padding shifts positions: give each real token the position it has unpadded,
        # so a sample's logits do not depend on what it was batched with.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return {"position_ids": position_ids}

    def continuation_inputs(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int
    ) -> dict[str, torch.Tensor]:
        """extra_inputs of the last `length` positions of a sequence whose earlier part is in `model`'s KV
        cache (from the prefill just run)."""
        extra = self.extra_inputs(input_ids, attention_mask)
        return {name: value[..., -length:] for name, value in extra.items()}


FAMILIES: Registry[type[ModelFamily]] = Registry("model family")
