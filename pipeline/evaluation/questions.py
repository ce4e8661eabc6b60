"""The questions of an evaluation: one prompt per benchmark item, with its image and few-shot exemplars."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipeline.benchmarks import EvalItem, EvalItems, prompts
from pipeline.evaluation.few_shot import Exemplars
from pipeline.evaluation.protocols import REVERSE_PROMPT, EvalProtocol
from pipeline.samples import decode_image

TASKS = ("classification", "cloze", "generation")


@dataclass
class Question:
    """One prompt to generate for, and what its reply is scored against."""

    split: str  # metrics.json split name (forget, test_reverse, ...)
    item: EvalItem
    prompt: str
    image: Image.Image | None
    context_images: tuple[Image.Image, ...] = ()
    generated: str = ""
    reply: str = ""
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class QuestionOptions:
    """How every question of one evaluation is worded and which people are asked."""

    protocol: EvalProtocol
    family: Any  # pipeline.models.ModelFamily
    limit: int | None = None  # at most this many people per split
    instruction: str | None = None  # in-context unlearning prefix
    mc_scoring: str = "generate"  # likelihood: a multiple-choice prompt is the question alone (Eq. 13's x)


class ImageCache:
    """Decodes each distinct image once; a corrupt image fails naming the item and its source."""

    def __init__(self) -> None:
        self._images: dict[str, Image.Image] = {}

    def get(self, item: EvalItem) -> Image.Image | None:
        if item.image is None:
            return None
        key = item.image_source or item.item_id
        if key not in self._images:
            self._images[key] = decode_image(item.image, f"item {item.item_id} ({item.image_source})")
        return self._images[key]


def build_questions(
    items: EvalItems,
    split: str,
    options: QuestionOptions,
    exemplars: Exemplars,
    images: ImageCache,
    reverse: bool = False,
) -> list[Question]:
    """Prompts for every evaluated item of one split (exemplar profiles' own MC/cloze items excluded),
    named `split` in metrics.json; with `reverse`, Vgid's reverse prompt follows every question.

    Exemplars: the questions of the exemplar profiles with the query's task and modality, at most
    `exemplars.questions` of them (a seeded choice, the same for every query of the split). Scored by
    likelihood, a multiple-choice prompt is the question alone (Eq. 13's x), without exemplars.
    """
    order = list(dict.fromkeys(item.person_id for item in items.all()))
    chosen: dict[tuple[str, str], list[EvalItem]] = {}
    questions: list[Question] = []
    for task in TASKS:
        shots = exemplars.ids.get(task, [])
        persons = [person for person in order if person not in shots] if task != "generation" else order
        kept = set(persons[: options.limit] if options.limit else persons)
        for item in getattr(items, task):
            if item.person_id not in kept:
                continue
            has_image = item.modality == "image_textual"
            by_likelihood = task == "classification" and options.mc_scoring == "likelihood"
            text = item.question if by_likelihood else item.prompt()
            if reverse:
                text = f"{text}\n{REVERSE_PROMPT}"
            prefix, context = "", ()
            if shots and exemplars.pool is not None and not by_likelihood:
                key = (task, item.modality)
                if key not in chosen:
                    chosen[key] = exemplar_questions(exemplars, items.split, task, item.modality)
                prefix, context = few_shot_prefix(options.family, chosen[key], task, has_image, images)
            prompt = options.protocol.query(
                options.family, text, has_image, task, options.instruction, prefix
            )
            questions.append(Question(split, item, prompt, images.get(item), context))
    return questions


def exemplar_questions(exemplars: Exemplars, split: str, task: str, modality: str) -> list[EvalItem]:
    """The exemplar profiles' questions of one task and modality, at most `exemplars.questions` of them,
    and of image questions at most `exemplars.images` (the prompt's context bounds its images)."""
    pool = exemplars.pool.classification if task == "classification" else exemplars.pool.cloze
    shots = exemplars.ids.get(task, [])
    chosen = [e for e in pool if e.person_id in shots and e.modality == modality]
    if exemplars.questions is not None and len(chosen) > exemplars.questions:
        rng = random.Random(f"{exemplars.seed}/{split}/{task}/{modality}")
        kept = set(rng.sample(range(len(chosen)), exemplars.questions))
        chosen = [e for index, e in enumerate(chosen) if index in kept]
    if exemplars.images is not None and modality == "image_textual":
        chosen = chosen[: exemplars.images]  # each image exemplar carries one image: keep the first ones
    return chosen


def few_shot_prefix(
    family, exemplars: list[EvalItem], task: str, has_image: bool, images: ImageCache
) -> tuple[str, tuple[Image.Image, ...]]:
    """eval.py's solved exemplars (every question of the exemplar profiles of the same task and modality)."""
    if not exemplars:
        return "", ()
    placeholder = family.image_placeholder if has_image else ""
    if task == "classification":
        block = prompts.classification_fewshot_block(
            [(e.question, e.options or {}, e.correct_letter or "") for e in exemplars], has_image, placeholder
        )
    else:
        block = prompts.cloze_fewshot_block(
            [(e.question, e.ground_truth) for e in exemplars], has_image, placeholder
        )
    context = tuple(images.get(e) for e in exemplars) if has_image else ()
    return block, context
