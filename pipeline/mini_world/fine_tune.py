"""Fine-tuning the tiny model until it has memorized the mini world: the full model unlearning starts from.

It trains on every split's questions (Full_Set + the real-celebrity Retain_Set), in the task texts the
benchmark asks (pipeline.benchmarks.prompts): first the facts alone (profile QA and cloze items), then every task
format. The Test_Set (other images, paraphrased questions) is never trained on: it measures
generalization. Work in progress is checkpointed every epoch, so an interrupted run resumes.
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.benchmarks import prompts
from pipeline.files import write_atomic
from pipeline.mini_world.config import FineTuneConfig
from pipeline.mini_world.drawing import augmented
from pipeline.mini_world.text import training_wordings
from pipeline.mini_world.tiny_model import save_model, untrained_tiny_llava
from pipeline.models import (
    LoadedModel,
    ModelFamily,
    PromptedSample,
    answer_logits,
    encode_answers,
    load_model,
)
from pipeline.samples import decode_image

# Few-shot exemplars in training prompts: enough that prompts with solved exemplars before the query
# are familiar, few enough that sequences stay short (the evaluate stage's `fixed` protocol uses the same cap).
MAX_FEWSHOT_QUESTIONS = 2


@dataclass
class DecodedRow:
    """One data set row, decoded once: the fine-tune draws fresh augmentations from it every epoch."""

    row_id: str
    image: Any
    row: dict


def decoded_rows(rows: list[dict], source: str) -> list[DecodedRow]:
    people = []
    for row in rows:
        image_bytes = row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"]
        image = decode_image(image_bytes, f"person {row['ID']} in {source}")
        people.append(DecodedRow(row_id=str(row["ID"]), image=image, row=row))
    return people


def _permuted(options: dict[str, str], correct: str, rng: random.Random) -> tuple[dict[str, str], str]:
    """Shuffle the options so the model must match the attribute, not memorize a letter."""
    texts = [options[letter] for letter in prompts.OPTION_LETTERS if letter in options]
    answer_text = options[correct]
    rng.shuffle(texts)
    letters = prompts.OPTION_LETTERS[: len(texts)]
    shuffled = dict(zip(letters, texts, strict=True))
    return shuffled, letters[texts.index(answer_text)]


def metadata_qa(row: dict) -> list[dict]:
    metadata = row.get("metadata") or "[]"
    return json.loads(metadata) if isinstance(metadata, str) else list(metadata)


@dataclass
class Epoch:
    """How one epoch words and shows the training items: the config's choices drawn from one random stream."""

    family: ModelFamily
    config: FineTuneConfig
    rng: random.Random

    def wording(self, question: str) -> str:
        return self.rng.choice(training_wordings(question)) if self.config.paraphrases else question

    def image(self, person: DecodedRow) -> Any:
        return augmented(person.image, self.rng) if self.config.augment else person.image

    def prompt(self, text: str, has_image: bool, exemplars: str = "") -> str:
        prompt = self.family.build_prompt(text, has_image, exemplars=exemplars)
        # The official evaluation writes "\nASSISTANT:", chat formats " ASSISTANT:": learn both.
        if self.rng.random() < 0.3 and prompt.endswith(" ASSISTANT:"):
            return prompt[: -len(" ASSISTANT:")] + "\nASSISTANT:"
        return prompt

    def with_exemplars(self) -> bool:
        return self.rng.random() < self.config.fewshot_probability


def qa_examples(person: DecodedRow, epoch: Epoch) -> list[PromptedSample]:
    """The profile QA the benchmark fine-tunes on (its `metadata` column); unlearning trains on these."""
    return [
        PromptedSample(
            epoch.prompt(epoch.wording(item["Question"]), True), epoch.image(person), item["Answer"]
        )
        for item in metadata_qa(person.row)
    ]


def _mc_items(person: DecodedRow) -> list[tuple[dict, bool]]:
    tasks = person.row["Classification_Task"]
    return [
        (item, has_image)
        for kind, has_image in (("Image_Textual_Questions", True), ("Pure_Text_Questions", False))
        for item in tasks.get(kind) or []
    ]


def option_examples(person: DecodedRow, epoch: Epoch) -> list[PromptedSample]:
    """Multiple choice as likelihood scoring asks it (MLLMU-Bench Eq. 13): the bare question, answered by
    the correct option's words."""
    return [
        PromptedSample(
            epoch.prompt(epoch.wording(item["Question"]), has_image),
            epoch.image(person) if has_image else None,
            item["Options"][item["Correct_Answer"]],
        )
        for item, has_image in _mc_items(person)
    ]


def letter_examples(person: DecodedRow, people: list[DecodedRow], epoch: Epoch) -> list[PromptedSample]:
    """Multiple choice as eval.py asks it: the options listed, answered by the correct letter."""
    examples = []
    for item, has_image in _mc_items(person):
        options, letter = dict(item["Options"]), item["Correct_Answer"]
        if epoch.config.permute_options:
            options, letter = _permuted(options, letter, epoch.rng)
        prefix, context = "", ()
        if has_image and epoch.with_exemplars():
            other = epoch.rng.choice(people)
            exemplars = []
            shots = other.row["Classification_Task"].get("Image_Textual_Questions") or []
            for shot in epoch.rng.sample(shots, min(len(shots), MAX_FEWSHOT_QUESTIONS)):
                shot_options, shot_letter = dict(shot["Options"]), shot["Correct_Answer"]
                if epoch.config.permute_options:
                    shot_options, shot_letter = _permuted(shot_options, shot_letter, epoch.rng)
                exemplars.append((shot["Question"], shot_options, shot_letter))
            prefix = prompts.classification_fewshot_block(exemplars, True, epoch.family.image_placeholder)
            context = tuple(other.image for _ in exemplars)
        text = prompts.classification_text(item["Question"], options)
        image = epoch.image(person) if has_image else None
        examples.append(PromptedSample(epoch.prompt(text, has_image, prefix), image, letter, context))
    return examples


def cloze_examples(person: DecodedRow, people: list[DecodedRow], epoch: Epoch) -> list[PromptedSample]:
    examples = []
    for item in person.row["Mask_Task"]:
        has_image = item["Type"] == "Image_Textual"
        prefix, context = "", ()
        if epoch.with_exemplars():
            other = epoch.rng.choice(people)
            shots = [
                (s["Question"], s["Ground_Truth"])
                for s in other.row["Mask_Task"]
                if s["Type"] == item["Type"]
            ]
            shots = epoch.rng.sample(shots, min(len(shots), MAX_FEWSHOT_QUESTIONS))
            prefix = prompts.cloze_fewshot_block(shots, has_image, epoch.family.image_placeholder)
            context = tuple(other.image for _ in shots) if has_image else ()
        text = prompts.cloze_text(epoch.wording(item["Question"]))
        image = epoch.image(person) if has_image else None
        examples.append(
            PromptedSample(epoch.prompt(text, has_image, prefix), image, item["Ground_Truth"], context)
        )
    return examples


def generation_examples(person: DecodedRow, epoch: Epoch) -> list[PromptedSample]:
    examples = []
    for item in person.row["Generation_Task"]:
        has_image = item["Type"] == "Image_Textual"
        text = prompts.generation_text(epoch.wording(item["Question"]), has_image)
        image = epoch.image(person) if has_image else None
        examples.append(PromptedSample(epoch.prompt(text, has_image), image, item["Ground_Truth"]))
    return examples


def training_examples(
    people: list[DecodedRow],
    family: ModelFamily,
    rng: random.Random,
    config: FineTuneConfig,
    facts_only: bool = False,
) -> list[PromptedSample]:
    """One epoch of fine-tuning examples: every person's facts in their shortest forms (profile QA,
    multiple choice by option and cloze items) and, unless `facts_only`, the generation items and the
    letter form of multiple choice."""
    epoch = Epoch(family, config, rng)
    with_options = config.mc_format in ("option", "both")
    with_letters = config.mc_format in ("letter", "both")
    examples: list[PromptedSample] = []
    for person in people:
        examples += qa_examples(person, epoch)
        examples += option_examples(person, epoch) if with_options else []
        examples += cloze_examples(person, people, epoch)
        if not facts_only:
            examples += generation_examples(person, epoch)
            examples += letter_examples(person, people, epoch) if with_letters else []
    return examples


def _batches(
    examples: list[PromptedSample], batch_size: int, rng: random.Random
) -> list[list[PromptedSample]]:
    # Group examples of similar prompt length so little compute goes to padding.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + rng.random() * 40)
    batches = [
        [examples[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)
    ]
    rng.shuffle(batches)
    return batches


def _total_steps(people: list[DecodedRow], family: ModelFamily, config: FineTuneConfig) -> int:
    """Optimizer steps of the whole fine-tune: the fact epochs' and the other epochs' (the example counts
    do not depend on the random draws)."""

    def steps_per_epoch(facts_only: bool) -> int:
        examples = training_examples(people, family, random.Random(0), config, facts_only)
        return math.ceil(len(examples) / config.batch_size)

    return steps_per_epoch(True) * config.fact_epochs + steps_per_epoch(False) * config.epochs


def _optimizer_and_schedule(
    model: torch.nn.Module, config: FineTuneConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warmup, then a cosine decay to `final_lr_fraction` of the peak rate."""
    warmup = max(1, int(total_steps * config.warmup_fraction))
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        betas=(0.9, config.adam_beta2),
    )

    def learning_rate_factor(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        return min(1.0, (step + 1) / warmup) * (
            config.final_lr_fraction + (1 - config.final_lr_fraction) * cosine
        )

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)


@dataclass
class FineTuneState:
    """What an epoch changes and a checkpoint keeps: weights, optimizer, schedule, random streams, log."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    rng: random.Random
    history: list[dict]

    def save(self, checkpoint: Path, config: FineTuneConfig) -> None:
        state = {
            "config": asdict(config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "python_rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(checkpoint, buffer.getvalue())  # a kill never leaves half a checkpoint

    def resume(self, checkpoint: Path, config: FineTuneConfig) -> None:
        state = torch.load(checkpoint, weights_only=True)
        if state["config"] != asdict(config):
            raise ValueError(
                f"{checkpoint} was written with another fine-tune configuration; delete it to restart"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.history = state["history"]


def _train_epoch(
    loaded: LoadedModel, examples: list[PromptedSample], state: FineTuneState, batch_size: int
) -> tuple[float, int]:
    """One pass over `examples` in length-grouped batches; (summed token loss, answer tokens)."""
    total_loss, total_tokens = 0.0, 0
    for batch_examples in _batches(examples, batch_size, state.rng):
        batch = encode_answers(loaded, batch_examples)
        logits = answer_logits(state.model, batch)
        loss = F.cross_entropy(logits.float(), batch.targets)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
        state.optimizer.step()
        state.schedule.step()
        total_loss += loss.item() * len(batch.targets)
        total_tokens += len(batch.targets)
    return total_loss, total_tokens


def fine_tune(
    loaded: LoadedModel,
    people: list[DecodedRow],
    config: FineTuneConfig,
    seed: int,
    checkpoint: Path | None = None,
    log=print,
) -> list[dict]:
    """Supervised fine-tuning on answer tokens only; returns the per-epoch log.

    With `checkpoint`, the state after every epoch is saved there and a rerun resumes from it.
    """
    model = loaded.model
    model.requires_grad_(True)
    model.train()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    total_steps = _total_steps(people, loaded.family, config)
    state = FineTuneState(model, *_optimizer_and_schedule(model, config, total_steps), rng, history=[])
    if checkpoint is not None and checkpoint.exists():
        state.resume(checkpoint, config)
        log(f"resuming the fine-tune after epoch {len(state.history)} from {checkpoint}")
    for epoch in range(len(state.history), config.fact_epochs + config.epochs):
        started = time.time()
        facts_only = epoch < config.fact_epochs
        examples = training_examples(people, loaded.family, rng, config, facts_only)
        total_loss, total_tokens = _train_epoch(loaded, examples, state, config.batch_size)
        entry = {
            "epoch": epoch + 1,
            "phase": "facts" if facts_only else "all",
            "loss": total_loss / total_tokens,
            "seconds": round(time.time() - started, 2),
        }
        state.history.append(entry)
        if checkpoint is not None:
            state.save(checkpoint, config)
        log(json.dumps(entry))  # after the checkpoint: a logged epoch is never redone
    model.eval()
    model.requires_grad_(False)
    return state.history


def all_text(people: list[DecodedRow]) -> list[str]:
    """Every string the model will read or write, for the tokenizer."""
    texts = [
        prompts.MC_INSTRUCTION,
        prompts.CLOZE_INSTRUCTION,
        prompts.GENERATION_INSTRUCTION_IMAGE,
        prompts.GENERATION_INSTRUCTION_TEXT,
        "USER: ASSISTANT: Question: Correct Answer: [Blank]",
    ]
    for person in people:
        row = person.row
        texts += [f"{item['Question']} {item['Answer']}" for item in metadata_qa(row)]
        texts += [f"{item['Question']} {item['Ground_Truth']}" for item in row["Generation_Task"]]
        texts += [f"{item['Question']} {item['Ground_Truth']}" for item in row["Mask_Task"]]
        for item in metadata_qa(row) + row["Generation_Task"] + row["Mask_Task"]:
            texts += training_wordings(item["Question"])[1:]
        for item, _ in _mc_items(person):
            texts.append(item["Question"] + " " + " ".join(dict(item["Options"]).values()))
            texts += training_wordings(item["Question"])[1:]
    return texts


def build_full_model(
    train_rows: list[dict],
    extra_text: list[str],
    out_dir: Path,
    config: FineTuneConfig,
    seed: int,
    log=print,
) -> tuple[LoadedModel, list[dict]]:
    """Tokenizer + tiny LLaVA + fine-tune on `train_rows`, saved to out_dir and reloaded from there.

    Work in progress lives in OUT.partial/ (initial weights + per-epoch checkpoint), so an interrupted
    run resumes where it stopped; out_dir appears only when the model is complete.
    """
    people = decoded_rows(train_rows, "the training rows")
    if config.threads:
        torch.set_num_threads(config.threads)
    partial = out_dir.with_name(out_dir.name + ".partial")
    initial_dir = partial / "initial"
    if not (initial_dir / "model.safetensors").exists():
        model, processor = untrained_tiny_llava(all_text(people) + extra_text, config.model, seed)
        save_model(model, processor, initial_dir)
    loaded = load_model(str(initial_dir))
    history = fine_tune(loaded, people, config, seed, checkpoint=partial / "checkpoint.pt", log=log)
    save_model(loaded.model, loaded.processor, out_dir, config.model)
    (out_dir / "fine_tune_log.json").write_text(json.dumps(history, indent=1) + "\n")
    shutil.rmtree(partial)
    return load_model(str(out_dir)), history
