"""Every prompt measured against the model's context before anything is asked.

transformers raises nothing when a sequence runs past `max_position_embeddings`: LLaVA-1.5 (4,096
positions) goes on reading its rotary positions beyond what it was trained on, and the scores are silently
wrong. eval.py's cloze prompts with every image question of 2 exemplar profiles reach 4,361 tokens with 6
exemplar images (576 tokens each), so each prompt is counted as the model expands it (image placeholders
become the image's tokens) plus what follows it (the generated tokens, or the longest option scored by
likelihood), and an overlong one is refused naming the question.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from pipeline.evaluation.questions import Question
from pipeline.models import answer_token_ids


class PromptTooLongError(ValueError):
    """A question's prompt (and what follows it) does not fit the model's context."""


@dataclass(frozen=True)
class LongestPrompt:
    """The longest prompt of an evaluation, for meta.json."""

    tokens: int  # the prompt as the model reads it, image tokens included
    item_id: str
    split: str
    task: str
    images: int
    context: int | None  # the model's max_position_embeddings (none: not declared)


def context_length(model_config) -> int | None:
    """The language model's positions (`max_position_embeddings` of the text config), if declared."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text_config, "max_position_embeddings", None)


def prompt_lengths(loaded, questions: Sequence[Question]) -> list[int]:
    """Each question's prompt in tokens as the model reads it: its text (a placeholder per image) and
    every image's tokens (the exemplars' and the query's)."""
    if not questions:
        return []
    texts = loaded.tokenizer([question.prompt for question in questions])["input_ids"]
    image_tokens = functools.partial(loaded.family.image_token_count, loaded.processor)
    return [
        len(ids) + sum(image_tokens(image) for image in question_images(question))
        for question, ids in zip(questions, texts, strict=True)
    ]


def question_images(question: Question) -> list[Image.Image]:
    return [*question.context_images, *([question.image] if question.image is not None else [])]


def continuation_tokens(loaded, question: Question, max_new_tokens: int, mc_scoring: str) -> tuple[int, str]:
    """What follows the prompt in the model: the longest option teacher-forced (multiple choice by
    likelihood) or at most `max_new_tokens` generated; and how to name it."""
    options = (question.item.options or {}).values()
    if mc_scoring == "likelihood" and question.item.task == "classification" and options:
        return max(len(answer_token_ids(loaded, text)) for text in options), "the longest option's tokens"
    return max_new_tokens, "max_new_tokens"


def check_prompt_lengths(
    loaded, questions: Sequence[Question], max_new_tokens: int, mc_scoring: str
) -> LongestPrompt | None:
    """Refuse, before anything is asked, a question whose prompt and continuation exceed the model's
    context, naming it (id, split, task) and its length against the limit; returns the longest prompt
    (none without questions)."""
    limit = context_length(loaded.model.config)
    lengths = prompt_lengths(loaded, questions)
    for question, length in zip(questions, lengths, strict=True):
        following, what = continuation_tokens(loaded, question, max_new_tokens, mc_scoring)
        if limit is not None and length + following > limit:
            item = question.item
            raise PromptTooLongError(
                f"question {item.item_id} (split {question.split}, task {item.task}): its prompt is {length} "
                f"tokens ({len(question_images(question))} images) + {following} ({what}) = "
                f"{length + following}, more than the model's context of {limit} positions "
                "(max_position_embeddings): cap the exemplar images (--max-exemplar-images), the exemplar "
                "questions (--few-shot-questions) or --max-new-tokens"
            )
    if not questions:
        return None
    index = max(range(len(questions)), key=lengths.__getitem__)
    longest = questions[index]
    return LongestPrompt(
        lengths[index],
        longest.item.item_id,
        longest.split,
        longest.item.task,
        len(question_images(longest)),
        limit,
    )
