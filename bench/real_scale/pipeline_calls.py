"""Every call bench/real_scale makes into the pipeline, in one place, so that a change of the stages'
APIs is adapted here only. The stages run as `dvc repro` runs them (stages.precompute.run,
stages.train.run with its LossStep, the evaluation's question building, generation and likelihood
scoring), with the experiment's settings, on the random model instead of a checkpoint read from disk.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.experiments import experiment_values, for_params
from pipeline.models import LoadedModel, PromptedSample, generate
from stages.config import EvaluateConfig, PrecomputeConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
LOADED_BY = ("stages.precompute", "stages.train")  # the stage modules whose load_model is replaced


def experiment(name: str) -> dict[str, Any]:
    """The shipped experiment's values, as `pipeline experiment use NAME` writes them to params.yaml."""
    return for_params(experiment_values(ROOT, name))


def stage_config(cls: type, values: dict[str, Any], sections: tuple[str, ...], **overrides: Any) -> Any:
    """A stage's config from the experiment's sections (the CLI's merge: shared sections first), with
    overrides; keys the config does not declare are left out."""
    names = {field.name for field in dataclasses.fields(cls)}
    merged: dict[str, Any] = {}
    for section in sections:
        merged.update(values.get(section) or {})
    merged.update(overrides)
    tuples = {field.name for field in dataclasses.fields(cls) if isinstance(field.default, tuple)}
    for key in tuples & set(merged):  # "qa" as the CLI reads a comma list
        if isinstance(merged[key], str):
            merged[key] = tuple(part.strip() for part in merged[key].split(",") if part.strip())
    return cls(**{key: value for key, value in merged.items() if key in names})


@contextmanager
def stages_load(loaded: LoadedModel, checkpointing: bool = False) -> Iterator[list]:
    """The stages get `loaded` where they would read a checkpoint; every LoRA they add is taken off
    again afterwards. Gradient checkpointing: the train option where the branch has it
    (`gradient_checkpointing`), else the call transformers documents, made when LoRA is added."""
    import importlib

    import stages.train as train_stage

    modules = [importlib.import_module(name) for name in LOADED_BY]
    saved = [module.load_model for module in modules]
    add_lora, wrapped = train_stage.add_lora, []

    def adding_lora(*args, **kwargs):
        peft_model = add_lora(*args, **kwargs)
        wrapped.append(peft_model)
        if checkpointing and not has_checkpointing_option():
            loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return peft_model

    for module in modules:
        module.load_model = lambda *args, **kwargs: loaded
    train_stage.add_lora = adding_lora
    try:
        yield wrapped
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.load_model = original
        train_stage.add_lora = add_lora
        for peft_model in wrapped:
            peft_model.unload()
        if checkpointing and hasattr(loaded.model, "gradient_checkpointing_disable"):
            loaded.model.gradient_checkpointing_disable()
        loaded.model.eval().requires_grad_(False)


def has_checkpointing_option() -> bool:
    return any(field.name == "gradient_checkpointing" for field in dataclasses.fields(TrainConfig))


def precompute(
    loaded: LoadedModel, values: dict, entry_name: str, data: Path, out: Path, batch_size: int, limit: int
) -> list:
    """stages.precompute.run for one teacher entry of the experiment, its top-p, support, tail cost and
    student pass as the experiment sets them; returns the shard manifests."""
    from pipeline.unlearning.teachers import resolve_teacher
    from stages.precompute import run

    entry = resolve_teacher(entry_name, values["teachers"], where="experiment")
    config = stage_config(
        PrecomputeConfig, values, ("model", "data", "caches", "precompute"),
        model=loaded.path, dtype=dtype_name(loaded), device=str(loaded.device), data=str(data / "data"),
        train_data=None, data_format="mllmu", references=str(data / "references"), out=str(out),
        teacher=entry_name, batch_size=batch_size, limit=limit, progress=False, num_shards=1,
    )  # fmt: skip
    with stages_load(loaded):
        return run(config, entry)


def train(
    loaded: LoadedModel, values: dict, method: str, data: Path, cache_root: Path, out: Path, steps: int,
    checkpointing: bool, on_step,
) -> dict:  # fmt: skip
    """stages.train.run for one method of the experiment (its loss step, providers and optimizer),
    `steps` optimizer steps; `on_step(step)` after each."""
    from pipeline.unlearning.methods import resolve_method
    from stages.train import run

    extra = {"gradient_checkpointing": checkpointing} if has_checkpointing_option() else {}
    config = stage_config(
        TrainConfig, values, ("model", "data", "caches", "train"),
        model=loaded.path, dtype=dtype_name(loaded), device=str(loaded.device), data=str(data / "data"),
        train_data=None, data_format="mllmu", out=str(out), method=method, max_steps=steps,
        cache_root=str(cache_root), progress=False, checkpoint_every=0, **extra,
    )  # fmt: skip
    resolved = resolve_method(method, values["methods"], where="experiment", cache_root=str(cache_root))
    with stages_load(loaded, checkpointing):
        return run(config, resolved, on_step=on_step)


def questions(loaded: LoadedModel, values: dict, data: Path, mc_scoring: str, limit: int | None) -> list:
    """The evaluation's questions on the data, worded by the experiment's protocol (exemplars and their
    images included), as stages.evaluate builds them."""
    from stages.evaluate import PROTOCOLS, ask, read_inputs

    config = stage_config(
        EvaluateConfig, values, ("model", "data", "evaluate"),
        model=loaded.path, data=str(data / "data"), train_data=None, data_format="mllmu", out="-",
        references=None, mia_nonmembers=None, mc_scoring=mc_scoring, progress=False, limit=limit,
    )  # fmt: skip
    inputs = read_inputs(config)
    return ask(inputs.config, inputs, PROTOCOLS[config.protocol](), loaded.family).questions


def prompted(question) -> PromptedSample:
    return PromptedSample(question.prompt, question.image, None, question.context_images)


def generate_replies(loaded: LoadedModel, model, samples: list[PromptedSample], batch: int, new: int) -> list:
    return generate(loaded, samples, max_new_tokens=new, batch_size=batch, model=model)


def choose_options(loaded: LoadedModel, model, mc_questions: list, batch: int) -> None:
    """Multiple choice by likelihood, as the evaluation scores it (pipeline.evaluation.answering)."""
    from pipeline.evaluation.answering import choose_options as choose

    choose(loaded, model, mc_questions, batch)


def prompt_tokens(loaded: LoadedModel, sample: PromptedSample) -> int:
    """A prompt's length as the model sees it (image placeholders expanded)."""
    from pipeline.models.batching import _encode_model_inputs

    encoded = _encode_model_inputs(loaded, [sample.prompt], list(sample.images), [[]])
    return int(encoded["attention_mask"].sum())


def lora_model(loaded: LoadedModel, values: dict):
    """The experiment's LoRA on the model (pipeline.training.lora), as an evaluation of an adapter runs."""
    from pipeline.training.lora import add_lora

    train = values["train"]
    return add_lora(loaded, train.get("lora_rank", 8), train.get("lora_alpha", 16), 0.0, 0).eval()


def sum_over_ranks(device: str) -> dict:
    """One all-reduce of the training loop's per-step totals (Processes.sum_over_ranks) in the process
    group start_processes creates for `device`, as torchrun's ranks run it: the group is created by the
    pipeline's own call with one rank (one GPU here) standing in for the W of torchrun."""
    import torch.distributed as dist

    from pipeline.training import processes as processes_module

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    environment = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    saved = {key: os.environ.get(key) for key in [*environment, "MASTER_PORT"]}
    os.environ.update(environment, MASTER_PORT=str(port))
    init, chosen = dist.init_process_group, {}

    def one_rank(*args, **kwargs):  # the backend the pipeline chose, with the one rank there is
        chosen.update(backend=args[0] if args else kwargs.get("backend"))
        init(*args[:1], **{**kwargs, "world_size": 1, "rank": 0})

    dist.init_process_group = one_rank
    try:
        processes, target = processes_module.start_processes(device)
        totals = processes.sum_over_ranks({"loss": 1.5, "samples": 2.0})
        return {"backend": str(chosen.get("backend")), "device": str(target), "totals": totals}
    finally:
        dist.init_process_group = init
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def dtype_name(loaded: LoadedModel) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[loaded.model.dtype]
