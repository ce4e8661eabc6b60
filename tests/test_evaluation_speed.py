"""Evaluation at real scale: the adapter merged while answering, batches by prompt tokens, likelihood multiple
choice from one prefill per question (journaled and sharded like generation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import build_random_tiny_qwen2_vl
from PIL import Image

import pipeline.evaluation.answering as answering
from pipeline.benchmarks import EvalItem
from pipeline.evaluation.answering import token_order
from pipeline.evaluation.questions import Question
from pipeline.models import (
    PromptedSample,
    answer_token_log_probs,
    continuation_log_probs,
    generate,
    load_model,
    prompt_token_counts,
)
from pipeline.models.adapters import merged
from stages.evaluate import EvaluateConfig, run

FIXTURE = Path(__file__).parent / "fixtures" / "mllmu_bench"
RED, GREEN = Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (64, 48), (0, 90, 10))


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return load_model(str(build_random_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen") / "model")))


def option_prompts(family) -> tuple[list[PromptedSample], list[list[str]]]:
    """Image and text-only questions in one batch, options of different token lengths and counts."""
    prompts = [
        PromptedSample(family.build_prompt("What is the occupation of this person?", True), RED),
        PromptedSample(family.build_prompt("Where was Mara Holt born?", False), None),
        PromptedSample(family.build_prompt("What is this person's hobby?", True), GREEN),
    ]
    options = [
        ["teacher", "a civil engineer in Copenhagen", "pilot", "nurse"],
        ["Copenhagen", "Oslo in 1984"],
        ["chess", "painting and chess in free time", "baking"],
    ]
    return prompts, options


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_options_scored_from_one_prefill_equal_one_teacher_forced_pass_per_option(family, request):
    loaded = request.getfixturevalue("tiny_model" if family == "llava" else "tiny_qwen")
    prompts, options = option_prompts(loaded.family)
    per_option = [
        PromptedSample(p.prompt, p.image, text)
        for p, row in zip(prompts, options, strict=True)
        for text in row
    ]
    expected = answer_token_log_probs(loaded, loaded.model, per_option, batch_size=4)
    for batch_size in (1, 2, 3):
        scored = continuation_log_probs(loaded, loaded.model, prompts, options, batch_size)
        assert [len(row) for row in scored] == [len(row) for row in options]
        flat = [values for row in scored for values in row]
        assert len({len(values) for values in flat}) > 2  # options of several token lengths
        for got, want in zip(flat, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_prompts_are_batched_by_their_tokens_images_included_not_their_characters(tiny_model, monkeypatch):
    family = tiny_model.family
    item = EvalItem("x", "p", "Ada", "generation", "image_textual", "Name?", "Ada")

    def prompt(images: int, padding: int = 0) -> str:
        exemplars = (family.image_placeholder + " Name? Ada.\n") * max(images - 1, 0)
        return family.build_prompt("Name?" + "x" * padding, images > 0, exemplars=exemplars)

    longest = max(len(prompt(images)) for images in (0, 1, 2))
    questions = [
        Question("forget", item, prompt(images, longest - len(prompt(images))), RED if images else None,
                 (GREEN,) * max(images - 1, 0))
        for images in (2, 0, 1)
    ]  # fmt: skip
    assert len({len(q.prompt) for q in questions}) == 1  # equal characters
    counts = prompt_token_counts(tiny_model, [answering.prompted_question(q) for q in questions])
    assert counts[0] > counts[2] > counts[1]  # two images > one > none
    assert token_order(tiny_model, questions) == [1, 2, 0]

    batches: list[list[int]] = []
    original = answering.generate

    def recording(loaded, samples, **kwargs):
        batches.append([len(sample.images) for sample in samples])
        return original(loaded, samples, **kwargs)

    monkeypatch.setattr(answering, "generate", recording)
    settings = answering.AnswerSettings(max_new_tokens=1, batch_size=2, progress=False)
    answering.answer_questions(tiny_model, tiny_model.model, _NoReply(), questions, _NoJournal(), settings)
    assert batches == [[0, 1, 2]]  # in token order: batched as [none, one image], [two images]


class _NoReply:
    name = "fixed"

    def reply(self, prompt: str, text: str) -> str:
        return text


class _NoJournal:
    done: dict = {}
    key = ""

    def record(self, unit, value) -> None:
        pass


def test_a_merged_adapter_generates_the_unmerged_tokens_has_no_lora_and_leaves_the_model_as_it_was(
    tiny_model_dir,
):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    loaded = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=loaded.family.lora_target_modules, init_lora_weights=False
    )
    model = get_peft_model(loaded.model, config).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    prompts, _ = option_prompts(loaded.family)
    with torch.no_grad(), model.disable_adapter():
        base_replies = generate(loaded, prompts, max_new_tokens=8, model=model)
    unmerged = generate(loaded, prompts, max_new_tokens=8, model=model)
    assert unmerged != base_replies  # the adapter changes the replies: a merge that dropped it would show
    with merged(model) as answering_model:
        assert not any(isinstance(module, BaseTunerLayer) for module in answering_model.modules())
        assert generate(loaded, prompts, max_new_tokens=8, model=answering_model) == unmerged
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # bit for bit
    assert any(isinstance(module, BaseTunerLayer) for module in model.modules())
    assert generate(loaded, prompts, max_new_tokens=8, model=model) == unmerged
    with merged(model, merge=False) as same:
        assert same is model


def options(model: Path, out: Path, **more) -> dict:
    return {
        "model": str(model),
        "data": str(FIXTURE),
        "out": str(out),
        "forget_split": "forget_5",
        "splits": ("forget", "retain"),
        "reverse_attack": False,
        "max_new_tokens": 2,
        "batch_size": 2,
        "mc_scoring": "likelihood",
        "progress": False,
        **more,
    }


def test_a_killed_likelihood_run_resumes_without_rescoring_finished_questions(
    tiny_model_dir, tmp_path, monkeypatch
):
    expected = run(EvaluateConfig(**options(tiny_model_dir, tmp_path / "whole" / "metrics.json")))
    out = tmp_path / "killed" / "metrics.json"
    original, scored = answering.option_totals, []

    def killed_after_one(loaded, model, questions):
        if len(scored) == 1:
            raise KeyboardInterrupt("killed")
        scored.append([q.item.item_id for q in questions])
        return original(loaded, model, questions)

    monkeypatch.setattr(answering, "option_totals", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run(EvaluateConfig(**options(tiny_model_dir, out)))
    first, rescored = [i for batch in scored for i in batch], []

    def counting(loaded, model, questions):
        rescored.extend(q.item.item_id for q in questions)
        return original(loaded, model, questions)

    monkeypatch.setattr(answering, "option_totals", counting)
    assert run(EvaluateConfig(**options(tiny_model_dir, out))) == expected
    assert rescored and not set(first) & set(rescored)
    assert (out.parent / "responses.jsonl").read_text() == (
        tmp_path / "whole" / "responses.jsonl"
    ).read_text()


def test_two_likelihood_shards_and_a_merge_equal_one_process(tiny_model_dir, tmp_path, monkeypatch):
    expected = run(EvaluateConfig(**options(tiny_model_dir, tmp_path / "one" / "metrics.json")))
    out = tmp_path / "sharded" / "metrics.json"
    shares = [
        run(EvaluateConfig(**options(tiny_model_dir, out, shard_index=i, num_shards=2))) for i in (0, 1)
    ]
    assert all(share["batches"] > 0 for share in shares) and not out.exists()
    journals = sorted(out.parent.glob(".generation-journal.shard-*"))
    assert all('"unit": "mc:' in path.read_text() for path in journals)  # each shard scored options

    def no_scoring(*args, **kwargs):
        raise AssertionError("the merging run scored options the shards had scored")

    monkeypatch.setattr(answering, "option_totals", no_scoring)
    assert run(EvaluateConfig(**options(tiny_model_dir, out, num_shards=2))) == expected
    assert (out.parent / "responses.jsonl").read_text() == (tmp_path / "one" / "responses.jsonl").read_text()
