"""Stage `train`: LoRA unlearning of the frozen full model, streaming the stage-one teacher cache.

The recipe, top to bottom:

1. setup: load the model, the forget (and retain) samples, and set up the provider of each input the
   method's loss declares (pipeline.training.inputs: the caches it reads, refusing one from another model
   or tokenizer; the frozen model's reference log-probabilities, once, before any LoRA weight moves);
   LoRA on the language model's attention, AdamW on the adapter, DistributedDataParallel under torchrun;
   resume from the latest checkpoint;
2. the loss step: one forward over forget (+ refusal, + retain) samples, each provider's inputs, and the
   loss (pipeline.unlearning.losses);
3. the loop: each rank streams its part of the forget cache, optimizer steps, the step log, checkpoints;
4. save the adapter in PEFT format with training_meta.json and the step log (CSV + JSON for dvc plots).

Every loss is a mean over samples, so each rank scales its loss by (its samples x W / samples in the
optimizer step) and DDP's gradient average becomes the exact mean over the whole step: one process and
W processes compute the same update (pipeline.training.streams says how the stream is split).

Launch: `pipeline train ...`, or `torchrun --nproc-per-node N -m stages train ...` with the same options.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from cache import CachedSample
from pipeline.models import (
    EncodedSamples,
    VisionFeatureCache,
    answer_outputs,
    check_joint_tokenization,
    check_lengths,
    decoder_layers,
    load_model,
    prompted,
)
from pipeline.models.adapters import load_adapter
from pipeline.models.masked_delta import save_adapter
from pipeline.samples import QASample
from pipeline.training.checkpoints import (
    CHECKPOINTS,
    Position,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.training.inputs import Batch, Provider, Saliency, Setup, providers_for, warn_unread_caches
from pipeline.training.lora import add_lora, enable_gradient_checkpointing, named_trainable
from pipeline.training.processes import Processes, start_processes
from pipeline.training.run_record import META, finished_meta, run_inputs, run_signature, training_meta
from pipeline.training.saliency import all_reduce_gradients, backward
from pipeline.training.streams import PairedRetain, StepPlan, sample_stream
from pipeline.training.train_log import write_log
from pipeline.unlearning.losses import (
    AnswerPredictions,
    LossTerms,
    MaskedTerm,
    check_layer,
    compute_loss,
    loss_arguments,
    loss_inputs,
)
from pipeline.unlearning.methods import Method, resolve_method
from pipeline.unlearning.teachers import image_key
from stages.config import TrainConfig

REFERENCE_HIDDEN = ("forget_reference_hidden", "retain_reference_hidden")
ForgetSource = Callable[[int], Iterator[tuple[QASample, CachedSample]]]


# ---------------------------------------------------------------- 1. setup


def chosen_people(samples: list[QASample], config: TrainConfig) -> list[QASample]:
    """The forget samples of --forget-people (all of them when none is named)."""
    if not config.forget_people:
        return samples
    present = {sample.person_id for sample in samples}
    absent = sorted(set(config.forget_people) - present)
    if absent:
        raise ValueError(
            f"--forget-people {','.join(absent)}: not in {config.forget_split} (its people: "
            f"{','.join(sorted(present))})"
        )
    return [sample for sample in samples if sample.person_id in config.forget_people]


def load_setup(
    config: TrainConfig, method: Method, device: torch.device, processes: Processes
) -> tuple[Setup, list[Provider]]:
    """The model, the samples, and the providers of the loss's inputs, each set up once (before LoRA)."""
    needs = set(loss_inputs(method.loss))
    loaded = load_model(config.model, **{**config.loading(), "device": str(device)})
    data = config.training_layout()
    trained = [config.forget_split, *config.also_train_on]
    forget_samples = chosen_people(
        [sample for split in trained for sample in data.unlearning_samples(split, config.sample_kinds)],
        config,
    )
    retain_samples = (
        data.unlearning_samples(config.split_names()["retain"], config.sample_kinds)
        if "retain" in needs
        else []
    )
    first = forget_samples[0]  # once per run: the tokenizer splits prompt and answer cleanly
    check_joint_tokenization(loaded, first.sample_id, prompted(loaded, first).prompt, first.answer)
    arguments = {**loss_arguments(method.loss), **method.arguments}  # with the loss's defaults
    if needs & set(REFERENCE_HIDDEN) and "layer" in arguments:  # RMU: refused before any training
        check_layer(arguments["layer"], decoder_layers(loaded.model))
    setup = Setup(loaded, method, processes, forget_samples, retain_samples)
    providers = providers_for(needs)
    for provider in providers:
        provider.setup(setup, config)
    warn_unread_caches(setup, needs, processes.main)
    return setup, providers


@dataclass
class Optimization:
    peft_model: Any
    model: Any  # the peft model, wrapped by DDP under torchrun
    trainable: list[torch.nn.Parameter]  # the LoRA weights the optimizer updates
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    total_steps: int


def optimization(
    config: TrainConfig, method: Method, setup: Setup, providers: list[Provider], device: torch.device,
    processes: Processes,
) -> Optimization:  # fmt: skip
    """LoRA (fresh, or --init-adapter's) and what the loss's inputs train beside it, AdamW on those only,
    the learning-rate schedule, DDP."""
    if config.init_adapter:
        peft_model = load_adapter(setup.loaded, config.init_adapter, trainable=True)
    else:
        peft_model = add_lora(
            setup.loaded, config.lora_rank, config.lora_alpha, config.lora_dropout, config.seed,
            config.lora_targets,
        )  # fmt: skip
    for provider in providers:
        provider.adapt(peft_model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(setup.loaded.model)
    peft_model.train()
    trainable = [parameter for _, parameter in named_trainable(peft_model)]
    # The fused kernel updates every LoRA tensor in one call (CPU and CUDA).
    optimizer = torch.optim.AdamW(
        trainable, lr=config.lr, weight_decay=config.weight_decay, fused=device.type in ("cpu", "cuda")
    )
    micro_per_epoch = math.ceil(len(setup.forget_samples) / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    decay = (
        (lambda step: max(0.0, 1.0 - step / total_steps))
        if config.lr_scheduler == "linear"
        else (lambda _: 1.0)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    model = peft_model
    if processes.world_size > 1:
        # A loss on layer l's hidden states (RMU) leaves the LoRA weights above l without a gradient.
        reads_hidden = bool(set(loss_inputs(method.loss)) & set(REFERENCE_HIDDEN))
        model = torch.nn.parallel.DistributedDataParallel(
            peft_model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=reads_hidden,
        )
    return Optimization(peft_model, model, trainable, optimizer, scheduler, steps_per_epoch, total_steps)


# ---------------------------------------------------------------- 2. the loss step


class LossStep:
    """One forward over forget (+ refusal, + retain) samples and the method's loss on it.

    Each sample is tokenized and its image preprocessed once (EncodedSamples), and each image's vision
    features are kept between steps while LoRA trains the language model only (VisionFeatureCache). The
    frozen model's hidden states (RMU) come from the same model with its adapter switched off.
    """

    def __init__(
        self, config: TrainConfig, method: Method, setup: Setup, providers: list[Provider], opt: Optimization,
        device: torch.device,
    ) -> None:  # fmt: skip
        self.method, self.setup, self.providers, self.device = method, setup, providers, device
        self.model, self.peft_model = opt.model, opt.peft_model
        self.reads_hidden = bool(set(loss_inputs(method.loss)) & set(REFERENCE_HIDDEN))
        self.image_features = VisionFeatureCache(
            setup.loaded.model, max_bytes=config.image_feature_cache_mb << 20
        )
        trains_vision = any("language_model" not in name for name, _ in named_trainable(opt.peft_model))
        self.image_features.enabled &= config.image_feature_cache_mb > 0 and not trains_vision
        self.encoded_samples = EncodedSamples(setup.loaded)
        self.image_key_of = functools.cache(image_key)
        for provider in providers:
            provider.start(self.teacher_forced, opt)
        saliency = [provider for provider in providers if isinstance(provider, Saliency)]
        self.deltas = saliency[0].deltas if saliency else None  # a masked term: two backward passes
        self.masked = self.deltas is not None

    def teacher_forced(
        self, students: list[tuple[QASample, str]], model, hidden_states: bool = False
    ) -> AnswerPredictions:
        """The answer predictions of `model` on (sample, the answer it is teacher-forced on) pairs."""
        loaded = self.setup.loaded
        batch = self.encoded_samples.batch(students, lambda index: prompted(loaded, *students[index]))
        check_lengths(loaded, batch, [replace(sample, answer=answer) for sample, answer in students])
        batch = batch.to(self.device)
        keys = [key for key in (self.image_key_of(sample) for sample, _ in students) if key is not None]
        kwargs = self.image_features.model_kwargs(batch.inputs, keys)
        logits, hidden = answer_outputs(model, batch, hidden_states, **kwargs)
        return AnswerPredictions(logits, batch.targets, batch.answer_lengths, hidden)

    def predictions(
        self, batch: Batch
    ) -> tuple[list[str], list[AnswerPredictions], list[AnswerPredictions] | None]:
        """The student's answer predictions, forget and then each role's (refusal, retain), from one forward
        pass; and the frozen model's at the same positions where the loss reads its hidden states."""
        roles = ["forget"] + [provider.role for provider in self.providers if provider.role]
        parts = [[(sample, sample.answer) for sample in batch.forget_samples]]
        parts += [provider.answers(batch) for provider in self.providers if provider.role]
        students, counts = [pair for part in parts for pair in part], [len(part) for part in parts]
        student = self.teacher_forced(students, self.model, self.reads_hidden).split(counts)
        if not self.reads_hidden:
            return roles, student, None
        with self.peft_model.disable_adapter(), torch.no_grad():
            reference = self.teacher_forced(students, self.peft_model, True).split(counts)
        return roles, student, reference

    def __call__(self, forget_items: list, retain_items: list) -> LossTerms:
        batch = Batch(forget_items, retain_items, self.device)
        roles, student, reference = self.predictions(batch)
        inputs: dict[str, Any] = dict(zip(roles, student, strict=True))
        if reference is not None:
            for role, frozen in zip(roles, reference, strict=True):
                inputs[f"{role}_reference_hidden"] = frozen.hidden_states
        for provider in self.providers:
            provider.add(inputs, batch)
        return compute_loss(self.method.loss, inputs, self.method.arguments)


# ---------------------------------------------------------------- 3. the loop


def optimizer_step(
    config: TrainConfig, opt: Optimization, plan: StepPlan, loss_step: LossStep, forget_stream, paired_retain,
    epoch: int, step_in_epoch: int, previous: list,
) -> dict[str, float]:  # fmt: skip
    """The micro-batches of one optimizer step, then the step; returns the per-term sums over samples."""
    processes = plan.processes
    start, stop = plan.step(step_in_epoch)
    sums: dict[str, float] = {}
    micro_starts = list(range(start, stop, config.batch_size))
    # A masked term takes two backward passes, which DDP's reducer cannot follow: the ranks then
    # accumulate alone and average their gradients once, before the step.
    reduces_by_hand = processes.world_size > 1 and loss_step.masked
    for index, micro_start in enumerate(micro_starts):
        positions = plan.rank_positions(micro_start, min(micro_start + config.batch_size, stop))
        forget_items = list(islice(forget_stream, len(positions)))
        own_samples = len(forget_items)
        if forget_items:
            retain_items = []
            if paired_retain is not None:
                retain_items = paired_retain.take([epoch * plan.num_forget + p for p in positions])
            previous[:] = [forget_items, retain_items]
        elif previous:  # a rank with nothing left still joins DDP's all-reduce
            forget_items, retain_items = previous
        else:
            raise ValueError(f"{plan.num_forget} forget samples cannot feed {processes.world_size} processes")
        last_micro = index == len(micro_starts) - 1
        alone = processes.world_size > 1 and (reduces_by_hand or not last_micro)
        with opt.model.no_sync() if alone else nullcontext():
            terms = loss_step(forget_items, retain_items)
            backward(
                terms, own_samples * processes.world_size / (stop - start), opt.trainable, loss_step.deltas
            )
        for name, value in terms.items():
            value = value.value if isinstance(value, MaskedTerm) else value
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * own_samples
    if reduces_by_hand:
        all_reduce_gradients(opt.trainable, processes.world_size)
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(opt.trainable, config.max_grad_norm)
    opt.optimizer.step()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    return processes.sum_over_ranks(sums)


def train_loop(
    config: TrainConfig, setup: Setup, opt: Optimization, loss_step: LossStep, position: Position,
    processes: Processes, forget_source: ForgetSource | None, on_step: Callable[[int], None] | None,
    read: dict[str, Any],
) -> None:  # fmt: skip
    out, log_dir = Path(config.out), Path(config.log_dir or config.out)
    signature = run_signature(config, loss_step.method, read)
    plan = StepPlan(config.batch_size, config.grad_accum, len(setup.forget_samples), processes)
    paired_retain = (
        PairedRetain(setup.retain_samples, setup.retain_cache, config.seed) if setup.retain_samples else None
    )
    previous: list = []
    for epoch in range(position.epoch, config.epochs):
        if position.global_step >= opt.total_steps:
            break
        first_step = position.step_in_epoch if epoch == position.epoch else 0
        if forget_source is not None:
            forget_stream = forget_source(epoch)
        else:
            forget_stream = sample_stream(
                setup.forget_samples, setup.forget_cache, config.seed, "forget", epoch, processes
            )
        forget_stream = islice(forget_stream, len(plan.rank_positions(0, plan.step(first_step)[0])), None)
        for step_in_epoch in range(first_step, opt.steps_per_epoch):
            if position.global_step >= opt.total_steps:
                break
            started = time.perf_counter()
            learning_rate = opt.scheduler.get_last_lr()[0]
            sums = optimizer_step(
                config, opt, plan, loss_step, forget_stream, paired_retain, epoch, step_in_epoch, previous
            )
            start, stop = plan.step(step_in_epoch)
            position.advance(epoch, step_in_epoch, opt.steps_per_epoch)
            row = {"step": position.global_step, "epoch": epoch, "samples": stop - start, "lr": learning_rate}
            row["step_time_s"] = time.perf_counter() - started
            row.update({name: total / (stop - start) for name, total in sums.items()})
            position.log.append(row)
            if processes.main and config.progress:
                print(json.dumps(row), flush=True)
            every = config.checkpoint_every
            if every and position.global_step % every == 0 and position.global_step < opt.total_steps:
                save_checkpoint(
                    out, opt.peft_model, opt.optimizer, opt.scheduler, position, signature, processes
                )
                if processes.main:
                    write_log(log_dir, position.log)
            if on_step is not None:
                on_step(position.global_step)


# ---------------------------------------------------------------- the stage


def run(
    config: TrainConfig,
    method: Method | None = None,
    on_step: Callable[[int], None] | None = None,
    forget_source: ForgetSource | None = None,
) -> dict[str, Any]:
    """Train the unlearning adapter; returns training_meta. `on_step(step)` runs after each optimizer step.

    method: the resolved method (default: `config.method` as a loss, with config's args and caches).
    forget_source(epoch), one process only, replaces the forget cache stream by another source of
    (sample, teacher rows) in the same order: bench/train.py feeds the rows from memory, or computes the
    ViKeR teacher online in the loop.
    """
    method = method or resolve_method(
        config.method,
        {},
        config.loss,
        config.args,
        config.forget_cache,
        config.retain_cache,
        cache_root=config.cache_root,
    )
    processes, device = start_processes(config.device)
    if forget_source is not None and processes.world_size > 1:
        raise ValueError("forget_source is for one process; under torchrun the caches are streamed")
    if config.batch_size % processes.world_size:
        raise ValueError(
            f"--batch-size {config.batch_size} must be a multiple of the {processes.world_size} processes"
        )
    out = Path(config.out)
    if processes.main:
        out.mkdir(parents=True, exist_ok=True)
    finished = finished_meta(out, config, method)
    setup, providers = load_setup(config, method, device, processes)
    read = run_inputs(config, setup)
    if finished is not None and finished.get("inputs") == read:  # e.g. a killed `--seeds 0,1,2`'s seeds
        return finished
    if finished is not None and processes.main:
        changed = sorted(key for key in read if (finished.get("inputs") or {}).get(key) != read[key])
        print(f"{out}: its completed run read other {', '.join(changed)}: training again", file=sys.stderr)
    opt = optimization(config, method, setup, providers, device, processes)
    loss_step = LossStep(
        config, method, setup, providers, opt, device
    )  # before a checkpoint moves the adapter
    torch.manual_seed(config.seed + 1000 * processes.rank)  # LoRA dropout masks: reproducible per rank
    random.seed(config.seed + 1000 * processes.rank)
    position = Position()
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        position = load_checkpoint(
            checkpoint, opt.peft_model, opt.optimizer, opt.scheduler, run_signature(config, method, read),
            processes,
        )  # fmt: skip
        if processes.main:
            print(
                f"resuming from {checkpoint} (step {position.global_step} of {opt.total_steps})", flush=True
            )

    started = time.perf_counter()
    train_loop(config, setup, opt, loss_step, position, processes, forget_source, on_step, read)

    meta = training_meta(config, method, setup, position, processes, time.perf_counter() - started)
    meta["inputs"] = read
    processes.barrier()
    if processes.main:
        save_adapter(opt.peft_model, out)
        write_log(Path(config.log_dir or config.out), position.log)
        (out / META).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    processes.finish()
    return meta
