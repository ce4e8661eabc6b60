"""The command line's own logic: one run per seed of --seeds (stages.cli.run_per_seed)."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from stages.cli import main


def _params(tmp_path) -> list[str]:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"methods": {}}))
    return ["--params", str(params)]


def test_relearn_runs_once_per_seed_with_the_seed_in_its_paths_and_as_its_seed(tmp_path, monkeypatch):
    import stages.relearn

    seen = []
    monkeypatch.setattr(stages.relearn, "run", lambda config: seen.append(config) or {"seed": config.seed})
    arguments = ["relearn", "--model", "m", "--data", "d", "--adapter", "a-s{seed}", "--out", "r-s{seed}"]
    result = CliRunner().invoke(main, [*_params(tmp_path), *arguments, "--seeds", "3, 5"])
    assert result.exit_code == 0, result.output
    assert [(config.seed, config.adapter, config.out) for config in seen] == [
        (3, "a-s3", "r-s3"),
        (5, "a-s5", "r-s5"),
    ]
    assert result.stdout == "".join(json.dumps({"seed": seed}, indent=2) + "\n" for seed in (3, 5))


def test_evaluate_keeps_its_seed_and_shares_one_base_across_the_seeds(tmp_path, monkeypatch):
    import stages.evaluate

    seen = []
    monkeypatch.setattr(stages.evaluate, "run", lambda config, base: seen.append((config, base)) or {})
    arguments = [
        "evaluate",
        "--model",
        "m",
        "--data",
        "d",
        "--adapter",
        "a-s{seed}",
        "--out",
        "e-s{seed}.json",
    ]
    result = CliRunner().invoke(main, [*_params(tmp_path), *arguments, "--seed", "7", "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    assert [(config.seed, config.adapter, config.out) for config, _ in seen] == [
        (7, "a-s0", "e-s0.json"),
        (7, "a-s1", "e-s1.json"),
    ]
    assert seen[0][1] is seen[1][1]


def test_without_seeds_one_run_keeps_the_paths_as_given(tmp_path, monkeypatch):
    import stages.relearn

    seen = []
    monkeypatch.setattr(stages.relearn, "run", lambda config: seen.append(config) or {})
    arguments = ["relearn", "--model", "m", "--data", "d", "--out", "r", "--seed", "2"]
    assert CliRunner().invoke(main, [*_params(tmp_path), *arguments]).exit_code == 0
    assert [(config.seed, config.adapter, config.out) for config in seen] == [(2, None, "r")]


def test_an_error_in_one_seeds_run_is_one_clear_message(tmp_path, monkeypatch):
    import stages.relearn

    def fails(config):
        raise ValueError(f"no adapter at {config.adapter}")

    monkeypatch.setattr(stages.relearn, "run", fails)
    arguments = ["relearn", "--model", "m", "--data", "d", "--adapter", "a-s{seed}", "--out", "r"]
    result = CliRunner().invoke(main, [*_params(tmp_path), *arguments, "--seeds", "4"])
    assert result.exit_code == 1
    assert "Error: no adapter at a-s4" in result.output
