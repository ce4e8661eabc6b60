"""The on-disk cache: round trips, sharding, streaming, verification, compatibility and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import cache.reader as cache_reader
from cache import (
    PAD_ID,
    SCHEMA_VERSION,
    CachedSample,
    CacheError,
    IncompatibleCacheError,
    RowLayout,
    ShardWriter,
    check_compatible,
    completed_shard,
    concat_samples,
    inspect_cache,
    iter_cache,
    read_manifest,
    renormalize_support,
    shard_bounds,
    truncate_top_p,
    verify_cache,
)
from pipeline.hashing import file_sha256
from stages.cli import main

VOCAB = 300
HEADER = {
    "teacher": "viker",
    "teacher_params": {"k": 5, "reference_kind": "people", "seed": 0},
    "top_p": 0.99,
    "max_support": 64,
    "prompt_template": "USER: <image>\n{question} ASSISTANT:",
    "model_fingerprint": "model-aaa",
    "tokenizer_fingerprint": "tok-bbb",
    "dataset_fingerprint": "data-ccc",
    "vocab_size": VOCAB,
}


def teacher_logits(sample_index: int, tokens: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + sample_index)
    return torch.randn(tokens, VOCAB, generator=generator, dtype=torch.float64) * 4


def make_sample(sample_index: int, tokens: int, top_p: float = 0.9, max_support: int = 40) -> CachedSample:
    logits = teacher_logits(sample_index, tokens)
    answer = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(sample_index))
    truncated = truncate_top_p(logits, top_p, max_support)
    log_prob = torch.log_softmax(logits, -1)[torch.arange(tokens), answer]
    return CachedSample.from_distributions(f"forget/{sample_index}", answer, truncated, log_prob)


def record(sample: CachedSample) -> dict:
    return {
        "prompt": f"USER: <image>\nWho is {sample.sample_id}? ASSISTANT:",
        "image_sources": [f"people/{sample.sample_id}-{j}.png" for j in range(2)],
        "perturbation_seeds": [7],
    }


def write_cache(
    directory: Path, samples: list[CachedSample], num_shards: int, layout: RowLayout | None = None
):
    for index in range(num_shards):
        with ShardWriter(
            directory, index, num_shards, HEADER, layout=layout or RowLayout(), row_group_samples=3
        ) as w:
            for position in shard_bounds(len(samples), index, num_shards):
                w.write(samples[position], record(samples[position]))


@pytest.fixture(scope="module")
def samples() -> list[CachedSample]:
    return [make_sample(index, tokens=3 + index % 5) for index in range(11)]


@pytest.fixture()
def cache_dir(tmp_path, samples) -> Path:
    write_cache(tmp_path / "cache", samples, num_shards=3)
    return tmp_path / "cache"


def assert_same(read: CachedSample, written: CachedSample, layout: RowLayout = RowLayout()) -> None:
    """Ids, tail mass and log-probs come back exactly; probabilities as the layout stores them, then
    renormalised so that support + tail = 1; entropy in the layout's dtype."""
    assert read.sample_id == written.sample_id
    torch.testing.assert_close(read.answer_token_ids, written.answer_token_ids)
    torch.testing.assert_close(read.support_ids, written.support_ids, rtol=0, atol=0)
    for name in ("tail_mass", "target_log_prob"):  # float32 exactly
        torch.testing.assert_close(getattr(read, name), getattr(written, name), rtol=0, atol=0)
    entropy = written.entropy.numpy().astype(layout.entropy_dtype).astype(np.float32)
    torch.testing.assert_close(read.entropy, torch.from_numpy(entropy), rtol=0, atol=0)
    valid = written.support_ids >= 0
    stored = torch.zeros_like(written.support_probs)
    stored[valid] = torch.from_numpy(
        layout.stored_probs(written.support_probs[valid].numpy()).astype(np.float32)
    )
    torch.testing.assert_close(read.support_probs, renormalize_support(stored, written.tail_mass))
    mass = read.support_probs.double().sum(-1) + read.tail_mass.double()
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=1e-6)
    # Stored precision: float16's relative 2^-11, or the layout's absolute step (halved by rounding).
    step = layout.prob_absolute_step or 0.0
    tolerance = torch.maximum(written.support_probs * 2.0**-10, torch.full_like(written.support_probs, step))
    assert bool(((read.support_probs - written.support_probs).abs() <= tolerance + 1e-6).all())


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "layout",
    [
        RowLayout(),
        RowLayout(prob_dtype="float32", entropy_dtype="float32"),
        RowLayout(prob_absolute_step=None),
        RowLayout(delta_ids=True),
        RowLayout(float_encoding="PLAIN", int_encoding="DELTA_BINARY_PACKED"),
    ],
)
def test_round_trip_preserves_every_value(tmp_path, samples, layout):
    write_cache(tmp_path / "c", samples, num_shards=2, layout=layout)
    read = list(iter_cache(tmp_path / "c"))
    assert [s.sample_id for s in read] == [s.sample_id for s in samples]
    for got, want in zip(read, samples, strict=True):
        assert_same(got, want, layout)


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 6), st.floats(0.1, 1.0), st.integers(1, 30)), min_size=1, max_size=6)
)
def test_round_trip_of_random_supports(tmp_path_factory, shapes):
    directory = tmp_path_factory.mktemp("prop")
    written = [make_sample(i, tokens, top_p, cap) for i, (tokens, top_p, cap) in enumerate(shapes)]
    write_cache(directory, written, num_shards=1)
    for got, want in zip(iter_cache(directory), written, strict=True):
        assert_same(got, want)


def test_manifest_keeps_header_and_per_sample_records(cache_dir, samples):
    manifest = read_manifest(cache_dir)
    assert manifest.num_shards == 3 and manifest.num_samples == len(samples)
    assert manifest.num_tokens == sum(s.num_tokens for s in samples)
    assert manifest.header["teacher_params"] == HEADER["teacher_params"]
    assert manifest.header["schema_version"] == SCHEMA_VERSION
    first = manifest.samples[0]
    assert first["sample_id"] == samples[0].sample_id
    assert first["prompt"] == record(samples[0])["prompt"]
    assert first["image_sources"] == record(samples[0])["image_sources"]
    assert first["perturbation_seeds"] == [7]
    assert first["num_tokens"] == samples[0].num_tokens
    sidecar = json.loads((cache_dir / "shard-00001-of-00003.json").read_text())
    assert sidecar["sha256"] == file_sha256(cache_dir / "shard-00001-of-00003.parquet")


def test_shard_bounds_partition_the_samples():
    for total in range(0, 23):
        for shards in range(1, 6):
            parts = [list(shard_bounds(total, i, shards)) for i in range(shards)]
            assert sum(parts, []) == list(range(total))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="shard-index"):
        shard_bounds(10, 3, 3)


def test_ranks_split_the_stream_disjointly_and_completely(cache_dir, samples):
    parts = [[s.sample_id for s in iter_cache(cache_dir, rank=r, world_size=3)] for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(s.sample_id for s in samples)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    only_middle = [s.sample_id for s in iter_cache(cache_dir, shards=[1])]
    assert only_middle == [samples[i].sample_id for i in shard_bounds(len(samples), 1, 3)]


def test_shuffle_is_a_deterministic_permutation(cache_dir, samples):
    first = [s.sample_id for s in iter_cache(cache_dir, shuffle_seed=5)]
    again = [s.sample_id for s in iter_cache(cache_dir, shuffle_seed=5)]
    other = [s.sample_id for s in iter_cache(cache_dir, shuffle_seed=6)]
    assert first == again and sorted(first) == sorted(s.sample_id for s in samples)
    assert first != [s.sample_id for s in samples] or other != first


def test_reader_streams_one_row_group_at_a_time(cache_dir, monkeypatch):
    decoded = []
    original = cache_reader._decode_batch
    monkeypatch.setattr(
        cache_reader, "_decode_batch", lambda batch, layout: decoded.append(1) or original(batch, layout)
    )
    stream = iter_cache(cache_dir, batch_size=2)
    next(stream)
    rows_decoded_for_first = len(decoded)
    list(stream)
    assert rows_decoded_for_first <= 2 < len(decoded)  # a row group of 3 rows is two batches of <= 2


def test_concat_samples_pads_to_the_widest_support(samples):
    answer_ids, distributions, log_probs = concat_samples(samples[:3])
    assert len(answer_ids) == len(distributions) == len(log_probs) == sum(s.num_tokens for s in samples[:3])
    width = max(s.support_ids.shape[1] for s in samples[:3])
    assert distributions.support_ids.shape[1] == width
    first = samples[0]
    assert torch.equal(
        distributions.support_ids[: first.num_tokens, : first.support_ids.shape[1]], first.support_ids
    )
    assert torch.all(distributions.support_ids[: first.num_tokens, first.support_ids.shape[1] :] == PAD_ID)


# ---------------------------------------------------------------- incomplete, corrupt, inconsistent


def test_complete_cache_verifies(cache_dir):
    assert verify_cache(cache_dir) == []
    assert completed_shard(cache_dir, 2, 3) is not None


def test_missing_shard_is_named(cache_dir):
    (cache_dir / "shard-00001-of-00003.parquet").unlink()
    (cache_dir / "shard-00001-of-00003.json").unlink()
    problems = verify_cache(cache_dir)
    assert len(problems) == 1 and "shard-00001-of-00003" in problems[0] and "missing" in problems[0]
    with pytest.raises(CacheError, match="shard-00001-of-00003"):
        read_manifest(cache_dir)


def test_parquet_without_manifest_is_half_written(cache_dir):
    (cache_dir / "shard-00002-of-00003.json").unlink()
    problems = verify_cache(cache_dir)
    assert any("shard-00002-of-00003.parquet" in p and "half-written" in p for p in problems)
    assert completed_shard(cache_dir, 2, 3) is None
    with pytest.raises(CacheError, match="half-written"):
        list(iter_cache(cache_dir))


def test_corrupt_shard_fails_its_checksum_and_the_reader_names_it(cache_dir):
    path = cache_dir / "shard-00000-of-00003.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify_cache(cache_dir)
    assert any("shard-00000-of-00003.parquet" in p and "sha256" in p for p in problems)
    assert completed_shard(cache_dir, 0, 3) is None
    with pytest.raises(CacheError, match="shard-00000-of-00003"):
        read_manifest(cache_dir, checksums=True)
    # Without the up-front verification the streaming reader still checks before using the rows.
    monkey_manifest = read_manifest(cache_dir)  # checksums are not read here
    assert monkey_manifest.num_shards == 3
    with pytest.raises(CacheError, match=r"shard-00000-of-00003\.parquet: sha256"):
        next(iter_cache(cache_dir))


def test_truncated_manifest_is_named(cache_dir):
    path = cache_dir / "shard-00001-of-00003.json"
    path.write_text(path.read_text()[:50])
    problems = verify_cache(cache_dir)
    assert any("shard-00001-of-00003.json" in p and "malformed" in p for p in problems)


def test_shards_with_different_headers_are_refused(tmp_path, samples):
    directory = tmp_path / "mixed"
    with ShardWriter(directory, 0, 2, HEADER) as writer:
        writer.write(samples[0], record(samples[0]))
    with ShardWriter(directory, 1, 2, {**HEADER, "top_p": 0.9}) as writer:
        writer.write(samples[1], record(samples[1]))
    problems = verify_cache(directory)
    assert any("shard-00001-of-00002.json" in p and "top_p" in p for p in problems)


def test_duplicate_sample_ids_across_shards_are_reported(tmp_path, samples):
    directory = tmp_path / "dup"
    for index in range(2):
        with ShardWriter(directory, index, 2, HEADER) as writer:
            writer.write(samples[0], record(samples[0]))
    assert any(samples[0].sample_id in p for p in verify_cache(directory))


def test_failed_writer_publishes_nothing(tmp_path, samples):
    directory = tmp_path / "failed"
    with pytest.raises(RuntimeError):
        with ShardWriter(directory, 0, 1, HEADER) as writer:
            writer.write(samples[0], record(samples[0]))
            raise RuntimeError("crash in the middle of a shard")
    assert list(directory.iterdir()) == []


def test_a_failed_rewrite_leaves_the_complete_shard(cache_dir):
    """A complete shard is only ever replaced by a complete one: a rewrite that fails leaves it whole."""
    before = {path.name: path.read_bytes() for path in cache_dir.iterdir()}
    replacement = make_sample(99, 3)
    with pytest.raises(RuntimeError):
        with ShardWriter(cache_dir, 1, 3, HEADER) as writer:
            writer.write(replacement, record(replacement))
            raise RuntimeError("a bad row, an interrupt, ...")
    assert verify_cache(cache_dir) == []
    assert {path.name: path.read_bytes() for path in cache_dir.iterdir()} == before


def test_rewriting_a_shard_replaces_it(cache_dir):
    replacement = make_sample(99, 3)
    with ShardWriter(cache_dir, 1, 3, HEADER) as writer:
        writer.write(replacement, record(replacement))
    assert verify_cache(cache_dir) == []
    assert [s.sample_id for s in iter_cache(cache_dir, shards=[1])] == [replacement.sample_id]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: setattr(s, "support_ids", s.support_ids.flip(1)), "ascending|padding"),
        (
            lambda s: s.support_ids.__setitem__(s.support_ids == s.support_ids.max(), VOCAB + 3),
            "vocabulary size",
        ),
        (lambda s: setattr(s, "tail_mass", s.tail_mass[:-1]), "teacher rows"),
        (lambda s: s.tail_mass.__setitem__(0, float("nan")), "finite"),
        (lambda s: setattr(s, "support_ids", torch.full_like(s.support_ids, PAD_ID)), "support entry"),
    ],
)
def test_writer_rejects_malformed_rows_naming_the_sample(tmp_path, damage, message):
    sample = make_sample(3, 4)
    damage(sample)
    with pytest.raises(CacheError, match=message) as error:
        with ShardWriter(tmp_path / "bad", 0, 1, HEADER) as writer:
            writer.write(sample, {})
    assert sample.sample_id in str(error.value)


# ---------------------------------------------------------------- compatibility


def test_check_compatible_names_both_fingerprints(cache_dir):
    manifest = read_manifest(cache_dir)
    check_compatible(manifest, "model-aaa", "tok-bbb")
    check_compatible(manifest, None, "tok-bbb")
    with pytest.raises(IncompatibleCacheError) as error:
        check_compatible(manifest, "model-aaa", "tok-zzz")
    assert "tok-bbb" in str(error.value) and "tok-zzz" in str(error.value)
    with pytest.raises(IncompatibleCacheError) as error:
        check_compatible(manifest, "model-xyz", "tok-bbb")
    assert "model-aaa" in str(error.value) and "model-xyz" in str(error.value)


def test_a_cache_of_other_image_preprocessing_names_the_part_and_file(tiny_model_dir, tmp_path):
    """The same weights with another image_mean: the refusal says the preprocessing differs, and in which
    file; a header without the model's parts (an older cache) is still read and refused by fingerprint."""
    import shutil

    from pipeline.models.loading import fingerprinted_model

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    config_path = copy / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"]["image_mean"] = [0.1, 0.2, 0.3]
    config_path.write_text(json.dumps(config))
    (cached, cached_parts), (given, given_parts) = (
        fingerprinted_model(tiny_model_dir),
        fingerprinted_model(copy),
    )
    header = {"model_fingerprint": cached, "tokenizer_fingerprint": "tok", "model_parts": cached_parts}
    check_compatible(header, cached, "tok", cached_parts)
    with pytest.raises(
        IncompatibleCacheError, match=r"what differs: preprocessing \(processor_config\.json\)"
    ):
        check_compatible(header, given, "tok", given_parts)
    old_header = {key: value for key, value in header.items() if key != "model_parts"}
    check_compatible(old_header, cached, "tok", cached_parts)
    with pytest.raises(IncompatibleCacheError, match=f"{cached} but the model given is {given}"):
        check_compatible(old_header, given, "tok", given_parts)


# ---------------------------------------------------------------- inspection and CLI


def test_inspect_reports_sizes_and_the_truncation_error(tmp_path):
    written = [make_sample(i, 5, top_p=0.8, max_support=20) for i in range(4)]
    write_cache(tmp_path / "c", written, num_shards=2)
    tokens = sum(s.num_tokens for s in written)

    def exact(samples):
        for sample in samples:
            index = int(sample.sample_id.split("/")[1])
            teacher = torch.softmax(teacher_logits(index, sample.num_tokens), -1)
            yield teacher, torch.zeros(sample.num_tokens, VOCAB, dtype=torch.float64)  # uniform student

    summary = inspect_cache(tmp_path / "c", measure_against=exact)
    assert summary["tokens"] == tokens and summary["samples"] == 4 and summary["shards"] == 2
    on_disk = sum(p.stat().st_size for p in (tmp_path / "c").glob("*.parquet"))
    assert summary["bytes_per_token"] == pytest.approx(on_disk / tokens)
    sizes = torch.cat([(s.support_ids >= 0).sum(1) for s in written]).double()
    assert summary["mean_support_size"] == pytest.approx(sizes.mean().item())
    assert summary["mean_tail_mass"] == pytest.approx(
        torch.cat([s.tail_mass for s in written]).double().mean().item()
    )
    # Against a uniform student, KL(R||U) = log V - H(R); the coarse-grained value loses the tail's entropy.
    assert summary["measured_tokens"] == tokens
    assert summary["kl_error"] > 1e-3
    assert summary["kl_exact_mean"] == pytest.approx(
        np.log(VOCAB) - torch.cat([s.entropy for s in written]).double().mean().item(), rel=1e-5
    )


def test_inspect_error_is_tiny_without_truncation(tmp_path):
    written = [make_sample(i, 4, top_p=1.0, max_support=VOCAB) for i in range(2)]
    write_cache(tmp_path / "c", written, num_shards=1, layout=RowLayout(prob_dtype="float32"))

    def exact(samples):
        for sample in samples:
            index = int(sample.sample_id.split("/")[1])
            teacher = torch.softmax(teacher_logits(index, sample.num_tokens), -1)
            yield teacher, torch.randn(sample.num_tokens, VOCAB, dtype=torch.float64)

    assert inspect_cache(tmp_path / "c", measure_against=exact)["kl_error"] < 1e-5


def test_cli_verify_and_inspect(cache_dir, samples):
    runner = CliRunner()
    result = runner.invoke(main, ["cache", "verify", str(cache_dir)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["cache", "inspect", str(cache_dir)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["tokens"] == sum(s.num_tokens for s in samples)
    assert summary["bytes_per_token"] > 0 and summary["mean_support_size"] >= 1

    (cache_dir / "shard-00002-of-00003.json").unlink()
    result = runner.invoke(main, ["cache", "verify", str(cache_dir)])
    assert result.exit_code != 0
    assert "shard-00002-of-00003.parquet" in result.output and "half-written" in result.output
    result = runner.invoke(main, ["cache", "inspect", str(cache_dir)])
    assert result.exit_code != 0 and "shard-00002-of-00003" in result.output


def test_a_malformed_row_read_from_disk_names_its_sample(tmp_path, samples, monkeypatch):
    """The writer refuses repeated support ids; a file written otherwise is refused on reading."""
    import cache.writer

    monkeypatch.setattr(cache.writer, "_check_sample", lambda sample, vocab_size: None)
    broken = make_sample(7, 3)
    broken.support_ids[2, 1] = broken.support_ids[2, 0]
    with ShardWriter(tmp_path, 0, 1, HEADER) as writer:
        writer.write(samples[0], record(samples[0]))
        writer.write(broken, record(broken))
    with pytest.raises(CacheError, match="sample forget/7, answer token 2: a support id appears twice"):
        list(iter_cache(tmp_path))
