"""The relearning attack: which people the attacker relearns on, that training sees only them, that it
trains on from the unlearned adapter, evaluation of the held-out people, and the recovery in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import pipeline.evaluation.shared_base as shared_base
import stages.evaluate as evaluate
import stages.train as train
from pipeline.benchmarks.mllmu import load_unlearning_samples
from pipeline.evaluation.relearning import MIN_FORGOTTEN, heldout_people, recovery, relearning_people
from pipeline.reporting.robustness import relearning_finding, relearning_results, robustness_table
from pipeline.reporting.runs import Run, resample_runs, summarize
from stages.config import EvaluateConfig, RelearnConfig, TrainConfig
from stages.relearn import run as relearn
from stages.relearn import train_config

FORGET = "forget_10"

# ---------------------------------------------------------------------------------------------------------
# The split of the forget people


@settings(max_examples=60, deadline=None)
@given(people=st.integers(2, 40), fraction=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_the_relearned_people_are_a_seeded_part_leaving_at_least_one_out(people, fraction, seed):
    ids = [f"{index:03d}" for index in range(people)]
    chosen = relearning_people(ids, fraction, seed)
    assert chosen == relearning_people(list(reversed(ids)), fraction, seed)  # whatever the data's order
    assert set(chosen) <= set(ids) and len(set(chosen)) == len(chosen)
    assert len(chosen) == min(max(1, round(fraction * people)), people - 1)


def test_one_forget_person_cannot_be_split():
    with pytest.raises(ValueError, match="at least 2 forget people"):
        relearning_people(["001", "001"], 0.25, 0)


# ---------------------------------------------------------------------------------------------------------
# Recovery


def test_recovery_is_the_share_of_the_forgotten_gap_that_comes_back():
    assert recovery(0.2, 0.2, 0.9) == 0.0
    assert recovery(0.2, 0.9, 0.9) == 1.0
    assert recovery(0.2, 0.55, 0.9) == pytest.approx(0.5)
    assert recovery(0.88, 0.9, 0.9) is None  # unlearning took less than MIN_FORGOTTEN away


def test_recovery_of_resampled_means_is_elementwise_and_nan_where_nothing_was_forgotten():
    before, after, full = np.array([0.2, 0.2, 0.88]), np.array([0.55, 0.9, 0.9]), np.array([0.9, 0.9, 0.9])
    values = recovery(before, after, full)
    assert values[:2] == pytest.approx([0.5, 1.0]) and np.isnan(values[2])
    assert recovery(0.88, 0.9, 0.9 + MIN_FORGOTTEN / 2) is None


# ---------------------------------------------------------------------------------------------------------
# Training only on the relearned people, from the unlearned adapter


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.mini_world.config import WorldConfig
    from pipeline.mini_world.world import write_world

    # 20 people: forget_10 holds two, one relearned and one held out.
    return write_world(tmp_path_factory.mktemp("world"), WorldConfig(num_people=20, num_real=2))


@pytest.fixture(scope="module")
def unlearned(world, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unlearned") / "ga"
    train.run(
        TrainConfig(
            model=str(tiny_model_dir), data=world.data_dir, out=str(out), method="ga", forget_split=FORGET,
            lr=5e-3, batch_size=2, epochs=1,
        )
    )  # fmt: skip
    return out


def relearn_config(world, tiny_model_dir, adapter: Path | None, out: Path) -> RelearnConfig:
    return RelearnConfig(
        model=str(tiny_model_dir), data=world.data_dir, adapter=str(adapter) if adapter else None, out=str(out),
        forget_split=FORGET, fraction=0.25, lr=5e-3, batch_size=2, epochs=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def relearned(world, tiny_model_dir, unlearned, tmp_path_factory):
    """The relearned adapter, and the person of every sample its loss steps saw."""
    seen: list[str] = []
    original = train.LossStep.__call__

    def recording(self, forget_items, retain_items):
        seen.extend(sample.person_id for sample, _ in forget_items)
        return original(self, forget_items, retain_items)

    train.LossStep.__call__ = recording
    try:
        out = tmp_path_factory.mktemp("relearned") / "ga"
        meta = relearn(relearn_config(world, tiny_model_dir, unlearned, out))
    finally:
        train.LossStep.__call__ = original
    return out, meta, seen


def test_relearning_trains_only_on_the_relearned_peoples_qa(world, relearned):
    out, meta, seen = relearned
    people = sorted({sample.person_id for sample in load_unlearning_samples(world.data_dir, FORGET, ("qa",))})
    chosen = relearning_people(people, 0.25, 0)
    assert len(chosen) == 1 and len(people) == 2
    assert set(seen) == set(chosen) and seen  # every step's samples, and nothing of the held-out person
    relearned_qa = [
        s for s in load_unlearning_samples(world.data_dir, FORGET, ("qa",)) if s.person_id in chosen
    ]
    assert meta["forget_samples"] == len(relearned_qa) and len(seen) == 2 * len(relearned_qa)  # 2 epochs
    assert meta["params"]["forget_people"] == chosen and meta["loss"] == "finetune"
    assert heldout_people(out, FORGET, people, meta["params"]["init_adapter"]) == sorted(
        set(people) - set(chosen)
    )


def test_training_on_from_an_adapter_starts_at_its_weights(world, tiny_model_dir, unlearned, tmp_path):
    out = tmp_path / "barely"
    train.run(
        TrainConfig(
            model=str(tiny_model_dir), data=world.data_dir, out=str(out), method="finetune",
            forget_split=FORGET, lr=1e-12, batch_size=2, epochs=1, init_adapter=str(unlearned),
        )
    )  # fmt: skip
    start, end = (
        load_file(str(unlearned / "adapter_model.safetensors")),
        load_file(str(out / "adapter_model.safetensors")),
    )
    assert start.keys() == end.keys()
    assert any(float(value.abs().max()) > 0 for key, value in start.items() if "lora_B" in key)  # GA moved B
    for key in start:
        torch.testing.assert_close(end[key], start[key], atol=1e-8, rtol=0)


def test_a_relearned_run_is_redone_when_its_unlearned_adapter_changed(
    world, tiny_model_dir, unlearned, tmp_path
):
    """relearn skips a completed attack only while the adapter it trained on from is the same by content:
    an unlearned adapter retrained at the same path is attacked again, not handed the old result."""
    import shutil

    start, out = tmp_path / "unlearned", tmp_path / "relearned"
    shutil.copytree(unlearned, start)
    config, steps = relearn_config(world, tiny_model_dir, start, out), []
    first = relearn(config)
    assert train.run(train_config(config), on_step=steps.append) == first and not steps  # unchanged: skipped
    weights = load_file(str(start / "adapter_model.safetensors"))
    save_file({key: value * 2 for key, value in weights.items()}, str(start / "adapter_model.safetensors"))
    again = train.run(train_config(config), on_step=steps.append)
    assert steps and again["inputs"]["init_adapter"] != first["inputs"]["init_adapter"]


def test_an_unknown_person_to_train_on_is_named(world, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--forget-people 999: not in forget_10"):
        train.run(
            TrainConfig(
                model=str(tiny_model_dir), data=world.data_dir, out=str(tmp_path / "x"), method="finetune",
                forget_split=FORGET, forget_people=("999",),
            )
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Evaluating the held-out people


def test_evaluate_scores_the_held_out_people_before_and_after_relearning(
    world, tiny_model_dir, unlearned, relearned, tmp_path
):
    out, meta, _ = relearned
    metrics = evaluate.run(
        EvaluateConfig(
            model=str(tiny_model_dir), data=world.data_dir, adapter=str(unlearned), relearned=str(out),
            out=str(tmp_path / "run" / "metrics.json"), splits=("forget",), reverse_attack=False,
            max_new_tokens=4, progress=False,
        )
    )  # fmt: skip
    assert {"forget", "forget_heldout", "forget_relearned"} <= set(metrics)
    records = [json.loads(line) for line in (tmp_path / "run" / "responses.jsonl").read_text().splitlines()]
    held_out = set(json.loads((tmp_path / "run" / "meta.json").read_text())["heldout_people"])
    assert held_out and not held_out & set(meta["params"]["forget_people"])
    by_split = {}
    for record in records:
        by_split.setdefault(record["split"], {})[record["item_id"]] = record
    for split in ("forget_heldout", "forget_relearned"):
        assert {item.split("/")[1] for item in by_split[split]} == held_out
    # The held-out questions are the forget questions of those people; asked of the same (unlearned) model
    # they get the same replies.
    forget_of_heldout = {k: v for k, v in by_split["forget"].items() if k.split("/")[1] in held_out}
    assert forget_of_heldout.keys() == by_split["forget_heldout"].keys()
    assert all(
        by_split["forget_heldout"][k]["generated"] == v["generated"] for k, v in forget_of_heldout.items()
    )


def test_a_relearned_adapter_from_another_start_is_refused_before_the_model_loads(
    world, relearned, tmp_path, monkeypatch
):
    out, _, _ = relearned
    monkeypatch.setattr(shared_base, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=r"trained on from adapter .*, not from --adapter None"):
        evaluate.run(
            EvaluateConfig(
                model="unused", data=world.data_dir, relearned=str(out), out=str(tmp_path / "m.json"),
                progress=False,
            )
        )  # fmt: skip
    assert not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------------------------------------------
# The report's robustness table


def fake_run(
    root: Path, name: str, heldout: dict[str, list[float]], relearned: dict[str, list[float]]
) -> Run:
    """A run whose responses.jsonl holds cloze scores per held-out person (one list entry per question)."""
    directory = root / name
    directory.mkdir(parents=True)
    lines, metrics = [], {}
    for split, people in (("forget_heldout", heldout), ("forget_relearned", relearned)):
        for person, scores in people.items():
            for index, score in enumerate(scores):
                lines.append(
                    {"split": split, "item_id": f"forget_10/{person}/cloze/{index}", "task": "cloze",
                     "modality": "image_textual", "scores": {"correct": score}}
                )  # fmt: skip
        every = [score for scores in people.values() for score in scores]
        metrics[split] = {"cloze_acc": sum(every) / len(every)}
    (directory / "responses.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return Run(name, name.split("-s")[0], metrics, {"heldout_people": sorted(heldout)}, directory)


def test_the_report_gives_before_after_and_recovery_over_seeds_and_people(tmp_path):
    full = fake_run(tmp_path, "full", {"a": [1, 1], "b": [1, 0]}, {"a": [1, 1], "b": [1, 1]})
    runs = [
        full,
        fake_run(tmp_path, "ga-s0", {"a": [0, 0], "b": [0, 0]}, {"a": [1, 1], "b": [1, 0]}),
        fake_run(tmp_path, "ga-s1", {"a": [0, 0], "b": [0, 0]}, {"a": [1, 0], "b": [1, 1]}),
        fake_run(tmp_path, "npo-s0", {"a": [0, 0], "b": [0, 0]}, {"a": [0, 0], "b": [0, 0]}),
    ]
    summary = summarize(runs)
    results = relearning_results(summary, resample_runs(runs, draws=400))
    ga = results["ga"]["cloze_acc"]
    assert (ga.before, ga.after) == (0.0, 0.75)
    assert ga.recovery == pytest.approx(0.75 / 0.75)  # the full model's held-out level is 0.75
    assert ga.came_back and ga.lower > 0 and ga.basis == "people and seeds (ga 2)"
    assert ga.interval[0] <= ga.recovery <= ga.interval[1]  # the gap is at least 0.5 in every resample
    npo = results["npo"]["cloze_acc"]
    assert npo.recovery == 0.0 and not npo.came_back  # nothing came back in any resample
    assert npo.basis == "people only (one seed)"
    assert results["full"]["cloze_acc"].recovery is None  # the control has no recovery of its own
    table = robustness_table(results, summary)
    assert "| GA | 0.0 → 75.0 | 1.00 [" in table
    finding = relearning_finding(results)
    assert (
        "came back (Cloze after - before, 95% lower limit over people and seeds above 0): GA recovery"
        in finding
    )
    assert "rests on people and seeds (ga 2)" in finding
    assert "No recovery detected (the lower limit reaches 0): NPO recovery 0.00" in finding


def test_the_ratio_gets_an_interval_where_the_gap_surely_clears_the_floor(tmp_path):
    people = [str(p) for p in range(12)]
    runs = [
        fake_run(tmp_path, "full", dict.fromkeys(people, [0.9]), dict.fromkeys(people, [0.9])),
        fake_run(tmp_path, "ga-s0", {p: [0.1 + 0.01 * i] for i, p in enumerate(people)},
                 {p: [0.5 + 0.01 * i] for i, p in enumerate(people)}),
    ]  # fmt: skip
    ga = relearning_results(summarize(runs), resample_runs(runs, draws=400))["ga"]["cloze_acc"]
    assert ga.came_back and ga.interval is not None
    assert ga.interval[0] < ga.recovery < ga.interval[1]


def test_knowledge_came_back_is_judged_on_all_paired_resamples(tmp_path):
    """Issue 30, defect 2: held-out cloze 0.60 -> 0.65 for 5 people and 0.70 -> 0.65 for 3, full 0.70.
    The recovery of the means is 0.2, but after <= before in about 35% of all resamples of the people;
    dropping the resamples whose gap is under 0.05 (those where less came back) printed
    'recovery 0.20 [0.20, 0.50]' and 'knowledge came back'."""
    up, down = [str(p) for p in range(5)], [str(p) for p in range(5, 8)]
    before = {**dict.fromkeys(up, [0.60]), **dict.fromkeys(down, [0.70])}
    after = dict.fromkeys(up + down, [0.65])
    everyone = dict.fromkeys(up + down, [0.70])
    runs = [fake_run(tmp_path, "full", everyone, everyone), fake_run(tmp_path, "ga-s0", before, after)]
    summary = summarize(runs)
    resamples = resample_runs(runs, draws=2000)
    results = relearning_results(summary, resamples)
    ga = results["ga"]["cloze_acc"]
    assert ga.before == pytest.approx(0.6375) and ga.after == pytest.approx(0.65)
    diff = (
        resamples.people_values[("ga", "forget_relearned", "cloze_acc")]
        - resamples.people_values[("ga", "forget_heldout", "cloze_acc")]
    )
    assert np.mean(diff <= 1e-12) == pytest.approx(0.349, abs=0.03)  # P(Bin(8, 5/8) <= 4)
    finding = relearning_finding(results)
    assert "came back (Cloze after - before, 95% lower limit over people and seeds above 0): none" in finding
    assert "No recovery detected (the lower limit reaches 0): GA recovery 0.20 (gap too small" in finding
    assert "| GA | 63.8 → 65.0 | 0.20 (gap too small for a ratio) |" in robustness_table(results, summary)


def test_seeds_fill_the_path_options_and_set_the_runs_own_seed():
    from stages.cli import seeded

    values = {
        "out": "work/relearned/ga-s{seed}",
        "adapter": "work/adapters/ga-s{seed}",
        "relearned": None,
        "seed": 0,
    }
    assert seeded(values, "2", ("out", "adapter"), sets_seed=True) == {
        **values, "out": "work/relearned/ga-s2", "adapter": "work/adapters/ga-s2", "seed": 2,
    }  # fmt: skip
    evaluation = seeded(values, "2", ("out", "adapter", "relearned"), sets_seed=False)
    assert (
        evaluation["seed"] == 0 and evaluation["relearned"] is None and evaluation["adapter"].endswith("s2")
    )
