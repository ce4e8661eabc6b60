"""The finetune stage (origin -> full): MLLMU-Bench's fine-tune of a released checkpoint on every person of
the benchmark, through the train stage's loop, merged and saved as a whole checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline.models import load_model
from stages.cli import main

DATA = Path(__file__).parent / "fixtures" / "mllmu_train"  # forget_5: 3 QA pairs, retain_95: 6


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {
        name: tensor
        for path in sorted(model_dir.glob("*.safetensors"))
        for name, tensor in load_file(path).items()
    }


def finetuned(origin: Path, out: Path, *options: str):
    arguments = ["--params", os.devnull, "finetune", "--origin", str(origin), "--model", str(out)]
    arguments += [
        "--data",
        str(DATA),
        "--forget-split",
        "forget_5",
        "--epochs",
        "2",
        "--lr",
        "1e-2",
        *options,
    ]
    return CliRunner().invoke(main, arguments)


def test_the_full_model_is_the_origin_merged_with_a_lora_on_every_linear_layer_of_the_language_model(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "full"
    result = finetuned(tiny_model_dir, out)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["forget_5", "retain_95"]
    meta = json.loads((out / "finetune_meta.json").read_text())
    assert meta["origin"] == str(tiny_model_dir) and meta["training"]["steps"] == 2 * 3  # 9 pairs, batch 4
    origin, full = weights(tiny_model_dir), weights(out)
    assert set(full) == set(origin)  # no LoRA module left: the same tensors, merged
    changed = {name for name in origin if not torch.equal(origin[name], full[name])}
    language_model = {name for name in changed if "language_model" in name}
    assert changed == language_model and any(name.endswith("mlp.down_proj.weight") for name in changed)
    assert any(name.endswith("self_attn.q_proj.weight") for name in changed)
    assert not any("vision_tower" in name or "lm_head" in name for name in changed)
    loaded = load_model(str(out))  # with its own tokenizer and processor
    assert loaded.tokenizer_fingerprint == load_model(str(tiny_model_dir)).tokenizer_fingerprint
    assert not (out.with_name("full.partial")).exists()


def test_a_finetune_onto_its_own_origin_is_refused(tiny_model_dir, tmp_path):
    result = finetuned(tiny_model_dir, tiny_model_dir)
    assert result.exit_code != 0 and "needs its own folder" in result.output


def test_the_finetune_trains_with_the_gradient_checkpointing_it_is_given(tmp_path):
    from stages.config import FinetuneConfig
    from stages.finetune import train_config

    data = Path(__file__).parent / "fixtures" / "mllmu_bench"
    for checkpointing in (False, True):
        config = FinetuneConfig(
            origin="unused", model="unused", data=str(data), splits=("forget_5",),
            gradient_checkpointing=checkpointing,
        )  # fmt: skip
        assert train_config(config, tmp_path / "adapter").gradient_checkpointing is checkpointing
