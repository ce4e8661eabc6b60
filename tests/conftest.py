"""Shared fixtures. Model fixtures are session-scoped: building and importing cost seconds each."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from builders import build_random_tiny_llava

from pipeline.mini_world.config import FineTuneConfig, WorldConfig
from stages.config import PrepareConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import pipeline.hashing  # noqa: E402

# Kept weight hashes (pipeline.hashing.cached_files_sha256_each) go to the session's own folder, not ~/.cache.
pipeline.hashing.HASH_CACHE_DIR = Path(tempfile.mkdtemp(prefix="file-hashes-"))

# Tiny models gain nothing from more threads, and tests that start two processes (DDP) would
# oversubscribe a 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An untrained tiny LLaVA (+ tokenizer + processor) saved like a hub checkpoint."""

    return build_random_tiny_llava(tmp_path_factory.mktemp("tiny-llava") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from pipeline.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def check_encoded_samples():
    """check(loaded, samples): EncodedSamples builds, from stored entries and in any grouping, exactly the
    batch that encode_answers builds from the samples themselves."""
    from pipeline.models import EncodedSamples, encode_answers

    def check(loaded, samples) -> None:
        # One byte short of room for every entry: the last one is not kept and is encoded at every use.
        probe = EncodedSamples(loaded)
        probe.batch(list(range(len(samples))), lambda index: samples[index])
        memo = EncodedSamples(loaded, max_bytes=probe.bytes - 1)
        built_inputs: list[int] = []

        def build(group):
            def sample(index: int):
                built_inputs.append(group[index])
                return samples[group[index]]

            return sample

        groupings = [list(range(len(samples))), list(reversed(range(len(samples)))), [0, 2], [1]]
        for group in groupings * 2:  # the second pass reads the entries the first one stored
            expected = encode_answers(loaded, [samples[i] for i in group])
            built = memo.batch([f"sample-{i}" for i in group], build(group))
            assert built.inputs.keys() == expected.inputs.keys()
            for name, value in expected.inputs.items():
                assert torch.equal(built.inputs[name], value), name
            assert torch.equal(built.predict_positions, expected.predict_positions)
            assert torch.equal(built.targets, expected.targets)
            assert built.answer_lengths == expected.answer_lengths
        assert memo.bytes <= memo.max_bytes and len(memo.entries) < len(samples)  # the bound holds
        assert memo.bytes == sum(entry["bytes"] for entry in memo.entries.values())
        # Full, it keeps the inputs it stored first; inputs are built only for keys not stored.
        kept = [f"sample-{i}" for i in range(len(samples) - 1)]
        assert list(memo.entries) == kept
        not_kept_uses = sum(group.count(len(samples) - 1) for group in groupings * 2)
        assert sorted(built_inputs) == sorted([*range(len(samples) - 1), *[len(samples) - 1] * not_kept_uses])
        # Another key (IdkPO's refusal: the same sample with another answer) is another entry.
        refusal = replace(samples[0], answer="I do not know.")
        assert torch.equal(
            memo.batch(["sample-0-refusal"], lambda _: refusal).targets,
            encode_answers(loaded, [refusal]).targets,
        )

    return check


@dataclass(frozen=True)
class MiniWorld:
    """A reduced mini world with its fine-tuned full model (stages/prepare.py, the real stage code)."""

    root: Path
    data_dir: Path
    references_dir: Path
    model_dir: Path
    figures: dict


# A world small enough to fine-tune to memorization within CI's budget (see stages/prepare.py).
REDUCED_WORLD = dict(
    num_people=10, num_real=4, num_reference_people=6, alt_images=2, num_pets=6, num_scenes=6, num_patterns=6
)
REDUCED_FINE_TUNE = dict(fact_epochs=20, epochs=25, batch_size=16, learning_rate=5e-4)


@pytest.fixture(scope="session")
def mini_world(tmp_path_factory) -> MiniWorld:
    """Built once per test session: the reduced world plus a full model that memorized it."""
    from stages.prepare import run as prepare

    root = tmp_path_factory.mktemp("mini-world")
    config = PrepareConfig(
        out=str(root),
        metrics_out=str(root / "full_model.json"),
        people_per_split=6,
        world=WorldConfig(**REDUCED_WORLD),
        fine_tune=FineTuneConfig(**REDUCED_FINE_TUNE),
    )
    figures = prepare(config, log=lambda message: None)
    return MiniWorld(root, root / "data", root / "references", root / "model", figures)
