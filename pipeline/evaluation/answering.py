"""Answering the questions: greedy generation in batches, or multiple choice by the options' likelihood
(MLLMU-Bench Eq. 13), both journaled and shardable, then each reply scored."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.evaluation.protocols import EvalProtocol
from pipeline.evaluation.questions import Question
from pipeline.evaluation.scoring import score_question
from pipeline.journal import Journal
from pipeline.models import (
    PromptedSample,
    check_joint_tokenization,
    continuation_log_probs,
    generate,
    prompt_token_counts,
)


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
    """Generate every reply (in order of prompt tokens, so batches carry little padding) and score it;
    with mc_scoring likelihood, multiple choice is scored by the options' likelihood instead. Both journal
    their batches; a shard (index, count) only answers its batches into its journal (the merging run
    scores)."""
    by_likelihood = [
        q for q in questions if settings.mc_scoring == "likelihood" and q.item.task == "classification"
    ]
    chosen = {id(question) for question in by_likelihood}
    generated_ones = [question for question in questions if id(question) not in chosen]
    if by_likelihood:
        choose_options(loaded, model, by_likelihood, settings.batch_size, journal, shard)
    order = token_order(loaded, generated_ones)
    samples = [prompted_question(generated_ones[i]) for i in order]
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
        generated_ones[index].generated = text
        generated_ones[index].reply = protocol.reply(generated_ones[index].prompt, text)
    for question in questions:
        score_question(question)


def prompted_question(question: Question) -> PromptedSample:
    return PromptedSample(question.prompt, question.image, None, question.context_images)


def token_order(loaded, questions: list[Question]) -> list[int]:
    """The questions' indices by prompt length in tokens (images' tokens included), so that a batch holds
    prompts of about one length: characters miss that an image is hundreds of tokens."""
    lengths = prompt_token_counts(loaded, [prompted_question(question) for question in questions])
    return sorted(range(len(questions)), key=lengths.__getitem__)


def choose_options(
    loaded,
    model,
    questions: list[Question],
    batch_size: int,
    journal: Journal | None = None,
    shard: tuple[int, int] | None = None,
) -> None:
    """Multiple choice by likelihood (MLLMU-Bench Eq. 13): each reply is the letter of the option y with
    the highest log P(y | image, question), summed over y's tokens; the image and question run once per
    question and its options are scored from their KV cache. Batches are journaled as `mc:<start>:<size>`
    (a resumed run skips them) and shard (i, n) scores every n-th from the i-th, setting no reply."""
    order = token_order(loaded, questions)
    for number, start in enumerate(range(0, len(order), batch_size)):
        if shard is not None and number % shard[1] != shard[0]:
            continue
        unit, batch = f"mc:{start}:{batch_size}", [questions[i] for i in order[start : start + batch_size]]
        totals = journal.done.get(unit) if journal is not None else None
        if totals is None:
            totals = option_totals(loaded, model, batch)
            if journal is not None:
                journal.record(unit, totals)
        if shard is None:
            for question, row in zip(batch, totals, strict=True):
                letters = list(question.item.options or {})
                question.reply = letters[max(range(len(letters)), key=row.__getitem__)]
                question.scores["option_log_probs"] = dict(zip(letters, row, strict=True))


def option_totals(loaded, model, questions: list[Question]) -> list[list[float]]:
    """Per question, log P(option | image, question) of each option, in the options' order."""
    options = [list((question.item.options or {}).values()) for question in questions]
    scored = continuation_log_probs(
        loaded, model, [prompted_question(q) for q in questions], options, len(questions)
    )
    return [[float(values.sum()) for values in row] for row in scored]


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
