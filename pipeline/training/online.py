"""The teacher computed online (`pipeline train --teacher-source online`): the benchmark of the cache.

Every step, the frozen model (the adapter switched off) computes the teacher's full distribution for the
batch's samples from the inputs precompute reads: the cache's own teacher and arguments (its header), the
same reference pool (checked against the header's fingerprint), the same draw of a randomised input (the
cached row's `draw`), through precompute's forward pass (pipeline.unlearning.extractor.TeacherExtractor)
with nothing truncated (top-p 1, the whole vocabulary). The samples and their order still come from the
cache's stream, so the only difference from a cached run is truncation and float16 storage
(bench/cache_fidelity.py, docs/performance.md "Cache fidelity").
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from cache import CachedSample, concat_samples
from cache.distributions import sparse_kl
from pipeline.models import LoadedModel
from pipeline.samples import QASample
from pipeline.training.streams import Cache
from pipeline.unlearning.extractor import TeacherExtractor
from pipeline.unlearning.teachers import TEACHERS, TeacherContext, original, pool_fingerprint, reference_pool


class OnlineTeacher:
    """The dense teacher rows of a cache's teacher, recomputed from the same inputs on the frozen model."""

    def __init__(self, loaded: LoadedModel, cache: Cache, data: str, references: str | None = None) -> None:
        header = cache.manifest.header
        self.teacher = TEACHERS[header["teacher"]]
        arguments = header["teacher_params"]
        pool, kind = reference_pool(self.teacher, arguments, references, data, header["split"])
        if pool is not None and pool_fingerprint(pool) != header.get("reference_pool_fingerprint"):
            raise ValueError(
                f"the online teacher's reference pool {kind!r} (beside {data}) is not the one cache "
                f"{cache.directory} was computed from (reference_pool_fingerprint differs)"
            )
        self.context = TeacherContext(
            family=loaded.family, arguments=arguments, reference_pool=pool, reference_kind=kind
        )
        vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])
        self.extractor = TeacherExtractor(loaded, top_p=1.0, max_support=vocab_size)
        self.frozen: Any = None  # the peft model, whose adapter is switched off for the teacher's pass

    def rows(self, items: list[tuple[QASample, CachedSample]]) -> list[CachedSample]:
        """The full distributions of the items' samples, each from its cached row's draw."""
        samples = [sample for sample, _ in items]
        inputs = [self.teacher(sample, replace(self.context, draw=row.draw)) for sample, row in items]
        with self.frozen_model():
            rows = self.extractor(samples, inputs)
        # Out of inference mode: the loss saves the teacher's probabilities for its backward pass.
        return [
            replace(
                row,
                draw=cached.draw,
                support_probs=row.support_probs.clone(),
                tail_mass=row.tail_mass.clone(),
            )
            for row, (_, cached) in zip(rows, items, strict=True)
        ]

    def cache_errors(self, items: list[tuple[QASample, CachedSample]]) -> list[Tensor]:
        """Per token of each item: KL(R~ || Q0) - KL(R || Q0), the cached (truncated, float16) row against
        the full one, Q0 the frozen model on the unmodified input (the student at step 1, LoRA's B = 0).
        A KL loss term summed over a sample's tokens moves by their sum at step 1 (docs/performance.md)."""
        samples = [sample for sample, _ in items]
        dense = concat_samples(self.rows(items))[1]
        cached = concat_samples([row for _, row in items])[1]
        students = [original(sample, self.context) for sample in samples]
        with self.frozen_model(), torch.inference_mode():
            _, student_probs, _, lengths = self.extractor.mean_distributions(samples, students)
        student_logits = torch.log(student_probs.double().clamp_min(1e-300)).cpu()
        difference = [
            sparse_kl(rows.support_ids, rows.support_probs.double(), rows.tail_mass.double(), student_logits)
            for rows in (cached, dense)
        ]
        return list(torch.split(difference[0] - difference[1], lengths))

    @contextmanager
    def frozen_model(self):
        """The full model as precompute runs it: adapter off, eval mode (no dropout)."""
        if self.frozen is None:
            yield
            return
        training = self.frozen.training
        self.frozen.eval()
        try:
            with self.frozen.disable_adapter(), torch.no_grad():
                yield
        finally:
            self.frozen.train(training)


def teacher_rows(
    online: OnlineTeacher | None, items: list[tuple[QASample, CachedSample]]
) -> list[CachedSample]:
    """The rows a loss reads for the items: the cache's, or the online teacher's."""
    return online.rows(items) if online is not None else [rows for _, rows in items]
