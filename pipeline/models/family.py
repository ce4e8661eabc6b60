"""What differs between architectures: a model family knows its prompt format, where image tokens go,
how answers end and which modules LoRA targets. Families register under the config's `model_type`."""

from __future__ import annotations

import copy
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
    # Where a checkpoint saved without its processor files finds them (named in the error that says so).
    base_model_hint = "the hub id of the model it was fine-tuned from"
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

    def check_processor(self, processor: Any, config: Any, processor_dir: str, embedding_rows: int) -> None:
        """Refuse a processor that does not fit the weights, naming the file to fix: here a tokenizer with
        ids past the embedding matrix (a processor taken from another folder, model.processor_from)."""
        size = len(processor.tokenizer)
        if size > embedding_rows:
            raise ValueError(
                f"the tokenizer of {processor_dir} has {size} tokens, the model's embedding only "
                f"{embedding_rows} rows: take the tokenizer files of the model these weights came from"
            )

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

    def encode_prompts(
        self,
        processor,
        prompts: list[str],
        images: list[Image.Image],
        processed: list[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, Any]:
        """Tokenize prompts (image placeholders expanded) and preprocess images, unpadded.

        `processed`: the images' tensors from preprocess_images, one entry per image, used instead of
        preprocessing them again (ProcessedImages keeps them). Returns {"input_ids": list[list[int]], plus
        image tensors such as "pixel_values"}.
        """
        if processed is not None and images:
            processor = _with_processed_images(processor, processed)
        encoded = processor(text=prompts, images=images or None, padding=False)
        result = {"input_ids": [list(ids) for ids in encoded["input_ids"]]}
        if images:
            result["pixel_values"] = (
                torch.cat([tensors["pixel_values"] for tensors in processed])
                if processed is not None
                else torch.as_tensor(np.stack(encoded["pixel_values"]))
            )
        return result

    def preprocess_images(self, processor, images: list[Image.Image]) -> list[dict[str, torch.Tensor]]:
        """Each image's tensors as encode_prompts lays them out (rows of "pixel_values"), one entry per
        image, so that a caller can keep them (ProcessedImages)."""
        pixels = torch.as_tensor(np.stack(processor.image_processor(images)["pixel_values"]))
        return [{"pixel_values": pixels[index : index + 1]} for index in range(len(images))]

    def cap_pixels(self, processor, max_pixels: int | None) -> None:
        """Resize no image to more than `max_pixels` (dynamic-resolution families); None keeps the
        checkpoint's preprocessing."""
        if max_pixels is not None:
            raise ValueError(
                f"max_pixels {max_pixels}: the {self.name} family resizes every image to its fixed size; "
                "max_pixels applies to dynamic-resolution families (qwen2_vl, qwen2_5_vl) only"
            )

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


class _KeptImageProcessor:
    """The processor's image processor, answering with tensors computed before: the processor then expands
    each image's placeholder from them as it would from fresh ones."""

    def __init__(self, image_processor: Any, processed: list[dict[str, torch.Tensor]]) -> None:
        self.image_processor, self.processed = image_processor, processed

    def __call__(self, images: Any = None, **kwargs: Any) -> Any:
        from transformers import BatchFeature

        names = dict.fromkeys(name for tensors in self.processed for name in tensors)
        return BatchFeature(
            {name: torch.cat([tensors[name] for tensors in self.processed]) for name in names}
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.image_processor, name)


def _with_processed_images(processor: Any, processed: list[dict[str, torch.Tensor]]) -> Any:
    """A shallow copy of `processor` whose image processor returns `processed` (the original is untouched)."""
    kept = copy.copy(processor)
    kept.image_processor = _KeptImageProcessor(processor.image_processor, processed)
    return kept
