"""Every evaluation prompt is measured against the model's context before anything is asked: counted as
the model expands it, refused naming the question when too long, the longest recorded in meta.json, and
the exemplar images capped."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from builders import build_random_tiny_qwen2_vl
from PIL import Image

from pipeline.benchmarks.mllmu import load_eval_items
from pipeline.evaluation.few_shot import Exemplars
from pipeline.evaluation.prompt_length import PromptTooLongError, prompt_lengths, question_images
from pipeline.evaluation.protocols import PROTOCOLS
from pipeline.evaluation.questions import ImageCache, Question, QuestionOptions, build_questions
from pipeline.models import load_model
from pipeline.models.qwen2_vl import VISION_BLOCK
from stages.config import EvaluateConfig
from stages.evaluate import run

FIXTURE = Path(__file__).parent / "fixtures" / "mllmu_bench"


def encoded_length(loaded, question: Question) -> int:
    """The prompt's tokens as the model receives them (the family's own encoding, images expanded)."""
    encoded = loaded.family.encode_prompts(loaded.processor, [question.prompt], question_images(question))
    return len(encoded["input_ids"][0])


def questions_with_exemplars(family, protocol: str, images: int | None = None) -> list[Question]:
    """forget_5's questions after both retain people's solved questions (their images included)."""
    pool = load_eval_items(FIXTURE, "retain_95")
    shots = {"classification": ["002", "003"], "cloze": ["002", "003"]}
    options = QuestionOptions(PROTOCOLS[protocol](), family)
    forget = load_eval_items(FIXTURE, "forget_5")
    return build_questions(forget, "forget", options, Exemplars(shots, pool, images=images), ImageCache())


def short_context_copy(model_dir: Path, tmp_path: Path, positions: int) -> Path:
    """The tiny model with its language model's context cut to `positions` (the weights unchanged)."""
    copy = tmp_path / "short-model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = positions
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_prompt_lengths_are_the_encoded_inputs_exemplar_images_included(tiny_model):
    questions = questions_with_exemplars(tiny_model.family, "official")
    assert max(len(question_images(q)) for q in questions) == 3  # two exemplar images, then the query's
    assert prompt_lengths(tiny_model, questions) == [encoded_length(tiny_model, q) for q in questions]


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_prompt_lengths_follow_each_images_own_grid(variant, tmp_path):
    qwen = load_model(str(build_random_tiny_qwen2_vl(tmp_path / "qwen", 0, variant)))
    questions = questions_with_exemplars(qwen.family, "fixed")
    # images of other sizes give other token counts (dynamic resolution)
    square, wide = Image.new("RGB", (64, 64)), Image.new("RGB", (96, 48))
    prompt = qwen.family.build_prompt("Who is this?", True, exemplars=f"{VISION_BLOCK}Mara\n" * 2)
    mixed = Question("forget", questions[0].item, prompt, square, (wide, square))
    questions.append(mixed)
    assert prompt_lengths(qwen, questions) == [encoded_length(qwen, q) for q in questions]


def test_the_cap_keeps_the_first_exemplar_images_and_every_text_exemplar(tiny_model):
    capped = questions_with_exemplars(tiny_model.family, "official", images=1)
    full = questions_with_exemplars(tiny_model.family, "official")
    for short, long in zip(capped, full, strict=True):
        assert short.item.item_id == long.item.item_id
        if short.item.task == "generation":
            continue
        if short.item.modality == "image_textual":
            assert len(long.context_images) == 2 and len(short.context_images) == 1
            assert short.prompt.count("<image>") == 2 and short.prompt.count("Correct Answer:") == 1
        else:  # text-only exemplars carry no image: not capped
            assert short.prompt == long.prompt and short.prompt.count("Correct Answer:") == 2


def official_config(model_dir: Path, out: Path, **options) -> EvaluateConfig:
    return EvaluateConfig(
        model=str(model_dir), data=str(FIXTURE), out=str(out), forget_split="forget_5", protocol="official",
        max_new_tokens=2, splits=("retain",), reverse_attack=False, progress=False, **options,
    )  # fmt: skip


def test_an_overlong_prompt_is_refused_naming_it_before_anything_is_written(tiny_model_dir, tmp_path):
    out = tmp_path / "run" / "metrics.json"
    short = short_context_copy(tiny_model_dir, tmp_path, 64)
    with pytest.raises(PromptTooLongError) as error:
        run(official_config(short, out))
    message = str(error.value)
    named = re.match(
        r"question (retain_95/\d+/(\w+)/\d+) \(split retain, task (\w+)\): its prompt is (\d+)", message
    )
    assert named and named.group(2) == named.group(3), message
    assert "+ 2 (max_new_tokens)" in message and "more than the model's context of 64 positions" in message
    assert int(named.group(4)) + 2 > 64
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written


def test_meta_records_the_longest_prompt_and_the_cap_makes_a_short_context_fit(tiny_model_dir, tmp_path):
    out = tmp_path / "run" / "metrics.json"
    run(official_config(tiny_model_dir, out))
    meta = json.loads((out.parent / "meta.json").read_text())
    longest = meta["longest_prompt"]
    assert meta["max_exemplar_images"] == 4  # the official protocol's cap
    responses = [json.loads(line) for line in (out.parent / "responses.jsonl").read_text().splitlines()]
    loaded = load_model(str(tiny_model_dir))
    # LLaVA's image tokens do not depend on the image: any image stands in for the prompt's own
    blank = Image.new("RGB", (8, 8))
    lengths = {
        (r["item_id"], r["split"]): len(
            loaded.family.encode_prompts(
                loaded.processor, [r["prompt"]], [blank] * r["prompt"].count("<image>")
            )["input_ids"][0]
        )
        for r in responses
    }
    assert longest["tokens"] == max(lengths.values()) == lengths[(longest["item_id"], longest["split"])]
    assert (
        longest["context"] == 1024
        and longest["images"] == 2
        and longest["task"] in ("classification", "cloze")
    )
    # A context the exemplar images overflow fits once they are capped to none.
    short = short_context_copy(tiny_model_dir, tmp_path, longest["tokens"] + 1)
    with pytest.raises(PromptTooLongError):
        run(official_config(short, tmp_path / "uncapped" / "metrics.json"))
    run(official_config(short, tmp_path / "capped" / "metrics.json", max_exemplar_images=0))
    capped = json.loads((tmp_path / "capped" / "meta.json").read_text())["longest_prompt"]
    assert capped["tokens"] + 2 <= longest["tokens"] + 1 and capped["images"] <= 1  # the query's own at most
