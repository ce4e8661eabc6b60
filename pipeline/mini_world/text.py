"""The mini world's text: answer templates and the questions in MLLMU-Bench's three forms."""

from __future__ import annotations

import random

from pipeline.mini_world.people import ATTRIBUTE_VOCABULARY, ATTRIBUTES, Person, Profile

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
