"""Task texts of MLLMU-Bench, as its official evaluation writes them (franciscoliu/MLLMU-Bench eval.py).

The full model is fine-tuned on these texts and the evaluate stage asks them, so both import them
from here. A model family wraps a task text into its own chat format (`ModelFamily.build_prompt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

MC_INSTRUCTION = "Just give ONE letter representing the answer directly."
CLOZE_INSTRUCTION = "Please **ONLY** provide the correct answer that should replace the [Blank]."
GENERATION_INSTRUCTION_IMAGE = (
    "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH."
)
GENERATION_INSTRUCTION_TEXT = (
    "Answer the question based on your trained knowledge in one sentence in ENGLISH."
)
OPTION_LETTERS = ("A", "B", "C", "D")


def options_block(options: Mapping[str, str]) -> str:
    return "\n".join(f"{letter}: {text}" for letter, text in options.items())


def classification_text(question: str, options: Mapping[str, str]) -> str:
    """A multiple-choice question with its options, one per line, and the one-letter instruction."""
    return f"{question}\n{options_block(options)}\n{MC_INSTRUCTION}"


def cloze_text(question: str) -> str:
    """A fill-in-the-blank sentence: the data set's `__` becomes `[Blank]`."""
    return f"{question.replace('__', '[Blank]')}\n{CLOZE_INSTRUCTION}"


def generation_text(question: str, has_image: bool) -> str:
    instruction = GENERATION_INSTRUCTION_IMAGE if has_image else GENERATION_INSTRUCTION_TEXT
    return f"{question}\n{instruction}"


def classification_fewshot_block(
    exemplars: Sequence[tuple[str, Mapping[str, str], str]],
    has_image: bool = True,
    image_placeholder: str = "<image>",
) -> str:
    """Solved exemplars (question, options, correct letter) that precede the query; image ones carry an image each."""
    opener = f"USER: {image_placeholder}\n" if has_image else "USER:\n"
    return "".join(
        f"{opener}Question: {question}\n{options_block(options)}\nCorrect Answer: {answer}\n"
        for question, options, answer in exemplars
    )


def cloze_fewshot_block(
    exemplars: Sequence[tuple[str, str]], has_image: bool, image_placeholder: str = "<image>"
) -> str:
    """Solved cloze exemplars (question, ground truth); image exemplars carry one image each."""
    opener = f"USER:{image_placeholder}\n" if has_image else "USER:\n"
    return "".join(
        f"{opener}{cloze_text(question)}\nCorrect Answer: {answer}\n" for question, answer in exemplars
    )
