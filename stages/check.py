"""`pipeline check`: what the selected experiment will meet, from its data and its model's config,
tokenizer and processor only (no weights, no GPU), before any GPU hour is spent.

It reports the samples per split, the fields and types of the data files, the image sizes (and Qwen's
tokens per image), the longest prompt per split and task against the context (exemplar images counted),
the caches precompute will write and their expected size, and the expected peak GPU memory of every
method's training step, of precompute and of evaluation (pipeline.models.memory_estimate), flagging
what will fail: a prompt over the context, a step over --gpu-memory-gib.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.models import memory_estimate as memory
from pipeline.models.memory_estimate import ModelShapes, StepShape

# Measured cache sizes (docs/performance.md, "The truncation rule"): bytes on disk per answer token.
CACHE_BYTES_PER_ANSWER_TOKEN = {"viker": 48.3, "vgid": 60.2}
CACHE_BYTES_DEFAULT = 60.2  # the largest measured, for teachers not measured yet
STUDENT_STREAMS = ("forget", "retain", "refusal")  # AnswerPredictions with gradients (losses' inputs)
FROZEN_FORWARDS = ("forget_reference", "refusal_reference", "retain_reference")  # adapter-off forwards


@dataclass
class CheckReport:
    """What `pipeline check` found: lines to print, and the problems that will make a run fail."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def say(self, line: str) -> None:
        self.lines.append(line)

    def flag(self, problem: str) -> None:
        self.problems.append(problem)
        self.lines.append(f"FAIL: {problem}")


def method_step(loss: str, batch: int, sequence_tokens: int, answer_tokens: int) -> StepShape:
    """The sequences of one training step of a loss: a batch per student stream it reads (with
    gradients), a batch per frozen reference it reads (adapter off, no gradients); cached teachers
    cost no forward pass."""
    from pipeline.unlearning.losses import loss_inputs

    inputs = loss_inputs(loss)
    streams = sum(name in STUDENT_STREAMS for name in inputs)
    frozen = sum(any(name.startswith(prefix) for prefix in FROZEN_FORWARDS) for name in inputs)
    return StepShape(batch * streams, batch * frozen, sequence_tokens, answer_tokens)


def method_peaks(
    shapes: ModelShapes,
    methods: dict[str, dict[str, Any]],
    batch: int,
    lora_rank: int,
    sequence_tokens: int,
    answer_tokens: int,
) -> dict[str, dict[str, float]]:
    """Per method, the expected peak GiB of its training step without and with checkpointing."""
    peaks = {}
    for name, entry in methods.items():
        step = method_step(entry["loss"], batch, sequence_tokens, answer_tokens)
        peaks[name] = {
            "sequences": step.sequences_with_gradients + step.sequences_without,
            "frozen_sequences": step.sequences_without,
            "peak_gib": memory.gib(memory.training_peak_bytes(shapes, step, lora_rank, False)),
            "peak_gib_checkpointing": memory.gib(memory.training_peak_bytes(shapes, step, lora_rank, True)),
        }
    return peaks


def teacher_forwards(entry: dict[str, Any]) -> int:
    """Sequences per sample of a teacher's precompute pass: its k variants (ViKeR) or one, plus the
    student pass of the truncation rule (the unmodified input)."""
    return int((entry.get("args") or {}).get("k", 1)) + 1


def precompute_peak_gib(shapes: ModelShapes, batch: int, forwards: int, tokens: int, answer: int) -> float:
    return memory.gib(memory.forward_peak_bytes(shapes, batch * forwards, tokens, answer))


def evaluation_peak_gib(shapes: ModelShapes, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    return memory.gib(memory.generation_peak_bytes(shapes, batch, prompt_tokens, new_tokens))


def cache_bytes(teacher: str, answer_tokens: int) -> float:
    return answer_tokens * CACHE_BYTES_PER_ANSWER_TOKEN.get(teacher, CACHE_BYTES_DEFAULT)


# ------------------------------------------------------------------------------------------ the files


def model_shapes(model_dir: str) -> tuple[ModelShapes, dict[str, Any]]:
    """The model's shapes from its config.json alone."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json (pipeline check reads no weights)")
    config = json.loads(path.read_text())
    preprocessor = Path(model_dir) / "preprocessor_config.json"
    if preprocessor.is_file():  # Qwen2-VL's pixel cap is the image processor's
        processing = json.loads(preprocessor.read_text())
        cap = processing.get("max_pixels") or (processing.get("size") or {}).get("longest_edge")
        if cap:
            config = {**config, "max_pixels": cap}
    return memory.shapes_from_config(model_dir, config), config


def image_size(image: Any) -> tuple[int, int] | None:
    """(width, height) of a sample's image (bytes or a PIL image) from its header."""
    if image is None:
        return None
    if hasattr(image, "size"):
        return tuple(image.size)
    from PIL import Image

    with Image.open(io.BytesIO(image)) as opened:
        return opened.size


def tokens_per_image(shapes: ModelShapes, size: tuple[int, int], config: dict[str, Any]) -> int:
    """LLaVA's fixed count, or Qwen2-VL's for the image's size (the processor's max_pixels cap)."""
    if shapes.image_tokens is not None:
        return shapes.image_tokens
    vision = config.get("vision_config", {})
    return memory.qwen_image_tokens(
        *size, vision.get("patch_size", 14), vision.get("spatial_merge_size", 2), config.get("max_pixels")
    )


def prompt_tokens(tokenizer, prompt: str, images: list[tuple[int, int]], shapes, config) -> int:
    """A prompt's length as the model sees it: its text tokens, each image placeholder expanded."""
    text = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return text + sum(tokens_per_image(shapes, size, config) - 1 for size in images)


def field_types(files: list[Path]) -> dict[str, str]:
    """Column -> type of the data files (parquet schemas; the first record of JSON lines)."""
    found: dict[str, str] = {}
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            found.update({f.name: str(f.type) for f in pq.read_schema(path)})
        elif path.suffix in (".jsonl", ".json"):
            first = path.read_text().lstrip().splitlines()[0] if path.stat().st_size else "{}"
            record = json.loads(first) if path.suffix == ".jsonl" else {}
            found.update({key: type(value).__name__ for key, value in record.items()})
    return found


# ------------------------------------------------------------------------------------------ the check


def check_data(report: CheckReport, train, tokenizer, shapes, config) -> dict[str, int]:
    """Samples per training split, their images, fields and longest sequence (prompt + answer)."""
    data = train.training_layout()
    longest = {"sequence_tokens": 0, "answer_tokens": 0, "forget_answer_tokens": 0}
    retain = train.retain_split or data.split_names(train.forget_split)["retain"]
    for role, split in (("forget", train.forget_split), ("retain", retain)):
        samples = data.unlearning_samples(split, tuple(train.sample_kinds))
        sizes = [s for s in (image_size(sample.image) for sample in samples) if s is not None]
        report.say(f"training {role} split {split}: {len(samples)} samples, {len(sizes)} with an image")
        if sizes:
            widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
            tokens = [tokens_per_image(shapes, size, config) for size in sizes]
            report.say(
                f"  images {min(widths)}-{max(widths)} x {min(heights)}-{max(heights)} px, "
                f"{min(tokens)}-{max(tokens)} tokens each"
            )
        report.say(f"  fields: {field_types(data.split_files(split))}")
        for sample in samples:
            answer = len(tokenizer(sample.answer, add_special_tokens=False)["input_ids"]) + 1
            images = [image_size(sample.image)] if sample.image is not None else []
            sequence = prompt_tokens(tokenizer, sample.question, images, shapes, config) + answer
            longest["sequence_tokens"] = max(longest["sequence_tokens"], sequence)
            longest["answer_tokens"] = max(longest["answer_tokens"], answer)
            if role == "forget":
                longest["forget_answer_tokens"] += answer
        report.figures[f"{role}_samples"] = len(samples)
    return longest


def check_prompts(report: CheckReport, evaluate, tokenizer, shapes, config) -> int:
    """The longest evaluation prompt per split and task (exemplar images counted) against the context;
    returns the longest of all."""
    from stages.evaluate import PROTOCOLS, ask, read_inputs

    protocol = PROTOCOLS[evaluate.protocol]()
    inputs = read_inputs(evaluate)
    family = _family(config, evaluate.prompt_template)
    asked = ask(inputs.config, inputs, protocol, family)
    for role, items in inputs.items.items():
        report.say(f"evaluation {role} split {inputs.names[role]}: {len(items)} items")
    longest: dict[tuple[str, str], tuple[int, str]] = {}
    for question in asked.questions:
        images = [im.size for im in question.context_images] + (
            [question.image.size] if question.image else []
        )
        tokens = prompt_tokens(tokenizer, question.prompt, images, shapes, config)
        key = (question.split, question.item.task)
        if tokens > longest.get(key, (-1, ""))[0]:
            longest[key] = (tokens, question.item.item_id)
    for (split, task), (tokens, item_id) in sorted(longest.items()):
        total = tokens + evaluate.max_new_tokens
        report.say(f"protocol {protocol.name}, {split}/{task}: longest prompt {tokens} tokens ({item_id})")
        if total > shapes.context:
            report.flag(
                f"{split}/{task} question {item_id}: {tokens} prompt tokens + {evaluate.max_new_tokens} new "
                f"exceed the context of {shapes.context}"
            )
    report.figures["questions"] = len(asked.questions)
    return max((tokens for tokens, _ in longest.values()), default=0)


def _family(config: dict[str, Any], template: str | None):
    from transformers import AutoConfig

    from pipeline.models.family import FAMILIES

    return FAMILIES[config["model_type"]](AutoConfig.for_model(**config), template)


def check_memory(report: CheckReport, shapes, params: dict[str, Any], longest: dict[str, int], gpu_gib):
    """Expected peak GiB of each stage's step; over --gpu-memory-gib is flagged."""
    train, evaluate, precompute = params["train"], params["evaluate"], params["precompute"]
    checkpointing = bool(getattr(train, "gradient_checkpointing", False))
    column = "peak_gib_checkpointing" if checkpointing else "peak_gib"
    peaks = method_peaks(
        shapes, params["methods"], train.batch_size, train.lora_rank,
        longest["sequence_tokens"], longest["answer_tokens"],
    )  # fmt: skip
    steps = {f"train {name}": figures[column] for name, figures in peaks.items()}
    for name, entry in params["teachers"].items():
        forwards = teacher_forwards(entry)
        steps[f"precompute {name}"] = precompute_peak_gib(
            shapes, precompute.batch_size, forwards, longest["sequence_tokens"], longest["answer_tokens"]
        )
        size = cache_bytes(entry.get("teacher", name), longest["forget_answer_tokens"])
        report.say(f"cache {name}: {forwards} sequences a sample, about {size / 2**20:.1f} MiB")
    steps["evaluate"] = evaluation_peak_gib(
        shapes, evaluate.batch_size, longest["prompt_tokens"], evaluate.max_new_tokens
    )
    for step, peak in steps.items():
        note = " (gradient checkpointing)" if checkpointing and step.startswith("train") else ""
        report.say(f"{step}: expected peak {peak:.2f} GiB{note}")
        if gpu_gib is not None and peak > gpu_gib:
            report.flag(f"{step}: expected peak {peak:.1f} GiB exceeds --gpu-memory-gib {gpu_gib:g}")
    report.figures["peak_gib"] = steps


def run(params: dict[str, Any], gpu_memory_gib: float | None = None) -> CheckReport:
    """Check an experiment: params holds the built configs ("train", "evaluate", "precompute") and the
    params file's "teachers" and "methods"."""
    from transformers import AutoTokenizer

    evaluate = params["evaluate"]
    report = CheckReport()
    shapes, config = model_shapes(evaluate.model)
    report.say(
        f"model {evaluate.model}: {shapes.parameters / 1e9:.2f}B parameters, {shapes.layers} layers, "
        f"vocabulary {shapes.vocab}, context {shapes.context}, "
        f"{shapes.image_tokens or 'dynamic'} tokens per image"
    )
    tokenizer = AutoTokenizer.from_pretrained(evaluate.model)
    longest = check_data(report, params["train"], tokenizer, shapes, config)
    if longest["sequence_tokens"] > shapes.context:
        report.flag(
            f"a training sequence of {longest['sequence_tokens']} tokens exceeds the context {shapes.context}"
        )
    longest["prompt_tokens"] = check_prompts(report, evaluate, tokenizer, shapes, config)
    check_memory(report, shapes, params, longest, gpu_memory_gib)
    return report
