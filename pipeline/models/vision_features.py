"""Vision-tower features kept by image content, so that a frozen tower encodes each image once per run."""

from __future__ import annotations

from inspect import signature
from typing import Any

import torch
from torch import Tensor


class VisionFeatureCache:
    """Vision-tower features by image content key, so an image is encoded once per run.

    Stage one reuses a reference image's features across samples; training reuses the student's image
    features across steps and epochs (valid while the vision tower and projector are frozen: LoRA on the
    language model only). Works for models whose forward accepts `mm_encoder_outputs` with one pixel
    tensor per image (LLaVA); for others (e.g. Qwen2-VL's packed patches) it steps aside and the model
    encodes as usual. Bounded by size (LLaVA-1.5-7B: 576 x 4096 values, 4.7 MB per image in bf16, kept
    on the model's device); once full it keeps what it holds and encodes other images at every use, as
    EncodedSamples does, for the same reason (an epoch is a shuffled scan).
    """

    def __init__(self, model: torch.nn.Module, max_bytes: int = 4 << 30) -> None:
        inner = getattr(model, "model", None)
        self.encoder = getattr(inner, "get_image_features", None)
        self.enabled = (
            self.encoder is not None and "mm_encoder_outputs" in signature(model.forward).parameters
        )
        self.max_bytes = max_bytes
        self.bytes = 0
        self.features: dict[str, Tensor] = {}
        self.encoded = self.reused = 0

    def model_kwargs(self, inputs: dict[str, Tensor], keys: list[str | None]) -> dict[str, Any]:
        """Replace inputs['pixel_values'] by cached/fresh features; {} when not applicable."""
        pixel_values = inputs.get("pixel_values")
        if (
            not self.enabled
            or pixel_values is None
            or pixel_values.dim() != 4
            or pixel_values.shape[0] != len(keys)
            or "image_sizes" in inputs
        ):
            return {}
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # Encode each image not kept, once per batch (an unkeyed image every time).
        first_of_key: dict[str, int] = {}
        to_encode = []
        for position, key in enumerate(keys):
            if key is None or (key not in self.features and key not in first_of_key):
                to_encode.append(position)
                if key is not None:
                    first_of_key[key] = position
        fresh: dict[int, Tensor] = {}
        if to_encode:
            with torch.no_grad():  # frozen tower: nothing to differentiate, and no graph kept in the cache
                output = self.encoder(pixel_values=pixel_values[to_encode], return_dict=True).pooler_output
            fresh = dict(zip(to_encode, output, strict=True))
        features = []
        for position, key in enumerate(keys):
            if position in fresh:
                feature = fresh[position]
                if key is not None:
                    self._keep(key, feature)
                self.encoded += 1
            else:
                feature = self.features[key] if key in self.features else fresh[first_of_key[key]]
                self.reused += 1
            features.append(feature)
        del inputs["pixel_values"]
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}

    def clear(self) -> None:
        self.features.clear()
        self.bytes = 0

    def _keep(self, key: str, value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.bytes + size <= self.max_bytes:
            self.features[key] = value
            self.bytes += size
