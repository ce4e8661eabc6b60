"""What every layout gives the stages: evaluation items, unlearning triples (pipeline.samples.QASample),
the `Layout` interface that names and reads its splits, and the one error it raises."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.benchmarks.prompts import classification_text, cloze_text, generation_text
from pipeline.hashing import sha256_hex
from pipeline.samples import QASample


class DataError(ValueError):
    """A data file is missing, or lacks a field, or holds a value of the wrong shape."""


@dataclass(frozen=True)
class EvalItem:
    """One evaluation question of MLLMU-Bench's three tasks.

    task: "classification" | "cloze" | "generation"; modality: "image_textual" | "pure_text".
    question: the raw question of the data set; prompt() the official eval.py text.
    ground_truth: classification: the correct option's text; cloze: the blank's value; generation: the
    reference sentence. correct_letter and options only for classification.
    """

    item_id: str
    person_id: str
    person_name: str
    task: str
    modality: str
    question: str
    ground_truth: str
    options: dict[str, str] | None = None
    correct_letter: str | None = None
    image: bytes | None = None
    image_source: str = ""

    def prompt(self) -> str:
        if self.task == "classification":
            return classification_text(self.question, self.options or {})
        if self.task == "cloze":
            return cloze_text(self.question)
        return generation_text(self.question, self.image is not None)

    def target(self) -> str:
        """What a correct model answers: the letter for classification, the ground truth otherwise."""
        return self.correct_letter if self.task == "classification" else self.ground_truth

    def as_sample(self) -> QASample:
        kind = {"classification": "mc", "cloze": "cloze", "generation": "generation"}[self.task]
        return QASample(
            sample_id=self.item_id,
            person_id=self.person_id,
            question=self.prompt(),
            answer=self.target(),
            image=self.image,
            image_source=self.image_source,
            kind=kind,
        )


@dataclass
class EvalItems:
    split: str
    classification: list[EvalItem] = field(default_factory=list)
    cloze: list[EvalItem] = field(default_factory=list)
    generation: list[EvalItem] = field(default_factory=list)

    def all(self) -> list[EvalItem]:
        return [*self.classification, *self.cloze, *self.generation]

    def __len__(self) -> int:
        return len(self.classification) + len(self.cloze) + len(self.generation)

    def person_ids(self) -> list[str]:
        return sorted({item.person_id for item in self.all()})

    def of_people(self, person_ids: set[str] | frozenset[str]) -> EvalItems:
        """The items about these people only, in the same order."""
        return EvalItems(
            self.split,
            [item for item in self.classification if item.person_id in person_ids],
            [item for item in self.cloze if item.person_id in person_ids],
            [item for item in self.generation if item.person_id in person_ids],
        )


def open_ended(sample: QASample, person_name: str = "") -> EvalItem:
    """A triple asked as a generation question, scored against its answer."""
    return EvalItem(
        item_id=sample.sample_id,
        person_id=sample.person_id,
        person_name=person_name,
        task="generation",
        modality="image_textual" if sample.image is not None else "pure_text",
        question=sample.question,
        ground_truth=sample.answer,
        image=sample.image,
        image_source=sample.image_source,
    )


def samples_fingerprint(samples: list[QASample]) -> str:
    """sha256 over the triples themselves (ids, text and image hashes), in order (the cache header's
    dataset_fingerprint)."""
    lines = []
    for sample in samples:
        image_hash = sha256_hex(sample.image) if sample.image is not None else ""
        record = [sample.sample_id, sample.person_id, sample.question, sample.answer, image_hash, sample.kind]
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return sha256_hex("".join(lines).encode())


class Layout:
    """One benchmark's folder layout; each module of pipeline.benchmarks subclasses it for its benchmark."""

    name = ""  # what data_format calls it
    looks_for = ""  # what `detect` looks for, in words (data_format auto names it when nothing matches)
    roles: tuple[str, ...] = ()  # the evaluation roles, in the report's order
    reverse_roles: tuple[str, ...] = ()  # the roles Vgid's reverse attack is asked on
    has_exemplars = False  # whether few-shot exemplar profiles exist (MLLMU-Bench's Full_Set)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def detect(cls, root: Path) -> bool:
        """Whether the folder looks like this layout (data_format: auto tries each in turn)."""
        raise NotImplementedError

    def split_names(self, forget_split: str) -> dict[str, str]:
        """Role -> split of one experiment, from its forget split."""
        raise NotImplementedError

    def unlearning_samples(self, split: str, kinds: tuple[str, ...]) -> list[QASample]:
        raise NotImplementedError

    def eval_items(self, split: str) -> EvalItems:
        raise NotImplementedError

    def split_files(self, split: str) -> list[Path]:
        """The files a split is read from (evaluation's resume key hashes them)."""
        raise NotImplementedError

    def fluent_texts(self, split: str, items: EvalItems) -> list[str]:
        """Sentences of the split that read as fluent text (the offline coherence scorer fits on them)."""
        return [item.ground_truth for item in items.generation]
