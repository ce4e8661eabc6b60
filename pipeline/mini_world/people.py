"""The mini world's data model: its configuration, people, profiles and appearances, and vocabularies."""

from __future__ import annotations

from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------------------
# Configuration and the world's data classes
# ---------------------------------------------------------------------------------------------------------


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
class Phrasing:
    """The wording of one person's answers: an index into each variant list of pipeline.mini_world.text."""

    subject: int
    conjunction: int
    name_answer: int
    clauses: tuple[int, ...]  # one per attribute of text.CLAUSES, in its order


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
    phrasing: Phrasing
    image: bytes
    alt_images: tuple[bytes, ...] = ()
    train_qa: list[dict] = field(default_factory=list)
    classification: dict = field(default_factory=dict)
    mask: list[dict] = field(default_factory=list)
    generation: list[dict] = field(default_factory=list)
    test_classification: dict = field(default_factory=dict)
    test_mask: list[dict] = field(default_factory=list)
    test_generation: list[dict] = field(default_factory=list)


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
