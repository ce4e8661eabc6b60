"""The teacher forward pass: teacher inputs through the frozen model, truncated per-token distributions.

R of a token is the mean of the softmaxes of the sample's variants (ViKeR Eq. 4; one variant otherwise),
truncated on the device (cache.distributions.truncate_probabilities) before anything is copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cache import CachedSample
from cache.distributions import truncate_probabilities
from pipeline.models import LoadedModel, VisionFeatureCache, answer_logits, check_lengths
from pipeline.models.processed_images import ProcessedImages, encode_keyed_answers
from pipeline.samples import QASample
from pipeline.unlearning.teachers import TeacherInput


class TeacherExtractor:
    """Runs teacher inputs through the frozen model and returns truncated per-token distributions."""

    def __init__(self, loaded: LoadedModel, top_p: float, max_support: int, tail_cost: float = 0.0) -> None:
        self.loaded = loaded
        self.top_p, self.max_support, self.tail_cost = top_p, max_support, tail_cost
        self.vision_features = VisionFeatureCache(loaded.model)
        # A pool's reference images come back in many batches: preprocessed once (issue 29, item 9).
        self.processed_images = ProcessedImages(loaded)

    def __call__(
        self,
        samples: Sequence[QASample],
        inputs: Sequence[TeacherInput],
        students: Sequence[TeacherInput] | None = None,
    ) -> list[CachedSample]:
        """The truncated rows of each sample; `students` (the unmodified inputs) for the student-aware
        part of the rule (cache.distributions.truncate_probabilities)."""
        with torch.inference_mode():
            answers, mean_probs, target_log_prob, lengths = self.mean_distributions(samples, inputs)
            student = self.mean_distributions(samples, students)[1] if students is not None else None
            # The ground-truth token always joins the support: R(y_t) and the gradient at y_t stay exact.
            targets = torch.cat(answers).to(mean_probs.device)
            truncated = truncate_probabilities(
                mean_probs, self.top_p, self.max_support, targets, student, self.tail_cost
            )
            # One copy of the small truncated tensors per batch, then split per sample on the host.
            truncated, target_log_prob = truncated.to("cpu"), target_log_prob.cpu()
        rows, start = [], 0
        for sample, answer_ids, length in zip(samples, answers, lengths, strict=True):
            rows.append(
                CachedSample.from_distributions(
                    sample.sample_id,
                    answer_ids,
                    truncated.rows(start, start + length),
                    target_log_prob[start : start + length],
                )
            )
            start += length
        return rows

    def mean_distributions(
        self, samples: Sequence[QASample], inputs: Sequence[TeacherInput]
    ) -> tuple[list[Tensor], Tensor, Tensor, list[int]]:
        """(answer ids per sample, R (N, V) on the device, log R(y_t) (N,), answer lengths).

        All variants of all samples run as one batch; R of a token is the mean over its sample's variants.
        """
        variants = [variant for teacher_input in inputs for variant in teacher_input.variants]
        owners = [index for index, teacher_input in enumerate(inputs) for _ in teacher_input.variants]
        image_keys = [key for teacher_input in inputs for key in teacher_input.image_keys]
        batch = encode_keyed_answers(self.loaded, variants, image_keys, self.processed_images)
        check_lengths(self.loaded, batch, [samples[owner] for owner in owners])
        batch = batch.to(self.loaded.device)
        model_kwargs = self.vision_features.model_kwargs(batch.inputs, image_keys)
        log_probs = torch.log_softmax(answer_logits(self.loaded.model, batch, **model_kwargs).float(), dim=-1)

        # Token t of variant j of sample i (batch row r) adds into output row offsets[i] + t.
        first_variant = {owner: position for position, owner in reversed(list(enumerate(owners)))}
        lengths = [batch.answer_lengths[first_variant[index]] for index in range(len(samples))]
        offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        output_rows, variant_rows = [], []
        for position, (owner, length) in enumerate(zip(owners, batch.answer_lengths, strict=True)):
            output_rows.append(torch.arange(length) + offsets[owner])
            variant_rows.append(torch.full((length,), position - first_variant[owner]))
        output_row = torch.cat(output_rows).to(log_probs.device)
        variant_of_row = torch.cat(variant_rows).to(log_probs.device)
        variant_counts = [len(teacher_input.variants) for teacher_input in inputs]
        counts = torch.tensor(variant_counts, device=log_probs.device, dtype=log_probs.dtype)
        counts = torch.repeat_interleave(counts, torch.tensor(lengths, device=log_probs.device))
        total = offsets[-1]
        mean_probs = torch.zeros(total, log_probs.shape[1], device=log_probs.device, dtype=log_probs.dtype)
        mean_probs.index_add_(0, output_row, log_probs.exp())
        mean_probs /= counts[:, None]

        # log R(y_t) = logsumexp_j log p_j(y_t) - log k: exact even where R(y_t) underflows float32.
        target_per_row = log_probs.gather(1, batch.targets[:, None]).squeeze(1)
        per_variant = torch.full((total, max(variant_counts)), float("-inf"), device=log_probs.device)
        per_variant[output_row, variant_of_row] = target_per_row
        target_log_prob = torch.logsumexp(per_variant, dim=1) - counts.log()

        targets = batch.targets.cpu()
        row_starts = [0, *torch.tensor(batch.answer_lengths).cumsum(0).tolist()]
        answers = [
            targets[row_starts[first_variant[i]] : row_starts[first_variant[i] + 1]]
            for i in range(len(samples))
        ]
        return answers, mean_probs, target_log_prob, lengths
