"""Experiments: params.yaml is the selected one, every shipped experiment resolves, selection and fetching."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.experiments import (
    ExperimentError,
    experiment_names,
    experiment_values,
    fetch,
    merged,
    params_text,
)
from pipeline.models import FAMILIES
from pipeline.unlearning.methods import resolve_method
from stages.cli import check_params, load_sections, main

REPO = Path(__file__).resolve().parents[1]


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
    assert default_map["train"]["model"] in sources and default_map["train"]["data"] in sources
    assert all(source["repo"].count("/") == 1 for source in sources.values())
    assert default_map["evaluate"]["data_format"] in ("mllmu", "clear")  # named, not detected
    assert default_map["evaluate"]["limit"] is None  # a real experiment scores every person


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
