"""Shard manifests: what each shard holds, and the checks that a cache is complete and trustworthy.

A shard exists only once both its files are published (cache.writer); a parquet file without a manifest,
or whose checksum differs from its manifest, is half-written or corrupt. The header (schema version,
teacher and parameters, truncation, prompt template, fingerprints, layout) must be identical in every
shard of a cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from cache.schema import (
    SCHEMA_VERSION,
    SHARD_PATTERN,
    CacheError,
    IncompatibleCacheError,
    RowLayout,
    shard_name,
)
from pipeline.hashing import differing_parts, file_sha256, sha256_hex


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
    def fingerprint(self) -> str:
        """sha256 of the header and every shard's checksum: equal exactly when the cache holds the same rows."""
        shards = [[shard.parquet_file, shard.sha256] for shard in self.shards]
        return sha256_hex(json.dumps({"header": self.header, "shards": shards}, sort_keys=True).encode())

    @property
    def model_fingerprint(self) -> str:
        return self.header["model_fingerprint"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.header["tokenizer_fingerprint"]

    @property
    def layout(self) -> RowLayout:
        return RowLayout(**self.header["layout"])


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
    seen_ids: dict[tuple[str, int], str] = {}
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
            row_key = (record.get("sample_id"), record.get("draw", 0))
            if row_key in seen_ids:
                draw = f" (draw {row_key[1]})" if row_key[1] else ""
                problems.append(f"{name}.json: sample {row_key[0]}{draw} is also in {seen_ids[row_key]}")
            seen_ids[row_key] = name
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
    model_parts: dict[str, dict[str, str]] | None = None,
) -> None:
    """Refuse a cache written by another model or tokenizer, naming both fingerprints and, where the header
    records the model's parts (pipeline.models.loading.fingerprinted_model), the part and files that differ.

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
            f"{model_fingerprint}{_what_differs(header.get('model_parts'), model_parts)}: recompute the cache "
            "with this model"
        )


def _what_differs(cached: dict[str, dict[str, str]] | None, given: dict[str, dict[str, str]] | None) -> str:
    """'; what differs: part (files)' when both records of the model's parts are at hand (an older cache
    has none)."""
    if not cached or not given:
        return " (the cache does not record its model's files, so what differs is not known)"
    return "; what differs: " + "; ".join(differing_parts(cached, given))


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
