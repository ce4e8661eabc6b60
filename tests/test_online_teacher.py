"""The online teacher (train --teacher-source online): the cache's teacher recomputed every step, untruncated.

Where nothing is truncated (top-p 1, a cap that does not bind) the online run's first step equals the cached
run's up to the cache's float16 storage; with truncation the two differ by at most what the cache's measured
per-token KL error implies (docs/performance.md, "Cache fidelity").
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from cache import iter_cache
from pipeline.benchmarks.mllmu import load_unlearning_samples
from pipeline.mini_world.config import WorldConfig
from pipeline.mini_world.world import write_world
from pipeline.models import load_model
from pipeline.training.online import OnlineTeacher
from pipeline.training.streams import Cache
from stages.config import PrecomputeConfig, TrainConfig
from stages.precompute import run as precompute
from stages.train import run as train

SMALL_WORLD = WorldConfig(
    num_people=10, num_real=2, num_reference_people=6, num_pets=3, num_scenes=3, num_patterns=3, alt_images=1
)
VOCAB = 10_000  # above any tiny model's vocabulary: the cap never binds


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return Path(write_world(tmp_path_factory.mktemp("world"), SMALL_WORLD).data_dir)


def cache(world: Path, model_dir: Path, out: Path, teacher: str, top_p: float, **args) -> Path:
    precompute(
        PrecomputeConfig(
            model=str(model_dir), data=str(world), out=str(out), teacher=teacher, args=args, top_p=top_p,
            max_support=VOCAB, tail_cost=0.0, batch_size=4,
        )
    )  # fmt: skip
    return out


def first_step(world: Path, model_dir: Path, out: Path, method: str, source: str, **caches: Path) -> dict:
    train(
        TrainConfig(
            model=str(model_dir), data=str(world), out=str(out), method=method, teacher_source=source,
            forget_cache=str(caches["forget"]), retain_cache=str(caches["retain"]) if "retain" in caches else None,
            lr=5e-3, batch_size=2, epochs=1, max_steps=1, seed=0,
        )
    )  # fmt: skip
    with open(out / "train_log.csv") as handle:
        return {key: float(value) for key, value in next(csv.DictReader(handle)).items()}


def largest_error(world: Path, model_dir: Path, directory: Path, split: str) -> float:
    """The largest |sum over a sample's tokens of the cached row's KL error at Q0| (OnlineTeacher.cache_errors):
    a KL term, a batch mean of per-sample sums, cannot move by more at step 1."""
    loaded = load_model(str(model_dir))
    samples = {sample.sample_id: sample for sample in load_unlearning_samples(world, split)}
    opened = Cache.open(str(directory), loaded, samples, split)
    items = [(samples[row.sample_id], row) for row in iter_cache(str(directory))]
    errors = OnlineTeacher(loaded, opened, str(world)).cache_errors(items)
    return max(abs(float(error.sum())) for error in errors)


def within(online: float, cached: float, bound: float) -> bool:
    return abs(online - cached) <= bound * (1 + 1e-3) + 1e-6  # + the float32 sums' rounding


@pytest.mark.parametrize("teacher", ["viker", "vgid"])
def test_without_truncation_the_online_teachers_first_step_equals_the_cached_one(
    teacher, world, tiny_model_dir, tmp_path
):
    caches = {"forget": cache(world, tiny_model_dir, tmp_path / "forget", teacher, 1.0, **_args(teacher))}
    if teacher == "vgid":
        caches["retain"] = cache(world, tiny_model_dir, tmp_path / "retain", "base", 1.0)
    cached = first_step(world, tiny_model_dir, tmp_path / "cached", teacher, "cache", **caches)
    online = first_step(world, tiny_model_dir, tmp_path / "online", teacher, "online", **caches)
    # Only the cache's float16 storage differs (absolute step 2^-14, renormalised): allclose, and within
    # the storage error the cache itself measures.
    assert online["loss"] == pytest.approx(cached["loss"], rel=1e-2, abs=1e-4)
    forget_error = largest_error(world, tiny_model_dir, caches["forget"], "forget_10")
    if teacher == "viker":
        assert within(online["regularization"], cached["regularization"], forget_error)
        assert within(online["loss"], cached["loss"], 0.05 * forget_error)  # lambda: the loss's default
    else:
        retain_error = largest_error(world, tiny_model_dir, caches["retain"], "retain_90")
        assert within(online["forget_kl"], cached["forget_kl"], forget_error)
        assert within(online["retain_kl"], cached["retain_kl"], retain_error)
        assert within(online["loss"], cached["loss"], forget_error + retain_error)  # alpha = beta = 1
    assert forget_error < 2e-3


def test_with_truncation_the_first_steps_differ_by_at_most_the_cache_error_bound(
    world, tiny_model_dir, tmp_path
):
    forget = cache(world, tiny_model_dir, tmp_path / "forget", "viker", 0.5, **_args("viker"))
    cached = first_step(world, tiny_model_dir, tmp_path / "cached", "viker", "cache", forget=forget)
    online = first_step(world, tiny_model_dir, tmp_path / "online", "viker", "online", forget=forget)
    bound = largest_error(world, tiny_model_dir, forget, "forget_10")
    gap = abs(online["regularization"] - cached["regularization"])
    assert gap > 10 * 2e-3  # truncation to top-p 0.5 shows, far above the storage error
    assert within(online["regularization"], cached["regularization"], bound)
    assert within(online["loss"], cached["loss"], 0.05 * bound)
    assert online["forget_nll"] == pytest.approx(cached["forget_nll"], rel=1e-6)  # the same student


def test_the_online_teacher_refuses_a_pool_that_is_not_the_caches(world, tiny_model_dir, tmp_path):
    forget = cache(world, tiny_model_dir, tmp_path / "forget", "viker", 0.9, **_args("viker"))
    pool = world.parent / "references" / "people"
    image = sorted(pool.iterdir())[0]
    original = image.read_bytes()
    try:
        image.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(
            ValueError, match=r"reference pool 'people' .* not the one cache .* computed from"
        ):
            first_step(world, tiny_model_dir, tmp_path / "online", "viker", "online", forget=forget)
    finally:
        image.write_bytes(original)


def _args(teacher: str) -> dict:
    return {"k": 3} if teacher == "viker" else {}


def test_the_online_rows_carry_no_inference_tensors(world, tiny_model, tiny_model_dir, tmp_path):
    forget = cache(world, tiny_model_dir, tmp_path / "forget", "viker", 0.9, **_args("viker"))
    samples = {sample.sample_id: sample for sample in load_unlearning_samples(world, "forget_10")}
    opened = Cache.open(str(forget), tiny_model, samples, "forget")
    items = [(samples[row.sample_id], row) for row in iter_cache(str(forget))][:2]
    rows = OnlineTeacher(tiny_model, opened, str(world)).rows(items)
    assert not any(row.support_probs.is_inference() for row in rows)
    assert all(
        torch.allclose(row.support_probs.sum(-1), torch.ones(row.num_tokens), atol=1e-5) for row in rows
    )
