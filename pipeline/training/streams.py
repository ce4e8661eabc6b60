"""The data a training step reads: opened caches, per-rank sample streams, retain pairing, inputs.

--batch-size is the *global* number of forget samples per micro-batch; under torchrun each of the W ranks
takes the global stream positions p with p mod W == rank, which is how cache.iter_cache partitions the
stream. Methods with a retain term pair each forget sample with one retain sample (PairedRetain), so the
pairs are the same for any number of processes.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

from cache.manifest import CacheManifest, check_compatible, read_manifest
from cache.reader import iter_cache, iter_cache_permuted
from cache.schema import CachedSample, IncompatibleCacheError
from pipeline.models import DTYPES
from pipeline.samples import QASample
from pipeline.training.processes import Processes
from pipeline.unlearning.losses import AnswerPredictions

# A cache up to this size on disk is permuted whole each epoch, so that one epoch does not meet the people
# in the blocks its row groups hold (128 samples in the split's order, a person's questions together). At
# ~50 bytes per answer token (docs/performance.md) a forget split's cache is a few MiB and a whole
# benchmark's tens; a larger cache, several times its size as Arrow rows in every rank's memory, keeps
# iter_cache's bounded row-group shuffle.
PERMUTE_WHOLE_BYTES = 1 << 30


class TokenMismatchError(ValueError):
    """A cached sample's answer tokens differ from the student's tokenization of the same answer."""


@dataclass
class Cache:
    """An opened teacher cache: its manifest and the answer token check against the student."""

    directory: str
    manifest: CacheManifest
    teacher: str

    @classmethod
    def open(cls, directory: str, loaded, samples: dict[str, QASample], what: str) -> Cache:
        # Every shard's checksum, before the first step: a corrupt shard must not end a run hours in.
        manifest = read_manifest(directory, checksums=True)
        # Refuses a cache written by another model or tokenizer, naming both fingerprints.
        check_compatible(
            manifest,
            loaded.model_fingerprint,
            loaded.tokenizer_fingerprint,
            getattr(loaded, "model_parts", None),
        )
        cached_ids = [record["sample_id"] for record in manifest.samples]
        unknown = [sample_id for sample_id in cached_ids if sample_id not in samples]
        if unknown:
            raise ValueError(
                f"{what} cache {directory} holds {len(unknown)} samples that are not in the {what} split, "
                f"e.g. {unknown[:3]}: it was made from other data"
            )
        cached_prompt, student_prompt = (
            manifest.header.get("student_prompt"),
            loaded.family.build_prompt("{question}", True),
        )
        if cached_prompt is not None and cached_prompt != student_prompt:
            raise IncompatibleCacheError(
                f"{what} cache {directory} was made for prompts {cached_prompt!r} but this run asks "
                f"{student_prompt!r}: give the --prompt-template the cache was made with, or recompute it"
            )
        compute, student = manifest.header.get("dtype"), dtype_name(loaded.model)
        if compute and student and compute != student:
            print(
                f"warning: {what} cache {directory} was computed in {compute} but the student runs in {student}: "
                "its rows differ from the student's own distribution by that rounding (a KL above 0 at step 0)",
                file=sys.stderr,
            )
        return cls(directory=str(directory), manifest=manifest, teacher=str(manifest.header.get("teacher")))

    @property
    def draws(self) -> int:
        """How many draws of a randomised teacher input the cache holds (Vgid's noise; 1 otherwise)."""
        return int(self.manifest.header.get("teacher_params", {}).get("draws", 1))

    def stream(self, rank: int, world_size: int, shuffle_seed: int, cycle: int = 0) -> Iterator[CachedSample]:
        """One pass over the rows of draw `cycle mod draws` (epoch e reads draw e, Vgid's Algorithm 1), in
        one permutation of single samples when the cache is at most PERMUTE_WHOLE_BYTES on disk."""
        if sum(shard.num_bytes for shard in self.manifest.shards) <= PERMUTE_WHOLE_BYTES:
            return iter_cache_permuted(
                self.directory, rank=rank, world_size=world_size, shuffle_seed=shuffle_seed,
                draw=cycle % self.draws,
            )  # fmt: skip
        return iter_cache(
            self.directory,
            rank=rank,
            world_size=world_size,
            shuffle_seed=shuffle_seed,
            batch_size=16,
            draw=cycle % self.draws,
        )


def dtype_name(model) -> str | None:
    """The model's compute dtype as the cache header names it (fp32, bf16, fp16)."""
    dtype = next(model.parameters()).dtype
    return next((name for name, value in DTYPES.items() if value == dtype), None)


def check_answer_tokens(
    predictions: AnswerPredictions, items: list[tuple[QASample, CachedSample]], cache_dir: str
) -> None:
    """The cached rows are per answer token: they only mean something if the tokens are the student's."""
    for student_ids, (sample, cached) in zip(
        predictions.targets.split(predictions.answer_lengths), items, strict=True
    ):
        student, stored = student_ids.tolist(), cached.answer_token_ids.tolist()
        if stored != student:
            raise TokenMismatchError(token_mismatch_message(sample, stored, student, cache_dir))


def token_mismatch_message(sample: QASample, stored: list[int], student: list[int], cache_dir: str) -> str:
    def shown(ids: list[int]) -> str:
        return f"{ids[:12]}{'...' if len(ids) > 12 else ''} ({len(ids)} tokens)"

    return (
        f"sample {sample.sample_id}: cache {cache_dir} stores answer tokens {shown(stored)} but the model "
        f"tokenizes the answer {sample.answer[:60]!r} as {shown(student)}: the cache was made with another "
        "tokenizer, answer template or answer text"
    )


def epoch_seed(seed: int, stream: str, cycle: int) -> int:
    """One shuffle seed per (run seed, stream, epoch or cycle), the same on every rank."""
    return (seed * 1_000_003 + {"forget": 0, "retain": 1}[stream] * 7919 + cycle) % (2**31)


def sample_stream(
    samples: list[QASample], cache: Cache | None, seed: int, stream: str, cycle: int, processes: Processes
) -> Iterator[tuple[QASample, CachedSample | None]]:
    """This rank's part of one pass over a split, shuffled by (seed, cycle); with the cache's rows if any."""
    by_id = {sample.sample_id: sample for sample in samples}
    shuffle_seed = epoch_seed(seed, stream, cycle)
    if cache is not None:
        for cached in cache.stream(processes.rank, processes.world_size, shuffle_seed, cycle):
            yield by_id[cached.sample_id], cached
        return
    order = list(range(len(samples)))
    random.Random(shuffle_seed).shuffle(order)
    for position, index in enumerate(order):
        if position % processes.world_size == processes.rank:
            yield samples[index], None


class PairedRetain:
    """Retain samples paired with forget samples by position, the same for any number of processes.

    The forget sample at global position g = epoch * |D_f| + p is paired with item g of the retain stream
    (consecutive passes over the retain split, each reshuffled). Each rank asks for the positions of its
    own forget samples, in increasing order, and skips the others while streaming; a resumed run simply
    asks for later positions.
    """

    def __init__(self, samples: list[QASample], cache: Cache | None, seed: int) -> None:
        self.samples, self.cache, self.seed = samples, cache, seed
        self.cursor = 0
        self.items = self._passes()

    def _passes(self) -> Iterator[tuple[QASample, CachedSample | None]]:
        cycle = 0
        while True:
            empty = True
            for item in sample_stream(self.samples, self.cache, self.seed, "retain", cycle, Processes()):
                empty = False
                yield item
            if empty:
                raise ValueError("the retain split is empty")
            cycle += 1

    def take(self, positions: list[int]) -> list[tuple[QASample, CachedSample | None]]:
        taken = []
        for position in positions:
            if position < self.cursor:
                raise ValueError(f"retain position {position} requested after {self.cursor - 1}")
            taken.append(next(islice(self.items, position - self.cursor, None)))
            self.cursor = position + 1
        return taken


class StepPlan:
    """Which global forget-stream positions each optimizer step and micro-batch covers, and this rank's."""

    def __init__(self, batch_size: int, grad_accum: int, num_forget: int, processes: Processes) -> None:
        self.batch_size, self.grad_accum, self.num_forget = batch_size, grad_accum, num_forget
        self.processes = processes

    def step(self, step_in_epoch: int) -> tuple[int, int]:
        """Global [start, stop) of the positions an optimizer step covers."""
        start = step_in_epoch * self.grad_accum * self.batch_size
        return start, min(start + self.grad_accum * self.batch_size, self.num_forget)

    def rank_positions(self, start: int, stop: int) -> list[int]:
        """The positions start..stop-1 this rank holds (p mod W == rank)."""
        world_size, rank = self.processes.world_size, self.processes.rank
        return list(range(start + (rank - start) % world_size, stop, world_size))
