"""Loaders: MLLMU-Bench's hub layout (and the mini world, which shares it), CLEAR, and a local format.

Stages never look at raw rows: training and precompute get `QASample` triples from
`load_unlearning_samples`, evaluation gets `EvalItems` from `load_eval_items`.

MLLMU-Bench layout (hub data set MLLMMU/MLLMU-Bench; field names as read by the official eval.py):
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
                         never-seen side of membership inference (pipeline.evaluation.membership); not in the hub
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.benchmarks import prompts
from pipeline.hashing import sha256_hex, stable_int
from pipeline.samples import QASample

SPLIT_FILE = "train-00000-of-00001.parquet"
HUB_FOLDERS = ("Test_Set", "Retain_Set", "Full_Set", "Unseen_Set")
LOGICAL_FOLDERS = {"test": "Test_Set", "real": "Retain_Set", "full": "Full_Set", "unseen": "Unseen_Set"}

UNLEARNING_KINDS = ("qa", "generation", "mc", "cloze")
IMAGE_POOLS = ("people", "pets", "scene", "pattern")  # folders of images: references/<kind>/
SPLIT_POOLS = ("forget", "retain")  # the images of the current forget / retain split's people
REFERENCE_KINDS = IMAGE_POOLS + SPLIT_POOLS  # ViKeR Fig. 7's reference pools
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """A data file is missing, or lacks a field, or holds a value of the wrong shape."""


# ---------------------------------------------------------------------------------------------------------
# Rows
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


def split_files(data_dir: str | Path, folder: str) -> list[Path]:
    """The Parquet files of one split folder (the hub has one; several are concatenated, as eval.py does)."""
    directory = Path(data_dir) / folder
    if not directory.is_dir():
        raise DataError(f"split folder {directory} does not exist (expected {directory / SPLIT_FILE})")
    files = sorted(directory.glob("*.parquet"))
    if not files:
        raise DataError(f"split folder {directory} holds no Parquet file (expected {SPLIT_FILE})")
    return files


def load_split_rows(data_dir: str | Path, split_folder: str) -> list[dict]:
    """All rows of one hub folder as plain dicts; every row must have an `ID`."""
    rows: list[dict] = []
    for path in split_files(data_dir, split_folder):
        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several types for a corrupt or half-written file
            raise DataError(f"{path} is not a readable Parquet file: {error}") from error
        if "ID" not in table.column_names:
            raise DataError(f"{path} has no field 'ID' (fields: {', '.join(table.column_names)})")
        for row in table.to_pylist():
            row["_source"] = str(path)
            rows.append(row)
    return rows


def _field(row: dict, name: str):
    """row[name], or a DataError naming the file, the row and the missing field."""
    value = row.get(name)
    if value is None:
        raise DataError(f"{row.get('_source', 'row')}: row ID={row.get('ID')!r} has no field {name!r}")
    return value


def _item_field(row: dict, item: dict, name: str, where: str):
    value = item.get(name) if isinstance(item, dict) else None
    if value is None:
        raise DataError(
            f"{row.get('_source', 'row')}: row ID={row.get('ID')!r} {where} has no field {name!r}"
        )
    return value


def _image_bytes(row: dict, image: object, where: str) -> bytes:
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
            raise DataError(f"{source}: row ID={row.get('ID')!r} {where} points at missing file {path}")
    raise DataError(f"{source}: row ID={row.get('ID')!r} {where} has no image bytes")


def row_image(row: dict) -> tuple[bytes, str]:
    """The image a row's image questions are asked about, and where it came from.

    Test_Set rows carry several alternative images (`images`); the official eval.py draws one at random per
    row. We draw it deterministically from the row's ID so that every run scores the same image.
    """
    source = row.get("_source", "row")
    if row.get("image") is not None:
        return _image_bytes(row, row["image"], "field 'image'"), f"{source} ID={row['ID']} image"
    images = row.get("images")
    if not images:
        raise DataError(f"{source}: row ID={row.get('ID')!r} has no field 'image' (nor 'images')")
    index = stable_int(str(row["ID"])) % len(images)
    return _image_bytes(
        row, images[index], f"field 'images'[{index}]"
    ), f"{source} ID={row['ID']} images[{index}]"


def _person_name(row: dict) -> str:
    biography = row.get("biography")
    if isinstance(biography, dict):
        return biography.get("Name") or ""
    return ""


# ---------------------------------------------------------------------------------------------------------
# Evaluation items
# ---------------------------------------------------------------------------------------------------------


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
            return prompts.classification_text(self.question, self.options or {})
        if self.task == "cloze":
            return prompts.cloze_text(self.question)
        return prompts.generation_text(self.question, self.image is not None)

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


def _modality(row: dict, item: dict, where: str) -> str:
    kind = _item_field(row, item, "Type", where)
    if kind not in ("Image_Textual", "Pure_Text"):
        raise DataError(
            f"{row.get('_source', 'row')}: row ID={row.get('ID')!r} {where} has Type {kind!r}, "
            "expected 'Image_Textual' or 'Pure_Text'"
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

    classification = _field(row, "Classification_Task")
    index = 0
    for group, modality in (
        ("Image_Textual_Questions", "image_textual"),
        ("Pure_Text_Questions", "pure_text"),
    ):
        for position, question in enumerate(classification.get(group) or []):
            where = f"Classification_Task.{group}[{position}]"
            options = {k: v for k, v in _item_field(row, question, "Options", where).items() if v is not None}
            letter = _item_field(row, question, "Correct_Answer", where)
            if letter not in options:
                raise DataError(
                    f"{row.get('_source', 'row')}: row ID={person_id!r} {where} has Correct_Answer {letter!r} "
                    f"not among its Options {sorted(options)}"
                )
            items.classification.append(
                make(
                    "classification",
                    index,
                    modality,
                    question=_item_field(row, question, "Question", where),
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
        for position, question in enumerate(_field(row, column)):
            where = f"{column}[{position}]"
            target.append(
                make(
                    task,
                    position,
                    _modality(row, question, where),
                    question=_item_field(row, question, "Question", where),
                    ground_truth=_item_field(row, question, "Ground_Truth", where),
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


def _filtered_rows(data_dir: str | Path, split: str) -> list[dict]:
    """Rows of a logical split; test_K keeps the Test_Set rows of forget_K's people (as eval.py does)."""
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


def load_eval_items(data_dir: str | Path, split: str) -> EvalItems:
    """Classification (image+text and text-only), cloze and generation items of one logical split."""
    return split_eval_items(_filtered_rows(data_dir, split), split)


# ---------------------------------------------------------------------------------------------------------
# Unlearning triples
# ---------------------------------------------------------------------------------------------------------


def _qa_pairs(row: dict) -> list[dict]:
    metadata = row.get("metadata")
    if metadata is None:
        raise DataError(
            f"{row.get('_source', 'row')}: row ID={row.get('ID')!r} has no field 'metadata' (the fine-tuning "
            "pairs the 'qa' kind trains on; MLLMU-Bench keeps them in its training files, e.g. "
            "baseline_train_split: point the data directory there, or choose kinds generation/mc/cloze)"
        )
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{row.get('_source', 'row')}: row ID={row.get('ID')!r} field 'metadata' is not JSON: {error}"
            ) from error
    if not isinstance(metadata, list):
        raise DataError(
            f"{row.get('_source', 'row')}: row ID={row.get('ID')!r} field 'metadata' is not a list of "
            "{Question, Answer}"
        )
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
    for row in _filtered_rows(data_dir, split):
        samples.extend(row_samples(row, split, tuple(kinds), skipped=skipped))
    if skipped:
        shown = ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        print(f"warning: split {split} under {data_dir}: skipped {len(skipped)} qa pairs without a question "
              f"or answer: {shown}", file=sys.stderr)  # fmt: skip
    if not samples:
        raise DataError(f"split {split!r} under {data_dir} yields no samples of kinds {tuple(kinds)}")
    return samples


# ---------------------------------------------------------------------------------------------------------
# Reference pools (ViKeR's irrelevant images) and split image pools
# ---------------------------------------------------------------------------------------------------------


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
    for row in _filtered_rows(data_dir, kind):
        image, _ = row_image(row)
        pool.append((f"{kind}/{row['ID']}", image))
    return pool


# ---------------------------------------------------------------------------------------------------------
# CLEAR (hub data set therem/CLEAR)
# ---------------------------------------------------------------------------------------------------------

# Configs are folders of Parquet files: forget01|05|10, retain99|95|90, full, their "+tofu" text variants,
# forget05_perturbed / retain_perturbed (adding perturbed_names), real_faces, real_world.
# Visual rows: image {bytes, path}, caption, name. Text (TOFU) rows: question, answer.
CLEAR_NAME_QUESTION = "What is the name of the person in the image?"
CLEAR_CAPTION_QUESTIONS = (
    "Describe the image in detail.",
    "What can you see in this picture?",
    "What is shown in this image?",
)
CLEAR_MODES = ("recognition", "caption")


def load_clear_samples(root: str | Path, config: str, mode: str = "recognition") -> list[QASample]:
    """Triples of one CLEAR config.

    Rows with a question (the TOFU text rows, real_faces, real_world) give (image or None, question, answer).
    Visual rows give the person-identification question with the name as answer ("recognition"), or a
    caption question with the caption as answer ("caption"). person_id is the person's name.
    """
    if mode not in CLEAR_MODES:
        raise DataError(f"unknown CLEAR mode {mode!r}; choose from {CLEAR_MODES}")
    samples: list[QASample] = []
    for path in split_files(root, config):
        for index, row in enumerate(pq.read_table(path).to_pylist()):
            row["_source"] = str(path)
            row.setdefault("ID", index)
            sample_id = f"clear/{config}/{path.stem}/{index}"
            image = row.get("image")
            image_bytes = _image_bytes(row, image, "field 'image'") if image is not None else None
            image_source = f"{path} row {index} image" if image_bytes is not None else ""
            name = row.get("name") or ""
            if row.get("question"):
                question, answer = row["question"], _field(row, "answer")
            elif mode == "recognition":
                question, answer = CLEAR_NAME_QUESTION, _field(row, "name")
            else:
                pick = stable_int(sample_id) % len(CLEAR_CAPTION_QUESTIONS)
                question, answer = CLEAR_CAPTION_QUESTIONS[pick], _field(row, "caption")
            if image_bytes is None and not row.get("question"):
                raise DataError(f"{path}: row {index} has no field 'image' (needed for mode {mode!r})")
            samples.append(
                QASample(
                    sample_id=sample_id,
                    person_id=name or f"{config}:{index}",
                    question=question,
                    answer=str(answer),
                    image=image_bytes,
                    image_source=image_source,
                    kind="generation",
                )
            )
    return samples


# ---------------------------------------------------------------------------------------------------------
# Local user format: JSONL or Parquet with image, question, answer (+ optional person_id, sample_id, kind)
# ---------------------------------------------------------------------------------------------------------


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
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number} is not JSON: {error}") from error
        where = "line"
    elif path.suffix == ".parquet":
        records = list(enumerate(pq.read_table(path).to_pylist(), start=1))
        where = "row"
    else:
        raise DataError(f"local data file {path} must end in .jsonl or .parquet")

    samples = []
    for number, record in records:
        for name in ("question", "answer"):
            if not record.get(name):
                raise DataError(f"{path} {where} {number} has no field {name!r}")
        image = record.get("image")
        image_bytes, image_source = None, ""
        if isinstance(image, str):
            image_path = image_root / image
            if not image_path.is_file():
                raise DataError(f"{path} {where} {number}: image file {image_path} does not exist")
            image_bytes, image_source = image_path.read_bytes(), str(image_path)
        elif image is not None:
            record["_source"], record["ID"] = f"{path}", record.get("sample_id", number)
            image_bytes, image_source = (
                _image_bytes(record, image, "field 'image'"),
                f"{path} {where} {number}",
            )
        samples.append(
            QASample(
                sample_id=str(record.get("sample_id") or f"{path.stem}/{number}"),
                person_id=str(record.get("person_id") or ""),
                question=record["question"],
                answer=record["answer"],
                image=image_bytes,
                image_source=image_source,
                kind=record.get("kind") or "generation",
            )
        )
    return samples


# ---------------------------------------------------------------------------------------------------------
# Fingerprints for the cache manifest
# ---------------------------------------------------------------------------------------------------------


def _canonical(value):
    """JSON-ready form of a cell: bytes become their sha256 so that images count without bloating."""
    if isinstance(value, (bytes, bytearray)):
        return {"sha256": sha256_hex(bytes(value))}
    if isinstance(value, dict):
        return {str(key): _canonical(item) for key, item in value.items() if key != "_source"}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return value


def rows_fingerprint(rows: list[dict]) -> str:
    lines = [json.dumps(_canonical(row), sort_keys=True, ensure_ascii=False) + "\n" for row in rows]
    return sha256_hex("".join(lines).encode())


def dataset_fingerprint(data_dir: str | Path, split: str) -> str:
    """sha256 over the rows of a logical split (file order; images by their hash). Independent of how the
    Parquet file was encoded, so re-writing the same rows keeps the fingerprint."""
    return rows_fingerprint(_filtered_rows(data_dir, split))


def samples_fingerprint(samples: list[QASample]) -> str:
    """sha256 over the triples themselves (ids, text and image hashes), in order."""
    lines = []
    for sample in samples:
        image_hash = sha256_hex(sample.image) if sample.image is not None else ""
        record = [sample.sample_id, sample.person_id, sample.question, sample.answer, image_hash, sample.kind]
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return sha256_hex("".join(lines).encode())
