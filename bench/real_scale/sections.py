"""The measured sections: each a function of the Bench returning its figures (time, tokens, peak memory
comes from Results). What they run is the pipeline's code, through pipeline_calls."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.real_scale import pipeline_calls as calls
from bench.real_scale.results import Clock, peak_memory_gib, reset_peak

VIKER, VGID = "llava-mllmu-10-viker", "llava-mllmu-5-vgid"
QWEN = "qwen25vl-3b-mllmu-5-vgid"


@dataclass
class Bench:
    """What the sections share: the model, the written data, the caches, the sizes of this run."""

    loaded: Any
    device: torch.device
    data: Path  # a mini world in MLLMU-Bench's layout: data/ and references/
    work: Path
    tiny: bool
    train_steps: int
    precompute_batches: tuple[int, ...]
    generation_batches: tuple[int, ...]
    people_per_split: int | None = None  # the evaluation's --limit (fewer questions to build with --tiny)
    new_tokens: int | None = None  # replaces the experiment's max_new_tokens (--tiny)
    caches: dict[str, Path] = field(default_factory=dict)
    asked: dict[tuple[str, str], list] = field(default_factory=dict)

    @property
    def clock(self) -> Clock:
        return Clock(self.device)


def questions(bench: Bench, experiment: str, mc_scoring: str = "generate", task: str | None = None) -> list:
    """The experiment's evaluation questions on the bench's data (built once per scoring)."""
    key = (experiment, mc_scoring)
    if key not in bench.asked:
        values = calls.experiment(experiment)
        bench.asked[key] = calls.questions(
            bench.loaded, values, bench.data, mc_scoring, bench.people_per_split
        )
    return [q for q in bench.asked[key] if task is None or q.item.task == task]


def new_tokens(bench: Bench, experiment: str) -> int:
    return bench.new_tokens or calls.experiment(experiment)["evaluate"]["max_new_tokens"]


def precompute(bench: Bench, experiment: str, entry: str, batch: int, limit: int | None = None) -> dict:
    """One teacher's precompute at a batch size, over two batches of forget samples (the first untimed
    by the shard: the figure includes it, the per-sample rate after the first batch is what scales)."""
    values = calls.experiment(experiment)
    out = bench.work / "caches" / experiment / f"{entry}-b{batch}"
    seconds, manifests = bench.clock.timed(
        lambda: calls.precompute(bench.loaded, values, entry, bench.data, out, batch, limit)
    )
    bench.caches[f"{experiment}/{entry}"] = out
    samples = sum(manifest.num_samples for manifest in manifests)
    settings = values["precompute"]
    return {
        "teacher": values["teachers"][entry],
        "top_p": settings.get("top_p"),
        "max_support": settings.get("max_support"),
        "tail_cost": settings.get("tail_cost"),
        "batch_size": batch,
        "samples": samples,
        "tokens": sum(manifest.num_tokens for manifest in manifests),
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 3),
    }


def cache_root(bench: Bench, experiment: str) -> Path:
    """A folder of the experiment's caches by entry name (links to the ones precompute wrote)."""
    root = bench.work / "cache-roots" / experiment
    root.mkdir(parents=True, exist_ok=True)
    for key, path in bench.caches.items():
        name = key.split("/", 1)[1]
        if key.startswith(experiment + "/") and not (root / name).exists():
            (root / name).symlink_to(path, target_is_directory=True)
    return root


def train_method(bench: Bench, experiment: str, method: str) -> dict:
    """The pipeline's training run (its loss step) for a few steps, without and with checkpointing."""
    values = fitted(calls.experiment(experiment), bench)
    figures: dict[str, Any] = {"batch_size": values["train"]["batch_size"], "loss": values["methods"][method]}
    for checkpointing in (False, True):
        name = "checkpointing" if checkpointing else "plain"
        reset_peak(bench.device)
        times: list[float] = []
        last = [bench.clock.now()]

        def on_step(step: int, times=times, last=last) -> None:
            now = bench.clock.now()
            times.append(now - last[0])
            last[0] = now

        out = bench.work / "adapters" / experiment / f"{method}-{name}"
        try:
            calls.train(
                bench.loaded, values, method, bench.data, cache_root(bench, experiment), out,
                bench.train_steps, checkpointing, on_step,
            )  # fmt: skip
            steady = times[1:] or times
            figures[name] = {
                "steps": len(times),
                "step_s": round(sum(steady) / len(steady), 4),  # after the first (one step: with setup)
                "setup_and_first_step_s": round(times[0], 4),
                "checkpointing_by": "option" if calls.has_checkpointing_option() else "direct call",
                **peak_memory_gib(bench.device),
            }
        except torch.OutOfMemoryError as error:
            figures[name] = {"out_of_memory": str(error).splitlines()[0], **peak_memory_gib(bench.device)}
    return figures


def fitted(values: dict, bench: Bench) -> dict:
    """The experiment's values, an RMU layer beyond a --tiny model's depth moved to its first layer."""
    layers = bench.loaded.model.config.get_text_config().num_hidden_layers
    methods = {}
    for name, entry in values["methods"].items():
        arguments = entry.get("args") or {}
        if "layer" in arguments and arguments["layer"] > layers - 2:
            entry = {**entry, "args": {**arguments, "layer": 0}}
        methods[name] = entry
    return {**values, "methods": methods}


def generation(bench: Bench, batch: int, merged: bool) -> dict:
    """Replies to the experiment's generation questions at a batch size, through an unmerged LoRA (as an
    adapter is evaluated today) or with it merged into the weights."""
    new = new_tokens(bench, VIKER)
    asked = questions(bench, VIKER, task="generation")
    samples = [calls.prompted(asked[i % len(asked)]) for i in range(batch * 2)]
    peft_model = calls.lora_model(bench.loaded, calls.experiment(VIKER))
    try:
        model = peft_model.merge_and_unload() if merged else peft_model
        calls.generate_replies(bench.loaded, model, samples[:batch], batch, new)  # warm-up
        seconds, replies = bench.clock.timed(
            lambda: calls.generate_replies(bench.loaded, model, samples[batch:], batch, new)
        )
    finally:
        if not merged:
            peft_model.unload()
    tokens = [calls.prompt_tokens(bench.loaded, sample) for sample in samples[batch:]]
    return {
        "batch_size": batch,
        "merged": merged,
        "max_new_tokens": new,
        "questions": batch,
        "seconds": round(seconds, 3),
        "s_per_question": round(seconds / batch, 4),
        "mean_prompt_tokens": round(sum(tokens) / batch, 1),
        "replies": len(replies),
    }


def official_cloze(bench: Bench) -> dict:
    """A batch of the official protocol's cloze questions with their exemplar profiles' images."""
    asked = questions(bench, VIKER, task="cloze")
    with_images = sorted(asked, key=lambda q: -len(q.context_images))[: bench.generation_batches[0]]
    samples = [calls.prompted(q) for q in with_images]
    tokens = [calls.prompt_tokens(bench.loaded, s) for s in samples]
    new = new_tokens(bench, VIKER)
    seconds, _ = bench.clock.timed(
        lambda: calls.generate_replies(bench.loaded, None, samples, len(samples), new)
    )
    return {
        "questions": len(samples),
        "exemplar_images": [len(q.context_images) for q in with_images],
        "prompt_tokens_max": max(tokens),
        "prompt_tokens_mean": round(sum(tokens) / len(tokens), 1),
        "seconds": round(seconds, 3),
    }


def likelihood_mc(bench: Bench) -> dict:
    """Multiple choice scored by the options' likelihood, as `mc_scoring: likelihood` runs it."""
    mc = questions(bench, VIKER, "likelihood", "classification")[: bench.generation_batches[0]]
    batch = calls.experiment(VIKER)["evaluate"]["batch_size"]
    calls.choose_options(bench.loaded, bench.loaded.model, mc[:2], batch)  # warm-up
    seconds, _ = bench.clock.timed(lambda: calls.choose_options(bench.loaded, bench.loaded.model, mc, batch))
    options = sum(len(q.item.options or {}) for q in mc)
    return {
        "questions": len(mc),
        "options": options,
        "seconds": round(seconds, 3),
        "s_per_question": round(seconds / len(mc), 4),
    }


def overlong_prompt(bench: Bench) -> dict:
    """A question given exemplar images until it passes the context: does anything refuse it?"""
    question = [q for q in questions(bench, VIKER) if q.image is not None and not q.context_images][0]
    context = bench.loaded.model.config.get_text_config().max_position_embeddings
    base = sample = calls.prompted(question)
    images = 0
    while calls.prompt_tokens(bench.loaded, sample) <= context:  # exemplar images go before the query's
        images += 1
        prefix = (bench.loaded.family.image_placeholder + "\n") * images
        sample = replace(base, prompt=prefix + base.prompt, context_images=(question.image,) * images)
    tokens = calls.prompt_tokens(bench.loaded, sample)
    try:
        calls.generate_replies(bench.loaded, None, [sample], 1, 2)
        outcome = "generated without an error"
    except Exception as error:  # the check the pipeline should make, or the model's own failure
        outcome = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    return {"context": context, "prompt_tokens": tokens, "extra_images": images, "outcome": outcome}


def large_photo(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (120, 90, 60))


def qwen_generation(bench: Bench) -> dict:
    """Qwen's generation on a batch with one large photo (3000 x 2000 px) among the data's images."""
    asked = [q for q in questions(bench, QWEN) if q.item.image is not None]
    samples = [calls.prompted(q) for q in asked[: bench.generation_batches[0]]]
    size = (300, 200) if bench.tiny else (3000, 2000)
    samples[0] = replace(samples[0], image=large_photo(*size))
    tokens = [calls.prompt_tokens(bench.loaded, s) for s in samples]
    new = new_tokens(bench, QWEN)
    seconds, _ = bench.clock.timed(
        lambda: calls.generate_replies(bench.loaded, None, samples, len(samples), new)
    )
    return {
        "batch_size": len(samples),
        "photo_px": list(size),
        "prompt_tokens_max": max(tokens),
        "prompt_tokens_median": sorted(tokens)[len(tokens) // 2],
        "seconds": round(seconds, 3),
    }


def writes_world(out: Path) -> tuple[Path, list[str]]:
    """A small mini world in MLLMU-Bench's layout (data/, references/) for the stages to read, and its
    text (the tokenizers' corpus). Its split files and pools as write_world writes them, without the data
    card, whose ROUGE-L needs rouge-score (absent on the GPU machine)."""
    from pipeline.benchmarks.rows import SPLIT_FILE
    from pipeline.mini_world import world as mini_world
    from pipeline.mini_world.config import WorldConfig

    world = mini_world.build_world(
        WorldConfig(num_people=20, num_real=4, num_reference_people=8, alt_images=1)
    )
    for folder in world.splits:
        test = folder == "Test_Set"
        mini_world.write_rows(
            world.rows(folder),
            mini_world.TEST_SCHEMA if test else mini_world.PERSON_SCHEMA,
            mini_world.TEST_FEATURES if test else mini_world.PERSON_FEATURES,
            out / "data" / folder / SPLIT_FILE,
        )
    for kind, images in world.references.items():
        (out / "references" / kind).mkdir(parents=True, exist_ok=True)
        for image_id, data in images:
            (out / "references" / kind / f"{image_id}.png").write_bytes(data)
    return out, world.text_corpus()
