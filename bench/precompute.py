"""Benchmark of stage one (`pipeline precompute`) on the mini world; writes bench/results/precompute.json.

    python bench/precompute.py [--model work/mini/model] [--data work/mini/data]

Measured at the defaults (ViKeR, k=5, the truncation rule of params.yaml, people pool) on the mini model's real outputs:
  bytes_per_token      parquet bytes on disk / answer tokens                        (goal <= 48)
  kl_error             mean |KL_cached(R||Q) - KL(R||Q)| per token, Q = the model on the
                       unmodified input, R recomputed exactly                         (goal < 1e-3 nats)
  extraction_overhead  (stage loop: forward + mean softmax + truncation + copy + parquet writing)
                       / (bare forward passes of the same batches, same answer-only output layer) - 1
                                                                                      (goal <= 0.15)
  two_shard_speedup    wall time of one process computing both shards / wall time of two shard
                       processes in parallel, each pinned to its own core, process start included,
                       on a 200-person world from the same generator (the 60-person world's split is
                       a few CPU-seconds of work next to ~8 s of imports per process)  (goal >= 1.7)
plus the column-layout comparison behind cache/schema.py's choice ("layouts"). Takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cache import RowLayout, ShardWriter, read_manifest  # noqa: E402
from pipeline.mini_world.config import WorldConfig  # noqa: E402
from pipeline.mini_world.world import write_world  # noqa: E402
from pipeline.models import answer_logits, encode_answers, load_model  # noqa: E402
from pipeline.unlearning.extractor import TeacherExtractor  # noqa: E402
from pipeline.unlearning.teachers import resolve_teacher  # noqa: E402
from stages.config import PrecomputeConfig  # noqa: E402
from stages.precompute import (  # noqa: E402
    checked,
    load_samples,
    measure_cache_kl,
    run,
    teacher_context,
)


def layout_name(layout: RowLayout) -> str:
    ids = "delta ids" if layout.delta_ids else "absolute ids"
    probs = layout.prob_dtype
    if layout.prob_dtype == "float16" and layout.prob_absolute_step:
        probs += f" to 2^{round(math.log2(layout.prob_absolute_step))}"
    return (
        f"{probs} probs, {layout.entropy_dtype} entropy, {ids}, floats {layout.float_encoding}, "
        f"ints {layout.int_encoding}"
    )


# Every combination of the choices cache/schema.py documents (one row per sample): float16 probabilities
# rounded to an absolute step of 2^-14 or plainly, float32; float16 or float32 entropy; encodings.
ROW_LAYOUTS = [
    RowLayout(
        prob_dtype=dtype,
        prob_absolute_step=step,
        entropy_dtype=entropy,
        delta_ids=delta,
        float_encoding=floats,
        int_encoding=ints,
    )
    for dtype, step in (("float16", 2.0**-14), ("float16", None), ("float32", None))
    for entropy in ("float16", "float32")
    for delta in (True, False)
    for floats in ("BYTE_STREAM_SPLIT", "PLAIN")
    for ints in ("PLAIN", "DELTA_BINARY_PACKED")
]


def cache_size(directory: Path) -> tuple[int, int]:
    manifest = read_manifest(directory)
    size = sum((directory / shard.parquet_file).stat().st_size for shard in manifest.shards)
    return size, manifest.num_tokens


def fresh_rows(config: PrecomputeConfig) -> tuple[list, dict]:
    """The split's rows straight from the extractor, float32 (rows read back from a cache are fp16-rounded)."""
    entry = resolve_teacher(config.teacher, {}, config.args)
    config, teacher = checked(config, entry)
    loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    samples = load_samples(config)
    context = teacher_context(config, entry, loaded)
    extractor = TeacherExtractor(loaded, config.top_p, config.max_support)
    rows, records = [], {}
    for start in range(0, len(samples), config.batch_size):
        chunk = samples[start : start + config.batch_size]
        inputs = [teacher(sample, context) for sample in chunk]
        rows.extend(extractor(chunk, inputs))
        records.update(
            {s.sample_id: {**i.record(), "answer": s.answer} for s, i in zip(chunk, inputs, strict=True)}
        )
    return rows, records


def compare_layouts(config: PrecomputeConfig, header: dict, work: Path) -> dict[str, float]:
    """Write the same float32 rows with each layout (and as one row per token); bytes per answer token."""
    rows, records = fresh_rows(config)
    header = {key: value for key, value in header.items() if key not in ("layout", "num_shards")}
    results = {}
    for layout in ROW_LAYOUTS:
        name = layout_name(layout) + (" (chosen)" if layout == RowLayout() else "")
        directory = work / f"layout-{len(results)}"
        with ShardWriter(directory, 0, 1, header, layout=layout) as writer:
            for row in rows:
                writer.write(row, records[row.sample_id])
        size, tokens = cache_size(directory)
        results[name] = round(size / tokens, 2)
        shutil.rmtree(directory)
    results["one row per token (list columns per token, fp16, BYTE_STREAM_SPLIT)"] = round(
        per_token_rows_size(rows, work / "per-token.parquet"), 2
    )
    return results


def per_token_rows_size(rows, path: Path) -> float:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    sample_id, position, token, ids, probs, tail, entropy, log_prob = [], [], [], [], [], [], [], []
    for row in rows:
        for t in range(row.num_tokens):
            valid = row.support_ids[t] >= 0
            support = row.support_ids[t][valid].numpy()
            sample_id.append(row.sample_id)
            position.append(t)
            token.append(int(row.answer_token_ids[t]))
            ids.append(np.diff(support, prepend=0).astype(np.int32))
            probs.append(row.support_probs[t][valid].numpy().astype(np.float16))
            tail.append(float(row.tail_mass[t]))
            entropy.append(float(row.entropy[t]))
            log_prob.append(float(row.target_log_prob[t]))
    table = pa.table(
        {
            "sample_id": pa.array(sample_id),
            "position": pa.array(position, pa.int16()),
            "token_id": pa.array(token, pa.int32()),
            "support_ids": pa.array(ids, pa.list_(pa.int32())),
            "support_probs": pa.array(probs, pa.list_(pa.float16())),
            "tail_mass": pa.array(tail, pa.float32()),
            "entropy": pa.array(entropy, pa.float32()),
            "target_log_prob": pa.array(log_prob, pa.float32()),
        }
    )
    floats = ["support_probs.list.element", "tail_mass", "entropy", "target_log_prob"]
    pq.write_table(
        table,
        path,
        compression="zstd",
        compression_level=9,
        use_dictionary=["sample_id"],
        column_encoding={name: "BYTE_STREAM_SPLIT" for name in floats}
        | {"support_ids.list.element": "DELTA_BINARY_PACKED", "token_id": "DELTA_BINARY_PACKED"},
        write_statistics=False,
    )
    return path.stat().st_size / len(token)


def measure_overhead(config: PrecomputeConfig, work: Path, repeats: int = 5) -> dict[str, float]:
    """Stage loop vs bare forward passes over the same batches (inputs built once, outside the clock).

    One torch thread, and CPU time as well as wall time: on a machine shared with other jobs the
    process's CPU time is what the work itself costs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    entry = resolve_teacher(config.teacher, {}, config.args)
    config, teacher = checked(config, entry)
    loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    samples = load_samples(config)
    context = teacher_context(config, entry, loaded)
    chunks = [
        samples[start : start + config.batch_size] for start in range(0, len(samples), config.batch_size)
    ]
    inputs = [[teacher(sample, context) for sample in chunk] for chunk in chunks]
    header = {
        "teacher": config.teacher,
        "vocab_size": int(loaded.model.get_output_embeddings().weight.shape[0]),
    }

    def bare() -> None:
        with torch.inference_mode():
            for chunk_inputs in inputs:
                variants = [variant for teacher_input in chunk_inputs for variant in teacher_input.variants]
                answer_logits(loaded.model, encode_answers(loaded, variants).to(loaded.device))

    def stage(feature_cache: bool) -> None:
        extractor = TeacherExtractor(loaded, config.top_p, config.max_support)
        extractor.vision_features.enabled = feature_cache
        directory = work / "overhead"
        shutil.rmtree(directory, ignore_errors=True)
        with ShardWriter(directory, 0, 1, header) as writer:
            for chunk, chunk_inputs in zip(chunks, inputs, strict=True):
                rows = extractor(chunk, chunk_inputs)
                for sample, teacher_input, row in zip(chunk, chunk_inputs, rows, strict=True):
                    writer.write(row, {**teacher_input.record(), "answer": sample.answer})

    variants = {
        "bare": bare,
        "stage": lambda: stage(True),
        "stage_without_feature_cache": lambda: stage(False),
    }
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    bare()  # warm-up
    stage(True)
    for _ in range(repeats):
        for name, function in variants.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            function()
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    torch.set_num_threads(threads)
    best_wall = {name: min(values) for name, values in wall.items()}
    best_cpu = {name: min(values) for name, values in cpu.items()}
    return {
        "extraction_overhead": best_cpu["stage"] / best_cpu["bare"] - 1,
        "extraction_overhead_without_feature_cache": best_cpu["stage_without_feature_cache"]
        / best_cpu["bare"]
        - 1,
        "extraction_overhead_wall": best_wall["stage"] / best_wall["bare"] - 1,
        "cpu_s": best_cpu,
        "wall_s": best_wall,
        "batches": len(chunks),
        "samples": len(samples),
        "load_average": os.getloadavg()[0],
    }


def precompute_command(config: PrecomputeConfig, out: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stages",
        "precompute",
        "--model",
        config.model,
        "--data",
        config.data,
        "--split",
        config.split,
        "--kinds",
        ",".join(config.kinds),
        "--out",
        str(out),
        "--batch-size",
        str(config.batch_size),
        "--threads",
        "1",
        "--no-progress",
        *(["--limit", str(config.limit)] if config.limit else []),
        *extra,
    ]


def launch(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


def finish(process: subprocess.Popen, log: Path) -> float:
    """Wait for the process; its CPU seconds (user + system). Raises with its log if it failed."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(process.args)} failed:\n{log.read_text()[-3000:]}")
    return usage.ru_utime + usage.ru_stime


def measure_two_shards(config: PrecomputeConfig, work: Path) -> dict[str, object]:
    """One process computing both shards on one core vs two shard processes, one per core.

    The wall-clock ratio is the goal's measure. On a machine shared with other jobs it also measures
    their load, so the processes' CPU seconds are reported too: cpu_speedup = CPU of the single process
    / CPU of the slower shard process, the ratio two otherwise idle cores would give.
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"two_shard_speedup": float("nan"), "note": "fewer than two cores available"}

    def pinned(core: int, command: list[str]) -> list[str]:
        return ["taskset", "-c", str(core), *command] if shutil.which("taskset") else command

    def stage_seconds(log: Path, which: str = "wall") -> float:
        pattern = r"tokens in ([0-9.]+) s" if which == "wall" else r"\(cpu ([0-9.]+) s\)"
        return sum(float(value) for value in re.findall(pattern, log.read_text()))

    one_dir, two_dir = work / "one-process", work / "two-processes"
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    one_log = work / "one.log"
    one_cpu = finish(
        launch(pinned(cores[0], precompute_command(config, one_dir, ["--num-shards", "2"])), env, one_log),
        one_log,
    )
    one_wall = time.perf_counter() - started

    started = time.perf_counter()
    logs = [work / f"two-{index}.log" for index in range(2)]
    processes = [
        launch(
            pinned(
                core, precompute_command(config, two_dir, ["--num-shards", "2", "--shard-index", str(index)])
            ),
            env,
            logs[index],
        )
        for index, core in enumerate(cores[:2])
    ]
    two_cpu = [finish(process, log) for process, log in zip(processes, logs, strict=True)]
    two_wall = time.perf_counter() - started
    same = [
        json.loads((one_dir / f"shard-0000{i}-of-00002.json").read_text())["sha256"] for i in range(2)
    ] == [json.loads((two_dir / f"shard-0000{i}-of-00002.json").read_text())["sha256"] for i in range(2)]
    return {
        "two_shard_speedup": one_wall / two_wall,
        "one_process_wall_s": one_wall,
        "two_processes_wall_s": two_wall,
        "cpu_speedup": one_cpu / max(two_cpu),
        "one_process_cpu_s": one_cpu,
        "shard_processes_cpu_s": two_cpu,
        "stage_only_wall_speedup": stage_seconds(one_log) / max(stage_seconds(log) for log in logs),
        "stage_only_cpu_speedup": stage_seconds(one_log, "cpu")
        / max(stage_seconds(log, "cpu") for log in logs),
        "startup_cpu_s_per_process": one_cpu - stage_seconds(one_log, "cpu"),
        "shards_byte_identical": same,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "samples": read_manifest(one_dir).num_samples,
        "note": "process start (imports, model load) included in every figure",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "work/mini/model"))
    parser.add_argument("--data", default=str(ROOT / "work/mini/data"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/precompute.json"))
    parser.add_argument("--split", default="forget_10")
    parser.add_argument(
        "--speedup-people",
        type=int,
        default=200,
        help="The two-shard timing runs on a larger world from the mini world's generator (same model), so "
        "that the ~8 CPU-seconds each process spends importing transformers and loading the model do not "
        "dominate; 0: use --data itself.",
    )
    parser.add_argument("--speedup-split", default="full")
    parser.add_argument("--speedup-kinds", default="qa,generation,mc,cloze")
    parser.add_argument("--speedup-limit", type=int, default=0, help="0: the whole split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--skip-timing",
        action="store_true",
        help="Measure sizes and KL errors only; keep the timing figures of the existing results file.",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    results: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__,
    }
    try:
        defaults = PrecomputeConfig(
            model=args.model, data=args.data, out=str(work / "viker"), split=args.split
        )
        results["config"] = {
            key: value for key, value in asdict(defaults).items() if key not in ("teacher_config", "out")
        }
        started = time.perf_counter()
        run(defaults)
        results["precompute_s"] = time.perf_counter() - started
        summary = measure_cache_kl(work / "viker", args.model, args.data, device=args.device)
        results["bytes_per_token"] = summary["bytes_per_token"]
        results["cache"] = {
            key: summary[key] for key in ("samples", "tokens", "mean_support_size", "mean_tail_mass")
        }
        for key in ("kl_error", "kl_error_max", "kl_exact_mean"):
            results[key] = summary[key]

        results["layouts"] = compare_layouts(defaults, read_manifest(work / "viker").header, work)

        def figures(measured: dict) -> dict[str, float]:
            return {key: measured[key] for key in ("bytes_per_token", "mean_support_size", "kl_error")}

        def measure_variant(**changes) -> dict[str, float]:
            """Size and KL error of the split's cache with these PrecomputeConfig changes."""
            name = "-".join(f"{key}-{value}" for key, value in changes.items())
            config = replace(defaults, out=str(work / name), **changes)
            run(config)
            return figures(measure_cache_kl(config.out, args.model, args.data, device=args.device))

        results["other_teachers"] = {
            teacher: measure_variant(teacher=teacher) for teacher in ("vgid", "original", "base")
        }
        # The truncation rule against top-p alone (the rule before the student-aware part), per teacher:
        # the default must hold both goals for every teacher (docs/performance.md).
        top_p_alone = {"tail_cost": 0.0, "max_support": 256}
        results["rule_comparison"] = {
            teacher: {
                "default": figures(summary) if teacher == "viker" else results["other_teachers"][teacher],
                **{
                    f"top-p {top_p} alone": measure_variant(teacher=teacher, top_p=top_p, **top_p_alone)
                    for top_p in (0.99, 0.995)
                },
                **{  # the rule's size/error frontier (visual teachers; unmodified ones get no extra entries)
                    f"tail_cost {tail_cost:g}": measure_variant(teacher=teacher, tail_cost=tail_cost)
                    for tail_cost in ((2e-5, 6e-5, 8e-5) if teacher in ("viker", "vgid") else ())
                },
            }
            for teacher in ("viker", "vgid", "original", "base")
        }
        if args.skip_timing:
            previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
            timing = ("extraction_overhead", "overhead_details", "two_shard_speedup", "two_shard_details")
            results.update({key: previous[key] for key in timing if key in previous})
            results["timing_from"] = previous.get("timing_from", previous.get("date", "an earlier run"))
            results["date"] = time.strftime("%Y-%m-%d")
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
            return

        overhead = measure_overhead(defaults, work)
        results["extraction_overhead"] = overhead.pop("extraction_overhead")
        results["overhead_details"] = overhead

        speedup_data = args.data
        if args.speedup_people:
            world = write_world(work / "speedup-world", WorldConfig(seed=1, num_people=args.speedup_people))
            speedup_data = world.data_dir
        speedup_config = PrecomputeConfig(
            model=args.model,
            data=speedup_data,
            out="unused",
            split=args.speedup_split,
            kinds=tuple(args.speedup_kinds.split(",")),
            limit=args.speedup_limit or None,
        )
        two = measure_two_shards(speedup_config, work)
        results["two_shard_speedup"] = two.pop("two_shard_speedup")
        results["two_shard_details"] = {
            "data": "generated world" if args.speedup_people else args.data,
            **two,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
