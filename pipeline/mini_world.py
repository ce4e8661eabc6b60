"""The embedded mini world: a small, deterministic, MLLMU-Bench-shaped data set of fictitious people.

Nothing can be downloaded here, so the project generates its own miniature of MLLMU-Bench
(Liu et al., 2024; hub data set MLLMMU/MLLMU-Bench) in the benchmark's exact on-disk layout, so that
the same loaders (pipeline.data), stages and metrics run on it and on the real files:

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

import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.samples import QASample

SPLIT_FILE = "train-00000-of-00001.parquet"

# ---------------------------------------------------------------------------------------------------------
# Configuration and the world's data classes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and seed of the mini world. Tests build a reduced world by lowering the counts."""

    seed: int = 0
    num_people: int = 100  # fictitious people, split into forget_k / retain_(100-k)
    num_real: int = 20  # the "real celebrity" group (Retain_Set), always retained
    num_reference_people: int = 20  # portraits in no split: ViKeR's "people" reference pool
    alt_images: int = 3  # alternative images per fictitious person (Test_Set `images`)
    num_pets: int = 20
    num_scenes: int = 20
    num_patterns: int = 20
    image_size: int = 64
    forget_ratios: tuple[int, ...] = (5, 10, 15)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "forget_ratios", tuple(int(ratio) for ratio in self.forget_ratios)
        )  # from YAML lists
        if self.num_people < 2:
            raise ValueError("WorldConfig.num_people must be >= 2 (a forget and a retain person)")
        if self.alt_images < 1:
            raise ValueError("WorldConfig.alt_images must be >= 1")
        if any(not 0 < ratio < 100 for ratio in self.forget_ratios):
            raise ValueError(f"forget ratios must lie in (0, 100), got {self.forget_ratios}")


@dataclass(frozen=True)
class Profile:
    name: str
    birthplace: str
    occupation: str
    hobby: str
    birth_year: str
    education: str
    favourite_colour: str


@dataclass(frozen=True)
class Appearance:
    """Indices into the palettes below; together they are the person's visual identity."""

    background: int
    skin: int
    hair_colour: int
    hair_style: int
    face_shape: int
    shirt: int
    eye_colour: int
    accessory: int


@dataclass
class Person:
    """One person with everything the hub rows are made of.

    group: "fictitious" (forget/retain splits), "real" (Retain_Set) or "reference" (no split).
    train_qa: the fine-tuning pairs [{"Question", "Answer"}] (the official `metadata` column).
    classification / mask / generation: the evaluation items in MLLMU-Bench's field shapes;
    the test_* versions are the paraphrased Test_Set items.
    """

    person_id: str
    group: str
    profile: Profile
    appearance: Appearance
    image: bytes
    alt_images: tuple[bytes, ...] = ()
    train_qa: list[dict] = field(default_factory=list)
    classification: dict = field(default_factory=dict)
    mask: list[dict] = field(default_factory=list)
    generation: list[dict] = field(default_factory=list)
    test_classification: dict = field(default_factory=dict)
    test_mask: list[dict] = field(default_factory=list)
    test_generation: list[dict] = field(default_factory=list)


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
        """(image, question, answer) triples of the given groups, as pipeline.data forms them from rows.

        The full model is fine-tuned on these (all splits, every task form) so that it memorizes everyone.
        """
        from pipeline.data import row_samples  # data imports nothing from here; avoid a cycle at load

        folders = {"fictitious": "Full_Set", "real": "Retain_Set"}
        samples: list[QASample] = []
        for group in groups:
            folder = folders[group]
            for row in self.rows(folder):
                samples.extend(row_samples(row, folder, kinds, source=f"mini world {folder}"))
        return samples

    def text_corpus(self) -> list[str]:
        """Every piece of text the world contains (training, evaluation and test prompts and answers).

        The tiny model's tokenizer is trained on this, so no evaluated word is out of vocabulary.
        """
        from pipeline.data import row_samples, split_eval_items

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


# ---------------------------------------------------------------------------------------------------------
# Vocabularies (kept modest: the tiny model's tokenizer is trained on the world's text)
# ---------------------------------------------------------------------------------------------------------

FIRST_NAMES = [
    "Anna", "Ben", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Ida", "Jonas",
    "Karin", "Leo", "Maya", "Nils", "Olga", "Pablo", "Rosa", "Sami", "Tara", "Umar",
    "Vera", "Willem", "Yara", "Zane", "Alma", "Bruno", "Celia", "Dario", "Edith", "Finn",
    "Agnes", "Boris", "Carmen", "Dmitri", "Esther", "Fabio", "Gemma", "Henrik", "Irene", "Jasper",
    "Klaus", "Lena", "Marco", "Nadia", "Oscar", "Petra", "Quentin", "Rahel", "Stefan", "Tilda",
    "Ulla", "Victor", "Wanda", "Xavier", "Yusuf", "Zoe", "Anton", "Bianca", "Cyril", "Daphne",
    "Emil", "Flora", "Gustav", "Helga", "Igor", "Judith", "Kasper", "Lotte", "Mateo", "Nora",
    "Otto", "Paula", "Rafael", "Selma", "Tobias", "Ursula", "Valentin", "Wilma", "Yannick", "Zora",
    "Arvid", "Beatrix", "Casimir", "Dora", "Elias", "Frida", "Gideon", "Hanna", "Ivo", "Jana",
    "Konrad", "Liesel", "Milan", "Nina", "Orla", "Pavel", "Ruth", "Sven", "Thea", "Uwe",
    "Viggo", "Wendy", "Ximena", "Yvonne", "Zeno", "Aurora", "Bastian", "Cora", "Damian", "Eva",
    "Ferdinand", "Gloria", "Hector", "Ines", "Joaquin", "Kira", "Lorenz", "Mira", "Nestor", "Ophelia",
    "Piet", "Rita", "Silas", "Tomas", "Una", "Vito", "Xenia", "Yosef", "Zelda", "Ariel",
    "Bodo", "Chiara", "Dag", "Elin", "Fritz", "Gisela", "Harald", "Isak", "Juno", "Kurt",
    "Linnea", "Mads", "Noemi", "Odile", "Paolo", "Rune", "Sigrid", "Teo", "Vilma", "Wolf",
]  # fmt: skip
LAST_NAMES = [
    "Andersen", "Brandt", "Castillo", "Dupont", "Eriksen", "Fischer", "Garcia", "Hansen", "Ivanova",
    "Jensen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quinn", "Rossi", "Silva",
    "Tanaka", "Ulrich", "Varga", "Weber", "Xu", "Young", "Zoric", "Bauer", "Costa", "Dahl", "Evans",
]  # fmt: skip
CITIES = [
    "Copenhagen", "Lisbon", "Oslo", "Vienna", "Prague", "Dublin", "Madrid", "Warsaw",
    "Athens", "Helsinki", "Lyon", "Porto", "Krakow", "Seville", "Bergen", "Munich",
]  # fmt: skip
OCCUPATIONS = [
    "civil engineer", "nurse", "architect", "pilot", "chef", "teacher", "librarian",
    "pharmacist", "journalist", "carpenter", "veterinarian", "software developer", "photographer", "lawyer",
]  # fmt: skip
HOBBIES = [
    "painting", "sailing", "chess", "gardening", "cycling", "baking", "hiking", "playing the violin",
    "bird watching", "pottery", "rock climbing", "swimming", "reading poetry", "fishing",
]  # fmt: skip
UNIVERSITIES = [
    "Northfield University", "Riverside University", "Westbrook University", "Lakeside University",
    "Hillcrest University", "Stonebridge University", "Oakwood University", "Fairhaven University",
    "Greenvale University", "Silverton University",
]  # fmt: skip
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "teal", "pink"]
BIRTH_YEARS = [str(year) for year in range(1960, 2000, 2)]

ATTRIBUTE_VOCABULARY = {
    "birthplace": CITIES,
    "occupation": OCCUPATIONS,
    "hobby": HOBBIES,
    "birth_year": BIRTH_YEARS,
    "education": UNIVERSITIES,
    "favourite_colour": COLOURS,
}
ATTRIBUTES = tuple(ATTRIBUTE_VOCABULARY)  # profile attributes other than the name

# ---------------------------------------------------------------------------------------------------------
# Templates. {s} is the subject: "this person" (image questions) or the full name (pure-text questions).
# ---------------------------------------------------------------------------------------------------------


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


# Answer clauses: "<Subject> <clause>." for one attribute, "<Subject> <clause 1> and <clause 2>." for two.
CLAUSES = {
    "name": "is {v}",
    "birthplace": "was born in {v}",
    "occupation": "works as {a} {v}",
    "hobby": "enjoys {v} in their free time",
    "birth_year": "was born in the year {v}",
    "education": "studied at {v}",
    "favourite_colour": "likes the colour {v} best",
}
QUESTIONS = {
    "birthplace": "Where was {s} born?",
    "occupation": "What does {s} do for a living?",
    "hobby": "What does {s} enjoy doing in their free time?",
    "birth_year": "In which year was {s} born?",
    "education": "Where did {s} study?",
    "favourite_colour": "What is the favourite colour of {s}?",
}
TEST_QUESTIONS = {  # paraphrases for the Test_Set
    "birthplace": "In which city was {s} born?",
    "occupation": "What is the job of {s}?",
    "hobby": "Which hobby does {s} have?",
    "birth_year": "What is the birth year of {s}?",
    "education": "At which university did {s} study?",
    "favourite_colour": "Which colour does {s} like best?",
}
NAME_QUESTION = "What is the name of this person?"
NAME_ANSWER = "The name of this person is {v}."
TEST_NAME_QUESTION = "Who is the person in this image?"
# Cloze sentences: the attribute value is the blank "__" (MLLMU-Bench's Mask_Task marker).
CLOZE = {
    "name": "The name of this person is __.",
    "birthplace": "{S} was born in __.",
    "occupation": "{S} works as a __.",
    "hobby": "In their free time {s} enjoys __.",
    "birth_year": "{S} was born in the year __.",
    "education": "{S} studied at __.",
    "favourite_colour": "The favourite colour of {s} is __.",
}
TEST_CLOZE = {
    "name": "This person is called __.",
    "birthplace": "The city where {s} was born is __.",
    "occupation": "The job of {s} is __.",
    "hobby": "The hobby of {s} is __.",
    "birth_year": "The birth year of {s} is __.",
    "education": "The university where {s} studied is __.",
    "favourite_colour": "The colour that {s} likes best is __.",
}
DESCRIPTIONS = {  # for the two-attribute generation questions
    "name": "name",
    "birthplace": "birthplace",
    "occupation": "job",
    "hobby": "hobby",
    "birth_year": "year of birth",
    "education": "education",
    "favourite_colour": "favourite colour",
}
GENERATION_QUESTION = "Tell me about the {d1} and {d2} of {s}."
TEST_GENERATION_QUESTION = "What can you say about the {d1} and {d2} of {s}?"


def _value(profile: Profile, attribute: str) -> str:
    return getattr(profile, attribute)


def _clause(profile: Profile, attribute: str) -> str:
    value = _value(profile, attribute)
    return CLAUSES[attribute].format(v=value, a=_article(value))


def _subject(profile: Profile, with_image: bool) -> str:
    return "this person" if with_image else profile.name


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def answer_sentence(profile: Profile, attributes: tuple[str, ...], with_image: bool) -> str:
    """The templated ground-truth sentence stating one or two attributes of the person."""
    if attributes == ("name",):
        return NAME_ANSWER.format(v=profile.name)
    clauses = " and ".join(_clause(profile, attribute) for attribute in attributes)
    return f"{_capital(_subject(profile, with_image))} {clauses}."


# ---------------------------------------------------------------------------------------------------------
# Questions in MLLMU-Bench's three forms
# ---------------------------------------------------------------------------------------------------------

GENERATION_PAIRS_IMAGE = [
    ("name", "occupation"),
    ("birthplace", "occupation"),
    ("hobby", "education"),
    ("birth_year", "favourite_colour"),
    ("birthplace", "hobby"),
    ("occupation", "favourite_colour"),
]
GENERATION_PAIRS_TEXT = [
    ("birthplace", "occupation"),
    ("hobby", "education"),
    ("birth_year", "favourite_colour"),
    ("education", "occupation"),
    ("birthplace", "birth_year"),
    ("hobby", "favourite_colour"),
]


def _mc_item(question: str, correct: str, vocabulary: list[str], rng: random.Random) -> dict:
    """{Question, Options {A..D}, Correct_Answer}: three distractors from the same vocabulary."""
    distractors = rng.sample([value for value in vocabulary if value != correct], 3)
    values = [correct, *distractors]
    rng.shuffle(values)
    options = dict(zip("ABCD", values, strict=True))
    return {"Question": question, "Options": options, "Correct_Answer": "ABCD"[values.index(correct)]}


def _cloze_item(template: str, profile: Profile, attribute: str, with_image: bool) -> dict:
    subject = _subject(profile, with_image)
    return {
        "Type": "Image_Textual" if with_image else "Pure_Text",
        "Question": template.format(s=subject, S=_capital(subject)),
        "Ground_Truth": _value(profile, attribute),
    }


def _generation_item(question_template: str, profile: Profile, pair: tuple[str, str], with_image: bool):
    subject = _subject(profile, with_image)
    return {
        "Type": "Image_Textual" if with_image else "Pure_Text",
        "Question": question_template.format(d1=DESCRIPTIONS[pair[0]], d2=DESCRIPTIONS[pair[1]], s=subject),
        "Ground_Truth": answer_sentence(profile, pair, with_image),
    }


def _questions(person: Person, names: list[str], rng: random.Random, test: bool) -> None:
    """Fill the person's classification, cloze and generation items (paraphrased when test)."""
    profile = person.profile
    questions = TEST_QUESTIONS if test else QUESTIONS
    cloze = TEST_CLOZE if test else CLOZE

    image_mc = [_mc_item(TEST_NAME_QUESTION if test else NAME_QUESTION, profile.name, names, rng)]
    text_mc = []
    for attribute in ATTRIBUTES:
        vocabulary = ATTRIBUTE_VOCABULARY[attribute]
        value = _value(profile, attribute)
        image_mc.append(_mc_item(questions[attribute].format(s="this person"), value, vocabulary, rng))
        text_mc.append(_mc_item(questions[attribute].format(s=profile.name), value, vocabulary, rng))
    classification = {"Image_Textual_Questions": image_mc, "Pure_Text_Questions": text_mc}

    # Occupations need their article inside the blank's sentence; the cloze template fixes "a", so
    # occupations starting with a vowel get "an" here to keep the sentence grammatical.
    mask = []
    for with_image in (True, False):
        for attribute in ("name", *ATTRIBUTES) if with_image else ATTRIBUTES:
            template = cloze[attribute]
            if attribute == "occupation" and not test and _article(profile.occupation) == "an":
                template = template.replace("works as a __", "works as an __")
            mask.append(_cloze_item(template, profile, attribute, with_image))

    pair_rng = random.Random(f"{person.person_id}-pairs")  # same pairs for train and test items
    image_pairs = pair_rng.sample(GENERATION_PAIRS_IMAGE, 2)
    text_pairs = pair_rng.sample(GENERATION_PAIRS_TEXT, 2)
    template = TEST_GENERATION_QUESTION if test else GENERATION_QUESTION
    generation = [_generation_item(template, profile, pair, True) for pair in image_pairs]
    generation += [_generation_item(template, profile, pair, False) for pair in text_pairs]

    if test:
        person.test_classification, person.test_mask, person.test_generation = (
            classification,
            mask,
            generation,
        )
    else:
        person.classification, person.mask, person.generation = classification, mask, generation


def _train_qa(profile: Profile) -> list[dict]:
    """The fine-tuning pairs (official `metadata`): one image question per attribute, name included."""
    pairs = [{"Question": NAME_QUESTION, "Answer": answer_sentence(profile, ("name",), True)}]
    for attribute in ATTRIBUTES:
        pairs.append(
            {
                "Question": QUESTIONS[attribute].format(s="this person"),
                "Answer": answer_sentence(profile, (attribute,), True),
            }
        )
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Portraits. Bold, large colour areas so that identity survives a resize to 32x32.
# ---------------------------------------------------------------------------------------------------------

BACKGROUNDS = [
    (70, 130, 230), (60, 180, 90), (240, 210, 60), (150, 90, 200),
    (230, 100, 90), (150, 150, 150), (40, 190, 190), (240, 150, 40),
]  # fmt: skip
SKINS = [(255, 224, 189), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (90, 56, 37)]
HAIR_COLOURS = [
    (20, 20, 20), (110, 60, 20), (240, 220, 120), (200, 60, 30), (230, 230, 230), (40, 60, 200), (240, 100, 180),
]  # fmt: skip
SHIRTS = [
    (200, 30, 30), (30, 30, 200), (30, 160, 30), (230, 230, 30),
    (130, 30, 160), (250, 130, 0), (20, 20, 20), (250, 250, 250),
]  # fmt: skip
EYES = [(90, 50, 20), (40, 90, 220), (40, 150, 60), (120, 120, 120), (10, 10, 10)]
HAIR_STYLES = ["short", "long", "bald", "bun"]
FACE_SHAPES = ["round", "oval", "square"]
ACCESSORIES = ["none", "glasses", "hat", "beard"]

# The features compared when making identities distinct (eye colour is too small to count).
BOLD_FEATURES = ("background", "skin", "hair_colour", "hair_style", "face_shape", "shirt", "accessory")


def _draw_appearance(rng: random.Random) -> Appearance:
    return Appearance(
        background=rng.randrange(len(BACKGROUNDS)),
        skin=rng.randrange(len(SKINS)),
        hair_colour=rng.randrange(len(HAIR_COLOURS)),
        hair_style=rng.randrange(len(HAIR_STYLES)),
        face_shape=rng.randrange(len(FACE_SHAPES)),
        shirt=rng.randrange(len(SHIRTS)),
        eye_colour=rng.randrange(len(EYES)),
        accessory=rng.randrange(len(ACCESSORIES)),
    )


def _feature_distance(a: Appearance, b: Appearance) -> int:
    return sum(getattr(a, name) != getattr(b, name) for name in BOLD_FEATURES)


def distinct_appearances(count: int, rng: random.Random, min_distance: int = 3) -> list[Appearance]:
    """Draw `count` appearances that pairwise differ in at least `min_distance` bold features.

    Greedy rejection sampling; relaxes the distance only when the palette cannot hold that many people.
    """
    chosen: list[Appearance] = []
    distance = min_distance
    while len(chosen) < count:
        for _ in range(20000):
            candidate = _draw_appearance(rng)
            if all(_feature_distance(candidate, other) >= distance for other in chosen):
                chosen.append(candidate)
                break
        else:
            distance -= 1
            if distance < 1:
                raise ValueError(f"cannot draw {count} distinct appearances from the palettes")
    return chosen


@dataclass(frozen=True)
class Jitter:
    """Per-image variation of one identity (alternative images); the identity features stay fixed."""

    shift_x: float = 0.0
    shift_y: float = 0.0
    scale: float = 1.0
    brightness: float = 1.0
    pattern: str = "plain"  # background pattern: plain | stripes | dots | checks
    noise: float = 0.0  # std of additive pixel noise
    noise_seed: int = 0


SUPERSAMPLE = 2  # draw at twice the size, then downsample: smooth edges, deterministic


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _shade(colour: tuple[int, int, int], delta: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, channel + delta)) for channel in colour)


def _background_pattern(draw: ImageDraw.ImageDraw, size: int, colour, pattern: str) -> None:
    """A subtle texture in a shade of the background colour (alternative images only)."""
    shade = _shade(colour, 35 if sum(colour) < 450 else -35)
    step = size // 8
    if pattern == "stripes":
        for x in range(0, size, step):
            draw.rectangle([x, 0, x + step // 2 - 1, size], fill=shade)
    elif pattern == "dots":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse([x - step // 5, y - step // 5, x + step // 5, y + step // 5], fill=shade)
    elif pattern == "checks":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2 == 0:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=shade)


def _finish(image: Image.Image, size: int, jitter: Jitter) -> bytes:
    """Downsample, apply brightness and noise, encode as PNG."""
    image = image.resize((size, size), Image.Resampling.BOX)
    if jitter.brightness != 1.0 or jitter.noise > 0:
        pixels = np.asarray(image, dtype=np.float32) * jitter.brightness
        if jitter.noise > 0:
            pixels += np.random.default_rng(jitter.noise_seed).normal(0.0, jitter.noise, pixels.shape)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return _png(image)


def draw_portrait(appearance: Appearance, size: int = 64, jitter: Jitter = Jitter()) -> bytes:
    """A portrait-like PNG: background, shirt, head, hair, eyes and an accessory."""
    canvas = size * SUPERSAMPLE
    background = BACKGROUNDS[appearance.background]
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    _background_pattern(draw, canvas, background, jitter.pattern)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        """Unit-square box -> canvas pixels, scaled about the centre and shifted by the jitter."""
        points = []
        for x, y in ((x0, y0), (x1, y1)):
            points.append(((x - 0.5) * jitter.scale + 0.5 + jitter.shift_x) * canvas)
            points.append(((y - 0.5) * jitter.scale + 0.5 + jitter.shift_y) * canvas)
        return points

    skin = SKINS[appearance.skin]
    hair = HAIR_COLOURS[appearance.hair_colour]
    style = HAIR_STYLES[appearance.hair_style]
    shape = FACE_SHAPES[appearance.face_shape]
    accessory = ACCESSORIES[appearance.accessory]

    draw.ellipse(box(0.08, 0.76, 0.92, 1.35), fill=SHIRTS[appearance.shirt])  # shoulders and shirt
    if style == "long":
        draw.rectangle(box(0.2, 0.3, 0.8, 0.86), fill=hair)
    draw.rectangle(box(0.43, 0.62, 0.57, 0.8), fill=skin)  # neck
    face = {
        "round": (0.27, 0.24, 0.73, 0.7),
        "oval": (0.31, 0.2, 0.69, 0.74),
        "square": (0.27, 0.24, 0.73, 0.7),
    }
    if shape == "square":
        draw.rounded_rectangle(box(*face[shape]), radius=0.06 * canvas * jitter.scale, fill=skin)
    else:
        draw.ellipse(box(*face[shape]), fill=skin)
    if style in ("short", "long", "bun"):
        draw.pieslice(box(0.25, 0.14, 0.75, 0.56), 180, 360, fill=hair)
    if style == "bun":
        draw.ellipse(box(0.4, 0.04, 0.6, 0.22), fill=hair)
    if accessory == "beard":
        draw.chord(box(0.3, 0.42, 0.7, 0.74), 0, 180, fill=hair)
    for eye_x in (0.41, 0.59):
        draw.ellipse(box(eye_x - 0.05, 0.42, eye_x + 0.05, 0.51), fill=(255, 255, 255))
        draw.ellipse(box(eye_x - 0.03, 0.44, eye_x + 0.03, 0.5), fill=EYES[appearance.eye_colour])
    if accessory != "beard":
        draw.line(box(0.43, 0.61, 0.57, 0.61), fill=(120, 30, 30), width=max(1, canvas // 40))
    if accessory == "glasses":
        width = max(1, canvas // 40)
        for eye_x in (0.41, 0.59):
            draw.rectangle(box(eye_x - 0.075, 0.4, eye_x + 0.075, 0.53), outline=(15, 15, 15), width=width)
        draw.line(box(0.485, 0.45, 0.515, 0.45), fill=(15, 15, 15), width=width)
    if accessory == "hat":
        draw.rectangle(box(0.32, 0.04, 0.68, 0.26), fill=(40, 40, 40))
        draw.rectangle(box(0.18, 0.22, 0.82, 0.29), fill=(40, 40, 40))
    return _finish(image, size, jitter)


def _alt_jitter(rng: random.Random) -> Jitter:
    return Jitter(
        shift_x=rng.uniform(-0.06, 0.06),
        shift_y=rng.uniform(-0.05, 0.05),
        scale=rng.uniform(0.9, 1.08),
        brightness=rng.uniform(0.88, 1.12),
        pattern=rng.choice(["stripes", "dots", "checks", "plain"]),
        noise=rng.uniform(3.0, 8.0),
        noise_seed=rng.randrange(2**31),
    )


# ---------------------------------------------------------------------------------------------------------
# Reference pools for ViKeR's irrelevant images: pets, scenes, patterns (people are portraits).
# ---------------------------------------------------------------------------------------------------------

FUR = [(240, 240, 240), (40, 40, 40), (200, 130, 60), (150, 150, 150), (230, 190, 130), (110, 70, 40)]
PASTELS = [(200, 230, 255), (220, 255, 220), (255, 245, 200), (245, 220, 255), (255, 225, 225)]


def draw_pet(rng: random.Random, size: int) -> bytes:
    """A cat (pointed ears) or a dog (floppy ears): body, head, ears, tail, eyes, nose."""
    canvas = size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), rng.choice(PASTELS))
    draw = ImageDraw.Draw(image)
    fur = rng.choice(FUR)
    ears = _shade(fur, -40 if sum(fur) > 300 else 40)
    c = canvas
    draw.rectangle([0, 0.82 * c, c, c], fill=(120, 170, 90))  # grass
    draw.ellipse([0.3 * c, 0.5 * c, 0.85 * c, 0.88 * c], fill=fur)  # body
    draw.line([0.8 * c, 0.7 * c, 0.95 * c, 0.45 * c], fill=fur, width=c // 16)  # tail
    draw.ellipse([0.12 * c, 0.25 * c, 0.52 * c, 0.62 * c], fill=fur)  # head
    if rng.random() < 0.5:  # cat
        draw.polygon([(0.15 * c, 0.33 * c), (0.18 * c, 0.1 * c), (0.3 * c, 0.27 * c)], fill=ears)
        draw.polygon([(0.34 * c, 0.27 * c), (0.46 * c, 0.1 * c), (0.49 * c, 0.33 * c)], fill=ears)
    else:  # dog
        draw.ellipse([0.06 * c, 0.28 * c, 0.2 * c, 0.55 * c], fill=ears)
        draw.ellipse([0.44 * c, 0.28 * c, 0.58 * c, 0.55 * c], fill=ears)
    for eye_x in (0.25, 0.39):
        draw.ellipse([(eye_x - 0.03) * c, 0.38 * c, (eye_x + 0.03) * c, 0.44 * c], fill=(20, 20, 20))
    draw.ellipse([0.29 * c, 0.47 * c, 0.35 * c, 0.52 * c], fill=(60, 30, 30))
    return _finish(image, size, Jitter())


def draw_scene(rng: random.Random, size: int) -> bytes:
    """A landscape: sky gradient, sun, mountains, ground and a few trees."""
    canvas = size * SUPERSAMPLE
    c = canvas
    top = (rng.randrange(60, 140), rng.randrange(120, 200), rng.randrange(200, 256))
    bottom = _shade(top, 60)
    image = Image.new("RGB", (c, c))
    draw = ImageDraw.Draw(image)
    for y in range(c):
        t = y / c
        draw.line([0, y, c, y], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    sun_x, sun_r = rng.uniform(0.15, 0.85), rng.uniform(0.06, 0.1)
    draw.ellipse(
        [(sun_x - sun_r) * c, 0.1 * c, (sun_x + sun_r) * c, (0.1 + 2 * sun_r) * c], fill=(255, 220, 80)
    )
    mountain = (rng.randrange(80, 130), rng.randrange(80, 120), rng.randrange(100, 150))
    for _ in range(rng.randint(2, 3)):
        peak_x, peak_y = rng.uniform(0.1, 0.9), rng.uniform(0.3, 0.5)
        draw.polygon(
            [((peak_x - 0.35) * c, 0.7 * c), (peak_x * c, peak_y * c), ((peak_x + 0.35) * c, 0.7 * c)],
            fill=mountain,
        )
    ground = (rng.randrange(40, 120), rng.randrange(120, 190), rng.randrange(30, 90))
    draw.rectangle([0, 0.68 * c, c, c], fill=ground)
    for _ in range(rng.randint(1, 3)):
        tree_x = rng.uniform(0.1, 0.9)
        draw.rectangle([(tree_x - 0.015) * c, 0.7 * c, (tree_x + 0.015) * c, 0.85 * c], fill=(90, 60, 30))
        draw.ellipse([(tree_x - 0.07) * c, 0.55 * c, (tree_x + 0.07) * c, 0.75 * c], fill=(30, 100, 40))
    return _finish(image, size, Jitter())


def draw_pattern(rng: random.Random, size: int) -> bytes:
    """A texture: stripes (horizontal, vertical or diagonal), checks or dots in two colours."""
    canvas = size * SUPERSAMPLE
    c = canvas
    first = tuple(rng.randrange(256) for _ in range(3))
    second = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (c, c), first)
    draw = ImageDraw.Draw(image)
    step = c // rng.choice([4, 6, 8, 10])
    kind = rng.choice(["horizontal", "vertical", "diagonal", "checks", "dots"])
    if kind == "horizontal":
        for y in range(0, c, 2 * step):
            draw.rectangle([0, y, c, y + step - 1], fill=second)
    elif kind == "vertical":
        for x in range(0, c, 2 * step):
            draw.rectangle([x, 0, x + step - 1, c], fill=second)
    elif kind == "diagonal":
        for offset in range(-c, c, 2 * step):
            draw.polygon(
                [(offset, 0), (offset + step, 0), (offset + step + c, c), (offset + c, c)], fill=second
            )
    elif kind == "checks":
        for y in range(0, c, step):
            for x in range(0, c, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=second)
    else:
        for y in range(step // 2, c, step):
            for x in range(step // 2, c, step):
                draw.ellipse([x - step // 3, y - step // 3, x + step // 3, y + step // 3], fill=second)
    return _finish(image, size, Jitter())


# ---------------------------------------------------------------------------------------------------------
# Building the world
# ---------------------------------------------------------------------------------------------------------


def _person_id(index: int) -> str:
    return f"{index:03d}"  # MLLMU-Bench ids are zero-padded strings ("001" ... "500")


def forget_size(num_people: int, ratio: int) -> int:
    """The official split size, int(ratio / 100 * N), but at least one person in a reduced world."""
    return max(1, int(ratio / 100 * num_people))


def build_world(config: WorldConfig = WorldConfig()) -> World:
    """Build every person, question, image and reference image; a pure function of the config."""
    rng = random.Random(config.seed)
    total = config.num_people + config.num_real + config.num_reference_people
    if total > len(FIRST_NAMES) * len(LAST_NAMES):
        raise ValueError(
            f"the name vocabulary holds {len(FIRST_NAMES) * len(LAST_NAMES)} people, asked {total}"
        )
    if total <= len(FIRST_NAMES):
        # Every person's first name is their own (surnames repeat): a name identifies one person, as a
        # celebrity's name does, while the multiple-choice name options stay plausible.
        names = [f"{first} {rng.choice(LAST_NAMES)}" for first in rng.sample(FIRST_NAMES, total)]
    else:  # larger worlds (benchmarks): distinct first-and-last-name pairs
        names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], total)
    appearances = distinct_appearances(total, rng)

    groups = ["fictitious"] * config.num_people + ["real"] * config.num_real
    groups += ["reference"] * config.num_reference_people
    people: list[Person] = []
    for index, (name, appearance, group) in enumerate(zip(names, appearances, groups, strict=True), start=1):
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
            image=draw_portrait(appearance, config.image_size),
        )
        if group == "fictitious":
            person.alt_images = tuple(
                draw_portrait(appearance, config.image_size, _alt_jitter(rng))
                for _ in range(config.alt_images)
            )
        if group != "reference":
            person.train_qa = _train_qa(profile)
            people_names = names[: config.num_people + config.num_real]
            _questions(
                person, people_names, random.Random(f"{config.seed}-{person.person_id}-mc"), test=False
            )
            if group == "fictitious":
                _questions(
                    person, people_names, random.Random(f"{config.seed}-{person.person_id}-test"), test=True
                )
        people.append(person)

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
    return World(config=config, people=people, splits=splits, references=references)


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
BIOGRAPHY_TYPE = pa.struct(
    [
        ("Name", pa.string()),
        ("Born", pa.string()),
        ("Birth_Year", pa.string()),
        ("Employment", pa.string()),
        ("Education", pa.string()),
        ("Hobby", pa.string()),
        ("Favorite_Color", pa.string()),
    ]
)
PERSON_SCHEMA = pa.schema(
    [
        ("ID", pa.string()),
        ("image", IMAGE_TYPE),
        ("biography", BIOGRAPHY_TYPE),
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
        ("biography", BIOGRAPHY_TYPE),
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
    "biography": {key: _VALUE for key in BIOGRAPHY_TYPE.names},
    "Classification_Task": {"Image_Textual_Questions": [_MC_FEATURE], "Pure_Text_Questions": [_MC_FEATURE]},
    "Mask_Task": [_TYPED_FEATURE],
    "Generation_Task": [_TYPED_FEATURE],
}
PERSON_FEATURES = {"ID": _VALUE, "image": {"_type": "Image"}, **_COMMON_FEATURES, "metadata": _VALUE}
TEST_FEATURES = {"ID": _VALUE, "images": [{"_type": "Image"}], **_COMMON_FEATURES}


def _biography(profile: Profile) -> dict:
    return {
        "Name": profile.name,
        "Born": profile.birthplace,
        "Birth_Year": profile.birth_year,
        "Employment": profile.occupation,
        "Education": profile.education,
        "Hobby": profile.hobby,
        "Favorite_Color": profile.favourite_colour,
    }


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    card = data_dir / "DATA_CARD.md"
    card.write_text(data_card(world))
    written.append(card)
    return WorldInfo(
        out_dir=str(out),
        data_dir=str(data_dir),
        references_dir=str(references_dir),
        config=asdict(config),
        splits=world.splits,
        reference_counts={kind: len(images) for kind, images in world.references.items()},
        file_sha256={str(path.relative_to(out)): _sha256(path) for path in written},
    )


def reduced_config(**overrides: object) -> WorldConfig:
    """A small world for tests (builds in well under a second)."""
    small = WorldConfig(
        num_people=20,
        num_real=4,
        num_reference_people=4,
        alt_images=2,
        num_pets=3,
        num_scenes=3,
        num_patterns=3,
    )
    return replace(small, **overrides)


def data_card(world: World) -> str:
    config = world.config
    person = world.group("fictitious")[0]
    split_lines = "\n".join(
        f"| `{folder}` | {len(ids)} | {_split_role(folder)} |" for folder, ids in world.splits.items()
    )
    example_qa = person.train_qa[1]
    example_gen = person.generation[0]
    example_mc = person.classification["Pure_Text_Questions"][0]
    example_cloze = person.mask[1]
    pools = ", ".join(f"{kind}: {len(images)}" for kind, images in world.references.items())
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
- {config.num_reference_people} reference people in no split: their portraits form ViKeR's `people` pool.

Each profile has a name and six attributes drawn from small vocabularies (so values are shared):
birthplace ({len(CITIES)} cities), occupation ({len(OCCUPATIONS)}), hobby ({len(HOBBIES)}),
birth year ({len(BIRTH_YEARS)}), education ({len(UNIVERSITIES)} universities),
favourite colour ({len(COLOURS)}). Each person has a {config.image_size}x{config.image_size} PNG portrait
drawn from bold features (background, skin, hair colour and style, face shape, shirt, accessory) whose
combination differs from every other person's in at least {min_distance} of {len(BOLD_FEATURES)} bold features; fictitious people have
{config.alt_images} alternative images (shifted, rescaled, brighter or darker, patterned background, pixel
noise) in `Test_Set`.

## Splits (one row per person, `train-00000-of-00001.parquet` in each folder)
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
- extras the loaders do not need on real data: `biography` (the profile) and `metadata` (JSON list of
  {{`Question`, `Answer`}}, the fine-tuning pairs, as in the official `ft_Data` / `baseline_train_split` rows).

Image questions say "this person"; pure-text questions name the person. Examples for {person.profile.name}:
- fine-tuning pair: "{example_qa["Question"]}" -> "{example_qa["Answer"]}"
- generation ({example_gen["Type"]}): "{example_gen["Question"]}" -> "{example_gen["Ground_Truth"]}"
- multiple choice (Pure_Text): "{example_mc["Question"]}" options {example_mc["Options"]} -> {example_mc["Correct_Answer"]}
- cloze ({example_cloze["Type"]}): "{example_cloze["Question"]}" -> "{example_cloze["Ground_Truth"]}"

## Unlearning triples (image, question, answer)
`pipeline.data.load_unlearning_samples(data_dir, split, kinds)` flattens rows into triples:
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


def _split_role(folder: str) -> str:
    if folder.startswith("forget_"):
        return "forget set (unlearning targets)"
    if folder.startswith("retain_"):
        return "retain set (complement of the forget set)"
    return {
        "Test_Set": "alternative images and paraphrased questions (generalization)",
        "Full_Set": "all fictitious people",
        "Retain_Set": "real-celebrity stand-ins (model utility)",
    }[folder]
