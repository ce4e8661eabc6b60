"""A user's own data: one file per split, <split>.jsonl or <split>.parquet, of (image, question, answer)
records, images relative to the folder; evaluation asks each question open-ended. Its `Layout`."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.benchmarks.items import DataError, EvalItems, Layout, open_ended
from pipeline.benchmarks.rows import image_bytes, read_parquet
from pipeline.samples import QASample

SUFFIXES = (".jsonl", ".parquet")


def _records(path: Path) -> tuple[list[tuple[int, dict]], str]:
    """(number, record) of each line of a JSONL file or row of a Parquet file, and what a number counts."""
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number} is not JSON: {error}") from error
        return records, "line"
    if path.suffix == ".parquet":
        return list(enumerate(read_parquet(path).to_pylist(), start=1)), "row"
    raise DataError(f"local data file {path} must end in .jsonl or .parquet")


def load_local_samples(path: str | Path, image_root: str | Path | None = None) -> list[QASample]:
    """A user's own data: one record per triple.

    Fields: question, answer (required); image (optional: a path relative to image_root, default the
    file's folder, or, in Parquet, an {bytes, path} struct or raw bytes); person_id (default ""),
    sample_id (default "<file stem>/<line>"), kind (default "generation").
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"local data file {path} does not exist")
    image_root = Path(image_root) if image_root is not None else path.parent
    records, where = _records(path)
    samples = []
    for number, record in records:
        for name in ("question", "answer"):
            if not record.get(name):
                raise DataError(f"{path} {where} {number} has no field {name!r}")
        image = record.get("image")
        image_data, image_source = None, ""
        if isinstance(image, str):
            image_path = image_root / image
            if not image_path.is_file():
                raise DataError(f"{path} {where} {number}: image file {image_path} does not exist")
            image_data, image_source = image_path.read_bytes(), str(image_path)
        elif image is not None:
            record["_source"], record["ID"] = f"{path}", record.get("sample_id", number)
            image_data, image_source = image_bytes(record, image, "field 'image'"), f"{path} {where} {number}"
        samples.append(
            QASample(
                sample_id=str(record.get("sample_id") or f"{path.stem}/{number}"),
                person_id=str(record.get("person_id") or ""),
                question=record["question"],
                answer=record["answer"],
                image=image_data,
                image_source=image_source,
                kind=record.get("kind") or "generation",
            )
        )
    return samples


class LocalLayout(Layout):
    """A user's own files: split X is X.jsonl or X.parquet; evaluation asks each question open-ended."""

    name = "local"
    looks_for = "local split files (forget.jsonl, retain.parquet)"
    roles = ("forget", "retain")

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any(root.glob("*.jsonl")) or any(root.glob("*.parquet"))

    def split_names(self, forget_split: str) -> dict[str, str]:
        if not forget_split.startswith("forget"):
            raise DataError(f"forget split {forget_split!r}: local splits are files forget*.jsonl/.parquet")
        return {"forget": forget_split, "retain": "retain" + forget_split[6:]}

    def unlearning_samples(self, split: str, kinds: tuple[str, ...]) -> list[QASample]:
        return load_local_samples(self.split_files(split)[0])

    def eval_items(self, split: str) -> EvalItems:
        samples = self.unlearning_samples(split, ("qa",))
        return EvalItems(split, generation=[open_ended(sample) for sample in samples])

    def split_files(self, split: str) -> list[Path]:
        found = [self.root / f"{split}{suffix}" for suffix in SUFFIXES]
        found = [path for path in found if path.is_file()]
        if not found:
            raise DataError(f"local split {split!r}: neither {self.root / split}.jsonl nor .parquet exists")
        return found[:1]
