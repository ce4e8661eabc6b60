"""The teacher-distribution cache: truncated per-token distributions in sharded zstd Parquet.

One file per part of the format: `distributions` (the math of truncated rows), `schema` (columns,
encoding, shard names), `manifest` (what a shard holds; completeness checks), `writer`, `reader` and
`inspect`.
"""

from cache.distributions import (
    PAD_ID,
    SPARSE_DIVERGENCES,
    TruncatedDistributions,
    coarse_cells,
    cosine_tail_bounds,
    quantize_probabilities,
    renormalize_support,
    sparse_cosine,
    sparse_jsd,
    sparse_kl,
    truncate_probabilities,
    truncate_top_p,
)
from cache.inspect import inspect_cache
from cache.manifest import (
    CacheManifest,
    ShardManifest,
    check_compatible,
    completed_shard,
    read_manifest,
    verify_cache,
)
from cache.reader import iter_cache, iter_cache_permuted
from cache.schema import (
    DEFAULT_ROW_LAYOUT,
    SCHEMA_VERSION,
    CachedSample,
    CacheError,
    IncompatibleCacheError,
    RowLayout,
    concat_samples,
    shard_bounds,
    shard_header,
    shard_name,
)
from cache.writer import ShardWriter

__all__ = [
    "DEFAULT_ROW_LAYOUT",
    "PAD_ID",
    "SCHEMA_VERSION",
    "SPARSE_DIVERGENCES",
    "CacheError",
    "CacheManifest",
    "CachedSample",
    "IncompatibleCacheError",
    "RowLayout",
    "ShardManifest",
    "ShardWriter",
    "TruncatedDistributions",
    "check_compatible",
    "coarse_cells",
    "cosine_tail_bounds",
    "completed_shard",
    "concat_samples",
    "inspect_cache",
    "iter_cache",
    "iter_cache_permuted",
    "quantize_probabilities",
    "read_manifest",
    "renormalize_support",
    "shard_bounds",
    "shard_header",
    "shard_name",
    "sparse_cosine",
    "sparse_jsd",
    "sparse_kl",
    "truncate_probabilities",
    "truncate_top_p",
    "verify_cache",
]
