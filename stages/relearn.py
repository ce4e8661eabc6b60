"""Stage `relearn`: the relearning attack on an unlearned adapter (docs/evaluation.md, "Relearning attack").

The recipe: pick the relearned part of the forget people (pipeline.evaluation.relearning, the same for every method
and seed), then train on from the unlearned adapter with plain fine-tuning on their QA only (the
`finetune` loss), through the train stage's loop. Its training_meta.json names the people it saw, so
`pipeline evaluate --relearned` scores exactly the others. The unlearned adapter's own weights are
trained on, not a fresh adapter on the merged model: unlearning moved only those weights, and the attack
asks how far they are from giving the knowledge back.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from pipeline.evaluation.relearning import relearning_people
from pipeline.unlearning.methods import resolve_method
from stages import train
from stages.config import DataOptions, ModelOptions, RelearnConfig, TrainConfig


def train_config(config: RelearnConfig) -> TrainConfig:
    """The train stage's config of the attack: fine-tuning on the relearned people's samples only."""
    samples = config.training_layout().unlearning_samples(config.forget_split, config.sample_kinds)
    people = relearning_people([sample.person_id for sample in samples], config.fraction, config.split_seed)
    shared = {
        option.name: getattr(config, option.name) for option in fields(ModelOptions) + fields(DataOptions)
    }
    return TrainConfig(
        **shared,
        out=config.out,
        method="finetune",
        forget_people=tuple(people),
        sample_kinds=config.sample_kinds,
        lr=config.lr,
        batch_size=config.batch_size,
        epochs=config.epochs,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        gradient_checkpointing=config.gradient_checkpointing,
        init_adapter=config.adapter,
        seed=config.seed,
        progress=config.progress,
    )


def run(config: RelearnConfig) -> dict[str, Any]:
    """Relearn and save the adapter; returns its training_meta (resumes like `pipeline train`)."""
    return train.run(train_config(config), resolve_method("finetune", {}))
