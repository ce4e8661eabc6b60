"""A checkpoint saved without llava-hf's processor files (MLLMU-Bench's fine-tuned LLaVA): refused at load
with the file and fields to take from where, or loaded with its base model's processor (model.processor_from)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipeline.models import load_model

PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json")


def saved_by_another_saver(tiny_model_dir: Path, target: Path, drop_processor_files: bool) -> Path:
    """The tiny LLaVA's weights, with processor_config.json missing the fields transformers 5 needs, or with
    no processor and tokenizer files at all (as MLLMU-Bench's finetune.py saves)."""
    shutil.copytree(tiny_model_dir, target)
    if drop_processor_files:
        for name in PROCESSOR_FILES:
            (target / name).unlink()
        return target
    path = target / "processor_config.json"
    config = json.loads(path.read_text())
    del config["patch_size"], config["num_additional_image_tokens"]
    path.write_text(json.dumps(config))
    return target


def test_processor_config_without_the_image_token_fields_is_refused_naming_them(tiny_model_dir, tmp_path):
    model_dir = saved_by_another_saver(tiny_model_dir, tmp_path / "vanilla", drop_processor_files=False)
    with pytest.raises(ValueError) as error:
        load_model(str(model_dir))
    message = str(error.value)
    assert f"{model_dir}/processor_config.json" in message
    assert "patch_size" in message and "num_additional_image_tokens" in message
    assert "model.processor_from" in message and "llava-hf/llava-1.5-7b-hf" in message


def test_a_checkpoint_without_processor_files_says_where_to_take_them(tiny_model_dir, tmp_path):
    model_dir = saved_by_another_saver(tiny_model_dir, tmp_path / "vanilla", drop_processor_files=True)
    with pytest.raises(ValueError, match="model.processor_from"):
        load_model(str(model_dir))


@pytest.mark.parametrize("drop_processor_files", [False, True])
def test_processor_from_the_base_model_counts_one_token_per_feature(
    tiny_model_dir, tmp_path, capfd, drop_processor_files
):
    model_dir = saved_by_another_saver(tiny_model_dir, tmp_path / "vanilla", drop_processor_files)
    loaded = load_model(str(model_dir), processor_from=str(tiny_model_dir))
    assert f"tokenizer and processor from {tiny_model_dir}" in capfd.readouterr().err
    vision = loaded.model.config.vision_config
    size = vision.image_size
    encoded = loaded.processor(
        text=["USER: <image>\nWho? ASSISTANT:"], images=[Image.new("RGB", (size, size))]
    )
    tokens = list(encoded["input_ids"][0]).count(loaded.model.config.image_token_index)
    assert tokens == (size // vision.patch_size) ** 2  # the "default" strategy drops CLS
    assert loaded.model_fingerprint == load_model(str(tiny_model_dir)).model_fingerprint


def test_a_processor_config_counting_one_token_short_is_refused_with_both_counts(tiny_model_dir, tmp_path):
    """num_additional_image_tokens 0 where the CLS feature is dropped: LLaVA-1.5-7B's 575 tokens against
    576 features, here 15 against 16."""
    model_dir = tmp_path / "vanilla"
    saved_by_another_saver(tiny_model_dir, model_dir, drop_processor_files=False)
    path = model_dir / "processor_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "patch_size": 8, "num_additional_image_tokens": 0}))
    with pytest.raises(ValueError, match="gives 15 image tokens per image, the vision tower 16 features"):
        load_model(str(model_dir))
