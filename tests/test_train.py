"""Stage two on a tiny random LLaVA: every method trains from streamed caches, resumes exactly, runs under
torchrun, and refuses caches from another model or tokenizer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import pipeline.training.reference as reference
from cache import CachedSample, CacheError, IncompatibleCacheError, ShardWriter, truncate_top_p
from pipeline.benchmarks.mllmu import load_unlearning_samples
from pipeline.models import PromptedSample, answer_logits, encode_answers
from pipeline.training.streams import TokenMismatchError
from stages.cli import main
from stages.config import TrainConfig
from stages.train import run

DATA = Path(__file__).parent / "fixtures" / "mllmu_train"  # forget_5: 3 samples, retain_95: 6
FORGET, RETAIN = "forget_5", "retain_95"
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------
# Tiny caches written with the cache writer, from the tiny model itself


def write_cache(
    directory: Path,
    loaded,
    split: str,
    teacher: str,
    blank_image: bool = False,
    model_fingerprint: str | None = None,
    tokenizer_fingerprint: str | None = None,
    edit_tokens_of: str | None = None,
    num_shards: int = 1,
    dtype: str | None = None,
    draws: int = 1,
) -> Path:
    """One row per sample of `split`: the frozen model's top-p distributions over the answer tokens,
    on the sample's own image (an `original`/`base` teacher) or on a blank one (a stand-in teacher that
    differs from the student, so KL terms have gradients)."""
    samples = load_unlearning_samples(DATA, split)
    header = {
        "teacher": teacher,
        "teacher_params": {"blank_image": blank_image, **({"draws": draws} if draws > 1 else {})},
        "top_p": 0.95,
        "max_support": 32,
        "prompt_template": "test",
        "model_fingerprint": model_fingerprint or loaded.model_fingerprint,
        "tokenizer_fingerprint": tokenizer_fingerprint or loaded.tokenizer_fingerprint,
        "model_parts": loaded.model_parts,
        "dataset_fingerprint": "test",
        "vocab_size": loaded.model.config.text_config.vocab_size,
        **({"dtype": dtype} if dtype else {}),
    }
    for shard in range(num_shards):
        with ShardWriter(directory, shard, num_shards, header) as writer:
            for sample, draw in [(s, d) for s in samples[shard::num_shards] for d in range(draws)]:
                grey = 128 + 40 * draw
                image = Image.new("RGB", (32, 32), (grey, grey, grey)) if blank_image else sample.pil_image()
                prompt = loaded.family.build_prompt(sample.question, True)
                batch = encode_answers(loaded, [PromptedSample(prompt, image, sample.answer)])
                with torch.no_grad():
                    logits = answer_logits(loaded.model, batch)
                answer_ids = batch.targets.clone()
                if sample.sample_id == edit_tokens_of:
                    answer_ids[0] = (answer_ids[0] + 1) % logits.shape[-1]
                log_probs = torch.log_softmax(logits, -1)[torch.arange(len(answer_ids)), batch.targets]
                cached = CachedSample.from_distributions(
                    sample.sample_id, answer_ids, truncate_top_p(logits, 0.95, 32), log_probs, draw
                )
                writer.write(cached, {"prompt": prompt})
    return directory


@pytest.fixture(scope="module")
def caches(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    return {
        "teacher": write_cache(root / "teacher", tiny_model, FORGET, "viker", blank_image=True, num_shards=2),
        "original": write_cache(root / "original", tiny_model, FORGET, "original"),
        "base": write_cache(root / "base", tiny_model, RETAIN, "base"),
    }


def config(model_dir: Path, out: Path, method: str, caches: dict[str, Path], **overrides) -> TrainConfig:
    values = dict(
        model=str(model_dir),
        data=str(DATA),
        out=str(out),
        method=method,
        forget_split=FORGET,
        retain_split=RETAIN,
        lr=5e-3,
        batch_size=2,
        epochs=1,
        seed=0,
        forget_cache=str(caches["teacher"]) if method in ("viker", "vgid") else None,
        retain_cache=str(caches["base"]) if method in ("vgid", "kl_min") else None,
    )
    values.update(overrides)
    return TrainConfig(**values)


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    """The PEFT weights and, where the method trains them, the masked deltas (MMUnlearner)."""
    deltas = out / "masked_delta.safetensors"
    extra = {f"delta:{k}": v for k, v in load_file(str(deltas)).items()} if deltas.is_file() else {}
    return {**load_file(str(out / "adapter_model.safetensors")), **extra}


# ---------------------------------------------------------------------------------------------------------
# Training and what it writes


def test_viker_trains_a_peft_adapter_on_the_language_model_only(tiny_model_dir, caches, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "viker"
    meta = run(config(tiny_model_dir, out, "viker", caches, epochs=2, args={"lambda": 0.5}))

    # PEFT format, loadable on the base model, LoRA only on the language model's attention projections.
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, str(out))
    lora_modules = [name for name, _ in adapted.named_modules() if name.endswith("lora_A")]
    assert lora_modules and all("language_model" in name for name in lora_modules)
    assert {name.split(".")[-2] for name in lora_modules} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    weights = adapter_weights(out)
    assert all("vision_tower" not in key and "multi_modal_projector" not in key for key in weights)
    assert any(float(value.abs().max()) > 0 for key, value in weights.items() if "lora_B" in key)  # it moved

    saved_meta = json.loads((out / "training_meta.json").read_text())
    assert saved_meta == json.loads(json.dumps(meta))
    assert saved_meta["model_fingerprint"] and saved_meta["method"] == "viker"
    assert saved_meta["arguments"] == {"lambda": 0.5} and saved_meta["forget_cache"]["teacher"] == "viker"

    # The step log: one row per optimizer step (3 samples, batch 2: steps of 2 and 1 samples, 2 epochs).
    log = json.loads((out / "train_log.json").read_text())
    assert [row["samples"] for row in log] == [2, 1, 2, 1]
    assert [row["epoch"] for row in log] == [0, 0, 1, 1]
    for row in log:
        assert set(row) >= {"step", "loss", "forget_nll", "regularization", "lr", "step_time_s"}
        assert row["loss"] == pytest.approx(
            -row["forget_nll"] + 0.5 * row["regularization"], rel=1e-5, abs=1e-5
        )
    csv_lines = (out / "train_log.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and "regularization" in csv_lines[0].split(",")
    assert not (out / "checkpoints").exists()


def test_kept_image_features_give_the_same_adapter_as_encoding_every_step(
    tiny_model_dir, caches, tmp_path, monkeypatch
):
    """The vision tower and projector are frozen: features kept between steps change nothing but the time."""
    import pipeline.models as models
    import stages.train as train_stage

    caches_made = []

    class Recording(models.VisionFeatureCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            caches_made.append(self)

    monkeypatch.setattr(train_stage, "VisionFeatureCache", Recording)
    # vgid: forget and retain images in one batch, 2 epochs so that every image comes back.
    run(config(tiny_model_dir, tmp_path / "kept", "vgid", caches, epochs=2))
    run(config(tiny_model_dir, tmp_path / "encoded", "vgid", caches, epochs=2, image_feature_cache_mb=0))
    kept, encoded = caches_made
    assert kept.enabled and kept.reused > kept.encoded > 0
    assert not encoded.enabled and encoded.reused == 0
    kept_weights, encoded_weights = adapter_weights(tmp_path / "kept"), adapter_weights(tmp_path / "encoded")
    assert kept_weights.keys() == encoded_weights.keys()
    for name in kept_weights:
        torch.testing.assert_close(kept_weights[name], encoded_weights[name], rtol=1e-5, atol=1e-6)


def test_the_train_bench_times_runs_taking_turns_that_train_as_alone(tiny_model_dir, caches, tmp_path):
    """bench/train.py's timing: runs alternate step by step in threads, each training exactly as it would alone
    (its own dropout masks across turns), so that its figures are those of the real stage."""
    import importlib.util
    from dataclasses import replace

    spec = importlib.util.spec_from_file_location("train_bench", REPO / "bench" / "train.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)

    runs = {
        "viker": config(tiny_model_dir, tmp_path / "viker", "viker", caches, epochs=2, args={"lambda": 0.5}),
        "vgid": config(tiny_model_dir, tmp_path / "vgid", "vgid", caches, epochs=2),
    }
    assert all(run_config.lora_dropout > 0 for run_config in runs.values())  # masks draw random numbers
    alone = {}
    for name, run_config in runs.items():
        run(replace(run_config, out=str(tmp_path / f"alone-{name}")))
        alone[name] = [
            row["loss"] for row in json.loads((tmp_path / f"alone-{name}" / "train_log.json").read_text())
        ]
    timed = bench.alternating_runs({name: (run_config, None) for name, run_config in runs.items()})
    for name in runs:
        assert timed[name].losses == alone[name]
        steps = len(alone[name])
        assert len(timed[name].step_cpu) == len(timed[name].step_wall) == steps - 1  # step 1 left out
        assert all(seconds > 0 for seconds in timed[name].step_cpu + timed[name].step_wall)


METHOD_ARGS = {"rmu": {"layer": 0}}  # the tiny model has 2 decoder layers: 0 is the one RMU may read


@pytest.mark.parametrize(
    "method", ["ga", "ga_diff", "kl_min", "npo", "po", "idkpo", "rmu", "mmunlearner", "vgid"]
)
def test_every_method_trains(method, tiny_model_dir, caches, tmp_path, monkeypatch):
    calls = []
    original = reference.frozen_answer_log_probs
    monkeypatch.setattr(
        reference,
        "frozen_answer_log_probs",
        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs),
    )
    out = tmp_path / method
    run(config(tiny_model_dir, out, method, caches, epochs=2, args=METHOD_ARGS.get(method, {})))
    log = json.loads((out / "train_log.json").read_text())
    assert len(log) == 4 and all(math.isfinite(row["loss"]) for row in log)
    # Reference log-probs are computed once before training (forget answers, + refusals), not per epoch.
    assert len(calls) == {"npo": 1, "po": 2, "idkpo": 2}.get(method, 0)
    # At step one theta = theta_ref (LoRA's B starts at zero): NPO and IdkPO sit at their closed forms.
    if method == "npo":
        assert log[0]["loss"] == pytest.approx(2 / 0.4 * math.log(2), rel=1e-5)
        assert log[-1]["forget_log_ratio"] < 0  # the forget answers became less likely than under theta_ref
    if method == "idkpo":
        assert log[0]["loss"] == pytest.approx(math.log(2) / 0.4, rel=1e-5)
    if method == "po":
        assert log[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    if method == "rmu":  # at step one the student's hidden states are the frozen model's
        assert log[0]["retain_mse"] == pytest.approx(0.0, abs=1e-6)
        assert log[-1]["forget_mse"] < log[0]["forget_mse"]
    if method == "mmunlearner":
        assert 0 < log[0]["mask_kept"] < 1
    if method in ("ga_diff", "kl_min", "vgid", "rmu", "mmunlearner"):
        assert any(key.startswith("retain") for key in log[0])
    assert any(float(v.abs().max()) > 0 for k, v in adapter_weights(out).items() if "lora_B" in k)


def test_rmu_refuses_a_layer_the_model_cannot_give_before_training(tiny_model_dir, caches, tmp_path):
    """The tiny model has 2 decoder layers: layer 1's output comes after the final norm, so only 0 is read."""
    out = tmp_path / "rmu"
    for args, layer in (({"layer": 1}, 1), ({}, 7)):  # given, or the loss's default (WMDP's 7)
        with pytest.raises(
            ValueError, match=f"rmu argument `layer` {layer} is out of range: the model has 2"
        ):
            run(config(tiny_model_dir, out, "rmu", caches, args=args))
    assert not (out / "train_log.json").exists()


def test_mmunlearner_trains_its_forget_update_in_masked_deltas_that_evaluation_loads(
    tiny_model_dir, caches, tmp_path
):
    """Threshold 0 keeps every entry: the forget term moves the deltas; a threshold no ratio reaches keeps
    none: the deltas stay zero and only the retain term moves the LoRA weights. The saved deltas are part
    of the model evaluation loads."""
    from safetensors.torch import load_file

    from pipeline.models import load_model
    from pipeline.models.adapters import load_adapter
    from pipeline.models.masked_delta import MASKED_DELTA_FILE

    for name, threshold in (("all", 0.0), ("none", 1e30)):
        run(config(tiny_model_dir, tmp_path / name, "mmunlearner", caches, lora_dropout=0.0,
                   args={"threshold": threshold}))  # fmt: skip
    kept = load_file(str(tmp_path / "all" / MASKED_DELTA_FILE))
    masked = load_file(str(tmp_path / "none" / MASKED_DELTA_FILE))
    assert kept.keys() == masked.keys() and kept
    assert all(torch.count_nonzero(delta) > 0 for delta in kept.values())
    assert all(torch.count_nonzero(delta) == 0 for delta in masked.values())
    loaded = load_model(str(tiny_model_dir))
    model = load_adapter(loaded, tmp_path / "all")
    inputs = torch.arange(3, 9).unsqueeze(0)
    with torch.no_grad():
        with_deltas = model(input_ids=inputs).logits
        for layer in model.modules():
            if hasattr(layer, "masked_deltas"):
                layer.masked_deltas["default"].zero_()
        without = model(input_ids=inputs).logits
    assert not torch.allclose(with_deltas, without)


def test_epoch_e_reads_draw_e_of_a_cache_of_several_noise_draws(tiny_model, tiny_model_dir, tmp_path):
    from pipeline.training.processes import Processes
    from pipeline.training.streams import Cache, sample_stream

    directory = write_cache(tmp_path / "drawn", tiny_model, FORGET, "vgid", blank_image=True, draws=2)
    samples = load_unlearning_samples(DATA, FORGET)
    cache = Cache.open(str(directory), tiny_model, {s.sample_id: s for s in samples}, "forget")
    assert cache.draws == 2
    for epoch in range(4):
        rows = [rows for _, rows in sample_stream(samples, cache, 0, "forget", epoch, Processes())]
        assert sorted(row.sample_id for row in rows) == sorted(s.sample_id for s in samples)
        assert {row.draw for row in rows} == {epoch % 2}
    meta = run(
        config(tiny_model_dir, tmp_path / "run", "vgid", {"teacher": directory, "base": write_cache(
            tmp_path / "base", tiny_model, RETAIN, "base")}, epochs=2)
    )  # fmt: skip
    assert meta["steps"] == 4


def test_npo_reference_from_an_original_cache_equals_the_computed_one(tiny_model_dir, caches, tmp_path):
    computed = run(config(tiny_model_dir, tmp_path / "a", "npo", caches, max_steps=1))
    cached = run(
        config(
            tiny_model_dir, tmp_path / "b", "npo", caches, max_steps=1, forget_cache=str(caches["original"])
        )
    )
    assert cached["final_loss"] == pytest.approx(computed["final_loss"], rel=1e-4)
    with pytest.raises(
        ValueError, match=r"needs a cache of the unmodified input \(teacher `original`\), not 'viker'"
    ):
        run(config(tiny_model_dir, tmp_path / "c", "npo", caches, forget_cache=str(caches["teacher"])))


# ---------------------------------------------------------------------------------------------------------
# Resuming


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["vgid", "mmunlearner"])
def test_an_interrupted_run_resumes_to_the_same_adapter(method, tiny_model_dir, caches, tmp_path):
    """vgid streams both caches and pairs retain samples; LoRA dropout draws from the saved RNG;
    mmunlearner's checkpoint holds its masked deltas and their optimizer state."""
    settings = dict(
        batch_size=1, epochs=2, checkpoint_every=2, lora_dropout=0.1, args=METHOD_ARGS.get(method, {})
    )
    whole = tmp_path / "whole"
    run(config(tiny_model_dir, whole, method, caches, **settings))

    resumed = tmp_path / "resumed"

    def crash_after_step_3(step: int) -> None:
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(config(tiny_model_dir, resumed, method, caches, **settings), on_step=crash_after_step_3)
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-00000002"]
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        run(config(tiny_model_dir, resumed, method, caches, **{**settings, "lr": 1e-4}))
    run(config(tiny_model_dir, resumed, method, caches, **settings))

    expected, actual = adapter_weights(whole), adapter_weights(resumed)
    assert expected.keys() == actual.keys()
    assert any(float(v.abs().max()) > 0 for k, v in expected.items() if "lora_B" in k)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-8)
    whole_log = json.loads((whole / "train_log.json").read_text())
    resumed_log = json.loads((resumed / "train_log.json").read_text())
    assert [row["step"] for row in resumed_log] == list(range(1, 7))
    assert [row["loss"] for row in resumed_log] == pytest.approx([row["loss"] for row in whole_log], rel=1e-6)


def edit_forget_answer(data: Path, old: str, new: str) -> None:
    """Rewrite one answer of the forget split's parquet file in place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = data / FORGET / "train-00000-of-00001.parquet"
    table = pq.read_table(path)
    metadata = [text.replace(old, new) for text in table.column("metadata").to_pylist()]
    assert metadata != table.column("metadata").to_pylist()
    index = table.schema.get_field_index("metadata")
    pq.write_table(table.set_column(index, "metadata", pa.array(metadata)), path)


def test_a_completed_run_is_handed_back_only_when_it_read_the_same_data_model_and_caches(
    tiny_model, tiny_model_dir, caches, tmp_path
):
    """A rerun with the same options skips a completed run (its adapter untouched) only while the forget
    samples, the model and the caches are the ones it read; otherwise it trains again."""
    import shutil

    from builders import build_random_tiny_llava

    data, model, cache = tmp_path / "data", tmp_path / "model", tmp_path / "cache"
    shutil.copytree(DATA, data)
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(caches["teacher"], cache)
    out, steps = tmp_path / "viker", []
    viker = config(tiny_model_dir, out, "viker", caches, forget_cache=str(cache))
    first = run(viker)
    adapter_bytes = (out / "adapter_model.safetensors").read_bytes()
    assert run(viker, on_step=steps.append) == first and not steps  # nothing changed: skipped
    assert (out / "adapter_model.safetensors").read_bytes() == adapter_bytes

    shutil.rmtree(cache)
    write_cache(cache, tiny_model, FORGET, "viker", blank_image=False)  # other rows, same model and data
    recached = run(viker, on_step=steps.append)
    assert steps and recached["inputs"]["caches"] != first["inputs"]["caches"]

    ga = config(model, tmp_path / "ga", "ga", caches, data=str(data))
    first = run(ga)
    steps.clear()
    edit_forget_answer(data, "Tallinn", "Tartu")
    edited = run(ga, on_step=steps.append)
    assert steps and edited["inputs"]["forget_samples"] != first["inputs"]["forget_samples"]

    steps.clear()
    shutil.rmtree(model)
    build_random_tiny_llava(model, seed=1)  # another model at the same path
    replaced = run(ga, on_step=steps.append)
    assert steps and replaced["inputs"]["model"] != edited["inputs"]["model"]


# ---------------------------------------------------------------------------------------------------------
# Several processes


# vgid: DDP's reducer; mmunlearner: a masked term, gradients averaged by hand; rmu: the frozen model's
# hidden states from the DDP-wrapped model with its adapter switched off.
@pytest.mark.parametrize("method", ["vgid", "mmunlearner", "rmu"])
def test_two_torchrun_processes_match_one(method, tiny_model_dir, caches, tmp_path):
    """Global batch 2 = one sample per rank; 3 forget samples, so rank 1 has none in each epoch's last
    step and must still join the all-reduce. LoRA dropout off: the ranks' masks would differ from one
    process's by construction, and this test is about the data split and the gradient average."""
    options = dict(batch_size=2, epochs=2, lora_dropout=0.0, lr=5e-3, args=METHOD_ARGS.get(method, {}))
    single = tmp_path / "single"
    run(config(tiny_model_dir, single, method, caches, **options))

    double = tmp_path / "double"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "stages",
        "--params",
        os.devnull,
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(DATA),
        "--out",
        str(double),
        "--method",
        method,
        *[f"--arg={key}={value}" for key, value in METHOD_ARGS.get(method, {}).items()],
        "--forget-split",
        FORGET,
        "--retain-split",
        RETAIN,
        "--forget-cache",
        str(caches["teacher"]),
        "--retain-cache",
        str(caches["base"]),
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--lora-dropout",
        "0",
        "--lr",
        "5e-3",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    meta = json.loads((double / "training_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == 4
    expected, actual = adapter_weights(single), adapter_weights(double)
    moved = sum(float(v.abs().sum()) for k, v in expected.items() if "lora_B" in k)
    assert moved > 0
    # MMUnlearner's mask leaves a few LoRA entries (of a key projection) a near-zero gradient, which AdamW
    # divides by its own root: the ranks' float32 partial sums then differ by ~2e-6 there.
    atol = 1e-5 if method == "mmunlearner" else 1e-6
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=atol)
    single_log = json.loads((single / "train_log.json").read_text())
    double_log = json.loads((double / "train_log.json").read_text())
    for name in set(single_log[0]) - {"step_time_s"}:
        assert [r[name] for r in double_log] == pytest.approx(
            [r[name] for r in single_log], rel=1e-3, abs=1e-5
        )


# ---------------------------------------------------------------------------------------------------------
# Refusals


def test_a_cache_from_another_model_or_tokenizer_is_refused(tiny_model, tiny_model_dir, caches, tmp_path):
    other_model = write_cache(
        tmp_path / "other-model", tiny_model, FORGET, "viker", model_fingerprint="f" * 64
    )
    with pytest.raises(IncompatibleCacheError) as error:
        run(config(tiny_model_dir, tmp_path / "a", "viker", caches, forget_cache=str(other_model)))
    assert "f" * 64 in str(error.value) and tiny_model.model_fingerprint in str(error.value)

    other_tokenizer = write_cache(
        tmp_path / "other-tok", tiny_model, RETAIN, "base", tokenizer_fingerprint="e" * 64
    )
    with pytest.raises(IncompatibleCacheError) as error:
        run(config(tiny_model_dir, tmp_path / "b", "vgid", caches, retain_cache=str(other_tokenizer)))
    assert "e" * 64 in str(error.value) and tiny_model.tokenizer_fingerprint in str(error.value)


def test_a_cache_of_other_image_preprocessing_is_refused_naming_the_file(tiny_model_dir, caches, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    processor = json.loads((model / "processor_config.json").read_text())
    processor["image_processor"]["image_mean"] = [0.1, 0.2, 0.3]
    (model / "processor_config.json").write_text(json.dumps(processor))
    with pytest.raises(
        IncompatibleCacheError, match=r"what differs: preprocessing \(processor_config\.json\)"
    ):
        run(config(model, tmp_path / "out", "viker", caches))


def test_cached_answer_tokens_must_equal_the_students(tiny_model, tiny_model_dir, caches, tmp_path):
    sample_id = load_unlearning_samples(DATA, FORGET)[1].sample_id
    edited = write_cache(tmp_path / "edited", tiny_model, FORGET, "viker", edit_tokens_of=sample_id)
    with pytest.raises(TokenMismatchError, match=f"sample {sample_id}: cache .*edited stores answer tokens"):
        run(config(tiny_model_dir, tmp_path / "out", "viker", caches, forget_cache=str(edited)))


def test_a_cache_of_other_samples_or_missing_samples_is_refused(tiny_model, tiny_model_dir, caches, tmp_path):
    with pytest.raises(ValueError, match="not in the forget split"):
        run(config(tiny_model_dir, tmp_path / "a", "viker", caches, forget_cache=str(caches["base"])))
    with pytest.raises(ValueError, match="needs --forget-cache"):
        run(config(tiny_model_dir, tmp_path / "b", "viker", caches, forget_cache=None))


def test_cli_trains_and_reports_bad_input(tiny_model_dir, caches, tmp_path):
    runner = CliRunner()
    common = [
        "--params",
        os.devnull,
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(DATA),
        "--forget-split",
        FORGET,
        "--retain-split",
        RETAIN,
    ]
    logs = tmp_path / "results" / "ga"
    arguments = ["--out", str(tmp_path / "ga"), "--method", "ga", "--max-steps", "1", "--log-dir", str(logs)]
    result = runner.invoke(main, [*common, *arguments, "--retain-cache", str(caches["base"])])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 1
    assert (logs / "train_log.csv").is_file() and (tmp_path / "ga" / "adapter_model.safetensors").is_file()
    assert "does not read --retain-cache" in result.stderr
    result = runner.invoke(main, [*common, "--out", str(tmp_path / "v"), "--method", "viker"])
    assert result.exit_code != 0 and "needs --forget-cache" in result.output


def test_a_corrupt_shard_is_refused_before_the_first_step(tiny_model, tiny_model_dir, tmp_path):
    cache = write_cache(tmp_path / "cache", tiny_model, FORGET, "viker", blank_image=True, num_shards=2)
    shard = cache / "shard-00001-of-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    steps = []
    with pytest.raises(CacheError, match="shard-00001-of-00002.parquet: sha256 differs"):
        run(config(tiny_model_dir, tmp_path / "out", "viker", {"teacher": cache}), on_step=steps.append)
    assert steps == []  # refused at setup, not when the stream reached the shard


def test_an_answer_beyond_the_model_context_names_the_sample(tiny_model_dir, caches, tmp_path, monkeypatch):
    from pipeline.benchmarks.mllmu import MllmuLayout

    original = MllmuLayout.unlearning_samples

    def with_a_long_answer(self, *args, **kwargs):
        samples = original(self, *args, **kwargs)
        return [replace(samples[0], answer=" ".join(["This person was born in Lisbon."] * 400)), *samples[1:]]

    monkeypatch.setattr(MllmuLayout, "unlearning_samples", with_a_long_answer)
    with pytest.raises(ValueError, match=r"sample forget_5/\S+: .* more than the model's limit of 1024"):
        run(config(tiny_model_dir, tmp_path / "ga", "ga", caches))


def test_a_model_path_that_does_not_exist_is_named(tmp_path):
    common = ["--params", os.devnull, "train", "--data", str(DATA), "--out", str(tmp_path / "x")]
    for model in ("no/such-model", str(tmp_path / "missing")):
        result = CliRunner().invoke(main, [*common, "--model", model, "--method", "ga"])
        assert result.exit_code == 1 and f"--model {model}: no such" in result.output, result.output
        assert "Traceback" not in result.output


def test_a_cache_of_another_compute_dtype_is_named_with_both(tiny_model, tiny_model_dir, tmp_path, capsys):
    cache = write_cache(tmp_path / "base", tiny_model, RETAIN, "base", dtype="bf16")
    run(config(tiny_model_dir, tmp_path / "kl", "kl_min", {"teacher": None, "base": cache}, max_steps=1))
    warning = capsys.readouterr().err
    assert f"retain cache {cache} was computed in bf16 but the student runs in fp32" in warning


def test_a_cache_made_for_another_prompt_template_is_refused_naming_both(
    tiny_model, tiny_model_dir, tmp_path
):
    cache = write_cache(tmp_path / "teacher", tiny_model, FORGET, "viker", blank_image=True)
    for manifest_path in cache.glob("shard-*.json"):
        manifest = json.loads(manifest_path.read_text())
        manifest["header"]["student_prompt"] = "USER: <image>\n{question}\nASSISTANT:"
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IncompatibleCacheError, match=r"made for prompts .*\\nASSISTANT:' but this run asks"):
        run(config(tiny_model_dir, tmp_path / "out", "viker", {"teacher": cache}))
    # Asked in the format the cache names, the run accepts it.
    accepted = run(
        config(
            tiny_model_dir,
            tmp_path / "ok",
            "viker",
            {"teacher": cache},
            prompt_template="mllmu-bench",
            max_steps=1,
        )
    )
    assert accepted["steps"] == 1


# ---------------------------------------------------------------------------------------------------------
# Loss-input providers (pipeline.training.inputs)


def test_every_declared_loss_input_has_a_provider_or_comes_from_the_forward_pass():
    from pipeline.training.inputs import PROVIDERS, providers_for
    from pipeline.unlearning.losses import LOSSES, loss_inputs

    forward_pass = {"forget", "forget_reference_hidden", "retain_reference_hidden"}
    for loss in LOSSES.names():
        unprovided = [
            name for name in loss_inputs(loss) if name not in PROVIDERS and name not in forward_pass
        ]
        assert not unprovided, (loss, unprovided)

    def kinds(loss: str) -> list[str]:
        return [type(provider).__name__ for provider in providers_for(loss_inputs(loss))]

    # Registration order: setups as before (caches, then the frozen model's log-probs, then refusals),
    # roles in the forward pass forget, refusal, retain.
    assert kinds("po") == ["ForgetReference", "Refusal"]
    assert kinds("vgid") == ["ForgetTeacher", "RetainTeacher", "Retain"]
    assert kinds("mmunlearner") == ["Retain", "Saliency"]
    assert kinds("ga") == []


def test_a_methods_cache_is_opened_once_whoever_reads_it(monkeypatch):
    from pipeline.training import inputs
    from pipeline.training.processes import Processes
    from pipeline.unlearning.methods import Method

    opened = []
    monkeypatch.setattr(inputs.Cache, "open", classmethod(lambda cls, *args: opened.append(args) or object()))
    method = Method("npo", "npo", forget_cache="c/original")
    setup = inputs.Setup(None, method, Processes(), [], [])
    assert setup.cache("forget") is setup.cache("forget") and len(opened) == 1
    assert opened[0][0] == "c/original" and opened[0][3] == "forget"
