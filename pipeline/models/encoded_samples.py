"""Each training input's prompt tokens, image tensors and answer tokens, encoded once and reused."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from pipeline.models.batching import (
    TeacherForcingBatch,
    _checked_answer_ids,
    _padded_inputs,
    _teacher_forcing_batch,
)
from pipeline.models.family import PromptedSample
from pipeline.models.loading import LoadedModel


class EncodedSamples:
    """Each input's prompt tokens, image tensors and answer tokens, encoded once and reused.

    Training asks the same samples every epoch, and tokenizing and preprocessing them again at every
    step is a sizeable part of a small model's step (bench/train.py measures it).
    The caller names each input by a key that identifies it completely (its image, question and answer;
    training uses the QASample itself with the answer text) and gives a function that builds the input:
    it runs only for keys not stored, so a stored input is neither rebuilt nor its image decoded.
    A batch built from the entries equals `encode_answers` on the same inputs: prompts are encoded
    one at a time, and the families' image tensors (one row per image or per image patch) concatenate
    along their first dimension in input order, as a batched processor call lays them out.
    """

    def __init__(self, loaded: LoadedModel, max_bytes: int = 1 << 30) -> None:
        # Bounded by size, not count: a real model's preprocessed image is over a megabyte (LLaVA-1.5 at
        # 336 px: 3 x 336 x 336 float32), so a retain set of thousands must not all stay in memory. Once
        # full it keeps what it holds and encodes the rest at every use: an epoch reads every sample once,
        # in a new order, and under that scan evicting the least recently used entry mostly evicts the
        # ones about to come.
        self.loaded = loaded
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: dict[Hashable, dict[str, Any]] = {}

    def batch(self, keys: list[Hashable], build: Callable[[int], PromptedSample]) -> TeacherForcingBatch:
        """The teacher-forced batch of inputs 0..len(keys)-1; build(i) makes input i when keys[i] is new."""
        entries = []
        for index, key in enumerate(keys):
            entry = self.entries.get(key)
            entries.append(entry if entry is not None else self._encode(key, build(index)))
        encoded: dict[str, Any] = {"input_ids": [entry["input_ids"] for entry in entries]}
        for name in dict.fromkeys(name for entry in entries for name in entry["images"]):
            encoded[name] = torch.cat([entry["images"][name] for entry in entries if name in entry["images"]])
        answers = [entry["answer_ids"] for entry in entries]
        return _teacher_forcing_batch(_padded_inputs(self.loaded, encoded, answers), answers)

    def _encode(self, key: Hashable, sample: PromptedSample) -> dict[str, Any]:
        encoded = self.loaded.family.encode_prompts(self.loaded.processor, [sample.prompt], sample.images)
        entry = {
            "input_ids": encoded.pop("input_ids")[0],
            "images": encoded,
            "answer_ids": _checked_answer_ids(self.loaded, sample),
        }
        entry["bytes"] = 8 * (len(entry["input_ids"]) + len(entry["answer_ids"])) + sum(
            tensor.nbytes for tensor in encoded.values()
        )
        if self.bytes + entry["bytes"] <= self.max_bytes:
            self.entries[key] = entry
            self.bytes += entry["bytes"]
        return entry
