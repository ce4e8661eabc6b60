"""The embedded mini world: a small, deterministic, MLLMU-Bench-shaped data set of fictitious people.

Nothing can be downloaded here, so the project generates its own miniature of MLLMU-Bench
(Liu et al., 2024; hub data set MLLMMU/MLLMU-Bench) in the benchmark's exact on-disk layout, so that
the same loaders (pipeline.benchmarks.mllmu), stages and metrics run on it and on the real files:

    OUT/data/forget_5|forget_10|forget_15/train-00000-of-00001.parquet   forget people (by person)
    OUT/data/retain_95|retain_90|retain_85/...                           the other fictitious people
    OUT/data/Test_Set/...      every fictitious person: alternative images (`images`), paraphrased questions
    OUT/data/Retain_Set/...    the group standing for real celebrities (always retained)
    OUT/data/Full_Set/...      every fictitious person
    OUT/data/DATA_CARD.md
    OUT/references/people|pets|scene|pattern/*.png                      ViKeR's irrelevant-image pools

Each person has a profile of seven attributes (name, birthplace, occupation, hobby, birth year,
education, favourite colour) drawn from small vocabularies, so values are shared across people, and a
procedurally drawn portrait whose bold features (background, skin, hair colour and style, face shape,
shirt, accessory) form a combination unique to the person. Answers are built from templates, so they mix
"normal" template tokens with "key" attribute tokens ("This person was born in Lisbon and works as a
nurse."), as in ViKeR's Fig. 2.

Everything is a pure function of WorldConfig: the same seed gives the same bytes (PNG and Parquet).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.benchmarks.mllmu import row_samples, split_eval_items, split_ratio
from pipeline.benchmarks.rows import SPLIT_FILE
from pipeline.hashing import file_sha256
from pipeline.mini_world.config import WorldConfig
from pipeline.mini_world.drawing import (
    BOLD_FEATURES,
    _alt_jitter,
    _feature_distance,
    distinct_appearances,
    draw_pattern,
    draw_pet,
    draw_portrait,
    draw_scene,
)
from pipeline.mini_world.hub_files import (
    PERSON_FEATURES,
    PERSON_SCHEMA,
    TEST_FEATURES,
    TEST_SCHEMA,
    person_row,
    test_row,
    write_rows,
)
from pipeline.mini_world.people import (
    BIRTH_YEARS,
    CITIES,
    COLOURS,
    FIRST_NAMES,
    HOBBIES,
    LAST_NAMES,
    OCCUPATIONS,
    UNIVERSITIES,
    Appearance,
    Person,
    Profile,
)
from pipeline.mini_world.text import (
    CLAUSES,
    CONJUNCTIONS,
    IMAGE_MC_QUESTIONS,
    IMAGE_SUBJECTS,
    NAME_ANSWERS,
    TEST_IMAGE_MC_QUESTIONS,
    TEST_QUESTIONS,
    TRAINING_QUESTIONS,
    _questions,
    _train_qa,
    cross_person_rouge_l,
    draw_phrasing,
)
from pipeline.samples import QASample


@dataclass
class World:
    config: WorldConfig
    people: list[Person]
    splits: dict[str, list[str]]  # hub folder name -> person ids, e.g. "forget_10" -> ["004", ...]
    references: dict[str, list[tuple[str, bytes]]]  # pool kind -> [(image id, PNG bytes)]

    def person(self, person_id: str) -> Person:
        for person in self.people:
            if person.person_id == person_id:
                return person
        raise KeyError(f"no person with id {person_id!r} in the mini world")

    def group(self, group: str) -> list[Person]:
        return [person for person in self.people if person.group == group]

    def rows(self, folder: str) -> list[dict]:
        """The hub rows of one split folder, exactly as written to its Parquet file."""
        if folder == "Test_Set":
            return [test_row(self.person(pid)) for pid in self.splits[folder]]
        return [person_row(self.person(pid)) for pid in self.splits[folder]]

    def samples(
        self,
        kinds: tuple[str, ...] = ("qa", "generation", "mc", "cloze"),
        groups: tuple[str, ...] = ("fictitious", "real"),
    ) -> list[QASample]:
        """(image, question, answer) triples of the given groups, as pipeline.benchmarks.mllmu forms them from rows.

        The full model is fine-tuned on these (all splits, every task form) so that it memorizes everyone.
        """
        folders = {"fictitious": "Full_Set", "real": "Retain_Set"}
        samples: list[QASample] = []
        for group in groups:
            folder = folders[group]
            for row in self.rows(folder):
                samples.extend(row_samples(row, folder, kinds, source=f"mini world {folder}"))
        return samples

    def cross_person_rouge_l(self) -> float:
        """ROUGE-L of another fictitious person's fluent answer against the truth (text.cross_person_rouge_l)."""
        return cross_person_rouge_l(self.group("fictitious"))

    def text_corpus(self) -> list[str]:
        """Every piece of text the world contains (training, evaluation and test prompts and answers).

        The tiny model's tokenizer is trained on this, so no evaluated word is out of vocabulary.
        """
        texts: list[str] = []
        for folder in ("Full_Set", "Retain_Set", "Test_Set"):
            rows = self.rows(folder)
            if folder != "Test_Set":
                for row in rows:
                    for sample in row_samples(row, folder, ("qa", "generation", "mc", "cloze"), source=""):
                        texts.extend([sample.question, sample.answer])
            items = split_eval_items(rows, folder, source="")
            for item in items.all():
                texts.extend([item.prompt(), item.ground_truth])
                if item.options:
                    texts.extend(item.options.values())
        return texts


@dataclass(frozen=True)
class WorldInfo:
    """What write_world produced: where, how many, and a fingerprint of every written file."""

    out_dir: str
    data_dir: str
    references_dir: str
    config: dict
    splits: dict[str, list[str]]
    reference_counts: dict[str, int]
    file_sha256: dict[str, str]
    cross_person_rouge_l: float  # World.cross_person_rouge_l, as the data card states it


# ---------------------------------------------------------------------------------------------------------
# Building the world
# ---------------------------------------------------------------------------------------------------------


def _person_id(index: int) -> str:
    return f"{index:03d}"  # MLLMU-Bench ids are zero-padded strings ("001" ... "500")


def forget_size(num_people: int, ratio: int) -> int:
    """The official split size, int(ratio / 100 * N), but at least one person in a reduced world."""
    return max(1, int(ratio / 100 * num_people))


def _names(rng: random.Random, total: int) -> list[str]:
    """`total` distinct full names, drawn from the name vocabularies."""
    if total > len(FIRST_NAMES) * len(LAST_NAMES):
        raise ValueError(
            f"the name vocabulary holds {len(FIRST_NAMES) * len(LAST_NAMES)} people, asked {total}"
        )
    if total <= len(FIRST_NAMES):
        # Every person's first name is their own (surnames repeat): a name identifies one person, as a
        # celebrity's name does, while the multiple-choice name options stay plausible.
        return [f"{first} {rng.choice(LAST_NAMES)}" for first in rng.sample(FIRST_NAMES, total)]
    # larger worlds (benchmarks): distinct first-and-last-name pairs
    return rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], total)


def _person(
    index: int,
    name: str,
    appearance: Appearance,
    group: str,
    people_names: list[str],
    config: WorldConfig,
    rng: random.Random,
) -> Person:
    """Person `index`: profile and alternative images from the world's stream `rng`, phrasing and questions
    from streams of their own."""
    profile = Profile(
        name=name,
        birthplace=rng.choice(CITIES),
        occupation=rng.choice(OCCUPATIONS),
        hobby=rng.choice(HOBBIES),
        birth_year=rng.choice(BIRTH_YEARS),
        education=rng.choice(UNIVERSITIES),
        favourite_colour=rng.choice(COLOURS),
    )
    person = Person(
        person_id=_person_id(index),
        group=group,
        profile=profile,
        appearance=appearance,
        phrasing=draw_phrasing(random.Random(f"{config.seed}-{_person_id(index)}-phrasing")),
        image=draw_portrait(appearance, config.image_size),
    )
    if group == "fictitious":
        person.alt_images = tuple(
            draw_portrait(appearance, config.image_size, _alt_jitter(rng)) for _ in range(config.alt_images)
        )
    # Reference people get profile QA too, never trained on: membership inference's unseen side.
    person.train_qa = _train_qa(person)
    if group != "reference":
        _questions(person, people_names, random.Random(f"{config.seed}-{person.person_id}-mc"), test=False)
        if group == "fictitious":
            _questions(
                person, people_names, random.Random(f"{config.seed}-{person.person_id}-test"), test=True
            )
    return person


def _splits(config: WorldConfig, people: list[Person]) -> dict[str, list[str]]:
    """Hub folder name -> person ids, e.g. "forget_10" -> ["004", ...]."""
    fictitious = [person.person_id for person in people if person.group == "fictitious"]
    splits: dict[str, list[str]] = {}
    # As in the official data_split.py, each forget ratio is an independent random draw of whole
    # profiles (forget_5 is not a subset of forget_10); retain_(100-k) is the complement of forget_k.
    split_rng = random.Random(f"{config.seed}-splits")
    for ratio in config.forget_ratios:
        order = list(fictitious)
        split_rng.shuffle(order)
        forget = set(order[: forget_size(len(fictitious), ratio)])
        splits[f"forget_{ratio}"] = [pid for pid in fictitious if pid in forget]
        splits[f"retain_{100 - ratio}"] = [pid for pid in fictitious if pid not in forget]
    splits["Test_Set"] = list(fictitious)
    splits["Full_Set"] = list(fictitious)
    splits["Retain_Set"] = [person.person_id for person in people if person.group == "real"]
    splits["Unseen_Set"] = [person.person_id for person in people if person.group == "reference"]
    return splits


def _reference_pools(config: WorldConfig, people: list[Person]) -> dict[str, list[tuple[str, bytes]]]:
    """Pool kind -> [(image id, PNG bytes)]: the reference people's portraits and drawn pets, scenes and
    patterns."""
    references: dict[str, list[tuple[str, bytes]]] = {
        "people": [(f"people_{p.person_id}", p.image) for p in people if p.group == "reference"],
        "pets": [],
        "scene": [],
        "pattern": [],
    }
    pool_rng = random.Random(f"{config.seed}-pools")
    for kind, count, draw in (
        ("pets", config.num_pets, draw_pet),
        ("scene", config.num_scenes, draw_scene),
        ("pattern", config.num_patterns, draw_pattern),
    ):
        references[kind] = [
            (f"{kind}_{index:03d}", draw(pool_rng, config.image_size)) for index in range(count)
        ]
    return references


def build_world(config: WorldConfig = WorldConfig()) -> World:
    """Build every person, question, image and reference image; a pure function of the config."""
    rng = random.Random(config.seed)
    total = config.num_people + config.num_real + config.num_reference_people
    names = _names(rng, total)
    appearances = distinct_appearances(total, rng)
    groups = ["fictitious"] * config.num_people + ["real"] * config.num_real
    groups += ["reference"] * config.num_reference_people
    people_names = names[: config.num_people + config.num_real]
    people = [
        _person(index, name, appearance, group, people_names, config, rng)
        for index, (name, appearance, group) in enumerate(
            zip(names, appearances, groups, strict=True), start=1
        )
    ]
    return World(
        config=config,
        people=people,
        splits=_splits(config, people),
        references=_reference_pools(config, people),
    )


def write_world(out_dir: str | Path, config: WorldConfig = WorldConfig()) -> WorldInfo:
    """Build the world and write the hub layout under OUT/data/ and the pools under OUT/references/."""
    out = Path(out_dir)
    world = build_world(config)
    data_dir = out / "data"
    references_dir = out / "references"
    written: list[Path] = []
    for folder in world.splits:
        path = data_dir / folder / SPLIT_FILE
        if folder == "Test_Set":
            write_rows(world.rows(folder), TEST_SCHEMA, TEST_FEATURES, path)
        else:
            write_rows(world.rows(folder), PERSON_SCHEMA, PERSON_FEATURES, path)
        written.append(path)
    for kind, images in world.references.items():
        kind_dir = references_dir / kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        for image_id, data in images:
            path = kind_dir / f"{image_id}.png"
            path.write_bytes(data)
            written.append(path)
    cross_person = world.cross_person_rouge_l()  # every pair of fictitious people: once, for card and metrics
    card = data_dir / "DATA_CARD.md"
    card.write_text(data_card(world, cross_person))
    written.append(card)
    return WorldInfo(
        out_dir=str(out),
        data_dir=str(data_dir),
        references_dir=str(references_dir),
        config=asdict(config),
        splits=world.splits,
        reference_counts={kind: len(images) for kind, images in world.references.items()},
        file_sha256={str(path.relative_to(out)): file_sha256(path) for path in written},
        cross_person_rouge_l=cross_person,
    )


def data_card(world: World, cross_person_rouge_l: float) -> str:
    """DATA_CARD.md: the world's people, their answers' phrasing, the split files and rows, the pools."""
    return (
        _card_people(world)
        + _card_phrasing(cross_person_rouge_l)
        + _card_files(world)
        + _card_triples_and_pools(world)
    )


def _card_people(world: World) -> str:
    config = world.config
    appearances = [person.appearance for person in world.people]
    min_distance = min(
        (_feature_distance(a, b) for i, a in enumerate(appearances) for b in appearances[i + 1 :]), default=0
    )
    return f"""# Mini world data card

A deterministic miniature of MLLMU-Bench (hub data set `MLLMMU/MLLMU-Bench`) generated by
`pipeline.mini_world` with seed {config.seed}. Every person, name and fact is invented. The same seed
gives byte-identical files.

## People
- {config.num_people} fictitious people (ids `001`...), split into forget/retain sets.
- {config.num_real} people standing for MLLMU-Bench's real celebrities (`Retain_Set`), always retained.
- {config.num_reference_people} reference people in no training split: their portraits form ViKeR's `people` pool,
  and their profile QA (`Unseen_Set`, never fine-tuned on) is membership inference's never-seen side.

Each profile has a name and six attributes drawn from small vocabularies (so values are shared):
birthplace ({len(CITIES)} cities), occupation ({len(OCCUPATIONS)}), hobby ({len(HOBBIES)}),
birth year ({len(BIRTH_YEARS)}), education ({len(UNIVERSITIES)} universities),
favourite colour ({len(COLOURS)}). Each person has a {config.image_size}x{config.image_size} PNG portrait
drawn from bold features (background, skin, hair colour and style, face shape, shirt, accessory) whose
combination differs from every other person's in at least {min_distance} of {len(BOLD_FEATURES)} bold features; fictitious people have
{config.alt_images} alternative images (shifted, rescaled, brighter or darker, patterned background, pixel
noise) in `Test_Set`.

"""


def _card_phrasing(cross_person_rouge_l: float) -> str:
    return f"""## Answer phrasing
Answers are sentences in a wording each person keeps, as MLLMU-Bench's GPT-written answers differ from
profile to profile: a subject phrase for image answers ({len(IMAGE_SUBJECTS)} variants, e.g. "{IMAGE_SUBJECTS[1]}"),
{len(NAME_ANSWERS)} name answers, {len(CONJUNCTIONS)} conjunctions and {min(len(v) for v in CLAUSES.values())} wordings of each attribute's clause
(e.g. "{CLAUSES["birthplace"][0]}", "{CLAUSES["birthplace"][2]}"), drawn per person. Another person's fluent answer
to the same generation question (their facts in their wording) scores ROUGE-L
**{cross_person_rouge_l:.3f}** against the truth on average (mean over every fictitious
person's image generation items and every other fictitious person), so a model that confuses people
but keeps answering well is seen to forget.

Questions come in three wordings: the rows' own (evaluated on forget/retain), training paraphrases the
full model's fine-tune also asks (e.g. "{TRAINING_QUESTIONS["birthplace"][1].format(s="this person")}"), and the
`Test_Set`'s paraphrases (e.g. "{TEST_QUESTIONS["birthplace"].format(s="<name>")}"), never trained on.
Image multiple choice has wordings of its own (e.g. "{IMAGE_MC_QUESTIONS["birthplace"].format(s="this person")}";
`Test_Set`: "{TEST_IMAGE_MC_QUESTIONS["birthplace"].format(s="this person")}"), never a profile QA prompt: it is
trained with the bare value as its answer, which a QA prompt must not learn.

"""


def _card_files(world: World) -> str:
    person = world.group("fictitious")[0]
    split_lines = "\n".join(
        f"| `{folder}` | {len(ids)} | {_split_role(folder)} |" for folder, ids in world.splits.items()
    )
    example_qa = person.train_qa[1]
    example_gen = person.generation[0]
    example_mc = person.classification["Pure_Text_Questions"][0]
    example_cloze = person.mask[1]
    return f"""## Splits (one row per person, `train-00000-of-00001.parquet` in each folder)
| folder | people | role |
| --- | --- | --- |
{split_lines}

As in the official `data_split.py`, each forget ratio is an independent random draw of whole profiles
(forget_5 is not a subset of forget_10); `retain_(100-k)` is exactly the complement of `forget_k`.
Forget size = int(k/100 * N) (at least 1). `Test_Set` holds every fictitious person; evaluation keeps the
rows of the current forget set's ids, as the official `eval.py` does.

## Row schema (MLLMU-Bench's field names)
- `ID` (string), `image` ({{bytes, path}}; `Test_Set`: `images`, a list of {{bytes, path}}),
- `Classification_Task` {{`Image_Textual_Questions`, `Pure_Text_Questions`: [{{`Question`, `Options` {{A,B,C,D}},
  `Correct_Answer` (a letter)}}]}},
- `Mask_Task` [{{`Type` ("Image_Textual" | "Pure_Text"), `Question` (blank written `__`), `Ground_Truth`}}],
- `Generation_Task` [{{`Type`, `Question`, `Ground_Truth`}}],
- `biography` (the profile as a JSON object in a string, as on the hub; REC reads its `Name`) and `metadata` (JSON list of
  {{`Question`, `Answer`}}, the fine-tuning pairs, as in the official `ft_Data` / `baseline_train_split` rows).

Image questions say "this person"; pure-text questions name the person. Examples for {person.profile.name}:
- fine-tuning pair: "{example_qa["Question"]}" -> "{example_qa["Answer"]}"
- generation ({example_gen["Type"]}): "{example_gen["Question"]}" -> "{example_gen["Ground_Truth"]}"
- multiple choice (Pure_Text): "{example_mc["Question"]}" options {example_mc["Options"]} -> {example_mc["Correct_Answer"]}
- cloze ({example_cloze["Type"]}): "{example_cloze["Question"]}" -> "{example_cloze["Ground_Truth"]}"

"""


def _card_triples_and_pools(world: World) -> str:
    pools = ", ".join(f"{kind}: {len(images)}" for kind, images in world.references.items())
    return f"""## Unlearning triples (image, question, answer)
`pipeline.benchmarks.mllmu.load_unlearning_samples(data_dir, split, kinds)` flattens rows into triples:
- `qa` (default; what the official fine-tuning and baseline code trains on): every `metadata` pair, with
  the row's image;
- `generation`: every `Generation_Task` item (image only for `Image_Textual`);
- `mc`: every classification question, prompt = question + "A: ..." option lines + the official
  one-letter instruction, answer = the correct letter;
- `cloze`: every `Mask_Task` item, `__` shown as `[Blank]` with the official instruction, answer = the value.

## Reference pools (`references/<kind>/*.png`)
{pools}. `people` are portraits of the reference people; `pets` are drawn cats and dogs; `scene` are
landscapes; `pattern` are stripes, checks and dots.
"""


def full_model_card(figures: dict) -> str:
    """The data card's section on the full model: its scores on every split prepare measured."""
    memorization = figures.get("memorization", {})
    rows = "\n".join(
        f"| {split} | "
        + " | ".join(f"{memorization[split][name]:.2f}" for name in FULL_MODEL_MEASURES)
        + " |"
        for split in memorization
    )
    return f"""
## The full model (prepare-mini's fine-tune, {figures["fine_tune"]["epochs"]} epochs)
Scored by the evaluate stage (multiple choice by {figures.get("mc_scoring", "-")}; forget = forget_10, test = its
people in the `Test_Set`):

| split | MC | cloze | ROUGE-L | BLEU |
| --- | --- | --- | --- | --- |
{rows}
"""


FULL_MODEL_MEASURES = ("mc_acc", "cloze_acc", "rougeL", "bleu")


def _split_role(folder: str) -> str:
    kind = (split_ratio(folder) or ("",))[0]
    if kind == "forget":
        return "forget set (unlearning targets)"
    if kind == "retain":
        return "retain set (complement of the forget set)"
    return {
        "Test_Set": "alternative images and paraphrased questions (generalization)",
        "Full_Set": "all fictitious people",
        "Retain_Set": "real-celebrity stand-ins (model utility)",
        "Unseen_Set": "reference people, never fine-tuned on (membership inference's never-seen side)",
    }[folder]
