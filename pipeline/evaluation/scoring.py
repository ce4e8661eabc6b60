"""Scoring replies (MLLMU-Bench's and CLEAR's measures) and averaging them into metrics.json's values."""

from __future__ import annotations

from collections import defaultdict

from pipeline.benchmarks import EvalItem
from pipeline.evaluation.metrics import (
    bleu,
    cloze_correct,
    name_recognized,
    parse_option_letter,
    question_measures,
    rouge_l_f1,
)
from pipeline.evaluation.questions import Question


def score_question(question: Question) -> None:
    """The reply's scores: the chosen option or the filled blank right, or ROUGE-L, BLEU (and Rec)."""
    item, reply = question.item, question.reply
    if item.task == "classification":
        question.scores["correct"] = float(
            parse_option_letter(reply, item.options or {}) == item.correct_letter
        )
    elif item.task == "cloze":
        question.scores["correct"] = float(cloze_correct(reply, item.ground_truth))
    else:
        question.scores["rougeL"] = rouge_l_f1(reply, item.ground_truth)
        question.scores["bleu"] = bleu(reply, item.ground_truth)
        if asks_for_name(item):
            question.scores["rec"] = float(name_recognized(reply, item.person_name))


def asks_for_name(item: EvalItem) -> bool:
    """CLEAR-style identification: an image question that asks for the person's name (and a known name)."""
    return item.image is not None and bool(item.person_name.strip()) and "name" in item.question.lower()


def aggregate(questions: list[Question]) -> tuple[dict[str, float], dict[str, int]]:
    """Per-question averages with the metrics.json names; a metric without questions is left out."""
    values: dict[str, list[float]] = defaultdict(list)
    for question in questions:
        measures = question_measures(question.item.task, question.item.modality, question.scores)
        for name, value in measures.items():
            values[name].append(value)
    metrics = {name: sum(scores) / len(scores) for name, scores in sorted(values.items())}
    counts = {name: len(scores) for name, scores in sorted(values.items())}
    return metrics, counts
