"""Benchmark: the cost of scoring multiple choice by likelihood against generating the letter.

    python bench/mc_scoring.py [--model work/mini/model] [--data work/mini/data] [--repeats 3]

Every multiple-choice question of the forget and retain splits (image and text), prompted as
`pipeline evaluate` does under each scoring, answered by the same model: `generate` runs eval.py's
generated letter (greedy, `--max-new-tokens` as params.yaml's evaluate section, batched as there),
`likelihood` teacher-forces the four options after the question (MLLMU-Bench Eq. 13, one batched forward
over question x option). Reports seconds per question of each, their ratio (the median over repeats; the
two take turns, so a slow spell of the shared machine falls on both), and each scoring's accuracy.
Writes bench/results/mc_scoring.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.benchmarks.mllmu import load_eval_items  # noqa: E402
from pipeline.evaluation.answering import AnswerSettings, answer_questions  # noqa: E402
from pipeline.evaluation.few_shot import Exemplars  # noqa: E402
from pipeline.evaluation.protocols import PROTOCOLS  # noqa: E402
from pipeline.evaluation.questions import ImageCache, QuestionOptions, build_questions  # noqa: E402
from pipeline.journal import Journal  # noqa: E402
from pipeline.models import load_model  # noqa: E402


def questions_of(loaded, data: str, scoring: str, protocol) -> list:
    images, questions = ImageCache(), []
    for split in ("forget_10", "retain_90"):
        items = load_eval_items(data, split)
        items.cloze, items.generation = [], []
        options = QuestionOptions(protocol, loaded.family, mc_scoring=scoring)
        questions += build_questions(items, split, options, Exemplars(), images)
    return questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="work/mini/model")
    parser.add_argument("--data", default="work/mini/data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "bench/results/mc_scoring.json"))
    arguments = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(arguments.model)
    protocol = PROTOCOLS["fixed"]()
    seconds: dict[str, list[float]] = {"generate": [], "likelihood": []}
    accuracy: dict[str, float] = {}
    count = 0
    for repeat in range(arguments.repeats):
        for scoring in seconds:
            settings = AnswerSettings(arguments.max_new_tokens, arguments.batch_size, scoring, progress=False)
            questions = questions_of(loaded, arguments.data, scoring, protocol)
            journal = Journal(Path("/tmp") / f".bench-mc-{scoring}-{repeat}.jsonl", f"{time.time()}")
            started = time.perf_counter()
            answer_questions(loaded, loaded.model, protocol, questions, journal, settings)
            seconds[scoring].append((time.perf_counter() - started) / len(questions))
            journal.remove()
            accuracy[scoring] = statistics.fmean(q.scores["correct"] for q in questions)
            count = len(questions)
    pairs = zip(seconds["generate"], seconds["likelihood"], strict=True)
    ratios = [generated / scored for generated, scored in pairs]
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": arguments.model,
        "questions": count,
        "max_new_tokens": arguments.max_new_tokens,
        "seconds_per_question": {scoring: statistics.median(values) for scoring, values in seconds.items()},
        "generate_over_likelihood": statistics.median(ratios),
        "accuracy": accuracy,
    }
    Path(arguments.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
