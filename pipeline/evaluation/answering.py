"""Answering the questions: greedy generation in batches (journaled, shardable), or multiple choice by the
options' likelihood (MLLMU-Bench Eq. 13), then each reply scored."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.evaluation.protocols import EvalProtocol
from pipeline.evaluation.questions import Question
from pipeline.evaluation.scoring import score_question
from pipeline.journal import Journal
from pipeline.models import PromptedSample, answer_token_log_probs, check_joint_tokenization, generate


@dataclass(frozen=True)
class AnswerSettings:
    """How replies are produced (none of it changes a reply but mc_scoring)."""

    max_new_tokens: int = 50  # greedy generation length
    batch_size: int = 8  # questions per batch
    mc_scoring: str = "generate"  # generate: parse the generated letter | likelihood: Eq. 13
    progress: bool = True


def answer_questions(
    loaded,
    model,
    protocol: EvalProtocol,
    questions: list[Question],
    journal: Journal,
    settings: AnswerSettings,
    shard: tuple[int, int] | None = None,
) -> None:
    """Generate every reply (in order of prompt length, so batches carry little padding) and score it;
    with mc_scoring likelihood, multiple choice is scored by the options' likelihood instead. A shard
    (index, count) only generates its batches into its journal (the merging run scores)."""
    by_likelihood = [
        q for q in questions if settings.mc_scoring == "likelihood" and q.item.task == "classification"
    ]
    if by_likelihood and shard is None:
        choose_options(loaded, model, by_likelihood, settings.batch_size)
        for question in by_likelihood:
            score_question(question)
    if by_likelihood:
        chosen = {id(question) for question in by_likelihood}
        questions = [question for question in questions if id(question) not in chosen]
    order = sorted(range(len(questions)), key=lambda index: len(questions[index].prompt))
    samples = [
        PromptedSample(questions[i].prompt, questions[i].image, None, questions[i].context_images)
        for i in order
    ]
    generated = generate(
        loaded,
        samples,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        progress=settings.progress,
        description="evaluate",
        model=model,
        journal=journal,
        shard=shard,
    )
    if shard is not None:
        return
    for index, text in zip(order, generated, strict=True):
        questions[index].generated = text
        questions[index].reply = protocol.reply(questions[index].prompt, text)
    for question in questions:
        score_question(question)


def choose_options(loaded, model, questions: list[Question], batch_size: int) -> None:
    """Multiple choice by likelihood (MLLMU-Bench Eq. 13): each reply is the letter of the option y with
    the highest log P(y | image, question), summed over y's tokens, teacher-forced in one pass."""
    inputs = [
        PromptedSample(question.prompt, question.image, text, question.context_images)
        for question in questions
        for text in (question.item.options or {}).values()
    ]
    log_probs = iter(answer_token_log_probs(loaded, model, inputs, batch_size))
    for question in questions:
        letters = list(question.item.options or {})
        totals = [float(next(log_probs).sum()) for _ in letters]
        question.reply = letters[max(range(len(letters)), key=totals.__getitem__)]
        question.scores["option_log_probs"] = dict(zip(letters, totals, strict=True))


def check_option_tokenization(loaded, questions: list[Question], mc_scoring: str) -> None:
    """Likelihood multiple choice teacher-forces each option after its question, tokenized apart (as
    training does its answers): refuse, before anything is asked, a tokenizer that splits an option
    differently after the question than alone (its log P(y | x) would be of other tokens), naming the
    question and the option."""
    if mc_scoring != "likelihood":
        return
    for question in questions:
        if question.item.task != "classification":
            continue
        for letter, text in (question.item.options or {}).items():
            where = f"{question.item.item_id} ({question.split}), option {letter}"
            check_joint_tokenization(loaded, where, question.prompt, text, what="question")
