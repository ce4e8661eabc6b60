"""docs/performance.md's expected time and peak memory per stage of every shipped experiment, computed
from the shapes with the functions `pipeline check` uses (stages.check, pipeline.models.memory_estimate).

    python bench/expected_performance.py          # rewrites the section between the markers
    python bench/expected_performance.py --check  # exit 1 if the file is out of date (tests/test_check.py)

The memory columns are the arithmetic's; the time columns rest on the throughput assumptions below,
stated in the generated text, until the GPU issue replaces them by measurements (python -m bench.real_scale).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.experiments import experiment_names, experiment_values, for_params  # noqa: E402
from pipeline.models import memory_estimate as memory  # noqa: E402
from pipeline.models.known_configs import known_config  # noqa: E402
from stages.check import evaluation_peak_gib, method_peaks, precompute_peak_gib, teacher_forwards  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- expected-performance:begin -->", "<!-- expected-performance:end -->"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16_flops: float  # dense peak
    bandwidth: float  # bytes/s


GPUS = (Gpu("A100 80 GB", 80, 312e12, 2.0e12), Gpu("A100 40 GB", 40, 312e12, 1.55e12))
UTILISATION = 0.4  # of the dense peak, in batched forward and backward passes
BANDWIDTH_USE = 0.7  # of the memory bandwidth, when a decode step reads every weight once
PROMPT_TEXT_TOKENS, ANSWER_TOKENS = 44, 30  # a training question + its answer (576 image tokens: 650)
QWEN_IMAGE_TOKENS = 1024  # an MLLMU-Bench photo at Qwen2-VL's resolution (a 900 x 900 px image)
QA_PER_PERSON = 10  # training QA pairs a person (assumed; `pipeline check` counts the real ones)
PEOPLE = 500  # MLLMU-Bench's fictitious profiles; CLEAR has 200
EVAL_QUESTIONS = {"mllmu": 21_500, "clear": 5_000}  # per evaluated checkpoint (issue 29; CLEAR assumed)
EVAL_PROMPT_TOKENS = 650  # an official zero-shot prompt with its image (623 measured in issue 29)
SEEDS = 3


def model_repo(values: dict) -> str:
    """The hub id of the experiment's model, from its sources (a finetune stage's output: its origin's)."""
    model = values["model"]["model"]
    origins = {
        f"work/finetuned/{name}": entry["origin"] for name, entry in (values.get("finetunes") or {}).items()
    }
    return values["experiment"]["sources"][origins.get(model, model)]["repo"]


def forget_people(values: dict) -> int:
    split = values["data"]["forget_split"]
    percent = int("".join(ch for ch in split if ch.isdigit()))
    return (200 if values["data"].get("data_format") == "clear" else PEOPLE) * percent // 100


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def compute_seconds(tokens: float, flops_per_token: float, gpu: Gpu) -> float:
    return tokens * flops_per_token / (gpu.bf16_flops * UTILISATION)


def rows(name: str, root: Path = ROOT) -> list[str]:
    """The table of one experiment: one row per stage run, its peak and its time on each GPU."""
    values = for_params(experiment_values(root, name))
    shapes = memory.shapes_from_config(model_repo(values), known_config(model_repo(values)))
    image = shapes.image_tokens or QWEN_IMAGE_TOKENS
    sequence = image + PROMPT_TEXT_TOKENS + ANSWER_TOKENS
    n = shapes.parameters
    samples = forget_people(values) * QA_PER_PERSON
    train, evaluate = values["train"], values["evaluate"]
    table = []

    totals = dict.fromkeys(GPUS, 0.0)

    def row(stage: str, peak: float, peak_ckpt: float | None, per_gpu, runs: int = 1) -> None:
        cells = []
        for gpu in GPUS:
            seconds, note = per_gpu(gpu, peak <= gpu.memory_gib)
            fits = peak <= gpu.memory_gib or (peak_ckpt is not None and peak_ckpt <= gpu.memory_gib)
            cells.append(f"{hours(seconds)}{note}" if fits else "does not fit")
            totals[gpu] += seconds * runs if fits else math.inf
        ckpt = f"{peak_ckpt:.1f}" if peak_ckpt is not None else "–"
        table.append(f"| {stage} | {peak:.1f} | {ckpt} | {' | '.join(cells)} |")

    for entry_name, entry in values["teachers"].items():
        forwards = teacher_forwards(entry)
        batch = values["precompute"]["batch_size"]
        peak = precompute_peak_gib(shapes, batch, forwards, sequence, ANSWER_TOKENS)
        tokens = samples * forwards * sequence
        row(f"precompute {entry_name} (×{forwards}, batch {batch})", peak, None,
            lambda gpu, _, t=tokens: (compute_seconds(t, 2 * n, gpu), ""))  # fmt: skip
    peaks = method_peaks(
        shapes, values["methods"], train["batch_size"], train["lora_rank"], sequence, ANSWER_TOKENS
    )
    for method, figures in peaks.items():
        steps = math.ceil(samples / train["batch_size"]) * train["epochs"]
        with_grad = figures["sequences"] * sequence * steps  # an upper bound: frozen passes counted as such

        def per_gpu(gpu, fits_plain, tokens=with_grad):
            if fits_plain:
                return compute_seconds(tokens, 4 * n, gpu), ""
            return compute_seconds(tokens, 6 * n, gpu), " (checkpointing)"

        frozen = figures["frozen_sequences"]
        label = f"{figures['sequences'] - frozen}" + (f" + {frozen} frozen" if frozen else "")
        row(f"train {method} ({label})", figures["peak_gib"],
            figures["peak_gib_checkpointing"], per_gpu, runs=SEEDS)  # fmt: skip
    questions = EVAL_QUESTIONS[values["data"].get("data_format", "mllmu")]
    batch, new = evaluate["batch_size"], evaluate["max_new_tokens"]
    peak = evaluation_peak_gib(shapes, batch, EVAL_PROMPT_TOKENS, new)

    def evaluation(gpu, _):
        prefill = compute_seconds(questions * EVAL_PROMPT_TOKENS, 2 * n, gpu)
        decode = (
            math.ceil(questions / batch)
            * new
            * memory.weights_bytes(shapes)
            / (gpu.bandwidth * BANDWIDTH_USE)
        )
        return prefill + decode, ""

    checkpoints = len(values["methods"]) * SEEDS + 1
    row(
        f"evaluate one checkpoint (batch {batch}, {questions} questions)", peak, None, evaluation, checkpoints
    )
    whole = " / ".join(
        hours(seconds) if math.isfinite(seconds) else "does not fit" for seconds in totals.values()
    )
    table.append(
        f"| **the experiment** (every method × {SEEDS} seeds, relearning aside) | | | {whole.replace(' / ', ' | ')} |"
    )
    header = [
        f"**{name}** ({shapes.name}, {shapes.parameters / 1e9:.2f}B; {samples} forget samples assumed, "
        f"{sequence} tokens a sequence; {checkpoints} checkpoints evaluated: "
        f"{len(values['methods'])} methods × {SEEDS} seeds + the full model)",
        "",
        "| stage (sequences a step with gradients + without) | peak GiB | with checkpointing | 80 GB: time | 40 GB: time |",
        "|---|---|---|---|---|",
    ]
    return [*header, *table, ""]


def section(root: Path = ROOT) -> str:
    """The generated text between the markers."""
    lines = [
        BEGIN,
        "<!-- generated by `python bench/expected_performance.py`; edit that script, not this text -->",
        "",
    ]
    for name in experiment_names(root):
        if name != "mini":
            lines += rows(name, root)
    lines.append(END)
    return "\n".join(lines)


def updated(text: str, generated: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: the markers {BEGIN} ... {END} are missing")
    head, rest = text.split(BEGIN, 1)
    return head + generated + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="Exit 1 if docs/performance.md is out of date.")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    new = updated(text, section())
    if args.check:
        if new != text:
            print(f"{DOC} is out of date: run python bench/expected_performance.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
