"""Evaluation split over processes: shards generate their batches, the merging run scores them all, and the
metrics equal one process's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.evaluate import EvaluateConfig, SharedBase, run

FIXTURE = Path(__file__).parent / "fixtures" / "mllmu_bench"


def options(model: Path, out: Path) -> dict:
    return {
        "model": str(model),
        "data": str(FIXTURE),
        "out": str(out),
        "forget_split": "forget_5",
        "max_new_tokens": 4,
        "batch_size": 3,
        "progress": False,
    }


def flags(values: dict) -> list[str]:
    result = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        result += [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return result


def test_two_shard_processes_and_a_merge_give_one_processs_metrics(tiny_model_dir, tmp_path, monkeypatch):
    single = tmp_path / "single" / "metrics.json"
    expected = run(EvaluateConfig(**options(tiny_model_dir, single)))
    sharded = tmp_path / "sharded" / "metrics.json"
    command = [sys.executable, "-m", "stages", "--params", str(tmp_path / "none.yaml"), "evaluate"]
    (tmp_path / "none.yaml").write_text("{}\n")
    shards = [
        subprocess.Popen(
            [
                *command,
                *flags(options(tiny_model_dir, sharded)),
                "--shard-index",
                str(i),
                "--num-shards",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for shard in shards:
        stdout, stderr = shard.communicate(timeout=600)
        assert shard.returncode == 0, stderr[-2000:]
        summary = json.loads(stdout[stdout.index("{") :])
        assert summary["batches"] > 0 and summary["num_shards"] == 2
    assert (
        not sharded.exists() and not (sharded.parent / "token_probs.json").exists()
    )  # a shard scores nothing
    journals = sorted(path.name for path in sharded.parent.glob(".generation-journal.shard-*"))
    assert journals == [
        ".generation-journal.shard-00000-of-00002.jsonl",
        ".generation-journal.shard-00001-of-00002.jsonl",
    ]

    from transformers import LlavaForConditionalGeneration

    def no_generation(*args, **kwargs):
        raise AssertionError("the merging run generated a batch the shards had generated")

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", no_generation)
    merged = run(EvaluateConfig(**options(tiny_model_dir, sharded), num_shards=2))
    assert merged == expected
    responses = [
        (sharded.parent / "responses.jsonl").read_text(),
        (single.parent / "responses.jsonl").read_text(),
    ]
    assert responses[0] == responses[1]
    assert (sharded.parent / "token_probs.json").read_text() == (
        single.parent / "token_probs.json"
    ).read_text()
    assert not list(sharded.parent.glob(".*journal*"))  # the merge leaves no journal behind


def test_a_shard_index_outside_the_shards_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--shard-index 2 is outside 0..1"):
        run(EvaluateConfig(**options(tiny_model_dir, tmp_path / "m.json"), shard_index=2, num_shards=2))


def test_runs_sharing_one_loaded_model_score_as_runs_that_load_their_own(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The seeds of a method are evaluated on one loaded base model, each run's adapter replacing the last."""
    from test_evaluate import save_adapter  # tests/ is on sys.path under pytest's default import mode

    import pipeline.evaluation.shared_base as shared_base

    adapters = [save_adapter(tiny_model_dir, tmp_path / f"adapter-{seed}", seed=seed) for seed in range(2)]
    separate = [
        run(EvaluateConfig(**options(tiny_model_dir, tmp_path / f"own-{i}" / "metrics.json"), adapter=str(a)))
        for i, a in enumerate(adapters)
    ]
    loads = []
    original = shared_base.load_model
    monkeypatch.setattr(shared_base, "load_model", lambda *a, **k: loads.append(a) or original(*a, **k))
    base = SharedBase()
    shared = [
        run(
            EvaluateConfig(
                **options(tiny_model_dir, tmp_path / f"shared-{i}" / "metrics.json"), adapter=str(a)
            ),
            base,
        )
        for i, a in enumerate(adapters)
    ]
    assert shared == separate and separate[0] != separate[1]
    assert len(loads) == 1 and list(base.model.peft_config) == ["evaluated-2"]


def test_a_merge_without_the_shards_journals_is_refused_before_generating(
    tiny_model_dir, tmp_path, monkeypatch
):
    """--num-shards 2 with no shard run (or one of two) names each missing shard and its journal, instead of
    generating every batch in one process."""
    from transformers import LlavaForConditionalGeneration

    def no_generation(*args, **kwargs):
        raise AssertionError("the merging run generated before refusing")

    out = tmp_path / "sharded" / "metrics.json"
    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", no_generation)
    with pytest.raises(ValueError, match=r"shard 0: no journal .*\.generation-journal\.shard-00000-of-00002"):
        run(EvaluateConfig(**options(tiny_model_dir, out), num_shards=2))
    monkeypatch.undo()

    run(EvaluateConfig(**options(tiny_model_dir, out), shard_index=0, num_shards=2))
    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", no_generation)
    with pytest.raises(
        ValueError, match=r"missing:\n  shard 1: no journal [^\n]*shard-00001-of-00002\.jsonl\nrun"
    ):
        run(EvaluateConfig(**options(tiny_model_dir, out), num_shards=2))
    with pytest.raises(ValueError, match=r"shard 0: .* was written for other inputs"):
        run(EvaluateConfig(**{**options(tiny_model_dir, out), "max_new_tokens": 5}, num_shards=2))
    assert not out.exists()
