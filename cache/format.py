"""The teacher cache on disk: sharded zstd Parquet with one sidecar manifest per shard.

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
                                            to an absolute precision of 2^-14 (see below)
    tail_mass          list<float32>  (T)   R_t(V \\ S_t), measured at capture time
    entropy            list<float16>  (T)   H(R_t) of the full distribution (nats; for analysis only)
    target_log_prob    list<float32>  (T)   log R_t(y_t) of the full distribution, before truncation
                                            (for an `original`/`base` teacher: the frozen model's
                                            reference log-prob, used by NPO / DPO / KL baselines)

Everything is zstd (level 9); floats use BYTE_STREAM_SPLIT, ints PLAIN. The probabilities are the bulk of
the file, and what matters for a KL is their absolute precision (an entry moved by dr changes the KL by
about dr * log(r/q)): each is rounded to the coarser of 2^-14 and one mantissa bit
(cache.distributions.quantize_probabilities; probabilities from 2^-4 up keep float16's full precision),
the zeroed low bits compress away, and the reader rescales the support so that support + tail = 1
(renormalize_support), which makes the rounding errors cancel. Measured on the mini model's ViKeR rows
(bench/precompute.py, "layouts" in bench/results/precompute.json), in bytes per answer token at top-p
0.995: this layout 46.8; plain float16 probabilities 67.8 (the rounding costs ~3e-5 nats of KL error per
token); float32 probabilities 108; float32 entropy +1.5; DELTA_BINARY_PACKED ints 58.6 (it defeats zstd
on these short lists); delta-coded sorted ids +2.3; PLAIN floats +0.7; one row per token 83.4.
The layout is recorded in the header, so a cache written with another layout still reads correctly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from cache.distributions import (
    PAD_ID,
    TruncatedDistributions,
    quantize_probabilities,
    renormalize_support,
    sparse_kl,
)

SCHEMA_VERSION = 2
SHARD_PATTERN = re.compile(r"^shard-(\d{5})-of-(\d{5})\.(parquet|json)$")


class CacheError(ValueError):
    """A cache that is missing, incomplete, corrupt or inconsistent; the message names the file."""


class IncompatibleCacheError(CacheError):
    """A cache made by another model or tokenizer than the one using it."""


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """How the columns are encoded. Only DEFAULT_LAYOUT is written in production; the bench compares."""

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


DEFAULT_LAYOUT = Layout()


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
    ) -> CachedSample:
        return cls(
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


def shard_header(header: dict[str, Any], num_shards: int, layout: Layout = DEFAULT_LAYOUT) -> dict[str, Any]:
    """The header exactly as every shard manifest of such a run stores it (the writer adds these keys)."""
    return {**header, "schema_version": SCHEMA_VERSION, "num_shards": num_shards, "layout": asdict(layout)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- manifests


@dataclass
class ShardManifest:
    """The contents of one `shard-XXXXX-of-NNNNN.json`."""

    header: dict[str, Any]
    shard_index: int
    num_shards: int
    parquet_file: str
    sha256: str
    num_samples: int
    num_tokens: int
    num_bytes: int
    samples: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ShardManifest:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise CacheError(f"shard manifest {path} is unreadable or malformed: {error}") from error


@dataclass
class CacheManifest:
    """All shard manifests of a cache directory, with their (identical) header."""

    directory: Path
    header: dict[str, Any]
    shards: list[ShardManifest]

    @property
    def num_shards(self) -> int:
        return int(self.header["num_shards"])

    @property
    def samples(self) -> list[dict[str, Any]]:
        return [record for shard in self.shards for record in shard.samples]

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(shard.num_tokens for shard in self.shards)

    @property
    def model_fingerprint(self) -> str:
        return self.header["model_fingerprint"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.header["tokenizer_fingerprint"]

    @property
    def layout(self) -> Layout:
        return Layout(**self.header["layout"])


def _shard_files(directory: Path) -> dict[tuple[int, int], dict[str, Path]]:
    found: dict[tuple[int, int], dict[str, Path]] = {}
    for path in directory.iterdir():
        match = SHARD_PATTERN.match(path.name)
        if match:
            key = (int(match.group(1)), int(match.group(2)))
            found.setdefault(key, {})[match.group(3)] = path
    return found


def _header_differences(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    keys = sorted(set(first) | set(other))
    return [key for key in keys if first.get(key) != other.get(key)]


def verify_cache(directory: str | Path, checksums: bool = True) -> list[str]:
    """Every problem that makes the cache incomplete or untrustworthy, one line each (empty: all good)."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory}: no such cache directory"]
    files = _shard_files(directory)
    if not files:
        return [f"{directory}: no shard-XXXXX-of-NNNNN.parquet/.json files"]
    problems: list[str] = []
    totals = {total for _, total in files}
    if len(totals) > 1:
        problems.append(
            f"{directory}: shards of different totals {sorted(totals)} are mixed in one directory"
        )
    num_shards = max(totals)
    first_header: tuple[str, dict[str, Any]] | None = None
    seen_ids: dict[str, str] = {}
    for index in range(num_shards):
        name = shard_name(index, num_shards)
        pair = files.get((index, num_shards), {})
        if not pair:
            problems.append(f"{name}: missing (no {name}.parquet and no {name}.json)")
            continue
        if "json" not in pair:
            problems.append(f"{name}.parquet: half-written (no {name}.json manifest): rerun this shard")
            continue
        if "parquet" not in pair:
            problems.append(f"{name}.json: its parquet file {name}.parquet is missing")
            continue
        try:
            manifest = ShardManifest.load(pair["json"])
        except CacheError as error:
            problems.append(str(error))
            continue
        if manifest.header.get("schema_version") != SCHEMA_VERSION:
            problems.append(
                f"{name}.json: schema version {manifest.header.get('schema_version')} "
                f"(this reader understands {SCHEMA_VERSION})"
            )
        if first_header is None:
            first_header = (name, manifest.header)
        else:
            differing = _header_differences(first_header[1], manifest.header)
            if differing:
                problems.append(
                    f"{name}.json: header differs from {first_header[0]}.json in {', '.join(differing)}"
                )
        if checksums and file_sha256(pair["parquet"]) != manifest.sha256:
            problems.append(f"{name}.parquet: sha256 differs from {name}.json (corrupt or overwritten)")
            continue
        try:
            metadata = pq.ParquetFile(pair["parquet"]).metadata
        except Exception as error:  # pyarrow raises several types for a damaged file
            problems.append(f"{name}.parquet: unreadable parquet ({error})")
            continue
        if metadata.num_rows != manifest.num_samples or len(manifest.samples) != manifest.num_samples:
            problems.append(
                f"{name}.parquet: {metadata.num_rows} rows, manifest says {manifest.num_samples} "
                f"and lists {len(manifest.samples)} samples"
            )
        for record in manifest.samples:
            sample_id = record.get("sample_id")
            if sample_id in seen_ids:
                problems.append(f"{name}.json: sample {sample_id} is also in {seen_ids[sample_id]}")
            seen_ids[sample_id] = name
    for index, total in sorted(files):
        if total != num_shards:
            problems.append(f"{shard_name(index, total)}: belongs to a {total}-shard run, not {num_shards}")
    return problems


def read_manifest(directory: str | Path, checksums: bool = False) -> CacheManifest:
    """The complete cache's manifest; raises CacheError listing every problem if it is not complete."""
    directory = Path(directory)
    problems = verify_cache(directory, checksums=checksums)
    if problems:
        raise CacheError(f"cache {directory} is not usable:\n  " + "\n  ".join(problems))
    files = _shard_files(directory)
    num_shards = max(total for _, total in files)
    shards = [ShardManifest.load(files[(index, num_shards)]["json"]) for index in range(num_shards)]
    return CacheManifest(directory=directory, header=shards[0].header, shards=shards)


def check_compatible(
    manifest: CacheManifest | dict[str, Any],
    model_fingerprint: str | None,
    tokenizer_fingerprint: str,
) -> None:
    """Refuse a cache written by another model or tokenizer, naming both fingerprints.

    model_fingerprint=None checks the tokenizer only (e.g. a student that is not the cached model).
    """
    header = manifest.header if isinstance(manifest, CacheManifest) else manifest
    where = f"cache {manifest.directory}" if isinstance(manifest, CacheManifest) else "cache"
    if header["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise IncompatibleCacheError(
            f"{where} was written with tokenizer {header['tokenizer_fingerprint']} but this model's "
            f"tokenizer is {tokenizer_fingerprint}: token ids would not mean the same text"
        )
    if model_fingerprint is not None and header["model_fingerprint"] != model_fingerprint:
        raise IncompatibleCacheError(
            f"{where} was written by model {header['model_fingerprint']} but the model given is "
            f"{model_fingerprint}: recompute the cache with this model"
        )


# ---------------------------------------------------------------- writing


def _flatten_support(sample: CachedSample, delta_ids: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sizes (T,), ids (sum S,), probs (sum S,)) from the padded layout; ids delta-coded per token."""
    ids = sample.support_ids
    mask = ids >= 0
    sizes = mask.sum(dim=1)
    values = torch.diff(ids, dim=1, prepend=torch.zeros_like(ids[:, :1])) if delta_ids else ids
    return sizes.numpy(), values[mask].numpy(), sample.support_probs[mask].numpy()


def _check_sample(sample: CachedSample, vocab_size: int | None) -> None:
    tokens = sample.num_tokens
    where = f"sample {sample.sample_id}"
    if tokens == 0:
        raise CacheError(f"{where}: no answer tokens")
    shapes = [sample.support_ids.shape[0], sample.support_probs.shape[0], len(sample.tail_mass)]
    shapes += [len(sample.entropy), len(sample.target_log_prob)]
    if any(rows != tokens for rows in shapes):
        raise CacheError(f"{where}: {tokens} answer tokens but teacher rows {shapes}")
    mask = sample.support_ids >= 0
    if not bool(mask[:, 0].all()) or bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise CacheError(f"{where}: every token needs >= 1 support entry, padding only at the end")
    gaps = torch.diff(sample.support_ids, dim=1)
    if bool(((gaps <= 0) & mask[:, 1:]).any()):
        raise CacheError(f"{where}: support ids must be strictly ascending within a token")
    if vocab_size is not None and int(sample.support_ids.max()) >= vocab_size:
        raise CacheError(
            f"{where}: support id {int(sample.support_ids.max())} >= vocabulary size {vocab_size}"
        )
    if int(mask.sum(dim=1).max()) > np.iinfo(np.uint16).max:
        raise CacheError(f"{where}: support larger than {np.iinfo(np.uint16).max} entries")
    finite = torch.isfinite(sample.support_probs).all() and torch.isfinite(sample.tail_mass).all()
    if not finite or bool((sample.tail_mass < 0).any()) or bool((sample.tail_mass > 1 + 1e-6).any()):
        raise CacheError(f"{where}: probabilities / tail mass must be finite and in [0, 1]")


class ShardWriter:
    """Writes one shard as a stream of samples; publishes it atomically on close().

    with ShardWriter(directory, shard_index, num_shards, header) as writer:
        writer.write(cached_sample, {"sample_id": ..., "prompt": ..., "image_sources": [...], ...})
    An exception inside the block removes the temporary file and publishes nothing.
    """

    def __init__(
        self,
        directory: str | Path,
        shard_index: int,
        num_shards: int,
        header: dict[str, Any],
        layout: Layout = DEFAULT_LAYOUT,
        row_group_samples: int = 128,
    ) -> None:
        shard_bounds(0, shard_index, num_shards)  # validates the index
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = shard_name(shard_index, num_shards)
        self.shard_index, self.num_shards = shard_index, num_shards
        self.layout = layout
        self.header = shard_header(header, num_shards, layout)
        self.vocab_size = header.get("vocab_size")
        self.row_group_samples = row_group_samples
        self.parquet_path = self.directory / f"{self.name}.parquet"
        self.manifest_path = self.directory / f"{self.name}.json"
        self.temp_path = self.directory / f".{self.name}.parquet.{os.getpid()}.tmp"
        # An old manifest must not vouch for the file we are about to replace.
        self.manifest_path.unlink(missing_ok=True)
        # The header lives in the manifest only (its sha256 binds the two): a copy in the parquet footer
        # (twice, with the serialized Arrow schema) would cost ~3 KB per shard, 10 bytes per token here.
        self._schema = layout.schema()
        self._writer = pq.ParquetWriter(self.temp_path, self._schema, **layout.writer_options())
        self._pending: list[tuple[CachedSample, dict[str, Any]]] = []
        self._records: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        self._num_tokens = 0
        self._closed = False

    def write(self, sample: CachedSample, record: dict[str, Any]) -> None:
        """Add one sample; `record` (prompt, image sources, seeds...) goes to the manifest."""
        _check_sample(sample, self.vocab_size)
        if sample.sample_id in self._seen:
            raise CacheError(f"sample {sample.sample_id} written twice to {self.name}")
        self._seen.add(sample.sample_id)
        self._pending.append(
            (sample, {**record, "sample_id": sample.sample_id, "num_tokens": sample.num_tokens})
        )
        if len(self._pending) >= self.row_group_samples:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        columns: dict[str, list] = {name: [] for name in self._schema.names}
        for sample, record in self._pending:
            sizes, ids, probs = _flatten_support(sample, self.layout.delta_ids)
            columns["sample_id"].append(sample.sample_id)
            columns["answer_token_ids"].append(sample.answer_token_ids.numpy().astype(np.int32))
            columns["support_sizes"].append(sizes.astype(np.uint16))
            columns["support_ids"].append(ids.astype(np.int32))
            columns["support_probs"].append(self.layout.stored_probs(probs))
            columns["tail_mass"].append(sample.tail_mass.numpy().astype(np.float32))
            columns["entropy"].append(sample.entropy.numpy().astype(self.layout.entropy_dtype))
            columns["target_log_prob"].append(sample.target_log_prob.numpy().astype(np.float32))
            self._records.append(record)
            self._num_tokens += sample.num_tokens
        table = pa.Table.from_pydict(columns, schema=self._schema)
        self._writer.write_table(table, row_group_size=len(self._pending))
        self._pending = []

    def close(self) -> ShardManifest:
        """Finish the parquet file, rename it into place, then publish its manifest."""
        self._flush()
        self._writer.close()
        self._closed = True
        with open(self.temp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        manifest = ShardManifest(
            header=self.header,
            shard_index=self.shard_index,
            num_shards=self.num_shards,
            parquet_file=self.parquet_path.name,
            sha256=file_sha256(self.temp_path),
            num_samples=len(self._records),
            num_tokens=self._num_tokens,
            num_bytes=self.temp_path.stat().st_size,
            samples=self._records,
        )
        os.replace(self.temp_path, self.parquet_path)
        temp_manifest = self.directory / f".{self.name}.json.{os.getpid()}.tmp"
        temp_manifest.write_text(json.dumps(asdict(manifest), indent=1, ensure_ascii=False))
        os.replace(temp_manifest, self.manifest_path)
        return manifest

    def abort(self) -> None:
        if not self._closed:
            self._writer.close()
            self._closed = True
        self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def completed_shard(
    directory: str | Path, shard_index: int, num_shards: int, header: dict[str, Any] | None = None
) -> ShardManifest | None:
    """The shard's manifest if it is published, its checksum verifies and (when given) its header is
    `header`; else None: the shard must be computed (again)."""
    directory = Path(directory)
    name = shard_name(shard_index, num_shards)
    manifest_path, parquet_path = directory / f"{name}.json", directory / f"{name}.parquet"
    if not manifest_path.exists() or not parquet_path.exists():
        return None
    try:
        manifest = ShardManifest.load(manifest_path)
    except CacheError:
        return None
    if header is not None and manifest.header != header:
        return None
    if file_sha256(parquet_path) != manifest.sha256:
        return None
    return manifest


# ---------------------------------------------------------------- reading


def _list_column(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets relative to the first row) of a list column of a record batch."""
    column = batch.column(name)
    offsets = column.offsets.to_numpy()
    return column.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def _decode_batch(batch: pa.RecordBatch, layout: Layout) -> list[CachedSample]:
    sample_ids = batch.column("sample_id").to_pylist()
    answer_ids, token_offsets = _list_column(batch, "answer_token_ids")
    sizes, _ = _list_column(batch, "support_sizes")
    stored_ids, _ = _list_column(batch, "support_ids")
    probs, _ = _list_column(batch, "support_probs")
    tail_mass, _ = _list_column(batch, "tail_mass")
    entropy, _ = _list_column(batch, "entropy")
    target_log_prob, _ = _list_column(batch, "target_log_prob")

    sizes = sizes.astype(np.int64)
    total_tokens = len(sizes)
    entry_token = np.repeat(np.arange(total_tokens), sizes)
    token_starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    entry_position = np.arange(len(stored_ids)) - token_starts[entry_token]
    ids = stored_ids.astype(np.int64)
    if layout.delta_ids:  # undo the gaps: cumulative sum restarted at each token
        running = np.cumsum(ids)
        before = np.concatenate([[0], running])[token_starts]
        ids = running - before[entry_token]
    width = max(int(sizes.max()) if total_tokens else 1, 1)
    padded_ids = np.full((total_tokens, width), PAD_ID, dtype=np.int64)
    padded_probs = np.zeros((total_tokens, width), dtype=np.float32)
    padded_ids[entry_token, entry_position] = ids
    padded_probs[entry_token, entry_position] = probs.astype(np.float32)
    tail_mass = tail_mass.astype(np.float32)
    padded_probs = renormalize_support(torch.from_numpy(padded_probs), torch.from_numpy(tail_mass)).numpy()

    samples = []
    for row, sample_id in enumerate(sample_ids):
        start, stop = int(token_offsets[row]), int(token_offsets[row + 1])
        own_width = max(int(sizes[start:stop].max()), 1) if stop > start else 1
        samples.append(
            CachedSample(
                sample_id=sample_id,
                answer_token_ids=torch.from_numpy(answer_ids[start:stop].astype(np.int64)),
                support_ids=torch.from_numpy(padded_ids[start:stop, :own_width].copy()),
                support_probs=torch.from_numpy(padded_probs[start:stop, :own_width].copy()),
                tail_mass=torch.from_numpy(tail_mass[start:stop].copy()),
                entropy=torch.from_numpy(entropy[start:stop].astype(np.float32)),
                target_log_prob=torch.from_numpy(target_log_prob[start:stop].astype(np.float32)),
            )
        )
    return samples


def iter_cache(
    directory: str | Path,
    shards: Sequence[int] | None = None,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    shuffle_seed: int | None = None,
    verify_checksums: bool = True,
) -> Iterator[CachedSample]:
    """Stream the cached samples; memory is bounded by one row group / record batch, not the cache.

    shards: which shard indices to read (default all). rank/world_size: this process gets every
    world_size-th sample of the stream (same order on every rank, so the parts are disjoint and cover
    everything). shuffle_seed: shuffle shard order, row-group order and rows within a row group,
    identically on every rank. Each shard's checksum is verified before its rows are used.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    manifest = read_manifest(directory)
    layout = manifest.layout
    order = list(range(manifest.num_shards)) if shards is None else list(shards)
    rng = random.Random(shuffle_seed)
    if shuffle_seed is not None:
        rng.shuffle(order)
    position = 0
    for index in order:
        shard = manifest.shards[index]
        path = manifest.directory / shard.parquet_file
        if verify_checksums and file_sha256(path) != shard.sha256:
            raise CacheError(
                f"{path}: sha256 differs from its manifest (corrupt or overwritten); rerun this shard"
            )
        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:
            raise CacheError(f"{path}: unreadable parquet ({error})") from error
        groups = list(range(parquet.num_row_groups))
        if shuffle_seed is not None:
            rng.shuffle(groups)
        for group in groups:
            try:
                batches = list(parquet.iter_batches(batch_size=batch_size, row_groups=[group]))
            except Exception as error:
                raise CacheError(f"{path}: row group {group} is unreadable ({error})") from error
            samples = [sample for batch in batches for sample in _decode_batch(batch, layout)]
            if shuffle_seed is not None:
                rng.shuffle(samples)
            for sample in samples:
                if position % world_size == rank:
                    yield sample
                position += 1


# ---------------------------------------------------------------- inspection

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
