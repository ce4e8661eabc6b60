"""Benchmark: likelihood multiple choice from one prefill per question against one pass per option, and
against generating the letter.

    python bench/mc_scoring.py [--model work/mini/model] [--data work/mini/data] [--repeats 3]
    python bench/mc_scoring.py --tiny   # a random tiny LLaVA with LLaVA-1.5's 576 image tokens, the fixtures

Every multiple-choice question of the forget and retain splits (image and text), prompted as `pipeline
evaluate` does under each scoring, answered by the same model three ways: `generate` (eval.py's generated
letter, greedy, `--max-new-tokens`), `likelihood` (MLLMU-Bench Eq. 13 as the evaluate stage scores it: the
image and question prefilled once, each option scored from the KV cache) and `likelihood_per_option` (the
former way: question + option teacher-forced once per option). Reports seconds per question (the median
over repeats; the three take turns, so a slow spell of the shared machine falls on all), the tokens each
likelihood way runs through the model (padding left out), the largest difference of their option
log-likelihoods, and each scoring's accuracy. Writes bench/results/mc_scoring.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from pipeline.benchmarks.mllmu import load_eval_items, split_names  # noqa: E402
from pipeline.evaluation.answering import AnswerSettings, answer_questions, prompted_question  # noqa: E402
from pipeline.evaluation.few_shot import Exemplars  # noqa: E402
from pipeline.evaluation.protocols import PROTOCOLS  # noqa: E402
from pipeline.evaluation.questions import ImageCache, QuestionOptions, build_questions  # noqa: E402
from pipeline.journal import Journal  # noqa: E402
from pipeline.models import (  # noqa: E402
    PromptedSample,
    answer_token_ids,
    answer_token_log_probs,
    load_model,
    prompt_token_counts,
)

FIXTURE = ROOT / "tests" / "fixtures" / "mllmu_bench"


def questions_of(loaded, data: str, scoring: str, protocol, forget_split: str) -> list:
    images, questions = ImageCache(), []
    names = split_names(forget_split)
    for split in (names["forget"], names["retain"]):
        items = load_eval_items(data, split)
        items.cloze, items.generation = [], []
        options = QuestionOptions(protocol, loaded.family, mc_scoring=scoring)
        questions += build_questions(items, split, options, Exemplars(), images)
    return questions


def per_option_totals(loaded, questions: list, batch_size: int) -> list[list[float]]:
    """The former scoring: every option teacher-forced after its own copy of the image and question."""
    inputs = [
        PromptedSample(q.prompt, q.image, text, q.context_images)
        for q in questions
        for text in (q.item.options or {}).values()
    ]
    values = iter(answer_token_log_probs(loaded, loaded.model, inputs, batch_size))
    return [[float(next(values).sum()) for _ in q.item.options] for q in questions]


def token_counts(loaded, questions: list) -> dict[str, int]:
    """Tokens through the model: per option (prompt + option each) against one prefill + the options."""
    prompts = prompt_token_counts(loaded, [prompted_question(q) for q in questions])
    options = [[len(answer_token_ids(loaded, t)) for t in q.item.options.values()] for q in questions]
    return {
        "per_option": sum(len(row) * prompt + sum(row) for prompt, row in zip(prompts, options, strict=True)),
        "one_prefill": sum(prompt + sum(row) for prompt, row in zip(prompts, options, strict=True)),
    }


def timed(loaded, protocol, questions: list, settings: AnswerSettings, repeat: int) -> float:
    journal = Journal(
        Path(tempfile.gettempdir()) / f".bench-mc-{settings.mc_scoring}-{repeat}.jsonl", f"{time.time()}"
    )
    started = time.perf_counter()
    answer_questions(loaded, loaded.model, protocol, questions, journal, settings)
    journal.remove()
    return time.perf_counter() - started


def tiny_model(folder: Path) -> str:
    """A random tiny LLaVA whose prompts have LLaVA-1.5's shape: 336 px images in 14 px patches."""
    from builders import build_random_tiny_llava

    from pipeline.mini_world.config import TinyLlavaConfig

    config = TinyLlavaConfig(vocab_size=400, vision_image_size=336, patch_size=14, vision_hidden=32,
                             vision_layers=1, text_hidden=128, text_layers=2, max_positions=2048)  # fmt: skip
    return str(build_random_tiny_llava(folder / "model", config=config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="work/mini/model")
    parser.add_argument("--data", default="work/mini/data")
    parser.add_argument("--forget-split", default="forget_10")
    parser.add_argument(
        "--tiny", action="store_true", help="a random tiny LLaVA-shaped model and the fixtures"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "bench/results/mc_scoring.json"))
    arguments = parser.parse_args()
    torch.manual_seed(0)
    if arguments.tiny:
        arguments.model = tiny_model(Path(tempfile.mkdtemp()))
        arguments.data, arguments.forget_split = str(FIXTURE), "forget_5"
    loaded = load_model(arguments.model)
    protocol = PROTOCOLS["fixed"]()
    asked = {
        s: questions_of(loaded, arguments.data, s, protocol, arguments.forget_split)
        for s in ("generate", "likelihood")
    }
    seconds: dict[str, list[float]] = {"generate": [], "likelihood": [], "likelihood_per_option": []}
    for repeat in range(arguments.repeats):
        for scoring in ("generate", "likelihood"):
            settings = AnswerSettings(arguments.max_new_tokens, arguments.batch_size, scoring, progress=False)
            seconds[scoring].append(timed(loaded, protocol, asked[scoring], settings, repeat))
        started = time.perf_counter()
        old = per_option_totals(loaded, asked["likelihood"], arguments.batch_size)
        seconds["likelihood_per_option"].append(time.perf_counter() - started)
    new = [list(q.scores["option_log_probs"].values()) for q in asked["likelihood"]]
    count = len(asked["likelihood"])
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": "random tiny LLaVA, 576 image tokens (--tiny)" if arguments.tiny else arguments.model,
        "questions": count,
        "batch_size": arguments.batch_size,
        "max_new_tokens": arguments.max_new_tokens,
        "seconds_per_question": {name: statistics.median(v) / count for name, v in seconds.items()},
        "per_option_over_one_prefill": statistics.median(
            old / new
            for old, new in zip(seconds["likelihood_per_option"], seconds["likelihood"], strict=True)
        ),
        "tokens": token_counts(loaded, asked["likelihood"]),
        "max_abs_log_likelihood_difference": max(
            abs(a - b)
            for row_old, row_new in zip(old, new, strict=True)
            for a, b in zip(row_old, row_new, strict=True)
        ),
        "accuracy": {s: statistics.fmean(q.scores["correct"] for q in asked[s]) for s in asked},
    }
    result["tokens"]["ratio"] = result["tokens"]["per_option"] / result["tokens"]["one_prefill"]
    Path(arguments.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
