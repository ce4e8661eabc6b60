"""CLEAR (hub data set therem/CLEAR) as ViKeR evaluates it (App. A.1-A.2): its configs, rows, triples and
evaluation items, and its `Layout`.

Configs are folders of Parquet files: forget01|05|10, retain99|95|90, full, their "+tofu" text variants,
forget05_perturbed / retain_perturbed (adding perturbed_names), real_faces, real_world.
Visual rows: image {bytes, path}, caption, name. Text (TOFU) rows: question, answer.
real_faces: image, answer, options; real_world: image, question, answer, options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.benchmarks.items import DataError, EvalItem, EvalItems, Layout, open_ended
from pipeline.benchmarks.rows import image_bytes, read_parquet, row_field, split_files
from pipeline.hashing import stable_int
from pipeline.samples import QASample

CLEAR_NAME_QUESTION = "What is the name of the person in the image?"
CLEAR_CAPTION_QUESTIONS = (
    "Describe the image in detail.",
    "What can you see in this picture?",
    "What is shown in this image?",
)
CLEAR_MODES = ("recognition", "caption")
REAL_CONFIGS = ("real_faces", "real_world")  # multiple choice about real people and places
OPTION_LETTERS = "ABCDEFGH"


def is_clear_config(split: str) -> bool:
    """Whether a split name is one of CLEAR's configs (forget05, retain95, full, real_faces, ...)."""
    stem = split.split("+")[0].removesuffix("_perturbed")
    return (stem[:6] in ("forget", "retain") and stem[6:].isdigit()) or stem in ("full", *REAL_CONFIGS)


@dataclass(frozen=True)
class ClearRow:
    """One row of a config's Parquet file, with its image decoded to bytes (None when it has none)."""

    config: str
    path: Path
    index: int
    fields: dict
    image: bytes | None

    @property
    def sample_id(self) -> str:
        return f"clear/{self.config}/{self.path.stem}/{self.index}"

    @property
    def image_source(self) -> str:
        return f"{self.path} row {self.index} image" if self.image is not None else ""


def clear_rows(root: str | Path, config: str) -> list[ClearRow]:
    """Every row of one config, file by file in name order (CLEAR's rows have no ID: their index is one)."""
    rows = []
    for path in split_files(root, config):
        for index, row in enumerate(read_parquet(path).to_pylist()):
            row["_source"] = str(path)
            row.setdefault("ID", index)
            image = row.get("image")
            image_data = image_bytes(row, image, "field 'image'") if image is not None else None
            rows.append(ClearRow(config, path, index, row, image_data))
    return rows


def _question_answer(row: ClearRow, mode: str) -> tuple[str, str]:
    """A row's own question and answer, or (visual rows) the identification or a caption question."""
    fields = row.fields
    if fields.get("question"):
        return fields["question"], row_field(fields, "answer")
    if mode == "recognition":
        return CLEAR_NAME_QUESTION, row_field(fields, "name")
    pick = stable_int(row.sample_id) % len(CLEAR_CAPTION_QUESTIONS)
    return CLEAR_CAPTION_QUESTIONS[pick], row_field(fields, "caption")


def load_clear_samples(root: str | Path, config: str, mode: str = "recognition") -> list[QASample]:
    """Triples of one CLEAR config.

    Rows with a question (the TOFU text rows, real_faces, real_world) give (image or None, question, answer).
    Visual rows give the person-identification question with the name as answer ("recognition"), or a
    caption question with the caption as answer ("caption"). person_id is the person's name.
    """
    if mode not in CLEAR_MODES:
        raise DataError(f"unknown CLEAR mode {mode!r}; choose from {CLEAR_MODES}")
    samples: list[QASample] = []
    for row in clear_rows(root, config):
        question, answer = _question_answer(row, mode)
        if row.image is None and not row.fields.get("question"):
            raise DataError(f"{row.path}: row {row.index} has no field 'image' (needed for mode {mode!r})")
        samples.append(
            QASample(
                sample_id=row.sample_id,
                person_id=row.fields.get("name") or f"{config}:{row.index}",
                question=question,
                answer=str(answer),
                image=row.image,
                image_source=row.image_source,
                kind="generation",
            )
        )
    return samples


def choice_item(row: ClearRow) -> EvalItem:
    """A real_faces / real_world row as a multiple-choice item: its options lettered A, B, ..."""
    where = f"{row.path}: row {row.index}"
    options, answer = row.fields.get("options"), row.fields.get("answer")
    if not options or answer is None:
        raise DataError(f"{where} has no field {'options' if not options else 'answer'!r}")
    if answer not in options:
        raise DataError(f"{where}: answer {answer!r} is not among its options {options}")
    return EvalItem(
        item_id=row.sample_id,
        person_id=f"{row.config}:{row.index}",
        person_name="",
        task="classification",
        modality="image_textual" if row.image is not None else "pure_text",
        question=row.fields.get("question") or CLEAR_NAME_QUESTION,
        ground_truth=str(answer),
        options={letter: str(option) for letter, option in zip(OPTION_LETTERS, options, strict=False)},
        correct_letter=OPTION_LETTERS[list(options).index(answer)],
        image=row.image,
        image_source=row.image_source,
    )


class ClearLayout(Layout):
    """CLEAR as ViKeR evaluates it (App. A.1-A.2): person identification on forget and retain (REC: the
    reply contains the name), multiple-choice accuracy on real authors' faces and real-world images."""

    name = "clear"
    looks_for = "CLEAR's layout (forget05/, retain95/, real_faces/ ... folders)"
    roles = ("forget", "retain", *REAL_CONFIGS)

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any(path.is_dir() and is_clear_config(path.name) for path in root.glob("*"))

    def split_names(self, forget_split: str) -> dict[str, str]:
        if not (forget_split.startswith("forget") and forget_split[6:].isdigit()):
            raise DataError(
                f"forget split {forget_split!r}: CLEAR names its forget splits forget01, forget05, forget10 "
                f"({self.root} is in CLEAR's layout)"
            )
        ratio = int(forget_split[6:])
        return {
            "forget": forget_split,
            "retain": f"retain{100 - ratio:02d}",
            "real_faces": "real_faces",
            "real_world": "real_world",
        }

    def unlearning_samples(self, split: str, kinds: tuple[str, ...]) -> list[QASample]:
        """qa: the identification question answered with the name (ViKeR's forget and retain triples);
        generation: a caption question answered with the caption."""
        modes = {"qa": "recognition", "generation": "caption"}
        unknown = [kind for kind in kinds if kind not in modes]
        if unknown:
            raise DataError(
                f"sample kinds {unknown}: CLEAR has qa (identification) and generation (captions)"
            )
        split = self._checked(split)
        return [sample for kind in kinds for sample in load_clear_samples(self.root, split, modes[kind])]

    def eval_items(self, split: str) -> EvalItems:
        split = self._checked(split)
        if split in REAL_CONFIGS:
            return EvalItems(split, classification=[choice_item(row) for row in clear_rows(self.root, split)])
        samples = load_clear_samples(self.root, split, "recognition")
        return EvalItems(
            split, generation=[open_ended(sample, person_name=sample.answer) for sample in samples]
        )

    def split_files(self, split: str) -> list[Path]:
        return split_files(self.root, self._checked(split))

    def fluent_texts(self, split: str, items: EvalItems) -> list[str]:
        """The identification answers are bare names: the captions of the same rows are the sentences."""
        if split in REAL_CONFIGS:
            return []
        captions = [sample.answer for sample in load_clear_samples(self.root, split, "caption")]
        return captions + super().fluent_texts(split, items)

    def _checked(self, split: str) -> str:
        if not is_clear_config(split):
            raise DataError(
                f"split {split!r} is not a CLEAR config ({self.root} is in CLEAR's layout: forget05, "
                "retain95, real_faces, real_world, ...); data_format: mllmu reads MLLMU-Bench's names"
            )
        return split
