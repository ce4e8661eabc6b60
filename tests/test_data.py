"""Each benchmark's loaders: MLLMU-Bench's layout (mini world and official-schema fixtures), CLEAR, the
local format, the reference pools and the fingerprints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from builders import reduced_config

from pipeline.benchmarks import DataError, load_reference_pool, prompts, samples_fingerprint
from pipeline.benchmarks.clear import CLEAR_CAPTION_QUESTIONS, CLEAR_NAME_QUESTION, load_clear_samples
from pipeline.benchmarks.local import load_local_samples
from pipeline.benchmarks.mllmu import (
    dataset_fingerprint,
    load_eval_items,
    load_split_rows,
    load_unlearning_samples,
    split_eval_items,
)
from pipeline.benchmarks.rows import SPLIT_FILE
from pipeline.mini_world.world import build_world, write_world

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_world(out, reduced_config())
    return out


@pytest.fixture(scope="module")
def world():
    return build_world(reduced_config())


def test_unlearning_samples_default_to_the_official_metadata_pairs(world_dir, world):
    samples = load_unlearning_samples(world_dir / "data", "forget_10")
    forget_ids = world.splits["forget_10"]
    assert {sample.person_id for sample in samples} == set(forget_ids)
    assert len(samples) == 7 * len(forget_ids)
    for sample in samples:
        person = world.person(sample.person_id)
        assert sample.image == person.image  # every pair is shown with the person's portrait
        assert {"Question": sample.question, "Answer": sample.answer} in person.train_qa
        assert sample.sample_id.startswith(f"forget_10/{sample.person_id}/qa/")


def test_other_kinds_turn_evaluation_items_into_triples(world_dir, world):
    samples = load_unlearning_samples(world_dir / "data", "retain_90", kinds=("generation", "mc", "cloze"))
    by_kind = {kind: [s for s in samples if s.kind == kind] for kind in ("generation", "mc", "cloze")}
    people = len(world.splits["retain_90"])
    assert [len(by_kind[k]) for k in ("generation", "mc", "cloze")] == [4 * people, 13 * people, 13 * people]
    assert {s.image is None for s in by_kind["generation"]} == {True, False}  # Pure_Text items have none
    assert all(s.answer in "ABCD" and "\nA: " in s.question for s in by_kind["mc"])
    assert all("[Blank]" in s.question and "__" not in s.question for s in by_kind["cloze"])
    with pytest.raises(DataError, match="unknown sample kinds"):
        load_unlearning_samples(world_dir / "data", "retain_90", kinds=("essay",))


def test_eval_items_of_forget_and_test_splits(world_dir, world):
    forget = load_eval_items(world_dir / "data", "forget_15")
    test = load_eval_items(world_dir / "data", "test_15")
    forget_ids = sorted(world.splits["forget_15"])
    assert forget.person_ids() == forget_ids and test.person_ids() == forget_ids
    assert len(forget) == len(test) == len(forget_ids) * (13 + 13 + 4)
    for item in forget.classification:
        assert item.options[item.correct_letter] == item.ground_truth
        assert item.prompt().endswith(prompts.MC_INSTRUCTION)
    assert {item.modality for item in forget.cloze} == {"image_textual", "pure_text"}
    for item in test.all():
        person = world.person(item.person_id)
        assert item.person_name == person.profile.name
        if item.modality == "image_textual":
            assert item.image in person.alt_images  # the generalization split shows another image
        else:
            assert item.image is None
    assert load_eval_items(world_dir / "data", "real").person_ids() == sorted(world.splits["Retain_Set"])
    assert len(load_eval_items(world_dir / "data", "test").person_ids()) == 20


def test_reference_pools(world_dir, world):
    for kind, count in (("people", 4), ("pets", 3), ("scene", 3), ("pattern", 3)):
        pool = load_reference_pool(world_dir, kind)
        assert len(pool) == count and all(image[:4] == b"\x89PNG" for _, image in pool)
    people_pool = {image for _, image in load_reference_pool(world_dir, "people")}
    assert people_pool == {person.image for person in world.group("reference")}
    forget_pool = load_reference_pool(world_dir, "forget", forget_ratio=10)
    assert [image_id for image_id, _ in forget_pool] == [
        f"forget_10/{pid}" for pid in world.splits["forget_10"]
    ]
    assert len(load_reference_pool(world_dir / "references", "pets")) == 3
    with pytest.raises(DataError, match="unknown split"):
        load_reference_pool(world_dir, "sunsets")


def test_fingerprints_follow_the_rows(world_dir, tmp_path):
    first = dataset_fingerprint(world_dir / "data", "forget_10")
    assert first == dataset_fingerprint(world_dir / "data", "forget_10")
    assert first != dataset_fingerprint(world_dir / "data", "forget_5")
    # the same rows re-encoded give the same fingerprint; one changed answer gives another
    table = pq.read_table(world_dir / "data" / "forget_10" / SPLIT_FILE)
    (tmp_path / "forget_10").mkdir()
    pq.write_table(table, tmp_path / "forget_10" / SPLIT_FILE, compression="snappy")
    assert dataset_fingerprint(tmp_path, "forget_10") == first
    rows = table.to_pylist()
    rows[0]["Generation_Task"][0]["Ground_Truth"] += " Indeed."
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "forget_10" / SPLIT_FILE)
    assert dataset_fingerprint(tmp_path, "forget_10") != first

    samples = load_unlearning_samples(world_dir / "data", "forget_5")
    changed = [dataclasses.replace(samples[0], answer="No."), *samples[1:]]
    assert samples_fingerprint(samples) == samples_fingerprint(list(samples))
    assert samples_fingerprint(changed) != samples_fingerprint(samples)


def test_errors_name_the_file_and_the_field(world_dir, tmp_path):
    with pytest.raises(DataError, match="forget_7"):
        load_split_rows(world_dir / "data", "forget_7")
    with pytest.raises(DataError, match="unknown split"):
        load_eval_items(world_dir / "data", "holdout")
    table = pq.read_table(world_dir / "data" / "forget_5" / SPLIT_FILE)
    broken = tmp_path / "forget_5" / SPLIT_FILE
    broken.parent.mkdir()
    pq.write_table(table.drop_columns(["Mask_Task"]), broken)
    with pytest.raises(DataError) as error:
        load_eval_items(tmp_path, "forget_5")
    assert str(broken) in str(error.value) and "'Mask_Task'" in str(error.value)
    pq.write_table(table.drop_columns(["ID"]), broken)
    with pytest.raises(DataError, match="no field 'ID'"):
        load_split_rows(tmp_path, "forget_5")
    broken.write_bytes(b"PAR1 half written")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_split_rows(tmp_path, "forget_5")


def test_official_schema_fixture_loads(tmp_path):
    bench = FIXTURES / "mllmu_bench"
    forget = load_eval_items(bench, "forget_5")
    assert forget.person_ids() == ["001"]
    # the hub's biography is a JSON string: the name REC looks for comes from it
    assert {item.person_name for item in forget.all()} == {"Mara Holt"}
    assert [item.ground_truth for item in forget.cloze] == ["Tallinn", "baker"]
    test = load_eval_items(bench, "test_5")
    assert test.person_ids() == ["001"] and test.classification[0].question.startswith("In which city")
    assert load_eval_items(bench, "real").person_ids() == ["101"]
    samples = load_unlearning_samples(FIXTURES / "mllmu_train", "forget_5")
    assert [s.answer for s in samples][1] == "This person was born in Tallinn."
    assert len(load_unlearning_samples(bench, "retain_95", kinds=("generation",))) == 4
    with pytest.raises(DataError, match="no field 'metadata'"):
        load_unlearning_samples(bench, "forget_5")
    # a Test_Set that lacks rows for the forget set's people is an error, not a smaller score
    (tmp_path / "Test_Set").mkdir()
    rows = pq.read_table(bench / "Test_Set" / SPLIT_FILE)
    pq.write_table(rows.filter(pc.not_equal(rows["ID"], "001")), tmp_path / "Test_Set" / SPLIT_FILE)
    (tmp_path / "forget_5").mkdir()
    pq.write_table(pq.read_table(bench / "forget_5" / SPLIT_FILE), tmp_path / "forget_5" / SPLIT_FILE)
    with pytest.raises(DataError, match="lacks rows for forget ids"):
        load_eval_items(tmp_path, "test_5")


def test_clear_loader():
    root = FIXTURES / "clear"
    recognition = load_clear_samples(root, "forget05")
    assert [s.question for s in recognition] == [CLEAR_NAME_QUESTION] * 2
    assert {s.answer for s in recognition} == {"Mara Holt"} == {s.person_id for s in recognition}
    assert all(s.image is not None for s in recognition)
    retain = load_clear_samples(root, "retain95")
    assert {s.person_id for s in retain} == {"Ivo Brenner", "Lene Strand"}
    captions = load_clear_samples(root, "forget05", mode="caption")
    assert all(s.answer.endswith("red wall.") and s.question in CLEAR_CAPTION_QUESTIONS for s in captions)
    assert len(load_clear_samples(root, "forget05_perturbed")) == 2
    text = load_clear_samples(root, "forget05+tofu")
    assert [s.image for s in text] == [None, None] and text[0].answer == "Mara Holt was born in Tallinn."
    with pytest.raises(DataError, match="forget01"):
        load_clear_samples(root, "forget01")


def test_local_format(tmp_path):
    jsonl = load_local_samples(FIXTURES / "local" / "samples.jsonl")
    parquet = load_local_samples(FIXTURES / "local" / "samples.parquet")
    for samples in (jsonl, parquet):
        assert [s.answer for s in samples] == ["This is Mara Holt.", "In Tallinn."]
        assert samples[0].image is not None and samples[1].image is None
        assert samples[0].pil_image().size == (8, 8)
    assert jsonl[0].image == parquet[0].image
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Who?", "image": "missing.png", "answer": "x"}) + "\n")
    with pytest.raises(DataError, match="missing.png"):
        load_local_samples(bad)
    bad.write_text(json.dumps({"question": "Who?"}) + "\n")
    with pytest.raises(DataError) as error:
        load_local_samples(bad)
    assert str(bad) in str(error.value) and "line 1" in str(error.value) and "'answer'" in str(error.value)


def test_biography_is_read_from_a_json_string_or_a_struct_and_refused_otherwise(tmp_path):
    """The hub's `biography` is a JSON string, the mini world's a struct: both name the person; anything
    else fails naming the file and the row."""
    table = pq.read_table(FIXTURES / "mllmu_bench" / "forget_5" / SPLIT_FILE)
    rows = table.to_pylist()
    as_struct = [{**row, "biography": json.loads(row["biography"])} for row in rows]
    assert {item.person_name for item in split_eval_items(as_struct, "forget_5").all()} == {"Mara Holt"}
    for bad, message in (("not json", "is not JSON"), ("[1, 2]", "is a list")):
        folder = tmp_path / bad.replace(" ", "_").strip("[]").replace(",", "") / "forget_5"
        folder.mkdir(parents=True)
        pq.write_table(
            table.set_column(table.schema.get_field_index("biography"), "biography", pa.array([bad])),
            folder / SPLIT_FILE,
        )
        with pytest.raises(DataError, match=message) as error:
            load_eval_items(folder.parent, "forget_5")
        assert str(folder / SPLIT_FILE) in str(error.value) and "ID='001'" in str(error.value)
