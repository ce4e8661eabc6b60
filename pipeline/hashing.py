"""Content hashes and hash-derived seeds: the one place the project computes a sha256.

Caches, manifests and fingerprints name data by content; per-sample random draws (reference images,
noise, refusals, alternative images) are seeded from a hash of the sample's id, so that they do not
depend on sharding, batching or the order in which samples are visited.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pipeline.files import write_atomic


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


# A file's content is taken as unchanged while its inode, size, mtime and ctime are: any write moves
# mtime and ctime, and ctime cannot be set back (`touch -d` and `rsync -t` set mtime only). A file
# changed (mtime or ctime) within RACY_SECONDS of its hashing may change again inside the timestamps' granularity (whole
# seconds on some network file systems), so such a hash is not kept (git's "racy clean" rule).
RACY_SECONDS = 2.0


# Where kept file hashes live; None: the user's cache folder (tests point it at a folder of their own).
HASH_CACHE_DIR: Path | None = None


def hash_cache_dir() -> Path:
    """Where kept file hashes live: the user's cache folder ($XDG_CACHE_HOME, else ~/.cache); a user's, not
    the model folder's (often read-only: the HF cache, shared storage) nor a stage's outputs (each stage
    has its own, so every stage would hash again)."""
    if HASH_CACHE_DIR is not None:
        return HASH_CACHE_DIR
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mllm-unlearn-pipeline" / "file-hashes"


def _file_state(path: Path) -> list:
    stat = path.stat()  # follows links: an HF cache snapshot links to its blobs
    return [str(path.resolve()), path.name, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def cached_files_sha256_each(paths: Iterable[Path]) -> tuple[str, dict[str, str]]:
    """files_sha256_each(paths, with_names=True), kept in hash_cache_dir() by the files' paths and states so
    that the same unchanged files are read once per machine, not once per process; a changed file (its
    size, times or inode) is read again. The cache is an optimisation only: unwritable, it is skipped."""
    paths = [Path(path) for path in paths]
    states = [_file_state(path) for path in paths]
    entry = hash_cache_dir() / f"{sha256_hex(json.dumps([state[:2] for state in states]).encode())}.json"
    try:
        kept = json.loads(entry.read_text())
        if kept["states"] == states:
            return kept["together"], kept["each"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    started = time.time()
    together, each = files_sha256_each(paths, with_names=True)
    settled = all(max(state[4], state[5]) / 1e9 < started - RACY_SECONDS for state in states)
    if settled and [_file_state(path) for path in paths] == states:  # unchanged while it was read
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(entry, json.dumps({"states": states, "together": together, "each": each}))
        except OSError:
            pass
    return together, each


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
