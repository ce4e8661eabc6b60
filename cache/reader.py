"""Reading a cache: record batches decoded into padded per-sample rows, streamed with bounded memory."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cache.distributions import PAD_ID, malformed_rows, renormalize_support
from cache.manifest import read_manifest
from cache.schema import CachedSample, CacheError, RowLayout
from pipeline.hashing import file_sha256


def _list_column(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets relative to the first row) of a list column of a record batch."""
    column = batch.column(name)
    offsets = column.offsets.to_numpy()
    return column.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def _decode_batch(batch: pa.RecordBatch, layout: RowLayout) -> list[CachedSample]:
    sample_ids = batch.column("sample_id").to_pylist()
    answer_ids, token_offsets = _list_column(batch, "answer_token_ids")
    sizes, _ = _list_column(batch, "support_sizes")
    stored_ids, _ = _list_column(batch, "support_ids")
    probs, _ = _list_column(batch, "support_probs")
    tail_mass, _ = _list_column(batch, "tail_mass")
    entropy, _ = _list_column(batch, "entropy")
    target_log_prob, _ = _list_column(batch, "target_log_prob")
    draws = batch.column("draw").to_pylist() if "draw" in batch.schema.names else [0] * len(sample_ids)

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

    token_rows = torch.from_numpy(padded_ids)
    problems = malformed_rows(token_rows, torch.from_numpy(padded_probs), torch.from_numpy(tail_mass))
    if problems:
        row_of_token = np.searchsorted(token_offsets, problems[0][0], side="right") - 1
        raise CacheError(
            f"sample {sample_ids[row_of_token]}, answer token {problems[0][0] - int(token_offsets[row_of_token])}: "
            f"{problems[0][1]} ({len(problems)} malformed token rows in this record batch)"
        )
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
                draw=int(draws[row]),
            )
        )
    return samples


def _open_shard(manifest, index: int, verify_checksums: bool) -> tuple[Path, pq.ParquetFile]:
    """Shard `index`'s parquet file, its checksum verified against the manifest first."""
    shard = manifest.shards[index]
    path = manifest.directory / shard.parquet_file
    if verify_checksums and file_sha256(path) != shard.sha256:
        raise CacheError(
            f"{path}: sha256 differs from its manifest (corrupt or overwritten); rerun this shard"
        )
    try:
        return path, pq.ParquetFile(path)
    except Exception as error:
        raise CacheError(f"{path}: unreadable parquet ({error})") from error


def iter_cache(
    directory: str | Path,
    shards: Sequence[int] | None = None,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    shuffle_seed: int | None = None,
    verify_checksums: bool = True,
    draw: int | None = None,
) -> Iterator[CachedSample]:
    """Stream the cached samples; memory is bounded by one row group / record batch, not the cache.

    shards: which shard indices to read (default all). rank/world_size: this process gets every
    world_size-th sample of the stream (same order on every rank, so the parts are disjoint and cover
    everything). shuffle_seed: shuffle shard order, row-group order and rows within a row group,
    identically on every rank. Each shard's checksum is verified before its rows are used. draw: only
    the rows of that draw (a cache of several, cache.schema), before the stream is split between ranks.
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
        path, parquet = _open_shard(manifest, index, verify_checksums)
        groups = list(range(parquet.num_row_groups))
        if shuffle_seed is not None:
            rng.shuffle(groups)
        for group in groups:
            try:
                batches = list(parquet.iter_batches(batch_size=batch_size, row_groups=[group]))
            except Exception as error:
                raise CacheError(f"{path}: row group {group} is unreadable ({error})") from error
            samples = [sample for batch in batches for sample in _decode_batch(batch, layout)]
            if draw is not None:
                samples = [sample for sample in samples if sample.draw == draw]
            if shuffle_seed is not None:
                rng.shuffle(samples)
            for sample in samples:
                if position % world_size == rank:
                    yield sample
                position += 1


def iter_cache_permuted(
    directory: str | Path,
    rank: int = 0,
    world_size: int = 1,
    shuffle_seed: int = 0,
    draw: int | None = None,
    verify_checksums: bool = True,
    batch_size: int = 16,
) -> Iterator[CachedSample]:
    """One pass over every sample (of `draw`) in one seeded permutation of single samples, the same on
    every rank; this rank gets stream positions p with p mod world_size == rank, as iter_cache splits them.

    Unlike iter_cache's shuffle of row groups (blocks of 128 samples, often one person's questions), any
    sample may follow any other. The whole cache is read once as Arrow rows, only this rank's are kept (in
    stream order), and `batch_size` of them are decoded at a time: memory is about the cache's Arrow size,
    not bounded by a row group.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    manifest = read_manifest(directory)
    tables = []
    for index in range(manifest.num_shards):
        path, parquet = _open_shard(manifest, index, verify_checksums)
        try:
            table = parquet.read()
        except Exception as error:
            raise CacheError(f"{path}: unreadable parquet ({error})") from error
        if draw is not None:
            draws = table.column("draw").to_numpy() if "draw" in table.schema.names else np.zeros(len(table))
            table = table.filter(pa.array(draws == draw))
        tables.append(table)
    rows = pa.concat_tables(tables)
    order = list(range(rows.num_rows))
    random.Random(shuffle_seed).shuffle(order)
    mine = rows.take(pa.array(order[rank::world_size], type=pa.int64())).combine_chunks()
    del rows, tables
    for start in range(0, mine.num_rows, batch_size):  # the rows in stream order: decoded a slice at a time
        for batch in mine.slice(start, batch_size).to_batches():
            yield from _decode_batch(batch, manifest.layout)
