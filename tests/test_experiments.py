"""Experiments: params.yaml is the selected one, every shipped experiment resolves, selection and fetching."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.config import ConfigError
from pipeline.experiments import (
    ExperimentError,
    experiment_names,
    experiment_values,
    fetch,
    for_params,
    full_model_learned,
    merged,
    params_text,
)
from pipeline.models import FAMILIES
from pipeline.unlearning.methods import NO_TEACHER, TEACHER_SLOTS, resolve_method
from pipeline.unlearning.teachers import TeacherError
from stages.cli import check_params, load_sections, main

REPO = Path(__file__).resolve().parents[1]
# The released checkpoints, which never saw a benchmark's fictitious people.
RELEASED = ("work/hub/llava-1.5-7b-hf", "work/hub/Qwen2.5-VL-3B-Instruct")


def test_params_yaml_is_the_mini_experiment_verbatim():
    assert (REPO / "params.yaml").read_text() == params_text(REPO, "mini")


@pytest.mark.parametrize("name", experiment_names(REPO))
def test_every_shipped_experiment_resolves_without_downloading(name, tmp_path):
    values = experiment_values(REPO, name)
    assert values["experiment"]["name"] == name and values["experiment"]["description"]
    params = tmp_path / "params.yaml"
    params.write_text(params_text(REPO, name))
    check_params(params)  # every section fits the schema, every method's arguments are its loss's
    default_map, loaded = load_sections(str(params))
    for method in loaded["methods"]:
        assert resolve_method(method, loaded["methods"]).loss
    templates = {template for name in FAMILIES.names() for template in FAMILIES[name].template_names}
    assert default_map["train"].get("prompt_template", "llava") in templates
    if name == "mini":
        return
    sources = values["experiment"]["sources"]
    origins = [entry["origin"] for entry in values.get("finetunes", {}).values()]
    assert (origins or [default_map["train"]["model"]])[0] in sources and default_map["train"][
        "data"
    ] in sources
    assert default_map["train"].get("processor_from") in (None, *sources)
    assert all(source["repo"].count("/") == 1 for source in sources.values())
    assert default_map["evaluate"]["data_format"] in ("mllmu", "clear")  # named, not detected
    assert default_map["evaluate"]["limit"] is None  # a real experiment scores every person


@pytest.mark.parametrize("name", [name for name in experiment_names(REPO) if name != "mini"])
def test_real_experiments_score_multiple_choice_as_the_benchmarks_eval_does(name):
    """The mini world scores multiple choice by likelihood (its model learned option answers); a real
    experiment must not inherit that: MLLMU-Bench's eval.py asks with options, the letter instruction and
    exemplars, and reads the generated letter, which is what the published tables are."""
    evaluate = experiment_values(REPO, name)["evaluate"]
    assert evaluate["mc_scoring"] == "generate", (name, evaluate["protocol"])


def test_overlays_merge_section_by_section_and_replace_methods_whole():
    base = {"train": {"lr": 1.0, "epochs": 2}, "methods": {"ga": {"loss": "ga"}, "npo": {"loss": "npo"}}}
    overlay = {"train": {"lr": 0.5}, "methods": {"viker": {"loss": "viker"}}}
    assert merged(base, overlay) == {
        "train": {"lr": 0.5, "epochs": 2},
        "methods": {"viker": {"loss": "viker"}},
    }
    fifteen = experiment_values(REPO, "llava-mllmu-15-viker")
    assert fifteen["data"]["forget_split"] == "forget_15"
    assert fifteen["methods"]["viker"]["args"]["lambda"] == 0.5
    assert fifteen["train"]["lr"] == 5e-6  # from llava-mllmu-10-viker, which it extends
    assert fifteen["prepare-mini"] == experiment_values(REPO, "mini")["prepare-mini"]  # from the base


def test_unknown_and_circular_experiments_are_named(tmp_path):
    (tmp_path / "experiments").mkdir()
    shutil.copy(REPO / "experiments" / "mini.yaml", tmp_path / "experiments" / "mini.yaml")
    (tmp_path / "experiments" / "a.yaml").write_text("extends: b\n")
    (tmp_path / "experiments" / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ExperimentError, match=r"extends itself through a -> b -> a"):
        experiment_values(tmp_path, "a")
    with pytest.raises(ExperimentError, match=r"no experiment 'c' .*known: a, b, mini"):
        experiment_values(tmp_path, "c")


def project_copy(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(REPO / "experiments", root / "experiments")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def test_experiment_use_writes_params_yaml_and_a_bad_experiment_leaves_it(tmp_path, monkeypatch):
    root = project_copy(tmp_path)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(main, ["experiment", "use", "llava-clear-10-viker"])
    assert result.exit_code == 0, result.output
    default_map, params = load_sections(str(root / "params.yaml"))
    assert (
        default_map["evaluate"]["data"] == "work/hub/CLEAR"
        and default_map["train"]["forget_split"] == "forget10"
    )
    assert params["experiment"]["name"] == "llava-clear-10-viker"
    before = (root / "params.yaml").read_text()
    (root / "experiments" / "broken.yaml").write_text("train: {lrr: 1}\n")
    result = CliRunner().invoke(main, ["experiment", "use", "broken"])
    assert result.exit_code != 0 and "unknown key 'lrr' in section 'train'" in result.output
    assert (root / "params.yaml").read_text() == before and not list(root.glob(".params.yaml*"))
    listed = CliRunner().invoke(main, ["experiment", "list"])
    assert "* llava-clear-10-viker" in listed.output and "  mini " in listed.output


def test_fetch_skips_what_is_present_and_names_the_manual_download_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    values = yaml.safe_load(params_text(REPO, "llava-clear-10-viker").split("\n", 2)[2])
    (tmp_path / "work/hub/CLEAR").mkdir(parents=True)
    (tmp_path / "work/hub/CLEAR/README.md").write_text("present\n")
    said: list[str] = []
    with pytest.raises(ExperimentError, match=r"huggingface-cli download therem/llava-1.5-7b-CLEAR-finetune"):
        fetch(tmp_path, values, said.append)
    assert "work/hub/CLEAR: present, not downloaded again" in said or said[0].startswith("work/hub/llava")


def test_params_hold_only_the_teachers_some_method_reads_and_every_methods_slots():
    """A ViKeR experiment computes no Vgid cache: dvc.yaml makes one precompute stage per teacher entry."""
    mini = experiment_values(REPO, "mini")
    assert for_params(mini) == mini  # params.yaml is mini.yaml verbatim: already in the written form
    for name in experiment_names(REPO):
        values = yaml.safe_load(params_text(REPO, name).split("\n", 2)[2])
        read = {entry[slot] for entry in values["methods"].values() for slot in TEACHER_SLOTS}
        assert all(set(entry) >= set(TEACHER_SLOTS) for entry in values["methods"].values()), name
        assert set(values["teachers"]) == read - {NO_TEACHER}, name
    viker = yaml.safe_load(params_text(REPO, "llava-mllmu-10-viker").split("\n", 2)[2])
    assert set(viker["teachers"]) == {"viker", "original"}
    assert viker["teachers"]["viker"] == {"teacher": "viker", "args": {"k": 5, "reference_kind": "people"}}
    vgid = yaml.safe_load(params_text(REPO, "llava-mllmu-5-vgid").split("\n", 2)[2])
    assert vgid["teachers"]["vgid"]["args"]["sigma"] == 0.4  # an overlay's entry merges into mini's
    assert set(vgid["teachers"]) == {"vgid", "base"} and vgid["methods"]["ga"] == {
        "loss": "ga", "forget_teacher": "none", "retain_teacher": "none"
    }  # fmt: skip


def test_a_method_reading_a_teacher_entry_the_file_lacks_is_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "teachers: {viker: {teacher: viker}}\nmethods: {vgid: {loss: vgid, forget_teacher: vgid}}\n"
    )
    with pytest.raises(ConfigError, match=r"method 'vgid' reads teacher entry 'vgid', which `teachers`"):
        check_params(params)
    params.write_text("teachers: {viker: {teacher: viker, args: {sigma: 0.4}}}\n")
    with pytest.raises(TeacherError, match=r"teacher 'viker' takes no argument 'sigma'; it accepts: k,"):
        check_params(params)


@pytest.mark.parametrize("name", experiment_names(REPO))
def test_no_shipped_experiment_unlearns_a_model_that_never_saw_its_people(name):
    """Each experiment's full model is the finetune stage's output (from an origin it downloads), or a
    checkpoint it declares fine-tuned on the benchmark; llava-hf's or Qwen's released ones are neither."""
    values = experiment_values(REPO, name)
    learned = full_model_learned(values)
    model = values["model"]["model"]
    assert model not in RELEASED, (name, learned)
    finetunes = values.get("finetunes") or {}
    if finetunes:
        assert model == "work/finetuned/full" and finetunes["full"]["origin"] in RELEASED
    else:
        assert model in values["experiment"]["fine_tuned"]


def test_an_experiment_on_a_released_checkpoint_is_refused_naming_both_ways_out(tmp_path):
    values = experiment_values(REPO, "llava-mllmu-10-viker")
    values["model"]["model"] = "work/hub/llava-1.5-7b-hf"
    with pytest.raises(
        ExperimentError, match="neither made by the finetune stage .* nor declared fine-tuned"
    ):
        full_model_learned(values)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(for_params(values)))
    with pytest.raises(ExperimentError, match="never saw the people"):
        check_params(params)
    values["finetunes"] = {"full": {"origin": "work/hub/llava-1.5-7b-hf"}}
    with pytest.raises(ExperimentError, match="finetunes.full writes work/finetuned/full"):
        full_model_learned(values)


def test_selecting_an_experiment_drops_the_runs_it_does_not_write(tmp_path):
    """Another experiment's runs (its origin, its methods) would be read into this one's report."""
    from pipeline.experiments import RUNS, declared_runs, drop_unselected_runs

    declared = declared_runs(Path(__file__).resolve().parents[1])  # the committed mini experiment
    assert {"full", "viker-s0", "vgid-s2"} <= declared and "origin" not in declared
    for name in ("full", "origin", "viker-s0"):
        (tmp_path / RUNS / name).mkdir(parents=True)
    assert drop_unselected_runs(tmp_path, declared) == ["origin"]
    assert sorted(path.name for path in (tmp_path / RUNS).iterdir()) == ["full", "viker-s0"]
