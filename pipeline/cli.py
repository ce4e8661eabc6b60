"""The `pipeline` command line. Each command is a thin wrapper that calls one stage's `run`.

Defaults come from params.yaml (see pipeline.config); heavy imports happen inside commands so that
`pipeline --help` is instant.
"""

from __future__ import annotations

import json
import os

import click

from pipeline.config import click_default_map, load_params

# The embedded default never talks to a hub; a user pointing --model at a hub id unsets this.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel.

    Every batch allocates and frees the same large activation buffers; by default glibc hands each one
    back (munmap / trim) and the next batch page-faults it in again. On the 2-core CPU that was 20% of a
    precompute shard's time in the kernel (2.5 M page faults; with this: 0.1 M, stage 9% faster, measured
    on bench/precompute.py's 200-person world). Resident memory stays at its peak, which it reaches in
    the first batch anyway. No effect (False) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD in malloc.h
    # 32 MiB is glibc's largest mmap threshold on 64-bit: only larger blocks still go to mmap.
    return bool(libc.mallopt(trim_threshold, 1 << 30)) and bool(libc.mallopt(mmap_threshold, 32 << 20))


class ParamsGroup(click.Group):
    """A click group whose option defaults are read from params.yaml (or --params FILE)."""

    def make_context(self, info_name, args, parent=None, **extra):
        params_path = os.environ.get("PIPELINE_PARAMS", "params.yaml")
        if "--params" in args:
            index = args.index("--params")
            params_path = args[index + 1]
        extra.setdefault("default_map", click_default_map(load_params(params_path)))
        return super().make_context(info_name, args, parent=parent, **extra)


@click.group(cls=ParamsGroup)
@click.option(
    "--params",
    "params_file",
    default="params.yaml",
    show_default=True,
    help="YAML file with one section of option defaults per command.",
)
def main(params_file: str) -> None:
    """Unlearning for multimodal LLMs: prepare-mini, precompute, train, evaluate, report."""
    keep_freed_memory()


def _seed_list(seeds: str | None) -> list[str]:
    """'0,1,2' -> ['0', '1', '2']; None -> [''] (one run, nothing to substitute)."""
    if not seeds:
        return [""]
    return [seed.strip() for seed in str(seeds).split(",") if seed.strip()]


# Commands are added below, one block per stage. Keep each block self-contained.


def model_loading_options(command):
    """--attn-implementation and --trust-remote-code for a command that loads a model.

    They reach pipeline.models.load_model through environment variables (which torchrun workers and
    subprocesses inherit), so the stage configs need not carry them.
    """

    def export(variable_name: str):
        def callback(context, parameter, value):
            if value:  # unset: leave whatever the environment says
                from pipeline import models

                os.environ[getattr(models, variable_name)] = "1" if value is True else str(value)

        return callback

    command = click.option(
        "--trust-remote-code",
        is_flag=True,
        default=False,
        expose_value=False,
        callback=export("TRUST_REMOTE_CODE_ENV"),
        help="Run model code shipped with a hub checkpoint (off unless asked for).",
    )(command)
    return click.option(
        "--attn-implementation",
        default=None,
        expose_value=False,
        callback=export("ATTN_IMPLEMENTATION_ENV"),
        help="Attention kernel: sdpa | eager | flash_attention_2 [default: transformers' choice].",
    )(command)


# ---------------------------------------------------------------- cache (teacher cache tools)


@main.group("cache")
def cache_group() -> None:
    """Inspect and verify teacher caches written by `pipeline precompute`."""


@cache_group.command("inspect")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--measure-kl", is_flag=True, help="Recompute exact teachers and report the KL error of the cache."
)
@click.option("--model", "model_path", default=None, help="Model the cache was made with (for --measure-kl).")
@click.option(
    "--data", "data_dir", default=None, help="Data directory the cache was made from (for --measure-kl)."
)
@click.option("--references", default=None, help="Folder holding references/<kind>/ (for --measure-kl).")
@click.option("--limit", default=None, type=int, help="Measure at most this many samples.")
@click.option("--device", default="cpu", show_default=True)
@model_loading_options
def cache_inspect(
    directory: str,
    measure_kl: bool,
    model_path: str | None,
    data_dir: str | None,
    references: str | None,
    limit: int | None,
    device: str,
) -> None:
    """Print tokens, bytes per token, mean support size, mean tail mass (and the KL error) as JSON."""
    import json

    from cache import CacheError, inspect_cache

    try:
        if measure_kl:
            if not model_path or not data_dir:
                raise click.UsageError("--measure-kl needs --model and --data")
            from stages.precompute import measure_cache_kl

            summary = measure_cache_kl(
                directory, model_path, data_dir, references=references, device=device, limit=limit
            )
        else:
            summary = inspect_cache(directory)
    except CacheError as error:
        raise click.ClickException(str(error)) from error
    click.echo(json.dumps(summary, indent=2))


@cache_group.command("verify")
@click.argument("directory", type=click.Path(file_okay=False))
def cache_verify(directory: str) -> None:
    """Check that every shard is present and its checksum verifies; exit 1 naming what is wrong."""
    from cache import verify_cache

    problems = verify_cache(directory)
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        raise click.ClickException(f"cache {directory}: {len(problems)} problem(s)")
    click.echo(f"cache {directory}: complete, all checksums verify")


@main.command("precompute")
@click.option(
    "--teacher", default="viker", show_default=True, help="viker | vgid | icu | noise | original | base"
)
@click.option("--k", default=5, show_default=True, help="ViKeR: reference images per sample.")
@click.option(
    "--reference-kind",
    default="people",
    show_default=True,
    help="ViKeR reference pool: people | pets | scene | pattern | forget | retain.",
)
@click.option(
    "--references", default=None, help="Folder holding references/<kind>/ (default: beside --data)."
)
@click.option(
    "--perturbation",
    default="random-noise",
    show_default=True,
    help="Vgid/noise: random-noise | gaussian | white.",
)
@click.option(
    "--sigma", default=0.4, show_default=True, help="Gaussian perturbation: noise std on [0, 1] pixels."
)
@click.option(
    "--icu-prompt", default="strict", show_default=True, help="Vgid/icu: strict | declarative | polite."
)
@click.option(
    "--top-p", default=0.995, show_default=True, help="Keep the smallest support of this mass per token."
)
@click.option("--max-support", default=256, show_default=True, help="At most this many tokens per support.")
@click.option("--model", "model_path", required=True, help="The frozen full model (directory or hub id).")
@click.option("--data", "data_dir", required=True, help="MLLMU-Bench-layout data directory.")
@click.option("--split", default=None, help="Split to cache [default: retain_90 for base, else forget_10].")
@click.option(
    "--kinds", default="qa", show_default=True, help="Comma-separated sample kinds: qa,generation,mc,cloze."
)
@click.option("--out", required=True, help="Cache directory (shard-XXXXX-of-NNNNN.parquet/.json).")
@click.option("--shard-index", default=None, type=int, help="Compute only this shard [default: every shard].")
@click.option("--num-shards", default=1, show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="Samples per forward pass (x k for ViKeR).")
@click.option("--seed", default=0, show_default=True, help="Seeds reference draws and perturbations.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--threads", default=0, show_default=True, help="torch threads (0: default), e.g. 1 per shard process."
)
@click.option("--limit", default=None, type=int, help="Only the first N samples of the split.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@model_loading_options
def precompute_command(model_path: str, data_dir: str, kinds: str, **options) -> None:
    """Stage one: cache the frozen model's top-p truncated teacher distributions over the answer tokens."""
    from cache import CacheError
    from pipeline.data import DataError
    from stages.precompute import PrecomputeConfig, run

    try:
        config = PrecomputeConfig(
            model=model_path, data=data_dir, kinds=tuple(kind for kind in kinds.split(",") if kind), **options
        )
        run(config)
    except (CacheError, DataError, ValueError, KeyError) as error:
        raise click.ClickException(str(error)) from error


# ---------------------------------------------------------------- evaluate, report, key-tokens


@main.command("evaluate")
@click.option(
    "--model", "model_path", required=True, help="Model directory or hub id (the base / full model)."
)
@click.option("--adapter", default=None, type=click.Path(), help="LoRA adapter directory to evaluate on top.")
@click.option(
    "--data", "data_dir", required=True, type=click.Path(), help="Data set in MLLMU-Bench's layout."
)
@click.option("--forget-split", default="forget_10", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="results/<run>/metrics.json")
@click.option("--protocol", type=click.Choice(["fixed", "official"]), default="fixed", show_default=True)
@click.option("--max-new-tokens", default=50, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option(
    "--reverse-attack/--no-reverse-attack",
    default=True,
    show_default=True,
    help="Also score forget/test with Vgid's reverse prompt appended.",
)
@click.option("--gib-model", default=None, type=click.Path(), help="Local copy of the gibberish classifier.")
@click.option("--limit", default=None, type=int, help="At most this many people per split.")
@click.option(
    "--few-shot-profiles", default=None, type=int, help="Exemplar profiles (default: the protocol's)."
)
@click.option(
    "--few-shot-questions",
    default=None,
    type=int,
    help="At most this many exemplar questions, 0 = all (default: the protocol's).",
)
@click.option("--instruction", default=None, help="In-context unlearning prefix for every question (ICU).")
@click.option("--splits", default="forget,test,retain,real", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--seeds",
    default=None,
    help="Comma list: evaluate one adapter per training seed, '{seed}' in --adapter/--out replaced "
    "by each (the evaluation's own draws stay seeded by --seed).",
)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@model_loading_options
def evaluate_command(
    model_path,
    adapter,
    data_dir,
    forget_split,
    out,
    protocol,
    max_new_tokens,
    batch_size,
    reverse_attack,
    gib_model,
    limit,
    few_shot_profiles,
    few_shot_questions,
    instruction,
    splits,
    seed,
    seeds,
    dtype,
    device,
) -> None:
    """Score forgetting, retention and coherence (MLLMU-Bench metrics) into metrics.json."""
    import json

    from pipeline.data import DataError
    from stages.evaluate import AdapterMismatchError, EvaluateConfig, run

    configs = [
        EvaluateConfig(
            model=model_path,
            adapter=adapter.replace("{seed}", run_seed) if adapter else None,
            data=data_dir,
            out=out.replace("{seed}", run_seed),
            forget_split=forget_split,
            protocol=protocol,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            reverse_attack=reverse_attack,
            gib_model=gib_model,
            limit=limit,
            few_shot_profiles=few_shot_profiles,
            few_shot_questions=few_shot_questions,
            instruction=instruction,
            splits=tuple(s.strip() for s in splits.split(",") if s.strip()),
            seed=seed,
            dtype=dtype,
            device=device,
        )
        for run_seed in _seed_list(seeds)
    ]
    for config in configs:
        try:
            metrics = run(config)
        except (DataError, AdapterMismatchError, FileNotFoundError, ValueError) as error:
            raise click.ClickException(str(error)) from error
        click.echo(json.dumps(metrics, indent=2))


@main.command("report")
@click.option(
    "--runs",
    "runs_dir",
    default="results",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder of <run>/metrics.json (run names: method or method-sN).",
)
@click.option("--out", default="results/report.md", show_default=True, type=click.Path(dir_okay=False))
@click.option(
    "--references",
    "reference_dir",
    default=None,
    type=click.Path(),
    help="Reference pools folder (default: next to the runs' data) for key-token marking.",
)
@click.option(
    "--sample-index", default=0, show_default=True, help="Which forget sample the token plot shows."
)
@click.option("--epsilon", default=0.5, show_default=True, help="Key-token entropy threshold (nats).")
@click.option("--token-plot/--no-token-plot", default=True, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def report_command(runs_dir, out, reference_dir, sample_index, epsilon, token_plot, device) -> None:
    """The papers' table (means ± std over seeds) and figures from evaluated runs."""
    from stages.report import run

    try:
        path = run(
            runs_dir,
            out,
            reference_dir=reference_dir,
            sample_index=sample_index,
            epsilon=epsilon,
            token_plot=token_plot,
            device=device,
        )
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {path}")


@main.command("key-tokens")
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--epsilon", default=0.5, show_default=True, help="H(R_i) >= epsilon (nats) marks a key token.")
@click.option("--model", "model_path", default=None, help="Model whose tokenizer decodes the token ids.")
@click.option("--limit", default=None, type=int, help="At most this many samples.")
def key_tokens_command(cache_dir, epsilon, model_path, limit) -> None:
    """List, per cached sample, which answer tokens are key (ViKeR Def. 2) and which are normal."""
    from cache import CacheError
    from stages.report import format_key_tokens, key_tokens

    tokenizer = None
    if model_path:
        from transformers import AutoTokenizer

        from pipeline.models import resolve_model_dir

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model_path))
    try:
        for entry in key_tokens(cache_dir, epsilon, tokenizer, limit):
            click.echo(format_key_tokens(entry))
    except CacheError as error:
        raise click.ClickException(str(error)) from error


# ---------------------------------------------------------------- train


@main.command("train")
@click.option("--model", "model", required=True, help="The full model (directory or hub id) to unlearn from.")
@click.option("--data", "data", required=True, type=click.Path(), help="Data set in MLLMU-Bench's layout.")
@click.option(
    "--out", required=True, type=click.Path(), help="Adapter directory (PEFT) + log + training_meta."
)
@click.option(
    "--method",
    default="viker",
    show_default=True,
    help="ga, ga_diff, kl_min, npo, idkpo, viker or vgid (pipeline.losses.LOSSES).",
)
@click.option("--forget-split", default="forget_10", show_default=True)
@click.option("--retain-split", default="retain_90", show_default=True)
@click.option(
    "--sample-kinds", default="qa", show_default=True, help="Comma list of qa, generation, mc, cloze."
)
@click.option("--forget-cache", default=None, type=click.Path(), help="Teacher cache of the forget split.")
@click.option(
    "--retain-cache", default=None, type=click.Path(), help="Frozen-model (`base`) cache of the retain split."
)
@click.option(
    "--lambda", "lambda", default=0.05, show_default=True, type=float, help="ViKeR's lambda (Eq. 5)."
)
@click.option("--alpha", default=1.0, show_default=True, type=float, help="Vgid's forget weight (Eq. 5).")
@click.option(
    "--beta",
    default=1.0,
    show_default=True,
    type=float,
    help="Retain weight: Vgid Eq. 5, KL_Min Eq. 8, GA_Diff.",
)
@click.option("--npo-beta", default=0.4, show_default=True, type=float, help="beta of NPO and IdkPO.")
@click.option("--regularizer", type=click.Choice(["kl", "jsd", "cosine"]), default="kl", show_default=True)
@click.option("--no-ga", is_flag=True, default=False, help="ViKeR without the GA term (ablation).")
@click.option(
    "--refusals", default=None, type=click.Path(), help="Refusal sentences for IdkPO, one per line."
)
@click.option("--lr", default=5e-6, show_default=True, type=float)
@click.option(
    "--batch-size", default=2, show_default=True, type=int, help="Global forget samples per micro-batch."
)
@click.option("--epochs", default=1, show_default=True, type=int)
@click.option("--grad-accum", default=1, show_default=True, type=int)
@click.option("--max-steps", default=None, type=int, help="Stop after this many optimizer steps.")
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option(
    "--lr-scheduler", type=click.Choice(["constant", "linear"]), default="constant", show_default=True
)
@click.option(
    "--max-grad-norm", default=None, type=float, help="Clip gradients to this norm (default: no clipping)."
)
@click.option("--lora-rank", default=8, show_default=True, type=int)
@click.option("--lora-alpha", default=16, show_default=True, type=int)
@click.option("--lora-dropout", default=0.05, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--seeds",
    default=None,
    help="Comma list: one run per seed in this process, '{seed}' in --out replaced by each (overrides --seed).",
)
@click.option("--checkpoint-every", default=0, show_default=True, type=int, help="Optimizer steps; 0: never.")
@click.option(
    "--image-feature-cache-mb",
    default=4096,
    show_default=True,
    type=int,
    help="MiB of (frozen) vision features kept between steps, on the device; 0: encode at every step.",
)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--progress/--quiet", default=False, show_default=True, help="Print each step's log row.")
@click.option(
    "--log-dir", default=None, type=click.Path(), help="Where train_log.csv/.json go (default: --out)."
)
@model_loading_options
def train_command(**options) -> None:
    """LoRA unlearning with the method's loss, streaming the teacher cache (torchrun for several processes)."""
    import json

    from cache import CacheError
    from pipeline.data import DataError
    from stages.train import TokenMismatchError, TrainConfig, run

    options["lambda_"] = options.pop("lambda")
    options["sample_kinds"] = tuple(
        kind.strip() for kind in options["sample_kinds"].split(",") if kind.strip()
    )
    seeds, out = options.pop("seeds"), options.pop("out")
    for seed in _seed_list(seeds):
        config = TrainConfig(
            **{**options, "out": out.replace("{seed}", seed), "seed": int(seed or options["seed"])}
        )
        try:
            meta = run(config)
        except (CacheError, DataError, TokenMismatchError, FileNotFoundError, KeyError, ValueError) as error:
            raise click.ClickException(str(error)) from error
        click.echo(json.dumps(meta, indent=2))


@main.command("prepare-mini")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="work/mini",
    show_default=True,
    help="Where the world (data/, references/) and the full model (model/) go.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--num-people", type=int, default=100, show_default=True, help="Fictitious people (forget/retain)."
)
@click.option(
    "--num-real", type=int, default=20, show_default=True, help="'Real celebrity' people (always retained)."
)
@click.option(
    "--num-reference-people",
    type=int,
    default=20,
    show_default=True,
    help="Portraits in no split: ViKeR's 'people' reference pool.",
)
@click.option(
    "--alt-images", type=int, default=3, show_default=True, help="Other images per person (Test_Set)."
)
@click.option(
    "--fact-epochs",
    type=int,
    default=20,
    show_default=True,
    help="First fine-tuning epochs, on the profile QA and cloze items only (the facts).",
)
@click.option(
    "--epochs",
    type=int,
    default=25,
    show_default=True,
    help="Fine-tuning epochs on every task format, after the fact epochs.",
)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--learning-rate", type=float, default=5e-4, show_default=True)
@click.option("--threads", type=int, default=0, show_default=True, help="torch threads (0: torch's default).")
@click.option(
    "--metrics-out",
    type=click.Path(dir_okay=False),
    default="metrics/full_model.json",
    show_default=True,
    help="Memorization figures of the full model; '' skips the measurement.",
)
@click.option(
    "--people-per-split",
    type=int,
    default=20,
    show_default=True,
    help="People of each split the memorization measurement asks about.",
)
def prepare_mini_command(
    out,
    seed,
    num_people,
    num_real,
    num_reference_people,
    alt_images,
    fact_epochs,
    epochs,
    batch_size,
    learning_rate,
    threads,
    metrics_out,
    people_per_split,
) -> None:
    """Build the embedded mini world and fine-tune the tiny full model on it."""
    from pathlib import Path

    from pipeline.mini_world import WorldConfig
    from stages.prepare import FineTuneConfig, run

    world = WorldConfig(
        seed=seed,
        num_people=num_people,
        num_real=num_real,
        num_reference_people=num_reference_people,
        alt_images=alt_images,
    )
    fine_tune = FineTuneConfig(
        fact_epochs=fact_epochs,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        threads=threads,
    )
    figures = run(
        Path(out),
        world,
        fine_tune,
        Path(metrics_out) if metrics_out else None,
        people_per_split=people_per_split,
        log=click.echo,
    )
    click.echo(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
