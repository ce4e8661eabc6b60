"""Shared fixtures. Model fixtures are session-scoped: building and importing cost seconds each."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models gain nothing from more threads, and tests that start two processes (DDP) would
# oversubscribe a 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An untrained tiny LLaVA (+ tokenizer + processor) saved like a hub checkpoint."""
    from pipeline.mini_model import build_random_tiny_llava

    return build_random_tiny_llava(tmp_path_factory.mktemp("tiny-llava") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from pipeline.models import load_model

    return load_model(str(tiny_model_dir))
