"""`pipeline check` and the memory arithmetic behind it (pipeline.models.memory_estimate)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.models import memory_estimate as memory
from pipeline.models.known_configs import LLAVA_15_7B, QWEN25_VL_3B, known_config
from stages.check import method_peaks, method_step
from stages.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
LLAVA = memory.shapes_from_config("llava", LLAVA_15_7B)


def test_shapes_of_the_shipped_models():
    # LLaVA-1.5-7B has 7,063,427,072 weights (tests/test_real_scale_bench.py counts them on the meta
    # device); the estimate leaves out norms, biases and the vision embeddings.
    assert LLAVA.parameters == pytest.approx(7_063_427_072, rel=1e-3)
    assert (LLAVA.layers, LLAVA.vocab, LLAVA.context, LLAVA.image_tokens) == (32, 32064, 4096, 576)
    qwen = memory.shapes_from_config("qwen", QWEN25_VL_3B)
    assert qwen.parameters == pytest.approx(3.75e9, rel=0.01) and qwen.image_tokens is None
    assert memory.qwen_image_tokens(3000, 2000) == 7597  # issue 29's large photo, uncapped
    assert memory.qwen_image_tokens(3000, 2000, max_pixels=1003520) < 1300
    assert known_config("MLLMU/LLaVA_Vanilla") == LLAVA_15_7B


def test_peaks_match_the_figures_measured_at_real_shapes():
    """Issue 29's figures for LLaVA-7B at 650 tokens a sequence: ViKeR at batch 2 near 25 GiB, IdkPO
    near 35, every 8-sequence step of the Vgid experiments near 55-58; checkpointing saves most of it."""
    methods = {name: {"loss": name} for name in ("viker", "idkpo", "vgid", "ga_diff", "rmu", "ga")}
    at_2 = method_peaks(LLAVA, methods, batch=2, lora_rank=8, sequence_tokens=650, answer_tokens=30)
    at_4 = method_peaks(LLAVA, methods, batch=4, lora_rank=8, sequence_tokens=650, answer_tokens=30)
    assert 23 < at_2["viker"]["peak_gib"] < 27 and 32 < at_2["idkpo"]["peak_gib"] < 37
    assert all(52 < at_4[name]["peak_gib"] < 60 for name in ("vgid", "ga_diff", "rmu"))
    assert at_4["vgid"]["sequences"] == 8 and at_4["rmu"]["sequences"] == 16  # + two frozen passes
    assert all(at_4[name]["peak_gib_checkpointing"] < 20 for name in methods)
    assert method_step("npo", 2, 650, 30).sequences_without == 2  # the frozen model's log-probs


def test_logits_and_kv_cache_arithmetic():
    assert memory.logits_bytes(LLAVA, 10, 3) == 32064 * 10 * 4 * 3
    assert memory.kv_cache_bytes(LLAVA, 1) == 2 * 32 * 4096 * 2  # 512 KiB a token
    assert memory.lora_parameters(LLAVA, 8) == 32 * 4 * 8 * (4096 + 4096)


def _experiment(tmp_path: Path, model_dir: Path, context: int | None = None) -> Path:
    """A params.yaml on the MLLMU-Bench fixtures and a copy of the tiny model without its weights."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    if context is not None:
        config = json.loads((model / "config.json").read_text())
        config["text_config"]["max_position_embeddings"] = context
        (model / "config.json").write_text(json.dumps(config))
    params = {
        "model": {"model": str(model), "prompt_template": "llava"},
        "data": {
            "data": str(FIXTURES / "mllmu_bench"),
            "train_data": str(FIXTURES / "mllmu_train"),
            "data_format": "mllmu",
            "forget_split": "forget_5",
        },
        "evaluate": {"protocol": "official", "max_new_tokens": 4, "batch_size": 8, "mia_nonmembers": None},
        "teachers": {"viker": {"teacher": "viker", "args": {"k": 2, "reference_kind": "people"}}},
        "methods": {"ga": {"loss": "ga"}, "viker": {"loss": "viker", "forget_teacher": "viker"}},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_check_reports_the_fixtures_without_weights(tmp_path, tiny_model_dir):
    params = _experiment(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(main, ["--params", str(params), "check"])
    assert result.exit_code == 0, result.output
    assert "training forget split forget_5: " in result.output
    assert "fields: {" in result.output and "tokens each" in result.output
    assert "protocol official, forget/cloze: longest prompt" in result.output
    assert "cache viker: 3 sequences a sample" in result.output
    assert "train viker: expected peak" in result.output and "evaluate: expected peak" in result.output
    over = CliRunner().invoke(main, ["--params", str(params), "check", "--gpu-memory-gib", "0.0001"])
    assert over.exit_code == 1 and "FAIL: train viker: expected peak" in over.output


def test_check_flags_a_prompt_over_a_short_context(tmp_path, tiny_model_dir):
    params = _experiment(tmp_path, tiny_model_dir, context=40)
    result = CliRunner().invoke(main, ["--params", str(params), "check"])
    assert result.exit_code == 1
    assert "exceed the context of 40" in result.output and "FAIL: forget/" in result.output


def test_performance_tables_are_the_arithmetic_of_pipeline_check():
    """docs/performance.md's expected peaks are generated from stages.check's functions: rerun
    `python bench/expected_performance.py` when they or an experiment change."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "expected_performance.py"
    spec = importlib.util.spec_from_file_location("expected_performance", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0
    vgid = "\n".join(module.rows("llava-mllmu-5-vgid"))
    assert "| train vgid (8) | 54.5 | 16.2 |" in vgid  # 4 + 4 sequences of 650 tokens, without / with


def test_qwen_tokens_per_image_follow_the_processors_pixel_cap(tmp_path):
    from stages.check import model_shapes, tokens_per_image

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_VL_3B))
    shapes, config = model_shapes(str(tmp_path))
    assert tokens_per_image(shapes, (3000, 2000), config) == 7597  # no cap: the whole photo
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 1003520}))
    shapes, config = model_shapes(str(tmp_path))
    assert tokens_per_image(shapes, (3000, 2000), config) < 1300
