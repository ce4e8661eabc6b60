"""Cache fidelity: does training from the cached, truncated teacher change what training from the full
teacher gives? Writes bench/results/cache_fidelity.json.

    python bench/cache_fidelity.py [--scratch /work/scratch-fidelity] [--methods viker,vgid] [--seeds 0,1,2]

In a scratch folder outside the repository (its own params.yaml, a copy of the repository's unless one is
there), the pipeline's own commands (dvc.yaml's) build what is missing: the mini world and its full model
(`pipeline prepare-mini`), the caches the methods read (`pipeline precompute`, two shards each), then each
method and seed trained twice, from the cache (`pipeline train`, as DVC runs it) and with the teacher computed
online (`--teacher-source online`: the cache's teacher, its full distribution recomputed every step from the
same inputs, so only truncation and float16 storage differ), and each adapter evaluated (`pipeline evaluate`,
no relearning attack). A command whose output exists is not run again. Then it compares:

  step_one      the first step's loss gap (cache - online, the same student Q0 and batch) per seed, with the
                gap the cache's measured per-token KL error predicts for that batch (docs/performance.md,
                "Cache fidelity": weight x the batch mean of the per-sample sums of KL(R~||Q0) - KL(R||Q0))
  per_step      |loss_online - loss_cache| at every step, per seed, against the seed-to-seed standard
                deviation of the cached runs' loss at that step
  evaluation    every measure of metrics.json: mean and standard deviation over seeds of each source, the
                difference of the means, and whether it is inside the seed-to-seed spread (|difference| <=
                the pooled standard deviation; and <= 2 standard errors of the difference)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SOURCES = ("cache", "online")
COUNTS = {"members", "nonmembers"}  # sizes, not measures


def pipeline(scratch: Path, *arguments: str) -> None:
    """One `pipeline` command in the scratch folder, with this checkout's code."""
    # One thread each: on a machine shared with other jobs, two spinning threads per process cost most.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
    command = [sys.executable, "-m", "stages", *arguments]
    print(f"[{time.strftime('%H:%M:%S')}] pipeline {' '.join(arguments)}", flush=True)
    subprocess.run(command, cwd=scratch, env=env, check=True)


def adapter_dir(method: str, source: str, seed: int | str) -> str:
    return f"work/adapters-{source}/{method}-s{seed}"


def run_dir(method: str, source: str, seed: int | str) -> str:
    return f"results/runs-{source}/{method}-s{seed}"


def build(scratch: Path, params: dict, methods: list[str], seeds: list[int]) -> None:
    """What dvc.yaml's stages would make for these methods, each by its own command; existing outputs kept."""
    if not (scratch / params["prepare-mini"]["out"] / "model").is_dir():
        pipeline(scratch, "prepare-mini", "--metrics-out", "metrics/full_model.json")
    teachers = {params["methods"][m][slot] for m in methods for slot in ("forget_teacher", "retain_teacher")}
    for teacher in sorted(teachers - {"none"}):
        for shard in (0, 1):
            # A shard with its manifest is complete (train verifies every checksum before its first step).
            if (
                scratch / params["caches"]["cache_root"] / teacher / f"shard-0000{shard}-of-00002.json"
            ).is_file():
                continue
            pipeline(scratch, "precompute", "--teacher", teacher, "--shard-index", str(shard), "--num-shards", "2",
                     "--no-progress")  # fmt: skip
    seed_list = ",".join(map(str, seeds))
    for method in methods:
        for source in SOURCES:
            if not all(
                (scratch / adapter_dir(method, source, s) / "adapter_model.safetensors").is_file()
                for s in seeds
            ):
                pipeline(scratch, "train", "--method", method, "--seeds", seed_list, "--teacher-source", source,
                         "--out", adapter_dir(method, source, "{seed}"))  # fmt: skip
            if not all((scratch / run_dir(method, source, s) / "metrics.json").is_file() for s in seeds):
                pipeline(scratch, "evaluate", "--seeds", seed_list, "--adapter", adapter_dir(method, source, "{seed}"),
                         "--out", run_dir(method, source, "{seed}") + "/metrics.json", "--no-progress")  # fmt: skip


def train_log(path: Path) -> list[dict[str, float]]:
    with open(path) as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def flat(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of metrics.json as split/measure -> value."""
    leaves = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            leaves.update(flat(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool) and key not in COUNTS:
            leaves[name] = float(value)
    return leaves


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def loss_weights(params: dict, method: str) -> dict[str, float]:
    """The weight of each KL term in the method's loss (the loss's defaults under params.yaml's args)."""
    from pipeline.unlearning.losses import loss_arguments

    entry = params["methods"][method]
    defaults = {key.rstrip("_"): value for key, value in loss_arguments(entry["loss"]).items()}  # lambda_
    arguments = {**defaults, **(entry.get("args") or {})}
    if entry["loss"] == "viker":
        return {"forget": float(arguments["lambda"])}
    return {"forget": float(arguments["alpha"]), "retain": float(arguments["beta"])}


def step_one_prediction(scratch: Path, params: dict, method: str, seeds: list[int]) -> dict[str, object]:
    """The first step's loss gap (cache - online) the caches' per-token KL errors at Q0 predict, per seed:
    sum over the KL terms of weight x the batch mean of each sample's summed error (OnlineTeacher.cache_errors)."""
    from cache import iter_cache
    from pipeline.models import load_model
    from pipeline.training.online import OnlineTeacher
    from pipeline.training.processes import Processes
    from pipeline.training.streams import Cache, PairedRetain, sample_stream
    from stages.config import TrainConfig

    os.chdir(scratch)
    values = {**params["model"], **params["data"], **params["caches"], **params["train"]}
    values = {k: v for k, v in values.items() if k in TrainConfig.__dataclass_fields__}
    values["sample_kinds"] = tuple(
        str(values.get("sample_kinds", "qa")).split(",")
    )  # params.yaml's comma list
    config = TrainConfig(out="unused", **values)
    loaded = load_model(config.model, **config.loading())
    layout = config.training_layout()
    entry = params["methods"][method]
    roles = {"forget": (entry["forget_teacher"], config.forget_split)}
    if entry["retain_teacher"] != "none":
        roles["retain"] = (entry["retain_teacher"], config.split_names()["retain"])
    errors, opened, samples_of, per_token = {}, {}, {}, {}
    for role, (teacher, split) in roles.items():
        samples = {s.sample_id: s for s in layout.unlearning_samples(split, tuple(config.sample_kinds))}
        directory = str(Path(config.cache_root) / teacher)
        opened[role], samples_of[role] = Cache.open(directory, loaded, samples, role), list(samples.values())
        items = [(samples[row.sample_id], row) for row in iter_cache(directory)]
        online = OnlineTeacher(loaded, opened[role], config.data)
        per_sample = [
            (sample.sample_id, error)
            for (sample, _), error in zip(items, online.cache_errors(items), strict=True)
        ]
        errors[role] = {sample_id: float(error.sum()) for sample_id, error in per_sample}
        tokens = [float(value) for _, error in per_sample for value in error]
        per_token[role] = {"mean_abs": statistics.fmean(abs(v) for v in tokens), "max_abs": max(abs(v) for v in tokens),
                           "mean": statistics.fmean(tokens), "tokens": len(tokens)}  # fmt: skip
    weights = loss_weights(params, method)
    predicted = {}
    for seed in seeds:
        stream = sample_stream(samples_of["forget"], opened["forget"], seed, "forget", 0, Processes())
        batch = [next(stream)[0] for _ in range(config.batch_size)]
        gap = weights["forget"] * statistics.fmean(errors["forget"][s.sample_id] for s in batch)
        if "retain" in roles:
            paired = PairedRetain(samples_of["retain"], opened["retain"], seed).take(
                list(range(config.batch_size))
            )
            gap += weights["retain"] * statistics.fmean(errors["retain"][s.sample_id] for s, _ in paired)
        predicted[seed] = gap
    return {"predicted_gap": predicted, "per_token_kl_error": per_token, "weights": weights}


def compare(scratch: Path, params: dict, method: str, seeds: list[int]) -> dict[str, object]:
    logs = {(source, seed): train_log(scratch / adapter_dir(method, source, seed) / "train_log.csv")
            for source in SOURCES for seed in seeds}  # fmt: skip
    steps = len(logs["cache", seeds[0]])
    prediction = step_one_prediction(scratch, params, method, seeds)
    step_one = {
        seed: {
            "cache": logs["cache", seed][0]["loss"],
            "online": logs["online", seed][0]["loss"],
            "gap": logs["cache", seed][0]["loss"] - logs["online", seed][0]["loss"],
            "predicted_gap": prediction["predicted_gap"][seed],
        }
        for seed in seeds
    }
    differences, spreads, within = [], [], 0
    for step in range(steps):
        spread = sd([logs["cache", seed][step]["loss"] for seed in seeds])
        for seed in seeds:
            difference = abs(logs["online", seed][step]["loss"] - logs["cache", seed][step]["loss"])
            differences.append(difference)
            within += difference <= spread
        spreads.append(spread)
    per_step = {
        "steps": steps,
        "mean_abs_difference": statistics.fmean(differences),
        "max_abs_difference": max(differences),
        "median_seed_sd": statistics.median(spreads),
        "share_within_seed_sd": within / len(differences),
        "mean_loss_cache": statistics.fmean(row["loss"] for seed in seeds for row in logs["cache", seed]),
    }
    return {"step_one": step_one, "per_step": per_step, **{k: prediction[k] for k in ("per_token_kl_error", "weights")},
            "evaluation": evaluation(scratch, method, seeds)}  # fmt: skip


def evaluation(scratch: Path, method: str, seeds: list[int]) -> dict[str, object]:
    runs = {source: [flat(json.loads((scratch / run_dir(method, source, s) / "metrics.json").read_text())) for s in seeds]
            for source in SOURCES}  # fmt: skip
    measures = {}
    for name in sorted(set(runs["cache"][0]) & set(runs["online"][0])):
        cache, online = [r[name] for r in runs["cache"]], [r[name] for r in runs["online"]]
        difference = statistics.fmean(online) - statistics.fmean(cache)
        pooled = ((sd(cache) ** 2 + sd(online) ** 2) / 2) ** 0.5
        standard_error = ((sd(cache) ** 2 + sd(online) ** 2) / len(seeds)) ** 0.5
        measures[name] = {
            "cache": [statistics.fmean(cache), sd(cache)],
            "online": [statistics.fmean(online), sd(online)],
            "difference": difference,
            "within_pooled_sd": abs(difference) <= pooled,
            "within_2se": abs(difference) <= 2 * standard_error,
        }
    return {
        "measures": measures,
        "count": len(measures),
        "within_pooled_sd": sum(m["within_pooled_sd"] for m in measures.values()),
        "within_2se": sum(m["within_2se"] for m in measures.values()),
        "identical": sum(m["difference"] == 0 and m["cache"][1] == m["online"][1] for m in measures.values()),
    }


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scratch", default="/work/scratch-fidelity", help="Work folder outside the repository."
    )
    parser.add_argument("--methods", default="viker,vgid")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cache_fidelity.json"))
    args = parser.parse_args()
    scratch = Path(args.scratch).resolve()
    if scratch == ROOT or ROOT in scratch.parents:
        parser.error(f"--scratch {scratch} is inside the repository: give a folder outside it")
    scratch.mkdir(parents=True, exist_ok=True)
    if not (scratch / "params.yaml").is_file():
        shutil.copy(ROOT / "params.yaml", scratch / "params.yaml")
    none_file = scratch / "work" / "cache" / "none"
    if not none_file.exists():
        none_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "work" / "cache" / "none", none_file)
    params = yaml.safe_load((scratch / "params.yaml").read_text())
    methods, seeds = args.methods.split(","), [int(seed) for seed in args.seeds.split(",")]
    started = time.perf_counter()
    build(scratch, params, methods, seeds)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus (shared)",
        "commit": commit(),
        "experiment": params["experiment"]["name"],
        "train": params["train"],
        "precompute": {key: params["precompute"][key] for key in ("top_p", "tail_cost", "max_support")},
        "seeds": seeds,
        "build_s": round(time.perf_counter() - started, 1),
        "methods": {method: compare(scratch, params, method, seeds) for method in methods},
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(
        json.dumps(
            {m: {k: v for k, v in r.items() if k != "evaluation"} for m, r in results["methods"].items()},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
