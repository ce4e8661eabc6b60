"""bench/real_scale.py: its full config is LLaVA-1.5-7B's, and its tiny CPU run works end to end.

Nothing timed is asserted (timings belong in the JSON the script writes on a GPU).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "real_scale.py"


@pytest.fixture(scope="module")
def real_scale():
    spec = importlib.util.spec_from_file_location("real_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_config_is_llava_15_7b(real_scale):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    config = LlavaConfig(**real_scale.model_config(tiny=False))
    with torch.device("meta"):  # shapes only, no memory
        model = LlavaForConditionalGeneration._from_config(config)
    assert sum(parameter.numel() for parameter in model.parameters()) == 7_063_427_072
    assert model.get_output_embeddings().weight.shape == (32064, 4096)
    assert (config.image_token_id, config.vision_feature_layer, config.projector_hidden_act) == (
        32000,
        -2,
        "gelu",
    )

    tokenizer = real_scale.llava_layout_tokenizer(["What is the name of this person? Edith Young."] * 4, 300)
    assert len(tokenizer) == 32002 and tokenizer.convert_tokens_to_ids("<image>") == 32000
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    from PIL import Image

    ids = processor(text=["USER: <image>\nWho? ASSISTANT:"], images=[Image.new("RGB", (64, 64))])[
        "input_ids"
    ][0]
    assert ids[0] == tokenizer.bos_token_id and list(ids).count(32000) == 576  # 24 x 24 patches of 14 px


def test_tiny_cpu_run_records_every_figure(real_scale, tmp_path):
    out = tmp_path / "real_scale.json"
    real_scale.main(["--device", "cpu", "--tiny", "--train-batch-sizes", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["device"].startswith("cpu")
    precompute = results["precompute"]
    assert precompute["k"] == 5 and precompute["sequences_per_forward"] == 20
    assert precompute["timed_samples"] > 0 and precompute["samples_per_s"] > 0
    assert precompute["vision_features_reused"] > 0  # reference images are encoded once
    train = results["train"]["2"]
    assert train["samples_per_s"] > 0 and math.isfinite(train["last_loss"])
    # LoRA rank 8 on q/k/v/o of each of the 2 tiny language-model layers (128 -> 128): 2 * 4 * 8 * 256.
    assert train["trainable_parameters"] == 2 * 4 * 8 * (128 + 128)
    mc = results["mc_scoring"]
    assert mc["questions"] == 3 and mc["likelihood_s_per_question"] > 0
    assert set(mc["generate_s_per_question"]) == set(mc["generate_over_likelihood"]) == {"1", "2", "8", "50"}
    assert all(seconds > 0 for seconds in mc["generate_s_per_question"].values())
