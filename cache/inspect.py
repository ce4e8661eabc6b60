"""Summary statistics of a cache, and the KL error of its truncation against exact teachers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cache.distributions import sparse_kl
from cache.manifest import read_manifest
from cache.reader import iter_cache
from cache.schema import CachedSample

ExactTeacher = Callable[[list[CachedSample]], Iterable[tuple[Tensor, Tensor]]]


def inspect_cache(
    directory: str | Path,
    measure_against: ExactTeacher | None = None,
    batch_size: int = 16,
    measure_limit: int | None = None,
) -> dict[str, Any]:
    """Summary statistics of a cache; with measure_against, also the KL error of the truncation.

    measure_against(samples) yields, per sample, (exact teacher probabilities (T, V), student logits
    (T, V)); kl_error is the mean over tokens of |KL_cached(R || Q) - KL(R || Q)|, over the first
    measure_limit samples (default all).
    """
    manifest = read_manifest(directory)
    bytes_on_disk = sum((manifest.directory / shard.parquet_file).stat().st_size for shard in manifest.shards)
    tokens = support_entries = 0
    tail_sum = entropy_sum = 0.0
    tail_max = 0.0
    kl_errors: list[Tensor] = []
    kl_exact: list[Tensor] = []
    pending: list[CachedSample] = []
    to_measure = measure_limit if measure_limit is not None else float("inf")

    def measure(samples: list[CachedSample]) -> None:
        for sample, (teacher, student_logits) in zip(samples, measure_against(samples), strict=True):
            cached = sparse_kl(sample.support_ids, sample.support_probs, sample.tail_mass, student_logits)
            log_q = torch.log_softmax(student_logits.double(), dim=-1)
            teacher = teacher.double()
            positive = teacher > 0
            exact = torch.where(positive, teacher * (torch.log(teacher.clamp_min(1e-300)) - log_q), 0.0).sum(
                -1
            )
            kl_errors.append((cached.double() - exact).abs())
            kl_exact.append(exact)

    for sample in iter_cache(manifest.directory, batch_size=batch_size):
        tokens += sample.num_tokens
        support_entries += int((sample.support_ids >= 0).sum())
        tail_sum += float(sample.tail_mass.double().sum())
        tail_max = max(tail_max, float(sample.tail_mass.max()))
        entropy_sum += float(sample.entropy.double().sum())
        if measure_against is not None and to_measure > 0:
            to_measure -= 1
            pending.append(sample)
            if len(pending) >= batch_size:
                measure(pending)
                pending = []
    if measure_against is not None and pending:
        measure(pending)

    summary: dict[str, Any] = {
        "directory": str(manifest.directory),
        "teacher": manifest.header.get("teacher"),
        "teacher_params": manifest.header.get("teacher_params"),
        "shards": manifest.num_shards,
        "samples": manifest.num_samples,
        "tokens": tokens,
        "bytes_on_disk": bytes_on_disk,
        "bytes_per_token": bytes_on_disk / max(tokens, 1),
        "mean_support_size": support_entries / max(tokens, 1),
        "mean_tail_mass": tail_sum / max(tokens, 1),
        "max_tail_mass": tail_max,
        "mean_entropy": entropy_sum / max(tokens, 1),
        "model_fingerprint": manifest.model_fingerprint,
        "tokenizer_fingerprint": manifest.tokenizer_fingerprint,
    }
    if measure_against is not None and kl_errors:
        errors = torch.cat(kl_errors)
        summary["kl_error"] = float(errors.mean())
        summary["kl_error_max"] = float(errors.max())
        summary["kl_exact_mean"] = float(torch.cat(kl_exact).mean())
        summary["measured_tokens"] = int(errors.numel())
    return summary
