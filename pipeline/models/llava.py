"""LLaVA-1.5 in the model adapter layer (`llava-hf/llava-1.5-7b-hf` and the tiny mini-world model)."""

from __future__ import annotations

from pipeline.models.family import FAMILIES, ModelFamily


@FAMILIES.register("llava")
class LlavaFamily(ModelFamily):
    """LLaVA-1.5 (`llava-hf/llava-1.5-7b-hf` and the tiny mini-world model)."""

    name = "llava"
    # llava-hf's chat format, and MLLMU-Bench's (its fine-tune and eval.py: a newline before ASSISTANT:).
    TEMPLATES = {"llava": "USER: {image}{text} ASSISTANT:", "mllmu-bench": "USER: {image}{text}\nASSISTANT:"}
    template_names = tuple(TEMPLATES)

    def build_prompt(
        self, question: str, has_image: bool, instruction: str | None = None, exemplars: str = ""
    ) -> str:
        text = f"{instruction}\n{question}" if instruction else question
        # MLLMU-Bench's eval.py puts the solved exemplars in front of the whole "USER: ..." turn.
        turn = self.TEMPLATES[self.template].format(image="<image>\n" if has_image else "", text=text)
        return exemplars + turn

    def answer_text(self, answer: str) -> str:
        return " " + answer
