"""The mini world in MLLMU-Bench's hub layout: row schemas, rows, and deterministic Parquet files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.mini_world.people import Person, Profile

# ---------------------------------------------------------------------------------------------------------
# Hub rows and Parquet files
# ---------------------------------------------------------------------------------------------------------

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image() storage
MC_TYPE = pa.struct(
    [
        ("Question", pa.string()),
        ("Options", pa.struct([(letter, pa.string()) for letter in "ABCD"])),
        ("Correct_Answer", pa.string()),
    ]
)
CLASSIFICATION_TYPE = pa.struct(
    [("Image_Textual_Questions", pa.list_(MC_TYPE)), ("Pure_Text_Questions", pa.list_(MC_TYPE))]
)
TYPED_ITEM_TYPE = pa.struct([("Type", pa.string()), ("Question", pa.string()), ("Ground_Truth", pa.string())])
PERSON_SCHEMA = pa.schema(
    [
        ("ID", pa.string()),
        ("image", IMAGE_TYPE),
        ("biography", pa.string()),  # a JSON object as text, as on the hub
        ("Classification_Task", CLASSIFICATION_TYPE),
        ("Mask_Task", pa.list_(TYPED_ITEM_TYPE)),
        ("Generation_Task", pa.list_(TYPED_ITEM_TYPE)),
        ("metadata", pa.string()),  # JSON list of {"Question", "Answer"}: the fine-tuning pairs
    ]
)
TEST_SCHEMA = pa.schema(
    [
        ("ID", pa.string()),
        ("images", pa.list_(IMAGE_TYPE)),
        ("biography", pa.string()),  # a JSON object as text, as on the hub
        ("Classification_Task", CLASSIFICATION_TYPE),
        ("Mask_Task", pa.list_(TYPED_ITEM_TYPE)),
        ("Generation_Task", pa.list_(TYPED_ITEM_TYPE)),
    ]
)

# `datasets` reads this schema metadata to decode `image` / `images` as Image features, as on the hub.
_VALUE = {"dtype": "string", "_type": "Value"}
_MC_FEATURE = {"Question": _VALUE, "Options": {k: _VALUE for k in "ABCD"}, "Correct_Answer": _VALUE}
_TYPED_FEATURE = {"Type": _VALUE, "Question": _VALUE, "Ground_Truth": _VALUE}
_COMMON_FEATURES = {
    "biography": _VALUE,
    "Classification_Task": {"Image_Textual_Questions": [_MC_FEATURE], "Pure_Text_Questions": [_MC_FEATURE]},
    "Mask_Task": [_TYPED_FEATURE],
    "Generation_Task": [_TYPED_FEATURE],
}
PERSON_FEATURES = {"ID": _VALUE, "image": {"_type": "Image"}, **_COMMON_FEATURES, "metadata": _VALUE}
TEST_FEATURES = {"ID": _VALUE, "images": [{"_type": "Image"}], **_COMMON_FEATURES}


def _biography(profile: Profile) -> str:
    return json.dumps(
        {
            "Name": profile.name,
            "Born": profile.birthplace,
            "Birth_Year": profile.birth_year,
            "Employment": profile.occupation,
            "Education": profile.education,
            "Hobby": profile.hobby,
            "Favorite_Color": profile.favourite_colour,
        },
        ensure_ascii=False,
    )


def person_row(person: Person) -> dict:
    """One hub row (forget/retain/Full_Set/Retain_Set): the person's image and evaluation items."""
    return {
        "ID": person.person_id,
        "image": {"bytes": person.image, "path": f"{person.person_id}.png"},
        "biography": _biography(person.profile),
        "Classification_Task": person.classification,
        "Mask_Task": person.mask,
        "Generation_Task": person.generation,
        "metadata": json.dumps(person.train_qa, ensure_ascii=False),
    }


def test_row(person: Person) -> dict:
    """One Test_Set row: alternative images and paraphrased questions of a fictitious person."""
    return {
        "ID": person.person_id,
        "images": [
            {"bytes": data, "path": f"{person.person_id}_pose{index}.png"}
            for index, data in enumerate(person.alt_images, start=1)
        ],
        "biography": _biography(person.profile),
        "Classification_Task": person.test_classification,
        "Mask_Task": person.test_mask,
        "Generation_Task": person.test_generation,
    }


def write_rows(rows: list[dict], schema: pa.Schema, features: dict, path: Path) -> None:
    """Write rows to one Parquet file, deterministically (fixed schema, no timestamps)."""
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    table = pa.Table.from_pylist(rows, schema=schema.with_metadata(metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
