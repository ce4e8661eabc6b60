"""MLLMU-Bench's hub layout (hub data set MLLMMU/MLLMU-Bench), which the mini world writes too: its split
names, rows, evaluation items and unlearning triples, and its `Layout`.

Folders and fields (as read by the official eval.py):
    DATA/forget_5|10|15, retain_95|90|85, Test_Set, Retain_Set, Full_Set / train-00000-of-00001.parquet
    row: ID, image {bytes, path} (Test_Set: images [{bytes, path}]),
         Classification_Task {Image_Textual_Questions, Pure_Text_Questions: [{Question, Options{A..D},
         Correct_Answer}]}, Mask_Task [{Type, Question, Ground_Truth}], Generation_Task [{Type, Question,
         Ground_Truth}]
The official fine-tuning / unlearning code trains on another column, `metadata`: a JSON list of
{Question, Answer} pairs shown with the row's image (ft_Data and baseline_train_split rows; the mini world
writes it into its forget/retain rows too).

Logical split names accepted everywhere a split is asked for:
    forget_K, retain_K   the folders themselves
    test_K               Test_Set rows of forget_K's people (what the official eval.py evaluates)
    test / Test_Set      every Test_Set row
    real / Retain_Set    the real-celebrity group
    full / Full_Set      every fictitious person
    unseen / Unseen_Set  people no model was fine-tuned on (the mini world's reference people): the
                         never-seen side of membership inference (pipeline.evaluation.membership); not in
                         the hub
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.benchmarks.clear import is_clear_config
from pipeline.benchmarks.items import DataError, EvalItem, EvalItems, Layout
from pipeline.benchmarks.rows import (
    image_bytes,
    item_field,
    read_parquet,
    row_field,
    row_where,
    rows_fingerprint,
    split_files,
)
from pipeline.hashing import stable_int
from pipeline.samples import QASample

HUB_FOLDERS = ("Test_Set", "Retain_Set", "Full_Set", "Unseen_Set")
LOGICAL_FOLDERS = {"test": "Test_Set", "real": "Retain_Set", "full": "Full_Set", "unseen": "Unseen_Set"}
UNLEARNING_KINDS = ("qa", "generation", "mc", "cloze")


# ---------------------------------------------------------------------------------------------------------
# Split names
# ---------------------------------------------------------------------------------------------------------


def split_ratio(split: str) -> tuple[str, int] | None:
    """("forget", 10) for forget_10, likewise retain_K and test_K; None for any other name."""
    prefix, _, ratio = split.partition("_")
    if prefix in ("forget", "retain", "test") and ratio.isdigit():
        return prefix, int(ratio)
    return None


def split_names(forget_split: str) -> dict[str, str]:
    """Role -> split name of one experiment, e.g. forget_10 -> forget_10, test_10, retain_90, real."""
    parsed = split_ratio(forget_split)
    if parsed is None or parsed[0] != "forget" or not 0 < parsed[1] < 100:
        raise ValueError(f"--forget-split must look like forget_10, got {forget_split!r}")
    ratio = parsed[1]
    return {
        "forget": forget_split,
        "test": f"test_{ratio}",
        "retain": f"retain_{100 - ratio}",
        "real": "real",
    }


def forget_ratio(split: str) -> int:
    """The K of the forget_K a split belongs to (forget_K, retain_(100-K), test_K); 10 for other splits."""
    parsed = split_ratio(split)
    if parsed is None:
        return 10
    prefix, ratio = parsed
    return 100 - ratio if prefix == "retain" else ratio


def resolve_split(split: str) -> tuple[str, str | None]:
    """Logical split name -> (hub folder, forget folder whose ids filter it or None)."""
    if split in LOGICAL_FOLDERS:
        return LOGICAL_FOLDERS[split], None
    if split in HUB_FOLDERS:
        return split, None
    parsed = split_ratio(split)
    if parsed is not None and parsed[0] == "test":
        return "Test_Set", f"forget_{parsed[1]}"
    if parsed is not None:
        return split, None
    raise DataError(
        f"unknown split {split!r}: use forget_K, retain_K, test_K, test, real, full "
        f"or a hub folder ({', '.join(HUB_FOLDERS)})"
    )


# ---------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------


def load_split_rows(data_dir: str | Path, split_folder: str) -> list[dict]:
    """All rows of one hub folder as plain dicts; every row must have an `ID`."""
    rows: list[dict] = []
    for path in split_files(data_dir, split_folder):
        try:
            table = read_parquet(path)
        except Exception as error:  # pyarrow raises several types for a corrupt or half-written file
            raise DataError(f"{path} is not a readable Parquet file: {error}") from error
        if "ID" not in table.column_names:
            raise DataError(f"{path} has no field 'ID' (fields: {', '.join(table.column_names)})")
        for row in table.to_pylist():
            row["_source"] = str(path)
            rows.append(row)
    return rows


def row_image(row: dict) -> tuple[bytes, str]:
    """The image a row's image questions are asked about, and where it came from.

    Test_Set rows carry several alternative images (`images`); the official eval.py draws one at random per
    row. We draw it deterministically from the row's ID so that every run scores the same image.
    """
    source = row.get("_source", "row")
    if row.get("image") is not None:
        return image_bytes(row, row["image"], "field 'image'"), f"{source} ID={row['ID']} image"
    images = row.get("images")
    if not images:
        raise DataError(f"{row_where(row)} has no field 'image' (nor 'images')")
    index = stable_int(str(row["ID"])) % len(images)
    return image_bytes(
        row, images[index], f"field 'images'[{index}]"
    ), f"{source} ID={row['ID']} images[{index}]"


def _person_name(row: dict) -> str:
    """The person's name from the row's `biography`: on the hub a JSON string ('{"Name": ..., "Born": ...}'),
    in the mini world's files a struct; no biography: no name (REC is then not scored)."""
    biography = row.get("biography")
    if biography is None:
        return ""
    if isinstance(biography, str):
        try:
            biography = json.loads(biography)
        except json.JSONDecodeError as error:
            raise DataError(f"{row_where(row)} field 'biography' is not JSON: {error}") from error
    if not isinstance(biography, dict):
        raise DataError(
            f"{row_where(row)} field 'biography' is a {type(biography).__name__}, expected a JSON object "
            "(or a struct) with a 'Name'"
        )
    name = biography.get("Name") or ""
    if not isinstance(name, str):
        raise DataError(f"{row_where(row)} field 'biography' has a Name that is not text: {name!r}")
    return name


def split_rows(data_dir: str | Path, split: str) -> list[dict]:
    """Rows of a logical split, in file order; test_K keeps the Test_Set rows of forget_K's people (as
    eval.py does)."""
    folder, forget_folder = resolve_split(split)
    rows = load_split_rows(data_dir, folder)
    if forget_folder is None:
        return rows
    forget_ids = {str(row["ID"]) for row in load_split_rows(data_dir, forget_folder)}
    kept = [row for row in rows if str(row["ID"]) in forget_ids]
    missing = forget_ids - {str(row["ID"]) for row in kept}
    if missing:
        raise DataError(
            f"{split_files(data_dir, folder)[0]}: Test_Set lacks rows for forget ids {sorted(missing)[:10]}"
        )
    return kept


# ---------------------------------------------------------------------------------------------------------
# Evaluation items
# ---------------------------------------------------------------------------------------------------------


def _modality(row: dict, item: dict, where: str) -> str:
    kind = item_field(row, item, "Type", where)
    if kind not in ("Image_Textual", "Pure_Text"):
        raise DataError(
            f"{row_where(row)} {where} has Type {kind!r}, expected 'Image_Textual' or 'Pure_Text'"
        )
    return "image_textual" if kind == "Image_Textual" else "pure_text"


def row_eval_items(row: dict, split: str) -> EvalItems:
    """The classification, cloze and generation items of one person's row."""
    person_id = str(row["ID"])
    name = _person_name(row)
    image, image_source = row_image(row)
    items = EvalItems(split=split)

    def make(task: str, index: int, modality: str, **fields) -> EvalItem:
        with_image = modality == "image_textual"
        return EvalItem(
            item_id=f"{split}/{person_id}/{task}/{index}",
            person_id=person_id,
            person_name=name,
            task=task,
            modality=modality,
            image=image if with_image else None,
            image_source=image_source if with_image else "",
            **fields,
        )

    classification = row_field(row, "Classification_Task")
    index = 0
    for group, modality in (
        ("Image_Textual_Questions", "image_textual"),
        ("Pure_Text_Questions", "pure_text"),
    ):
        for position, question in enumerate(classification.get(group) or []):
            where = f"Classification_Task.{group}[{position}]"
            options = {k: v for k, v in item_field(row, question, "Options", where).items() if v is not None}
            letter = item_field(row, question, "Correct_Answer", where)
            if letter not in options:
                raise DataError(
                    f"{row_where(row)} {where} has Correct_Answer {letter!r} "
                    f"not among its Options {sorted(options)}"
                )
            items.classification.append(
                make(
                    "classification",
                    index,
                    modality,
                    question=item_field(row, question, "Question", where),
                    ground_truth=options[letter],
                    options=options,
                    correct_letter=letter,
                )
            )
            index += 1
    for task, column, target in (
        ("cloze", "Mask_Task", items.cloze),
        ("generation", "Generation_Task", items.generation),
    ):
        for position, question in enumerate(row_field(row, column)):
            where = f"{column}[{position}]"
            target.append(
                make(
                    task,
                    position,
                    _modality(row, question, where),
                    question=item_field(row, question, "Question", where),
                    ground_truth=item_field(row, question, "Ground_Truth", where),
                )
            )
    return items


def split_eval_items(rows: list[dict], split: str, source: str = "") -> EvalItems:
    """Evaluation items of every row, in row order."""
    combined = EvalItems(split=split)
    for row in rows:
        row.setdefault("_source", source or split)
        items = row_eval_items(row, split)
        combined.classification += items.classification
        combined.cloze += items.cloze
        combined.generation += items.generation
    return combined


def load_eval_items(data_dir: str | Path, split: str) -> EvalItems:
    """Classification (image+text and text-only), cloze and generation items of one logical split."""
    return split_eval_items(split_rows(data_dir, split), split)


# ---------------------------------------------------------------------------------------------------------
# Unlearning triples
# ---------------------------------------------------------------------------------------------------------


def _qa_pairs(row: dict) -> list[dict]:
    metadata = row.get("metadata")
    if metadata is None:
        raise DataError(
            f"{row_where(row)} has no field 'metadata' (the fine-tuning "
            "pairs the 'qa' kind trains on; MLLMU-Bench keeps them in its training files, e.g. "
            "baseline_train_split: point the data directory there, or choose kinds generation/mc/cloze)"
        )
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as error:
            raise DataError(f"{row_where(row)} field 'metadata' is not JSON: {error}") from error
    if not isinstance(metadata, list):
        raise DataError(f"{row_where(row)} field 'metadata' is not a list of {{Question, Answer}}")
    return metadata


def row_samples(
    row: dict, split: str, kinds: tuple[str, ...], source: str = "", skipped: list[str] | None = None
) -> list[QASample]:
    """The (image, question, answer) triples of one row, for the requested kinds, in a fixed order.

    qa: every `metadata` pair {Question, Answer} with the row's image (a pair whose question or answer is
        missing, empty or blank is skipped, as the official Vanilla_LLaVA_Dataset does, and its id added
        to `skipped`);
    generation / mc / cloze: the row's evaluation items as triples (EvalItem.as_sample).
    """
    unknown = set(kinds) - set(UNLEARNING_KINDS)
    if unknown:
        raise DataError(f"unknown sample kinds {sorted(unknown)}; choose from {UNLEARNING_KINDS}")
    row.setdefault("_source", source or split)
    person_id = str(row["ID"])
    samples: list[QASample] = []
    items = row_eval_items(row, split) if set(kinds) - {"qa"} else None
    for kind in kinds:
        if kind == "qa":
            image, image_source = row_image(row)
            for index, pair in enumerate(_qa_pairs(row)):
                question, answer = pair.get("Question"), pair.get("Answer")
                if not (
                    isinstance(question, str)
                    and question.strip()
                    and isinstance(answer, str)
                    and answer.strip()
                ):
                    if skipped is not None:
                        skipped.append(f"{split}/{person_id}/qa/{index}")
                    continue
                samples.append(
                    QASample(
                        sample_id=f"{split}/{person_id}/qa/{index}",
                        person_id=person_id,
                        question=question,
                        answer=answer,
                        image=image,
                        image_source=image_source,
                        kind="generation",
                    )
                )
            continue
        task_items = {"generation": items.generation, "mc": items.classification, "cloze": items.cloze}[kind]
        samples.extend(item.as_sample() for item in task_items)
    return samples


def load_unlearning_samples(
    data_dir: str | Path, split: str, kinds: tuple[str, ...] = ("qa",)
) -> list[QASample]:
    """The (image, question, answer) triples of a logical split, for unlearning training and precompute.

    The default ("qa",) is what the official code trains on: the `metadata` pairs of each row, every pair
    shown with the person's image (data_process/data_preprocess.py, Vanilla_LLaVA_Dataset). The real
    benchmark keeps those in its training files (ft_Data, baseline_train_split) and not in the evaluation
    folders: point data_dir there, or choose kinds among "generation", "mc", "cloze" to train on the
    evaluation items' text.
    """
    samples: list[QASample] = []
    skipped: list[str] = []
    for row in split_rows(data_dir, split):
        samples.extend(row_samples(row, split, tuple(kinds), skipped=skipped))
    if skipped:
        shown = ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        print(f"warning: split {split} under {data_dir}: skipped {len(skipped)} qa pairs without a question "
              f"or answer: {shown}", file=sys.stderr)  # fmt: skip
    if not samples:
        raise DataError(f"split {split!r} under {data_dir} yields no samples of kinds {tuple(kinds)}")
    return samples


def dataset_fingerprint(data_dir: str | Path, split: str) -> str:
    """sha256 over the rows of a logical split (file order; images by their hash). Independent of how the
    Parquet file was encoded, so re-writing the same rows keeps the fingerprint."""
    return rows_fingerprint(split_rows(data_dir, split))


# ---------------------------------------------------------------------------------------------------------
# The layout
# ---------------------------------------------------------------------------------------------------------


class MllmuLayout(Layout):
    """MLLMU-Bench's folders (forget_K, retain_(100-K), Test_Set, Retain_Set, Full_Set), as the hub and the
    mini world hold them."""

    name = "mllmu"
    looks_for = "MLLMU-Bench's layout (forget_K/, Test_Set/, Retain_Set/ folders)"
    roles = ("forget", "test", "retain", "real")
    reverse_roles = ("forget", "test")  # Vgid Table 6 attacks the forget and test sets
    has_exemplars = True

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any(root.glob("forget_*")) or any((root / folder).is_dir() for folder in HUB_FOLDERS)

    def split_names(self, forget_split: str) -> dict[str, str]:
        self._checked(forget_split)
        try:
            return split_names(forget_split)
        except ValueError as error:
            raise DataError(f"{error} ({self.root} is in MLLMU-Bench's layout)") from None

    def unlearning_samples(self, split: str, kinds: tuple[str, ...]) -> list[QASample]:
        return load_unlearning_samples(self.root, self._checked(split), kinds)

    def eval_items(self, split: str) -> EvalItems:
        return load_eval_items(self.root, self._checked(split))

    def split_files(self, split: str) -> list[Path]:
        folders = [folder for folder in resolve_split(self._checked(split)) if folder]
        return [file for folder in folders for file in split_files(self.root, folder)]

    def _checked(self, split: str) -> str:
        try:
            resolve_split(split)
        except DataError as error:
            if is_clear_config(split):
                raise DataError(
                    f"split {split!r} is a CLEAR name, but {self.root} is in MLLMU-Bench's layout (forget_K, "
                    "retain_K, test_K, real, ...): use e.g. forget_10, or data_format: clear for CLEAR data"
                ) from None
            raise DataError(f"{error} ({self.root} is in MLLMU-Bench's layout)") from None
        return split
