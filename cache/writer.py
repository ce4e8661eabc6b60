"""Writing one shard as a stream of samples, published atomically (parquet file, then its manifest)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cache.manifest import ShardManifest
from cache.schema import (
    DEFAULT_ROW_LAYOUT,
    CachedSample,
    CacheError,
    RowLayout,
    shard_bounds,
    shard_header,
    shard_name,
)
from pipeline.files import write_atomic
from pipeline.hashing import file_sha256


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
        layout: RowLayout = DEFAULT_ROW_LAYOUT,
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
        # A shard already there stays, complete and valid, until close() publishes this one whole: a run
        # that fails or is killed before then leaves it as it was.
        # The header lives in the manifest only (its sha256 binds the two): a copy in the parquet footer
        # (twice, with the serialized Arrow schema) would cost ~3 KB per shard, 10 bytes per token here.
        self._schema = layout.schema()
        self._writer = pq.ParquetWriter(self.temp_path, self._schema, **layout.writer_options())
        self._pending: list[tuple[CachedSample, dict[str, Any]]] = []
        self._records: list[dict[str, Any]] = []
        self._seen: set[tuple[str, int]] = set()
        self._num_tokens = 0
        self._closed = False

    def write(self, sample: CachedSample, record: dict[str, Any]) -> None:
        """Add one sample; `record` (prompt, image sources, seeds...) goes to the manifest."""
        _check_sample(sample, self.vocab_size)
        if (sample.sample_id, sample.draw) in self._seen:
            raise CacheError(f"sample {sample.sample_id} (draw {sample.draw}) written twice to {self.name}")
        self._seen.add((sample.sample_id, sample.draw))
        entry = {**record, "sample_id": sample.sample_id, "num_tokens": sample.num_tokens}
        if sample.draw:
            entry["draw"] = sample.draw
        self._pending.append((sample, entry))
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
            columns["draw"].append(sample.draw)
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
        manifest_text = json.dumps(asdict(manifest), indent=1, ensure_ascii=False)
        # Between the parquet rename and the manifest's the old manifest names another checksum than the
        # new parquet file: every reader sees a corrupt shard there (and precompute recomputes it), never a
        # wrong one.
        os.replace(self.temp_path, self.parquet_path)
        write_atomic(self.manifest_path, manifest_text)
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
