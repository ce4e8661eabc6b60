"""The `pipeline` command line, the top floor: each command's options are generated from its stage's config
(stages.config) and take their values from params.yaml; the command builds the config and runs the stage.

params.yaml is the nearest one at or above the working directory, or `--params FILE`; its sections are
checked against the schema before any stage starts (an unknown key is an error naming it). Stages are
imported when their command runs, so `pipeline --help` and parameter errors are instant.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline.config import ConfigError, build, check_section, find_params, options, read_params
from pipeline.runtime import keep_freed_memory, offline_by_default
from stages.config import (
    KEY_TOKEN_EPSILON,
    SECTIONS,
    SHARED_SECTIONS,
    EvaluateConfig,
    FinetuneConfig,
    PrecomputeConfig,
    PrepareConfig,
    RelearnConfig,
    ReportConfig,
    TrainConfig,
)

offline_by_default()

# params.yaml's keys beside the command sections: the training seeds DVC runs, the teachers and methods,
# and the name of the experiment the values came from (pipeline experiment use).
OTHER_KEYS = ("seeds", "teachers", "methods", "experiment", "finetunes")


def load_sections(params_file: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(click's default_map of every command, the whole params file), checked against the schema."""
    path = find_params(params_file)
    params = read_params(path)
    where = str(path)
    known = [*SHARED_SECTIONS, *SECTIONS, *OTHER_KEYS]
    unknown = sorted(str(key) for key in params if key not in known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown section {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
        )
    shared = {
        name: check_section(name, params[name], options_class, where)
        for name, options_class in SHARED_SECTIONS.items()
        if name in params
    }
    default_map = {}
    for name, config_class in SECTIONS.items():
        # A shared section (model, data) gives every command that takes those options its values; the
        # command's own section overrides them.
        values = {
            key: value
            for shared_name, options_class in SHARED_SECTIONS.items()
            if issubclass(config_class, options_class)
            for key, value in shared.get(shared_name, {}).items()
        }
        values.update(check_section(name, params[name], config_class, where) if name in params else {})
        default_map[name] = values
    entries = {key: params.get(key) or {} for key in ("teachers", "methods")}
    for key, value in entries.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: `{key}` must map names to entries")
    return default_map, {**params, **entries, "_where": where}


class ParamsGroup(click.Group):
    """A click group whose commands' option defaults come from params.yaml (or --params FILE)."""

    def make_context(self, info_name, args, parent=None, **extra):
        args = list(args)
        explicit = args[args.index("--params") + 1] if "--params" in args[:-1] else None
        if "--help" not in args[:1] and args:
            default_map, params = load_sections(explicit)
            extra.setdefault("default_map", default_map)
            extra.setdefault("obj", params)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.group(cls=ParamsGroup)
@click.option("--params", "params_file", default=None, help="params.yaml to read (default: the nearest one).")
@click.option("--debug", is_flag=True, help="Show the traceback of an error, not only its message.")
@click.pass_context
def main(context: click.Context, params_file: str | None, debug: bool) -> None:
    """Unlearning for multimodal LLMs: prepare-mini, precompute, train, evaluate, report."""
    context.ensure_object(dict)
    context.obj["debug"] = debug
    keep_freed_memory()


def seed_list(seeds: str | None) -> list[str]:
    """'0,1,2' -> ['0', '1', '2']; None -> [''] (one run, nothing to substitute)."""
    if not seeds:
        return [""]
    return [seed.strip() for seed in str(seeds).split(",") if seed.strip()]


def running(context: click.Context, stage_run, *arguments) -> Any:
    """Run a stage; an error a user can cause ends in its message (the traceback with --debug)."""
    from cache import CacheError
    from pipeline.benchmarks import DataError

    try:
        return stage_run(*arguments)
    except (CacheError, DataError, FileNotFoundError, KeyError, ValueError) as error:
        if (context.obj or {}).get("debug"):
            traceback.print_exc()
        raise click.ClickException(str(error)) from error


def seeded(values: dict[str, Any], seed: str, paths: tuple[str, ...], sets_seed: bool) -> dict[str, Any]:
    """One seed's option values: '{seed}' replaced in the path options, and --seed set to it where the
    seed is the run's own (train, relearn; evaluation keeps its draws seeded by --seed)."""
    run_values = dict(values)
    for option in paths:
        run_values[option] = run_values[option].replace("{seed}", seed) if run_values[option] else None
    if seed and sets_seed:
        run_values["seed"] = int(seed)
    return run_values


def run_per_seed(
    context: click.Context,
    seeds: str | None,
    values: dict[str, Any],
    config_class: type,
    paths: tuple[str, ...],
    run_one: Callable[[Any], Any],
    *,
    sets_seed: bool,
) -> None:
    """The --seeds loop: for each seed its config (`seeded` values), `run_one(config)`, the result as JSON."""
    for seed in seed_list(seeds):
        config = running(context, build, config_class, seeded(values, seed, paths, sets_seed))
        click.echo(json.dumps(running(context, run_one, config), indent=2))


SEEDS_HELP = "Comma list: one run per seed, '{seed}' in --out (and --adapter, --relearned) replaced by each."


@main.command("prepare-mini")
@options(PrepareConfig)
@click.pass_context
def prepare_mini_command(context: click.Context, **values) -> None:
    """Build the embedded mini world and fine-tune the tiny full model on it."""
    from stages.prepare import run

    figures = running(context, lambda: run(build(PrepareConfig, values), click.echo))
    click.echo(json.dumps(figures, indent=2))


@main.command("finetune")
@options(FinetuneConfig)
@click.pass_context
def finetune_command(context: click.Context, **values) -> None:
    """Fine-tune --origin on every person of the benchmark (MLLMU-Bench's finetune.py) into the full model."""
    from stages.finetune import run

    config = running(context, build, FinetuneConfig, values)
    click.echo(json.dumps(running(context, run, config)["splits"]))


@main.command("precompute")
@options(PrecomputeConfig)
@click.pass_context
def precompute_command(context: click.Context, **values) -> None:
    """Stage one: cache the frozen model's top-p truncated teacher distributions over the answer tokens."""
    from pipeline.unlearning.teachers import resolve_teacher
    from stages.precompute import run

    config = running(context, build, PrecomputeConfig, values)
    entry = running(
        context, resolve_teacher, config.teacher, context.obj["teachers"], config.args, context.obj["_where"]
    )
    running(context, run, config, entry)


@main.command("train")
@options(TrainConfig)
@click.option("--seeds", default=None, help=SEEDS_HELP + " Overrides --seed.")
@click.pass_context
def train_command(context: click.Context, seeds: str | None, **values) -> None:
    """LoRA unlearning with the method's loss, streaming the teacher cache (torchrun for several processes)."""
    from pipeline.unlearning.methods import resolve_method
    from stages.train import run

    def train_one(config: TrainConfig) -> Any:
        method = resolve_method(
            config.method, context.obj["methods"], config.loss, config.args,
            config.forget_cache, config.retain_cache, context.obj["_where"], config.cache_root,
        )  # fmt: skip
        return run(config, method)

    run_per_seed(context, seeds, values, TrainConfig, ("out",), train_one, sets_seed=True)


@main.command("relearn")
@options(RelearnConfig)
@click.option("--seeds", default=None, help=SEEDS_HELP + " Overrides --seed.")
@click.pass_context
def relearn_command(context: click.Context, seeds: str | None, **values) -> None:
    """The relearning attack: fine-tune an unlearned adapter on the QA of part of the forget people."""
    from stages.relearn import run

    run_per_seed(context, seeds, values, RelearnConfig, ("out", "adapter"), run, sets_seed=True)


@main.command("evaluate")
@options(EvaluateConfig)
@click.option("--seeds", default=None, help=SEEDS_HELP + " The evaluation's own draws stay seeded by --seed.")
@click.pass_context
def evaluate_command(context: click.Context, seeds: str | None, **values) -> None:
    """Score forgetting, retention and coherence (MLLMU-Bench's measures) into metrics.json."""
    from stages.evaluate import SharedBase, run

    base = SharedBase()  # the seeds' runs share one loaded model
    paths = ("out", "adapter", "relearned")
    run_per_seed(
        context, seeds, values, EvaluateConfig, paths, lambda config: run(config, base), sets_seed=False
    )


@main.command("report")
@options(ReportConfig)
@click.pass_context
def report_command(context: click.Context, **values) -> None:
    """The papers' tables (means and spread over seeds), the findings and the figures."""
    from stages.report import run

    click.echo(f"wrote {running(context, lambda: run(build(ReportConfig, values)))}")


@main.command("check")
@click.option(
    "--gpu-memory-gib", type=float, default=None, help="Flag every step expected to need more GPU memory."
)
@click.pass_context
def check_command(context: click.Context, gpu_memory_gib: float | None) -> None:
    """Check the selected experiment from its data and model config, tokenizer and processor (no weights,
    no GPU): samples, prompt lengths against the context, images, caches, expected peak GPU memory."""
    from stages.check import run

    default_map = context.find_root().default_map or {}  # `out` set or not: check writes nothing
    configs = {
        name: running(context, build, config_class, {"out": "-", **default_map.get(name, {})})
        for name, config_class in (
            ("train", TrainConfig),
            ("evaluate", EvaluateConfig),
            ("precompute", PrecomputeConfig),
        )
    }
    params = {**configs, "teachers": context.obj["teachers"], "methods": context.obj["methods"]}
    report = running(context, run, params, gpu_memory_gib)
    for line in report.lines:
        click.echo(line)
    if report.problems:
        raise click.ClickException(
            f"{len(report.problems)} problem(s): the run would fail (FAIL lines above)"
        )


@main.group("experiment")
def experiment_group() -> None:
    """List the shipped experiments (experiments/*.yaml) and select one into params.yaml."""


def project_root() -> Path:
    """The folder of the nearest params.yaml (where experiments/ and dvc.yaml are), else the working one."""
    found = find_params(None)
    return found.parent if found is not None else Path.cwd()


def check_params(path) -> None:
    """A params file every command accepts: its sections fit the schema, every teacher entry its teacher's
    arguments, every method its loss and names teacher entries the file holds."""
    from pipeline.experiments import full_model_learned
    from pipeline.unlearning.methods import resolve_method
    from pipeline.unlearning.teachers import resolve_teacher

    _, params = load_sections(str(path))
    if params.get("experiment"):  # an experiment's file: its full model learned the people it unlearns
        full_model_learned(params)
    teachers, where = params["teachers"], params["_where"]
    for name in teachers:
        resolve_teacher(name, teachers, where=where)
    for name in params["methods"]:
        method = resolve_method(name, params["methods"], where=where)
        for entry in (method.forget_teacher, method.retain_teacher):
            if entry is not None and entry not in teachers:
                raise ConfigError(
                    f"{where}: method {name!r} reads teacher entry {entry!r}, which `teachers` does not "
                    f"hold; known: {', '.join(teachers) or 'none'}"
                )


@experiment_group.command("list")
@click.pass_context
def experiment_list(context: click.Context) -> None:
    """Name and description of every experiment; * marks the one params.yaml holds."""
    from pipeline.experiments import experiment_names, experiment_values

    root = project_root()
    selected = (read_params(root / "params.yaml").get("experiment") or {}).get("name")
    for name in experiment_names(root):
        description = (experiment_values(root, name).get("experiment") or {}).get("description", "")
        click.echo(f"{'*' if name == selected else ' '} {name:28} {description}")


@experiment_group.command("use")
@click.argument("name")
@click.option("--fetch", is_flag=True, help="Also download the experiment's model and data (its sources).")
@click.pass_context
def experiment_use(context: click.Context, name: str, fetch: bool) -> None:
    """Write params.yaml from experiments/NAME.yaml (checked first); `dvc repro` then runs it."""
    from pipeline.experiments import RUNS, declared_runs, drop_unselected_runs, select
    from pipeline.experiments import fetch as fetch_sources

    root = project_root()
    running(context, select, root, name, root / "params.yaml", check_params)
    click.echo(f"params.yaml: experiment {name} (dvc params diff shows what changed)")
    runs = [path for path in (root / RUNS).glob("*") if path.is_dir()]  # none: no DVC index to read
    for stale in drop_unselected_runs(root, running(context, declared_runs, root)) if runs else []:
        click.echo(
            f"results/runs/{stale}: no run of {name}, removed (DVC's cache restores it on reselecting)"
        )
    if fetch:
        values = read_params(root / "params.yaml")
        running(context, fetch_sources, root, values, click.echo)


@main.command("key-tokens")
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--epsilon",
    default=KEY_TOKEN_EPSILON,
    show_default=True,
    help="H(R_i) >= epsilon (nats) marks a key token.",
)
@click.option("--model", "model_path", default=None, help="Model whose tokenizer decodes the token ids.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="At most this many samples.")
@click.pass_context
def key_tokens_command(
    context: click.Context, cache_dir: str, epsilon: float, model_path: str | None, limit
) -> None:
    """List, per cached sample, which answer tokens are key (ViKeR Def. 2) and which are normal."""
    from pipeline.unlearning.key_tokens import format_key_tokens, key_tokens

    tokenizer = None
    if model_path:
        from transformers import AutoTokenizer

        from pipeline.models import resolve_model_dir

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model_path))
    for entry in running(context, lambda: list(key_tokens(cache_dir, epsilon, tokenizer, limit))):
        click.echo(format_key_tokens(entry))


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
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Measure at most this many samples.")
@click.option("--device", default="cpu", show_default=True)
@click.pass_context
def cache_inspect(
    context: click.Context, directory: str, measure_kl: bool, model_path, data_dir, references, limit, device
) -> None:
    """Print tokens, bytes per token, mean support size, mean tail mass (and the KL error) as JSON."""
    from cache import inspect_cache

    if measure_kl:
        if not model_path or not data_dir:
            raise click.UsageError("--measure-kl needs --model and --data")
        from stages.precompute import measure_cache_kl

        summary = running(
            context, measure_cache_kl, directory, model_path, data_dir, references, device, limit
        )
    else:
        summary = running(context, inspect_cache, directory)
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
