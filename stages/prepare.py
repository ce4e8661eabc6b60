"""Stage `prepare`: build the embedded mini world and the full model that has memorized it.

1. write the synthetic MLLMU-Bench-shaped world (pipeline.mini_world) under OUT/data and OUT/references;
2. train a tokenizer on the world's text, build the tiny LLaVA and fine-tune it until it has memorized
   every person (pipeline.mini_world.fine_tune), saved like a hub checkpoint under OUT/model;
3. measure its memorization with the evaluate stage.

An interrupted fine-tune resumes from its last epoch; a complete model is never trained again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.benchmarks.mllmu import load_split_rows
from pipeline.mini_world.fine_tune import build_full_model
from pipeline.mini_world.world import build_world, full_model_card, write_world
from stages.config import EvaluateConfig, PrepareConfig
from stages.evaluate import run as evaluate

# The acceptance: the full model must know the forget_10 and retain people.
MEMORIZATION_FORGET_SPLIT = "forget_10"
MEMORIZATION_SPLITS = ("forget", "test", "retain", "real")


def measure_memorization(
    model_dir: Path, data_dir: str, out_dir: Path, people_per_split: int, mc_scoring: str, log=print
) -> dict:
    """Multiple choice, cloze, generation ROUGE-L and BLEU of the full model on forget_10, its Test_Set
    people (other images, paraphrased questions), retain and real, as the evaluate stage scores them."""
    metrics = evaluate(
        EvaluateConfig(
            model=str(model_dir),
            data=data_dir,
            out=str(out_dir / "metrics.json"),
            forget_split=MEMORIZATION_FORGET_SPLIT,
            splits=MEMORIZATION_SPLITS,
            mc_scoring=mc_scoring,
            reverse_attack=False,
            mc_few_shot_profiles=0,
            cloze_few_shot_profiles=0,
            limit=people_per_split,
            batch_size=32,
            progress=False,
        )
    )
    figures = {
        split: {name: metrics[split][name] for name in ("mc_acc", "cloze_acc", "rougeL", "bleu")}
        for split in MEMORIZATION_SPLITS
    }
    log(json.dumps({"memorization": figures}))
    return figures


def run(config: PrepareConfig, log=print) -> dict:
    """The whole stage: world, full model, memorization figures."""
    started = time.time()
    out = Path(config.out)
    info = write_world(out, config.world)
    log(f"mini world: {sum(len(ids) for ids in info.splits.values())} split entries under {info.data_dir}")
    world_text = build_world(config.world).text_corpus()
    train_rows = load_split_rows(info.data_dir, "Full_Set") + load_split_rows(info.data_dir, "Retain_Set")
    model_dir = out / "model"
    if (model_dir / "model.safetensors").exists() and (model_dir / "fine_tune_log.json").exists():
        log(f"{model_dir} is complete; not fine-tuning again")
        history = json.loads((model_dir / "fine_tune_log.json").read_text())
    else:
        _, history = build_full_model(
            train_rows, world_text, model_dir, config.fine_tune, config.world.seed, log=log
        )
    figures = {
        "fine_tune": {"epochs": len(history), "final_loss": history[-1]["loss"]},
        "cross_person_rougeL": info.cross_person_rouge_l,
    }
    if config.metrics_out:
        metrics_out = Path(config.metrics_out)
        mc_scoring = "generate" if config.fine_tune.mc_format == "letter" else "likelihood"
        figures["memorization"] = measure_memorization(
            model_dir,
            info.data_dir,
            metrics_out.parent / "full_model_eval",
            config.people_per_split,
            mc_scoring,
            log=log,
        )
        figures["mc_scoring"] = mc_scoring
        figures["prepare_seconds"] = round(time.time() - started, 1)
        card = Path(info.data_dir) / "DATA_CARD.md"
        card.write_text(card.read_text() + full_model_card(figures))
        metrics_out.parent.mkdir(parents=True, exist_ok=True)
        metrics_out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures
