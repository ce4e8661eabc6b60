"""Stage `train`: LoRA unlearning of the frozen full model, streaming the stage-one teacher cache.

Reads top to bottom as the recipe runs:

1. load the model, the forget (and retain) samples, and open the caches the method needs; refuse a
   cache from another model or tokenizer, or whose answer tokens differ from the student's;
2. compute the frozen model's reference log-probabilities once (NPO, IdkPO), before any LoRA weight moves;
3. wrap the language model's attention projections with LoRA (vision tower and projector stay frozen),
   AdamW on the adapter only, DistributedDataParallel when launched by torchrun;
4. loop: each rank streams its part of the forget cache (rows matched to samples by id), one forward
   over forget (+ refusal, + retain) samples, the method's loss from pipeline.losses, optimizer step;
   log every step, checkpoint every N steps (adapter, optimizer, RNG, data position);
5. save the adapter in PEFT format with training_meta.json and the step log (CSV + JSON for dvc plots).

Batches and processes. --batch-size is the *global* number of forget samples per micro-batch; under
torchrun each of the W ranks takes batch_size / W of them (the global stream position p goes to rank
p mod W, which is how cache.format.iter_cache partitions the stream). Every loss is a mean over samples,
so each rank scales its loss by (its samples x W / samples in the optimizer step) and DDP's gradient
average becomes the exact mean over the whole step: one process and W processes compute the same update.
Methods with a retain term pair each forget sample with one retain sample (PairedRetain), so the pairs
too are the same for any number of processes.

Launch: `pipeline train ...`, or `torchrun --nproc-per-node N -m stages.train ...` with the same options.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cache.format import (
    CachedSample,
    CacheManifest,
    check_compatible,
    concat_samples,
    iter_cache,
    read_manifest,
)
from pipeline.losses import AnswerPredictions, choose_refusal, compute_loss, load_refusals, loss_inputs
from pipeline.samples import QASample

CHECKPOINTS = "checkpoints"
LOG_CSV, LOG_JSON, META = "train_log.csv", "train_log.json", "training_meta.json"


class TokenMismatchError(ValueError):
    """A cached sample's answer tokens differ from the student's tokenization of the same answer."""


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    method: str = "viker"
    forget_split: str = "forget_10"
    retain_split: str = "retain_90"
    sample_kinds: tuple[str, ...] = ("qa",)
    forget_cache: str | None = None
    retain_cache: str | None = None
    # Method hyperparameters (each method takes the ones its loss declares; see pipeline.losses).
    lambda_: float = 0.05
    alpha: float = 1.0
    beta: float = 1.0
    npo_beta: float = 0.4
    regularizer: str = "kl"
    no_ga: bool = False
    refusals: str | None = None  # file of refusal sentences for IdkPO (default: pipeline/refusals.txt)
    # Optimisation (ViKeR App. A.4: LoRA r 8 / alpha 16, AdamW, lr 5e-6, batch 2, 1 epoch).
    lr: float = 5e-6
    batch_size: int = 2
    epochs: int = 1
    grad_accum: int = 1
    max_steps: int | None = None
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"  # constant | linear (decay to 0)
    max_grad_norm: float | None = None
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    seed: int = 0
    # Running.
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: none
    # MiB of vision features kept between steps, on the device (the tower and projector are frozen, so an
    # image's features never change; LLaVA-1.5-7B: 4.7 MB per image in bf16); 0: encode every image at
    # every step.
    image_feature_cache_mb: int = 4096
    dtype: str = "fp32"
    device: str = "cpu"
    progress: bool = False
    log_dir: str | None = (
        None  # where train_log.csv/.json go (default: --out), e.g. results/<run> for dvc plots
    )

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "lambda_": self.lambda_,
            "alpha": self.alpha,
            "beta": self.beta,
            "npo_beta": self.npo_beta,
            "regularizer": self.regularizer,
            "no_ga": self.no_ga,
        }

    def signature(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (not where it runs or how often it saves),
        as JSON values (so that it compares equal to the copy read back from a checkpoint)."""
        skip = {"out", "device", "checkpoint_every", "progress", "log_dir"}
        return json.loads(json.dumps({key: value for key, value in asdict(self).items() if key not in skip}))


# ---------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def start_processes(device: str) -> tuple[Processes, torch.device]:
    """torch.distributed from torchrun's environment (gloo on CPU, nccl on GPU); one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(), torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Processes(rank, world_size, local_rank), target


# ---------------------------------------------------------------------------------------------------------
# Data: samples, caches, streams


@dataclass
class Cache:
    """An opened teacher cache: its manifest and the answer token check against the student."""

    directory: str
    manifest: CacheManifest
    teacher: str

    @classmethod
    def open(cls, directory: str, loaded, samples: dict[str, QASample], what: str) -> Cache:
        manifest = read_manifest(directory)
        # Refuses a cache written by another model or tokenizer, naming both fingerprints.
        check_compatible(manifest, loaded.model_fingerprint, loaded.tokenizer_fingerprint)
        cached_ids = [record["sample_id"] for record in manifest.samples]
        unknown = [sample_id for sample_id in cached_ids if sample_id not in samples]
        if unknown:
            raise ValueError(
                f"{what} cache {directory} holds {len(unknown)} samples that are not in the {what} split, "
                f"e.g. {unknown[:3]}: it was made from other data"
            )
        return cls(directory=str(directory), manifest=manifest, teacher=str(manifest.header.get("teacher")))

    def stream(self, rank: int, world_size: int, shuffle_seed: int) -> Iterator[CachedSample]:
        return iter_cache(
            self.directory, rank=rank, world_size=world_size, shuffle_seed=shuffle_seed, batch_size=16
        )


def prompted(loaded, sample: QASample, answer: str | None = None):
    """The student's input: the sample's own image and question, teacher-forced on `answer`."""
    from pipeline.models import PromptedSample

    has_image = sample.image is not None
    return PromptedSample(
        prompt=loaded.family.build_prompt(sample.question, has_image),
        image=sample.pil_image() if has_image else None,
        answer=sample.answer if answer is None else answer,
    )


def check_answer_tokens(
    predictions: AnswerPredictions, items: list[tuple[QASample, CachedSample]], cache_dir: str
) -> None:
    """The cached rows are per answer token: they only mean something if the tokens are the student's."""
    for student_ids, (sample, cached) in zip(
        predictions.targets.split(predictions.answer_lengths), items, strict=True
    ):
        student, stored = student_ids.tolist(), cached.answer_token_ids.tolist()
        if stored != student:
            raise TokenMismatchError(token_mismatch_message(sample, stored, student, cache_dir))


def token_mismatch_message(sample: QASample, stored: list[int], student: list[int], cache_dir: str) -> str:
    def shown(ids: list[int]) -> str:
        return f"{ids[:12]}{'...' if len(ids) > 12 else ''} ({len(ids)} tokens)"

    return (
        f"sample {sample.sample_id}: cache {cache_dir} stores answer tokens {shown(stored)} but the model "
        f"tokenizes the answer {sample.answer[:60]!r} as {shown(student)}: the cache was made with another "
        "tokenizer, answer template or answer text"
    )


def epoch_seed(seed: int, stream: str, cycle: int) -> int:
    """One shuffle seed per (run seed, stream, epoch or cycle), the same on every rank."""
    return (seed * 1_000_003 + {"forget": 0, "retain": 1}[stream] * 7919 + cycle) % (2**31)


def sample_stream(
    samples: list[QASample], cache: Cache | None, seed: int, stream: str, cycle: int, processes: Processes
) -> Iterator[tuple[QASample, CachedSample | None]]:
    """This rank's part of one pass over a split, shuffled by (seed, cycle); with the cache's rows if any."""
    by_id = {sample.sample_id: sample for sample in samples}
    shuffle_seed = epoch_seed(seed, stream, cycle)
    if cache is not None:
        for cached in cache.stream(processes.rank, processes.world_size, shuffle_seed):
            yield by_id[cached.sample_id], cached
        return
    order = list(range(len(samples)))
    random.Random(shuffle_seed).shuffle(order)
    for position, index in enumerate(order):
        if position % processes.world_size == processes.rank:
            yield samples[index], None


class PairedRetain:
    """Retain samples paired with forget samples by position, the same for any number of processes.

    The forget sample at global position g = epoch * |D_f| + p is paired with item g of the retain stream
    (consecutive passes over the retain split, each reshuffled). Each rank asks for the positions of its
    own forget samples, in increasing order, and skips the others while streaming; a resumed run simply
    asks for later positions.
    """

    def __init__(self, samples: list[QASample], cache: Cache | None, seed: int) -> None:
        self.samples, self.cache, self.seed = samples, cache, seed
        self.cursor = 0
        self.items = self._passes()

    def _passes(self) -> Iterator[tuple[QASample, CachedSample | None]]:
        cycle = 0
        while True:
            empty = True
            for item in sample_stream(self.samples, self.cache, self.seed, "retain", cycle, Processes()):
                empty = False
                yield item
            if empty:
                raise ValueError("the retain split is empty")
            cycle += 1

    def take(self, positions: list[int]) -> list[tuple[QASample, CachedSample | None]]:
        taken = []
        for position in positions:
            if position < self.cursor:
                raise ValueError(f"retain position {position} requested after {self.cursor - 1}")
            taken.append(next(islice(self.items, position - self.cursor, None)))
            self.cursor = position + 1
        return taken


# ---------------------------------------------------------------------------------------------------------
# Reference log-probabilities of the frozen model (computed once, never per epoch)


@torch.no_grad()
def frozen_answer_log_probs(loaded, inputs: list, batch_size: int = 8) -> list[float]:
    """log p(y | I, x; theta_full) per PromptedSample, with the frozen (LoRA-free) model in eval mode."""
    from pipeline.models import answer_logits, encode_answers

    values: list[float] = []
    for start in range(0, len(inputs), batch_size):
        batch = encode_answers(loaded, inputs[start : start + batch_size]).to(loaded.device)
        logits = answer_logits(loaded.model, batch)
        values += AnswerPredictions(logits, batch.targets, batch.answer_lengths).answer_log_probs().tolist()
    return values


def reference_log_probs(
    loaded, samples: list[QASample], answers: dict[str, str] | None, processes: Processes
) -> dict[str, float]:
    """sample_id -> frozen-model log p(answer | I, x); each rank computes its share, then all share all."""
    mine = samples[processes.rank :: processes.world_size]
    inputs = [prompted(loaded, s, answers[s.sample_id] if answers else None) for s in mine]
    values = dict(zip([s.sample_id for s in mine], frozen_answer_log_probs(loaded, inputs), strict=True))
    if processes.world_size > 1:
        gathered: list[dict[str, float]] = [{} for _ in range(processes.world_size)]
        dist.all_gather_object(gathered, values)
        values = {key: value for part in gathered for key, value in part.items()}
    return values


def reference_log_probs_from_cache(cache: Cache) -> dict[str, float]:
    """From an `original` cache, whose stored target log-probs are the frozen model's own (one pass)."""
    return {
        cached.sample_id: float(cached.target_log_prob.double().sum())
        for cached in iter_cache(cache.directory, batch_size=16)
    }


# ---------------------------------------------------------------------------------------------------------
# Model: LoRA on the language model's attention only


def named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def add_lora(loaded, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        # A regex over module paths: the CLIP tower has q_proj/v_proj too and must stay frozen.
        target_modules=loaded.family.lora_target_modules,
        bias="none",
    )
    return get_peft_model(loaded.model, lora)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints (adapter + optimizer + scheduler + RNG + data position), written atomically


@dataclass
class Position:
    """Where training stands: optimizer steps done, in which epoch, and this rank's retain stream offset."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path,
    peft_model,
    optimizer,
    scheduler,
    position: Position,
    config: TrainConfig,
    processes: Processes,
    keep: int = 2,
) -> None:
    checkpoints = out / CHECKPOINTS
    final = checkpoints / f"step-{position.global_step:08d}"
    temporary = checkpoints / f".step-{position.global_step:08d}.tmp"
    if processes.main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    processes.barrier()
    torch.save(
        {"rng": rng_state()},
        temporary / f"rank-{processes.rank:03d}.pt",
    )
    if processes.main:
        peft_model.save_pretrained(temporary / "adapter")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            temporary / "optimizer.pt",
        )
        state = {
            "global_step": position.global_step,
            "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "world_size": processes.world_size,
            "signature": config.signature(),
            "log": position.log,
        }
        (temporary / "state.json").write_text(json.dumps(state, indent=1))
    processes.barrier()
    if processes.main:
        os.replace(temporary, final)  # a checkpoint exists only once complete
        for old in sorted(checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    processes.barrier()


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(
    checkpoint: Path, peft_model, optimizer, scheduler, config: TrainConfig, processes: Processes
) -> Position:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((checkpoint / "state.json").read_text())
    if state["signature"] != config.signature():
        differing = sorted(
            key
            for key in set(state["signature"]) | set(config.signature())
            if state["signature"].get(key) != config.signature().get(key)
        )
        raise ValueError(
            f"checkpoint {checkpoint} belongs to a run with other settings ({', '.join(differing)}): "
            f"use another --out or delete {checkpoint.parent}"
        )
    if state["world_size"] != processes.world_size:
        raise ValueError(
            f"checkpoint {checkpoint} was written by {state['world_size']} processes, this run has "
            f"{processes.world_size}: resume with the same --nproc-per-node"
        )
    weights = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(peft_model, weights)
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rank_state = torch.load(checkpoint / f"rank-{processes.rank:03d}.pt", weights_only=False)
    set_rng_state(rank_state["rng"])
    return Position(state["global_step"], state["epoch"], state["step_in_epoch"], state["log"])


# ---------------------------------------------------------------------------------------------------------
# The step log (CSV + JSON, both readable by `dvc plots`)


def write_log(directory: Path, log: list[dict[str, Any]]) -> None:
    if not log:
        return
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOG_JSON).write_text(json.dumps(log, indent=1))
    columns = list(dict.fromkeys(key for row in log for key in row))
    with (directory / LOG_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(log)


# ---------------------------------------------------------------------------------------------------------
# The stage


ForgetSource = Callable[[int], Iterator[tuple[QASample, CachedSample]]]


def run(
    config: TrainConfig,
    on_step: Callable[[int], None] | None = None,
    forget_source: ForgetSource | None = None,
) -> dict[str, Any]:
    """Train the unlearning adapter; returns training_meta. `on_step(step)` runs after each optimizer step.

    forget_source(epoch), one process only, replaces the forget cache stream by another source of
    (sample, teacher rows) in the same order: bench/train.py uses it for the same rows held in memory and
    for the ViKeR teacher computed online in the loop.
    """
    from pipeline.data import load_unlearning_samples
    from pipeline.models import EncodedSamples, VisionFeatureCache, answer_logits, load_model
    from pipeline.teachers import image_key

    processes, device = start_processes(config.device)
    if forget_source is not None and processes.world_size > 1:
        raise ValueError("forget_source is for one process; under torchrun the caches are streamed")
    out = Path(config.out)
    log_dir = Path(config.log_dir) if config.log_dir else out
    if processes.main:
        out.mkdir(parents=True, exist_ok=True)
    needs = set(loss_inputs(config.method))
    if config.batch_size % processes.world_size:
        raise ValueError(
            f"--batch-size {config.batch_size} must be a multiple of the {processes.world_size} processes"
        )

    # 1. Model, samples, caches.
    loaded = load_model(config.model, dtype=config.dtype, device=str(device))
    forget_samples = load_unlearning_samples(config.data, config.forget_split, config.sample_kinds)
    forget_by_id = {sample.sample_id: sample for sample in forget_samples}
    uses_retain = "retain" in needs
    retain_samples = (
        load_unlearning_samples(config.data, config.retain_split, config.sample_kinds) if uses_retain else []
    )

    forget_cache = retain_cache = None
    if "forget_teacher" in needs:
        if not config.forget_cache:
            raise ValueError(f"method {config.method!r} needs --forget-cache (its teacher distributions)")
        forget_cache = Cache.open(config.forget_cache, loaded, forget_by_id, "forget")
        missing = set(forget_by_id) - {record["sample_id"] for record in forget_cache.manifest.samples}
        if missing:
            raise ValueError(
                f"forget cache {config.forget_cache} lacks {len(missing)} of the {len(forget_by_id)} samples of "
                f"{config.forget_split}, e.g. {sorted(missing)[:3]}: every forget sample needs its teacher"
            )
    if "retain_teacher" in needs:
        if not config.retain_cache:
            raise ValueError(
                f"method {config.method!r} needs --retain-cache (the frozen model on the retain split)"
            )
        retain_cache = Cache.open(
            config.retain_cache, loaded, {s.sample_id: s for s in retain_samples}, "retain"
        )

    reads_forget_cache = needs & {"forget_teacher", "forget_reference_log_probs"}
    for given, used, option in (
        (config.forget_cache, reads_forget_cache, "--forget-cache"),
        (config.retain_cache, "retain_teacher" in needs, "--retain-cache"),
    ):
        if given and not used and processes.main:
            print(
                f"warning: method {config.method!r} does not read {option} {given}; ignored", file=sys.stderr
            )

    # 2. Reference log-probs of the frozen model, once, before LoRA exists.
    reference: dict[str, float] = {}
    refusal_reference: dict[str, float] = {}
    refusal_answers: dict[str, str] = {}
    if "forget_reference_log_probs" in needs:
        if config.forget_cache:
            cache = Cache.open(config.forget_cache, loaded, forget_by_id, "forget")
            if cache.teacher != "original":
                raise ValueError(
                    f"method {config.method!r} reads no teacher distributions; a --forget-cache can only give it the "
                    f"frozen model's log-probs, which needs an `original` cache, not {cache.teacher!r}"
                )
            reference = reference_log_probs_from_cache(cache)
        else:
            reference = reference_log_probs(loaded, forget_samples, None, processes)
    if "refusal" in needs:
        refusals = load_refusals(config.refusals) if config.refusals else load_refusals()
        refusal_answers = {
            s.sample_id: choose_refusal(s.sample_id, refusals, config.seed) for s in forget_samples
        }
        refusal_reference = reference_log_probs(loaded, forget_samples, refusal_answers, processes)

    # 3. LoRA, optimizer, DDP.
    peft_model = add_lora(loaded, config)
    peft_model.train()
    trainable = [parameter for _, parameter in named_trainable(peft_model)]
    # The fused kernel updates all LoRA tensors in one call (CPU and CUDA): 0.8 -> 0.2 ms per mini-model step.
    optimizer = torch.optim.AdamW(
        trainable, lr=config.lr, weight_decay=config.weight_decay, fused=device.type in ("cpu", "cuda")
    )
    num_forget = len(forget_samples)
    micro_per_epoch = math.ceil(num_forget / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if config.lr_scheduler not in ("constant", "linear"):
        raise ValueError(f"--lr-scheduler {config.lr_scheduler!r}: choose constant or linear")
    decay = (
        (lambda step: max(0.0, 1.0 - step / total_steps))
        if config.lr_scheduler == "linear"
        else (lambda _: 1.0)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    model = peft_model
    if processes.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            peft_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    torch.manual_seed(config.seed + 1000 * processes.rank)  # LoRA dropout masks: reproducible per rank
    random.seed(config.seed + 1000 * processes.rank)
    position = Position()
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        position = load_checkpoint(checkpoint, peft_model, optimizer, scheduler, config, processes)
        if processes.main:
            print(f"resuming from {checkpoint} (step {position.global_step} of {total_steps})", flush=True)

    def step_samples(step_in_epoch: int) -> tuple[int, int]:
        """Global [start, stop) of the forget stream positions an optimizer step covers."""
        start = step_in_epoch * config.grad_accum * config.batch_size
        return start, min(start + config.grad_accum * config.batch_size, num_forget)

    def rank_positions(start: int, stop: int) -> list[int]:
        """The global forget stream positions start..stop-1 this rank holds (p mod W == rank)."""
        first = start + (processes.rank - start) % processes.world_size
        return list(range(first, stop, processes.world_size))

    paired_retain = PairedRetain(retain_samples, retain_cache, config.seed) if uses_retain else None

    # LoRA trains the language model only, so each image's vision features are the same at every step:
    # encode each image once (on the mini model the forward pass is 18% shorter; bench/train.py).
    image_features = VisionFeatureCache(loaded.model, max_bytes=config.image_feature_cache_mb << 20)
    trains_vision = any("language_model" not in name for name, _ in named_trainable(peft_model))
    image_features.enabled &= config.image_feature_cache_mb > 0 and not trains_vision

    # Each sample is tokenized and its image preprocessed once (within 1 GiB), not at every step, and its
    # image hashed once (the vision features' key).
    encoded_samples = EncodedSamples(loaded)
    image_key_of = functools.cache(image_key)

    def forward_loss(forget_items, retain_items) -> dict[str, torch.Tensor]:
        """One forward over forget (+ refusal, + retain) samples and the method's loss on it."""
        forget_qas = [sample for sample, _ in forget_items]
        # (student sample, the answer it is teacher-forced on): forget, then refusal, then retain.
        students = [(sample, sample.answer) for sample in forget_qas]
        counts = [len(forget_qas)]
        if "refusal" in needs:
            students += [(sample, refusal_answers[sample.sample_id]) for sample in forget_qas]
            counts.append(len(forget_qas))
        if uses_retain:
            students += [(sample, sample.answer) for sample, _ in retain_items]
            counts.append(len(retain_items))
        # A QASample with an answer identifies the input completely (image bytes included); it is only
        # built (image decoded, prompt written) when not encoded already.
        batch = encoded_samples.batch(students, lambda index: prompted(loaded, *students[index])).to(device)
        image_keys = [image_key_of(sample) for sample, _ in students]
        keys = [key for key in image_keys if key is not None]
        logits = answer_logits(model, batch, **image_features.model_kwargs(batch.inputs, keys))
        predictions = AnswerPredictions(logits, batch.targets, batch.answer_lengths)
        parts = iter(predictions.split(counts))
        forget = next(parts)
        loss_inputs_: dict[str, Any] = {"forget": forget}
        if "refusal" in needs:
            loss_inputs_["refusal"] = next(parts)
        if uses_retain:
            loss_inputs_["retain"] = next(parts)
        if forget_cache is not None:
            check_answer_tokens(forget, forget_items, forget_cache.directory)
            loss_inputs_["forget_teacher"] = concat_samples([c for _, c in forget_items])[1].to(device)
        if retain_cache is not None:
            check_answer_tokens(loss_inputs_["retain"], retain_items, retain_cache.directory)
            loss_inputs_["retain_teacher"] = concat_samples([c for _, c in retain_items])[1].to(device)
        if reference:
            loss_inputs_["forget_reference_log_probs"] = torch.tensor(
                [reference[s.sample_id] for s in forget_qas], device=device
            )
        if refusal_reference:
            loss_inputs_["refusal_reference_log_probs"] = torch.tensor(
                [refusal_reference[s.sample_id] for s in forget_qas], device=device
            )
        return compute_loss(config.method, loss_inputs_, config.hyperparameters())

    # 4. The loop.
    started = time.perf_counter()
    previous_items: tuple[list, list] | None = None
    for epoch in range(position.epoch, config.epochs):
        if position.global_step >= total_steps:
            break
        first_step = position.step_in_epoch if epoch == position.epoch else 0
        if forget_source is not None:
            forget_stream = forget_source(epoch)
        else:
            forget_stream = sample_stream(
                forget_samples, forget_cache, config.seed, "forget", epoch, processes
            )
        forget_stream = islice(forget_stream, len(rank_positions(0, step_samples(first_step)[0])), None)
        for step_in_epoch in range(first_step, steps_per_epoch):
            if position.global_step >= total_steps:
                break
            step_start_time = time.perf_counter()
            start, stop = step_samples(step_in_epoch)
            step_count = stop - start
            sums: dict[str, float] = {}
            micro_starts = list(range(start, stop, config.batch_size))
            for index, micro_start in enumerate(micro_starts):
                micro_stop = min(micro_start + config.batch_size, stop)
                positions = rank_positions(micro_start, micro_stop)
                forget_items = list(islice(forget_stream, len(positions)))
                own_samples = len(forget_items)
                scale = own_samples * processes.world_size / step_count
                if forget_items:
                    retain_items = []
                    if paired_retain is not None:
                        retain_items = paired_retain.take([epoch * num_forget + p for p in positions])
                    previous_items = (forget_items, retain_items)
                elif previous_items is not None:  # a rank with nothing left still joins DDP's all-reduce
                    forget_items, retain_items = previous_items
                else:
                    raise ValueError(
                        f"{num_forget} forget samples cannot feed {processes.world_size} processes"
                    )
                last_micro = index == len(micro_starts) - 1
                sync = model.no_sync() if processes.world_size > 1 and not last_micro else nullcontext()
                with sync:
                    terms = forward_loss(forget_items, retain_items)
                    (terms["loss"] * scale).backward()
                for name, value in terms.items():  # per-term sums over samples, for the log
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) * own_samples
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            if processes.world_size > 1:
                names = sorted(sums)
                totals = torch.tensor([sums[name] for name in names], dtype=torch.float64)
                dist.all_reduce(totals)
                sums = dict(zip(names, totals.tolist(), strict=True))
            position.global_step += 1
            position.epoch, position.step_in_epoch = epoch, step_in_epoch + 1
            row = {
                "step": position.global_step,
                "epoch": epoch,
                "samples": step_count,
                "lr": learning_rate,
                "step_time_s": time.perf_counter() - step_start_time,
            }
            row.update({name: total / step_count for name, total in sums.items()})
            position.log.append(row)
            if processes.main and config.progress:
                print(json.dumps(row), flush=True)
            if position.step_in_epoch == steps_per_epoch:  # the next step starts the next epoch
                position.epoch, position.step_in_epoch = epoch + 1, 0
            if (
                config.checkpoint_every
                and position.global_step % config.checkpoint_every == 0
                and position.global_step < total_steps
            ):
                save_checkpoint(out, peft_model, optimizer, scheduler, position, config, processes)
                if processes.main:
                    write_log(log_dir, position.log)
            if on_step is not None:
                on_step(position.global_step)

    # 5. The adapter, its meta data and the log.
    meta = {
        "model": config.model,
        "model_fingerprint": loaded.model_fingerprint,
        "tokenizer_fingerprint": loaded.tokenizer_fingerprint,
        "method": config.method,
        "params": config.signature(),
        "forget_cache": forget_cache
        and {"directory": forget_cache.directory, "teacher": forget_cache.teacher},
        "retain_cache": retain_cache
        and {"directory": retain_cache.directory, "teacher": retain_cache.teacher},
        "forget_samples": num_forget,
        "steps": position.global_step,
        "world_size": processes.world_size,
        "train_seconds": time.perf_counter() - started,
        "final_loss": position.log[-1]["loss"] if position.log else None,
    }
    processes.barrier()
    if processes.main:
        peft_model.save_pretrained(out)
        write_log(log_dir, position.log)
        (out / META).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    processes.barrier()
    if processes.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return meta


if __name__ == "__main__":  # torchrun --nproc-per-node N -m stages.train <pipeline train options>
    from pipeline.cli import main

    arguments = sys.argv[1:]
    group_options = arguments[:2] if arguments[:1] == ["--params"] else []  # `--params FILE` goes first
    main([*group_options, "train", *arguments[len(group_options) :]], prog_name="pipeline")
