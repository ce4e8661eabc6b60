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
    language model only). Works for models whose forward accepts `mm_encoder_outputs`: LLaVA (one pixel
    tensor per image) and Qwen2-VL / Qwen2.5-VL (all images' patches packed in one tensor, each image's
    t * h * w rows named by its image_grid_thw row, which stays in the inputs for the 3-D positions: its
    670M vision tower attends within each image only, so an image's features do not depend on the others
    in the batch); for others it steps aside and the model encodes as usual. Bounded by size (LLaVA-1.5-7B:
    576 x 4096 values, 4.7 MB per image in bf16; Qwen2.5-VL-3B at max_pixels 1,003,520: at most 1,280 x
    2048, 5.2 MB; kept on the model's device); once full it keeps what it holds and encodes other images at every use, as
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
        images = self._per_image(inputs, keys)
        if images is None:
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
        fresh = self._encode(images, to_encode)
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

    def _per_image(self, inputs: dict[str, Tensor], keys: list[str | None]) -> list[dict[str, Tensor]] | None:
        """Each image's encoder inputs (its pixels, and its grid where the model packs patches), or None
        where the cache does not apply (disabled, no images, keys that do not name one image each)."""
        pixel_values, grids = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if not self.enabled or pixel_values is None or "image_sizes" in inputs:
            return None
        if grids is not None:  # Qwen2-VL: rows of patches, t * h * w of them per image
            if len(grids) != len(keys) or int(grids.prod(-1).sum()) != pixel_values.shape[0]:
                return None
            patches = torch.split(pixel_values, grids.prod(-1).tolist())
            return [
                {"pixel_values": rows, "image_grid_thw": grids[index : index + 1]}
                for index, rows in enumerate(patches)
            ]
        if pixel_values.dim() != 4 or pixel_values.shape[0] != len(keys):
            return None
        return [{"pixel_values": pixel_values[index : index + 1]} for index in range(len(keys))]

    def _encode(self, images: list[dict[str, Tensor]], positions: list[int]) -> dict[int, Tensor]:
        """The features of images[positions], by position, from one pass of the frozen tower."""
        if not positions:
            return {}
        names = images[positions[0]].keys()
        batch = {name: torch.cat([images[position][name] for position in positions]) for name in names}
        with torch.no_grad():  # frozen tower: nothing to differentiate, and no graph kept in the cache
            output = self.encoder(**batch, return_dict=True).pooler_output
        return dict(zip(positions, output, strict=True))

    def clear(self) -> None:
        self.features.clear()
        self.bytes = 0

    def _keep(self, key: str, value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.bytes + size <= self.max_bytes:
            self.features[key] = value
            self.bytes += size
