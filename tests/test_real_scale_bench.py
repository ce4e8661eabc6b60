"""bench/real_scale: its full configs are the shipped models', it imports without what the GPU machine
lacks, and its --tiny CPU run records every section through the pipeline's own code paths.

Nothing timed is asserted (timings belong in the JSON the benchmark writes on a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# What the GPU machine (Python 3.12, torch 2.11, transformers 5.17) does not have.
ABSENT = ("nltk", "rouge_score", "datasets", "zstandard", "dvc")
SECTIONS = (
    "all_reduce", "precompute/viker/b4", "precompute/vgid/b4", "precompute/original/b4", "precompute/base/b4",
    *(f"train/llava-mllmu-10-viker/{m}" for m in ("ga", "npo", "idkpo", "viker", "viker_no_ga", "viker_no_vis")),
    *(f"train/llava-mllmu-5-vgid/{m}" for m in ("ga", "ga_diff", "kl_min", "po", "npo", "rmu", "vgid")),
    "generation/b4/unmerged", "generation/b4/merged", "official_cloze_exemplars", "likelihood_mc",
    "overlong_prompt", "qwen/precompute/vgid/b4", "qwen/generation_large_photo",
)  # fmt: skip


def without_absent(code: str) -> str:
    """Python that runs `code` with the GPU machine's missing packages made unimportable."""
    return f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n{code}"


def run_python(code: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-c", without_absent(code)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_full_config_is_llava_15_7b():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from bench.real_scale.models import llava_layout_tokenizer, model_config

    config = LlavaConfig(**model_config(tiny=False))
    with torch.device("meta"):  # shapes only, no memory
        model = LlavaForConditionalGeneration._from_config(config)
    assert sum(parameter.numel() for parameter in model.parameters()) == 7_063_427_072
    assert model.get_output_embeddings().weight.shape == (32064, 4096)
    assert (config.image_token_id, config.vision_feature_layer, config.projector_hidden_act) == (
        32000,
        -2,
        "gelu",
    )
    tokenizer = llava_layout_tokenizer(["What is the name of this person? Edith Young."] * 4, 300)
    assert len(tokenizer) == 32002 and tokenizer.convert_tokens_to_ids("<image>") == 32000


def test_imports_without_the_packages_the_gpu_machine_lacks():
    result = run_python("import bench.real_scale.run, stages.train, stages.precompute, stages.evaluate", 120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_tiny_cpu_run_records_every_section(tmp_path):
    out = tmp_path / "real_scale.json"
    code = (
        "import runpy\n"
        f"sys.argv = ['real_scale', '--tiny', '--device', 'cpu', '--out', {str(out)!r}]\n"
        "runpy.run_module('bench.real_scale', run_name='__main__')"
    )
    result = run_python(code, 1800)
    assert result.returncode == 0, result.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert set(SECTIONS) <= set(sections)
    failed = {name: figures["error"] for name, figures in sections.items() if "error" in figures}
    assert not failed
    assert sections["all_reduce"]["totals"] == {"loss": 1.5, "samples": 2.0}  # one rank: the sums
    assert sections["precompute/viker/b4"]["teacher"]["args"]["k"] == 5
    assert sections["precompute/viker/b4"]["top_p"] == 0.9 and sections["precompute/viker/b4"]["samples"] > 0
    vgid = sections["train/llava-mllmu-5-vgid/vgid"]
    assert vgid["batch_size"] == 4 and {"plain", "checkpointing"} <= set(vgid)
    assert sections["overlong_prompt"]["prompt_tokens"] > sections["overlong_prompt"]["context"]
    assert sections["generation/b4/merged"]["replies"] == 4
