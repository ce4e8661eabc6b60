"""Metric functions against hand-computed values, the official parsing rules, and the coherence scorers."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.evaluation.metrics import (
    COHERENCE_SCORERS,
    NgramFluencyScorer,
    bleu,
    build_coherence_scorer,
    cloze_correct,
    name_recognized,
    official_reply,
    parse_option_letter,
    rouge_l_f1,
)

# ---------------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat was on the mat") = "the cat on the mat": 5 of 6 both ways.
    assert rouge_l_f1("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    # Stemming: cats -> cat, sitting -> sit; LCS = "the cat" (2); P = 2/4, R = 2/3, F1 = 4/7.
    assert rouge_l_f1("The cats were sitting", "the cat sat") == pytest.approx(4 / 7)


def test_rouge_l_is_f1_not_recall_or_precision():
    # prediction "a b" against reference "a b c d": P = 1, R = 1/2, F1 = 2/3.
    assert rouge_l_f1("alpha beta", "alpha beta gamma delta") == pytest.approx(2 / 3)


def test_rouge_l_edge_cases():
    assert rouge_l_f1("", "the cat") == 0.0
    assert rouge_l_f1("the cat", "") == 0.0
    assert rouge_l_f1("Copenhagen.", "copenhagen") == 1.0  # case and punctuation are ignored


# ------------------------------------------------------------------------------------------- BLEU


def test_bleu_hand_computed():
    reference = "the cat sat on the mat"
    assert bleu(reference, reference) == pytest.approx(1.0)
    # p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, brevity penalty 1.
    assert bleu("the cat sat on a mat", reference) == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # Short hypothesis: p1 = p2 = 1; no 3- or 4-grams, method1 puts 0.1 there; BP = exp(1 - 6/2).
    assert bleu("the cat", reference) == pytest.approx((0.1 * 0.1) ** 0.25 * math.exp(-2))


def test_bleu_uses_whitespace_tokens_and_handles_empty():
    # "mat." is one token and does not match "mat": only whitespace splitting, no punctuation handling.
    assert bleu("the cat sat on the mat.", "the cat sat on the mat") < 1.0
    assert bleu("", "the cat sat") == 0.0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.sampled_from("a b c d e f".split()), min_size=0, max_size=12),
    st.lists(st.sampled_from("a b c d e f".split()), min_size=1, max_size=12),
)
def test_scores_are_fractions(prediction, reference):
    for score in (
        rouge_l_f1(" ".join(prediction), " ".join(reference)),
        bleu(" ".join(prediction), " ".join(reference)),
    ):
        assert 0.0 <= score <= 1.0


# ------------------------------------------------------------------------------ option letters


OPTIONS = {"A": "teacher", "B": "pilot", "C": "baker", "D": "nurse"}


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("A", "A"),
        ("  C", "C"),  # leading whitespace
        ("\nD\n", "D"),
        ("b", "B"),  # lower case
        ("A.", "A"),
        ("C: baker", "C"),
        ("D) nurse", "D"),
        ("(A)", None),  # the official rule reads only the first character
        ("Option B", None),
        ("", None),
        ("   ", None),
        ("E", None),  # not one of the options
        ("Based on the image, C", "B"),  # the official rule's known quirk, kept for comparability
        ("1", None),
    ],
)
def test_parse_option_letter(reply, expected):
    assert parse_option_letter(reply, OPTIONS) == expected


def test_parse_option_letter_respects_the_question_options():
    assert parse_option_letter("C", {"A": "x", "B": "y"}) is None
    assert parse_option_letter("c", ["A", "B", "C"]) == "C"


def test_official_reply_extraction():
    assert official_reply("USER: <image>\nQ?\nASSISTANT: B") == "B"
    # A continuation that starts a new turn is cut at the next "ASSISTANT:".
    assert official_reply("USER: Q ASSISTANT: Paris. USER: more ASSISTANT: no") == "Paris. USER: more"
    assert official_reply("### Answer: C") == "C"
    assert official_reply("  plain  ") == "plain"


# --------------------------------------------------------------------------------- cloze and REC


def test_cloze_correct():
    assert cloze_correct("She was born in Copenhagen.", "copenhagen")
    assert cloze_correct("COPENHAGEN", "Copenhagen")
    assert not cloze_correct("She was born in Lisbon.", "Copenhagen")
    assert not cloze_correct("", "Copenhagen")
    with pytest.raises(ValueError, match="empty"):
        cloze_correct("anything", "  ")


def test_name_recognized():
    assert name_recognized("This is mara  HOLT, a pilot.", "Mara Holt")
    assert not name_recognized("This is Mara, a pilot.", "Mara Holt")
    assert not name_recognized("I don't know who this is.", "Mara Holt")
    with pytest.raises(ValueError):
        name_recognized("x", "")


# ------------------------------------------------------------------------------------ coherence

FIRST = ["Mara", "Lena", "Tomas", "Ivo", "Karin", "Jonas", "Elif", "Ravi", "Noor", "Pavel", "Ines", "Otto"]
LAST = ["Holt", "Hart", "Berg", "Novak", "Silva", "Okafor", "Lind", "Marsh", "Petrov", "Quinn"]
CITIES = ["Copenhagen", "Lisbon", "Tallinn", "Osaka", "Lima", "Nairobi", "Quebec", "Graz", "Porto", "Bergen"]
JOBS = ["civil engineer", "teacher", "pilot", "baker", "nurse", "architect", "librarian", "chemist"]
HOBBIES = ["painting", "chess", "hiking", "pottery", "sailing", "birdwatching", "cooking", "fencing"]
TEMPLATES = [
    "{n} was born in {c} in {y}.",
    "{n} works as a {j} in {c}.",
    "In free time {n} enjoys {h} and {h2}.",
    "This person is {n}, a {j} who lives in {c}.",
    "{n} studied at the University of {c} and became a {j}.",
]


def profile_sentence(rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(
        n=f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        c=rng.choice(CITIES),
        y=rng.randint(1950, 2000),
        j=rng.choice(JOBS),
        h=rng.choice(HOBBIES),
        h2=rng.choice(HOBBIES),
    )


@pytest.fixture(scope="module")
def fluency_scorer():
    rng = random.Random(0)
    return NgramFluencyScorer([profile_sentence(rng) for _ in range(150)])


@pytest.fixture(scope="module")
def fluent_answers():
    rng = random.Random(12345)  # unseen combinations of the same kind of answers
    return [profile_sentence(rng) for _ in range(40)]


def mean(values):
    return sum(values) / len(values)


def test_fallback_separates_gibberish_from_fluent_answers(fluency_scorer, fluent_answers):
    rng = random.Random(7)
    shuffled = []
    for text in fluent_answers:
        words = text.split()
        while " ".join(words) == text:
            rng.shuffle(words)
        shuffled.append(" ".join(words))
    # BPE-like random tokens: pieces of real words glued at random.
    pieces = sorted(
        {word[i : i + 3] for text in fluent_answers for word in text.split() for i in range(0, len(word), 3)}
    )
    random_tokens = [
        "".join(rng.choice(pieces) + (" " if rng.random() < 0.3 else "") for _ in range(15))
        for _ in range(40)
    ]
    repeated = [" ".join([rng.choice(text.split())] * 12) for text in fluent_answers]

    fluent_score = mean(fluency_scorer(fluent_answers))
    assert fluent_score > 0.8
    for gibberish in (shuffled, random_tokens, repeated):
        scores = fluency_scorer(gibberish)
        assert all(0.0 <= score <= 1.0 for score in scores)
        assert mean(scores) < 0.3
        assert fluent_score - mean(scores) > 0.6


def test_fallback_penalizes_loops_and_empty_text(fluency_scorer, fluent_answers):
    loops = [" ".join(text.split()[:3] * 8) for text in fluent_answers[:10]]
    assert mean(fluency_scorer(loops)) < 0.3
    assert fluency_scorer([""]) == [0.0]


def test_fallback_is_deterministic_and_registered(fluent_answers):
    rng = random.Random(0)
    references = [profile_sentence(rng) for _ in range(150)]
    first = NgramFluencyScorer(references)(fluent_answers)
    second = build_coherence_scorer(references)(fluent_answers)
    assert first == second
    assert "ngram-fluency" in COHERENCE_SCORERS and "gibberish-classifier" in COHERENCE_SCORERS
    assert build_coherence_scorer(references).name == "ngram-fluency"


def test_fallback_needs_a_few_references():
    with pytest.raises(ValueError, match="reference answers"):
        NgramFluencyScorer(["One sentence.", "Another one.", "  "])


def _save_tiny_classifier(directory, labels):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = sorted(
        {
            word.lower()
            for text in [profile_sentence(random.Random(i)) for i in range(50)]
            for word in text.replace(".", " ").replace(",", " ").split()
        }
    )
    (directory / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def test_gibberish_classifier_is_mean_probability_of_clean(tmp_path):
    import torch

    model, tokenizer = _save_tiny_classifier(tmp_path, ["clean", "mild gibberish", "noise", "word salad"])
    texts = ["Mara Holt works as a pilot.", "pilot pilot pilot", "in in the was"]
    scorer = build_coherence_scorer(["unused"], gib_model=str(tmp_path))
    assert scorer.name.startswith("gibberish-classifier")
    scores = scorer(texts)
    model.eval()
    with torch.no_grad():
        for text, score in zip(texts, scores, strict=True):
            expected = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0, 0].item()
            assert score == pytest.approx(expected, abs=1e-5)


def test_gibberish_classifier_rejects_other_models(tmp_path):
    _save_tiny_classifier(tmp_path, ["negative", "positive"])
    with pytest.raises(ValueError, match="label 0"):
        build_coherence_scorer([], gib_model=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="gib-model"):
        build_coherence_scorer([], gib_model=str(tmp_path / "missing"))
