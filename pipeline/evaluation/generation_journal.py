"""The journals of an evaluation's generated batches (pipeline.journal), beside its metrics.json.

A journal is keyed by everything the replies depend on, so a killed evaluation resumes with the batches it
finished and never reuses another setting's. Shard i of N journals its share of the batches in its own
file under the same key; the merging run absorbs them and generates only what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.evaluation.questions import Question
from pipeline.hashing import files_sha256, sha256_hex
from pipeline.journal import Journal


def adapter_files(adapter: str | None) -> list[Path]:
    return sorted(Path(adapter).glob("adapter_model.*")) if adapter else []


def reply_inputs(
    settings: dict[str, Any],
    model_fingerprint: str,
    adapter: str | None,
    relearned: str | None,
    data_files: list[Path],
) -> dict[str, Any]:
    """What the replies depend on besides the prompts: the settings that change a reply, the model, the
    adapters' weights and the data files read."""
    return {
        "config": settings,
        "model": model_fingerprint,
        "adapter": files_sha256(adapter_files(adapter)),
        "relearned": files_sha256(adapter_files(relearned)),
        "data": files_sha256(data_files),
    }


@dataclass(frozen=True)
class GenerationJournals:
    """The journals of one evaluation: `name` (generation, relearned) and, for a shard, its index."""

    folder: Path
    inputs: dict[str, Any]  # reply_inputs
    num_shards: int = 1

    def key(self, questions: list[Question]) -> str:
        """The resume key of `questions`' replies: the inputs and every prompt."""
        prompts = sha256_hex("\n".join(question.prompt for question in questions).encode())
        return sha256_hex(json.dumps({**self.inputs, "prompts": prompts}).encode())

    def open(self, questions: list[Question], name: str = "generation", shard: int | None = None) -> Journal:
        """The journal of `questions`' replies (shard i's own file when `shard` is given)."""
        return Journal(self.path(name, shard), self.key(questions))

    def path(self, name: str, shard: int | None = None) -> Path:
        suffix = "" if shard is None else f".shard-{shard:05d}-of-{self.num_shards:05d}"
        return self.folder / f".{name}-journal{suffix}.jsonl"

    def absorb_shards(self, journal: Journal, name: str) -> int:
        """The shards' generated batches into the merging run's journal; returns how many batches came in."""
        if self.num_shards == 1:
            return 0
        return sum(journal.absorb(self.path(name, shard)) for shard in range(self.num_shards))

    def remove_shards(self, name: str) -> None:
        for shard in range(self.num_shards if self.num_shards > 1 else 0):
            self.path(name, shard).unlink(missing_ok=True)
