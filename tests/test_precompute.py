"""Stage one on a reduced mini world and an untrained tiny LLaVA: correctness to the papers' teachers,
sharding, resuming, and a clear error for every kind of bad input."""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from builders import build_random_tiny_llava
from click.testing import CliRunner
from PIL import Image

from cache import IncompatibleCacheError, iter_cache, read_manifest, verify_cache
from pipeline.benchmarks import DataError, load_reference_pool
from pipeline.benchmarks.mllmu import load_unlearning_samples
from pipeline.mini_world.config import TinyLlavaConfig, WorldConfig
from pipeline.mini_world.world import write_world
from pipeline.models import PromptedSample, VisionFeatureCache, answer_logits, encode_answers, load_model
from pipeline.runtime import keep_freed_memory
from pipeline.samples import QASample
from pipeline.unlearning.extractor import TeacherExtractor
from pipeline.unlearning.perturbations import PERTURBATIONS
from pipeline.unlearning.teachers import ICU_PROMPTS, TEACHERS, TeacherContext, TeacherError, resolve_teacher
from stages.cli import main
from stages.config import PrecomputeConfig
from stages.precompute import PrecomputeError, checked, run

SMALL_WORLD = WorldConfig(
    num_people=10, num_real=2, num_reference_people=6, num_pets=3, num_scenes=3, num_patterns=3, alt_images=1
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    info = write_world(tmp_path_factory.mktemp("world"), SMALL_WORLD)
    return Path(info.data_dir)


def config(
    world: Path, model_dir: Path, out: Path, teacher: str = "viker", args: dict | None = None, **overrides
) -> PrecomputeConfig:
    """The shared options, and the teacher's own arguments (ViKeR's k = 3 unless given)."""
    options = {"max_support": 16, "top_p": 0.9, "batch_size": 3, **overrides}
    arguments = {"k": 3} if teacher == "viker" and args is None else args or {}
    return PrecomputeConfig(
        model=str(model_dir), data=str(world), out=str(out), teacher=teacher, args=arguments, **options
    )


@pytest.fixture(scope="module")
def viker_cache(world, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("viker") / "cache"
    run(config(world, tiny_model_dir, out, num_shards=2))
    return out


def dense_probs(loaded, prompted: list[PromptedSample]) -> torch.Tensor:
    """Softmaxes of each input run alone (batch of one, no feature cache): the reference computation."""
    rows = []
    with torch.inference_mode():
        for item in prompted:
            rows.append(
                torch.softmax(answer_logits(loaded.model, encode_answers(loaded, [item])).double(), -1)
            )
    return torch.stack(rows)


# ---------------------------------------------------------------- correctness to the papers


def test_viker_rows_are_the_mean_of_k_reference_softmaxes(world, tiny_model, viker_cache):
    manifest = read_manifest(viker_cache)
    assert verify_cache(viker_cache) == []
    samples = {s.sample_id: s for s in load_unlearning_samples(world, "forget_10")}
    pool = dict(load_reference_pool(world.parent, "people"))
    cached = next(iter_cache(viker_cache))
    record = next(r for r in manifest.samples if r["sample_id"] == cached.sample_id)
    sample = samples[cached.sample_id]
    assert len(record["image_sources"]) == 3 and len(set(record["image_sources"])) == 3
    assert record["prompt"] == tiny_model.family.build_prompt(sample.question, True)

    # Recompute Eq. 4 from nothing but the manifest: the recorded prompt and reference image ids.
    images = [
        Image.open(io.BytesIO(pool[source.split("/", 1)[1]])).convert("RGB")
        for source in record["image_sources"]
    ]
    mean = dense_probs(
        tiny_model, [PromptedSample(record["prompt"], image, sample.answer) for image in images]
    ).mean(0)
    assert cached.num_tokens == mean.shape[0]
    assert torch.equal(
        cached.answer_token_ids,
        torch.tensor(
            encode_answers(tiny_model, [PromptedSample(record["prompt"], images[0], sample.answer)]).targets
        ),
    )
    for token in range(cached.num_tokens):
        ids = cached.support_ids[token][cached.support_ids[token] >= 0]
        torch.testing.assert_close(
            cached.support_probs[token, : len(ids)].double(), mean[token, ids], rtol=2e-3, atol=2.0**-14
        )  # stored to an absolute precision of 2^-14 (cache.schema.RowLayout), renormalised on reading
        dropped = torch.ones(mean.shape[1], dtype=torch.bool)
        dropped[ids] = False
        assert cached.tail_mass[token].item() == pytest.approx(mean[token, dropped].sum().item(), abs=1e-5)
        entropy = -torch.special.xlogy(mean[token], mean[token]).sum()
        assert cached.entropy[token].item() == pytest.approx(entropy.item(), rel=1e-3)  # float16
        target = cached.answer_token_ids[token]
        assert cached.target_log_prob[token].item() == pytest.approx(
            torch.log(mean[token, target]).item(), abs=1e-4
        )
    assert manifest.header["teacher_params"] == {"k": 3, "reference_kind": "people", "seed": 0}
    assert manifest.header["tokenizer_fingerprint"] == tiny_model.tokenizer_fingerprint
    assert manifest.header["model_parts"] == tiny_model.model_parts  # a refusal names the file that differs
    assert set(tiny_model.model_parts) == {"config", "weights", "preprocessing"}


def teacher_arguments(teacher: str, **overrides) -> dict:
    """A teacher's arguments at their declared defaults, some overridden."""
    return {**TEACHERS[teacher].defaults(), **overrides}


def test_reference_draws_are_deterministic_per_sample_and_avoid_the_own_image(world, tiny_model):
    samples = load_unlearning_samples(world, "forget_10")
    pool = load_reference_pool(world, "retain_90")  # a pool that holds real people's images
    pool.append(("own", samples[0].image))
    context = TeacherContext(tiny_model.family, teacher_arguments("viker", k=4), pool, "retain")
    first = TEACHERS["viker"](samples[0], context)
    again = TEACHERS["viker"](samples[0], context)
    assert first.image_sources == again.image_sources
    assert "retain/own" not in first.image_sources
    other_seed = TeacherContext(tiny_model.family, teacher_arguments("viker", k=4, seed=1), pool, "retain")
    draws = {tuple(TEACHERS["viker"](s, other_seed).image_sources) for s in samples}
    assert len(draws) > 1


def test_vgid_perturbs_the_image_and_prepends_the_exact_icu_text(world, tiny_model):
    sample = load_unlearning_samples(world, "forget_10")[0]
    context = TeacherContext(
        tiny_model.family, teacher_arguments("vgid", perturbation="random-noise", icu_prompt="strict")
    )
    teacher_input = TEACHERS["vgid"](sample, context)
    (variant,) = teacher_input.variants
    assert variant.prompt == tiny_model.family.build_prompt(sample.question, True, ICU_PROMPTS["strict"])
    assert "individual\u2019s private data, but assist with other topics normally." in variant.prompt
    (seed,) = teacher_input.perturbation_seeds
    # Anyone can rebuild the teacher's image from the recorded seed.
    rebuilt = PERTURBATIONS["random-noise"](sample.pil_image(), np.random.default_rng(seed), 0.0)
    assert np.array_equal(np.asarray(rebuilt), np.asarray(variant.image))
    assert not np.array_equal(np.asarray(variant.image), np.asarray(sample.pil_image()))
    icu_input = TEACHERS["icu"](sample, replace(context, arguments=teacher_arguments("icu")))
    assert np.array_equal(np.asarray(icu_input.variants[0].image), np.asarray(sample.pil_image()))
    assert icu_input.variants[0].prompt == variant.prompt
    noise_input = TEACHERS["noise"](sample, replace(context, arguments=teacher_arguments("noise")))
    assert noise_input.variants[0].prompt == tiny_model.family.build_prompt(sample.question, True)


def test_vgid_draws_hold_one_row_per_sample_and_draw_with_its_own_noise(world, tiny_model_dir, tmp_path):
    """Vgid Algorithm 1 redraws the noise per batch: --draws D stores D rows per sample, draw 0 the same
    as a one-draw cache, each later draw with its own recorded seed and image."""
    one = tmp_path / "one"
    run(config(world, tiny_model_dir, one, teacher="vgid", limit=3))
    three = tmp_path / "three"
    run(config(world, tiny_model_dir, three, teacher="vgid", limit=3, args={"draws": 3}))
    assert read_manifest(three).header["teacher_params"]["draws"] == 3
    rows = list(iter_cache(three))
    assert sorted((row.sample_id, row.draw) for row in rows) == sorted(
        (row.sample_id, draw) for row in iter_cache(one) for draw in range(3)
    )
    first = {row.sample_id: row for row in iter_cache(one)}
    for row in iter_cache(three, draw=0):
        torch.testing.assert_close(row.support_probs, first[row.sample_id].support_probs)
    seeds = {}
    for record in read_manifest(three).samples:
        seeds.setdefault(record["sample_id"], []).append(record["perturbation_seeds"][0])
    assert all(len(set(values)) == 3 for values in seeds.values())
    later = {row.sample_id: row for row in iter_cache(three, draw=2)}
    assert any(
        not torch.equal(later[sample_id].support_probs, first[sample_id].support_probs) for sample_id in first
    )


def test_the_student_aware_rule_adds_entries_to_visual_teachers_only(world, tiny_model_dir, tmp_path):
    """tail_cost > 0 keeps the top-p set plus the entries that cut the tail bucket's error against the
    model on the unmodified input; for an unmodified teacher that input is the teacher's own, nothing."""

    def supports(teacher: str, tail_cost: float) -> dict:
        out = tmp_path / f"{teacher}-{tail_cost}"
        run(
            config(
                world, tiny_model_dir, out, teacher=teacher, limit=4, tail_cost=tail_cost, max_support=4096
            )
        )
        assert read_manifest(out).header["tail_cost"] == tail_cost
        return {
            row.sample_id: [set(ids[ids >= 0].tolist()) for ids in row.support_ids] for row in iter_cache(out)
        }

    plain, aware = supports("vgid", 0.0), supports("vgid", 1e-5)
    assert all(
        small <= large
        for sample_id in plain
        for small, large in zip(plain[sample_id], aware[sample_id], strict=True)
    )
    assert sum(len(s) for rows in aware.values() for s in rows) > sum(
        len(s) for rows in plain.values() for s in rows
    )
    assert supports("original", 0.0) == supports("original", 1e-5)


def test_perturbations():
    image = Image.new("RGB", (8, 6), (10, 120, 250))
    rng = np.random.default_rng
    assert np.all(np.asarray(PERTURBATIONS["white"](image, rng(0), 0.0)) == 255)
    noise = np.asarray(PERTURBATIONS["random-noise"](image, rng(0), 0.0))
    assert noise.shape == (6, 8, 3) and noise.std() > 50
    gaussian = np.asarray(PERTURBATIONS["gaussian"](image, rng(0), 0.2), dtype=np.float64)
    delta = gaussian - np.asarray(image, dtype=np.float64)
    assert 0.1 * 255 < delta[..., 0].std() < 0.3 * 255  # unclipped channel: std ~ sigma
    assert np.array_equal(np.asarray(PERTURBATIONS["gaussian"](image, rng(0), 0.0)), np.asarray(image))


def test_original_teacher_stores_the_reference_log_probs(world, tiny_model, tiny_model_dir, tmp_path):
    out = tmp_path / "original"
    run(config(world, tiny_model_dir, out, teacher="original", limit=3))
    samples = {s.sample_id: s for s in load_unlearning_samples(world, "forget_10")}
    for cached in iter_cache(out):
        sample = samples[cached.sample_id]
        prompted = PromptedSample(
            tiny_model.family.build_prompt(sample.question, True), sample.pil_image(), sample.answer
        )
        with torch.inference_mode():
            log_probs = torch.log_softmax(
                answer_logits(tiny_model.model, encode_answers(tiny_model, [prompted])), -1
            )
        expected = log_probs[torch.arange(cached.num_tokens), cached.answer_token_ids]
        torch.testing.assert_close(cached.target_log_prob, expected.float(), rtol=0, atol=1e-4)
    assert read_manifest(out).header["teacher_params"] == {}


def test_base_teacher_defaults_to_the_retain_split(world, tiny_model_dir, tmp_path):
    cfg = config(world, tiny_model_dir, tmp_path / "base", teacher="base", limit=2)
    chosen = checked(cfg, resolve_teacher("base", {}))[0]
    assert cfg.split is None and chosen.split == "retain_90"  # the teacher's declared split role
    run(cfg)
    assert all(
        record["sample_id"].startswith("retain_90/") for record in read_manifest(tmp_path / "base").samples
    )


def test_vision_feature_cache_changes_no_logit(world, tiny_model):
    samples = load_unlearning_samples(world, "forget_10")[:2]
    pool = load_reference_pool(world.parent, "people")
    context = TeacherContext(tiny_model.family, teacher_arguments("viker", k=3), pool, "people")
    inputs = [TEACHERS["viker"](sample, context) for sample in samples]
    extractor = TeacherExtractor(tiny_model, 0.9, 16)
    assert extractor.vision_features.enabled
    with torch.inference_mode():
        _, cached_probs, _, _ = extractor.mean_distributions(samples, inputs)
        _, again, _, _ = extractor.mean_distributions(samples, inputs)  # every image now from the cache
    assert extractor.vision_features.reused >= 6
    reference = torch.cat(
        [dense_probs(tiny_model, teacher_input.variants).mean(0) for teacher_input in inputs]
    )
    torch.testing.assert_close(cached_probs.double(), reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(again, cached_probs, rtol=1e-5, atol=1e-7)
    assert not VisionFeatureCache(torch.nn.Linear(2, 2)).enabled


def test_each_reference_image_is_preprocessed_once_per_run(world, tiny_model_dir, tmp_path, monkeypatch):
    """Over several batches and shards every image is resized and normalised once (issue 29, item 9),
    and the shards are byte-identical to those of preprocessing every image at every batch."""
    import pipeline.unlearning.extractor as extractor_module
    from pipeline.hashing import sha256_hex
    from pipeline.models import encode_answers

    image_processor_class = type(load_model(str(tiny_model_dir)).processor.image_processor)
    processed = []
    original_call = image_processor_class.__call__

    def counting(self, images, *args, **kwargs):
        processed.extend(
            sha256_hex(image.tobytes()) for image in (images if isinstance(images, list) else [images])
        )
        return original_call(self, images, *args, **kwargs)

    monkeypatch.setattr(image_processor_class, "__call__", counting)
    kept = tmp_path / "kept"
    run(config(world, tiny_model_dir, kept, num_shards=2, batch_size=2))
    drawn = {source for record in read_manifest(kept).samples for source in record["image_sources"]}
    samples = read_manifest(kept).samples
    assert len(samples) > 4 and sum(len(record["image_sources"]) for record in samples) > len(drawn)
    # each image once: the drawn references, and the samples' own images (the student-aware pass)
    assert len(processed) == len(set(processed)) >= len(drawn)

    every_batch = tmp_path / "every-batch"
    monkeypatch.setattr(
        extractor_module,
        "encode_keyed_answers",
        lambda loaded, variants, keys, kept: encode_answers(loaded, variants),
    )
    run(config(world, tiny_model_dir, every_batch, num_shards=2, batch_size=2))
    for shard in sorted(kept.glob("shard-*.json")):
        assert (
            json.loads(shard.read_text())["sha256"]
            == json.loads((every_batch / shard.name).read_text())["sha256"]
        )


# ---------------------------------------------------------------- sharding and resuming


def test_one_shard_alone_equals_that_shard_of_the_full_run(world, tiny_model_dir, viker_cache, tmp_path):
    out = tmp_path / "alone"
    run(config(world, tiny_model_dir, out, num_shards=2, shard_index=1))
    assert sorted(p.name for p in out.glob("shard-*")) == [
        "shard-00001-of-00002.json",
        "shard-00001-of-00002.parquet",
    ]
    full = json.loads((viker_cache / "shard-00001-of-00002.json").read_text())
    mine = json.loads((out / "shard-00001-of-00002.json").read_text())
    assert mine["samples"] == full["samples"] and mine["header"] == full["header"]
    assert mine["sha256"] == full["sha256"]  # deterministic to the byte
    all_ids = [s.sample_id for s in load_unlearning_samples(world, "forget_10")]
    assert [r["sample_id"] for r in read_manifest(viker_cache).samples] == all_ids


def test_rerun_skips_complete_shards_and_redoes_broken_ones(
    world, tiny_model_dir, viker_cache, tmp_path, capsys
):
    out = tmp_path / "resume"
    shutil.copytree(viker_cache, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    run(config(world, tiny_model_dir, out, num_shards=2))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert capsys.readouterr().err.count("skipped") == 2

    corrupt = out / "shard-00000-of-00002.parquet"
    corrupt.write_bytes(corrupt.read_bytes()[:-100])  # truncated: checksum fails
    (out / "shard-00001-of-00002.json").unlink()  # half-written: no manifest
    assert len(verify_cache(out)) == 2
    run(config(world, tiny_model_dir, out, num_shards=2))
    assert verify_cache(out) == []
    for name in ("shard-00000-of-00002.json", "shard-00001-of-00002.json"):
        assert (
            json.loads((out / name).read_text())["sha256"]
            == json.loads((viker_cache / name).read_text())["sha256"]
        )


def test_shards_of_a_run_with_other_settings_are_recomputed(
    world, tiny_model_dir, viker_cache, tmp_path, capsys
):
    # What `dvc repro` does after a parameter change: one shard process at a time, same directory.
    out = tmp_path / "other"
    shutil.copytree(viker_cache, out)
    run(config(world, tiny_model_dir, out, num_shards=2, top_p=0.5, shard_index=0))
    assert "shard-00001-of-00002.json: from a run with other top_p" in capsys.readouterr().err
    problems = verify_cache(out)  # a mixed directory is never read
    assert len(problems) == 1 and "shard-00001-of-00002.json" in problems[0] and "top_p" in problems[0]
    run(config(world, tiny_model_dir, out, num_shards=2, top_p=0.5, shard_index=1))
    assert verify_cache(out) == []
    assert read_manifest(out).header["top_p"] == 0.5


def test_a_model_with_another_tokenizer_is_refused_naming_both(world, viker_cache, tmp_path, tiny_model):

    other_dir = build_random_tiny_llava(
        tmp_path / "other-model",
        seed=1,
        config=TinyLlavaConfig(
            vocab_size=300,
            text_hidden=32,
            text_layers=1,
            text_heads=2,
            text_intermediate=64,
            vision_hidden=32,
            vision_layers=1,
        ),
    )
    out = tmp_path / "mixed"
    shutil.copytree(viker_cache, out)
    with pytest.raises(IncompatibleCacheError) as error:
        run(config(world, other_dir, out, num_shards=2))
    assert tiny_model.tokenizer_fingerprint in str(error.value)
    assert "shard-0000" in str(error.value)
    # One shard of a DVC stage (switching experiments): the other tokenizer's shards are stale, not fatal.
    run(config(world, other_dir, out, num_shards=2, shard_index=0))
    problems = verify_cache(out)
    assert problems and all("shard-00001" in problem for problem in problems)  # until its stage reruns


# ---------------------------------------------------------------- bad input


def rewrite_split(world: Path, tmp_path: Path, change) -> Path:
    """A copy of the world whose forget_10 rows were passed through `change(rows)`."""
    copy = tmp_path / "world"
    shutil.copytree(world.parent, copy)
    path = copy / "data" / "forget_10" / "train-00000-of-00001.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    return copy / "data"


def test_missing_image_file_is_named(world, tiny_model_dir, tmp_path):
    def drop_image(rows):
        rows[0]["image"] = {"bytes": None, "path": "portraits/missing.png"}

    data = rewrite_split(world, tmp_path, drop_image)
    with pytest.raises(DataError, match="missing.png"):
        run(config(data, tiny_model_dir, tmp_path / "out"))


def test_unreadable_image_names_the_sample(world, tiny_model_dir, tmp_path):
    def corrupt_image(rows):
        rows[0]["image"] = {"bytes": b"\x89PNG not really", "path": None}

    data = rewrite_split(world, tmp_path, corrupt_image)
    with pytest.raises(ValueError, match=r"sample forget_10/\S+/qa/0 .*does not decode"):
        run(config(data, tiny_model_dir, tmp_path / "out", teacher="vgid"))
    with pytest.raises(ValueError, match=r"sample forget_10/\S+/qa/0 .*does not decode"):
        run(config(data, tiny_model_dir, tmp_path / "out2"))
    assert not list((tmp_path / "out2").glob("*.parquet"))  # nothing published


def test_empty_and_blank_answers_are_skipped_alike_and_reported_by_id(
    world, tiny_model_dir, tmp_path, capsys
):
    def blank_answers(rows):
        pairs = json.loads(rows[0]["metadata"])
        pairs[1]["Answer"], pairs[2]["Answer"] = "   ", ""
        rows[0]["metadata"] = json.dumps(pairs)

    data = rewrite_split(world, tmp_path, blank_answers)
    run(config(data, tiny_model_dir, tmp_path / "out", limit=4))
    warning = capsys.readouterr().err
    skipped = re.search(r"skipped 2 qa pairs without a question or answer: (\S+), (\S+)\n", warning)
    assert skipped and skipped.group(1).endswith("/qa/1") and skipped.group(2).endswith("/qa/2")
    cached = {record["sample_id"] for record in read_manifest(tmp_path / "out").samples}
    assert skipped.group(1) not in cached and skipped.group(2) not in cached


def test_answer_beyond_the_model_limit_names_the_sample(world, tiny_model_dir, tmp_path):
    def long_answer(rows):
        pairs = json.loads(rows[0]["metadata"])
        pairs[2]["Answer"] = " ".join(["This person was born in Lisbon."] * 400)
        rows[0]["metadata"] = json.dumps(pairs)

    data = rewrite_split(world, tmp_path, long_answer)
    with pytest.raises(ValueError, match=r"sample forget_10/\S+/qa/2: .* more than the model's limit"):
        run(config(data, tiny_model_dir, tmp_path / "out", teacher="original"))


def test_reference_pool_smaller_than_k(world, tiny_model_dir, tmp_path):
    with pytest.raises(PrecomputeError, match=r"pool 'pets' .* 3 images, fewer than k=5"):
        run(config(world, tiny_model_dir, tmp_path / "out", args={"reference_kind": "pets", "k": 5}))


def test_unreadable_reference_image_is_named(world, tiny_model_dir, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world.parent, copy)
    for path in (copy / "references" / "people").glob("*.png"):
        path.write_bytes(b"garbage")
        broken = path.stem
        break
    with pytest.raises(ValueError, match=f"reference image {broken} of pool 'people'"):
        run(config(copy / "data", tiny_model_dir, tmp_path / "out"))


def test_unknown_names_are_refused(world, tiny_model_dir, tmp_path):
    for teacher, args, message in [
        ("nope", {}, "unknown teacher 'nope'; known: base, icu, noise, original, vgid, viker"),
        ("vgid", {"perturbation": "blur"}, "perturbation 'blur' is not one of gaussian, random-noise, white"),
        ("vgid", {"icu_prompt": "rude"}, "icu_prompt 'rude' is not one of"),
        ("viker", {"reference_kind": "cars"}, "reference_kind 'cars' is not one of people"),
        (
            "viker",
            {"sigma": 0.4},
            "teacher 'viker' takes no argument 'sigma'; it accepts: k, reference_kind, seed",
        ),
        ("vgid", {"draws": 0}, r"draws 0 is out of range \(must be >= 1\)"),
    ]:  # before any model or data is loaded
        with pytest.raises(TeacherError, match=message):
            run(config(world, tiny_model_dir, tmp_path, teacher=teacher, args=args))
    with pytest.raises(PrecomputeError, match="--shard-index 2 is outside 0..1"):
        checked(
            config(world, tiny_model_dir, tmp_path, shard_index=2, num_shards=2), resolve_teacher("base", {})
        )


def test_a_teacher_entry_sets_its_own_arguments_in_the_declared_order():
    """params.yaml's `teachers` entry: its args over the teacher's defaults, then the command line's; the
    header's teacher_params keep the order the teacher declares (the cache format's)."""
    teachers = {"noisy": {"teacher": "vgid", "args": {"sigma": 0, "draws": 2}}}
    entry = resolve_teacher("noisy", teachers, {"icu_prompt": "polite"})
    assert (entry.name, entry.teacher) == ("noisy", "vgid")
    assert list(entry.arguments.items()) == [
        ("perturbation", "random-noise"), ("sigma", 0.0), ("icu_prompt", "polite"), ("seed", 0), ("draws", 2)
    ]  # fmt: skip
    assert isinstance(entry.arguments["sigma"], float)  # as the command line reads a number
    assert resolve_teacher("viker", {}).arguments == {"k": 5, "reference_kind": "people", "seed": 0}
    assert resolve_teacher("original", {}).arguments == {}
    with pytest.raises(TeacherError, match=r"teachers.bad must be a mapping with teacher, args only"):
        resolve_teacher("bad", {"bad": {"teacher": "viker", "k": 5}})


def test_text_only_samples_keep_the_unmodified_input_for_visual_teachers(tiny_model):
    sample = QASample("s/1", "p", "What does she do?", "She is a nurse.")
    for name in ("viker", "noise"):
        context = TeacherContext(tiny_model.family, teacher_arguments(name))
        teacher_input = TEACHERS[name](sample, context)
        assert teacher_input.variants[0].image is None and "text-only" in teacher_input.intervention
    vgid_input = TEACHERS["vgid"](sample, TeacherContext(tiny_model.family, teacher_arguments("vgid")))
    assert ICU_PROMPTS["strict"] in vgid_input.variants[0].prompt


def test_cli_precompute_and_measure(world, tiny_model_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    (tmp_path / "params.yaml").write_text(
        "precompute: {batch_size: 2}\n"
    )  # not the project's mini-world paths
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "precompute",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(world),
        "--out",
        str(out),
        "--teacher",
        "noise",
        "--arg",
        "perturbation=white",
        "--limit",
        "3",
        "--no-progress",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        ["cache", "inspect", str(out), "--measure-kl", "--model", str(tiny_model_dir), "--data", str(world)],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["measured_tokens"] == summary["tokens"] > 0
    assert 0 <= summary["kl_error"] < 0.1
    result = runner.invoke(main, [*args[:9], "--teacher", "viker", "--arg", "k=50", "--no-progress"])
    assert result.exit_code != 0 and "fewer than k=50" in result.output


def test_keep_freed_memory_stops_page_faulting_reused_buffers():
    """After keep_freed_memory, a freed large buffer is reused without new page faults (glibc)."""
    import resource

    assert keep_freed_memory()  # this machine's C library is glibc

    def faults_of_a_few_large_allocations() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            buffer = torch.ones(4 << 20)  # 16 MiB, below the 32 MiB mmap threshold set above
            del buffer
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_a_few_large_allocations()  # the first one grows the heap
    assert faults_of_a_few_large_allocations() < 1000  # 5 x 16 MiB fresh would be ~20 000 faults


def test_cli_runs_a_params_teacher_entry_into_its_cache_folder(tmp_path, monkeypatch):
    """`pipeline precompute --teacher ENTRY`: the entry's teacher and args (--arg over them), written to
    <cache_root>/<entry> unless --out is given."""
    import stages.precompute

    params = tmp_path / "params.yaml"
    params.write_text(
        "caches: {cache_root: caches}\n"
        "teachers: {soft: {teacher: vgid, args: {sigma: 0.2, perturbation: gaussian}}}\n"
    )
    seen = []
    monkeypatch.setattr(stages.precompute, "run", lambda config, entry: seen.append((config, entry)))
    common = ["--params", str(params), "precompute", "--model", "m", "--data", "d", "--teacher", "soft"]
    assert CliRunner().invoke(main, [*common, "--arg", "draws=2"]).exit_code == 0
    ((config, entry),) = seen
    assert entry.teacher == "vgid" and entry.arguments["sigma"] == 0.2 and entry.arguments["draws"] == 2
    assert config.out is None and checked(replace(config, split="forget_10"), entry)[0].out == str(
        Path("caches") / "soft"
    )
    refused = CliRunner().invoke(main, [*common, "--arg", "k=5"])
    assert refused.exit_code == 1 and "teacher 'vgid' takes no argument 'k'" in refused.output
