"""The journals of an evaluation's generated batches (pipeline.journal), beside its metrics.json.

A journal is keyed by everything the replies depend on, so a killed evaluation resumes with the batches it
finished and never reuses another setting's. Shard i of N journals its share of the batches in its own
file under the same key; the merging run absorbs them and generates only what is missing within them, and
refuses to start when a shard's journal is absent or was written for other inputs (it would otherwise
generate that shard's whole share itself, a one-process run its user believes sharded).
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
    model: dict[str, str],
    adapter: str | None,
    relearned: str | None,
    data_files: list[Path],
) -> dict[str, Any]:
    """What the replies depend on besides the prompts: the settings that change a reply, the model (its
    weights' and its tokenizer's fingerprints), the adapters' weights and the data files read."""
    return {
        "config": settings,
        "model": model,
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

    def missing_shards(self, questions: list[Question], name: str) -> list[str]:
        """The shards of journal `name` the merging run cannot take in: no journal, or another key's."""
        key, missing = self.key(questions), []
        for shard in range(self.num_shards if self.num_shards > 1 else 0):
            path = self.path(name, shard)
            if not path.is_file():
                missing.append(f"shard {shard}: no journal {path}")
            elif written_key(path) != key:
                missing.append(
                    f"shard {shard}: {path} was written for other inputs (settings, model or data)"
                )
        return missing

    def check_shards(self, asked: dict[str, list[Question]]) -> None:
        """Refuse a merge (before it generates anything) while any shard's journal of `asked`'s
        non-empty journals (name -> questions) is missing, naming each."""
        missing = [
            line
            for name, questions in asked.items()
            if questions
            for line in self.missing_shards(questions, name)
        ]
        if missing:
            raise ValueError(
                f"--num-shards {self.num_shards} merges the shards' journals, but these are missing:\n  "
                + "\n  ".join(missing)
                + f"\nrun `pipeline evaluate ... --shard-index i --num-shards {self.num_shards}` for each "
                "shard first with the same options (or drop --num-shards to evaluate in one process)"
            )


def written_key(path: Path) -> str | None:
    """The key on a journal's first line (pipeline.journal), or None when it has none."""
    with path.open() as handle:
        first = handle.readline()
    try:
        header = json.loads(first)
    except json.JSONDecodeError:
        return None
    return header.get("key") if isinstance(header, dict) else None
