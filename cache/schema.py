"""The on-disk schema of the cache: the columns of a shard, their encoding, and the shard names.

The teacher cache on disk is sharded zstd Parquet with one sidecar manifest per shard.

A cache is a directory of N shards, each written by an independent process (a Slurm array task, a
DVC foreach entry, one process per GPU):

    shard-00000-of-00004.parquet   the rows (one per sample)
    shard-00000-of-00004.json      its manifest: the shared header, the parquet file's sha256 and row
                                   counts, and per sample the exact prompt, image sources and seeds

The header (schema version, teacher name and parameters, truncation, prompt template, model /
tokenizer / dataset fingerprints, column layout) must be identical in every shard; readers check it.
A shard exists only once both files are published: the parquet file is written to a temporary name
and renamed, then the manifest (also temp + rename) that names its checksum. A parquet file without a
manifest, or whose checksum differs from its manifest, is half-written or corrupt.

One row per *sample*, not per token: every consumer needs whole answers (a loss is a sum over an
answer; rows are matched to samples by id and the answer tokens are checked against the student's
tokenizer), the sample id is stored once instead of once per token, and row groups hold whole samples
so the reader never regroups. Per-token values are list columns, and the support of all tokens of a
sample is concatenated into one flat list with a per-token size list (no list<list<>> nesting):

    sample_id          string
    answer_token_ids   list<int32>    (T)   the ground-truth answer tokens (closing token included)
    support_sizes      list<uint16>   (T)   |S_t| per token
    support_ids        list<int32>    (sum |S_t|)  S_t = top-p set (capped) + the answer token y_t,
                                            ascending ids per token
    support_probs      list<float16>  (sum |S_t|)  R_t(v), normalised over the full vocabulary, rounded
                                            to 2^-14 or float16's own spacing, the coarser (below)
    tail_mass          list<float32>  (T)   R_t(V \\ S_t), measured at capture time
    entropy            list<float16>  (T)   H(R_t) of the full distribution (nats; for analysis only)
    target_log_prob    list<float32>  (T)   log R_t(y_t) of the full distribution, before truncation
                                            (for an `original`/`base` teacher: the frozen model's
                                            reference log-prob, used by NPO / DPO / KL baselines)
    draw               int16                which draw of a randomised teacher input the row holds
                                            (Vgid's noise, `--draws`): draw e serves epoch e mod draws;
                                            0 in a cache of one draw (and absent in older caches)

Everything is zstd (level 9); floats use BYTE_STREAM_SPLIT, ints PLAIN. The probabilities are the bulk of
the file, and what matters for a KL is their absolute precision (an entry moved by dr changes the KL by
about dr * log(r/q)): each is rounded to the coarser of 2^-14 and one mantissa bit
(cache.distributions.quantize_probabilities; probabilities from 2^-4 up keep float16's full precision),
the zeroed low bits compress away, and the reader rescales the support so that support + tail = 1
(renormalize_support), which makes the rounding errors cancel. bench/precompute.py compares this layout
with the alternatives the RowLayout fields name (plain float16 or float32 probabilities, delta-coded ids,
DELTA_BINARY_PACKED ints, PLAIN floats, one row per token; "layouts" in bench/results/precompute.json).
The layout is recorded in the header, so a cache written with another layout still reads correctly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from cache.distributions import PAD_ID, TruncatedDistributions, quantize_probabilities

SCHEMA_VERSION = 2
SHARD_PATTERN = re.compile(r"^shard-(\d{5})-of-(\d{5})\.(parquet|json)$")


class CacheError(ValueError):
    """A cache that is missing, incomplete, corrupt or inconsistent; the message names the file."""


class IncompatibleCacheError(CacheError):
    """A cache made by another model or tokenizer than the one using it."""


# ---------------------------------------------------------------- row layout


@dataclass(frozen=True)
class RowLayout:
    """How the columns are encoded. Only DEFAULT_ROW_LAYOUT is written in production; the bench compares."""

    prob_dtype: str = "float16"  # support_probs: float16 | float32
    # float16 probabilities rounded to this absolute precision (cache.distributions.quantize_probabilities);
    # None: plain float16 / float32 rounding.
    prob_absolute_step: float | None = 2.0**-14
    entropy_dtype: str = "float16"  # entropy is for analysis (ViKeR Sec. 5): float16 | float32
    delta_ids: bool = False  # support_ids as gaps within a token instead of absolute ids
    float_encoding: str = "BYTE_STREAM_SPLIT"  # or PLAIN
    int_encoding: str = "PLAIN"  # or DELTA_BINARY_PACKED
    compression_level: int = 9

    def schema(self) -> pa.Schema:
        prob_type = {"float16": pa.float16(), "float32": pa.float32()}[self.prob_dtype]
        entropy_type = {"float16": pa.float16(), "float32": pa.float32()}[self.entropy_dtype]
        return pa.schema(
            [
                ("sample_id", pa.string()),
                ("answer_token_ids", pa.list_(pa.int32())),
                ("support_sizes", pa.list_(pa.uint16())),
                ("support_ids", pa.list_(pa.int32())),
                ("support_probs", pa.list_(prob_type)),
                ("tail_mass", pa.list_(pa.float32())),
                ("entropy", pa.list_(entropy_type)),
                ("target_log_prob", pa.list_(pa.float32())),
                ("draw", pa.int16()),
            ]
        )

    def stored_probs(self, probs: np.ndarray) -> np.ndarray:
        """The support probabilities as written (the reader renormalises them, renormalize_support)."""
        if self.prob_dtype == "float32":
            return probs.astype(np.float32)
        if self.prob_absolute_step is None:
            return probs.astype(np.float16)
        return quantize_probabilities(torch.from_numpy(probs), self.prob_absolute_step).numpy()

    def writer_options(self) -> dict[str, Any]:
        encodings = {}
        if self.float_encoding != "PLAIN":
            for name in ("support_probs", "tail_mass", "entropy", "target_log_prob"):
                encodings[f"{name}.list.element"] = self.float_encoding
        if self.int_encoding != "PLAIN":
            for name in ("answer_token_ids", "support_ids"):
                encodings[f"{name}.list.element"] = self.int_encoding
        return {
            "compression": "zstd",
            "compression_level": self.compression_level,
            "use_dictionary": False,
            "column_encoding": encodings or None,
            "write_statistics": False,
            "store_schema": False,  # the Parquet types (FLOAT16 logical type, lists) read back as is
        }


DEFAULT_ROW_LAYOUT = RowLayout()


# ---------------------------------------------------------------- samples


@dataclass
class CachedSample:
    """The cached teacher rows of one sample, support in the padded layout of cache.distributions."""

    sample_id: str
    answer_token_ids: Tensor  # (T,) int64
    support_ids: Tensor  # (T, S) int64, PAD_ID padding
    support_probs: Tensor  # (T, S) float32
    tail_mass: Tensor  # (T,) float32
    entropy: Tensor  # (T,) float32
    target_log_prob: Tensor  # (T,) float32
    draw: int = 0  # which draw of a randomised teacher input (cache.schema: the `draw` column)

    @property
    def num_tokens(self) -> int:
        return int(self.answer_token_ids.shape[0])

    @property
    def distributions(self) -> TruncatedDistributions:
        return TruncatedDistributions(self.support_ids, self.support_probs, self.tail_mass, self.entropy)

    @classmethod
    def from_distributions(
        cls,
        sample_id: str,
        answer_token_ids: Tensor,
        distributions: TruncatedDistributions,
        target_log_prob: Tensor,
        draw: int = 0,
    ) -> CachedSample:
        return cls(
            draw=draw,
            sample_id=sample_id,
            answer_token_ids=answer_token_ids.long().cpu(),
            support_ids=distributions.support_ids.cpu(),
            support_probs=distributions.support_probs.float().cpu(),
            tail_mass=distributions.tail_mass.float().cpu(),
            entropy=distributions.entropy.float().cpu(),
            target_log_prob=target_log_prob.float().cpu(),
        )


def concat_samples(samples: Sequence[CachedSample]) -> tuple[Tensor, TruncatedDistributions, Tensor]:
    """Stack samples token-wise: (answer ids (N,), distributions padded to the widest support, log-probs)."""
    width = max(sample.support_ids.shape[1] for sample in samples)

    def pad(values: Tensor, fill: float | int) -> Tensor:
        return torch.nn.functional.pad(values, (0, width - values.shape[1]), value=fill)

    distributions = TruncatedDistributions(
        support_ids=torch.cat([pad(s.support_ids, PAD_ID) for s in samples]),
        support_probs=torch.cat([pad(s.support_probs, 0.0) for s in samples]),
        tail_mass=torch.cat([s.tail_mass for s in samples]),
        entropy=torch.cat([s.entropy for s in samples]),
    )
    answer_ids = torch.cat([s.answer_token_ids for s in samples])
    return answer_ids, distributions, torch.cat([s.target_log_prob for s in samples])


# ---------------------------------------------------------------- names and shard slices


def shard_name(shard_index: int, num_shards: int) -> str:
    return f"shard-{shard_index:05d}-of-{num_shards:05d}"


def shard_bounds(num_samples: int, shard_index: int, num_shards: int) -> range:
    """The contiguous, balanced slice of sample indices that shard `shard_index` of `num_shards` owns."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
    return range(shard_index * num_samples // num_shards, (shard_index + 1) * num_samples // num_shards)


def shard_header(
    header: dict[str, Any], num_shards: int, layout: RowLayout = DEFAULT_ROW_LAYOUT
) -> dict[str, Any]:
    """The header exactly as every shard manifest of such a run stores it (the writer adds these keys)."""
    return {**header, "schema_version": SCHEMA_VERSION, "num_shards": num_shards, "layout": asdict(layout)}
