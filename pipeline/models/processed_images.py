"""Preprocessed images kept by key, so that an image drawn again (a reference pool's) is resized and
normalised once per run, not at every batch that draws it."""

from __future__ import annotations

from PIL import Image

from pipeline.models.batching import (
    TeacherForcingBatch,
    _checked_answer_ids,
    _padded_inputs,
    _teacher_forcing_batch,
)
from pipeline.models.family import PromptedSample
from pipeline.models.loading import LoadedModel


class ProcessedImages:
    """Each keyed image's tensors (ModelFamily.preprocess_images), computed once per run.

    Stage one draws ViKeR's k reference images per sample from one pool, so every pool image comes back
    many times; its pixels (LLaVA-1.5: 3 x 336 x 336 float32, 1.35 MB) are kept by the image's key (its
    content hash). Bounded by size; once full it keeps what it holds and preprocesses other images at each
    use (VisionFeatureCache's rule). An image without a key (a per-sample noise draw) is never kept.
    """

    def __init__(self, loaded: LoadedModel, max_bytes: int = 2 << 30) -> None:
        self.loaded = loaded
        self.max_bytes = max_bytes
        self.bytes = 0
        self.kept: dict[str, dict] = {}
        self.processed = self.reused = 0

    def tensors(self, images: list[Image.Image], keys: list[str | None]) -> list[dict]:
        """Each image's tensors: kept ones reused, the others preprocessed in one call (a key repeated in
        the batch once)."""
        if len(keys) != len(images):
            raise ValueError(f"{len(images)} images but {len(keys)} image keys")
        first_of_key: dict[str, int] = {}
        new = []
        for index, key in enumerate(keys):
            if key is None or (key not in self.kept and key not in first_of_key):
                new.append(index)
                if key is not None:
                    first_of_key[key] = index
        fresh: dict[int, dict] = {}
        if new:
            family, processor = self.loaded.family, self.loaded.processor
            fresh = dict(zip(new, family.preprocess_images(processor, [images[i] for i in new]), strict=True))
            for index in new:
                self._keep(keys[index], fresh[index])
            self.processed += len(new)
        self.reused += len(images) - len(new)
        return [
            fresh[index] if index in fresh else self.kept.get(key) or fresh[first_of_key[key]]
            for index, key in enumerate(keys)
        ]

    def _keep(self, key: str | None, tensors: dict) -> None:
        size = sum(tensor.nbytes for tensor in tensors.values())
        if key is not None and key not in self.kept and self.bytes + size <= self.max_bytes:
            self.kept[key] = tensors
            self.bytes += size


def encode_keyed_answers(
    loaded: LoadedModel, samples: list[PromptedSample], image_keys: list[str | None], kept: ProcessedImages
) -> TeacherForcingBatch:
    """encode_answers, with the images' tensors from `kept` (`image_keys`: one per image, in order)."""
    answers = [_checked_answer_ids(loaded, sample) for sample in samples]
    images = [image for sample in samples for image in sample.images]
    keys = image_keys if len(image_keys) == len(images) else [None] * len(images)
    processed = kept.tensors(images, keys) if images else None
    encoded = loaded.family.encode_prompts(loaded.processor, [s.prompt for s in samples], images, processed)
    return _teacher_forcing_batch(_padded_inputs(loaded, encoded, answers), answers)
