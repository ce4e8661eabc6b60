"""Loss-input providers: who makes each input a loss declares (pipeline.unlearning.losses.loss_inputs).

A provider is registered under the input names it makes. It has a setup, run once before any LoRA weight
moves (open a cache, the frozen model's log-probabilities, the refusal answers), a start, run once after
LoRA is added and before the first step (MMUnlearner's gradient saliency at the frozen model), and a
per-batch step that adds its tensors to the loss's inputs. A provider of a student role (refusal, retain)
also gives the (sample, answer) pairs the student is teacher-forced on in the batch's one forward pass,
after the forget samples. The train recipe (stages/train.py) loops over the providers of what its loss
declares, in the order they are registered here, which is the order of their setups and of the roles in
the forward pass. The student's predictions (forget, refusal, retain) and the frozen model's hidden
states (RMU) come from that forward pass itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cache import concat_samples
from pipeline.models.masked_delta import add_masked_deltas
from pipeline.samples import QASample
from pipeline.training.online import OnlineTeacher, teacher_rows
from pipeline.training.processes import Processes
from pipeline.training.reference import reference_log_probs, reference_log_probs_from_cache
from pipeline.training.saliency import gradient_saliency, lora_layers
from pipeline.training.streams import Cache, check_answer_tokens
from pipeline.unlearning.losses import AnswerPredictions, choose_refusal, load_refusals
from pipeline.unlearning.methods import Method
from pipeline.unlearning.teachers import TEACHERS

Pairs = list[tuple[QASample, str]]  # (sample, the answer the student is teacher-forced on)


@dataclass
class Setup:
    """What the providers and the loop read, built once: the model, the samples, the streamed caches."""

    loaded: Any
    method: Method
    processes: Processes
    forget_samples: list[QASample]
    retain_samples: list[QASample]
    forget_cache: Cache | None = None  # streamed with the forget samples (a loss reading forget_teacher)
    retain_cache: Cache | None = None  # paired with the retain samples (a loss reading retain_teacher)
    opened: dict[str, Cache] = field(default_factory=dict)

    def cache(self, role: str) -> Cache:
        """The method's cache of the forget or retain split, opened (and checked) once."""
        if role not in self.opened:
            directory = self.method.forget_cache if role == "forget" else self.method.retain_cache
            samples = self.forget_samples if role == "forget" else self.retain_samples
            by_id = {sample.sample_id: sample for sample in samples}
            self.opened[role] = Cache.open(directory, self.loaded, by_id, role)
        return self.opened[role]


@dataclass
class Batch:
    """One micro-batch: (sample, cached rows) of the forget stream and of the paired retain samples."""

    forget_items: list
    retain_items: list
    device: torch.device

    @property
    def forget_samples(self) -> list[QASample]:
        return [sample for sample, _ in self.forget_items]


class Provider:
    """Makes some of a loss's inputs; the defaults do nothing."""

    role: str | None = None  # a student role whose answers join the forward pass

    def setup(self, setup: Setup, config: Any) -> None:
        """Once, before LoRA is added: what the inputs are computed from."""

    def adapt(self, peft_model: Any) -> None:
        """Add to the model what this input trains beside LoRA, before the optimizer is built."""

    def start(self, teacher_forced: Callable[[Pairs, Any], AnswerPredictions], step: Any) -> None:
        """Once, after LoRA is added and before the first step."""

    def answers(self, batch: Batch) -> Pairs:
        """The student role's (sample, answer) pairs of the batch."""
        return []

    def add(self, inputs: dict[str, Any], batch: Batch) -> None:
        """Add this provider's inputs for the batch (the student's predictions are already there)."""


PROVIDERS: dict[str, type[Provider]] = {}  # loss input name -> provider, in registration order


def provides(*names: str) -> Callable[[type[Provider]], type[Provider]]:
    def register(provider: type[Provider]) -> type[Provider]:
        for name in names:
            if name in PROVIDERS:
                raise ValueError(f"loss input {name!r} has two providers")
            PROVIDERS[name] = provider
        return provider

    return register


def providers_for(needs: list[str] | set[str]) -> list[Provider]:
    """One provider of each kind the declared inputs need, in registration order."""
    kinds = list(dict.fromkeys(PROVIDERS[name] for name in PROVIDERS if name in needs))
    return [kind() for kind in kinds]


@provides("forget_teacher")
class ForgetTeacher(Provider):
    """The forget cache's rows (ViKeR's R, Vgid's pi_T), streamed with the forget samples; with
    teacher_source `online`, the same samples' full distributions computed every step instead."""

    def setup(self, setup: Setup, config: Any) -> None:
        if not setup.method.forget_cache:
            raise ValueError(f"method {setup.method.name!r} needs --forget-cache (its teacher distributions)")
        self.cache = setup.forget_cache = setup.cache("forget")
        forget_ids = {sample.sample_id for sample in setup.forget_samples}
        missing = forget_ids - {record["sample_id"] for record in self.cache.manifest.samples}
        if missing:
            raise ValueError(
                f"forget cache {setup.method.forget_cache} lacks {len(missing)} of the {len(forget_ids)} "
                f"samples of {config.forget_split}, e.g. {sorted(missing)[:3]}: every forget sample needs "
                "its teacher"
            )
        self.online = online_teacher(setup, self.cache, config)

    def start(self, teacher_forced: Callable[[Pairs, Any], AnswerPredictions], step: Any) -> None:
        if self.online is not None:
            self.online.frozen = step.peft_model

    def add(self, inputs: dict[str, Any], batch: Batch) -> None:
        check_answer_tokens(inputs["forget"], batch.forget_items, self.cache.directory)
        rows = teacher_rows(self.online, batch.forget_items)
        inputs["forget_teacher"] = concat_samples(rows)[1].to(batch.device)


@provides("retain_teacher")
class RetainTeacher(Provider):
    """The frozen model's cached rows on the retain split (Vgid Eq. 4, KL_Min), paired per forget sample."""

    def setup(self, setup: Setup, config: Any) -> None:
        if not setup.method.retain_cache:
            raise ValueError(
                f"method {setup.method.name!r} needs --retain-cache (the frozen model on the retain split)"
            )
        self.cache = setup.retain_cache = setup.cache("retain")
        self.online = online_teacher(setup, self.cache, config)

    def start(self, teacher_forced: Callable[[Pairs, Any], AnswerPredictions], step: Any) -> None:
        if self.online is not None:
            self.online.frozen = step.peft_model

    def add(self, inputs: dict[str, Any], batch: Batch) -> None:
        check_answer_tokens(inputs["retain"], batch.retain_items, self.cache.directory)
        rows = teacher_rows(self.online, batch.retain_items)
        inputs["retain_teacher"] = concat_samples(rows)[1].to(batch.device)


def online_teacher(setup: Setup, cache: Cache, config: Any) -> OnlineTeacher | None:
    """The cache's teacher computed online (teacher_source `online`, bench/cache_fidelity.py), else None."""
    if config.teacher_source != "online":
        return None
    return OnlineTeacher(setup.loaded, cache, config.data)


@provides("forget_reference_log_probs")
class ForgetReference(Provider):
    """log p(y | I, x; theta_full) per forget sample (NPO, PO, IdkPO): from an `original` cache when the
    method names one (computed there once), else computed here before any LoRA weight moves."""

    def setup(self, setup: Setup, config: Any) -> None:
        method = setup.method
        if method.forget_cache:
            cache = setup.cache("forget")
            if cache.teacher not in TEACHERS or not TEACHERS[cache.teacher].unmodified:
                raise ValueError(
                    f"method {method.name!r} reads no teacher distributions; a --forget-cache can only give "
                    f"it the frozen model's log-probs, which needs a cache of the unmodified input (teacher "
                    f"`original`), not {cache.teacher!r}"
                )
            self.values = reference_log_probs_from_cache(cache)
        else:
            self.values = reference_log_probs(setup.loaded, setup.forget_samples, None, setup.processes)

    def add(self, inputs: dict[str, Any], batch: Batch) -> None:
        values = [self.values[sample.sample_id] for sample in batch.forget_samples]
        inputs["forget_reference_log_probs"] = torch.tensor(values, device=batch.device)


@provides("refusal", "refusal_reference_log_probs")
class Refusal(Provider):
    """A refusal per forget sample (IdkPO's y_idk, PO's y+) and the frozen model's log-probability of it."""

    role = "refusal"

    def setup(self, setup: Setup, config: Any) -> None:
        refusals = load_refusals(config.refusals) if config.refusals else load_refusals()
        self.answers_of = {
            sample.sample_id: choose_refusal(sample.sample_id, refusals, config.seed)
            for sample in setup.forget_samples
        }
        self.reference = reference_log_probs(
            setup.loaded, setup.forget_samples, self.answers_of, setup.processes
        )

    def answers(self, batch: Batch) -> Pairs:
        return [(sample, self.answers_of[sample.sample_id]) for sample in batch.forget_samples]

    def add(self, inputs: dict[str, Any], batch: Batch) -> None:
        values = [self.reference[sample.sample_id] for sample in batch.forget_samples]
        inputs["refusal_reference_log_probs"] = torch.tensor(values, device=batch.device)


@provides("retain")
class Retain(Provider):
    """The paired retain samples, teacher-forced on their own answers."""

    role = "retain"

    def answers(self, batch: Batch) -> Pairs:
        return [(sample, sample.answer) for sample, _ in batch.retain_items]


@provides("gradient_saliency")
class Saliency(Provider):
    """MMUnlearner's per-weight saliency of D_f and D_r over the weights of the layers LoRA adapts, at the
    frozen model before the first step, the same on every rank; and the masked deltas its forget term
    trains (pipeline.models.masked_delta), added before the optimizer is built."""

    def setup(self, setup: Setup, config: Any) -> None:
        self.setup_, self.batch_size = setup, config.batch_size

    def adapt(self, peft_model: Any) -> None:
        self.deltas = add_masked_deltas(peft_model, peft_model.active_adapter)

    def start(self, teacher_forced: Callable[[Pairs, Any], AnswerPredictions], step: Any) -> None:
        layers = lora_layers(step.peft_model)
        step.peft_model.eval()  # at the frozen model, without dropout's randomness
        self.saliency = gradient_saliency(
            lambda samples: teacher_forced([(s, s.answer) for s in samples], step.peft_model),
            self.setup_.forget_samples, self.setup_.retain_samples, self.batch_size,
            [layer.base_layer.weight for layer in layers], self.setup_.processes,
        )  # fmt: skip
        step.peft_model.train()

    def add(self, inputs: dict[str, Any], batch: Batch) -> None:
        inputs["gradient_saliency"] = self.saliency


def warn_unread_caches(setup: Setup, needs: set[str], main: bool) -> None:
    """Name a cache given to a method whose loss does not read it (it is ignored)."""
    reads_forget_cache = needs & {"forget_teacher", "forget_reference_log_probs"}
    for given, used, option in (
        (setup.method.forget_cache, reads_forget_cache, "--forget-cache"),
        (setup.method.retain_cache, "retain_teacher" in needs, "--retain-cache"),
    ):
        if given and not used and main:
            print(
                f"warning: method {setup.method.name!r} does not read {option} {given}; ignored",
                file=sys.stderr,
            )
