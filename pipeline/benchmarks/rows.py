"""Reading raw rows, shared by every layout: the Parquet files of a split folder, a row's fields and
images, the one way an error names the row it found, and the fingerprint of a list of rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.benchmarks.items import DataError
from pipeline.hashing import sha256_hex

SPLIT_FILE = "train-00000-of-00001.parquet"  # the one file of each hub folder (MLLMU-Bench, CLEAR)


def read_parquet(path: Path) -> Any:
    """The pyarrow Table of one Parquet file."""
    # Imported here: pyarrow takes 0.2 s to import, and `pipeline --help` imports this package for the
    # names of the layouts (stages/config.py).
    import pyarrow.parquet as pq

    return pq.read_table(path)


def split_files(data_dir: str | Path, folder: str) -> list[Path]:
    """The Parquet files of one split folder (the hub has one; several are concatenated, as eval.py does)."""
    directory = Path(data_dir) / folder
    if not directory.is_dir():
        raise DataError(f"split folder {directory} does not exist (expected {directory / SPLIT_FILE})")
    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise DataError(f"split folder {directory} holds no Parquet file (expected {SPLIT_FILE})")
    return files


def row_where(row: dict) -> str:
    """How an error names a row: its file and its ID."""
    return f"{row.get('_source', 'row')}: row ID={row.get('ID')!r}"


def row_field(row: dict, name: str) -> Any:
    """row[name], or a DataError naming the file, the row and the missing field."""
    value = row.get(name)
    if value is None:
        raise DataError(f"{row_where(row)} has no field {name!r}")
    return value


def item_field(row: dict, item: dict, name: str, where: str) -> Any:
    """item[name] of a nested record (`where` names it in the row), or a DataError naming all three."""
    value = item.get(name) if isinstance(item, dict) else None
    if value is None:
        raise DataError(f"{row_where(row)} {where} has no field {name!r}")
    return value


def image_bytes(row: dict, image: object, where: str) -> bytes:
    """Bytes of an Image cell ({bytes, path}); a path is read relative to the Parquet file's folder."""
    source = row.get("_source", "row")
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, dict):
        if image.get("bytes"):
            return bytes(image["bytes"])
        if image.get("path"):
            path = Path(source).parent / image["path"] if source != "row" else Path(image["path"])
            if path.is_file():
                return path.read_bytes()
            raise DataError(f"{row_where(row)} {where} points at missing file {path}")
    raise DataError(f"{row_where(row)} {where} has no image bytes")


def _canonical(value: Any) -> Any:
    """JSON-ready form of a cell: bytes become their sha256 so that images count without bloating."""
    if isinstance(value, (bytes, bytearray)):
        return {"sha256": sha256_hex(bytes(value))}
    if isinstance(value, dict):
        return {str(key): _canonical(item) for key, item in value.items() if key != "_source"}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return value


def rows_fingerprint(rows: list[dict]) -> str:
    """sha256 over rows in order (images by their hash; where a row was read from does not count)."""
    lines = [json.dumps(_canonical(row), sort_keys=True, ensure_ascii=False) + "\n" for row in rows]
    return sha256_hex("".join(lines).encode())
