"""Writing a file so that a reader never sees it half-written: the whole text goes to a temporary file
beside it, which then replaces the target in one rename (atomic on POSIX file systems)."""

from __future__ import annotations

from pathlib import Path


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write `content` to `path` whole or not at all; returns the path."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    if isinstance(content, bytes):
        temporary.write_bytes(content)
    else:
        temporary.write_text(content)
    temporary.replace(path)
    return path
