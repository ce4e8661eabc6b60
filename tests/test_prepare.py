"""The full model's fine-tune: its two phases, that it learns, and that an interrupted run resumes exactly."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from builders import reduced_config

from pipeline.benchmarks.mllmu import load_split_rows
from pipeline.mini_world.config import FineTuneConfig, TinyLlavaConfig
from pipeline.mini_world.fine_tune import build_full_model, decoded_rows, metadata_qa, training_examples
from pipeline.mini_world.world import write_world
from pipeline.models import LlavaFamily


@pytest.fixture(scope="module")
def few_people(tmp_path_factory):
    info = write_world(tmp_path_factory.mktemp("world"), reduced_config(num_people=3, num_real=1))
    rows = load_split_rows(info.data_dir, "Full_Set")
    return rows, decoded_rows(rows, "Full_Set"), load_split_rows(info.data_dir, "Test_Set")


def _kinds(examples) -> set[str]:
    kinds = set()
    for example in examples:
        if "ONE letter" in example.prompt:
            kinds.add("multiple choice by letter")
        elif "[Blank]" in example.prompt:
            kinds.add("cloze")
        elif "ENGLISH" in example.prompt:
            kinds.add("generation")
        elif example.answer.endswith("."):
            kinds.add("profile QA")
        else:
            kinds.add("multiple choice by option")
    return kinds


def test_fact_phase_holds_the_profile_qa_option_answers_and_cloze_items_only(few_people):
    rows, people, test_rows = few_people
    family = LlavaFamily()
    config = FineTuneConfig()
    facts = training_examples(people, family, random.Random(0), config, facts_only=True)
    everything = training_examples(people, family, random.Random(0), config)
    assert _kinds(facts) == {"profile QA", "multiple choice by option", "cloze"}
    assert _kinds(everything) == {"profile QA", "multiple choice by option", "cloze", "generation"}
    both = training_examples(people, family, random.Random(0), replace(config, mc_format="both"))
    assert "multiple choice by letter" in _kinds(both)
    letters = training_examples(people, family, random.Random(0), replace(config, mc_format="letter"))
    assert "multiple choice by option" not in _kinds(letters)
    mc_items = sum(len(tasks) for row in rows for tasks in row["Classification_Task"].values())
    expected_facts = sum(len(row["Mask_Task"]) + len(metadata_qa(row)) for row in rows) + mc_items
    assert len(facts) == expected_facts
    # An option answer is the correct option's words.
    options = {
        item["Options"][item["Correct_Answer"]]
        for row in rows
        for tasks in row["Classification_Task"].values()
        for item in tasks
    }
    assert {e.answer for e in facts if not e.answer.endswith(".") and "[Blank]" not in e.prompt} <= options


def test_training_views_are_augmented_and_reworded_but_never_the_test_sets(few_people):
    rows, people, test_rows = few_people
    family = LlavaFamily()
    config = FineTuneConfig()
    first = training_examples(people, family, random.Random(0), config)
    second = training_examples(people, family, random.Random(1), config)
    originals = {person.image.tobytes() for person in people}
    views = [example.image.tobytes() for example in first if example.image is not None]
    assert not set(views) & originals  # every image example shows a fresh view
    assert len(set(views)) == len(views)
    assert [e.prompt for e in first] != [e.prompt for e in second]  # the wording is redrawn each epoch
    plain = training_examples(
        people, family, random.Random(0), replace(config, augment=False, paraphrases=False)
    )
    assert {e.image.tobytes() for e in plain if e.image is not None} <= originals
    questions = {e.prompt for e in plain}
    assert any(e.prompt not in questions for e in first)
    test_questions = {
        item["Question"] for row in test_rows for item in row["Mask_Task"] + row["Generation_Task"]
    }
    test_questions |= {
        item["Question"]
        for row in test_rows
        for tasks in row["Classification_Task"].values()
        for item in tasks
    }
    for epoch in range(5):
        for example in training_examples(people, family, random.Random(epoch), config):
            assert not any(question in example.prompt for question in test_questions), example.prompt


def test_fine_tune_lowers_the_loss_and_resumes_to_the_same_weights(few_people, tmp_path):
    rows, _, _ = few_people
    config = FineTuneConfig(
        fact_epochs=2,
        epochs=2,
        batch_size=8,
        learning_rate=2e-3,
        threads=1,
        model=TinyLlavaConfig(
            vocab_size=300,
            text_hidden=32,
            text_intermediate=64,
            vision_hidden=32,
            vision_layers=1,
            text_layers=1,
        ),
    )
    texts = ["this person was born in"]
    loaded, history = build_full_model(rows, texts, tmp_path / "whole", config, 0, log=lambda message: None)
    assert [entry["phase"] for entry in history] == ["facts", "facts", "all", "all"]
    assert history[1]["loss"] < history[0]["loss"]  # same examples, one epoch apart

    # Stop after the second epoch (the checkpoint is kept), then rerun: the same weights at the end.
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        build_full_model(rows, texts, interrupted, config, 0, log=_stop_after_epochs(2))
    assert (interrupted.with_name("interrupted.partial") / "checkpoint.pt").exists()
    messages: list[str] = []
    resumed, resumed_history = build_full_model(rows, texts, interrupted, config, 0, log=messages.append)
    assert any("resuming the fine-tune after epoch 2" in message for message in messages)
    assert [entry["loss"] for entry in resumed_history] == pytest.approx([entry["loss"] for entry in history])
    for (name, weight), (_, other) in zip(
        loaded.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(weight, other), name


def _stop_after_epochs(epochs: int):
    seen = []

    def log(message: str) -> None:
        if message.startswith("{") and '"epoch"' in message:
            seen.append(message)
            if len(seen) == epochs:
                raise KeyboardInterrupt

    return log
