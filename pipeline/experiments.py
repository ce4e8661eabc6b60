"""Experiments: named sets of parameter values under experiments/, one of which params.yaml holds.

experiments/mini.yaml is the embedded default, a whole params file. Every other experiment is an overlay:
`extends: NAME` (default mini) and the values that differ, merged section by section over what it extends,
except `methods` and `experiment.sources`, which an overlay replaces whole (it names what it runs). Its
`experiment` section names it, says what it is and where its model and data come from (`sources`: local
path -> hub repository, which `fetch` downloads).

`select` writes params.yaml from one experiment; DVC then sees the changed values (`dvc params diff`)
and reruns exactly the stages that read them. The file it writes holds only the `teachers` entries some
method reads (dvc.yaml computes a cache per entry: a ViKeR experiment computes no Vgid cache), and every
method entry with both teacher slots spelled out (`none` where it reads no cache), as dvc.yaml needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

BASE = "mini"
FOLDER = "experiments"
# mappings an overlay replaces instead of merging into
REPLACED_WHOLE = ("methods", "sources", "finetunes", "fine_tuned")
FINETUNED = "work/finetuned"  # where dvc.yaml's finetune@<entry> writes the full model: FINETUNED/<entry>


class ExperimentError(ValueError):
    """An experiment file that is missing, malformed or extends itself."""


def experiment_names(root: Path) -> list[str]:
    return sorted(path.stem for path in (root / FOLDER).glob("*.yaml"))


def _read(root: Path, name: str) -> dict[str, Any]:
    path = root / FOLDER / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(experiment_names(root))
        raise ExperimentError(f"no experiment {name!r} ({path} does not exist); known: {known}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ExperimentError(f"{path}: an experiment is a mapping of params.yaml sections")
    return values


def merged(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """overlay over base: mappings merge key by key (recursively), anything else is replaced."""
    result = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict) and key not in REPLACED_WHOLE:
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def experiment_values(root: Path, name: str) -> dict[str, Any]:
    """The whole params of an experiment: its overlay over the chain of experiments it extends."""
    chain: list[str] = []
    overlays: list[dict[str, Any]] = []  # the files of the chain, each read once
    while True:
        if name in chain:
            raise ExperimentError(
                f"experiment {chain[0]!r} extends itself through {' -> '.join([*chain, name])}"
            )
        chain.append(name)
        overlays.append(_read(root, name))
        if name == BASE:
            break
        name = overlays[-1].pop("extends", BASE)
    result: dict[str, Any] = {}
    for overlay in reversed(overlays):
        overlay.pop("extends", None)
        result = merged(result, overlay)
    return result


def for_params(values: dict[str, Any]) -> dict[str, Any]:
    """The values as params.yaml holds them: each method's teacher slots spelled out, only the teacher
    entries some method reads."""
    from pipeline.unlearning.methods import NO_TEACHER, TEACHER_SLOTS, teacher_slots

    def spelled_out(entry: Any) -> Any:
        if not isinstance(entry, dict):
            return entry  # refused with its name when the file is checked
        slots = {slot: teacher or NO_TEACHER for slot, teacher in teacher_slots(entry).items()}
        ordered = {key: entry[key] for key in ("loss",) if key in entry} | slots
        return ordered | {key: value for key, value in entry.items() if key not in ordered}

    methods = {name: spelled_out(entry) for name, entry in (values.get("methods") or {}).items()}
    read = {
        entry.get(slot) for entry in methods.values() if isinstance(entry, dict) for slot in TEACHER_SLOTS
    }
    teachers = {name: entry for name, entry in (values.get("teachers") or {}).items() if name in read}
    return {**values, "teachers": teachers, "methods": methods}


def header(name: str) -> str:
    return (
        f"# Experiment `{name}`, written by `pipeline experiment use {name}` from {FOLDER}/{name}.yaml"
        + ("" if name == BASE else f" (over the files it extends, down to {FOLDER}/{BASE}.yaml)")
        + ".\n# Edit the experiment file and select it again; a one-off change here shows in `dvc params diff`.\n"
    )


def params_text(root: Path, name: str) -> str:
    """What params.yaml holds when `name` is selected (the base keeps its comments, verbatim: it is written
    in the params.yaml form already, which tests/test_experiments.py checks)."""
    if name == BASE:
        return header(name) + (root / FOLDER / f"{BASE}.yaml").read_text()
    return header(name) + yaml.safe_dump(
        for_params(experiment_values(root, name)), sort_keys=False, width=110
    )


def select(root: Path, name: str, params_path: Path, check: Callable[[Path], None]) -> str:
    """Write params.yaml for an experiment, after `check` accepted the same text in a file aside."""
    text = params_text(root, name)
    aside = params_path.with_name(f".{params_path.name}.partial")
    aside.write_text(text)
    try:
        check(aside)
    except Exception:
        aside.unlink()
        raise
    aside.replace(params_path)
    return text


def full_model_learned(values: dict[str, Any]) -> str:
    """How the experiment's full model (model.model) learned the people it unlearns: made by the finetune
    stage (its `finetunes` entry, written to work/finetuned/<entry>), or a checkpoint its `experiment.
    fine_tuned` declares fine-tuned on the benchmark (path -> by whom, on what). Anything else unlearns a
    model that never saw the people, which is refused naming the two ways out."""
    model = str((values.get("model") or {}).get("model"))
    finetunes = values.get("finetunes") or {}
    name = (values.get("experiment") or {}).get("name", "?")
    if len(finetunes) > 1:
        raise ExperimentError(
            f"experiment {name}: `finetunes` holds {len(finetunes)} entries; one full model"
        )
    for entry, settings in finetunes.items():
        if model != f"{FINETUNED}/{entry}":
            raise ExperimentError(
                f"experiment {name}: finetunes.{entry} writes {FINETUNED}/{entry}, but model.model is {model}"
            )
        if not (values.get("data") or {}).get("train_data"):
            raise ExperimentError(
                f"experiment {name}: finetunes.{entry} needs data.train_data, the rows it learns"
            )
        return f"{FINETUNED}/{entry}: the finetune stage from {(settings or {}).get('origin')}"
    declared = (values.get("experiment") or {}).get("fine_tuned") or {}
    if model in declared:
        return f"{model}: {declared[model]}"
    raise ExperimentError(
        f"experiment {name}: its full model {model} is neither made by the finetune stage (a `finetunes` "
        f"entry, model.model {FINETUNED}/<entry>) nor declared fine-tuned on the benchmark "
        f"(experiment.fine_tuned: {{{model}: by whom, on what}}): unlearning a model that never saw the "
        "people measures nothing"
    )


def sources(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Local path -> {repo, type} of the experiment's hub downloads (its `experiment.sources`)."""
    found = (values.get("experiment") or {}).get("sources") or {}
    result = {}
    for path, source in found.items():
        if isinstance(source, str):
            source = {"repo": source}
        if not isinstance(source, dict) or "repo" not in source:
            raise ExperimentError(f"experiment.sources[{path!r}] must be a hub id or {{repo, type}}")
        result[str(path)] = {"repo": str(source["repo"]), "type": str(source.get("type", "model"))}
    return result


def fetch(root: Path, values: dict[str, Any], echo: Callable[[str], None]) -> list[Path]:
    """Download every source not yet present (huggingface_hub.snapshot_download into its local path)."""
    from huggingface_hub import snapshot_download

    fetched = []
    for path, source in sources(values).items():
        target = root / path
        if target.is_dir() and any(target.iterdir()):
            echo(f"{path}: present, not downloaded again")
            continue
        echo(f"{path}: downloading {source['type']} {source['repo']}")
        try:
            snapshot_download(source["repo"], repo_type=source["type"], local_dir=str(target))
        except Exception as error:  # offline, gated or unknown repository
            raise ExperimentError(
                f"could not download {source['type']} {source['repo']} into {path}: {error}. On a machine "
                f"with access: huggingface-cli download {source['repo']} --repo-type {source['type']} "
                f"--local-dir {path}"
            ) from error
        fetched.append(target)
    return fetched


RUNS = Path("results/runs")


def declared_runs(root: Path) -> set[str]:
    """The run folders under results/runs that dvc.yaml's stages write with the current params.yaml."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        paths = [Path(out.fs_path).resolve() for stage in repo.index.stages for out in stage.outs]
    runs = (root / RUNS).resolve()
    return {path.relative_to(runs).parts[0] for path in paths if path.is_relative_to(runs)}


def drop_unselected_runs(root: Path, declared: set[str]) -> list[str]:
    """Remove the run folders no stage of the selected experiment writes (another experiment's: the report
    reads every folder there, and would mix the two). Their files are DVC outputs kept in its cache, so
    selecting that experiment again restores them without recomputing."""
    import shutil

    stale = (
        sorted(d.name for d in (root / RUNS).iterdir() if d.is_dir() and d.name not in declared)
        if (root / RUNS).is_dir()
        else []
    )
    for name in stale:
        shutil.rmtree(root / RUNS / name)
    return stale
