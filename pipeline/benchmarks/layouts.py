"""Data layouts: how one data folder's splits become unlearning triples and evaluation items.

    mllmu  MLLMU-Bench's hub layout (MLLMMU/MLLMU-Bench; the mini world writes the same): forget_K,
           retain_(100-K), Test_Set, Retain_Set, Full_Set folders (pipeline.benchmarks.data)
    clear  CLEAR (therem/CLEAR): forget01|05|10, retain99|95|90 (image, caption, name), real_faces
           (image, answer, options), real_world (image, question, answer, options)
    local  one file per split, <split>.jsonl or <split>.parquet, of (image, question, answer) records
           (pipeline.benchmarks.data.load_local_samples), images relative to the folder

Every stage reads its data through `layout(data_format, data)`: `unlearning_samples` for precompute and
training, `split_names`, `eval_items` and `split_files` for evaluation. `data_format: auto` detects the
layout from the folder and names what it looked for when none matches; a split name of another layout is
refused with the layout's own names.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from pipeline.benchmarks import data as hub
from pipeline.benchmarks.data import (
    CLEAR_NAME_QUESTION,
    DataError,
    EvalItem,
    EvalItems,
    load_clear_samples,
    load_local_samples,
    split_files,
)
from pipeline.registry import Registry
from pipeline.samples import QASample

LAYOUTS: Registry = Registry("data layout")


class Layout:
    """One benchmark's folder layout; subclasses say how its splits are named and read."""

    name = ""
    roles: tuple[str, ...] = ()  # the evaluation roles, in the report's order
    reverse_roles: tuple[str, ...] = ()  # the roles Vgid's reverse attack is asked on
    has_exemplars = False  # whether few-shot exemplar profiles exist (MLLMU-Bench's Full_Set)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def detect(cls, root: Path) -> bool:
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


@LAYOUTS.register("mllmu")
class MllmuLayout(Layout):
    name = "mllmu"
    roles = ("forget", "test", "retain", "real")
    reverse_roles = ("forget", "test")  # Vgid Table 6 attacks the forget and test sets
    has_exemplars = True

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any(root.glob("forget_*")) or any((root / folder).is_dir() for folder in hub.HUB_FOLDERS)

    def split_names(self, forget_split: str) -> dict[str, str]:
        self._checked(forget_split)
        try:
            return hub.split_names(forget_split)
        except ValueError as error:
            raise DataError(f"{error} ({self.root} is in MLLMU-Bench's layout)") from None

    def unlearning_samples(self, split: str, kinds: tuple[str, ...]) -> list[QASample]:
        return hub.load_unlearning_samples(self.root, self._checked(split), kinds)

    def eval_items(self, split: str) -> EvalItems:
        return hub.load_eval_items(self.root, self._checked(split))

    def split_files(self, split: str) -> list[Path]:
        folders = [folder for folder in hub.resolve_split(self._checked(split)) if folder]
        return [file for folder in folders for file in split_files(self.root, folder)]

    def _checked(self, split: str) -> str:
        try:
            hub.resolve_split(split)
        except DataError as error:
            if ClearLayout.is_split(split):
                raise DataError(
                    f"split {split!r} is a CLEAR name, but {self.root} is in MLLMU-Bench's layout (forget_K, "
                    "retain_K, test_K, real, ...): use e.g. forget_10, or data_format: clear for CLEAR data"
                ) from None
            raise DataError(f"{error} ({self.root} is in MLLMU-Bench's layout)") from None
        return split


@LAYOUTS.register("clear")
class ClearLayout(Layout):
    """CLEAR as ViKeR evaluates it (App. A.1-A.2): person identification on forget and retain (REC: the
    reply contains the name), multiple-choice accuracy on real authors' faces and real-world images."""

    name = "clear"
    roles = ("forget", "retain", "real_faces", "real_world")
    REAL = ("real_faces", "real_world")

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any(path.is_dir() and cls.is_split(path.name) for path in root.glob("*"))

    @staticmethod
    def is_split(split: str) -> bool:
        stem = split.split("+")[0].removesuffix("_perturbed")
        return (stem[:6] in ("forget", "retain") and stem[6:].isdigit()) or stem in (
            "full",
            *ClearLayout.REAL,
        )

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
        if split in self.REAL:
            return EvalItems(split, classification=self._choice_items(split))
        samples = load_clear_samples(self.root, split, "recognition")
        return EvalItems(
            split, generation=[open_ended(sample, person_name=sample.answer) for sample in samples]
        )

    def split_files(self, split: str) -> list[Path]:
        return split_files(self.root, self._checked(split))

    def fluent_texts(self, split: str, items: EvalItems) -> list[str]:
        """The identification answers are bare names: the captions of the same rows are the sentences."""
        if split in self.REAL:
            return []
        captions = [sample.answer for sample in load_clear_samples(self.root, split, "caption")]
        return captions + super().fluent_texts(split, items)

    def _checked(self, split: str) -> str:
        if not self.is_split(split):
            raise DataError(
                f"split {split!r} is not a CLEAR config ({self.root} is in CLEAR's layout: forget05, "
                "retain95, real_faces, real_world, ...); data_format: mllmu reads MLLMU-Bench's names"
            )
        return split

    def _choice_items(self, split: str) -> list[EvalItem]:
        items = []
        for path in split_files(self.root, split):
            for index, row in enumerate(pq.read_table(path).to_pylist()):
                where = f"{path}: row {index}"
                options = row.get("options")
                answer = row.get("answer")
                if not options or answer is None:
                    raise DataError(f"{where} has no field {'options' if not options else 'answer'!r}")
                if answer not in options:
                    raise DataError(f"{where}: answer {answer!r} is not among its options {options}")
                letters = {letter: str(option) for letter, option in zip("ABCDEFGH", options, strict=False)}
                image = row.get("image")
                row.update(_source=str(path), ID=index)
                image_bytes = hub._image_bytes(row, image, "field 'image'") if image is not None else None
                items.append(
                    EvalItem(
                        item_id=f"clear/{split}/{path.stem}/{index}",
                        person_id=f"{split}:{index}",
                        person_name="",
                        task="classification",
                        modality="image_textual" if image_bytes is not None else "pure_text",
                        question=row.get("question") or CLEAR_NAME_QUESTION,
                        ground_truth=str(answer),
                        options=letters,
                        correct_letter="ABCDEFGH"[list(options).index(answer)],
                        image=image_bytes,
                        image_source=f"{path} row {index} image" if image_bytes is not None else "",
                    )
                )
        return items


@LAYOUTS.register("local")
class LocalLayout(Layout):
    """A user's own files: split X is X.jsonl or X.parquet; evaluation asks each question open-ended."""

    name = "local"
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
        found = [self.root / f"{split}{suffix}" for suffix in (".jsonl", ".parquet")]
        found = [path for path in found if path.is_file()]
        if not found:
            raise DataError(f"local split {split!r}: neither {self.root / split}.jsonl nor .parquet exists")
        return found[:1]


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


def layout(data_format: str, root: str | Path) -> Layout:
    """The layout of a data folder: the one named, or (auto) the one detected."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root} is not a directory")
    if data_format != "auto":
        return LAYOUTS[data_format](root)
    for name in ("mllmu", "clear", "local"):
        if LAYOUTS[name].detect(root):
            return LAYOUTS[name](root)
    raise DataError(
        f"--data {root}: neither MLLMU-Bench's layout (forget_K/, Test_Set/, Retain_Set/ folders), CLEAR's "
        "(forget05/, retain95/, real_faces/ ...) nor local split files (forget.jsonl, retain.parquet); "
        "set --data-format to say which"
    )
