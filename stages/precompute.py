"""Stage `precompute`: the frozen full model's teacher distributions over the answer tokens, cached.

For every sample of the split, a teacher (pipeline.unlearning.teachers) builds the intervened inputs: k reference
images for ViKeR, a perturbed image and an unlearning instruction for Vgid, the unmodified input for
`original` / `base`. The model runs teacher-forced on the ground-truth answer; only the answer positions
go through the output layer (pipeline.models.answer_logits), the per-token distribution is the mean of
the variants' softmaxes (ViKeR Eq. 4; one variant otherwise), and it is truncated to its top-p support on
the device before anything is copied. Rows go to sharded zstd Parquet (cache.writer).

Distribution: `--shard-index i --num-shards N` computes exactly the contiguous slice i of the split
(cache.shard_bounds), so N processes (a Slurm array, one per GPU) produce the whole cache.
Without --shard-index a process computes every shard in turn. A shard that is complete and whose
checksum verifies is skipped; a missing, half-written or corrupt one, or one left by a run with other
settings (model, parameters, data), is computed again. An output directory written with another
tokenizer is refused.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cache import (
    CachedSample,
    CacheError,
    IncompatibleCacheError,
    ShardManifest,
    ShardWriter,
    check_compatible,
    completed_shard,
    inspect_cache,
    read_manifest,
    shard_bounds,
    shard_header,
    shard_name,
)
from pipeline.benchmarks import (
    reference_root,
    samples_fingerprint,
)
from pipeline.models import (
    LoadedModel,
    check_joint_tokenization,
    load_model,
)
from pipeline.samples import QASample
from pipeline.unlearning.extractor import TeacherExtractor
from pipeline.unlearning.teachers import (
    TEACHERS,
    Teacher,
    TeacherContext,
    TeacherEntry,
    original,
    pool_fingerprint,
    reference_pool,
    resolve_teacher,
)
from stages.config import PrecomputeConfig


class PrecomputeError(ValueError):
    """Input the stage cannot turn into correct rows; the message names the sample or file."""


def checked(config: PrecomputeConfig, entry: TeacherEntry) -> tuple[PrecomputeConfig, Teacher]:
    """The config with its split and output chosen, and the entry's teacher; refuses what it can before
    anything loads (the entry's arguments were checked against the teacher's declaration)."""
    if config.shard_index is not None and not 0 <= config.shard_index < config.num_shards:
        raise PrecomputeError(f"--shard-index {config.shard_index} is outside 0..{config.num_shards - 1}")
    teacher = TEACHERS[entry.teacher]
    config = replace(
        config,
        split=config.split or config.split_names()[teacher.split_role],
        kinds=tuple(config.kinds),
        out=config.out or str(Path(config.cache_root) / entry.name),
    )
    return config, teacher


# ---------------------------------------------------------------- the stage, top to bottom


def run(config: PrecomputeConfig, entry: TeacherEntry | None = None) -> list[ShardManifest]:
    """Compute (or skip, when complete) the shards this process owns; returns their manifests.

    entry: the resolved teacher entry (default: `config.teacher` as a registered teacher with config.args).
    """
    entry = entry or resolve_teacher(config.teacher, {}, config.args)
    config, teacher = checked(config, entry)
    if config.threads:
        torch.set_num_threads(config.threads)
    samples = load_samples(config)
    loaded = load_model(config.model, **config.loading())
    context = teacher_context(config, entry, loaded)
    first = samples[0]  # once per run: the tokenizer splits prompt and answer cleanly
    check_joint_tokenization(loaded, first.sample_id, context.prompt(first), first.answer)
    header = cache_header(config, entry, loaded, samples, context)
    expected_header = shard_header(header, config.num_shards)
    check_existing_shards(Path(config.out), expected_header, one_shard=config.shard_index is not None)

    extractor = TeacherExtractor(loaded, config.top_p, config.max_support, config.tail_cost)
    # The student-aware part of the rule compares R with the frozen model on the unmodified input,
    # which is R itself for an unmodified teacher.
    compares_student = config.tail_cost > 0 and not teacher.unmodified
    owned = range(config.num_shards) if config.shard_index is None else [config.shard_index]
    manifests = []
    for shard_index in owned:
        done = completed_shard(config.out, shard_index, config.num_shards, expected_header)
        if done is not None:
            _say(f"{shard_name(shard_index, config.num_shards)}: complete and verified, skipped")
            manifests.append(done)
            continue
        started, cpu_started = time.perf_counter(), time.process_time()
        shard_samples = [samples[i] for i in shard_bounds(len(samples), shard_index, config.num_shards)]
        # Features computed in another shard's batches may differ in the last bit: starting each shard
        # empty makes its bytes depend on the shard alone, whichever process computes it.
        extractor.vision_features.clear()
        with ShardWriter(config.out, shard_index, config.num_shards, header) as writer:
            for chunk in _progress(_batched(shard_samples, config.batch_size), config, len(shard_samples)):
                for draw in range(teacher.draws(entry.arguments)):
                    drawn = replace(context, draw=draw)
                    inputs = [teacher(sample, drawn) for sample in chunk]
                    students = [original(sample, drawn) for sample in chunk] if compares_student else None
                    for sample, teacher_input, row in zip(
                        chunk, inputs, extractor(chunk, inputs, students), strict=True
                    ):
                        writer.write(
                            replace(row, draw=draw), {**teacher_input.record(), "answer": sample.answer}
                        )
            manifest = writer.close()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        name = shard_name(shard_index, config.num_shards)
        _say(
            f"{name}: {manifest.num_samples} samples, {manifest.num_tokens} tokens in {elapsed:.2f} s (cpu {cpu:.2f} s)"
        )
        manifests.append(manifest)
    return manifests


def load_samples(config: PrecomputeConfig) -> list[QASample]:
    """The split's triples, with the checks that need no model: every answer non-empty."""
    samples = config.training_layout().unlearning_samples(config.split, config.kinds)
    if config.limit is not None:
        samples = samples[: config.limit]
    for sample in samples:
        if not sample.answer or not sample.answer.strip():
            raise PrecomputeError(
                f"sample {sample.sample_id} ({sample.image_source or config.split}) has an empty answer"
            )
    return samples


def teacher_context(config: PrecomputeConfig, entry: TeacherEntry, loaded: LoadedModel) -> TeacherContext:
    """The teacher's arguments and, for a teacher that draws reference images, its pool (loaded here)."""
    teacher = TEACHERS[entry.teacher]
    pool, kind = reference_pool(teacher, entry.arguments, config.references, config.data, config.split)
    if pool is not None and len(pool) < (k := teacher.pool(entry.arguments)[1]):
        root = reference_root(config.references, config.data, kind)
        raise PrecomputeError(
            f"reference pool {kind!r} under {root} has {len(pool)} images, fewer than k={k}"
        )
    return TeacherContext(
        family=loaded.family, arguments=entry.arguments, reference_pool=pool, reference_kind=kind
    )


def cache_header(
    config: PrecomputeConfig,
    entry: TeacherEntry,
    loaded: LoadedModel,
    samples: list[QASample],
    context: TeacherContext,
) -> dict[str, Any]:
    """Everything that determines the cached numbers; identical in every shard of the run."""
    instruction = TEACHERS[entry.teacher].instruction_text(entry.arguments)
    header = {
        "teacher": entry.teacher,
        "teacher_params": entry.arguments,
        "top_p": config.top_p,
        "tail_cost": config.tail_cost,
        "max_support": config.max_support,
        "prompt_template": loaded.family.build_prompt("{question}", True, instruction),
        # The student's own prompt (no intervention): training refuses a cache made for another format.
        "student_prompt": loaded.family.build_prompt("{question}", True),
        "template": loaded.family.template,
        "model_family": loaded.family.name,
        "model_fingerprint": loaded.model_fingerprint,
        "tokenizer_fingerprint": loaded.tokenizer_fingerprint,
        "model_parts": loaded.model_parts,  # so a refusal can name the file that differs
        "vocab_size": int(loaded.model.get_output_embeddings().weight.shape[0]),
        "dtype": config.dtype,
        "close_answers": config.close_answers,
        "split": config.split,
        "kinds": list(config.kinds),
        "num_samples": len(samples),
        "dataset_fingerprint": samples_fingerprint(samples),
    }
    if config.max_pixels is not None:  # the images' resizing; unset, the header stays as before
        header["max_pixels"] = config.max_pixels
    if context.reference_pool is not None:
        header["reference_pool_fingerprint"] = pool_fingerprint(context.reference_pool)
    return header


def check_existing_shards(directory: Path, expected_header: dict[str, Any], one_shard: bool = False) -> None:
    """Refuse a directory written with another tokenizer (a cache of another model: give another --out);
    name shards left by a run with other settings.

    Such stale shards (e.g. after `dvc repro` with a changed parameter) are recomputed when their turn
    comes; until then `pipeline cache verify` and every reader refuse the mixed directory. A run of one
    shard (--shard-index, as each DVC stage is) treats another tokenizer's shards so too: they are the
    other stages' outputs of the previous experiment, which those stages replace.
    """
    if not directory.is_dir():
        return
    for manifest_path in sorted(directory.glob("shard-*-of-*.json")):
        try:
            header = ShardManifest.load(manifest_path).header
        except CacheError:
            continue  # an unreadable manifest only means that shard gets recomputed
        if header.get("tokenizer_fingerprint") != expected_header["tokenizer_fingerprint"] and not one_shard:
            raise IncompatibleCacheError(
                f"{manifest_path} was written with tokenizer {header.get('tokenizer_fingerprint')}, but "
                f"--model has tokenizer {expected_header['tokenizer_fingerprint']}: use another --out"
            )
        differing = sorted(
            key for key in set(header) | set(expected_header) if header.get(key) != expected_header.get(key)
        )
        if differing:
            _say(f"{manifest_path.name}: from a run with other {', '.join(differing)}; it will be recomputed")


# ---------------------------------------------------------------- measuring a cache against exact teachers


def measure_cache_kl(
    directory: str | Path,
    model_path: str,
    data_dir: str,
    references: str | None = None,
    device: str = "cpu",
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """inspect_cache plus kl_error = mean |KL_cached(R||Q) - KL(R||Q)| per token, where R is recomputed
    exactly from the manifest's teacher and parameters and Q is the model on the unmodified input (the
    student before unlearning)."""
    manifest = read_manifest(directory)
    header = manifest.header
    close_answers = header.get("close_answers", True)
    loaded = load_model(
        model_path, dtype=header["dtype"], device=device, close_answers=close_answers,
        prompt_template=header.get("template"),
    )  # fmt: skip
    check_compatible(manifest, loaded.model_fingerprint, loaded.tokenizer_fingerprint, loaded.model_parts)
    entry = TeacherEntry(header["teacher"], header["teacher"], header["teacher_params"])
    config = PrecomputeConfig(
        model=model_path,
        data=data_dir,
        out=str(directory),
        teacher=header["teacher"],
        references=references,
        split=header["split"],
        kinds=tuple(header["kinds"]),
        top_p=header["top_p"],
        max_support=header["max_support"],
        dtype=header["dtype"],
        device=device,
        close_answers=close_answers,
        prompt_template=header.get("template"),
    )
    config, teacher = checked(config, entry)
    samples = {sample.sample_id: sample for sample in load_samples(config)}
    context = teacher_context(config, entry, loaded)
    recorded = {record["sample_id"]: record for record in manifest.samples}
    extractor = TeacherExtractor(loaded, header["top_p"], header["max_support"], header.get("tail_cost", 0.0))

    def exact(cached: list[CachedSample]) -> Iterator[tuple[Tensor, Tensor]]:
        for chunk in _batched(cached, batch_size):
            try:
                qa = [samples[row.sample_id] for row in chunk]
            except KeyError as error:
                raise CacheError(
                    f"cache row {error} is not a sample of split {config.split} in {data_dir}"
                ) from None
            inputs = [
                teacher(sample, replace(context, draw=row.draw))
                for sample, row in zip(qa, chunk, strict=True)
            ]
            for sample, teacher_input in zip(qa, inputs, strict=True):
                if teacher_input.record()["prompt"] != recorded[sample.sample_id]["prompt"]:
                    raise CacheError(
                        f"sample {sample.sample_id}: recomputed prompt differs from the manifest's"
                    )
            with torch.inference_mode():
                _, teacher_probs, _, lengths = extractor.mean_distributions(qa, inputs)
                student_inputs = [original(sample, context) for sample in qa]
                _, student_probs, _, _ = extractor.mean_distributions(qa, student_inputs)
            student_logits = torch.log(student_probs.double().clamp_min(1e-300))
            yield from zip(
                torch.split(teacher_probs.cpu(), lengths),
                torch.split(student_logits.cpu(), lengths),
                strict=True,
            )

    summary = inspect_cache(directory, measure_against=exact, measure_limit=limit)
    summary["vision_features"] = {
        "encoded": extractor.vision_features.encoded,
        "reused": extractor.vision_features.reused,
    }
    return summary


# ---------------------------------------------------------------- helpers


def _batched(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), max(size, 1)):
        yield list(items[start : start + size])


def _progress(chunks: Iterator[list], config: PrecomputeConfig, total: int) -> Iterator[list]:
    if not config.progress:
        yield from chunks
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=f"precompute {config.teacher}", unit="sample", file=sys.stderr) as bar:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk))


def _say(message: str) -> None:
    print(message, file=sys.stderr)


__all__ = [
    "PrecomputeConfig",
    "PrecomputeError",
    "TeacherExtractor",
    "measure_cache_kl",
    "run",
]
