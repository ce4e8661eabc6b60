"""The plan of bench/real_scale: which sections run, in which order, on which model (see __init__)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.real_scale import models, sections
from bench.real_scale import pipeline_calls as calls
from bench.real_scale.results import Results, device_name
from bench.real_scale.sections import QWEN, VGID, VIKER, Bench

ROOT = Path(__file__).resolve().parents[2]


def llava_sections(bench: Bench, results: Results) -> None:
    """Precompute (ViKeR k 5, Vgid, at each batch size), every method's loss step of the ViKeR and Vgid
    experiments, generation, the official cloze batch, likelihood multiple choice, an overlong prompt."""
    device = bench.device
    for batch in bench.precompute_batches:
        for experiment, entry in ((VIKER, "viker"), (VGID, "vgid")):
            results.section(f"precompute/{entry}/b{batch}", lambda e=experiment, n=entry, b=batch:
                            sections.precompute(bench, e, n, b), device)  # fmt: skip
    # the other caches the methods read: ViKeR's ablation reads `original`, Vgid's retain side `base`
    results.section(
        "precompute/original/b4", lambda: sections.precompute(bench, VIKER, "original", 4), device
    )
    results.section(
        "precompute/base/b4", lambda: sections.precompute(bench, VGID, "base", 4, limit=16), device
    )
    for experiment in (VIKER, VGID):
        for method in calls.experiment(experiment)["methods"]:
            results.section(f"train/{experiment}/{method}", lambda e=experiment, m=method:
                            sections.train_method(bench, e, m), device)  # fmt: skip
    for batch in bench.generation_batches:
        for merged in (False, True):
            name = f"generation/b{batch}/{'merged' if merged else 'unmerged'}"
            results.section(name, lambda b=batch, m=merged: sections.generation(bench, b, m), device)
    results.section("official_cloze_exemplars", lambda: sections.official_cloze(bench), device)
    results.section("likelihood_mc", lambda: sections.likelihood_mc(bench), device)
    results.section("overlong_prompt", lambda: sections.overlong_prompt(bench), device)


def qwen_sections(bench: Bench, results: Results) -> None:
    results.section(
        "qwen/precompute/vgid/b4", lambda: sections.precompute(bench, QWEN, "vgid", 4), bench.device
    )
    results.section("qwen/generation_large_photo", lambda: sections.qwen_generation(bench), bench.device)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.real_scale", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="Shrunk models on the CPU (the CI run).")
    parser.add_argument("--dtype", default=None, help="bf16 (the experiments'); fp32 with --tiny.")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument(
        "--train-steps", type=int, default=None, help="Optimizer steps per method and mode [3; tiny 1]."
    )
    parser.add_argument(
        "--out", default=None, help="Results JSON [bench/results/real_scale.json; none with --tiny]."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    out = args.out or (None if args.tiny else str(ROOT / "bench/results/real_scale.json"))
    started = time.perf_counter()
    run = {"device": device_name(device), "torch": torch.__version__, "python": sys.version.split()[0],
           "dtype": dtype, "tiny": args.tiny, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    results = Results(Path(out) if out else None, run)
    results.section("all_reduce", lambda: calls.sum_over_ranks(args.device), device)
    with tempfile.TemporaryDirectory(prefix="bench-real-scale-") as work:
        work = Path(work)
        data, corpus = sections.writes_world(work / "world")
        sizes = dict(precompute_batches=(4,) if args.tiny else (4, 16),
                     generation_batches=(4,) if args.tiny else (16, 64),
                     people_per_split=2 if args.tiny else None, new_tokens=4 if args.tiny else None)  # fmt: skip
        llava = models.build_llava(corpus, args.tiny, dtype, args.device, args.attn_implementation)
        steps = args.train_steps or (1 if args.tiny else 3)
        bench = Bench(llava, device, data, work, args.tiny, steps, **sizes)
        results.data["run"]["llava_parameters"] = sum(p.numel() for p in llava.model.parameters())
        llava_sections(bench, results)
        models.release(llava)
        qwen = models.build_qwen(corpus, args.tiny, dtype, args.device, args.attn_implementation)
        qwen_sections(replace_model(bench, qwen), results)
        models.release(qwen)
    results.data["run"]["total_s"] = round(time.perf_counter() - started, 1)
    results.write()
    print(json.dumps(results.data, indent=2)[:4000])
    return results.data


def replace_model(bench: Bench, loaded) -> Bench:
    from dataclasses import replace

    return replace(bench, loaded=loaded, caches={}, asked={})
