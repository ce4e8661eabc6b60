"""The mini world's text: per-person answer phrasing and the questions in MLLMU-Bench's three forms.

Answers state the facts in a wording each person keeps (as MLLMU-Bench's GPT-written answers differ from
profile to profile), so another person's fluent answer to the same question shares little more than its
facts' positions with the truth. Questions come in three wordings: the canonical one (the data set's
rows), training paraphrases (the full model's fine-tune only) and the Test_Set's paraphrases (never
trained on: they measure generalization).
"""

from __future__ import annotations

import random
import re

from pipeline.evaluation.metrics import rouge_l_f1
from pipeline.mini_world.people import ATTRIBUTE_VOCABULARY, ATTRIBUTES, Person, Phrasing, Profile

# ---------------------------------------------------------------------------------------------------------
# Answer phrasing. {s} is the subject: a phrase for "this person" (image questions) or the full name.
# ---------------------------------------------------------------------------------------------------------


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


# Each person draws one wording per part; the variants share as few words as English allows.
CLAUSES = {
    "name": ("is {v}", "goes by the name {v}", "is called {v}", "is known as {v}"),
    "birthplace": ("was born in {v}", "comes from {v}", "is a native of {v}", "hails from the city of {v}"),
    "occupation": (
        "works as {a} {v}",
        "earns a living as {a} {v}",
        "is employed as {a} {v}",
        "has a career as {a} {v}",
    ),
    "hobby": (
        "enjoys {v} in their free time",
        "loves {v}",
        "is passionate about {v}",
        "spends spare hours on {v}",
    ),
    "birth_year": (
        "was born in the year {v}",
        "came into the world in {v}",
        "has {v} as year of birth",
        "entered life in {v}",
    ),
    "education": ("studied at {v}", "graduated from {v}", "is an alumnus of {v}", "earned a degree at {v}"),
    "favourite_colour": (
        "likes the colour {v} best",
        "has {v} as favourite colour",
        "prefers {v} to any other colour",
        "is fond of {v} above all",
    ),
}
IMAGE_SUBJECTS = (
    "This person",
    "The person in the image",
    "The individual shown",
    "Pictured here is someone who",
)
CONJUNCTIONS = (" and ", " and also ", ", and ")
NAME_ANSWERS = (
    "The name of this person is {v}.",
    "This is {v}.",
    "This person is called {v}.",
    "The one pictured is {v}.",
)


def draw_phrasing(rng: random.Random) -> Phrasing:
    """One person's wording: an index into each variant list above, drawn uniformly."""
    return Phrasing(
        subject=rng.randrange(len(IMAGE_SUBJECTS)),
        conjunction=rng.randrange(len(CONJUNCTIONS)),
        name_answer=rng.randrange(len(NAME_ANSWERS)),
        clauses=tuple(rng.randrange(len(variants)) for variants in CLAUSES.values()),
    )


def clause_template(phrasing: Phrasing, attribute: str) -> str:
    return CLAUSES[attribute][phrasing.clauses[list(CLAUSES).index(attribute)]]


def _value(profile: Profile, attribute: str) -> str:
    return getattr(profile, attribute)


def _clause(profile: Profile, phrasing: Phrasing, attribute: str) -> str:
    value = _value(profile, attribute)
    return clause_template(phrasing, attribute).format(v=value, a=_article(value))


def _subject(profile: Profile, with_image: bool) -> str:
    return "this person" if with_image else profile.name


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def answer_sentence(
    profile: Profile, phrasing: Phrasing, attributes: tuple[str, ...], with_image: bool
) -> str:
    """The ground-truth sentence stating one or two attributes of the person, in the person's wording."""
    if attributes == ("name",):
        return NAME_ANSWERS[phrasing.name_answer].format(v=profile.name)
    subject = IMAGE_SUBJECTS[phrasing.subject] if with_image else profile.name
    conjunction = CONJUNCTIONS[phrasing.conjunction]
    clauses = conjunction.join(_clause(profile, phrasing, attribute) for attribute in attributes)
    return f"{subject} {clauses}."


# ---------------------------------------------------------------------------------------------------------
# Questions: canonical (the rows), training paraphrases (fine-tune only), Test_Set paraphrases (held out)
# ---------------------------------------------------------------------------------------------------------

QUESTIONS = {
    "name": "What is the name of this person?",
    "birthplace": "Where was {s} born?",
    "occupation": "What does {s} do for a living?",
    "hobby": "What does {s} enjoy doing in their free time?",
    "birth_year": "In which year was {s} born?",
    "education": "Where did {s} study?",
    "favourite_colour": "What is the favourite colour of {s}?",
}
TRAINING_QUESTIONS = {
    "name": ("Who is this?", "Can you tell me who this person is?"),
    "birthplace": ("Where does {s} come from?", "What is the birthplace of {s}?"),
    "occupation": ("What is the occupation of {s}?", "What kind of work does {s} do?"),
    "hobby": ("What is a hobby of {s}?", "How does {s} like to spend spare time?"),
    "birth_year": ("When was {s} born?", "What year was {s} born in?"),
    "education": ("Which school did {s} attend?", "Where was {s} educated?"),
    "favourite_colour": ("What colour does {s} like most?", "What is the preferred colour of {s}?"),
}
TEST_QUESTIONS = {
    "name": "Who is the person in this image?",
    "birthplace": "In which city was {s} born?",
    "occupation": "What is the job of {s}?",
    "hobby": "Which hobby does {s} have?",
    "birth_year": "What is the birth year of {s}?",
    "education": "At which university did {s} study?",
    "favourite_colour": "Which colour does {s} like best?",
}
# Image multiple choice has its own wordings, never a profile QA prompt: MC is trained with the bare value
# as its answer (the option format likelihood scoring reads), so sharing the QA prompt would teach that
# prompt two answers and make the QA answer's first token uncertain (issue 31).
IMAGE_MC_QUESTIONS = {
    "name": "Which of these names belongs to {s}?",
    "birthplace": "Which of these cities is the birthplace of {s}?",
    "occupation": "Which of these jobs does {s} hold?",
    "hobby": "Which of these hobbies does {s} pursue?",
    "birth_year": "Which of these years is the birth year of {s}?",
    "education": "Which of these universities did {s} attend?",
    "favourite_colour": "Which of these colours does {s} prefer?",
}
TRAINING_IMAGE_MC_QUESTIONS = {
    "name": ("Pick the name of {s} from the options.", "Choose the right name for {s}."),
    "birthplace": ("Pick the city where {s} was born.", "Choose the home town of {s}."),
    "occupation": ("Pick the profession of {s}.", "Choose the line of work of {s}."),
    "hobby": ("Pick the pastime of {s}.", "Choose the favourite activity of {s}."),
    "birth_year": ("Pick the year in which {s} was born.", "Choose the year of birth of {s}."),
    "education": ("Pick the university {s} went to.", "Choose the alma mater of {s}."),
    "favourite_colour": ("Pick the favourite colour of {s}.", "Choose the colour {s} likes most."),
}
TEST_IMAGE_MC_QUESTIONS = {  # the Test_Set's: an unseen paraphrase of the MC wording, not of the QA one
    "name": "Which of the following is the name of {s}?",
    "birthplace": "Which of the following cities was {s} born in?",
    "occupation": "Which of the following is the job of {s}?",
    "hobby": "Which of the following hobbies does {s} have?",
    "birth_year": "Which of the following years was {s} born in?",
    "education": "Which of the following universities did {s} study at?",
    "favourite_colour": "Which of the following colours does {s} like best?",
}
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
TRAINING_CLOZE = {
    "name": ("This person goes by the name __.",),
    "birthplace": ("The birthplace of {s} is __.",),
    "occupation": ("The occupation of {s} is __.",),
    "hobby": ("A hobby of {s} is __.",),
    "birth_year": ("The year of birth of {s} is __.",),
    "education": ("The alma mater of {s} is __.",),
    "favourite_colour": ("The preferred colour of {s} is __.",),
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
TRAINING_GENERATION_QUESTIONS = ("Describe the {d1} and {d2} of {s}.",)
TEST_GENERATION_QUESTION = "What can you say about the {d1} and {d2} of {s}?"


def _pattern(template: str) -> re.Pattern:
    """A template as a regular expression capturing its placeholders (the subject, the two descriptions)."""
    pattern = re.escape(template)
    for name in ("s", "S", "d1", "d2"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>.+?)")
    return re.compile(pattern.replace(r"works\ as\ a\ __", r"works\ as\ an?\ __") + "$")


def _paraphrase_table() -> list[tuple[re.Pattern, tuple[str, ...]]]:
    table = [(_pattern(QUESTIONS[a]), TRAINING_QUESTIONS[a]) for a in QUESTIONS]
    table += [(_pattern(IMAGE_MC_QUESTIONS[a]), TRAINING_IMAGE_MC_QUESTIONS[a]) for a in IMAGE_MC_QUESTIONS]
    table += [(_pattern(CLOZE[a]), TRAINING_CLOZE[a]) for a in CLOZE]
    table.append((_pattern(GENERATION_QUESTION), TRAINING_GENERATION_QUESTIONS))
    return table


_PARAPHRASES = _paraphrase_table()


def training_wordings(question: str) -> list[str]:
    """The canonical question (or cloze sentence) and its training paraphrases, same subject.

    A question in none of the world's canonical forms is its only wording.
    """
    for pattern, paraphrases in _PARAPHRASES:
        match = pattern.match(question)
        if match:
            fields = match.groupdict()
            if "S" in fields:  # a sentence-initial subject: "This person" or a name
                fields["s"] = "this person" if fields["S"] == "This person" else fields["S"]
            return [question] + [paraphrase.format(**fields) for paraphrase in paraphrases]
    return [question]


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


def _generation_item(question_template: str, person: Person, pair: tuple[str, str], with_image: bool):
    subject = _subject(person.profile, with_image)
    return {
        "Type": "Image_Textual" if with_image else "Pure_Text",
        "Question": question_template.format(d1=DESCRIPTIONS[pair[0]], d2=DESCRIPTIONS[pair[1]], s=subject),
        "Ground_Truth": answer_sentence(person.profile, person.phrasing, pair, with_image),
    }


def generation_pairs(person_id: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The attribute pairs of a person's image and text generation questions (the same in the Test_Set)."""
    pair_rng = random.Random(f"{person_id}-pairs")
    return pair_rng.sample(GENERATION_PAIRS_IMAGE, 2), pair_rng.sample(GENERATION_PAIRS_TEXT, 2)


def _questions(person: Person, names: list[str], rng: random.Random, test: bool) -> None:
    """Fill the person's classification, cloze and generation items (paraphrased when test)."""
    profile = person.profile
    questions = TEST_QUESTIONS if test else QUESTIONS
    cloze = TEST_CLOZE if test else CLOZE

    image_questions = TEST_IMAGE_MC_QUESTIONS if test else IMAGE_MC_QUESTIONS

    image_mc = [_mc_item(image_questions["name"].format(s="this person"), profile.name, names, rng)]
    text_mc = []
    for attribute in ATTRIBUTES:
        vocabulary = ATTRIBUTE_VOCABULARY[attribute]
        value = _value(profile, attribute)
        image_mc.append(_mc_item(image_questions[attribute].format(s="this person"), value, vocabulary, rng))
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

    image_pairs, text_pairs = generation_pairs(person.person_id)
    template = TEST_GENERATION_QUESTION if test else GENERATION_QUESTION
    generation = [_generation_item(template, person, pair, True) for pair in image_pairs]
    generation += [_generation_item(template, person, pair, False) for pair in text_pairs]

    if test:
        person.test_classification, person.test_mask, person.test_generation = (
            classification,
            mask,
            generation,
        )
    else:
        person.classification, person.mask, person.generation = classification, mask, generation


def _train_qa(person: Person) -> list[dict]:
    """The fine-tuning pairs (official `metadata`): one image question per attribute, name included."""
    return [
        {
            "Question": QUESTIONS[attribute].format(s="this person"),
            "Answer": answer_sentence(person.profile, person.phrasing, (attribute,), True),
        }
        for attribute in ("name", *ATTRIBUTES)
    ]


def cross_person_rouge_l(people: list[Person]) -> float:
    """Mean ROUGE-L against each person's image generation answers of every other person's fluent answer
    to the same question (their own facts in their own wording): what a model that confuses people, but
    keeps answering well, scores against the truth."""
    scores = []
    for person in people:
        for pair in generation_pairs(person.person_id)[0]:
            truth = answer_sentence(person.profile, person.phrasing, pair, True)
            scores += [
                rouge_l_f1(answer_sentence(other.profile, other.phrasing, pair, True), truth)
                for other in people
                if other is not person
            ]
    return sum(scores) / len(scores)
