"""LLaVA-1.5 in the model adapter layer (`llava-hf/llava-1.5-7b-hf` and the tiny mini-world model)."""

from __future__ import annotations

from pipeline.models.family import FAMILIES, ModelFamily


@FAMILIES.register("llava")
class LlavaFamily(ModelFamily):
    """LLaVA-1.5 (`llava-hf/llava-1.5-7b-hf` and the tiny mini-world model)."""

    name = "llava"

    def build_prompt(
        self, question: str, has_image: bool, instruction: str | None = None, exemplars: str = ""
    ) -> str:
        text = f"{instruction}\n{question}" if instruction else question
        # MLLMU-Bench's eval.py puts the solved exemplars in front of the whole "USER: ..." turn.
        turn = f"USER: <image>\n{text} ASSISTANT:" if has_image else f"USER: {text} ASSISTANT:"
        return exemplars + turn

    def answer_text(self, answer: str) -> str:
        return " " + answer
