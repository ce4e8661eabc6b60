"""The mini world generator: deterministic, MLLMU-Bench-shaped, splits by person, recognisable images."""

from __future__ import annotations

import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from builders import reduced_config
from PIL import Image

from pipeline.benchmarks.rows import SPLIT_FILE
from pipeline.mini_world import drawing, people
from pipeline.mini_world.config import WorldConfig
from pipeline.mini_world.people import ATTRIBUTE_VOCABULARY
from pipeline.mini_world.world import build_world, forget_size, write_world

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_FIELDS = ("ID", "image", "biography", "Classification_Task", "Mask_Task", "Generation_Task")


@pytest.fixture(scope="module")
def world():
    return build_world(reduced_config())


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    first = write_world(tmp_path_factory.mktemp("world_a"), reduced_config())
    second = write_world(tmp_path_factory.mktemp("world_b"), reduced_config())
    other_seed = write_world(tmp_path_factory.mktemp("world_c"), reduced_config(seed=1))
    return first, second, other_seed


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_same_seed_gives_same_bytes_and_another_seed_differs(written):
    first, second, other_seed = written
    assert first.file_sha256 == second.file_sha256
    parquet_files = [name for name in first.file_sha256 if name.endswith(".parquet")]
    assert len(parquet_files) == 10  # forget/retain x3, Test_Set, Full_Set, Retain_Set, Unseen_Set
    differing = [name for name in parquet_files if first.file_sha256[name] != other_seed.file_sha256[name]]
    assert differing == parquet_files


def test_hub_layout_and_data_card(written):
    info = written[0]
    data_dir = Path(info.data_dir)
    expected = {"forget_5", "forget_10", "forget_15", "retain_95", "retain_90", "retain_85"}
    expected |= {"Test_Set", "Retain_Set", "Full_Set", "Unseen_Set"}
    assert {path.parent.name for path in data_dir.glob(f"*/{SPLIT_FILE}")} == expected
    card = (data_dir / "DATA_CARD.md").read_text()
    for folder in expected:
        assert f"`{folder}`" in card
    assert "metadata" in card and "Unlearning triples" in card


def test_schema_matches_the_official_field_types(written):
    """Our rows carry the official fields with exactly the types of the hand-written official fixture."""
    data_dir = Path(written[0].data_dir)
    official = pq.read_schema(FIXTURES / "mllmu_bench" / "forget_5" / SPLIT_FILE)
    official_test = pq.read_schema(FIXTURES / "mllmu_bench" / "Test_Set" / SPLIT_FILE)
    for folder in ("forget_10", "retain_90", "Full_Set", "Retain_Set"):
        ours = pq.read_schema(data_dir / folder / SPLIT_FILE)
        for name in OFFICIAL_FIELDS:
            assert ours.field(name).type == official.field(name).type, (folder, name)
    ours_test = pq.read_schema(data_dir / "Test_Set" / SPLIT_FILE)
    for name in ("ID", "images", "biography", "Classification_Task", "Mask_Task", "Generation_Task"):
        assert ours_test.field(name).type == official_test.field(name).type, name
    assert "image" not in ours_test.names


def test_splits_are_disjoint_by_person_and_sized_as_the_benchmark(world):
    fictitious = {person.person_id for person in world.group("fictitious")}
    real = {person.person_id for person in world.group("real")}
    reference = {person.person_id for person in world.group("reference")}
    assert len(fictitious) == 20 and len(real) == 4 and len(reference) == 4
    for ratio in (5, 10, 15):
        forget = set(world.splits[f"forget_{ratio}"])
        retain = set(world.splits[f"retain_{100 - ratio}"])
        assert len(forget) == forget_size(20, ratio)
        assert not forget & retain
        assert forget | retain == fictitious
    assert set(world.splits["Full_Set"]) == fictitious
    assert set(world.splits["Test_Set"]) == fictitious  # every forget set's people are in the Test_Set
    assert set(world.splits["Retain_Set"]) == real
    # Reference people are in no training split; their QA is the never-seen side of membership inference.
    assert set(world.splits["Unseen_Set"]) == reference
    trained = [ids for folder, ids in world.splits.items() if folder != "Unseen_Set"]
    assert not reference & set().union(*map(set, trained))
    # Their facts may match trained ones word for word (templated answers); their images never do.
    trained_images = {sample.image for sample in world.samples()}
    assert all(person.train_qa and person.image not in trained_images for person in world.group("reference"))


def test_default_world_has_the_required_sizes_and_a_modest_vocabulary():
    world = build_world(WorldConfig())
    assert len(world.group("fictitious")) >= 100
    assert len(world.group("real")) == 20 and len(world.group("reference")) == 20
    assert [len(world.splits[f"forget_{ratio}"]) for ratio in (5, 10, 15)] == [5, 10, 15]
    words = set()
    for text in world.text_corpus():
        words.update(re.findall(r"[A-Za-z]+|\d+", text))
    assert 150 < len(words) < 400
    names = [person.profile.name for person in world.people]
    assert len(set(names)) == len(names)
    first_names = [name.split()[0] for name in names]
    assert len(set(first_names)) == len(first_names), "a first name identifies its person"
    # values are shared across people (small vocabularies), as key tokens should be
    assert len({person.profile.birthplace for person in world.group("fictitious")}) <= len(people.CITIES)


def test_worlds_beyond_the_first_names_get_distinct_full_names():
    names = [person.profile.name for person in build_world(reduced_config(num_people=160)).people]
    assert len(names) > len(people.FIRST_NAMES)
    assert len(set(names)) == len(names)


def test_images_decode_are_distinct_and_alternatives_are_recognisable_at_32px(world):
    people = world.group("fictitious") + world.group("real") + world.group("reference")
    portraits = [decode(person.image) for person in people]
    assert all(image.size == (64, 64) and image.mode == "RGB" for image in portraits)
    assert len({person.image for person in people}) == len(people)
    appearances = [person.appearance for person in people]
    distances = [
        drawing._feature_distance(a, b) for i, a in enumerate(appearances) for b in appearances[i + 1 :]
    ]
    assert min(distances) >= 2

    def small(data: bytes) -> np.ndarray:
        return np.asarray(decode(data).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.float32)

    gallery = np.stack([small(person.image).ravel() for person in people])
    hits = total = 0
    for index, person in enumerate(world.group("fictitious")):
        assert len(person.alt_images) == 2
        for alternative in person.alt_images:
            assert alternative != person.image
            nearest = ((gallery - small(alternative).ravel()) ** 2).sum(axis=1).argmin()
            hits += int(nearest == index)
            total += 1
    assert hits / total >= 0.9  # even raw pixels at 32x32 tell the identity apart


def test_questions_have_the_three_forms_in_both_modalities(world):
    for person in world.group("fictitious"):
        name = person.profile.name
        image_mc = person.classification["Image_Textual_Questions"]
        text_mc = person.classification["Pure_Text_Questions"]
        assert len(image_mc) == 1 + len(ATTRIBUTE_VOCABULARY) and len(text_mc) == len(ATTRIBUTE_VOCABULARY)
        for item in image_mc + text_mc:
            assert sorted(item["Options"]) == ["A", "B", "C", "D"]
            assert len(set(item["Options"].values())) == 4
            assert item["Correct_Answer"] in "ABCD"
        assert all("this person" in item["Question"] for item in image_mc)
        assert all(name in item["Question"] for item in text_mc)
        correct = [item["Options"][item["Correct_Answer"]] for item in text_mc]
        assert correct == [getattr(person.profile, attribute) for attribute in ATTRIBUTE_VOCABULARY]
        assert {item["Type"] for item in person.mask} == {"Image_Textual", "Pure_Text"}
        for item in person.mask:
            assert "__" in item["Question"]
            assert item["Ground_Truth"] not in item["Question"]
        assert {item["Type"] for item in person.generation} == {"Image_Textual", "Pure_Text"}
        for item in person.generation:  # template tokens mixed with two key attribute tokens
            assert item["Ground_Truth"].endswith(".") and " and " in item["Ground_Truth"]
        # the Test_Set paraphrases the questions but keeps the answers
        assert [i["Question"] for i in person.test_generation] != [i["Question"] for i in person.generation]
        assert [i["Ground_Truth"] for i in person.test_generation] == [
            i["Ground_Truth"] for i in person.generation
        ]
        assert [i["Ground_Truth"] for i in person.test_mask] == [i["Ground_Truth"] for i in person.mask]


def test_training_pairs_state_every_attribute_with_the_image(world):
    person = world.group("fictitious")[3]
    answers = " ".join(pair["Answer"] for pair in person.train_qa)
    assert person.profile.name in answers
    for attribute in ATTRIBUTE_VOCABULARY:
        assert getattr(person.profile, attribute) in answers
    samples = world.samples()
    assert len({sample.sample_id for sample in samples}) == len(samples)
    per_person = 7 + 4 + 13 + 13  # qa + generation + multiple choice + cloze
    assert len(samples) == per_person * (len(world.group("fictitious")) + len(world.group("real")))
    assert not {sample.person_id for sample in samples} & {p.person_id for p in world.group("reference")}


def test_reference_pools_are_written_and_decode(written):
    info = written[0]
    assert info.reference_counts == {"people": 4, "pets": 3, "scene": 3, "pattern": 3}
    for kind, count in info.reference_counts.items():
        files = sorted((Path(info.references_dir) / kind).glob("*.png"))
        assert len(files) == count
        assert all(decode(path.read_bytes()).size == (64, 64) for path in files)


def test_config_is_validated():
    with pytest.raises(ValueError, match="num_people"):
        WorldConfig(num_people=1)
    with pytest.raises(ValueError, match="forget ratios"):
        replace(reduced_config(), forget_ratios=(0,))


def test_answers_are_phrased_per_person_and_another_persons_answer_scores_low(world):
    from pipeline.mini_world.people import Phrasing
    from pipeline.mini_world.text import IMAGE_SUBJECTS, answer_sentence, clause_template

    fictitious = world.group("fictitious")
    assert len({person.phrasing for person in fictitious}) > len(fictitious) // 2
    for person in fictitious:
        # One wording per person: the profile QA and the generation answers state a fact the same way.
        birthplace = clause_template(person.phrasing, "birthplace").format(v=person.profile.birthplace)
        assert any(birthplace in pair["Answer"] for pair in person.train_qa)
        image_answers = [
            item["Ground_Truth"] for item in person.generation if item["Type"] == "Image_Textual"
        ]
        assert all(answer.startswith(IMAGE_SUBJECTS[person.phrasing.subject]) for answer in image_answers)
    # The same facts in another wording share few words with the truth; the world as a whole stays under
    # the faithful-mini-world goal of 0.5 (the default world's figure is in the data card).
    first = fictitious[0]
    other = Phrasing(
        subject=(first.phrasing.subject + 1) % 4,
        conjunction=(first.phrasing.conjunction + 1) % 3,
        name_answer=(first.phrasing.name_answer + 1) % 4,
        clauses=tuple((index + 1) % 4 for index in first.phrasing.clauses),
    )
    pair = ("birthplace", "occupation")
    own, reworded = (answer_sentence(first.profile, p, pair, True) for p in (first.phrasing, other))
    assert own != reworded and first.profile.birthplace in reworded
    assert world.cross_person_rouge_l() <= 0.5
    default = build_world(WorldConfig())
    assert default.cross_person_rouge_l() <= 0.5


def test_training_wordings_paraphrase_the_rows_but_never_use_the_test_sets(world):
    from pipeline.mini_world.text import training_wordings

    person = world.group("fictitious")[0]
    test_questions = {
        item["Question"]
        for item in person.test_generation
        + person.test_mask
        + person.test_classification["Image_Textual_Questions"]
        + person.test_classification["Pure_Text_Questions"]
    }
    rows = person.train_qa + person.mask + person.generation
    for item in rows:
        wordings = training_wordings(item["Question"])
        assert wordings[0] == item["Question"] and len(wordings) >= 2
        assert not set(wordings) & test_questions
        if person.profile.name in item["Question"]:  # a text question keeps its subject
            assert all(person.profile.name in wording for wording in wordings)
    assert training_wordings("A question from another data set?") == ["A question from another data set?"]


def test_image_multiple_choice_is_never_asked_in_a_profile_qa_wording(world):
    """MC is trained with the bare value as its answer: in a QA prompt's wording it would give that prompt
    two answers and make the QA answer's first token uncertain (issue 31)."""
    from pipeline.mini_world.people import ATTRIBUTES
    from pipeline.mini_world.text import training_wordings

    people = world.group("fictitious") + world.group("real")
    qa_wordings = {
        w for person in people for item in person.train_qa for w in training_wordings(item["Question"])
    }
    for person in people:
        image_mc = person.classification["Image_Textual_Questions"]
        assert len(image_mc) == len(person.train_qa) == 1 + len(ATTRIBUTES)  # one per attribute, name too
        for item in image_mc:
            wordings = training_wordings(item["Question"])
            assert len(wordings) >= 2  # its own paraphrases for the fine-tune
            assert not set(wordings) & qa_wordings, (person.person_id, item["Question"])
    # The Test_Set asks an unseen paraphrase of the MC wording (a QA-like wording measured 0.47, issue 31).
    for person in world.group("fictitious"):
        for item, test_item in zip(
            person.classification["Image_Textual_Questions"],
            person.test_classification["Image_Textual_Questions"],
            strict=True,
        ):
            assert test_item["Question"] not in training_wordings(item["Question"]) + list(qa_wordings)
            assert test_item["Question"].startswith("Which of the following")
