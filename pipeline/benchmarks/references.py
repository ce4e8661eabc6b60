"""ViKeR's reference pools (Fig. 7): folders of irrelevant images, or the images of a split's people; and
`reference_root`, the one rule for where a pool is looked for (every stage and tool that reads one)."""

from __future__ import annotations

from pathlib import Path

from pipeline.benchmarks.items import DataError
from pipeline.benchmarks.mllmu import row_image, split_rows

IMAGE_POOLS = ("people", "pets", "scene", "pattern")  # folders of images: references/<kind>/
SPLIT_POOLS = ("forget", "retain")  # the images of the current forget / retain split's people
REFERENCE_KINDS = IMAGE_POOLS + SPLIT_POOLS  # ViKeR Fig. 7's reference pools
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def reference_root(references: str | Path | None, data: str | Path, kind: str) -> Path:
    """Where a reference pool is looked for: `references` when given, else the data folder for the split
    pools, else the folder beside the data that holds references/ (the mini world's layout), else the
    data folder itself."""
    if references:
        return Path(references)
    data = Path(data)
    if kind in SPLIT_POOLS:
        return data
    return data.parent if (data.parent / "references").is_dir() else data


def load_reference_pool(root: str | Path, kind: str, forget_ratio: int = 10) -> list[tuple[str, bytes]]:
    """(image id, bytes) of a pool, sorted by id.

    kind people|pets|scene|pattern: ROOT/references/<kind>/*.png (or ROOT/<kind>/ when ROOT is the
    references folder itself). Any split name (forget_10, retain_90, real, full, ...) or plain
    forget|retain (with forget_ratio): the images of that split's people, from ROOT/data (or ROOT).
    """
    root = Path(root)
    if kind in IMAGE_POOLS:
        candidates = [root / "references" / kind, root / kind]
        directory = next((path for path in candidates if path.is_dir()), None)
        if directory is None:
            raise DataError(f"reference pool {kind!r} not found: neither {candidates[0]} nor {candidates[1]}")
        files = sorted(path for path in directory.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"reference pool folder {directory} holds no images")
        return [(path.stem, path.read_bytes()) for path in files]
    if kind == "forget":
        kind = f"forget_{forget_ratio}"
    elif kind == "retain":
        kind = f"retain_{100 - forget_ratio}"
    data_dir = root / "data" if (root / "data").is_dir() else root
    pool = []
    for row in split_rows(data_dir, kind):
        image, _ = row_image(row)
        pool.append((f"{kind}/{row['ID']}", image))
    return pool
