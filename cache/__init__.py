"""The teacher-distribution cache: truncated per-token distributions in sharded zstd Parquet."""
