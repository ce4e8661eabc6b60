"""Content hashes and hash-derived seeds: the one place the project computes a sha256.

Caches, manifests and fingerprints name data by content; per-sample random draws (reference images,
noise, refusals, alternative images) are seeded from a hash of the sample's id, so that they do not
depend on sharding, batching or the order in which samples are visited.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal


def sha256_hex(data: bytes) -> str:
    """The hex sha256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


def files_sha256(paths: Iterable[Path], with_names: bool = False) -> str:
    """The hex sha256 of the files' contents in order (each file's name first, when `with_names`)."""
    digest = hashlib.sha256()
    for path in paths:
        if with_names:
            digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def files_sha256_each(paths: Iterable[Path], with_names: bool = False) -> tuple[str, dict[str, str]]:
    """files_sha256 of the files together, and each file's own sha256 by name, from one read of each."""
    together, each = hashlib.sha256(), {}
    for path in paths:
        own = hashlib.sha256()
        if with_names:
            together.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                together.update(chunk)
                own.update(chunk)
        each[path.name] = own.hexdigest()
    return together.hexdigest(), each


def differing_parts(theirs: dict[str, dict[str, str]], ours: dict[str, dict[str, str]]) -> list[str]:
    """'part (file, ...)' for each part (e.g. weights, preprocessing) of two {part: {file: sha256}} records
    whose files differ in content or presence, so a refusal can say what differs and where."""
    lines = []
    for part in sorted(set(theirs) | set(ours)):
        mine, other = ours.get(part, {}), theirs.get(part, {})
        files = sorted(name for name in set(mine) | set(other) if mine.get(name) != other.get(name))
        if files:
            lines.append(f"{part} ({', '.join(files)})")
    return lines


def file_sha256(path: Path) -> str:
    """The hex sha256 of one file, read in chunks."""
    return files_sha256([Path(path)])


def stable_int(text: str, num_bytes: int = 32, byteorder: Literal["little", "big"] = "big") -> int:
    """An integer drawn from the sha256 of `text`: its first `num_bytes` bytes, read in `byteorder`.

    The same on every machine and run; a caller reduces it (modulo a pool size, or as a seed).
    """
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:num_bytes], byteorder)
