"""Reference log-probabilities of the frozen model (NPO, IdkPO): computed once, before any LoRA weight moves."""

from __future__ import annotations

import torch.distributed as dist

from cache.reader import iter_cache
from pipeline.models import prompted
from pipeline.samples import QASample
from pipeline.training.processes import Processes
from pipeline.training.streams import Cache


def frozen_answer_log_probs(loaded, inputs: list, batch_size: int = 8) -> list[float]:
    """log p(y | I, x; theta_full) per PromptedSample, with the frozen (LoRA-free) model in eval mode."""
    from pipeline.models import answer_token_log_probs

    return [
        float(values.sum()) for values in answer_token_log_probs(loaded, loaded.model, inputs, batch_size)
    ]


def reference_log_probs(
    loaded, samples: list[QASample], answers: dict[str, str] | None, processes: Processes
) -> dict[str, float]:
    """sample_id -> frozen-model log p(answer | I, x); each rank computes its share, then all share all."""
    mine = samples[processes.rank :: processes.world_size]
    inputs = [prompted(loaded, s, answers[s.sample_id] if answers else None) for s in mine]
    values = dict(zip([s.sample_id for s in mine], frozen_answer_log_probs(loaded, inputs), strict=True))
    if processes.world_size > 1:
        gathered: list[dict[str, float]] = [{} for _ in range(processes.world_size)]
        dist.all_gather_object(gathered, values)
        values = {key: value for part in gathered for key, value in part.items()}
    return values


def reference_log_probs_from_cache(cache: Cache) -> dict[str, float]:
    """From an `original` cache, whose stored target log-probs are the frozen model's own (one pass)."""
    return {
        cached.sample_id: float(cached.target_log_prob.double().sum())
        for cached in iter_cache(cache.directory, batch_size=16, draw=0)
    }
