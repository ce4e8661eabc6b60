"""The full model's fine-tune: its two phases, that it learns, and that an interrupted run resumes exactly."""

from __future__ import annotations

import random

import pytest
import torch
from builders import reduced_config

from pipeline.data import load_split_rows
from pipeline.mini_world.config import FineTuneConfig, TinyLlavaConfig
from pipeline.mini_world.fine_tune import build_full_model, decoded_rows, metadata_qa, training_examples
from pipeline.mini_world.world import write_world
from pipeline.models import LlavaFamily


@pytest.fixture(scope="module")
def few_people(tmp_path_factory):
    info = write_world(tmp_path_factory.mktemp("world"), reduced_config(num_people=3, num_real=1))
    rows = load_split_rows(info.data_dir, "Full_Set")
    return rows, decoded_rows(rows, "Full_Set")


def _kinds(examples) -> set[str]:
    kinds = set()
    for example in examples:
        if "ONE letter" in example.prompt:
            kinds.add("multiple choice")
        elif "[Blank]" in example.prompt:
            kinds.add("cloze")
        elif "ENGLISH" in example.prompt:
            kinds.add("generation")
        else:
            kinds.add("profile QA")
    return kinds


def test_fact_phase_holds_the_profile_qa_and_cloze_items_only(few_people):
    rows, people = few_people
    family = LlavaFamily()
    facts = training_examples(people, family, random.Random(0), 0.0, facts_only=True)
    everything = training_examples(people, family, random.Random(0), 0.0)
    assert _kinds(facts) == {"profile QA", "cloze"}
    assert _kinds(everything) == {"profile QA", "cloze", "generation", "multiple choice"}
    expected_facts = sum(len(row["Mask_Task"]) + len(metadata_qa(row)) for row in rows)
    assert len(facts) == expected_facts


def test_fine_tune_lowers_the_loss_and_resumes_to_the_same_weights(few_people, tmp_path):
    rows, _ = few_people
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
