"""Stage `finetune`: origin -> full. The released checkpoint learns every person of the benchmark, so that
unlearning has something to forget (MLLMU-Bench's fictitious people are in no released model).

The recipe is MLLMU-Bench's finetune.py (franciscoliu/MLLMU-Bench): its training rows' `metadata` QA, each
pair shown with the person's image, LoRA r 16 / alpha 16 / dropout 0.05 on the language model's linear
layers, AdamW at 2e-5 with a linear decay, batch 4, 5 epochs, the adapter merged into the weights and the
whole model saved. It runs through the train stage's loop (the `finetune` loss, checkpoints and resumption,
torchrun), then merges; README "The full model" says where it differs from the script. The merged model is
saved with its tokenizer and processor, so it loads like any hub checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from pipeline.files import write_atomic
from pipeline.models import load_model
from pipeline.models.adapters import load_adapter
from pipeline.unlearning.methods import resolve_method
from stages import train
from stages.config import DataOptions, FinetuneConfig, ModelOptions, TrainConfig

ADAPTER = "finetune_adapter"  # the trained LoRA adapter and its training_meta.json, kept beside the weights
META = "finetune_meta.json"


def learned_splits(config: FinetuneConfig) -> list[str]:
    """The splits the full model learns: --splits, else the forget split and its retain split (together
    every fictitious person of MLLMU-Bench's training rows)."""
    if config.splits:
        return list(config.splits)
    names = config.split_names(config.training_layout())
    return [names["forget"], names["retain"]]


def train_config(config: FinetuneConfig, adapter_dir: Path) -> TrainConfig:
    """The train stage's config of the fine-tune: plain next-token loss on the learned splits' answers."""
    shared = {
        option.name: getattr(config, option.name) for option in fields(ModelOptions) + fields(DataOptions)
    }
    first, *others = learned_splits(config)
    return TrainConfig(
        **{**shared, "model": config.origin, "forget_split": first},
        out=str(adapter_dir),
        method="finetune",
        also_train_on=tuple(others),
        sample_kinds=config.sample_kinds,
        lr=config.lr,
        batch_size=config.batch_size,
        epochs=config.epochs,
        lr_scheduler="linear",
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        lora_targets=config.lora_targets,
        gradient_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        checkpoint_every=config.checkpoint_every,
        progress=config.progress,
    )


def save_merged(config: FinetuneConfig, adapter_dir: Path, target: Path) -> None:
    """The origin with the adapter merged into its weights (no LoRA module left), with its tokenizer and
    processor, saved to target."""
    loaded = load_model(config.origin, **config.loading())
    merged = load_adapter(loaded, adapter_dir).merge_and_unload()
    merged.save_pretrained(target)
    loaded.processor.save_pretrained(target)


def run(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune, merge and save the full model; returns its meta (the adapter's training_meta and what
    was learned). Work in progress lives in OUT.partial/, so a killed run resumes and OUT appears whole."""
    out = Path(config.out or config.model)
    if Path(config.origin).resolve() == out.resolve():
        raise ValueError(
            f"finetune: --origin and the output are both {out}: the full model needs its own folder"
        )
    partial = out.with_name(out.name + ".partial")
    adapter_dir = partial / ADAPTER
    training = train.run(train_config(config, adapter_dir), resolve_method("finetune", {}))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the first process merges and saves
        return {"origin": config.origin, "splits": learned_splits(config), "training": training}
    print(f"finetune: merging {adapter_dir} into {config.origin}", file=sys.stderr)
    save_merged(config, adapter_dir, partial)
    meta = {"origin": config.origin, "splits": learned_splits(config), "training": training}
    write_atomic(partial / META, json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.replace(out)
    return meta
